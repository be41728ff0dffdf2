"""The node-local cache directory and a cross-process lock for filling it."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "ANOMALYFLEET_CACHE"


def cache_dir(kind: str) -> Path:
    """`$ANOMALYFLEET_CACHE/<kind>` (default `~/.cache/anomalyfleet/<kind>`), created on demand."""
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "anomalyfleet")
    path = Path(base).expanduser() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(lock_path: Path):
    """An exclusive flock: held by one process (Ray worker, Serve replica) of this node at a time.

    The kernel drops the lock when its holder dies, so a killed filler never blocks the others.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
