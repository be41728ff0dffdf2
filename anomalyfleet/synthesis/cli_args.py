"""`anomalyfleet synthesize RECIPE` and `anomalyfleet synth learn ...`: argument parsing and the
command bodies, kept here so the main CLI only has to call `add_synthesis_commands`."""

from __future__ import annotations

import argparse
import json

from anomalyfleet.cli_types import in_range, non_negative_int, positive_int

_gpus = in_range(0.0, float("inf"), "a GPU fraction")


def add_synthesis_commands(subparsers) -> None:
    p = subparsers.add_parser("synthesize", help="make (or resume) a synthetic defect library from a YAML recipe")
    add_synthesize_arguments(p)
    p.set_defaults(func=cmd_synthesize)

    synth = subparsers.add_parser("synth", help="AnoGen tools: learn defect embeddings")
    sub = synth.add_subparsers(dest="synth_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("learn", help="textual inversion of one defect type from a few masked examples")
    p.add_argument("--pipeline", help="Stable Diffusion directory, hub id or s3:// URI")
    p.add_argument("--support", help="data spec of the real defect examples with masks, e.g. folder:DIR")
    p.add_argument("--output", help="embedding file to write (e.g. crack.pt)")
    p.add_argument("--name", help="defect name (default: the output file's stem)")
    p.add_argument("--recipe", help="learn every AnoGen type of this recipe that has `support` (instead of the above)")
    p.add_argument("--defect", action="append", help="with --recipe: only these types (repeatable)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimisation steps (default 6000)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--learning-rate", type=float, default=None, help="base rate, times the batch size (default 5e-3)")
    p.add_argument("--resolution", type=positive_int, default=None, help="training size in pixels (default: the UNet's)")
    p.add_argument("--init-word", default=None, help="word the placeholder starts from (default 'defect')")
    p.add_argument("--checkpoint-dir", default=None, help="resume from / save checkpoints here")
    p.add_argument("--checkpoint-every", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (CUDA when present), cpu, cuda ...")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth_learn)


def add_synthesize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (normal images, defect types, counts, regions, seed, output)")
    p.add_argument("--output", default=None, help="override the recipe's output directory")
    p.add_argument("--actors", type=non_negative_int, default=None, help="Ray actors (0: in this process, no Ray)")
    p.add_argument("--num-gpus", type=_gpus, default=None, help="GPU fraction per actor")
    p.add_argument("--learn-gpus", type=_gpus, default=None,
                   help="GPU fraction per AnoGen embedding-learning task (default: as --num-gpus)")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster (default: connect or start a local one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_synthesize(args) -> int:
    from anomalyfleet.synthesis.library import load_recipe, synthesize_library

    recipe = load_recipe(args.recipe, output=args.output)
    if args.num_gpus is not None:
        recipe.ray.num_gpus = args.num_gpus
    if args.learn_gpus is not None:
        recipe.ray.learn_gpus = args.learn_gpus
    if args.ray_address is not None:
        recipe.ray.address = args.ray_address
    result = synthesize_library(recipe, progress=not args.quiet, actors=args.actors)
    print(json.dumps(result.to_dict(), indent=1))
    return 0


def cmd_synth_learn(args) -> int:
    from anomalyfleet import storage
    from anomalyfleet.errors import ConfigError
    from anomalyfleet.synthesis.anogen import LearnConfig, learn_embedding, learn_from_recipe

    if args.recipe:
        # The recipe's `learn` settings decide; flags that would be silently overruled are refused.
        ignored = [f"--{name.replace('_', '-')}" for name in ("pipeline", "support", "output", "steps", "batch_size",
                                                              "learning_rate", "resolution", "init_word", "seed",
                                                              "checkpoint_every", "device", "checkpoint_dir", "name")
                   if getattr(args, name, None) is not None]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply with --recipe: "
                              "set them in the recipe's `learn` settings of each defect type")
        learned = learn_from_recipe(args.recipe, args.defect, progress=not args.quiet)
        if not learned:
            raise ConfigError(f"{args.recipe}: no anogen defect type with `support` examples to learn"
                              + (f" among {', '.join(args.defect)}" if args.defect else ""))
        print(json.dumps(learned, indent=1))
        return 0
    if not (args.pipeline and args.support and args.output):
        raise ConfigError("synth learn needs --pipeline, --support and --output (or --recipe)")
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                 "resolution": args.resolution, "init_word": args.init_word, "seed": args.seed,
                 "checkpoint_every": args.checkpoint_every, "device": args.device}
    config = LearnConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
    if storage.is_remote(args.output):
        # Learned on this node (checkpoints beside it, so a rerun resumes), then uploaded.
        from dataclasses import asdict
        from pathlib import Path

        from anomalyfleet.synthesis.library import learning_key, publish_embedding

        # Keyed by what it learns from, not only where it goes: other support examples or another
        # pipeline must not resume (and publish) an earlier learning's finished vector.
        key = learning_key(args.pipeline, args.support, asdict(config), args.output)
        local = Path(args.checkpoint_dir or storage.cache_dir("synthesis") / f"learn-{key}") / Path(args.output).name
        local.parent.mkdir(parents=True, exist_ok=True)
        learn_embedding(args.pipeline, args.support, local, config, checkpoint_dir=local.parent / ".checkpoints",
                        progress=not args.quiet, defect_name=args.name)
        print(publish_embedding(local, args.output))
        return 0
    path = learn_embedding(args.pipeline, args.support, args.output, config, checkpoint_dir=args.checkpoint_dir,
                           progress=not args.quiet, defect_name=args.name)
    print(path)
    return 0
