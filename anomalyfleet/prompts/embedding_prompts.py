"""Prompts for vision-only backbones: two learnable embeddings in the token-feature space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EmbeddingPairPrompts(nn.Module):
    """Learnable "normal" and "abnormal" embeddings, scored exactly like AnomalyCLIP's text features."""

    def __init__(self, dim: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.empty(2, dim).normal_(std=0.02))

    def forward(self) -> Tensor:
        return F.normalize(self.embeddings.float(), dim=-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.embeddings]
