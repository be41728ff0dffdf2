"""From features and prompt features to image scores and anomaly maps."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import Tensor

TEMPERATURE = 0.07


def image_logits(global_feature: Tensor, text_features: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """(B, 2) logits [normal, abnormal] from the global feature and normalised prompt features."""
    g = F.normalize(global_feature.float(), dim=-1)
    return g @ text_features.t() / temperature


def image_scores(global_feature: Tensor, text_features: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    return image_logits(global_feature, text_features, temperature).softmax(dim=-1)[:, 1]


def layer_probability_maps(
    patch_features: Sequence[Tensor],
    text_features: Tensor,
    grid: tuple[int, int],
    size: int,
    temperature: float = TEMPERATURE,
) -> list[Tensor]:
    """Per layer, (B, 2, size, size) probabilities [S_n, S_a], upsampled bilinearly from the patch grid."""
    maps = []
    for patches in patch_features:
        p = F.normalize(patches.float(), dim=-1)
        probs = (p @ text_features.t() / temperature).softmax(dim=-1)  # (B, N, 2)
        probs = probs.transpose(1, 2).reshape(p.shape[0], 2, *grid)
        maps.append(F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False))
    return maps


def anomaly_map(layer_maps: Sequence[Tensor]) -> Tensor:
    """Sum of the abnormal channel over layers: (B, size, size), before smoothing."""
    return torch.stack([m[:, 1] for m in layer_maps]).sum(dim=0)


def smooth_maps(maps: np.ndarray | Tensor, sigma: float = 4.0) -> np.ndarray:
    """Gaussian smoothing per map, scipy's defaults (reflect border, truncate 4 sigma) as the reference."""
    array = maps.detach().cpu().float().numpy() if isinstance(maps, Tensor) else np.asarray(maps, dtype=np.float32)
    if sigma <= 0:
        return array
    return np.stack([gaussian_filter(m, sigma=sigma) for m in array]) if len(array) else array
