"""The monitoring and deployment files under cluster/ and ray-cluster.yaml, checked without a cluster:
dashboard structure, PromQL that parses, rules that pass promtool's unit tests, the launcher config
against Ray's own schema, and the KubeRay manifests against KubeRay's CRD schemas."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.dashboard_exprs import substitute, targets, variables_used

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PROMETHEUS_DIR = CLUSTER / "prometheus"
GRAFANA = CLUSTER / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
KUBERAY = CLUSTER / "kuberay"
CRDS = KUBERAY / "crds"
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob-train.yaml": "RayJob",
             "rayjob-synthesis.yaml": "RayJob", "rayservice.yaml": "RayService"}
METRICS_PORT = "8080"
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
# Panels may read these before the code exports them; test_monitoring_live.py lets them be empty
# only while no such series exists.
PENDING_METRICS: set[str] = set()


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y --no-install-recommends prometheus)")
    return path


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _selectors(expr: str) -> list[tuple[str, str]]:
    return re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr)


def _app_metric_names() -> set[str]:
    """Series names the code records (Ray adds `ray_`, counters `_total`, histograms their suffixes)."""
    names = set()
    for path in (REPO / "anomalyfleet" / "serving" / "metrics.py", REPO / "anomalyfleet" / "job_metrics.py"):
        for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(\w+)\"", path.read_text()):
            base = "ray_" + name
            if kind == "Counter":
                names.add(base + "_total")
            elif kind == "Histogram":
                names |= {base + "_bucket", base + "_sum", base + "_count"}
            else:
                names.add(base)
    return names


def _recorded_names() -> set[str]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "rules" / "recording.yml").read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"]}


# --- Grafana ------------------------------------------------------------------------------------------

def test_dashboard_json_is_what_the_builder_writes():
    rendered = _load_builder().render()
    assert sorted(rendered) == [p.name for p in DASHBOARDS] == ["fleet-capacity.json", "jobs.json", "line-quality.json"]
    for path in DASHBOARDS:
        assert path.read_text() == rendered[path.name], f"{path.name} is stale: run cluster/grafana/build_dashboards.py"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path):
    board = json.loads(path.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = board["templating"]["list"]
    names = [v["name"] for v in variables]
    assert names[:2] == ["datasource", "cluster"] and len(names) == len(set(names))
    assert variables[0]["type"] == "datasource" and variables[0]["query"] == "prometheus"
    assert ("line" in names) != ("job" in names), "a per-line or a per-job board"
    # Each variable's query uses only variables defined before it, and reads through the data source.
    for i, var in enumerate(variables[1:], start=1):
        assert var["type"] == "query" and var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert var["query"]["query"] == var["definition"]
        assert re.fullmatch(r"label_values\(.+, \w+\)", var["definition"]), var["definition"]
        assert variables_used(var["definition"]) <= set(names[1:i]), var["name"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 6
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        covered = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel.get("description"), title
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert isinstance(unit, str) and unit, f"{title}: no unit"
        assert panel["targets"], f"{title}: no targets"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), title
            used = variables_used(target["expr"]) - GRAFANA_BUILTINS
            assert used <= set(names), f"{title}: undefined variables {used - set(names)}"
            for metric, matchers in _selectors(target["expr"]):
                assert 'cluster=~"$cluster"' in matchers, f"{title}: {metric} not filtered by cluster"


def test_dashboards_read_only_series_that_exist():
    known = _app_metric_names() | _recorded_names() | PENDING_METRICS
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel, target in targets(board):
            for metric, _ in _selectors(target["expr"]):
                if metric.startswith("ray_anomalyfleet_") or ":" in metric:
                    assert metric in known, f"{path.name} / {panel['title']}: unknown series {metric}"
    # The jobs board reads every job series the library exports.
    jobs = (GRAFANA / "dashboards" / "jobs.json").read_text()
    for name in ("images_total", "progress_ratio", "eta_seconds", "last_progress_timestamp_seconds"):
        assert f"ray_anomalyfleet_job_{name}" in jobs
    for name in ("train_loss", "train_epoch", "train_samples_per_second", "feature_stage_progress_ratio"):
        assert f"ray_anomalyfleet_{name}" in jobs


def test_every_panel_query_parses(tmp_path):
    """promtool parses each query (variables filled in as Grafana would) as a recording rule."""
    promtool = _promtool()
    values = {"cluster": "c1", "line": "(line-a|line-b)", "job": "(synth-a)", "datasource": "x",
              "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
    rules = []
    for path in DASHBOARDS:
        for i, (_, target) in enumerate(targets(json.loads(path.read_text()))):
            rules.append({"record": f"panel:{path.stem.replace('-', '_')}:{i}",
                          "expr": substitute(target["expr"], values)})
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(tmp_path / "panels.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout


def test_grafana_provisioning():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert ds["apiVersion"] == 1 and source["type"] == "prometheus" and source["url"] and source["uid"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "anomalyfleet.yml").read_text())
    (provider,) = prov["providers"]
    assert prov["apiVersion"] == 1 and provider["type"] == "file" and provider["options"]["path"]


# --- Prometheus ---------------------------------------------------------------------------------------

def test_prometheus_config_and_rules_check(tmp_path):
    promtool = _promtool()
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "rules", *map(str, sorted((PROMETHEUS_DIR / "rules").glob("*.yml")))],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (scrape,) = config["scrape_configs"]
    files = scrape["file_sd_configs"][0]["files"]
    assert any(f.endswith("session_latest/prom_metrics_service_discovery.json") for f in files)
    assert scrape["honor_labels"] is True  # jobs' `job` label


def test_alerts_cover_the_issue_and_have_runbook_text():
    doc = yaml.safe_load((PROMETHEUS_DIR / "rules" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert {"AnomalyfleetLatencySLOBreach", "AnomalyfleetQueueGrowing", "AnomalyfleetErrorRate",
            "AnomalyfleetReplicasAtMax", "AnomalyfleetAnomalyRateShift", "AnomalyfleetLineSilent",
            "AnomalyfleetJobStalled"} <= set(alerts)
    readme = (CLUSTER / "README.md").read_text()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "warning"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert name in readme, f"{name}: no runbook entry in cluster/README.md"
    tested = (PROMETHEUS_DIR / "tests" / "alerts_test.yml").read_text()
    for name in alerts:
        assert f"alertname: {name}" in tested, f"{name} has no promtool unit test"


def test_promtool_unit_tests():
    promtool = _promtool()
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert len(tests) >= 2
    out = subprocess.run([promtool, "test", "rules", *map(str, tests)], capture_output=True, text=True,
                         cwd=PROMETHEUS_DIR / "tests", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAILED" not in out.stdout


# --- ray-cluster.yaml ---------------------------------------------------------------------------------

def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _launcher() -> dict:
    return yaml.safe_load((REPO / "ray-cluster.yaml").read_text())


def test_ray_cluster_yaml_matches_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    jsonschema.validate(config, _ray_schema())
    # What `ray up` does before touching a cloud: fill defaults, merge commands, validate again.
    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    gpu = [name for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu and head not in gpu
    workers = [t for name, t in types.items() if name != head]
    assert all(0 <= t["min_workers"] <= t["max_workers"] for t in workers)
    assert sum(t["min_workers"] for t in workers) <= config["max_workers"]
    assert all(t["max_workers"] <= config["max_workers"] for t in workers)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1 and f"--metrics-export-port={METRICS_PORT}" in starts[0], key
    assert "--head" in " ".join(config["head_start_ray_commands"])
    (remote, local), = config["file_mounts"].items()
    assert local == "."
    assert any("pip install" in c and remote in c for c in config["setup_commands"]), "project not installed"
    assert any("prometheus" in c for c in config["head_setup_commands"])


def test_launcher_nodes_import_the_checkout_reach_s3_and_serve_on_every_interface(tmp_path):
    config = _launcher()
    (remote, _), = config["file_mounts"].items()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        # Serve replicas and job workers import `serving` / `jobs` from the checkout.
        assert f"cd {remote};" in start and "export PYTHONPATH=$HOME/anomalyfleet;" in start, key
        assert start.index("cd ") < start.index("ray start")
    for name, node in config["available_node_types"].items():
        if name != config["head_node_type"]:  # the launcher gives only the head a profile
            assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    # The cluster's Serve config is the repository's, made by the setup command, with the proxies
    # listening on every interface instead of 127.0.0.1.
    (command,) = [c for c in config["head_setup_commands"] if "serve-cluster.yaml" in c]
    command = command.replace("~/anomalyfleet", str(REPO)).replace("~/serve-cluster.yaml", str(tmp_path / "s.yaml"))
    subprocess.run(["bash", "-c", command], check=True)
    original = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    cluster = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert original["http_options"]["host"] == "127.0.0.1" and cluster["http_options"]["host"] == "0.0.0.0"
    cluster["http_options"]["host"] = "127.0.0.1"
    assert cluster == original
    assert any("PrivateTmp=false" in c for c in config["head_setup_commands"])  # Prometheus reads /tmp/ray


def test_ray_schema_rejects_a_broken_launcher_config():
    schema = _ray_schema()
    config = _launcher()
    for mutate in (lambda c: c.pop("provider"),
                   lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1),
                   lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
                   lambda c: c.update(max_workers="many")):
        broken = copy.deepcopy(config)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


# --- KubeRay ------------------------------------------------------------------------------------------

def _strict(node):
    """Unknown fields are errors (kubectl's strict field validation), except where the CRD allows them."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _crd(kind: str) -> dict:
    doc = json.loads((CRDS / f"{kind.lower()}.v1.schema.json").read_text())
    assert doc["kind"] == kind and doc["group"] == "ray.io" and doc["version"] == "v1"
    return _strict(doc["openAPIV3Schema"])


def _manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


def _gpu_groups(cluster_spec: dict) -> list[dict]:
    return [g for g in cluster_spec["workerGroupSpecs"]
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]


def test_crd_copies_are_documented():
    readme = (CRDS / "README.md").read_text()
    assert "ray-project/kuberay" in readme and "v1.7.0" in readme
    for kind in ("RayCluster", "RayJob", "RayService"):
        assert (CRDS / f"{kind.lower()}.v1.schema.json").exists()


def test_crd_trimming_drops_doc_texts_but_keeps_a_field_named_description():
    spec = importlib.util.spec_from_file_location("trim_crds", CRDS / "trim_crds.py")
    trim_crds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trim_crds)
    crd = {"metadata": {"name": "things.example.io"}, "spec": {"group": "example.io", "names": {"kind": "Thing"},
           "versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
               "type": "object", "description": "a thing",
               "properties": {
                   "spec": {"type": "object", "description": "its spec", "required": ["description"],
                            "properties": {"description": {"type": "string", "description": "a field", "maxLength": 9}}},
                   "status": {"type": "object"}}}}}]}}
    trimmed = trim_crds.trim(crd)["openAPIV3Schema"]
    assert trimmed == {"type": "object", "properties": {"spec": {
        "type": "object", "required": ["description"], "properties": {"description": {"type": "string", "maxLength": 9}}}}}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_matches_the_crd(name):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == MANIFESTS[name]
    errors = sorted(jsonschema.Draft7Validator(_crd(doc["kind"])).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message[:200]}" for e in errors)


def test_crd_schemas_reject_broken_manifests():
    doc = _manifest("raycluster.yaml")
    schema = _crd("RayCluster")
    for mutate in (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=3),           # typo
                   lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),          # type
                   lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update(port=6379),  # must be a string
                   lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),               # required
                   lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=1)):
        broken = copy.deepcopy(doc)
        mutate(broken)
        assert list(jsonschema.Draft7Validator(schema).iter_errors(broken)), mutate


def test_kuberay_manifests_agree_with_the_launcher_config():
    import ray

    launcher = _launcher()
    launcher_gpu_max = max(t["max_workers"] for t in launcher["available_node_types"].values()
                           if t["resources"].get("GPU", 0) > 0)
    for name in MANIFESTS:
        spec = _cluster_spec(_manifest(name))
        assert spec["rayVersion"] == ray.__version__, name
        head = spec["headGroupSpec"]
        groups = [head, *spec["workerGroupSpecs"]]
        assert all(g["rayStartParams"].get("metrics-export-port") == METRICS_PORT for g in groups), name
        assert head["rayStartParams"].get("num-cpus") == "0", name  # as the launcher's head: {"CPU": 0}
        for group in groups:
            containers = group["template"]["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in containers[0]["ports"]}
            assert ports.get("metrics") == int(METRICS_PORT), name
        gpu_groups = _gpu_groups(spec)
        assert gpu_groups and all(g["maxReplicas"] <= launcher_gpu_max for g in gpu_groups), name
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}


def _job_argv(entrypoint: str, module: str) -> list[str]:
    command = entrypoint.split("&&")[-1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", module], entrypoint
    return argv[3:]


def test_rayjob_entrypoints_parse_with_the_jobs_own_arguments():
    train = _manifest("rayjob-train.yaml")["spec"]
    synth = _manifest("rayjob-synthesis.yaml")["spec"]
    for spec in (train, synth):
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert _job_argv(synth["entrypoint"], "jobs.synthesize_library") == ["recipe.yaml"]
    train_argv = _job_argv(train["entrypoint"], "jobs.train_prompts")
    if not (REPO / "jobs" / "train_prompts.py").exists():
        pytest.skip("jobs/train_prompts.py not in this checkout")
    from jobs.train_prompts import build_parser

    args = build_parser().parse_args(train_argv)
    # Ray Train's workers fit the GPU group the job brings up.
    assert args.workers * args.gpus_per_worker <= sum(g["maxReplicas"] for g in _gpu_groups(train["rayClusterSpec"]))
    assert args.storage_path and args.out


def test_rayservice_serve_config_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = _manifest("rayservice.yaml")["spec"]
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "serving.app:app"
    assert serve_config.http_options.host == "0.0.0.0"  # reachable from the Kubernetes Service
    local = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    (local_app,) = local["applications"]
    assert app.import_path == local_app["import_path"] and app.name == local_app["name"]
    assert {d.name for d in app.deployments} == {d["name"] for d in local_app["deployments"]}


# --- job metrics ----------------------------------------------------------------------------------------

def test_eta_estimate():
    from anomalyfleet.job_metrics import KINDS, JobMetrics, estimate_eta

    assert estimate_eta(0, 100, 10) is None and estimate_eta(5, 0, 10) is None
    assert estimate_eta(25, 100, 10) == pytest.approx(30.0)
    assert estimate_eta(100, 100, 50) == 0.0 and estimate_eta(120, 100, 50) == 0.0
    assert "synthesis" in KINDS and "training" in KINDS
    with pytest.raises(ValueError):
        JobMetrics("j", kind="cooking")
    with pytest.raises(ValueError):
        JobMetrics("", kind="synthesis")


def test_cluster_readme_lists_every_panel():
    readme = (CLUSTER / "README.md").read_text()
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                assert panel["title"] in readme, f"{path.name}: panel '{panel['title']}' not explained in cluster/README.md"
