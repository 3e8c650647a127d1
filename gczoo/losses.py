"""Training losses of the segmentation models, as mmsegmentation computes them."""
from __future__ import annotations

from typing import Dict

import torch.nn.functional as F
from torch import Tensor

__all__ = ["segmentation_losses"]


def segmentation_losses(outputs: Dict[str, Tensor], target: Tensor, *, ignore_index: int = 255,
                        aux_weight: float = 0.4) -> Dict[str, Tensor]:
    """mmsegmentation's decode-head and auxiliary-head losses: each head's logits resized
    (bilinear) to the label size, pixel-wise cross-entropy averaged over the non-ignored pixels;
    the auxiliary loss weighted by ``aux_weight`` (0.4 in the GCNet configs)."""
    losses = {}
    for key, name, weight in (("out", "loss_decode", 1.0), ("aux", "loss_aux", aux_weight)):
        if key not in outputs:
            continue
        logits = outputs[key]
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        losses[name] = weight * F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    return losses
