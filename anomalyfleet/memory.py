"""Line memory: training-free evidence from a production line's own images.

Two sources that need no defect examples:
- a few-shot *normal memory*: patch features of k normal images of the line (greedy coreset for
  large k); a patch's score is the cosine distance to its nearest normal patch;
- *batch mutual scoring* (as MuSc): with no normal image at all, every patch of an unlabelled batch
  is compared with the patches of the other images; its score is the mean of its smallest
  distances to them, so a minority of defective images in the batch does not pull normals up.
Both produce patch-grid maps that are upsampled and smoothed like the prompt maps, and are fused
with them on a common scale calibrated on normal images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def nearest_distance(queries: Tensor, memory: Tensor, chunk: int = 4096) -> Tensor:
    """Cosine distance from each query (Q, D) to its nearest row of memory (M, D); both normalised.

    Batched matrix products in chunks keep memory bounded; runs on whatever device the inputs are.
    """
    out = torch.empty(queries.shape[0], device=queries.device, dtype=torch.float32)
    for start in range(0, queries.shape[0], chunk):
        block = queries[start : start + chunk].float() @ memory.float().t()
        out[start : start + chunk] = 1.0 - block.max(dim=1).values
    return out


def greedy_coreset(features: Tensor, size: int, seed: int = 0) -> Tensor:
    """Indices of a greedy k-center coreset of `size` rows (farthest-point sampling, cosine)."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    distance = 1.0 - features @ features[chosen[0]]
    for _ in range(size - 1):
        index = int(distance.argmax())
        chosen.append(index)
        distance = torch.minimum(distance, 1.0 - features @ features[index])
    return torch.tensor(chosen)


@dataclass
class PatchMemory:
    """Normalised normal patch features of one line at one feature layer."""

    features: Tensor  # (M, D), L2-normalised
    layer: int
    grid: tuple[int, int]
    shots: int

    @classmethod
    def build(cls, patches: Tensor, layer: int, grid: tuple[int, int], max_size: int | None = None, seed: int = 0) -> "PatchMemory":
        """From (k, P, D) patch features of k normal images."""
        flat = F.normalize(patches.reshape(-1, patches.shape[-1]).float(), dim=-1)
        if max_size is not None and flat.shape[0] > max_size:
            flat = flat[greedy_coreset(flat, max_size, seed)]
        return cls(features=flat.contiguous(), layer=layer, grid=tuple(grid), shots=int(patches.shape[0]))

    def patch_scores(self, patches: Tensor) -> Tensor:
        """(B, P) distance of every patch of (B, P, D) to its nearest normal patch."""
        queries = F.normalize(patches.reshape(-1, patches.shape[-1]).float(), dim=-1)
        memory = self.features.to(queries.device)
        return nearest_distance(queries, memory).reshape(patches.shape[0], patches.shape[1])

    def state_dict(self) -> dict:
        return {"features": self.features.cpu(), "layer": self.layer, "grid": list(self.grid), "shots": self.shots}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PatchMemory":
        return cls(features=state["features"], layer=int(state["layer"]), grid=tuple(state["grid"]), shots=int(state["shots"]))


def mutual_patch_scores(patches: Tensor, fraction: float = 0.3) -> Tensor:
    """(B, P) batch zero-shot scores from (B, P, D) patches of B unlabelled images of one line.

    For every patch and every *other* image, the distance to that image's nearest patch; the score
    is the mean of the smallest `fraction` of those B - 1 distances (at least one), so defects that
    appear in a minority of the images do not make normal patches look anomalous.
    """
    batch = patches.shape[0]
    if batch < 2:
        raise ValueError("mutual scoring needs at least two images of the same line")
    normed = F.normalize(patches.float(), dim=-1)
    per_other = torch.empty(batch, patches.shape[1], batch - 1, device=patches.device)
    for i in range(batch):
        others = [j for j in range(batch) if j != i]
        for slot, j in enumerate(others):
            per_other[i, :, slot] = nearest_distance(normed[i], normed[j])
    keep = max(1, int(round(fraction * (batch - 1))))
    return per_other.sort(dim=-1).values[..., :keep].mean(dim=-1)


def upsample_patch_scores(scores: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """(B, P) patch scores to (B, size, size) maps, bilinear like the prompt maps."""
    maps = scores.reshape(scores.shape[0], 1, *grid)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


@dataclass
class MapCalibration:
    """Affine scale that puts a source's maps on a common footing: (map - centre) / spread,
    with centre and spread measured on normal images (median and a high quantile's distance)."""

    centre: float
    spread: float

    @classmethod
    def fit(cls, normal_maps: Tensor, quantile: float = 0.99) -> "MapCalibration":
        values = normal_maps.float().flatten()
        if values.numel() > 2_000_000:  # quantile() has an input limit; a strided sample suffices
            values = values[:: values.numel() // 2_000_000 + 1]
        centre = float(values.median())
        spread = float(torch.quantile(values, quantile)) - centre
        return cls(centre=centre, spread=max(spread, 1e-6))

    def apply(self, maps: Tensor) -> Tensor:
        return (maps - self.centre) / self.spread

    def to_dict(self) -> dict:
        return {"centre": self.centre, "spread": self.spread}

    @classmethod
    def from_dict(cls, data: dict) -> "MapCalibration":
        return cls(centre=float(data["centre"]), spread=float(data["spread"]))


def top_fraction_mean(maps: Tensor, fraction: float = 0.01) -> Tensor:
    """(B,) image scores: mean of the top `fraction` of each map's pixels."""
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)
