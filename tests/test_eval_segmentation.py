"""``eval/segmentation.py`` on Cityscapes- and ADE20K-layout datasets written here.

A real GCNet (mmsegmentation-layout checkpoint, loaded through the tag's converter) runs on
tiny images; the script's mIoU / aAcc / per-class IoU are compared with a confusion matrix
computed here from the same model's predictions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gczoo
from eval import common, segmentation
from mmseg_layout import shared_state_dict, write_checkpoint


H, W = 24, 40
CITYSCAPES = "gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k"
ADE20K = "gcnet_resnet50_d8.mmseg_ade20k_512x512_80k"
#: Cityscapes label ids (official *_labelIds.png) -> train ids, a few of them, and ignored ids
LABEL_IDS = {7: 0, 8: 1, 11: 2, 21: 8, 26: 13, 33: 18, 0: 255, 4: 255}


def _pixels(seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=gen).numpy()


def _labels(seed: int, values) -> np.ndarray:
    gen = torch.Generator().manual_seed(100 + seed)
    values = torch.tensor(list(values), dtype=torch.uint8)
    return values[torch.randint(0, len(values), (H, W), generator=gen)].numpy()


def _cityscapes(root: Path) -> list:
    """Two images in two cities: one with labelTrainIds, one with official labelIds only; returns train-id maps."""
    truth = []
    for i, city in enumerate(("aachen", "bonn")):
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True)
        stem = f"{city}_000000_00001{i}"
        Image.fromarray(_pixels(i)).save(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
        if i == 0:
            train = _labels(i, [*range(19), 255])
            Image.fromarray(train).save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png")
        else:
            ids = _labels(i, LABEL_IDS)
            Image.fromarray(ids).save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
            train = np.vectorize(LABEL_IDS.get)(ids).astype(np.uint8)
        truth.append(train)
    return truth


def _ade20k(root: Path) -> list:
    """ADEChallengeData2016 layout, two images (JPEG); labels 0 (ignored) .. 150; returns reduced labels."""
    data = root / "ADEChallengeData2016"
    (data / "images" / "validation").mkdir(parents=True)
    (data / "annotations" / "validation").mkdir(parents=True)
    truth = []
    for i in range(2):
        name = f"ADE_val_0000000{i + 1}"
        Image.fromarray(_pixels(10 + i)).save(data / "images" / "validation" / f"{name}.jpg", quality=95)
        label = _labels(10 + i, [0, 1, 2, 3, 50, 120, 150])
        Image.fromarray(label).save(data / "annotations" / "validation" / f"{name}.png")
        truth.append(np.where(label == 0, 255, label.astype(np.int64) - 1).astype(np.uint8))
    return truth


def _expected(model, images, truth, num_classes):
    """mIoU / aAcc / per-class IoU from a confusion matrix of the model's predictions (no resize: the
    test scale equals the image size)."""
    mean = torch.tensor(model.pretrained_cfg["mean"]).reshape(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).reshape(1, 3, 1, 1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image, label in zip(images, truth):
        x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255 - mean) / std
        with torch.no_grad():
            pred = model(x)["out"].argmax(1)[0].numpy()
        keep = label != 255
        np.add.at(confusion, (label[keep].astype(np.int64), pred[keep]), 1)
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
    return {"miou": float(np.nanmean(iou) * 100), "aacc": float(tp.sum() / confusion.sum() * 100),
            "per_class": [None if np.isnan(v) else v * 100 for v in iou]}


def _run(*argv) -> int:
    return common.main(segmentation.run, segmentation.build_parser(), [str(a) for a in argv])


def _read_images(paths):
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


@pytest.mark.parametrize("dataset", ["cityscapes", "ade20k"])
def test_miou_equals_an_independent_computation(tmp_path, dataset, capsys):
    data = tmp_path / dataset
    truth = _cityscapes(data) if dataset == "cityscapes" else _ade20k(data)
    name, classes = (CITYSCAPES, 19) if dataset == "cityscapes" else (ADE20K, 150)
    state = shared_state_dict("gc", 50, classes)
    if dataset == "ade20k":  # predictions among the labelled classes, so IoUs are not all zero
        bias = torch.full_like(state["decode_head.conv_seg.bias"], -20.0)
        bias[[0, 1, 2, 49, 119, 149]] = 0.0
        state["decode_head.conv_seg.bias"] = bias
    checkpoint = write_checkpoint(tmp_path / "ck.pth", state)
    report = tmp_path / "report.json"
    assert _run("--model", name, "--data", data, "--checkpoint", checkpoint, "--test-scale", W, H, "--workers", 0,
                "--device", "cpu", "--json-out", report) == 0
    rec = json.loads(report.read_text())["results"][0]
    assert rec["verdict"] is None and "checkpoint" in rec["note"] and rec["samples"] == 2

    model = gczoo.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state)).eval()
    images = sorted((data / "leftImg8bit").glob("val/*/*.png")) if dataset == "cityscapes" else \
        sorted((data / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))
    expected = _expected(model, _read_images(images), truth, classes)
    assert rec["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert rec["aacc"] == pytest.approx(expected["aacc"], abs=1e-9)
    measured = list(rec["per_class_iou"].values())
    assert [v is None for v in measured] == [v is None for v in expected["per_class"]]
    assert all(m is None or m == pytest.approx(e, abs=1e-3) for m, e in zip(measured, expected["per_class"]))
    assert 0 < expected["miou"] < 100 and sum(v is not None for v in measured) > 3  # a discriminating case
    out = capsys.readouterr().out
    assert f"mIoU {expected['miou']:.2f}" in out and ("road" in out if dataset == "cityscapes" else "wall" in out)


def test_bad_input_is_named(tmp_path, capsys):
    data = tmp_path / "cityscapes"
    _cityscapes(data)
    assert _run("--model", CITYSCAPES, "--data", tmp_path / "nothing") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run("--model", CITYSCAPES, "--data", tmp_path / "empty") == 2
    assert "neither a Cityscapes root" in capsys.readouterr().err
    assert _run("--model", ADE20K, "--data", data) == 2
    assert "is a model of ade20k, but --data holds cityscapes" in capsys.readouterr().err
    assert _run("--model", "resnet50_gc_r16", "--data", data) == 2
    assert "not a segmentation model" in capsys.readouterr().err
    label = next((data / "gtFine").glob("val/bonn/*_labelIds.png"))
    label.rename(label.with_suffix(".bak"))
    assert _run("--model", CITYSCAPES, "--data", data) == 2
    err = capsys.readouterr().err
    assert "1 label map(s) missing" in err and "bonn_000000_000011_gtFine_labelTrainIds.png" in err


def test_bad_label_maps_are_named_before_any_metric(tmp_path, capsys):
    data = tmp_path / "cityscapes"
    _cityscapes(data)
    checkpoint = write_checkpoint(tmp_path / "ck.pth", shared_state_dict("gc", 50, 19))
    label = next((data / "gtFine").glob("val/aachen/*_labelTrainIds.png"))
    Image.fromarray(np.full((H, W), 30, dtype=np.uint8)).save(label)  # train id 30: not a Cityscapes class
    args = ("--model", CITYSCAPES, "--data", data, "--checkpoint", checkpoint, "--test-scale", W, H, "--workers", 0)
    assert _run(*args) == 2
    assert "holds label 30, outside the 19 classes" in capsys.readouterr().err
    Image.fromarray(np.zeros((H, W + 1), dtype=np.uint8)).save(label)
    assert _run(*args) == 2
    assert f"is {W + 1}x{H}, its image" in capsys.readouterr().err


def test_single_scale_and_ms_flip_are_compared_with_their_own_published_number():
    published = common.published_metrics("gcnet_resnet50_d8.mmseg_cityscapes_769x769_40k", "cityscapes-val")
    single = common.compare({"miou": 78.0}, published, 0.2)
    assert [c["values"] for c in single] == [{"miou": 78.12}] and single[0]["verdict"] == "PASS"
    multi = common.compare({"miou_ms_flip": 79.5}, published, 0.2)
    assert [c["values"] for c in multi] == [{"miou_ms_flip": 80.09}] and multi[0]["verdict"] == "FAIL"
    assert "sliding window" in single[0]["protocol"]["test"] and "flip" in multi[0]["protocol"]["test"]
    assert segmentation.rescale_size(1024, 2048, (2049, 1025)) == (1025, 2049)
    assert segmentation.rescale_size(375, 500, (2048, 512)) == (512, 683)


def test_ms_flip_averages_softmax_over_scales_and_flips_at_the_original_size():
    torch.manual_seed(0)

    class Stub(torch.nn.Module):  # a 3x3 conv: not flip-equivariant, so the flip-back shows
        align_corners = False

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return {"out": self.conv(x)}

    model, image = Stub().eval(), torch.randint(0, 256, (3, 10, 16), dtype=torch.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    scales = [(8, 5), (16, 10), (24, 15)]  # (long, short) -> 5x8, 10x16 (the image), 15x24
    with torch.no_grad():
        got = segmentation.predict_probabilities(model, image, scales, True, mean, std)
        expected = torch.zeros(4, 10, 16)
        for h, w in [(5, 8), (10, 16), (15, 24)]:
            x = (torch.nn.functional.interpolate(image[None].float() / 255, size=(h, w), mode="bilinear") - mean) / std
            for flip in (False, True):
                logits = model(x.flip(-1) if flip else x)["out"]
                logits = logits.flip(-1) if flip else logits
                expected += torch.nn.functional.interpolate(logits, size=(10, 16), mode="bilinear")[0].softmax(0) / 6
        single = segmentation.predict_probabilities(model, image, [(16, 10)], False, mean, std)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(single, model((image[None].float() / 255 - mean) / std)["out"][0])
