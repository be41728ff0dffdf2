"""Tiny random-initialised models of the real classes, built in process (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_clip(seed: int = 0, vision_layers: int = 6, text_layers: int = 10, image_size: int = 56, patch: int = 14):
    """A random open_clip CLIP ViT in OpenAI layout (QuickGELU, width 64, heads = width // 64)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=vision_layers, width=128, patch_size=patch, image_size=image_size)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=text_layers)
    model = CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    # open_clip's default init leaves some tensors at exactly zero or one; perturb everything a bit
    # so that every weight participates and paths cannot agree by accident.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def save_openai_state_dict(model, path: Path) -> Path:
    """Save a model's weights as the plain state dict that `clip.load` reads."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path
