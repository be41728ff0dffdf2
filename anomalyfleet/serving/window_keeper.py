"""Who holds a line's rolling window: the scorer replica itself, or one Ray actor per line.

A window kept by a replica is fast (no hop) but private: with several replicas each holds its own
sample of the line, and a replica that restarts or is scaled down loses it. A line whose window is
`shared` (`WindowSettings.shared`) is held by a named, detached Ray actor, `anomalyfleet-window-
<application>-<line>` in namespace `anomalyfleet`, that every scorer replica of the application
sends the line's patch features to. The actor scores them and adds them to the one window in the
order they arrive, so every replica sees the same window, scores do not depend on which replica took
a request, and the window outlives replica restarts, autoscaling and redeployments. The actor keeps
the code and settings it was created with until it is stopped (`anomalyfleet windows restart`): the
next request of its line then starts a new one, from its snapshot.

If the actor cannot be reached within `timeout_s` (it died, its node did, or it is still waiting for
resources), the replica scores that batch with the line's bundle and logs why; on the next batch it
asks for the actor again, and a dead actor's successor starts from the line's last snapshot when
the service has a `window_state` location (a directory on a filesystem every node sees, or an s3://
prefix; one file per line, rewritten atomically every `window_snapshot_every` images, from a
background thread). Without one, the successor starts empty and fills again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from anomalyfleet.rolling_window import RollingWindow, WindowScores
from anomalyfleet.serving.config import WindowSettings

logger = logging.getLogger("ray.serve")

ACTOR_PREFIX = "anomalyfleet-window-"
SNAPSHOT_FORMAT = 2
# What a window's scores depend on besides its features; thresholds and `shared` are not among them,
# so changing those keeps the window.
SCORING_FIELDS = ("size", "min_images", "fraction", "top_fraction")


@dataclass(frozen=True)
class WindowSpec:
    """Everything a line's window is built from.

    `features_key` names what the held features depend on (backbone, image size, DPAM depth,
    precision, block): held images carry over to a window with other scoring settings, and a
    snapshot is restored, only under the same features key. `key` adds the scoring settings (and
    smoothing): a window under another key is rebuilt.
    """

    features_key: tuple
    settings: WindowSettings
    grid: tuple[int, int]
    image_size: int
    sigma: float

    @property
    def key(self) -> tuple:
        return (self.features_key, self.sigma, tuple(getattr(self.settings, f) for f in SCORING_FIELDS))

    def build(self, device: str | torch.device) -> RollingWindow:
        s = self.settings
        return RollingWindow(s.size, self.grid, self.image_size, min_images=s.min_images, fraction=s.fraction,
                             sigma=self.sigma, top_fraction=s.top_fraction, device=device)


def key_digest(key: tuple | None) -> str:
    """A key as text that is the same in every process (its parts are strings, numbers and None)."""
    return hashlib.sha256(repr(key).encode()).hexdigest()


class WindowKeeper:
    """One line's window and the spec it was built under; as a Ray actor, the shared window.

    With `state_uri`, the held images are saved there every `snapshot_every` new images, and a new
    window under the same features key starts from that snapshot.
    """

    def __init__(self, device: str | torch.device = "cpu", torch_threads: int | None = None,
                 state_uri: str | None = None, snapshot_every: int = 8, label: str | None = None):
        self.label = label  # application and line, for `anomalyfleet windows list`
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.spec: WindowSpec | None = None
        self.window: RollingWindow | None = None
        self.state_uri = state_uri
        self.snapshot_every = max(1, int(snapshot_every))
        self._saved_at = 0
        self._lock = threading.Lock()
        self._pending: bytes | None = None  # the newest snapshot not yet written
        self._writer: threading.Thread | None = None  # set while snapshots are being written

    def window_for(self, spec: WindowSpec) -> RollingWindow:
        if self.window is not None and self.spec is not None and self.spec.key == spec.key:
            return self.window
        old, old_spec = self.window, self.spec
        self.window, self.spec = spec.build(self.device), spec
        if old is not None and old_spec is not None and old_spec.features_key == spec.features_key:
            if old.count:  # same features, other scoring settings: keep the images (newest if smaller)
                self.window.add(old.held())
        elif self.state_uri is not None:
            self._restore(spec)
        self._saved_at = self.window.added
        return self.window

    def score_then_add(self, spec: WindowSpec, patches: Tensor) -> tuple[WindowScores | Tensor | None, int]:
        """(scores, or None while the window is filling; images held before these were added).

        For a window of peers (`WindowSettings.peers`) the raw (B, P) peer scores, not calibrated
        scores: the line's bundle scores the images with them.
        """
        window = self.window_for(spec)
        held = window.count
        scored = window.peers_then_add(patches) if spec.settings.peers else window.score_then_add(patches)
        if self.state_uri is not None and window.added - self._saved_at >= self.snapshot_every:
            self.save(background=True)
        return scored, held

    def images(self) -> int:
        return 0 if self.window is None else self.window.count

    def describe(self) -> dict:
        """What an operator needs to see of a shared window (`anomalyfleet windows list`)."""
        window = self.window
        return {"label": self.label, "images": self.images(), "added": 0 if window is None else window.added,
                "size": None if window is None else window.size,
                "min_images": None if window is None else window.min_images,
                "state": self.state_uri, "snapshot_every": self.snapshot_every if self.state_uri else None,
                "saved_at": self._saved_at if self.state_uri else None}

    # --- snapshots ------------------------------------------------------------------------------
    def save(self, background: bool = False) -> bool:
        """Write the held images (oldest first) under the window's features key. In the background
        the write overlaps the next requests; snapshots asked for while one is being written
        replace each other, and the newest is written next, so the last state always lands. A
        failed write is logged, never raised, and the next one comes a whole `snapshot_every` later
        (no retry storm while storage is down). True when a snapshot was taken."""
        if self.window is None or self.spec is None or self.state_uri is None:
            return False
        buffer = io.BytesIO()
        torch.save({"format": SNAPSHOT_FORMAT, "features_key": key_digest(self.spec.features_key),
                    "added": self.window.added, "features": self.window.held().cpu()}, buffer)
        self._saved_at = self.window.added
        if not background:
            self._write(buffer.getvalue())
            return True
        with self._lock:
            self._pending = buffer.getvalue()
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, daemon=True, name="anomalyfleet-window-snapshot")
                self._writer.start()
        return True

    def _drain(self) -> None:
        while True:
            with self._lock:
                data, self._pending = self._pending, None
                if data is None:
                    self._writer = None
                    return
            self._write(data)

    def save_now(self) -> bool:
        """Write the window as it is now, after any background write still in flight (which holds
        an older state); one call, so no request slips a snapshot in between."""
        self.flush()
        return self.save()

    def flush(self) -> None:
        """Wait until every snapshot asked for is written."""
        while True:
            with self._lock:
                writer = self._writer
            if writer is None:
                return
            writer.join()

    def _write(self, data: bytes) -> None:
        from anomalyfleet import storage

        try:
            storage.write_bytes(self.state_uri, data)
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
            if state.get("format") != SNAPSHOT_FORMAT or state.get("features_key") != key_digest(spec.features_key):
                logger.info("window snapshot %s was taken with other features; starting empty", self.state_uri)
                return
            features = state["features"]
            if len(features):
                self.window.add(features)  # normalised already; adding rebuilds the distance cache
        except Exception as exc:
            self.window.reset()
            logger.warning("window snapshot %s is unreadable (starting empty): %s", self.state_uri, exc)
            return
        logger.info("window restored from %s: %d images", self.state_uri, self.window.count)


class WindowUnavailable(RuntimeError):
    """A shared window's actor could not be reached; the caller scores with the bundle instead."""


def actor_name(app: str, line: str) -> str:
    # Line names are restricted by the registry (registry.LINE_NAME), Serve application names are not.
    safe_app = "".join(c if c.isalnum() or c in "_.-" else "_" for c in app)
    return f"{ACTOR_PREFIX}{safe_app}-{line}"


class SharedWindows:
    """Handles to one application's per-line window actors, created on first use (`get_if_exists`,
    so replicas racing to create one all end up with the same actor)."""

    def __init__(self, app: str, namespace: str, num_cpus: float = 0.0, state: str | None = None,
                 snapshot_every: int = 8, timeout_s: float = 10.0):
        self.app = app
        self.namespace = namespace
        self.num_cpus = float(num_cpus)
        self.state = state  # where the lines' snapshots go (directory or s3:// prefix), if anywhere
        self.snapshot_every = snapshot_every
        self.timeout_s = timeout_s
        self._handles: dict[str, object] = {}
        self._images: dict[str, int] = {}

    def state_uri(self, line: str) -> str | None:
        from anomalyfleet import storage

        return None if self.state is None else storage.join(self.state, actor_name(self.app, line) + ".pt")

    def _handle(self, line: str):
        import ray

        handle = self._handles.get(line)
        if handle is None:
            threads = max(1, int(self.num_cpus))
            handle = ray.remote(WindowKeeper).options(
                name=actor_name(self.app, line), namespace=self.namespace, get_if_exists=True,
                lifetime="detached", num_cpus=self.num_cpus, max_concurrency=1,
            ).remote("cpu", threads, self.state_uri(line), self.snapshot_every, f"{self.app}/{line}")
            self._handles[line] = handle
        return handle

    def score_then_add(self, line: str, spec: WindowSpec, patches: Tensor) -> tuple[WindowScores | Tensor | None, int]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

        ref = None
        try:
            # Contiguous CPU float32: what the window normalises to anyway, and cheap to ship.
            payload = patches.detach().to("cpu", torch.float32).contiguous()
            ref = self._handle(line).score_then_add.remote(spec, payload)
            scored, held = ray.get(ref, timeout=self.timeout_s)
        except RayTaskError as exc:  # the actor is up but refused these features: keep the handle
            raise WindowUnavailable(f"shared window of line {line!r} failed: {exc}") from exc
        except GetTimeoutError as exc:
            # The call may still run later and add these images; cancelling a queued call avoids that.
            try:
                ray.cancel(ref)
            except Exception:
                pass
            raise WindowUnavailable(f"shared window of line {line!r} did not answer in {self.timeout_s:g} s") from exc
        except (RayActorError, RayError) as exc:
            self._handles.pop(line, None)  # dead: the next call gets (or creates) the line's actor anew
            raise WindowUnavailable(f"shared window of line {line!r} unavailable: {exc}") from exc
        self._images[line] = min(spec.settings.size, held + patches.shape[0])
        return scored, held

    def images(self, line: str) -> int | None:
        """The line's window fill as of this replica's last call (None before its first)."""
        return self._images.get(line)

    def forget(self, line: str) -> None:
        self._images.pop(line, None)


__all__ = ["SharedWindows", "WindowKeeper", "WindowSpec", "WindowUnavailable", "actor_name", "key_digest"]
