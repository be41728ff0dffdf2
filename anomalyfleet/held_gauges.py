"""Gauges that keep their last value on Ray's metrics export port.

Ray exports a gauge only while it is being set: a value not set again leaves the node's /metrics
about 20 s later (measured with Ray 2.60, at the default and at a 1 s report interval; the agent
evicts gauge values that were not re-reported within two export intervals). Prometheus then sees
the series end. For a hung job that is fatal to the alert meant for it: its last-progress
timestamp disappears, so `time() - timestamp > 900` never holds. A line's threshold would likewise
vanish 20 s after the line was loaded.

`HeldGauges` remembers each series' last value and sets it again every few seconds from one daemon
thread, for as long as the process lives or until the series is released (optionally after a
grace period, so that a finished job's last values are still scraped).

That thread must never run while Ray connects or shuts down: `ray.shutdown()` destroys the core
worker that a Ray gauge (and a scope asking Ray for its node) calls into, and a call landing in
the middle of that crashes the process (a segmentation fault at the end of a test session, where
Ray's own exit hook shuts down). Each refresh pass therefore holds Ray's connect/shutdown lock
(`ray_lifecycle_lock`), and the threads are stopped at interpreter exit before Ray's exit hook runs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import ContextManager

logger = logging.getLogger(__name__)

# Well inside Ray's eviction window (about 20 s) at any report interval.
REFRESH_S = 5.0

_Key = tuple[int, tuple[tuple[str, str], ...]]

# Instances whose refresh thread runs, stopped together at interpreter exit.
_running: "weakref.WeakSet[HeldGauges]" = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def ray_lifecycle_lock() -> ContextManager:
    """The lock `ray.init()`/`ray.shutdown()` hold while they connect or tear down the core worker
    (a private attribute of Ray 2.x; a test fails if an upgrade renames it). Without Ray: a lock of
    our own, which orders nothing but costs nothing."""
    try:
        from ray._private import worker
    except ImportError:
        return threading.RLock()
    lock = getattr(worker, "_connect_or_shutdown_lock", None)
    return lock if lock is not None else threading.RLock()


def _stop_all_at_exit() -> None:
    for held in list(_running):
        held.close()


def _register_exit_hook() -> None:
    """Stop every refresh thread when the interpreter exits. Registered on the first thread start,
    after Ray was imported (its gauges exist by then), so it runs before Ray's own exit hook
    (atexit runs hooks in reverse order)."""
    global _exit_hook_registered
    with _exit_hook_lock:
        if not _exit_hook_registered:
            atexit.register(_stop_all_at_exit)
            _exit_hook_registered = True


class HeldGauges:
    """Last values of gauge series, set again every `refresh_s` seconds until released.

    A gauge is anything with `set(value, tags=...)` (`ray.util.metrics.Gauge`, `ray.serve.metrics.Gauge`).
    """

    def __init__(self, refresh_s: float = REFRESH_S, clock: Callable[[], float] = time.monotonic,
                 scope: Callable[[], object] | None = None, guard: ContextManager | None = None):
        """`scope`: what a series belongs to (e.g. the Ray session); a series set under another
        scope than the current one is dropped, not set again (a process that ends one Ray session and
        starts another must not carry the first one's jobs into it). `guard`: held around every set
        and scope evaluation (for Ray gauges, `ray_lifecycle_lock()`)."""
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be positive, got {refresh_s}")
        self.refresh_s = refresh_s
        self._clock = clock
        self._scope = scope or (lambda: None)
        self._guard = guard if guard is not None else contextlib.nullcontext()
        self._lock = threading.Lock()
        # key -> (gauge, value, tags, release time or None, scope)
        self._series: dict[_Key, tuple[object, float, dict[str, str], float | None, object]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def key(gauge: object, tags: Mapping[str, str]) -> _Key:
        return id(gauge), tuple(sorted((str(k), str(v)) for k, v in tags.items()))

    def set(self, gauge, value: float, tags: Mapping[str, str]) -> _Key:
        """Set the series now and hold it; returns its key (for `release`)."""
        tags = {str(k): str(v) for k, v in tags.items()}
        key = self.key(gauge, tags)
        # Lock order everywhere: guard, then our lock (release and close take only ours).
        with self._guard:
            scope = self._scope()
            with self._lock:  # (a refresh pass in between would set the older value again)
                gauge.set(float(value), tags=tags)
                self._series[key] = (gauge, float(value), tags, None, scope)
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(target=self._run, daemon=True, name="anomalyfleet-held-gauges")
                    _register_exit_hook()
                    _running.add(self)
                    self._thread.start()
        return key

    def release(self, keys: Iterable[_Key], after_s: float = 0.0) -> None:
        """Stop holding these series, now or `after_s` seconds from now. Their last values stay on
        the export port until Ray evicts them (about 20 s)."""
        until = self._clock() + after_s
        with self._lock:
            for key in keys:
                entry = self._series.get(key)
                if entry is None:
                    continue
                if after_s <= 0:
                    del self._series[key]
                else:
                    self._series[key] = (*entry[:3], until, entry[4])

    def held(self) -> int:
        """How many series are held."""
        with self._lock:
            return len(self._series)

    def refresh(self) -> int:
        """Set every held series again (the thread does this every `refresh_s`); drops those whose
        release time has come. Returns how many were set."""
        with self._guard:
            return self._refresh()

    def _refresh(self) -> int:
        now, scope = self._clock(), self._scope()
        with self._lock:
            expired = [k for k, (_, _, _, until, owner) in self._series.items()
                       if (until is not None and until <= now) or owner != scope]
            for key in expired:
                del self._series[key]
            current = list(self._series.values())
            for gauge, value, tags, _, _ in current:
                try:
                    gauge.set(value, tags=tags)
                except Exception as exc:  # e.g. Ray shut down under us: keep the others
                    logger.debug("could not refresh a held gauge: %s", exc)
        return len(current)

    def close(self) -> None:
        """Stop the refresh thread (the series are no longer held)."""
        self._stop.set()
        with self._lock:
            self._series.clear()
            thread, self._thread = self._thread, None
        _running.discard(self)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.refresh_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._guard:
                if self._stop.is_set():  # closed while this pass waited for the guard
                    return
                self._refresh()


__all__ = ["REFRESH_S", "HeldGauges", "ray_lifecycle_lock"]
