"""`anomalyfleet calibrate`: write image thresholds into a detector bundle, with a report beside it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from anomalyfleet.cli_types import in_range, positive_int

_rate = in_range(0.0, 1.0, "a false-alarm rate", high_open=True)
_recall = in_range(0.0, 1.0, "a target recall", low_open=True)
_batch = positive_int


def report_paths(out: str | Path, report: str | None) -> tuple[Path, Path]:
    """`<out>.calibration.json/.png` beside the bundle, or `<report>.json/.png` when given."""
    if report:
        base = Path(report)
        base = base.with_suffix("") if base.suffix.lower() in (".json", ".png") else base
        return base.with_name(base.name + ".json"), base.with_name(base.name + ".png")
    out = Path(out)
    return out.with_name(out.name + ".calibration.json"), out.with_name(out.name + ".calibration.png")


def cmd_calibrate(args) -> int:
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import load_bundle, save_bundle
    from anomalyfleet.calibration import apply_calibration, calibrate_scores, detector_scores, write_report
    from anomalyfleet.cli import resolve_detector
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.device import select_device

    samples = parse_data_specs(args.data)
    bundle = resolve_detector(args.detector)
    spec = parse_backbone(args.backbone) if args.backbone else None
    # The bundle's own settings and fp32: the thresholds must fit the scores the service computes.
    detector = load_bundle(bundle, device=select_device(args.device), backbone_spec=spec)
    scores, labels = detector_scores(detector, samples, batch_size=args.batch_size, progress=not args.quiet)
    calibration = calibrate_scores(scores, labels, false_alarm_rate=args.false_alarm_rate, target_recall=args.target_recall)
    apply_calibration(detector, calibration, data=args.data)
    save_bundle(detector.to("cpu"), args.out)
    json_path, png_path = report_paths(args.out, args.report)
    report = dict(calibration.report, bundle_in=bundle, bundle_out=str(args.out), data=list(args.data))
    write_report(report, json_path, png_path)
    summary = {"bundle": str(args.out), "chosen": calibration.chosen, "threshold": calibration.threshold,
               "report": str(json_path), "plot": str(png_path)}
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_calibrate)
    return p


__all__ = ["add_calibrate_command", "cmd_calibrate"]
