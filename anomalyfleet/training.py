"""Prompt learning: AnomalyCLIP's losses and optimiser over frozen (cached) image features.

`train_step` is a plain function over one batch so Ray Train can run it per worker (the prompts
may be wrapped in DistributedDataParallel). `train_prompts` is the single-process loop: seeded
epoch order, a checkpoint after every epoch, resume from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalyfleet import losses, maps
from anomalyfleet.backbones import Features
from anomalyfleet.data import AnomalyDataset, Sample
from anomalyfleet.data.samples import files_fingerprint
from anomalyfleet.detector import Detector
from anomalyfleet.errors import ConfigError
from anomalyfleet.features import FeatureTable, compute_feature_table, settings_key
from anomalyfleet.manifest import atomic_write_bytes
from anomalyfleet.train_config import CACHE_DTYPES, TrainConfig  # noqa: F401  (re-exported)

@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas)


def compute_losses(
    prompts: Callable[[], Tensor],
    features: Features,
    masks: Tensor,
    has_mask: Tensor,
    labels: Tensor,
    image_size: int,
    temperature: float = maps.TEMPERATURE,
    local_weight: float = 4.0,
) -> dict[str, Tensor]:
    text = prompts()
    logits = maps.image_logits(features.global_feature, text, temperature)
    needs_maps = bool(has_mask.any())
    layer_maps = (
        maps.layer_probability_maps(features.patch_features, text, features.grid, image_size, temperature)
        if needs_maps
        else []
    )
    return losses.total_loss(layer_maps, masks, has_mask, logits, labels, local_weight)


def train_step(
    prompts: Callable[[], Tensor],
    optimizer: torch.optim.Optimizer,
    features: Features,
    masks: Tensor,
    has_mask: Tensor,
    labels: Tensor,
    image_size: int,
    temperature: float = maps.TEMPERATURE,
    local_weight: float = 4.0,
) -> dict[str, float]:
    """One optimisation step on one batch of frozen features; returns the loss terms."""
    result = compute_losses(prompts, features, masks, has_mask, labels, image_size, temperature, local_weight)
    optimizer.zero_grad(set_to_none=True)
    result["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in result.items()}


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of one epoch: depends only on (seed, epoch), so a resumed run repeats it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def run_fingerprint(detector: Detector, samples: Sequence[Sample], config: TrainConfig) -> str:
    """What makes a training run the same run, to resume it: the features it sees, its samples and
    their files (a mask corrected in place is another run), the prompts it starts from (seeded, or
    another bundle's with --init-bundle, and their kind and precision) and the optimisation
    settings. Not the epoch count: a finished run continues when asked for more epochs."""
    initial = hashlib.sha256()
    for name, tensor in sorted(detector.prompts.state_dict().items()):
        initial.update(name.encode())
        initial.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    payload = {
        "features": settings_key(detector),
        "samples": [(s.image, s.label, s.mask) for s in samples],
        "files": files_fingerprint(samples),
        "prompts": [type(detector.prompts).__name__, repr(getattr(detector.prompts, "config", None)),
                    initial.hexdigest()],
        "config": {k: v for k, v in asdict(config).items() if k not in ("cache", "cache_dir", "num_workers", "epochs")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, prompts: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, run: str) -> None:
    buffer = io.BytesIO()
    torch.save(
        {"prompts": prompts.state_dict(), "optimizer": optimizer.state_dict(), "epoch": state.epoch,
         "history": state.history, "run": run},
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, prompts: nn.Module, optimizer: torch.optim.Optimizer, run: str) -> TrainState | None:
    if not path.is_file():
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values: no code runs
    if data.get("run") != run:
        raise ConfigError(f"{path} belongs to a different training run (data or settings changed); remove it or use another --checkpoint-dir")
    prompts.load_state_dict(data["prompts"])
    optimizer.load_state_dict(data["optimizer"])
    return TrainState(epoch=int(data["epoch"]), history=list(data["history"]))


def _uncached_batches(detector: Detector, samples: Sequence[Sample], order: Tensor, config: TrainConfig):
    """The plain path: run the backbone on every batch of every epoch (equivalence reference)."""
    dataset = AnomalyDataset(list(samples), image_size=detector.image_size, mean=detector.mean, std=detector.std)
    subset = torch.utils.data.Subset(dataset, order.tolist())
    for batch in DataLoader(subset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers):
        features = detector.extract(batch["image"].to(detector.device))
        masks = (batch["mask"][:, 0] > 0.5).float().to(detector.device)
        yield features, masks, batch["has_mask"].to(detector.device), batch["label"].to(detector.device)


def _cached_batches(table: FeatureTable, order: Tensor, batch_size: int, device: torch.device):
    for start in range(0, len(order), batch_size):
        yield table.batch(order[start : start + batch_size], device)


def train_prompts(
    detector: Detector,
    samples: Sequence[Sample],
    config: TrainConfig = TrainConfig(),
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    table: FeatureTable | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainState:
    """Train the detector's prompts in place; resumes from `checkpoint_dir` when it holds this run.

    `on_checkpoint(path)` runs after each epoch's checkpoint is written (e.g. to upload it).
    """
    config.validate()
    if not samples:
        raise ConfigError("no training samples")
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        raise ConfigError("training needs both normal and anomalous images")
    torch.manual_seed(config.seed)
    prompts = detector.prompts
    prompts.train()
    optimizer = make_optimizer(prompts.trainable_parameters(), config)
    run = run_fingerprint(detector, samples, config)
    ckpt_path = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    state = (load_checkpoint(ckpt_path, prompts, optimizer, run) if ckpt_path else None) or TrainState()
    if state.epoch > config.epochs:
        raise ConfigError(f"{ckpt_path} holds this run trained for {state.epoch} epochs, more than the {config.epochs} "
                          "asked for; ask for at least that many, or use another checkpoint directory")

    started = time.perf_counter()
    if config.cache != "none" and table is None and state.epoch < config.epochs:
        table = compute_feature_table(
            detector,
            samples,
            cache_dir=config.cache_dir if config.cache == "disk" else None,
            dtype=config.torch_cache_dtype,
            batch_size=config.feature_batch_size,
            num_workers=config.num_workers,
            progress=progress,
        )
    feature_seconds = time.perf_counter() - started

    n = len(samples)
    steps = (n + config.batch_size - 1) // config.batch_size
    bar = tqdm(total=(config.epochs - state.epoch) * steps, desc="prompts", unit="step", disable=not progress)
    for epoch in range(state.epoch, config.epochs):
        epoch_start = time.perf_counter()
        order = epoch_order(n, config.seed, epoch)
        batches = (
            _cached_batches(table, order, config.batch_size, detector.device)
            if table is not None
            else _uncached_batches(detector, samples, order, config)
        )
        totals: dict[str, float] = {}
        count = 0
        for features, masks, has_mask, batch_labels in batches:
            terms = train_step(
                prompts, optimizer, features, masks, has_mask, batch_labels,
                detector.settings.image_size, detector.settings.temperature, config.local_weight,
            )
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{terms['loss']:.4f}")
        record = {k: v / max(count, 1) for k, v in totals.items()}
        record.update(epoch=epoch + 1, seconds=time.perf_counter() - epoch_start)
        state.history.append(record)
        state.epoch = epoch + 1
        if ckpt_path:
            save_checkpoint(ckpt_path, prompts, optimizer, state, run)
            if on_checkpoint is not None:
                on_checkpoint(ckpt_path)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f} "
                       f"(local {record['local']:.4f}, global {record['global']:.4f})")
    bar.close()
    prompts.eval()
    detector.metadata["training"] = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "samples": n,
        "anomalous": sum(s.label for s in samples),
        "with_masks": sum(1 for s in samples if s.mask is not None),
        "history": state.history,
        "feature_seconds": feature_seconds,
    }
    return state
