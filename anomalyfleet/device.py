"""Pick the device once and pass it on: CUDA when present, CPU otherwise."""

from __future__ import annotations

import contextlib

import torch


def select_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        from anomalyfleet.errors import ConfigError

        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return device


def autocast(device: torch.device, dtype: str | None):
    """Mixed precision for the frozen image encoder: `bf16`/`fp16`, or None for full fp32."""
    if dtype in (None, "", "fp32", "float32"):
        return contextlib.nullcontext()
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        from anomalyfleet.errors import ConfigError

        raise ConfigError(f"unknown precision {dtype!r} (use fp32, bf16 or fp16)")
    return torch.autocast(device_type=device.type, dtype=table[dtype])
