"""Make (or resume) a synthetic defect library: `python -m jobs.synthesize_library RECIPE.yaml`.

Same as `anomalyfleet synthesize RECIPE.yaml`; a killed run picks up where it stopped.
"""

from __future__ import annotations

import sys

from anomalyfleet.cli import run
from anomalyfleet.cli_types import CommandParser
from anomalyfleet.synthesis.cli_args import add_synthesize_arguments, cmd_synthesize


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m jobs.synthesize_library", description=__doc__.splitlines()[0])
    add_synthesize_arguments(parser)
    return run(parser, argv, cmd_synthesize)


if __name__ == "__main__":
    sys.exit(main())
