"""Flipped and turned views of a line memory's images: exact transforms, leave-one-out that keeps an
image's views out of its own comparison, and a memory that recognises a flipped normal image."""

import json

import pytest
import torch
import torch.nn.functional as F

from anomalyfleet.memory import FusionSettings, build_line_memory, fit_line_memory, leave_one_out_scores, nearest_distance
from anomalyfleet.memory_views import VIEW_SETS, image_views, view_names


def test_views_are_distinct_pixel_permutations_with_the_image_first():
    images = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    for name, expected in (("none", 1), ("flips", 4), ("d4", 8)):
        views = image_views(images, name)
        assert len(views) == expected == len(view_names(name))
        assert torch.equal(views[0], images)
        for view in views:
            assert view.shape == images.shape
            # Pixels moved within each channel, none changed or mixed across images or channels.
            assert torch.equal(view.flatten(2).sort(dim=-1).values, images.flatten(2).sort(dim=-1).values)
        flat = torch.stack([v.flatten() for v in views])
        assert torch.cdist(flat, flat).add(torch.eye(len(views)) * 1e9).min() > 1e-3  # pairwise distinct
    # The eight views are the square's symmetries: closed under composition.
    d4 = image_views(images, "d4")
    composed = image_views(d4[5], "d4")  # every symmetry applied after one quarter turn
    for view in composed:
        assert any(torch.equal(view, other) for other in d4)


def test_view_sets_reject_bad_input():
    with pytest.raises(ValueError, match="one of none, flips, d4"):
        view_names("rotations")
    with pytest.raises(ValueError, match="square"):
        image_views(torch.zeros(1, 3, 4, 6), "d4")
    assert len(image_views(torch.zeros(1, 3, 4, 6), "flips")) == 4  # flips keep the shape
    with pytest.raises(ValueError, match="B, C, H, W"):
        image_views(torch.zeros(3, 4, 4), "flips")
    assert set(VIEW_SETS) == {"none", "flips", "d4"}
    from anomalyfleet.memory_views import other_view_patches

    with pytest.raises(ValueError, match="no other views"):
        other_view_patches(None, torch.zeros(1, 3, 4, 4), (4,), "none")


def test_leave_one_out_keeps_all_views_of_an_image_out_and_queries_its_own():
    """With V views per image, image i is scored by its own P patches against every row of the
    other images: brute force over the same rows, and never against its own flipped copy."""
    torch.manual_seed(3)
    n, views, per_view, width = 5, 4, 6, 8
    patches = torch.randn(n, views * per_view, width)
    patches[:, per_view:2 * per_view] = patches[:, :per_view] + 1e-3  # a near copy of each own view
    scores = leave_one_out_scores(patches, queries=per_view)
    assert scores.shape == (n, per_view)
    flat = F.normalize(patches, dim=-1)
    for i in range(n):
        others = torch.cat([flat[j] for j in range(n) if j != i])
        torch.testing.assert_close(scores[i], nearest_distance(flat[i, :per_view], others))
    assert scores.min() > 0.05  # the near copies were excluded (they would give ~0)
    with_coreset = leave_one_out_scores(patches, coreset=40, queries=per_view)
    assert with_coreset.shape == (n, per_view) and bool((with_coreset >= scores - 1e-6).all())


def test_a_bank_with_views_is_cut_to_what_a_plain_memory_of_16_images_holds():
    grid = (2, 2)
    patches = torch.randn(3, 8 * 4, 8, generator=torch.Generator().manual_seed(1))
    fusion = FusionSettings(mode="memory")
    cut = fit_line_memory((6,), [patches], grid, 8, {}, fusion=fusion, views=8)
    assert cut.bank(6).features.shape[0] == cut.coreset == 16 * 4  # 96 rows > 64
    small = fit_line_memory((6,), [patches[:, :8]], grid, 8, {}, fusion=fusion, views=2)
    assert small.bank(6).features.shape[0] == 3 * 2 * 4 and small.coreset is None  # 24 rows: kept
    chosen = fit_line_memory((6,), [patches], grid, 8, {}, fusion=fusion, views=8, coreset=90)
    assert chosen.bank(6).features.shape[0] == 90  # an explicit coreset wins
    many = torch.randn(20, 2 * 4, 8, generator=torch.Generator().manual_seed(2))
    assert fit_line_memory((6,), [many], grid, 8, {}, fusion=fusion, views=2).coreset == 20 * 4  # k > 16: k's worth


def test_fit_line_memory_checks_the_view_layout():
    patches = torch.randn(3, 2 * 16, 8)
    memory = fit_line_memory((6,), [patches], (4, 4), 8, {}, fusion=FusionSettings(mode="memory"), views=2)
    assert memory.bank(6).features.shape == (3 * 2 * 16, 8) and memory.shots == 3
    assert "2 views each" in memory.info["memory_calibration"]
    with pytest.raises(ValueError, match="do not hold 3 view"):
        fit_line_memory((6,), [patches], (4, 4), 8, {}, fusion=FusionSettings(mode="memory"), views=3)


@pytest.fixture(scope="module")
def tiny_detector(openai_clip_file):
    from anomalyfleet.backbones import BackboneSpec
    from anomalyfleet.detector import Detector

    return Detector.create(BackboneSpec(kind="openai_file", pretrained=str(openai_clip_file)),
                           image_size=56, layers=(6,), dpam_layers=4, seed=5)


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    from anomalyfleet.data import parse_data_specs
    from tests.image_sets import write_folder_dataset

    root = write_folder_dataset(tmp_path_factory.mktemp("views") / "normals", normals=6, anomalies=0, seed=4)
    return parse_data_specs([f"folder:{root}"])


def _image(sample, detector):
    from anomalyfleet.data import AnomalyDataset

    dataset = AnomalyDataset([sample], image_size=detector.image_size, mean=detector.mean, std=detector.std)
    return dataset[0]["image"][None]


def test_a_memory_with_views_knows_its_images_flipped_and_turned(tiny_detector, normals):
    """A memory image's flipped or turned copy is made of exactly the patches of one of its views:
    with those views in the memory it scores 0; without them, it does not."""
    detector = tiny_detector
    layer = 4
    kwargs = dict(k=1, layers=(layer,), fusion=FusionSettings(mode="memory"), progress=False)
    plain = build_line_memory(detector, normals, views="none", **kwargs)
    flips = build_line_memory(detector, normals, views="flips", **kwargs)
    d4 = build_line_memory(detector, normals, views="d4", **kwargs)
    patches = detector.backbone.grid[0] * detector.backbone.grid[1]
    assert [m.bank(layer).features.shape[0] for m in (plain, flips, d4)] == [patches, 4 * patches, 8 * patches]
    assert (plain.info["views"], d4.info["views"]) == ("none", "d4")
    # The same calibration images were scored against a larger bank: lower distances, lower centre.
    assert d4.memory_calibration.centre < plain.memory_calibration.centre
    chosen = next(s for s in normals if s.image == plain.info["images"][0])
    image = _image(chosen, detector)

    def scores(memory, view):
        with torch.inference_mode():
            return memory.patch_scores([detector.extract(view, layers=(layer,)).patch_features[0]])

    own = image_views(image, "d4")
    assert float(scores(plain, own[0]).max()) < 1e-4  # the memory image itself
    assert float(scores(plain, own[1]).mean()) > 1e-3  # its mirror image is new to a plain memory
    assert float(scores(flips, own[1]).max()) < 1e-4
    assert float(scores(flips, own[5]).mean()) > 1e-3  # a quarter turn is not among the flips
    assert max(float(scores(d4, view).max()) for view in own) < 1e-4


def test_memory_images_across_batches_keep_their_views_together(tiny_detector, normals):
    """k = 3 memory images in batches of 2, no held-out image (leave-one-out calibrates): the bank
    holds, image after image, each one's own patches and then its flips, as computed one by one."""
    from anomalyfleet.memory import MapCalibration, upsample_patch_scores

    detector, layer = tiny_detector, 4
    memory = build_line_memory(detector, normals, k=3, layers=(layer,), views="flips", calibration_images=0,
                               batch_size=2, fusion=FusionSettings(mode="memory"), progress=False)
    assert "leave-one-out over 3 memory images" in memory.info["memory_calibration"]
    assert "(4 views each)" in memory.info["memory_calibration"]
    chosen = [next(s for s in normals if s.image == path) for path in memory.info["images"]]
    with torch.inference_mode():
        expected = torch.stack([torch.cat([detector.extract(view, layers=(layer,)).patch_features[0][0]
                                           for view in image_views(_image(sample, detector), "flips")])
                                for sample in chosen])  # (3, 4 * P, D)
    bank = memory.bank(layer).features
    torch.testing.assert_close(bank, F.normalize(expected.reshape(-1, expected.shape[-1]), dim=-1),
                               atol=1e-4, rtol=0)
    # Leave-one-out: each image's own patches against the other two images and all their views.
    grid = detector.backbone.grid
    patches = grid[0] * grid[1]
    rows = F.normalize(expected, dim=-1)
    by_hand = torch.stack([nearest_distance(rows[i, :patches], torch.cat([rows[j] for j in range(3) if j != i]))
                           for i in range(3)])
    truth = MapCalibration.fit(upsample_patch_scores(by_hand, grid, detector.image_size))
    assert abs(memory.memory_calibration.centre - truth.centre) < 1e-4
    assert abs(memory.memory_calibration.spread - truth.spread) < 1e-4


def test_views_are_recorded_in_the_bundle(tiny_detector, normals, tmp_path):
    from anomalyfleet.bundle import load_bundle, save_bundle

    tiny_detector.memory = build_line_memory(tiny_detector, normals, k=2, views="flips", progress=False)
    try:
        saved = save_bundle(tiny_detector, tmp_path / "det")
    finally:
        tiny_detector.memory = None
    meta = json.loads((saved / "detector.json").read_text())
    assert meta["memory"]["info"]["views"] == "flips"
    again = load_bundle(saved)
    assert again.memory.info["views"] == "flips" and again.memory.shots == 2
    patches = again.backbone.grid[0] * again.backbone.grid[1]
    assert again.memory.bank(again.memory.layers[0]).features.shape[0] == 2 * 4 * patches


def test_the_cli_offers_the_libraries_view_sets():
    from anomalyfleet import cli_memory, memory_views

    assert cli_memory.VIEW_SETS == tuple(memory_views.VIEW_SETS)
    assert cli_memory.DEFAULT_VIEWS == memory_views.DEFAULT_VIEWS
