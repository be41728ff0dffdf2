"""`anomalyfleet calibrate`: write image thresholds into a detector bundle, with a report beside it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from anomalyfleet.cli_types import in_range, positive_int

_rate = in_range(0.0, 1.0, "a false-alarm rate", high_open=True)
_recall = in_range(0.0, 1.0, "a target recall", low_open=True)
_batch = positive_int


def report_paths(out: str | Path, report: str | None) -> tuple[str, str]:
    """`<out>.calibration.json/.png` beside the bundle, or `<report>.json/.png` when given (paths or
    s3:// URIs, kept as strings so that a URI keeps its double slash)."""
    if report:
        base = str(report).rstrip("/")
        if base.lower().endswith((".json", ".png")):
            base = base[: base.rindex(".")]
        return base + ".json", base + ".png"
    base = str(out).rstrip("/") + ".calibration"
    return base + ".json", base + ".png"


def check_report_dir(path: str) -> None:
    """Fail before the work, not after it with the bundle already written, when the report cannot be
    written: its nearest existing ancestor must be a writable directory."""
    from anomalyfleet import storage
    from anomalyfleet.errors import ConfigError

    if storage.is_remote(path):
        return
    ancestor = storage.parse(path).path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the calibration report {path}: {ancestor} is not a writable directory")


def cmd_calibrate(args) -> int:
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import check_bundle_target, load_bundle, save_bundle
    from anomalyfleet.calibration import apply_calibration, calibrate_scores, detector_scores, write_report
    from anomalyfleet.cli import resolve_detector
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.device import select_device

    check_bundle_target(args.out)
    json_path, png_path = report_paths(args.out, args.report)
    check_report_dir(json_path)
    samples = parse_data_specs(args.data)
    bundle = resolve_detector(args.detector)
    spec = parse_backbone(args.backbone) if args.backbone else None
    # The bundle's own settings and fp32: the thresholds must fit the scores the service computes.
    detector = load_bundle(bundle, device=select_device(args.device), backbone_spec=spec)
    scores, labels = detector_scores(detector, samples, batch_size=args.batch_size, progress=not args.quiet,
                                     peers=args.peers)
    calibration = calibrate_scores(scores, labels, false_alarm_rate=args.false_alarm_rate, target_recall=args.target_recall)
    apply_calibration(detector, calibration, data=args.data, peers=args.peers)
    save_bundle(detector.to("cpu"), args.out)
    report = dict(calibration.report, bundle_in=bundle, bundle_out=str(args.out), data=list(args.data))
    write_report(report, json_path, png_path)
    summary = {"bundle": str(args.out), "chosen": calibration.chosen, "threshold": calibration.threshold,
               "peers": args.peers, "report": str(json_path), "plot": str(png_path)}
    for name, point in calibration.operating_points.items():
        summary[name] = {k: point[k] for k in ("threshold", "precision", "recall", "fpr", "f1") if k in point}
    print(json.dumps(summary, indent=2))
    print(f"calibrated {bundle} on {len(samples)} images -> {args.out} (threshold {calibration.threshold:.6g}, "
          f"{calibration.chosen})", file=sys.stderr)
    return 0


def add_calibrate_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate",
        help="write image thresholds into a bundle from normal or labelled images",
        description="From normal images only: the threshold at a false-alarm rate (default 0.01). From "
                    "labelled images: best F1, or the threshold reaching --target-recall, or the "
                    "--false-alarm-rate point; all operating points are stored and reported.",
    )
    p.add_argument("--detector", required=True, help="detector bundle to calibrate ('default' for the bundled one)")
    p.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="folder:PATH, mvtec:PATH, ... (normal-only data is fine); repeatable")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--false-alarm-rate", type=_rate, default=None,
                        help="share of normal images allowed to alarm (default 0.01 for normal-only data)")
    target.add_argument("--target-recall", type=_recall, default=None,
                        help="share of anomalous images to catch (labelled data)")
    p.add_argument("--out", required=True, help="output bundle (may be the input bundle: replaced atomically)")
    p.add_argument("--report", default=None, help="report path prefix (default OUT.calibration.json/.png)")
    p.add_argument("--backbone", default=None, help="where this bundle's backbone weights live here (same weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_batch, default=8)
    p.add_argument("--peers", type=positive_int, default=None, metavar="G",
                   help="thresholds for scoring with peers (score/eval/bulk-score --peers, window peers): scores "
                        "computed as eval --peers G computes them; the bundle records G")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_calibrate)
    return p


__all__ = ["add_calibrate_command", "cmd_calibrate"]
