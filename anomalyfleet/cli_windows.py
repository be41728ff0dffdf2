"""`anomalyfleet windows list|restart`: the shared rolling windows of a running service.

Shared windows (`window: {shared: true}`) are detached Ray actors, named
`anomalyfleet-window-<application>-<line>` in namespace `anomalyfleet`. They outlive redeployments
of the Serve application with the code and settings they were started with; `restart` stops one so
that the next request of its line starts a new actor (from the line's snapshot, when the service
keeps them). Requests of that line meanwhile are scored by the line's bundle.
"""

from __future__ import annotations

import argparse
import json
import sys


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds with one line on an unreachable host:port (ray.init would retry for minutes)."""
    import socket

    from anomalyfleet.errors import ConfigError

    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({exc})") from None


def _connect(address: str):
    import ray

    if not ray.is_initialized():
        _reachable(address)
        ray.init(address=address, namespace="anomalyfleet", log_to_driver=False, logging_level="ERROR")
    return ray


def _window_actors(ray) -> list[str]:
    from anomalyfleet.serving.service import WINDOW_NAMESPACE
    from anomalyfleet.serving.window_keeper import ACTOR_PREFIX

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == WINDOW_NAMESPACE and a["name"].startswith(ACTOR_PREFIX))


def cmd_list(args) -> int:
    from anomalyfleet.serving.service import WINDOW_NAMESPACE

    ray = _connect(args.address)
    rows = []
    for name in _window_actors(ray):
        row = {"actor": name}
        try:
            row.update(ray.get(ray.get_actor(name, namespace=WINDOW_NAMESPACE).describe.remote(), timeout=args.timeout))
        except Exception as exc:  # a dying actor, or one from an older version without describe()
            row["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print("no shared windows on this cluster", file=sys.stderr)
    else:
        for row in rows:
            fill = f"{row['images']}/{row['size']}" if "images" in row else "?"
            print(f"{row['actor']}  {fill} images  state={row.get('state') or '-'}  {row.get('error', '')}".rstrip())
    return 0


def cmd_restart(args) -> int:
    from anomalyfleet.errors import ConfigError
    from anomalyfleet.serving.service import WINDOW_NAMESPACE

    ray = _connect(args.address)
    known = set(_window_actors(ray))
    unknown = [name for name in args.actors if name not in known]
    if unknown:
        raise ConfigError(f"no shared window actor named {', '.join(unknown)} (see anomalyfleet windows list)")
    for name in args.actors:
        actor = ray.get_actor(name, namespace=WINDOW_NAMESPACE)
        try:
            # Save the window first, so the new actor starts from every image it held (a snapshot
            # is otherwise taken only every window_snapshot_every images).
            ray.get(actor.save_now.remote(), timeout=60)
        except Exception as exc:  # a hung or broken actor is what a restart is for: say so, go on
            print(f"could not save {name} before stopping it ({exc}); its last snapshot stands", file=sys.stderr)
        ray.kill(actor, no_restart=True)
        print(f"stopped {name}; the next request of its line starts a new one", file=sys.stderr)
    return 0


def add_windows_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("windows", help="list or restart the shared rolling windows of a running service")
    commands = parser.add_subparsers(dest="windows_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the local cluster)")

    p = commands.add_parser("list", parents=[common], help="every shared window: fill, size, snapshot location")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each window's answer")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("restart", parents=[common],
                            help="stop window actors so their lines start new ones (new code, settings, snapshot)")
    p.add_argument("actors", nargs="+", help="actor names as `windows list` prints them")
    p.set_defaults(func=cmd_restart)


__all__ = ["add_windows_commands"]
