"""Bulk scoring on Ray Data: equal to the CLI's scores, images and results on the real S3 server,
and a killed job resumes without losing or repeating a shard."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anomalyfleet import storage
from anomalyfleet.cli import main
from anomalyfleet.errors import DataError
from tests.image_sets import write_folder_dataset, write_line_images
from tests.ray_serve_helpers import make_bundle

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _cli_scores(bundle: Path, images: Path, out: Path) -> dict[str, float]:
    assert main(["score", "--detector", str(bundle), "--images", str(images), "--out", str(out),
                 "--quiet", "--device", "cpu", "--no-maps", "--no-overlays"]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return {Path(r["image"]).name: r["score"] for r in rows}


def _parts(output: str):
    import pyarrow.parquet as pq

    tables = [pq.read_table(io.BytesIO(storage.read_bytes(o.uri)))
              for o in storage.list_objects(storage.join(output, "parts")) if o.uri.endswith(".parquet")]
    return [row for t in tables for row in t.to_pylist()]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_two_lines_from_s3_match_the_cli(ray_local, s3_env, tmp_path, openai_clip_file, capsys):
    data_a = write_folder_dataset(tmp_path / "a", normals=3, anomalies=3, size=48, seed=1)
    data_b = write_folder_dataset(tmp_path / "b", normals=2, anomalies=3, size=48, seed=2)
    bundle_a = make_bundle(openai_clip_file, tmp_path / "bundle-a", seed=1, threshold=None)
    bundle_b = make_bundle(openai_clip_file, tmp_path / "bundle-b", seed=2, threshold=0.5)
    root = s3_env.uri(f"bulk-{time.time_ns()}")
    for line, data in (("line-a", data_a), ("line-b", data_b)):
        for path in sorted(data.rglob("*.png")):
            if "mask" not in path.parts and "masks" not in path.parts and "ground_truth" not in path.parts:
                storage.upload_file(path, storage.join(root, "images", line, path.relative_to(data).as_posix()))
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"lines:\n  line-a: {{bundle: {bundle_a}, threshold: 0.3}}\n  line-b: {{bundle: {bundle_b}}}\n")
    out = storage.join(root, "results")
    code = main(["bulk-score", "--registry", str(registry), "--input", f"line-a={storage.join(root, 'images', 'line-a')}",
                 "--input", f"line-b={storage.join(root, 'images', 'line-b')}", "--out", out,
                 "--shard-size", "4", "--actors", "2", "--cpus-per-actor", "1", "--quiet", "--device", "cpu"])
    assert code == 0
    rows = _parts(out)
    for line, data, bundle, threshold in (("line-a", data_a, bundle_a, 0.3), ("line-b", data_b, bundle_b, 0.5)):
        mine = {Path(r["image"]).name: r for r in rows if r["line"] == line}
        local_images = tmp_path / f"{line}-images"
        local_images.mkdir()
        for o in storage.list_objects(storage.join(root, "images", line)):
            storage.download_file(o.uri, local_images / Path(o.uri).name)
        expected = _cli_scores(bundle, local_images, tmp_path / f"{line}-cli")
        assert set(mine) == set(expected)
        for name, score in expected.items():
            assert abs(mine[name]["score"] - score) < 1e-5, name
            assert mine[name]["anomalous"] == (score >= threshold) and mine[name]["threshold"] == threshold
            saved = np.load(io.BytesIO(storage.read_bytes(mine[name]["map_uri"])))
            assert saved.shape == (56, 56)
    summary = json.loads(storage.read_bytes(storage.join(out, "summary.json")))
    assert summary["lines"]["line-a"]["images"] == len([r for r in rows if r["line"] == "line-a"])
    assert summary["shards"] == 4 and summary["shards_scored_now"] == 4

    # The same command again scores nothing: every shard's part is there.
    assert main(["bulk-score", "--registry", str(registry), "--input", f"line-a={storage.join(root, 'images', 'line-a')}",
                 "--input", f"line-b={storage.join(root, 'images', 'line-b')}", "--out", out,
                 "--shard-size", "4", "--quiet", "--device", "cpu"]) == 0
    assert json.loads(storage.read_bytes(storage.join(out, "summary.json")))["shards_scored_now"] == 0

    # A corrupt upload is a row with an error, not a failed job; an unknown line is refused up front.
    storage.write_bytes(storage.join(root, "images", "line-a", "zz-corrupt.png"), b"\x89PNG\r\n\x1a\nbroken")
    # A line with no image today (an empty prefix) is reported and skipped; the others are scored.
    quiet_line = storage.join(root, "images", "line-b-today")
    assert main(["bulk-score", "--registry", str(registry), "--input", f"line-a={storage.join(root, 'images', 'line-a')}",
                 "--input", f"line-b={quiet_line}", "--out", storage.join(root, "results2"), "--quiet",
                 "--device", "cpu"]) == 0
    bad = [r for r in _parts(storage.join(root, "results2")) if r["image"].endswith("zz-corrupt.png")]
    assert len(bad) == 1 and bad[0]["error"] and np.isnan(bad[0]["score"])
    summary = json.loads(storage.read_bytes(storage.join(root, "results2", "summary.json")))
    assert summary["empty_lines"] == {"line-b": quiet_line} and list(summary["lines"]) == ["line-a"]
    assert "no images under" in capsys.readouterr().err
    # ...but a run where no line has an image is an error, and writes nothing.
    assert main(["bulk-score", "--registry", str(registry), "--input", f"line-b={quiet_line}",
                 "--out", storage.join(root, "results3"), "--quiet", "--device", "cpu"]) == 2
    assert f"no images (png, jpg, bmp, tif) under {quiet_line}" in capsys.readouterr().err
    assert not list(storage.list_objects(storage.join(root, "results3")))
    assert main(["bulk-score", "--registry", str(registry), "--input", "line-x=/nowhere", "--out", str(tmp_path / "x")]) == 2


def test_an_empty_line_directory_is_skipped_but_a_missing_one_is_an_error(tmp_path, openai_clip_file):
    from anomalyfleet.bulk_scoring import BulkScoreConfig, LineInput, Shard, empty_lines, list_line_images, plan_shards

    (tmp_path / "quiet" / "sub").mkdir(parents=True)
    (tmp_path / "quiet" / "notes.txt").write_text("no image here")
    assert list_line_images(str(tmp_path / "quiet")) == []
    with pytest.raises(DataError, match="no such image file or directory"):
        list_line_images(str(tmp_path / "typo"))
    inputs = (LineInput("a", str(tmp_path / "busy"), "bundle", None), LineInput("b", str(tmp_path / "quiet"), "bundle", None))
    config = BulkScoreConfig(inputs=inputs, output=str(tmp_path / "out"))
    busy = Shard("a", 0, "bundle", None, [str(tmp_path / "busy" / "x.png")])
    assert empty_lines(config, [busy]) == {"b": str(tmp_path / "quiet")}
    with pytest.raises(DataError, match=f"no images .* under {tmp_path}/busy, {tmp_path}/quiet"):
        empty_lines(config, [])
    # Grouped modes plan the busy line's groups and nothing for the quiet one.
    busy_images = write_line_images(tmp_path / "busy", normals=6, anomalies=0, size=48, seed=5)
    bundle = str(make_bundle(openai_clip_file, tmp_path / "bundle", seed=4, threshold=0.5))
    grouped = BulkScoreConfig(inputs=(LineInput("a", str(busy_images), bundle, None),
                                      LineInput("b", str(tmp_path / "quiet"), bundle, None)),
                              output=str(tmp_path / "out"), batch_zero_shot=5)
    shards = plan_shards(grouped)
    assert {s.line for s in shards} == {"a"} and sum(len(s.images) for s in shards) == 6
    assert empty_lines(grouped, shards) == {"b": str(tmp_path / "quiet")}


def test_killed_job_resumes_without_gaps_or_repeats(tmp_path, openai_clip_file):
    # 24 one-image shards: with 12 the job once wrote all of them between the poll that saw two
    # and the kill (2026-12-01), so the kill found nothing left to interrupt.
    count = 24
    data = write_folder_dataset(tmp_path / "parts", normals=count // 2, anomalies=count // 2, size=48, seed=3)
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(data.rglob("*.png")):
        if path.parent.name in ("normal", "anomaly"):
            (images / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    bundle = make_bundle(openai_clip_file, tmp_path / "bundle", seed=4, threshold=0.5)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.bulk_score", "--detector", str(bundle), "--input", f"line={images}",
               "--out", str(out), "--shard-size", "1", "--quiet", "--device", "cpu", "--no-maps"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "parts" / "line"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(parts.glob("*.parquet"))) < 2:
        assert process.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    # A Ray worker outside the killed process group could still land a part: take the listing once
    # it has not changed for 3 s.
    done_before, stable_since = {}, time.monotonic()
    while time.monotonic() - stable_since < 3 and time.monotonic() < deadline + 30:
        now = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
        if now != done_before:
            done_before, stable_since = now, time.monotonic()
        time.sleep(0.2)
    assert 2 <= len(done_before) < count

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert len(after) == count and all(after[name] == mtime for name, mtime in done_before.items())
    rows = _parts(str(out))
    assert sorted(Path(r["image"]).name for r in rows) == sorted(p.name for p in images.iterdir())
    expected = _cli_scores(bundle, images, tmp_path / "cli")
    assert all(abs(r["score"] - expected[Path(r["image"]).name]) < 1e-5 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lines"]["line"]["images"] == count and summary["shards_scored_now"] == count - len(done_before)


def test_batch_zero_shot_on_ray_data_matches_the_cli_and_keeps_corrupt_rows(ray_local, tmp_path, openai_clip_file):
    """Bulk batch zero-shot with one shard per line groups images exactly as `score --batch-zero-shot`
    does, so the scores agree; several near-equal shards each score on their own; a corrupt file
    is an error row and the other images of its shard are still compared with each other."""
    images = write_line_images(tmp_path / "line", normals=9, anomalies=3, size=48, seed=3)
    bundle = make_bundle(openai_clip_file, tmp_path / "bundle", seed=1, threshold=0.5)
    cli_out = tmp_path / "cli"
    assert main(["score", "--detector", str(bundle), "--images", str(images), "--out", str(cli_out), "--quiet",
                 "--device", "cpu", "--no-maps", "--no-overlays", "--batch-zero-shot", "5"]) == 0
    expected = {Path(r["image"]).name: r for r in map(json.loads, (cli_out / "scores.jsonl").read_text().splitlines())}
    out = str(tmp_path / "bulk")
    assert main(["bulk-score", "--detector", str(bundle), "--input", f"line={images}", "--out", out,
                 "--batch-zero-shot", "5", "--quiet", "--device", "cpu", "--no-maps"]) == 0
    rows = {Path(r["image"]).name: r for r in _parts(out)}
    assert set(rows) == set(expected)
    for name, record in expected.items():
        assert abs(rows[name]["score"] - record["score"]) < 1e-5, name
        assert rows[name]["threshold"] == 3.0 and rows[name]["anomalous"] == (record["score"] >= 3.0)

    (images / "zz-corrupt.png").write_bytes(b"not a png")
    out = str(tmp_path / "bulk-shards")
    assert main(["bulk-score", "--detector", str(bundle), "--input", f"line={images}", "--out", out,
                 "--batch-zero-shot", "5", "--shard-size", "6", "--quiet", "--device", "cpu", "--no-maps"]) == 0
    rows = _parts(out)
    assert len(rows) == 13
    bad = [r for r in rows if r["error"]]
    assert [Path(r["image"]).name for r in bad] == ["zz-corrupt.png"] and np.isnan(bad[0]["score"])
    assert all(np.isfinite(r["score"]) for r in rows if not r["error"])
    summary = json.loads(storage.read_bytes(storage.join(out, "summary.json")))
    assert summary["shards"] == 3 and summary["lines"]["line"]["errors"] == 1


def test_peers_on_ray_data_match_the_cli(ray_local, tmp_path, openai_clip_file, capsys):
    """Bulk scoring with peers forms the line's groups as `score --peers` does and packs them whole
    into shards, so the scores agree over several shards, on the bundle's threshold; a bundle
    without a line memory is refused before Ray."""
    from anomalyfleet.bundle import load_bundle, save_bundle

    images = write_line_images(tmp_path / "line", normals=10, anomalies=3, size=48, seed=3)
    plain = make_bundle(openai_clip_file, tmp_path / "plain", seed=1, threshold=None)
    normals = write_folder_dataset(tmp_path / "normals", normals=8, anomalies=0, size=48, seed=4)
    bundle = tmp_path / "bundle"
    assert main(["memory", "build", "--detector", str(plain), "--data", f"folder:{normals}", "--k", "4",
                 "--out", str(bundle), "--quiet"]) == 0
    detector = load_bundle(bundle)
    detector.thresholds["image"] = 0.4
    save_bundle(detector, bundle)
    cli_out = tmp_path / "cli"
    assert main(["score", "--detector", str(bundle), "--images", str(images), "--out", str(cli_out), "--quiet",
                 "--device", "cpu", "--no-maps", "--no-overlays", "--peers", "5"]) == 0
    expected = {Path(r["image"]).name: r for r in map(json.loads, (cli_out / "scores.jsonl").read_text().splitlines())}
    assert sorted({r["group_size"] for r in expected.values()}) == [4, 5]  # 13 files: groups of 4, 5 and 4
    out = str(tmp_path / "bulk")
    # Shards of at most 9 images: groups 4 + 5, then 4 (never a group split between shards).
    assert main(["bulk-score", "--detector", str(bundle), "--input", f"line={images}", "--out", out,
                 "--peers", "5", "--shard-size", "9", "--quiet", "--device", "cpu", "--no-maps"]) == 0
    rows = {Path(r["image"]).name: r for r in _parts(out)}
    assert set(rows) == set(expected)
    for name, record in expected.items():
        assert abs(rows[name]["score"] - record["score"]) < 1e-5, name
        assert rows[name]["threshold"] == 0.4 and rows[name]["anomalous"] == (record["score"] >= 0.4)
    assert json.loads(storage.read_bytes(storage.join(out, "summary.json")))["shards"] == 2
    capsys.readouterr()
    never = tmp_path / "never"
    assert main(["bulk-score", "--detector", str(plain), "--input", f"line={images}", "--out", str(never),
                 "--peers", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has none (anomalyfleet memory build adds one)" in err and len(err.strip().splitlines()) == 1
    assert not never.exists()


def test_inputs_are_checked_before_any_work(tmp_path):
    """Line names become output directories; a broken registry line says what is wrong with it."""
    from anomalyfleet.bulk_scoring import resolve_inputs
    from anomalyfleet.cli import default_detector_path
    from anomalyfleet.errors import ConfigError

    for name in ("a/../b", "../up", ".hidden", "a b", ""):
        with pytest.raises(ConfigError, match="invalid line name|expected LINE=URI"):
            resolve_inputs([f"{name}=/images"], None, "default")
    (line,) = resolve_inputs(["line-1=/images"], None, "default")
    assert line.bundle == str(default_detector_path())  # 'default' as every other command reads it
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"lines:\n  broken: {{bundle: {tmp_path / 'missing'}, threshold: 0.5}}\n")
    with pytest.raises(ConfigError, match="'broken' is in the registry but cannot be used: .*not found"):
        resolve_inputs(["broken=/images"], str(registry), None)
    with pytest.raises(ConfigError, match="unknown line 'other': not in the registry"):
        resolve_inputs(["other=/images"], str(registry), None)


def test_an_unwritable_output_fails_before_ray_starts(tmp_path, openai_clip_file, capsys):
    import ray

    from anomalyfleet.cli import main

    images = write_folder_dataset(tmp_path / "parts", normals=2, anomalies=0, size=48) / "normal"
    bundle = make_bundle(openai_clip_file, tmp_path / "bundle", seed=1, threshold=0.5)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    ray_before = ray.is_initialized()  # another test of this module may have started it
    code = main(["bulk-score", "--detector", str(bundle), "--input", f"line-1={images}", "--out", str(blocker / "out"),
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write the results under" in err[0], err
    assert ray.is_initialized() == ray_before


def test_a_bundle_saved_again_gets_new_parts_and_a_worker_refuses_a_stale_plan(tmp_path, openai_clip_file):
    """Bundles are replaced in place at the same path: a rerun after retraining must not keep the
    old detector's parts, and a worker that loads another version than the plan's must not score."""
    from anomalyfleet.bulk_scoring import BulkScoreConfig, LineInput, ShardScorer, plan_shards
    from anomalyfleet.errors import DataError

    images = write_line_images(tmp_path / "line", normals=3, anomalies=1, size=48, seed=5)
    bundle = make_bundle(openai_clip_file, tmp_path / "bundle", seed=4, threshold=0.5)

    def plan():
        config = BulkScoreConfig((LineInput("line", str(images), str(bundle), None),), str(tmp_path / "out"),
                                 shard_size=2, device="cpu")
        return plan_shards(config)

    before = plan()
    assert plan()[0].digest == before[0].digest  # the same bundle: the same part names
    make_bundle(openai_clip_file, tmp_path / "bundle", seed=9, threshold=0.5)  # retrained, same path
    after = plan()
    assert [s.images for s in after] == [s.images for s in before]
    assert {s.digest for s in after}.isdisjoint({s.digest for s in before})
    scorer = ShardScorer(str(tmp_path / "out"), batch_size=2, write_maps=True, device="cpu")
    with pytest.raises(DataError, match="was saved again during the run"):
        scorer.score_shard(before[0])
    assert not (tmp_path / "out" / "parts").exists()
    scorer.score_shard(after[0])
    maps = sorted((tmp_path / "out" / "maps" / "line").glob("*.npy"))
    assert maps and all(after[0].digest in m.name for m in maps)  # maps named by their part


def test_bad_input_met_by_a_ray_worker_is_one_line(ray_local, tmp_path, openai_clip_file, capsys):
    """A device the workers lack is found only on them; the CLI still says it in one line."""
    images = write_line_images(tmp_path / "line", normals=2, anomalies=1, size=48, seed=5)
    bundle = make_bundle(openai_clip_file, tmp_path / "bundle", seed=4, threshold=0.5)
    code = main(["bulk-score", "--detector", str(bundle), "--input", f"line={images}", "--out", str(tmp_path / "out"),
                 "--quiet", "--device", "cuda:7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "cuda:7" in err[0] and "Traceback" not in err[0]


def test_parts_read_as_one_dataset_and_one_bad_image_is_a_row(ray_local, tmp_path, openai_clip_file):
    """Parts share one schema (a part with no error and one with an error used to be unreadable as
    one dataset); an image too large to decode is an error row, not a failed job; no threshold is
    no decision; a run with maps after one without redoes its parts, and the summary names its own."""
    import pyarrow.parquet as pq
    from PIL import Image

    data = write_folder_dataset(tmp_path / "d", normals=4, anomalies=2, size=48, seed=5)
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((data / "normal").glob("*.png")) + sorted((data / "anomaly").glob("*.png")):
        (images / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    Image.new("1", (13_500, 13_500)).save(images / "zz-huge.png")  # 182 Mpx: over PIL's bomb limit
    bundle = make_bundle(openai_clip_file, tmp_path / "bundle", seed=6, threshold=None)
    out = tmp_path / "out"
    command = ["bulk-score", "--detector", str(bundle), "--input", f"line={images}", "--out", str(out),
               "--shard-size", "3", "--quiet", "--device", "cpu"]
    assert main([*command, "--no-maps"]) == 0
    table = pq.read_table(out / "parts")  # every part at once
    rows = {Path(r["image"]).name: r for r in table.to_pylist()}
    assert len(rows) == 7 and "too many pixels" in rows["zz-huge.png"]["error"]
    assert all(r["anomalous"] is None and r["error"] is None for name, r in rows.items() if name != "zz-huge.png")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lines"]["line"]["anomaly_rate"] is None and summary["lines"]["line"]["errors"] == 1
    assert len(summary["parts"]) == 3 and summary["superseded_parts"] == 0

    assert main(command) == 0  # now with maps: other parts, the earlier ones kept and counted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_scored_now"] == 3 and summary["superseded_parts"] == 3
    with_maps = [pq.read_table(out / part).to_pylist() for part in summary["parts"]]
    assert all(r["map_uri"] for part in with_maps for r in part if r["error"] is None)


def test_score_with_ray_refuses_options_its_actors_would_ignore(tmp_path, capsys):
    code = main(["score", "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--ray", "--image-size", "112"])
    assert code == 2 and "--image-size does not apply with --ray" in capsys.readouterr().err


def test_an_actor_shares_one_backbone_between_bundles_of_other_sizes(tmp_path, openai_clip_file):
    """Many lines on one backbone: each actor builds it once (not once per bundle), and each line
    still scores at its own image size, as the CLI scores it."""
    import pyarrow.parquet as pq

    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bulk_scoring import Shard, ShardScorer
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.detector import Detector

    data = write_folder_dataset(tmp_path / "d", normals=2, anomalies=1, size=48, seed=8)
    images = sorted(str(p) for p in (data / "normal").glob("*.png"))
    small = make_bundle(openai_clip_file, tmp_path / "small", seed=1, threshold=0.5)
    large = save_bundle(Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                                        image_size=70, layers=(6,), dpam_layers=4, seed=2), tmp_path / "large")
    scorer = ShardScorer(str(tmp_path / "out"), batch_size=2, write_maps=False, device="cpu")
    shards = [Shard("a", 0, str(small), 0.5, images), Shard("b", 0, str(large), None, images),
              Shard("a", 1, str(small), 0.5, images)]
    for shard in shards:
        scorer.score_shard(shard)
    assert len(scorer.backbones) == 1
    first, second = scorer.detectors[str(small)][0], scorer.detectors[str(large)][0]
    assert first.backbone is second.backbone
    for shard, bundle in zip(shards, (small, large, small)):
        got = pq.read_table(shard.part_uri(str(tmp_path / "out"))).column("score").to_pylist()
        expected = _cli_scores(bundle, data / "normal", tmp_path / f"cli-{shard.line}-{shard.index}")
        assert got == pytest.approx([expected[Path(i).name] for i in images], abs=1e-5)


def test_a_part_of_an_older_run_is_rewritten_in_the_one_schema(tmp_path):
    """Parts written before the schema was fixed keep their names (a re-run skips them): their
    inferred types (an all-null column is of type null) are conformed, so old and new read as one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anomalyfleet.bulk_scoring import conform_part, part_schema

    old = tmp_path / "parts" / "line" / "part-00000-aaaaaaaaaa.parquet"
    old.parent.mkdir(parents=True)
    pq.write_table(pa.table({"line": ["line"], "image": ["a.png"], "score": [0.3], "threshold": [0.5],
                             "anomalous": [False], "map_uri": [None], "detector_version": ["v"], "width": [48],
                             "height": [48], "error": [None]}), old)
    new = tmp_path / "parts" / "line" / "part-00001-bbbbbbbbbb.parquet"
    pq.write_table(pa.table({"line": ["line"], "image": ["b.png"], "score": [float("nan")], "threshold": [0.5],
                             "anomalous": [None], "map_uri": [None], "detector_version": ["v"], "width": [None],
                             "height": [None], "error": ["corrupt"]}, schema=part_schema()), new)
    with pytest.raises(pa.ArrowException):
        pq.read_table(tmp_path / "parts")
    assert conform_part(str(old))[1] and not conform_part(str(old))[1]
    table = pq.read_table(tmp_path / "parts")
    assert table.num_rows == 2 and table.schema.equals(part_schema())
