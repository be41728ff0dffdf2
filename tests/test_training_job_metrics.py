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
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(found) != wanted:
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
