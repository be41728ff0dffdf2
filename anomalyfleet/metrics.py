"""Anomaly-detection evaluation metrics: image AUROC/AP, pixel AUROC and two AUPRO conventions.

Pixel metrics are written for whole benchmark categories in one call (hundreds of 518x518 maps,
about 1e8 pixels), so they never hand every pixel to scikit-learn. They sort each class once and
work on the handful of points where the curves can bend, which keeps them exact and fast.

Two AUPRO conventions exist in the literature and give different numbers for the same maps:

* ``aupro`` follows MVTec AD / anomalib: the PRO-vs-FPR curve over every distinct score, integrated
  up to ``fpr_limit`` and divided by it.
* ``aupro_anomalyclip`` follows AnomalyCLIP's ``cal_pro_score`` (itself from cflow-ad): 200 evenly
  spaced thresholds, points with FPR below the limit, FPRs min-max rescaled to [0, 1], then area.

Published AnomalyCLIP tables use the second, so both are reported.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

METRIC_KEYS: tuple[str, ...] = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_anomalyclip")
PIXEL_KEYS: tuple[str, ...] = ("pixel_auroc", "aupro", "aupro_anomalyclip")

# MVTec's reference evaluation labels ground-truth regions with a full 3x3 structuring element,
# anomalib uses cv2.connectedComponents (default connectivity 8) on CPU and a 3x3 max-pool
# propagation on GPU, and skimage.measure.label (behind AnomalyCLIP's regionprops) defaults to
# full connectivity: all of them are 8-connected in 2D. The zero planes above and below stop
# regions from joining across images when a whole (N, H, W) stack is labelled in one call.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# --------------------------------------------------------------------------- input handling


def _to_numpy(values: Any) -> np.ndarray:
    # Torch tensors may live on a GPU or carry autograd history; np.asarray cannot take those.
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _as_stack(values: Any, name: str) -> np.ndarray:
    array = _to_numpy(values)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W), got shape {array.shape}")
    return array


def _as_scores(maps: Any) -> np.ndarray:
    array = _as_stack(maps, "maps")
    # Keep float32 as float32: doubling 1e8 pixels costs memory, and AnomalyCLIP's thresholds are
    # computed in the maps' own dtype, so upcasting would change which pixels pass them.
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    if np.isnan(array).any():
        raise ValueError("maps contain NaN")
    return array


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    mask = _as_stack(masks, "masks")
    scores = _as_scores(maps)
    if mask.shape != scores.shape:
        raise ValueError(f"masks {mask.shape} and maps {scores.shape} differ in shape")
    if mask.dtype != bool:
        mask = mask > 0
    return mask, scores


def _split_sorted(mask: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of anomalous and of normal pixels, each sorted ascending."""
    positives = scores[mask]
    negatives = scores[~mask]
    # In place: both are fresh copies already, and a second copy of 1e8 floats is not free.
    positives.sort()
    negatives.sort()
    return positives, negatives


# --------------------------------------------------------------------------- image level


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _to_numpy(labels).reshape(-1).astype(np.int64)
    s = _to_numpy(scores).reshape(-1).astype(np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if np.isnan(s).any():  # as for maps: a metric over NaN is no metric, whatever the classes present
        raise ValueError("image scores contain NaN")
    return y, s


def _has_both_classes(labels: np.ndarray) -> bool:
    return np.unique(labels).size == 2


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level AUROC; NaN when only one class is present."""
    y, s = _image_inputs(labels, scores)
    if not _has_both_classes(y):
        return float("nan")
    return float(roc_auc_score(y, s))


def image_ap(labels: Any, scores: Any) -> float:
    """Image-level average precision; NaN when only one class is present."""
    y, s = _image_inputs(labels, scores)
    if not _has_both_classes(y):
        return float("nan")
    return float(average_precision_score(y, s))


# --------------------------------------------------------------------------- pixel AUROC


def _pairs_below(reference: np.ndarray, queries: np.ndarray) -> int:
    """Twice the number of (query, reference) pairs where the reference is lower; ties count half.

    Doubling keeps the tie halves as integers, so the sum is exact in int64. Both arrays are
    sorted, which lets searchsorted walk the reference once instead of searching it afresh.
    """
    below = np.searchsorted(reference, queries, side="left").sum(dtype=np.int64)
    at_or_below = np.searchsorted(reference, queries, side="right").sum(dtype=np.int64)
    return int(below + at_or_below)


def pixel_auroc(masks: Any, maps: Any) -> float:
    """AUROC over every pixel of every image (Mann-Whitney U with mid-ranks for ties).

    NaN when the pixels are all normal or all anomalous.
    """
    mask, scores = _pixel_inputs(masks, maps)
    positives, negatives = _split_sorted(mask, scores)
    n_pos, n_neg = positives.size, negatives.size
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Querying with the smaller class keeps the searchsorted work proportional to it.
    if n_pos <= n_neg:
        return _pairs_below(negatives, positives) / (2.0 * n_pos * n_neg)
    return 1.0 - _pairs_below(positives, negatives) / (2.0 * n_pos * n_neg)


# --------------------------------------------------------------------------- regions


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per anomalous pixel (in ``scores[mask]`` order): 1 / (region area * number of regions).

    Summing these weights over the anomalous pixels above a threshold gives the mean per-region
    overlap at that threshold, so PRO curves reduce to weighted cumulative sums.
    """
    labels, n_regions = ndimage.label(mask, structure=_REGION_STRUCTURE)
    if n_regions == 0:
        return np.zeros(0), 0
    pixel_labels = labels[mask]
    del labels
    areas = np.bincount(pixel_labels, minlength=n_regions + 1).astype(np.float64)
    return 1.0 / (areas[pixel_labels] * n_regions), n_regions


# --------------------------------------------------------------------------- AUPRO (MVTec)


def _distinct_weighted(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``values`` in descending order with the summed weight of each."""
    order = np.argsort(values)[::-1]
    values, weights = values[order], weights[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return values[starts], np.add.reduceat(weights, starts)


def _exact_pro_curve(
    positives: np.ndarray, weights: np.ndarray, negatives_sorted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every vertex of the PRO curve, swept from the highest threshold down (pixel >= t is positive).

    Between two neighbouring anomalous scores only normal pixels switch, a horizontal run whose
    inner points are collinear, so it suffices to keep each run's end (A) and the point after the
    tied group at that anomalous score (B). A->B is the diagonal a tie between classes produces.
    """
    values, group_weight = _distinct_weighted(positives, weights)
    n_neg = negatives_sorted.size
    fpr_above = (n_neg - np.searchsorted(negatives_sorted, values[::-1], side="right"))[::-1] / n_neg
    fpr_at = (n_neg - np.searchsorted(negatives_sorted, values[::-1], side="left"))[::-1] / n_neg
    pro_after = np.cumsum(group_weight)
    pro_before = np.r_[0.0, pro_after[:-1]]
    fpr = np.r_[0.0, np.column_stack([fpr_above, fpr_at]).ravel(), 1.0]
    pro = np.r_[0.0, np.column_stack([pro_before, pro_after]).ravel(), pro_after[-1]]
    return fpr, pro


def _binned_pro_curve(
    positives: np.ndarray, weights: np.ndarray, negatives_sorted: np.ndarray, num_thresholds: int
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve sampled at evenly spaced thresholds between the lowest and highest score.

    Like anomalib's ``num_thresholds`` option this trades a little accuracy for fewer points; it
    always uses the scores' own range (anomalib falls back to [0, 1] when scores leave that range,
    a workaround for torchmetrics applying a sigmoid there).
    """
    order = np.argsort(positives)
    positives, weights = positives[order], weights[order]
    lowest = min(positives[0], negatives_sorted[0])
    highest = max(positives[-1], negatives_sorted[-1])
    thresholds = np.linspace(lowest, highest, num_thresholds)[::-1]
    n_neg = negatives_sorted.size
    fpr = (n_neg - np.searchsorted(negatives_sorted, thresholds, side="left")) / n_neg
    weight_below = np.r_[0.0, np.cumsum(weights)]
    pro = weight_below[-1] - weight_below[np.searchsorted(positives, thresholds, side="left")]
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def _area_up_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under a curve with non-decreasing ``fpr``, cut at ``limit`` by interpolation."""
    inside = int(np.searchsorted(fpr, limit, side="right"))
    area = float(np.trapezoid(pro[:inside], fpr[:inside]))
    if inside < fpr.size:
        # fpr[inside] > limit >= fpr[inside - 1], so the step has non-zero width.
        x0, x1 = fpr[inside - 1], fpr[inside]
        y0, y1 = pro[inside - 1], pro[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_limit) * (limit - x0)
    return area


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec/anomalib).

    Regions are the 8-connected components of each image's mask; PRO at a threshold is the mean,
    over all regions of all images, of the fraction of the region's pixels scoring at or above it;
    FPR is over all normal pixels of all images. With ``num_thresholds=None`` the curve is exact
    (every distinct score is a threshold); an integer samples that many evenly spaced thresholds.
    NaN when there is no anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    mask, scores = _pixel_inputs(masks, maps)
    weights, n_regions = _region_weights(mask)
    positives = scores[mask]
    negatives = scores[~mask]
    if n_regions == 0 or negatives.size == 0:
        return float("nan")
    negatives.sort()
    if num_thresholds is None:
        fpr, pro = _exact_pro_curve(positives, weights, negatives)
    else:
        fpr, pro = _binned_pro_curve(positives, weights, negatives, int(num_thresholds))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- AUPRO (AnomalyCLIP)


def _anomalyclip_thresholds(scores: np.ndarray, max_step: int) -> np.ndarray:
    # Built exactly as AnomalyCLIP does (np.arange in the maps' dtype), because float rounding in
    # arange decides whether the last step is included, i.e. whether there are 200 or 201 points.
    low, high = scores.min(), scores.max()
    step = (high - low) / max_step
    if not step > 0:
        return np.zeros(0, dtype=scores.dtype)
    return np.arange(low, high, step)


def _anomalyclip_curve(
    mask: np.ndarray, scores: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and mean per-region overlap at each threshold, a pixel being positive when > threshold."""
    weights, _ = _region_weights(mask)
    negatives = scores[~mask]
    negatives.sort()
    fpr = (negatives.size - np.searchsorted(negatives, thresholds, side="right")) / negatives.size
    # How many thresholds each anomalous pixel exceeds; it counts at threshold k iff that is > k.
    passed = np.searchsorted(thresholds, scores[mask], side="left")
    weight_by_passed = np.bincount(passed, weights=weights, minlength=thresholds.size + 1)
    pro = np.cumsum(weight_by_passed[::-1])[::-1][1:]
    return fpr, pro


def aupro_anomalyclip(masks: Any, maps: Any, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """AUPRO as AnomalyCLIP's ``cal_pro_score`` computes it.

    Thresholds ``np.arange(min, max, (max - min) / max_step)``; a pixel is positive when its score
    is > the threshold; PRO is the mean over 8-connected mask regions (skimage's default full
    connectivity) of the detected fraction; FPR is over all normal pixels. Points with
    FPR < ``expect_fpr`` are kept, their FPRs min-max rescaled to [0, 1], and the area taken with
    sklearn's ``auc``. NaN where the reference would give NaN or fail: no region, no normal pixel,
    constant maps, or fewer than two distinct FPRs below the limit.
    """
    mask, scores = _pixel_inputs(masks, maps)
    thresholds = _anomalyclip_thresholds(scores, max_step)
    if thresholds.size == 0 or not mask.any() or mask.all():
        return float("nan")
    fpr, pro = _anomalyclip_curve(mask, scores, thresholds)
    keep = fpr < expect_fpr
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or fpr.max() == fpr.min():
        return float("nan")
    rescaled = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return float(auc(rescaled, pro))


# --------------------------------------------------------------------------- reports


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _image_metrics(entry: dict) -> dict[str, float | None]:
    return {
        "image_auroc": _finite_or_none(image_auroc(entry["labels"], entry["scores"])),
        "image_ap": _finite_or_none(image_ap(entry["labels"], entry["scores"])),
    }


def _pixel_metrics(entry: dict) -> dict[str, float | None]:
    masks, maps = entry.get("masks"), entry.get("maps")
    if masks is None or maps is None:
        return dict.fromkeys(PIXEL_KEYS)
    # Converted once here (tensor to array, 0/255 masks to bool) so the three metrics share it.
    mask, scores = _pixel_inputs(masks, maps)
    return {
        "pixel_auroc": _finite_or_none(pixel_auroc(mask, scores)),
        "aupro": _finite_or_none(aupro(mask, scores)),
        "aupro_anomalyclip": _finite_or_none(aupro_anomalyclip(mask, scores)),
    }


def mean_of_present(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        present = [row[key] for row in rows if row[key] is not None]
        means[key] = float(np.mean(present)) if present else None
    return means


def evaluate(per_category: dict[str, dict]) -> dict:
    """Every metric per category plus their means, as plain JSON-serialisable floats.

    Each entry holds ``labels`` and ``scores`` (N,), optionally ``masks`` and ``maps`` (N, H, W).
    A metric is None where it cannot be computed (no masks, a single class); a mean is over the
    categories where the metric exists, None if there are none.
    """
    report: dict[str, dict] = {}
    with warnings.catch_warnings():
        # Degenerate categories are reported as None; numpy's divide warnings would only add noise.
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, entry in per_category.items():
            report[name] = {**_image_metrics(entry), **_pixel_metrics(entry)}
    return {"per_category": report, "mean": mean_of_present(list(report.values()))}


def _cell(value: float | None, width: int) -> str:
    text = "-" if value is None else f"{100.0 * value:.1f}"
    return text.rjust(width)


def format_table(report: dict) -> str:
    """Fixed-width text table: one row per category and a ``mean`` row, values in percent."""
    rows = list(report["per_category"].items()) + [("mean", report["mean"])]
    name_width = max(len("category"), *(len(name) for name, _ in rows))
    widths = [max(len(key), 6) for key in METRIC_KEYS]
    header = "  ".join(["category".ljust(name_width)] + [k.rjust(w) for k, w in zip(METRIC_KEYS, widths)])
    lines = [header, "-" * len(header)]
    for name, values in rows:
        cells = [_cell(values.get(key), width) for key, width in zip(METRIC_KEYS, widths)]
        lines.append("  ".join([name.ljust(name_width)] + cells))
    return "\n".join(lines)
