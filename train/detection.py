"""Train a GC Mask R-CNN / Cascade Mask R-CNN on COCO-format data with the upstream recipe.

    python train/detection.py --model maskrcnn_resnet50_fpn_gc_r16.mmdet_1x_coco --data /data/coco --out runs/gc_r16 --pretrained
    torchrun --nproc-per-node 8 train/detection.py --model maskrcnn_resnet50_fpn_gc_r16.mmdet_1x_coco --data /data/coco --out runs/gc_r16
    python train/detection.py --model maskrcnn_resnet50_fpn_gc_r16 --data shapes/coco --scale 64 64 --out runs/shapes

**Data**: ``ROOT/train2017/`` with ``ROOT/annotations/instances_train2017.json`` (COCO instances
format: boxes and polygon or RLE masks); the val split ``eval/coco.py`` reads (``val2017``), when
present, is evaluated every ``--eval-every`` iterations (default: every epoch) with that script's
own code. The classes are the annotation file's ``categories``, in file order: class ``k`` of the
model is the ``k``-th category, and the model reports (and the val split is scored in) the
categories' own ids. As mmdetection's ``CocoDataset``: crowd annotations are ignored, boxes that
are empty, under 1 px or outside the image are dropped, images without a remaining box or
smaller than the recipe's ``min_size`` are left out; every drop is counted in the log. A
``category_id`` outside the declared categories, a malformed box and an image that cannot be
decoded are errors that name the annotation or file.

**Recipe** (the tag's, manifest ``recipes``; mmdetection's GCNet 1x configs): SGD lr 0.02 for a
total batch of 16, momentum 0.9, weight decay 1e-4, linear warmup over 500 iterations from 0.001,
12 epochs with the rate x0.1 after epochs 8 and 11, all scaled to your total batch (see
``train/common.py``); keep-ratio resize to (1333, 800) (the model's own transform; ``--scale``
changes it, and is stored with the weights), horizontal flip 0.5. The losses are the model's own
train-mode losses (mmdetection's assigners, samplers and losses) times the recipe's
``loss_weights`` (a cascade's stages also by its ``stage_loss_weights``).

**Start and norms**: ``--pretrained-backbone`` starts as the paper did (the ImageNet ResNet the
config names, GC blocks as identity), ``--pretrained`` fine-tunes the tag's detector. Either way
the stem and stage 1 are frozen (``frozen_stages=1``) and the backbone norms follow the recipe:
statistics frozen with the affine trained (``BN``, ``norm_eval=True``) or trained, synchronised
under ``torchrun`` on GPUs (``SyncBN``). From a random start nothing is frozen and the norms train
(frozen statistics of a random model are the identity, and its losses explode).
"""
from __future__ import annotations

import argparse
import hashlib
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

from eval import coco as coco_eval  # noqa: E402  (common put the clone on sys.path)
from gczoo.registry import create_model, split_name, weights_entry  # noqa: E402
from gczoo.models.detection import TRAINING_ONLY_ARGS  # noqa: E402

BadInput = common.BadInput
TASK = "detection"


def categories_of(coco, annotations) -> List[int]:
    """The declared category ids in file order; bad input when missing or repeated."""
    cats = coco.dataset.get("categories")
    if not isinstance(cats, list) or not cats or not all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in cats):
        raise BadInput(f"{annotations}: 'categories' must be a non-empty list of entries with integer 'id's.")
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise BadInput(f"{annotations}: category ids repeat ({sorted(i for i in set(ids) if ids.count(i) > 1)}).")
    return ids


def training_instances(coco, ids: List[int], categories: List[int], min_size: int, annotations) -> tuple:
    """``({image id: [annotations kept]}, counts)`` with mmdetection's ``CocoDataset`` filters."""
    declared = set(categories)
    counts = {"images": len(ids), "crowd_ignored": 0, "boxes_dropped_degenerate": 0, "images_without_boxes": 0,
              "images_under_min_size": 0}
    kept: Dict[int, list] = {}
    for image_id in ids:
        info = coco.imgs[image_id]
        width, height = info["width"], info["height"]
        anns = []
        for ann in coco.imgToAnns.get(image_id, []):
            box = ann.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise BadInput(f"{annotations}: annotation {ann.get('id')} (image {image_id}) has bbox {box!r}; "
                               "expected [x, y, width, height].")
            if ann.get("category_id") not in declared:
                raise BadInput(f"{annotations}: annotation {ann.get('id')} (image {image_id}) has category_id "
                               f"{ann.get('category_id')!r}, not among the declared categories {categories}; add it "
                               "to 'categories' or remove the annotation.")
            if ann.get("iscrowd"):
                counts["crowd_ignored"] += 1
                continue
            x, y, w, h = box
            inter_w = max(0, min(x + w, width) - max(x, 0))
            inter_h = max(0, min(y + h, height) - max(y, 0))
            if inter_w * inter_h == 0 or ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                counts["boxes_dropped_degenerate"] += 1
                continue
            if "segmentation" not in ann:
                raise BadInput(f"{annotations}: annotation {ann.get('id')} (image {image_id}) has no 'segmentation'; "
                               "Mask R-CNN trains on masks (polygons or RLE).")
            anns.append(ann)
        if min(width, height) < min_size:
            counts["images_under_min_size"] += 1
        elif not anns:
            counts["images_without_boxes"] += 1
        else:
            kept[image_id] = anns
    counts["images_used"] = len(kept)
    return kept, counts


class DetectionTrainSet(Dataset):
    """``(image float (3, H, W) in 0-1, target, error)`` of ``(sample index, seed)``: boxes (x1, y1,
    x2, y2), labels (category ids), masks; flipped with the recipe's probability."""

    def __init__(self, coco, folder, image_ids: List[int], instances: Dict[int, list], flip: float):
        self.coco, self.folder, self.image_ids, self.instances, self.flip = coco, folder, image_ids, instances, flip

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key):
        index, seed = key
        image_id = self.image_ids[index]
        try:
            image = coco_eval.read_image(self.folder, self.coco.imgs[image_id])
        except BadInput as err:
            return None, None, f"cannot use image {err}"
        anns = self.instances[image_id]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32)
        try:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
        except Exception as err:  # pycocotools' own errors on a malformed polygon / RLE
            return None, None, f"the masks of image {image_id} cannot be decoded ({type(err).__name__}: {err})"
        if np.random.default_rng(seed).random() < self.flip:
            image, boxes, masks = augment.flip_instances(image, boxes, masks)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels, "masks": masks}, ""


def collate(batch):
    bad = next((e for *_, e in batch if e), None)
    return bad if bad else ([b[0] for b in batch], [b[1] for b in batch])


def make_step(device: torch.device):
    def step(model, batch) -> Dict[str, torch.Tensor]:
        images, targets = batch
        return model([i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
    return step


def make_evaluate(args: argparse.Namespace, categories: List[int], dist: common.Distributed):
    """Box and mask AP on ``val2017`` with ``eval/coco.py``'s own inference and scoring (``{}`` without it)."""
    try:
        coco, folder = coco_eval.load_ground_truth(args.data, "val2017", None)
    except BadInput:
        return lambda model: {}
    if [c.get("id") for c in coco.dataset.get("categories", [])] != categories:
        raise BadInput(f"the val annotations' categories differ from the train annotations' {categories}; "
                       "both splits must declare the same categories in the same order.")
    ids = coco_eval.select_images(coco, folder, args.eval_limit)
    options = SimpleNamespace(batch_size=1, workers=0, amp=args.amp)

    def evaluate(model) -> dict:
        results, _ = coco_eval.predict(model, coco, folder, ids, options, dist)
        return {**{m: coco_eval.average_precision(coco, results, ids, m) for m in coco_eval.IOU_TYPES},
                "val_images": len(ids)}
    return evaluate


def set_stage_loss_weights(model, recipe_name: str, recipe: dict) -> None:
    """A cascade's per-stage loss weights from the recipe (mmdetection's ``stage_loss_weights``)."""
    weights, heads = recipe.get("stage_loss_weights"), model.roi_heads
    if weights is None and not hasattr(heads, "stage_loss_weights"):
        return
    if weights is None or len(weights) != len(getattr(heads, "stage_loss_weights", ())):
        raise BadInput(f"recipe {recipe_name!r} is for a {'cascade' if weights else 'single-stage'} RoI head, the "
                       f"model's is not; pass a --recipe of this kind of model.")
    heads.stage_loss_weights = tuple(float(w) for w in weights)


def run(args: argparse.Namespace, dist: common.Distributed) -> int:
    if common.model_family(args.model) != "maskrcnn":
        raise BadInput(f"{args.model} is not a detection model; `gczoo list 'maskrcnn*'` lists them.")
    if args.scale is not None and min(args.scale) < 1:
        raise BadInput(f"--scale takes two positive sizes, got {args.scale}.")
    recipe_name, recipe = common.recipe_for(args.model, args.recipe, TASK)
    arch, tag = split_name(args.model)
    tag, _ = weights_entry(arch, tag)
    pipeline = recipe["pipeline"]
    coco, folder = coco_eval.load_ground_truth(args.data, "train2017", None)
    annotations = args.data / "annotations" / "instances_train2017.json"
    categories = categories_of(coco, annotations)
    ids = coco_eval.select_images(coco, folder, None)
    instances, counts = training_instances(coco, ids, categories, pipeline["min_size"], annotations)
    if not instances:
        raise BadInput(f"{annotations}: no image keeps a usable box ({counts}).")
    long_side, short_side = args.scale or pipeline["resize"]
    training_args = {k: v for k, v in args.model_kwargs.items() if k in TRAINING_ONLY_ARGS}
    build_args = {"num_classes": len(categories) + 1, "label_ids": categories, "min_size": short_side,
                  "max_size": long_side, **{k: v for k, v in args.model_kwargs.items() if k not in training_args}}
    from_file = bool(args.pretrained or args.pretrained_backbone)
    model = create_model(f"{arch}.{tag}", pretrained=args.pretrained, pretrained_backbone=args.pretrained_backbone,
                         backbone_norm=("trainable" if recipe["norm"] == "syncbn" or not from_file else "frozen_stats"),
                         frozen_stages=recipe.get("frozen_stages", -1) if from_file else -1, **build_args,
                         **training_args)
    set_stage_loss_weights(model, recipe_name, recipe)
    image_ids = sorted(instances)
    digest = hashlib.sha256(annotations.read_bytes()).hexdigest()[:16] + ":" + common.file_list_digest(
        [folder / coco.imgs[i]["file_name"] for i in image_ids], folder)
    job = common.Job(
        name=f"{arch}.{tag}", model=model, dataset=DetectionTrainSet(coco, folder, image_ids, instances, pipeline["flip"]),
        collate=collate, step=make_step(dist.device), evaluate=make_evaluate(args, categories, dist),
        recipe_name=recipe_name, recipe=recipe, build_args=build_args, training_args=training_args, data_digest=digest,
        num_samples=len(image_ids), counts=counts,
        keep_keys=lambda key: not key.endswith("num_batches_tracked"))  # the inference model's norms are frozen
    if dist.is_main:
        print(f"{annotations}: {counts}", file=sys.stderr, flush=True)
    return common.train(job, args, dist)


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, task=TASK)
    parser.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="keep-ratio resize limits of the model's transform (default: the recipe's 1333 800)")
    return parser


if __name__ == "__main__":
    sys.exit(common.main(run, build_parser()))
