"""Bulk scoring as a Ray job: images under storage prefixes, per line, to Parquet parts.

    python -m jobs.bulk_score --registry s3://factory/registry.yaml \
        --input line-7=s3://factory/images/2026-11-29/line-7 --out s3://factory/rescore/2026-11-29

On a cluster: `ray job submit --working-dir . -- python -m jobs.bulk_score ...`. Re-running the same
command skips finished shards.
"""

from __future__ import annotations

import sys

from anomalyfleet.bulk_scoring import add_bulk_arguments, cmd_bulk_score
from anomalyfleet.cli import run
from anomalyfleet.cli_types import CommandParser


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m jobs.bulk_score", description=__doc__.splitlines()[0])
    add_bulk_arguments(parser)
    return run(parser, argv, cmd_bulk_score)


if __name__ == "__main__":
    sys.exit(main())
