"""Issue 16 end to end: `gczoo publish` writes hub repos, `hf-hub:` names load them, backbone tags.

Upstream files are served by loopback servers (tests/loopback.py): a torchvision-layout
ResNet-50 on the hub for ``resnet50_gc_r16.tv_in1k``, a synthetic mmdetection-layout GC Mask
R-CNN (tests/mmdet_layout.py) on a file server for the COCO tags. Published folders are then
served as hub repos and loaded by name, and compared with the upstream file loaded directly.
"""
import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

import gczoo
from gczoo import manifest as manifest_module
from gczoo.cli import main
from gczoo.gcify import gcify
from gczoo.manifest import dump_manifest, load_manifest, metric_numbers
from gczoo.publish import hosted_source, publish
from gczoo.registry import UnknownModelError
from mmdet_layout import mmdet_maskrcnn_state_dict, write_checkpoint

CLS, CLS_TAG = "resnet50_gc_r16", "tv_in1k"
DET, DET_TAG = "maskrcnn_resnet50_fpn_gc_r16", "mmdet_syncbn_1x_coco"
BB_TAG = "mmdet_coco_maskrcnn_syncbn"
FILES = ("model.safetensors", "config.json", "README.md")


@pytest.fixture
def manifest_copy(tmp_path, monkeypatch):
    """A writable copy of the manifest that the zoo reads instead of the packaged one."""
    data = copy.deepcopy(load_manifest())
    path = tmp_path / "manifest.json"

    def write(edit=None):
        if edit:
            edit(data)
        dump_manifest(data, path)
        return path

    monkeypatch.setattr(manifest_module, "MANIFEST_PATH", path)
    write()
    yield write
    manifest_module._load_cached.cache_clear()


def _serve_repo(hub_server, folder: Path, repo_id: str) -> None:
    shutil.copytree(folder, Path(hub_server.root) / repo_id)


def _files(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in FILES}


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_classifier_repo_loads_through_timm_and_gczoo_and_is_deterministic(hub, torchvision_resnet50, image, tmp_path, manifest_copy):
    upstream = Path(hub.root) / "timm/resnet50.tv_in1k/model.safetensors"
    upstream.parent.mkdir(parents=True)
    save_file(torchvision_resnet50.state_dict(), str(upstream))

    first = publish(f"{CLS}.{CLS_TAG}", tmp_path / "a", progress=False)
    second = publish(f"{CLS}.{CLS_TAG}", tmp_path / "b", progress=False)
    assert first.name == f"{CLS}.{CLS_TAG}" and _files(first) == _files(second)

    with safe_open(first / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["gczoo_upstream"] == "https://huggingface.co/timm/resnet50.tv_in1k/resolve/main/model.safetensors"
    assert meta["gczoo_upstream_sha256"] == hashlib.sha256(upstream.read_bytes()).hexdigest()
    assert (meta["gczoo_converted_by"], meta["gczoo_converter"], meta["gczoo_version"]) == (
        "torchvision_resnet", "identity", gczoo.__version__)
    config = json.loads((first / "config.json").read_text())
    assert config["architecture"] == CLS and config["num_classes"] == 1000 and config["num_features"] == 2048
    assert config["pretrained_cfg"]["tag"] == CLS_TAG

    # The card: hub YAML that huggingface_hub parses, every published metric with its source.
    card = ModelCard.load(first / "README.md")
    assert card.data.license == "bsd-3-clause" and card.data.library_name == "timm"
    assert card.data.pipeline_tag == "image-classification" and "imagenet-1k" in card.data.datasets
    entry = load_manifest()["models"][CLS]["weights"][CLS_TAG]
    published = sorted((m["source"], k, v) for m in entry["metrics"] for k, v in metric_numbers(m).items())
    indexed = sorted((r.source_name, r.metric_type, r.metric_value) for r in card.data.eval_results)
    assert indexed == published and all(r.dataset_type == "imagenet-1k" for r in card.data.eval_results)
    assert f"hf upload gczoo/{CLS}.{CLS_TAG} {CLS}.{CLS_TAG} ." in card.text
    assert "`OWNER/REPO`: the GitHub repository that hosts gczoo" in card.text  # no placeholder left unexplained
    assert f'torch.hub.load("OWNER/REPO", "{CLS}", pretrained=True, tag="{CLS_TAG}", trust_repo=True)' in card.text

    _serve_repo(hub, first, f"gczoo/{CLS}.{CLS_TAG}")
    with torch.no_grad():
        expected = torchvision_resnet50(image)
        via_timm = timm.create_model(f"hf-hub:gczoo/{CLS}.{CLS_TAG}", pretrained=True).eval()
        via_zoo = gczoo.create_model(f"hf-hub:gczoo/{CLS}.{CLS_TAG}", pretrained=True).eval()
        torch.testing.assert_close(via_timm(image), expected, rtol=0, atol=0)
        torch.testing.assert_close(via_zoo(image), expected, rtol=0, atol=0)
    assert via_timm.pretrained_cfg["file"].endswith(".safetensors")  # the zoo's verified fetch, not timm's

    # The hosted repo as the tag's first source (its own converter), pinned by `gczoo pin`.
    source = hosted_source(first)
    assert source["sha256"] == hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest()
    def hosted_first(data):
        sources = data["models"][CLS]["weights"][CLS_TAG]["sources"]
        sources[:] = [dict(source, sha256=None), sources[0]]  # hosted copy, then the upstream hub file

    path = manifest_copy(hosted_first)
    # Publishing is deterministic, so the maintainer confirms the digest it printed.
    assert main(["pin", f"{CLS}.{CLS_TAG}", "--manifest", str(path), "--confirm", source["sha256"],
                 "--confirm", meta["gczoo_upstream_sha256"]]) == 0
    pinned = load_manifest(path)["models"][CLS]["weights"][CLS_TAG]["sources"]
    assert [s["sha256"] for s in pinned] == [source["sha256"], meta["gczoo_upstream_sha256"]]
    upstream.unlink()  # only the hosted copy is left
    with torch.no_grad():
        hosted = gczoo.create_model(f"{CLS}.{CLS_TAG}", pretrained=True).eval()
        torch.testing.assert_close(hosted(image), expected, rtol=0, atol=0)


def test_unknown_architecture_and_missing_repo_are_clear_errors(hub):
    repo = Path(hub.root) / "someone/other-model"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps({"architecture": "resnet9000_gc", "num_classes": 10}))
    with pytest.raises(UnknownModelError, match="names the architecture 'resnet9000_gc'.*Upgrade gczoo"):
        gczoo.create_model("hf-hub:someone/other-model", pretrained=True)
    with pytest.raises(gczoo.weights.WeightsUnavailableError, match="config.json of the hub repo someone/missing@main"):
        gczoo.create_model("hf-hub:someone/missing")
    with pytest.raises(ValueError, match="expected hf-hub:ORG/REPO"):
        gczoo.create_model("hf-hub:no-org")


def test_publish_refuses_a_checkpoint_that_is_not_the_upstream_file(weights_env, tmp_path, capsys, manifest_copy,
                                                                   monkeypatch):
    other = tmp_path / "resnet50.pth"
    other.write_bytes(b"not the upstream file")
    assert main(["publish", f"{CLS}.{CLS_TAG}", "--out", str(tmp_path / "out"), "--checkpoint", str(other)]) == 2
    pinned = load_manifest()["models"][CLS]["weights"][CLS_TAG]["sources"][1]["sha256"]
    assert f"is not the tag's upstream file (expected sha256 or prefix: {pinned})" in capsys.readouterr().err
    # A file matching only the 32-bit prefix in an upstream name is not enough to publish from.
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    manifest_copy(lambda d: d["models"][DET]["weights"][DET_TAG]["sources"][0].update(sha256=None, sha256_prefix=digest[:8]))
    monkeypatch.delenv("GCZOO_ALLOW_PREFIX_ONLY")  # set by weights_env for the plain-http loopback servers
    assert main(["publish", f"{DET}.{DET_TAG}", "--out", str(tmp_path / "out"), "--checkpoint", str(other)]) == 2
    assert "matches only the hash prefix" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mmdet_pth(tmp_path_factory):
    """A synthetic GC Mask R-CNN checkpoint in mmdetection's layout, with non-trivial backbone BatchNorm."""
    state = mmdet_maskrcnn_state_dict((3, 4, 6, 3), gc_ratio=1 / 16, seed=3)
    gen = torch.Generator().manual_seed(4)
    for key, value in state.items():
        if key.startswith("backbone.") and key.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
        elif key.startswith("backbone.") and key.endswith(("running_var", "bn3.weight")):
            value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
    path = tmp_path_factory.mktemp("mmdet") / "mask_rcnn_gc_synthetic.pth"
    write_checkpoint(path, state)
    return path


def _point_tags_at(manifest_copy, file_server, pth: Path) -> None:
    """The detector tag and its backbone tag read the same (served) upstream file."""
    served = Path(file_server.root) / pth.name
    if not served.exists():
        shutil.copyfile(pth, served)
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    source = {"type": "url", "url": f"{file_server.url}/{pth.name}", "format": "pickle", "sha256": digest,
              "sha256_prefix": digest[:8]}

    def edit(data):
        data["models"][DET]["weights"][DET_TAG]["sources"] = [dict(source)]
        data["models"][CLS]["weights"][BB_TAG]["sources"] = [dict(source)]

    manifest_copy(edit)


def test_detector_and_its_backbone_tag_published_and_loaded_by_name(hub, file_server, mmdet_pth, manifest_copy, tmp_path):
    """One upstream file: the detector, the backbone tag (exactly the detector's c2..c5), both published and loaded."""
    _point_tags_at(manifest_copy, file_server, mmdet_pth)
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(6))]
    x = (images[0][None] - 0.45) / 0.225
    kwargs = dict(min_size=96, max_size=128, rpn_post_nms_top_n_test=50, box_score_thresh=0.0)
    detector = gczoo.create_model(f"{DET}.{DET_TAG}", pretrained=True, **kwargs).eval()
    backbone = gczoo.create_model(f"{CLS}.{BB_TAG}", pretrained=True, features_only=True).eval()
    with torch.no_grad():
        expected_detections = detector(images)[0]
        expected = list(detector.backbone.body(x).values())
        features = backbone(x)
    assert [t.shape[1] for t in features] == [256, 512, 1024, 2048] and len(expected_detections["boxes"]) > 0
    for a, b in zip(features, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(file_server.gets(mmdet_pth.name)) == 1, "one upstream download for both tags"

    # Without features_only the head is new, and the zoo says so once.
    with pytest.warns(UserWarning, match="classifier head is newly initialised"):
        gczoo.create_model(f"{CLS}.{BB_TAG}", pretrained=True, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gczoo.create_model(f"{CLS}.{BB_TAG}", pretrained=True, num_classes=10).fc.out_features == 10

    # Publish both (the backbone from the local upstream file, checked against its pinned sha256).
    out = tmp_path / "out"
    assert main(["publish", f"{CLS}.{BB_TAG}", "--out", str(out), "--checkpoint", str(mmdet_pth)]) == 0
    det_folder = publish(f"{DET}.{DET_TAG}", out, progress=False)
    bb_folder = out / f"{CLS}.{BB_TAG}"
    with safe_open(bb_folder / "model.safetensors", framework="pt") as f:
        assert f.metadata()["gczoo_converter"] == "new_head" and not any(k.startswith("fc.") for k in f.keys())
    card = ModelCard.load(bb_folder / "README.md")
    assert card.data.eval_results is None and card.data.pipeline_tag == "image-feature-extraction"
    assert "**not** as results of this model" in card.text and "| box AP 40.4, mask AP 36.2 |" in card.text
    assert json.loads((det_folder / "config.json").read_text()) == {
        "architecture": DET, "family": "maskrcnn", "tag": DET_TAG, "gczoo_version": gczoo.__version__}
    card = ModelCard.load(det_folder / "README.md")
    entry = load_manifest()["models"][DET]["weights"][DET_TAG]
    assert sorted((r.metric_type, r.metric_value) for r in card.data.eval_results) == sorted(
        (k, v) for m in entry["metrics"] for k, v in metric_numbers(m).items())
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "object-detection"

    # Served as hub repos, loaded by name: the same outputs as the upstream file.
    for folder in (det_folder, bb_folder):
        _serve_repo(hub, folder, f"gczoo/{folder.name}")
    hosted = gczoo.create_model(f"hf-hub:gczoo/{det_folder.name}", pretrained=True, **kwargs).eval()
    with torch.no_grad():
        detections = hosted(images)[0]
        for key in ("boxes", "labels", "scores", "masks"):
            torch.testing.assert_close(detections[key], expected_detections[key], rtol=0, atol=0)
        for net in (gczoo.create_model(f"hf-hub:gczoo/{bb_folder.name}", pretrained=True, features_only=True),
                    timm.create_model(f"hf-hub:gczoo/{bb_folder.name}", pretrained=True, features_only=True)):
            for a, b in zip(net.eval()(x), features):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backbone_tags_cover_every_gc_detector_with_matching_architecture():
    """A backbone tag per GC Mask R-CNN checkpoint and per non-DCN GC Cascade one, on the classifier with the
    detector's backbone arguments, reading the same file; the detector's AP is provenance, never a metric."""
    models = load_manifest()["models"]
    detectors = {f"{a}.{t}" for a, m in models.items()
                 if m["family"] == "maskrcnn" and "_gc_" in a and "dcn_stages" not in m["arch"] for t in m["weights"]}
    covered = set()
    for arch, model in models.items():
        for tag, w in model["weights"].items():
            if w["converter"] != "mmdet_backbone":
                continue
            assert model["family"] == "gc_resnet" and w["metrics"] == [], f"{arch}.{tag}"
            det_arch, det_tag = w["detector"]["name"].split(".")
            det = models[det_arch]
            assert {k: v for k, v in det["arch"].items() if k != "cascade"} == model["arch"], (arch, det_arch)
            assert det["weights"][det_tag]["sources"] == w["sources"]
            assert det["weights"][det_tag]["metrics"] == w["detector"]["metrics"]
            covered.add(w["detector"]["name"])
    assert covered == detectors and len(detectors) == 12


def test_gcify_basic_block_after_bn2_before_the_residual_addition(image):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        before = model(image)
        gcify(model, stages="c2-c5")
        torch.testing.assert_close(model(image), before, rtol=0, atol=0)  # identity at insertion
        block = model.layer2[1]
        torch.nn.init.normal_(block.context_block.channel_add_conv[-1].weight, std=0.1)
        x = torch.randn(1, 128, 8, 8)
        h = block.relu(block.bn1(block.conv1(x)))
        bn2 = block.bn2  # computed without the module, whose forward hook applies the GC block
        y = torch.nn.functional.batch_norm(block.conv2(h), bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias,
                                           False, 0.0, bn2.eps)
        expected = block.relu(block.context_block(y) + x)
        assert (block.context_block(y) - y).abs().max() > 1e-3  # the trained GC block does something
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert sum(isinstance(m, gczoo.ContextBlock) for m in model.modules()) == 8


def test_segmentation_tag_published_and_loaded_by_name(hub, file_server, manifest_copy, tmp_path):
    """A segmentation tag: published from its (served) upstream file, its card's model-index holds both mIoUs,
    and the repo loaded by name gives the upstream file's logits."""
    from mmseg_layout import shared_state_dict, write_checkpoint as write_mmseg_checkpoint

    arch, tag = "gcnet_resnet50_d8", "mmseg_cityscapes_512x1024_40k"
    pth = write_mmseg_checkpoint(Path(file_server.root) / "gcnet_synthetic.pth", shared_state_dict("gc", 50, 19))
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()

    def edit(data):
        data["models"][arch]["weights"][tag]["sources"] = [
            {"type": "url", "url": f"{file_server.url}/{pth.name}", "format": "pickle", "sha256": digest,
             "sha256_prefix": digest[:8]}]

    manifest_copy(edit)
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = gczoo.create_model(f"{arch}.{tag}", pretrained=True).eval()(x)["out"]
    folder = publish(f"{arch}.{tag}", tmp_path / "out", progress=False)
    assert json.loads((folder / "config.json").read_text()) == {
        "architecture": arch, "family": "segmentation", "tag": tag, "gczoo_version": gczoo.__version__}
    card = ModelCard.load(folder / "README.md")
    entry = load_manifest()["models"][arch]["weights"][tag]
    assert card.data.pipeline_tag == "image-segmentation"
    assert sorted((r.metric_type, r.metric_value) for r in card.data.eval_results) == sorted(
        (k, v) for m in entry["metrics"] for k, v in metric_numbers(m).items())
    _serve_repo(hub, folder, f"gczoo/{folder.name}")
    with torch.no_grad():
        hosted = gczoo.create_model(f"hf-hub:gczoo/{folder.name}", pretrained=True).eval()(x)["out"]
    torch.testing.assert_close(hosted, expected, rtol=0, atol=0)
