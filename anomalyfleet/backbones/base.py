"""The one interface every vision backbone offers to the detector."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from anomalyfleet.backbones.dpam import BlockAdapter, dpam_forward


@dataclass
class Features:
    """Frozen image-side features: what prompt learning and scoring consume."""

    global_feature: Tensor  # (B, D), not normalised
    patch_features: list[Tensor]  # one (B, N, D) per requested layer, class token dropped
    grid: tuple[int, int]


class VisionBackbone(nn.Module):
    """A frozen ViT with DPAM, returning a global feature and patch features at chosen layers.

    Subclasses provide the embedding front (`embed`), block adapters, and the heads that map raw
    tokens into the feature space where prompts live (`project_patches`, `project_global`).
    """

    kind: str = "abstract"

    def __init__(self, image_size: int, patch_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    # --- what subclasses implement -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def embed(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def block_adapters(self) -> list[BlockAdapter]:
        raise NotImplementedError

    def project_patches(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def project_global(self, cls_token: Tensor) -> Tensor:
        raise NotImplementedError

    def set_image_size(self, image_size: int) -> None:
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able description sufficient to rebuild this backbone."""
        raise NotImplementedError

    def fingerprint_tensors(self) -> list[Tensor]:
        """Weights that identify this backbone (hashed into `fingerprint`)."""
        raise NotImplementedError

    # --- shared behaviour -----------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def text_tower(self):  # noqa: D401 - overridden by backbones that have one
        """The text encoder, or None for vision-only backbones."""
        return None

    def fingerprint(self) -> str:
        """Digest of identifying weights: refuses prompts trained on another backbone."""
        digest = hashlib.sha256()
        for tensor in self.fingerprint_tensors():
            data = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.numpy().tobytes())
        return digest.hexdigest()[:16]

    def forward(self, images: Tensor, layers: Sequence[int], dpam_layers: int, fast: bool = True) -> Features:
        expected = (self.image_size, self.image_size)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != expected:
            raise ValueError(f"expected images of shape (B, 3, {expected[0]}, {expected[1]}), got {tuple(images.shape)}")
        tokens = self.embed(images)
        cls_token, outputs = dpam_forward(tokens, self.block_adapters(), layers, dpam_layers, fast=fast)
        patches = [self.project_patches(outputs[layer]) for layer in layers]
        return Features(global_feature=self.project_global(cls_token), patch_features=patches, grid=self.grid)
