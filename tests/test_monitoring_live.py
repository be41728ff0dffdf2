"""The dashboards and rules against real data: a local Ray (127.0.0.1) serving two lines under a short
load, a job reporting through anomalyfleet.job_metrics, and a real Prometheus (Debian's `prometheus`)
started from cluster/prometheus/prometheus.yml, scraping every target in Ray's service-discovery file
at 1 s. Every dashboard variable must resolve, every panel query must parse and return series, and
every recording and alert rule must parse and evaluate without error (Prometheus's HTTP API).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.dashboard_exprs import substitute, targets
from tests.image_sets import write_folder_dataset
from tests.ray_serve_helpers import local_serve, make_bundle
from tests.s3server import free_port

pytestmark = pytest.mark.slow

requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "cluster" / "prometheus"
DASHBOARDS = REPO / "cluster" / "grafana" / "dashboards"
TOKEN = "monitoring-test-token"
JOB_NAME = "live-synthesis"

# Panels whose series exist only on some clusters: such a query may come back empty, but only while
# Prometheus has no series of that name at all (a GPU node, or the gateway's threshold gauge, makes
# the panel count like any other).
MAY_BE_ABSENT = {
    "ray_node_gpus_utilization": "GPU nodes only",
    "ray_node_gram_used": "GPU nodes only",
    "ray_node_gram_available": "GPU nodes only",
}
# What Grafana would put in for its built-in interval variables at a 1 s scrape interval.
BUILTINS = {"__rate_interval": "20s", "__interval": "2s", "__range": "5m"}


def _job(stop_file: str, name: str) -> None:
    """A stand-in synthesis job: progress, images, a training step and feature stages, until told to stop."""
    from anomalyfleet.job_metrics import JobMetrics

    metrics = JobMetrics(name, kind="synthesis", total=10_000)
    step = 0
    deadline = time.time() + 1200  # a backstop only: the module's fixture stops it with the stop file
    while not os.path.exists(stop_file) and time.time() < deadline:
        step += 1
        metrics.advance(images=4)
        metrics.train(epoch=step // 5, loss=1.0 / step, samples_per_second=40.0 + step)
        metrics.stage("extract", done=min(step, 20), total=20)
        metrics.stage("write", done=min(step // 2, 20), total=20)
        time.sleep(0.5)


class Prom:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> dict:
        r = requests.post(f"{self.url}/api/v1/query", data={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", f"{expr}\n-> {r.status_code} {body}"
        return body["data"]

    def names(self) -> set[str]:
        return set(requests.get(f"{self.url}/api/v1/label/__name__/values", timeout=30).json()["data"])

    def label_values(self, selector: str, label: str) -> list[str]:
        r = requests.get(f"{self.url}/api/v1/series", params={"match[]": selector, "start": time.time() - 600},
                         timeout=30)
        assert r.status_code == 200, r.text
        return sorted({s[label] for s in r.json()["data"] if label in s})


@contextmanager
def _prometheus(binary: str, work: Path, session_dir: Path, port: int) -> Iterator[tuple[Prom, subprocess.Popen]]:
    """Prometheus from the repository's config: same scrape job, relabelling and rules; only the
    intervals are shortened and the discovery file is this Ray session's."""
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    cfg["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    cfg["rule_files"] = [str(PROMETHEUS_DIR / f) for f in cfg["rule_files"]]
    (scrape,) = cfg["scrape_configs"]
    scrape["file_sd_configs"] = [{"files": [str(session_dir / "prom_metrics_service_discovery.json")],
                                  "refresh_interval": "2s"}]
    work.mkdir()
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    with open(work / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            yield Prom(f"http://127.0.0.1:{port}"), proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, openai_clip_file):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian: apt-get install -y --no-install-recommends prometheus)")
    import ray

    from anomalyfleet.serving.config import ServiceConfig

    root = tmp_path_factory.mktemp("monitoring")
    data = write_folder_dataset(root / "parts", normals=2, anomalies=2)
    make_bundle(openai_clip_file, root / "bundles" / "a", seed=1, threshold=0.99)
    make_bundle(openai_clip_file, root / "bundles" / "b", seed=2, threshold=None)
    registry = root / "registry.yaml"
    # line-b's threshold makes every image anomalous, so both decisions have series; line-a runs in
    # batch zero-shot mode once its window holds 3 images (window and scoring-source series).
    registry.write_text("version: 1\nlines:\n  line-a: {bundle: bundles/a, window: {size: 4, min_images: 3}}\n"
                        "  line-b: {bundle: bundles/b, threshold: 0.01}\n")
    config = ServiceConfig(
        registry=str(registry), registry_check_interval_s=0.5,
        min_replicas=1, max_replicas=1, num_cpus=0.5, gateway_num_cpus=0.25, gateway_max_replicas=1,
        max_batch_size=4, batch_wait_timeout_s=0.02,
        tokens=[{"name": "qa", "token": TOKEN, "lines": ["*"], "admin": True}],
    )
    http_port, metrics_port, dashboard_port, prom_port = (free_port() for _ in range(4))
    stop_file = root / "stop-job"
    load_stop = threading.Event()
    # The dashboard stays on: its process writes the service-discovery file Prometheus reads.
    with local_serve(config, http_port, metrics_port, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=dashboard_port) as base:
        session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
        images = sorted(data.glob("*/*.png"))

        def load() -> None:
            i = 0
            while not load_stop.is_set():
                line = ("line-a", "line-b")[i % 2]
                body = images[i % len(images)].read_bytes()
                try:
                    requests.post(f"{base}/v1/lines/{line}/score", data=body,
                                  headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}, timeout=30)
                    if i % 10 == 0:  # refused (no token) and unknown line: error series
                        requests.post(f"{base}/v1/lines/{line}/score", data=body, timeout=30)
                        requests.post(f"{base}/v1/lines/no-such-line/score", data=body,
                                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
                except requests.RequestException:
                    pass
                i += 1
                time.sleep(0.05)

        try:
            job_ref = ray.remote(num_cpus=0.1)(_job).remote(str(stop_file), JOB_NAME)
            for _ in range(2):
                threading.Thread(target=load, daemon=True).start()
            with _prometheus(prometheus, root / "prometheus", session_dir, prom_port) as (prom, prom_proc):
                prom_log = root / "prometheus" / "prometheus.log"
                # A republished bundle makes the gateway reload line-b (reload series).
                time.sleep(3)
                make_bundle(openai_clip_file, root / "bundles" / "b", seed=3, threshold=None)

                wanted = {
                    "up", "ray_node_cpu_utilization", "ray_serve_deployment_queued_queries",
                    "ray_anomalyfleet_requests_total", "ray_anomalyfleet_errors_total", "ray_anomalyfleet_anomalies_total",
                    "ray_anomalyfleet_score_bucket", "ray_anomalyfleet_batch_size_bucket", "ray_anomalyfleet_reloads_total",
                    "ray_anomalyfleet_job_images_total", "ray_anomalyfleet_job_eta_seconds", "ray_anomalyfleet_train_loss",
                    "ray_anomalyfleet_feature_stage_progress_ratio", "line:anomalyfleet_anomaly_ratio:baseline1d",
                    "deployment:ray_serve_capacity_headroom:ratio", "ray_anomalyfleet_window_images",
                    "ray_anomalyfleet_source_images_total", "ray_anomalyfleet_relative_score_bucket",
                }
                deadline = time.time() + 120
                names: set[str] = set()
                while time.time() < deadline:
                    assert prom_proc.poll() is None, prom_log.read_text()[-3000:]
                    try:
                        names = prom.names()
                    except requests.RequestException:
                        names = set()
                    if wanted <= names:
                        break
                    time.sleep(1)
                else:
                    pytest.fail(f"series never reached Prometheus: {sorted(wanted - names)}\n"
                                + prom_log.read_text()[-3000:])
                time.sleep(12)  # a few more scrapes under load, so every rate window holds several samples
                yield {"prom": prom, "base": base, "session_dir": session_dir, "metrics_port": metrics_port}
                stop_file.touch()
                ray.get(job_ref, timeout=30)
        finally:
            load_stop.set()
            stop_file.touch()


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))


def _regex_literal(value: str) -> str:
    """A label value as a regex inside a PromQL string, escaped as Grafana escapes multi-value variables."""
    return re.sub(r"([.+*?^$()\[\]{}|\\])", r"\\\\\1", value)


def _resolve_variables(prom: Prom, board: dict) -> dict[str, str]:
    values = dict(BUILTINS)
    for var in board["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        query = substitute(var["query"]["query"], values)
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"{board['uid']}: variable {var['name']}: unsupported query {query}"
        found = prom.label_values(match.group(1), match.group(2))
        assert found, f"{board['uid']}: variable {var['name']} resolves to nothing ({query})"
        # A single-value variable takes the first value; a multi-value one "All", as Grafana sends it.
        values[var["name"]] = found[0] if not var.get("multi") else "(" + "|".join(map(_regex_literal, found)) + ")"
    return values


def test_prometheus_scrapes_ray_through_the_service_discovery_file(stack):
    sd = json.loads((stack["session_dir"] / "prom_metrics_service_discovery.json").read_text())
    targets = {t for group in sd for t in group["targets"]}
    assert any(t.endswith(f":{stack['metrics_port']}") for t in targets), targets
    up = stack["prom"].query('up{job="ray"}')["result"]
    assert {r["metric"]["instance"] for r in up} == targets
    # The node's export port carries every series the dashboards read. (The dashboard process's own
    # small target listens on dashboard_host, 127.0.0.1 here, while the file names the node's address,
    # so it may be down in this test; on a cluster the head runs with --dashboard-host=0.0.0.0.)
    # Up in the last 30 s rather than at the last scrape: with 1 s scrape timeouts here, one slow
    # answer on a loaded machine marks a live target down for a second.
    recent = stack["prom"].query('max_over_time(up{job="ray"}[30s])')["result"]
    node = [r for r in recent if r["metric"]["instance"].endswith(f":{stack['metrics_port']}")]
    assert len(node) == 1 and node[0]["value"][1] == "1", recent
    # The relabelling added the cluster; the job's own `job` label survived the scrape (honor_labels).
    assert {r["metric"]["cluster"] for r in up} == {"anomalyfleet"}
    jobs = stack["prom"].query("ray_anomalyfleet_job_progress_ratio")["result"]
    assert {r["metric"]["job"] for r in jobs} == {JOB_NAME}
    assert not stack["prom"].query('{__name__=~".+", otel_scope_name!=""}')["result"]


@pytest.mark.parametrize("dashboard", sorted(p.name for p in DASHBOARDS.glob("*.json")))
def test_every_panel_query_returns_series(stack, dashboard):
    prom = stack["prom"]
    board = json.loads((DASHBOARDS / dashboard).read_text())
    values = _resolve_variables(prom, board)
    present = prom.names()
    empty, checked = [], 0
    for panel, target in targets(board):
        expr = substitute(target["expr"], values)
        assert "$" not in expr.replace("$1", ""), f"unresolved variable in {panel['title']}: {expr}"
        result = prom.query(expr)["result"]
        checked += 1
        if result:
            continue
        absent_ok = [m for m in _metric_names(expr) if m in MAY_BE_ABSENT and m not in present]
        if not absent_ok:
            empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
    assert checked >= len([p for p in board["panels"] if p["type"] != "row"])
    assert not empty, "panel queries without series:\n" + "\n".join(empty)


def test_every_rule_parses_and_evaluates(stack):
    prom = stack["prom"]
    exprs = []
    for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                exprs.append((rule.get("record") or rule["alert"], rule["expr"]))
    for name, expr in exprs:
        prom.query(expr)  # parses and evaluates (asserted inside)
    # Prometheus itself loaded the same rules and has been evaluating them every second.
    loaded = requests.get(f"{prom.url}/api/v1/rules", timeout=30).json()["data"]["groups"]
    rules = {r["name"]: r for g in loaded for r in g["rules"]}
    assert set(rules) == {name for name, _ in exprs}
    bad = {n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}
    assert not bad, bad
    # The recorded series the dashboards read exist for the live lines.
    for record in ("line:anomalyfleet_request_latency_ms:p95_5m", "line:anomalyfleet_anomaly_ratio:rate1h",
                   "deployment:ray_serve_running_replicas:count", "node:ray_cpu_utilization:ratio",
                   "job:anomalyfleet_job_progress:max"):
        assert prom.query(record)["result"], record
    # Nothing is on fire in a healthy, freshly started stack.
    # Except the dashboard's own target, which may be down here (see the scrape test) and fires
    # once the module has run for 5 minutes.
    node = f":{stack['metrics_port']}"
    firing = [a for a in requests.get(f"{prom.url}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
              if a["state"] == "firing" and not (a["labels"]["alertname"] == "AnomalyfleetRayTargetDown"
                                                 and not a["labels"].get("instance", "").endswith(node))]
    assert not firing, firing
