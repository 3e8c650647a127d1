"""`gczoo publish --trained`: weights written by train/*.py become a hub repo that loads by name.

A small detector is saved exactly as the training scripts save their final weights
(``train/common.py:save_weights``), published, served by the loopback hub (tests/loopback.py) and
loaded with ``gczoo.create_model("hf-hub:ORG/NAME", pretrained=True)``: the same outputs as the
model that was saved. Bad inputs are one-line errors (exit code 2) before anything is written.
"""
import hashlib
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

import gczoo
from gczoo import weights
from gczoo.cli import main
from gczoo.manifest import load_manifest
from gczoo.publish import EvalReportError, TrainedKeysError, TrainedWeightsError, hosted_source, publish_trained

DET = "maskrcnn_resnet50_fpn_gc_r16.mmdet_1x_coco"
DET_ARGS = {"num_classes": 3, "label_ids": [5, 7], "min_size": 64, "max_size": 96, "layers": [1, 1, 1, 1]}
DET_RECIPE = "mmdet_maskrcnn_1x"
RUN_METRICS = {"box_ap": 12.345, "mask_ap": 10.5, "val_images": 4}
FILES = ("model.safetensors", "config.json", "README.md")


def _save_trained(path: Path, name: str, model, build_args: dict, recipe: str, metrics: dict, keep=lambda k: True,
                  start: str = "imagenet"):
    """The final weights as train/common.py writes them (its own save_weights and run_record, called with the
    fields they read): a run of total batch 4 at the scaled learning rate, float32, ``start`` as its flags say."""
    from train.common import run_record, save_weights

    job = types.SimpleNamespace(name=name, build_args=build_args, recipe_name=recipe,
                                recipe=load_manifest()["recipes"][recipe], keep_keys=keep)
    args = types.SimpleNamespace(pretrained=start == "tag", pretrained_backbone=start == "imagenet", amp_dtype="bfloat16")
    save_weights(path, job, model, 120, metrics, run_record(args, 4, 0.005, syncbn=False, amp=False))
    return path


def _eval_report(path: Path, trained: Path, **numbers) -> Path:
    """A report as eval/coco.py --checkpoint FILE --json-out writes it (eval/common.py's record and write_report),
    with a second result measuring other weights."""
    from eval import common as eval_common

    arch, tag = DET.split(".")
    dist = types.SimpleNamespace(describe=lambda: "cpu", world_size=1)
    records = [eval_common.record(
        eval_common.LoadedModel(model=None, arch=arch, tag=tag, weights_file=file, weights_sha256=digest, checkpoint=True),
        task="coco-2017-val", metrics=numbers, comparisons=[], dist=dist, samples=4, limit=None, note="no verdict",
        protocol={"split": "val2017", "metric": "pycocotools COCOeval AP@[.50:.95], bbox and segm", "batch_size": 1})
        for file, digest in ((trained, weights.sha256_of(trained)), (Path("other.safetensors"), "0" * 64))]
    eval_common.write_report(path, records)
    return path


@pytest.fixture(scope="module")
def trained_detector(tmp_path_factory):
    """(model in eval mode, its train/*.py weights file)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = gczoo.create_model(DET, **DET_ARGS).eval()
    path = _save_trained(tmp_path_factory.mktemp("run") / "model.safetensors", DET, model, DET_ARGS, DET_RECIPE,
                         RUN_METRICS)
    return model, path


def test_trained_detector_published_served_and_loaded_by_name(hub, trained_detector, tmp_path, capsys):
    model, trained = trained_detector
    report = _eval_report(tmp_path / "coco.json", trained, box_ap=11.25, mask_ap=9.75)
    assert main(["publish", "--trained", str(trained), "--out", str(tmp_path / "a"), "--repo-name", "gc-shapes",
                 "--org", "someone", "--metrics", str(report)]) == 0
    folder = tmp_path / "a" / "gc-shapes"
    assert f"hf upload someone/gc-shapes {folder} ." in capsys.readouterr().out
    again = publish_trained(trained, tmp_path / "b", "gc-shapes", "someone", metrics=[report])
    assert {f: (folder / f).read_bytes() for f in FILES} == {f: (again / f).read_bytes() for f in FILES}
    with pytest.raises(weights.WeightsError, match="trained by the publisher .* never as a source of the tag"):
        hosted_source(folder)  # not the tag's weights

    # model.safetensors: the trained tensors, the training metadata kept, the trained file named by its sha256
    with safe_open(trained, framework="pt") as f:
        original = f.metadata()
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta == {**original, "gczoo_trained_sha256": hashlib.sha256(trained.read_bytes()).hexdigest(),
                    "gczoo_version": gczoo.__version__}
    assert meta["gczoo_converter"] == "identity" and json.loads(meta["gczoo_build_args"]) == DET_ARGS
    assert json.loads((folder / "config.json").read_text()) == {
        "architecture": DET.split(".")[0], "family": "maskrcnn", "tag": "mmdet_1x_coco",
        "gczoo_version": gczoo.__version__, "model_args": DET_ARGS}

    # The card: trained by the publisher, the recipe, and only the publisher's numbers, marked as such.
    card = ModelCard.load(folder / "README.md")
    assert "**These weights were trained by the publisher with gczoo's training script (`train/detection.py`).**" \
        in card.text
    recipe = load_manifest()["recipes"][DET_RECIPE]
    assert f"recipe `{DET_RECIPE}` (detection): {recipe['source']}" in card.text and "iterations run: 120" in card.text
    assert "`num_classes=3`, `label_ids=[5, 7]`" in card.text and "12 epochs" in card.text
    assert "started from: the ImageNet backbone the tag's upstream config names" in card.text
    assert "this run: total batch 4, base learning rate 0.005, SyncBatchNorm not used, float32" in card.text
    assert "normalisation: BatchNorm with fixed statistics and trained affine" in card.text
    assert "| box AP | 12.35 | the val split of the training data | 4 |" in card.text
    assert "| mask AP | 9.75 | the data given to eval/coco.py --data" in card.text
    assert sorted((r.metric_type, r.metric_value) for r in card.data.eval_results) == [
        ("box_ap", 11.25), ("box_ap", 12.345), ("mask_ap", 9.75), ("mask_ap", 10.5)]
    assert all(r.source_name.startswith("measured by the publisher (not verified by gczoo)") and r.verified is False
               for r in card.data.eval_results)

    # Served as a hub repo and loaded by name: the model that was saved, with its classes.
    shutil.copytree(folder, Path(hub.root) / "someone" / "gc-shapes")
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(6))]
    torch.manual_seed(123)  # another initialisation than the saved model's: only loaded weights can agree
    hosted = gczoo.create_model("hf-hub:someone/gc-shapes", pretrained=True).eval()
    with torch.no_grad():
        expected, got = model(images)[0], hosted(images)[0]
    assert len(expected["boxes"]) > 0 and set(expected["labels"].tolist()) <= {5, 7}
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_trained_segmentation_without_metrics_says_none_were_measured(hub, tmp_path):
    """The segmentation script's file (no auxiliary head, no val split): published, loaded, and no number invented."""
    name, args = "gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k", {"num_classes": 3, "layers": [1, 1, 1, 1]}
    torch.manual_seed(0)
    model = gczoo.create_model(name, aux_loss=True, **args).eval()
    trained = _save_trained(tmp_path / "model.safetensors", name, model, args, "mmseg_cityscapes_512x1024_40k", {},
                            keep=lambda key: not key.startswith("aux_classifier."), start="random")
    folder = publish_trained(trained, tmp_path / "out", "gc-seg", "someone")
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results is None and card.data.pipeline_tag == "image-segmentation"
    assert "No metrics were measured for these weights" in card.text and "train/segmentation.py" in card.text
    assert "started from: the model's random initialisation" in card.text and "normalisation: SyncBatchNorm" in card.text
    shutil.copytree(folder, Path(hub.root) / "someone" / "gc-seg")
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(gczoo.create_model("hf-hub:someone/gc-seg", pretrained=True).eval()(x)["out"],
                                   model(x)["out"], rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input


def _metadata(**changes) -> dict:
    meta = {"format": "pt", "gczoo_converter": "identity", "gczoo_build_args": json.dumps(DET_ARGS),
            "gczoo_model": DET, "gczoo_recipe": DET_RECIPE, "gczoo_iterations": "120",
            "gczoo_metrics": json.dumps(RUN_METRICS), "gczoo_trained_by": "train/detection.py", **changes}
    return {k: v for k, v in meta.items() if v is not None}


def _file(tmp_path: Path, metadata=None, tensors=None, name="model.safetensors") -> Path:
    path = tmp_path / name
    save_file(tensors or {"backbone.body.conv1.weight": torch.zeros(2, 3, 1, 1)}, str(path), metadata=metadata)
    return path


def _publish(tmp_path, trained, *extra):
    return main(["publish", "--trained", str(trained), "--out", str(tmp_path / "out"), "--repo-name", "mine",
                 "--org", "someone", *extra])


@pytest.mark.parametrize("make, says", [
    (lambda p: torch.save({"w": torch.zeros(2)}, p / "model.pth") or p / "model.pth", "is not a safetensors file"),
    (lambda p: _file(p), "has no gczoo training metadata (gczoo_trained_by), so it was not written by train/*.py"),
    (lambda p: _file(p, {"gczoo_converter": "identity", "gczoo_upstream": "https://example.org/up.pth"}),
     "was written by `gczoo publish` from the upstream file https://example.org/up.pth, not trained here"),
    (lambda p: _file(p, _metadata(gczoo_recipe=None)), "its training metadata lacks gczoo_recipe"),
    (lambda p: _file(p, _metadata(gczoo_model="maskrcnn_resnet9000_fpn.mmdet_1x_coco")),
     "gczoo_model names 'maskrcnn_resnet9000_fpn.mmdet_1x_coco', not a NAME.TAG of this gczoo version"),
    (lambda p: _file(p, _metadata(gczoo_recipe="my_recipe")), "gczoo_recipe names 'my_recipe', not a recipe"),
    (lambda p: _file(p, _metadata(gczoo_recipe="mmseg_cityscapes_512x1024_40k")), "does not hold together"),
    (lambda p: _file(p, _metadata(gczoo_build_args='{"num_classes": 3,')), "metadata gczoo_build_args is not JSON"),
    (lambda p: _file(p, _metadata(gczoo_metrics='{"box_ap": "high"}')), "gczoo_metrics must map at most 32 names"),
    (lambda p: _file(p, _metadata(gczoo_converter="mmdet")), "trained weights are the model's own state dict"),
    (lambda p: _file(p, _metadata(gczoo_run=json.dumps({"start": "tag", "total_batch": -4, "base_lr": 0.02,
                                                        "syncbn": False, "amp": None}))),
     "metadata gczoo_run is {\"start\": \"tag\", \"total_batch\": -4"),
    (lambda p: _file(p, _metadata(gczoo_build_args=json.dumps({**DET_ARGS, "gc_ratio": 0.25}))),
     "cannot go into a hub config.json, which carries only what train/*.py records: model_args.gc_ratio: unknown field"),
    (lambda p: _file(p, _metadata(gczoo_build_args=json.dumps({**DET_ARGS, "num_classes": 5}))),
     "model_args.num_classes: 5 for 2 label_ids"),
], ids=["pickle", "upstream", "published-upstream", "missing-key", "unknown-arch", "unknown-recipe", "task-mismatch",
        "bad-json", "bad-metrics", "converter", "bad-run", "unpublishable-arg", "classes-mismatch"])
def test_a_file_that_is_not_publishable_trained_weights_is_a_one_line_error(tmp_path, capsys, make, says):
    assert _publish(tmp_path, make(tmp_path)) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and err.startswith("gczoo publish: --trained ")
    assert not (tmp_path / "out").exists()


def test_tensors_that_do_not_fit_the_model_name_the_keys(tmp_path, capsys):
    tensors = {"backbone.body.conv1.weight": torch.zeros(64, 3, 3, 3), "extra.weight": torch.zeros(1)}
    with pytest.raises(TrainedKeysError, match=r"keys \d+ missing: .*; 1 unexpected: extra\.weight; 1 of another "
                                               r"shape: backbone\.body\.conv1\.weight \(file \[64, 3, 3, 3\], model "
                                               r"\[64, 3, 7, 7\]\)"):
        publish_trained(_file(tmp_path, _metadata(), tensors), tmp_path / "out", "mine", "someone")
    assert issubclass(TrainedKeysError, TrainedWeightsError) and not (tmp_path / "out").exists()


def test_bad_metrics_report_repo_name_and_flags(tmp_path, capsys):
    trained = _file(tmp_path, _metadata())
    other = _eval_report(tmp_path / "other.json", _file(tmp_path, {"a": "b"}, name="other.safetensors"), box_ap=1.0)
    (tmp_path / "broken.json").write_text("{")
    cases = [
        (["--metrics", str(other)], f"holds no result for model.safetensors (sha256 {weights.sha256_of(trained)})"),
        (["--metrics", str(tmp_path / "broken.json")], "broken.json is not JSON"),
    ]
    for extra, says in cases:
        assert _publish(tmp_path, trained, *extra) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    with pytest.raises(EvalReportError, match="no such file"):
        publish_trained(trained, tmp_path / "out", "mine", "someone", metrics=[tmp_path / "missing.json"])
    with pytest.raises(ValueError, match="--repo-name '../up' is not a Hugging Face name"):
        publish_trained(trained, tmp_path / "out", "../up", "someone")
    for argv, says in ((["publish", DET, "--trained", str(trained), "--out", "o", "--repo-name", "m", "--org", "x"],
                        "no NAME.TAG, --all or --checkpoint with it"),
                       (["publish", "--trained", str(trained), "--out", "o", "--repo-name", "m"], "needs --repo-name"),
                       (["publish", DET, "--out", "o", "--metrics", "r.json"], "go with --trained FILE")):
        assert main(argv) == 2 and says in capsys.readouterr().err
    # A folder holding files publish did not write is never replaced (publish's own rule), checked first.
    (tmp_path / "out" / "mine").mkdir(parents=True)
    (tmp_path / "out" / "mine" / "notes.txt").write_text("mine")
    assert _publish(tmp_path, trained) == 2
    assert "holds files publish did not write (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("model_args, says", [
    ({"num_classes": 10 ** 7}, "model_args.num_classes: 10000000 is above the maximum 21843"),
    ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "model_args.pretrained_cfg_overlay: unknown field"),
    ({"layers": [1000, 1, 1, 1]}, "model_args.layers.0: 1000 is above the maximum 36"),
    ({"min_size": 100_000}, "model_args.min_size: 100000 is above the maximum 2048"),
    ({"num_classes": 5, "label_ids": [1, 2]}, "model_args.num_classes: 5 for 2 label_ids"),
    ({"label_ids": [1, 2]}, "model_args.label_ids: not an argument of the segmentation family's models"),
], ids=["classes", "overlay", "depth", "size", "contradiction", "family"])
def test_hostile_model_args_in_a_hub_config_are_refused_by_name(hub, model_args, says):
    family, arch, tag = (("segmentation", "gcnet_resnet50_d8", "mmseg_cityscapes_512x1024_40k") if "label_ids" in model_args
                         and "num_classes" not in model_args else ("maskrcnn", DET.split(".")[0], "mmdet_1x_coco"))
    repo = Path(hub.root) / "org" / "hostile"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps({"architecture": arch, "family": family, "tag": tag,
                                                  "model_args": model_args}))
    with pytest.raises(weights.WeightsError, match="hf-hub:org/hostile@main: config.json") as err:
        gczoo.create_model("hf-hub:org/hostile", pretrained=True)
    assert says in str(err.value)
