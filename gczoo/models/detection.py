"""Mask R-CNN + FPN with GC-ResNet backbones on torchvision, for mmdetection's GCNet checkpoints.

The models are :class:`torchvision.models.detection.MaskRCNN` (users keep torchvision's API:
a list of float images in 0-1 in, a list of dicts with ``boxes``, ``labels``, ``scores``,
``masks`` out) with a :class:`gczoo.models.gc_resnet.GCResNet` body (frozen BatchNorm) and
torchvision's FPN, whose P6 is a stride-2 max-pool of P5 (mmdetection's ``num_outs=5`` without
extra convs). They run the published mmdetection 2.x checkpoints of GCNet
(``mask_rcnn_*_gcb_c3-c5_1x_coco``, converted by :func:`gczoo.convert.mmdet_maskrcnn`) with
mmdetection's inference conventions. Where torchvision's defaults differ, a small subclass
here restores mmdetection's behaviour:

* :class:`MMDetAnchorGenerator` -- anchors of size ``8 * stride`` (ratios h/w 0.5, 1, 2)
  centred at offset 0 of each stride cell, **not rounded**, on the fixed strides 4..64
  (torchvision rounds base anchors and infers strides as padded size // feature size, which
  gives 61 instead of 64 on P6 of an 800-high image).
* :class:`MMDetRoIAlign` -- RoIAlign with ``aligned=True`` (half-pixel offset) and
  ``sampling_ratio=0`` (adaptive), levels by ``floor(log2(sqrt(wh) / 56 + 1e-6))`` clamped to
  P2..P5, fixed scales 1/4..1/32 (torchvision's pooler has aligned=False and no way to change it).
* :class:`MMDetBoxCoder` -- ``DeltaXYWHBBoxCoder``: deltas times stds (1, 1, 1, 1) for the RPN,
  (0.1, 0.1, 0.2, 0.2) for the box head, ``dw``/``dh`` clamped to ``+-|log(16/1000)|`` on both
  sides (torchvision clamps above only), mmdetection's order of operations.
* :class:`MMDetTransform` -- mmcv's resize size rule ``int(x * scale + 0.5)`` (torchvision
  floors: 480x640 -> 800x1066 instead of mmcv's 800x1067), and mask pasting with
  ``grid_sample`` on the float box (:func:`paste_masks`; torchvision pastes on integer boxes
  with ``+1`` widths).
* :class:`MMDetMaskRCNN` -- test thresholds (RPN: 1000 per level before NMS 0.7, 1000 kept;
  boxes: score > 0.05, class-wise NMS 0.5, 100 per image), mean/std of mmdetection on 0-1 values,
  short side 800 / long side <= 1333, padding to 32, and labels as COCO category ids.

What still differs from mmdetection (named in the model card): the image is resampled in
float (mmcv resizes the uint8 image with OpenCV's fixed-point bilinear), torchvision drops boxes
under 0.01 px after decoding and RPN boxes under 1e-3 px (mmdetection keeps them / drops only
zero-size ones), and NMS runs on boxes in the resized image rather than the original one.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .. import registry
from ..weights import load_checkpoint
from .gc_resnet import GCResNet

__all__ = [
    "MMDetMaskRCNN", "FrozenParamBatchNorm2d", "MMDetAnchorGenerator", "MMDetRoIAlign", "MMDetBoxCoder", "MMDetTransform",
    "paste_masks", "mmcv_rescale_size", "build", "COCO_CATEGORIES", "COCO_CATEGORY_IDS",
]

#: COCO category names indexed by category id (torchvision's list: "__background__" at 0, "N/A" for unused ids).
COCO_CATEGORIES: List[str] = list(_COCO_CATEGORIES)
#: The 80 COCO category ids in mmdetection's class order (contiguous label k is id ``COCO_CATEGORY_IDS[k]``).
COCO_CATEGORY_IDS: Tuple[int, ...] = tuple(i for i, n in enumerate(_COCO_CATEGORIES) if n not in ("__background__", "N/A"))

#: mmdetection's ``img_norm_cfg`` (mean 123.675, 116.28, 103.53; std 58.395, 57.12, 57.375 on 0-255) on 0-1 values.
MMDET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
MMDET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
#: FPN levels P2..P6 and the levels RoIs are pooled from (P2..P5).
FPN_STRIDES = (4, 8, 16, 32, 64)
ROI_STRIDES = (4, 8, 16, 32)
MASK_THRESHOLD = 0.5


class FrozenParamBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` whose affine ``weight`` and ``bias`` are parameters with
    ``requires_grad=False`` instead of buffers.

    Same state dict, same computation; ``model.parameters()`` then counts the affine weights,
    as mmdetection (where they are trained) and the paper's #param column do.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        for name in ("weight", "bias"):
            self.register_parameter(name, nn.Parameter(self._buffers.pop(name), requires_grad=False))


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdetection's ``AnchorGenerator(strides=[4..64], ratios=[0.5, 1, 2], scales=[8])``.

    Base anchors are ``(-w/2, -h/2, w/2, h/2)`` with ``w = scale * stride / sqrt(ratio)`` and
    ``h = scale * stride * sqrt(ratio)``, kept unrounded (``center_offset=0``), shifted by
    ``(i * stride, j * stride)`` for every cell of the level's feature map. The strides are the
    given constants, not inferred from the padded image size.
    """

    def __init__(self, strides: Sequence[int] = FPN_STRIDES, ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 octave_scale: float = 8.0):
        self.strides = tuple(int(s) for s in strides)
        super().__init__(sizes=tuple((s * octave_scale,) for s in self.strides), aspect_ratios=(tuple(ratios),) * len(self.strides))

    def generate_anchors(self, scales: List[float], aspect_ratios: List[float], dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> Tensor:
        # torchvision's computation without its final .round() (mmdet keeps fractional corners).
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor strides {self.strides}")
        device = feature_maps[0].device
        self.set_cell_anchors(feature_maps[0].dtype, device)
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        per_level = self.grid_anchors([list(f.shape[-2:]) for f in feature_maps], strides)
        return [torch.cat(per_level)] * len(image_list.image_sizes)


class MMDetBoxCoder(BoxCoder):
    """mmdetection's ``DeltaXYWHBBoxCoder`` (means 0) for decoding; encoding is torchvision's.

    ``stds`` are mmdetection's ``target_stds``; torchvision's weights are their inverses.
    ``dw``/``dh`` are clamped to ``[-max_ratio, max_ratio]``, ``max_ratio = |log(wh_ratio_clip)|``.
    """

    def __init__(self, stds: Sequence[float], wh_ratio_clip: float = 16 / 1000):
        max_ratio = abs(math.log(wh_ratio_clip))
        super().__init__(weights=tuple(1.0 / s for s in stds), bbox_xform_clip=max_ratio)
        self.stds = tuple(float(s) for s in stds)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        deltas = rel_codes.reshape(rel_codes.shape[0], -1, 4) * rel_codes.new_tensor(self.stds)
        centres = ((boxes[:, :2] + boxes[:, 2:]) * 0.5)[:, None]
        sizes = (boxes[:, 2:] - boxes[:, :2])[:, None]
        dwh = deltas[..., 2:].clamp(min=-self.bbox_xform_clip, max=self.bbox_xform_clip)
        gxy = centres + sizes * deltas[..., :2]
        half = sizes * dwh.exp() * 0.5
        return torch.cat([gxy - half, gxy + half], dim=-1).reshape(rel_codes.shape[0], -1)


class MMDetRoIAlign(MultiScaleRoIAlign):
    """mmdetection's ``SingleRoIExtractor`` with mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``.

    A box of scale ``s = sqrt(w * h)`` is pooled from level
    ``floor(log2(s / finest_scale + 1e-6))`` clamped to the levels given, with
    ``spatial_scale = 1 / stride`` of that level.
    """

    def __init__(self, featmap_names: List[str], output_size: int, strides: Sequence[int] = ROI_STRIDES,
                 finest_scale: float = 56.0):
        super().__init__(featmap_names, output_size, sampling_ratio=0)
        if len(strides) != len(featmap_names):
            raise ValueError(f"{len(featmap_names)} feature maps for {len(strides)} strides")
        self.strides = tuple(int(s) for s in strides)
        self.finest_scale = float(finest_scale)

    def levels_of(self, boxes: Tensor) -> Tensor:
        """The level index (0 = finest) of each ``(x1, y1, x2, y2)`` box."""
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        all_boxes = torch.cat(boxes)
        batch_idx = torch.cat([torch.full((len(b), 1), i, dtype=all_boxes.dtype, device=all_boxes.device)
                               for i, b in enumerate(boxes)])
        rois = torch.cat([batch_idx, all_boxes], dim=1)
        levels = self.levels_of(all_boxes)
        out = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                out[idx] = roi_align(feature, rois[idx], self.output_size, spatial_scale=1.0 / stride,
                                     sampling_ratio=0, aligned=True).to(out.dtype)
        return out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"strides={self.strides}, sampling_ratio=0, aligned=True)")


def mmcv_rescale_size(height: int, width: int, short: int, long: int) -> Tuple[int, int]:
    """mmcv's ``rescale_size`` for ``keep_ratio=True``: scale so the short side is at most ``short``
    and the long side at most ``long``, rounding each side with ``int(x * scale + 0.5)``."""
    scale = min(long / max(height, width), short / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Paste ``(N, 1, M, M)`` mask probabilities into ``(N, 1, height, width)`` images at float boxes.

    mmdetection's (detectron2's) method: each image pixel centre ``(x + 0.5, y + 0.5)`` is mapped
    to box-normalised coordinates in ``[-1, 1]`` and the mask is sampled there with bilinear
    ``grid_sample`` (``align_corners=False``, zeros outside). Only a window of one pixel beyond
    the box is computed (mmdetection's ``skip_empty``); outside it the value would stay below 0.5.
    """
    out = masks.new_zeros((len(masks), 1, height, width), dtype=torch.float32)
    for i, (mask, box) in enumerate(zip(masks, boxes.tolist())):
        x0, y0, x1, y1 = box
        c0, r0 = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        c1, r1 = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
        if x1 <= x0 or y1 <= y0 or c1 <= c0 or r1 <= r0:
            continue
        xs = (torch.arange(c0, c1, dtype=torch.float32, device=masks.device) + 0.5 - x0) / (x1 - x0) * 2 - 1
        ys = (torch.arange(r0, r1, dtype=torch.float32, device=masks.device) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)[None]
        out[i, :, r0:r1, c0:c1] = F.grid_sample(mask[None].float(), grid, mode="bilinear", align_corners=False)[0]
    return out


class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's normalise/resize/pad transform with mmcv's resize size and mmdet's mask pasting.

    The image is resized (bilinear, half-pixel centres, no antialiasing: OpenCV's sampling grid)
    to :func:`mmcv_rescale_size`; masks of the detections are pasted with :func:`paste_masks`.
    """

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        h, w = image.shape[-2:]
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = mmcv_rescale_size(h, w, short, self.max_size)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], [h, w], list(size))
        if "masks" in target:
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target

    def postprocess(self, result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],
                    original_image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], *o_im_s)
        return result


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
        out = super().forward(images, targets)
        if self.training:
            return out
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


#: GCResNet arguments among the build kwargs (the rest go to :class:`MMDetMaskRCNN`).
_BODY_ARGS = ("layers", "groups", "base_width", "gc_stages", "gc_ratio", "gc_pooling", "gc_fusion")


def build(arch: str, pretrained: bool = False, *, pretrained_cfg: Any = None,
          pretrained_cfg_overlay: Optional[dict] = None, pretrained_filter_fn=None, **kwargs: Any) -> MMDetMaskRCNN:
    """Build ``arch`` of the manifest's ``maskrcnn`` family (called by :mod:`gczoo.registry`).

    ``kwargs`` hold the manifest's ``arch`` arguments (``layers``, ``groups``, ``base_width``,
    ``gc_stages``, ``gc_ratio``) and any :class:`MMDetMaskRCNN` / torchvision ``MaskRCNN``
    argument. With ``pretrained``, the state dict of ``pretrained_cfg_overlay["file"]`` (or
    ``["state_dict"]``) goes through ``pretrained_filter_fn`` (the converter, checking every key
    and shape) and is loaded strictly.
    """
    body_kwargs = {k: kwargs.pop(k) for k in _BODY_ARGS if k in kwargs}
    if kwargs.get("num_classes") not in (None, len(COCO_CATEGORY_IDS) + 1):
        kwargs.setdefault("label_ids", None)
    body = GCResNet(**body_kwargs, num_classes=0, norm_layer=FrozenParamBatchNorm2d)
    backbone = BackboneWithFPN(
        body, return_layers={info["module"]: str(i) for i, info in enumerate(body.feature_info)},
        in_channels_list=[info["num_chs"] for info in body.feature_info], out_channels=256,
        extra_blocks=LastLevelMaxPool())
    model = MMDetMaskRCNN(backbone, **kwargs)
    tag, entry = registry.weights_entry(arch, registry.pretrained_tag(pretrained_cfg))
    model.pretrained_cfg = dict(entry["pretrained_cfg"], architecture=arch, tag=tag)
    if pretrained:
        overlay = pretrained_cfg_overlay or {}
        state_dict = overlay.get("state_dict")
        if state_dict is None:
            state_dict = load_checkpoint(overlay["file"], f"{arch} weights")
        if pretrained_filter_fn is not None:
            state_dict = pretrained_filter_fn(state_dict, model)
        model.load_state_dict(state_dict, strict=True)
    return model
