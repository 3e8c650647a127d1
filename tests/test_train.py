"""train/detection.py and train/segmentation.py as a user runs them: tiny shapes data written by
train/make_shapes.py, depth-reduced models (``--model-kwargs``), a few iterations on CPU."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SEG_MODEL = ["--model", "gcnet_resnet50_d8", "--model-kwargs", '{"layers": [1, 1, 1, 1]}', "--num-classes", "4",
             "--scale", "32", "32", "--crop-size", "32", "32"]
DET_KWARGS = {"layers": [1, 1, 1, 1], "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
              "box_batch_size_per_image": 32}
DET_MODEL = ["--model", "maskrcnn_resnet50_fpn_gc_r16", "--model-kwargs", json.dumps(DET_KWARGS), "--scale", "48", "48"]
FAST = ["--workers", "0", "--batch-size", "2", "--log-every", "1", "--eval-limit", "1"]


def run(script, *args, limit_file_size=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def limits():  # a full disk: writes past the limit fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600, preexec_fn=limits if limit_file_size else None)


def losses(out: Path) -> dict:
    return {r["iteration"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if r["event"] == "train"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    done = run("train/make_shapes.py", "--out", root, "--train", 6, "--val", 2, "--size", 32)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def seg_runs(shapes, tmp_path_factory):
    """An uninterrupted 3-iteration run, and the same run stopped after 1 and resumed."""
    base = tmp_path_factory.mktemp("seg")
    args = ["--data", shapes / "cityscapes", *SEG_MODEL, *FAST, "--iterations", 3, "--lr", 0.01]
    full = run("train/segmentation.py", *args, "--out", base / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    half = run("train/segmentation.py", *args, "--out", base / "half", "--until", 1)
    assert half.returncode == 0, half.stderr[-3000:]
    shutil.copytree(base / "half", base / "stopped")  # the checkpoint of iteration 1, for the bad-input tests
    resumed = run("train/segmentation.py", *args, "--out", base / "half", "--resume", base / "half" / "checkpoint.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return base, args


def test_segmentation_lowers_the_loss_and_resumes_exactly(seg_runs, shapes):
    base, _ = seg_runs
    full, half = losses(base / "full"), losses(base / "half")
    assert full[3] < full[1]
    assert sorted(half) == [1, 2, 3]
    for it in (1, 2, 3):  # the resumed run computes what the uninterrupted one did
        assert half[it] == pytest.approx(full[it], rel=1e-5, abs=1e-6), (it, half, full)
    # the final weights load with create_model and with the eval script
    import gczoo

    weights = base / "full" / "model.safetensors"
    model = gczoo.create_model("gcnet_resnet50_d8", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                               num_classes=4, layers=[1, 1, 1, 1])
    assert model.num_classes == 4
    done = run("eval/segmentation.py", "--model", "gcnet_resnet50_d8", "--checkpoint", weights, "--data",
               shapes / "cityscapes", "--test-scale", 32, 32, "--workers", 0)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mIoU" in done.stdout


def test_resume_refuses_another_model_or_data(seg_runs, shapes, tmp_path):
    base, args = seg_runs
    checkpoint = base / "stopped" / "checkpoint.pt"
    other_model = [a if a != '{"layers": [1, 1, 1, 1]}' else '{"layers": [1, 1, 2, 1]}' for a in args]
    done = run("train/segmentation.py", *other_model, "--out", tmp_path / "a", "--resume", checkpoint)
    assert done.returncode == 2 and "was made by another run (model" in done.stderr
    data = tmp_path / "data"
    shutil.copytree(shapes / "cityscapes", data)
    extra = sorted((data / "leftImg8bit" / "train" / "shapes").iterdir())[0]
    for folder, suffix in (("leftImg8bit", "leftImg8bit.png"), ("gtFine", "gtFine_labelTrainIds.png")):
        src = next((data / folder / "train" / "shapes").glob(extra.name.replace("leftImg8bit.png", suffix)))
        shutil.copy(src, src.with_name(src.name.replace("00000", "00099")))
    done = run("train/segmentation.py", *[data if a == shapes / "cityscapes" else a for a in args], "--out",
               tmp_path / "b", "--resume", checkpoint)
    assert done.returncode == 2 and "data: checkpoint" in done.stderr


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(seg_runs, tmp_path):
    base, args = seg_runs
    out = tmp_path / "run"
    shutil.copytree(base / "stopped", out)
    before = (out / "checkpoint.pt").read_bytes()
    done = run("train/segmentation.py", *args, "--out", out, "--resume", out / "checkpoint.pt", "--checkpoint-every", 1,
               limit_file_size=len(before) // 2)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "CheckpointWriteError" in done.stderr and "still holds iteration 1" in done.stderr
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob("*.partial"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shapes, tmp_path):
    out = tmp_path / "nan"
    done = run("train/segmentation.py", "--data", shapes / "cityscapes", *SEG_MODEL, *FAST, "--iterations", 4,
               "--lr", 1e12, "--checkpoint-every", 1, "--out", out)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "NonFiniteLoss" in done.stderr and "Training stopped before writing anything" in done.stderr
    if (out / "checkpoint.pt").exists():  # what was written is finite and named
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert f"iteration {state['iteration']})" in done.stderr
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "model.safetensors").exists()


def test_torchrun_two_processes_gloo(shapes, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "train/segmentation.py"), "--data", str(shapes / "cityscapes"), *SEG_MODEL,
                           "--workers", "0", "--batch-size", "1", "--iterations", "1", "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    start = next(r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "start")
    assert start["world_size"] == 2 and start["total_batch"] == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 1


def _coco(shapes: Path, tmp_path: Path) -> Path:
    data = tmp_path / "coco"
    shutil.copytree(shapes / "coco", data)
    return data


def _edit_annotations(data: Path, edit) -> None:
    path = data / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_detection_from_an_imagenet_backbone_follows_the_recipe_counts_dropped_boxes_and_loads(shapes, tmp_path):
    """The paper's start (``--pretrained-backbone FILE``, a torchvision-layout ImageNet file) under the
    BN recipe: the stem and stage 1 stay the file's, the other norms keep the file's statistics while
    their affine weights train (``norm_eval=True``); the final weights load into the inference model."""
    from torchvision.models.resnet import Bottleneck, ResNet

    data = _coco(shapes, tmp_path)

    def add_bad_boxes(doc):
        first = doc["annotations"][0]
        doc["annotations"] += [dict(first, id=900, bbox=[3, 3, 0, 5]), dict(first, id=901, iscrowd=1)]
    _edit_annotations(data, add_bad_boxes)
    torch.manual_seed(0)
    imagenet = ResNet(Bottleneck, [1, 1, 1, 1]).state_dict()
    torch.save(imagenet, tmp_path / "resnet.pth")
    out = tmp_path / "det"
    done = run("train/detection.py", "--data", data, *DET_MODEL, *FAST, "--batch-size", 1, "--iterations", 1,
               "--eval-limit", 1, "--out", out, "--pretrained-backbone", tmp_path / "resnet.pth", "--lr", 0.1,
               "--model", "maskrcnn_resnet50_fpn_gc_r16.mmdet_1x_coco")  # the BN (norm_eval) recipe's tag
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    counts = log[0]["data"]
    assert counts["boxes_dropped_degenerate"] == 1 and counts["crowd_ignored"] == 1
    assert {"box_ap", "mask_ap"} <= set(log[-1]["metrics"])
    from safetensors.torch import load_file

    trained = load_file(out / "model.safetensors")
    body = {k[len("backbone.body."):]: v for k, v in trained.items() if k.startswith("backbone.body.")}
    assert not any(k.endswith("num_batches_tracked") for k in trained)
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv2.weight", "layer1.0.bn3.bias",  # frozen_stages=1
                "layer2.0.bn1.running_mean", "layer3.0.bn2.running_var"):  # norm_eval: statistics fixed
        assert torch.equal(body[key], imagenet[key]), key
    for key in ("layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer4.0.bn3.bias"):  # trained
        assert not torch.equal(body[key], imagenet[key]), key
    import gczoo

    model = gczoo.create_model("maskrcnn_resnet50_fpn_gc_r16", pretrained=True, num_classes=4, label_ids=[10, 20, 30],
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), **DET_KWARGS)
    assert model.label_ids.tolist() == [0, 10, 20, 30]
    # The file publishes as it is: its build arguments are the inference model's (training-only
    # sampling arguments such as box_batch_size_per_image stay with the run), its start is recorded.
    from gczoo.cli import main

    assert main(["publish", "--trained", str(out / "model.safetensors"), "--out", str(tmp_path / "hub"),
                 "--repo-name", "det-shapes", "--org", "someone"]) == 0
    config = json.loads((tmp_path / "hub" / "det-shapes" / "config.json").read_text())
    assert config["model_args"] == {"num_classes": 4, "label_ids": [10, 20, 30], "min_size": 48, "max_size": 48,
                                    "layers": [1, 1, 1, 1]}
    assert "started from: the ImageNet backbone" in (tmp_path / "hub" / "det-shapes" / "README.md").read_text()


def test_detection_bad_input(shapes, tmp_path):
    data = _coco(shapes, tmp_path)
    _edit_annotations(data, lambda doc: doc["annotations"][0].update(category_id=99))
    done = run("train/detection.py", "--data", data, *DET_MODEL, *FAST, "--out", tmp_path / "a")
    assert done.returncode == 2 and "annotations[0]: category_id 99 is not among the categories" in done.stderr
    _edit_annotations(data, lambda doc: doc["annotations"][0].update(category_id=10))
    image = data / "train2017" / "shapes_train_00000.png"
    image.write_bytes(b"not a png")
    done = run("train/detection.py", "--data", data, *DET_MODEL, *FAST, "--iterations", 3, "--out", tmp_path / "b")
    assert done.returncode == 2 and "cannot use image" in done.stderr and "shapes_train_00000.png" in done.stderr
    assert "Traceback" not in done.stderr


def test_segmentation_label_outside_the_classes(shapes, tmp_path):
    import numpy as np
    from PIL import Image

    data = tmp_path / "cityscapes"
    shutil.copytree(shapes / "cityscapes", data)
    for label in (data / "gtFine" / "train" / "shapes").iterdir():
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(label)
    done = run("train/segmentation.py", "--data", data, *SEG_MODEL, *FAST, "--iterations", 2, "--out", tmp_path / "o")
    assert done.returncode == 2 and "holds label 7, outside the 4 classes" in done.stderr
    assert "Traceback" not in done.stderr


def test_recipes_are_checked_and_scaled_by_the_linear_rule():
    import argparse

    from gczoo.manifest import ManifestError, load_manifest, validate
    from train import common

    manifest = json.loads((ROOT / "weights_manifest.json").read_text())
    manifest["models"]["gcnet_resnet50_d8"]["weights"]["mmseg_cityscapes_512x1024_40k"]["recipe"] = "nope"
    with pytest.raises(ManifestError, match="recipe: 'nope' is not a key of recipes"):
        validate(manifest)
    recipes = load_manifest()["recipes"]
    plain = argparse.Namespace(iterations=None, lr=None, warmup=None)
    seg = common.scaled_schedule(recipes["mmseg_cityscapes_512x1024_40k"], 2, 100, plain)  # recipe: 8 images
    assert (seg.base_lr, seg.total, seg.min_lr) == (pytest.approx(0.0025), 160000, pytest.approx(2.5e-5))
    det = common.scaled_schedule(recipes["mmdet_maskrcnn_1x"], 4, 200, plain)  # recipe: 16 images, 12 epochs
    assert (det.base_lr, det.total, det.warmup, list(det.milestones)) == (pytest.approx(0.005), 2400, 2000, [1600, 2200])
    assert det.lr(0) == pytest.approx(0.005 * 0.001) and det.lr(1000) == pytest.approx(0.005 * (0.001 + 0.999 / 2))
    assert det.lr(2000) == pytest.approx(0.0005) and det.lr(2200) == pytest.approx(0.00005)
