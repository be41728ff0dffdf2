"""The README's cluster recipe, run for real: `ray start --head`, then `ray job submit --working-dir .
-- python -m jobs.train_prompts ...`; the job trains on 2 workers and writes a loadable bundle."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from anomalyfleet.backbones import BackboneSpec
from anomalyfleet.bundle import load_bundle
from tests.image_sets import write_folder_dataset
from tests.s3server import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """A head node started by `ray start --head --block` in its own process group, bound to 127.0.0.1;
    killed with its whole group afterwards (`ray stop` would stop every Ray on the machine)."""
    port, dashboard = free_port(), free_port()
    # A short temp dir: Ray's unix socket paths must stay under the 107-byte limit.
    temp = Path(tempfile.mkdtemp(prefix="afray-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 90
        while True:
            try:
                client = JobSubmissionClient(address)
                break
            except Exception:  # noqa: BLE001 - the dashboard is not up yet
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray start --head did not come up") from None
                time.sleep(1)
        yield {"address": address, "client": client, "env": env}
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_trains_a_bundle_on_a_started_cluster(ray_head, openai_clip_file, tmp_path):
    from ray.job_submission import JobStatus

    data = write_folder_dataset(tmp_path / "widgets", normals=4, anomalies=4)
    bundle = tmp_path / "bundle"
    command = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO), "--no-wait",
        "--", "python", "-m", "jobs.train_prompts", "--data", f"folder:{data}", "--output", str(bundle),
        "--backbone", f"openai:{openai_clip_file}", "--image-size", "56", "--layers", "3,6", "--dpam-layers", "4",
        "--epochs", "2", "--batch-size", "4", "--workers", "2", "--cache-dtype", "float32",
        "--storage-path", str(tmp_path / "runs"), "--feature-cache", str(tmp_path / "features"), "--quiet",
    ]
    submitted = subprocess.run(command, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    client = ray_head["client"]
    jobs = client.list_jobs()  # a fresh cluster: this job only
    assert len(jobs) == 1
    job_id = jobs[0].submission_id
    deadline = time.monotonic() + 420
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job still {status}:\n{client.get_job_logs(job_id)[-3000:]}"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    # The job ran the project's code from the uploaded working dir, not from this checkout's path.
    info = client.get_job_info(job_id)
    assert info.runtime_env.get("working_dir", "").startswith("gcs://")
    detector = load_bundle(bundle, backbone_spec=BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)))
    training = detector.metadata["training"]
    assert training["distributed"]["workers"] == 2 and [h["epoch"] for h in training["history"]] == [1, 2]
    assert all(h["workers"] == 2 for h in training["history"])
