"""Cascade Mask R-CNN (Cai & Vasconcelos 2018) from torchvision parts, for mmdetection's GCNet cascade rows.

:class:`CascadeRoIHeads` replaces torchvision's single-stage ``RoIHeads`` with three stages,
each a torchvision ``RoIHeads`` (its own IoU matcher, sampler, box coder, ``TwoMLPHead`` box
head and ``MaskRCNNHeads`` mask head) whose box regression is class-agnostic (4 outputs). It
follows mmdetection's ``CascadeRoIHead`` (``configs/cascade_rcnn``; published.md section 7):

* stage ``s`` decodes with target stds (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
  (0.033, 0.033, 0.067, 0.067) and, in training, labels RoIs at IoU 0.5, 0.6, 0.7;
* test: the RoIs of stage ``s + 1`` are stage ``s``'s boxes (its deltas applied to its RoIs,
  clipped to the image); the raw class logits of the three stages are averaged before one
  softmax; final boxes are the last stage's deltas on its RoIs; score > 0.05, class-wise NMS
  0.5, 100 per image (mmdetection's ``multiclass_nms``, which drops no small box);
* masks: the three mask heads run on the final boxes; their sigmoids (at the label's channel)
  are averaged and pasted as they are;
* training (:func:`gczoo.models.mmdet_training.detector_losses`): each stage samples 512 RoIs
  (25% positive, ground truth added as proposals) among the previous stage's refined boxes
  (ground-truth rows removed, gradients stopped), with cross-entropy and smooth-L1 (beta 1) box
  losses, and a mask loss on its positives; the losses of the stages are weighted
  ``stage_loss_weights`` (1, 0.5, 0.25).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.ops import batched_nms, clip_boxes_to_image

from .mmdet_ops import MMDetBoxCoder

__all__ = ["CascadeRoIHeads", "ClassAgnosticBoxPredictor", "STAGE_STDS", "STAGE_IOU_THRESHOLDS", "STAGE_LOSS_WEIGHTS"]

#: mmdetection's cascade settings per stage: box-coder target stds, training IoU thresholds, loss weights.
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class ClassAgnosticBoxPredictor(FastRCNNPredictor):
    """torchvision's box predictor with one box per RoI (``bbox_pred`` has 4 outputs), as
    mmdetection's ``reg_class_agnostic=True`` heads."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)


class CascadeRoIHeads(nn.Module):
    """Three-stage cascade box and mask heads (see the module docstring).

    Args:
        box_roi_pool, mask_roi_pool: the RoI poolers every stage uses (no parameters).
        num_classes: classes including background (index 0).
        stage_stds, stage_iou_thresholds, stage_loss_weights: one entry per stage.
        score_thresh, nms_thresh, detections_per_img: test-time post-processing.
        box_batch_size_per_image, box_positive_fraction: training RoI sampling per stage.
    """

    def __init__(self, box_roi_pool: nn.Module, mask_roi_pool: nn.Module, num_classes: int,
                 stage_stds: Sequence[Sequence[float]] = STAGE_STDS,
                 stage_iou_thresholds: Sequence[float] = STAGE_IOU_THRESHOLDS,
                 stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, box_batch_size_per_image: int = 512,
                 box_positive_fraction: float = 0.25, fpn_channels: int = 256, representation_size: int = 1024):
        super().__init__()
        if not len(stage_stds) == len(stage_iou_thresholds) == len(stage_loss_weights):
            raise ValueError("stage_stds, stage_iou_thresholds and stage_loss_weights need one entry per stage")
        resolution = box_roi_pool.output_size[0]
        self.stages = nn.ModuleList()
        for stds, iou in zip(stage_stds, stage_iou_thresholds):
            stage = RoIHeads(
                box_roi_pool, TwoMLPHead(fpn_channels * resolution ** 2, representation_size),
                ClassAgnosticBoxPredictor(representation_size, num_classes),
                fg_iou_thresh=iou, bg_iou_thresh=iou, batch_size_per_image=box_batch_size_per_image,
                positive_fraction=box_positive_fraction, bbox_reg_weights=None, score_thresh=score_thresh,
                nms_thresh=nms_thresh, detections_per_img=detections_per_img, mask_roi_pool=mask_roi_pool,
                mask_head=MaskRCNNHeads(fpn_channels, (256, 256, 256, 256), 1),
                mask_predictor=MaskRCNNPredictor(256, 256, num_classes))
            stage.box_coder = MMDetBoxCoder(stds)
            self.stages.append(stage)
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    @staticmethod
    def _boxes(stage: RoIHeads, rois: List[Tensor], deltas: Tensor, image_shapes: List[Tuple[int, int]]) -> List[Tensor]:
        """Stage ``stage``'s class-agnostic ``deltas`` applied to ``rois``, clipped to each image."""
        boxes = stage.box_coder.decode(deltas, rois).reshape(-1, 4).split([r.shape[0] for r in rois])
        return [clip_boxes_to_image(b, shape) for b, shape in zip(boxes, image_shapes)]

    @staticmethod
    def _box_features(stage: RoIHeads, features: Dict[str, Tensor], rois: List[Tensor],
                      image_shapes: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
        return stage.box_predictor(stage.box_head(stage.box_roi_pool(features, rois, image_shapes)))

    @staticmethod
    def _mask_logits(stage: RoIHeads, features: Dict[str, Tensor], rois: List[Tensor],
                     image_shapes: List[Tuple[int, int]]) -> Tensor:
        return stage.mask_predictor(stage.mask_head(stage.mask_roi_pool(features, rois, image_shapes)))

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        """Test-time detections per image. Sizes come from tensors' shapes and every step runs whatever
        the number of boxes (none included), so ``torch.jit.trace`` and ONNX keep them data-dependent."""
        if self.training:
            raise RuntimeError("CascadeRoIHeads computes its training losses through the detector: call the "
                               "MMDetCascadeMaskRCNN in train mode (gczoo.models.mmdet_training.detector_losses)")
        rois, logits_sum = proposals, 0
        for stage in self.stages:
            logits, deltas = self._box_features(stage, features, rois, image_shapes)
            logits_sum = logits_sum + logits
            rois = self._boxes(stage, rois, deltas, image_shapes)
        scores = F.softmax(logits_sum / len(self.stages), dim=-1).split([r.shape[0] for r in rois])
        result = [self._postprocess(b, s) for b, s in zip(rois, scores)]
        boxes = [r["boxes"] for r in result]
        labels = [r["labels"] for r in result]
        probs = [maskrcnn_inference(self._mask_logits(stage, features, boxes, image_shapes), labels)
                 for stage in self.stages]
        for i, r in enumerate(result):
            r["masks"] = torch.stack([p[i] for p in probs]).mean(0)
        return result, {}

    def _postprocess(self, boxes: Tensor, scores: Tensor) -> Dict[str, Tensor]:
        """mmdetection's ``multiclass_nms`` for class-agnostic boxes: every foreground class with
        score > ``score_thresh`` is a candidate, class-wise NMS, the best ``detections_per_img``."""
        num_classes = scores.shape[1]
        scores = scores[:, 1:]
        labels = torch.arange(1, num_classes, device=scores.device).expand_as(scores).reshape(-1)
        scores = scores.reshape(-1)
        boxes = boxes[:, None].expand(-1, num_classes - 1, 4).reshape(-1, 4)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
