"""Frozen image features computed once and reused by every epoch and every later run.

The image side of AnomalyCLIP does not depend on the prompts, so training only needs the backbone
once per image. Features are kept in memory and, optionally, on disk: one file per image, keyed by
the image's content hash and a digest of everything that changes the features (backbone
fingerprint, image size, layers, DPAM depth, preprocessing).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalyfleet.backbones import Features
from anomalyfleet.data import AnomalyDataset, Sample
from anomalyfleet.detector import Detector
from anomalyfleet.manifest import atomic_write_bytes, file_sha256


def settings_key(detector: Detector) -> str:
    """Digest of what determines the frozen features (not the prompts)."""
    payload = {
        "backbone": detector.backbone.fingerprint(),
        "image_size": detector.settings.image_size,
        "layers": list(detector.settings.layers),
        "dpam_layers": detector.settings.dpam_layers,
        "mean": list(detector.mean),
        "std": list(detector.std),
        "precision": detector.precision,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class FeatureTable:
    """Features, masks and labels of a whole training set, indexed by sample position."""

    global_features: Tensor  # (N, D)
    patch_features: Tensor  # (N, L, P, D)
    masks: Tensor  # (N, S, S) uint8
    has_mask: Tensor  # (N,) bool
    labels: Tensor  # (N,) long
    grid: tuple[int, int]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: Tensor, device: torch.device) -> tuple[Features, Tensor, Tensor, Tensor]:
        features = Features(
            global_feature=self.global_features[indices].to(device, torch.float32),
            patch_features=[p.to(device, torch.float32) for p in self.patch_features[indices].unbind(1)],
            grid=self.grid,
        )
        return (
            features,
            self.masks[indices].to(device, torch.float32),
            self.has_mask[indices].to(device),
            self.labels[indices].to(device),
        )


def _loader(detector: Detector, samples: Sequence[Sample], batch_size: int, num_workers: int) -> DataLoader:
    dataset = AnomalyDataset(list(samples), image_size=detector.image_size, mean=detector.mean, std=detector.std)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def compute_feature_table(
    detector: Detector,
    samples: Sequence[Sample],
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureTable:
    """Run the frozen backbone over `samples` once (images already on disk are read from the cache)."""
    # The stored precision is part of the key: float32 features promise bit-for-bit the uncached
    # prompts, which float16 files read back would silently break.
    key_dir = Path(cache_dir) / settings_key(detector) / str(dtype).removeprefix("torch.") if cache_dir else None
    n = len(samples)
    globals_, patches, masks, has_mask, labels = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
    todo: list[int] = []
    hashes: list[str | None] = [None] * n
    if key_dir is not None:
        for i, sample in enumerate(samples):
            hashes[i] = file_sha256(sample.image)
            path = key_dir / hashes[i][:2] / f"{hashes[i]}.pt"
            if path.is_file():
                cached = torch.load(path, map_location="cpu", weights_only=True)
                globals_[i], patches[i] = cached["global"], cached["patches"]
            todo.append(i)  # masks and labels always come from the current sample list
    else:
        todo = list(range(n))

    loader = _loader(detector, [samples[i] for i in todo], batch_size, num_workers)
    bar = tqdm(total=len(todo), desc="features", unit="img", disable=not progress)
    offset = 0
    for batch in loader:
        size = batch["image"].shape[0]
        positions = todo[offset : offset + size]
        offset += size
        need = [j for j, i in enumerate(positions) if globals_[i] is None]
        if need:
            feats = detector.extract(batch["image"][need].to(detector.device))
            stacked = torch.stack(feats.patch_features, dim=1).to("cpu", dtype)
            for row, j in enumerate(need):
                i = positions[j]
                globals_[i] = feats.global_feature[row].to("cpu", dtype)
                patches[i] = stacked[row].clone()
                if key_dir is not None:
                    buffer = io.BytesIO()
                    torch.save({"global": globals_[i], "patches": patches[i]}, buffer)
                    atomic_write_bytes(key_dir / hashes[i][:2] / f"{hashes[i]}.pt", buffer.getvalue())
        for j, i in enumerate(positions):
            masks[i] = (batch["mask"][j, 0] > 0.5).to(torch.uint8)
            has_mask[i] = bool(batch["has_mask"][j])
            labels[i] = int(batch["label"][j])
        bar.update(size)
    bar.close()
    grid = detector.backbone.grid
    return FeatureTable(
        global_features=torch.stack(globals_).to(dtype),
        patch_features=torch.stack(patches).to(dtype),
        masks=torch.stack(masks),
        has_mask=torch.tensor(has_mask, dtype=torch.bool),
        labels=torch.tensor(labels, dtype=torch.long),
        grid=grid,
    )
