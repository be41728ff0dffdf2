"""Pick the device once and pass it on: CUDA when present, CPU otherwise."""

from __future__ import annotations

import contextlib

import torch


def select_device(preference: str = "auto") -> torch.device:
    from anomalyfleet.errors import ConfigError

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {preference!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {preference} was asked for but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {preference}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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
