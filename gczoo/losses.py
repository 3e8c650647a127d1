"""Training losses of the segmentation models, as mmsegmentation 1.2.2 computes them.

mmsegmentation's ``BaseDecodeHead.loss_by_feat`` resizes a head's logits to the label map
(bilinear, the head's ``align_corners``) and applies ``CrossEntropyLoss`` with
``ignore_index=255`` and ``avg_non_ignore=False``: the per-pixel losses are summed and divided by
the number of ALL label pixels, ignored ones included (they count 0). The GCNet / NLNet configs
weight the decode head 1.0 and the auxiliary FCN head 0.4. The zoo's
:class:`~gczoo.models.segmentation.SegmentationModel` already returns logits at the input size,
so the label map must have the input's size (as mmsegmentation's training pipeline pads both).
"""
from __future__ import annotations

from typing import Dict

import torch.nn.functional as F
from torch import Tensor

__all__ = ["segmentation_losses"]


def _cross_entropy_all_pixels(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """mmsegmentation's ``cross_entropy`` with ``avg_non_ignore=False``: mean over every pixel."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / target.numel()


def segmentation_losses(outputs: Dict[str, Tensor], target: Tensor, *, ignore_index: int = 255,
                        aux_weight: float = 0.4) -> Dict[str, Tensor]:
    """``loss_decode`` (weight 1) and, when ``outputs`` has ``"aux"``, ``loss_aux`` (``aux_weight``).

    Args:
        outputs: the model's train-mode output, ``{"out": (B, C, H, W)[, "aux": ...]}``.
        target: label map ``(B, H, W)`` of class indices, ``ignore_index`` where unlabelled.
    """
    logits = outputs["out"]
    if target.dim() != 3 or target.shape[0] != logits.shape[0] or target.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"target must be a (B, H, W) label map matching the logits {tuple(logits.shape)}; "
                         f"got {tuple(target.shape)} (pad or crop labels and images to the same size)")
    if target.is_floating_point():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    target = target.long()
    num_classes = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        values = sorted(set(target[bad].unique().tolist()))[:8]
        raise ValueError(f"target labels {values} are outside 0..{num_classes - 1} (and not the ignore index "
                         f"{ignore_index}); map them to a class or to {ignore_index}")
    losses = {"loss_decode": _cross_entropy_all_pixels(logits, target, ignore_index)}
    if "aux" in outputs:
        losses["loss_aux"] = aux_weight * _cross_entropy_all_pixels(outputs["aux"], target, ignore_index)
    return losses
