"""Which feature block should a line memory use? Measured, on three products.

Run: .venv/bin/python benchmarks/memory_blocks.py [--cache-dir DIR] [--products mt,elpv-mono,elpv-poly]
     [--ks 4,16] [--blocks 4,6,7,8,9,10,11,12,6+9] [--modes memory,fused,batch]

Issue 9 asks for the memory's feature blocks to be chosen by measurement. For each candidate block
of the bundled detector's backbone, memories of k normal images are drawn exactly as `memory build`
draws them (benchmarks/zero_shot.py `draw_memory`: seeds 100 + draw, the next 32 normals
calibrating, 3 draws per k; "6+9" is a memory on both blocks, whose map averages their
distances, as `memory build --layer 6,9` builds it) and scored two ways with the default
settings: the memory alone (`--mode memory`) and fused with the prompts (the default mode). Batch zero-shot mode, which
compares the same block of the images of a group with each other and uses no normal image, gets
one row per single block (k "-"; groups of 32 test images in 3 seeded orders, as
benchmarks/line_memory_products.py scores it). One feature pass per product
extracts every candidate block together with the prompts' map layers. Metrics are the mean over
draws; pixel metrics on Magnetic Tile only (ELPV has image labels).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from line_memory_products import (BATCH_ROW, METRICS, _fmt, _mean, add_product_arguments,  # noqa: E402
                                  batch_rows, chosen_products, load_product, report)
from zero_shot import DRAWS, MemoryViews, draw_memory, fuse_timed, memory_raw_maps, print_table  # noqa: E402

from anomalyfleet.memory import FusionSettings  # noqa: E402

MODES = {"memory": ("memory alone", FusionSettings(mode="memory")), "fused": ("fused (default)", FusionSettings())}


def parse_candidates(text: str) -> list[tuple[int, ...]]:
    """'6,9,6+9' -> [(6,), (9,), (6, 9)]."""
    return [tuple(sorted({int(b) for b in item.split("+")})) for item in text.split(",") if item]


def product_rows(detector, base, product: str, data_root: str, cache_dir: str | None, ks: list[int],
                 candidates: list[tuple[int, ...]], modes: list[str], views: str) -> tuple[str, list[list]]:
    data = load_product(detector, base, product, data_root, cache_dir, candidates[0][0], views)
    all_layers = list(base.settings.layers)
    sigma = detector.settings.sigma
    rows = []
    for blocks in candidates:
        li = tuple(all_layers.index(b) for b in blocks)
        test_patches = [data.test_table.patch_features[:, i].float() for i in li]
        block_views = MemoryViews(base, data.pool, blocks, views)
        name = "+".join(map(str, blocks))
        if "batch" in modes and len(blocks) == 1:
            batch = batch_rows(detector, test_patches[0], data.labels, data.masks)
            rows.append([product, "-", name, BATCH_ROW, *(_fmt(batch[m]) for m in METRICS)])
        fusions = [MODES[m] for m in modes if m in MODES]
        for k in (ks if fusions else []):
            results: dict[str, list[dict]] = {}
            for draw in range(DRAWS):
                memory, _ = draw_memory(detector, data.pool_table, data.pool_prompts, data.normals, li, blocks, k, draw,
                                        views=block_views)
                raw, _ = memory_raw_maps(memory, test_patches, detector.image_size)
                for mode, fusion in fusions:
                    memory.configure(fusion, sigma)
                    scores, maps, _ = fuse_timed(memory, raw, data.test_prompts, sigma)
                    results.setdefault(mode, []).append(report(data.labels, data.masks, scores, maps))
            for mode, reports in results.items():
                rows.append([product, str(k), name, mode,
                             *(_fmt(_mean([r[m] for r in reports])) for m in METRICS)])
        print(f"# {product}: block {name} done", file=sys.stderr, flush=True)
    return f"{product}: {data.describe}", rows


def main() -> int:
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.cli import default_detector_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_product_arguments(parser, ks="4,16")
    parser.add_argument("--blocks", default="4,6,7,8,9,10,11,12,6+9",
                        help="candidate memory blocks, comma-separated; 6+9: one memory on both")
    parser.add_argument("--modes", default="memory,fused,batch", help="rows per block: memory, fused, batch")
    args = parser.parse_args()
    if args.memory_layer is not None:
        print("--blocks chooses the blocks here, not --memory-layer", file=sys.stderr)
        return 2
    products = chosen_products(args.products, args.data_root)
    if products is None:
        return 2
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {*MODES, "batch"}:
        print(f"--modes takes memory, fused and batch, got {args.modes!r}", file=sys.stderr)
        return 2
    candidates = parse_candidates(args.blocks)
    blocks = sorted({b for c in candidates for b in c})
    ks = [int(x) for x in args.ks.split(",") if x]
    started = time.perf_counter()
    detector = load_bundle(str(default_detector_path()))
    depth = detector.backbone.num_layers
    if not all(1 <= b <= depth for b in blocks):
        print(f"blocks must be between 1 and {depth}", file=sys.stderr)
        return 2
    base = load_bundle(str(default_detector_path()), backbone=detector.backbone)
    base.with_settings(layers=sorted(set(detector.settings.layers) | set(blocks)))
    print(f"# {time.strftime('%Y-%m-%d')} | {platform.machine()}, {torch.get_num_threads()} torch threads | bundled "
          f"default detector (map layers {','.join(map(str, detector.settings.layers))}) | views {args.views} | "
          f"{DRAWS} draws per k")
    rows = []
    for product in products:
        describe, product_table = product_rows(detector, base, product, args.data_root, args.cache_dir, ks,
                                               candidates, modes, args.views)
        print(f"# {describe}")
        rows.extend(product_table)
    print_table(["product", "k", "block", "detector", "image AUROC", "image AP", "pixel AUROC", "AUPRO"], rows)
    print(f"\n# total {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
