"""Batched scoring of image files: scores, maps, overlays, and an atomic JSONL of results."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalyfleet import storage
from anomalyfleet.data import AnomalyDataset, Sample
from anomalyfleet.data.transforms import load_image
from anomalyfleet.detector import Detector, Prediction
from anomalyfleet.errors import ConfigError, DataError
from anomalyfleet.manifest import atomic_write_bytes, default_mode, write_manifest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def list_images(path: str | Path, allow_empty: bool = False) -> list[Path]:
    """One image file, or every image below a directory (sorted, recursive); a directory without one
    is an error unless `allow_empty`.

    An s3:// object or prefix is fetched into the node's read-through cache first.
    """
    if storage.is_remote(path):
        path = storage.local_path_for(str(path)) if storage.exists(str(path)) else storage.cached_prefix(str(path))
    path = storage.parse(path).path
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"no such image file or directory: {path}")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images and not allow_empty:
        raise DataError(f"no images (png, jpg, bmp, tif) found under {path}")
    return images


@dataclass
class ScoredBatch:
    samples: list[Sample]
    prediction: Prediction
    masks: np.ndarray | None  # (B, S, S) bool, when the samples carry masks


def predict_samples(
    detector: Detector,
    samples: Sequence[Sample],
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "scoring",
) -> Iterator[ScoredBatch]:
    """Score samples in batches; text features are computed once."""
    dataset = AnomalyDataset(list(samples), image_size=detector.image_size, mean=detector.mean, std=detector.std)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress)
    with torch.inference_mode():
        text = detector.text_features()
        for batch in loader:
            features = detector.extract(batch["image"].to(detector.device))
            prediction = detector.predict_features(features, text)
            indices = batch["index"].tolist()
            masks = (batch["mask"][:, 0] > 0.5).numpy()
            bar.update(len(indices))
            yield ScoredBatch(samples=[samples[i] for i in indices], prediction=prediction, masks=masks)
    bar.close()


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] values to RGB (blue -> cyan -> yellow -> red), vectorised."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    low = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    frac = pos - low
    rgb = stops[low[..., 0]] * (1 - frac) + stops[low[..., 0] + 1] * frac
    return rgb.astype(np.uint8)


def overlay_png(image_path: str | Path, anomaly_map: np.ndarray, alpha: float = 0.45) -> bytes:
    """The image (at map size) with the anomaly map blended over it, as PNG bytes.

    Colours span each map's own range, so the most anomalous region of every image stands out;
    the absolute level is the score in the JSONL.
    """
    size = anomaly_map.shape[::-1]
    base = np.asarray(load_image(image_path).resize(size, Image.BICUBIC), dtype=np.float32)
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    heat = heat_colors((anomaly_map - low) / max(high - low, 1e-8)).astype(np.float32)
    blended = (base * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="PNG")
    return buffer.getvalue()


def score_images(
    detector: Detector,
    images: Sequence[Path],
    out_dir: str | Path,
    batch_size: int = 8,
    write_maps: bool = True,
    write_overlays: bool = True,
    progress: bool = True,
    batch_zero_shot: int | None = None,
    peers: int | None = None,
) -> Path:
    """Score files and write `scores.jsonl`, `maps/<name>.npy`, `overlays/<name>.png` under out_dir.

    With `batch_zero_shot` = G, the files are scored against each other in groups of about G
    (`anomalyfleet.batch_zero_shot`), not by the bundle's prompts or memory: scores are robust
    z-scores within each group, flagged from z = 3 (the bundle's thresholds are on another scale).
    With `peers` = G (a bundle with a line memory), the bundle scores every file on its own scale,
    each image's memory distances completed with its peers' in groups of about G
    (`anomalyfleet.batch_zero_shot.predict_samples_with_peers`).

    Everything is written to a staging directory beside `out_dir` and moved in only once every
    image has been scored, the JSONL last: a failure (a corrupt image, a full disk) leaves `out_dir`
    as it was, with no half set of maps and no results file that points to maps that are not there.
    An s3:// `out_dir` gets the same files, uploaded with a manifest last once all are written.
    """
    if storage.is_remote(out_dir):
        with tempfile.TemporaryDirectory(prefix="anomalyfleet-scores-") as tmp:
            local = score_images(detector, images, tmp, batch_size, write_maps, write_overlays, progress,
                                 batch_zero_shot, peers)
            write_manifest(local.parent)
            storage.put_tree(local.parent, str(out_dir))
        return storage.join(str(out_dir), "scores.jsonl")
    out_dir = storage.parse(out_dir).path
    if batch_zero_shot and peers:
        raise ConfigError("batch zero-shot scoring uses no line memory and peers complete one: choose one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {out_dir} exists and is not a directory")
    # Staged inside an existing output directory (the one place we know is writable), else beside it.
    home = out_dir if out_dir.is_dir() else out_dir.parent
    created = home if not home.exists() else None  # the top directory this run makes, if any
    while created is not None and not created.parent.exists():
        created = created.parent
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=home))
    os.chmod(staging, default_mode(directory=True))
    try:
        _score_into(detector, images, staging, batch_size, write_maps, write_overlays, progress, batch_zero_shot,
                    peers)
        _move_results(staging, out_dir)
    except BaseException:
        if created is not None:  # only our staging directory is in there
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "scores.jsonl"


def _move_results(staging: Path, out_dir: Path) -> None:
    """Into a new `out_dir` by one rename; into an existing one file by file, the JSONL last."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    for sub in ("maps", "overlays"):
        if (staging / sub).is_dir():
            (out_dir / sub).mkdir(exist_ok=True)
            for item in (staging / sub).iterdir():
                os.replace(item, out_dir / sub / item.name)
    os.replace(staging / "scores.jsonl", out_dir / "scores.jsonl")


def _score_into(detector: Detector, images: Sequence[Path], out_dir: Path, batch_size: int, write_maps: bool,
                write_overlays: bool, progress: bool, batch_zero_shot: int | None, peers: int | None = None) -> None:
    samples = [Sample(image=str(p), label=0, mask=None, category="input") for p in images]
    names = _unique_names(images)
    if batch_zero_shot:
        from anomalyfleet.batch_zero_shot import predict_samples_batch_zero_shot
        from anomalyfleet.rolling_window import Z_THRESHOLD

        threshold = Z_THRESHOLD  # the bundle's thresholds are on its own scale, not on z
        batches = predict_samples_batch_zero_shot(detector, samples, group_size=batch_zero_shot,
                                                  batch_size=batch_size, progress=progress)
    elif peers:
        from anomalyfleet.batch_zero_shot import predict_samples_with_peers

        threshold = detector.thresholds.get("image")
        batches = predict_samples_with_peers(detector, samples, group_size=peers, batch_size=batch_size,
                                             progress=progress)
    else:
        threshold = detector.thresholds.get("image")
        batches = predict_samples(detector, samples, batch_size=batch_size, progress=progress)
    records = []
    position = 0
    for group, scored in enumerate(batches):
        for row, sample in enumerate(scored.samples):
            name = names[position]
            position += 1
            score = float(scored.prediction.scores[row])
            record = {"image": sample.image, "score": score}
            if batch_zero_shot:
                record.update(source="batch", group=group, group_size=len(scored.samples))
            elif peers:
                record.update(group=group, group_size=len(scored.samples))
            if threshold is not None:
                record.update(threshold=float(threshold), anomalous=bool(score >= threshold))
            amap = scored.prediction.maps[row].astype(np.float32)
            record["map_max"] = float(amap.max())
            if write_maps:
                buffer = io.BytesIO()
                np.save(buffer, amap)
                atomic_write_bytes(out_dir / "maps" / f"{name}.npy", buffer.getvalue())
                record["map"] = f"maps/{name}.npy"
            if write_overlays:
                atomic_write_bytes(out_dir / "overlays" / f"{name}.png", overlay_png(sample.image, amap))
                record["overlay"] = f"overlays/{name}.png"
            records.append(record)
    payload = "".join(json.dumps(r) + "\n" for r in records).encode()
    atomic_write_bytes(out_dir / "scores.jsonl", payload)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, disambiguated when two images share a stem."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = path.stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}-{count}")
    return names
