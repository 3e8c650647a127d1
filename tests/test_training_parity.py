"""Training computation equal to upstream's, on the same weights, inputs and targets.

The golden files in ``tests/data/training/`` hold what mmsegmentation 1.2.2 / mmdetection 3.3.0
compute in train mode for the synthetic checkpoints of ``tests/mmseg_layout.py`` /
``tests/mmdet_layout.py``; the ``make_*_golden.py`` scripts there regenerate them with the
oracles (never run by the tests).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import gczoo
from gczoo.losses import segmentation_losses
from gczoo.models import mmdet_training
from gczoo.models.mmdet_ops import COCO_CATEGORY_IDS

from mmseg_layout import shared_state_dict
from train import common
from train import detection as train_detection

GOLDEN = Path(__file__).resolve().parent / "data" / "training"


def _golden_maker(name: str):
    """The golden script's module (its weights, batch and sampler are what the test must reuse)."""
    spec = importlib.util.spec_from_file_location(name, GOLDEN / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    recipe_name, recipe = common.recipe_for("gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k", None, "segmentation")
    assert recipe["loss_weights"] == {f"loss_{k}": v for k, v in golden["loss_weights"].items()}  # the config's
    losses = common.weighted_losses(segmentation_losses(model(golden["input"]), golden["labels"].long(), aux_weight=1.0),
                                    recipe_name, recipe["loss_weights"])  # as train/segmentation.py weights them
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


@pytest.mark.parametrize("case", ["maskrcnn", "cascade"])
def test_detection_losses_equal_mmdetection(case, monkeypatch):
    """GCNet Mask R-CNN R50 r16 and Cascade Mask R-CNN r16 (on R50), two images of different sizes
    in one batch, three objects each: with mmdetection's random choice replaced on both sides by
    the same deterministic one and mmdetection's RPN proposals given to the RoI heads, every loss
    (RPN; box, mask per stage) is mmdetection's ``model.loss`` within 1e-5 relative, from the same
    numbers of sampled anchors and RoIs. (The zoo's own proposals differ from mmdetection's only
    where scores tie to float precision.)"""
    maker = _golden_maker("make_detection_golden")
    name, golden_file, _ = maker.CASES[case]
    golden = torch.load(GOLDEN / golden_file, weights_only=True)
    batch = torch.load(GOLDEN / maker.BATCH_FILE, weights_only=True)
    (h0, w0), (h1, w1) = maker.SIZES
    overrides = maker.CASCADE_R50 if case == "cascade" else {}
    model = gczoo.create_model(name, pretrained=True, min_size=max(min(h0, w0), min(h1, w1)), max_size=max(h0, w0, h1, w1),
                               pretrained_cfg_overlay=dict(state_dict=maker.golden_state_dict(case == "cascade")),
                               **overrides).train()
    monkeypatch.setattr(mmdet_training.RandomSampler, "random_choice", staticmethod(maker.deterministic_choice))
    counts = []
    sample = mmdet_training.RandomSampler.__call__

    def counted(self, assigned, priors, gt_boxes):
        result = sample(self, assigned, priors, gt_boxes)
        counts.append((self.num, len(result.pos_inds), len(result.neg_inds)))
        return result
    monkeypatch.setattr(mmdet_training.RandomSampler, "__call__", counted)
    monkeypatch.setattr(model.rpn, "filter_proposals", lambda *args, **kwargs: (list(golden["proposals"]), None))
    ids = torch.tensor(COCO_CATEGORY_IDS)
    targets = [dict(t, labels=ids[t["labels"]]) for t in batch["targets"]]
    recipe_name, recipe = common.recipe_for(name, None, "detection")  # weighted as train/detection.py weights them
    train_detection.set_stage_loss_weights(model, recipe_name, recipe)
    losses = common.weighted_losses(model([image.float() / 255 for image in batch["images"]], targets), recipe_name,
                                    recipe["loss_weights"])
    assert counts == [tuple(c) for c in golden["sampled"]]
    assert set(losses) == set(golden["losses"])
    for key, ref in golden["losses"].items():
        value = float(losses[key].detach())
        assert abs(value - ref) <= 1e-5 * abs(ref), (key, value, ref)
