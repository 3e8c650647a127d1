"""Cascade Mask R-CNN and DCN rows: sizes vs the paper, mmdetection checkpoints through the real
loading path, mmdetection's own numbers (golden files written by the mmdetection 3.3.0 oracle),
train mode, and the shared mmdetection components (OpenCV resize, DCN v1, pinned private import)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

import gczoo
from gczoo.models import mmdet_ops
from gczoo.models.cascade import CascadeRoIHeads
from gczoo.models.mmdet_ops import COCO_CATEGORY_IDS, DeformConv2dPack, MMDetRoIAlign, resize_image

from mmdet_layout import mmdet_maskrcnn_state_dict, write_checkpoint

DATA = Path(__file__).parent / "data" / "cascade"
ROWS = [f"cascade_maskrcnn_resnext101_32x4d_fpn{s}" for s in ("", "_gc_r16", "_gc_r4", "_dconv", "_dconv_gc_r16", "_dconv_gc_r4")]
#: parameter counts of mmdetection 3.3.0's own models of these rows (oracle README: 95.95M ... 117.48M)
MMDET_PARAMS_M = (95.95, 100.73, 114.91, 98.52, 103.31, 117.48)
SMALL = dict(layers=[1, 1, 1, 1], min_size=96, max_size=128, rpn_post_nms_top_n_test=60, box_detections_per_img=8)


def test_the_six_rows_have_the_papers_parameter_counts():
    assert gczoo.list_models("cascade_maskrcnn_*") == sorted(ROWS)
    for name, mmdet_m in zip(ROWS, MMDET_PARAMS_M):
        info = gczoo.model_info(name)
        params_m = info["params"] / 1e6
        assert abs(params_m - info["published_size"]["params_m"]) <= 0.1, (name, params_m)
        assert abs(params_m - mmdet_m) <= 0.01, (name, params_m, mmdet_m)
        (metric,) = info["weights"]["mmdet_syncbn_1x_coco"]["metrics"]
        assert metric["box_ap"] > 44 and metric["source"]


@pytest.fixture(scope="module")
def cascade_dcn_state():
    """mmdetection's DCN + GC r16 cascade layout at one bottleneck per stage (small and quick)."""
    return mmdet_maskrcnn_state_dict((1, 1, 1, 1), groups=32, base_width=4, gc_ratio=1 / 16, cascade=True, dcn=True)


def test_cascade_dcn_checkpoint_loads_strictly_and_runs(cascade_dcn_state, tmp_path):
    state = {k: v.clone() if ".fc_cls." in k else v for k, v in cascade_dcn_state.items()}  # the fixture stays as it is
    for s in range(3):  # every stage: "stop sign" (label 11, COCO id 13) wins, background (last) loses
        bias = state[f"roi_head.bbox_head.{s}.fc_cls.bias"]
        bias.zero_()
        bias[11], bias[80] = 6.0, -6.0
    path = write_checkpoint(tmp_path / "cascade_dconv_gc.pth", state)
    model = gczoo.create_model("cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r16.mmdet_syncbn_1x_coco", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)), **SMALL).eval()
    body, heads = model.backbone.body, model.roi_heads
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(state) - len(counters) == len(model.state_dict())
    assert isinstance(body.layer2[0].conv2, DeformConv2dPack) and not isinstance(body.layer1[0].conv2, DeformConv2dPack)
    pairs = {
        "backbone.layer3.0.conv2.conv_offset.weight": body.layer3[0].conv2.conv_offset.weight,
        "backbone.layer4.0.conv2.weight": body.layer4[0].conv2.weight,
        "roi_head.bbox_head.2.fc_reg.weight": heads.stages[2].box_predictor.bbox_pred.weight,
        "roi_head.bbox_head.1.shared_fcs.1.weight": heads.stages[1].box_head.fc7.weight,
        "roi_head.mask_head.2.convs.3.conv.weight": heads.stages[2].mask_head[3][0].weight,
        "roi_head.mask_head.0.upsample.weight": heads.stages[0].mask_predictor.conv5_mask.weight,
    }
    for key, tensor in pairs.items():
        assert torch.equal(state[key], tensor), key
    cls = state["roi_head.bbox_head.1.fc_cls.weight"]
    assert torch.equal(heads.stages[1].box_predictor.cls_score.weight, torch.cat([cls[80:], cls[:80]]))
    with torch.no_grad():
        (det,) = model([torch.rand(3, 72, 96)])
    assert len(det["boxes"]) > 0 and set(det["labels"].tolist()) == {13}
    assert det["masks"].shape == (len(det["boxes"]), 1, 72, 96)
    del state["roi_head.bbox_head.2.fc_reg.bias"]
    bad = write_checkpoint(tmp_path / "bad.pth", state)
    with pytest.raises(gczoo.convert.StateDictMismatchError, match=r"missing keys: roi_heads\.stages\.2\.box_predictor\.bbox_pred\.bias"):
        gczoo.create_model("cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r16", pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(bad)), **SMALL)


def test_cascade_test_logic_gives_mmdetections_detections():
    """Golden: mmdetection 3.3.0's per-stage RoIs, logits and deltas and its final detections on a
    480x640 image (resized to 800x1067), cascade DCN + GC r16 row with the oracle's synthetic
    checkpoint; rows of the 1000 RoIs that can give a detection (score > 0.05) are stored."""
    ref = torch.load(DATA / "mmdet_cascade_stages_480x640.pt", weights_only=True)
    with torch.device("meta"):  # only the box coders and post-processing run; no weights needed
        heads = CascadeRoIHeads(MMDetRoIAlign(["0", "1", "2", "3"], 7), MMDetRoIAlign(["0", "1", "2", "3"], 14), 81)
    image_shape = tuple(ref["image_shape"])
    to_ours = torch.tensor([80] + list(range(80)))  # mmdetection's background-last columns -> background first
    for s in range(2):  # RoI refinement between stages: stage s's deltas on its RoIs, clipped, are stage s+1's RoIs
        (refined,) = heads._boxes(heads.stages[s], [ref["stage_rois"][s]], ref["stage_bbox_preds"][s], [image_shape])
        torch.testing.assert_close(refined, ref["stage_rois"][s + 1], atol=1e-3, rtol=0)
    (boxes,) = heads._boxes(heads.stages[2], [ref["stage_rois"][2]], ref["stage_bbox_preds"][2], [image_shape])
    logits = sum(ref["stage_cls_scores"])[:, to_ours] / 3
    det = heads._postprocess(boxes, F.softmax(logits, dim=-1))
    ours = resize_boxes(det["boxes"], list(image_shape), list(ref["ori_shape"]))
    assert len(ours) == len(ref["boxes"]) > 20
    # class-agnostic boxes: one box can be detected as several classes, so match on (box, class)
    iou = box_iou(ref["boxes"], ours) * (ref["labels"][:, None] == det["labels"][None] - 1)
    match = iou.argmax(1)
    assert iou.max(1).values.min() > 0.9999 and len(set(match.tolist())) == len(match)
    torch.testing.assert_close(det["scores"][match], ref["scores"], atol=1e-5, rtol=0)


def test_train_mode_gives_weighted_per_stage_losses_and_gradients():
    torch.manual_seed(0)
    model = gczoo.create_model("cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r16", rpn_pre_nms_top_n_train=200,
                               rpn_post_nms_top_n_train=50, box_batch_size_per_image=32, **SMALL).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 72)]
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 10:40, 10:50], masks[1, 20:60, 30:70] = 1, 1
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 40], [30, 20, 70, 60]]), "labels": torch.tensor([1, 13]), "masks": masks},
               {"boxes": torch.tensor([[5.0, 5, 40, 30]]), "labels": torch.tensor([3]),
                "masks": F.pad(masks[:1, :, :72], (0, 0, 0, 8))[:, :72, :72]}]
    torch.manual_seed(0)
    losses = model(images, targets)
    stage_keys = {f"loss_{k}_stage{s}" for k in ("classifier", "box_reg", "mask") for s in range(3)}
    assert stage_keys | {"loss_objectness", "loss_rpn_box_reg"} == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for s in range(3):
        assert model.roi_heads.stages[s].box_predictor.bbox_pred.weight.grad.abs().sum() > 0
        assert model.roi_heads.stages[s].mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    assert model.backbone.body.layer3[0].conv2.conv_offset.weight.grad is not None
    # mmdetection's stage weights 1, 0.5, 0.25: the same samples with unit weights give 1x, 2x, 4x
    model.roi_heads.stage_loss_weights = (1.0, 1.0, 1.0)
    torch.manual_seed(0)
    unit = model(images, targets)
    for s, w in enumerate((1.0, 0.5, 0.25)):
        torch.testing.assert_close(losses[f"loss_classifier_stage{s}"], w * unit[f"loss_classifier_stage{s}"])


def test_deformable_conv_is_mmcvs_dcn_v1():
    torch.manual_seed(0)
    dcn = DeformConv2dPack(64, 64, 3, stride=2, padding=1, groups=32)
    x = torch.randn(1, 64, 9, 11)
    assert torch.count_nonzero(dcn.conv_offset.weight) == 0  # mmcv's init: a plain grouped conv
    torch.testing.assert_close(dcn(x), F.conv2d(x, dcn.weight, stride=2, padding=1, groups=32))
    # offsets are (dy, dx) per tap: dy = 1 everywhere samples one row lower
    with torch.no_grad():
        dcn.conv_offset.bias.copy_(torch.tensor([1.0, 0.0] * 9))
    shifted = F.pad(x[:, :, 1:], (0, 0, 0, 1))  # (the top output row also reads row 0, which padding zeroes here)
    torch.testing.assert_close(dcn(x)[:, :, 1:], F.conv2d(shifted, dcn.weight, stride=2, padding=1, groups=32)[:, :, 1:])


def test_resize_is_mmcvs_opencv_resize_of_the_8bit_image(monkeypatch):
    """Golden: cv2.resize (INTER_LINEAR, OpenCV 5.0.0 as in the oracle) of a seeded 8-bit image."""
    ref = torch.load(DATA / "opencv_bilinear_31x47_to_50x75.pt", weights_only=True)
    pixels = torch.randint(0, 256, (3, 31, 47), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = pixels.float() / 255
    if mmdet_ops.HAVE_OPENCV:
        assert torch.equal((resize_image(image, (50, 75)) * 255).round().to(torch.uint8), ref)
    monkeypatch.setattr(mmdet_ops, "cv2", None)
    with pytest.warns(UserWarning, match=r"OpenCV is not installed.*gczoo\[detection\]"):
        fallback = resize_image(image, (50, 75))
    assert (fallback * 255 - ref.float()).abs().max() <= 1.5  # float resampling: about a grey level off


def test_private_torchvision_box_coder_is_still_where_mmdet_ops_takes_it():
    """mmdet_ops subclasses torchvision.models.detection._utils.BoxCoder (no public equivalent):
    fail loudly here if torchvision moves it or changes what the subclass relies on."""
    from torchvision.models.detection._utils import BoxCoder

    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip=4.0)
    assert (coder.weights, coder.bbox_xform_clip) == ((10.0, 10.0, 5.0, 5.0), 4.0)
    boxes, gt = torch.tensor([[0.0, 0, 10, 20]]), torch.tensor([[1.0, 2, 11, 22]])
    torch.testing.assert_close(coder.encode_single(gt, boxes), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    assert len(COCO_CATEGORY_IDS) == 80 and mmdet_ops.COCO_CATEGORIES[13] == "stop sign"
