"""The service's configuration: one typed model, validated once, from a file, the environment or code.

Sources, later ones winning: the model's defaults, a YAML/JSON file (`ANOMALYFLEET_SERVE_CONFIG` or
the path given), then `ANOMALYFLEET_SERVE_<FIELD>` variables for scalar fields (so a serve config's
`runtime_env.env_vars` can tune a deployment without another file) and `ANOMALYFLEET_REGISTRY`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from anomalyfleet.errors import ConfigError, validation_problem, yaml_problem
from anomalyfleet.serving.auth import TokenGrant
from anomalyfleet.yaml_unique import load_yaml_unique

from anomalyfleet.rolling_window import Z_THRESHOLD  # noqa: E402

CONFIG_ENV = "ANOMALYFLEET_SERVE_CONFIG"
REGISTRY_ENV = "ANOMALYFLEET_REGISTRY"
FIELD_ENV_PREFIX = "ANOMALYFLEET_SERVE_"
WINDOW_MAX_SIZE = 128
WINDOW_THRESHOLD = Z_THRESHOLD
WINDOW_PIXEL_THRESHOLD = 2.0


class WindowSettings(BaseModel):
    """A line's rolling window (batch zero-shot mode): score by mutual comparison with the line's
    recent images, for lines with no normal images. Off unless a line's registry entry has one:

        lines:
          press-7: {bundle: bundles/press-7, window: {size: 32, min_images: 8}}

    Until `min_images` images have arrived the line is scored by its bundle (prompts, or its line
    memory); see `anomalyfleet.rolling_window` for the scoring and its scale, and
    `anomalyfleet.serving.service` for where windows live (one per scorer replica, or one per line
    with `shared: true`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Recent images held. Memory per replica and line is 4 * size * P * (D + size) bytes for P
    # patches of width D (ViT-S/14 at 224 px: P 256, D 384 -> 14 MB at size 32, 67 MB at the cap);
    # the cap keeps a wide window from taking a replica's memory.
    size: int = Field(32, ge=3, le=WINDOW_MAX_SIZE)
    # Images needed before the window scores; fewer give a noisy leave-one-out scale.
    min_images: int = Field(8, ge=3)
    # Feature block compared; None: a line memory's default block (8 of the ViT-S's 12). On a
    # Magnetic Tile held-out stream (benchmarks/results-rolling-window.md) block 8 ranked images
    # better than block 6 (image AUROC 0.785-0.808 against 0.752-0.765) at 1-2 points lower pixel
    # AUROC.
    layer: int | None = Field(None, ge=1)
    # Share of the window's images whose nearest-patch distances are averaged (smallest first):
    # below the share of normal images, so a minority of defective images cannot raise the score.
    fraction: float = Field(0.3, gt=0.0, le=1.0)
    # Image score: mean of the calibrated map's top pixels.
    top_fraction: float = Field(0.01, gt=0.0, le=1.0)
    # Decision threshold on the window's scale: robust standard deviations above the window's
    # own images (see anomalyfleet.rolling_window). On that Magnetic Tile stream 3 flagged 0.4-1.9%
    # of the normal images (block 6: 0.9-1.5%).
    threshold: float = Field(WINDOW_THRESHOLD, allow_inf_nan=False)
    # Map level for defect boxes, on the window's pixel scale (1 = the 99th percentile of the
    # window's own pixels; normal pixels above 2: 0.03-0.09% on that stream); the map PNG spans
    # twice this level.
    pixel_threshold: float = Field(WINDOW_PIXEL_THRESHOLD, gt=0.0, allow_inf_nan=False)
    # One window for the line, held by a Ray actor every scorer replica sends its images to, instead
    # of one per replica: the same window whichever replica takes a request, kept through replica
    # restarts and scale-downs (see anomalyfleet.serving.window_keeper). Costs one hop per batch.
    shared: bool = False
    # Peers for the line memory instead of a scorer of its own: the bundle scores every image (its
    # scale, thresholds and `source`, with "+peers"), each patch's memory distance lowered to its
    # mutual score among the window's images where that is smaller (anomalyfleet.memory
    # .peer_patch_scores). Measured this way on a stream of the three products (benchmarks/peers.py,
    # '+ window peers': window 32, each image meets only the ones before it, the first `min_images`
    # get no peers; memories with the default views): with 1 memory image it added 2.9 image AUROC
    # on Magnetic Tile, 3.4 on ELPV poly cells and 0.6 on mono cells to the fused detector; with 4,
    # 0.2 on cells and -0.3 on Magnetic Tile; with 16, -0.4 to +0.1 (benchmarks/results-peers.txt). Needs a
    # bundle with an active line memory on one block (the window compares that block);
    # `threshold` and `pixel_threshold` are then unused. Like the window itself, it misses defects
    # that many of the window's images share.
    peers: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "WindowSettings":
        if self.min_images > self.size:
            raise ValueError(f"min_images ({self.min_images}) exceeds the window size ({self.size})")
        return self

    @property
    def map_scale(self) -> float:
        return 2.0 * self.pixel_threshold


class ServiceConfig(BaseModel):
    """Everything `build_app` needs; deployment options here are what a serve config may override."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where the line registry lives (path, file:// or s3://); None serves the bundled detector as
    # one line, "default", so `serve run serving.app:app` works on a fresh checkout.
    registry: str | None = None
    # How often each gateway replica looks for a changed registry or a republished bundle. The
    # check is a stat for local files, so a small value is cheap; 0 checks on every request.
    registry_check_interval_s: float = Field(5.0, ge=0)

    # Scorer (the model replicas): autoscaling and resources.
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # Torch threads per scorer replica; None uses the CPUs Ray grants the replica (at least 1), so
    # replicas sharing a machine do not oversubscribe its cores.
    torch_threads: int | None = Field(None, ge=1)
    # CPUs reserved for each shared-window actor (lines with `window: {shared: true}`). With 0 the
    # actor reserves nothing and its work (tens of milliseconds per image on one core) goes uncounted
    # by Ray's scheduler; reserve 1 on busy clusters.
    window_num_cpus: float = Field(0.0, ge=0)
    # How long a replica waits for a shared window's actor before scoring the batch with the line's
    # bundle instead.
    window_timeout_s: float = Field(10.0, gt=0)
    # Where shared windows keep snapshots (an s3:// prefix, or a directory every node sees; one file
    # per application and line), so a line's window survives its actor and a restart of the Ray
    # cluster. None: in memory only.
    window_state: str | None = None
    # New images between two snapshots of a shared window (one file write each; a window of 32
    # ViT-S/14 images at 224 px is about 13 MB).
    window_snapshot_every: int = Field(8, ge=1)
    # How many detectors one replica keeps loaded (LRU); backbones are shared between them.
    max_models_per_replica: int = Field(4, ge=1)

    # Dynamic batching on each scorer replica; max_batch_size 1 turns batching off.
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)

    # Gateway (HTTP ingress): light CPU work (auth, decoding, resizing, overlays).
    gateway_min_replicas: int = Field(1, ge=1)
    gateway_max_replicas: int = Field(2, ge=1)
    gateway_num_cpus: float = Field(0.25, ge=0)
    gateway_max_ongoing_requests: int = Field(64, ge=1)

    # Input limits. body_timeout_s bounds how long a request may take to send its body: slow or
    # stalled uploads would otherwise hold gateway slots forever (64 of them froze the service).
    body_timeout_s: float = Field(30.0, gt=0)
    max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_batch_files: int = Field(32, ge=1)

    # Bearer tokens per client (lines: which lines a client may score; "*" for all). Lines may add
    # their own tokens in the registry. require_auth None: on as soon as any token is configured.
    tokens: list[TokenGrant] = Field(default_factory=list)
    require_auth: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie within min_replicas..max_replicas")
        if self.gateway_min_replicas > self.gateway_max_replicas:
            raise ValueError("gateway_min_replicas exceeds gateway_max_replicas")
        # Serve refuses a batch that cannot fit into the replica's ongoing-request budget.
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least max_batch_size ({self.max_batch_size})"
            )
        return self

    # --- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> "ServiceConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid service configuration: {validation_problem(exc)}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ServiceConfig":
        return cls.from_mapping(_read_mapping(path))

    @classmethod
    def from_env_or_file(cls, path: str | Path | None = None, environ: dict[str, str] | None = None) -> "ServiceConfig":
        env = os.environ if environ is None else environ
        path = path or env.get(CONFIG_ENV)
        data: dict[str, Any] = _read_mapping(path) if path else {}
        for name, field in cls.model_fields.items():
            raw = env.get(FIELD_ENV_PREFIX + name.upper())
            if raw is None:
                continue
            # Lists (tokens) come as JSON; scalars as text that pydantic coerces and checks.
            if name == "tokens":
                try:
                    data[name] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{FIELD_ENV_PREFIX}TOKENS: not JSON ({exc.msg}); expected a list of token grants") from None
            else:
                data[name] = None if raw == "" else raw
        if env.get(REGISTRY_ENV):
            data["registry"] = env[REGISTRY_ENV]
        return cls.from_mapping(data)


def _read_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"service configuration not found: {path}")
    try:
        data = load_yaml_unique(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON ({yaml_problem(exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (YAML or JSON expected)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return data


__all__ = ["ServiceConfig", "WindowSettings", "CONFIG_ENV", "REGISTRY_ENV"]
