"""Where a synthetic defect goes: boxes, ellipses or free-form blobs with size, aspect and rotation
ranges, optionally inside the object's foreground. Every draw comes from a numpy Generator, so a
seed fixes the region."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from anomalyfleet.errors import ConfigError

Shape = Literal["box", "ellipse", "free"]


@dataclass(frozen=True)
class RegionSpec:
    """Ranges a region is drawn from.

    `size` is the square root of the region's area as a fraction of the image's shorter side, so the
    same range means the same defect size for any aspect. `aspect` is width/height, drawn
    log-uniformly so that 1/2 and 2 are equally likely. `rotation` is in degrees.
    """

    shape: Shape = "box"
    size: tuple[float, float] = (0.1, 0.3)
    aspect: tuple[float, float] = (0.5, 2.0)
    rotation: tuple[float, float] = (0.0, 0.0)
    inside_foreground: bool = False
    min_foreground: float = 0.8  # share of the region that must fall on the foreground
    attempts: int = 32

    def __post_init__(self):
        if self.shape not in ("box", "ellipse", "free"):
            raise ConfigError(f"region shape must be box, ellipse or free, got {self.shape!r}")
        for name in ("size", "aspect", "rotation"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"region {name} range [{lo}, {hi}] is empty")
        if not (0 < self.size[0] and self.size[1] <= 1):
            raise ConfigError(f"region size must lie in (0, 1], got {list(self.size)}")
        if self.aspect[0] <= 0:
            raise ConfigError(f"region aspect must be positive, got {list(self.aspect)}")

    @classmethod
    def from_dict(cls, data: dict | None) -> "RegionSpec":
        data = dict(data or {})
        for key in ("size", "aspect", "rotation"):
            if key in data:
                value = data[key]
                data[key] = (float(value), float(value)) if np.isscalar(value) else tuple(float(v) for v in value)
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"bad region settings {data}: {exc}") from exc

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Region:
    shape: str
    cx: float
    cy: float
    width: float
    height: float
    angle: float  # degrees, counter-clockwise in image coordinates (y down)
    mask: np.ndarray = field(repr=False)  # (H, W) bool
    wobble: list[float] = field(default_factory=list)  # free-form outline coefficients

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 (exclusive) of the rasterised mask."""
        ys, xs = np.nonzero(self.mask)
        if len(ys) == 0:
            return (0, 0, 0, 0)
        return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    def to_dict(self) -> dict:
        return {
            "shape": self.shape, "cx": round(self.cx, 3), "cy": round(self.cy, 3),
            "width": round(self.width, 3), "height": round(self.height, 3), "angle": round(self.angle, 3),
            "bbox": list(self.bbox), "area": int(self.mask.sum()),
        }


def rasterise(shape: str, height: int, width: int, cx: float, cy: float, w: float, h: float, angle: float,
              wobble: np.ndarray | None = None) -> np.ndarray:
    """(height, width) bool mask of one region, evaluated on pixel centres."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    theta = np.deg2rad(angle)
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = xs - cx, ys - cy
    # Coordinates in the region's own frame, normalised so its outline sits at 1.
    u = (dx * c + dy * s) / max(w / 2, 0.5)
    v = (-dx * s + dy * c) / max(h / 2, 0.5)
    if shape == "box":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    rho2 = u * u + v * v
    if shape == "ellipse" or wobble is None or len(wobble) == 0:
        return rho2 <= 1
    # Free form: an ellipse whose radius varies smoothly with the polar angle (a few low harmonics),
    # which gives irregular but connected, hole-free blobs.
    phi = np.arctan2(v, u)
    coeffs = np.asarray(wobble, dtype=np.float32).reshape(-1, 2)
    k = np.arange(2, 2 + len(coeffs), dtype=np.float32)
    radius = 1 + np.tensordot(coeffs[:, 0], np.cos(k[:, None, None] * phi[None] + coeffs[:, 1][:, None, None]), axes=1)
    return rho2 <= (0.8 * radius) ** 2


def _draw_parameters(rng: np.random.Generator, spec: RegionSpec, height: int, width: int, n: int) -> dict:
    side = min(height, width)
    size = rng.uniform(*spec.size, n) * side
    aspect = np.exp(rng.uniform(np.log(spec.aspect[0]), np.log(spec.aspect[1]), n))
    w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    angle = rng.uniform(*spec.rotation, n)
    theta = np.deg2rad(angle)
    half_x = np.abs(w / 2 * np.cos(theta)) + np.abs(h / 2 * np.sin(theta))
    half_y = np.abs(w / 2 * np.sin(theta)) + np.abs(h / 2 * np.cos(theta))
    # A rotated region that would not fit is shrunk, keeping its aspect, rather than clipped by the border.
    shrink = np.minimum(1.0, np.minimum(width / (2 * half_x), height / (2 * half_y)))
    w, h, half_x, half_y = w * shrink, h * shrink, half_x * shrink, half_y * shrink
    cx = rng.uniform(0, 1, n) * (width - 2 * half_x) + half_x
    cy = rng.uniform(0, 1, n) * (height - 2 * half_y) + half_y
    amplitudes = rng.uniform(0, 0.25, (n, 4)) / np.arange(1, 5)
    phases = rng.uniform(0, 2 * np.pi, (n, 4))
    wobble = np.stack([amplitudes, phases], axis=-1).reshape(n, -1)
    return {"cx": cx, "cy": cy, "w": w, "h": h, "angle": angle, "wobble": wobble}


def sample_region(rng: np.random.Generator, spec: RegionSpec, height: int, width: int,
                  foreground: np.ndarray | None = None) -> Region:
    """One region. With `spec.inside_foreground`, centres are drawn on foreground pixels and the
    first candidate covering at least `min_foreground` of foreground wins (else the best one); the
    mask is then cut to the foreground so the defect never lands on the background."""
    use_fg = spec.inside_foreground and foreground is not None and foreground.any()
    n = spec.attempts if use_fg else 1
    p = _draw_parameters(rng, spec, height, width, n)
    if use_fg:
        ys, xs = np.nonzero(foreground)
        pick = rng.integers(0, len(ys), n)
        p["cx"], p["cy"] = xs[pick] + 0.5, ys[pick] + 0.5
    best, best_share = None, -1.0
    for i in range(n):
        mask = rasterise(spec.shape, height, width, p["cx"][i], p["cy"][i], p["w"][i], p["h"][i], p["angle"][i],
                         p["wobble"][i] if spec.shape == "free" else None)
        if not mask.any():
            continue
        share = float((mask & foreground).sum() / mask.sum()) if use_fg else 1.0
        if share > best_share:
            best, best_share = (i, mask), share
        if share >= spec.min_foreground:
            break
    if best is None:  # sub-pixel region: fall back to the single pixel under its centre
        i = 0
        mask = np.zeros((height, width), bool)
        mask[min(int(p["cy"][0]), height - 1), min(int(p["cx"][0]), width - 1)] = True
    else:
        i, mask = best
    if use_fg and (mask & foreground).any():
        mask = mask & foreground
    return Region(spec.shape, float(p["cx"][i]), float(p["cy"][i]), float(p["w"][i]), float(p["h"][i]),
                  float(p["angle"][i]), mask, [float(x) for x in p["wobble"][i]] if spec.shape == "free" else [])


def estimate_foreground(image: np.ndarray, margin: int = 4) -> np.ndarray:
    """Object pixels of a product photo: those far (Otsu threshold) from the border's median colour.

    Good enough for objects on a plain background; textures fill the frame and come out (nearly)
    all foreground or all background, and `sample_region` then ignores the mask when it is empty.
    """
    from scipy import ndimage

    rgb = image.astype(np.float32).reshape(image.shape[0], image.shape[1], -1)
    border = np.concatenate([rgb[:margin].reshape(-1, rgb.shape[2]), rgb[-margin:].reshape(-1, rgb.shape[2]),
                             rgb[:, :margin].reshape(-1, rgb.shape[2]), rgb[:, -margin:].reshape(-1, rgb.shape[2])])
    distance = np.linalg.norm(rgb - np.median(border, axis=0), axis=2)
    hist, edges = np.histogram(distance, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    threshold = centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)]
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(distance > threshold, iterations=2))
    return mask
