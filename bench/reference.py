"""Reference formulations of the GC block, kept out of the package on purpose.

:class:`StraightforwardContextBlock` is GCNet eq. (4) written the way the paper's figure
draws it: a 1x1 conv to one channel, a reshape to ``(B, 1, Np)``, softmax, a matrix product
with the ``(B, C, Np)`` view of the input, then the transform as 1x1 convs on the
``(B, C, 1, 1)`` context and an out-of-place broadcast addition. It has the parameter names
of :class:`gczoo.blocks.ContextBlock`, so the two load each other's state dicts; the tests
compare the package's fast path with it, and ``bench/speed.py`` times both.

:func:`swap_context_blocks` rebuilds a GC-ResNet with another GC layer at the same places
(this reference, or timm's ``GlobalContext``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gczoo.blocks import ContextBlock, parse_fusion


class StraightforwardContextBlock(nn.Module):
    """GC block (GCNet eq. 4) without any fast path; same constructor and state-dict names as
    :class:`gczoo.blocks.ContextBlock`."""

    def __init__(self, channels: int, ratio: float = 1 / 16, pooling: str = "att", fusion="add"):
        super().__init__()
        hidden = int(channels * ratio)
        self.pooling = pooling
        self.fusion = parse_fusion(fusion)
        self.conv_mask = nn.Conv2d(channels, 1, 1) if pooling == "att" else None

        def transform():
            return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

        self.channel_add_conv = transform() if "add" in self.fusion else None
        self.channel_mul_conv = transform() if "mul" in self.fusion else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.conv_mask is None:
            context = x.mean(dim=(2, 3), keepdim=True)
        else:
            logits = self.conv_mask(x).view(b, 1, h * w)
            attn = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            attn = attn.to(x.dtype)  # (B, 1, Np), softmax in fp32 or fp64
            context = torch.matmul(x.reshape(b, c, h * w), attn.transpose(1, 2)).view(b, c, 1, 1)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out


def swap_context_blocks(model: nn.Module, factory: Callable[[ContextBlock], nn.Module]) -> nn.Module:
    """Replace every :class:`~gczoo.blocks.ContextBlock` in ``model`` by ``factory(block)``, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ContextBlock):
                setattr(module, name, factory(child))
    return model


def straightforward_like(block: ContextBlock) -> StraightforwardContextBlock:
    """A :class:`StraightforwardContextBlock` with ``block``'s configuration and weights."""
    ref = StraightforwardContextBlock(block.channels, block.ratio, block.pooling, block.fusion)
    ref.load_state_dict(block.state_dict())
    return ref.to(next(block.parameters()))


def timm_like(block: ContextBlock) -> nn.Module:
    """timm's ``GlobalContext`` with the configuration of ``block`` (own parameters, same shapes)."""
    from timm.layers import GlobalContext

    return GlobalContext(block.channels, use_attn=block.pooling == "att", fuse_add="add" in block.fusion,
                         fuse_scale="mul" in block.fusion, rd_ratio=block.ratio)
