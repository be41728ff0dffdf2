"""`anomalyfleet memory build`: store a line's few-shot normal memory in its detector bundle."""

from __future__ import annotations

import argparse
import json
import sys

from anomalyfleet.cli_types import in_range, layer_list, positive_int

MODES = ("fused", "memory", "prompts")
DEFAULT_MODE = "fused"
_weight = in_range(0.0, 1.0, "a prompt weight")
_fraction = in_range(0.0, 1.0, "a top fraction", low_open=True)


def cmd_memory_build(args) -> int:
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import load_bundle, save_bundle
    from anomalyfleet.cli import DEFAULT_DETECTOR, default_detector_path
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.device import select_device
    from anomalyfleet.memory import FusionSettings, build_line_memory

    samples = parse_data_specs(args.data)
    bundle = str(default_detector_path()) if args.detector == DEFAULT_DETECTOR else args.detector
    spec = parse_backbone(args.backbone) if args.backbone else None
    # The bundle's own settings and fp32: the memory must match the features the service computes.
    detector = load_bundle(bundle, device=select_device(args.device), backbone_spec=spec)
    detector.memory = None  # a previous memory is replaced, not extended
    fusion = FusionSettings(mode=args.mode, prompt_weight=args.prompt_weight, top_fraction=args.top_fraction)
    memory = build_line_memory(
        detector, samples, k=args.k, coreset=args.coreset, layers=args.layer, fusion=fusion,
        calibration_images=args.calibration_images, batch_size=args.batch_size, seed=args.seed,
        progress=not args.quiet,
    )
    memory.info["data"] = list(args.data)
    memory.info["bundle_in"] = bundle
    dropped = {}
    if memory.active and detector.thresholds:
        # Scores are on a new scale: thresholds set for the prompts' probabilities no longer apply.
        dropped = dict(detector.thresholds)
        detector.thresholds = {}
        extras = dict(detector.metadata.get("extras", {}))
        extras.pop("calibration", None)
        detector.metadata["extras"] = extras
    detector.memory = memory
    detector.to("cpu")
    save_bundle(detector, args.out)
    meta = memory.metadata()
    summary = {"bundle": str(args.out), "mode": memory.fusion.mode, "layers": list(memory.layers),
               "shots": memory.shots, "bank_sizes": meta["bank_sizes"], "coreset": memory.coreset,
               "calibration": meta["calibration"], "memory_calibration": memory.info.get("memory_calibration"),
               "thresholds_dropped": sorted(dropped)}
    print(json.dumps(summary, indent=2))
    print(f"line memory from {memory.shots} normal images of {len(samples)} -> {args.out} "
          f"(mode {memory.fusion.mode}, layer(s) {','.join(map(str, memory.layers))})", file=sys.stderr)
    if dropped:
        print(f"note: the bundle's thresholds ({', '.join(sorted(dropped))}) were set for prompt scores and were "
              f"dropped; run `anomalyfleet calibrate --detector {args.out} --data SPEC --out {args.out}`",
              file=sys.stderr)
    return 0


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
                   help="keep at most N patches per layer (greedy coreset; default: all)")
    b.add_argument("--layer", type=layer_list, default=None,
                   help="feature block(s) of the memory, e.g. 6 or 6,9 (default: the middle block)")
    b.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help=f"scoring sources recorded in the bundle (default {DEFAULT_MODE})")
    b.add_argument("--prompt-weight", type=_weight, default=0.2, help="weight of the prompts in fused mode")
    b.add_argument("--top-fraction", type=_fraction, default=0.01,
                   help="share of a map's top pixels whose mean is the image score (default 0.01)")
    b.add_argument("--calibration-images", type=int, default=32,
                   help="normal images outside the memory that calibrate the scales (default 32)")
    b.add_argument("--seed", type=int, default=0, help="seed of the draw of memory images and the coreset")
    b.add_argument("--backbone", default=None, help="where this bundle's backbone weights live here (same weights)")
    b.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    b.add_argument("--batch-size", type=positive_int, default=8)
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_memory_build)
    return p


__all__ = ["add_memory_command", "cmd_memory_build"]
