"""Batch zero-shot scoring of files: a line's unlabelled images scored against each other.

What the service's rolling window does for a stream, for a closed set of files (CLI `score
--batch-zero-shot G`): the images are split into groups of about G in the given order, and every
image is scored by mutual comparison with the other images of its group (`RollingWindow.score_held`),
on the group's own scale: a map of 1 is the group's 99th-percentile pixel, a score of z is z robust
standard deviations above the group's median image. No normal image, no prompt and no label is
used, so it works on a product nobody has collected normals of, as long as most images of each
group are normal. A group's scores depend on its other images, so a file scored in another
group can get a slightly different score.

With a line memory, a group can instead serve as *peers* (`predict_samples_with_peers`, CLI `score
--peers G`): each image is scored by the bundle as usual, on the bundle's scale and thresholds, but
every patch's memory distance is completed with its mutual score among the group's other images
(`anomalyfleet.memory.peer_patch_scores`), so the line's normal variation that a few memory images
lack no longer reads as anomalous. It needs the same majority of normal images in each group.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalyfleet.data import AnomalyDataset, Sample
from anomalyfleet.detector import Detector, Prediction
from anomalyfleet.backbones import Features
from anomalyfleet.errors import DataError
from anomalyfleet.memory import default_memory_layers, peer_patch_scores
from anomalyfleet.rolling_window import RollingWindow, WindowScores
from anomalyfleet.scoring import ScoredBatch

MIN_GROUP = 3  # the fewest images whose leave-one-out scores give a median and a spread
# The smallest group size a caller may ask for: with G >= 2 * MIN_GROUP - 1, splitting any count of
# at least MIN_GROUP images into ceil(count / G) near-equal groups leaves none below MIN_GROUP.
MIN_GROUP_SIZE = 2 * MIN_GROUP - 1
# Order of a labelled set's images before they are grouped as peers (eval, calibrate).
PEER_ORDER_SEED = 0
# The largest group: the service's rolling windows stop at 128 images; files and shards may go further.
MAX_GROUP_SIZE = 512


def check_group_size(group_size: int, mode: str = "batch zero-shot") -> None:
    """Groups between MIN_GROUP_SIZE and MAX_GROUP_SIZE images: one group's features and pairwise
    distances are held at once, O(G * P * D) and O(G^2 * P) floats."""
    if not MIN_GROUP_SIZE <= group_size <= MAX_GROUP_SIZE:
        raise DataError(f"{mode} groups hold {MIN_GROUP_SIZE} to {MAX_GROUP_SIZE} images, got {group_size}")


def memory_problem(detector: Detector) -> str | None:
    """Why this detector cannot take peers (they complete an active line memory), or None."""
    return memory_mode_problem(None if detector.memory is None else detector.memory.fusion.mode)


def memory_mode_problem(mode: str | None) -> str | None:
    """The same from a bundle's memory mode alone (None: no memory), as its metadata records it."""
    if mode is None:
        return "peers complete a line memory's distances, and this bundle has none (anomalyfleet memory build adds one)"
    if mode == "prompts":
        return ("peers complete a line memory's distances, and this bundle's memory is switched off (mode prompts; "
                "anomalyfleet memory set --mode fused switches it on)")
    return None


def batch_layer(detector: Detector) -> int:
    """The feature block compared: the line memory's when the bundle has one, else a line memory's
    default block."""
    if detector.memory is not None:
        return detector.memory.layers[0]
    return default_memory_layers(detector.backbone.num_layers)[0]


def group_bounds(count: int, group_size: int, mode: str = "batch zero-shot") -> list[tuple[int, int]]:
    """(start, stop) of consecutive groups of near-equal size, none above `group_size` and none
    below MIN_GROUP (a short remainder is spread over the other groups, not left alone). `mode`
    names what groups the images in error messages ("batch zero-shot" or "peers")."""
    check_group_size(group_size, mode)
    if count < MIN_GROUP:
        raise DataError(f"{mode} scoring compares images with each other and needs at least {MIN_GROUP}, "
                        f"got {count}")
    groups = -(-count // group_size)
    edges = np.linspace(0, count, groups + 1).round().astype(int)
    bounds = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    assert all(MIN_GROUP <= b - a <= group_size for a, b in bounds), bounds
    return bounds


def group_window(detector: Detector, size: int, fraction: float = 0.3) -> RollingWindow:
    """An empty window for one group of `size` images: add the group's features at `batch_layer`,
    then `score_held` scores each image against the others."""
    return RollingWindow(size=size, grid=detector.backbone.grid, image_size=detector.image_size,
                         min_images=MIN_GROUP, fraction=fraction, sigma=detector.settings.sigma, device=detector.device)


def score_group(detector: Detector, batches: Iterable[torch.Tensor], size: int, fraction: float = 0.3) -> WindowScores:
    """Scores and maps of one group of `size` preprocessed images, given in batches, each image
    against the group's others on the group's own scale (`RollingWindow.score_held`)."""
    layer = batch_layer(detector)
    window = group_window(detector, size, fraction)
    with torch.inference_mode():
        for images in batches:
            window.add(detector.extract(images.to(detector.device), layers=(layer,)).patch_features[0])
        return window.score_held()


def predict_samples_batch_zero_shot(
    detector: Detector,
    samples: Sequence[Sample],
    group_size: int = 64,
    batch_size: int = 8,
    fraction: float = 0.3,
    progress: bool = True,
) -> Iterator[ScoredBatch]:
    """One `ScoredBatch` per group: robust z-scores and calibrated maps (see the module docstring)."""
    def predict(batches: Iterator[torch.Tensor], size: int) -> Prediction:
        result = score_group(detector, batches, size, fraction)
        return Prediction(scores=result.scores, maps=result.maps)

    return _predict_groups(detector, samples, group_size, batch_size, progress, "batch zero-shot", predict)


def _predict_groups(detector: Detector, samples: Sequence[Sample], group_size: int, batch_size: int, progress: bool,
                    mode: str, predict) -> Iterator[ScoredBatch]:
    """One `ScoredBatch` per near-equal group of `samples`: `predict(image batches, group size)` of
    each group, with the group's masks. Bad group sizes fail at once, before any image is read."""
    bounds = group_bounds(len(samples), group_size, mode)

    def groups() -> Iterator[ScoredBatch]:
        bar = tqdm(total=len(samples), desc=mode, unit="img", disable=not progress)
        for start, stop in bounds:
            group = list(samples[start:stop])
            masks: list[np.ndarray] = []
            prediction = predict(_group_images(detector, group, batch_size, masks, bar), len(group))
            yield ScoredBatch(samples=group, prediction=prediction, masks=np.concatenate(masks))
        bar.close()

    return groups()


def _group_images(detector: Detector, group: list[Sample], batch_size: int, masks: list, bar) -> Iterator[torch.Tensor]:
    """One group's preprocessed images in batches; their masks are appended to `masks` on the way."""
    dataset = AnomalyDataset(group, image_size=detector.image_size, mean=detector.mean, std=detector.std)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        masks.append((batch["mask"][:, 0] > 0.5).numpy())
        bar.update(batch["image"].shape[0])
        yield batch["image"]


def extract_group(detector: Detector, batches: Iterable[torch.Tensor]) -> Features:
    """One group's features at `detector.feature_layers`, from its preprocessed images in batches."""
    with torch.inference_mode():
        parts = [detector.extract(images.to(detector.device)) for images in batches]
    return Features(global_feature=torch.cat([f.global_feature for f in parts]),
                    patch_features=[torch.cat(p) for p in zip(*(f.patch_features for f in parts))], grid=parts[0].grid)


def predict_group_with_peers(detector: Detector, features: Features, text: torch.Tensor | None = None,
                             fraction: float = 0.3) -> Prediction:
    """The bundle's prediction for one group's features (at `detector.feature_layers`), every
    image's memory distances completed with its peers' among the group's other images."""
    problem = memory_problem(detector)
    if problem:
        raise DataError(problem)
    memory = detector.active_memory
    layers = detector.feature_layers
    peers = peer_patch_scores([features.patch_features[layers.index(layer)] for layer in memory.layers], fraction)
    return detector.predict_features(features, text, peers=peers)


def predict_samples_with_peers(
    detector: Detector,
    samples: Sequence[Sample],
    group_size: int = 32,
    batch_size: int = 8,
    fraction: float = 0.3,
    progress: bool = True,
) -> Iterator[ScoredBatch]:
    """One `ScoredBatch` per group of near-equal size: the bundle's scores and maps with each image's
    peers among its group (see the module docstring)."""
    problem = memory_problem(detector)
    if problem:
        raise DataError(problem)
    with torch.inference_mode():
        text = detector.text_features()

    def predict(batches: Iterator[torch.Tensor], size: int) -> Prediction:
        with torch.inference_mode():
            return predict_group_with_peers(detector, extract_group(detector, batches), text, fraction)

    return _predict_groups(detector, samples, group_size, batch_size, progress, "peers", predict)


def predict_by_category_with_peers(detector: Detector, samples: Sequence[Sample], group_size: int,
                                   batch_size: int = 8, progress: bool = True,
                                   seed: int = PEER_ORDER_SEED) -> Iterator[ScoredBatch]:
    """`predict_samples_with_peers` per category (a product's peers are of that product), each in its
    own seeded random order, so that groups mix a labelled set's normal and defective images as a
    line's stream would, and a category's scores do not depend on which others came with it."""
    for category in sorted({s.category for s in samples}):
        members = [s for s in samples if s.category == category]
        order = np.random.default_rng(seed).permutation(len(members))
        yield from predict_samples_with_peers(detector, [members[i] for i in order], group_size=group_size,
                                              batch_size=batch_size, progress=progress)
