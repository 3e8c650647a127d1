"""Slow-only 3D ResNet-50 for Kinetics-400, with the GCNet paper's NL, SNL and GC rows.

The network is the slow pathway of SlowFast (Feichtenhofer et al.) used alone, "slow-only":
a ``1x7x7`` stem conv (spatial stride 2) and ``1x3x3`` max-pool, ResNet-50 bottlenecks whose
first conv is ``3x1x1`` (temporal kernel 3) in res4 and res5 and ``1x1x1`` in res2 and res3,
spatial strides only (no temporal striding), global average pooling, dropout and a linear
classifier over 400 classes. Blocks (GCNet's Kinetics table, Cao et al.):

* ``stage_blocks={"c3": kind, "c4": kind}`` -- NL-Net's placement of 5 blocks: one after every
  other residual block (the 2nd and 4th of res3, the 2nd, 4th and 6th of res4), as
  ``layerN.i.post_block`` (``kind`` is ``"nl"``, ``"snl"`` or ``"gc"``).
* ``gc_stages`` -- a GC block in every bottleneck of those stages, after ``bn3`` and before the
  residual addition (the paper's default placement), as ``layerN.i.context_block``.

The paper's parameter counts close with GC ratio 1/4 for both GC rows (r16 leaves them
1.4M and 7.5M short); ``tests/test_video.py`` checks every count against the manifest.
The zoo's blocks run on the ``(B, C, T, H, W)`` features directly (pooling over ``T*H*W``).
Input: ``(B, 3, T, H, W)`` clips; the paper's setting is 8 frames at 224x224.
No Kinetics checkpoint of these models was ever published: the zoo has architectures only.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..blocks import ContextBlock, NonLocalBlock, SimplifiedNonLocalBlock
from .gc_resnet import STAGE_NAMES, parse_stages

__all__ = ["SlowOnlyResNet", "Bottleneck3d", "build"]

#: Blocks that ``stage_blocks`` places after every other residual block.
_POST_BLOCKS = {"gc": ContextBlock, "nl": NonLocalBlock, "snl": SimplifiedNonLocalBlock}


class Bottleneck3d(nn.Module):
    """ResNet bottleneck on clips: ``kt x 1 x 1`` conv, ``1 x 3 x 3`` conv (spatial stride), ``1 x 1 x 1`` conv.

    ``context_block`` runs on the output of ``bn3`` before the residual addition;
    ``post_block`` on the block's output (after the addition and ReLU).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, temporal_kernel: int = 1,
                 downsample: Optional[nn.Module] = None, context_block: Optional[nn.Module] = None,
                 post_block: Optional[nn.Module] = None):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv3d(inplanes, planes, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0),
                               bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(outplanes)
        self.context_block = context_block
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.post_block = post_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.context_block is not None:
            out = self.context_block(out)
        out = self.relu(out + shortcut)
        if self.post_block is not None:
            out = self.post_block(out)
        return out


class SlowOnlyResNet(nn.Module):
    """Slow-only 3D ResNet (SlowFast's slow pathway alone) with GCNet's optional blocks.

    Args:
        layers: bottlenecks per stage, ``(3, 4, 6, 3)`` for ResNet-50.
        temporal_kernels: temporal kernel of the first conv of every bottleneck, per stage.
        gc_stages: stages c2..c5 with a GC block in every bottleneck (none by default).
        gc_ratio: bottleneck ratio of every GC block (1/4 in the paper's Kinetics rows).
        stage_blocks: ``{stage: "nl" | "snl" | "gc"}``: a block after every other residual block.
        num_classes, in_chans, drop_rate: classifier classes (400 for Kinetics-400), input
            channels, dropout before the classifier.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), temporal_kernels: Sequence[int] = (1, 1, 3, 3),
                 gc_stages: Union[None, str, Sequence] = (), gc_ratio: float = 1 / 4,
                 stage_blocks: Optional[Dict[Union[int, str], str]] = None, num_classes: int = 400,
                 in_chans: int = 3, drop_rate: float = 0.5):
        super().__init__()
        if len(layers) != 4 or len(temporal_kernels) != 4:
            raise ValueError(f"layers and temporal_kernels give 4 stages each, got {layers!r} and {temporal_kernels!r}")
        gc_stages = parse_stages(gc_stages)
        extra = {}
        for stage, kind in (stage_blocks or {}).items():
            if kind not in _POST_BLOCKS:
                raise ValueError(f"stage_blocks kinds are {sorted(_POST_BLOCKS)}, got {kind!r}")
            extra[parse_stages(stage)[0]] = kind
        self.num_classes = num_classes
        self.conv1 = nn.Conv3d(in_chans, 64, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        inplanes = 64
        for i, (depth, planes, kt) in enumerate(zip(layers, (64, 128, 256, 512), temporal_kernels)):
            stage = i + 2
            stride = 1 if stage == 2 else 2
            outplanes = planes * Bottleneck3d.expansion
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0:
                    downsample = nn.Sequential(
                        nn.Conv3d(inplanes, outplanes, 1, stride=(1, stride, stride), bias=False),
                        nn.BatchNorm3d(outplanes))
                gc = ContextBlock(outplanes, ratio=gc_ratio) if stage in gc_stages else None
                post = None
                if stage in extra and j % 2 == 1:
                    kind = extra[stage]
                    post = ContextBlock(outplanes, ratio=gc_ratio) if kind == "gc" else _POST_BLOCKS[kind](outplanes)
                blocks.append(Bottleneck3d(inplanes, planes, stride if j == 0 else 1, kt, downsample,
                                           context_block=gc, post_block=post))
                inplanes = outplanes
            self.add_module(STAGE_NAMES[stage], nn.Sequential(*blocks))
        self.num_features = inplanes
        self.global_pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # each new NL / SNL / GC block starts as the identity
            if isinstance(m, tuple(_POST_BLOCKS.values())):
                m.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"slow-only models take clips (B, 3, T, H, W), got a tensor of shape {list(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


#: The paper's Kinetics input: 8 frames of 224x224 (the slow pathway of SlowFast 8x8).
INPUT_SIZE = (3, 8, 224, 224)


def build(arch: str, pretrained: bool = False, *, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
          pretrained_filter_fn: Any = None, **kwargs: Any) -> SlowOnlyResNet:
    """Build ``arch`` of the manifest's ``slowonly`` family (called by :mod:`gczoo.registry`).

    There are no weights: the registry refuses ``pretrained=True`` before this runs.
    """
    model = SlowOnlyResNet(**kwargs)
    model.pretrained_cfg = dict(architecture=arch, tag=None, input_size=INPUT_SIZE, num_classes=model.num_classes)
    return model
