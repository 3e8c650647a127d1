"""The zoo's core: architectures against the paper, timm/torch.hub/CLI integration, manifest errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import gczoo
from gczoo.blocks import NonLocalBlock, SimplifiedNonLocalBlock
from gczoo.manifest import ManifestError, load_manifest, validate

ROOT = Path(__file__).resolve().parents[1]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return gczoo.create_model(name, **kwargs)


@pytest.mark.parametrize("name", [n for n, m in load_manifest()["models"].items()
                                  if "published_size" in m and m["family"] in ("gc_resnet", "timm")])
def test_parameter_counts_equal_published(name):
    """Every architecture with a published size has it to 0.01M (the paper's table, timm's table)."""
    published = load_manifest()["models"][name]["published_size"]["params_m"]
    assert abs(_params(_meta_model(name)) / 1e6 - published) < 0.01


def test_plain_resnet50_and_options_change_size_as_the_paper_says():
    # Without GC blocks the model is the paper's baseline ResNet-50 (25.56M) ...
    assert abs(_params(_meta_model("resnet50_gc_r16", gc_stages=[])) / 1e6 - 25.56) < 0.01
    assert _params(_meta_model("resnet50_gc_r16", gc_stages=None)) == _params(_meta_model("resnet50_gc_r16", gc_stages=[]))
    # ... and torchvision's ResNet-50 key for key.
    import torchvision

    ours = gczoo.create_model("resnet50_gc_r16", gc_stages=[]).state_dict()
    ref = torchvision.models.resnet50().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    # Each GC block r16 on C channels adds 2*C*C/16 + C/16 (+LN) + C + 1 (mask) parameters.
    base = _params(_meta_model("resnet50_gc_r16"))
    both = _params(_meta_model("resnet50_gc_r16", gc_fusion="add+mul"))
    avg = _params(_meta_model("resnet50_gc_r16", gc_pooling="avg"))
    blocks = {512: 4, 1024: 6, 2048: 3}
    transform = sum(n * (2 * c * (c // 16) + c // 16 + 2 * (c // 16) + c) for c, n in blocks.items())
    mask = sum(n * (c + 1) for c, n in blocks.items())
    assert both - base == transform
    assert base - avg == mask
    c2 = _params(_meta_model("resnet50_gc_r16", gc_stages="c2-c5")) - base
    assert c2 == 3 * (2 * 256 * 16 + 16 + 32 + 256 + 256 + 1)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(gc_pooling="max"), "gc_pooling"),
    (dict(gc_fusion="concat"), "gc_fusion"),
    (dict(gc_stages=[1]), "c2..c5"),
    (dict(gc_ratio=1 / 4096), "gc_ratio"),
])
def test_bad_ablation_arguments_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        gczoo.create_model("resnet50_gc_r16", **kwargs)


def test_new_gc_resnet_is_exactly_its_resnet():
    """Every inserted block starts as the identity: outputs equal those with the blocks removed.
    Built at layers (1, 1, 2, 1), where every kind of block still sits where the rows put it (GC in
    c3-c5, the c4 ablation blocks before c4's last block); the property is per block, not per depth."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    layers = [1, 1, 2, 1]
    plain = gczoo.create_model("resnet50_gc_r16", gc_stages=[], layers=layers).eval()
    for name in ("resnet50_gc_r16", "resnet50_nl_c4", "resnet50_snl_c4", "resnet50_gc_r16_c4"):
        model = gczoo.create_model(name, layers=layers).eval()
        assert any(isinstance(m, (gczoo.ContextBlock, NonLocalBlock, SimplifiedNonLocalBlock)) for m in model.modules())
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        assert not missing and unexpected  # only the inserted blocks are extra
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_timm_integration():
    assert set(timm.list_models("*_gc_*")) >= {"resnet50_gc_r16", "resnext101_32x4d_gc_r4", "resnet152_gc_r16"}
    assert "resnet50_gc_r16.tv2_in1k" in timm.list_models(pretrained=True)
    # timm's own GC models are still timm's
    for name, model in load_manifest()["models"].items():
        if model["family"] == "timm":
            assert timm.models.is_model_in_modules(name, ["byobnet", "efficientnet"])
    model = timm.create_model("resnet50_gc_r16", num_classes=10).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("resnet50_gc_r16.tv2_in1k"), use_test_size=True)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.965 and cfg["interpolation"] == "bilinear"
    features = timm.create_model("resnext101_32x4d_gc_r16", features_only=True)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [256, 512, 1024, 2048]
    maps = features(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    assert [m.shape[1] for m in maps] == [256, 512, 1024, 2048]


def test_channels_last_and_autocast():
    torch.manual_seed(0)
    model = gczoo.create_model("resnet50_gc_r16", gc_fusion="add+mul").eval()
    for block in model.modules():  # non-identity GC blocks, so they matter
        if isinstance(block, gczoo.ContextBlock):
            for seq in (block.channel_add_conv, block.channel_mul_conv):
                torch.nn.init.normal_(seq[-1].weight, std=0.05)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.99


def test_unknown_names_list_close_matches():
    with pytest.raises(ValueError, match="resnet50_gc_r16"):
        gczoo.create_model("resnet50_gc_r61")
    with pytest.raises(ValueError, match="tv_in1k, tv2_in1k"):
        gczoo.create_model("resnet50_gc_r16.in22k")
    with pytest.raises(ValueError, match="no pretrained weights"):
        gczoo.create_model("resnet50_nl_c4", pretrained=True)  # no weights (resnext101_32x4d_gc_r4 has COCO backbone tags now)


def test_model_info():
    info = gczoo.model_info("resnet50_gc_r16")
    assert info["params"] == _params(gczoo.create_model("resnet50_gc_r16"))
    # torch.utils.flop_counter at 224 px: ResNet-50 v1.5 body + 13 GC blocks, two FLOPs per multiply-add
    assert 8.0 < info["gflops"] < 8.4 and info["gmacs"] == pytest.approx(info["gflops"] / 2)
    assert info["weights"]["tv_in1k"]["metrics"][0]["source"]
    assert "cao2019gcnet" in info["citation"]


def test_torch_hub(tmp_path, monkeypatch):
    model = torch.hub.load(str(ROOT), "resnet50_gc_r16", source="local", num_classes=7, gc_ratio=0.25)
    assert model.fc.out_features == 7 and model.layer2[0].context_block.channel_add_conv[0].out_channels == 128
    # torch.hub.list/help read a GitHub repo from torch.hub's cache: put this checkout there.
    hub_dir = tmp_path / "hub"
    shutil.copytree(ROOT, hub_dir / "org_gczoo_main", symlinks=False,
                    ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "tests"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub's dir is $TORCH_HOME/hub
    names = torch.hub.list("org/gczoo:main", trust_repo=True, skip_validation=True, verbose=False)
    doc = torch.hub.help("org/gczoo:main", "resnet50_gc_r16", trust_repo=True, skip_validation=True)
    assert names == gczoo.list_models()
    assert "tv_in1k (default)" in doc and "76.13" in doc


def test_cli_and_readme_table(capsys, monkeypatch):
    from gczoo.cli import main

    def run(*args):
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    assert run("list", "*_c4") == (0, "resnet50_gc_r16_c4\nresnet50_nl_c4\nresnet50_snl_c4\n", "")
    assert run("list", "--pretrained", "resnet50_gc_r16")[1].split() == [
        "resnet50_gc_r16.mmdet_coco_maskrcnn", "resnet50_gc_r16.mmdet_coco_maskrcnn_syncbn",
        "resnet50_gc_r16.tv2_in1k", "resnet50_gc_r16.tv_in1k"]
    code, out, _ = run("info", "resnet50_nl_c4", "--measure")
    assert code == 0 and "parameters: 27.66M (measured); published 27.66M" in out
    monkeypatch.chdir(ROOT)
    assert run("table", "--check", "README.md")[0] == 0
    # The console entry point, as a user runs it: a bad name is a message and exit code 2.
    out = subprocess.run([sys.executable, "-m", "gczoo.cli", "info", "resnet50_gc_r61"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Did you mean: resnet50_gc_r16" in out.stderr and "Traceback" not in out.stderr


def _valid():
    return json.loads((ROOT / "weights_manifest.json").read_text())


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["models"]["resnet50_gc_r16"].update(arch=[3]),
     "models.resnet50_gc_r16.arch: expected object"),
    (lambda m: m["models"]["resnet50_gc_r16"].pop("family"), "models.resnet50_gc_r16.family: required field is missing"),
    (lambda m: m["models"]["resnet50_gc_r16"].update(default_tag="in22k"), "models.resnet50_gc_r16.default_tag: 'in22k'"),
    (lambda m: m["models"]["resnet50_gc_r16"]["weights"]["tv_in1k"]["sources"][0].update(sha256="abc"),
     "models.resnet50_gc_r16.weights.tv_in1k.sources.0.sha256: 'abc' does not match"),
    (lambda m: m["models"]["resnet50_gc_r16"]["weights"]["tv_in1k"]["metrics"][0].update(top1="76.1"),
     "models.resnet50_gc_r16.weights.tv_in1k.metrics.0.top1: expected number"),
    (lambda m: m["models"]["resnet50_gc_r16"]["weights"]["tv_in1k"].update(converter="magic"),
     "models.resnet50_gc_r16.weights.tv_in1k.converter: \"magic\" is not one of"),
    (lambda m: m["models"].update({"Bad-Name": m["models"]["resnet50_gc_r16"]}), "models.Bad-Name: 'Bad-Name' does not match"),
])
def test_malformed_manifest_names_entry_and_field(edit, expected):
    manifest = _valid()
    edit(manifest)
    with pytest.raises(ManifestError) as err:
        validate(manifest, "weights_manifest.json")
    assert expected in str(err.value)


def test_manifest_file_errors(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('{"models": {')
    with pytest.raises(ManifestError, match="not valid JSON: .* line 1"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        load_manifest(tmp_path / "missing.json")


def test_ci_runs_the_readme_test_command():
    """The README opens with the two set-up commands; .ci/run runs the second one verbatim."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and block[0].endswith("gczoo demo")
    assert block[1] in (ROOT / ".ci" / "run").read_text().splitlines()
