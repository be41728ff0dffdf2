"""The library job on a local Ray cluster: shard fan-out to actors, and a killed job that resumes
with no duplicate and no missing sample, to a local directory and to a real S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from anomalyfleet import storage
from anomalyfleet.data.readers import parse_data_spec
from anomalyfleet.synthesis.library import finished_shards, parse_recipe, synthesize_library
from tests.image_sets import write_folder_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def recipe(normals, out, count=24, size=96):
    return {
        "name": "ray", "normal": [str(normals / "normal")], "output": str(out), "seed": 5, "shard_size": 2,
        "image_size": size,
        "defects": [{"name": "stain", "generator": "perlin", "count": count},
                    {"name": "cut", "generator": "cutpaste", "count": count // 2}],
        "ray": {"actors": 2, "num_cpus": 1},
    }


def rows(root):
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def run_job_and_kill(tmp_path, data, ray_cluster, env: dict, timeout: float, poll: float) -> set[str]:
    """Run the library job in a subprocess and SIGKILL it once 3 shards are finished; returns them."""
    out = data["output"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    job = subprocess.Popen([sys.executable, "-m", "jobs.synthesize_library", str(path), "--quiet",
                            "--ray-address", ray_cluster], cwd=REPO,
                           env={**os.environ, **env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)},
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(finished_shards(out)) < 3 and job.poll() is None:
            time.sleep(poll)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
    # The job ran on a shared cluster: its actors outlive the killed driver until Ray reaps them,
    # and a shard already in flight may still land. Take the snapshot once nothing changes.
    before, stable_since = finished_shards(out), time.monotonic()
    while time.monotonic() - stable_since < 3 and time.monotonic() < deadline + 30:
        time.sleep(0.2)
        now = finished_shards(out)
        if now != before:
            before, stable_since = now, time.monotonic()
    assert before, job.stderr.read().decode()[-2000:]
    assert len(before) < 60, "the job finished before it could be killed"
    return before


def assert_every_planned_image_once(names):
    assert len(names) == len(set(names)) == 120
    expected = {f"stain-{i:06d}" for i in range(80)} | {f"cut-{i:06d}" for i in range(40)}
    assert {Path(n).stem for n in names} == expected


def test_fan_out_matches_in_process(ray_cluster, tmp_path):
    normals = write_folder_dataset(tmp_path / "n", normals=4, anomalies=0, size=48)
    on_ray = synthesize_library(parse_recipe(recipe(normals, tmp_path / "ray", count=8)), progress=False)
    local = synthesize_library(parse_recipe(recipe(normals, tmp_path / "local", count=8)), progress=False, actors=0)
    assert on_ray.images == local.images == 12 and on_ray.shards == 6
    # Samples do not depend on which actor made them.
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
    hosts = {json.loads((p / "shard.json").read_text())["host"] for p in (tmp_path / "ray" / "shards").iterdir()}
    assert hosts


def test_killed_job_resumes_without_duplicates(ray_cluster, tmp_path):
    normals = write_folder_dataset(tmp_path / "n", normals=4, anomalies=0, size=48)
    out = tmp_path / "lib"
    data = recipe(normals, out, count=80, size=160)
    before = run_job_and_kill(tmp_path, data, ray_cluster, {}, timeout=90, poll=0.02)
    stamps = {s: (out / "shards" / s / "manifest.jsonl").stat().st_mtime_ns for s in before}
    result = synthesize_library(parse_recipe(data), progress=False)
    assert result.shards == 60 and result.images == 120
    assert result.shards_done_now == 60 - len(before)
    names = [r["image"] for r in rows(out)]
    assert_every_planned_image_once(names)
    assert all((out / n).is_file() for n in names)
    assert {s: (out / "shards" / s / "manifest.jsonl").stat().st_mtime_ns for s in before} == stamps
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]


def test_library_to_s3_killed_resumed_and_read_back(ray_cluster, tmp_path, s3_env):
    normals = write_folder_dataset(tmp_path / "n", normals=4, anomalies=0, size=48)
    out = s3_env.uri(f"libraries/lib-{time.time_ns()}")
    data = recipe(normals, out, count=80, size=160)
    before = run_job_and_kill(tmp_path, data, ray_cluster, s3_env.env(), timeout=60, poll=0.05)
    assert not storage.exists(storage.join(out, "manifest.jsonl"))
    marks = {s: storage.stat(storage.join(out, "shards", s, "manifest.json")).etag for s in before}

    result = synthesize_library(parse_recipe(data), progress=False)
    assert result.root == out and result.shards == 60 and result.images == 120
    assert result.shards_done_now == 60 - len(before)
    assert {s: storage.stat(storage.join(out, "shards", s, "manifest.json")).etag for s in before} == marks
    rows = [json.loads(line) for line in storage.read_text(storage.join(out, "manifest.jsonl")).splitlines()]
    names = [r["image"] for r in rows]
    assert_every_planned_image_once(names)
    # Exactly the planned objects: every shard finished, no stray or duplicate image or mask.
    keys = {o.uri[len(out) + 1:] for o in storage.list_objects(out)}
    assert len(finished_shards(out)) == 60
    assert {k for k in keys if "/images/" in k} == set(names)
    assert {k for k in keys if "/masks/" in k} == {r["mask"] for r in rows}
    assert {"recipe.json", "card.json", "card.md", "contact-sheet.png", "manifest.jsonl"} <= keys
    card = json.loads(storage.read_bytes(storage.join(out, "card.json")))
    assert card["counts"] == {"stain": 80, "cut": 40} and card["images"] == 120
    # A shard downloads as a verified tree (its manifest.json names every file's checksum).
    storage.get_tree(storage.join(out, "shards", "cut-00003"), tmp_path / "cut-00003")

    samples = parse_data_spec(f"library:{out}")
    assert len(samples) == 120 and all(s.label == 1 and s.mask for s in samples)
    assert {s.category for s in samples} == {Path(out).name}
    by_stem = {Path(r["image"]).stem: r for r in rows}
    for sample in samples[::17]:
        row = by_stem[Path(sample.image).stem]
        assert hashlib.sha256(Path(sample.image).read_bytes()).hexdigest() == row["sha256"]["image"]
        assert hashlib.sha256(Path(sample.mask).read_bytes()).hexdigest() == row["sha256"]["mask"]
    assert len(parse_data_spec(f"library:{out}?defects=cut")) == 40
