"""Train a GCNet / NLNet segmentation model on Cityscapes, ADE20K or your own data in their layout, with the upstream recipe.

    python train/segmentation.py --model gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k --data /data/cityscapes --out runs/gc50 --pretrained
    torchrun --nproc-per-node 4 train/segmentation.py --model gcnet_resnet50_d8.mmseg_cityscapes_512x1024_40k --data /data/cityscapes --out runs/gc50
    python train/segmentation.py --model gcnet_resnet50_d8 --data shapes/seg --num-classes 4 --scale 128 64 --crop-size 64 64 --out runs/shapes

**Data**: the layouts ``eval/segmentation.py`` reads, train split (``leftImg8bit/train``,
``gtFine/train``; ``images/training``, ``annotations/training``); the val split, when present, is
evaluated every ``--eval-every`` iterations with the eval script's own code (single scale, the
run's ``--scale``). ``--num-classes K`` for your own classes (label maps hold 0..K-1 and 255).

**Recipe** (the tag's, manifest ``recipes``; mmsegmentation's GCNet configs): SGD momentum 0.9,
weight decay 5e-4, lr 0.01 for a total batch of 8 (Cityscapes) or 16 (ADE20K), poly decay (power
0.9) to 1e-4, 40k-160k iterations, all scaled to your total batch (see ``train/common.py``);
decode-head cross-entropy plus 0.4 x the auxiliary FCN head's (``gczoo.losses``, weights from the
recipe's ``loss_weights``); BatchNorm trained everywhere, SyncBN under ``torchrun`` on GPUs.
``--pretrained-backbone`` starts as the paper did, from the ImageNet ResNet-V1c the config names. Augmentation: random resize of the recipe scale by 0.5-2.0 (keep ratio),
random crop (``cat_max_ratio`` 0.75), flip 0.5, photometric distortion (``train/augment.py``);
batches padded to the crop size (image 0 after normalisation, label 255).
"""
from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import Dataset

if __package__:  # imported as train.<script> (the tests)
    from . import augment, common
else:  # run as a script: its folder is the first entry of sys.path
    import common
    import augment

from eval import segmentation as seg_eval  # noqa: E402  (common put the clone on sys.path)
from gczoo.losses import segmentation_losses  # noqa: E402
from gczoo.registry import create_model, split_name, weights_entry  # noqa: E402

BadInput = common.BadInput
TASK = "segmentation"


class SegmentationTrainSet(Dataset):
    """``(image uint8 (3, h, w), label int64 (h, w), error)`` of ``(sample index, seed)``: the
    recipe's augmentation drawn from ``default_rng(seed)``; an unusable file yields its error."""

    def __init__(self, samples: List[seg_eval.Sample], num_classes: int, pipeline: dict):
        self.samples, self.num_classes, self.pipeline = samples, num_classes, pipeline

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key
        try:
            image, label = seg_eval.read_sample(self.samples[index], self.num_classes)
        except BadInput as err:
            return torch.zeros(3, 1, 1, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.int64), str(err)
        rng, p = np.random.default_rng(seed), self.pipeline
        image, label = augment.random_resize(rng, image, label, p["scale"], p["ratio_range"])
        image, label = augment.random_crop(rng, image, label, p["crop_size"], p["cat_max_ratio"])
        image, label = augment.random_flip(rng, image, label, p["flip"])
        if p.get("photometric_distortion"):
            image = augment.photometric_distortion(rng, image)
        return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                torch.from_numpy(label.astype(np.int64)), "")


def collate(batch):
    bad = next((e for *_, e in batch if e), None)
    if bad:
        return bad
    return [b[0] for b in batch], [b[1] for b in batch]


def make_step(crop_size, mean: torch.Tensor, std: torch.Tensor, device: torch.device):
    """Normalise, pad to the crop size (image 0 after normalisation, label 255), mmseg's losses
    unweighted (``train/common.py`` applies the recipe's ``loss_weights``)."""
    def step(model, batch) -> Dict[str, torch.Tensor]:
        images, labels = batch
        height, width = max(crop_size[0], *(i.shape[1] for i in images)), max(crop_size[1], *(i.shape[2] for i in images))
        x = torch.zeros(len(images), 3, height, width, device=device)
        y = torch.full((len(images), height, width), seg_eval.IGNORE, dtype=torch.int64, device=device)
        for k, (image, label) in enumerate(zip(images, labels)):
            h, w = image.shape[1:]
            x[k, :, :h, :w] = (image.to(device).float() / 255 - mean) / std
            y[k, :h, :w] = label.to(device)
        return segmentation_losses(model(x), y, ignore_index=seg_eval.IGNORE, aux_weight=1.0)
    return step


def make_evaluate(dataset: str, root, num_classes: int, scale, args: argparse.Namespace, dist: common.Distributed):
    """mIoU on the val split with ``eval/segmentation.py``'s own inference and metric (``{}`` without one)."""
    try:
        samples = seg_eval.list_samples(dataset, root, "val", args.eval_limit)
    except BadInput:
        return lambda model: {}
    options = SimpleNamespace(batch_size=1, workers=0, amp=args.amp)

    def evaluate(model) -> dict:
        counts, _ = seg_eval.predict(model, samples, [tuple(scale)], False, num_classes, options, dist)
        result = seg_eval.miou_of(counts)
        return {"miou": result["miou"], "aacc": result["aacc"], "val_samples": len(samples)}
    return evaluate


def run(args: argparse.Namespace, dist: common.Distributed) -> int:
    if common.model_family(args.model) != "segmentation":
        raise BadInput(f"{args.model} is not a segmentation model; `gczoo list '*_d8'` lists them.")
    recipe_name, recipe = common.recipe_for(args.model, args.recipe, TASK)
    arch, tag = split_name(args.model)
    tag, entry = weights_entry(arch, tag)
    for flag in ("scale", "crop_size"):
        value = getattr(args, flag)
        if value is not None and min(value) < 1:
            raise BadInput(f"--{flag.replace('_', '-')} takes two positive sizes, got {value}.")
    if args.num_classes is not None and not 1 <= args.num_classes < seg_eval.IGNORE:
        raise BadInput(f"--num-classes must be 1..{seg_eval.IGNORE - 1}, got {args.num_classes}.")
    num_classes = args.num_classes or entry["pretrained_cfg"]["num_classes"]
    dataset, root = seg_eval.detect_dataset(args.data)
    samples = seg_eval.list_samples(dataset, root, "train", None)
    pipeline = dict(recipe["pipeline"])
    pipeline.update({k: list(v) for k, v in (("scale", args.scale), ("crop_size", args.crop_size)) if v is not None})
    build_args = {"num_classes": num_classes, **args.model_kwargs}
    model = create_model(f"{arch}.{tag}", pretrained=args.pretrained, pretrained_backbone=args.pretrained_backbone,
                         aux_loss=True, **build_args)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], device=dist.device).reshape(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=dist.device).reshape(1, 3, 1, 1)
    images = [s.image for s in samples] + [s.label for s in samples]
    job = common.Job(
        name=f"{arch}.{tag}", model=model, dataset=SegmentationTrainSet(samples, num_classes, pipeline), collate=collate,
        step=make_step(pipeline["crop_size"], mean, std, dist.device),
        evaluate=make_evaluate(dataset, root, num_classes, pipeline["scale"], args, dist),
        recipe_name=recipe_name, recipe=recipe, build_args=build_args,
        data_digest=common.file_list_digest(images, root), num_samples=len(samples),
        keep_keys=lambda key: not key.startswith("aux_classifier."))  # inference models carry no auxiliary head
    return common.train(job, args, dist)


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, task=TASK)
    parser.add_argument("--num-classes", type=int, metavar="K", help="classes of your data (default: the tag's)")
    parser.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="the recipe's resize scale (random resize base and test scale), e.g. for small images")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="the recipe's random crop size")
    return parser


if __name__ == "__main__":
    sys.exit(common.main(run, build_parser()))
