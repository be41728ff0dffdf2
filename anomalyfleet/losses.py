"""AnomalyCLIP's training losses: focal + two Dice terms per map layer, cross-entropy globally."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FOCAL_SMOOTH = 1e-5  # the reference clamps the one-hot target and adds this to p_t


def focal_loss(probs: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss on class *probabilities* (B, C, H, W) against an integer-valued mask (B, H, W).

    As the reference: the one-hot target is clamped to [smooth/(C-1), 1 - smooth], p_t is the
    dot product of that soft target with the probabilities plus smooth, averaged over all pixels.
    """
    num_classes = probs.shape[1]
    target = target.reshape(probs.shape[0], 1, *probs.shape[2:]).long()
    p_true = probs.gather(1, target)
    p_rest = probs.sum(dim=1, keepdim=True) - p_true
    # Same value as the clamped one-hot dot product, without materialising the one-hot tensor.
    pt = (1.0 - FOCAL_SMOOTH) * p_true + FOCAL_SMOOTH / (num_classes - 1) * p_rest + FOCAL_SMOOTH
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - mean over the batch of the smoothed Dice coefficient; pred and target (B, H, W)."""
    batch = target.shape[0]
    pred = pred.reshape(batch, -1)
    target = target.reshape(batch, -1)
    dice = (2 * (pred * target).sum(1) + smooth) / (pred.sum(1) + target.sum(1) + smooth)
    return 1 - dice.sum() / batch


def local_loss(maps: Tensor, mask: Tensor) -> Tensor:
    """Per-layer segmentation loss on a two-channel map [S_n, S_a] (B, 2, H, W) and mask (B, H, W)."""
    return focal_loss(maps, mask) + dice_loss(maps[:, 1], mask) + dice_loss(maps[:, 0], 1 - mask)


def global_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the image logits (B, 2), already divided by the temperature."""
    return F.cross_entropy(logits, labels.long())


def total_loss(
    layer_maps: list[Tensor],
    masks: Tensor,
    has_mask: Tensor,
    logits: Tensor,
    labels: Tensor,
    local_weight: float = 4.0,
) -> dict[str, Tensor]:
    """local_weight x mean-over-layers local loss (only on images with masks) + global loss."""
    image = global_loss(logits, labels)
    keep = has_mask.bool()
    if keep.any() and layer_maps:
        target = masks[keep].reshape(int(keep.sum()), *masks.shape[-2:])
        local = torch.stack([local_loss(m[keep], target) for m in layer_maps]).mean()
    else:
        local = image.new_zeros(())
    return {"loss": local_weight * local + image, "local": local.detach(), "global": image.detach()}
