"""Every loss against values computed by hand."""

from __future__ import annotations

import math

import torch

from anomalyfleet import losses


def test_dice_hand_computed():
    pred = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # intersection 1.5, sums 2 and 2: dice = (2*1.5 + 1) / (2 + 2 + 1) = 0.8
    assert math.isclose(float(losses.dice_loss(pred, target)), 0.2, abs_tol=1e-7)


def test_dice_batch_mean():
    pred = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)])
    target = torch.ones(2, 2, 2)
    # image 1: (8 + 1) / (4 + 4 + 1) = 1; image 2: 1 / (0 + 4 + 1) = 0.2; mean 0.6
    assert math.isclose(float(losses.dice_loss(pred, target)), 1 - 0.6, abs_tol=1e-7)


def test_focal_hand_computed():
    probs = torch.tensor([0.2, 0.8, 0.9, 0.1]).reshape(1, 2, 1, 2)  # pixel 0: [0.2, 0.9], pixel 1: [0.8, 0.1]
    target = torch.tensor([[[1, 0]]])
    s = 1e-5
    expected = []
    for p_true, p_other in ((0.9, 0.2), (0.8, 0.1)):
        pt = (1 - s) * p_true + s * p_other + s
        expected.append(-((1 - pt) ** 2) * math.log(pt))
    assert math.isclose(float(losses.focal_loss(probs, target)), sum(expected) / 2, rel_tol=1e-5)


def test_global_loss_is_cross_entropy():
    logits = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    labels = torch.tensor([1, 1])
    expected = (-math.log(math.exp(3) / (math.exp(1) + math.exp(3))) - math.log(1 / (math.exp(2) + 1))) / 2
    assert math.isclose(float(losses.global_loss(logits, labels)), expected, rel_tol=1e-6)


def test_total_loss_weights_and_label_only_images():
    torch.manual_seed(0)
    maps = [torch.rand(3, 1, 4, 4)]
    maps = [torch.cat([1 - maps[0], maps[0]], dim=1)]
    masks = (torch.rand(3, 4, 4) > 0.5).float()
    logits = torch.randn(3, 2)
    labels = torch.tensor([0, 1, 1])
    has_mask = torch.tensor([True, True, False])
    out = losses.total_loss(maps, masks, has_mask, logits, labels, local_weight=4.0)
    local = losses.local_loss(maps[0][:2], masks[:2])
    assert math.isclose(float(out["local"]), float(local), rel_tol=1e-6)
    expected = 4 * float(local) + float(losses.global_loss(logits, labels))
    assert math.isclose(float(out["loss"]), expected, rel_tol=1e-6)
    # A batch of label-only images gets the global loss only.
    only = losses.total_loss(maps, masks, torch.zeros(3, dtype=torch.bool), logits, labels)
    assert math.isclose(float(only["loss"]), float(losses.global_loss(logits, labels)), rel_tol=1e-6)


def test_local_loss_averages_over_layers():
    torch.manual_seed(1)
    a = torch.rand(2, 1, 4, 4)
    b = torch.rand(2, 1, 4, 4)
    maps = [torch.cat([1 - a, a], 1), torch.cat([1 - b, b], 1)]
    masks = (torch.rand(2, 4, 4) > 0.5).float()
    out = losses.total_loss(maps, masks, torch.ones(2, dtype=torch.bool), torch.zeros(2, 2), torch.tensor([0, 1]))
    mean_local = (losses.local_loss(maps[0], masks) + losses.local_loss(maps[1], masks)) / 2
    assert math.isclose(float(out["local"]), float(mean_local), rel_tol=1e-6)


def test_focal_equals_the_one_hot_formulation_on_random_maps():
    """The gather-based focal loss equals the reference's clamped one-hot form."""
    import torch.nn.functional as F

    torch.manual_seed(2)
    probs = torch.rand(3, 2, 5, 6).softmax(dim=1)
    target = (torch.rand(3, 5, 6) > 0.6).long()
    flat = probs.permute(0, 2, 3, 1).reshape(-1, 2)
    one_hot = F.one_hot(target.reshape(-1), 2).float().clamp(1e-5, 1 - 1e-5)
    pt = (one_hot * flat).sum(1) + 1e-5
    expected = (-((1 - pt) ** 2) * pt.log()).mean()
    torch.testing.assert_close(losses.focal_loss(probs, target), expected)
