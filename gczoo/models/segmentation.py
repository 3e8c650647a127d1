"""Semantic segmentation with a GC head or an NL head on a dilated ResNet (GCNet section 4.4).

The models run mmsegmentation's published GCNet and NLNet checkpoints (converted by
:func:`gczoo.convert.mmseg_segmentor`) with mmsegmentation's inference and torchvision's
segmentation API: ``model(x)`` on a normalised ``(B, 3, H, W)`` batch returns
``{"out": logits}`` (and ``"aux"`` when built with ``aux_loss=True``), logits of shape
``(B, num_classes, H, W)``.

* Backbone -- :class:`DilatedResNetV1c`: mmsegmentation's ``ResNetV1c`` with output stride 8:
  a deep stem of three 3x3 convs (3->32 stride 2, 32->32, 32->64), max-pool, then the zoo's
  :class:`~gczoo.models.gc_resnet.Bottleneck` (stride on the 3x3 conv) with strides
  (1, 2, 1, 1) and dilations (1, 1, 2, 4); the first block of a dilated stage uses half the
  dilation ("contract_dilation").
* Decode head -- :class:`ContextHead`: 3x3 conv 2048->512 (BN, ReLU), the context block (the
  zoo's :class:`~gczoo.blocks.ContextBlock` with ratio 1/4, or :class:`~gczoo.blocks.NonLocalBlock`
  with reduction 2 and the logits divided by sqrt(256)), 3x3 conv 512->512, a 3x3 conv on the
  concatenation of the head's input and that output (2560->512), dropout 0.1, 1x1 classifier.
* Auxiliary head -- :class:`FCNHead` on layer3: 3x3 conv 1024->256, dropout, 1x1 classifier
  (used in training only, kept when ``aux_loss=True``).
* Logits at 1/8 are upsampled bilinearly to the input (or window) size with the checkpoint's
  ``align_corners``. In eval mode ``test_mode="slide"`` runs mmsegmentation's sliding window:
  windows of ``crop_size`` every ``stride`` pixels, the last one moved back to end at the border,
  windows larger than the image cut to it (no padding), logits summed and divided by the
  number of windows covering each pixel.

A weights tag sets ``num_classes``, ``align_corners`` and the test mode from the manifest, so
``create_model(NAME.TAG, pretrained=True)(x)["out"]`` is mmsegmentation's ``inference`` output.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import finetune, registry
from ..finetune import kaiming_fan_out_init, normal_init
from ..blocks import ContextBlock, NonLocalBlock
from ..manifest import load_manifest
from ..convert import load_pretrained
from .gc_resnet import Bottleneck

__all__ = ["DilatedResNetV1c", "ContextHead", "FCNHead", "SegmentationModel", "sliding_windows", "build"]

#: Context blocks of the decode head: GCNet's GC head and NLNet's NL head (mmsegmentation's settings).
HEADS = {"gc": lambda channels: ContextBlock(channels, ratio=1 / 4, pooling="att", fusion="add"),
         "nl": lambda channels: NonLocalBlock(channels, reduction=2, scale=True)}
TEST_MODES = ("whole", "slide")


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """``Conv2d`` (no bias, "same" padding) + ``BatchNorm2d`` + ``ReLU``: mmcv's ``ConvModule``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DilatedResNetV1c(nn.Module):
    """ResNet-V1c with output stride 8 (mmsegmentation's ``ResNetV1c``, ``-D8`` configs).

    Returns the outputs of layer1..layer4 (256, 512, 1024, 2048 channels at strides 4, 8, 8, 8).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), strides: Sequence[int] = (1, 2, 1, 1),
                 dilations: Sequence[int] = (1, 1, 2, 4)):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(3, 32, stride=2), *conv_bn_relu(32, 32), *conv_bn_relu(32, 64))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (depth, planes, stride, dilation) in enumerate(zip(layers, (64, 128, 256, 512), strides, dilations)):
            outplanes = planes * Bottleneck.expansion
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != outplanes):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False),
                                               nn.BatchNorm2d(outplanes))
                first_dilation = dilation // 2 if dilation > 1 else dilation  # contract_dilation
                blocks.append(Bottleneck(inplanes, planes, stride if j == 0 else 1, downsample,
                                         dilation=first_dilation if j == 0 else dilation))
                inplanes = outplanes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        c2 = self.layer1(self.maxpool(self.stem(x)))  # one name per stage: TorchScript's attributes are static
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c2, c3, c4, self.layer4(c4)]


class FCNHead(nn.Module):
    """mmsegmentation's ``FCNHead`` without input concatenation: 3x3 conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(in_channels, channels))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class ContextHead(nn.Module):
    """The GC head / NL head of mmsegmentation (``GCHead``, ``NLHead``; an ``FCNHead`` with two convs).

    ``conv_seg(dropout(conv_cat([x, convs.1(block(convs.0(x)))])))`` where ``block`` is a GC block
    (``context_block``) or an NL block (``nonlocal_block``) on 512 channels.
    """

    def __init__(self, head: str, in_channels: int = 2048, channels: int = 512, num_classes: int = 19,
                 dropout: float = 0.1):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
        self.head = head
        self.convs = nn.Sequential(conv_bn_relu(in_channels, channels), conv_bn_relu(channels, channels))
        # the checkpoints' module names; the other one is None (TorchScript compiles the branch away)
        self.context_block = HEADS[head](channels) if head == "gc" else None
        self.nonlocal_block = HEADS[head](channels) if head == "nl" else None
        self.conv_cat = conv_bn_relu(in_channels + channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        if self.context_block is not None:
            out = self.context_block(out)
        if self.nonlocal_block is not None:
            out = self.nonlocal_block(out)
        out = self.convs[1](out)
        out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.conv_seg(self.dropout(out))


def sliding_windows(height: int, width: int, crop: Tuple[int, int], stride: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
    """mmsegmentation's ``slide_inference`` windows ``(y1, y2, x1, x2)``: every ``stride`` pixels,
    the last moved back to end at the border, a crop larger than the image cut to it."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    out: List[Tuple[int, int, int, int]] = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            out.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return out


#: mmsegmentation 1.2.2's initialisation of the heads, by module name: ``BaseDecodeHead``
#: (``init_cfg=dict(type='Normal', std=0.01, override=dict(name='conv_seg'))``), mmcv's ``ConvModule``
#: (``kaiming_init``: He normal, fan_out), mmcv's ``NonLocal2d.init_weights`` (``g``, ``theta``,
#: ``phi`` normal std 0.01; the output norm at zero, as the zoo's block already is). Biases start at 0.
MMSEG_HEAD_INIT = {
    r"(aux_)?classifier\.conv_seg": normal_init(0.01),
    r"(aux_)?classifier\.(convs\.\d+|conv_cat)\.0": kaiming_fan_out_init,
    r"classifier\.nonlocal_block\.(g|theta|phi)": normal_init(0.01),
    r"classifier\.nonlocal_block\.out_conv": kaiming_fan_out_init,
}


class SegmentationModel(nn.Module):
    """Dilated ResNet-V1c + GC/NL head (+ auxiliary FCN head), mmsegmentation's ``EncoderDecoder``.

    Args:
        layers: bottlenecks per stage (``(3, 4, 6, 3)`` ResNet-50, ``(3, 4, 23, 3)`` ResNet-101).
        head: ``"gc"`` (GCNet's GC head) or ``"nl"`` (NLNet's NL head).
        num_classes: classes of both heads.
        aux_loss: keep the auxiliary FCN head on layer3 (``"aux"`` in the output).
        align_corners: of the final bilinear upsampling (the checkpoint's config decides).
        test_mode: ``"whole"`` or ``"slide"`` (eval mode only; training always runs whole).
        crop_size, stride: ``(h, w)`` of the sliding windows.

    The heads start as mmsegmentation initialises them (:data:`MMSEG_HEAD_INIT`).
    """

    #: Modules that depend on the classes (:mod:`gczoo.finetune`): both heads' 1x1 classifiers.
    class_layers = (r"(aux_)?classifier\.conv_seg",)

    # TorchScript's attribute types (None in whole mode), as objects: this module's annotations are strings
    __annotations__ = {"crop_size": Optional[Tuple[int, int]], "stride": Optional[Tuple[int, int]]}

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), head: str = "gc", num_classes: int = 19,
                 aux_loss: bool = False, align_corners: bool = False, test_mode: str = "whole",
                 crop_size: Optional[Sequence[int]] = None, stride: Optional[Sequence[int]] = None):
        super().__init__()
        if test_mode not in TEST_MODES:
            raise ValueError(f"test_mode must be one of {TEST_MODES}, got {test_mode!r}")
        if test_mode == "slide" and (crop_size is None or stride is None):
            raise ValueError("test_mode='slide' needs crop_size=(h, w) and stride=(h, w)")
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.test_mode = test_mode
        self.crop_size = None if crop_size is None else tuple(int(v) for v in crop_size)
        self.stride = None if stride is None else tuple(int(v) for v in stride)
        self.backbone = DilatedResNetV1c(layers)
        self.classifier = ContextHead(head, num_classes=num_classes)
        self.aux_classifier = FCNHead(1024, 256, num_classes) if aux_loss else None
        finetune.init_layers(self, MMSEG_HEAD_INIT)

    def encode_decode(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Logits of both heads for one image or window, upsampled to its size."""
        features = self.backbone(x)
        size = x.shape[-2:]
        out = {"out": self.classifier(features[3])}
        if self.aux_classifier is not None:
            out["aux"] = self.aux_classifier(features[2])
        return {k: F.interpolate(v, size=size, mode="bilinear", align_corners=self.align_corners) for k, v in out.items()}

    def slide(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Sliding-window inference: window logits summed, divided by each pixel's window count."""
        crop, stride = self.crop_size, self.stride
        if crop is None or stride is None:
            raise ValueError("sliding-window inference needs crop_size=(h, w) and stride=(h, w)")
        height, width = x.shape[-2:]
        sums: Dict[str, torch.Tensor] = {}
        count = x.new_zeros((1, 1, height, width))
        for y1, y2, x1, x2 in sliding_windows(height, width, crop, stride):
            for key, logits in self.encode_decode(x[:, :, y1:y2, x1:x2]).items():
                if key not in sums:
                    sums[key] = x.new_zeros((x.shape[0], logits.shape[1], height, width))
                sums[key][:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
        return {key: value / count for key, value in sums.items()}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.training or self.test_mode == "whole":
            return self.encode_decode(x)
        return self.slide(x)

    def extra_repr(self) -> str:
        mode = self.test_mode if self.test_mode == "whole" else f"slide, crop_size={self.crop_size}, stride={self.stride}"
        return f"num_classes={self.num_classes}, align_corners={self.align_corners}, test_mode={mode}"


def dataset_classes(dataset: str) -> List[str]:
    """Class names of a dataset of the manifest (``datasets`` section), in label order."""
    return list(load_manifest()["datasets"][dataset]["classes"])


def build(arch: str, pretrained: bool = False, *, pretrained_cfg: Any = None,
          pretrained_cfg_overlay: Optional[dict] = None, pretrained_filter_fn=None,
          pretrained_backbone: Union[bool, str, os.PathLike] = False, class_names: Optional[Sequence[str]] = None,
          **kwargs: Any) -> SegmentationModel:
    """Build ``arch`` of the manifest's ``segmentation`` family (called by :mod:`gczoo.registry`).

    ``kwargs`` hold the manifest's ``arch`` arguments (``layers``, ``head``) and any
    :class:`SegmentationModel` argument; the weights tag (``pretrained_cfg``, default: the
    manifest's default tag) supplies ``num_classes`` and its test settings (``align_corners``,
    ``test_mode``, ``crop_size``, ``stride``) unless given. ``class_names`` (one per class, label
    order) set ``num_classes`` and ``meta["classes"]``. With ``pretrained``, the state dict of
    ``pretrained_cfg_overlay["file"]`` (or ``["state_dict"]``) goes through ``pretrained_filter_fn``
    (the converter, checking every key and shape) and is loaded strictly; a model built for other
    classes re-initialises both classifiers (:func:`gczoo.finetune.fit_classes`, one warning).

    ``pretrained_backbone=True`` (or the path of a local copy of the file) starts the model as the
    tag's mmsegmentation config did (its ``imagenet_start``): the ResNet-V1c ImageNet file it names
    goes into ``backbone``; every norm trains (the configs' SyncBN; convert with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU data parallel).
    """
    tag, entry = registry.weights_entry(arch, registry.pretrained_tag(pretrained_cfg))
    test = entry["segmentation"]
    if class_names is not None:
        kwargs.setdefault("num_classes", len(class_names))
        if len(class_names) != kwargs["num_classes"]:
            raise ValueError(f"{len(class_names)} class_names for num_classes={kwargs['num_classes']}: "
                             "give one name per class")
    kwargs.setdefault("num_classes", entry["pretrained_cfg"]["num_classes"])
    kwargs.setdefault("align_corners", test["align_corners"])
    kwargs.setdefault("test_mode", test["test_mode"])
    if test["test_mode"] == "slide":
        kwargs.setdefault("crop_size", test["crop_size"])
        kwargs.setdefault("stride", test["stride"])
    if pretrained and pretrained_backbone:
        raise ValueError(f"{arch}: pretrained=True loads the whole model; pretrained_backbone=True starts one from "
                         "ImageNet weights. Pass one of them.")
    model = SegmentationModel(**kwargs)
    start = entry["imagenet_start"]
    model.pretrained_cfg = dict(entry["pretrained_cfg"], architecture=arch, tag=tag, imagenet_start=start)
    same_classes = model.num_classes == entry["pretrained_cfg"]["num_classes"]
    classes = list(class_names) if class_names is not None else dataset_classes(test["dataset"]) if same_classes else None
    model.meta = {"dataset": test["dataset"], "classes": classes,
                  "test_scale": tuple(test["test_scale"]), "keep_ratio": test["keep_ratio"]}
    if pretrained_backbone:
        file = None if pretrained_backbone is True else os.fspath(pretrained_backbone)
        finetune.load_backbone(model.backbone, finetune.backbone_state_dict(start["backbone"], file),
                               f"ImageNet backbone {start['backbone']} for {arch}.{tag}")
        finetune.freeze_stages(model.backbone, ("stem",), ("layer1", "layer2", "layer3", "layer4"),
                               start["frozen_stages"])
    if pretrained:
        load_pretrained(model, arch, pretrained_cfg_overlay, pretrained_filter_fn)
    return model
