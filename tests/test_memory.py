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



def test_mutual_scoring_equals_the_pairwise_reference(monkeypatch):
    """One product per pair of images, read both ways and in blocks, equals comparing every ordered
    pair of images separately."""
    import anomalyfleet.memory as memory_module

    torch.manual_seed(4)
    patches = torch.randn(7, 12, 8)
    normed = F.normalize(patches, dim=-1)
    per_other = torch.stack([torch.stack([nearest_distance(normed[i], normed[j]) for j in range(7) if j != i], dim=-1)
                             for i in range(7)])
    for fraction in (0.0, 0.3, 1.0):
        keep = max(1, int(round(fraction * 6)))
        reference = per_other.sort(dim=-1).values[..., :keep].mean(dim=-1)
        torch.testing.assert_close(mutual_patch_scores(patches, fraction), reference, atol=1e-6, rtol=0)
        monkeypatch.setattr(memory_module, "MUTUAL_BLOCK_ELEMENTS", 2 * 12 * 12)  # blocks of two images
        torch.testing.assert_close(mutual_patch_scores(patches, fraction), reference, atol=1e-6, rtol=0)
        monkeypatch.undo()


def test_leave_one_out_coresets_equal_a_coreset_of_the_other_images():
    """The batched search picks, for every left-out image, exactly what greedy_coreset picks from
    the other images' patches alone; the leave-one-out scores are distances to those picks."""
    from anomalyfleet.memory import leave_one_out_coresets, leave_one_out_scores

    torch.manual_seed(5)
    patches = torch.randn(6, 20, 8)
    flat = F.normalize(patches, dim=-1).reshape(-1, 8)
    rows = leave_one_out_coresets(flat, per_image=20, left_out=6, size=15, seed=3)
    scores = leave_one_out_scores(patches, coreset=15, seed=3)
    for i in range(6):
        others = torch.cat([flat[: i * 20], flat[(i + 1) * 20:]])
        picked = greedy_coreset(others, 15, seed=3)
        assert torch.equal(rows[i], torch.where(picked < i * 20, picked, picked + 20)), i
        brute = torch.tensor([min(1 - float(q @ m) for m in others[picked]) for q in flat[i * 20:(i + 1) * 20]])
        torch.testing.assert_close(scores[i], brute, atol=1e-5, rtol=0)
    # Without a coreset (or one as large as the others), each image meets all the others' patches.
    full = leave_one_out_scores(patches)
    torch.testing.assert_close(leave_one_out_scores(patches, coreset=100), full)
    torch.testing.assert_close(full[2], nearest_distance(flat[40:60], torch.cat([flat[:40], flat[60:]])))


def _textured_images(count: int, seed: int) -> torch.Tensor:
    """Images of one 'line': 64 patches each, drawn from 50 shared texture prototypes plus noise."""
    prototypes = F.normalize(torch.randn(50, 32, generator=torch.Generator().manual_seed(99)), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(50, (count, 64), generator=generator)
    return prototypes[picks] + 0.15 * torch.randn(count, 64, 32, generator=generator)


def test_leave_one_out_calibration_with_a_coreset_matches_new_normal_images():
    """With a coreset, leave-one-out against the others' full patches puts normal scores too low;
    against coresets of the others it lands where truly held-out normal images score."""
    from anomalyfleet.memory import fit_line_memory, leave_one_out_maps, upsample_patch_scores

    shots, held = _textured_images(8, seed=1), _textured_images(16, seed=2)
    for coreset in (128, 64):
        memory = fit_line_memory((6,), [shots], (8, 8), 8, {}, coreset=coreset, fusion=FusionSettings(mode="memory"))
        assert memory.bank(6).features.shape[0] == coreset
        assert "coreset of the others" in memory.info["memory_calibration"]
        truth = MapCalibration.fit(upsample_patch_scores(memory.bank(6).patch_scores(held), (8, 8), 8))
        before = MapCalibration.fit(leave_one_out_maps(shots, (8, 8), 8))  # the full-patch comparison
        now = memory.memory_calibration
        assert truth.centre - before.centre > 0.03  # the bias being fixed is real
        assert abs(now.centre - truth.centre) < 0.25 * abs(before.centre - truth.centre)
        assert abs(now.spread - truth.spread) < 0.15 * truth.spread


# --- a line's memory in its bundle, in the detector's scoring, and from the CLI ---------------------

import argparse  # noqa: E402
from dataclasses import replace  # noqa: E402
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
    # The fused map takes the memory's image score (rules 5): code before it refuses the bundle.
    assert meta["format_version"] == 5 and meta["memory"]["fusion"]["rules"] == 5
    assert meta["memory"]["fusion"]["map_score"] == "memory"
    assert "memory.pt" in json.loads((path / "manifest.json").read_text())["files"]
    memory = meta["memory"]
    # Four memory images of 16 patches with their eight flips and turns each (the default views): 512
    # rows, cut to what 16 images without views would hold.
    assert memory["layers"] == [4] and memory["shots"] == 4 and memory["bank_sizes"] == {"4": 16 * 16}
    assert memory["info"]["views"] == "d4" and memory["coreset"] == 16 * 16
    assert memory["fusion"]["mode"] == "fused" and memory["fusion"]["sources"] == {"prompts": True, "memory": True}
    assert set(memory["calibration"]) == {"memory_map", "prompt_map", "prompt_score", "fused_score",
                                          "prompt_position_score", "memory_position_score"}
    assert memory["calibration_images"] == 4 and memory["calibration"]["fused_score"]["spread"] > 0
    # Four calibration images are too few to measure either map per position: both terms are off, recorded.
    assert memory["fusion"]["position_weight"] == 0.0 and memory["calibration"]["prompt_position_score"] is None
    assert memory["fusion"]["memory_position"] == 0.0 and memory["calibration"]["memory_position_score"] is None
    assert memory["built_with"]["image_size"] == 56 and memory["built_with"]["layers"] == [6]
    loaded = _load(path)
    assert isinstance(loaded.memory, LineMemory) and loaded.feature_layers == (6, 4)
    for name, value in detector.memory.calibration_set.tensors().items():  # kept in memory.pt
        assert torch.equal(loaded.memory.calibration_set.tensors()[name], value), name
    after = loaded.predict(images)
    assert np.array_equal(before.scores, after.scores) and np.array_equal(before.maps, after.maps)
    with torch.inference_mode():  # the serving path's score-only call agrees with the full prediction
        np.testing.assert_allclose(loaded.image_scores(loaded.extract(images)).numpy(), after.scores, rtol=0, atol=1e-6)
    # The memory holds at the settings it was built at; others are refused rather than mis-scored.
    with pytest.raises(ConfigError, match="line memory was built at image_size 56"):
        _load(path, image_size=112)
    # Another smoothing is allowed: the image-score scale is refitted at it from the calibration
    # images, as a memory built at that sigma would fit it.
    resmoothed = _load(path, sigma=2.0)
    assert resmoothed.settings.sigma == 2.0 and resmoothed.memory.info["sigma"] == 2.0
    refit = loaded.memory.fit_image_calibration(2.0)
    assert resmoothed.memory.image_calibration.to_dict() == refit.to_dict()
    assert refit.to_dict() != loaded.memory.image_calibration.to_dict()
    # A bundle from a newer format is refused, naming the versions.
    import shutil

    from anomalyfleet.errors import BundleError
    from anomalyfleet.manifest import write_manifest

    newer = shutil.copytree(path, tmp_path / "newer")
    meta = json.loads((newer / "detector.json").read_text())
    (newer / "detector.json").write_text(json.dumps(dict(meta, format_version=6)))
    write_manifest(newer)
    with pytest.raises(BundleError, match="bundle format 6 is newer"):
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
    detector = _with_memory(tiny_detector_bundle, line_data[0], mode="memory", image_evidence=0.0)
    memory = detector.memory
    memory_only = detector.predict(images)
    # Prompts only: the memory stays in the bundle but scoring is exactly the prompts'.
    memory.with_mode("prompts")
    assert detector.feature_layers == (6,)
    same = detector.predict(images)
    assert np.array_equal(same.scores, prompts.scores) and np.array_equal(same.maps, prompts.maps)
    assert not np.allclose(memory_only.maps, prompts.maps)

    def configured(mode="fused", **weights):
        memory.configure(FusionSettings(mode=mode, **weights), sigma=detector.settings.sigma)
        return detector.predict(images)

    # All prompt weights 0: the memory's map, and its score on the line's fused-score scale.
    zero = configured(prompt_weight=0.0, prompt_map_weight=0.0, image_evidence=0.0)
    np.testing.assert_allclose(zero.maps, memory_only.maps, atol=1e-5)
    memory_z = memory.image_calibration.apply(memory_only.scores)
    np.testing.assert_allclose(zero.scores, memory_z, atol=1e-4)
    # The memory alone with image evidence (its default): the same calibrated score, mixed into its map.
    evidence = configured(mode="memory")
    assert memory.fusion.image_evidence == 0.5
    np.testing.assert_allclose(evidence.scores, memory_z, atol=1e-4)
    np.testing.assert_allclose(evidence.maps, 0.5 * memory_only.maps + 0.5 * memory_z[:, None, None], atol=1e-4)
    # Prompt map weight 1: the calibrated prompt map.
    cal, score_cal = memory.prompt_calibration, memory.score_calibration
    one = configured(prompt_weight=0.0, prompt_map_weight=1.0, image_evidence=0.0)
    np.testing.assert_allclose(one.maps, (prompts.maps - cal.centre) / cal.spread, atol=1e-4)
    # Defaults: the image score is 0.9 of the memory's calibrated score and 0.1 of the prompts',
    # and each pixel averages the memory's local evidence with its image's memory score: the fused
    # map is exactly the memory mode's.
    default = configured()
    prompt_z = (prompts.scores - score_cal.centre) / score_cal.spread
    np.testing.assert_allclose(default.scores, 0.9 * memory_z + 0.1 * prompt_z, atol=1e-4)
    np.testing.assert_allclose(default.maps, 0.5 * memory_only.maps + 0.5 * memory_z[:, None, None], atol=1e-4)
    np.testing.assert_array_equal(default.maps, evidence.maps)
    # map_score "fused" (bundles before rules 5): each pixel takes the fused score instead.
    legacy = configured(map_score="fused")
    np.testing.assert_array_equal(legacy.scores, default.scores)
    np.testing.assert_allclose(legacy.maps, 0.5 * memory_only.maps + 0.5 * default.scores[:, None, None], atol=1e-4)
    # Inside one image the fused map ranks pixels as the memory does.
    assert [m.argmax() for m in default.maps] == [m.argmax() for m in memory_only.maps]


def test_memory_mode_without_a_score_scale_keeps_its_own_map(tiny_detector_bundle, tmp_path):
    """One normal image and nothing to calibrate on: memory mode cannot rescale the image score,
    so the bundle records no image evidence instead of claiming it."""
    from tests.image_sets import write_folder_dataset

    data = write_folder_dataset(tmp_path / "one", normals=1, anomalies=0, seed=6)
    detector = _with_memory(tiny_detector_bundle, data, mode="memory")
    assert detector.memory.image_calibration is None
    assert detector.memory.fusion.image_evidence == 0.0
    assert detector.memory.metadata()["fusion"]["image_evidence"] == 0.0


def test_fused_score_scale_is_refitted_from_the_kept_calibration_scores(tiny_detector_bundle, line_data):
    """The patch-grid scores kept in the bundle reproduce the fused score's scale exactly as if the
    calibration images were scored again through the detector (here with a prompt map share)."""
    from anomalyfleet.memory import top_fraction_mean

    detector = _with_memory(tiny_detector_bundle, line_data[0])
    memory = detector.memory
    settings = FusionSettings(prompt_map_weight=0.3, top_fraction=0.05)
    memory.configure(settings, sigma=detector.settings.sigma)
    used = set(memory.info["images"])
    held = [s for s in _samples(line_data[0]) if s.image not in used]
    assert len(held) == memory.calibration_set.memory.shape[0] == 4
    images, _ = _images(held, detector)
    with torch.inference_mode():
        features = detector.extract(images)
        memory_raw = memory.raw_maps([features.patch_features[1]], detector.image_size)
        _, prompt_raw = detector.score_features(features)
    local = mapping.smooth_maps(0.7 * memory.memory_calibration.apply(memory_raw)
                                + 0.3 * memory.prompt_calibration.apply(prompt_raw), detector.settings.sigma)
    expected = MapCalibration.fit(top_fraction_mean(torch.from_numpy(local), 0.05))
    assert memory.image_calibration.centre == pytest.approx(expected.centre, abs=1e-5)
    assert memory.image_calibration.spread == pytest.approx(expected.spread, abs=1e-5)
    before = memory.image_calibration
    memory.configure(FusionSettings(prompt_map_weight=0.3, top_fraction=0.5), sigma=detector.settings.sigma)
    assert memory.image_calibration != before  # another top fraction, another scale


def test_memories_from_before_the_calibration_set_score_as_they_did(tiny_detector_bundle, line_data):
    """A memory saved without per-pair weights or calibration scores keeps its formula: map =
    (1 - w) * memory + w * prompt map, score = its top pixels + w * the calibrated prompt score."""
    detector = _with_memory(tiny_detector_bundle, line_data[0])
    meta = detector.memory.metadata()
    meta["fusion"] = {"mode": "fused", "prompt_weight": 0.2, "top_fraction": 0.01}
    del meta["calibration"]["fused_score"]
    tensors = {k: v for k, v in detector.memory.tensors().items() if not k.startswith("calibration_")}
    legacy = LineMemory.from_saved(meta, tensors)
    assert legacy.calibration_set is None and legacy.image_calibration is None
    images, _ = _images(_samples(line_data[1]), detector)
    with torch.inference_mode():
        features = detector.extract(images)
        memory_raw = legacy.raw_maps([features.patch_features[1]], detector.image_size)
        prompt_scores, prompt_raw = detector.score_features(features)
    from anomalyfleet.memory import top_fraction_mean

    maps = mapping.smooth_maps(0.8 * legacy.memory_calibration.apply(memory_raw)
                               + 0.2 * legacy.prompt_calibration.apply(prompt_raw), detector.settings.sigma)
    scores = top_fraction_mean(torch.from_numpy(maps), 0.01) + 0.2 * legacy.score_calibration.apply(prompt_scores)
    detector.memory = legacy
    prediction = detector.predict(images)
    np.testing.assert_allclose(prediction.maps, maps, atol=1e-6)
    np.testing.assert_allclose(prediction.scores, scores.numpy(), atol=1e-6)
    # Its fused weights cannot be refitted: changing them asks for a rebuild, keeping them does not.
    legacy.configure(FusionSettings.from_dict(meta["fusion"]), sigma=4.0)
    with pytest.raises(DataError, match="rebuild it"):
        legacy.configure(FusionSettings(), sigma=4.0)


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
    assert summary["mode"] == "memory" and summary["shots"] == 4 and summary["bank_sizes"] == {"4": 40}
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


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from anomalyfleet.cli import run

    code = run(_memory_parser(), args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_memory_set_switches_mode_and_weights_without_rebuilding(tiny_detector_bundle, line_data, tmp_path, capsys):
    from anomalyfleet.bundle import save_bundle

    built = tmp_path / "line-a"
    code, _, err = _cli(["memory", "build", "--detector", str(tiny_detector_bundle), "--data", f"folder:{line_data[0]}",
                         "--out", str(built), "--k", "4", "--quiet"], capsys)
    assert code == 0, err
    calibrated = _load(built)
    calibrated.thresholds["image"] = 1.5  # as `anomalyfleet calibrate` would leave it
    save_bundle(calibrated, built)
    reference = _load(built)
    images, _ = _images(_samples(line_data[1])[:6], reference)
    banks = reference.memory.tensors()

    # To memory-only, into a new bundle: the scale changes, so the threshold goes; the input stays.
    code, out, err = _cli(["memory", "set", "--detector", str(built), "--out", str(tmp_path / "memory-only"),
                           "--mode", "memory"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["before"]["mode"] == "fused" and summary["fusion"]["mode"] == "memory"
    assert summary["thresholds_dropped"] == ["image"] and "calibrate" in err
    switched = _load(tmp_path / "memory-only")
    assert switched.thresholds == {} and _load(built).thresholds == {"image": 1.5}
    assert all(torch.equal(switched.memory.tensors()[k], v) for k, v in banks.items())  # not rebuilt
    reference.memory.with_mode("memory")
    expected, got = reference.predict(images), switched.predict(images)
    assert np.array_equal(got.scores, expected.scores) and np.array_equal(got.maps, expected.maps)

    # In place, back to fused with another prompt weight: as if configured on the loaded memory.
    code, out, err = _cli(["memory", "set", "--detector", str(tmp_path / "memory-only"), "--mode", "fused",
                           "--prompt-weight", "0.25"], capsys)
    assert code == 0, err
    again = _load(tmp_path / "memory-only")
    # Four calibration images: too few for the position term, which the bundle records as off.
    assert again.memory.fusion == FusionSettings(mode="fused", prompt_weight=0.25, position_weight=0.0,
                                                 memory_position=0.0)
    reference.memory.configure(FusionSettings(prompt_weight=0.25), sigma=reference.settings.sigma)
    assert again.memory.image_calibration == reference.memory.image_calibration
    expected, got = reference.predict(images), again.predict(images)
    assert np.array_equal(got.scores, expected.scores) and np.array_equal(got.maps, expected.maps)

    # A setting the current mode does not use keeps the scale, and so the thresholds.
    code, _, err = _cli(["memory", "set", "--detector", str(built), "--out", str(tmp_path / "kept"),
                         "--mode", "memory"], capsys)
    assert code == 0, err
    kept = _load(tmp_path / "kept")
    kept.thresholds["image"] = 0.7
    save_bundle(kept, tmp_path / "kept")
    code, out, err = _cli(["memory", "set", "--detector", str(tmp_path / "kept"), "--prompt-weight", "0.9"], capsys)
    assert code == 0 and json.loads(out)["thresholds_dropped"] == []
    assert _load(tmp_path / "kept").thresholds == {"image": 0.7}

    code, _, err = _cli(["memory", "set", "--detector", str(built)], capsys)
    assert code == 2 and "nothing to set" in err


def test_memory_set_refuses_fused_without_calibrations(tiny_detector_bundle, tmp_path, capsys):
    from tests.image_sets import write_folder_dataset

    one = write_folder_dataset(tmp_path / "one", normals=1, anomalies=0, seed=7)
    built = tmp_path / "one-shot"
    code, _, err = _cli(["memory", "build", "--detector", str(tiny_detector_bundle), "--data", f"folder:{one}",
                         "--out", str(built), "--k", "1", "--mode", "memory", "--quiet"], capsys)
    assert code == 0, err
    before = (built / "detector.json").read_bytes()
    code, out, err = _cli(["memory", "set", "--detector", str(built), "--mode", "fused"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "fused mode needs calibrations of both sources" in lines[0] and "memory map" in lines[0]
    assert (built / "detector.json").read_bytes() == before  # untouched


def test_memory_show_prints_the_memory_metadata(tiny_detector_bundle, line_data, tmp_path, capsys):
    built = tmp_path / "line-a"
    code, _, err = _cli(["memory", "build", "--detector", str(tiny_detector_bundle), "--data", f"folder:{line_data[0]}",
                         "--out", str(built), "--k", "4", "--coreset", "40", "--quiet"], capsys)
    assert code == 0, err
    code, out, err = _cli(["memory", "show", "--detector", str(built)], capsys)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["format_version"] == 5 and shown["thresholds"] == {}
    memory = shown["memory"]
    assert memory["shots"] == 4 and memory["coreset"] == 40 and memory["bank_sizes"] == {"4": 40}
    assert memory["fusion"]["mode"] == "fused" and memory["calibration_images"] == 4
    assert memory["calibration"] == _load(built).memory.metadata()["calibration"]
    code, out, err = _cli(["memory", "show", "--detector", str(tiny_detector_bundle)], capsys)
    assert code == 2 and "has no line memory" in err
    # 'default' names the bundled detector, as for `memory build` and `score` (which has no memory).
    for action in (["show"], ["set", "--mode", "memory", "--out", str(tmp_path / "never")]):
        code, out, err = _cli(["memory", *action, "--detector", "default"], capsys)
        assert code == 2 and "default-detector has no line memory" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_cli_help_defaults_are_the_fusion_defaults():
    from dataclasses import asdict

    from anomalyfleet.cli_memory import FUSION_DEFAULTS

    from anomalyfleet import memory
    from anomalyfleet.cli_memory import MAP_SCORES

    defaults = asdict(FusionSettings())
    assert FUSION_DEFAULTS == {key: defaults[key] for key in FUSION_DEFAULTS}
    assert MAP_SCORES == memory.MAP_SCORES


def test_memory_tune_writes_the_best_candidate_and_the_bundle_scores_as_reported(tiny_detector_bundle, line_data,
                                                                                 tmp_path, capsys):
    """`memory tune` ranks the candidates on labelled images from one feature pass; the bundle it
    writes, scored end to end, reproduces the chosen candidate's metrics (fusion rerun == full path)."""
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.evaluation import evaluate_detector

    detector = _with_memory(tiny_detector_bundle, line_data[0])
    bundle = save_bundle(detector.to("cpu"), tmp_path / "line")
    data = [f"folder:{line_data[1]}", f"folder:{line_data[0]}"]  # the memory's own images are left out
    code, out, err = _cli(["memory", "tune", "--detector", str(bundle), "--data", data[0], "--data", data[1],
                           "--weights", "0,0.3,1", "--confidence", "0", "--out", str(tmp_path / "tuned"), "--quiet"],
                          capsys)
    assert code == 0, err
    summary = json.loads(out)
    table = summary["candidates"]
    # The bundle's own weight (the default 0.1) is always a candidate.
    assert list(table) == ["prompts", "memory", "fused w=0.1", "fused w=0.3", "fused w=1"]
    assert summary["images"] == 12 + 8 - 4
    # Ties: the bundle's own setting (fused w=0.1), then the smaller prompt weight.
    order = ["memory", "fused w=0.1", "fused w=0.3", "fused w=1", "prompts"]
    expected = max(order, key=lambda name: (round(table[name]["image_auroc"], 9), name == "fused w=0.1",
                                            -order.index(name)))
    assert summary["chosen"] == expected
    tuned = _load(tmp_path / "tuned")
    assert tuned.memory.fusion.mode == ("prompts" if expected == "prompts" else "memory" if expected == "memory"
                                        else "fused")
    assert tuned.memory.info["tuned"]["chosen"] == expected
    for name, weight in (("fused w=0.3", 0.3), ("memory", None), ("prompts", None)):
        mode = "fused" if weight else name
        tuned.memory.configure(FusionSettings(mode=mode, **({"prompt_weight": weight} if weight else {})),
                               sigma=tuned.settings.sigma)
        samples = [replace(s, category="line") for s in _samples(line_data[1]) + _samples(line_data[0])
                   if s.image not in set(tuned.memory.info["images"])]
        report = evaluate_detector(tuned, samples, progress=False)["mean"]
        for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro"):
            assert report[key] == pytest.approx(table[name][key], abs=1e-6), (name, key)
    # The input bundle is untouched; --dry-run writes nothing.
    assert _load(bundle).memory.fusion == FusionSettings(position_weight=0.0, memory_position=0.0)
    code, out, _ = _cli(["memory", "tune", "--detector", str(bundle), "--data", data[0], "--dry-run", "--quiet"], capsys)
    assert code == 0 and "out" not in json.loads(out) and not (tmp_path / "line").with_name("x").exists()
    assert _load(bundle).memory.fusion == FusionSettings(position_weight=0.0, memory_position=0.0)


def test_memory_tune_refuses_bad_input_and_writes_nothing(tiny_detector_bundle, line_data, tmp_path, capsys):
    from anomalyfleet.bundle import save_bundle

    bundle = save_bundle(_with_memory(tiny_detector_bundle, line_data[0]).to("cpu"), tmp_path / "line")
    before = (bundle / "detector.json").read_bytes()
    cases = [
        (["--data", f"folder:{line_data[0]}"], "tuning needs normal and defective images"),
        (["--data", f"folder:{tmp_path / 'missing'}"], "missing"),
    ]
    for extra, reason in cases:
        code, out, err = _cli(["memory", "tune", "--detector", str(bundle), *extra, "--quiet"], capsys)
        assert code == 2 and reason in err, (extra, err)
        assert out == ""
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        _cli(["memory", "tune", "--detector", str(bundle), "--data", f"folder:{line_data[1]}", "--weights", "0,2"],
             capsys)
    assert exit_info.value.code == 2 and "weights must be comma-separated numbers in [0, 1]" in capsys.readouterr().err
    code, _, err = _cli(["memory", "tune", "--detector", str(tiny_detector_bundle), "--data",
                         f"folder:{line_data[1]}", "--quiet"], capsys)
    assert code == 2 and "has no line memory" in err and len(err.strip().splitlines()) == 1
    assert (bundle / "detector.json").read_bytes() == before


def test_tuning_metric_names_agree():
    from anomalyfleet.cli_memory import TUNING_METRICS as parser_metrics
    from anomalyfleet.memory_tuning import TUNING_METRICS

    assert parser_metrics == TUNING_METRICS


def test_auroc_gain_bound_keeps_the_reference_on_noise_and_moves_on_evidence():
    from anomalyfleet.metrics import image_auroc
    from anomalyfleet.memory_tuning import Candidate, auroc_gain_lower_bound, choose_candidate

    rng = np.random.default_rng(0)
    labels = np.array([1] * 40 + [0] * 160)
    signal = labels + rng.normal(0, 1.0, labels.size)
    assert auroc_gain_lower_bound(labels, signal, signal, 0.95) == 0.0  # no difference, no gain
    strong = labels * 3.0 + rng.normal(0, 1.0, labels.size)
    gain = image_auroc(labels, strong) - image_auroc(labels, signal)
    bound = auroc_gain_lower_bound(labels, strong, signal, 0.95)
    assert 0 < bound < gain
    # The bootstrap is centred on the observed gain.
    assert auroc_gain_lower_bound(labels, strong, signal, 0.5) == pytest.approx(gain, abs=0.01)

    def candidate(name, scores):
        return Candidate(name, FusionSettings(), {"image_auroc": image_auroc(labels, scores)}, scores)

    reference = candidate("fused w=0.1", signal)
    # Slightly better by chance (a little noise on the reference's scores): the reference stays.
    nudged = candidate("fused w=0.2", signal + rng.normal(0, 0.05, labels.size))
    pool = [candidate("prompts", rng.normal(size=labels.size)), reference, nudged]
    if nudged.report["image_auroc"] > reference.report["image_auroc"]:
        assert choose_candidate(pool, "image_auroc", labels, reference, 0.0) is nudged
    assert choose_candidate(pool, "image_auroc", labels, reference, 0.95) is reference
    # Clearly better: it is chosen.
    clear = candidate("memory", strong)
    assert choose_candidate([pool[0], clear, reference, nudged], "image_auroc", labels, reference, 0.95) is clear
    # A tie (pixel metrics: every fused weight has the memory's map) keeps the reference; without a
    # reference, ties go to the memory alone, then the smaller weight.
    tied = [Candidate(name, FusionSettings(), {"pixel_auroc": 0.8}, signal)
            for name in ("prompts", "memory", "fused w=0", "fused w=0.1", "fused w=0.3")]
    assert choose_candidate(tied, "pixel_auroc", labels, tied[3], 0.95) is tied[3]
    assert choose_candidate(tied, "pixel_auroc") is tied[1]


def test_memory_mode_bundles_from_before_rules_2_score_as_they_did(tiny_detector_bundle, line_data):
    """Memory mode ignored the stored image evidence before rules 2: such a bundle loads with none,
    so its scores (and the thresholds set on them) do not change under it."""
    detector = _with_memory(tiny_detector_bundle, line_data[0], mode="memory")
    meta = detector.memory.metadata()
    assert meta["fusion"]["rules"] == 3 and meta["fusion"]["image_evidence"] == 0.5
    old = dict(meta, fusion={k: v for k, v in meta["fusion"].items() if k != "rules"})
    legacy = LineMemory.from_saved(old, detector.memory.tensors())
    assert legacy.fusion.image_evidence == 0.0
    again = LineMemory.from_saved(meta, detector.memory.tensors())
    assert again.fusion == detector.memory.fusion
    images, _ = _images(_samples(line_data[1]), detector)
    new_scores = detector.predict(images).scores
    detector.memory = legacy
    raw = detector.predict(images)
    assert not np.allclose(raw.scores, new_scores)
    detector.memory = again.configure(replace(again.fusion, image_evidence=0.0), detector.settings.sigma)
    same = detector.predict(images)
    np.testing.assert_allclose(raw.scores, same.scores, atol=1e-6)
    np.testing.assert_allclose(raw.maps, same.maps, atol=1e-6)


def test_eval_warns_when_image_evidence_meets_a_defect_heavy_set(tiny_detector_bundle, line_data, tmp_path, capsys):
    from anomalyfleet.bundle import save_bundle
    from anomalyfleet.cli import main

    bundle = save_bundle(_with_memory(tiny_detector_bundle, line_data[0]).to("cpu"), tmp_path / "line")
    args = ["eval", "--detector", str(bundle), "--data", f"folder:{line_data[1]}", "--quiet"]
    assert main(args) == 0
    assert "50% of these images are defective" in capsys.readouterr().err
    code, _, err = _cli(["memory", "set", "--detector", str(bundle), "--image-evidence", "0"], capsys)
    assert code == 0, err
    assert main(args) == 0
    assert "defective" not in capsys.readouterr().err


def test_memory_tune_works_on_a_bundle_in_prompts_mode(tiny_detector_bundle, line_data, tmp_path, capsys):
    """A bundle switched to prompts-only still holds its memory; tuning extracts the memory's
    block all the same and can switch the bundle back to the memory."""
    from anomalyfleet.bundle import save_bundle

    detector = _with_memory(tiny_detector_bundle, line_data[0], mode="prompts")
    assert detector.memory.layers[0] not in detector.feature_layers  # scoring does not extract it
    bundle = save_bundle(detector.to("cpu"), tmp_path / "line")
    code, out, err = _cli(["memory", "tune", "--detector", str(bundle), "--data", f"folder:{line_data[1]}",
                           "--weights", "0", "--confidence", "0", "--dry-run", "--quiet"], capsys)
    assert code == 0, err
    table = json.loads(out)["candidates"]
    assert list(table) == ["prompts", "memory"]
    assert table["memory"]["image_auroc"] != table["prompts"]["image_auroc"]


# --- the prompt map normalised per position --------------------------------------------------------

def test_position_stats_shrink_each_spread_towards_the_mean_spread():
    from anomalyfleet.memory import PositionStats, upsample_patch_scores

    torch.manual_seed(11)
    maps = torch.randn(20, 9) * torch.linspace(0.5, 2.0, 9) + torch.arange(9.0)
    plain = PositionStats.fit(maps, prior=0)
    torch.testing.assert_close(plain.mean, maps.mean(0))
    torch.testing.assert_close(plain.spread, maps.std(0))
    shrunk = PositionStats.fit(maps, prior=8)
    spread = ((19 * maps.var(0) + 8 * maps.var(0).mean()) / 27).sqrt()
    torch.testing.assert_close(shrunk.mean, maps.mean(0))  # means are kept
    torch.testing.assert_close(shrunk.spread, spread)
    flat = PositionStats.fit(maps, prior=1e9)  # all prior: one spread, the positions' mean variance
    torch.testing.assert_close(flat.spread, torch.full((9,), float(maps.var(0).mean().sqrt())), atol=1e-4, rtol=0)
    # A map at the per-position centre is 0 everywhere, on the grid and upsampled.
    assert shrunk.apply(shrunk.mean[None], (3, 3)).abs().max() < 1e-6
    upsampled = upsample_patch_scores(shrunk.mean[None], (3, 3), 12)
    assert shrunk.apply(upsampled, (3, 3)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="two normal images"):
        PositionStats.fit(maps[:1])


def test_position_normalisation_discounts_a_response_every_normal_image_has():
    """A fixed bright spot (a busbar, an image border) outscores a real defect on the global scale;
    per position it is normal, and the defect stands out."""
    from anomalyfleet.memory import PositionStats

    torch.manual_seed(12)
    grid = (4, 4)
    normals = 0.1 * torch.randn(24, 16)
    normals[:, 0] += 3.0  # every normal image responds at position 0
    normal, defect = 0.1 * torch.randn(2, 16)
    normal[0] += 3.0
    defect[0] += 3.0
    defect[9] += 1.0  # the defect: weaker than the fixed response, where normals are quiet
    stats = PositionStats.fit(normals)
    raw = torch.stack([normal, defect]).amax(dim=1)
    assert abs(float(raw[1] - raw[0])) < 0.5  # the global top cannot tell them apart
    z = stats.apply(torch.stack([normal, defect]), grid).amax(dim=1)
    assert float(z[1]) > float(z[0]) + 3.0


@pytest.fixture(scope="module")
def rich_normals(tmp_path_factory):
    """16 normal images: 4 memory images and 12 calibration images, enough for the position term."""
    from tests.image_sets import write_folder_dataset

    return write_folder_dataset(tmp_path_factory.mktemp("rich") / "normals", normals=16, anomalies=0, seed=7)


def test_fused_score_holds_the_position_terms_as_documented(tiny_detector_bundle, rich_normals, line_data, tmp_path):
    from anomalyfleet.bundle import read_bundle_metadata, save_bundle
    from anomalyfleet.memory import (PositionStats, leave_one_out_position_scores, upsample_patch_scores)

    detector = _with_memory(tiny_detector_bundle, rich_normals)
    memory, sigma = detector.memory, detector.settings.sigma
    assert memory.fusion.position_weight == 0.1 and memory.calibration_set.prompt_map.shape[0] == 12
    # The position score's scale: each calibration image under the other images' statistics.
    cal_maps = memory.calibration_set.prompt_map
    size = detector.image_size
    by_hand = []
    for i in range(12):
        others = torch.cat([cal_maps[:i], cal_maps[i + 1:]])
        # The held-out map upsampled first, as scoring sees a new image's raw prompt map.
        raw = upsample_patch_scores(cal_maps[i:i + 1], memory.grid, size)
        smoothed = mapping.smooth_maps(PositionStats.fit(others).apply(raw, memory.grid), sigma)
        by_hand.append(float(top_fraction_mean(torch.from_numpy(smoothed), 0.01)[0]))
    torch.testing.assert_close(leave_one_out_position_scores(cal_maps, memory.grid, size, sigma, 0.01),
                               torch.tensor(by_hand), atol=1e-5, rtol=0)
    assert memory.position_calibration == MapCalibration.fit(torch.tensor(by_hand))

    images, _ = _images(_samples(line_data[1]), detector)
    fused = detector.predict(images)
    with torch.inference_mode():
        features = detector.extract(images)
        memory_raw = memory.raw_maps([features.patch_features[1]], size)
        prompt_scores, prompt_raw = detector.score_features(features)
    local = mapping.smooth_maps(memory.memory_calibration.apply(memory_raw), sigma)
    memory_part = memory.image_calibration.apply(top_fraction_mean(torch.from_numpy(local), 0.01))
    prompt_part = memory.score_calibration.apply(prompt_scores)
    z = PositionStats.fit(cal_maps).apply(prompt_raw, memory.grid)
    position_part = memory.position_calibration.apply(
        top_fraction_mean(torch.from_numpy(mapping.smooth_maps(z, sigma)), 0.01))
    # The memory's image score from its own map normalised per position (share s = 1), on the scale
    # of the calibration images' memory scores, each under the others' statistics.
    cal_memory = memory.calibration_set.memory
    assert memory.memory_position_calibration == MapCalibration.fit(
        leave_one_out_position_scores(cal_memory, memory.grid, size, sigma, 0.01))
    zm = PositionStats.fit(cal_memory).apply(memory_raw, memory.grid)
    memory_position_part = memory.memory_position_calibration.apply(
        top_fraction_mean(torch.from_numpy(mapping.smooth_maps(zm, sigma)), 0.01))
    expected = 0.8 * memory_position_part + 0.1 * prompt_part + 0.1 * position_part
    np.testing.assert_allclose(fused.scores, expected.numpy(), atol=1e-4)
    # Without the position term: other scores.
    memory.configure(FusionSettings(position_weight=0.0), sigma)
    without = detector.predict(images)
    np.testing.assert_allclose(without.scores, (0.9 * memory_position_part + 0.1 * prompt_part).numpy(), atol=1e-4)
    assert not np.allclose(without.scores, fused.scores, atol=1e-3)
    # Half the memory's score from each of its maps; none from the normalised one: the previous formula.
    memory.configure(FusionSettings(memory_position=0.5), sigma)
    half = 0.5 * memory_part + 0.5 * memory_position_part
    np.testing.assert_allclose(detector.predict(images).scores, (0.8 * half + 0.1 * prompt_part + 0.1 * position_part).numpy(),
                               atol=1e-4)
    memory.configure(FusionSettings(memory_position=0.0), sigma)
    np.testing.assert_allclose(detector.predict(images).scores,
                               (0.8 * memory_part + 0.1 * prompt_part + 0.1 * position_part).numpy(), atol=1e-4)
    # Memory mode takes the same share into its calibrated score, and its map.
    memory.configure(FusionSettings(mode="memory"), sigma)
    alone = detector.predict(images)
    np.testing.assert_allclose(alone.scores, memory_position_part.numpy(), atol=1e-4)
    np.testing.assert_allclose(alone.maps, 0.5 * local + 0.5 * memory_position_part.numpy()[:, None, None], atol=1e-4)
    # The bundle keeps the weights and the scales; scores survive the round trip exactly.
    memory.configure(FusionSettings(), sigma)
    path = save_bundle(detector, tmp_path / "positioned")
    meta = read_bundle_metadata(path)["memory"]
    assert meta["fusion"]["position_weight"] == 0.1 and meta["fusion"]["memory_position"] == 1.0
    assert meta["fusion"]["rules"] == 5
    # Older code would score without the terms: the bundle's format is one it refuses.
    assert read_bundle_metadata(path)["format_version"] == 5
    assert meta["calibration"]["prompt_position_score"] == memory.position_calibration.to_dict()
    assert meta["calibration"]["memory_position_score"] == memory.memory_position_calibration.to_dict()
    again = _load(path).predict(images)
    assert np.array_equal(again.scores, fused.scores) and np.array_equal(again.maps, fused.maps)
    # Only the prompts' position term, and the fused score in the map: format 3, as before the
    # memory's share; with the share, format 4; the memory's score in the map (the default), 5.
    memory.configure(FusionSettings(memory_position=0.0, map_score="fused"), sigma)
    assert read_bundle_metadata(save_bundle(detector, tmp_path / "prompt-position"))["format_version"] == 3
    memory.configure(FusionSettings(map_score="fused"), sigma)
    assert read_bundle_metadata(save_bundle(detector, tmp_path / "share"))["format_version"] == 4
    memory.configure(FusionSettings(memory_position=0.0), sigma)
    assert read_bundle_metadata(save_bundle(detector, tmp_path / "map-score"))["format_version"] == 5
    # A bundle from before either term (neither weight recorded) loads without them.
    old = {k: v for k, v in meta["fusion"].items() if k not in ("position_weight", "memory_position")}
    assert FusionSettings.from_dict(old).position_weight == 0.0
    assert FusionSettings.from_dict(old).memory_position == 0.0
    with pytest.raises(ValueError, match="newer than this anomalyfleet"):
        FusionSettings.from_dict(dict(meta["fusion"], rules=99))


def test_position_options_and_limits(tiny_detector_bundle, rich_normals, line_data, tmp_path, capsys):
    from anomalyfleet.bundle import read_bundle_metadata, save_bundle
    from anomalyfleet.memory_tuning import candidate_settings

    with pytest.raises(ValueError, match="at most 1"):
        FusionSettings(prompt_weight=0.95, position_weight=0.1)
    # Tuning candidates leave the memory its share: w = 1 takes the whole score.
    named = dict(candidate_settings(FusionSettings(), [0.5, 1.0]))
    assert named["fused w=0.5"].position_weight == 0.1 and named["fused w=1"].position_weight == 0.0
    rich = save_bundle(_with_memory(tiny_detector_bundle, rich_normals), tmp_path / "rich")
    code, out, err = _cli(["memory", "set", "--detector", str(rich), "--position-weight", "0.3"], capsys)
    assert code == 0, err
    assert _load(rich).memory.fusion.position_weight == 0.3 and "position term is off" not in err
    code, _, err = _cli(["memory", "set", "--detector", str(rich), "--prompt-weight", "0.9"], capsys)
    assert code != 0 and "at most 1" in err and len(err.strip().splitlines()) == 1
    assert _load(rich).memory.fusion.prompt_weight == 0.1  # nothing written
    # Four calibration images: the term cannot be fitted; the command says so and records it off.
    poor = save_bundle(_with_memory(tiny_detector_bundle, line_data[0]), tmp_path / "poor")
    code, out, err = _cli(["memory", "set", "--detector", str(poor), "--position-weight", "0.2"], capsys)
    assert code == 0, err
    assert "position term is off" in err and "this memory has 4" in err
    assert _load(poor).memory.fusion.position_weight == 0.0
    code, out, err = _cli(["memory", "set", "--detector", str(poor), "--memory-position", "1",
                           "--position-weight", "0.1"], capsys)
    assert code == 0, err
    assert "the position term and the memory position share are off" in err and "this memory has 4" in err
    assert _load(poor).memory.fusion.memory_position == 0.0
    # Memory mode without image evidence keeps the raw score: the share is unused and kept for a later
    # mode, no note; the bundle is one older code reads (rules 3, format 3: the position weight is on).
    code, out, err = _cli(["memory", "set", "--detector", str(rich), "--mode", "memory", "--image-evidence", "0"],
                          capsys)
    assert code == 0 and "off" not in err, err
    raw_memory = _load(rich)
    assert raw_memory.memory.fusion.memory_position == 1.0 and not raw_memory.memory.fusion.uses_memory_position
    meta = read_bundle_metadata(rich)
    assert meta["memory"]["fusion"]["rules"] == 3 and meta["format_version"] == 3
    code, out, err = _cli(["memory", "set", "--detector", str(rich), "--mode", "fused", "--image-evidence", "0.5"],
                          capsys)
    assert code == 0 and "off" not in err, err
    assert _load(rich).memory.fusion.memory_position == 1.0
    code, out, err = _cli(["memory", "set", "--detector", str(rich), "--memory-position", "0.5"], capsys)
    assert code == 0 and "off" not in err, err
    assert _load(rich).memory.fusion.memory_position == 0.5
    # Tuning candidates keep the share.
    assert all(f.memory_position == 1.0 for _, f in candidate_settings(FusionSettings(), [0.1, 0.5]))


def test_memory_position_share_round_trips_and_older_bundles_keep_their_scores(tiny_detector_bundle, rich_normals,
                                                                                line_data, tmp_path):
    import shutil

    from anomalyfleet.bundle import read_bundle_metadata, save_bundle
    from anomalyfleet.errors import BundleError
    from anomalyfleet.manifest import write_manifest

    detector = _with_memory(tiny_detector_bundle, rich_normals, mode="memory")
    sigma = detector.settings.sigma
    assert detector.memory.fusion.uses_memory_position
    images, _ = _images(_samples(line_data[1]), detector)
    alone = detector.predict(images)
    # Memory mode with its share, through a bundle: format 4, the same scores and maps.
    path = save_bundle(detector, tmp_path / "memory-mode")
    assert read_bundle_metadata(path)["format_version"] == 4
    again = _load(path).predict(images)
    assert np.array_equal(again.scores, alone.scores) and np.array_equal(again.maps, alone.maps)
    # A fused bundle written by the code before the share (rules 3, format 3, no share recorded)
    # scores as that code did: as this code with s = 0.
    detector.memory.configure(FusionSettings(), sigma)
    fused = save_bundle(detector, tmp_path / "fused")
    older = shutil.copytree(fused, tmp_path / "older")
    meta = json.loads((older / "detector.json").read_text())
    meta["format_version"] = 3
    meta["memory"]["fusion"] = {k: v for k, v in meta["memory"]["fusion"].items() if k not in ("memory_position",
                                                                                               "map_score")}
    meta["memory"]["fusion"]["rules"] = 3
    del meta["memory"]["calibration"]["memory_position_score"]
    (older / "detector.json").write_text(json.dumps(meta))
    write_manifest(older)
    old_scores = _load(older).predict(images).scores
    detector.memory.configure(FusionSettings(memory_position=0.0), sigma)
    np.testing.assert_allclose(old_scores, detector.predict(images).scores, atol=1e-6)
    assert not np.allclose(old_scores, _load(fused).predict(images).scores, atol=1e-3)
    # A bundle whose fusion uses the share but lacks its calibration is refused on load, in one line.
    broken = shutil.copytree(fused, tmp_path / "broken")
    meta = json.loads((broken / "detector.json").read_text())
    meta["memory"]["calibration"]["memory_position_score"] = None
    (broken / "detector.json").write_text(json.dumps(meta))
    write_manifest(broken)
    with pytest.raises(BundleError, match="memory position score but it has no such calibration"):
        _load(broken)
    # A memory used before it is configured says what is missing instead of failing deep inside.
    bare = LineMemory((3,), [torch.randn(8, 16)], (4, 4), shots=1, built_with={"image_size": 56},
                      fusion=FusionSettings(mode="memory"),
                      memory_calibration=MapCalibration.fit(torch.rand(4, 8, 8)),
                      image_calibration=MapCalibration.fit(torch.rand(4)))
    with pytest.raises(ValueError, match="need position statistics"):
        bare.fuse(torch.rand(2, 56, 56), None, None, sigma)


def test_tune_keeps_a_fused_setting_without_the_prompt_score_among_its_candidates():
    """`memory set --prompt-weight 0` on a fused bundle: its own setting (still with the prompts'
    position term) is a candidate of its own, not the memory alone (tune used to stop on it)."""
    from anomalyfleet.memory import FusionSettings
    from anomalyfleet.memory_tuning import candidate_name, candidate_settings

    base = FusionSettings(mode="fused", prompt_weight=0.0)
    named = dict(candidate_settings(base, [0.1, 0.5]))
    assert named[candidate_name(base)] == base and named["memory"].mode == "memory"


def test_fused_bundles_from_before_the_map_score_keep_their_maps(tiny_detector_bundle, line_data, tmp_path, capsys):
    """Before rules 5 the fused map took the fused image score. Such a bundle (no map score recorded)
    loads with it, so its maps, and the pixel thresholds set on them, do not change; `memory set
    --map-score` switches it, dropping the thresholds set on the other maps."""
    import shutil

    from anomalyfleet.bundle import read_bundle_metadata, save_bundle
    from anomalyfleet.manifest import write_manifest

    detector = _with_memory(tiny_detector_bundle, line_data[0])
    images, _ = _images(_samples(line_data[1]), detector)
    detector.thresholds = {"image": 1.0, "pixel": 2.0}
    current = save_bundle(detector, tmp_path / "current")
    older = shutil.copytree(current, tmp_path / "older")
    meta = json.loads((older / "detector.json").read_text())
    meta["format_version"] = 2
    meta["memory"]["fusion"] = {k: v for k, v in meta["memory"]["fusion"].items() if k != "map_score"}
    meta["memory"]["fusion"]["rules"] = 3
    (older / "detector.json").write_text(json.dumps(meta))
    write_manifest(older)
    old = _load(older)
    assert old.memory.fusion.map_score == "fused"
    new, legacy = _load(current).predict(images), old.predict(images)
    np.testing.assert_array_equal(legacy.scores, new.scores)  # the image score is the same formula
    # new = local/2 + memory score/2 and legacy = local/2 + fused score/2, pixel by pixel
    shift = 0.5 * (legacy.scores - _memory_scores(old, images))
    np.testing.assert_allclose(legacy.maps, new.maps + shift[:, None, None], atol=1e-4)
    assert not np.allclose(legacy.maps, new.maps, atol=1e-3)
    # The maps change, the image scores do not: only the pixel threshold goes.
    code, _, err = _cli(["memory", "set", "--detector", str(older), "--map-score", "memory"], capsys)
    assert code == 0, err
    assert "thresholds (pixel)" in err
    switched = _load(older)
    assert switched.memory.fusion.map_score == "memory" and switched.thresholds == {"image": 1.0}
    assert read_bundle_metadata(older)["memory"]["fusion"]["rules"] == 5
    np.testing.assert_array_equal(switched.predict(images).maps, new.maps)
    # A prompt weight changes the image scores, not the fused map (the memory's): the image threshold goes.
    switched.thresholds = {"image": 1.0, "pixel": 2.0}
    save_bundle(switched, older)
    code, out, err = _cli(["memory", "set", "--detector", str(older), "--prompt-weight", "0.3"], capsys)
    assert code == 0 and json.loads(out)["thresholds_dropped"] == ["image"], err
    assert _load(older).thresholds == {"pixel": 2.0}
    # Where the old formula was not in use (memory mode, no image evidence), an old bundle takes
    # today's default for a later switch to fused mode.
    legacy_memory_mode = {k: v for k, v in meta["memory"]["fusion"].items() if k != "map_score"} | {"mode": "memory"}
    assert FusionSettings.from_dict(legacy_memory_mode).map_score == "memory"
    assert FusionSettings.from_dict(legacy_memory_mode | {"mode": "fused"}).map_score == "fused"
    assert FusionSettings.from_dict(legacy_memory_mode | {"mode": "fused", "image_evidence": 0.0}).map_score == "memory"
    with pytest.raises(SystemExit) as refused:
        _cli(["memory", "set", "--detector", str(older), "--map-score", "pixels"], capsys)
    assert refused.value.code == 2 and "map score must be one of memory, fused" in capsys.readouterr().err


def _memory_scores(detector, images) -> np.ndarray:
    """The memory mode's (calibrated) image scores of `images` under the detector's memory."""
    before = detector.memory.fusion
    detector.memory.configure(FusionSettings(mode="memory", memory_position=before.memory_position,
                                             top_fraction=before.top_fraction), detector.settings.sigma)
    try:
        return detector.predict(images).scores
    finally:
        detector.memory.configure(before, detector.settings.sigma)
