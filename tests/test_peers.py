"""Peers: a line memory's distances completed with each image's mutual scores among its group."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyfleet.cli import main
from anomalyfleet.memory import LineMemory, mutual_patch_scores, peer_patch_scores


def _memory(bank: torch.Tensor, layers=(6,), grid=(4, 4)) -> LineMemory:
    return LineMemory(layers=layers, banks=[F.normalize(bank, dim=-1)] * len(layers), grid=grid, shots=1,
                      built_with={"image_size": 16})


def test_peer_scores_are_mutual_scores_averaged_over_the_memory_layers():
    torch.manual_seed(0)
    a, b = torch.randn(6, 16, 8), torch.randn(6, 16, 8)
    torch.testing.assert_close(peer_patch_scores([a]), mutual_patch_scores(a))
    torch.testing.assert_close(peer_patch_scores([a, b]), (mutual_patch_scores(a) + mutual_patch_scores(b)) / 2)
    torch.testing.assert_close(peer_patch_scores([a], fraction=0.6), mutual_patch_scores(a, fraction=0.6))


def test_a_patch_keeps_the_smaller_of_its_memory_and_peer_distances():
    torch.manual_seed(1)
    memory = _memory(torch.randn(20, 8))
    patches = torch.randn(5, 16, 8)
    alone = memory.patch_scores([patches])
    peers = torch.rand(5, 16)
    with_peers = memory.patch_scores([patches], peers=peers)
    torch.testing.assert_close(with_peers, torch.minimum(alone, peers))
    assert (with_peers <= alone).all() and (with_peers < alone).any()
    with pytest.raises(ValueError, match="do not match"):
        memory.patch_scores([patches], peers=torch.rand(5, 15))


def test_peers_clear_normal_variation_the_memory_lacks_and_keep_a_rare_defect():
    """The memory saw one texture; the line also makes a second one (most of the batch shows it in a
    corner). Alone, the memory scores that corner like a defect; with peers, only the real defect
    (in one image) stays far from everything."""
    torch.manual_seed(2)
    texture, variant = torch.randn(16, 8), torch.randn(8)
    memory = _memory(texture + 0.01 * torch.randn(16, 8))
    images = []
    for i in range(10):
        x = texture + 0.01 * torch.randn(16, 8)
        if i < 8:
            x[0] = variant + 0.01 * torch.randn(8)  # normal: a second texture of the line
        images.append(x)
    images[9][7] = 3 * torch.randn(8)  # a defect, in one image only
    patches = torch.stack(images)
    alone = memory.patch_scores([patches])
    combined = memory.patch_scores([patches], peers=peer_patch_scores([patches]))
    assert alone[:8, 0].min() > 0.5 * alone[9, 7]  # the memory alone: the variant looks anomalous
    assert combined[:8, 0].max() < 0.1 * combined[9, 7]  # with peers it is normal; the defect is not
    assert combined[9, 7] == pytest.approx(float(alone[9, 7]), rel=0.2)


@pytest.fixture(scope="module")
def memory_bundle(tmp_path_factory, openai_clip_file):
    """A tiny detector with a line memory of 4 normal images (12 given: the other 8 calibrate it, enough
    for the position-normalised scores, so peers are tested with them on)."""
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.bundle import load_bundle, save_bundle
    from anomalyfleet.detector import Detector
    from tests.image_sets import write_folder_dataset, write_line_images

    root = tmp_path_factory.mktemp("peers")
    detector = Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                               image_size=56, layers=(6,), dpam_layers=4, seed=5)
    detector.thresholds["image"] = 0.5
    plain = save_bundle(detector, root / "plain")
    normals = write_folder_dataset(root / "normals", normals=12, anomalies=0, seed=1)
    with_memory = root / "with-memory"
    # Without its images' flips and turns: a memory thin enough that peers add normal evidence to it.
    assert main(["memory", "build", "--detector", str(plain), "--data", f"folder:{normals}", "--k", "4",
                 "--views", "none", "--out", str(with_memory), "--quiet"]) == 0
    detector = load_bundle(with_memory)
    assert detector.memory.fusion.uses_memory_position and detector.memory.fusion.position_weight > 0
    detector.thresholds["image"] = 0.5  # building the memory dropped the prompts' (another scale)
    save_bundle(detector, with_memory)
    return plain, with_memory, write_line_images(root / "test", normals=9, anomalies=3, seed=2)


def _records(out):
    return [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]


def test_score_with_peers_is_the_bundles_prediction_with_the_groups_peer_scores(memory_bundle, tmp_path):
    from anomalyfleet.batch_zero_shot import predict_group_with_peers
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.data import AnomalyDataset, Sample
    from anomalyfleet.scoring import list_images

    _, bundle, test = memory_bundle
    with_peers, without = tmp_path / "peers", tmp_path / "plain"
    for out, extra in ((with_peers, ["--peers", "64"]), (without, [])):
        assert main(["score", "--detector", str(bundle), "--images", str(test), "--out", str(out),
                     "--no-overlays", "--quiet", *extra]) == 0
    records, plain = _records(with_peers), _records(without)
    assert len(records) == 12 and all(r["group"] == 0 and r["group_size"] == 12 for r in records)
    # The bundle's scale and threshold, not batch zero-shot's z-scale.
    assert all(r["threshold"] == 0.5 and r["anomalous"] == (r["score"] >= 0.5) for r in records)
    scores, before = np.array([r["score"] for r in records]), np.array([r["score"] for r in plain])
    # Distances only fall, and every calibration is increasing: no score or map rises.
    assert (scores <= before + 1e-5).all() and (scores < before - 1e-4).any()
    assert (np.load(with_peers / records[0]["map"]) <= np.load(without / plain[0]["map"]) + 1e-5).all()

    detector = load_bundle(bundle)
    files = list_images(test)
    dataset = AnomalyDataset([Sample(str(f), 0, None, "x") for f in files], image_size=56, mean=detector.mean,
                             std=detector.std)
    with torch.inference_mode():
        features = detector.extract(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
        expected = predict_group_with_peers(detector, features)
    np.testing.assert_allclose(scores, expected.scores, atol=1e-5)


def test_eval_with_peers_records_them_and_does_not_depend_on_batching(memory_bundle, tmp_path):
    _, bundle, test = memory_bundle
    reports = []
    for batch in ("2", "8"):
        out = tmp_path / f"report-{batch}.json"
        assert main(["eval", "--detector", str(bundle), "--data", f"folder:{test.parent / 'parts'}", "--peers", "5",
                     "--batch-size", batch, "--out", str(out), "--quiet"]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["peers"] == {"group_size": 5, "order_seed": 0}
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert reports[0]["mean"][key] == pytest.approx(reports[1]["mean"][key], abs=1e-6)


def test_peers_refuse_what_they_cannot_do_and_write_nothing(memory_bundle, tmp_path, capsys):
    plain, bundle, test = memory_bundle
    prompts_mode = tmp_path / "prompts-mode"
    assert main(["memory", "set", "--detector", str(bundle), "--out", str(prompts_mode), "--mode", "prompts"]) == 0
    capsys.readouterr()
    cases = [
        (["--detector", str(plain), "--peers", "8"], "this bundle has none"),
        (["--detector", str(prompts_mode), "--peers", "8"], "switched off (mode prompts"),
        (["--detector", str(bundle), "--peers", "8", "--batch-zero-shot", "8"], "choose one of them"),
        (["--detector", str(plain), "--peers", "8", "--ray"], "has none (anomalyfleet memory build adds one)"),
        (["--detector", str(bundle), "--peers", "4"], "peers groups hold 5 to 512 images, got 4"),
        (["--detector", str(bundle), "--peers", "600"], "peers groups hold 5 to 512 images, got 600"),
    ]
    for extra, reason in cases:
        out = tmp_path / "never"
        code = main(["score", "--images", str(test), "--out", str(out), "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists()


# --- the service: a line's rolling window as the memory's peers -----------------------------------


def _pixels(folder, size=56):
    from anomalyfleet.data.transforms import load_image
    from anomalyfleet.serving.inputs import model_pixels

    paths = sorted(folder.glob("*.png"))
    return paths, [model_pixels(load_image(p), size) for p in paths]


def test_pool_window_of_peers_completes_the_memory_and_leaves_other_lines_alone(memory_bundle):
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.data.transforms import load_image, preprocess_image
    from anomalyfleet.errors import ConfigError
    from anomalyfleet.rolling_window import RollingWindow
    from anomalyfleet.serving.config import WindowSettings
    from anomalyfleet.serving.registry import manifest_version
    from anomalyfleet.serving.service import DetectorPool, ScoreItem

    plain, bundle, test = memory_bundle
    paths, pixels = _pixels(test)
    settings = WindowSettings(size=5, min_images=3, peers=True)
    pool = DetectorPool("cpu")
    loaded = pool.load(f"{bundle}#{manifest_version(bundle)}")

    def run(indices, want_map=False):
        items = [ScoreItem("p", pixels[i], want_map, settings) for i in indices]
        items.append(ScoreItem("plain", pixels[indices[0]], want_map))  # same bundle, no window
        return pool.run(loaded, items)

    first = run([0, 1, 2])
    assert [(o.source, o.window_images) for o in first] == [("fused", 0)] * 3 + [("fused", None)]
    second = run([3, 10], want_map=True)
    assert [(o.source, o.window_images) for o in second] == [("fused+peers", 3)] * 2 + [("fused", None)]

    reference = load_bundle(bundle)
    batch = torch.stack([preprocess_image(load_image(paths[i]), 56, reference.mean, reference.std)
                         for i in (0, 1, 2, 3, 10)])
    features = reference.extract(batch)
    layer = reference.memory.layers[0]
    patches = features.patch_features[reference.feature_layers.index(layer)]
    window = RollingWindow(5, reference.backbone.grid, 56, min_images=3, fraction=settings.fraction)
    window.add(patches[:3])
    peers = window.patch_scores(patches[3:])  # each against the three held before it, not each other
    from anomalyfleet.backbones import Features

    query = Features(global_feature=features.global_feature[3:], patch_features=[p[3:] for p in features.patch_features],
                     grid=features.grid)
    expected = reference.predict_features(query, peers=peers)
    np.testing.assert_allclose([o.score for o in second[:2]], expected.scores, atol=1e-5)
    np.testing.assert_allclose(second[0].map, expected.maps[0], atol=1e-5)
    alone = reference.predict_features(query)
    assert second[2].score == pytest.approx(float(alone.scores[0]), abs=1e-5)  # the plain line: no peers
    assert all(o.score <= float(a) + 1e-5 for o, a in zip(second[:2], alone.scores))

    # Peers need a line memory in the bundle, on its block.
    no_memory = pool.load(f"{plain}#{manifest_version(plain)}")
    with pytest.raises(ConfigError, match="window of peers: .* this bundle has none"):
        pool.window_layer(settings, no_memory.detector)
    with pytest.raises(ConfigError, match="not block 2"):
        pool.window_layer(WindowSettings(peers=True, layer=2), loaded.detector)
    assert pool.window_layer(WindowSettings(peers=True), loaded.detector) == layer


@pytest.mark.slow
def test_serve_line_with_a_window_of_peers(memory_bundle, tmp_path):
    requests = pytest.importorskip("requests")
    from anomalyfleet.serving.config import ServiceConfig
    from tests.ray_serve_helpers import local_serve
    from tests.s3server import free_port

    plain, bundle, test = memory_bundle
    paths, _ = _pixels(test)
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        "version: 1\n"
        "lines:\n"
        f"  press-7: {{bundle: {bundle}, window: {{size: 6, min_images: 3, peers: true, shared: true}}}}\n"
        f"  press-8: {{bundle: {plain}, window: {{peers: true}}}}\n"
    )
    config = ServiceConfig(registry=str(registry), min_replicas=1, max_replicas=1, num_cpus=0.5,
                           gateway_num_cpus=0.25, gateway_max_replicas=1, max_batch_size=2,
                           window_timeout_s=120)  # the shared window's actor starts on the first request
    with local_serve(config, free_port(), free_port(), include_dashboard=False) as base:
        seen = []
        for image in paths[:5]:
            r = requests.post(f"{base}/v1/lines/press-7/score", data=image.read_bytes(),
                              headers={"Content-Type": "image/png"}, timeout=180)  # above the window's 120 s
            assert r.status_code == 200, r.text
            body = r.json()
            assert "window" in body, body
            seen.append((body["source"], body["window"]["images"], body["threshold"]))
            assert body["window"]["peers"] is True and body["window"]["shared"] is True
        # The bundle's threshold throughout: the window lends its images, the bundle keeps its scale.
        assert seen == [("fused", 0, 0.5), ("fused", 1, 0.5), ("fused", 2, 0.5), ("fused+peers", 3, 0.5),
                        ("fused+peers", 4, 0.5)]
        r = requests.post(f"{base}/v1/lines/press-8/score", data=paths[0].read_bytes(), timeout=60)
        assert r.status_code == 503 and "this bundle has none" in r.json()["detail"], r.text
        # Republishing the line onto a bundle without a memory is refused at the switch: the line
        # keeps serving its previous bundle with peers, and the listing says why.
        registry.write_text(registry.read_text().replace(f"bundle: {bundle}, window", f"bundle: {plain}, window"))
        deadline, listing = time.time() + 60, {}
        while time.time() < deadline:
            listing = requests.get(f"{base}/v1/lines", timeout=30).json()
            if "press-7" in listing.get("unavailable", {}):
                break
            time.sleep(1)
        reason = listing["unavailable"].get("press-7", "")
        assert "this bundle has none" in reason and "still serving the previous bundle" in reason, listing
        health = requests.get(f"{base}/healthz", timeout=30).json()
        assert health["stale"] == 1 and health["unavailable"] == 0, health  # agrees with the listing
        r = requests.post(f"{base}/v1/lines/press-7/score", data=paths[5].read_bytes(), timeout=60)
        assert r.status_code == 200 and r.json()["source"] == "fused+peers", r.text


@pytest.mark.parametrize("fusion", [{"mode": "fused"}, {"mode": "memory"}, {"mode": "memory", "image_evidence": 0.0},
                                    {"mode": "fused", "prompt_weight": 0.5, "prompt_map_weight": 0.3}])
def test_peers_never_raise_a_score_or_a_map_in_any_mode(memory_bundle, fusion):
    from dataclasses import replace

    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.data import AnomalyDataset, Sample
    from anomalyfleet.scoring import list_images

    _, bundle, test = memory_bundle
    detector = load_bundle(bundle)
    detector.memory.configure(replace(detector.memory.fusion, **fusion), detector.settings.sigma)
    files = list_images(test)
    dataset = AnomalyDataset([Sample(str(f), 0, None, "x") for f in files], image_size=56, mean=detector.mean,
                             std=detector.std)
    with torch.inference_mode():
        features = detector.extract(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
        layer = detector.feature_layers.index(detector.memory.layers[0])
        peers = peer_patch_scores([features.patch_features[layer]])
        alone, together = detector.predict_features(features), detector.predict_features(features, peers=peers)
    assert (together.scores <= alone.scores + 1e-5).all() and (together.scores < alone.scores - 1e-4).any()
    assert (together.maps <= alone.maps + 1e-5).all()


def test_eval_with_peers_groups_each_category_on_its_own(memory_bundle, tmp_path):
    """A product's peers are of that product: evaluated together with another set or alone, a
    category gets the same metrics."""
    from tests.image_sets import write_folder_dataset

    _, bundle, test = memory_bundle
    first = test.parent / "parts"
    other = write_folder_dataset(tmp_path / "other", normals=6, anomalies=3, seed=9)
    reports = {}
    for name, specs in (("both", [first, other]), ("alone", [other])):
        out = tmp_path / f"{name}.json"
        args = ["eval", "--detector", str(bundle), "--peers", "5", "--out", str(out), "--quiet"]
        for spec in specs:
            args += ["--data", f"folder:{spec}"]
        assert main(args) == 0
        reports[name] = json.loads(out.read_text())
    both, alone = reports["both"]["per_category"], reports["alone"]["per_category"]
    (category,) = alone
    assert len(both) == 2 and category in both
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert both[category][key] == pytest.approx(alone[category][key], abs=1e-9)


def test_a_shared_window_with_older_code_leaves_the_bundle_to_score_alone(memory_bundle, monkeypatch, caplog):
    """An actor started before peers existed answers with its own z-scores: those are not peers and
    must not be served as the bundle's scores."""
    from anomalyfleet.serving.config import WindowSettings
    from anomalyfleet.serving.registry import manifest_version
    from anomalyfleet.serving.service import DetectorPool, ScoreItem
    from anomalyfleet.serving.window_keeper import WindowKeeper

    _, bundle, test = memory_bundle
    _, pixels = _pixels(test)

    def old_code(self, spec, patches):  # what an actor without peers_then_add returns
        window = self.window_for(spec)
        held = window.count
        return window.score_then_add(patches), held

    monkeypatch.setattr(WindowKeeper, "score_then_add", old_code)
    settings = WindowSettings(size=5, min_images=3, peers=True)
    pool = DetectorPool("cpu")
    loaded = pool.load(f"{bundle}#{manifest_version(bundle)}")
    pool.run(loaded, [ScoreItem("p", pixels[i], False, settings) for i in range(3)])
    # Ray's serve logger does not propagate to the root logger once Serve has set it up (which
    # depends on what ran before in this process): listen on it directly.
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="ray.serve"):
            late = pool.run(loaded, [ScoreItem("p", pixels[i], False, settings) for i in (3, 4)])
    finally:
        serve_logger.removeHandler(caplog.handler)
    plain = pool.run(loaded, [ScoreItem("plain", pixels[i], False) for i in (3, 4)])
    assert [o.source for o in late] == ["fused", "fused"]
    assert [o.score for o in late] == pytest.approx([o.score for o in plain], abs=1e-6)
    assert "does not lend peers" in caplog.text


def test_calibrate_with_peers_sets_thresholds_for_scoring_with_peers(memory_bundle, tmp_path, capsys):
    """Normal images score lower with peers, so the false-alarm threshold set with them is lower;
    it is the one the peers' scores give, and the bundle records the group size it holds for.
    Without a memory: one line, nothing written."""
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.calibration import detector_scores, threshold_for_false_alarm_rate
    from anomalyfleet.data import parse_data_specs
    from tests.image_sets import write_folder_dataset

    plain, bundle, _ = memory_bundle
    normals = f"folder:{write_folder_dataset(tmp_path / 'normals', normals=12, anomalies=0, seed=7)}"
    outs = {}
    for name, extra in (("plain", []), ("peers", ["--peers", "5"])):
        out = tmp_path / name
        assert main(["calibrate", "--detector", str(bundle), "--data", normals, "--false-alarm-rate", "0.1",
                     "--out", str(out), "--quiet", *extra]) == 0
        outs[name] = load_bundle(out)
    capsys.readouterr()
    with_peers, without = outs["peers"], outs["plain"]
    assert with_peers.metadata["extras"]["calibration"]["peers"] == 5
    assert without.metadata["extras"]["calibration"]["peers"] is None
    assert with_peers.thresholds["image"] < without.thresholds["image"]
    scores, _ = detector_scores(load_bundle(bundle), parse_data_specs([normals]), progress=False, peers=5)
    assert with_peers.thresholds["image"] == pytest.approx(threshold_for_false_alarm_rate(scores, 0.1), abs=1e-6)
    never = tmp_path / "never"
    assert main(["calibrate", "--detector", str(plain), "--data", normals, "--out", str(never), "--peers", "5",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "this bundle has none" in err and len(err.strip().splitlines()) == 1 and not never.exists()
    # Scoring the other way than the thresholds were set warns; the same way does not.
    images = str(write_folder_dataset(tmp_path / "to-score", normals=5, anomalies=0, seed=8) / "normal")
    cases = ((tmp_path / "peers", [], "set for scoring with peers (groups of 5)"),
             (tmp_path / "peers", ["--peers", "5"], None),
             (tmp_path / "plain", ["--peers", "5"], "calibrate --peers 5"),
             (tmp_path / "plain", [], None))
    for i, (scored_bundle, extra, warning) in enumerate(cases):
        assert main(["score", "--detector", str(scored_bundle), "--images", images, "--out", str(tmp_path / f"s{i}"),
                     "--no-overlays", "--no-maps", "--quiet", *extra]) == 0
        err = capsys.readouterr().err
        assert (warning in err) if warning else "warning" not in err, (extra, err)
    # Bulk scoring reads each line's bundle the same way before any actor starts.
    from anomalyfleet.bulk_scoring import BulkScoreConfig, resolve_inputs, thresholds_warnings

    for peers, count in ((None, 1), (5, 0)):
        config = BulkScoreConfig(inputs=resolve_inputs([f"line-7={images}"], None, str(tmp_path / "peers")),
                                 output=str(tmp_path / "bulk"), peers=peers)
        found = thresholds_warnings(config)
        assert len(found) == count and all(w.startswith("line line-7: ") for w in found)
    # A registry threshold replaces the bundle's: nothing to warn about.
    from anomalyfleet.bulk_scoring import LineInput

    own = BulkScoreConfig(inputs=(LineInput("line-7", images, str(tmp_path / "peers"), 0.5),),
                          output=str(tmp_path / "bulk"))
    assert thresholds_warnings(own) == []
    # The service says it per line in /v1/lines (the registry's line state), and serves anyway.
    from anomalyfleet.serving.config import WindowSettings
    from anomalyfleet.serving.registry import LineSpec, resolve_line

    peers_window = WindowSettings(size=5, min_images=3, peers=True)
    # Thresholds set with peers, a window of peers: only its start, before it holds min_images, is noted.
    for scored_bundle, window, noted in ((tmp_path / "peers", None, "set for scoring with peers"),
                                         (tmp_path / "peers", peers_window, "until its window holds 3 images"),
                                         (tmp_path / "plain", peers_window, "set without peers"),
                                         (tmp_path / "plain", None, None)):
        state = resolve_line("line-7", LineSpec(bundle=str(scored_bundle), window=window), None)
        assert state.public()["notes"] == list(state.notes)
        assert (len(state.notes) == 1 and noted in state.notes[0]) if noted else state.notes == (), state.notes
    ignored = resolve_line("line-7", LineSpec(bundle=str(tmp_path / "peers"), threshold=0.5), None)
    assert ignored.notes == ()  # a registry threshold replaces the bundle's


def test_training_from_a_bundle_with_a_memory_may_change_its_settings(memory_bundle, tmp_path):
    """--init-bundle drops the line memory (new prompts void its calibration); the memory must not
    refuse the image size or depth the new training asks for before it is dropped."""
    from anomalyfleet.distributed.config import DistributedTrainConfig
    from anomalyfleet.distributed.train_loop import build_detector

    _, with_memory, _ = memory_bundle
    config = DistributedTrainConfig(data=("folder:unused",), output=str(tmp_path / "out"), init_bundle=str(with_memory),
                                    image_size=70, dpam_layers=3)
    detector = build_detector(config)
    assert detector.memory is None
    assert detector.settings.image_size == 70 and detector.settings.dpam_layers == 3


def test_a_memory_rebuilt_for_prompts_alone_drops_the_memory_scale_thresholds(memory_bundle, tmp_path):
    """Thresholds set on a memory's calibrated scale (1 = normal images' 99th percentile) mean
    nothing to probabilities: rebuilt with --mode prompts, the bundle drops them, and a registry
    threshold above 1 on it is refused (no image would ever be flagged)."""
    from anomalyfleet.bundle import read_bundle_metadata
    from anomalyfleet.errors import ConfigError
    from anomalyfleet.serving.registry import parse_registry, resolve_line
    from tests.image_sets import write_folder_dataset

    _, with_memory, _ = memory_bundle
    assert read_bundle_metadata(with_memory)["thresholds"].get("image") == 0.5
    normals = write_folder_dataset(tmp_path / "normals", normals=6, anomalies=0, seed=4)
    prompts_only = tmp_path / "prompts-only"
    assert main(["memory", "build", "--detector", str(with_memory), "--data", f"folder:{normals}", "--k", "2",
                 "--views", "none", "--mode", "prompts", "--out", str(prompts_only), "--quiet"]) == 0
    assert read_bundle_metadata(prompts_only)["thresholds"].get("image") is None
    spec = parse_registry(f"lines:\n  a: {{bundle: {prompts_only}, threshold: 1.5}}\n").lines["a"]
    with pytest.raises(ConfigError, match="above 1, but its bundle scores with prompts alone"):
        resolve_line("a", spec, None)
