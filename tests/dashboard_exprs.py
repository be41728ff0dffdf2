"""Reading the generated Grafana dashboards' queries, for the tests that check them offline and live."""

from __future__ import annotations

import re
from collections.abc import Iterator

# ${name} or $name; `$1` (a label_replace group) is not a variable.
VARIABLE = re.compile(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)")


def targets(board: dict) -> Iterator[tuple[dict, dict]]:
    """Every (panel, query target) of a dashboard, rows included (they have none)."""
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def variables_used(text: str) -> set[str]:
    return {a or b for a, b in VARIABLE.findall(text)}


def substitute(text: str, values: dict[str, str]) -> str:
    """The query as Grafana sends it: each variable in `values` filled in, any other left as written."""
    return VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)
