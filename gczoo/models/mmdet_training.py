"""mmdetection 3.3's training computation for the zoo's (Cascade) Mask R-CNN.

torchvision's ``RegionProposalNetwork`` / ``RoIHeads`` train differently from mmdetection's GCNet
configs (``configs/_base_/models/{mask,cascade-mask}-rcnn_r50_fpn.py``); in train mode the zoo's
detectors run this module instead, which follows mmdetection:

* **Assignment** -- :class:`MaxIoUAssigner`: IoU without +1 (union floored at 1e-6); priors with
  max IoU < ``neg_iou_thr`` are negatives, >= ``pos_iou_thr`` positives of their best GT; with
  ``match_low_quality`` every prior whose IoU equals a GT's best IoU (>= ``min_pos_iou``) is
  given to that GT (later GTs win), where torchvision keeps the prior's own best GT and has no
  ``min_pos_iou``. RPN 0.7 / 0.3 / 0.3; RoI head 0.5 / 0.5 / 0.5 (cascade stages 0.5, 0.6, 0.7,
  without low-quality matches).
* **Sampling** -- :class:`RandomSampler`: RPN 256 anchors, half positive at most, no GT added;
  RoI head 512 RoIs, a quarter positive at most, the GT boxes prepended to the proposals and
  assigned to themselves. Chosen indices are sorted (positives first).
* **Anchors** -- only anchors on the valid part of the feature map of each image (its size padded
  to 32, ``ceil(pad / stride)`` cells) take part, as mmdetection's ``valid_flags``; in the
  cascade configs (``allowed_border=0``) only those inside the image.
* **Targets** -- ``DeltaXYWHBBoxCoder.encode`` (means 0; stds 1 for the RPN, 0.1/0.1/0.2/0.2 for
  the box head, per stage in the cascade), class-specific regression in Mask R-CNN.
* **Losses** -- RPN: sigmoid cross-entropy and the box loss over the sampled anchors, both divided
  by ``avg_factor = sum over images of max(#pos, 1) + max(#neg, 1)``. Box head: softmax
  cross-entropy over the sampled RoIs (mean); box loss summed over positives, divided by the
  number of sampled RoIs. Box losses are L1 in the Mask R-CNN configs, smooth L1 (beta 1/9 RPN,
  1 RoI) in the cascade configs, where torchvision uses smooth L1 beta 1/9 everywhere.
  Mask: targets are GT masks (zero-padded to the batch size) cut by ``roi_align(aligned=True,
  sampling_ratio=0)`` at 28x28 on each positive RoI and binarised at 0.5 (torchvision: unaligned,
  soft); loss is the mean sigmoid cross-entropy at the GT label's channel.
* **Proposals** in training: 2000 per level before NMS 0.7, 1000 kept (cascade 2000 kept), from
  the detached RPN outputs (torchvision's ``filter_proposals`` with the detector's
  ``rpn_pre_nms_top_n_train`` / ``rpn_post_nms_top_n_train``, which default to these). Cascade stages feed the next one the refined boxes of their sampled
  RoIs (clipped, GT rows removed) and weigh their losses 1, 0.5, 0.25.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import roi_align

from .cascade import CascadeRoIHeads

__all__ = ["MaxIoUAssigner", "RandomSampler", "Sampled", "LossRecipe", "MASK_RCNN_RECIPE", "CASCADE_RECIPE",
           "bbox_overlaps", "encode_deltas", "box_loss", "detector_losses", "rpn_losses", "roi_losses"]


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU ``(len(boxes1), len(boxes2))`` of ``x1, y1, x2, y2`` boxes, mmdetection's ``bbox_overlaps``
    (no +1 on widths, union floored at ``eps``)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = torch.max(area1[:, None] + area2[None, :] - overlap, overlap.new_tensor([eps]))
    return overlap / union


def encode_deltas(priors: Tensor, gt: Tensor, stds: Sequence[float]) -> Tensor:
    """mmdetection's ``DeltaXYWHBBoxCoder.encode`` (``bbox2delta``, means 0): ``(dx, dy, dw, dh) / stds``."""
    pw, ph = priors[:, 2] - priors[:, 0], priors[:, 3] - priors[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    dx = ((gt[:, 0] + gt[:, 2]) * 0.5 - (priors[:, 0] + priors[:, 2]) * 0.5) / pw
    dy = ((gt[:, 1] + gt[:, 3]) * 0.5 - (priors[:, 1] + priors[:, 3]) * 0.5) / ph
    deltas = torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas / deltas.new_tensor(stds)


def box_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed ``L1Loss`` (``beta == 0``) or ``SmoothL1Loss(beta)`` of mmdetection."""
    if beta == 0:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


@dataclass(frozen=True)
class MaxIoUAssigner:
    """mmdetection's ``MaxIoUAssigner`` (``gt_max_assign_all=True``, no ignored GT)."""

    pos_iou_thr: float
    neg_iou_thr: float
    min_pos_iou: float
    match_low_quality: bool = True

    def __call__(self, priors: Tensor, gt_boxes: Tensor) -> Tensor:
        """Per prior: -1 ignored, 0 negative, ``k + 1`` positive of GT ``k``."""
        if len(gt_boxes) == 0:
            return priors.new_zeros(len(priors), dtype=torch.long)
        assigned = priors.new_full((len(priors),), -1, dtype=torch.long)
        if len(priors) == 0:
            return assigned
        overlaps = bbox_overlaps(gt_boxes, priors)
        max_overlaps, argmax = overlaps.max(dim=0)
        gt_max = overlaps.max(dim=1).values
        assigned[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        positive = max_overlaps >= self.pos_iou_thr
        assigned[positive] = argmax[positive] + 1
        if self.match_low_quality:
            for k in range(len(gt_boxes)):
                if gt_max[k] >= self.min_pos_iou:
                    assigned[overlaps[k] == gt_max[k]] = k + 1
        return assigned


@dataclass
class Sampled:
    """One image's sampling result: ``priors`` (with GT boxes prepended when added), the chosen
    positive / negative indices into them (sorted), and the GT index of each positive."""

    priors: Tensor
    pos_inds: Tensor
    neg_inds: Tensor
    pos_gt: Tensor
    num_gt_added: int

    @property
    def rois(self) -> Tensor:
        return torch.cat([self.priors[self.pos_inds], self.priors[self.neg_inds]])

    @property
    def pos_is_gt(self) -> Tensor:
        return self.pos_inds < self.num_gt_added


@dataclass(frozen=True)
class RandomSampler:
    """mmdetection's ``RandomSampler`` (``neg_pos_ub=-1``): at most ``num * pos_fraction`` positives,
    negatives fill up to ``num``; a random subset is drawn only where there are more."""

    num: int
    pos_fraction: float
    add_gt_as_proposals: bool

    @staticmethod
    def random_choice(gallery: Tensor, num: int) -> Tensor:
        """``num`` random elements of ``gallery`` (mmdetection draws ``torch.randperm`` the same way)."""
        return gallery[torch.randperm(gallery.numel())[:num].to(gallery.device)]

    def __call__(self, assigned: Tensor, priors: Tensor, gt_boxes: Tensor) -> Sampled:
        added = 0
        if self.add_gt_as_proposals and len(gt_boxes):
            added = len(gt_boxes)
            priors = torch.cat([gt_boxes.to(priors.dtype), priors])
            assigned = torch.cat([torch.arange(1, added + 1, device=assigned.device), assigned])
        pos = torch.nonzero(assigned > 0).flatten()
        num_pos = int(self.num * self.pos_fraction)
        if pos.numel() > num_pos:
            pos = self.random_choice(pos, num_pos)
        pos = pos.unique()
        neg = torch.nonzero(assigned == 0).flatten()
        num_neg = self.num - pos.numel()
        if neg.numel() > num_neg:
            neg = self.random_choice(neg, num_neg)
        neg = neg.unique()
        return Sampled(priors, pos, neg, assigned[pos] - 1, added)


@dataclass(frozen=True)
class LossRecipe:
    """What an mmdetection config sets beyond torchvision's arguments: the box losses (``0``: L1,
    else smooth L1 with that beta), low-quality matches in the RoI assigner, the RPN's
    ``allowed_border`` (``None``: every anchor; else only anchors inside the image by that
    margin take part), the mask target size.

    Counts and thresholds come from the model's torchvision components, whose defaults in the zoo
    are mmdetection's: ``rpn.proposal_matcher`` (0.7 / 0.3, ``min_pos_iou`` = the negative
    threshold), ``rpn.fg_bg_sampler`` (256, 0.5), the RoI heads' matcher and sampler (512, 0.25),
    the RPN's training proposal counts, the cascade's ``stage_loss_weights``.
    """

    rpn_box_beta: float
    roi_box_beta: float
    roi_low_quality: bool
    rpn_allowed_border: Optional[float] = None
    mask_size: int = 28


#: ``mask-rcnn_r50_fpn.py``: L1 box losses, RoI assigner 0.5 / 0.5 / 0.5 with low-quality matches.
MASK_RCNN_RECIPE = LossRecipe(rpn_box_beta=0.0, roi_box_beta=0.0, roi_low_quality=True)
#: ``cascade-mask-rcnn_r50_fpn.py``: smooth L1 (beta 1/9 RPN, 1 RoI), stage assigners without low-quality
#: matches, RPN anchors inside the image only (``allowed_border=0``).
CASCADE_RECIPE = LossRecipe(rpn_box_beta=1.0 / 9.0, roi_box_beta=1.0, roi_low_quality=False, rpn_allowed_border=0.0)


def _assigner(matcher, low_quality: bool) -> MaxIoUAssigner:
    """mmdetection's assigner with the thresholds of torchvision's ``Matcher`` (``min_pos_iou`` = the
    negative threshold, as mmdetection's configs set it)."""
    return MaxIoUAssigner(matcher.high_threshold, matcher.low_threshold, matcher.low_threshold, low_quality)


def _sampler(fg_bg_sampler, add_gt: bool) -> RandomSampler:
    return RandomSampler(fg_bg_sampler.batch_size_per_image, fg_bg_sampler.positive_fraction, add_gt)


def _valid_anchors(feature_sizes: List[Tuple[int, int]], strides: Sequence[int], num_base: int,
                   image_size: Tuple[int, int], divisor: int, device: torch.device) -> Tensor:
    """mmdetection's ``valid_flags``: anchors on the ``ceil(pad / stride)`` cells of the image's
    own padded size (a smaller image of a batch has no anchors on the batch padding)."""
    pad_h, pad_w = (math.ceil(s / divisor) * divisor for s in image_size)
    flags = []
    for (h, w), stride in zip(feature_sizes, strides):
        rows = torch.arange(h, device=device) < min(math.ceil(pad_h / stride), h)
        cols = torch.arange(w, device=device) < min(math.ceil(pad_w / stride), w)
        flags.append((rows[:, None] & cols[None, :])[..., None].expand(h, w, num_base).reshape(-1))
    return torch.cat(flags)


def rpn_losses(rpn, images, features: List[Tensor], targets: List[Dict[str, Tensor]], recipe: LossRecipe,
               size_divisible: int) -> Tuple[Dict[str, Tensor], List[Tensor]]:
    """The RPN's losses and the training proposals of each image (mmdetection's ``RPNHead.loss_and_predict``)."""
    objectness, deltas = rpn.head(features)
    anchors = rpn.anchor_generator(images, features)
    num_images = len(anchors)
    num_anchors_per_level = [o[0].numel() for o in objectness]
    feature_sizes = [tuple(o.shape[-2:]) for o in objectness]
    num_base = objectness[0].shape[1]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, objectness.detach(), images.image_sizes, num_anchors_per_level)
    objectness, deltas = objectness.view(num_images, -1), deltas.view(num_images, -1, 4)
    assigner, sampler = _assigner(rpn.proposal_matcher, True), _sampler(rpn.fg_bg_sampler, False)
    logits, labels, box_pred, box_target, avg_factor = [], [], [], [], 0
    for i, target in enumerate(targets):
        valid = _valid_anchors(feature_sizes, rpn.anchor_generator.strides, num_base, tuple(images.image_sizes[i]),
                               size_divisible, anchors[i].device)
        if recipe.rpn_allowed_border is not None:  # mmdetection's anchor_inside_flags
            (h, w), border, a = images.image_sizes[i], recipe.rpn_allowed_border, anchors[i]
            valid &= (a[:, 0] >= -border) & (a[:, 1] >= -border) & (a[:, 2] < w + border) & (a[:, 3] < h + border)
        valid = torch.where(valid)[0]
        gt = target["boxes"].to(anchors[i].dtype)
        s = sampler(assigner(anchors[i][valid], gt), anchors[i][valid], gt)
        pos, neg = valid[s.pos_inds], valid[s.neg_inds]
        logits.append(objectness[i, torch.cat([pos, neg])])
        labels.append(torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(logits[-1].dtype))
        box_pred.append(deltas[i, pos])
        box_target.append(encode_deltas(anchors[i][pos], gt[s.pos_gt], (1.0, 1.0, 1.0, 1.0)))
        avg_factor += max(pos.numel(), 1) + max(neg.numel(), 1)
    loss_cls = F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(labels), reduction="sum")
    loss_box = box_loss(torch.cat(box_pred), torch.cat(box_target), recipe.rpn_box_beta)
    return {"loss_objectness": loss_cls / avg_factor, "loss_rpn_box_reg": loss_box / avg_factor}, boxes


def _mask_targets(gt_masks: Tensor, rois: Tensor, size: int, padded: Tuple[int, int]) -> Tensor:
    """mmdetection's ``mask_target``: GT masks zero-padded to the batch size, RoIs clipped to it,
    ``roi_align(aligned=True, sampling_ratio=0)`` at ``size`` x ``size``, binarised at 0.5."""
    if len(rois) == 0:
        return gt_masks.new_zeros((0, size, size), dtype=torch.float32)
    masks = F.pad(gt_masks.float(), (0, padded[1] - gt_masks.shape[-1], 0, padded[0] - gt_masks.shape[-2]))
    boxes = torch.stack([rois[:, 0].clamp(0, padded[1]), rois[:, 1].clamp(0, padded[0]),
                         rois[:, 2].clamp(0, padded[1]), rois[:, 3].clamp(0, padded[0])], dim=1)
    boxes = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype, device=boxes.device)[:, None], boxes], dim=1)
    return (roi_align(masks[:, None], boxes.to(masks.dtype), size, 1.0, 0, aligned=True)[:, 0] >= 0.5).float()


def roi_losses(heads, features: Dict[str, Tensor], sampled: List[Sampled], image_shapes: List[Tuple[int, int]],
               targets: List[Dict[str, Tensor]], stds: Sequence[float], beta: float, mask_size: int,
               padded: Tuple[int, int]) -> Tuple[Dict[str, Tensor], Tensor]:
    """One box + mask head's losses on its sampled RoIs (mmdetection's ``bbox_loss`` and
    ``mask_loss``); ``heads`` has torchvision's ``box_roi_pool``, ``box_head``, ``box_predictor``,
    ``mask_roi_pool``, ``mask_head``, ``mask_predictor``. Also returns the box deltas."""
    rois = [s.rois for s in sampled]
    logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, image_shapes)))
    labels, box_target, pos_rows, row = [], [], [], 0
    for s, target in zip(sampled, targets):
        n_pos, n = len(s.pos_inds), len(s.pos_inds) + len(s.neg_inds)
        labels.append(torch.cat([target["labels"][s.pos_gt], s.pos_gt.new_zeros(n - n_pos)]))
        box_target.append(encode_deltas(s.priors[s.pos_inds], target["boxes"][s.pos_gt].to(s.priors.dtype), stds))
        pos_rows.append(torch.arange(row, row + n_pos, device=logits.device))
        row += n
    labels, pos_rows = torch.cat(labels), torch.cat(pos_rows)
    pos_labels = labels[pos_rows]
    deltas_per_class = deltas.view(len(deltas), -1, 4)
    pos_deltas = deltas_per_class[pos_rows, pos_labels if deltas_per_class.shape[1] > 1 else 0]
    losses = {"loss_classifier": F.cross_entropy(logits, labels, reduction="sum") / max(len(labels), 1),
              "loss_box_reg": box_loss(pos_deltas, torch.cat(box_target), beta) / max(len(labels), 1)}
    pos_rois = [s.priors[s.pos_inds] for s in sampled]
    mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, pos_rois, image_shapes)))
    mask_target = torch.cat([_mask_targets(t["masks"][s.pos_gt], r, mask_size, padded)
                             for s, t, r in zip(sampled, targets, pos_rois)])
    if len(mask_target):
        picked = mask_logits[torch.arange(len(mask_logits), device=mask_logits.device), pos_labels]
        losses["loss_mask"] = F.binary_cross_entropy_with_logits(picked, mask_target)
    else:
        losses["loss_mask"] = mask_logits.sum() * 0
    return losses, deltas


def _sample(heads, low_quality: bool, proposals: List[Tensor], targets: List[Dict[str, Tensor]]) -> List[Sampled]:
    """Assign and sample each image's proposals with the thresholds and counts of ``heads`` (a torchvision ``RoIHeads``)."""
    assigner, sampler = _assigner(heads.proposal_matcher, low_quality), _sampler(heads.fg_bg_sampler, True)
    out = []
    for boxes, target in zip(proposals, targets):
        gt = target["boxes"].to(boxes.dtype)
        out.append(sampler(assigner(boxes, gt), boxes, gt))
    return out


def detector_losses(model, images: List[Tensor], targets: List[Dict[str, Tensor]],
                    recipe: Optional[LossRecipe] = None) -> Dict[str, Tensor]:
    """The train-mode losses of an :class:`~gczoo.models.detection.MMDetMaskRCNN` (or its cascade)
    as mmdetection computes them; ``targets`` hold class indices (1..K), boxes and masks."""
    cascade = isinstance(model.roi_heads, CascadeRoIHeads)
    recipe = recipe or (CASCADE_RECIPE if cascade else MASK_RCNN_RECIPE)
    for target in targets:
        if "masks" not in target:
            raise ValueError("training a Mask R-CNN needs 'masks' (N, H, W) in every target, beside 'boxes' and 'labels'")
    images, targets = model.transform(images, targets)
    features = model.backbone(images.tensors)
    losses, proposals = rpn_losses(model.rpn, images, list(features.values()), targets, recipe,
                                   model.transform.size_divisible)
    padded = tuple(images.tensors.shape[-2:])
    if not cascade:
        heads = model.roi_heads
        sampled = _sample(heads, recipe.roi_low_quality, proposals, targets)
        roi, _ = roi_losses(heads, features, sampled, images.image_sizes, targets, heads.box_coder.stds,
                            recipe.roi_box_beta, recipe.mask_size, padded)
        losses.update(roi)
        return losses
    stages = model.roi_heads.stages
    for s, (stage, weight) in enumerate(zip(stages, model.roi_heads.stage_loss_weights)):
        sampled = _sample(stage, recipe.roi_low_quality, proposals, targets)
        roi, deltas = roi_losses(stage, features, sampled, images.image_sizes, targets, stage.box_coder.stds,
                                 recipe.roi_box_beta, recipe.mask_size, padded)
        losses.update({f"{k}_stage{s}": weight * v for k, v in roi.items()})
        if s < len(stages) - 1:  # next stage's proposals: the refined sampled RoIs, GT rows removed
            rois = [x.rois for x in sampled]
            refined = model.roi_heads._boxes(stage, rois, deltas.detach(), images.image_sizes)
            proposals = [b[torch.cat([~x.pos_is_gt, torch.ones(len(x.neg_inds), dtype=torch.bool, device=b.device)])]
                         for b, x in zip(refined, sampled)]
    return losses
