"""Evaluate a detector on labelled data: per-category and mean metrics (see metrics.py)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Sequence

import numpy as np

from anomalyfleet import metrics
from anomalyfleet.data import Sample
from anomalyfleet.detector import Detector
from anomalyfleet.scoring import predict_samples


def evaluate_detector(
    detector: Detector,
    samples: Sequence[Sample],
    batch_size: int = 8,
    progress: bool = True,
    per_image: bool = False,
    peers: int | None = None,
) -> dict:
    """Score every sample and compute image metrics, plus pixel metrics where masks exist.

    Pixel metrics use the images that have masks (normals count as all-normal masks); label-only
    anomalies contribute to image metrics only. With `peers` = G, a line memory's distances are
    completed with peers in groups of about G (`predict_samples_with_peers`), formed within each
    category (a product's peers are of that product) after a seeded shuffle, so that each group
    mixes the data's normal and defective images as a line's stream would, whatever order the
    data specs list them in.
    """
    by_category: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    pixel_categories = {s.category for s in samples if s.label == 1 and s.mask is not None}
    started = time.perf_counter()
    if peers:
        from anomalyfleet.batch_zero_shot import predict_by_category_with_peers

        scoring = predict_by_category_with_peers(detector, samples, peers, batch_size, progress)
    else:
        scoring = predict_samples(detector, samples, batch_size=batch_size, progress=progress, desc="evaluating")
    for scored in scoring:
        for row, sample in enumerate(scored.samples):
            entry = by_category[sample.category]
            entry["labels"].append(sample.label)
            entry["scores"].append(float(scored.prediction.scores[row]))
            entry["images"].append(sample.image)
            if sample.category in pixel_categories and (sample.label == 0 or sample.mask is not None):
                entry["maps"].append(scored.prediction.maps[row].astype(np.float32))
                entry["masks"].append(scored.masks[row])
    seconds = time.perf_counter() - started
    inputs = {}
    for category, entry in sorted(by_category.items()):
        inputs[category] = {
            "labels": np.asarray(entry["labels"]),
            "scores": np.asarray(entry["scores"]),
            "masks": np.stack(entry["masks"]) if entry["masks"] else None,
            "maps": np.stack(entry["maps"]) if entry["maps"] else None,
        }
    report = metrics.evaluate(inputs)
    report["images"] = len(samples)
    report["seconds"] = seconds
    report["detector"] = detector.describe()
    if peers:
        from anomalyfleet.batch_zero_shot import PEER_ORDER_SEED

        report["peers"] = {"group_size": peers, "order_seed": PEER_ORDER_SEED}
    if per_image:
        report["per_image"] = [
            {"image": image, "category": category, "label": int(label), "score": score}
            for category, entry in sorted(by_category.items())
            for image, label, score in zip(entry["images"], entry["labels"], entry["scores"])
        ]
    return report


def merge_reports(reports: list[dict]) -> dict:
    """One report from `evaluate_detector` reports of disjoint categories (e.g. one line each):
    their categories side by side and the mean over all of them, as if evaluated together."""
    if not reports:
        raise ValueError("no reports to merge")
    per_category: dict[str, dict] = {}
    for report in reports:
        overlap = set(per_category) & set(report["per_category"])
        if overlap:
            raise ValueError(f"categories in more than one report: {', '.join(sorted(overlap))}")
        per_category.update(report["per_category"])
    merged = {**reports[0], "per_category": per_category, "mean": metrics.mean_of_present(list(per_category.values())),
              "images": sum(r["images"] for r in reports), "seconds": sum(r["seconds"] for r in reports),
              "detector": [r["detector"] for r in reports]}
    if all("per_image" in r for r in reports):
        merged["per_image"] = [row for r in reports for row in r["per_image"]]
    return merged

