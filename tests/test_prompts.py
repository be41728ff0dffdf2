"""Prompt learner: templates, deep-prompt replacement, float16 rounding, the embedding pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anomalyfleet.backbones.clip_vit import CLIPBackbone
from anomalyfleet.prompts import AnomalyCLIPPromptLearner, EmbeddingPairPrompts, PromptConfig


def tower(clip_model):
    return CLIPBackbone(clip_model, image_size=56, source={"kind": "test"}).text_tower


def test_text_tower_without_deep_prompts_is_clips_text_encoder(clip_model):
    text = tower(clip_model)
    tokens = text.tokenize(["a photo of a damaged object."])
    with torch.no_grad():
        ours = text.encode(text.token_embedding(tokens), tokens, deep_prompts=[])
        theirs = clip_model.encode_text(tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_templates_and_shapes(clip_model):
    learner = AnomalyCLIPPromptLearner(tower(clip_model))
    width = 64
    assert learner.ctx_pos.shape == (1, 1, 12, width) and learner.ctx_neg.shape == (1, 1, 12, width)
    assert len(learner.compound_prompts_text) == 8
    assert all(p.shape == (4, width) for p in learner.compound_prompts_text)
    from open_clip.tokenizer import tokenize

    expected_pos = tokenize(["X X X X X X X X X X X X object."])
    expected_neg = tokenize(["X X X X X X X X X X X X damaged object."])
    assert torch.equal(learner.tokenized_prompts_pos.reshape(1, -1), expected_pos)
    assert torch.equal(learner.tokenized_prompts_neg.reshape(1, -1), expected_neg)
    # Trainable: context vectors and deep prompts only (~0.1 M parameters for ViT-L).
    trainable = sum(p.numel() for p in learner.trainable_parameters())
    assert trainable == 2 * 12 * width + 8 * 4 * width


def manual_deep_encode(clip_model, prompts, tokenized, deep, fp16):
    """Literal per-layer replacement on open_clip's own blocks."""
    x = prompts + clip_model.positional_embedding
    for index, block in enumerate(clip_model.transformer.resblocks):
        if 1 <= index <= len(deep):
            ctx = deep[index - 1]
            ctx = ctx.half().float() if fp16 else ctx
            x = torch.cat([x[:, :1], ctx.expand(x.shape[0], -1, -1), x[:, 1 + ctx.shape[0] :]], dim=1)
        x = block(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(-1)] @ clip_model.text_projection


def test_deep_prompts_overwrite_positions_in_layers_2_to_9(clip_model):
    learner = AnomalyCLIPPromptLearner(tower(clip_model))
    with torch.no_grad():
        prompts, tokenized = learner.prompt_embeddings()
        expected = F.normalize(manual_deep_encode(clip_model, prompts, tokenized, list(learner.compound_prompts_text), True), dim=-1)
        ours = learner()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert ours.shape == (2, 32)


def test_deep_prompt_of_each_layer_matters(clip_model):
    learner = AnomalyCLIPPromptLearner(tower(clip_model))
    with torch.no_grad():
        base = learner()
        for param in learner.compound_prompts_text:
            saved = param.clone()
            param.add_(0.5 * torch.randn_like(param))  # not a constant: LayerNorm removes shifts
            assert (learner() - base).abs().max() > 1e-4
            param.copy_(saved)


def test_float16_rounding_of_deep_prompts(clip_model):
    """With parity rounding, changes below float16 resolution vanish; without it they do not."""
    torch.manual_seed(0)
    for fp16, should_change in ((True, False), (False, True)):
        learner = AnomalyCLIPPromptLearner(tower(clip_model), PromptConfig(fp16_deep_prompts=fp16))
        with torch.no_grad():
            # Values in [0.25, 0.5) share one float16 exponent, so +1e-4 is below half an ulp.
            learner.compound_prompts_text[0].copy_((0.25 + 0.2 * torch.rand(4, 64)).half().float())
            base = learner()
            learner.compound_prompts_text[0].add_(1e-4)
            changed = (learner() - base).abs().max() > 0
        assert bool(changed) == should_change


def test_gradients_reach_only_prompt_parameters(clip_model):
    learner = AnomalyCLIPPromptLearner(tower(clip_model))
    learner().sum().backward()
    assert learner.ctx_pos.grad is not None and learner.ctx_neg.grad is not None
    assert all(p.grad is not None for p in learner.compound_prompts_text)
    assert all(p.grad is None for p in clip_model.parameters())
    assert "token_embedding.weight" not in learner.state_dict()


def test_embedding_pair_prompts_are_normalised():
    torch.manual_seed(0)
    pair = EmbeddingPairPrompts(384)
    out = pair()
    assert out.shape == (2, 384)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
