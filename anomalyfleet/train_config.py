"""Prompt-training settings, kept free of torch so command lines can build and check them cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from anomalyfleet.errors import ConfigError

CACHE_DTYPES = ("float16", "float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    local_weight: float = 4.0
    cache: str = "memory"  # memory | disk | none
    cache_dir: str | None = None
    cache_dtype: str = "float16"  # float32 gives bit-for-bit the no-cache prompts
    feature_batch_size: int = 8
    num_workers: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch size must be at least 1")
        if self.cache not in ("memory", "disk", "none"):
            raise ConfigError(f"unknown cache mode {self.cache!r} (memory, disk or none)")
        if self.cache == "disk" and not self.cache_dir:
            raise ConfigError("--cache disk needs a cache directory")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"unknown cache dtype {self.cache_dtype!r}")

    @property
    def torch_cache_dtype(self):
        import torch

        return getattr(torch, self.cache_dtype)
