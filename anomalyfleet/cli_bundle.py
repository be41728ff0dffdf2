"""`anomalyfleet bundle push|pull|list`: versioned detector bundles in a registry prefix."""

from __future__ import annotations

import argparse
import json
import os
import sys

REGISTRY_ENV = "ANOMALYFLEET_BUNDLE_REGISTRY"


def _registry(args):
    from anomalyfleet.errors import ConfigError
    from anomalyfleet.storage import BundleRegistry

    root = args.registry or os.environ.get(REGISTRY_ENV)
    if not root:
        raise ConfigError(f"no registry: pass --registry URI or set {REGISTRY_ENV}")
    return BundleRegistry(root)


def cmd_push(args) -> int:
    from anomalyfleet.bundle import check_bundle

    check_bundle(args.bundle)  # refuse anything that would not load: published, it would break every loader
    info = _registry(args).push(args.bundle, args.name, args.version, set_latest=not args.no_latest)
    print(json.dumps({"name": info.name, "version": info.version, "uri": info.uri, "files": info.files,
                      "bytes": info.size, "latest": info.latest}))
    return 0


def cmd_pull(args) -> int:
    registry = _registry(args)
    path = registry.pull(args.name, args.version, args.out)
    print(f"pulled {registry.resolve(args.name, args.version)} -> {path}", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    from anomalyfleet import storage
    from anomalyfleet.errors import ConfigError

    registry = _registry(args)
    if not storage.is_remote(registry.root):
        # A mistyped local registry is an error, not an empty listing (an s3:// prefix has no such
        # thing as "missing": it is empty until the first push).
        local = storage.parse(registry.root).path
        if not local.is_dir():
            raise ConfigError(f"registry {registry.root} is not a directory"
                              + ("" if local.exists() else " (it does not exist)"))
    names = registry.names()
    if args.name:
        if args.name not in names:
            raise ConfigError(f"no detector named {args.name!r} in {registry.root}"
                              + (f" (published: {', '.join(names)})" if names else " (nothing is published there)"))
        names = [args.name]
    rows = [v for name in names for v in registry.versions(name)]
    if args.json:
        print(json.dumps([v.__dict__ for v in rows], indent=1))
        return 0
    if not rows:
        print(f"no published detectors in {registry.root}", file=sys.stderr)
        return 0
    width = max(len(v.name) for v in rows)
    for v in rows:
        marker = "  latest" if v.latest else ""
        print(f"{v.name:<{width}}  {v.version:<8}  {v.files:>3} files  {v.size:>10} bytes  {v.uri}{marker}")
    return 0


def add_bundle_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bundle", help="publish, fetch and list versioned detector bundles")
    commands = parser.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    registry_help = f"registry root: a directory or s3://bucket/prefix (default ${REGISTRY_ENV})"

    p = commands.add_parser("push", help="publish a bundle as a new immutable version and move 'latest'")
    p.add_argument("bundle", help="local bundle directory")
    p.add_argument("--name", required=True, help="detector name, e.g. the product or line")
    p.add_argument("--version", default=None, help="version label (default: the next vNNNN)")
    p.add_argument("--registry", default=None, help=registry_help)
    p.add_argument("--no-latest", action="store_true", help="publish without moving the 'latest' pointer")
    p.set_defaults(func=cmd_push)

    p = commands.add_parser("pull", help="download and verify a version into a local directory")
    p.add_argument("name")
    p.add_argument("--version", default="latest")
    p.add_argument("--out", required=True, help="target directory (must not exist)")
    p.add_argument("--registry", default=None, help=registry_help)
    p.set_defaults(func=cmd_pull)

    p = commands.add_parser("list", help="published detectors and versions")
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--registry", default=None, help=registry_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
