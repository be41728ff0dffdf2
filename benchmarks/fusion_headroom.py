"""How much image-level information do the prompts add to a line memory, at best?

Run: .venv/bin/python benchmarks/fusion_headroom.py [--cache-dir DIR] [--products mt,elpv-mono,elpv-poly]
     [--ks 1,4,16]

Issue 9 asks the fused detector to beat each source alone. On ELPV cells with 16 memory images it
ties the memory (results-line-memory-products.txt) whatever fixed weights it uses. This benchmark
asks whether any rule could do better: per image it takes the memory's evidence (its calibrated
map's top 1 % and 10 %, maximum and mean, and its position-normalised image score) and the
prompts' (the global score, the calibrated prompt map's top 1 % and 10 % and mean, and its
position-normalised image score), and fits classifiers on the test labels themselves, scored by 5-fold stratified
cross-validation: logistic regression (a weighted sum, as the fusion is) and gradient-boosted trees
(any monotone or non-monotone rule). Fitted on the labels, they are an upper bound that no
label-free rule reaches. "prompts add" is (memory + prompt features) minus (memory features) with
the same classifier: the information the prompts carry that the memory does not. "memory alone" is
the memory mode with the default settings (its position share on). Memories are drawn
as `memory build` draws them (benchmarks/zero_shot.py `draw_memory`, 3 draws per k).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from line_memory_products import add_product_arguments, chosen_products, detector_and_base, load_product  # noqa: E402
from zero_shot import DRAWS, draw_memory, fuse_timed, memory_raw_maps, print_table  # noqa: E402

from anomalyfleet.maps import smooth_maps  # noqa: E402
from anomalyfleet.memory import FusionSettings, top_fraction_mean  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FOLDS = 5


def map_features(maps: np.ndarray) -> list[np.ndarray]:
    """Top 1 %, top 10 %, maximum and mean of each (B, S, S) map."""
    tensor = torch.from_numpy(maps)
    flat = maps.reshape(len(maps), -1)
    return [top_fraction_mean(tensor, 0.01).numpy(), top_fraction_mean(tensor, 0.1).numpy(), flat.max(1), flat.mean(1)]


def cross_validated_auroc(features: np.ndarray, labels: np.ndarray, model: str, seed: int) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    estimator = (make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)) if model == "linear"
                 else HistGradientBoostingClassifier(max_iter=100, random_state=seed))
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    predicted = cross_val_predict(estimator, features, labels, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, predicted))


def product_rows(detector, base, product: str, data_root: str, cache_dir: str | None, ks: list[int],
                 layer: int, views: str) -> tuple[str, list[list]]:
    from sklearn.metrics import roc_auc_score

    data = load_product(detector, base, product, data_root, cache_dir, layer, views)
    test, labels, li, normals = data.test, data.labels, data.layer_index, data.normals
    pool_table, pool_prompts, test_prompts = data.pool_table, data.pool_prompts, data.test_prompts
    sigma = detector.settings.sigma
    test_patches = data.test_patches
    rows = []
    for k in ks:
        results: dict[str, list[float]] = {}
        for draw in range(DRAWS):
            memory, _ = draw_memory(detector, pool_table, pool_prompts, normals, li, layer, k, draw, views=data.views)
            raw, _ = memory_raw_maps(memory, test_patches, detector.image_size)
            memory.configure(FusionSettings(), sigma)
            fused, _, _ = fuse_timed(memory, raw, test_prompts, sigma)
            memory_maps = smooth_maps(memory.memory_calibration.apply(raw), sigma)
            prompt_maps = smooth_maps(memory.prompt_calibration.apply(test_prompts.raw), sigma)
            global_score = memory.score_calibration.apply(test_prompts.scores).numpy()
            memory_position = memory.memory_position_scores(raw, sigma).numpy()
            prompt_position = memory.position_scores(test_prompts.raw, sigma).numpy()
            own = np.stack([*map_features(memory_maps), memory_position], 1)
            top1, top10, _, mean = map_features(prompt_maps)
            both = np.concatenate([own, np.stack([global_score, top1, top10, mean, prompt_position], 1)], 1)
            memory.configure(FusionSettings(mode="memory"), sigma)
            alone, _, _ = fuse_timed(memory, raw, test_prompts, sigma)
            found = {"memory alone (the memory mode)": roc_auc_score(labels, alone),
                     "fused, the shipped default": roc_auc_score(labels, fused)}
            for model in ("linear", "trees"):
                mem_only = cross_validated_auroc(own, labels, model, draw)
                with_prompts = cross_validated_auroc(both, labels, model, draw)
                found[f"{model}: memory features"] = mem_only
                found[f"{model}: memory + prompt features"] = with_prompts
                found[f"{model}: prompts add"] = with_prompts - mem_only
            for name, value in found.items():
                results.setdefault(name, []).append(value)
        for name, values in results.items():
            sign = "+" if name.endswith("add") else ""
            rows.append([product, str(k), name, f"{100 * np.mean(values):{sign}.1f}",
                         f"{100 * np.min(values):{sign}.1f} .. {100 * np.max(values):{sign}.1f}"])
    return f"{product}: test {len(test)} ({int(labels.sum())} defective)", rows


def main() -> int:
    from anomalyfleet.cli import default_detector_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_product_arguments(parser, ks="1,4,16")
    args = parser.parse_args()
    products = chosen_products(args.products, args.data_root)
    if products is None:
        return 2
    started = time.perf_counter()
    detector, base, layer = detector_and_base(str(default_detector_path()), args.memory_layer)
    ks = [int(x) for x in args.ks.split(",") if x]
    print(f"# {time.strftime('%Y-%m-%d')} | {platform.machine()}, {torch.get_num_threads()} torch threads | bundled "
          f"default detector | memory block {layer}, views {args.views} | {DRAWS} draws per k | {FOLDS}-fold CV on "
          f"the test labels")
    rows = []
    for product in products:
        describe, product_table = product_rows(detector, base, product, args.data_root, args.cache_dir, ks,
                                               layer, args.views)
        print(f"# {describe}")
        rows.extend(product_table)
    print_table(["product", "k", "image AUROC of", "mean", "min .. max over draws"], rows)
    print(f"\n# total {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
