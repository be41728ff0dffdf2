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
from anomalyfleet.errors import ConfigError
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
    # and a shard already in flight may still land. Wait until they are gone (their CPUs are back),
    # then take the snapshot once nothing changes.
    import ray

    reaped = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < reaped:
        time.sleep(0.2)
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


# --- worker loss ---------------------------------------------------------------------------------


def test_lost_actor_mid_shard_every_sample_once(ray_cluster, tmp_path):
    """One actor SIGKILLs itself half-way through its second shard; the job still completes with
    every planned sample once, byte-identical to the in-process library, every shard verifiable."""
    from anomalyfleet.manifest import verify_manifest

    normals = write_folder_dataset(tmp_path / "n", normals=4, anomalies=0, size=48)
    marker = tmp_path / "killed-pid"
    data = recipe(normals, tmp_path / "ray", count=8)
    data["ray"]["fault_injection"] = {"kill_after_images": 3, "once": str(marker)}
    result = synthesize_library(parse_recipe(data), progress=False)
    local = synthesize_library(parse_recipe(recipe(normals, tmp_path / "local", count=8)), progress=False, actors=0)

    assert result.images == local.images == 12 and result.shards == 6
    killed = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # the actor really is gone
    assert not [p for p in (tmp_path / "ray" / "shards").iterdir() if p.name.startswith(".")], "partial shard left"
    shards = sorted((tmp_path / "ray" / "shards").iterdir())
    pids = {json.loads((p / "shard.json").read_text())["pid"] for p in shards}
    # The killed actor finished one shard first; the survivor wrote the rest, with the replacement
    # if it started before the queue ran dry (re-queued shards go to whichever started actor has room).
    assert killed in pids and len(pids) in (2, 3)
    got = rows(tmp_path / "ray")
    assert [r["image"] for r in got] == [r["image"] for r in rows(tmp_path / "local")]
    assert got == rows(tmp_path / "local")
    assert len({r["image"] for r in got}) == 12
    for shard in shards:
        verify_manifest(shard)  # every file of every shard has the size and checksum its manifest says
        assert {p.name for p in (shard / "images").iterdir()} == {Path(r["image"]).name for r in got
                                                                   if r["shard"] == shard.name}
    assert [p.name for p in shards] == sorted(finished_shards(tmp_path / "ray"))


def test_worker_lost_too_often_fails_clearly(ray_cluster, tmp_path):
    """Every actor dies at its first image: after ray.max_retries replacements the job stops with
    that error (not another one from the clean-up) and the pool's actors are gone."""
    import ray

    normals = write_folder_dataset(tmp_path / "n", normals=2, anomalies=0, size=32)
    data = recipe(normals, tmp_path / "lib", count=4)
    data["ray"].update(actors=1, max_retries=1, fault_injection={"kill_after_images": 1})
    with pytest.raises(RuntimeError, match="lost its worker 2 times"):
        synthesize_library(parse_recipe(data), progress=False)
    # The actors are killed, so the CPUs they held come back.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


# --- AnoGen embedding learning as a Ray task -----------------------------------------------------


def anogen_recipe(data_root, pipeline, out, actors):
    return {
        "name": "anogen", "normal": f"folder:{data_root}", "output": str(out), "seed": 7, "shard_size": 2,
        "defects": [{"name": "crack", "generator": "anogen", "count": 2, "pipeline": str(pipeline),
                     "support": f"folder:{data_root}", "learn": {"steps": 6, "checkpoint_every": 3},
                     "settings": {"steps": 2}}],
        "ray": {"actors": actors, "num_cpus": 1},
    }


def test_anogen_embedding_learned_by_a_ray_task(ray_cluster, tmp_path, monkeypatch):
    """Each missing embedding is learned by a Ray task (not the driver), retried from its checkpoint
    when its worker dies, lands where the in-process path puts it, is skipped on a re-run and equals
    the one learned in-process, uninterrupted, with the same seed."""
    import torch

    from anomalyfleet.synthesis import anogen, library
    from anomalyfleet.synthesis.anogen import load_embedding
    from tests.tiny_diffusion import build_tiny_pipeline

    pipeline = build_tiny_pipeline(tmp_path / "sd")
    data_root = write_folder_dataset(tmp_path / "data", normals=2, anomalies=2, size=32)
    data = anogen_recipe(data_root, pipeline, tmp_path / "ray", actors=1)
    # The first learning worker dies after step 4 (checkpoint at 3): Ray retries the task, which resumes.
    marker = tmp_path / "killed-pid"
    data["ray"]["fault_injection"] = {"kill_after_learn_steps": 4, "once": str(marker)}
    on_ray = parse_recipe(data)

    def not_here(*args, **kwargs):
        raise AssertionError("the embedding must be learned in a Ray task, not in the driver")

    monkeypatch.setattr(anogen, "learn_embedding", not_here)  # Ray workers import their own copy
    result = synthesize_library(on_ray, progress=False)
    assert result.images == 2
    learned = tmp_path / "ray" / "embeddings" / "crack.pt"
    placeholder, vector, meta = load_embedding(learned)
    assert meta["learned_by"]["pid"] not in (os.getpid(), int(marker.read_text()))
    assert meta["learned_by"]["device"] == "cpu"  # no GPU granted (learn_gpus defaults to the actors' 0)
    assert meta["steps"] == 6 and meta["resumed_at_step"] == 3 and meta["config"]["seed"] == 7
    assert len(list((tmp_path / "ray" / "embeddings").glob(".crack-*-checkpoints/latest.pt"))) == 1
    assert {r["settings"]["embedding_defect"] for r in rows(tmp_path / "ray")} == {"crack"}

    # A re-run finds it and learns nothing (nor starts a learning task).
    stamp = learned.stat().st_mtime_ns
    monkeypatch.setattr(library, "_learn_on_ray", not_here)
    assert synthesize_library(on_ray, progress=False).shards_done_now == 0
    assert learned.stat().st_mtime_ns == stamp

    # In this process (no Ray, one thread as in the task): the same vector. Same seed, same CPU
    # kernels: bit-identical when measured; the tolerance (1e-6 absolute) allows only float rounding.
    monkeypatch.undo()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = synthesize_library(parse_recipe(anogen_recipe(data_root, pipeline, tmp_path / "local", actors=0)),
                                  progress=False)
    finally:
        torch.set_num_threads(threads)
    local_placeholder, local_vector, local_meta = load_embedding(tmp_path / "local" / "embeddings" / "crack.pt")
    assert local_meta["learned_by"]["pid"] == os.getpid()
    assert local_placeholder == placeholder
    assert torch.allclose(vector, local_vector, rtol=0, atol=1e-6)
    assert not torch.equal(vector, torch.zeros_like(vector))
    assert here.images == 2 and rows(tmp_path / "local") == rows(tmp_path / "ray")


# --- normal images in object storage -------------------------------------------------------------


def test_normals_in_object_storage_read_by_the_actors(ray_cluster, tmp_path, s3_env):
    """`folder:s3://...` or a bare s3:// prefix: the plan names the normals by URI, so an actor on any
    node reads them through the storage layer; the samples equal those made from a local copy."""
    from anomalyfleet.errors import DataError
    from anomalyfleet.synthesis.library import resolve_normals

    normals = write_folder_dataset(tmp_path / "n", normals=3, anomalies=1, size=40)
    base = s3_env.uri(f"normals/{time.time_ns()}")
    for path in sorted(normals.rglob("*.png")):
        storage.upload_file(path, storage.join(base, path.relative_to(normals).as_posix()))
    expected = [storage.join(base, "normal", f"n{i:03d}.png") for i in range(3)]
    assert resolve_normals([f"folder:{base}"]) == resolve_normals([storage.join(base, "normal")]) == expected
    with pytest.raises(DataError, match="no normal images"):
        resolve_normals([storage.join(base, "elsewhere")])

    data = {"name": "s3-normals", "normal": [f"folder:{base}"], "output": str(tmp_path / "ray"), "seed": 2,
            "shard_size": 2, "defects": [{"name": "stain", "generator": "perlin", "count": 4}],
            "ray": {"actors": 1, "num_cpus": 1}}
    assert synthesize_library(parse_recipe(data), progress=False).images == 4
    local = {**data, "normal": [str(normals / "normal")], "output": str(tmp_path / "local")}
    synthesize_library(parse_recipe(local), progress=False, actors=0)
    got, want = rows(tmp_path / "ray"), rows(tmp_path / "local")
    assert {r["source_image"] for r in got} == set(expected)  # URIs, not this node's mirror of them
    assert [Path(r["source_image"]).name for r in got] == [Path(r["source_image"]).name for r in want]
    strip = [{k: v for k, v in r.items() if k != "source_image"} for r in got]
    assert strip == [{k: v for k, v in r.items() if k != "source_image"} for r in want]


def test_more_actors_than_the_cluster_holds_still_finish(ray_cluster, tmp_path):
    """Three one-CPU actors on a two-CPU cluster: the third cannot start, and the shards it would
    have been given go to the others instead of waiting for it forever."""
    normals = write_folder_dataset(tmp_path / "normals", normals=4, anomalies=0, size=40, seed=2)
    data = recipe(normals, tmp_path / "lib", count=8)
    data["ray"]["actors"] = 3
    result = synthesize_library(parse_recipe(data), progress=False)
    local = synthesize_library(parse_recipe(recipe(normals, tmp_path / "local", count=8)), progress=False, actors=0)
    assert result.images == local.images and rows(tmp_path / "lib") == rows(tmp_path / "local")


def test_an_embedding_learned_from_other_support_examples_is_not_reused(tmp_path, capsys):
    """`synth learn --recipe`, then the support masks are corrected in place: the library job must
    not make the library with the embedding of the old masks (its card would show the new ones)."""
    from anomalyfleet.cli import main
    from tests.tiny_diffusion import build_tiny_pipeline

    pipeline = build_tiny_pipeline(tmp_path / "sd")
    data_root = write_folder_dataset(tmp_path / "data", normals=2, anomalies=2, size=32)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps(anogen_recipe(data_root, pipeline, tmp_path / "lib", actors=0)))
    assert main(["synth", "learn", "--recipe", str(recipe_file), "--quiet"]) == 0
    # Flags the recipe's `learn` settings decide are refused, not silently overruled.
    assert main(["synth", "learn", "--recipe", str(recipe_file), "--steps", "2", "--quiet"]) == 2
    assert "--steps does not apply with --recipe" in capsys.readouterr().err
    mask = next((data_root / "masks").iterdir())
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # corrected in place
    with pytest.raises(ConfigError, match="was learned from other support examples"):
        synthesize_library(parse_recipe(anogen_recipe(data_root, pipeline, tmp_path / "lib", actors=0)), progress=False)
    assert not (tmp_path / "lib" / "shards").exists()
