"""Insert identity GC blocks into an existing torchvision or timm ResNet/ResNeXt.

Every public GC detector was started this way: take an ImageNet ResNet, add GC blocks whose
last transform conv is zero (so the network computes exactly what it did), fine-tune.
:func:`gcify` does it in place, at the place and under the name used by GCNet's checkpoints
and by :class:`gczoo.models.gc_resnet.GCResNet`: ``layerN.i.context_block``, applied to the
output of the block's last norm layer (``bn3``, or ``bn2`` in a basic block), before the
residual addition. A gcified torchvision ResNet-50 and ``resnet50_gc_r16`` therefore share
one state-dict layout.
"""
from __future__ import annotations

import functools
from typing import Sequence, Union

import torch
from torch import nn

from .blocks import ContextBlock
from .models.gc_resnet import STAGE_NAMES, parse_stages

__all__ = ["gcify"]


def _apply_context(block: nn.Module, norm: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the block's last norm layer: its output goes through the GC block."""
    return block.context_block(output)


def _last_norm(block: nn.Module) -> nn.Module:
    for name in ("bn3", "bn2"):  # bottleneck, basic block (torchvision and timm names)
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise TypeError(f"gcify: {type(block).__name__} is not a ResNet block with bn3 (bottleneck) or bn2 (basic block)")


def gcify(model: nn.Module, ratio: float = 1 / 16, stages: Union[str, Sequence] = "c3-c5",
          pooling: str = "att", fusion: str = "add") -> nn.Module:
    """Add identity-initialised GC blocks to every residual block of ``stages``, in place.

    Args:
        model: a torchvision ``ResNet`` or timm ``ResNet`` (ResNeXt included), with ``layer1``..``layer4``.
        ratio, pooling, fusion: see :class:`gczoo.blocks.ContextBlock` (r16 = 1/16).
        stages: which of c2..c5 get GC blocks (default c3-c5, as in the paper).

    Returns the same model. Its outputs are unchanged until the GC blocks are trained.
    """
    for stage in parse_stages(stages):
        layer = getattr(model, STAGE_NAMES[stage], None)
        if not isinstance(layer, nn.Sequential):
            raise TypeError(f"gcify: {type(model).__name__} has no {STAGE_NAMES[stage]} stage; "
                            f"expected a torchvision or timm ResNet/ResNeXt")
        for block in layer:
            if getattr(block, "context_block", None) is not None:
                raise ValueError(f"gcify: {type(model).__name__}.{STAGE_NAMES[stage]} already has GC blocks")
            norm = _last_norm(block)
            weight = norm.weight
            block.context_block = ContextBlock(norm.num_features, ratio=ratio, pooling=pooling, fusion=fusion).to(
                device=weight.device, dtype=weight.dtype)
            # partial (not a closure) so deepcopy and pickling carry the hook over to the copy.
            norm.register_forward_hook(functools.partial(_apply_context, block))
    return model
