"""Who holds a line's rolling window: the scorer replica itself, or one Ray actor per line.

A window kept by a replica is fast (no hop) but private: with several replicas each holds its own
sample of the line, and a replica that restarts or is scaled down loses it. A line whose window is
`shared` (`WindowSettings.shared`) is held by a named, detached Ray actor, `anomalyfleet-window-
<line>`, that every scorer replica sends the line's patch features to. The actor scores them and
adds them to the one window in the order they arrive, so every replica sees the same window,
scores do not depend on which replica took a request, and the window outlives replica restarts,
autoscaling and redeployments of the application (not a restart of the Ray cluster).

If the actor cannot be reached (it died, or its node did), the replica scores that batch with the
line's bundle, logs why, and asks for the actor again on the next batch. A fresh actor starts from
the line's last snapshot when the service has a `window_state` location (a directory or an s3://
prefix; one file per line, rewritten atomically every `window_snapshot_every` images), so the window
survives the actor and even the Ray cluster; without one it starts empty and fills again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from anomalyfleet.rolling_window import RollingWindow, WindowScores
from anomalyfleet.serving.config import WindowSettings

logger = logging.getLogger("ray.serve")

ACTOR_PREFIX = "anomalyfleet-window-"
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class WindowSpec:
    """Everything a line's window is built from. `key` names what its features depend on
    (backbone, image size, DPAM depth, precision, smoothing, block, settings): a window built
    under another key is started afresh."""

    key: tuple
    settings: WindowSettings
    grid: tuple[int, int]
    image_size: int
    sigma: float

    def build(self, device: str | torch.device) -> RollingWindow:
        s = self.settings
        return RollingWindow(s.size, self.grid, self.image_size, min_images=s.min_images, fraction=s.fraction,
                             sigma=self.sigma, top_fraction=s.top_fraction, device=device)


class WindowKeeper:
    """One line's window and the key it was built under; as a Ray actor, the shared window.

    With `state_uri`, the held images are saved there every `snapshot_every` new images, and a
    window built under the same key starts from that snapshot.
    """

    def __init__(self, device: str | torch.device = "cpu", torch_threads: int | None = None,
                 state_uri: str | None = None, snapshot_every: int = 8):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.key: tuple | None = None
        self.window: RollingWindow | None = None
        self.state_uri = state_uri
        self.snapshot_every = max(1, int(snapshot_every))
        self._saved_at = 0

    def window_for(self, spec: WindowSpec) -> RollingWindow:
        if self.window is None or self.key != spec.key:
            self.window, self.key = spec.build(self.device), spec.key
            self._saved_at = 0
            if self.state_uri is not None:
                self._restore(spec)
        return self.window

    def score_then_add(self, spec: WindowSpec, patches: Tensor) -> tuple[WindowScores | None, int]:
        """(scores, or None while the window is filling; images held before these were added)."""
        window = self.window_for(spec)
        held = window.count
        scored = window.score_then_add(patches)
        if self.state_uri is not None and window.added - self._saved_at >= self.snapshot_every:
            self.save()
        return scored, held

    def images(self) -> int:
        return 0 if self.window is None else self.window.count

    # --- snapshots ------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the held images (oldest first) under the window's key; a failed write is logged,
        never raised: scoring goes on, and the next snapshot tries again."""
        from anomalyfleet import storage

        if self.window is None or self.state_uri is None:
            return
        buffer = io.BytesIO()
        torch.save({"format": SNAPSHOT_FORMAT, "key": key_digest(self.key), "added": self.window.added,
                    "features": self.window.held().cpu()}, buffer)
        try:
            storage.write_bytes(self.state_uri, buffer.getvalue())
            self._saved_at = self.window.added
        except Exception as exc:  # storage down, credentials: keep serving from memory
            logger.warning("could not save the window snapshot %s: %s", self.state_uri, exc)

    def _restore(self, spec: WindowSpec) -> None:
        from anomalyfleet import storage

        assert self.window is not None and self.state_uri is not None
        try:
            data = storage.read_bytes(self.state_uri)
        except storage.ObjectNotFound:
            return
        except Exception as exc:
            logger.warning("could not read the window snapshot %s (starting empty): %s", self.state_uri, exc)
            return
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            usable = state.get("format") == SNAPSHOT_FORMAT and state.get("key") == key_digest(spec.key)
            features = state["features"] if usable else None
        except Exception as exc:
            logger.warning("window snapshot %s is unreadable (starting empty): %s", self.state_uri, exc)
            return
        if features is None:
            logger.info("window snapshot %s was taken under other settings; starting empty", self.state_uri)
            return
        if len(features):
            self.window.add(features)  # normalised already; adding rebuilds the distance cache
        self._saved_at = self.window.added


def key_digest(key: tuple | None) -> str:
    """A window key as text that stays the same across processes (the key's parts are plain values
    and pydantic settings, whose reprs are deterministic)."""
    return hashlib.sha256(repr(key).encode()).hexdigest()


class WindowUnavailable(RuntimeError):
    """A shared window's actor could not be reached; the caller scores with the bundle instead."""


def actor_name(line: str) -> str:
    # Registry line names are free text; actor names are kept to a safe alphabet.
    return ACTOR_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", line)


class SharedWindows:
    """Handles to the per-line window actors, created on first use (`get_if_exists`, so replicas
    racing to create one all end up with the same actor)."""

    def __init__(self, num_cpus: float = 0.0, namespace: str | None = None, state: str | None = None,
                 snapshot_every: int = 8):
        self.num_cpus = float(num_cpus)
        self.namespace = namespace
        self.state = state  # where the lines' snapshots go (directory or s3:// prefix), if anywhere
        self.snapshot_every = snapshot_every
        self._handles: dict[str, object] = {}
        self._images: dict[str, int] = {}

    def _handle(self, line: str):
        import ray

        handle = self._handles.get(line)
        if handle is None:
            threads = max(1, int(self.num_cpus)) if self.num_cpus >= 1 else 1
            handle = ray.remote(WindowKeeper).options(
                name=actor_name(line), namespace=self.namespace, get_if_exists=True, lifetime="detached",
                num_cpus=self.num_cpus, max_concurrency=1,
            ).remote("cpu", threads, self.state_uri(line), self.snapshot_every)
            self._handles[line] = handle
        return handle

    def state_uri(self, line: str) -> str | None:
        from anomalyfleet import storage

        return None if self.state is None else storage.join(self.state, actor_name(line) + ".pt")

    def score_then_add(self, line: str, spec: WindowSpec, patches: Tensor) -> tuple[WindowScores | None, int]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            # Contiguous CPU float32: what the window normalises to anyway, and cheap to ship.
            payload = patches.detach().to("cpu", torch.float32).contiguous()
            scored, held = ray.get(self._handle(line).score_then_add.remote(spec, payload))
        except (RayActorError, RayTaskError) as exc:
            self._handles.pop(line, None)
            raise WindowUnavailable(f"shared window of line {line!r} unavailable: {exc}") from exc
        self._images[line] = min(spec.settings.size, held + patches.shape[0])
        return scored, held

    def images(self, line: str) -> int | None:
        """The line's window fill as of this replica's last call (None before its first)."""
        return self._images.get(line)


__all__ = ["SharedWindows", "WindowKeeper", "WindowSpec", "WindowUnavailable", "actor_name", "key_digest"]
