"""Small generated image sets with defects and masks, written by tests into tmp dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_folder_dataset(root: Path, normals: int = 6, anomalies: int = 6, size: int = 64, seed: int = 0,
                         label_only: int = 0) -> Path:
    """`folder:` layout: textured normals; anomalies carry a bright blob with a mask.

    The last `label_only` anomalies get no mask (image-level labels only).
    """
    rng = np.random.default_rng(seed)
    for sub in ("normal", "anomaly", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(normals + anomalies):
        base = 100 + 30 * np.sin(xx / 5.0 + i) + rng.normal(0, 8, (size, size))
        image = np.repeat(base[..., None], 3, axis=2)
        if i < normals:
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "normal" / f"n{i:03d}.png")
            continue
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 10, size // 5)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image[blob] = [250, 40, 40]
        name = f"a{i:03d}"
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "anomaly" / f"{name}.png")
        if i < normals + anomalies - label_only:
            Image.fromarray((blob * 255).astype(np.uint8)).save(root / "masks" / f"{name}.png")
    return root


def write_line_images(root: Path, normals: int, anomalies: int, size: int = 64, seed: int = 0) -> Path:
    """One flat folder of unlabelled images of a line, as a camera writes them (no masks beside
    them), normals first; names say which are defective (`normal-...`, `anomaly-...`). The labelled
    `folder:` set they come from is kept at `root / "parts"`."""
    parts = write_folder_dataset(root / "parts", normals=normals, anomalies=anomalies, size=size, seed=seed)
    images = root / "images"
    images.mkdir(parents=True)
    for kind in ("normal", "anomaly"):
        for path in sorted((parts / kind).iterdir()):
            (images / f"{kind}-{path.name}").write_bytes(path.read_bytes())
    return images
