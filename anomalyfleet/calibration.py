"""Image thresholds for a detector: from normal images alone, or from labelled images.

The decision everywhere is `score >= threshold`. A threshold is always placed halfway between the
last score it excludes and the first it includes (just above the top score when it includes none),
so the counts below hold exactly on the calibration images while no image sits on the boundary,
where a rounding difference between batch sizes could flip it.

* **False-alarm rate** (normals only, or the normals of a labelled set): the lowest threshold at
  which at most `floor(rate * n_normal)` normal images score at or above it.
* **Best F1** (labelled): the threshold maximising F1; among equal F1, the highest one.
* **Target recall** (labelled): the highest threshold whose recall reaches the target, i.e. the
  fewest false alarms that still catch that share of the anomalous images.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from anomalyfleet.errors import ConfigError, DataError

CURVE_POINTS = 256  # the report keeps at most this many curve points


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def fpr(self) -> float | None:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(precision=self.precision, recall=self.recall, fpr=self.fpr, f1=self.f1)
        return data


def _up(value: float) -> float:
    """The next float32 above `value`: scores are float32, so nothing scores between the two."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def _down(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _check(scores: np.ndarray, labels: np.ndarray | None = None) -> None:
    if scores.ndim != 1 or len(scores) == 0:
        raise DataError("calibration needs at least one score")
    if not np.all(np.isfinite(scores)):
        raise DataError("calibration scores contain NaN or infinity")
    if labels is not None and labels.shape != scores.shape:
        raise DataError(f"{len(labels)} labels for {len(scores)} scores")


def cuts(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores (descending) and, for each, the threshold including it and all above it."""
    values = np.unique(np.asarray(scores, dtype=np.float64))[::-1]
    lower = np.append(values[1:], np.nan)
    thresholds = np.where(np.isnan(lower), [_down(v) for v in values], (values + np.nan_to_num(lower)) / 2.0)
    return values, thresholds


def confusion(scores: Sequence[float], labels: Sequence[int], threshold: float) -> OperatingPoint:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    predicted = scores >= threshold
    return OperatingPoint(
        threshold=float(threshold),
        tp=int(np.sum(predicted & labels)),
        fp=int(np.sum(predicted & ~labels)),
        tn=int(np.sum(~predicted & ~labels)),
        fn=int(np.sum(~predicted & labels)),
    )


def threshold_for_false_alarm_rate(normal_scores: Sequence[float], rate: float,
                                   all_scores: Sequence[float] | None = None) -> float:
    """The lowest threshold with at most floor(rate * n) normal scores at or above it, halfway
    between neighbouring scores. `all_scores` (labelled calibration: normal and anomalous): the cut
    is placed among all of them, so anomalies scoring between two normal images stay above it
    (halfway between normals would drop them for no fewer false alarms)."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    _check(scores)
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"false-alarm rate must be in [0, 1), got {rate}")
    allowed = math.floor(rate * len(scores) + 1e-9)
    candidates = scores if all_scores is None else np.asarray(all_scores, dtype=np.float64)
    _, thresholds = cuts(candidates)
    counts = len(scores) - np.searchsorted(np.sort(scores), thresholds, side="left")  # normals >= each cut
    fits = np.nonzero(counts <= allowed)[0]
    if len(fits) == 0:
        return _up(float(scores.max()))
    return float(thresholds[fits[-1]])


def curve(scores: Sequence[float], labels: Sequence[int]) -> dict[str, np.ndarray]:
    """Precision, recall, FPR and F1 at every distinct cut, from the highest threshold down."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    _check(scores, labels)
    values, thresholds = cuts(scores)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # Index just past the last sample scoring >= each distinct value.
    ends = np.searchsorted(-sorted_scores, -values, side="right")
    tp = np.cumsum(sorted_labels)[ends - 1]
    fp = ends - tp
    positives, negatives = int(labels.sum()), int((~labels).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / positives if positives else np.full(len(tp), np.nan)
        fpr = fp / negatives if negatives else np.full(len(fp), np.nan)
        # From the counts: equal F1 values are then equal floats (2pr/(p+r) rounds two cuts of the
        # same F1 differently, and the tie-break below would pick by rounding noise).
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + (positives - tp)), 0.0)
    return {"threshold": thresholds, "tp": tp, "fp": fp, "precision": precision, "recall": recall, "fpr": fpr, "f1": f1}


def _need_both(labels: np.ndarray) -> None:
    if labels.all() or not labels.any():
        raise DataError("labelled calibration needs both normal and anomalous images")


def best_f1(scores: Sequence[float], labels: Sequence[int]) -> OperatingPoint:
    labels = np.asarray(labels).astype(bool)
    _need_both(labels)
    table = curve(scores, labels)
    best = int(np.argmax(table["f1"]))  # first maximum = highest threshold among ties
    return confusion(scores, labels, float(table["threshold"][best]))


def threshold_for_recall(scores: Sequence[float], labels: Sequence[int], target: float) -> OperatingPoint:
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target recall must be in (0, 1], got {target}")
    labels = np.asarray(labels).astype(bool)
    _need_both(labels)
    table = curve(scores, labels)
    reaching = np.nonzero(table["recall"] >= target - 1e-12)[0]
    return confusion(scores, labels, float(table["threshold"][reaching[0]]))


# --- whole calibrations --------------------------------------------------------------------------


@dataclass
class Calibration:
    threshold: float
    chosen: str  # false_alarm_rate | best_f1 | target_recall
    operating_points: dict[str, dict]
    report: dict


def calibrate_scores(scores: Sequence[float], labels: Sequence[int], false_alarm_rate: float | None = None,
                     target_recall: float | None = None) -> Calibration:
    """Operating points from scores; which one becomes the threshold follows the request.

    Normals only: the false-alarm rate (default 0.01). Labelled: the target recall if given, else
    the false-alarm rate if given, else best F1; every operating point is reported either way.
    """
    if false_alarm_rate is not None and target_recall is not None:
        raise ConfigError("give either a false-alarm rate or a target recall, not both")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    _check(scores, labels)
    normals = scores[~labels]
    if len(normals) == 0:
        raise DataError("calibration needs normal images (label 0)")
    rate = 0.01 if false_alarm_rate is None else false_alarm_rate
    far_threshold = threshold_for_false_alarm_rate(normals, rate, scores if labels.any() else None)
    points: dict[str, dict] = {"false_alarm_rate": {"requested": rate, **confusion(scores, labels, far_threshold).to_dict()}}
    labelled = bool(labels.any())
    if not labelled:
        if target_recall is not None:
            raise DataError("a target recall needs anomalous images in the calibration data")
        chosen = "false_alarm_rate"
    else:
        recall_target = 0.95 if target_recall is None else target_recall
        points["best_f1"] = best_f1(scores, labels).to_dict()
        points["target_recall"] = {"requested": recall_target,
                                   **threshold_for_recall(scores, labels, recall_target).to_dict()}
        chosen = "target_recall" if target_recall is not None else ("false_alarm_rate" if false_alarm_rate is not None else "best_f1")
    table = curve(scores, labels)
    keep = np.unique(np.linspace(0, len(table["threshold"]) - 1, min(CURVE_POINTS, len(table["threshold"]))).round().astype(int))
    report = {
        "mode": "labelled" if labelled else "normals",
        "chosen": chosen,
        "threshold": points[chosen]["threshold"],
        "n_normal": int(len(normals)),
        "n_anomalous": int(labels.sum()),
        "operating_points": points,
        "normal_scores": _summary(normals),
        "anomalous_scores": _summary(scores[labels]) if labelled else None,
        "curve": {key: [_json_number(v) for v in np.asarray(table[key])[keep]]
                  for key in ("threshold", "precision", "recall", "fpr", "f1")},
    }
    return Calibration(points[chosen]["threshold"], chosen, points, report)


def _json_number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _summary(values: np.ndarray) -> dict:
    return {"count": int(len(values)), "min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean()), "p50": float(np.quantile(values, 0.5)), "p99": float(np.quantile(values, 0.99))}


def detector_scores(detector, samples, batch_size: int = 8, progress: bool = True,
                    peers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores exactly as `anomalyfleet score` computes them (same batching code); with `peers`, as
    `eval --peers` does (groups per category, in a seeded order)."""
    from anomalyfleet.scoring import predict_samples

    if peers:
        from anomalyfleet.batch_zero_shot import predict_by_category_with_peers

        scoring = predict_by_category_with_peers(detector, samples, peers, batch_size, progress)
    else:
        scoring = predict_samples(detector, samples, batch_size=batch_size, progress=progress, desc="calibrating")
    scores, labels = [], []
    for scored in scoring:
        scores.extend(float(s) for s in scored.prediction.scores)
        labels.extend(s.label for s in scored.samples)
    return np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=int)


def apply_calibration(detector, calibration: Calibration, data: Sequence[str] = (), peers: int | None = None) -> None:
    """Thresholds into the detector (saved with it by `save_bundle`); `peers`: the group size the
    scores were computed with, recorded because a threshold holds only for scoring the same way."""
    detector.thresholds["image"] = float(calibration.threshold)
    for name, point in calibration.operating_points.items():
        detector.thresholds[f"image_{name}"] = float(point["threshold"])
    extras = dict(detector.metadata.get("extras", {}))
    extras["calibration"] = {
        "chosen": calibration.chosen,
        "threshold": float(calibration.threshold),
        "operating_points": calibration.operating_points,
        "data": list(data),
        "peers": peers,
        "n_normal": calibration.report["n_normal"],
        "n_anomalous": calibration.report["n_anomalous"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    detector.metadata["extras"] = extras


def thresholds_mismatch(metadata: dict, thresholds: dict, peers: int | None, advice: bool = True) -> str | None:
    """Why a bundle's thresholds do not hold for scoring with (or without) peers, or None; with
    `advice`, what to run about it.

    Peers can only lower a patch's score, so a threshold set one way flags a different share of
    normal images the other way: set without peers it flags fewer images with them, set with peers
    it raises false alarms without them."""
    calibration = (metadata.get("extras") or {}).get("calibration") or {}
    if not thresholds or not calibration:
        return None
    set_with = calibration.get("peers")
    if bool(set_with) == bool(peers):
        return None
    if set_with:
        reason = (f"the bundle's thresholds were set for scoring with peers (groups of {set_with}); without them "
                  f"normal images score higher and more are flagged")
        return reason + (f": score with --peers {set_with}, or recalibrate without --peers" if advice else "")
    reason = "the bundle's thresholds were set without peers; with them normal images score lower and fewer are flagged"
    return reason + (f": recalibrate with `anomalyfleet calibrate --peers {peers}`" if advice else "")


# --- the plot ------------------------------------------------------------------------------------

_COLOURS = {"precision": (31, 119, 180), "recall": (44, 160, 44), "fpr": (214, 39, 40), "f1": (148, 103, 189)}


def plot_png(report: dict, width: int = 720, height: int = 440) -> bytes:
    """Precision, recall, FPR and F1 against the threshold, the chosen threshold marked."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 170, 30, height - 50
    table = report["curve"]
    thresholds = [t for t in table["threshold"] if t is not None]
    chosen = float(report["threshold"])
    low = min(thresholds + [chosen])
    high = max(thresholds + [chosen])
    pad = max((high - low) * 0.05, 1e-3)
    # Scores are probabilities: keep the axis inside [0, 1] when the data allow it.
    low = max(low - pad, 0.0) if low >= 0 else low - pad
    high = min(high + pad, 1.0) if high <= 1 else high + pad

    def x(value: float) -> float:
        return left + (value - low) / (high - low) * (right - left)

    def y(value: float) -> float:
        return bottom - value * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for i in range(5):
        frac = i / 4
        draw.line([left - 4, y(frac), left, y(frac)], fill=(0, 0, 0))
        draw.text((left - 40, y(frac) - 6), f"{frac:.2f}", fill=(0, 0, 0))
        draw.line([left + 1, y(frac), right - 1, y(frac)], fill=(230, 230, 230))
        tick = low + frac * (high - low)
        draw.line([x(tick), bottom, x(tick), bottom + 4], fill=(0, 0, 0))
        draw.text((x(tick) - 16, bottom + 8), f"{tick:.3f}", fill=(0, 0, 0))
    draw.text(((left + right) // 2 - 40, bottom + 26), "threshold (score)", fill=(0, 0, 0))
    title = f"calibration ({report['mode']}: {report['n_normal']} normal, {report['n_anomalous']} anomalous)"
    draw.text((left, 8), title, fill=(0, 0, 0))

    legend_y = top
    for key, colour in _COLOURS.items():
        points = [(x(t), y(v)) for t, v in zip(table["threshold"], table[key]) if t is not None and v is not None]
        if len(points) < 1:
            continue
        points.sort()
        if len(points) == 1:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        else:
            draw.line(points, fill=colour, width=2)
        draw.line([right + 15, legend_y + 7, right + 35, legend_y + 7], fill=colour, width=3)
        draw.text((right + 42, legend_y), key, fill=(0, 0, 0))
        legend_y += 18

    cx = x(chosen)
    for start in range(top, bottom, 8):
        draw.line([cx, start, cx, min(start + 4, bottom)], fill=(0, 0, 0), width=1)
    legend_y += 10
    draw.text((right + 15, legend_y), f"chosen: {report['chosen']}", fill=(0, 0, 0))
    draw.text((right + 15, legend_y + 16), f"threshold {chosen:.4f}", fill=(0, 0, 0))
    legend_y += 40
    for name, point in report["operating_points"].items():
        draw.text((right + 15, legend_y), f"{name}: {point['threshold']:.4f}", fill=(0, 0, 0))
        legend_y += 16
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_report(report: dict, json_path: str | Path, png_path: str | Path) -> None:
    """The plot, then the JSON that names it; each atomically, on a path or an s3:// URI."""
    from anomalyfleet import storage

    report = dict(report, plot=str(png_path))
    storage.write_bytes(png_path, plot_png(report))
    storage.write_bytes(json_path, json.dumps(report, indent=2).encode())


__all__ = [
    "Calibration",
    "OperatingPoint",
    "apply_calibration",
    "best_f1",
    "calibrate_scores",
    "confusion",
    "curve",
    "detector_scores",
    "plot_png",
    "threshold_for_false_alarm_rate",
    "threshold_for_recall",
    "write_report",
]
