"""Choose a line's fusion from a few labelled images of that line.

The default prompt weight is a compromise measured on three products; on a given line the learned
prompts may transfer well or badly. A quality engineer usually holds a handful of confirmed
defect images of the line (the same ones AnoGen learns from): scored once, they rank the
candidate weights, and the best goes into the bundle. Features and both sources' raw maps are
computed once; each candidate only re-runs the fusion.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from anomalyfleet import metrics
from anomalyfleet.data import Sample
from anomalyfleet.errors import DataError
from anomalyfleet.maps import smooth_maps
from anomalyfleet.memory import FusionSettings

TUNING_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro")
DEFAULT_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
FUSE_BATCH = 32


@dataclass
class Candidate:
    name: str
    fusion: FusionSettings
    report: dict
    scores: np.ndarray  # image scores of the tuning images


@dataclass
class SourceOutputs:
    """Both sources' raw outputs for the tuning images (fusion input, before any weight)."""

    labels: np.ndarray
    masks: np.ndarray | None  # (N, S, S) bool when every defective image has a mask
    memory_raw: torch.Tensor
    prompt_scores: torch.Tensor
    prompt_raw: torch.Tensor


def tuning_images(detector, samples: Sequence[Sample]) -> list[Sample]:
    """The labelled images tuning may use: not the memory's own (they score as perfect normals)."""
    used = set(detector.memory.info.get("images", []))
    kept = [s for s in samples if s.image not in used]
    normal = sum(1 for s in kept if int(s.label) == 0)
    defective = len(kept) - normal
    if normal == 0 or defective == 0:
        dropped = len(samples) - len(kept)
        extra = f" ({dropped} memory images left out)" if dropped else ""
        raise DataError(f"tuning needs normal and defective images of the line; got {normal} normal and "
                        f"{defective} defective{extra}")
    return kept


def defects_have_masks(samples: Sequence[Sample]) -> bool:
    """Pixel metrics need a mask for every defective image (normals count as all-normal)."""
    return all(s.mask is not None for s in samples if int(s.label) == 1)


def source_outputs(detector, samples: Sequence[Sample], batch_size: int = 8, progress: bool = True) -> SourceOutputs:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from anomalyfleet.data import AnomalyDataset

    memory = detector.memory
    layers = detector.layers_with(memory.layers)  # the memory's layers in every mode, prompts-only too
    dataset = AnomalyDataset(list(samples), image_size=detector.image_size, mean=detector.mean, std=detector.std)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    memory_raw, scores, prompt_raw, masks = [], [], [], []
    bar = tqdm(total=len(dataset), desc="tuning", unit="img", disable=not progress)
    with torch.inference_mode():
        text = detector.text_features()
        for batch in loader:
            features = detector.extract(batch["image"].to(detector.device), layers=layers)
            patches = [features.patch_features[layers.index(layer)] for layer in memory.layers]
            memory_raw.append(memory.raw_maps(patches, detector.image_size).cpu())
            s, raw = detector.score_features(features, text)
            scores.append(s.cpu())
            prompt_raw.append(raw.cpu())
            masks.append(batch["mask"][:, 0] > 0.5)
            bar.update(batch["image"].shape[0])
    bar.close()
    labels = np.array([int(s.label) for s in samples])
    return SourceOutputs(labels=labels, masks=torch.cat(masks).numpy() if defects_have_masks(samples) else None,
                         memory_raw=torch.cat(memory_raw), prompt_scores=torch.cat(scores), prompt_raw=torch.cat(prompt_raw))


def candidate_name(fusion: FusionSettings) -> str:
    return fusion.mode if fusion.mode != "fused" else f"fused w={fusion.prompt_weight:g}"


def candidate_settings(base: FusionSettings, weights: Sequence[float]) -> list[tuple[str, FusionSettings]]:
    """The prompts alone, the memory alone (w = 0) and the fused detector at each other weight,
    keeping the bundle's map share, image evidence and top fraction; the bundle's own setting is
    always among them (it is the reference a candidate must beat)."""
    own = {"memory": 0.0, "prompts": None, "fused": base.prompt_weight}[base.mode]
    out = [("prompts", replace(base, mode="prompts"))]
    for w in sorted(set(float(x) for x in weights) | ({own} if own is not None else set())):
        if w == 0.0:
            out.append(("memory", replace(base, mode="memory")))
            if base.mode == "fused" and base.prompt_weight == 0.0:
                # A fused setting without the prompts' score still has their position term: not
                # the memory alone, and the bundle's own setting must be among the candidates.
                out.append((candidate_name(base), base))
        else:
            # The memory keeps 1 - w - u: a large w leaves less room for the position term.
            out.append((f"fused w={w:g}", replace(base, mode="fused", prompt_weight=w,
                                                  position_weight=min(base.position_weight, 1.0 - w))))
    return out


def evaluate_candidate(detector, outputs: SourceOutputs, fusion: FusionSettings) -> tuple[dict, np.ndarray]:
    """(metrics report, image scores) of one fusion setting on the tuning images."""
    memory, sigma = detector.memory, detector.settings.sigma
    if fusion.mode == "prompts":
        scores, maps = outputs.prompt_scores.numpy(), smooth_maps(outputs.prompt_raw, sigma)
    else:
        memory.configure(fusion, sigma)
        parts = [memory.fuse(outputs.memory_raw[s:s + FUSE_BATCH], outputs.prompt_scores[s:s + FUSE_BATCH],
                             outputs.prompt_raw[s:s + FUSE_BATCH], sigma)
                 for s in range(0, len(outputs.labels), FUSE_BATCH)]
        scores, maps = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    entry = {"labels": outputs.labels, "scores": scores}
    if outputs.masks is not None:
        entry.update(masks=outputs.masks, maps=maps)
    return metrics.evaluate({"line": entry})["mean"], np.asarray(scores)


def auroc_gain_lower_bound(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray, confidence: float,
                           resamples: int = 2000, seed: int = 0) -> float:
    """One-sided lower confidence bound of AUROC(scores) - AUROC(reference) on the same images:
    a paired bootstrap, normals and defects resampled separately, from the (defect, normal) pair
    comparisons of both score sets (one matrix product per side, no loop over resamples)."""
    defect, normal = labels == 1, labels == 0

    def wins(values: np.ndarray) -> np.ndarray:
        a, b = values[defect][:, None], values[normal][None, :]
        return (a > b) + 0.5 * (a == b)

    diff = wins(np.asarray(scores, dtype=np.float64)) - wins(np.asarray(reference, dtype=np.float64))
    d, n = diff.shape
    rng = np.random.default_rng(seed)
    count_d = rng.multinomial(d, np.full(d, 1.0 / d), size=resamples)
    count_n = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    gains = ((count_d @ diff) * count_n).sum(axis=1) / (d * n)
    return float(np.quantile(gains, 1.0 - confidence))


def tune_fusion(detector, samples: Sequence[Sample], weights: Sequence[float] = DEFAULT_WEIGHTS,
                metric: str = "image_auroc", confidence: float = 0.95, batch_size: int = 8,
                progress: bool = True) -> tuple[Candidate, list[Candidate]]:
    """(chosen, all candidates) on the labelled `samples`; the memory is left at its settings.

    See `choose_candidate`: the bundle's own setting stays unless the images show, at
    `confidence`, that another is better (image AUROC), or another simply scores higher (other metrics).
    """
    memory = detector.memory
    if memory is None:
        raise DataError("this bundle has no line memory to tune; build one with `anomalyfleet memory build`")
    if metric not in TUNING_METRICS:
        raise DataError(f"metric must be one of {', '.join(TUNING_METRICS)}, got {metric!r}")
    if not 0.0 <= confidence < 1.0:
        raise DataError(f"confidence must be in [0, 1), got {confidence}")
    if not memory.can_fuse or memory.calibration_set is None:
        raise DataError("this memory keeps no calibration of both sources, so fused weights cannot be compared; "
                        "rebuild it with at least two normal images (anomalyfleet memory build)")
    kept = tuning_images(detector, samples)
    if metric in ("pixel_auroc", "aupro") and not defects_have_masks(kept):
        raise DataError(f"{metric} needs a mask for every defective image; use image_auroc or image_ap")
    outputs = source_outputs(detector, kept, batch_size=batch_size, progress=progress)
    candidates, reference = compare_candidates(detector, outputs, weights)
    return choose_candidate(candidates, metric, outputs.labels, reference, confidence), candidates


def compare_candidates(detector, outputs: SourceOutputs,
                       weights: Sequence[float] = DEFAULT_WEIGHTS) -> tuple[list[Candidate], Candidate]:
    """(every candidate evaluated, the one that is the memory's current setting); the memory is
    left at that setting."""
    memory = detector.memory
    before = memory.fusion
    candidates = []
    try:
        for name, fusion in candidate_settings(before, weights):
            report, scores = evaluate_candidate(detector, outputs, fusion)
            # What the memory ran: configure turns off what it cannot fit (the position term with
            # too few calibration images), and the bundle must record that, not the request.
            ran = fusion if fusion.mode == "prompts" else memory.fusion
            candidates.append(Candidate(name, ran, report, scores))
    finally:
        memory.configure(before, detector.settings.sigma)
    return candidates, next(c for c in candidates if c.name == candidate_name(before))


def choose_candidate(candidates: list[Candidate], metric: str, labels: np.ndarray | None = None,
                     reference: Candidate | None = None, confidence: float = 0.0) -> Candidate:
    """The candidate to use; `candidates` in `candidate_settings` order.

    Without a reference (or confidence 0): the best on `metric`, ties to the reference, then to the
    smaller prompt weight (memory alone first, prompts alone last): the fused map is the memory's,
    so on pixel metrics every fused weight ties with the memory alone, and a tie must not switch a
    fused bundle to memory mode (losing the prompts' image evidence). With one, on image AUROC: the best of the candidates
    whose gain over the reference has a positive lower bound at `confidence` (paired bootstrap),
    else the reference. With a handful of labelled defects the ranking of weights is mostly noise
    (benchmarks/line_memory_products.py measures it); this keeps a bundle from moving on noise.
    """
    ranked = [c for c in candidates if c.report.get(metric) is not None]
    if not ranked:
        raise DataError(f"{metric} could not be computed on these images")
    order = {c.name: i for i, c in enumerate(candidates[1:] + candidates[:1])}

    def best_of(pool: list[Candidate]) -> Candidate:
        return max(pool, key=lambda c: (round(c.report[metric], 9), c is reference, -order[c.name]))

    best = best_of(ranked)
    if reference is None or confidence <= 0 or metric != "image_auroc" or best is reference:
        return best
    better = [c for c in ranked if c is not reference and c.report[metric] > reference.report[metric]
              and auroc_gain_lower_bound(labels, c.scores, reference.scores, confidence) > 0]
    return best_of(better) if better else reference
