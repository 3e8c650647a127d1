"""Kinetics slow-only models: the paper's parameter counts, training on a small clip, and the
zoo's blocks on 5-D features (the same numbers as on a 4-D map of the same positions)."""
import pytest
import torch

import gczoo
from gczoo.blocks import ContextBlock, NonLocalBlock, SimplifiedNonLocalBlock, SqueezeExcitation
from gczoo.manifest import load_manifest
from gczoo.models.video import SlowOnlyResNet

NAMES = ["slowonly_resnet50", "slowonly_resnet50_nl5", "slowonly_resnet50_snl5", "slowonly_resnet50_gc5",
         "slowonly_resnet50_gc_all"]


def _kinds(model):
    return sorted(type(m).__name__ for m in model.modules() if isinstance(m, (ContextBlock, NonLocalBlock,
                                                                                SimplifiedNonLocalBlock)))


def test_the_five_kinetics_rows_have_the_papers_parameter_counts():
    assert gczoo.list_models("slowonly_*") == sorted(NAMES)
    models = load_manifest()["models"]
    for name in NAMES:
        with torch.device("meta"):
            model = gczoo.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        published = models[name]["published_size"]["params_m"]
        assert abs(params / 1e6 - published) < 0.01, (name, params, published)
        assert models[name]["published"][0]["task"] == "kinetics-400"
    # the GC rows close only with ratio 1/4: r16 falls 1.4M / 7.5M short, GC in c2-c5 overshoots by 0.1M
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in gczoo.create_model(name, **kw).parameters()) / 1e6
                 for name, kw in (("slowonly_resnet50_gc5", dict(gc_ratio=1 / 16)),
                                  ("slowonly_resnet50_gc_all", dict(gc_ratio=1 / 16)),
                                  ("slowonly_resnet50_gc_all", dict(gc_stages="c2-c5")))]
    assert [round(v, 2) for v in sizes] == [32.92, 34.98, 42.56]
    # where the blocks are: NL-Net's five (res3: 2nd and 4th block, res4: 2nd, 4th, 6th), GC-all in c3-c5
    with torch.device("meta"):
        nl5 = gczoo.create_model("slowonly_resnet50_nl5")
        gc_all = gczoo.create_model("slowonly_resnet50_gc_all")
    assert [n for n, m in nl5.named_modules() if isinstance(m, NonLocalBlock)] == [
        "layer2.1.post_block", "layer2.3.post_block",
        "layer3.1.post_block", "layer3.3.post_block", "layer3.5.post_block"]
    assert _kinds(gc_all) == ["ContextBlock"] * 13 and all(m.ratio == 0.25 for m in gc_all.modules()
                                                          if isinstance(m, ContextBlock))
    with pytest.raises(gczoo.registry.UnknownModelError, match="no pretrained weights"):
        gczoo.create_model("slowonly_resnet50_gc5", pretrained=True)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_on_a_small_clip(name):
    torch.manual_seed(0)
    model = gczoo.create_model(name, num_classes=5).train()
    for m in model.modules():  # blocks start as the identity; make them act so that gradients reach all of them
        if isinstance(m, (ContextBlock, SimplifiedNonLocalBlock)):
            last = m.channel_add_conv[-1] if isinstance(m, ContextBlock) else m.transform
            torch.nn.init.normal_(last.weight, std=0.01)
        elif isinstance(m, NonLocalBlock):
            torch.nn.init.ones_(m.out_bn.weight)
    clip = torch.randn(2, 3, 2, 32, 32)
    logits = model(clip)
    assert logits.shape == (2, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    # every parameter learns, except W_k's bias: the softmax over positions ignores a constant (zero gradient)
    frozen = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert [n for n in frozen if not n.endswith("conv_mask.bias")] == []
    with pytest.raises(ValueError, match=r"clips \(B, 3, T, H, W\)"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("block", [
    lambda: ContextBlock(16, ratio=1 / 4), lambda: ContextBlock(16, ratio=1 / 4, pooling="avg", fusion="add+mul"),
    lambda: SimplifiedNonLocalBlock(16), lambda: NonLocalBlock(16), lambda: SqueezeExcitation(16, 1 / 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_blocks_on_video_features_pool_over_all_frames(block, layout):
    """A block on (B, C, T, H, W) equals the block on the (B, C, T*H, W) map of the same positions
    (1x1 convs, BN and pooling see the same set), in both memory layouts, forward and backward."""
    torch.manual_seed(0)
    module = block()
    for p in module.parameters():  # nonzero everywhere, so no branch of the block is the identity
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 3, 5, 4)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    out = module(x)
    x2 = x.detach().reshape(2, 16, 15, 4).requires_grad_(True)
    ref = module(x2)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref.reshape(x.shape), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.reshape(ref.shape))
    torch.testing.assert_close(x.grad, x2.grad.reshape(x.shape), rtol=1e-5, atol=1e-5)
