"""Feature stage: the frozen backbone runs once over the training data on a pool of Ray actors.

Each actor loads the detector once and turns shards of consecutive samples into one torch file per
shard holding the `FeatureTable` fields (global and patch features, masks, labels). Shards land
under a directory keyed by the data, the backbone and the feature settings; `stage.json` is written
last, so its presence means every shard is there and the next run skips the stage. Shards that an
interrupted stage already wrote are kept, so a re-run only computes what is missing.

The cache root may be an s3:// URI: actors then write each shard to a local temporary file and
upload it (stage.json still last), and training workers fetch the shards they read into the node's
object cache (`storage.local_path_for`), from where they are memory-mapped as local shards are.

Training workers open the shards memory-mapped and copy out only the rows of their slice of each
global batch (`ShardedFeatures.batch`), so no worker holds the whole feature set in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from anomalyfleet.job_metrics import JobMetrics

from anomalyfleet import storage
from anomalyfleet.backbones import BackboneSpec, Features
from anomalyfleet.data import Sample
from anomalyfleet.data.samples import files_fingerprint
from anomalyfleet.detector import Detector
from anomalyfleet.errors import DataError
from anomalyfleet.features import FeatureTable, compute_feature_table, settings_key
from anomalyfleet.device import select_device
from anomalyfleet.manifest import atomic_write, atomic_write_bytes
from anomalyfleet.storage import ObjectNotFound, is_remote, join

STAGE_FILE = "stage.json"
STAGE_VERSION = 1
# The per-row `FeatureTable` fields a shard holds (the grid is shared).
ROW_FIELDS = ("global_features", "patch_features", "masks", "has_mask", "labels")


@dataclass(frozen=True)
class DetectorSource:
    """Where a process finds the detector: a bundle plus where its backbone weights live there."""

    bundle: str
    backbone: dict
    precision: str | None = None

    def load(self, device: torch.device | str = "cpu") -> Detector:
        from anomalyfleet.bundle import load_bundle

        detector = load_bundle(self.bundle, device=device, backbone_spec=BackboneSpec.from_dict(self.backbone))
        detector.precision = self.precision
        return detector

    def load_for_prompt_training(self, device: torch.device | str) -> Detector:
        """The detector with only what prompt learning on cached features runs on `device`.

        Training workers never run the vision tower (its features are in the cache), so it stays in
        host memory; only the prompts and, for CLIP backbones, the text tower go to the worker's GPU.
        For ViT-L-14-336 that keeps ~300M vision weights and their working memory off every training GPU.
        """
        detector = self.load("cpu")
        tower = detector.backbone.text_tower
        if tower is not None:
            tower.to(device)
        detector.prompts.to(device)
        return detector


def _location(directory: str | Path) -> Path | str:
    """A stage directory as given: an s3:// URI stays a string, anything else is a local Path."""
    return str(directory) if is_remote(directory) else Path(directory)


def _child(directory: Path | str, name: str) -> Path | str:
    return directory / name if isinstance(directory, Path) else join(directory, name)


@dataclass(frozen=True)
class FeatureStageResult:
    directory: Path | str  # an s3:// cache stays a URI
    samples: int
    shards: int
    computed_shards: int  # 0 when the stage was skipped
    skipped: bool
    seconds: float


def stage_key(data_fp: str, backbone_fp: str, settings: str, dtype: str, shard_size: int) -> str:
    payload = {"data": data_fp, "backbone": backbone_fp, "settings": settings, "dtype": dtype,
               "shard_size": shard_size, "version": STAGE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.pt"


class FeatureActor:
    """One copy of the frozen model per actor; computes and writes whole shards."""

    def __init__(self, source: DetectorSource, use_gpu: bool, dtype: str, batch_size: int):
        self.detector = source.load(select_device("auto" if use_gpu else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self._mirrors: dict[tuple, object] = {}

    def compute(self, index: int, start: int, samples: list[Sample], path: str,
                mirrors: dict[str, str] | None = None) -> dict:
        """`mirrors`: the driver's mirrors of datasets in object storage that `samples` point into
        (`storage.prefix_mirrors_of`); this actor may run on another node, which has its own."""
        began = time.perf_counter()
        local = samples
        if mirrors:
            # Resolved once per actor: each resolution lists the prefix (and a prefix that grew during
            # a long stage would then fail every later shard).
            key = tuple(sorted(mirrors.items()))
            if key not in self._mirrors:
                self._mirrors[key] = storage.localize_mirrored(mirrors)
            here = self._mirrors[key]
            local = [replace(s, image=here(s.image), mask=here(s.mask)) for s in samples]
        table = compute_feature_table(self.detector, local, dtype=self.dtype, batch_size=self.batch_size,
                                      progress=False)
        shard = {key: getattr(table, key) for key in ROW_FIELDS}
        shard.update(grid=list(table.grid), start=start, images=[s.image for s in samples])
        # Streamed to disk: a shard can be large, and an in-memory copy would double the actor's peak.
        if is_remote(path):
            with tempfile.TemporaryDirectory(prefix="anomalyfleet-shard-") as tmp:
                local = Path(tmp) / shard_name(index)
                atomic_write(local, lambda handle: torch.save(shard, handle))
                storage.upload_file(local, path)  # a whole object or none, like the local rename
        else:
            atomic_write(path, lambda handle: torch.save(shard, handle))
        return {"index": index, "rows": len(samples), "seconds": time.perf_counter() - began}


def run_feature_stage(
    detector: Detector,
    source: DetectorSource,
    samples: Sequence[Sample],
    cache_root: str | Path,
    *,
    dtype: str = "float16",
    shard_size: int = 256,
    actors: int = 1,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
    job: str | None = None,
) -> FeatureStageResult:
    """Compute (or find) the sharded features of `samples`; returns where they are.

    `detector` is the driver's copy, used only for its fingerprints; `source` is what the actors load.
    """
    import ray

    began = time.perf_counter()
    settings = settings_key(detector)
    data_fp = files_fingerprint(samples)
    # Hashes backbone weights; computed once for the key and the stage record.
    backbone_fp = detector.backbone.fingerprint()
    key = stage_key(data_fp, backbone_fp, settings, dtype, shard_size)
    directory = _child(_location(cache_root), f"features-{key}")
    n = len(samples)
    bounds = [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    present = _present_files(directory)
    todo = [i for i in range(len(bounds)) if shard_name(i) not in present]
    if not todo and STAGE_FILE in present:
        return FeatureStageResult(directory, n, len(bounds), 0, True, time.perf_counter() - began)

    if isinstance(directory, Path):
        directory.mkdir(parents=True, exist_ok=True)
    if todo:
        mirrors = storage.prefix_mirrors_of(p for s in samples for p in (s.image, s.mask))
        # Actors on any node reach an s3:// cache with the driver's endpoint and credentials.
        actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus,
                                 runtime_env={"env_vars": storage.storage_env()})(FeatureActor)
        pool = [actor_class.remote(source, num_gpus > 0, dtype, batch_size) for _ in range(min(actors, len(todo)))]
        total = sum(bounds[i][1] - bounds[i][0] for i in todo)
        bar = tqdm(total=total, desc="features", unit="img", disable=not progress)
        # Progress of the stage on the Jobs dashboard, beside the bar.
        metrics = JobMetrics(job, kind="features") if job else None
        finished = 0
        try:
            pending = {}
            queue = list(todo)

            def submit(actor) -> None:
                i = queue.pop(0)
                start, stop = bounds[i]
                ref = actor.compute.remote(i, start, list(samples[start:stop]), str(_child(directory, shard_name(i))),
                                           mirrors)
                pending[ref] = actor

            # Two shards in flight per actor: the next one is already queued while one runs.
            for actor in pool * 2:
                if queue:
                    submit(actor)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                actor = pending.pop(done[0])
                rows = ray.get(done[0])["rows"]
                bar.update(rows)
                finished += rows
                if metrics is not None:
                    metrics.stage("extract", finished, total)
                if queue:
                    submit(actor)
            if metrics is not None:
                metrics.finish()  # else its progress (0) and last beat would read as a stalled job
        finally:
            if metrics is not None:
                metrics.close()
            bar.close()
            # The actors hold CPUs (or GPU fractions) that the training workers need next.
            for actor in pool:
                ray.kill(actor)

    labels = [int(s.label) for s in samples]
    has_mask = [bool(s.has_mask) for s in samples]
    stage = {
        "version": STAGE_VERSION,
        "key": key,
        "data_fingerprint": data_fp,
        "backbone_fingerprint": backbone_fp,
        "settings_key": settings,
        "dtype": dtype,
        "samples": n,
        "grid": list(detector.backbone.grid),
        "layers": list(detector.settings.layers),
        "shards": [{"file": shard_name(i), "start": a, "stop": b} for i, (a, b) in enumerate(bounds)],
        "labels": labels,
        "has_mask": has_mask,
    }
    if isinstance(directory, Path):
        atomic_write_bytes(directory / STAGE_FILE, json.dumps(stage).encode())
    else:
        storage.write_bytes(_child(directory, STAGE_FILE), json.dumps(stage).encode())
    return FeatureStageResult(directory, n, len(bounds), len(todo), False, time.perf_counter() - began)


def _present_files(directory: Path | str) -> set[str]:
    """Names of the files directly in a stage directory (one listing on S3)."""
    if isinstance(directory, Path):
        return {p.name for p in directory.iterdir() if p.is_file()} if directory.is_dir() else set()
    base = directory.rstrip("/") + "/"
    return {o.uri[len(base):] for o in storage.list_objects(directory) if "/" not in o.uri[len(base):]}


class ShardedFeatures:
    """Read access to a finished feature stage; rows are fetched from memory-mapped shard files.

    On an s3:// stage each shard is fetched into the node's object cache the first time it is
    read, so the workers of one node download it once.
    """

    def __init__(self, directory: str | Path):
        self.directory = _location(directory)
        try:
            raw = storage.read_bytes(_child(self.directory, STAGE_FILE))
        except ObjectNotFound:
            raise DataError(f"{self.directory}: no {STAGE_FILE}; the feature stage did not finish") from None
        self.stage = json.loads(raw)
        self.grid = tuple(self.stage["grid"])
        self.labels = torch.tensor(self.stage["labels"], dtype=torch.long)
        self.has_mask = torch.tensor(self.stage["has_mask"], dtype=torch.bool)
        starts = [s["start"] for s in self.stage["shards"]]
        self._starts = torch.tensor(starts, dtype=torch.long)
        self._shards: dict[int, dict] = {}

    def __len__(self) -> int:
        return int(self.stage["samples"])

    def _shard(self, index: int) -> dict:
        if index not in self._shards:
            # mmap: opening costs nothing, and indexing reads only the pages of the rows asked for.
            path = storage.local_path_for(str(_child(self.directory, self.stage["shards"][index]["file"])))
            self._shards[index] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._shards[index]

    def _gather(self, indices: Tensor) -> tuple[FeatureTable, Tensor]:
        """The rows of `indices` grouped by shard, and the permutation back to the order asked for."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        shard_of = torch.searchsorted(self._starts, indices, right=True) - 1
        parts: dict[str, list[Tensor]] = {key: [] for key in ROW_FIELDS}
        positions = []
        for shard in shard_of.unique().tolist():
            chosen = (shard_of == shard).nonzero().flatten()
            local = indices[chosen] - int(self._starts[shard])
            data = self._shard(shard)
            for key in parts:
                parts[key].append(data[key][local])
            positions.append(chosen)
        inverse = torch.empty(len(indices), dtype=torch.long)
        inverse[torch.cat(positions)] = torch.arange(len(indices))
        table = FeatureTable(grid=self.grid, **{key: torch.cat(values) for key, values in parts.items()})
        return table, inverse

    def rows(self, indices: Tensor) -> FeatureTable:
        """The table restricted to `indices` (global sample positions), in that order."""
        table, inverse = self._gather(indices)
        return FeatureTable(grid=self.grid, **{key: getattr(table, key)[inverse] for key in ROW_FIELDS})

    def batch(self, indices: Tensor, device: torch.device) -> tuple[Features, Tensor, Tensor, Tensor]:
        """Same tensors as `FeatureTable.batch` for these samples (dtype conversions included)."""
        # The reordering is left to `FeatureTable.batch`, which indexes anyway: one copy of the
        # patch features per step instead of two.
        table, inverse = self._gather(indices)
        return table.batch(inverse, device)
