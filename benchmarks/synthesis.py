"""Synthesis throughput: images/s per generator (in process) and per Ray actor count.

    python benchmarks/synthesis.py [--count 64] [--size 256] [--actors 1,2] [--anogen-steps 10]

Procedural generators run at the given size; AnoGen runs on a tiny random pipeline (its speed says
nothing about Stable Diffusion's, only about the loop's overhead) unless --pipeline and --embedding
name real ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--anogen-steps", type=int, default=10)
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--embedding", default=None)
    args = parser.parse_args()
    print(f"## generators, in process, {args.size}x{args.size}")
    print(f"{'generator':<32} {'images/s':>10}")
    for name, rate in per_generator(args.size, args.count, args):
        print(f"{name:<32} {rate:>10.1f}")
    print(f"\n## library job on local Ray (perlin, {args.count} images incl. start-up and card)")
    print(f"{'actors':<32} {'images/s':>10}")
    for actors, rate in per_actor_count(args.size, args.count, [int(a) for a in args.actors.split(",")]):
        print(f"{actors:<32} {rate:>10.1f}")


if __name__ == "__main__":
    main()
