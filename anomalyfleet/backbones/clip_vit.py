"""CLIP ViT backbones (open_clip by name, or an OpenAI-format file) with DPAM and a text tower."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalyfleet.backbones.base import VisionBackbone
from anomalyfleet.backbones.dpam import BlockAdapter, merge_heads, open_clip_block_adapter
from anomalyfleet.errors import BundleError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def interpolate_positional_embedding(pos: Tensor, grid: int) -> Tensor:
    """Resize a (1 + S*S, C) CLIP positional embedding to (1 + grid*grid, C).

    Bilinear with align_corners=False and the class row kept, as the AnomalyCLIP reference does.
    """
    side = round((pos.shape[0] - 1) ** 0.5)
    if side == grid:
        return pos.clone()
    width = pos.shape[1]
    patch_pos = pos[1:].reshape(1, side, side, width).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    patch_pos = patch_pos.reshape(width, grid * grid).transpose(0, 1).to(pos.dtype)
    return torch.cat([pos[:1], patch_pos], dim=0)


class CLIPTextTower(nn.Module):
    """CLIP's text transformer with AnomalyCLIP's per-layer deep-prompt replacement."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        text = getattr(clip_model, "text", clip_model)  # CustomTextCLIP keeps the tower in `.text`
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.context_length = int(self.positional_embedding.shape[0])
        self._adapters = [open_clip_block_adapter(block) for block in self.transformer.resblocks]

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        from open_clip.tokenizer import tokenize

        return tokenize(list(texts), context_length=self.context_length)

    def project(self, x: Tensor) -> Tensor:
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    def encode(
        self,
        prompt_embeddings: Tensor,
        tokenized: Tensor,
        deep_prompts: Sequence[Tensor] = (),
        fp16_deep_prompts: bool = True,
    ) -> Tensor:
        """Encode prompt token embeddings (P, L, W) into (P, D) text features (not normalised).

        Layer 1 runs as is; before layers 2 .. 1 + len(deep_prompts) the token positions
        1 .. n of every prompt are overwritten by that layer's deep prompt (n, W).
        """
        x = prompt_embeddings + self.positional_embedding.to(prompt_embeddings.dtype)
        for index, block in enumerate(self._adapters):
            deep_index = index - 1
            if 0 <= deep_index < len(deep_prompts):
                context = deep_prompts[deep_index]
                if fp16_deep_prompts:
                    # The reference casts deep prompts to float16 before inserting them.
                    context = context.half()
                context = context.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                n = context.shape[1]
                x = torch.cat([x[:, :1], context, x[:, 1 + n :]], dim=1)
            x = self._block(block, x)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), tokenized.argmax(dim=-1)]
        return self.project(eot)

    @staticmethod
    def _block(block: BlockAdapter, x: Tensor) -> Tensor:
        q, k, v = block.qkv(block.norm1(x))
        x = x + block.out(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        return x + block.mlp(block.norm2(x))


class CLIPBackbone(VisionBackbone):
    """Frozen open_clip ViT; features in CLIP's joint space (`ln_post`, then `proj`)."""

    kind = "clip"

    def __init__(
        self,
        clip_model: nn.Module,
        image_size: int,
        source: dict,
        global_ln_post: bool = False,
    ):
        visual = clip_model.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
            raise BundleError("only ViT CLIP models are supported (this one has no ViT vision tower)")
        patch = visual.conv1.kernel_size[0]
        super().__init__(image_size=image_size, patch_size=patch, mean=CLIP_MEAN, std=CLIP_STD)
        self.visual = visual
        self.text = CLIPTextTower(clip_model)
        self.source = dict(source)
        # The reference's global feature skips ln_post; kept as the default for checkpoint parity.
        self.global_ln_post = global_ln_post
        self.register_buffer("_source_pos", visual.positional_embedding.detach().clone(), persistent=False)
        self._adapters = [open_clip_block_adapter(block) for block in visual.transformer.resblocks]
        self.requires_grad_(False)
        self.eval()
        self.set_image_size(image_size)

    @property
    def text_tower(self) -> CLIPTextTower:
        return self.text

    @property
    def num_layers(self) -> int:
        return len(self._adapters)

    @property
    def feature_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    @property
    def width(self) -> int:
        return int(self.visual.conv1.out_channels)

    def set_image_size(self, image_size: int) -> None:
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        self.image_size = int(image_size)
        pos = interpolate_positional_embedding(self._source_pos, image_size // self.patch_size)
        self.visual.positional_embedding.data = pos.to(self.visual.positional_embedding.device)

    def embed(self, images: Tensor) -> Tensor:
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def block_adapters(self) -> list[BlockAdapter]:
        return self._adapters

    def project_patches(self, tokens: Tensor) -> Tensor:
        return self.visual.ln_post(tokens[:, 1:]) @ self.visual.proj

    def project_global(self, cls_token: Tensor) -> Tensor:
        if self.global_ln_post:
            cls_token = self.visual.ln_post(cls_token)
        return cls_token @ self.visual.proj

    def spec(self) -> dict:
        return dict(self.source)

    def fingerprint_tensors(self) -> list[Tensor]:
        v = self.visual
        return [v.class_embedding, v.proj, v.conv1.weight, self._source_pos, self.text.token_embedding.weight[:64]]


def load_openai_clip_file(path: str | Path) -> nn.Module:
    """Build an open_clip model from an OpenAI-format CLIP file (TorchScript archive or state dict)."""
    from open_clip.model import build_model_from_openai_state_dict

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"CLIP weights not found: {path}")
    try:
        with warnings.catch_warnings():
            # OpenAI's files are TorchScript archives; torch's deprecation notice for jit.load is
            # about the format, not something a user of these weights can act on.
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:  # not a TorchScript archive: a plain (or wrapped) state dict
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors all mean "not a weights file"
            # (torch's message suggests weights_only=False, which would run the file's code: no.)
            raise BundleError(f"cannot read CLIP weights {path}: not a TorchScript archive or a state dict "
                              f"({type(exc).__name__})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    if isinstance(state, dict):
        # Traced archives may carry the text causal mask, which the model rebuilds itself.
        state = {k: v for k, v in state.items() if k != "attn_mask"}
    if not isinstance(state, dict) or "visual.proj" not in state:
        raise BundleError(f"{path} is not an OpenAI-format CLIP ViT (no visual.proj)")
    try:
        model = build_model_from_openai_state_dict(dict(state)).float()
        # open_clip rounds every weight to float16 while building; the reference does not, so
        # load the file's own values again at full precision.
        model.load_state_dict({k: v.float() for k, v in state.items() if k in model.state_dict()}, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise BundleError(f"{path}: weights do not form a CLIP model ({str(exc).splitlines()[0]})") from exc
    return model.eval()


def load_open_clip_model(name: str, pretrained: str | None) -> nn.Module:
    """Build an open_clip model by name; `pretrained` is a tag or a local weights file."""
    import open_clip

    if name not in open_clip.list_models():
        raise BundleError(f"unknown open_clip model {name!r}")
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device="cpu")
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as exc:
        raise BundleError(f"cannot load open_clip {name} weights {pretrained!r}: {str(exc).splitlines()[0]}") from exc
    return model.float().eval()
