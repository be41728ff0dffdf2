"""The DPAM dual path against an independent, literal implementation built on open_clip's blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalyfleet.backbones.clip_vit import CLIPBackbone, interpolate_positional_embedding


def literal_dpam(visual, images: torch.Tensor, layers, dpam_layers: int):
    """Straight from the method text: open_clip's own block forward for the original path, the
    V-V path by hand (softmax(V V^T * scale) V, out_proj, no MLP) on ln_1 of the original tokens."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding)
    blocks = list(visual.transformer.resblocks)
    first = len(blocks) - dpam_layers
    vv, outputs = None, {}
    for index, block in enumerate(blocks):
        if index >= first:
            attn = block.attn
            h = block.ln_1(x)
            v = F.linear(h, attn.in_proj_weight[2 * h.shape[-1] :], attn.in_proj_bias[2 * h.shape[-1] :])
            heads = attn.num_heads
            b, n, c = v.shape
            v = v.reshape(b, n, heads, c // heads).transpose(1, 2)
            weights = torch.softmax(v @ v.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1)
            out = attn.out_proj((weights @ v).transpose(1, 2).reshape(b, n, c))
            vv = (x if vv is None else vv) + out
        x = block(x)  # open_clip's own implementation of the original path
        if index + 1 in layers:
            outputs[index + 1] = vv if vv is not None else x
    patches = [visual.ln_post(outputs[layer][:, 1:]) @ visual.proj for layer in layers]
    return x[:, 0] @ visual.proj, patches


@pytest.mark.parametrize("layers,dpam", [((6,), 5), ((2, 4, 6), 5), ((3, 6), 0), ((6,), 6)])
def test_dpam_matches_literal_implementation(clip_model, layers, dpam):
    backbone = CLIPBackbone(clip_model, image_size=56, source={"kind": "test"})
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = backbone(images, layers, dpam, fast=False)
        g, patches = literal_dpam(clip_model.visual, images, layers, dpam)
    torch.testing.assert_close(ours.global_feature, g, atol=1e-5, rtol=1e-4)
    for a, b in zip(ours.patch_features, patches):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layers,dpam", [((6,), 5), ((2, 4, 6), 6), ((6,), 0), ((3,), 0)])
def test_fast_path_equals_plain_path(clip_model, layers, dpam):
    """Fused attention and the class-token-only last block change nothing beyond float noise."""
    backbone = CLIPBackbone(clip_model, image_size=70, source={"kind": "test"})
    images = torch.randn(3, 3, 70, 70)
    with torch.no_grad():
        fast = backbone(images, layers, dpam, fast=True)
        plain = backbone(images, layers, dpam, fast=False)
    torch.testing.assert_close(fast.global_feature, plain.global_feature, atol=1e-5, rtol=1e-4)
    for a, b in zip(fast.patch_features, plain.patch_features):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_without_dpam_global_feature_is_clips(clip_model):
    """With DPAM off and ln_post on, the global feature is exactly open_clip's image embedding."""
    backbone = CLIPBackbone(clip_model, image_size=56, source={"kind": "test"}, global_ln_post=True)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = backbone(images, (6,), 0).global_feature
        theirs = clip_model.encode_image(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_vv_path_differs_from_original_path(clip_model):
    backbone = CLIPBackbone(clip_model, image_size=56, source={"kind": "test"})
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        with_dpam = backbone(images, (6,), 5).patch_features[0]
        without = backbone(images, (6,), 0).patch_features[0]
    assert (with_dpam - without).abs().max() > 1e-3


def test_positional_embedding_interpolation_keeps_class_row():
    pos = torch.randn(1 + 4 * 4, 8)
    resized = interpolate_positional_embedding(pos, 6)
    assert resized.shape == (1 + 36, 8)
    torch.testing.assert_close(resized[0], pos[0])
    grid = pos[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized[1:], expected.reshape(8, 36).t())


def test_bad_inputs_are_refused(clip_model):
    backbone = CLIPBackbone(clip_model, image_size=56, source={"kind": "test"})
    with pytest.raises(ValueError, match="expected images of shape"):
        backbone(torch.randn(1, 3, 42, 42), (6,), 5)
    with pytest.raises(ValueError, match="outside"):
        backbone(torch.randn(1, 3, 56, 56), (7,), 5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone.set_image_size(50)
