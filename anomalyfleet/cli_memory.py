"""`anomalyfleet memory build | set | show`: a line's few-shot normal memory in its detector bundle."""

from __future__ import annotations

import argparse
import json
import sys

from anomalyfleet.cli_types import in_range, layer_list, non_negative_int, positive_int

MODES = ("fused", "memory", "prompts")
DEFAULT_MODE = "fused"
_weight = in_range(0.0, 1.0, "a weight")
_fraction = in_range(0.0, 1.0, "a top fraction", low_open=True)
# memory_tuning's choices, for the parser (built without importing torch); tests check they agree.
TUNING_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro")
# memory_views' view sets and default, likewise.
VIEW_SETS = ("none", "flips", "d4")
DEFAULT_VIEWS = "d4"
# FusionSettings' map scores, likewise.
MAP_SCORES = ("memory", "fused")


def _map_score(text: str) -> str:
    if text not in MAP_SCORES:
        raise argparse.ArgumentTypeError(f"map score must be one of {', '.join(MAP_SCORES)}, got {text!r}")
    return text


def weight_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers in [0, 1], got {text!r}")
    return values
# FusionSettings' defaults, for help texts only (the parser is built without importing torch);
# tests check they agree.
FUSION_DEFAULTS = {"prompt_weight": 0.1, "prompt_map_weight": 0.0, "image_evidence": 0.5, "top_fraction": 0.01,
                   "position_weight": 0.1, "memory_position": 1.0, "map_score": "memory"}
# Options that set a FusionSettings field, shared by `build` and `set`: only those given are applied.
FUSION_OPTIONS = (
    ("--prompt-weight", "prompt_weight", _weight,
     "share of the prompts' global score in the fused image score (default {})"),
    ("--position-weight", "position_weight", _weight,
     "share in the fused image score of the prompt map normalised per position on the line's normal images "
     "(needs 8 calibration images; default {})"),
    ("--memory-position", "memory_position", _weight,
     "share of the memory's image score read from its map normalised per position on the line's normal images "
     "(needs 8 calibration images; default {})"),
    ("--prompt-map-weight", "prompt_map_weight", _weight,
     "share of the prompt map in each pixel's local evidence (default {})"),
    ("--image-evidence", "image_evidence", _weight,
     "share of the image's score in each pixel of the map (default {})"),
    ("--top-fraction", "top_fraction", _fraction,
     "share of a map's top pixels whose mean is the image score (default {})"),
    ("--map-score", "map_score", _map_score,
     "the image score each pixel of the fused map takes its share from: the memory's own or the fused "
     "one (default {})"),
)


def _given(args) -> dict:
    return {field: getattr(args, field) for _, field, _, _ in FUSION_OPTIONS if getattr(args, field) is not None}


def _drop_thresholds(detector, before=None) -> dict:
    """Forget thresholds set on another scale than the memory's fusion now has: image thresholds
    (and the calibration report behind them) when the image scores' scale changed, pixel ones when
    the maps' did. `before`: the FusionSettings they were set under (None: another memory, all go)."""
    image = pixel = True
    if before is not None:
        now = detector.memory.fusion
        image, pixel = now.score_scale() != before.score_scale(), now.map_scale() != before.map_scale()
    dropped = {k: v for k, v in detector.thresholds.items()
               if (image and k.startswith("image")) or (pixel and k.startswith("pixel"))}
    detector.thresholds = {k: v for k, v in detector.thresholds.items() if k not in dropped}
    if image:
        extras = dict(detector.metadata.get("extras", {}))
        extras.pop("calibration", None)
        detector.metadata["extras"] = extras
    return dropped


def _recalibrate_note(dropped: dict, bundle) -> None:
    if dropped:
        print(f"note: the bundle's thresholds ({', '.join(sorted(dropped))}) were set on another score scale and "
              f"were dropped; run `anomalyfleet calibrate --detector {bundle} --data SPEC --out {bundle}`",
              file=sys.stderr)


def _position_note(memory, requested) -> None:
    """Say so when a position-normalised score was asked for (`requested`, FusionSettings) but the
    memory could not fit it."""
    from anomalyfleet.memory import POSITION_MIN_IMAGES

    fusion = memory.fusion
    off = []
    if requested.uses_position_term and fusion.position_weight == 0:
        off.append("the position term")
    # Memory mode with --image-evidence 0 keeps the raw score by definition: nothing to note there.
    if fusion.calibrated_image_score and requested.memory_position > 0 and fusion.memory_position == 0:
        off.append("the memory position share")
    if off:
        have = 0 if memory.calibration_set is None else int(memory.calibration_set.memory.shape[0])
        print(f"note: {' and '.join(off)} {'is' if len(off) == 1 else 'are'} off: position statistics need "
              f"{POSITION_MIN_IMAGES} calibration images and this memory has {have} (the normal images of --data "
              f"beyond the memory's k; with none, the memory's own images)", file=sys.stderr)


def cmd_memory_build(args) -> int:
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import check_bundle_target, load_bundle, save_bundle
    from anomalyfleet.cli import resolve_detector
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.device import select_device
    from anomalyfleet.memory import FusionSettings, build_line_memory

    check_bundle_target(args.out)
    samples = parse_data_specs(args.data)
    bundle = resolve_detector(args.detector)
    spec = parse_backbone(args.backbone) if args.backbone else None
    # The bundle's own settings and fp32: the memory must match the features the service computes.
    detector = load_bundle(bundle, device=select_device(args.device), backbone_spec=spec)
    previous = detector.memory
    detector.memory = None  # a previous memory is replaced, not extended
    fusion = FusionSettings(mode=args.mode, **_given(args))
    memory = build_line_memory(
        detector, samples, k=args.k, coreset=args.coreset, layers=args.layer, fusion=fusion,
        calibration_images=args.calibration_images, batch_size=args.batch_size, seed=args.seed,
        progress=not args.quiet, views=args.views,
    )
    memory.info["data"] = list(args.data)
    memory.info["bundle_in"] = bundle
    # Thresholds hold only on the scale they were set on: a new memory's calibrated scale is not the
    # prompts' probabilities, nor an earlier memory's (other images); back to prompts alone, thresholds
    # set on a memory's scale no longer apply either.
    dropped = _drop_thresholds(detector) if memory.active or (previous is not None and previous.active) else {}
    detector.memory = memory
    detector.to("cpu")
    save_bundle(detector, args.out)
    meta = memory.metadata()
    summary = {"bundle": str(args.out), "mode": memory.fusion.mode, "layers": list(memory.layers),
               "shots": memory.shots, "views": args.views, "bank_sizes": meta["bank_sizes"],
               "coreset": memory.coreset,
               "calibration": meta["calibration"], "memory_calibration": memory.info.get("memory_calibration"),
               "thresholds_dropped": sorted(dropped)}
    print(json.dumps(summary, indent=2))
    print(f"line memory from {memory.shots} normal images of {len(samples)} -> {args.out} "
          f"(mode {memory.fusion.mode}, layer(s) {','.join(map(str, memory.layers))})", file=sys.stderr)
    _recalibrate_note(dropped, args.out)
    _position_note(memory, fusion)
    return 0


def _load_with_memory(bundle: str, args):
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.errors import BundleError

    spec = parse_backbone(args.backbone) if args.backbone else None
    detector = load_bundle(bundle, backbone_spec=spec)
    if detector.memory is None:
        raise BundleError(f"{bundle} has no line memory; build one with `anomalyfleet memory build`")
    return detector


def cmd_memory_set(args) -> int:
    from dataclasses import replace

    from anomalyfleet.bundle import check_bundle_target, save_bundle
    from anomalyfleet.cli import resolve_detector
    from anomalyfleet.errors import ConfigError

    changes = _given(args)
    if args.mode is not None:
        changes["mode"] = args.mode
    if not changes:
        raise ConfigError("nothing to set: give --mode, --prompt-weight, --position-weight, --memory-position, "
                          "--prompt-map-weight, --image-evidence, --top-fraction or --map-score")
    bundle = resolve_detector(args.detector)
    out = args.out or bundle
    check_bundle_target(out)
    detector = _load_with_memory(bundle, args)
    memory = detector.memory
    before = memory.fusion
    memory.configure(replace(before, **changes), sigma=detector.settings.sigma)
    detector.with_settings()  # the memory's checks for the mode it is now in (e.g. prompts -> fused)
    dropped = _drop_thresholds(detector, before)
    save_bundle(detector, out)
    summary = {"bundle": str(out), "before": before.to_dict(), "fusion": memory.fusion.to_dict(),
               "fused_score_calibration": memory.metadata()["calibration"]["fused_score"],
               "thresholds_dropped": sorted(dropped)}
    print(json.dumps(summary, indent=2))
    _recalibrate_note(dropped, out)
    _position_note(memory, replace(before, **changes))
    return 0


def cmd_memory_tune(args) -> int:
    from anomalyfleet.bundle import check_bundle_target, save_bundle
    from anomalyfleet.cli import resolve_detector
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.device import select_device
    from anomalyfleet.memory_tuning import DEFAULT_WEIGHTS, tune_fusion

    samples = parse_data_specs(args.data)
    bundle = resolve_detector(args.detector)
    if not args.dry_run:
        check_bundle_target(args.out or bundle)
    detector = _load_with_memory(bundle, args)
    detector.to(select_device(args.device))
    memory = detector.memory
    before = memory.fusion
    best, candidates = tune_fusion(detector, samples, weights=args.weights or DEFAULT_WEIGHTS, metric=args.metric,
                                   confidence=args.confidence, batch_size=args.batch_size, progress=not args.quiet)
    table = {c.name: {k: c.report.get(k) for k in ("image_auroc", "image_ap", "pixel_auroc", "aupro")}
             for c in candidates}
    used = len({s.image for s in samples} - set(memory.info.get("images", [])))
    summary = {"bundle": bundle, "metric": args.metric, "images": used, "candidates": table,
               "confidence": args.confidence, "chosen": best.name, "fusion": best.fusion.to_dict()}
    if not args.dry_run:
        out = args.out or bundle
        memory.configure(best.fusion, sigma=detector.settings.sigma)
        detector.with_settings()  # the memory's checks for the mode it is now in
        memory.info["tuned"] = {"metric": args.metric, "data": list(args.data), "chosen": best.name,
                                "candidates": table}
        dropped = _drop_thresholds(detector, before)
        detector.to("cpu")
        save_bundle(detector, out)
        summary.update(out=str(out), thresholds_dropped=sorted(dropped))
    print(json.dumps(summary, indent=2))
    value = best.report[args.metric]
    print(f"{best.name}: {args.metric} {value:.4f} on {used} labelled images"
          + ("" if args.dry_run else f" -> {summary['out']}"), file=sys.stderr)
    if not args.dry_run:
        _recalibrate_note(dropped, summary["out"])
    return 0


def cmd_memory_show(args) -> int:
    from anomalyfleet.bundle import read_bundle_metadata
    from anomalyfleet.cli import resolve_detector
    from anomalyfleet.errors import BundleError

    bundle = resolve_detector(args.detector)
    meta = read_bundle_metadata(bundle)
    if not meta.get("memory"):
        raise BundleError(f"{bundle} has no line memory; build one with `anomalyfleet memory build`")
    print(json.dumps({"bundle": bundle, "format_version": meta["format_version"],
                      "thresholds": meta.get("thresholds", {}), "memory": meta["memory"]}, indent=2))
    return 0


def _add_feature_options(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that run the backbone over images."""
    parser.add_argument("--backbone", default=None, help="where this bundle's backbone weights live here (same weights)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_memory_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "memory",
        help="few-shot normal memory of a production line, stored in its detector bundle",
        description="Line memory: patch features of a line's normal images, so each patch is also scored "
                    "by its distance to the nearest normal patch, fused with the learned prompts.",
    )
    sub = p.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    b = sub.add_parser(
        "build",
        help="build a memory from normal images and write a new bundle",
        description="Only the normal (label 0) images of the data are used: K of them (a seeded draw) form "
                    "the memory, up to --calibration-images others calibrate the maps' scales (else "
                    "leave-one-out over the memory images). Scores change scale, so thresholds are "
                    "dropped: calibrate the new bundle afterwards.",
    )
    b.add_argument("--detector", required=True, help="detector bundle ('default' for the bundled one)")
    b.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="folder:PATH, mvtec:PATH, ... with normal images of the line; repeatable")
    b.add_argument("--out", required=True, help="output bundle (may be the input bundle: replaced atomically)")
    b.add_argument("--k", type=positive_int, default=16, help="normal images in the memory (default 16)")
    b.add_argument("--coreset", type=positive_int, default=None,
                   help="keep at most N patches per layer (greedy coreset; default: all, or with views what a "
                        "memory of max(k, 16) images without views holds)")
    b.add_argument("--views", choices=VIEW_SETS, default=DEFAULT_VIEWS,
                   help="views of each memory image in the memory: none, flips (mirror images and the half "
                        "turn: 4 views) or d4 (also quarter turns and transposes: 8 views); the "
                        f"bank and the search time grow with the views (default {DEFAULT_VIEWS})")
    b.add_argument("--layer", type=layer_list, default=None,
                   help="feature block(s) of the memory, e.g. 8 or 6,9 (default: block 8 of 12, two thirds up)")
    b.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help=f"scoring sources recorded in the bundle (default {DEFAULT_MODE})")
    for flag, field, kind, text in FUSION_OPTIONS:
        b.add_argument(flag, dest=field, type=kind, default=None, help=text.format(FUSION_DEFAULTS[field]))
    b.add_argument("--calibration-images", type=non_negative_int, default=32,
                   help="normal images outside the memory that calibrate the scales (default 32)")
    b.add_argument("--seed", type=int, default=0, help="seed of the draw of memory images and the coreset")
    _add_feature_options(b)
    b.set_defaults(func=cmd_memory_build)

    m = sub.add_parser(
        "set",
        help="switch a bundle's fusion mode or weights without rebuilding its memory",
        description="Only the options given change. The fused score's scale is refitted from the normal images' "
                    "scores kept in the bundle; when the score scale changes, thresholds are dropped: calibrate "
                    "the new bundle afterwards.",
    )
    m.add_argument("--detector", required=True, help="bundle with a line memory")
    m.add_argument("--out", default=None, help="output bundle (default: the input bundle, replaced atomically)")
    m.add_argument("--mode", choices=MODES, default=None, help="scoring sources")
    for flag, field, kind, text in FUSION_OPTIONS:
        m.add_argument(flag, dest=field, type=kind, default=None, help=text.split(" (default")[0])
    m.add_argument("--backbone", default=None, help="where this bundle's backbone weights live here (same weights)")
    m.set_defaults(func=cmd_memory_set)

    t = sub.add_parser(
        "tune",
        help="choose the fusion (prompt weight, or one source alone) on labelled images of the line",
        description="Scores the labelled images once (the memory's own images are left out), compares the "
                    "prompts alone, the memory alone and the fused detector at each weight on --metric, and "
                    "writes the choice into the bundle: for image AUROC the bundle's own setting stays unless another "
                    "beats it at --confidence, otherwise the best (ties go to the smaller prompt weight). Needs "
                    "normal and defective images.",
    )
    t.add_argument("--detector", required=True, help="bundle with a line memory")
    t.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="labelled images of the line (folder:PATH with normal/ and defect folders, mvtec:PATH ...)")
    t.add_argument("--out", default=None, help="output bundle (default: the input bundle, replaced atomically)")
    t.add_argument("--weights", type=weight_list, default=None,
                   help="prompt weights to compare, 0 meaning the memory alone (default 0,0.05,0.1,0.2,0.3,0.5)")
    t.add_argument("--metric", choices=TUNING_METRICS, default="image_auroc",
                   help="what to maximise (pixel metrics need masks; default image_auroc)")
    t.add_argument("--confidence", type=in_range(0.0, 1.0, "a confidence", high_open=True), default=0.95,
                   help="image AUROC: keep the bundle's setting unless another beats it at this one-sided "
                        "confidence (paired bootstrap); 0 takes the best value (default 0.95)")
    t.add_argument("--dry-run", action="store_true", help="print the comparison, write nothing")
    _add_feature_options(t)
    t.set_defaults(func=cmd_memory_tune)

    s = sub.add_parser("show", help="print a bundle's line memory (layers, sizes, calibrations, fusion) as JSON")
    s.add_argument("--detector", required=True, help="bundle with a line memory")
    s.set_defaults(func=cmd_memory_show)
    return p


__all__ = ["add_memory_command", "cmd_memory_build", "cmd_memory_set", "cmd_memory_show", "cmd_memory_tune"]
