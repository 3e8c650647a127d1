"""Issue 3's end to end: a name becomes verified weights in a model, through every entry point.

A loopback hub holds a checkpoint in the layout of ``timm/resnet50.tv_in1k`` (a torchvision
ResNet-50 state dict in safetensors, random but fixed weights); the zoo's real manifest entry
for ``resnet50_gc_r16.tv_in1k`` points at it through HF_ENDPOINT.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from loopback import FileServer
from safetensors.torch import save_file

import gczoo
from gczoo.convert import StateDictMismatchError
from gczoo.gcify import gcify
from gczoo.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _publish(hub_server, repo_id, state_dict):
    path = Path(hub_server.root) / repo_id / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def test_create_model_pretrained_equals_torchvision_online_then_offline(hub_server, torchvision_resnet50, image, tmp_path):
    _publish(hub_server, "timm/resnet50.tv_in1k", torchvision_resnet50.state_dict())
    with torch.no_grad():
        expected = torchvision_resnet50(image)
        model = gczoo.create_model("resnet50_gc_r16.tv_in1k", pretrained=True).eval()
        assert sum(isinstance(m, gczoo.ContextBlock) for m in model.modules()) == 13
        torch.testing.assert_close(model(image), expected, rtol=0, atol=0)
        # The same path from timm and torch.hub; the second and third loads come from the cache.
        via_timm = timm.create_model("resnet50_gc_r16", pretrained=True).eval()
        via_hub = torch.hub.load(str(ROOT), "resnet50_gc_r16", source="local", pretrained=True).eval()
        torch.testing.assert_close(via_timm(image), expected, rtol=0, atol=0)
        torch.testing.assert_close(via_hub(image), expected, rtol=0, atol=0)
        # num_classes other than the checkpoint's: the backbone loads, the new head does not.
        head10 = gczoo.create_model("resnet50_gc_r16.tv_in1k", pretrained=True, num_classes=10)
        assert head10.fc.out_features == 10
        torch.testing.assert_close(head10.layer4[2].conv3.weight, torchvision_resnet50.layer4[2].conv3.weight, rtol=0, atol=0)
    gets = [r for r in hub_server.requests if r.method == "GET"]
    assert len(gets) == 1, "the file is downloaded once, then served from the cache"

    # Server gone, HF_HUB_OFFLINE=1 from the start of a new process: the cache alone serves.
    # In the same process (one interpreter start for both), weights that are not in the cache:
    # the user's uncaught error names the model and says how to prefetch it.
    hub_server.stop()
    torch.save({"image": image, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, gczoo
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        model = gczoo.create_model("resnet50_gc_r16.tv_in1k", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(io["image"]), io["expected"], rtol=0, atol=0)
        print("offline ok", flush=True)
        gczoo.create_model("resnet101_gc_r16.tv2_in1k", pretrained=True)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert "offline ok" in out.stdout, out.stderr
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()
    assert "resnet101_gc_r16" in out.stderr and "gczoo download" in out.stderr
    assert any("WeightsUnavailableError" in line for line in last)


def test_wrong_checkpoint_is_refused_with_its_keys(hub_server):
    # A ResNet-18 published under the ResNet-50 repo: strict loading names what does not fit.
    _publish(hub_server, "timm/resnet50.tv_in1k", torchvision.models.resnet18().state_dict())
    with pytest.raises(StateDictMismatchError) as err:
        gczoo.create_model("resnet50_gc_r16.tv_in1k", pretrained=True)
    message = str(err.value)
    assert "resnet50_gc_r16.tv_in1k" in message and "missing keys: " in message and "layer1.0.conv3.weight" in message
    assert "shape mismatches: " in message and isinstance(err.value, WeightsError)


def test_mirror_with_a_different_file_fails_integrity(weights_env, file_server, monkeypatch):
    """GCZOO_MIRROR serves a file under the original name whose hash does not carry the name's prefix."""
    target = Path(file_server.root) / "models" / "resnet50-0676ba61.pth"
    target.parent.mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), target)
    monkeypatch.setenv("GCZOO_MIRROR", file_server.url)
    monkeypatch.setenv("HF_ENDPOINT", file_server.url)  # the hub source is unreachable there (404)
    with pytest.raises(WeightsError) as err:
        gczoo.create_model("resnet50_gc_r16.tv_in1k", pretrained=True)
    assert "0676ba61" in str(err.value)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    left = [p.name for p in cache.rglob("resnet50-0676ba61*") if ".locks" not in p.parts]
    assert not left, f"nothing may stay in the cache after an integrity failure: {left}"


def test_local_file_and_gcify(weights_env, torchvision_resnet50, image, tmp_path):
    """A local torchvision .pth (read with weights_only) and a gcified torchvision model agree."""
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_resnet50.state_dict(), path)
    model = gczoo.create_model("resnet50_gc_r16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    gcified = gcify(torchvision.models.resnet50()).eval()
    gcified.load_state_dict(model.state_dict())  # one layout: layerN.i.context_block
    with torch.no_grad():
        expected = torchvision_resnet50(image)
        torch.testing.assert_close(model(image), expected, rtol=0, atol=0)
        torch.testing.assert_close(gcified(image), expected, rtol=0, atol=0)
        # Once the GC blocks are trained, both still compute the same function.
        for net in (model, gcified):
            torch.manual_seed(3)
            for m in net.modules():
                if isinstance(m, gczoo.ContextBlock):
                    torch.nn.init.normal_(m.channel_add_conv[-1].weight, std=0.05)
        changed = model(image)
        assert (changed - expected).abs().max() > 1e-3
        torch.testing.assert_close(gcified(image), changed, rtol=1e-4, atol=1e-4)


def test_timm_family_weights_go_through_the_zoo(hub_server, image):
    """timm's own GC models listed in the zoo: fetched and verified by gczoo, built by timm."""
    torch.manual_seed(0)
    source = timm.create_model("gcresnext26ts").eval()
    _publish(hub_server, "timm/gcresnext26ts.ch_in1k", source.state_dict())
    model = gczoo.create_model("gcresnext26ts", pretrained=True).eval()
    assert model.pretrained_cfg["tag"] == "ch_in1k" and model.pretrained_cfg["file"].endswith(".safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(image), source(image), rtol=0, atol=0)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch gczoo-pwned",))


def test_local_files_are_read_safely(weights_env, tmp_path, monkeypatch):
    """A local pickle is read with weights_only=True: code in it never runs, the error says why."""
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _RunsCode()}}, evil)
    with pytest.raises(WeightsError, match="refused to load evil.pth"):
        gczoo.create_model("resnet50_gc_r16", pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert not (tmp_path / "gczoo-pwned").exists() and evil.exists()  # a user's file is never deleted
    with pytest.raises(WeightsError, match="no checkpoint file at"):
        gczoo.create_model("resnet50_gc_r16", pretrained=True, pretrained_cfg_overlay=dict(file="nope.pth"))


def test_cli_download_and_pin(hub_server, file_server, torchvision_resnet50, tmp_path, capsys):
    """`gczoo pin` writing real digests (`gczoo download --to`: tests/test_eval_coco.py)."""
    import hashlib
    import json

    from gczoo.cli import main
    from gczoo.manifest import load_manifest

    hub_file = _publish(hub_server, "timm/resnet50.tv_in1k", torchvision_resnet50.state_dict())

    # pin: a manifest whose URL source is served by the loopback file server under a torch.hub name.
    pth = tmp_path / "resnet50.pth"
    torch.save(torchvision_resnet50.state_dict(), pth)
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    served = Path(file_server.root) / f"resnet50-{digest[:8]}.pth"
    pth.rename(served)
    manifest = json.loads((ROOT / "weights_manifest.json").read_text())
    entry = manifest["models"]["resnet50_gc_r16"]["weights"]["tv_in1k"]
    entry["sources"][1].update(url=f"{file_server.url}/{served.name}", sha256_prefix=digest[:8], sha256=None)
    entry["sources"][1].pop("size", None)  # torchvision's size; the served stand-in is another file
    entry["sources"][0]["sha256"] = None
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    hub_digest = hashlib.sha256(hub_file.read_bytes()).hexdigest()

    def pinned():
        return [s["sha256"] for s in load_manifest(path)["models"]["resnet50_gc_r16"]["weights"]["tv_in1k"]["sources"]]

    # one download proves nothing beyond the prefix it was checked against: nothing is recorded
    assert main(["pin", "resnet50_gc_r16.tv_in1k", "--manifest", str(path)]) == 1
    assert "not recorded" in capsys.readouterr().err and pinned() == [None, None]
    # the maintainer confirms the hub file; a second, independent host serves the identical .pth
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / served.name).write_bytes(served.read_bytes())
    with FileServer(tmp_path / "second") as second:
        assert main(["pin", "resnet50_gc_r16.tv_in1k", "--manifest", str(path), "--confirm", hub_digest,
                     "--also-from", second.url]) == 0
    assert pinned() == [hub_digest, digest]
    assert main(["pin", "resnet50_gc_r16.in22k", "--manifest", str(path)]) == 2


def test_demo_downloads_and_verifies(hub_server, torchvision_resnet50, capsys):
    """The README's first command, `gczoo demo`, with the default weights on a (loopback) hub."""
    from gczoo.cli import main

    _publish(hub_server, "timm/resnet50.tv_in1k", torchvision_resnet50.state_dict())
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "PASS: resnet50_gc_r16 vs torchvision resnet50 loaded from the same file: max |logit difference| = 0.00e+00" in out
