"""Line memory: nearest-patch search, coreset, mutual batch scoring, calibration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anomalyfleet.memory import (MapCalibration, PatchMemory, greedy_coreset, mutual_patch_scores, nearest_distance,
                                 top_fraction_mean)


def test_chunked_search_equals_brute_force():
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(1000, 16), dim=-1)
    memory = F.normalize(torch.randn(300, 16), dim=-1)
    brute = torch.tensor([min(1 - float(q @ m) for m in memory) for q in queries[:50]])
    fast = nearest_distance(queries, memory, chunk=7)
    torch.testing.assert_close(fast[:50], brute, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, nearest_distance(queries, memory, chunk=4096))


def test_memory_scores_zero_on_its_own_patches_and_round_trips():
    torch.manual_seed(1)
    patches = torch.randn(2, 9, 8)
    memory = PatchMemory.build(patches, layer=6, grid=(3, 3))
    assert memory.patch_scores(patches).abs().max() < 1e-5
    restored = PatchMemory.from_state_dict(memory.state_dict())
    other = torch.randn(1, 9, 8)
    torch.testing.assert_close(restored.patch_scores(other), memory.patch_scores(other))


def test_coreset_covers_the_data():
    torch.manual_seed(2)
    centres = F.normalize(torch.randn(5, 8), dim=-1)
    data = F.normalize(centres.repeat_interleave(40, 0) + 0.01 * torch.randn(200, 8), dim=-1)
    chosen = greedy_coreset(data, 5)
    # Farthest-point sampling picks one point near each of the five clusters.
    assert len({int(i) // 40 for i in chosen}) == 5


def test_mutual_scoring_is_robust_to_a_few_defective_images():
    """Images rank the same with or without two strongly defective images in the batch."""
    torch.manual_seed(3)
    texture = torch.randn(16, 8)
    direction = F.normalize(torch.randn(8), dim=0)

    def image(level: float) -> torch.Tensor:
        x = texture + 0.01 * torch.randn(16, 8)
        x[5] = x[5] + level * direction  # graded deviation of one patch
        return x

    graded = [image(level) for level in (1.5, 1.0, 0.5)] + [image(0.0) for _ in range(9)]
    defective = [image(0.0) for _ in range(2)]
    for x in defective:
        x[3] = torch.randn(8) * 3  # a strong, unrelated defect
    clean = mutual_patch_scores(torch.stack(graded))
    mixed = mutual_patch_scores(torch.stack(graded + defective))
    # The three deviating images rank first, in order of deviation, with or without the defects.
    assert torch.equal(clean[:, 5].argsort(descending=True)[:3], torch.arange(3))
    assert torch.equal(mixed[:12, 5].argsort(descending=True)[:3], torch.arange(3))
    assert mixed[12:, 3].min() > mixed[:12, 3].max()


def test_calibration_and_top_fraction():
    maps = torch.arange(100.0).reshape(1, 10, 10)
    calibration = MapCalibration.fit(maps, quantile=0.99)
    scaled = calibration.apply(maps)
    assert abs(float(scaled.flatten().median())) < 1e-6
    assert MapCalibration.from_dict(calibration.to_dict()) == calibration
    assert float(top_fraction_mean(maps, 0.02)[0]) == 98.5


# --- a line's memory in its bundle, in the detector's scoring, and from the CLI ---------------------

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from anomalyfleet import maps as mapping  # noqa: E402
from anomalyfleet.errors import ConfigError, DataError  # noqa: E402
from anomalyfleet.memory import FusionSettings, LineMemory, build_line_memory  # noqa: E402


@pytest.fixture(scope="module")
def tiny_detector_bundle(tmp_path_factory, openai_clip_file):
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.detector import Detector

    detector = Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                               image_size=56, layers=(6,), dpam_layers=4, seed=5)
    detector.thresholds["image"] = 0.5
    return save_bundle(detector, tmp_path_factory.mktemp("memory") / "det")


@pytest.fixture(scope="module")
def line_data(tmp_path_factory):
    from tests.image_sets import write_folder_dataset

    root = tmp_path_factory.mktemp("line")
    return (write_folder_dataset(root / "normals", normals=8, anomalies=0, seed=1),
            write_folder_dataset(root / "test", normals=6, anomalies=6, seed=2))


def _samples(path):
    from anomalyfleet.data import parse_data_specs

    return parse_data_specs([f"folder:{path}"])


def _images(samples, detector):
    from anomalyfleet.data import AnomalyDataset

    dataset = AnomalyDataset(samples, image_size=detector.image_size, mean=detector.mean, std=detector.std)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x["image"] for x in items]), torch.stack([x["mask"][0] > 0.5 for x in items]).numpy()


_BACKBONES: dict = {}


def _load(bundle, **kwargs):
    """load_bundle with one backbone per bundle's weights (building the backbone dominates the time)."""
    from anomalyfleet.bundle import load_bundle, read_bundle_metadata

    key = read_bundle_metadata(bundle)["backbone_fingerprint"]
    detector = load_bundle(bundle, backbone=_BACKBONES.get(key), **kwargs)
    _BACKBONES.setdefault(key, detector.backbone)
    return detector


def _with_memory(bundle, normals, mode="fused", **fusion):
    detector = _load(bundle)
    detector.memory = build_line_memory(detector, _samples(normals), k=4, fusion=FusionSettings(mode=mode, **fusion),
                                        progress=False)
    return detector


def test_bundle_without_memory_scores_exactly_as_before(tiny_detector_bundle, line_data, tmp_path):
    """No memory: format 1, no memory.pt, and bit-identical to the prompt formulation computed by hand."""
    from anomalyfleet.bundle import load_bundle, save_bundle

    detector = load_bundle(tiny_detector_bundle)
    assert detector.memory is None and detector.feature_layers == (6,)
    images, _ = _images(_samples(line_data[1]), detector)
    with torch.inference_mode():
        features = detector.backbone(images, (6,), 4)
        text = detector.text_features()
        scores = mapping.image_scores(features.global_feature.float(), text).numpy()
        maps = mapping.smooth_maps(mapping.anomaly_map(mapping.layer_probability_maps(
            [p.float() for p in features.patch_features], text, features.grid, 56)), 4.0)
    prediction = detector.predict(images)
    assert np.array_equal(prediction.scores, scores) and np.array_equal(prediction.maps, maps)
    copy = save_bundle(detector, tmp_path / "again")
    meta = json.loads((copy / "detector.json").read_text())
    assert meta["format_version"] == 1 and "memory" not in meta and not (copy / "memory.pt").exists()
    again = _load(copy)
    prediction = again.predict(images)
    assert np.array_equal(prediction.scores, scores) and np.array_equal(prediction.maps, maps)
    with torch.inference_mode():  # the serving path's score-only call
        assert np.array_equal(again.image_scores(again.extract(images), text).numpy(), scores)


def test_memory_round_trips_in_a_bundle(tiny_detector_bundle, line_data, tmp_path):
    from anomalyfleet.bundle import read_bundle_metadata, save_bundle

    detector = _with_memory(tiny_detector_bundle, line_data[0])
    images, _ = _images(_samples(line_data[1]), detector)
    before = detector.predict(images)
    path = save_bundle(detector, tmp_path / "with-memory")
    meta = read_bundle_metadata(path)  # the manifest, memory.pt included, verifies
    assert meta["format_version"] == 2
    assert "memory.pt" in json.loads((path / "manifest.json").read_text())["files"]
    memory = meta["memory"]
    assert memory["layers"] == [3] and memory["shots"] == 4 and memory["bank_sizes"] == {"3": 4 * 16}
    assert memory["fusion"]["mode"] == "fused" and memory["fusion"]["sources"] == {"prompts": True, "memory": True}
    assert set(memory["calibration"]) == {"memory_map", "prompt_map", "prompt_score"}
    assert memory["built_with"]["image_size"] == 56 and memory["built_with"]["layers"] == [6]
    loaded = _load(path)
    assert isinstance(loaded.memory, LineMemory) and loaded.feature_layers == (6, 3)
    after = loaded.predict(images)
    assert np.array_equal(before.scores, after.scores) and np.array_equal(before.maps, after.maps)
    with torch.inference_mode():  # the serving path's score-only call agrees with the full prediction
        np.testing.assert_allclose(loaded.image_scores(loaded.extract(images)).numpy(), after.scores, rtol=0, atol=1e-6)
    # The memory holds at the settings it was built at; others are refused rather than mis-scored.
    with pytest.raises(ConfigError, match="line memory was built at image_size 56"):
        _load(path, image_size=112)
    assert _load(path, sigma=2.0).settings.sigma == 2.0
    # A bundle from a newer format is refused, naming the versions.
    import shutil

    from anomalyfleet.errors import BundleError
    from anomalyfleet.manifest import write_manifest

    newer = shutil.copytree(path, tmp_path / "newer")
    meta = json.loads((newer / "detector.json").read_text())
    (newer / "detector.json").write_text(json.dumps(dict(meta, format_version=3)))
    write_manifest(newer)
    with pytest.raises(BundleError, match="bundle format 3 is newer"):
        _load(newer)


def test_memory_bundle_through_s3(s3_env, tiny_detector_bundle, line_data, tmp_path, capsys):
    """`memory build --out s3://...`: the memory travels with the bundle and scores the same."""
    import time

    from anomalyfleet.cli import run

    remote = s3_env.uri(f"memory-{time.time_ns()}/line-a")
    local = tmp_path / "line-a"
    for out in (remote, str(local)):
        code = run(_memory_parser(), ["memory", "build", "--detector", str(tiny_detector_bundle), "--data",
                                      f"folder:{line_data[0]}", "--out", out, "--k", "4", "--quiet"])
        assert code == 0, capsys.readouterr().err
    from_s3, from_disk = _load(remote), _load(local)
    assert from_s3.memory.fusion.mode == "fused" and from_s3.memory.shots == 4
    images, _ = _images(_samples(line_data[1])[:4], from_disk)
    a, b = from_s3.predict(images), from_disk.predict(images)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)


def test_memory_only_finds_a_synthetic_defect(tiny_detector_bundle, line_data):
    from anomalyfleet.evaluation import evaluate_detector

    detector = _with_memory(tiny_detector_bundle, line_data[0], mode="memory")
    report = evaluate_detector(detector, _samples(line_data[1]), progress=False)["mean"]
    assert report["pixel_auroc"] > 0.9 and report["image_auroc"] > 0.8


def test_switching_sources(tiny_detector_bundle, line_data):
    plain = _load(tiny_detector_bundle)
    images, _ = _images(_samples(line_data[1]), plain)
    prompts = plain.predict(images)
    detector = _with_memory(tiny_detector_bundle, line_data[0], mode="memory")
    memory_only = detector.predict(images)
    # Prompts only: the memory stays in the bundle but scoring is exactly the prompts'.
    detector.memory.with_mode("prompts")
    assert detector.feature_layers == (6,)
    same = detector.predict(images)
    assert np.array_equal(same.scores, prompts.scores) and np.array_equal(same.maps, prompts.maps)
    assert not np.allclose(memory_only.maps, prompts.maps)
    # Fused at prompt weight 0 is the memory alone; at weight 1 the calibrated prompt map alone.
    detector.memory.fusion = FusionSettings(mode="fused", prompt_weight=0.0)
    zero = detector.predict(images)
    np.testing.assert_allclose(zero.maps, memory_only.maps, atol=1e-5)
    np.testing.assert_allclose(zero.scores, memory_only.scores, atol=1e-5)
    detector.memory.fusion = FusionSettings(mode="fused", prompt_weight=1.0)
    one = detector.predict(images)
    cal = detector.memory.prompt_calibration
    np.testing.assert_allclose(one.maps, (prompts.maps - cal.centre) / cal.spread, atol=1e-4)
    detector.memory.fusion = FusionSettings(mode="fused", prompt_weight=0.2)
    fused = detector.predict(images)
    # Per pixel, the weighted sum of the two calibrated maps (smoothing is linear).
    np.testing.assert_allclose(fused.maps, 0.8 * memory_only.maps + 0.2 * one.maps, atol=1e-4)
    assert not np.allclose(fused.scores, memory_only.scores)


def _memory_parser():
    from anomalyfleet.cli_memory import add_memory_command

    parser = argparse.ArgumentParser(prog="anomalyfleet")
    add_memory_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_memory_build_command_end_to_end(tiny_detector_bundle, line_data, tmp_path, capsys):
    from anomalyfleet.cli import run
    from anomalyfleet.evaluation import evaluate_detector

    out = tmp_path / "line-a"
    # A labelled spec: only its normal images go into the memory.
    code = run(_memory_parser(), ["memory", "build", "--detector", str(tiny_detector_bundle), "--data",
                                  f"folder:{line_data[0]}", "--data", f"folder:{line_data[1]}", "--out", str(out),
                                  "--k", "4", "--coreset", "40", "--mode", "memory", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["mode"] == "memory" and summary["shots"] == 4 and summary["bank_sizes"] == {"3": 40}
    assert summary["thresholds_dropped"] == ["image"] and "calibrate" in captured.err
    detector = _load(out)
    assert detector.memory.fusion.mode == "memory" and detector.thresholds == {}
    assert all("/normal/" in image for image in detector.memory.info["images"])
    report = evaluate_detector(detector, _samples(line_data[1]), progress=False)["mean"]
    assert report["pixel_auroc"] > 0.9


def test_memory_build_refuses_data_without_normal_images(tiny_detector_bundle, tmp_path, capsys):
    from anomalyfleet.cli import run
    from tests.image_sets import write_folder_dataset

    defects = write_folder_dataset(tmp_path / "defects", normals=0, anomalies=3, seed=5)
    code = run(_memory_parser(), ["memory", "build", "--detector", str(tiny_detector_bundle), "--data",
                                  f"folder:{defects}", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "no normal (label 0) images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="at least two normal images"):
        _with_memory_of(tiny_detector_bundle, tmp_path, normals=1)


def _with_memory_of(bundle, tmp_path, normals):
    from tests.image_sets import write_folder_dataset

    data = write_folder_dataset(tmp_path / f"n{normals}", normals=normals, anomalies=0, seed=6)
    return _with_memory(bundle, data)
