"""The app's Prometheus series, per line, recorded through Ray so they leave on Ray's metrics port.

Ray exports custom metrics with a `ray_` prefix beside Serve's own (replicas, queues, latencies),
and Serve adds `deployment`, `replica` and `application` labels. Names as scraped:

    ray_anomalyfleet_requests_total{line, endpoint, code}
    ray_anomalyfleet_errors_total{line, kind}          refused (401/403), bad input, unavailable ...
    ray_anomalyfleet_anomalies_total{line}
    ray_anomalyfleet_score_bucket{line, le}             image scores of lines scored by prompts (probabilities)
    ray_anomalyfleet_relative_score_bucket{line, source, le}   scores on a calibrated scale: line memory
                                                        (memory, fused: 0 = typical normal, 1 = its 99th
                                                        percentile) and rolling windows (robust z-scores)
    ray_anomalyfleet_request_latency_ms_bucket{line, endpoint, le}   end to end, in the gateway
    ray_anomalyfleet_model_latency_ms_bucket{line, le}  preprocessing + forward, in the replica
    ray_anomalyfleet_batch_size_bucket{line, le}        requests of the line in one model batch
    ray_anomalyfleet_reloads_total{line, result}
    ray_anomalyfleet_line_threshold{line}               the decision threshold in force
    ray_anomalyfleet_source_images_total{line, source}  images by what scored them: window, prompts, memory, fused
    ray_anomalyfleet_window_images{line}                images in a scorer replica's rolling window of the line
                                                        (one series per replica: each keeps its own window,
                                                        or reports the line's shared one)

Label values come from the registry, never from the URL: an unknown line is recorded as
`_unknown`, so a client cannot grow the series without bound.
"""

from __future__ import annotations

UNKNOWN_LINE = "_unknown"
SCORE_BUCKETS = [round(0.05 * i, 2) for i in range(1, 21)]
# Calibrated scores are unbounded: fine steps around the normal range (0..1), coarse ones beyond.
# Ray accepts only positive boundaries, so every score up to 0.1 (a typical normal image is at 0)
# shares the first bucket.
RELATIVE_SCORE_BUCKETS = [0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 20]
PROBABILITY_SOURCES = ("prompts",)
LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]


class GatewayMetrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        from anomalyfleet.held_gauges import HeldGauges, ray_lifecycle_lock

        # Ray drops a gauge ~20 s after it was last set; thresholds change only on a reload.
        self._held = HeldGauges(guard=ray_lifecycle_lock())
        self._threshold_keys: dict[str, object] = {}

        self.threshold = Gauge("anomalyfleet_line_threshold", description="Decision threshold in force, by line.",
                               tag_keys=("line",))
        self.requests = Counter("anomalyfleet_requests", description="Scoring requests by line, endpoint and HTTP status.",
                                tag_keys=("line", "endpoint", "code"))
        self.errors = Counter("anomalyfleet_errors", description="Refused or failed requests by line and kind.",
                              tag_keys=("line", "kind"))
        self.anomalies = Counter("anomalyfleet_anomalies", description="Images decided anomalous, by line.",
                                 tag_keys=("line",))
        self.scores = Histogram("anomalyfleet_score", description="Image anomaly scores by line.",
                                boundaries=SCORE_BUCKETS, tag_keys=("line",))
        self.latency = Histogram("anomalyfleet_request_latency_ms", description="End-to-end latency in the gateway (ms).",
                                 boundaries=LATENCY_BUCKETS_MS, tag_keys=("line", "endpoint"))
        self.reloads = Counter("anomalyfleet_reloads", description="Line reloads (new bundle or registry) by result.",
                               tag_keys=("line", "result"))
        self.relative_scores = Histogram(
            "anomalyfleet_relative_score",
            description="Image scores on a calibrated scale (line memory, rolling window), by line and source.",
            boundaries=RELATIVE_SCORE_BUCKETS, tag_keys=("line", "source"))
        self.sources = Counter("anomalyfleet_source_images",
                               description="Scored images by what scored them (window, prompts, memory, fused), by line.",
                               tag_keys=("line", "source"))

    def request(self, line: str, endpoint: str, code: int, latency_ms: float, images: int = 1) -> None:
        tags = {"line": line, "endpoint": endpoint}
        self.requests.inc(1, tags={**tags, "code": str(code)})
        self.latency.observe(latency_ms, tags=tags)

    def error(self, line: str, kind: str, count: int = 1) -> None:
        self.errors.inc(count, tags={"line": line, "kind": kind})

    def scored(self, line: str, score: float, anomalous: bool, source: str = "prompts") -> None:
        # Probabilities and calibrated scores in one 0..1 histogram would blur both.
        if source in PROBABILITY_SOURCES:
            self.scores.observe(score, tags={"line": line})
        else:
            self.relative_scores.observe(score, tags={"line": line, "source": source})
        self.sources.inc(1, tags={"line": line, "source": source})
        if anomalous:
            self.anomalies.inc(1, tags={"line": line})

    def thresholds(self, lines: dict) -> None:
        """The thresholds in force; a line no longer served stops being reported."""
        keys = {name: self._held.set(self.threshold, float(state.threshold), {"line": name})
                for name, state in lines.items()}
        self._held.release(key for name, key in self._threshold_keys.items() if name not in keys)
        self._threshold_keys = keys

    def reload(self, line: str, ok: bool) -> None:
        self.reloads.inc(1, tags={"line": line, "result": "ok" if ok else "failed"})


class ScorerMetrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Gauge, Histogram

        from anomalyfleet.held_gauges import HeldGauges, ray_lifecycle_lock

        # Ray drops a gauge ~20 s after it was last set: an idle line's window would vanish.
        self._held = HeldGauges(guard=ray_lifecycle_lock())

        self.window_images = Gauge("anomalyfleet_window_images",
                                   description="Images in this replica's rolling window of the line.", tag_keys=("line",))
        self.model_latency = Histogram("anomalyfleet_model_latency_ms",
                                       description="Preprocessing and model forward per batch, by line (ms).",
                                       boundaries=LATENCY_BUCKETS_MS, tag_keys=("line",))
        self.batch_size = Histogram("anomalyfleet_batch_size", description="Requests of a line in one model batch.",
                                    boundaries=BATCH_BUCKETS, tag_keys=("line",))

    def batch(self, line_counts: dict[str, int], latency_ms: float) -> None:
        for line, count in line_counts.items():
            self.batch_size.observe(count, tags={"line": line})
            self.model_latency.observe(latency_ms, tags={"line": line})

    def window(self, line: str, images: int) -> None:
        self._held.set(self.window_images, images, {"line": line})


__all__ = ["GatewayMetrics", "ScorerMetrics", "UNKNOWN_LINE"]
