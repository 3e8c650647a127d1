"""Mask R-CNN and Cascade Mask R-CNN + FPN with GC-ResNet backbones on torchvision, for
mmdetection's GCNet checkpoints.

The models are :class:`torchvision.models.detection.MaskRCNN` (users keep torchvision's API:
a list of float images in 0-1 in, a list of dicts with ``boxes``, ``labels``, ``scores``,
``masks`` out) with a :class:`gczoo.models.gc_resnet.GCResNet` body (frozen BatchNorm;
optionally mmcv's deformable conv v1 in the 3x3 conv of c3-c5) and torchvision's FPN, whose P6
is a stride-2 max-pool of P5 (mmdetection's ``num_outs=5`` without extra convs). The cascade
rows swap the RoI heads for :class:`gczoo.models.cascade.CascadeRoIHeads`. They run the
published mmdetection 2.x checkpoints of GCNet (``mask_rcnn_*`` / ``cascade_mask_rcnn_*``,
converted by :func:`gczoo.convert.mmdet_maskrcnn`) with mmdetection's inference conventions,
restored where torchvision's defaults differ by the components of :mod:`gczoo.models.mmdet_ops`
(anchors, RoIAlign, box coder, resize and mask pasting), and :class:`MMDetMaskRCNN` sets
mmdetection's test thresholds (RPN: 1000 per level before NMS 0.7, 1000 kept; boxes: score
> 0.05, class-wise NMS 0.5, 100 per image), mean/std on 0-1 values, short side 800 / long side
<= 1333, padding to 32, and reports labels as COCO category ids. In training mode the losses are
mmdetection's (assignment, sampling, targets, loss functions and normalisation), computed by
:func:`gczoo.models.mmdet_training.detector_losses`.

What still differs from mmdetection (named in the model cards): without OpenCV installed the
image is resampled in float (see :func:`gczoo.models.mmdet_ops.resize_image`); the Mask R-CNN
rows' box head (torchvision's) drops boxes under 0.01 px after decoding, and torchvision's RPN
drops proposals under 1e-3 px where mmdetection drops only empty ones.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .. import registry
from ..convert import load_pretrained
from .cascade import CascadeRoIHeads
from .gc_resnet import GCResNet
from .mmdet_training import detector_losses
from .mmdet_ops import (COCO_CATEGORIES, COCO_CATEGORY_IDS, MASK_THRESHOLD, MMDET_MEAN, MMDET_STD, DeformConv2dPack,
                        FrozenParamBatchNorm2d, MMDetAnchorGenerator, MMDetBoxCoder, MMDetRoIAlign, MMDetTransform)

__all__ = ["MMDetMaskRCNN", "MMDetCascadeMaskRCNN", "build"]


class MMDetMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN with mmdetection 2.x's inference conventions (see the module docstring).

    Args:
        backbone: a module with ``out_channels`` returning P2..P6 (``"0"``..``"3"``, ``"pool"``).
        label_ids: the label each foreground class is reported as (default: COCO category ids in
            mmdetection's class order); ``None`` reports contiguous indices 1..num_classes-1.
            Training targets use the same labels.
        kwargs: :class:`torchvision.models.detection.MaskRCNN` arguments; the defaults here are
            mmdetection's test settings.
    """

    def __init__(self, backbone: nn.Module, num_classes: Optional[int] = None,
                 label_ids: Optional[Sequence[int]] = COCO_CATEGORY_IDS, **kwargs: Any):
        if label_ids is not None:
            if num_classes not in (None, len(label_ids) + 1):
                raise ValueError(f"num_classes={num_classes} does not match {len(label_ids)} label_ids plus background")
            num_classes = len(label_ids) + 1
        roi_names = ["0", "1", "2", "3"]
        settings = dict(
            min_size=800, max_size=1333, image_mean=list(MMDET_MEAN), image_std=list(MMDET_STD),
            rpn_anchor_generator=MMDetAnchorGenerator(), rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
            rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
            rpn_nms_thresh=0.7, box_roi_pool=MMDetRoIAlign(roi_names, 7), mask_roi_pool=MMDetRoIAlign(roi_names, 14),
            box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
        )
        settings.update(kwargs)
        super().__init__(backbone, num_classes, **settings)
        t = self.transform
        self.transform = MMDetTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible)
        self.rpn.box_coder = MMDetBoxCoder((1.0, 1.0, 1.0, 1.0))
        self.roi_heads.box_coder = MMDetBoxCoder((0.1, 0.1, 0.2, 0.2))
        # label <-> class index tables; not state (a checkpoint never holds them)
        ids = [0, *label_ids] if label_ids is not None else list(range(num_classes))
        index_of = [-1] * (max(ids) + 1)
        for index, label in enumerate(ids):
            index_of[label] = index
        self.register_buffer("label_ids", torch.tensor(ids), persistent=False)
        self.register_buffer("class_index", torch.tensor(index_of), persistent=False)
        is_coco = label_ids is not None and tuple(label_ids) == COCO_CATEGORY_IDS
        self.meta = {"categories": COCO_CATEGORIES if is_coco else None, "mask_threshold": MASK_THRESHOLD}

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        if targets is not None:
            targets = [dict(t, labels=self._class_index(t["labels"])) for t in targets]
        if self.training:
            if targets is None:
                raise ValueError("in training mode the model needs targets (boxes, labels, masks per image)")
            return detector_losses(self, images, targets)
        out = super().forward(images, targets)
        for det in out:
            det["labels"] = self.label_ids[det["labels"]]
        return out

    def _class_index(self, labels: Tensor) -> Tensor:
        known = (labels > 0) & (labels < len(self.class_index))
        index = torch.where(known, self.class_index[labels.clamp(0, len(self.class_index) - 1)], -1)
        if (index < 0).any():
            bad = sorted(set(labels[index < 0].tolist()))
            raise ValueError(f"target labels {bad} are not among the model's labels {self.label_ids[1:].tolist()}")
        return index


class MMDetCascadeMaskRCNN(MMDetMaskRCNN):
    """:class:`MMDetMaskRCNN` with mmdetection's three-stage :class:`~gczoo.models.cascade.CascadeRoIHeads`
    (class-agnostic box heads, stage-averaged scores and masks). Arguments as :class:`MMDetMaskRCNN`."""

    def __init__(self, backbone: nn.Module, num_classes: Optional[int] = None,
                 label_ids: Optional[Sequence[int]] = COCO_CATEGORY_IDS, **kwargs: Any):
        kwargs.setdefault("rpn_post_nms_top_n_train", 2000)  # cascade-mask-rcnn_r50_fpn.py: rpn_proposal max_per_img
        super().__init__(backbone, num_classes, label_ids, **kwargs)
        heads = self.roi_heads
        self.roi_heads = CascadeRoIHeads(
            heads.box_roi_pool, heads.mask_roi_pool, heads.box_predictor.cls_score.out_features,
            score_thresh=heads.score_thresh, nms_thresh=heads.nms_thresh, detections_per_img=heads.detections_per_img,
            box_batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            box_positive_fraction=heads.fg_bg_sampler.positive_fraction)


#: GCResNet arguments among the build kwargs (the rest go to the detector).
_BODY_ARGS = ("layers", "groups", "base_width", "gc_stages", "gc_ratio", "gc_pooling", "gc_fusion")


def build(arch: str, pretrained: bool = False, *, pretrained_cfg: Any = None,
          pretrained_cfg_overlay: Optional[dict] = None, pretrained_filter_fn=None, cascade: bool = False,
          dcn_stages: Sequence = (), **kwargs: Any) -> MMDetMaskRCNN:
    """Build ``arch`` of the manifest's ``maskrcnn`` family (called by :mod:`gczoo.registry`).

    ``kwargs`` hold the manifest's ``arch`` arguments (``layers``, ``groups``, ``base_width``,
    ``gc_stages``, ``gc_ratio``; ``cascade=True`` for :class:`MMDetCascadeMaskRCNN`;
    ``dcn_stages``: stages whose 3x3 convs are mmcv's :class:`DeformConv2dPack`) and any
    :class:`MMDetMaskRCNN` / torchvision ``MaskRCNN`` argument. With ``pretrained``, the state dict of ``pretrained_cfg_overlay["file"]`` (or
    ``["state_dict"]``) goes through ``pretrained_filter_fn`` (the converter, checking every key
    and shape) and is loaded strictly.
    """
    body_kwargs = {k: kwargs.pop(k) for k in _BODY_ARGS if k in kwargs}
    if kwargs.get("num_classes") not in (None, len(COCO_CATEGORY_IDS) + 1):
        kwargs.setdefault("label_ids", None)
    body = GCResNet(**body_kwargs, num_classes=0, norm_layer=FrozenParamBatchNorm2d,
                    conv2_layer=DeformConv2dPack, conv2_stages=dcn_stages)
    for m in body.modules():
        if isinstance(m, DeformConv2dPack):
            m.reset_parameters()  # zero offsets (GCResNet's init re-draws every Conv2d, conv_offset included)
    backbone = BackboneWithFPN(
        body, return_layers={info["module"]: str(i) for i, info in enumerate(body.feature_info)},
        in_channels_list=[info["num_chs"] for info in body.feature_info], out_channels=256,
        extra_blocks=LastLevelMaxPool())
    model = (MMDetCascadeMaskRCNN if cascade else MMDetMaskRCNN)(backbone, **kwargs)
    tag, _ = registry.weights_entry(arch, registry.pretrained_tag(pretrained_cfg))
    # the input convention is the model's own transform (mmdetection's), not manifest data
    model.pretrained_cfg = dict(architecture=arch, tag=tag, input_size=(3, model.transform.min_size[-1], model.transform.max_size),
                                mean=tuple(model.transform.image_mean), std=tuple(model.transform.image_std))
    if pretrained:
        load_pretrained(model, arch, pretrained_cfg_overlay, pretrained_filter_fn)
    return model
