"""Distributed training publishes its progress (loss, epoch, throughput, feature stage) on Ray's
metrics port, where the Jobs dashboard reads it."""

from __future__ import annotations

import os
import time

import pytest
import requests

from tests.image_sets import write_folder_dataset
from tests.s3server import free_port

pytestmark = pytest.mark.slow


def test_training_exports_job_metrics(tmp_path, openai_clip_file):
    import ray

    from anomalyfleet.distributed import DistributedTrainConfig, train_distributed

    data = write_folder_dataset(tmp_path / "d", normals=4, anomalies=4)
    port = free_port()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000}, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    try:
        config = DistributedTrainConfig(
            data=(f"folder:{data}",), output=str(tmp_path / "bundle"), backbone=f"openai:{openai_clip_file}",
            image_size=56, layers=(6,), dpam_layers=4, epochs=2, batch_size=4, workers=1,
            storage_path=str(tmp_path / "runs"), name="metrics-run", progress=False)
        result = train_distributed(config)
        wanted = {"ray_anomalyfleet_train_loss", "ray_anomalyfleet_train_epoch",
                  "ray_anomalyfleet_train_samples_per_second", "ray_anomalyfleet_feature_stage_progress_ratio"}
        found: dict[str, float] = {}

        def final(values: dict[str, float]) -> bool:
            # The workers push their last values shortly before they exit: wait for those, not for
            # the first value of each metric.
            return set(values) == wanted and values["ray_anomalyfleet_train_epoch"] == 2 \
                and values["ray_anomalyfleet_feature_stage_progress_ratio"] == 1.0

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not final(found):
            for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
                name = line.split("{", 1)[0]
                if name in wanted and 'job="metrics-run"' in line:
                    found[name] = float(line.rsplit(" ", 1)[1])
            time.sleep(1)
        assert set(found) == wanted, sorted(wanted - set(found))
        assert found["ray_anomalyfleet_train_epoch"] == 2
        assert found["ray_anomalyfleet_train_loss"] == pytest.approx(result.history[-1]["loss"], rel=1e-6)
        assert found["ray_anomalyfleet_feature_stage_progress_ratio"] == 1.0
    finally:
        ray.shutdown()


def _series(port: int, name: str) -> dict[str, float]:
    """job label -> value of one metric on the node's export port."""
    found = {}
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.split("{", 1)[0] == name and 'job="' in line:
            found[line.split('job="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return found


def test_a_hung_job_keeps_its_last_progress_time_on_the_export_port():
    """Ray drops a gauge ~20 s after it was last set; the stall alert needs a hung job's last
    progress time long after that. A closed (failed) job's series do go."""
    import ray

    from anomalyfleet.job_metrics import JobMetrics

    port = free_port()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000}, log_to_driver=False)
    hung = None
    try:
        hung = JobMetrics("hung-job", kind="synthesis", total=100)
        hung.advance(done=10, images=10)
        failed = JobMetrics("failed-job", kind="synthesis", total=100)
        failed.advance(done=5, images=5)
        failed.close()
        heartbeat = "ray_anomalyfleet_job_last_progress_timestamp_seconds"
        deadline = time.monotonic() + 60
        while "hung-job" not in _series(port, heartbeat) and time.monotonic() < deadline:
            time.sleep(0.5)
        first = _series(port, heartbeat)
        assert "hung-job" in first, first
        time.sleep(35)  # past Ray's eviction of a gauge nobody sets
        later = _series(port, heartbeat)
        assert later.get("hung-job") == pytest.approx(first["hung-job"])  # the time of the last progress, held
        assert _series(port, "ray_anomalyfleet_job_progress_ratio").get("hung-job") == pytest.approx(0.1)
        assert "failed-job" not in later
    finally:
        if hung is not None:
            hung.close()  # the process-wide holder would otherwise keep setting it in later tests
        ray.shutdown()
