"""Writes the Grafana dashboards in cluster/grafana/dashboards/ (the JSON files are generated: edit here).

    python cluster/grafana/build_dashboards.py          # rewrite the JSON files
    python cluster/grafana/build_dashboards.py --check  # exit 1 if a JSON file differs from this script

Every panel reads the Prometheus data source chosen in the `datasource` variable and filters on the
`cluster` variable; per-line panels also on `line`, job panels on `job`. Series names are the ones
Ray exports (ray_ prefix): the scoring service's (anomalyfleet/serving/metrics.py), Serve's, Ray's
node metrics, and the jobs' (anomalyfleet/job_metrics.py). tests/test_monitoring_live.py evaluates
every query here against a real Prometheus scraping a running Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
C = 'cluster=~"$cluster"'
CL = 'cluster=~"$cluster", line=~"$line"'
CJ = 'cluster=~"$cluster", job=~"$job"'
RI = "$__rate_interval"


def _query_var(name: str, label: str, query: str, multi: bool = True) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2, "sort": 1, "multi": multi, "includeAll": multi, "current": {}, "options": [],
        "hide": 0, "regex": "",
    }


class Board:
    def __init__(self, uid: str, title: str, description: str, variables: list[dict], tags: list[str]):
        self.uid, self.title, self.description = uid, title, description
        self.variables, self.tags = variables, tags
        self.panels: list[dict] = []
        self._y = 0
        self._x = 0
        self._row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "id": len(self.panels) + 1, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}})
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
            self._x, self._row_h = 0, 0

    def panel(self, title: str, description: str, targets: list[tuple[str, str]], unit: str, kind: str = "timeseries",
              w: int = 12, h: int = 8, options: dict | None = None, fmt: str = "time_series", instant: bool = False,
              custom: dict | None = None, minmax: tuple[float | None, float | None] = (None, None)) -> None:
        if self._x + w > 24:
            self._newline()
        defaults: dict = {"unit": unit}
        if custom:
            defaults["custom"] = custom
        if minmax[0] is not None:
            defaults["min"] = minmax[0]
        if minmax[1] is not None:
            defaults["max"] = minmax[1]
        panel = {
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self._x, "y": self._y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options or {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                   "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                 "format": fmt, "instant": instant, "range": not instant}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        self.panels.append(panel)
        self._x += w
        self._row_h = max(self._row_h, h)

    def json(self) -> dict:
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": self.tags,
            "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "timezone": "browser", "links": [],
            "annotations": {"list": []},
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def _board(slug: str, title: str, description: str, tag: str, by: str, series: str) -> Board:
    """A board filtered on the cluster and on one more label, `by` (line or job), offering the values of
    `by` that `series` carries in the chosen cluster."""
    datasource = {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
    }
    cluster = _query_var("cluster", "Cluster", 'label_values(up{job="ray"}, cluster)', multi=False)
    narrow = _query_var(by, by.capitalize(), f"label_values({series}{{{C}}}, {by})")
    return Board(f"anomalyfleet-{slug}", f"anomalyfleet / {title}", description, [datasource, cluster, narrow],
                 ["anomalyfleet", tag])


def fleet_capacity() -> Board:
    b = _board("fleet-capacity", "Fleet capacity",
               "Is the scoring service keeping up with every line, and when will it need more replicas or GPUs.",
               "capacity", "line", "ray_anomalyfleet_requests_total")
    b.row("Traffic and latency")
    b.panel("Requests per second by line",
            "Scoring requests the gateway answered, per line (all status codes).",
            [(f"sum by (line) (rate(ray_anomalyfleet_requests_total{{{CL}}}[{RI}]))", "{{line}}")], "reqps")
    b.panel("End-to-end latency p50 / p95 / p99",
            "Gateway latency over the selected lines, from the request's arrival to its answer. The objective is "
            "95% under 500 ms (alert AnomalyfleetLatencySLOBreach).",
            [(f"histogram_quantile({q}, sum by (le) (rate(ray_anomalyfleet_request_latency_ms_bucket{{{CL}}}[{RI}])))",
              f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "ms")
    b.panel("p95 latency by line",
            "End-to-end p95 per line: one line slower than the rest points at its images (size) or its detector.",
            [(f"histogram_quantile(0.95, sum by (line, le) (rate(ray_anomalyfleet_request_latency_ms_bucket{{{CL}}}[{RI}])))",
              "{{line}}")], "ms")
    b.panel("Model time per batch, p95 by line",
            "Preprocessing and forward pass of one batch in a scorer replica. End-to-end minus this is queueing "
            "and transfer.",
            [(f"histogram_quantile(0.95, sum by (line, le) (rate(ray_anomalyfleet_model_latency_ms_bucket{{{CL}}}[{RI}])))",
              "{{line}}")], "ms")
    b.panel("Refused and failed requests by kind",
            "Per line and kind: unauthorized/forbidden (tokens), bad input, too large, unsupported type, unavailable, "
            "internal. Requests for unknown lines are counted as line _unknown.",
            [(f"sum by (line, kind) (rate(ray_anomalyfleet_errors_total{{{C}}}[{RI}]))", "{{line}} {{kind}}")], "reqps")
    b.panel("HTTP status codes",
            "All requests through Serve's HTTP proxies by status code.",
            [(f"sum by (status_code) (rate(ray_serve_num_http_requests_total{{{C}}}[{RI}]))", "{{status_code}}")], "reqps")
    b.row("Queueing and replicas")
    b.panel("Ongoing requests by deployment",
            "Requests sent to replicas and not yet answered, summed over all handles. The autoscaler aims at "
            "target_ongoing_requests per replica.",
            [(f"sum by (deployment) (ray_serve_num_ongoing_requests_at_replicas{{{C}}})", "{{deployment}}")], "short", w=8)
    b.panel("Queued requests by deployment",
            "Requests waiting in the handles for a free replica slot. Growing means arrivals exceed capacity "
            "(alert AnomalyfleetQueueGrowing).",
            [(f"sum by (deployment) (ray_serve_deployment_queued_queries{{{C}}})", "{{deployment}}")], "short", w=8)
    b.panel("Replicas: running, target, wanted",
            "Running = healthy replicas; target = the autoscaler's goal within min/max_replicas; wanted = the "
            "replicas the load asks for (requests seen by the autoscaler / target ongoing requests per "
            "replica). Wanted above target for long means max_replicas is too low (alert AnomalyfleetReplicasAtMax).",
            [(f"count by (deployment) (ray_serve_deployment_replica_healthy{{{C}}} == 1)", "{{deployment}} running"),
             (f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{C}}})", "{{deployment}} target"),
             (f"deployment:ray_serve_demand_replicas:max{{{C}}}", "{{deployment}} wanted")],
            "short", w=8)
    b.panel("Requests per model batch, mean by line",
            "How many images of a line share one forward pass (images scored / batches that held the line; "
            "Ray's exported histogram sums are rebuilt from bucket midpoints, so they are not used). Near 1 "
            "under load means batching is not helping (batch_wait_timeout_s too short or too few requests "
            "per replica).",
            [(f"sum by (line) (rate(ray_anomalyfleet_source_images_total{{{CL}}}[{RI}])) / "
              f"sum by (line) (rate(ray_anomalyfleet_batch_size_count{{{CL}}}[{RI}]))", "{{line}}")], "short")
    b.panel("Serve batch size p50 / p95",
            "Size of the batches @serve.batch formed in the scorer replicas (all lines).",
            [(f"histogram_quantile({q}, sum by (le) (rate(ray_serve_actual_batch_size_bucket{{{C}}}[{RI}])))",
              f"p{int(q * 100)}") for q in (0.5, 0.95)], "short")
    b.row("Nodes and headroom")
    b.panel("CPU use by node", "Whole-node CPU utilisation as Ray's reporter measures it.",
            [(f"max by (ip) (ray_node_cpu_utilization{{{C}}})", "{{ip}}")], "percent", w=8, minmax=(0, 100))
    b.panel("GPU use by node and GPU",
            "Utilisation of each GPU (empty on CPU-only clusters).",
            [(f"max by (ip, GpuIndex) (ray_node_gpus_utilization{{{C}}})", "{{ip}} gpu {{GpuIndex}}")],
            "percent", w=8, minmax=(0, 100))
    b.panel("Memory used by node", "Host memory (RAM) used and total per node.",
            [(f"max by (ip) (ray_node_mem_used{{{C}}})", "{{ip}} used"),
             (f"max by (ip) (ray_node_mem_total{{{C}}})", "{{ip}} total")], "bytes", w=8)
    b.panel("GPU memory used by node and GPU",
            "Share of each GPU's memory in use (empty on CPU-only clusters).",
            [(f"max by (ip, GpuIndex) (ray_node_gram_used{{{C}}}) / (max by (ip, GpuIndex) (ray_node_gram_used{{{C}}}) "
              f"+ max by (ip, GpuIndex) (ray_node_gram_available{{{C}}}))", "{{ip}} gpu {{GpuIndex}}")],
            "percentunit", w=8, minmax=(0, 1))
    b.panel("Cluster resources free",
            "Share of the cluster's schedulable CPU, GPU, memory and object store not held by actors or tasks: "
            "what new replicas or job tasks can get before the autoscaler has to add nodes.",
            [(f"sum by (Name) (ray_resources{{{C}, State=\"AVAILABLE\", Name=~\"CPU|GPU|memory|object_store_memory\"}}) / "
              f"sum by (Name) (ray_resources{{{C}, Name=~\"CPU|GPU|memory|object_store_memory\"}})", "{{Name}}")],
            "percentunit", w=8, minmax=(0, 1))
    b.panel("Serving headroom by deployment",
            "1 - ongoing / (running replicas x target ongoing per replica). Near 0 the autoscaler is adding "
            "replicas; below 0 requests queue.",
            [(f"deployment:ray_serve_capacity_headroom:ratio{{{C}}}", "{{deployment}}")], "percentunit", w=8)
    return b


def line_quality() -> Board:
    b = _board("line-quality", "Line quality",
               "Per production line: how many images are anomalous, how scores are distributed, which detector answers.",
               "quality", "line", "ray_anomalyfleet_source_images_total")
    # Every scored image, whatever scored it (the score histogram holds only the prompts' scores).
    ratio = (f"(sum by (line) (rate(ray_anomalyfleet_anomalies_total{{{CL}}}[{RI}])) "
             f"or sum by (line) (rate(ray_anomalyfleet_source_images_total{{{CL}}}[{RI}])) * 0) "
             f"/ sum by (line) (rate(ray_anomalyfleet_source_images_total{{{CL}}}[{RI}]))")
    b.row("Decisions")
    b.panel("Anomaly rate by line",
            "Share of scored images decided anomalous (score >= the line's threshold).",
            [(ratio, "{{line}}")], "percentunit", minmax=(0, 1))
    b.panel("Anomaly rate, last hour vs the day's baseline",
            "The hourly anomaly share against its average over the last day, with a band of 3 standard "
            "deviations. Leaving the band for 30 min fires AnomalyfleetAnomalyRateShift.",
            [(f"line:anomalyfleet_anomaly_ratio:rate1h{{{CL}}}", "{{line}} last hour"),
             (f"line:anomalyfleet_anomaly_ratio:baseline1d{{{CL}}}", "{{line}} baseline"),
             (f"line:anomalyfleet_anomaly_ratio:baseline1d{{{CL}}} + 3 * line:anomalyfleet_anomaly_ratio:stddev1d{{{CL}}}",
              "{{line}} baseline + 3 sd")], "percentunit")
    b.panel("Images scored per second by line",
            "Throughput of decisions per line; a line at 0 that used to send images fires AnomalyfleetLineSilent.",
            [(f"sum by (line) (rate(ray_anomalyfleet_source_images_total{{{CL}}}[{RI}]))", "{{line}}")], "suffix: img/s")
    b.panel("Anomalies per second by line", "Images decided anomalous per second.",
            [(f"sum by (line) (rate(ray_anomalyfleet_anomalies_total{{{CL}}}[{RI}]))", "{{line}}")], "suffix: img/s")
    b.row("Scores")
    b.panel("Score distribution (selected lines)",
            "Heatmap of image anomaly scores in 0.05 bins: a normal line keeps most mass well below its threshold; "
            "mass creeping up is drift before it becomes decisions.",
            [(f"sum by (le) (increase(ray_anomalyfleet_score_bucket{{{CL}}}[{RI}]))", "{{le}}")], "none",
            kind="heatmap", fmt="heatmap",
            options={"calculate": False, "yAxis": {"unit": "none", "decimals": 2},
                     "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges"}, "tooltip": {"show": True}})
    b.panel("Score quantiles by line",
            "Median and p95 image score per line.",
            [(f"histogram_quantile(0.5, sum by (line, le) (rate(ray_anomalyfleet_score_bucket{{{CL}}}[{RI}])))", "{{line}} p50"),
             (f"histogram_quantile(0.95, sum by (line, le) (rate(ray_anomalyfleet_score_bucket{{{CL}}}[{RI}])))", "{{line}} p95")],
            "none", minmax=(0, 1))
    b.panel("Calibrated score quantiles by line (line memory, rolling window)",
            "Lines scored by a line memory (memory, fused: 0 = a typical normal image, 1 = its 99th percentile) or "
            "by their rolling window (robust z-scores against recent images) are not probabilities, so they have "
            "their own histogram. Median and p95 per line and source.",
            [(f"histogram_quantile(0.5, sum by (line, source, le) (rate(ray_anomalyfleet_relative_score_bucket{{{CL}}}[{RI}])))",
              "{{line}} {{source}} p50"),
             (f"histogram_quantile(0.95, sum by (line, source, le) (rate(ray_anomalyfleet_relative_score_bucket{{{CL}}}[{RI}])))",
              "{{line}} {{source}} p95")], "none")
    b.row("Detectors")
    b.panel("Decision threshold by line",
            "The image threshold each line decides with (registry or bundle).",
            [(f"max by (line) (ray_anomalyfleet_line_threshold{{{CL}}})", "{{line}}")], "none", minmax=(0, 1))
    b.panel("Detector reloads by line",
            "A line switched to a new bundle (ok) or kept its previous one because the new one failed to load "
            "(failed). Line _registry counts registry files that could not be read.",
            [(f"sum by (line, result) (increase(ray_anomalyfleet_reloads_total{{{C}}}[{RI}]))", "{{line}} {{result}}")],
            "short")
    b.panel("Images by scoring source",
            "What scored each line's images: the bundle (prompts, memory or fused) or the line's rolling window "
            "(batch zero-shot mode). A window line scores with its bundle until its window holds min_images; "
            "window scores are z-scores, not probabilities.",
            [(f"sum by (line, source) (rate(ray_anomalyfleet_source_images_total{{{CL}}}[{RI}]))", "{{line}} {{source}}")],
            "suffix: img/s")
    b.panel("Rolling-window fill by line",
            "Images in the fullest scorer replica's rolling window of each window line (each replica keeps its own).",
            [(f"max by (line) (ray_anomalyfleet_window_images{{{CL}}})", "{{line}}")], "short")
    b.panel("Detector bundles loaded on scorer replicas",
            "Each bundle (URI) and version (manifest digest) loaded in a scorer replica, and how many replicas hold it.",
            [(f"count by (bundle, version) (label_replace(label_replace("
              f"ray_serve_registered_multiplexed_model_id{{{C}}} == 1, "
              f"\"bundle\", \"$1\", \"model_id\", \"(.*)#.*\"), \"version\", \"$1\", \"model_id\", \".*#(.*)\"))", "")],
            "short", kind="table", w=24, fmt="table", instant=True,
            options={"showHeader": True, "cellHeight": "sm", "footer": {"show": False}})
    return b


def jobs() -> Board:
    b = _board("jobs", "Jobs",
               "Synthesis, prompt training and feature-cache jobs as they report through anomalyfleet.job_metrics.",
               "jobs", "job", "ray_anomalyfleet_job_progress_ratio")
    b.row("Progress")
    b.panel("Progress by job", "Fraction of each job's work done.",
            [(f"max by (job, kind) (ray_anomalyfleet_job_progress_ratio{{{CJ}}})", "{{job}} ({{kind}})")],
            "percentunit", kind="bargauge", w=8, minmax=(0, 1), instant=True,
            options={"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
                     "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
    b.panel("Time left by job", "Estimated from the average rate so far.",
            [(f"max by (job, kind) (ray_anomalyfleet_job_eta_seconds{{{CJ}}})", "{{job}}")], "s", w=8)
    b.panel("Since last progress", "A job that is not finished and silent for 15 min fires AnomalyfleetJobStalled.",
            [(f"time() - max by (job, kind) (ray_anomalyfleet_job_last_progress_timestamp_seconds{{{CJ}}})", "{{job}}")],
            "s", w=8)
    b.row("Synthesis")
    b.panel("Synthesis images per second",
            "Images generated per second by each synthesis job (all its workers).",
            [(f"sum by (job) (rate(ray_anomalyfleet_job_images_total{{{CJ}, kind=\"synthesis\"}}[{RI}]))", "{{job}}")],
            "suffix: img/s")
    b.panel("Synthesis images so far", "Images generated by each synthesis job.",
            [(f"sum by (job) (ray_anomalyfleet_job_images_total{{{CJ}, kind=\"synthesis\"}})", "{{job}}")], "short")
    b.row("Prompt training")
    b.panel("Training loss", "Loss of the last reported step or epoch.",
            [(f"max by (job) (ray_anomalyfleet_train_loss{{{CJ}}})", "{{job}}")], "none", w=8)
    b.panel("Epoch", "Current epoch.",
            [(f"max by (job) (ray_anomalyfleet_train_epoch{{{CJ}}})", "{{job}}")], "none", w=8)
    b.panel("Training throughput", "Samples per second over all training workers.",
            [(f"sum by (job) (ray_anomalyfleet_train_samples_per_second{{{CJ}}})", "{{job}}")], "suffix: samples/s", w=8)
    b.row("Feature cache")
    b.panel("Feature-stage progress", "Progress of each stage of the frozen-backbone feature cache.",
            [(f"max by (job, stage) (ray_anomalyfleet_feature_stage_progress_ratio{{{CJ}}})", "{{job}} {{stage}}")],
            "percentunit", w=24, minmax=(0, 1))
    return b


BOARDS = {"fleet-capacity.json": fleet_capacity, "line-quality.json": line_quality, "jobs.json": jobs}


def render() -> dict[str, str]:
    return {name: json.dumps(make().json(), indent=2) + "\n" for name, make in BOARDS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run without --check): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
