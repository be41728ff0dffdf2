"""Thresholds: the false-alarm rate on normals, best F1 and target recall on labelled scores, and the
`calibrate` command writing them into a bundle with its report."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from anomalyfleet.calibration import (
    best_f1,
    calibrate_scores,
    confusion,
    curve,
    threshold_for_false_alarm_rate,
    threshold_for_recall,
)
from anomalyfleet.errors import ConfigError, DataError


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5])
def test_false_alarm_rate_is_hit_on_the_normals(rate):
    scores = np.random.default_rng(1).random(400).astype(np.float32)
    threshold = threshold_for_false_alarm_rate(scores, rate)
    alarms = int(np.sum(scores >= threshold))
    assert alarms == math.floor(rate * len(scores))  # distinct scores: exactly the allowed count
    # And it is the lowest such threshold: the next normal below it would be one alarm too many.
    below = scores[scores < threshold].max()
    assert np.sum(scores >= below) / len(scores) > rate


def test_false_alarm_rate_with_ties_never_exceeds_the_rate():
    scores = np.array([0.1] * 5 + [0.5] * 10 + [0.9] * 3, dtype=np.float32)
    for rate in (0.0, 0.1, 0.2, 0.5, 0.8):
        threshold = threshold_for_false_alarm_rate(scores, rate)
        assert np.mean(scores >= threshold) <= rate + 1e-12
    assert np.mean(scores >= threshold_for_false_alarm_rate(scores, 0.2)) == pytest.approx(3 / 18)
    with pytest.raises(ConfigError):
        threshold_for_false_alarm_rate(scores, 1.0)


def _labelled(seed=0):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(0.3, 0.12, 120), rng.normal(0.62, 0.15, 60)].astype(np.float32)
    labels = np.r_[np.zeros(120, int), np.ones(60, int)]
    return scores, labels


def _f1(scores, labels, threshold):
    point = confusion(scores, labels, threshold)
    return point.f1 or 0.0


def test_best_f1_is_the_maximum_over_every_threshold():
    scores, labels = _labelled()
    point = best_f1(scores, labels)
    brute = max(_f1(scores, labels, t) for t in np.unique(scores))
    assert point.f1 == pytest.approx(brute)
    assert point.tp + point.fn == 60 and point.fp + point.tn == 120
    # No score sits on the threshold: it lies strictly between two scores.
    assert not np.any(scores == np.float32(point.threshold))


def test_best_f1_on_a_hand_worked_example():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 0])
    point = best_f1(scores, labels)
    # >= 0.6: tp 3, fp 1 -> P 0.75, R 0.75, F1 0.75, the best (>= 0.8 gives 0.667, >= 0.2 gives 0.727)
    assert (point.tp, point.fp, point.fn) == (3, 1, 1)
    assert 0.4 < point.threshold < 0.6 and point.f1 == pytest.approx(0.75)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_target_recall_is_reached_with_the_fewest_false_alarms(target):
    scores, labels = _labelled(3)
    point = threshold_for_recall(scores, labels, target)
    assert point.recall >= target
    # Any higher cut (the next anomalous score above the threshold excluded) misses the target.
    anomalous_above = np.sort(scores[(labels == 1) & (scores >= point.threshold)])
    stricter = confusion(scores, labels, float(np.nextafter(anomalous_above[0], np.float32(2))))
    assert stricter.recall < target


def test_curve_is_monotone_and_ends_at_everything():
    scores, labels = _labelled(5)
    table = curve(scores, labels)
    assert np.all(np.diff(table["threshold"]) < 0)
    assert np.all(np.diff(table["recall"]) >= 0) and np.all(np.diff(table["fpr"]) >= 0)
    assert table["recall"][-1] == 1.0 and table["fpr"][-1] == 1.0


def test_calibrate_scores_picks_the_requested_operating_point():
    scores, labels = _labelled(7)
    default = calibrate_scores(scores, labels)
    assert default.chosen == "best_f1" and set(default.operating_points) == {"false_alarm_rate", "best_f1", "target_recall"}
    recall = calibrate_scores(scores, labels, target_recall=0.9)
    assert recall.chosen == "target_recall" and recall.operating_points["target_recall"]["recall"] >= 0.9
    far = calibrate_scores(scores, labels, false_alarm_rate=0.05)
    assert far.chosen == "false_alarm_rate" and far.operating_points["false_alarm_rate"]["fpr"] <= 0.05
    normals = calibrate_scores(scores[labels == 0], labels[labels == 0])
    assert normals.chosen == "false_alarm_rate" and normals.report["mode"] == "normals"
    assert normals.operating_points["false_alarm_rate"]["requested"] == 0.01
    with pytest.raises(DataError):
        calibrate_scores(scores[labels == 0], labels[labels == 0], target_recall=0.9)
    with pytest.raises(DataError):
        calibrate_scores(scores[labels == 1], labels[labels == 1])
    with pytest.raises(ConfigError):
        calibrate_scores(scores, labels, false_alarm_rate=0.1, target_recall=0.9)


def _parser():
    from anomalyfleet.cli_calibrate import add_calibrate_command

    parser = argparse.ArgumentParser(prog="anomalyfleet")
    add_calibrate_command(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, openai_clip_file):
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.detector import Detector

    detector = Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                               image_size=56, layers=(6,), dpam_layers=4, seed=5)
    return save_bundle(detector, tmp_path_factory.mktemp("calib") / "det")


def test_calibrate_command_from_normals(tiny_bundle, tmp_path, capsys):
    from anomalyfleet.bundle import load_bundle, read_bundle_metadata
    from anomalyfleet.data import parse_data_specs
    from anomalyfleet.scoring import predict_samples
    from tests.image_sets import write_folder_dataset

    data = write_folder_dataset(tmp_path / "normals", normals=20, anomalies=0, seed=4)
    out = tmp_path / "calibrated"
    args = _parser().parse_args(["calibrate", "--detector", str(tiny_bundle), "--data", f"folder:{data}",
                                 "--false-alarm-rate", "0.1", "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    meta = read_bundle_metadata(out)
    threshold = meta["thresholds"]["image"]
    assert threshold == pytest.approx(summary["threshold"])
    assert meta["extras"]["calibration"]["chosen"] == "false_alarm_rate"
    # The calibrated bundle, scored the CLI's way, alarms on exactly 10 % of those normals.
    detector = load_bundle(out)
    samples = parse_data_specs([f"folder:{data}"])
    scores = np.concatenate([b.prediction.scores for b in predict_samples(detector, samples, progress=False)])
    assert np.sum(scores >= threshold) == 2
    report = json.loads((tmp_path / "calibrated.calibration.json").read_text())
    assert report["mode"] == "normals" and report["n_normal"] == 20
    assert len(report["curve"]["threshold"]) == len(report["curve"]["fpr"]) > 1
    assert (tmp_path / "calibrated.calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_command_from_labelled_images_in_place(tiny_bundle, tmp_path, capsys):
    import shutil

    from anomalyfleet.bundle import read_bundle_metadata
    from tests.image_sets import write_folder_dataset

    bundle = tmp_path / "det"
    shutil.copytree(tiny_bundle, bundle)
    data = write_folder_dataset(tmp_path / "parts", normals=8, anomalies=6, seed=2)
    args = _parser().parse_args(["calibrate", "--detector", str(bundle), "--data", f"folder:{data}",
                                 "--target-recall", "0.8", "--out", str(bundle), "--quiet"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    meta = read_bundle_metadata(bundle)  # the manifest still verifies after the in-place update
    calibration = meta["extras"]["calibration"]
    assert calibration["chosen"] == "target_recall"
    assert calibration["operating_points"]["target_recall"]["recall"] >= 0.8
    assert meta["thresholds"]["image"] == pytest.approx(calibration["operating_points"]["target_recall"]["threshold"])
    assert meta["thresholds"]["image_best_f1"] == pytest.approx(summary["best_f1"]["threshold"])
    assert meta["training"] == json.loads((tiny_bundle / "detector.json").read_text())["training"]


def test_calibrate_command_refuses_contradictory_options(tiny_bundle, tmp_path):
    with pytest.raises(SystemExit):
        _parser().parse_args(["calibrate", "--detector", str(tiny_bundle), "--data", "folder:x",
                              "--false-alarm-rate", "0.1", "--target-recall", "0.9", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        _parser().parse_args(["calibrate", "--detector", str(tiny_bundle), "--data", "folder:x",
                              "--false-alarm-rate", "1.5", "--out", str(tmp_path / "o")])


def test_best_f1_ties_go_to_the_highest_threshold_exactly():
    """Two cuts with F1 = 2/3 each: computed as 2pr/(p+r) they differed in the last bit and the
    lowest threshold (every image flagged) won; from the counts they tie and the highest wins."""
    point = best_f1([.5, .5, 0, 0, .5, .5, 0, .5], [0, 1, 1, 0, 0, 1, 0, 1])
    assert point.threshold > 0 and point.fpr == 0.5


def test_a_labelled_false_alarm_threshold_keeps_anomalies_between_normals():
    """Normals 0.1 and 0.9, anomalies 0.2 and 0.3, one false alarm allowed in two: halfway between
    the normals (0.5) flags no anomaly; just above 0.1, with the same single false alarm, both."""
    from anomalyfleet.calibration import calibrate_scores

    calibration = calibrate_scores([.1, .9, .2, .3], [0, 0, 1, 1], false_alarm_rate=0.5)
    point = calibration.operating_points["false_alarm_rate"]
    assert point["fp"] == 1 and point["tp"] == 2 and 0.1 < calibration.threshold < 0.2
