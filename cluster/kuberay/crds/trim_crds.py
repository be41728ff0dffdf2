"""Make the trimmed KubeRay schemas in this folder from upstream CRD files (see README.md).

    python cluster/kuberay/crds/trim_crds.py path/to/ray.io_rayclusters.yaml ... [--out cluster/kuberay/crds]

Keeps the `v1` version's openAPIV3Schema of each CRD, without `description` texts and without the
`status` subtree (a manifest never sets it). Everything that constrains a manifest (types, required
fields, enums, patterns, formats and the x-kubernetes-* markers) is kept unchanged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml



def _is_doc_text(key: str, value) -> bool:
    # A schema's `description` is a string; a field *named* description is a schema (a dict) under
    # `properties` and is a constraint to keep.
    return key == "description" and isinstance(value, str)


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if not _is_doc_text(k, v)}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def trim(crd: dict, version: str = "v1") -> dict:
    spec = crd["spec"]
    for entry in spec["versions"]:
        if entry["name"] == version:
            schema = dict(entry["schema"]["openAPIV3Schema"])
            break
    else:
        raise SystemExit(f"{crd['metadata']['name']}: no version {version}")
    properties = dict(schema.get("properties", {}))
    properties.pop("status", None)
    schema["properties"] = properties
    return {
        "crd": crd["metadata"]["name"],
        "group": spec["group"],
        "kind": spec["names"]["kind"],
        "version": version,
        "openAPIV3Schema": _strip(schema),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crds", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    for path in args.crds:
        trimmed = trim(yaml.safe_load(path.read_text()))
        target = args.out / f"{trimmed['kind'].lower()}.v1.schema.json"
        target.write_text(json.dumps(trimmed, indent=None, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{path} -> {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
