"""Image and mask loading and preprocessing, exactly as the AnomalyCLIP reference does it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from anomalyfleet.errors import DECODE_ERRORS, DataError, unreadable_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _open(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and names its path
            return image.copy()
    except FileNotFoundError as exc:
        raise DataError(f"image not found: {path}") from exc
    except DECODE_ERRORS as exc:
        raise unreadable_image(path) from exc


# Sensor depths written in 16-bit containers: an image is read at the smallest that holds its values.
SENSOR_BITS = (8, 10, 12, 14, 16)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale (industrial cameras write them) rescaled to 8 bits; PIL's own
    convert("RGB") clips them to 255, turning most pixels white. The files do not say the sensor's
    depth (a 12-bit camera writes 0..4095 in 16 bits), so each image is scaled by the smallest of
    SENSOR_BITS that holds its brightest pixel: a line's images share it unless one is too dark to
    reach the top quarter of its sensor's range."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    brightest = values.max(initial=0.0)
    if image.mode == "F":
        top = 1.0 if brightest <= 1.0 else brightest
    else:
        top = next((2.0 ** bits - 1 for bits in SENSOR_BITS if brightest <= 2 ** bits - 1), brightest)
    scaled = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image every path scores (files, uploads, synthesis inputs), deep images rescaled."""
    return _eight_bit(image).convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    return to_rgb(_open(path))


def load_mask(path: str | Path, threshold: int = 1) -> np.ndarray:
    """Boolean (H, W) defect mask: pixels >= threshold (on the greyscale image) are defect."""
    return np.asarray(_open(path).convert("L")) >= threshold


def preprocess_image(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Bicubic resize of both sides to (size, size) (aspect not kept), to [0, 1], normalise.

    The reference's centre crop after that resize is the identity, so it is not repeated here.
    """
    resized = image.resize((size, size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (array - mean_t) / std_t


def preprocess_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """(1, size, size) in {0, 1}: bilinear resize of the 0/255 mask, then threshold at 0.5."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((size, size), Image.BILINEAR)
    return torch.from_numpy((np.asarray(image, dtype=np.float32) / 255.0 > 0.5).astype(np.float32))[None]
