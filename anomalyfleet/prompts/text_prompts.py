"""AnomalyCLIP's object-agnostic text prompt learner.

Two templates, "X ... X object." (normal) and "X ... X damaged object." (abnormal); the 12 `X`
token embeddings after the start token are replaced by learnable context vectors, and deep prompts
overwrite positions 1..4 in text layers 2..depth. Parameter and buffer names follow the reference
checkpoint format so `state_dict()` round-trips `{"prompt_learner": ...}` files as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalyfleet.backbones.clip_vit import CLIPTextTower

NORMAL_TEMPLATE = "{} object."
ABNORMAL_TEMPLATE = "{} damaged object."
# Present in reference checkpoints but never used by its forward pass; kept for format parity.
UNUSED_PROJECTION_DIM = 896


@dataclass(frozen=True)
class PromptConfig:
    n_ctx: int = 12
    depth: int = 9  # deep prompts go into text layers 2..depth
    deep_length: int = 4
    fp16_deep_prompts: bool = True  # the reference's rounding, needed for score parity


class AnomalyCLIPPromptLearner(nn.Module):
    def __init__(self, text_tower: CLIPTextTower, config: PromptConfig = PromptConfig()):
        super().__init__()
        # A plain attribute, not a submodule: the frozen text tower belongs to the backbone and must
        # not appear in this module's state dict.
        object.__setattr__(self, "text_tower", text_tower)
        self.config = config
        width = text_tower.width
        n = config.n_ctx
        self.ctx_pos = nn.Parameter(torch.empty(1, 1, n, width).normal_(std=0.02))
        self.ctx_neg = nn.Parameter(torch.empty(1, 1, n, width).normal_(std=0.02))
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(config.deep_length, width).normal_(std=0.02)) for _ in range(config.depth - 1)]
        )
        self.compound_prompt_projections = nn.ModuleList(
            [nn.Linear(width, UNUSED_PROJECTION_DIM) for _ in range(config.depth - 1)]
        )
        self.compound_prompt_projections.requires_grad_(False)
        prefix = " ".join(["X"] * n)
        device = text_tower.token_embedding.weight.device
        for suffix, text in (("pos", NORMAL_TEMPLATE.format(prefix)), ("neg", ABNORMAL_TEMPLATE.format(prefix))):
            tokens = text_tower.tokenize([text]).to(device)
            with torch.no_grad():
                embedding = text_tower.token_embedding(tokens).float()
            self.register_buffer(f"token_prefix_{suffix}", embedding[:, :1].unsqueeze(0).clone())
            self.register_buffer(f"token_suffix_{suffix}", embedding[:, 1 + n :].unsqueeze(0).clone())
            self.register_buffer(f"tokenized_prompts_{suffix}", tokens.unsqueeze(0).clone())

    def prompt_embeddings(self) -> tuple[Tensor, Tensor]:
        """(2, L, W) token embeddings and (2, L) token ids, normal first."""
        pos = torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos], dim=2)
        neg = torch.cat([self.token_prefix_neg, self.ctx_neg, self.token_suffix_neg], dim=2)
        prompts = torch.cat([pos.flatten(0, 1), neg.flatten(0, 1)], dim=0)
        tokenized = torch.cat([self.tokenized_prompts_pos.flatten(0, 1), self.tokenized_prompts_neg.flatten(0, 1)])
        return prompts, tokenized

    def forward(self) -> Tensor:
        """Normalised text features (2, D): [normal, abnormal]."""
        prompts, tokenized = self.prompt_embeddings()
        dtype = self.text_tower.token_embedding.weight.dtype
        features = self.text_tower.encode(
            prompts.to(dtype),
            tokenized,
            deep_prompts=list(self.compound_prompts_text),
            fp16_deep_prompts=self.config.fp16_deep_prompts,
        ).float()
        return F.normalize(features, dim=-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.ctx_pos, self.ctx_neg, *self.compound_prompts_text]
