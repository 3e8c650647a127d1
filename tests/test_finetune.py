"""Training starts: fine-tuning on new classes (every family), ImageNet-backbone starts, from-scratch init.

Models are built one block deep per stage (``layers=(1, 1, 1, 1)``) so that the tests stay fast;
the checkpoints are written in the upstream layouts (``mmdet_layout``, ``mmseg_layout``,
torchvision's ResNet) for those depths.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import Bottleneck as TVBottleneck, ResNet

import gczoo
import mmseg_layout
from gczoo.convert import StateDictMismatchError, mmdet_maskrcnn, mmseg_segmentor
from gczoo.finetune import NewClassesWarning, load_backbone
from gczoo.models.mmdet_ops import FrozenParamBatchNorm2d
from mmdet_layout import mmdet_maskrcnn_state_dict

SHALLOW = (1, 1, 1, 1)
ROOT = Path(__file__).resolve().parents[1]


def _new_classes_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, NewClassesWarning)]


def _build(name, hub=False, **kwargs):
    """``gczoo.create_model(name, **kwargs)`` (or the repository's torch.hub entry point) and its NewClassesWarnings."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if hub:
            arch, _, tag = name.partition(".")
            model = torch.hub.load(str(ROOT), arch, source="local", tag=tag or None, **kwargs)
        else:
            model = gczoo.create_model(name, **kwargs)
    return model, _new_classes_warnings(record)


def _assert_loaded_but(model, converted, renewed):
    """Every tensor of ``model`` equals the converted checkpoint's, except the ``renewed`` ones."""
    for key, value in model.state_dict().items():
        if key in renewed:
            assert key not in converted or converted[key].shape != value.shape, key
        else:
            torch.testing.assert_close(value, converted[key], rtol=0, atol=0, msg=key)


def _warned(warning) -> list:
    return re.search(r"re-initialised as upstream initialises them: (.*?)\. Every", str(warning.message)).group(1).split(", ")


@pytest.mark.parametrize("name,cascade", [("maskrcnn_resnet50_fpn_gc_r16", False),
                                          ("cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r16", True)])
def test_detector_new_classes_load_every_fitting_tensor(name, cascade):
    groups = dict(groups=32, base_width=4) if cascade else {}
    state = mmdet_maskrcnn_state_dict(SHALLOW, gc_ratio=1 / 16, cascade=cascade, dcn=cascade, **groups)
    model, warned = _build(name, hub=not cascade, pretrained=True, layers=SHALLOW, class_names=["cat", "dog", "bird"],
                           pretrained_cfg_overlay=dict(state_dict=state))
    assert len(warned) == 1
    renewed = _warned(warned[0])
    heads = [f"roi_heads.stages.{s}." for s in range(3)] if cascade else ["roi_heads."]
    expected = [f"{h}{layer}.{p}" for h in heads for layer in
                (("box_predictor.cls_score",) if cascade else ("box_predictor.cls_score", "box_predictor.bbox_pred"))
                + ("mask_predictor.mask_fcn_logits",) for p in ("weight", "bias")]
    assert sorted(renewed) == sorted(expected)  # the cascade's class-agnostic regression is kept
    _assert_loaded_but(model, mmdet_maskrcnn(state, model), renewed)
    head = model.roi_heads.stages[0] if cascade else model.roi_heads
    # mmdetection's init: fc_cls N(0, 0.01), fc_reg N(0, 0.001), conv_logits He normal fan_out
    assert abs(head.box_predictor.cls_score.weight.std().item() - 0.01) < 0.001
    assert head.box_predictor.cls_score.bias.abs().max() == 0
    if not cascade:
        assert abs(head.box_predictor.bbox_pred.weight.std().item() - 0.001) < 0.0001
    logits = head.mask_predictor.mask_fcn_logits.weight
    assert abs(logits.std().item() - math.sqrt(2 / logits.shape[0])) < 0.2 * math.sqrt(2 / logits.shape[0])
    assert model.num_classes == 4 and model.meta["classes"] == ["cat", "dog", "bird"]
    assert model.meta["categories"] == ["__background__", "cat", "dog", "bird"]
    assert model.label_ids.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("head", ["gc", "nl"])
def test_segmenter_new_classes_load_every_fitting_tensor(head, monkeypatch):
    monkeypatch.setitem(mmseg_layout.DEPTHS, 14, SHALLOW)
    state = mmseg_layout.mmseg_state_dict(head, 14, 19)
    name = "gcnet_resnet50_d8" if head == "gc" else "nonlocal_resnet50_d8"
    model, warned = _build(name, pretrained=True, layers=SHALLOW, num_classes=5, aux_loss=True,
                           pretrained_cfg_overlay=dict(state_dict=state))
    assert len(warned) == 1
    renewed = _warned(warned[0])
    assert sorted(renewed) == sorted(f"{h}.conv_seg.{p}" for h in ("classifier", "aux_classifier") for p in ("weight", "bias"))
    _assert_loaded_but(model, mmseg_segmentor(state, model), renewed)
    assert abs(model.classifier.conv_seg.weight.std().item() - 0.01) < 0.001  # mmseg's conv_seg init
    assert model.meta["classes"] is None and model(torch.randn(1, 3, 32, 32))["out"].shape[1] == 5
    if head == "nl":
        return
    # class names set num_classes; a checkpoint of the model's own classes loads without a warning
    model, warned = _build(name, pretrained=True, layers=SHALLOW, class_names=list("abcdefghijklmnopqrs"),
                           aux_loss=True, pretrained_cfg_overlay=dict(state_dict=state))
    assert not warned and model.meta["classes"] == list("abcdefghijklmnopqrs")
    # any other mismatch is still refused
    broken = dict(state, **{"decode_head.conv_cat.conv.weight": torch.zeros(1)})
    with pytest.raises(StateDictMismatchError, match="conv_cat"):
        _build(name, pretrained=True, layers=SHALLOW, num_classes=5, aux_loss=True,
               pretrained_cfg_overlay=dict(state_dict=broken))


def _torchvision_state(groups=1, width=64, seed=0):
    """A torchvision-layout ResNet state dict (one bottleneck per stage) with non-trivial BatchNorm statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ResNet(TVBottleneck, list(SHALLOW), groups=groups, width_per_group=width)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
    return dict(net.state_dict())


def test_classifier_new_classes_through_timm(tmp_path):
    state = _torchvision_state()
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = timm.create_model("resnet50_gc_r16.tv_in1k", pretrained=True, num_classes=10, layers=SHALLOW,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    warned = _new_classes_warnings(record)
    assert len(warned) == 1 and sorted(_warned(warned[0])) == ["fc.bias", "fc.weight"]
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    assert model.fc.out_features == 10


def test_imagenet_backbone_from_the_manifest(hub_server):
    """pretrained_backbone=True fetches the manifest's ImageNet file (here from a loopback hub in
    the layout of timm/resnet50.tv_in1k) into the body: GC blocks identity, stem + c2 frozen, the
    norms of the tag's config."""
    state = _torchvision_state()
    path = Path(hub_server.root) / "timm/resnet50.tv_in1k/model.safetensors"
    path.parent.mkdir(parents=True)
    save_file(state, str(path))
    for tag, trained_norm in (("mmdet_1x_coco", FrozenParamBatchNorm2d), ("mmdet_syncbn_1x_coco", torch.nn.BatchNorm2d)):
        model = gczoo.create_model(f"maskrcnn_resnet50_fpn_gc_r16.{tag}", pretrained_backbone=True, layers=SHALLOW,
                                   num_classes=3)
        body = model.backbone.body
        own = body.state_dict()
        for key, value in state.items():
            if key in own:  # all but fc and the counters a frozen norm does not keep
                torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
        assert all(k in own for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
        blocks = [m for m in body.modules() if isinstance(m, gczoo.ContextBlock)]
        assert len(blocks) == 3 and all(b.channel_add_conv[-1].weight.abs().max() == 0 for b in blocks)
        frozen = [body.conv1, body.bn1, body.layer1]
        assert not any(p.requires_grad for m in frozen for p in m.parameters())
        assert isinstance(body.bn1, FrozenParamBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenParamBatchNorm2d)
        for stage in (body.layer2, body.layer3, body.layer4):
            assert type(stage[0].bn2) is trained_norm and stage[0].bn2.weight.requires_grad  # BN(requires_grad=True)
            assert stage[0].conv2.weight.requires_grad
        assert model.pretrained_cfg["imagenet_start"]["norm_eval"] is (tag == "mmdet_1x_coco")
    assert len(hub_server.gets("model.safetensors")) == 1  # fetched once, verified, then cached


def test_imagenet_start_dcn_offsets_zero_and_segmenter_v1c(tmp_path, monkeypatch):
    state = _torchvision_state(groups=32, width=4)
    path = tmp_path / "resnext.pth"
    torch.save(state, path)
    model = gczoo.create_model("cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r16", pretrained_backbone=path,
                               layers=SHALLOW)
    body = model.backbone.body
    offsets = [m.conv_offset for m in body.modules() if hasattr(m, "conv_offset")]
    assert len(offsets) == 3 and all(o.weight.abs().max() == 0 and o.bias.abs().max() == 0 for o in offsets)
    torch.testing.assert_close(body.layer3[0].conv2.weight, state["layer3.0.conv2.weight"], rtol=0, atol=0)
    assert model.pretrained_cfg["imagenet_start"]["backbone"] == "resnext101_32x4d.openmmlab_in1k"
    broken = {k: v for k, v in state.items() if k != "layer2.0.conv1.weight"}
    broken["layer5.0.conv1.weight"] = state["layer2.0.conv1.weight"]
    with pytest.raises(StateDictMismatchError, match=r"missing keys: layer2\.0\.conv1\.weight(.|\n)*unexpected keys: layer5"):
        load_backbone(body, broken, "a file of another architecture")

    # segmentation: a ResNet-V1c ImageNet file (mmseg's backbone names, with an ImageNet fc) into the backbone
    monkeypatch.setitem(mmseg_layout.DEPTHS, 14, SHALLOW)
    v1c = {k[len("backbone."):]: v for k, v in mmseg_layout.mmseg_state_dict("gc", 14, 19).items() if k.startswith("backbone.")}
    v1c.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save({"state_dict": v1c}, tmp_path / "v1c.pth")
    seg = gczoo.create_model("gcnet_resnet50_d8", pretrained_backbone=tmp_path / "v1c.pth", layers=SHALLOW)
    own = seg.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in v1c.items() if not k.startswith("fc."))
    assert all(p.requires_grad for p in seg.parameters())  # SyncBN rows: everything trains
    assert seg.classifier.context_block.channel_add_conv[-1].weight.abs().max() == 0


def test_train_step_from_an_imagenet_backbone_is_moderate(tmp_path):
    """A train-mode step of a detector started from a torchvision-layout ImageNet file: finite, moderate
    losses (the classifier near the uniform prior, log K) where a random backbone with frozen identity
    norms gave loss_classifier 17.8 and loss_mask 10.8."""
    path = tmp_path / "resnet.pth"
    torch.save(_torchvision_state(), path)
    torch.manual_seed(0)
    model = gczoo.create_model("maskrcnn_resnet50_fpn_gc_r16.mmdet_1x_coco", pretrained_backbone=path,
                               layers=SHALLOW, num_classes=3, min_size=96, max_size=128, rpn_pre_nms_top_n_train=200,
                               rpn_post_nms_top_n_train=100, box_batch_size_per_image=64).train()
    images = [torch.rand(3, 96, 128) for _ in range(2)]
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:60, 10:70] = masks[1, 30:90, 50:120] = 1
    targets = [dict(boxes=torch.tensor([[10.0, 10.0, 70.0, 60.0], [50.0, 30.0, 120.0, 90.0]]), labels=torch.tensor([1, 2]),
                    masks=masks) for _ in images]
    with pytest.raises(ValueError, match=r"target labels \[3\] .* 1\.\.2 \(num_classes=3 includes background\)"):
        model(images, [dict(t, labels=torch.tensor([1, 3])) for t in targets])
    losses = model(images, targets)
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_classifier"].item() < 2 * math.log(3)  # N(0, 0.01) logits: near the uniform prior
    assert all(v.item() < 5 for v in losses.values()), losses  # mask logits: He init over K=3 channels
    sum(losses.values()).backward()
    assert model.backbone.body.layer1[0].conv1.weight.grad is None  # frozen stage 1


def test_coco_labels_error_names_the_rule():
    model = gczoo.create_model("maskrcnn_resnet50_fpn_gc_r16", layers=SHALLOW)
    with pytest.raises(ValueError, match=r"\[12\] .*COCO category ids.*num_classes=K\+1"):
        model._class_index(torch.tensor([1, 12]))


def test_classifier_zero_init_last_as_timm_and_from_scratch_training_stays_sane():
    ours = timm.create_model("resnet50_gc_r16", layers=SHALLOW, num_classes=10)
    theirs = timm.create_model("resnet50", layers=SHALLOW, num_classes=10)
    assert all(b.bn3.weight.abs().max() == 0 for b in (ours.layer1[0], ours.layer4[0], theirs.layer1[0]))
    assert timm.create_model("resnet50_gc_r16", layers=SHALLOW, zero_init_last=False).layer1[0].bn3.weight.min() == 1
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 7])
    losses = {}
    for name, model in (("ours", ours), ("timm", theirs)):
        torch.manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model.train()(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[name] = torch.nn.functional.cross_entropy(model.eval()(x), y).item()
    assert math.isfinite(losses["ours"]) and losses["ours"] < max(3 * losses["timm"], 2 * math.log(10)), losses
