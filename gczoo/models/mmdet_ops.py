"""mmdetection 2.x inference conventions as torchvision detection components, shared by the zoo's detectors.

Where torchvision's detection defaults differ from mmdetection's (measured against mmdetection
3.3.0 on the same weights and image; ``published.md`` section 3), a small subclass restores
mmdetection's behaviour; :mod:`gczoo.models.detection` (Mask R-CNN) and
:mod:`gczoo.models.cascade` (Cascade Mask R-CNN) build on them:

* :class:`MMDetAnchorGenerator` -- anchors of size ``8 * stride`` (ratios h/w 0.5, 1, 2)
  centred at offset 0 of each stride cell, **not rounded**, on the fixed strides 4..64.
* :class:`MMDetRoIAlign` -- RoIAlign with ``aligned=True`` and ``sampling_ratio=0``, levels by
  ``floor(log2(sqrt(wh) / 56 + 1e-6))`` clamped to P2..P5.
* :class:`MMDetBoxCoder` -- ``DeltaXYWHBBoxCoder`` with per-head target stds, ``dw``/``dh``
  clamped on both sides.
* :class:`MMDetTransform` -- mmcv's resize (size rule ``int(x * scale + 0.5)``; the 8-bit image
  resized with OpenCV's bilinear, :func:`resize_image`) and mask pasting with ``grid_sample`` on
  the float box (:func:`paste_masks`).
* :class:`DeformConv2dPack` -- mmcv's deformable convolution v1 with its own offset conv, on
  ``torchvision.ops.deform_conv2d``.
* :class:`FrozenParamBatchNorm2d` -- frozen BatchNorm whose affine weights count as parameters.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection._utils import BoxCoder  # private: pinned by tests/test_detection.py
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, deform_conv2d, roi_align

from .gc_resnet import fixed_affine_norm

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # newer than the oldest torch supported

try:  # the optional "detection" extra: mmcv resizes 8-bit images with OpenCV
    import cv2
except ImportError:  # pragma: no cover - exercised by monkeypatching HAVE_OPENCV
    cv2 = None

__all__ = [
    "COCO_CATEGORIES", "COCO_CATEGORY_IDS", "MMDET_MEAN", "MMDET_STD", "FPN_STRIDES", "ROI_STRIDES", "MASK_THRESHOLD",
    "FrozenParamBatchNorm2d", "MMDetAnchorGenerator", "MMDetBoxCoder", "MMDetRoIAlign", "MMDetTransform",
    "DeformConv2dPack", "mmcv_rescale_size", "resize_image", "paste_masks", "HAVE_OPENCV", "TEST_SCALE",
    "test_scale_kwargs",
]

#: COCO category names indexed by category id ("__background__" at 0, "N/A" for unused ids), from
#: the public metadata of torchvision's COCO weights.
COCO_CATEGORIES: List[str] = list(MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])
#: The 80 COCO category ids in mmdetection's class order (contiguous label k is id ``COCO_CATEGORY_IDS[k]``).
COCO_CATEGORY_IDS: Tuple[int, ...] = tuple(i for i, n in enumerate(COCO_CATEGORIES) if n not in ("__background__", "N/A"))

#: mmdetection's ``img_norm_cfg`` (mean 123.675, 116.28, 103.53; std 58.395, 57.12, 57.375 on 0-255) on 0-1 values.
MMDET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
MMDET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
#: FPN levels P2..P6 and the levels RoIs are pooled from (P2..P5).
FPN_STRIDES = (4, 8, 16, 32, 64)
ROI_STRIDES = (4, 8, 16, 32)
MASK_THRESHOLD = 0.5
#: The GCNet configs' test scale, (long side, short side): ``Resize(scale=(1333, 800), keep_ratio=True)``.
TEST_SCALE = (1333, 800)


def test_scale_kwargs(min_size: Optional[int]) -> Dict[str, int]:
    """Detector build arguments for a shorter side of ``min_size`` px, the longer one capped in the ratio of
    :data:`TEST_SCALE` (``{}`` for ``None``: the test scale itself)."""
    if min_size is None:
        return {}
    return dict(min_size=min_size, max_size=round(min_size * TEST_SCALE[0] / TEST_SCALE[1]))
#: Whether OpenCV is installed (``pip install gczoo[detection]``); without it images are resized in float.
HAVE_OPENCV = cv2 is not None


@fixed_affine_norm
class FrozenParamBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` whose affine ``weight`` and ``bias`` are parameters with
    ``requires_grad=False`` instead of buffers.

    Same state dict; ``model.parameters()`` then counts the affine weights, as mmdetection
    (where they are trained) and the paper's #param column do. The forward is
    ``F.batch_norm`` with the running statistics, the kernel mmdetection's ``BN`` runs in
    eval mode: one pass over the map, where torchvision's multiply-then-add makes two and
    an extra temporary (about a tenth of Mask R-CNN's CPU time at 480x640).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        for name in ("weight", "bias"):
            self.register_parameter(name, nn.Parameter(self._buffers.pop(name), requires_grad=False))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


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
        # full_like, not full((len(b), 1)): a traced graph keeps the count as a size, not a constant
        batch_idx = torch.cat([torch.full_like(b[:, :1], i, dtype=all_boxes.dtype) for i, b in enumerate(boxes)])
        rois = torch.cat([batch_idx, all_boxes], dim=1)
        levels = self.levels_of(all_boxes)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))  # shape: traced
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            idx = torch.where(levels == level)[0]
            if len(idx) or torch.jit.is_tracing():  # a traced graph pools every level: its boxes vary
                pooled = roi_align(feature, rois[idx], self.output_size, spatial_scale=1.0 / stride,
                                   sampling_ratio=0, aligned=True).to(out.dtype)
                # scatter, not out[idx] = ...: a traced index_put (ONNX, TorchScript) fixed a one-box example's count
                out.scatter_(0, idx.view(-1, 1, 1, 1).expand_as(pooled), pooled)
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


def resize_image(image: Tensor, size: Tuple[int, int]) -> Tensor:
    """Resize a ``(3, H, W)`` float image in 0-1 to ``size`` as mmcv's test pipeline does.

    mmcv reads an 8-bit image and resizes it with OpenCV's bilinear ``cv2.resize``
    (``INTER_LINEAR``: half-pixel centres, 11-bit fixed-point weights, rounded to 8 bits).
    With OpenCV installed the image is quantised to 8 bits (exact for images that came from
    8-bit files) and resized so; the result equals mmcv's pixels. Without OpenCV it is
    interpolated in float on the same sampling grid (``F.interpolate``, bilinear,
    ``align_corners=False``), which differs by up to one grey level per pixel and, on one
    480x640 image, moved 3 of 17 detections (the model card says so).
    """
    if torch.jit.is_tracing() or _is_exporting():  # first: a trace would keep even the size test as a constant
        from ..export import UnsupportedExportError

        raise UnsupportedExportError(
            "the detector's resize (OpenCV, as mmdetection) cannot be traced or exported: a graph would hold the "
            "example image as a constant. Export the network on the resized image instead: "
            "gczoo.export.export_model(model, 'onnx' | 'torchscript' | 'exported', path) or `gczoo export NAME "
            "--format ...`, with gczoo.models.detection.DetectorNetwork for the pre- and post-processing.")
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if cv2 is None:
        warnings.warn("OpenCV is not installed: images are resized in float, which differs from mmdetection's 8-bit "
                      "OpenCV resize by up to one grey level and moves a few detections; "
                      "`pip install gczoo[detection]` (opencv-python-headless) gives mmdetection's pixels.", stacklevel=2)
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    pixels = (image.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    resized = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(resized).to(image.device).permute(2, 0, 1).to(image.dtype) / 255


class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's normalise/resize/pad transform with mmcv's resize and mmdetection's mask pasting.

    The image is resized by :func:`resize_image` to :func:`mmcv_rescale_size`, then normalised
    (torchvision normalises first; mmcv resizes the 8-bit image); masks of the detections are
    pasted with :func:`paste_masks`.
    """

    def normalize(self, image: Tensor) -> Tensor:
        return image  # done in resize(), after resampling

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        h, w = image.shape[-2:]
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = mmcv_rescale_size(h, w, short, self.max_size)
        image = super().normalize(resize_image(image, size))
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


class DeformConv2dPack(nn.Module):
    """mmcv's ``DeformConv2dPack`` (deformable convolution v1, Dai et al. 2017) on
    :func:`torchvision.ops.deform_conv2d`.

    ``conv_offset`` (a dense 3x3 conv with bias, zero-initialised) predicts ``2 * k * k``
    offsets per deformable group from the input, ordered ``(dy, dx)`` per kernel tap, as
    mmcv and torchvision both read them; ``weight`` is the (grouped) kernel, no bias. State
    dict keys ``weight``, ``conv_offset.weight``, ``conv_offset.bias`` are mmcv's.
    Takes ``nn.Conv2d``'s arguments, so it can replace a bottleneck's ``conv2``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = False, deform_groups: int = 1):
        super().__init__()
        if bias:
            raise ValueError("DeformConv2dPack has no bias (mmcv's DCN v1 in ResNet bottlenecks); pass bias=False")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * 2 * kernel_size * kernel_size, kernel_size,
                                     stride=stride, padding=padding, dilation=dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's initialisation: zero offsets (a plain convolution until trained)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        return deform_conv2d(x, self.conv_offset(x), self.weight, stride=self.stride, padding=self.padding,
                             dilation=self.dilation)

    def extra_repr(self) -> str:
        out_ch, in_per_group, k, _ = self.weight.shape
        return (f"in_channels={self.conv_offset.in_channels}, out_channels={out_ch}, kernel_size={k}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.conv_offset.in_channels // in_per_group}, "
                f"deform_groups={self.conv_offset.out_channels // (2 * k * k)}")
