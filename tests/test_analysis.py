"""gczoo.analysis: known answers, the fast all-pairs distances against a direct pairwise
computation, every model family of the zoo, and `gczoo analyze` end to end."""
import json
import math
import sys

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import GlobalContext
from torch import nn

import gczoo
from gczoo.analysis import block_inputs, mean_cosine_distance, query_independence
from gczoo.blocks import ContextBlock, NonLocalBlock, SimplifiedNonLocalBlock
from gczoo.cli import main


def _direct(vectors):
    """Mean 1 - cos over ordered pairs i != j, from the full N x N cosine matrix."""
    u = torch.nn.functional.normalize(vectors.detach().double(), dim=1)
    cos = u @ u.t()
    n = u.shape[0]
    return float((1 - cos).sum() / (n * (n - 1)))


def _activate(model):
    """Random nonzero parameters everywhere, so that no block is the identity (eval-mode BN stats kept)."""
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model


def _user_model(dims):
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return _activate(nn.Sequential(conv(3, 16, 3, padding=1), nn.ReLU(), NonLocalBlock(16),
                                   ContextBlock(16, ratio=1 / 4, fusion="add+mul"), SimplifiedNonLocalBlock(16)))


@pytest.mark.parametrize("dims", [2, 3])
def test_fast_distances_equal_the_direct_pairwise_computation(dims):
    model = _user_model(dims)
    images = torch.rand(2, 3, 6, 5) if dims == 2 else torch.rand(2, 3, 2, 4, 3)
    results = query_independence(model, images, per_image=True)
    assert [(r.name, r.kind) for r in results] == [("2", "nl"), ("3", "gc"), ("4", "snl")]
    for i, image in enumerate(images):
        captured, _ = block_inputs(model, image)
        for r in results:
            block, x = captured[r.name]
            positions = x.flatten(2)[0].t()
            with torch.no_grad():
                out = block.eval()(x)
            expected = {"input": _direct(positions), "output": _direct(out.flatten(2)[0].t() - positions)}
            if r.kind == "nl":
                q = block.theta(x.flatten(3)).flatten(2)[0].t()
                k = block.phi(x.flatten(3)).flatten(2)[0]
                expected["attention"] = _direct(torch.softmax(q @ k, dim=-1))
            else:
                expected["attention"] = 0.0
                assert "by construction" in r.attention_note
            for key, value in expected.items():
                assert r.per_image[i][key] == pytest.approx(value, abs=1e-6), (r.name, key)
            assert r.positions == positions.shape[0] == (30 if dims == 2 else 24)
    for r in results:
        for key in ("input", "attention", "output"):
            assert getattr(r, key) == pytest.approx(sum(p[key] for p in r.per_image) / 2)
    nl, gc, snl = results
    assert nl.attention > 0.01 and nl.output > 0.01
    assert gc.output > 0.01  # "add+mul": x * scale varies over positions
    assert snl.output < 1e-12  # one vector added to every position


def test_known_answers():
    torch.manual_seed(0)
    x = torch.rand(1, 16, 7, 9)
    # zero query projection: every query sees the same map, distance 0 (to float64 rounding)
    nl = _activate(NonLocalBlock(16))
    nn.init.zeros_(nl.theta.weight)
    r = query_independence(nl, x)[0]
    assert r.attention < 1e-20 and r.input > 0.05
    # attention one-hot on the query's own position: maps of distinct queries are orthogonal, distance ~1
    n = 7 * 9
    features = torch.zeros(1, 128, 7, 9)
    features[0, :n] = torch.eye(n).reshape(n, 7, 9)
    nl = NonLocalBlock(128)
    with torch.no_grad():
        for conv in (nl.theta, nl.phi):
            conv.weight.copy_(10 * torch.eye(64, 128).reshape(64, 128, 1, 1))
            conv.bias.zero_()
    r = query_independence(nl, features)[0]
    assert r.attention > 0.999 and r.input == pytest.approx(1.0)
    # identical vectors: distance 0; zero vectors have no direction (left out, NaN when nothing is left)
    assert mean_cosine_distance(torch.ones(5, 3) * torch.tensor([[1.0, 2.0, 3.0]])) < 1e-20
    assert math.isnan(mean_cosine_distance(torch.zeros(4, 3)))
    assert mean_cosine_distance(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])) == pytest.approx(1.0)
    # a block run on two windows of each image (sliding-window inference): the mean over its calls
    class TwoWindows(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = _activate(NonLocalBlock(16))

        def forward(self, x):
            return [self.block(x[..., :4]), self.block(x[..., 4:])]

    model = TwoWindows()
    r = query_independence(model, x)[0]
    windows = [query_independence(model.block, x[..., :4])[0], query_independence(model.block, x[..., 4:])[0]]
    for key in ("input", "attention", "output"):
        assert getattr(r, key) == pytest.approx(sum(getattr(w, key) for w in windows) / 2)
    with pytest.raises(ValueError, match="nothing to analyse"):
        query_independence(nn.Conv2d(3, 3, 1), torch.rand(1, 3, 4, 4))


def test_every_model_family():
    torch.manual_seed(0)
    image = torch.rand(3, 64, 64)
    # classifier with the eval-mode GC fold: blocks found through bn3; zero-initialised transforms add nothing
    gc = gczoo.create_model("resnet50_gc_r16").eval()
    results = query_independence(gc, image[None])
    assert len(results) == 13 and all(r.kind == "gc" and 0 < r.input < 1 for r in results)
    assert all(math.isnan(r.output) for r in results)
    assert gc.training is False
    for name, kind in (("resnet50_nl_c4", "nl"), ("resnet50_snl_c4", "snl")):
        model = gczoo.create_model(name).train()
        (r,) = query_independence(model, image[None])
        assert r.kind == kind and r.name == "layer3.5.pre_block" and model.training
    # timm's own GC models (timm's GlobalContext layer, "add" fusion: one vector added to every position)
    timm_gc = gczoo.create_model("gcresnext26ts")
    for m in timm_gc.modules():
        if isinstance(m, GlobalContext):
            nn.init.normal_(m.mlp_add.fc2.weight, std=0.1)  # zero-initialised: make the layer add something
    results = query_independence(timm_gc, image[None])
    assert len(results) == 8 and all(r.kind == "gc" and r.attention == 0 and r.output < 1e-20 for r in results)
    # detection backbone (Mask R-CNN's GC-ResNet + FPN), one bottleneck per stage: a GC block in each of c3-c5
    detector = gczoo.create_model("maskrcnn_resnet50_fpn_gc_r16", layers=(1, 1, 1, 1))
    results = query_independence(detector.backbone, image[None])
    assert [r.name for r in results] == [f"body.layer{i}.0.context_block" for i in (2, 3, 4)]
    assert all(r.kind == "gc" for r in results)
    # video: 5 NL blocks on T*H*W positions
    video = gczoo.create_model("slowonly_resnet50_nl5")
    results = query_independence(video, torch.rand(1, 3, 2, 32, 32))
    assert [r.positions for r in results] == [2 * 4 * 4] * 2 + [2 * 2 * 2] * 3
    assert all(r.kind == "nl" and 0 <= r.attention <= 2 for r in results)
    # segmentation heads (one bottleneck per stage): the NL head (scaled logits) in sliding-window mode,
    # where the block runs once per window (2 x 2 windows here), and the GC head in whole-image mode
    for name, kind in (("nonlocal_resnet50_d8.mmseg_cityscapes_769x769_40k", "nl"),
                       ("gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k", "gc")):
        kwargs = dict(crop_size=(40, 40), stride=(24, 24)) if kind == "nl" else {}
        segmenter = gczoo.create_model(name, layers=(1, 1, 1, 1), **kwargs).eval()
        (r,) = query_independence(segmenter, image[None])
        assert r.kind == kind and r.name.startswith("classifier.") and 0 < r.input < 2
        assert (0 <= r.attention <= 2) if kind == "nl" else r.attention == 0


def test_cli_writes_table_and_figure(tmp_path, capsys, monkeypatch, torchvision_resnet50):
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    picture = tmp_path / "gradient.png"
    Image.fromarray(torch.stack([x, y, x * y], -1).mul(255).byte().numpy()).save(picture)
    torch.manual_seed(0)
    model = gczoo.create_model("resnet50_nl_c4")
    nn.init.ones_(model.layer3[5].pre_block.out_bn.weight)  # the NL block adds something
    checkpoint = tmp_path / "nl.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint)

    out = tmp_path / "out"
    assert main(["analyze", "resnet50_nl_c4", str(picture), str(picture), "--out", str(out),
                 "--checkpoint", str(checkpoint)]) == 0
    report = json.loads((out / "query_independence.json").read_text())
    (block,) = report["blocks"]
    assert block["name"] == "layer3.5.pre_block" and block["positions"] == 14 * 14
    # the same numbers as the API on the same preprocessed input (the model's own eval transform)
    from timm.data import create_transform, resolve_data_config
    batch = create_transform(**resolve_data_config({}, model=model))(Image.open(picture).convert("RGB"))[None]
    (r,) = query_independence(model, batch)
    assert [block[k] for k in ("input", "attention", "output")] == pytest.approx([r.input, r.attention, r.output])
    assert len(block["per_image"]) == 2
    table = (out / "query_independence.md").read_text()
    assert "| input | attention map | output |" in table and f"{r.attention:.3f}" in table
    assert "nl.safetensors" in table
    assert (out / "attention_maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a checkpoint of another model, a missing image, and no matplotlib: clear errors, exit code 2
    assert main(["analyze", "resnet50_snl_c4", str(picture), "--out", str(out), "--checkpoint", str(checkpoint)]) == 2
    assert "does not fit resnet50_snl_c4" in capsys.readouterr().err
    assert main(["analyze", "resnet50_nl_c4", str(tmp_path / "nope.jpg"), "--out", str(out)]) == 2
    assert "no image file" in capsys.readouterr().err
    # a checkpoint in the upstream layout of the model's weights tag goes through the tag's converter
    from gczoo.analysis import _load_model
    resnet = torchvision_resnet50.state_dict()
    save_file(resnet, tmp_path / "tv.safetensors")
    loaded, note = _load_model("resnet50_gc_r16", tmp_path / "tv.safetensors")
    assert "converted as resnet50_gc_r16.tv_in1k" in note
    assert torch.equal(loaded.state_dict()["layer4.2.conv3.weight"], resnet["layer4.2.conv3.weight"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["analyze", "resnet50_nl_c4", str(picture), "--out", str(out)]) == 2
    assert "pip install 'gczoo[analysis]'" in capsys.readouterr().err
