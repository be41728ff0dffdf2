"""The detector: a frozen backbone plus learned prompts, turning images into scores and maps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from anomalyfleet import maps as mapping
from anomalyfleet.backbones import BackboneSpec, Features, VisionBackbone, create_backbone, default_settings
from anomalyfleet.device import autocast
from anomalyfleet.errors import ConfigError
from anomalyfleet.memory import LineMemory
from anomalyfleet.prompts import AnomalyCLIPPromptLearner, EmbeddingPairPrompts, PromptConfig


@dataclass(frozen=True)
class DetectorSettings:
    """How a detector runs; every field can be overridden at scoring time."""

    image_size: int
    layers: tuple[int, ...]
    dpam_layers: int
    sigma: float = 4.0
    temperature: float = mapping.TEMPERATURE

    def validate(self, num_layers: int, patch_size: int) -> None:
        if self.image_size <= 0 or self.image_size % patch_size:
            raise ConfigError(f"image size {self.image_size} must be a positive multiple of the patch size {patch_size}")
        if not self.layers:
            raise ConfigError("at least one map layer is needed")
        bad = [layer for layer in self.layers if not 1 <= layer <= num_layers]
        if bad:
            raise ConfigError(f"layers {bad} are outside 1..{num_layers} for this backbone")
        if not 0 <= self.dpam_layers <= num_layers:
            raise ConfigError(f"dpam layers must be within 0..{num_layers}, got {self.dpam_layers}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DetectorSettings":
        return cls(
            image_size=int(data["image_size"]),
            layers=tuple(int(x) for x in data["layers"]),
            dpam_layers=int(data["dpam_layers"]),
            sigma=float(data.get("sigma", 4.0)),
            temperature=float(data.get("temperature", mapping.TEMPERATURE)),
        )


@dataclass
class Prediction:
    scores: np.ndarray  # (B,) probability of "abnormal" (prompts); a calibrated score with a line memory
    maps: np.ndarray  # (B, S, S) smoothed anomaly maps at the detector's image size


def make_prompts(backbone: VisionBackbone, config: PromptConfig = PromptConfig()) -> nn.Module:
    """Text prompts when the backbone has a text tower, else the embedding pair."""
    tower = backbone.text_tower
    if tower is not None:
        return AnomalyCLIPPromptLearner(tower, config)
    return EmbeddingPairPrompts(backbone.feature_dim)


def prompt_kind(prompts: nn.Module) -> str:
    return "text" if isinstance(prompts, AnomalyCLIPPromptLearner) else "embedding_pair"


class Detector(nn.Module):
    def __init__(
        self,
        backbone: VisionBackbone,
        prompts: nn.Module,
        settings: DetectorSettings,
        thresholds: dict | None = None,
        metadata: dict | None = None,
        precision: str | None = None,
        memory: LineMemory | None = None,
    ):
        super().__init__()
        settings.validate(backbone.num_layers, backbone.patch_size)
        if backbone.image_size != settings.image_size:
            backbone.set_image_size(settings.image_size)
        self.backbone = backbone
        self.prompts = prompts
        self.settings = settings
        self.thresholds = dict(thresholds or {})
        self.metadata = dict(metadata or {})
        self.precision = precision
        self.memory = memory
        self._check_memory()

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        spec: BackboneSpec,
        image_size: int | None = None,
        layers: Sequence[int] | None = None,
        dpam_layers: int | None = None,
        prompt_config: PromptConfig = PromptConfig(),
        seed: int = 111,
        backbone: VisionBackbone | None = None,
    ) -> "Detector":
        """A detector with freshly initialised prompts (seeded) on the backbone `spec` names."""
        backbone = backbone or create_backbone(spec, image_size)
        defaults = default_settings(spec, backbone.num_layers, backbone.patch_size)
        settings = DetectorSettings(
            image_size=image_size or defaults["image_size"],
            layers=tuple(layers or defaults["layers"]),
            dpam_layers=defaults["dpam_layers"] if dpam_layers is None else dpam_layers,
        )
        torch.manual_seed(seed)
        return cls(backbone, make_prompts(backbone, prompt_config), settings)

    def with_settings(self, **overrides) -> "Detector":
        """The same weights with some settings overridden (image size, layers, DPAM depth, sigma)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "layers" in overrides:
            overrides["layers"] = tuple(overrides["layers"])
        self.settings = replace(self.settings, **overrides)
        self.settings.validate(self.backbone.num_layers, self.backbone.patch_size)
        self.backbone.set_image_size(self.settings.image_size)
        self._check_memory()
        memory = self.memory
        if memory is not None and memory.active and "sigma" in overrides \
                and float(overrides["sigma"]) != float(memory.info.get("sigma", 4.0)):
            # The image-score scales were fitted on maps smoothed at the build's sigma: refit them
            # at this one from the calibration images the memory keeps, or the scores drift off-scale.
            memory.configure(memory.fusion, float(self.settings.sigma))
            memory.info["sigma"] = float(self.settings.sigma)
        return self

    def _check_memory(self) -> None:
        """A line memory holds only at the settings its features and calibrations were taken at."""
        memory = self.memory
        if memory is None or not memory.active:
            return
        bad = [layer for layer in memory.layers if not 1 <= layer <= self.backbone.num_layers]
        if bad:
            raise ConfigError(f"memory layers {bad} are outside 1..{self.backbone.num_layers} for this backbone")
        now = {"image_size": self.settings.image_size, "dpam_layers": self.settings.dpam_layers,
               "layers": list(self.settings.layers)}
        if memory.fusion.mode == "memory":
            now.pop("layers")  # the prompt maps are not used
        changed = {k: (memory.built_with[k], v) for k, v in now.items() if k in memory.built_with and memory.built_with[k] != v}
        if changed:
            said = ", ".join(f"{k} {old} (now {new})" for k, (old, new) in changed.items())
            raise ConfigError(f"this detector's line memory was built at {said}; score at those settings or "
                              "rebuild the memory (anomalyfleet memory build)")

    @property
    def active_memory(self) -> LineMemory | None:
        """The line memory when it takes part in scoring (not in `prompts` mode)."""
        return self.memory if self.memory is not None and self.memory.active else None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Layers `extract` returns: the prompt map layers, then memory layers not among them."""
        memory = self.active_memory
        return self.layers_with(() if memory is None else memory.layers)

    def layers_with(self, extra: Sequence[int]) -> tuple[int, ...]:
        """The prompt map layers, then the layers of `extra` not among them (one feature pass for both)."""
        layers = tuple(self.settings.layers)
        return layers + tuple(layer for layer in extra if layer not in layers)

    # --- properties -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.prompts.parameters()).device

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.backbone.std

    # --- the forward pieces ---------------------------------------------------------------------
    def extract(self, images: Tensor, fast: bool = True, layers: Sequence[int] | None = None) -> Features:
        """Frozen image-side features (no gradients; mixed precision if configured).

        Patch features come at `layers`, by default `feature_layers` (the map layers, plus the
        memory's layers when a line memory takes part in scoring).
        """
        layers = self.feature_layers if layers is None else tuple(layers)
        with torch.inference_mode(), autocast(images.device, self.precision):
            features = self.backbone(images, layers, self.settings.dpam_layers, fast=fast)
        return Features(
            global_feature=features.global_feature.float(),
            patch_features=[p.float() for p in features.patch_features],
            grid=features.grid,
        )

    def text_features(self) -> Tensor:
        return self.prompts()

    def layer_maps(self, features: Features, text: Tensor) -> list[Tensor]:
        patches = features.patch_features[: len(self.settings.layers)]  # memory layers follow
        return mapping.layer_probability_maps(
            patches, text, features.grid, self.settings.image_size, self.settings.temperature
        )

    def score_features(self, features: Features, text: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Image scores (B,) and unsmoothed anomaly maps (B, S, S) from cached or fresh features."""
        text = self.text_features() if text is None else text
        scores = mapping.image_scores(features.global_feature, text, self.settings.temperature)
        return scores, mapping.anomaly_map(self.layer_maps(features, text))

    def predict_features(self, features: Features, text: Tensor | None = None,
                         peers: Tensor | None = None) -> Prediction:
        """Scores and smoothed maps: the prompts', or with a line memory the active mode's fusion.

        Every scoring path (CLI score/eval, bulk scoring, Serve replicas) goes through here, so a
        bundle's memory and fusion settings apply everywhere without changes on their side.
        `peers` (B, P): the images' mutual scores among other images of their line at the memory's
        layers, which the memory's distances are completed with (`LineMemory.patch_scores`).
        """
        memory = self.active_memory
        if peers is not None and memory is None:
            raise ValueError("peer scores complete a line memory's distances, and this detector scores without one")
        if memory is None:
            scores, raw = self.score_features(features, text)
            return Prediction(scores=scores.cpu().numpy(), maps=mapping.smooth_maps(raw, self.settings.sigma))
        layers = self.feature_layers
        if len(features.patch_features) != len(layers):
            raise ValueError(f"features hold {len(features.patch_features)} layers; this detector with its line "
                             f"memory needs {list(layers)} (use detector.extract)")
        memory_patches = [features.patch_features[layers.index(layer)] for layer in memory.layers]
        memory_raw = memory.raw_maps(memory_patches, self.settings.image_size, peers)
        prompt_scores = prompt_raw = None
        if memory.fusion.sources["prompts"]:
            prompt_scores, prompt_raw = self.score_features(features, text)
        scores, maps = memory.fuse(memory_raw, prompt_scores, prompt_raw, self.settings.sigma)
        return Prediction(scores=scores, maps=maps)

    def image_scores(self, features: Features, text: Tensor | None = None, peers: Tensor | None = None) -> Tensor:
        """Image scores alone: the prompts' global score, or the fused score with a line memory
        (which needs the maps, so it costs what `predict_features` does)."""
        if self.active_memory is None and peers is None:
            text = self.text_features() if text is None else text
            return mapping.image_scores(features.global_feature, text, self.settings.temperature)
        return torch.from_numpy(self.predict_features(features, text, peers=peers).scores)

    @torch.inference_mode()
    def predict(self, images: Tensor, fast: bool = True) -> Prediction:
        return self.predict_features(self.extract(images.to(self.device), fast=fast))

    def predict_batches(self, batches: Iterable[Tensor]) -> Iterable[Prediction]:
        """Score an iterable of image batches, computing the prompt features once."""
        with torch.inference_mode():
            text = self.text_features()
            for images in batches:
                yield self.predict_features(self.extract(images.to(self.device)), text)

    def describe(self) -> dict:
        description = {
            "backbone": self.backbone.spec(),
            "backbone_fingerprint": self.backbone.fingerprint(),
            "prompt_kind": prompt_kind(self.prompts),
            "settings": self.settings.to_dict(),
            "thresholds": dict(self.thresholds),
        }
        if self.memory is not None:
            description["memory"] = self.memory.metadata()
        return description


__all__ = ["Detector", "DetectorSettings", "Prediction", "make_prompts", "prompt_kind"]
