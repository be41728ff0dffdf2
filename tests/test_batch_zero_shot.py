"""Batch zero-shot scoring of files from the CLI: each image against the others of its group."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomalyfleet.cli import main
from anomalyfleet.errors import DataError
from tests.image_sets import write_line_images


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, openai_clip_file):
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.detector import Detector

    detector = Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                               image_size=56, layers=(6,), dpam_layers=4, seed=5)
    detector.thresholds["image"] = 0.5  # on the prompts' scale: must not be applied to batch scores
    return save_bundle(detector, tmp_path_factory.mktemp("batch") / "det")


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """One folder of 12 unlabelled images of a line, 3 of them defective (names say which)."""
    return write_line_images(tmp_path_factory.mktemp("line"), normals=9, anomalies=3, seed=4)


def _records(out):
    return [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]


def test_batch_scores_rank_as_mutual_scoring_and_find_the_defects(tiny_bundle, line, tmp_path):
    from anomalyfleet.batch_zero_shot import batch_layer
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.data import AnomalyDataset, Sample
    from anomalyfleet.maps import smooth_maps
    from anomalyfleet.memory import mutual_patch_scores, top_fraction_mean, upsample_patch_scores
    from anomalyfleet.metrics import image_auroc
    from anomalyfleet.scoring import list_images

    out = tmp_path / "scored"
    assert main(["score", "--detector", str(tiny_bundle), "--images", str(line), "--out", str(out),
                 "--batch-zero-shot", "64", "--no-overlays", "--quiet"]) == 0
    records = _records(out)
    assert len(records) == 12
    assert all(r["source"] == "batch" and r["group"] == 0 and r["group_size"] == 12 for r in records)
    # Flagged on the z-scale from 3, not by the bundle's threshold (0.5 on the prompts' scale).
    assert all(r["threshold"] == 3.0 and r["anomalous"] == (r["score"] >= 3.0) for r in records)
    scores = np.array([r["score"] for r in records])
    assert np.abs(scores).min() < 1e-5  # a robust z-score: the group's median image sits at 0

    # Plain mutual scoring of the same files at a line memory's default block, up to the group's affine z-scale.
    detector = load_bundle(tiny_bundle)
    files = list_images(line)
    assert [r["image"] for r in records] == [str(f) for f in files]
    dataset = AnomalyDataset([Sample(str(f), 0, None, "x") for f in files], image_size=56, mean=detector.mean,
                             std=detector.std)
    with torch.inference_mode():
        patches = detector.extract(torch.stack([dataset[i]["image"] for i in range(len(dataset))]),
                                   layers=(batch_layer(detector),)).patch_features[0]
    maps = smooth_maps(upsample_patch_scores(mutual_patch_scores(patches), detector.backbone.grid, 56), 4.0)
    plain = top_fraction_mean(torch.from_numpy(maps), 0.01).numpy()
    assert np.corrcoef(plain, scores)[0, 1] > 1 - 1e-6
    assert np.load(out / records[0]["map"]).shape == (56, 56)
    labels = np.array([1 if "/anomaly-" in r["image"] else 0 for r in records])
    assert image_auroc(labels, scores) > 0.8


def test_files_are_split_into_near_equal_groups(tiny_bundle, line, tmp_path):
    from anomalyfleet.batch_zero_shot import group_bounds

    assert group_bounds(11, 5) == [(0, 4), (4, 7), (7, 11)]
    assert group_bounds(6, 5) == [(0, 3), (3, 6)]
    assert group_bounds(4, 64) == [(0, 4)]
    for count, size, reason in ((2, 64, "at least 3"), (10, 4, "hold 5 to 512"), (600, 513, "hold 5 to 512")):
        with pytest.raises(DataError, match=reason):
            group_bounds(count, size)
    out = tmp_path / "groups"
    assert main(["score", "--detector", str(tiny_bundle), "--images", str(line), "--out", str(out),
                 "--batch-zero-shot", "5", "--no-maps", "--no-overlays", "--quiet"]) == 0
    records = _records(out)
    sizes = {}
    for r in records:
        sizes.setdefault(r["group"], []).append(r["group_size"])
    assert {g: (len(v), v[0]) for g, v in sizes.items()} == {0: (4, 4), 1: (4, 4), 2: (4, 4)}


def test_batch_zero_shot_refuses_bad_input_and_writes_nothing(tiny_bundle, line, tmp_path, capsys):
    two = tmp_path / "two"
    two.mkdir()
    for name in sorted(line.iterdir())[:2]:
        (two / name.name).write_bytes(name.read_bytes())
    cases = [
        (["--images", str(two), "--batch-zero-shot", "64"], "needs at least 3"),
        (["--images", str(line), "--batch-zero-shot", "4"], "batch zero-shot groups hold 5 to 512 images, got 4"),
    ]
    for extra, reason in cases:
        out = tmp_path / "never"
        code = main(["score", "--detector", str(tiny_bundle), "--out", str(out), "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists()
