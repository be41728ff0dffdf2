"""Flipped and quarter-turned views of a line's few normal images, for its memory.

One to a few normal images show each kind of normal patch in few orientations: a texture's grain
one way, a part's edge on one side. A new image whose normal patches run the other way then looks
far from the memory. Adding the memory images' flips and quarter turns (the symmetries of a square
image) fills that in, as few-shot patch-memory methods do with rotations of their references. The
cost is a bank `len(views)` times larger: nearest-patch search time grows with it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

# Transforms of (B, C, H, W) image batches. Each is exact (pixels permuted, none interpolated) and
# commutes with per-channel normalisation, so views can be taken of normalised tensors.
_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "flip_lr": lambda x: x.flip(-1),
    "flip_ud": lambda x: x.flip(-2),
    "turn_180": lambda x: x.flip(-1).flip(-2),
    "transpose": lambda x: x.transpose(-1, -2),
    "turn_90_clockwise": lambda x: x.transpose(-1, -2).flip(-1),
    "turn_90_anticlockwise": lambda x: x.transpose(-1, -2).flip(-2),
    "anti_transpose": lambda x: x.transpose(-1, -2).flip(-1).flip(-2),
}

# The views that swap an image's rows and columns: they need square images.
_TRANSPOSING = {"transpose", "turn_90_clockwise", "turn_90_anticlockwise", "anti_transpose"}

# Named view sets, the identity first: a memory image's own patches come first among its rows.
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flips": ("identity", "flip_lr", "flip_ud", "turn_180"),
    "d4": tuple(_TRANSFORMS),
}
DEFAULT_VIEWS = "d4"
# With views, a bank is cut (greedy coreset) to what a plain memory of this many images, or of its
# own k if more, would hold: views then never slow the nearest-patch search beyond such a memory.
# Measured at k = 4 and 16 with eight views on the three products of
# benchmarks/line_memory_products.py: the cut bank's image AUROC was within 0.4 of the full one's
# (0.2 lower on ELPV mono cells at k = 16, equal or higher elsewhere).
VIEW_BANK_IMAGES = 16


def view_bank_limit(shots: int, patches_per_view: int) -> int:
    """Rows a bank of `shots` images with views is cut to by default (see VIEW_BANK_IMAGES)."""
    return max(shots, VIEW_BANK_IMAGES) * patches_per_view


def view_names(views: str) -> tuple[str, ...]:
    try:
        return VIEW_SETS[views]
    except KeyError:
        raise ValueError(f"memory views must be one of {', '.join(VIEW_SETS)}, got {views!r}") from None


def image_views(images: Tensor, views: str) -> list[Tensor]:
    """Each view of the (B, C, H, W) batch, in `VIEW_SETS[views]` order (the batch itself first)."""
    names = view_names(views)
    if images.dim() != 4:
        raise ValueError(f"image views need a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if _TRANSPOSING.intersection(names) and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"quarter turns need square images, got {images.shape[-2]}x{images.shape[-1]}; "
                         "use views 'flips' or 'none'")
    return [_TRANSFORMS[name](images).contiguous() for name in names]


def other_view_patches(detector, images: Tensor, layers: Sequence[int], views: str) -> list[Tensor]:
    """Per block of `layers`, (B, (V - 1) * P, D) patch features of the batch's views other than
    itself, view after view: appended to the images' own (B, P, D) features along the patch axis,
    they give the layout `fit_line_memory` takes (each image's rows together, its own view first).
    One backbone pass per view, each the batch's size, so peak memory does not grow with V."""
    others = image_views(images, views)[1:]
    if not others:
        raise ValueError(f"views {views!r} hold the images alone: there are no other views to compute")
    parts = [detector.extract(view, layers=tuple(layers)).patch_features for view in others]
    return [torch.cat([part[slot] for part in parts], dim=1) for slot in range(len(layers))]
