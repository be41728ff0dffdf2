"""Peers: does completing a line memory with the line's other images beat each source alone?

Run: .venv/bin/python benchmarks/peers.py [--cache-dir DIR] [--ks 1,4,16] [--group 32]
     [--products mt,elpv-mono,elpv-poly]

A line memory of k normal images misses normal variation that its few images do not show. Peers
(`score/eval --peers G`, `anomalyfleet.memory.peer_patch_scores`) complete every patch's memory
distance with its mutual score among the other images of its group: each patch keeps the smaller
of the two. The test images are put in a seeded order (a stream) and split into near-equal groups
of at most `--group` (`batch_zero_shot.group_bounds`); memories are drawn as `memory build` draws
them (benchmarks/zero_shot.py `draw_memory`, 3 draws per k, the next 32 normals calibrating).
Products and detector as in benchmarks/line_memory_products.py.

Rows per product and k: the single sources (the prompts; batch zero-shot mode, no normal image, in
the same groups; the memory alone, a = 0.5, its image score without and with its position share s), the
shipped fused detector, and the memory and fused rows with peers. "+ window peers" rows take their
peers as the service does (`window: {peers: true}`): the same seeded stream passes one image at a
time through a rolling window of `--group` images (`RollingWindow.peers_then_add`, the service's
default window settings), each image compared with the images before it only; the first
`min_images` of a stream have no peers and are scored by the memory alone. Then
the fused detector with peers minus the best single source, per metric. Last, the known weakness:
defects shared by many images of a group find close patches among their peers; the same rows at
several shares of defective test images (normals or defects subsampled, seeded), where groups are
formed again from the subset.
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

from line_memory_products import (METRICS, PREVALENCES, _fmt, _mean, add_product_arguments,  # noqa: E402
                                  chosen_products, detector_and_base, load_product, prevalence_subset,
                                  report)
from zero_shot import DRAWS, draw_memory, print_table  # noqa: E402

from anomalyfleet.maps import smooth_maps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SINGLES = ("prompts", "batch zero-shot", "memory (a=0.5, s=0)", "memory (a=0.5)")


def stream_groups(count: int, group: int, seed: int) -> list[torch.Tensor]:
    """Indices of each group of a seeded stream order (what `score --peers` does with files in that order)."""
    from anomalyfleet.batch_zero_shot import group_bounds

    order = torch.from_numpy(np.random.default_rng(seed).permutation(count))
    return [order[a:b] for a, b in group_bounds(count, group)]


def peer_scores(patches: torch.Tensor, groups: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(N, P) peer scores of every image within its group, and the seconds per image."""
    from anomalyfleet.memory import peer_patch_scores

    out = torch.empty(patches.shape[0], patches.shape[1])
    start = time.perf_counter()
    for index in groups:
        out[index] = peer_patch_scores([patches[index]])
    return out, (time.perf_counter() - start) / patches.shape[0]


def batch_zero_shot(detector, patches: torch.Tensor, groups: list[torch.Tensor], size: int):
    """Batch zero-shot mode's scores and maps (`score --batch-zero-shot`'s code) in the same groups."""
    from anomalyfleet.batch_zero_shot import group_window

    scores = np.zeros(patches.shape[0], np.float32)
    maps = np.zeros((patches.shape[0], size, size), np.float32)
    for index in groups:
        window = group_window(detector, len(index))
        window.add(patches[index])
        held = window.score_held()
        scores[index.numpy()], maps[index.numpy()] = held.scores, held.maps
    return scores, maps


def window_peer_scores(detector, patches: torch.Tensor, order: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """(N, P) peer scores as a line's rolling window hands them to its memory in the service: the
    images arrive in `order`, each compared with the window as it was, then added; +inf (the memory
    alone) while the window holds fewer than `min_images`. And the seconds per image."""
    from anomalyfleet.serving.config import WindowSettings
    from anomalyfleet.serving.window_keeper import WindowSpec

    # Built as the service builds a line's window (no features key: nothing here carries over).
    spec = WindowSpec((), WindowSettings(size=size, peers=True), detector.backbone.grid, detector.image_size,
                      detector.settings.sigma)
    window = spec.build(detector.device)
    out = torch.full(patches.shape[:2], float("inf"))
    start = time.perf_counter()
    for i in order.tolist():
        peers = window.peers_then_add(patches[i : i + 1])
        if peers is not None:
            out[i] = peers[0]
    return out, (time.perf_counter() - start) / len(order)


def detectors_with_and_without_peers(memory, patches: torch.Tensor, prompts, index: torch.Tensor,
                                     groups: list[torch.Tensor], size: int, sigma: float,
                                     window_peers: torch.Tensor | None = None) -> tuple[dict, float]:
    """{name: (scores, maps)} of the memory alone and the fused detector, each with and without peers,
    on the test rows `index` split into `groups` (positions within `index`); with `window_peers`
    ((len(index), P) scores from `window_peer_scores`), also with those as peers."""
    from anomalyfleet.memory import FusionSettings

    alone = memory.patch_scores([patches[index]])
    peers, seconds = peer_scores(patches[index], groups)
    out = {}
    variants = [("", alone), (" + peers", torch.minimum(alone, peers))]
    if window_peers is not None:
        variants.append((" + window peers", torch.minimum(alone, window_peers)))
    for suffix, patch in variants:
        raw = _maps(memory, patch, size)
        for name, fusion in (("memory (a=0.5, s=0)", FusionSettings(mode="memory", memory_position=0.0)),
                             ("memory (a=0.5)", FusionSettings(mode="memory")), ("fused (default)", FusionSettings())):
            memory.configure(fusion, sigma)
            out[name + suffix] = memory.fuse(raw, prompts.scores[index], prompts.raw[index], sigma)
    return out, seconds


def _maps(memory, patch: torch.Tensor, size: int) -> torch.Tensor:
    from anomalyfleet.memory import upsample_patch_scores

    return upsample_patch_scores(patch, memory.grid, size)


def product_rows(detector, base, product: str, data_root: str, cache_dir: str | None, ks: list[int], group: int,
                 layer: int, views: str) -> tuple[str, list[list], list[list], list[list]]:
    data = load_product(detector, base, product, data_root, cache_dir, layer, views)
    test, labels, masks, li, normals = data.test, data.labels, data.masks, data.layer_index, data.normals
    pool_table, pool_prompts, prompts = data.pool_table, data.pool_prompts, data.test_prompts
    sigma, size = detector.settings.sigma, detector.image_size
    patches = data.test_patches
    everything = torch.arange(len(test))
    prompt_report = report(labels, masks, prompts.scores.numpy(), smooth_maps(prompts.raw, sigma))
    draw_groups = [stream_groups(len(test), group, 3000 + d) for d in range(DRAWS)]
    batch_reports = [report(labels, masks, *batch_zero_shot(detector, patches, groups, size)) for groups in draw_groups]
    # The service's window sees the stream in the order the groups cut it into.
    streams = [window_peer_scores(detector, patches, torch.cat(groups), group) for groups in draw_groups]
    rows, summary, shares = [], [], []
    for k in ks:
        results: dict[str, list[dict]] = {"prompts": [prompt_report], "batch zero-shot": batch_reports}
        seconds = []
        by_share: dict[tuple, list[float]] = {}
        for draw in range(DRAWS):
            memory, _ = draw_memory(detector, pool_table, pool_prompts, normals, li, layer, k, draw, views=data.views)
            outputs, spent = detectors_with_and_without_peers(memory, patches, prompts, everything, draw_groups[draw],
                                                              size, sigma, streams[draw][0])
            seconds.append(spent)
            for name, (scores, maps) in outputs.items():
                results.setdefault(name, []).append(report(labels, masks, scores, maps))
            for share in PREVALENCES if k == 4 else ():
                index = torch.from_numpy(prevalence_subset(labels, share, seed=2000 + draw))
                sub_groups = stream_groups(len(index), group, 4000 + draw)
                outputs, _ = detectors_with_and_without_peers(memory, patches, prompts, index, sub_groups, size, sigma)
                sub_labels = labels[index.numpy()]
                for name in ("fused (default)", "fused (default) + peers"):
                    found = report(sub_labels, None if masks is None else masks[index.numpy()], *outputs[name])
                    for metric in ("image_auroc", "pixel_auroc"):
                        by_share.setdefault((share, name, metric), []).append(found[metric])
        means = {name: {m: _mean([r[m] for r in rs]) for m in METRICS} for name, rs in results.items()}
        for name, values in means.items():
            spent = seconds if name.endswith(" + peers") else [t for _, t in streams] if name.endswith("window peers") else []
            ms = f"{1000 * np.mean(spent):.1f}" if spent else ""
            rows.append([product, str(k), name, *(_fmt(values[m]) for m in METRICS), ms])
        for peers in ("peers", "window peers"):
            fused = means[f"fused (default) + {peers}"]
            best = {m: None if fused[m] is None else fused[m] - max(means[s][m] for s in SINGLES) for m in METRICS}
            summary.append([product, str(k), peers,
                            *("-" if best[m] is None else f"{100 * best[m]:+.1f}" for m in METRICS)])
        for share in PREVALENCES if k == 4 else ():
            index = prevalence_subset(labels, share, seed=2000)
            shown = f"{100 * labels.mean():.0f}% (all)" if share is None else f"{100 * share:.0f}%"
            shares.append([product, str(k), shown, str(len(index)),
                           *(_fmt(_mean(by_share[(share, name, metric)])) for metric in ("image_auroc", "pixel_auroc")
                             for name in ("fused (default)", "fused (default) + peers"))])
    return f"{product}: {data.describe}", rows, summary, shares


def main() -> int:
    from anomalyfleet.cli import default_detector_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_product_arguments(parser, ks="1,4,16")
    parser.add_argument("--group", type=int, default=32, help="images per group of peers (and of batch zero-shot)")
    args = parser.parse_args()
    products = chosen_products(args.products, args.data_root)
    if products is None:
        return 2
    started = time.perf_counter()
    detector, base, layer = detector_and_base(str(default_detector_path()), args.memory_layer)
    ks = [int(x) for x in args.ks.split(",") if x]
    print(f"# {time.strftime('%Y-%m-%d')} | {platform.machine()}, {torch.get_num_threads()} torch threads | bundled "
          f"default detector | memory block {layer}, views {args.views} | {DRAWS} draws per k | groups of at most {args.group} "
          f"in a seeded order per draw")
    rows, summary, shares = [], [], []
    for product in products:
        describe, product_rows_, product_summary, product_shares = product_rows(
            detector, base, product, args.data_root, args.cache_dir, ks, args.group, layer, args.views)
        print(f"# {describe}")
        rows.extend(product_rows_)
        summary.extend(product_summary)
        shares.extend(product_shares)
    metric_names = ["image AUROC", "image AP", "pixel AUROC", "AUPRO"]
    print_table(["product", "k", "detector", *metric_names, "ms/img (peers)"], rows)
    print(f"\n# fused with peers (closed groups, or the service's rolling window) minus the best single source "
          f"({', '.join(SINGLES)}), points")
    print_table(["product", "k", "peers", *metric_names], summary)
    if shares:
        print("\n# by share of defective test images (k = 4; subsets seeded per draw, groups formed in each subset)")
        print_table(["product", "k", "defective", "images", "image AUROC fused", "image AUROC + peers",
                     "pixel AUROC fused", "pixel AUROC + peers"], shares)
    print(f"\n# total {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
