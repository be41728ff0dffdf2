"""Object-agnostic prompts: both produce two normalised features, [normal, abnormal]."""

from anomalyfleet.prompts.embedding_prompts import EmbeddingPairPrompts
from anomalyfleet.prompts.text_prompts import AnomalyCLIPPromptLearner, PromptConfig

__all__ = ["AnomalyCLIPPromptLearner", "EmbeddingPairPrompts", "PromptConfig"]
