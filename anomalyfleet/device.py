"""Pick the device once and pass it on: CUDA when present (and, in a Ray worker, granted), CPU otherwise."""

from __future__ import annotations

import contextlib
import sys

import torch


def ray_gpu_grant() -> list | None:
    """The GPU ids Ray granted this process when it is a Ray worker (task, actor, replica); None
    outside one (a plain process or a Ray driver)."""
    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is None or not ray.is_initialized():
        return None
    from ray._private.worker import WORKER_MODE, global_worker

    if global_worker.mode != WORKER_MODE:
        return None
    return list(ray.get_gpu_ids())


def auto_device_type(cuda_available: bool, grant: list | None) -> str:
    """`cuda` or `cpu` for the `auto` preference. A Ray worker granted no GPU stays on the CPU: Ray
    2.60 no longer hides the node's GPUs from such a worker (CUDA_VISIBLE_DEVICES is left alone when
    nothing was granted), so CUDA would be available and GPU 0 used outside Ray's accounting."""
    if not cuda_available:
        return "cpu"
    return "cpu" if grant is not None and len(grant) == 0 else "cuda"


def select_device(preference: str = "auto") -> torch.device:
    from anomalyfleet.errors import ConfigError

    if preference == "auto":
        return torch.device(auto_device_type(torch.cuda.is_available(), ray_gpu_grant()))
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
