"""Progress of long jobs (synthesis, prompt training, feature caching, bulk scoring) as Prometheus series.

A job process (a Ray job's driver, or a task or actor inside it) records through `ray.util.metrics`, so
the values leave on the node's Ray metrics export port beside Ray's and the Serve app's own series and
reach the *Jobs* dashboard and the `AnomalyfleetJobStalled` alert without another exporter. Ray prefixes
every custom metric with `ray_`; names as scraped (label `job` is the job's name, `kind` what it does):

    ray_anomalyfleet_job_images_total{job, kind}                 images produced or processed
    ray_anomalyfleet_job_progress_ratio{job, kind}               0..1
    ray_anomalyfleet_job_eta_seconds{job, kind}                  time left, from the rate so far
    ray_anomalyfleet_job_last_progress_timestamp_seconds{job, kind}   unix time of the last advance
    ray_anomalyfleet_train_loss{job}
    ray_anomalyfleet_train_epoch{job}
    ray_anomalyfleet_train_samples_per_second{job}
    ray_anomalyfleet_feature_stage_progress_ratio{job, stage}    per stage of the feature cache

The Prometheus configuration in cluster/prometheus keeps the exported `job` label (honor_labels), so
the series carry the job's name, not the scrape job's.

    metrics = JobMetrics("synth-2026-06-line-a", kind="synthesis", total=4000)
    for shard in shards:
        ...
        metrics.advance(done=generated, images=len(shard))
    metrics.finish()

Ray must be initialised in the process before the first record (a job's driver or any Ray worker is).

Ray drops a gauge from the export port about 20 s after it was last set, so the gauges here are held
(`held_gauges`): set again every few seconds while the job runs, which keeps a hung job's last
progress time visible to the stall alert. `finish()` holds the final values for `FINISHED_HOLD_S`
more, for the dashboards to scrape, then lets them go; `close()` lets a job's series go at once (a
failed job is not stalled), and leaving a `with JobMetrics(...)` block closes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from anomalyfleet.held_gauges import HeldGauges, ray_lifecycle_lock

KINDS = ("synthesis", "training", "features", "scoring")
# How long a finished job's final values stay on the export port: a few scrapes at 15 s.
FINISHED_HOLD_S = 120.0

_lock = threading.Lock()
_instruments: dict[str, object] | None = None
_held: HeldGauges | None = None


def _ray_session() -> str | None:
    """This process's Ray node (a new one per local `ray.init`), or None without Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _held_gauges() -> HeldGauges:
    """The process's held gauges (one refresh thread per process), scoped to its Ray session."""
    global _held
    with _lock:
        if _held is None:
            _held = HeldGauges(scope=_ray_session, guard=ray_lifecycle_lock())
        return _held


def _metrics() -> dict[str, object]:
    """The process's instruments, created once (Ray keeps one registration per name and process)."""
    global _instruments
    with _lock:
        if _instruments is None:
            from ray.util.metrics import Counter, Gauge

            job = ("job", "kind")
            _instruments = {
                "images": Counter("anomalyfleet_job_images", description="Images produced or processed by a job.",
                                  tag_keys=job),
                "progress": Gauge("anomalyfleet_job_progress_ratio", description="Fraction of a job's work done (0..1).",
                                  tag_keys=job),
                "eta": Gauge("anomalyfleet_job_eta_seconds", description="Estimated seconds until a job finishes.",
                             tag_keys=job),
                "heartbeat": Gauge("anomalyfleet_job_last_progress_timestamp_seconds",
                                   description="Unix time of a job's last progress.", tag_keys=job),
                "loss": Gauge("anomalyfleet_train_loss", description="Prompt-training loss (last epoch or step).",
                              tag_keys=("job",)),
                "epoch": Gauge("anomalyfleet_train_epoch", description="Prompt-training epoch (current).",
                               tag_keys=("job",)),
                "throughput": Gauge("anomalyfleet_train_samples_per_second",
                                    description="Prompt-training throughput, samples per second.", tag_keys=("job",)),
                "stage": Gauge("anomalyfleet_feature_stage_progress_ratio",
                               description="Feature-cache progress per stage (0..1).", tag_keys=("job", "stage")),
            }
        return _instruments


def estimate_eta(done: float, total: float, elapsed_s: float) -> float | None:
    """Seconds left at the average rate so far; None before any progress or without a total."""
    if total <= 0 or done <= 0 or elapsed_s <= 0:
        return None
    if done >= total:
        return 0.0
    return elapsed_s * (total - done) / done


class JobMetrics:
    """Records one job's progress; cheap to call after every shard, batch or epoch."""

    def __init__(self, job: str, kind: str, total: float | None = None, clock: Callable[[], float] = time.time):
        if not job:
            raise ValueError("a job needs a name (the `job` label)")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.job, self.kind, self.total = job, kind, total
        self._clock = clock
        self._started = clock()
        self._done = 0.0
        self._tags = {"job": job, "kind": kind}
        self._m = _metrics()
        self._held = _held_gauges()
        self._keys: set = set()
        self._finished = False
        self._set("progress", 0.0, self._tags)
        self._beat()

    def __enter__(self) -> "JobMetrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _set(self, name: str, value: float, tags: dict) -> None:
        self._keys.add(self._held.set(self._m[name], value, tags))

    @property
    def done(self) -> float:
        return self._done

    def _beat(self) -> None:
        self._set("heartbeat", self._clock(), self._tags)

    def advance(self, done: float | None = None, images: int = 0, total: float | None = None) -> None:
        """Report progress: `done` units of `total` so far (absolute), and `images` new images since the last call."""
        if total is not None:
            self.total = total
        if done is not None:
            self._done = float(done)
        elif images:
            self._done += images
        if images:
            self._m["images"].inc(images, tags=self._tags)
        if self.total:
            self._set("progress", min(1.0, self._done / self.total), self._tags)
            eta = estimate_eta(self._done, self.total, self._clock() - self._started)
            if eta is not None:
                self._set("eta", eta, self._tags)
        self._beat()

    def train(self, epoch: int, loss: float, samples_per_second: float | None = None) -> None:
        """Report a training epoch (or step); also counts as progress for the stall alert."""
        self._set("epoch", float(epoch), {"job": self.job})
        self._set("loss", float(loss), {"job": self.job})
        if samples_per_second is not None:
            self._set("throughput", float(samples_per_second), {"job": self.job})
        self._beat()

    def stage(self, stage: str, done: float, total: float) -> None:
        """Report a feature-cache stage (e.g. `extract`, `write`), `done` of `total` items."""
        ratio = 1.0 if total <= 0 else min(1.0, max(0.0, done / total))
        self._set("stage", ratio, {"job": self.job, "stage": stage})
        self._beat()

    def finish(self) -> None:
        """Mark the job complete: progress 1, ETA 0 (a finished job is never reported as stalled)."""
        if self.total:
            self._done = max(self._done, float(self.total))
        self._set("progress", 1.0, self._tags)
        self._set("eta", 0.0, self._tags)
        self._beat()
        self._finished = True
        self._held.release(self._keys, after_s=FINISHED_HOLD_S)

    def close(self) -> None:
        """Stop holding this job's series (a finished job's go after their grace period)."""
        if not self._finished:
            self._held.release(self._keys)


__all__ = ["FINISHED_HOLD_S", "JobMetrics", "KINDS", "estimate_eta"]
