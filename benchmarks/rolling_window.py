"""The service's batch zero-shot mode on Magnetic Tile: no normal image, only a rolling window.

Run: .venv/bin/python benchmarks/rolling_window.py [--data-root ../shared/data/magnetic-tile]
     [--sizes 32,64] [--layer 8] [--fraction 0.3] [--orders 2] [--out FILE]

The held-out test set of the zero-shot protocol (Fray and Uneven defects with the test-half normal
tiles) arrives one image at a time in a shuffled order, as a camera stream would, and goes through
`RollingWindow.score_then_add` exactly as a Serve replica does it: scored against the images held
before it, then added. The first `min_images` images of a stream have no window score (the service
scores them with the bundle) and are left out of the metrics. Features come from the shipped
default detector's frozen backbone (the offline default), computed once and reused by every row.
Printed per window size and stream order: image and pixel AUROC, AUPRO, the share of normal images
and normal pixels over the service's default thresholds, and the window's cost per image.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalyfleet import metrics  # noqa: E402
from anomalyfleet.bundle import load_bundle  # noqa: E402
from anomalyfleet.cli import default_detector_path  # noqa: E402
from anomalyfleet.data import parse_data_spec  # noqa: E402
from anomalyfleet.data.dataset import AnomalyDataset  # noqa: E402
from anomalyfleet.default_detector import protocol_specs  # noqa: E402
from anomalyfleet.memory import default_memory_layers  # noqa: E402
from anomalyfleet.rolling_window import RollingWindow  # noqa: E402
from anomalyfleet.serving.config import WindowSettings  # noqa: E402

MAP_STRIDE = 4  # pixel metrics on every 4th row and column: 16x fewer pixels, same ranking


def stream_features(detector, samples, layer: int, batch_size: int = 8):
    """(N, P, D) patch features at `layer`, (N, S, S) masks and (N,) labels of the test images."""
    from torch.utils.data import DataLoader

    dataset = AnomalyDataset(samples, image_size=detector.image_size, mean=detector.mean, std=detector.std)
    feats, masks, labels = [], [], []
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            feats.append(detector.extract(batch["image"].to(detector.device), layers=(layer,)).patch_features[0].cpu())
            masks.append(batch["mask"].reshape(len(batch["label"]), *batch["mask"].shape[-2:]) > 0.5)
            labels.append(batch["label"])
    return torch.cat(feats), torch.cat(masks).numpy(), torch.cat(labels).numpy()


def run_stream(feats, masks, labels, order, size: int, detector, settings: WindowSettings) -> dict:
    window = RollingWindow(size, detector.backbone.grid, detector.image_size, min_images=settings.min_images,
                           fraction=settings.fraction, sigma=detector.settings.sigma,
                           top_fraction=settings.top_fraction)
    scores, maps, kept = [], [], []
    began = time.perf_counter()
    for i in order:
        result = window.score_then_add(feats[i : i + 1])
        if result is not None:
            scores.append(result.scores[0])
            maps.append(result.maps[0][::MAP_STRIDE, ::MAP_STRIDE])
            kept.append(i)
    per_image_ms = (time.perf_counter() - began) / len(order) * 1000
    kept = np.array(kept)
    scores, maps = np.array(scores), np.stack(maps)
    y, m = labels[kept], masks[kept][:, ::MAP_STRIDE, ::MAP_STRIDE]
    normal_pixels = maps[~m]
    return {
        "scored": len(kept), "image_auroc": metrics.image_auroc(y, scores), "pixel_auroc": metrics.pixel_auroc(m, maps),
        "aupro": metrics.aupro(m, maps), "normal_flagged": float(np.mean(scores[y == 0] >= settings.threshold)),
        "defect_flagged": float(np.mean(scores[y == 1] >= settings.threshold)),
        "normal_pixels_flagged": float(np.mean(normal_pixels >= settings.pixel_threshold)), "ms": per_image_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/magnetic-tile"))
    parser.add_argument("--sizes", default="32,64", help="window sizes, comma separated")
    parser.add_argument("--layer", type=int, default=None, help="feature block (default: a line memory's, as the service)")
    parser.add_argument("--fraction", type=float, default=WindowSettings().fraction)
    parser.add_argument("--orders", type=int, default=2, help="shuffled stream orders per size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (Path(args.data_root) / "MT_Free").is_dir():
        print(f"error: Magnetic Tile not found at {args.data_root}", file=sys.stderr)
        return 2

    detector = load_bundle(default_detector_path()).eval()
    layer = args.layer or default_memory_layers(detector.backbone.num_layers)[0]
    settings = WindowSettings(fraction=args.fraction)
    samples = parse_data_spec(protocol_specs(args.data_root)[1])
    began = time.perf_counter()
    feats, masks, labels = stream_features(detector, samples, layer)
    feature_seconds = time.perf_counter() - began
    feats = F.normalize(feats.float(), dim=-1)  # the window normalises too; done once here

    # One short throw-away stream: the first large products pay one-time allocation costs.
    run_stream(feats, masks, labels, np.arange(min(len(labels), 24)), 16, detector, settings)
    lines = [
        "## Batch zero-shot mode (rolling window) on the Magnetic Tile held-out stream",
        f"# date: {time.strftime('%Y-%m-%d %H:%M')} | machine: {platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, Python {platform.python_version()}, torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start",
        f"# command: python benchmarks/rolling_window.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"# detector: shipped default ({detector.backbone.spec().get('kind')}, {detector.image_size} px), block {layer}; "
        f"no normal image and no label used; {len(labels)} test images ({int(labels.sum())} defective), "
        f"features in {feature_seconds:.0f} s",
        f"# window: min_images {settings.min_images}, fraction {settings.fraction}, top fraction "
        f"{settings.top_fraction}; flagged = z >= {settings.threshold} (images), map >= {settings.pixel_threshold} "
        f"(pixels); pixel metrics on every {MAP_STRIDE}th row and column",
        "",
        "| window | order | scored | image AUROC | pixel AUROC | AUPRO | normals flagged | defects flagged "
        "| normal pixels flagged | window ms/img |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in (int(s) for s in args.sizes.split(",")):
        for seed in range(args.orders):
            order = np.random.default_rng(seed).permutation(len(labels))
            r = run_stream(feats, masks, labels, order, size, detector, settings)
            lines.append(
                f"| {size} | {seed} | {r['scored']} | {100 * r['image_auroc']:.1f} | {100 * r['pixel_auroc']:.1f} | "
                f"{100 * r['aupro']:.1f} | {100 * r['normal_flagged']:.1f}% | {100 * r['defect_flagged']:.1f}% | "
                f"{100 * r['normal_pixels_flagged']:.2f}% | {r['ms']:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
