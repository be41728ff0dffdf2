"""`make demo`: score ELPV solar-cell images zero-shot with the bundled offline detector.

The ELPV images come from the PyPI package `elpv-dataset` (CC BY-NC-SA 4.0), installed at set-up
and read where pip put them; nothing of it is copied into this repository. Cells labelled with
defect probability 0 are normal, 1 defective; the uncertain 1/3 and 2/3 labels are left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

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


def main(argv: list[str] | None = None) -> int:
    from anomalyfleet.cli import default_detector_path
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.device import select_device
    from anomalyfleet.evaluation import evaluate_detector
    from anomalyfleet.manifest import atomic_write_bytes
    from anomalyfleet.metrics import format_table
    from anomalyfleet.scoring import score_images

    parser = argparse.ArgumentParser(prog="anomalyfleet-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--limit-per-class", type=int, default=150, help="normal and defective cells each (0 = all)")
    parser.add_argument("--overlays", type=int, default=12, help="overlay PNGs to write (highest and lowest scores)")
    args = parser.parse_args(argv)
    try:
        samples = elpv_samples(args.limit_per_class or None)
        detector = load_bundle(default_detector_path(), device=select_device("auto"))
        print(f"ELPV solar cells: {len(samples)} images ({sum(s.label for s in samples)} defective), "
              f"detector {detector.backbone.spec()}", file=sys.stderr)
        report = evaluate_detector(detector, samples, per_image=True)
        out = Path(args.out)
        atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
        print(format_table(report))
        # Overlays of the cells the detector finds most and least anomalous, for a person to look at.
        ranked = sorted(report["per_image"], key=lambda r: r["score"], reverse=True)
        half = max(1, args.overlays // 2)
        pick = ranked[:half] + ranked[-half:]
        score_images(detector, [Path(r["image"]) for r in pick], out / "overlays", write_maps=False, progress=False)
        print(f"report: {out / 'report.json'}; overlays: {out / 'overlays'}", file=sys.stderr)
    except AnomalyFleetError as exc:
        print(f"anomalyfleet demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
