"""Distributed AnomalyCLIP prompt learning as a Ray job.

    python -m jobs.train_prompts --data folder:/data/widgets --backbone ViT-L-14-336 \
        --workers 2 --gpus-per-worker 1 --output /bundles/widgets

On a cluster: `ray job submit --working-dir . -- python -m jobs.train_prompts ...`. Re-running the
same command after a failure resumes from the last epoch checkpoint under --storage-path.
"""

from __future__ import annotations

import argparse
import sys

from anomalyfleet.cli import run
from anomalyfleet.cli_types import CommandParser
from anomalyfleet.distributed.cli_args import add_distributed_train_arguments, run_from_args

PROG = "python -m jobs.train_prompts"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description=__doc__.splitlines()[0])
    add_distributed_train_arguments(parser, standalone=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    # An interrupted run keeps its epoch checkpoints: say how to use them.
    return run(build_parser(), argv, run_from_args, interrupted="interrupted; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
