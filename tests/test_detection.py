"""Mask R-CNN family: sizes vs the paper, mmdetection checkpoints through the real loading path,
torchvision's API, and each mmdetection convention against an independent computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gczoo
from gczoo.convert import StateDictMismatchError
from gczoo.models.mmdet_ops import (COCO_CATEGORY_IDS, MMDetAnchorGenerator, MMDetBoxCoder, MMDetRoIAlign,
                                   paste_masks)
from gczoo.weights import WeightsError
from torchvision.models.detection.image_list import ImageList

from mmdet_layout import mmdet_maskrcnn_state_dict, write_checkpoint

NAME = "maskrcnn_resnet50_fpn_gc_r16"
TAG = "mmdet_1x_coco"
STOP_SIGN = 11  # mmdetection's class index of "stop sign" (COCO category id 13: ids 12 is unused)


def test_the_family_holds_the_issue_models_with_the_papers_parameter_counts():
    names = gczoo.list_models("maskrcnn_*")
    expected = {f"maskrcnn_{b}_fpn{gc}" for b in ("resnet50", "resnet101", "resnext101_32x4d") for gc in ("", "_gc_r16", "_gc_r4")}
    assert set(names) == expected
    for name in names:
        info = gczoo.model_info(name)
        published = info["published_size"]["params_m"]
        assert abs(info["params"] / 1e6 - published) <= 0.1, (name, info["params"], published)


@pytest.fixture(scope="module")
def mmdet_state():
    state = mmdet_maskrcnn_state_dict((3, 4, 6, 3), gc_ratio=1 / 16)
    bias = state["roi_head.bbox_head.fc_cls.bias"]
    bias.zero_()
    bias[STOP_SIGN], bias[80] = 8.0, -8.0  # every RoI: "stop sign" wins, background (last) loses
    return state


@pytest.fixture(scope="module")
def loaded(mmdet_state, tmp_path_factory):
    """The model loaded from a real mmdetection-layout .pth file through gczoo.create_model."""
    path = write_checkpoint(tmp_path_factory.mktemp("mmdet") / "mask_rcnn_r50_fpn_r16_gcb_c3-c5_1x_coco.pth", mmdet_state)
    model = gczoo.create_model(f"{NAME}.{TAG}", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               min_size=160, max_size=256, rpn_post_nms_top_n_test=50)
    return model.eval()


def test_mmdet_checkpoint_every_key_consumed_and_loaded_strictly(loaded, mmdet_state):
    model_state = loaded.state_dict()
    counters = [k for k in mmdet_state if k.endswith("num_batches_tracked")]
    assert len(mmdet_state) - len(counters) == len(model_state)
    body = loaded.backbone.body
    pairs = {
        "backbone.layer3.5.context_block.channel_add_conv.1.weight": body.layer3[5].context_block.channel_add_conv[1].weight,
        "backbone.layer4.2.context_block.conv_mask.weight": body.layer4[2].context_block.conv_mask.weight,
        "backbone.layer1.0.downsample.1.running_var": body.layer1[0].downsample[1].running_var,
        "neck.lateral_convs.3.conv.weight": loaded.backbone.fpn.inner_blocks[3][0].weight,
        "neck.fpn_convs.0.conv.bias": loaded.backbone.fpn.layer_blocks[0][0].bias,
        "rpn_head.rpn_reg.weight": loaded.rpn.head.bbox_pred.weight,
        "roi_head.bbox_head.shared_fcs.1.weight": loaded.roi_heads.box_head.fc7.weight,
        "roi_head.mask_head.convs.2.conv.weight": loaded.roi_heads.mask_head[2][0].weight,
        "roi_head.mask_head.upsample.weight": loaded.roi_heads.mask_predictor.conv5_mask.weight,
    }
    for key, tensor in pairs.items():
        assert torch.equal(mmdet_state[key], tensor), key


def test_converted_heads_equal_mmdets_81_way_layout(loaded, mmdet_state):
    x = torch.randn(6, 1024)
    w, b = mmdet_state["roi_head.bbox_head.fc_cls.weight"], mmdet_state["roi_head.bbox_head.fc_cls.bias"]
    mmdet_probs = torch.softmax(x @ w.T + b, dim=1)  # 80 classes, background last
    scores, deltas = loaded.roi_heads.box_predictor(x)
    probs = torch.softmax(scores, dim=1)  # background first
    torch.testing.assert_close(probs[:, 0], mmdet_probs[:, 80])
    torch.testing.assert_close(probs[:, 1:], mmdet_probs[:, :80])
    reg = x @ mmdet_state["roi_head.bbox_head.fc_reg.weight"].T + mmdet_state["roi_head.bbox_head.fc_reg.bias"]
    torch.testing.assert_close(deltas.view(6, 81, 4)[:, 1:], reg.view(6, 80, 4))
    feat = torch.randn(2, 256, 28, 28)
    mmdet_logits = F.conv2d(feat, mmdet_state["roi_head.mask_head.conv_logits.weight"], mmdet_state["roi_head.mask_head.conv_logits.bias"])
    torch.testing.assert_close(loaded.roi_heads.mask_predictor.mask_fcn_logits(feat)[:, 1:], mmdet_logits)


def test_forward_through_torchvisions_api_reports_coco_category_ids(loaded):
    image = torch.rand(3, 120, 160)
    with torch.no_grad():
        (det,) = loaded([image])
    assert set(det) == {"boxes", "labels", "scores", "masks"}
    n = len(det["boxes"])
    assert n > 0 and det["masks"].shape == (n, 1, 120, 160) and det["scores"].shape == (n,)
    assert det["labels"].unique().tolist() == [13] == [COCO_CATEGORY_IDS[STOP_SIGN]]
    assert loaded.meta["categories"][13] == "stop sign"
    boxes = det["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()


def test_checkpoint_that_does_not_fit_names_the_keys(mmdet_state):
    state = dict(mmdet_state)
    del state["rpn_head.rpn_cls.bias"]
    state["roi_head.bbox_head.fc_extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError, match=r"missing keys: rpn\.head\.cls_logits\.bias") as err:
        gczoo.create_model(f"{NAME}.{TAG}", pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    assert "roi_head.bbox_head.fc_extra.weight" in str(err.value)
    with pytest.raises(StateDictMismatchError, match="shape mismatches"):  # an r4 file is not an r16 model
        gczoo.create_model("maskrcnn_resnet50_fpn_gc_r4.mmdet_1x_coco", pretrained=True,
                           pretrained_cfg_overlay=dict(state_dict=mmdet_state))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth"):
        gczoo.create_model(f"{NAME}.{TAG}", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")))


# ----------------------------------------------------------------------- conventions, one by one

def test_anchors_unrounded_centre_offset_zero_and_fixed_strides():
    gen = MMDetAnchorGenerator()
    image = ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)])
    sizes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]  # P6 of an 800-high image: 13 rows
    anchors = gen(image, [torch.zeros(1, 1, h, w) for h, w in sizes])[0]
    offsets = [0]
    for h, w in sizes:
        offsets.append(offsets[-1] + h * w * 3)
    assert len(anchors) == offsets[-1]

    def expected(stride, row, col, ratio):
        w, h = 8 * stride / math.sqrt(ratio), 8 * stride * math.sqrt(ratio)
        cx, cy = col * stride, row * stride
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    for level, (stride, (h, w)) in enumerate(zip((4, 8, 16, 32, 64), sizes)):
        for row, col in ((0, 0), (1, 2), (h - 1, w - 1)):
            for r, ratio in enumerate((0.5, 1.0, 2.0)):
                got = anchors[offsets[level] + (row * w + col) * 3 + r]
                torch.testing.assert_close(got, torch.tensor(expected(stride, row, col, ratio)), atol=1e-4, rtol=0)
    assert anchors[0, 0].item() != round(anchors[0, 0].item())  # -22.627..., not torchvision's -23


def test_roi_level_mapping():
    pooler = MMDetRoIAlign(["0", "1", "2", "3"], 7)
    for side, level in ((1, 0), (55.9, 0), (111.9, 0), (112, 1), (223.9, 1), (224, 2), (448, 3), (5000, 3)):
        box = torch.tensor([[10.0, 20.0, 10.0 + side, 20.0 + side]])
        assert pooler.levels_of(box).item() == level, side


def test_roi_align_is_aligned_with_adaptive_sampling_on_the_mapped_level():
    pooler = MMDetRoIAlign(["0", "1", "2", "3"], 7)
    a, b = 0.7, -0.3
    feats = {}
    for level, stride in enumerate((4, 8, 16, 32)):
        size = 256 // stride
        ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
        feats[str(level)] = (a * xs + b * ys + 100 * level)[None, None]  # linear in feature-map pixel coordinates
    box = torch.tensor([[40.3, 50.7, 160.9, 170.2]])  # sqrt(area) ~ 120: level 1, stride 8
    out = pooler(feats, [box], [(256, 256)])[0, 0]
    x1, y1, x2, y2 = (box[0] / 8).tolist()
    bw, bh = (x2 - x1) / 7, (y2 - y1) / 7
    # aligned=True: the box starts at x1 / stride - 0.5 in pixel-centre coordinates; a linear map
    # averages to its value at each bin's centre.
    cols = torch.tensor([x1 - 0.5 + (j + 0.5) * bw for j in range(7)])
    rows = torch.tensor([y1 - 0.5 + (i + 0.5) * bh for i in range(7)])
    expected = a * cols[None, :] + b * rows[:, None] + 100
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_mask_pasting_samples_the_float_box():
    box = torch.tensor([[10.3, 20.6, 50.2, 41.7]])
    pasted = paste_masks(torch.ones(1, 1, 28, 28), box, 60, 70)[0, 0]
    # An all-ones mask sampled bilinearly with zeros outside: at a pixel centre, mask coordinate
    # u = (x - x0) / (x1 - x0) * 28 - 0.5; the value ramps from 0 to 1 over the cell beyond each edge.
    ys, xs = torch.meshgrid(torch.arange(60) + 0.5, torch.arange(70) + 0.5, indexing="ij")
    u = (xs - 10.3) / (50.2 - 10.3) * 28 - 0.5
    v = (ys - 20.6) / (41.7 - 20.6) * 28 - 0.5
    ramp = (u + 1).clamp(0, 1) * (28 - u).clamp(0, 1) * (v + 1).clamp(0, 1) * (28 - v).clamp(0, 1)
    assert torch.equal(pasted >= 0.5, ramp >= 0.5)
    inside = (xs >= 10.3) & (xs <= 50.2) & (ys >= 20.6) & (ys <= 41.7)
    assert ((pasted >= 0.5) & ~inside).sum() == 0 and (inside & (pasted < 0.5)).sum() == 1  # one corner pixel
    mask = torch.rand(1, 1, 28, 28)
    pasted = paste_masks(mask, box, 60, 70)[0, 0]
    x0, y0, x1, y1 = box[0].tolist()
    for r, c in ((25, 20), (30, 33), (40, 49), (21, 11)):
        u = (c + 0.5 - x0) / (x1 - x0) * 28 - 0.5  # bilinear at the pixel centre, in mask cells
        v = (r + 0.5 - y0) / (y1 - y0) * 28 - 0.5
        u0, v0 = math.floor(u), math.floor(v)
        fu, fv = u - u0, v - v0

        def m(i, j):
            return mask[0, 0, i, j].item() if 0 <= i < 28 and 0 <= j < 28 else 0.0

        value = ((1 - fv) * ((1 - fu) * m(v0, u0) + fu * m(v0, u0 + 1))
                 + fv * ((1 - fu) * m(v0 + 1, u0) + fu * m(v0 + 1, u0 + 1)))
        assert pasted[r, c].item() == pytest.approx(value, abs=1e-5), (r, c)


def test_box_decoding_stds_and_two_sided_clamp():
    coder = MMDetBoxCoder((0.1, 0.1, 0.2, 0.2))
    proposal = torch.tensor([[10.0, 20.0, 110.0, 70.0]])  # centre (60, 45), size (100, 50)
    deltas = torch.tensor([[1.0, -2.0, 5.0, -50.0]])  # dw = 1.0, dh = -10 -> clamped at -log(1000/16)
    box = coder.decode(deltas, [proposal])[0, 0]
    cx, cy = 60 + 100 * 0.1, 45 + 50 * -0.2
    w, h = 100 * math.exp(1.0), 50 * 16 / 1000
    torch.testing.assert_close(box, torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))


def test_resize_uses_mmcvs_size_rule():
    with torch.device("meta"):  # the default transform (800, 1333) holds no weights
        model = gczoo.create_model(NAME)
    images, _ = model.eval().transform([torch.rand(3, 480, 640)])
    scale = min(1333 / 640, 800 / 480)
    assert images.image_sizes == [(800, int(640 * scale + 0.5))] == [(800, 1067)]  # torchvision floors: 1066
    assert images.tensors.shape[-2:] == (800, 1088)  # padded to a multiple of 32
