"""Training computation equal to upstream's, on the same weights, inputs and targets.

The golden files in ``tests/data/training/`` hold what mmsegmentation 1.2.2 / mmdetection 3.3.0
compute in train mode for the synthetic checkpoints of ``tests/mmseg_layout.py`` /
``tests/mmdet_layout.py``; the ``make_*_golden.py`` scripts there regenerate them with the
oracles (never run by the tests).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gczoo
from gczoo.losses import segmentation_losses

from mmseg_layout import shared_state_dict

GOLDEN = Path(__file__).resolve().parent / "data" / "training"


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> bool:
    return bool((actual - expected).abs().max() <= rtol * expected.abs().max())


def test_segmentation_losses_and_gradients_equal_mmsegmentation():
    """GCNet R50-D8 in train mode (batch statistics, dropout with the golden's seed): decode and
    auxiliary losses within 1e-5 relative of mmsegmentation's ``EncoderDecoder.loss``, gradients
    of the heads (classifiers, first norm, GC block) within 1e-4 of the largest."""
    golden = torch.load(GOLDEN / "gcnet_r50_losses.pt", weights_only=True)
    model = gczoo.create_model("gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k", pretrained=True, aux_loss=True,
                               pretrained_cfg_overlay=dict(state_dict=shared_state_dict("gc", 50, 19))).train()
    model.backbone.requires_grad_(False)  # the heads' gradients suffice; a backbone backward costs seconds
    torch.manual_seed(golden["seed"])
    assert golden["loss_weights"] == {"decode": 1.0, "aux": 0.4}  # the config's; 0.4 is the default aux_weight
    losses = segmentation_losses(model(golden["input"]), golden["labels"].long())
    assert set(losses) == {"loss_decode", "loss_aux"}
    for key, ref in (("loss_decode", golden["loss_decode"]), ("loss_aux", golden["loss_aux"])):
        value = float(losses[key].detach())
        assert abs(value - float(ref)) <= 1e-5 * abs(float(ref)), (key, value, float(ref))
    (losses["loss_decode"] + losses["loss_aux"]).backward()
    params = dict(model.named_parameters())
    zoo_names = {"decode_head.conv_seg.weight": "classifier.conv_seg.weight",
                 "auxiliary_head.conv_seg.weight": "aux_classifier.conv_seg.weight",
                 "decode_head.convs.0.bn.weight": "classifier.convs.0.1.weight",
                 "decode_head.gc_block.conv_mask.weight": "classifier.context_block.conv_mask.weight"}
    for key, grad in golden["grads"].items():
        assert _close(params[zoo_names[key]].grad, grad, 1e-4), key


def test_segmentation_losses_average_over_all_pixels_and_name_bad_labels():
    """avg_non_ignore=False: ignored pixels count in the mean with loss 0; labels out of range are named."""
    logits = torch.randn(1, 3, 4, 5)
    target = torch.randint(0, 3, (1, 4, 5))
    full = segmentation_losses({"out": logits}, target)["loss_decode"]
    target[0, 0] = 255
    part = segmentation_losses({"out": logits}, target)["loss_decode"]
    per_pixel = torch.nn.functional.cross_entropy(logits, target.clamp(max=2), reduction="none")
    assert torch.allclose(part, per_pixel[0, 1:].sum() / 20)
    assert not torch.allclose(part, full)
    with pytest.raises(ValueError, match=r"\[7\] are outside 0..2"):
        segmentation_losses({"out": logits}, torch.full((1, 4, 5), 7))
    with pytest.raises(ValueError, match="matching the logits"):
        segmentation_losses({"out": logits}, target[:, :2])
