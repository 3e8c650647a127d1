"""The timm model interface of the zoo's GC-ResNets (issue 11).

Small models (five bottlenecks, 32 px inputs) with random weights everywhere, so that
no GC term vanishes: features_only against forward_intermediates, gradient checkpointing
against the plain backward, TorchScript and torch.fx graphs against eager mode in train and
eval mode, and the eval-mode GC route taken where it applies (classifier, Mask R-CNN body).
timm's own tests/test_models.py runs on the full-size classifiers outside this suite (see the
issue note for the command).
"""
import configparser
import copy
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
from torch import nn
from timm.models._features import FeatureGetterNet, FeatureHookNet
from timm.models._features_fx import FeatureGraphNet
from torchvision.models.feature_extraction import create_feature_extractor

import gczoo
from gczoo.blocks import ContextBlock
from gczoo.models.gc_resnet import Bottleneck, frozen_affine
from test_speed_equivalence import randomize

SMALL = dict(layers=(1, 1, 2, 1), num_classes=10)
TOL = dict(rtol=1e-5, atol=1e-5)
#: Every kind of block the classifiers hold: GC (add; add+mul with average pooling), NL, SNL.
VARIANTS = {
    "gc_add": ("resnet50_gc_r16", {}),
    "gc_addmul_avg": ("resnet50_gc_r4", dict(gc_fusion="add+mul", gc_pooling="avg")),
    "nl": ("resnet50_nl_c4", {}),
    "snl": ("resnet50_snl_c4", {}),
}


def small(name: str, **kwargs) -> nn.Module:
    return randomize(timm.create_model(name, **SMALL, **kwargs))


def image(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def count_eval_route(monkeypatch) -> list:
    """Count the calls of the eval-mode GC route (``Bottleneck._bn3_and_context``), which still runs."""
    calls = []
    route = Bottleneck._bn3_and_context

    @torch.jit.unused  # as the route itself: TorchScript never compiles it
    def counted(self, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        calls.append(self)
        return route(self, h, scale, shift)

    monkeypatch.setattr(Bottleneck, "_bn3_and_context", counted)
    return calls


def gc_bottlenecks(model: nn.Module) -> int:
    return sum(isinstance(m, Bottleneck) and isinstance(m.context_block, ContextBlock) for m in model.modules())


def test_star_import_and_entrypoints():
    namespace = {}
    exec("from gczoo.models.gc_resnet import *", namespace)
    assert {"GCResNet", "resnet50_gc_r16", "resnext101_32x4d_gc_r16"} <= set(namespace)
    assert namespace["resnet50_gc_r16"] is timm.models.model_entrypoint("resnet50_gc_r16")


def test_pretrained_cfgs_are_complete_and_match_the_model():
    names = timm.list_models(module="gc_resnet", include_tags=True)
    assert "resnet50_nl_c4" in names and "resnet50_gc_r16.tv2_in1k" in names  # without and with weights
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.license and cfg.origin_url and cfg.paper_ids == "arXiv:1904.11492", name
        with torch.device("meta"):  # pool_size depends on the strides only: one bottleneck per stage
            model = timm.create_model(name, layers=(1, 1, 1, 1))
            out = model.forward_features(torch.empty(1, *cfg.input_size))
        assert out.shape[-2:] == cfg.pool_size, name
        assert model.get_classifier(name_only=True) == cfg.classifier == "fc"
    assert timm.models.get_pretrained_cfg("resnet50_gc_r16.tv_in1k").license == "bsd-3-clause"
    # without weights: the zoo's own license, as the manifest states it and setup.cfg declares it
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert timm.models.get_pretrained_cfg("resnet50_nl_c4").license == setup_cfg["metadata"]["license"].lower()


def test_forward_intermediates_equal_features_only():
    model = small("resnet50_gc_r16").eval()
    x = image()
    info = model.feature_info
    assert [f["reduction"] for f in info] == [2, 4, 8, 16, 32] and info[0]["module"] == "relu"
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        assert [t.shape[1] for t in taps] == [f["num_chs"] for f in info]
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        features = timm.create_model("resnet50_gc_r16", **SMALL, features_only=True)
        assert features.load_state_dict(model.state_dict(), strict=False).missing_keys == []  # no head here
        assert features.feature_info.reduction() == [4, 8, 16, 32]  # c2..c5 by default
        for got, want in zip(features.eval()(x), taps[1:], strict=True):
            torch.testing.assert_close(got, want, **TOL)
        # timm's other feature wrappers (feature_cls="hook" | "getter" | "fx"), with the stem and c4
        for wrapper in (FeatureHookNet, FeatureGetterNet, FeatureGraphNet):
            features = wrapper(copy.deepcopy(model), out_indices=(0, 3)).eval()
            for got, want in zip(features(x), (taps[0], taps[3]), strict=True):
                torch.testing.assert_close(got, want, **TOL, msg=wrapper.__name__)
        early = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
        for got, want in zip(early, taps[1:3], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([1, 2]) == [1, 2]
        assert len(pruned.layer3) == len(pruned.layer4) == 0 and pruned.num_features == 512
        final, kept = pruned.forward_intermediates(x, indices=[1, 2])
        torch.testing.assert_close(final, taps[2], rtol=0, atol=0)
        assert pruned(x).shape == taps[2].shape  # no pooling, no classifier left


def test_grad_checkpointing_gives_the_same_gradients():
    model = small("resnet50_gc_r16", drop_path_rate=0.2).train()
    x = image()

    def grads(checkpointing: bool):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same drop-path draws in both runs (checkpointing replays them)
        out = model(x)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, plain = grads(False)
    out_ckpt, ckpt = grads(True)
    torch.testing.assert_close(out_ckpt, out, **TOL)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], **TOL, msg=name)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.manual_seed(3)
        final, _ = model.forward_intermediates(x)
        torch.manual_seed(3)
        torch.testing.assert_close(final, model.forward_features(x), **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_script_and_fx_give_eager_outputs(variant, monkeypatch):
    name, kwargs = VARIANTS[variant]
    model = small(name, **kwargs)
    x = image()
    calls = count_eval_route(monkeypatch)
    for train in (True, False):
        model.train(train)
        calls.clear()
        with torch.no_grad():
            eager = model(x)
            eager_c5 = model.forward_features(x)
            assert len(calls) == (2 * gc_bottlenecks(model) if variant.startswith("gc") and not train else 0)
            scripted = torch.jit.script(model)(x)
            traced = create_feature_extractor(model, ["fc"])(x)["fc"]  # torchvision, no tracer options
            graph_c5 = FeatureGraphNet(copy.deepcopy(model), out_indices=(4,))(x)[0]  # timm's feature_cls="fx"
        if train:  # the same plain route: the same numbers
            for got, want in ((scripted, eager), (traced, eager), (graph_c5, eager_c5)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:  # graphs hold the plain route, eager mode folds bn3 into the context
            for got, want in ((scripted, eager), (traced, eager), (graph_c5, eager_c5)):
                torch.testing.assert_close(got, want, **TOL)


def test_backward_through_fx_graph():
    model = small("resnet50_gc_r16", gc_fusion="add+mul").train()
    traced = create_feature_extractor(model, ["fc"])
    x = image()
    traced(x)["fc"].sum().backward()
    assert all(p.grad is not None for p in traced.parameters())


def test_eval_route_in_classifier_and_mask_rcnn_body(monkeypatch):
    calls = count_eval_route(monkeypatch)
    classifier = small("resnet50_gc_r16").eval()
    with torch.no_grad():
        classifier(image())
    assert len(calls) == gc_bottlenecks(classifier) == 4  # c3-c5: 1 + 2 + 1 bottlenecks

    calls.clear()
    detector = gczoo.create_model("maskrcnn_resnet50_fpn_gc_r16").eval()
    body = randomize(detector.backbone.body)
    norm = body.layer3[0].bn3
    assert type(norm).__name__ == "FrozenParamBatchNorm2d"
    scale, shift = frozen_affine(norm)  # declared by fixed_affine_norm; parameters for weights
    h = torch.randn(2, norm.weight.numel(), 3, 3)
    torch.testing.assert_close(h * scale[:, None, None] + shift[:, None, None], norm(h), **TOL)
    with torch.no_grad():
        body(image(1))
    assert len(calls) == gc_bottlenecks(body) == 13  # every GC bottleneck of c3-c5


def test_frozen_affine_is_structural():
    norm = nn.BatchNorm2d(8).eval()
    assert frozen_affine(norm) is not None
    assert frozen_affine(norm.train()) is None  # batch statistics
    assert frozen_affine(timm.layers.BatchNormAct2d(8).eval()) is None  # its own forward (BN + activation)
    assert frozen_affine(nn.GroupNorm(2, 8)) is None


def test_head_and_training_options():
    model = small("resnet50_gc_r16", drop_path_rate=0.1, drop_block_rate=0.1)
    drops = [b.drop_path.drop_prob if b.drop_path is not None else 0.0 for b in model.modules() if isinstance(b, Bottleneck)]
    assert drops == pytest.approx([0.0, 0.1 / 4, 0.2 / 4, 0.3 / 4, 0.1])  # linear in block index (timm's rule)
    assert [b.drop_block is not None for b in model.modules() if isinstance(b, Bottleneck)] == [False, False, True, True, True]
    x = image()
    model.eval()
    assert model.get_classifier() is model.fc
    model.reset_classifier(0)
    assert model(x).shape == (2, 2048) and model.head_hidden_size == 2048
    model.reset_classifier(5, "")
    assert model.forward_head(model.forward_features(x), pre_logits=True).dim() == 4
    model.reset_classifier(7, "avg")
    assert model(x).shape == (2, 7)
    groups = timm.optim.create_optimizer_v2(model, "sgd", lr=1.0, layer_decay=0.5).param_groups
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == 1 + 5 + 1  # stem, each bottleneck, head
