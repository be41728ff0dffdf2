"""Tests for anomalyfleet.metrics: known answers, and fast paths against slow obvious versions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from anomalyfleet import metrics

EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def _blob_masks(rng: np.random.Generator, n: int, h: int, w: int, density: float = 0.08) -> np.ndarray:
    """Clumpy masks (several regions per image, some touching only diagonally) plus a normal image."""
    noise = ndimage.gaussian_filter(rng.random((n, h, w)), sigma=(0, 1.0, 1.0))
    cut = np.quantile(noise, 1.0 - density)
    masks = noise > cut
    masks[0] = False
    return masks


def _column_case(columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    scores = (np.arange(2800) / 2800.0).reshape(1, 1, 400, 7)
    masks = np.broadcast_to(np.array(columns), (400, 7)).reshape(1, 1, 400, 7).copy()
    return masks, scores


# --------------------------------------------------------------------------- image level


def test_image_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.integers(0, 5, 50).astype(float)  # ties on purpose
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert metrics.image_auroc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )


def test_image_metrics_single_class_is_nan() -> None:
    assert np.isnan(metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(metrics.image_ap([0, 0], [0.1, 0.2]))


# --------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("positive_rate", [0.1, 0.5, 0.9])
def test_pixel_auroc_matches_sklearn_with_ties(seed: int, positive_rate: float) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 1, 9, 11)) < positive_rate
    maps = rng.integers(0, 7, masks.shape).astype(np.float32) + 0.5 * masks  # many ties across classes
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_accepts_tensors_and_single_class() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((2, 8, 8)) < 0.3
    maps = rng.random((2, 8, 8))
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(expected, abs=1e-9)
    assert np.isnan(metrics.pixel_auroc(np.zeros((2, 8, 8)), maps))


# --------------------------------------------------------------------------- AUPRO (MVTec)


@pytest.mark.parametrize("columns", [[0, 0, 0, 1, 0, 0, 0], [0, 1, 0, 1, 0, 1, 0]])
def test_aupro_known_answer(columns: list[int]) -> None:
    masks, scores = _column_case(columns)
    assert metrics.aupro(masks, scores, fpr_limit=1 / 3) == pytest.approx(1 / 6, abs=1e-3)
    assert metrics.aupro(masks, scores, fpr_limit=1 / 3, num_thresholds=200) == pytest.approx(1 / 6, abs=1e-3)
    as_tensors = metrics.aupro(torch.from_numpy(masks), torch.from_numpy(scores), fpr_limit=1 / 3)
    assert as_tensors == pytest.approx(1 / 6, abs=1e-3)


def test_aupro_known_answers_averaged_over_images() -> None:
    single, scores = _column_case([0, 0, 0, 1, 0, 0, 0])
    triple, _ = _column_case([0, 1, 0, 1, 0, 1, 0])
    both = metrics.aupro(np.concatenate([single, triple]), np.concatenate([scores, scores]), fpr_limit=1 / 3)
    assert both == pytest.approx(1 / 6, abs=1e-3)


def _slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Every distinct score as a threshold, regions re-measured each time, trapezoid cut at the limit."""
    regions = []
    for mask, amap in zip(masks, maps):
        labelled, count = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)
        regions += [amap[labelled == k] for k in range(1, count + 1)]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        fpr = np.mean(normal >= threshold)
        pro = np.mean([np.mean(region >= threshold) for region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < fpr_limit:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (fpr_limit - x0)
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_version(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 4, 16, 16)
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 1)  # coarse values: ties within and across classes
    assert metrics.aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(
        _slow_aupro(masks, maps, fpr_limit), abs=1e-9
    )


def test_aupro_binned_is_close_to_exact() -> None:
    rng = np.random.default_rng(5)
    masks = _blob_masks(rng, 6, 32, 32)
    maps = rng.random(masks.shape) + masks
    exact = metrics.aupro(masks, maps)
    assert metrics.aupro(masks, maps, num_thresholds=2000) == pytest.approx(exact, abs=5e-3)


def test_regions_are_eight_connected() -> None:
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # touch only at a corner
    weights, regions = metrics._region_weights(mask)
    assert regions == 1
    np.testing.assert_allclose(weights, [0.5, 0.5])


def test_aupro_without_regions_is_nan() -> None:
    assert np.isnan(metrics.aupro(np.zeros((2, 5, 5)), np.random.default_rng(0).random((2, 5, 5))))


# --------------------------------------------------------------------------- AUPRO (AnomalyCLIP)


def _loop_aupro_anomalyclip(masks: np.ndarray, maps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3):
    """AnomalyCLIP's convention spelled out: re-binarise and re-measure every region per threshold."""
    low, high = maps.min(), maps.max()
    fprs, pros = [], []
    for threshold in np.arange(low, high, (high - low) / max_step):
        detected = maps > threshold
        overlaps = []
        for mask, hits in zip(masks, detected):
            labelled, count = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)
            for k in range(1, count + 1):
                region = labelled == k
                overlaps.append(hits[region].sum() / region.sum())
        normal = ~masks
        fprs.append(np.logical_and(normal, detected).sum() / normal.sum())
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < expect_fpr
    kept = fprs[keep]
    return auc((kept - kept.min()) / (kept.max() - kept.min()), pros[keep])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_anomalyclip_matches_loop(seed: int, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 3, 12, 12, density=0.15)
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(dtype)
    expected = _loop_aupro_anomalyclip(masks, maps)
    assert metrics.aupro_anomalyclip(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert metrics.aupro_anomalyclip(masks, maps, max_step=37, expect_fpr=0.6) == pytest.approx(
        _loop_aupro_anomalyclip(masks, maps, max_step=37, expect_fpr=0.6), abs=1e-9
    )


def test_aupro_anomalyclip_perfect_map_is_one() -> None:
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 4, 24, 24)
    # Graded, not binary: a 0/1 map puts every kept point at FPR 0, where the min-max rescaling of
    # the reference divides 0 by 0 (NaN there, NaN here).
    maps = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    assert metrics.aupro_anomalyclip(masks, maps) == pytest.approx(1.0, abs=1e-9)
    assert metrics.aupro(masks, maps) == pytest.approx(1.0, abs=1e-9)
    assert np.isnan(metrics.aupro_anomalyclip(masks, masks.astype(np.float32)))


# --------------------------------------------------------------------------- evaluate / table


def _category(rng: np.random.Generator, with_masks: bool, single_class: bool = False) -> dict:
    masks = _blob_masks(rng, 6, 16, 16)
    labels = np.zeros(6, dtype=int) if single_class else masks.reshape(6, -1).any(axis=1).astype(int)
    if single_class:
        masks[:] = False
    maps = rng.random(masks.shape).astype(np.float32) + masks
    entry = {"labels": labels, "scores": maps.reshape(6, -1).max(axis=1)}
    if with_masks:
        entry.update(masks=masks.astype(np.uint8), maps=maps)
    else:
        entry.update(masks=None, maps=None)
    return entry


def test_evaluate_with_and_without_masks() -> None:
    rng = np.random.default_rng(7)
    report = metrics.evaluate({"bottle": _category(rng, True), "tile": _category(rng, False)})
    json.dumps(report)  # plain floats and None only
    bottle, tile = report["per_category"]["bottle"], report["per_category"]["tile"]
    assert set(bottle) == set(metrics.METRIC_KEYS)
    assert all(isinstance(bottle[key], float) for key in metrics.METRIC_KEYS)
    assert all(tile[key] is None for key in metrics.PIXEL_KEYS)
    assert isinstance(tile["image_auroc"], float)
    assert report["mean"]["image_auroc"] == pytest.approx((bottle["image_auroc"] + tile["image_auroc"]) / 2)
    assert report["mean"]["aupro"] == pytest.approx(bottle["aupro"])

    table = metrics.format_table(report)
    lines = table.splitlines()
    assert lines[0].split()[0] == "category" and lines[-1].startswith("mean")
    assert f"{100 * bottle['pixel_auroc']:.1f}" in table
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert lines[3].split()[-3:] == ["-", "-", "-"]


def test_evaluate_single_class_gives_none() -> None:
    rng = np.random.default_rng(8)
    report = metrics.evaluate({"normal_only": _category(rng, True, single_class=True)})
    row = report["per_category"]["normal_only"]
    assert all(row[key] is None for key in metrics.METRIC_KEYS)
    assert all(report["mean"][key] is None for key in metrics.METRIC_KEYS)
    json.dumps(report)
    assert metrics.format_table(report).splitlines()[-1].split() == ["mean"] + ["-"] * 5


@pytest.mark.parametrize("labels", [[0, 1, 0, 1], [0, 0, 0, 0]])
def test_nan_image_scores_are_refused_by_name(labels) -> None:
    """With both classes sklearn said 'Input contains NaN'; with one, the NaN passed silently."""
    from anomalyfleet.metrics import image_ap, image_auroc

    for metric in (image_auroc, image_ap):
        with pytest.raises(ValueError, match="image scores contain NaN"):
            metric(labels, [0.1, float("nan"), 0.3, 0.4])
