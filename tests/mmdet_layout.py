"""mmdetection 2.x Mask R-CNN + FPN checkpoints, written for tests in mmdetection's exact layout.

The key names and shapes follow mmdetection's modules (``ResNet``/``ResNeXt`` with the
``ContextBlock`` plugin after conv3, ``FPN``, ``RPNHead``, ``Shared2FCBBoxHead``,
``FCNMaskHead``), independently of gczoo's converter: the backbone keys come from torchvision's
own ResNet (the names mmdetection's ResNet shares), everything else from the shapes of those
heads. A file holds ``{"state_dict": ..., "meta": ...}`` like mmdetection's ``save_checkpoint``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torchvision.models.resnet import Bottleneck, ResNet

NUM_CLASSES = 80  # mmdetection's COCO heads: 80 classes (+ background last in the classifier)


def mmdet_maskrcnn_state_dict(layers: Sequence[int], groups: int = 1, base_width: int = 64,
                              gc_ratio: Optional[float] = None, seed: int = 0, std: float = 0.01,
                              cascade: bool = False, dcn: bool = False) -> Dict[str, torch.Tensor]:
    """A random state dict with mmdetection's keys and shapes; BatchNorm is the identity.

    ``cascade``: Cascade Mask R-CNN (``roi_head.{bbox,mask}_head.{0,1,2}``, class-agnostic
    ``fc_reg`` of 4 outputs); ``dcn``: mmcv ``DeformConv2dPack`` offset convs
    (``conv2.conv_offset``, 18 outputs, dense 3x3) in every bottleneck of c3-c5.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes: Dict[str, Sequence[int]] = {}
    resnet = ResNet(Bottleneck, list(layers), groups=groups, width_per_group=base_width)
    bn_affine = {f"backbone.{name}.{p}" for name, m in resnet.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                 for p in ("weight", "bias")}
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            shapes["backbone." + key] = tuple(value.shape)
    if dcn:
        for stage, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            width = int(planes * base_width / 64) * groups
            for i in range(depth if stage > 1 else 0):
                p = f"backbone.layer{stage}.{i}.conv2.conv_offset."
                shapes.update({p + "weight": (18, width, 3, 3), p + "bias": (18,)})
    if gc_ratio is not None:
        for stage, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            if stage == 1:
                continue
            channels, hidden = planes * 4, int(planes * 4 * gc_ratio)
            for i in range(depth):
                p = f"backbone.layer{stage}.{i}.context_block."
                shapes.update({p + "conv_mask.weight": (1, channels, 1, 1), p + "conv_mask.bias": (1,),
                               p + "channel_add_conv.0.weight": (hidden, channels, 1, 1), p + "channel_add_conv.0.bias": (hidden,),
                               p + "channel_add_conv.1.weight": (hidden, 1, 1), p + "channel_add_conv.1.bias": (hidden, 1, 1),
                               p + "channel_add_conv.3.weight": (channels, hidden, 1, 1), p + "channel_add_conv.3.bias": (channels,)})
    for k, in_channels in enumerate((256, 512, 1024, 2048)):
        shapes.update({f"neck.lateral_convs.{k}.conv.weight": (256, in_channels, 1, 1), f"neck.lateral_convs.{k}.conv.bias": (256,),
                       f"neck.fpn_convs.{k}.conv.weight": (256, 256, 3, 3), f"neck.fpn_convs.{k}.conv.bias": (256,)})
    shapes.update({"rpn_head.rpn_conv.weight": (256, 256, 3, 3), "rpn_head.rpn_conv.bias": (256,),
                   "rpn_head.rpn_cls.weight": (3, 256, 1, 1), "rpn_head.rpn_cls.bias": (3,),
                   "rpn_head.rpn_reg.weight": (12, 256, 1, 1), "rpn_head.rpn_reg.bias": (12,)})
    box_outputs = 4 if cascade else NUM_CLASSES * 4
    for b, m in ([(f"roi_head.bbox_head.{s}.", f"roi_head.mask_head.{s}.") for s in range(3)] if cascade
                 else [("roi_head.bbox_head.", "roi_head.mask_head.")]):
        shapes.update({b + "shared_fcs.0.weight": (1024, 256 * 7 * 7), b + "shared_fcs.0.bias": (1024,),
                       b + "shared_fcs.1.weight": (1024, 1024), b + "shared_fcs.1.bias": (1024,),
                       b + "fc_cls.weight": (NUM_CLASSES + 1, 1024), b + "fc_cls.bias": (NUM_CLASSES + 1,),
                       b + "fc_reg.weight": (box_outputs, 1024), b + "fc_reg.bias": (box_outputs,),
                       m + "upsample.weight": (256, 256, 2, 2), m + "upsample.bias": (256,),
                       m + "conv_logits.weight": (NUM_CLASSES, 256, 1, 1), m + "conv_logits.bias": (NUM_CLASSES,)})
        for k in range(4):
            shapes.update({f"{m}convs.{k}.conv.weight": (256, 256, 3, 3), f"{m}convs.{k}.conv.bias": (256,)})

    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var") or (key in bn_affine and key.endswith("weight")):
            state[key] = torch.ones(shape)
        elif key.endswith("running_mean") or key in bn_affine:
            state[key] = torch.zeros(shape)
        else:
            state[key] = torch.randn(shape, generator=gen) * std
    return state


def write_checkpoint(path: Path, state_dict: Dict[str, torch.Tensor]) -> Path:
    """Save like mmdetection: ``{"state_dict": ..., "meta": {...plain values...}}``."""
    meta = {"mmdet_version": "2.x", "CLASSES": tuple(f"class{i}" for i in range(NUM_CLASSES)), "epoch": 12, "iter": 87960}
    torch.save({"state_dict": state_dict, "meta": meta}, path)
    return path
