"""Dataset readers behind one spec syntax: `KIND:PATH[?key=value&key=value]`.

Kinds: `mvtec` (MVTec AD), `visa` (VisA with split_csv/1cls.csv), `magnetic-tile` (Magnetic Tile
defects), `folder` (normal/, anomaly/, optional masks/<stem>.png), `library` (a synthetic defect
library's manifest.jsonl). Every reader returns a list of `Sample`s in a deterministic order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

import numpy as np

from anomalyfleet import storage
from anomalyfleet.data.samples import Sample
from anomalyfleet.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MT_DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _existing_dir(path: str) -> Path:
    if storage.is_remote(path):
        # A dataset in object storage is mirrored once per node into the read-through cache.
        return storage.cached_prefix(path)
    root = storage.parse(path).path
    if not root.exists():
        raise DataError(f"data path not found: {path}")
    if not root.is_dir():
        raise DataError(f"data path is not a directory: {path}")
    return root


def _split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


class _Options:
    """Spec options, checked against what the reader knows so typos are errors, not silence."""

    def __init__(self, kind: str, raw: dict[str, str], known: set[str], name: str | None = None):
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"unknown option(s) {', '.join(unknown)} for {kind}: (known: {', '.join(sorted(known)) or 'none'})")
        self.kind = kind
        self.raw = raw
        self.name = name  # the dataset's own name when its local root does not carry it (a cache mirror)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.raw.get(key, default)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw.get(key, default)
        if value not in choices:
            raise DataError(f"{self.kind}: {key} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, key: str, default: int | None) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError as exc:
            raise DataError(f"{self.kind}: {key} must be an integer, got {value!r}") from exc

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError as exc:
            raise DataError(f"{self.kind}: {key} must be a number, got {value!r}") from exc


def _filter_categories(found: list[str], wanted: list[str] | None, kind: str) -> list[str]:
    if not wanted:
        return found
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"{kind}: unknown categories {', '.join(missing)} (found: {', '.join(found)})")
    return [c for c in found if c in wanted]


def read_mvtec(root: Path, options: _Options) -> list[Sample]:
    split = options.choice("split", "test", ("train", "test"))
    categories = sorted(p.name for p in root.iterdir() if (p / split).is_dir())
    if not categories:
        raise DataError(f"{root}: no MVTec AD categories (expected <category>/{split}/good/*.png)")
    samples = []
    for category in _filter_categories(categories, _split_list(options.get("categories")), "mvtec"):
        for defect_dir in sorted(p for p in (root / category / split).iterdir() if p.is_dir()):
            normal = defect_dir.name == "good"
            for image in _images_in(defect_dir):
                mask = None
                if not normal:
                    candidate = root / category / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
                    mask = str(candidate) if candidate.is_file() else None
                samples.append(Sample(str(image), 0 if normal else 1, mask, category))
    return samples


def read_visa(root: Path, options: _Options) -> list[Sample]:
    split = options.choice("split", "test", ("train", "test"))
    table = root / "split_csv" / "1cls.csv"
    if not table.is_file():
        raise DataError(f"{root}: no split_csv/1cls.csv (expected the VisA layout)")
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("object", "split", "label", "image", "mask") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{table}: no {', '.join(missing)} column (expected VisA's split_csv/1cls.csv)")
        rows = [r for r in reader if r.get("split") == split]
    if not rows:
        raise DataError(f"{table}: no rows for split {split!r}")
    categories = sorted({r["object"] for r in rows})
    keep = set(_filter_categories(categories, _split_list(options.get("categories")), "visa"))
    samples = []
    for row in rows:
        if row["object"] not in keep:
            continue
        anomalous = row["label"].strip().lower() == "anomaly"
        mask = str(root / row["mask"]) if anomalous and row.get("mask") else None
        samples.append(Sample(str(root / row["image"]), int(anomalous), mask, row["object"]))
    return samples


def _seeded_order(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(count)


def read_magnetic_tile(root: Path, options: _Options) -> list[Sample]:
    seed = options.integer("seed", 0)
    limit = options.integer("limit", None)
    fraction = options.number("normal_fraction", 0.5)
    normals_mode = options.choice("normals", "all", ("train", "test", "all", "none"))
    names = _split_list(options.get("defects")) or list(MT_DEFECTS)
    defects = []
    for name in names:
        short = name.removeprefix("MT_")
        if short not in MT_DEFECTS:
            raise DataError(f"magnetic-tile: unknown defect {name!r} (known: {', '.join(MT_DEFECTS)})")
        defects.append(short)
    if not (root / "MT_Free" / "Imgs").is_dir():
        raise DataError(f"{root}: not a Magnetic Tile root (expected MT_Free/Imgs and MT_<Defect>/Imgs)")

    def pairs(folder: str) -> list[tuple[Path, Path | None]]:
        directory = root / folder / "Imgs"
        if not directory.is_dir():
            raise DataError(f"{root}: missing {folder}/Imgs")
        images = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".jpg")
        return [(p, p.with_suffix(".png") if p.with_suffix(".png").is_file() else None) for p in images]

    samples = []
    for defect in defects:
        items = pairs(f"MT_{defect}")
        order = _seeded_order(len(items), seed)
        if limit is not None:
            order = order[:limit]
        for i in sorted(order):
            image, mask = items[i]
            samples.append(Sample(str(image), 1, str(mask) if mask else None, "magnetic_tile", mask_threshold=128))
    if normals_mode != "none":
        items = pairs("MT_Free")
        order = _seeded_order(len(items), seed)
        cut = int(round(len(items) * fraction))
        chosen = {"train": order[:cut], "test": order[cut:], "all": order}[normals_mode]
        if limit is not None:
            chosen = chosen[:limit]
        for i in sorted(chosen):
            samples.append(Sample(str(items[i][0]), 0, None, "magnetic_tile", mask_threshold=128))
    return samples


def read_folder(root: Path, options: _Options) -> list[Sample]:
    category = options.get("category") or options.name or root.name
    normal_dir, anomaly_dir, mask_dir = root / "normal", root / "anomaly", root / "masks"
    if not normal_dir.is_dir() and not anomaly_dir.is_dir():
        raise DataError(f"{root}: expected normal/ and/or anomaly/ image folders (optional masks/<stem>.png)")
    samples = []
    if normal_dir.is_dir():
        samples += [Sample(str(p), 0, None, category) for p in _images_in(normal_dir)]
    if anomaly_dir.is_dir():
        for image in _images_in(anomaly_dir):
            mask = mask_dir / f"{image.stem}.png"
            samples.append(Sample(str(image), 1, str(mask) if mask.is_file() else None, category))
    if not samples:
        raise DataError(f"{root}: normal/ and anomaly/ hold no images (png, jpg, bmp, tif)")
    return samples


def _library_row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    if not isinstance(row.get("image"), str) or not row["image"]:
        return "'image' must be a relative path"
    if row.get("mask") is not None and not isinstance(row["mask"], str):
        return "'mask' must be a relative path or null"
    if row.get("label", 1) not in (0, 1) or isinstance(row.get("label"), bool):
        return f"'label' must be 0 or 1, got {row.get('label')!r}"
    return None


def read_library(root: Path, options: _Options) -> list[Sample]:
    """A synthetic defect library: manifest.jsonl rows with image, mask, defect type."""
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise DataError(f"{root}: not a defect library (no manifest.jsonl)")
    category = options.get("category") or options.name or root.name
    wanted = _split_list(options.get("defects"))
    samples = []
    with open(manifest) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{manifest}:{line_number}: not a JSON row ({exc.msg})") from None
            problem = _library_row_problem(row)
            if problem:
                raise DataError(f"{manifest}:{line_number}: malformed library row: {problem}")
            if wanted and row.get("defect_type") not in wanted:
                continue
            mask = root / row["mask"] if row.get("mask") else None
            samples.append(Sample(str(root / row["image"]), int(row.get("label", 1)), str(mask) if mask else None,
                                  category))
    return samples


READERS: dict[str, tuple[Callable[[Path, _Options], list[Sample]], set[str]]] = {
    "mvtec": (read_mvtec, {"split", "categories"}),
    "visa": (read_visa, {"split", "categories"}),
    "magnetic-tile": (read_magnetic_tile, {"defects", "normals", "seed", "normal_fraction", "limit"}),
    "folder": (read_folder, {"category"}),
    "library": (read_library, {"category", "defects"}),
}
KNOWN_KINDS = tuple(READERS)


def parse_data_spec(spec: str) -> list[Sample]:
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise DataError(f"data spec {spec!r} needs KIND:PATH (kinds: {', '.join(KNOWN_KINDS)})")
    if kind not in READERS:
        raise DataError(f"unknown data kind {kind!r} in {spec!r} (kinds: {', '.join(KNOWN_KINDS)})")
    path, _, query = rest.partition("?")
    reader, known = READERS[kind]
    options = _Options(kind, dict(parse_qsl(query, keep_blank_values=True)), known,
                       name=storage.basename(path) if storage.is_remote(path) else None)
    samples = reader(_existing_dir(path), options)
    if not samples:
        raise DataError(f"{spec}: no images selected")
    return samples


def parse_data_specs(specs: list[str]) -> list[Sample]:
    samples: list[Sample] = []
    for spec in specs:
        samples.extend(parse_data_spec(spec))
    return samples
