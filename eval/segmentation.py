"""Evaluate the zoo's segmentation weights on Cityscapes or ADE20K val and check mmsegmentation's published mIoU.

    python eval/segmentation.py --model gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k --data /data/cityscapes
    python eval/segmentation.py --model gcnet_resnet101_d8.mmseg_ade20k_512x512_160k --data /data/ADEChallengeData2016 --aug ms_flip
    torchrun --nproc-per-node 8 eval/segmentation.py --all --data /data/cityscapes --json-out cityscapes.json

Exit code: 0 PASS (or nothing to compare), 1 FAIL, 2 bad input.

**Data.** Cityscapes: ``ROOT/leftImg8bit/val/<city>/*_leftImg8bit.png`` with
``ROOT/gtFine/val/<city>/*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignored) or the official
``*_gtFine_labelIds.png``, mapped here to train ids (cityscapesScripts' table). ADE20K:
``ROOT/images/validation/*.jpg`` with ``ROOT/annotations/validation/*.png`` (ROOT is
``ADEChallengeData2016`` or holds it); label 0 is ignored and 1..150 become 0..149
(mmsegmentation's ``reduce_zero_label``). The dataset is recognised from the layout; the model's
weights tag must be for that dataset (``--all`` takes every tag of it).

**Protocol** (mmsegmentation's test pipeline, as the published numbers were made): each image is
resized keeping its ratio to the tag's test scale (mmcv's ``rescale_size`` rule: long side <= the
first number, short side <= the second, sides rounded with ``int(x + 0.5)``; bilinear on float
pixels), normalised with the tag's mean / std, run through the model (whole image or sliding
window, as the tag says), and its logits are resized back to the original size (bilinear, the
tag's ``align_corners``). ``--aug ms_flip`` runs mmsegmentation's multi-scale + flip test: scales
0.5, 0.75, 1.0, 1.25, 1.5, 1.75 x the test scale, each also flipped, softmax probabilities averaged.
mIoU is mmsegmentation's ``IoUMetric``: intersection and union of each class summed over the whole
split, IoU per class, mean over the classes with a non-empty union; aAcc is the pixel accuracy.

A ``--checkpoint``, a ``--limit`` run, a ``--test-scale`` override and a split other than the
full val set are reported without PASS/FAIL.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__:  # imported as eval.<script> (the tests)
    from . import flags
else:  # run as a script (python eval/<script>.py, torchrun): its folder is the first entry of sys.path
    import flags


def build_parser() -> argparse.ArgumentParser:
    parser = flags.make_parser(__doc__, batch_size=1, tolerance=0.2)
    parser.add_argument("--aug", choices=("none", "ms_flip"), default="none",
                        help="ms_flip: mmsegmentation's multi-scale (0.5-1.75) + flip test, compared with the "
                             "published ms+flip mIoU")
    parser.add_argument("--split", default="val", help="split folder (default val; ADE20K's is called validation)")
    parser.add_argument("--test-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="override the tag's keep-ratio test scale (quick checks; reported without PASS/FAIL)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch and the extras are imported

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from gczoo.registry import model_entry, split_name, weights_entry

if __package__:  # imported as eval.<script> (the tests)
    from . import common
else:  # run as a script (python eval/<script>.py, torchrun): its folder is the first entry of sys.path
    import common

BadInput = common.BadInput

FAMILY = "segmentation"
TASKS = {"cityscapes": "cityscapes-val", "ade20k": "ade20k-val"}
FULL_SET = {"cityscapes": 500, "ade20k": 2000}
IGNORE = 255
#: mmsegmentation's multi-scale test ratios (of the test scale); each scale also runs flipped.
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
#: Cityscapes label id -> train id (cityscapesScripts' labels.py; every other id is ignored).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


# --------------------------------------------------------------------------- data

@dataclass
class Sample:
    image: Path
    label: Path
    label_kind: str  # "trainIds" | "labelIds" (Cityscapes) | "ade20k"


def detect_dataset(root: Path) -> Tuple[str, Path]:
    """``("cityscapes" | "ade20k", dataset root)`` from the folder layout; bad input otherwise."""
    if not root.is_dir():
        raise BadInput(f"--data {root} does not exist or is not a directory.")
    if (root / "leftImg8bit").is_dir():
        return "cityscapes", root
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return "ade20k", candidate
    raise BadInput(f"--data {root} is neither a Cityscapes root (leftImg8bit/ and gtFine/) nor an ADE20K root "
                   f"(ADEChallengeData2016 with images/ and annotations/).")


def list_samples(dataset: str, root: Path, split: str, limit: Optional[int]) -> List[Sample]:
    """Image / label pairs in sorted order (the first ``limit``), every label checked to exist."""
    if dataset == "cityscapes":
        images_dir, labels_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        images = sorted(images_dir.glob("*/*_leftImg8bit.png"))
    else:
        split = {"val": "validation"}.get(split, split)
        images_dir, labels_dir = root / "images" / split, root / "annotations" / split
        images = sorted(images_dir.glob("*.jpg"))
    if not images:
        pattern = "<city>/*_leftImg8bit.png" if dataset == "cityscapes" else "*.jpg"
        raise BadInput(f"No images in {images_dir} (expected {pattern}).")
    images = images[:limit]
    samples, missing = [], []
    for image in images:
        if dataset == "cityscapes":
            stem = image.name[: -len("_leftImg8bit.png")]
            train_ids = labels_dir / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
            label_ids = labels_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
            found = next(((p, k) for p, k in ((train_ids, "trainIds"), (label_ids, "labelIds")) if p.is_file()), None)
            want = train_ids
        else:
            want = labels_dir / f"{image.stem}.png"
            found = (want, "ade20k") if want.is_file() else None
        if found is None:
            missing.append(str(want))
        else:
            samples.append(Sample(image, *found))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        also = " (or *_gtFine_labelIds.png)" if dataset == "cityscapes" else ""
        raise BadInput(f"{len(missing)} label map(s) missing: {', '.join(missing[:3])}{more}{also}.")
    return samples


def to_train_ids(label: np.ndarray, kind: str, num_classes: int, path: Path) -> np.ndarray:
    """Class indices 0..num_classes-1 with :data:`IGNORE` for ignored pixels; bad values are named."""
    if kind == "labelIds":
        table = np.full(256, IGNORE, dtype=np.uint8)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            table[label_id] = train_id
        return table[label]
    if kind == "ade20k":  # reduce_zero_label: 0 -> ignore, k -> k - 1
        label = label.astype(np.int64) - 1
        label[label < 0] = IGNORE
        label = label.astype(np.uint8)
    bad = (label != IGNORE) & (label >= num_classes)
    if bad.any():
        raise BadInput(f"{path} holds label {int(label[bad].max()) + (1 if kind == 'ade20k' else 0)}, outside the "
                       f"{num_classes} classes of the model (and not the ignore value {IGNORE}); is it a label map of "
                       f"this dataset?")
    return label


def read_sample(sample: Sample, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(image uint8 (H, W, 3), label uint8 (H, W) of class indices or IGNORE)``; :class:`BadInput`
    naming the file when it cannot be decoded, is not a label map, or holds values outside the classes."""
    try:
        with Image.open(sample.image) as pil:
            image = np.asarray(pil.convert("RGB"))
        with Image.open(sample.label) as pil:
            if pil.mode not in ("L", "P"):
                raise BadInput(f"{sample.label} is a {pil.mode} image; a label map is single-channel (L or P)")
            label = np.asarray(pil)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadInput(f"cannot read {sample.image} / {sample.label}: {err}") from None
    if label.shape != image.shape[:2]:
        raise BadInput(f"label map {sample.label} is {label.shape[1]}x{label.shape[0]}, its image "
                       f"{sample.image} is {image.shape[1]}x{image.shape[0]}")
    return image, to_train_ids(label, sample.label_kind, num_classes, sample.label)


class SegmentationSamples(Dataset):
    """``(image uint8 (3, H, W), label (H, W) int64, index, error)``; an unusable file yields its error."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], num_classes: int):
        self.samples, self.indices, self.num_classes = samples, indices, num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            image, label = read_sample(self.samples[index], self.num_classes)
        except BadInput as err:
            return torch.zeros(3, 1, 1, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.int64), index, str(err)
        return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(label.astype(np.int64)), index, ""


def _collate(batch):
    return tuple(zip(*batch))


# --------------------------------------------------------------------------- inference and metric

def rescale_size(height: int, width: int, scale: Sequence[int]) -> Tuple[int, int]:
    """mmcv's keep-ratio ``rescale_size``: long side <= max(scale), short side <= min(scale), ``int(x + 0.5)``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def predict_probabilities(model: torch.nn.Module, image: torch.Tensor, scales: Sequence[Sequence[int]], flip: bool,
                          mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` at the image's size: logits for one scale without flip, else averaged softmax."""
    height, width = image.shape[-2:]
    pixels = image.float()[None] / 255
    total = None
    runs = 0
    for scale in scales:
        size = rescale_size(height, width, scale)
        x = pixels if size == (height, width) else F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        x = (x - mean) / std
        for flipped in ((False, True) if flip else (False,)):
            logits = model(x.flip(-1) if flipped else x)["out"]
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=model.align_corners)[0]
            if len(scales) == 1 and not flip:
                return logits
            probs = logits.float().softmax(0)
            total = probs if total is None else total + probs
            runs += 1
    return total / runs


def area_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(4, C)`` pixel counts: intersection, union, predicted, labelled per class (ignored pixels left out)."""
    keep = label != IGNORE
    pred, label = pred[keep], label[keep]
    intersect = torch.bincount(pred[pred == label], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_label = torch.bincount(label, minlength=num_classes)
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label]).cpu()


def miou_of(counts: torch.Tensor) -> Dict[str, object]:
    """mIoU, aAcc (percent) and per-class IoU (``None`` where the union is empty) from summed counts."""
    intersect, union, _, area_label = counts.double()
    iou = intersect / union
    present = union > 0
    return {"miou": float(iou[present].mean() * 100) if present.any() else float("nan"),
            "aacc": float(intersect.sum() / area_label.sum() * 100),
            "per_class_iou": [round(float(v) * 100, 4) if p else None for v, p in zip(iou, present)]}


def predict(model: torch.nn.Module, samples: List[Sample], scales, flip: bool, num_classes: int,
            args: argparse.Namespace, dist: common.Distributed) -> Tuple[torch.Tensor, float]:
    """Summed ``(4, C)`` counts over every sample (all ranks together) and images per second."""
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], device=dist.device).reshape(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=dist.device).reshape(1, 3, 1, 1)
    dataset = SegmentationSamples(samples, dist.shard(len(samples)), num_classes)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=_collate)
    local: Dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels, indices, errors in common.progress(loader, total=len(loader), desc="segmentation", dist=dist):
            bad = next((e for e in errors if e), None)
            if bad:
                raise BadInput(bad)
            for image, label, index in zip(images, labels, indices):  # one image per forward (sizes differ)
                with common.autocast(dist.device, args.amp):
                    scores = predict_probabilities(model, image.to(dist.device), scales, flip, mean, std)
                local[index] = area_counts(scores.argmax(0), label.to(dist.device), num_classes)
    gathered = dist.gather(local, len(samples))
    seconds = time.perf_counter() - start
    return torch.stack([gathered[i] for i in range(len(samples))]).sum(0), len(samples) / seconds


# --------------------------------------------------------------------------- one weights tag

def _check_model(name: str, dataset: str) -> None:
    arch, tag = split_name(name)
    if model_entry(arch)["family"] != FAMILY:
        raise BadInput(f"{arch} is not a segmentation model; `gczoo list '*_d8'` lists them.")
    tag, entry = weights_entry(arch, tag)
    if entry["segmentation"]["dataset"] != dataset:
        raise BadInput(f"{arch}.{tag} is a model of {entry['segmentation']['dataset']}, but --data holds {dataset}; "
                       f"pick a tag of {dataset} (`gczoo info {arch}`).")


def evaluate_weights(name: str, dataset: str, samples: List[Sample], args: argparse.Namespace,
                     dist: common.Distributed) -> dict:
    """Measure one weights tag; one report record, printed on rank 0."""
    _check_model(name, dataset)
    arch, tag = split_name(name)
    tag, entry = weights_entry(arch, tag)
    loaded = common.load_model(f"{arch}.{tag}", dist.device, checkpoint=args.checkpoint)
    model = loaded.model
    test_scale = tuple(args.test_scale or entry["segmentation"]["test_scale"])
    flip = args.aug == "ms_flip"
    scales = [(int(test_scale[0] * r), int(test_scale[1] * r)) for r in MS_RATIOS] if flip else [test_scale]
    counts, speed = predict(model, samples, scales, flip, model.num_classes, args, dist)
    result = miou_of(counts)
    key = "miou_ms_flip" if flip else "miou"
    metrics = {key: result["miou"], "aacc": result["aacc"]}
    note = common.no_verdict_reason(args, len(samples), FULL_SET[dataset], f"{dataset} val")
    if note is None and args.test_scale:
        note = f"test scale {test_scale} instead of the tag's {tuple(entry['segmentation']['test_scale'])}: not compared"
    published = [] if args.checkpoint else common.published_metrics(loaded.name, TASKS[dataset])
    comparisons = [] if note else common.compare({key: result["miou"]}, published, args.tolerance)
    classes = model.meta["classes"] or [str(i) for i in range(model.num_classes)]
    rec = common.record(loaded, task=TASKS[dataset], metrics=metrics, comparisons=comparisons,
                        protocol=_protocol(args, entry, test_scale, scales, flip), dist=dist, samples=len(samples),
                        limit=args.limit, note=note or (None if comparisons else "no published number to compare"),
                        per_class_iou=dict(zip(classes, result["per_class_iou"])), images_per_s=round(speed, 3))
    if dist.is_main:
        print(_describe(rec, key), flush=True)
    return rec


def _protocol(args, entry, test_scale, scales, flip) -> dict:
    seg = entry["segmentation"]
    return {"split": args.split, "test_scale": list(test_scale), "keep_ratio": True,
            "test_mode": seg["test_mode"] if seg["test_mode"] == "whole" else
            f"slide (crop {tuple(seg['crop_size'])}, stride {tuple(seg['stride'])})",
            "aug": f"multi-scale {[list(s) for s in scales]} + flip, softmax averaged" if flip else "single scale",
            "metric": "mIoU over classes with a non-empty union (intersection / union summed over the split), aAcc"}


def _describe(rec: dict, key: str) -> str:
    name = f"{rec['model']}.{rec['tag']}" if rec["tag"] else rec["model"]
    lines = [f"{name}: {'mIoU (ms+flip)' if key == 'miou_ms_flip' else 'mIoU'} {rec[key]:.2f}, aAcc {rec['aacc']:.2f} "
             f"on {rec['samples']} images, {rec['device']}"]
    rows = [(c, "-" if v is None else f"{v:.2f}") for c, v in rec["per_class_iou"].items()]
    lines.append(common.format_table(("class", "IoU"), rows))
    for c in rec["published"]:
        lines.append(f"  {c['verdict']}: published " + ", ".join(f"{k} {v}" for k, v in c["values"].items())
                     + "; delta " + ", ".join(f"{k} {v:+.2f}" for k, v in c["delta"].items()) + f" ({c['source']})")
    if rec["note"]:
        lines.append(f"  no verdict: {rec['note']}")
    return "\n".join(lines)


def run(args: argparse.Namespace, dist: common.Distributed) -> int:
    if args.test_scale is not None and (len(args.test_scale) != 2 or min(args.test_scale) < 1):
        raise BadInput(f"--test-scale takes two positive sizes (long side, short side), got {args.test_scale}.")
    dataset, root = detect_dataset(args.data)
    if args.model is not None:
        names = [args.model]
    else:
        names = common.weights_with_metrics(TASKS[dataset])
    for name in names:  # a wrong model name fails before the data is read
        _check_model(name, dataset)
    samples = list_samples(dataset, root, args.split, args.limit)
    records, errors = common.evaluate_each(names, lambda name: [evaluate_weights(name, dataset, samples, args, dist)],
                                           dist, keep_going=args.model is None)
    return common.finish(records, errors, args.json_out, dist)


if __name__ == "__main__":
    sys.exit(common.main(run, build_parser()))
