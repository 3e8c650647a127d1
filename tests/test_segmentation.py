"""Segmentation family: mmsegmentation checkpoints loaded strictly give mmsegmentation's logits.

The golden files in ``tests/data/segmentation/`` hold mmsegmentation 1.2.2's own
``EncoderDecoder.inference`` output (whole image, and sliding window with a small crop) for the
checkpoints of ``tests/mmseg_layout.py`` on tiny inputs; ``make_golden.py`` there regenerates them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gczoo
from gczoo.blocks import NonLocalBlock
from gczoo.cards import model_card
from gczoo.convert import StateDictMismatchError
from gczoo.models.segmentation import sliding_windows

from mmseg_layout import shared_state_dict, write_checkpoint

GOLDEN = Path(__file__).resolve().parent / "data" / "segmentation"
#: golden case -> (zoo architecture, weights tag whose test settings the case uses). Both heads in both
#: test modes on R50; R101 once, with the GC head (the NL head on R101 is the R101 backbone of the GC case
#: plus the NL head of the R50 cases, converted by the same code).
CASES = {
    "gcnet_r50_whole": ("gcnet_resnet50_d8", "mmseg_cityscapes_512x1024_40k"),
    "nonlocal_r50_whole": ("nonlocal_resnet50_d8", "mmseg_cityscapes_512x1024_40k"),
    "gcnet_r101_whole": ("gcnet_resnet101_d8", "mmseg_cityscapes_512x1024_80k"),
    "gcnet_r50_slide": ("gcnet_resnet50_d8", "mmseg_cityscapes_769x769_40k"),
    "nonlocal_r50_slide": ("nonlocal_resnet50_d8", "mmseg_cityscapes_769x769_80k"),
}


def _depth_and_head(arch: str):
    return (101 if "resnet101" in arch else 50), ("gc" if arch.startswith("gcnet") else "nl")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_mmsegmentation(case):
    """Strict load of an mmsegmentation-layout checkpoint, then mmsegmentation's logits:
    max |diff| <= 1e-3 of the largest logit, argmax equal on >= 99.9% of the pixels."""
    arch, tag = CASES[case]
    golden = torch.load(GOLDEN / f"{case}.pt", weights_only=True)
    depth, head = _depth_and_head(arch)
    overrides = {}
    if golden["test_cfg"]["mode"] == "slide":  # the golden ran mmsegmentation with a small crop
        overrides = dict(crop_size=golden["test_cfg"]["crop_size"], stride=golden["test_cfg"]["stride"])
    model = gczoo.create_model(f"{arch}.{tag}", pretrained=True, **overrides,
                               pretrained_cfg_overlay=dict(state_dict=shared_state_dict(head, depth, 19))).eval()
    assert model.test_mode == golden["test_cfg"]["mode"] and model.align_corners == golden["align_corners"]
    x = golden["input"]
    if model.test_mode == "slide":
        assert [tuple(w) for w in golden["windows"]] == sliding_windows(*x.shape[-2:], model.crop_size, model.stride)
        assert len(golden["windows"]) == 4
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out"} and out["out"].shape == golden["logits"].shape
    reference = golden["logits"].float()
    assert (out["out"] - reference).abs().max() <= 1e-3 * golden["max_abs_logit"]
    assert (out["out"].argmax(1)[0] == golden["pred"].long()).float().mean() >= 0.999


def test_strict_loading_names_the_keys_and_keeps_the_auxiliary_head(tmp_path):
    state = shared_state_dict("gc", 50, 19)
    path = write_checkpoint(tmp_path / "gcnet.pth", state)
    model = gczoo.create_model("gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k", pretrained=True, aux_loss=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(model.aux_classifier.conv_seg.weight, state["auxiliary_head.conv_seg.weight"])
    assert torch.equal(model.classifier.context_block.conv_mask.weight, state["decode_head.gc_block.conv_mask.weight"])
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 24, 40))
    assert out["out"].shape == out["aux"].shape == (1, 19, 24, 40)
    assert model.meta["classes"][:2] == ["road", "sidewalk"] and len(model.meta["classes"]) == 19

    broken = dict(state, **{"decode_head.extra.weight": torch.zeros(1)})
    del broken["backbone.layer3.5.conv2.weight"]
    with pytest.raises(StateDictMismatchError, match=r"layer3\.5\.conv2\.weight(.|\n)*decode_head\.extra\.weight"):
        gczoo.create_model("gcnet_resnet50_d8", pretrained=True, pretrained_cfg_overlay=dict(state_dict=broken))
    with pytest.raises(StateDictMismatchError, match="nonlocal_block"):  # an NLNet file is not a GCNet
        gczoo.create_model("gcnet_resnet50_d8", pretrained=True,
                           pretrained_cfg_overlay=dict(state_dict=shared_state_dict("nl", 50, 19)))
    with pytest.raises(StateDictMismatchError, match="conv_seg"):  # 150 classes into a Cityscapes tag
        gczoo.create_model("gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k", pretrained=True,
                           pretrained_cfg_overlay=dict(state_dict=shared_state_dict("gc", 50, 150)))


def test_tags_carry_their_test_settings_and_the_cards_their_sizes():
    ade = gczoo.create_model("nonlocal_resnet50_d8.mmseg_ade20k_512x512_160k")
    assert (ade.num_classes, ade.test_mode, ade.align_corners) == (150, "whole", False)
    assert ade.meta["classes"][0] == "wall" and len(ade.meta["classes"]) == 150
    slide = gczoo.create_model("gcnet_resnet101_d8.mmseg_cityscapes_769x769_80k")
    assert (slide.test_mode, slide.crop_size, slide.stride, slide.align_corners) == ("slide", (769, 769), (513, 513), True)
    card = model_card("gcnet_resnet101_d8")
    assert "published 71.09M" in card and "66.26M for what runs at test time" in card and "68.62M with its auxiliary FCN head" in card
    assert "mIoU (multi-scale + flip) 80.71" in card
    # mmsegmentation's counts of its models without the auxiliary head (published.md section 8)
    expected = {"gcnet_resnet50_d8": 47.27, "nonlocal_resnet50_d8": 47.66, "gcnet_resnet101_d8": 66.26,
                "nonlocal_resnet101_d8": 66.65}
    with torch.device("meta"):
        for arch, params_m in expected.items():
            model = gczoo.create_model(arch)
            assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m, arch


def test_nonlocal_scale_divides_the_pairwise_logits_by_sqrt_of_the_inner_width():
    torch.manual_seed(0)
    plain, scaled = NonLocalBlock(8), NonLocalBlock(8, scale=True)
    scaled.load_state_dict(plain.state_dict())
    for block in (plain, scaled):
        torch.nn.init.ones_(block.out_bn.weight)
        block.eval()
    x = torch.randn(2, 8, 3, 5)
    q, k, v = (getattr(plain, n)(x).flatten(2) for n in ("theta", "phi", "g"))
    attn = torch.softmax(q.transpose(1, 2) @ k / 2.0, dim=-1)  # sqrt(8 / 2) = 2
    y = (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 4, 3, 5)
    with torch.no_grad():
        expected = x + plain.out_bn(plain.out_conv(y))
        torch.testing.assert_close(scaled(x), expected)
        assert not torch.allclose(plain(x), expected)
