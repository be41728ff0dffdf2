"""Model replicas: per-line detectors multiplexed over a replica pool, scored in dynamic batches.

Each scorer replica keeps its most used bundles loaded (Serve's multiplexing LRU, keyed by
`bundle_uri#manifest_digest`, so a republished bundle is a new model and requests already routed to
the old one finish on it). Bundles that use the same backbone weights share one backbone object, so a
second line on the same backbone costs only its prompts. Requests of one replica are batched by
`@serve.batch`, which splits every batch by model id; a batch is one forward pass.

Lines with a rolling window (batch zero-shot mode, `WindowSettings` in the registry) are scored by
mutual comparison with their own recent images once the window holds `min_images`, and by their
bundle (prompts or line memory) before that; every outcome says which `source` scored it.

By default a window lives in the scorer replica's memory, one per line, and **each replica keeps
its own**: with several replicas (autoscaling, or `min_replicas` > 1) a line's images are spread
over them, so each window fills more slowly, holds a different sample of the line, and the same
image can score differently depending on the replica that takes it; a replica that is scaled down
or restarted loses its windows. A line with `window: {shared: true}` has one window instead, held by
a Ray actor that every replica sends the line's features to (`anomalyfleet.serving.window_keeper`):
consistent across replicas and kept through replica restarts, at the cost of one hop per batch.

`DetectorPool` holds the model logic without Ray, so it can be tested and benchmarked alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from ray import serve

from anomalyfleet.backbones import Features
from anomalyfleet.bundle import backbone_key, load_bundle, read_bundle
from anomalyfleet.data.transforms import preprocess_image
from anomalyfleet.detector import Detector
from anomalyfleet.device import select_device
from anomalyfleet.errors import BundleError, ConfigError
from anomalyfleet.memory import default_memory_layers
from anomalyfleet.rolling_window import RollingWindow, WindowScores
from anomalyfleet.serving.config import WindowSettings
from anomalyfleet.serving.metrics import ScorerMetrics
from anomalyfleet.serving.window_keeper import SharedWindows, WindowKeeper, WindowSpec, WindowUnavailable

logger = logging.getLogger("ray.serve")

# save_bundle swaps directories with two renames; a reader can land between them.
_PUBLISH_RETRIES = 5
_PUBLISH_WAIT_S = 0.05
# Shared window actors live here, apart from Serve's own actors: `ray list actors` finds them by
# name (anomalyfleet-window-<application>-<line>); deleting the Serve application does not remove
# them (`anomalyfleet windows restart` stops them; a redeployed application picks them up again).
WINDOW_NAMESPACE = "anomalyfleet"


@dataclass
class ScoreItem:
    """One preprocessed-to-size image for a line (what the gateway sends)."""

    line: str
    pixels: np.ndarray  # (S, S, 3) uint8, already resized to the detector's image size
    want_map: bool = False
    window: WindowSettings | None = None  # the line's batch zero-shot mode, if it has one


@dataclass
class ScoreOutcome:
    score: float
    map: np.ndarray | None  # (S, S) float32 smoothed anomaly map, when asked for
    version: str  # manifest digest of the bundle that answered
    bundle: str
    bundle_threshold: float | None  # the bundle's calibrated image threshold, if any
    model_ms: float
    batch_size: int
    # What scored it: "window", or the bundle's own path: "prompts", "memory" or "fused", with
    # "+peers" when a window of peers completed the memory's distances.
    source: str = "prompts"
    # Images in the line's window when the image was scored (itself not among them): this
    # replica's window, or the line's shared one; None for lines without a window, or when a shared
    # window could not be reached and the bundle scored it.
    window_images: int | None = None


@dataclass
class _Answer:
    """One item's result while a batch is scored: by its line's window, else by the bundle."""

    score: float | None = None
    map: np.ndarray | None = None
    source: str | None = None
    window_images: int | None = None
    peers: torch.Tensor | None = None  # (P,) peer scores from a window of peers, for the bundle to use


@dataclass
class LoadedDetector:
    detector: Detector
    text: torch.Tensor  # prompt features: fixed per bundle, so computed once at load
    version: str
    bundle_uri: str
    backbone_key: tuple
    loaded_at: float = field(default_factory=time.time)


def _granted_cpus() -> int:
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # outside a Ray worker
        return 1


def _application_name() -> str:
    """The Serve application this replica belongs to: shared windows are kept per application, so
    two applications on one cluster (staging and production) never share a line's window."""
    try:
        return serve.get_replica_context().app_name or "default"
    except Exception:  # outside a Serve replica
        return "default"


def parse_model_id(model_id: str) -> tuple[str, str]:
    uri, sep, version = model_id.rpartition("#")
    if not sep or not uri:
        raise BundleError(f"malformed model id {model_id!r} (expected BUNDLE_URI#VERSION)")
    return uri, version


class DetectorPool:
    """Loads bundles with shared backbones and scores batches; not thread-safe by design.

    All loading and scoring must run on one thread: loading a bundle onto a shared backbone
    sets that backbone's image size, which a concurrent forward pass would see.
    """

    def __init__(self, device: str | torch.device = "auto", shared_windows: SharedWindows | None = None):
        self.device = select_device(device) if isinstance(device, str) else device
        # Lines with shared windows go to their actors; without Ray (tests, benchmarks) they are
        # kept here like the others.
        self._shared = shared_windows
        # Backbones live as long as some loaded detector uses them; Serve's LRU drops detectors,
        # and with them the last reference to a backbone no line needs any more.
        self._backbones: weakref.WeakValueDictionary[tuple, torch.nn.Module] = weakref.WeakValueDictionary()
        # line -> its window's keeper. Windows outlive the detectors Serve's LRU drops; there is one
        # per line ever configured with a (replica-held) window since this replica started.
        self._windows: dict[str, WindowKeeper] = {}

    @property
    def shared_backbones(self) -> int:
        return len(self._backbones)

    def load(self, model_id: str) -> LoadedDetector:
        uri, wanted = parse_model_id(model_id)
        last_error: Exception | None = None
        for attempt in range(_PUBLISH_RETRIES):
            try:
                return self._load_once(uri, wanted)
            except BundleError as exc:
                last_error = exc
                time.sleep(_PUBLISH_WAIT_S * (attempt + 1))
        assert last_error is not None
        raise last_error

    def _load_once(self, uri: str, wanted: str) -> LoadedDetector:
        # One verified state of the bundle, read once: the backbone is chosen by its metadata and
        # the detector built from the same files.
        contents = read_bundle(uri)
        meta = contents.meta
        key = backbone_key(meta)
        shared = self._backbones.get(key)
        detector = load_bundle(uri, device=self.device, backbone=shared, contents=contents).eval()
        before = detector.metadata["bundle_version"]
        if wanted and before != wanted:
            # The bundle was republished since the gateway resolved it; what answers is reported
            # by its own version, so callers never attribute a score to the wrong weights.
            logger.info("bundle %s is at version %s, asked for %s", uri, before, wanted)
        if shared is None:
            self._backbones[key] = detector.backbone
        with torch.inference_mode():
            text = detector.text_features().detach()
        return LoadedDetector(detector, text, before, uri, key)

    # --- rolling windows ------------------------------------------------------------------------
    @staticmethod
    def window_layer(settings: WindowSettings, detector: Detector) -> int:
        """The feature block a line's window compares; a block the backbone lacks is refused. A
        window of peers compares its line memory's block, which it needs."""
        blocks = detector.backbone.num_layers
        if settings.peers:
            from anomalyfleet.batch_zero_shot import memory_problem

            problem = memory_problem(detector)
            if problem:
                raise ConfigError(f"window of peers: {problem}")
            memory = detector.active_memory
            if len(memory.layers) != 1:
                raise ConfigError(f"a window holds one block, and this line's memory is on blocks {list(memory.layers)}: "
                                  "rebuild it on one block (memory build --layer) to use a window of peers")
            if settings.layer is not None and settings.layer != memory.layers[0]:
                raise ConfigError(f"a window of peers compares its line memory's block {memory.layers[0]}, "
                                  f"not block {settings.layer}")
            return memory.layers[0]
        layer = settings.layer if settings.layer is not None else default_memory_layers(blocks)[0]
        if not 1 <= layer <= blocks:
            raise ConfigError(f"window layer {layer} is outside 1..{blocks} for this line's backbone")
        return layer

    def window_spec(self, settings: WindowSettings, loaded: LoadedDetector) -> WindowSpec:
        """What a line's window is built from. Features depend on the backbone, the image size, the
        DPAM depth and the block, not on the prompts: republishing a line's prompts or memory on
        the same backbone keeps its window."""
        detector = loaded.detector
        features_key = (loaded.backbone_key, detector.image_size, detector.settings.dpam_layers, detector.precision,
                        self.window_layer(settings, detector))
        return WindowSpec(features_key, settings, detector.backbone.grid, detector.image_size, detector.settings.sigma)

    def window(self, line: str, settings: WindowSettings, loaded: LoadedDetector) -> RollingWindow:
        """The line's window held by this pool: rebuilt when its settings change, keeping its images
        unless what its features depend on changed too (`WindowKeeper.window_for`)."""
        return self._local_keeper(line).window_for(self.window_spec(settings, loaded))

    def _local_keeper(self, line: str) -> WindowKeeper:
        keeper = self._windows.get(line)
        if keeper is None:  # created once per line, not on every batch
            keeper = self._windows[line] = WindowKeeper(self.device)
        return keeper

    def window_images(self, line: str) -> int | None:
        keeper = self._windows.get(line)
        if keeper is not None:
            return keeper.images()
        return None if self._shared is None else self._shared.images(line)

    def _window_score(self, line: str, settings: WindowSettings, loaded: LoadedDetector,
                      patches: torch.Tensor) -> tuple[WindowScores | None, int | None]:
        spec = self.window_spec(settings, loaded)
        if settings.shared and self._shared is not None:
            self._windows.pop(line, None)  # a line switched to a shared window frees its local one
            try:
                return self._shared.score_then_add(line, spec, patches)
            except WindowUnavailable as exc:
                logger.warning("%s; scoring with the line's bundle", exc)
                return None, None
        if self._shared is not None:
            self._shared.forget(line)
        return self._local_keeper(line).score_then_add(spec, patches)

    # --- scoring --------------------------------------------------------------------------------
    def run(self, loaded: LoadedDetector, items: list[ScoreItem]) -> list[ScoreOutcome]:
        started = time.perf_counter()
        detector = loaded.detector
        size = detector.image_size
        with torch.inference_mode():
            tensors = []
            for item in items:
                image = Image.fromarray(np.ascontiguousarray(item.pixels))
                # Same size: PIL's resize is a copy, so this equals the CLI's preprocessing exactly.
                tensors.append(preprocess_image(image, size, detector.mean, detector.std))
            batch = torch.stack(tensors).to(detector.device)
            if detector.backbone.image_size != size:
                detector.backbone.set_image_size(size)  # another line on this backbone uses another size
            base = detector.feature_layers
            wanted = {self.window_layer(item.window, detector) for item in items if item.window is not None}
            layers = base + tuple(sorted(wanted - set(base)))
            features = detector.extract(batch, layers=layers)  # one forward pass for both paths
            answers = self._score_windows(loaded, items, features, layers)
            rest = [i for i, answer in enumerate(answers) if answer.score is None]
            if rest:
                self._score_bundle(loaded, items, features, len(base), rest, answers)
        elapsed = (time.perf_counter() - started) * 1000.0
        threshold = detector.thresholds.get("image")
        return [
            ScoreOutcome(
                score=float(answer.score),
                map=answer.map if item.want_map else None,
                version=loaded.version,
                bundle=loaded.bundle_uri,
                bundle_threshold=None if threshold is None else float(threshold),
                model_ms=elapsed,
                batch_size=len(items),
                source=answer.source or "prompts",
                window_images=answer.window_images,
            )
            for item, answer in zip(items, answers)
        ]

    def _score_windows(self, loaded: LoadedDetector, items: list[ScoreItem], features: Features,
                       layers: tuple[int, ...]) -> list[_Answer]:
        """An answer per item, without a score where the bundle must score it.

        A line's items of this batch are compared with its window as it was before the batch (so
        a score does not depend on which requests were batched together), then join it.
        """
        answers = [_Answer() for _ in items]
        by_line: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if item.window is not None:
                by_line.setdefault(item.line, []).append(i)
        for line, index in by_line.items():
            settings = items[index[0]].window
            assert settings is not None
            patches = features.patch_features[layers.index(self.window_layer(settings, loaded.detector))]
            scored, held = self._window_score(line, settings, loaded, patches[index])
            for row, i in enumerate(index):
                answers[i].window_images = held
                if isinstance(scored, torch.Tensor):  # a window of peers: the bundle scores with them
                    answers[i].peers = scored[row]
                elif scored is not None and settings.peers:
                    # A shared window's actor started before peers existed scores instead: its scores are
                    # on another scale, so the bundle scores alone until the actor is restarted.
                    if row == 0:
                        logger.warning("line %s: its shared window runs older code that does not lend peers; "
                                       "scoring with the bundle alone (anomalyfleet windows restart)", line)
                elif scored is not None:
                    answers[i].score, answers[i].map, answers[i].source = scored.scores[row], scored.maps[row], "window"
        return answers

    def _score_bundle(self, loaded: LoadedDetector, items: list[ScoreItem], features: Features, base: int,
                      rest: list[int], answers: list[_Answer]) -> None:
        """The bundle's own path (prompts, or its line memory) for the items at `rest`."""
        detector = loaded.detector
        memory = detector.active_memory
        source = "prompts" if memory is None else memory.fusion.mode
        pick = torch.tensor(rest, device=features.global_feature.device)
        subset = Features(global_feature=features.global_feature[pick],
                          patch_features=[p[pick] for p in features.patch_features[:base]], grid=features.grid)
        peers = None
        if any(answers[i].peers is not None for i in rest):
            # Items without peers in the same batch (another line, or a window still filling) get
            # +inf: the smaller of that and the memory's distance is the memory's own. Shared windows
            # answer on the CPU, a replica's own window on its device: all go to the features' device.
            device, patches = subset.patch_features[0].device, subset.patch_features[0].shape[1]
            peers = torch.stack([(answers[i].peers if answers[i].peers is not None
                                  else torch.full((patches,), float("inf"))).to(device, torch.float32) for i in rest])
        if any(items[i].want_map for i in rest):
            prediction = detector.predict_features(subset, loaded.text, peers=peers)
            scores, maps = prediction.scores, prediction.maps.astype(np.float32)
        else:
            # The prompts' global score; with a line memory the fused score (which needs the maps).
            scores, maps = detector.image_scores(subset, loaded.text, peers=peers).cpu().numpy(), None
        for row, i in enumerate(rest):
            answers[i].score = scores[row]
            answers[i].source = source + ("+peers" if answers[i].peers is not None else "")
            answers[i].map = None if maps is None else maps[row]


@serve.deployment(name="DetectorScorer", max_ongoing_requests=32)
class DetectorScorer:
    """A scorer replica. Requests must carry a multiplexed model id (`bundle_uri#version`)."""

    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 max_models_per_replica: int = 4, torch_threads: int | None = None, device: str = "auto",
                 window_num_cpus: float = 0.0, window_state: str | None = None, window_snapshot_every: int = 8,
                 window_timeout_s: float = 10.0):
        # Threads follow the CPUs Ray granted this replica (a serve config may change them), and
        # "auto" picks CUDA only when Ray granted it a GPU (select_device asks Ray: since 2.60 a
        # replica granted none still sees the node's GPUs).
        torch.set_num_threads(torch_threads or _granted_cpus())
        shared = SharedWindows(app=_application_name(), namespace=WINDOW_NAMESPACE, num_cpus=window_num_cpus,
                               state=window_state, snapshot_every=window_snapshot_every,
                               timeout_s=window_timeout_s)
        self._pool = DetectorPool(device, shared)
        # One worker: the pool is single-threaded by design, and torch already uses the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomalyfleet-model")
        self._metrics = ScorerMetrics()
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

        async def _load_detector(model_id: str) -> LoadedDetector:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._pool.load, model_id)

        # Wired here rather than as a decorated method so the LRU size is configuration.
        self.get_detector = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(_load_detector)

    async def score(self, item: ScoreItem) -> ScoreOutcome:
        # Load (and check the line's window against the backbone) before queueing: a bundle that
        # fails to load, or a window layer it lacks, fails its own requests, not a batch.
        loaded = await self.get_detector(serve.get_multiplexed_model_id())
        if item.window is not None:
            self._pool.window_layer(item.window, loaded.detector)
        return await self._score_batch(item)

    async def warm(self, window: WindowSettings | None = None) -> dict:
        """Load the request's model now (the gateway calls this before switching a line over), and
        check that the line's `window` can run on it (a window of peers needs a line memory)."""
        loaded = await self.get_detector(serve.get_multiplexed_model_id())
        if window is not None:
            self._pool.window_layer(window, loaded.detector)
        return {"version": loaded.version, "bundle": loaded.bundle_uri, "shared_backbones": self._pool.shared_backbones}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[ScoreItem]) -> list[ScoreOutcome]:
        # Serve splits batches by multiplexed model id, so one id stands for the whole batch.
        loaded = await self.get_detector(serve.get_multiplexed_model_id())
        outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, self._pool.run, loaded, items)
        counts: dict[str, int] = {}
        for item in items:
            counts[item.line] = counts.get(item.line, 0) + 1
        self._metrics.batch(counts, outcomes[0].model_ms if outcomes else 0.0)
        for line in {item.line for item in items if item.window is not None}:
            held = self._pool.window_images(line)
            if held is not None:
                self._metrics.window(line, held)
        return outcomes


__all__ = ["DetectorPool", "DetectorScorer", "LoadedDetector", "ScoreItem", "ScoreOutcome", "parse_model_id"]
