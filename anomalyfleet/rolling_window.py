"""A line's rolling window of recent images: batch zero-shot scoring with no normal image at all.

The window holds the patch features (one feature block) of a line's last `size` images. A new image
is scored as MuSc scores a batch: for every patch and every image in the window, the cosine distance
to that image's nearest patch; the patch score is the mean of the smallest `fraction` of those
distances. A defect seen in only a minority of the window's images finds no close patch in most of
them, while the normal majority always offers close patches to normal ones, so a few defective
images in the window do not make normal patches look anomalous. A query is compared only with the
images held *before* it arrives; it enters the window after it is scored, so no image is ever
compared with itself, and a score never depends on which other requests shared its model batch.

Scale. Raw mutual distances depend on the backbone, the block and the line's texture, so they are
put on a scale calibrated on the window's own images, refitted as the window rolls: every held image
is scored against the other held images (leave-one-out, from a cache of pairwise nearest-patch
distances kept up to date at insertion, so a refit costs no feature comparison). Maps are then
`(map - median) / (q99 - median)` of those reference maps' pixels, the convention of a line
memory's calibrated maps (0 = a typical pixel of the line's recent images, 1 = their 99th
percentile). The image score is the mean of the map's top `top_fraction` pixels, expressed as a
robust z-score against the reference images' scores: `(s - median) / (1.4826 * MAD)`. Median and
MAD ignore a minority of defective images in the window, and a z-score means the same on every line
and every backbone ("this many robust standard deviations above the line's recent images"), so one
threshold can be set without labelled images. Because the reference rolls, the same image can get
a slightly different score later: the scale follows the line, it is not frozen.

Memory, bounded at construction: `size * P * D` feature floats plus `size * size * P` cached
distances (P patches per image, D feature width), float32, on the window's device; see
`state_bytes`. Scoring B images costs one (B*P) x (size*P) similarity product, done in blocks of at
most `anomalyfleet.memory.MUTUAL_BLOCK_ELEMENTS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomalyfleet.maps import smooth_maps
from anomalyfleet.memory import (
    MapCalibration, nearest_both, smallest_mean, top_fraction_mean, upsample_patch_scores,
)

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
# Least image-score spread, in calibrated map units (1 = the reference pixels' median-to-q99 range):
# a window of near-identical images has a MAD near zero, and noise would then read as many sigmas.
SPREAD_FLOOR = 0.05
# Default image threshold on the robust z-scale: about 1 % of normal images above it on the Magnetic
# Tile stream (benchmarks/results-rolling-window.md).
Z_THRESHOLD = 3.0


@dataclass(frozen=True)
class WindowCalibration:
    """The window's scale at one moment: pixel scale of the maps, then the image scores' z-scale."""

    map: MapCalibration
    score_centre: float  # median image score of the reference images (calibrated map units)
    score_spread: float  # 1.4826 * their MAD, at least SPREAD_FLOOR
    images: int  # reference images it was fitted on

    def to_dict(self) -> dict:
        return {"map": self.map.to_dict(), "score_centre": self.score_centre, "score_spread": self.score_spread,
                "images": self.images}


@dataclass
class WindowScores:
    scores: np.ndarray  # (B,) robust z-scores against the window's reference images
    maps: np.ndarray  # (B, S, S) smoothed maps on the calibrated pixel scale
    images: int  # images in the window the batch was compared with


class RollingWindow:
    """The last `size` images' patch features of one line, a ring buffer on one device.

    Not thread-safe: one caller (a Serve replica's model thread) owns it. `score_then_add` is the
    service's entry point; `patch_scores`, `reference_patch_scores` and `add` expose the pieces.
    """

    def __init__(self, size: int, grid: tuple[int, int], image_size: int, min_images: int = 8,
                 fraction: float = 0.3, sigma: float = 4.0, top_fraction: float = 0.01,
                 device: str | torch.device = "cpu", refit_every: int | None = None):
        if size < 3:
            raise ValueError(f"a window needs room for at least 3 images, got size {size}")
        if not 3 <= min_images <= size:
            # Three images: the fewest whose leave-one-out scores give a median and a spread.
            raise ValueError(f"min_images must be within 3..size ({size}), got {min_images}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.size = int(size)
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size = int(image_size)
        self.min_images = int(min_images)
        self.fraction = float(fraction)
        self.sigma = float(sigma)
        self.top_fraction = float(top_fraction)
        self.device = torch.device(device)
        # Refitting smooths one full-size map per held image; every few insertions keeps that a
        # small share of the scoring cost while the scale still follows the line.
        self.refit_every = max(1, self.size // 8) if refit_every is None else max(1, int(refit_every))
        self.count = 0  # images held
        self.added = 0  # images ever added; the next one goes to slot added % size
        self.calibration: WindowCalibration | None = None
        self._fitted_at = -1
        self._features: Tensor | None = None  # (size, P, D), allocated at the first image
        self._pairs: Tensor | None = None  # (size, size, P): [i, j, p] patch p of slot i to slot j

    # --- state ------------------------------------------------------------------------------------
    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def ready(self) -> bool:
        return self.count >= self.min_images

    def state_bytes(self, dim: int | None = None) -> int:
        """Bytes the full window takes for feature width `dim` (its own once it holds an image)."""
        dim = dim if dim is not None else (self._features.shape[-1] if self._features is not None else 0)
        return 4 * (self.size * self.patches * dim + self.size * self.size * self.patches)

    def order(self) -> Tensor:
        """Slots of the held images, oldest first."""
        if self.count < self.size:
            return torch.arange(self.count, device=self.device)
        return (torch.arange(self.size, device=self.device) + self.added) % self.size

    def held(self) -> Tensor:
        """(count, P, D) normalised features of the held images, oldest first."""
        if self._features is None:
            return torch.empty(0, self.patches, 0, device=self.device)
        return self._features[self.order()]

    def reset(self) -> None:
        self.count = self.added = 0
        self.calibration, self._fitted_at = None, -1
        self._features = self._pairs = None

    # --- scoring ----------------------------------------------------------------------------------
    def _normalise(self, patches: Tensor) -> Tensor:
        if patches.dim() != 3 or patches.shape[1] != self.patches:
            raise ValueError(f"expected (B, {self.patches}, D) patch features, got {tuple(patches.shape)}")
        if self._features is not None and patches.shape[2] != self._features.shape[2]:
            raise ValueError(f"feature width {patches.shape[2]} differs from the window's {self._features.shape[2]}")
        return F.normalize(patches.detach().to(self.device, torch.float32), dim=-1)

    def _cross(self, normed: Tensor) -> tuple[Tensor, Tensor]:
        """Distances between `normed` and the held images (in slot order), both ways."""
        assert self._features is not None
        return nearest_both(normed, self._features[: self.count])

    def patch_scores(self, patches: Tensor) -> Tensor:
        """(B, P) raw mutual scores of (B, P, D) patches against the held images; nothing is added."""
        if self.count == 0:
            raise ValueError("the window holds no image yet")
        to_window, _ = self._cross(self._normalise(patches))
        return smallest_mean(to_window, self.fraction, self.count, dim=1)

    def reference_patch_scores(self) -> Tensor:
        """(count, P) raw scores of each held image against the other held ones, oldest first.

        Equal to `memory.mutual_patch_scores(self.held(), fraction)`, read from the distance cache.
        """
        if self.count < 2:
            raise ValueError("leave-one-out scores need at least two held images")
        assert self._pairs is not None
        order = self.order()
        pairs = self._pairs[order][:, order]  # the diagonal (an image to itself) is +inf
        return smallest_mean(pairs, self.fraction, self.count - 1, dim=1)

    def _maps(self, patch_scores: Tensor) -> np.ndarray:
        return smooth_maps(upsample_patch_scores(patch_scores, self.grid, self.image_size), self.sigma)

    def fit(self) -> WindowCalibration:
        """Refit the scale on the held images' leave-one-out maps (see the module's docstring)."""
        maps = self._maps(self.reference_patch_scores())
        # Every other pixel each way: smoothed maps barely change between neighbours, so the
        # quantiles hold while their sort, most of a refit's cost, shrinks fourfold.
        map_cal = MapCalibration.fit(torch.from_numpy(np.ascontiguousarray(maps[:, ::2, ::2])))
        image = top_fraction_mean(torch.from_numpy(map_cal.apply(maps)), self.top_fraction).double()
        centre = float(image.median())
        spread = max(MAD_TO_SIGMA * float((image - centre).abs().median()), SPREAD_FLOOR)
        self.calibration = WindowCalibration(map_cal, centre, spread, images=self.count)
        self._fitted_at = self.added
        return self.calibration

    def _calibration(self) -> WindowCalibration:
        if self.calibration is None or self.added - self._fitted_at >= self.refit_every:
            return self.fit()
        return self.calibration

    def _calibrated(self, patch_scores: Tensor) -> WindowScores:
        cal = self._calibration()
        maps = cal.map.apply(self._maps(patch_scores)).astype(np.float32)
        top = top_fraction_mean(torch.from_numpy(maps), self.top_fraction).numpy()
        scores = ((top - cal.score_centre) / cal.score_spread).astype(np.float32)
        return WindowScores(scores=scores, maps=maps, images=self.count)

    def score_held(self) -> WindowScores:
        """Calibrated scores and maps of the held images themselves, oldest first: each against the
        others, on the scale those same scores give (a closed batch scored as MuSc scores one)."""
        if self.count < 3:
            raise ValueError(f"scoring the held images needs at least 3 of them, got {self.count}")
        self.fit()
        return self._calibrated(self.reference_patch_scores())

    def score(self, patches: Tensor) -> WindowScores:
        """Calibrated scores and maps of (B, P, D) patches; nothing is added. Needs `ready`."""
        if not self.ready:
            raise ValueError(f"the window holds {self.count} images; scoring needs {self.min_images}")
        return self._calibrated(self.patch_scores(patches))

    def score_then_add(self, patches: Tensor) -> WindowScores | None:
        """Score (B, P, D) patches against the window when it is ready, then add them to it.

        None when the window held fewer than `min_images`: the caller scores these images another
        way; they are added all the same. One similarity product serves the scores and the insertion.
        """
        return self._then_add(patches, self._calibrated)

    def peers_then_add(self, patches: Tensor) -> Tensor | None:
        """Raw (B, P) mutual scores of (B, P, D) patches against the window when it is ready, then
        add them; None while it fills. What `score_then_add` calibrates, and what a line memory
        takes as peers (`LineMemory.patch_scores`)."""
        return self._then_add(patches, lambda peers: peers)

    def _then_add(self, patches: Tensor, finish):
        """`finish(raw mutual scores)` against the window as it was (None while it fills), then the
        patches join it; one similarity product serves both."""
        normed = self._normalise(patches)
        if self._features is None:
            self._insert(normed, None, None)
            return None
        to_window, from_window = self._cross(normed)
        result = finish(smallest_mean(to_window, self.fraction, self.count, dim=1)) if self.ready else None
        self._insert(normed, to_window, from_window)
        return result

    # --- insertion --------------------------------------------------------------------------------
    def add(self, patches: Tensor) -> None:
        """Add (B, P, D) patch features, evicting the oldest images beyond `size`."""
        normed = self._normalise(patches)
        if self._features is None or self.count == 0:
            self._insert(normed, None, None)
        else:
            self._insert(normed, *self._cross(normed))

    def _insert(self, normed: Tensor, to_window: Tensor | None, from_window: Tensor | None) -> None:
        if self._features is None:
            self._features = torch.zeros(self.size, self.patches, normed.shape[2], device=self.device)
            self._pairs = torch.full((self.size, self.size, self.patches), float("inf"), device=self.device)
        assert self._pairs is not None
        dropped = max(0, normed.shape[0] - self.size)
        if dropped:  # more new images than room: only the newest `size` would survive anyway
            normed = normed[dropped:]
            to_window = None if to_window is None else to_window[dropped:]
            from_window = None if from_window is None else from_window[:, dropped:]
            self.added += dropped
        slots = (self.added + torch.arange(normed.shape[0], device=self.device)) % self.size
        held = torch.arange(self.count, device=self.device)
        self._features[slots] = normed
        if self.count and to_window is not None and from_window is not None:
            self._pairs[slots[:, None], held[None, :]] = to_window
            self._pairs[held[:, None], slots[None, :]] = from_window
        # Written last: where a new image replaces an old one, these overwrite the old image's
        # entries above, and they put +inf on the new images' own diagonal.
        among, _ = nearest_both(normed, normed)
        among[torch.arange(len(slots)), torch.arange(len(slots))] = float("inf")
        self._pairs[slots[:, None], slots[None, :]] = among
        self.added += normed.shape[0]
        self.count = min(self.size, self.count + normed.shape[0])


__all__ = ["RollingWindow", "WindowCalibration", "WindowScores", "nearest_both", "smallest_mean"]
