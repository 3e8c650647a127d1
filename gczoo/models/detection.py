"""Mask R-CNN and Cascade Mask R-CNN + FPN with GC-ResNet backbones on torchvision, for
mmdetection's GCNet checkpoints.

The models are :class:`torchvision.models.detection.MaskRCNN` (users keep torchvision's API:
a list of float images in 0-1 in, a list of dicts with ``boxes``, ``labels``, ``scores``,
``masks`` out) with a :class:`gczoo.models.gc_resnet.GCResNet` body (frozen BatchNorm by default;
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

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .. import finetune, registry
from ..convert import load_pretrained
from ..finetune import kaiming_fan_out_init, normal_init, xavier_uniform_init
from .cascade import CascadeRoIHeads
from .gc_resnet import GCResNet
from .mmdet_training import detector_losses
from .mmdet_ops import (COCO_CATEGORIES, COCO_CATEGORY_IDS, MASK_THRESHOLD, MMDET_MEAN, MMDET_STD, DeformConv2dPack,
                        FrozenParamBatchNorm2d, MMDetAnchorGenerator, MMDetBoxCoder, MMDetRoIAlign, MMDetTransform,
                        TEST_SCALE, mmcv_rescale_size, resize_image)

__all__ = ["MMDetMaskRCNN", "MMDetCascadeMaskRCNN", "DetectorNetwork", "DetectorFeatures", "MMDET_HEAD_INIT",
           "TRAINING_ONLY_ARGS", "build"]

#: torchvision ``MaskRCNN`` arguments that act in train mode only (proposal counts, target assignment and
#: sampling): weights trained with other values build and infer the same without them.
TRAINING_ONLY_ARGS = frozenset({
    "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh",
    "rpn_batch_size_per_image", "rpn_positive_fraction", "box_fg_iou_thresh", "box_bg_iou_thresh",
    "box_batch_size_per_image", "box_positive_fraction"})

_STAGE = r"roi_heads\.(stages\.\d+\.)?"
#: mmdetection 3.3's initialisation of every layer outside the backbone body, by module name:
#: ``FPN`` (``init_cfg=dict(type='Xavier', layer='Conv2d', distribution='uniform')``), ``RPNHead``
#: (``Normal``, std 0.01, every conv), ``ConvFCBBoxHead`` (Xavier uniform on ``shared_fcs``),
#: ``BBoxHead`` (``Normal`` std 0.01 on ``fc_cls``, std 0.001 on ``fc_reg``), ``FCNMaskHead``
#: (its ``ConvModule``s: mmcv's ``kaiming_init``, fan_out; ``init_weights``: He normal fan_out on
#: ``upsample`` and ``conv_logits``). Biases start at 0.
MMDET_HEAD_INIT = {
    r"backbone\.fpn\.(inner|layer)_blocks\.\d+\.0": xavier_uniform_init,
    r"rpn\.head\.(conv\.0\.0|cls_logits|bbox_pred)": normal_init(0.01),
    _STAGE + r"box_head\.fc[67]": xavier_uniform_init,
    _STAGE + r"box_predictor\.cls_score": normal_init(0.01),
    _STAGE + r"box_predictor\.bbox_pred": normal_init(0.001),
    _STAGE + r"mask_head\.\d+\.0": kaiming_fan_out_init,
    _STAGE + r"mask_predictor\.(conv5_mask|mask_fcn_logits)": kaiming_fan_out_init,
}


class MMDetMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN with mmdetection 2.x's inference conventions (see the module docstring).

    Layers outside the backbone body start as mmdetection initialises them (:data:`MMDET_HEAD_INIT`).

    Args:
        backbone: a module with ``out_channels`` returning P2..P6 (``"0"``..``"3"``, ``"pool"``).
        num_classes: classes *including background* (torchvision's convention): 81 for COCO's 80.
        label_ids: the label each foreground class is reported as and trained with (default: COCO
            category ids in mmdetection's class order); ``None``: labels 1..num_classes-1
            (torchvision's convention). Targets with any other label raise ``ValueError``.
        class_names: names of the foreground classes in class order (``num_classes - 1`` of them);
            they reach ``meta["classes"]`` and ``meta["categories"]`` (names indexed by label).
        kwargs: :class:`torchvision.models.detection.MaskRCNN` arguments; the defaults here are
            mmdetection's test settings.
    """

    #: Modules that depend on the classes (:mod:`gczoo.finetune`): the classifier, the class-specific
    #: box regression and the mask logits.
    class_layers = (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)", r"roi_heads\.mask_predictor\.mask_fcn_logits")

    def __init__(self, backbone: nn.Module, num_classes: Optional[int] = None,
                 label_ids: Optional[Sequence[int]] = COCO_CATEGORY_IDS,
                 class_names: Optional[Sequence[str]] = None, **kwargs: Any):
        if label_ids is not None:
            if num_classes not in (None, len(label_ids) + 1):
                raise ValueError(f"num_classes={num_classes} does not match {len(label_ids)} label_ids plus background")
            num_classes = len(label_ids) + 1
        if class_names is not None:
            num_classes = len(class_names) + 1 if num_classes is None else num_classes
            if len(class_names) != num_classes - 1:
                raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes} (classes including "
                                 f"background): give one name per foreground class")
        roi_names = ["0", "1", "2", "3"]
        settings = dict(
            min_size=TEST_SCALE[1], max_size=TEST_SCALE[0], image_mean=list(MMDET_MEAN), image_std=list(MMDET_STD),
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
        self.num_classes = num_classes
        finetune.init_layers(self, MMDET_HEAD_INIT)
        # label <-> class index tables; not state (a checkpoint never holds them)
        ids = [0, *label_ids] if label_ids is not None else list(range(num_classes))
        index_of = [-1] * (max(ids) + 1)
        for index, label in enumerate(ids):
            index_of[label] = index
        self.register_buffer("label_ids", torch.tensor(ids), persistent=False)
        self.register_buffer("class_index", torch.tensor(index_of), persistent=False)
        if class_names is None and label_ids is not None and tuple(label_ids) == COCO_CATEGORY_IDS:
            class_names = [COCO_CATEGORIES[i] for i in COCO_CATEGORY_IDS]
        categories = None
        if class_names is not None:
            categories = ["__background__"] + ["N/A"] * (len(index_of) - 1)
            for label, name in zip(ids[1:], class_names):
                categories[label] = name
        self.meta = {"classes": None if class_names is None else list(class_names), "categories": categories,
                     "mask_threshold": MASK_THRESHOLD}

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

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first: the detector does not script (its resize is OpenCV's)."""
        from ..export import UnsupportedExportError

        raise UnsupportedExportError(
            f"{type(self).__name__} does not script: its resize is OpenCV's (mmdetection's pixels) and its forward "
            "extends torchvision's with Python. TorchScript of the network: torch.jit.trace(DetectorNetwork(model), "
            "(resized_image,)) or `gczoo export NAME --format torchscript`.")

    def _class_index(self, labels: Tensor) -> Tensor:
        """Training labels (the model's ``label_ids``, see the class docstring) -> class indices 1..K."""
        known = (labels > 0) & (labels < len(self.class_index))
        index = torch.where(known, self.class_index[labels.clamp(0, len(self.class_index) - 1)], -1)
        if (index < 0).any():
            bad = sorted(set(labels[index < 0].tolist()))
            ids = self.label_ids[1:].tolist()
            if ids == list(range(1, len(ids) + 1)):
                valid = f"1..{len(ids)} (num_classes={self.num_classes} includes background)"
            elif tuple(ids) == COCO_CATEGORY_IDS:
                valid = ("COCO category ids (1..90 without the 10 unused ids); for labels of your own data set build "
                         "the model with num_classes=K+1 or class_names=[...] (labels 1..K), or label_ids=[...]")
            else:
                valid = f"the label_ids the model was built with: {ids}"
            raise ValueError(f"target labels {bad} are not among the model's labels: {valid}")
        return index


class MMDetCascadeMaskRCNN(MMDetMaskRCNN):
    """:class:`MMDetMaskRCNN` with mmdetection's three-stage :class:`~gczoo.models.cascade.CascadeRoIHeads`
    (class-agnostic box heads, stage-averaged scores and masks). Arguments as :class:`MMDetMaskRCNN`."""

    #: The classifiers and mask logits of every stage; the class-agnostic box regression fits any classes.
    class_layers = (r"roi_heads\.stages\.\d+\.box_predictor\.cls_score", r"roi_heads\.stages\.\d+\.mask_predictor\.mask_fcn_logits")

    def __init__(self, backbone: nn.Module, num_classes: Optional[int] = None,
                 label_ids: Optional[Sequence[int]] = COCO_CATEGORY_IDS,
                 class_names: Optional[Sequence[str]] = None, **kwargs: Any):
        kwargs.setdefault("rpn_post_nms_top_n_train", 2000)  # cascade-mask-rcnn_r50_fpn.py: rpn_proposal max_per_img
        super().__init__(backbone, num_classes, label_ids, class_names, **kwargs)
        heads = self.roi_heads
        self.roi_heads = CascadeRoIHeads(
            heads.box_roi_pool, heads.mask_roi_pool, heads.box_predictor.cls_score.out_features,
            score_thresh=heads.score_thresh, nms_thresh=heads.nms_thresh, detections_per_img=heads.detections_per_img,
            box_batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            box_positive_fraction=heads.fg_bg_sampler.positive_fraction)
        finetune.init_layers(self, MMDET_HEAD_INIT)


class DetectorNetwork(nn.Module):
    """The graph-ready part of a detector: a resized image in, its detections in the resized image's frame out.

    The split for deployment. :meth:`preprocess` resizes a 0-1 image as mmdetection does (OpenCV,
    eager); ``forward`` holds only tensor operations (normalisation, padding to 32, backbone, FPN,
    RPN, RoI heads), so ONNX and ``torch.jit.trace`` keep the image as the graph's input; it returns
    ``(boxes, labels, scores, masks)``: boxes in the resized image, labels as the detector reports
    them, mask probabilities at the mask head's resolution. :meth:`postprocess` rescales the boxes
    and pastes the masks (eager), which gives the detector's own output.
    """

    def __init__(self, detector: MMDetMaskRCNN):
        super().__init__()
        self.detector = detector
        self.eval()  # inference only (exporters restore this mode after tracing)

    def preprocess(self, image: Tensor) -> Tensor:
        """A ``(3, H, W)`` 0-1 image resized by mmdetection's rule and pixels (:func:`resize_image`)."""
        t = self.detector.transform
        return resize_image(image, mmcv_rescale_size(*image.shape[-2:], t.min_size[-1], t.max_size))

    def batch(self, image: Tensor) -> ImageList:
        """The resized image normalised and padded (torchvision's transform after its resize)."""
        t = self.detector.transform
        images = t.batch_images([GeneralizedRCNNTransform.normalize(t, image)], size_divisible=t.size_divisible)
        return ImageList(images, [(image.shape[-2], image.shape[-1])])

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        d = self.detector
        images = self.batch(image)
        features = d.backbone(images.tensors)
        proposals, _ = d.rpn(images, features)
        det = d.roi_heads(features, proposals, images.image_sizes)[0][0]
        return det["boxes"], d.label_ids[det["labels"]], det["scores"], det["masks"]

    def postprocess(self, outputs: Sequence[Tensor], resized: Tuple[int, int],
                    original: Tuple[int, int]) -> Dict[str, Tensor]:
        """``forward``'s outputs as the detector's output dict for the original image size."""
        det = dict(zip(("boxes", "labels", "scores", "masks"), outputs))
        return self.detector.transform.postprocess([det], [tuple(resized)], [tuple(original)])[0]


class DetectorFeatures(DetectorNetwork):
    """:class:`DetectorNetwork` up to the data-dependent part (proposal selection, NMS): the FPN maps
    P2..P6, then the RPN head's objectness and box deltas per level. ``torch.export`` takes it whole."""

    def forward(self, image: Tensor) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        d = self.detector
        features = list(d.backbone(self.batch(image).tensors).values())
        objectness, deltas = d.rpn.head(features)
        return features, objectness, deltas


#: GCResNet arguments among the build kwargs (the rest go to the detector).
_BODY_ARGS = ("layers", "groups", "base_width", "gc_stages", "gc_ratio", "gc_pooling", "gc_fusion", "zero_init_last")
_STEM, _STAGES = ("conv1", "bn1"), ("layer1", "layer2", "layer3", "layer4")


def build(arch: str, pretrained: bool = False, *, pretrained_cfg: Any = None,
          pretrained_cfg_overlay: Optional[dict] = None, pretrained_filter_fn=None, cascade: bool = False,
          dcn_stages: Sequence = (), pretrained_backbone: Union[bool, str, os.PathLike] = False,
          backbone_norm: Optional[str] = None, frozen_stages: Optional[int] = None, **kwargs: Any) -> MMDetMaskRCNN:
    """Build ``arch`` of the manifest's ``maskrcnn`` family (called by :mod:`gczoo.registry`).

    ``kwargs`` hold the manifest's ``arch`` arguments (``layers``, ``groups``, ``base_width``,
    ``gc_stages``, ``gc_ratio``; ``cascade=True`` for :class:`MMDetCascadeMaskRCNN`;
    ``dcn_stages``: stages whose 3x3 convs are mmcv's :class:`DeformConv2dPack`) and any
    :class:`MMDetMaskRCNN` / torchvision ``MaskRCNN`` argument. ``num_classes`` counts background
    (81 for COCO); ``num_classes`` or ``class_names`` for other classes make the labels 1..K unless
    ``label_ids`` are given.

    With ``pretrained``, the state dict of ``pretrained_cfg_overlay["file"]`` (or ``["state_dict"]``)
    goes through ``pretrained_filter_fn`` (the converter, checking every key and shape) and is
    loaded strictly; a model built for other classes re-initialises the class layers that do not
    fit (:func:`gczoo.finetune.fit_classes`, one warning).

    ``pretrained_backbone=True`` (or the path of a local copy of the file) starts the model the way
    the weights tag's mmdetection config did (the tag's ``imagenet_start`` in the manifest): the
    body takes the ImageNet file it names (GC blocks and DCN offsets stay at their identity init),
    ``frozen_stages`` (stem and c2) stop training and the backbone norms follow the config
    (``backbone_norm``, one of :data:`gczoo.finetune.NORM_MODES`): ``"frozen_stats"`` for the
    ``norm_eval=True`` rows, ``"trainable"`` for the SyncBN rows. Otherwise the default is
    ``"frozen"`` (mmdetection's test-time BatchNorm; a random model's frozen norms are the identity,
    so train one from scratch with ``backbone_norm="trainable"``); stages are frozen by default only
    where their weights come from a file.
    """
    body_kwargs = {k: kwargs.pop(k) for k in _BODY_ARGS if k in kwargs}
    if kwargs.get("class_names") is not None or kwargs.get("num_classes") not in (None, len(COCO_CATEGORY_IDS) + 1):
        kwargs.setdefault("label_ids", None)
    tag, entry = registry.weights_entry(arch, registry.pretrained_tag(pretrained_cfg))
    start = entry.get("imagenet_start")
    if pretrained and pretrained_backbone:
        raise ValueError(f"{arch}: pretrained=True loads the whole detector; pretrained_backbone=True starts one from "
                         "ImageNet weights. Pass one of them.")
    if pretrained_backbone and start is None:
        raise ValueError(f"{arch}.{tag}: the manifest names no ImageNet backbone for these weights' config")
    if backbone_norm is None:
        backbone_norm = ("frozen_stats" if start["norm_eval"] else "trainable") if pretrained_backbone else "frozen"
    if frozen_stages is None:
        frozen_stages = start["frozen_stages"] if start and (pretrained or pretrained_backbone) else -1
    body = GCResNet(**body_kwargs, num_classes=0,
                    norm_layer=nn.BatchNorm2d if backbone_norm == "trainable" else FrozenParamBatchNorm2d,
                    conv2_layer=DeformConv2dPack, conv2_stages=dcn_stages)
    for m in body.modules():
        if isinstance(m, DeformConv2dPack):
            m.reset_parameters()  # zero offsets (GCResNet's init re-draws every Conv2d, conv_offset included)
    if pretrained_backbone:
        file = None if pretrained_backbone is True else os.fspath(pretrained_backbone)
        finetune.load_backbone(body, finetune.backbone_state_dict(start["backbone"], file),
                               f"ImageNet backbone {start['backbone']} for {arch}.{tag}")
    finetune.set_trainable(body, backbone_norm, frozen_stages, _STEM, _STAGES)
    backbone = BackboneWithFPN(
        body, return_layers={info["module"]: str(i) for i, info in enumerate(body.feature_info)},
        in_channels_list=[info["num_chs"] for info in body.feature_info], out_channels=256,
        extra_blocks=LastLevelMaxPool())
    model = (MMDetCascadeMaskRCNN if cascade else MMDetMaskRCNN)(backbone, **kwargs)
    # the input convention is the model's own transform (mmdetection's), not manifest data; every
    # detection tag holds COCO's 80 classes plus background
    model.pretrained_cfg = dict(architecture=arch, tag=tag, input_size=(3, model.transform.min_size[-1], model.transform.max_size),
                                mean=tuple(model.transform.image_mean), std=tuple(model.transform.image_std),
                                num_classes=len(COCO_CATEGORY_IDS) + 1, imagenet_start=start)
    if pretrained:
        load_pretrained(model, arch, pretrained_cfg_overlay, pretrained_filter_fn)
    return model
