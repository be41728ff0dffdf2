"""Procedural defect generators, the offline default and the baselines: Perlin-noise texture blends
(as in DRAEM) and CutPaste / CutPaste-scar. Each returns the defect image and its exact mask; the
same seed gives the same output. Whole-array numpy only: no per-pixel Python loops."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from anomalyfleet.errors import ConfigError
from anomalyfleet.synthesis.regions import Region, RegionSpec, sample_region


@dataclass
class Synthesis:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    region: Region
    details: dict = field(default_factory=dict)  # per-sample draws worth recording (beta, source offset...)


Color = Literal["auto", "grey", "rgb"]
COLORS = ("auto", "grey", "rgb")
# ITU-R BT.601 luma, what PIL's convert("L") uses, so a grey defect looks like the image converted.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def check_color(color: str) -> Color:
    if color not in COLORS:
        raise ConfigError(f"color must be one of {', '.join(COLORS)}, got {color!r}")
    return color  # type: ignore[return-value]


def is_greyscale(image: np.ndarray) -> bool:
    """True when every pixel has equal channels (a greyscale photo loaded as RGB)."""
    return bool(image.ndim == 2 or ((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()))


def wants_grey(color: Color, image: np.ndarray) -> bool:
    return color == "grey" or (color == "auto" and is_greyscale(image))


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) float pixels to their luma, repeated over the channels: equal channels after rounding."""
    luma = pixels @ LUMA.astype(pixels.dtype)
    return np.repeat(luma[..., None], 3, axis=-1)


def perlin_noise(rng: np.random.Generator, height: int, width: int, res_y: int, res_x: int) -> np.ndarray:
    """Single-octave gradient noise, roughly in [-1, 1], with `res` lattice cells along each axis."""
    angles = rng.uniform(0, 2 * np.pi, (res_y + 1, res_x + 1))
    gx, gy = np.cos(angles), np.sin(angles)
    ys = (np.arange(height) + 0.5) / height * res_y
    xs = (np.arange(width) + 0.5) / width * res_x
    y0 = np.minimum(ys.astype(int), res_y - 1)
    x0 = np.minimum(xs.astype(int), res_x - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        iy, ix = (y0 + dy)[:, None], (x0 + dx)[None, :]
        return gx[iy, ix] * (fx - dx) + gy[iy, ix] * (fy - dy)

    def fade(t):
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = corner(0, 0) + u * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + u * (corner(1, 1) - corner(1, 0))
    return (top + v * (bottom - top)) * np.sqrt(2)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _augment(rng: np.random.Generator, image: np.ndarray, count: int = 3) -> np.ndarray:
    """Three of DRAEM's photometric changes, so the blended texture never looks like the normal image."""
    out = image.astype(np.float32) / 255.0
    ops = rng.choice(7, size=count, replace=False)
    for op in ops:
        if op == 0:  # gamma
            out = out ** rng.uniform(0.5, 2.0)
        elif op == 1:  # per-channel gain
            out = out * rng.uniform(0.8, 1.2, 3)
        elif op == 2:  # brightness shift
            out = out + rng.uniform(-0.3, 0.3)
        elif op == 3:  # solarise
            out = np.where(out > 0.5, 1 - out, out)
        elif op == 4:  # posterise
            levels = float(rng.integers(2, 8))
            out = np.floor(out * levels) / levels
        elif op == 5:  # invert
            out = 1 - out
        else:  # channel shuffle
            out = out[..., rng.permutation(3)]
        out = np.clip(out, 0, 1)
    return out


class TextureSource:
    """Where a Perlin blend takes its texture from.

    `self`: the normal image itself, flipped, rolled and recoloured (needs no extra data, the offline
    default); `noise`: coloured multi-octave Perlin noise; a directory: texture photos (e.g. DTD).
    """

    def __init__(self, source: str = "self"):
        self.source = source
        self.files: list[Path] = []
        if source not in ("self", "noise"):
            from anomalyfleet.data.readers import IMAGE_SUFFIXES

            root = Path(source).expanduser()
            if not root.is_dir():
                raise ConfigError(f"texture source must be self, noise or a directory of images, got {source!r}")
            self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise ConfigError(f"texture directory {source} holds no images")

    def draw(self, rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, dict]:
        h, w = image.shape[:2]
        if self.source == "self":
            tex = image[:: rng.choice([-1, 1]), :: rng.choice([-1, 1])]
            tex = np.roll(tex, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
            return tex, {"texture": "self"}
        if self.source == "noise":
            octaves = [perlin_noise(rng, h, w, 2**k, 2**k) / 2**(k - 1) for k in range(1, 6)]
            base = np.sum(octaves, axis=0)
            base = (base - base.min()) / max(np.ptp(base), 1e-6)
            colours = rng.uniform(0, 255, (2, 3))
            tex = colours[0] + base[..., None] * (colours[1] - colours[0])
            return tex.astype(np.uint8), {"texture": "noise"}
        from anomalyfleet.data.transforms import load_image

        pick = int(rng.integers(len(self.files)))
        return _resize(np.asarray(load_image(self.files[pick])), h, w), {"texture": self.files[pick].name}


class PerlinBlend:
    """DRAEM's anomaly: a thresholded Perlin-noise shape, filled with an augmented texture blended
    into the image with opacity 1 - beta, beta ~ U(beta range). The shape is cut to the sampled region
    so it obeys the same size/position controls as every other generator.

    `color`: the texture sources (and the augmentations) are colour; on a greyscale product that
    would be a tint no real defect has, so with "auto" (default) a greyscale image gets a grey
    defect, "grey" makes every defect grey and "rgb" keeps the colour."""

    name = "perlin"
    default_region = RegionSpec(shape="ellipse", size=(0.15, 0.4), aspect=(0.5, 2.0), rotation=(0, 180))

    def __init__(self, texture: str = "self", beta: tuple[float, float] = (0.0, 0.8),
                 scale: tuple[int, int] = (0, 6), coverage: tuple[float, float] = (0.3, 0.7),
                 color: Color = "auto"):
        self.texture = TextureSource(texture)
        self.color = check_color(color)
        self.beta = tuple(float(b) for b in beta)
        self.scale = tuple(int(s) for s in scale)
        self.coverage = tuple(float(c) for c in coverage)

    def settings(self) -> dict:
        return {"texture": self.texture.source, "beta": list(self.beta), "scale": list(self.scale),
                "coverage": list(self.coverage), "color": self.color}

    def generate(self, image: np.ndarray, seed: int, region: RegionSpec | None = None,
                 foreground: np.ndarray | None = None) -> Synthesis:
        rng = np.random.default_rng(seed)
        h, w = image.shape[:2]
        area = sample_region(rng, region or self.default_region, h, w, foreground)
        res_y, res_x = (2 ** rng.integers(self.scale[0], self.scale[1], 2)).tolist()
        noise = perlin_noise(rng, h, w, res_y, res_x)
        # DRAEM thresholds at a fixed level over the whole image; thresholding at a quantile inside the
        # region instead means the defect fills a controlled share of it and is never empty.
        coverage = rng.uniform(*self.coverage)
        inside = noise[area.mask]
        mask = area.mask & (noise >= np.quantile(inside, 1 - coverage))
        texture, info = self.texture.draw(rng, image)
        texture = _augment(rng, texture)
        beta = rng.uniform(*self.beta)
        base = image.astype(np.float32) / 255.0
        m = mask[..., None]
        blend = beta * base + (1 - beta) * texture
        grey = wants_grey(self.color, image)
        if grey:
            blend = to_grey(blend)
        out = np.where(m, blend, base)
        details = {"beta": round(float(beta), 4), "noise_res": [res_y, res_x], "coverage": round(float(coverage), 4),
                   "grey": grey, **info}
        return Synthesis((out * 255 + 0.5).clip(0, 255).astype(np.uint8), mask, area, details)


class CutPaste:
    """CutPaste (Li et al., 2021): a patch of the same image, colour-jittered, pasted elsewhere.
    `scar` draws long thin rotated regions (the paper's scar variant) unless the recipe sets them.
    `color` as for PerlinBlend: the per-channel gain would tint a greyscale image."""

    def __init__(self, scar: bool = False, jitter: float = 0.1, color: Color = "auto"):
        self.scar = bool(scar)
        self.jitter = float(jitter)
        self.color = check_color(color)
        self.name = "scar" if scar else "cutpaste"
        self.default_region = (RegionSpec(shape="box", size=(0.03, 0.08), aspect=(0.08, 0.4), rotation=(-45, 45))
                               if scar else RegionSpec(shape="box", size=(0.1, 0.3), aspect=(0.3, 3.3)))

    def settings(self) -> dict:
        return {"scar": self.scar, "jitter": self.jitter, "color": self.color}

    def generate(self, image: np.ndarray, seed: int, region: RegionSpec | None = None,
                 foreground: np.ndarray | None = None) -> Synthesis:
        rng = np.random.default_rng(seed)
        h, w = image.shape[:2]
        area = sample_region(rng, region or self.default_region, h, w, foreground)
        x0, y0, x1, y1 = area.bbox
        # The source patch is the region's footprint shifted by (dy, dx), kept inside the image and
        # away from the destination so the paste is never a copy of what was there.
        dx = int(rng.integers(-x0, w - x1 + 1))
        dy = int(rng.integers(-y0, h - y1 + 1))
        if abs(dx) < (x1 - x0) // 2 and abs(dy) < (y1 - y0) // 2:
            dx = -x0 if x0 > w - x1 else w - x1
        j = self.jitter
        gain = rng.uniform(1 - j, 1 + j, 3) * rng.uniform(1 - j, 1 + j)
        offset = rng.uniform(-j, j) * 255
        ys, xs = np.nonzero(area.mask)
        patch = image[ys + dy, xs + dx].astype(np.float32)
        mean = patch.mean(axis=0)
        contrast = rng.uniform(1 - j, 1 + j)
        patch = (patch - mean) * contrast + mean * gain + offset
        grey = wants_grey(self.color, image)
        if grey:
            patch = to_grey(patch)
        out = image.copy()
        out[ys, xs] = (patch + 0.5).clip(0, 255).astype(np.uint8)
        details = {"source_offset": [dy, dx], "gain": [round(float(g), 4) for g in gain],
                   "contrast": round(float(contrast), 4), "offset": round(float(offset), 3), "grey": grey}
        return Synthesis(out, area.mask.copy(), area, details)


PROCEDURAL = {"perlin": PerlinBlend, "cutpaste": CutPaste, "scar": lambda **kw: CutPaste(scar=True, **kw)}


def make_procedural(name: str, settings: dict | None = None):
    if name not in PROCEDURAL:
        raise ConfigError(f"unknown procedural generator {name!r} (known: {', '.join(PROCEDURAL)})")
    try:
        return PROCEDURAL[name](**(settings or {}))
    except TypeError as exc:
        raise ConfigError(f"bad settings for generator {name}: {exc}") from exc
