"""Write a known-answer data set: coloured shapes on noise, with exact masks and boxes.

    python train/make_shapes.py --out shapes --train 200 --val 50 --size 64

``OUT/coco`` is in COCO layout (``train2017/``, ``val2017/``, ``annotations/instances_*.json``;
categories ``square``, ``disc``, ``triangle`` with ids 10, 20, 30, masks as RLE of the exact
pixels, boxes their extents) for ``train/detection.py``; ``OUT/cityscapes`` is in Cityscapes
layout (``leftImg8bit/``, ``gtFine/*_labelTrainIds.png``: 0 background, 1 square, 2 disc,
3 triangle) for ``train/segmentation.py --num-classes 4``. Each image holds 1-3 shapes that do not
touch, each shape class in its own hue (jittered), on uniform noise; the same ``--seed`` writes
the same files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 10, "name": "square"}, {"id": 20, "name": "disc"}, {"id": 30, "name": "triangle"}]
COLOURS = np.array([[220, 60, 40], [40, 200, 70], [50, 80, 230]])


def draw_shape(kind: int, size: int, box) -> np.ndarray:
    """Boolean mask of one shape inside ``box`` (x0, y0, side) of an image ``size`` x ``size``."""
    x0, y0, side = box
    canvas = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(canvas)
    if kind == 0:
        pen.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=1)
    elif kind == 1:
        pen.ellipse([x0, y0, x0 + side - 1, y0 + side - 1], fill=1)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0 + side - 1, y0 + side - 1), (x0, y0 + side - 1)], fill=1)
    return np.asarray(canvas, dtype=bool)


def make_image(rng: np.random.Generator, size: int):
    """``(image uint8 (size, size, 3), label map, [(category index, mask)])``."""
    image = rng.integers(0, 256, (size, size, 3)).astype(np.float32) * 0.5 + 64
    label = np.zeros((size, size), np.uint8)
    taken = np.zeros((size, size), bool)
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            side = int(rng.integers(size // 5, size // 2))
            x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
            if not taken[max(y0 - 2, 0):y0 + side + 2, max(x0 - 2, 0):x0 + side + 2].any():
                break
        else:
            continue
        kind = int(rng.integers(3))
        mask = draw_shape(kind, size, (x0, y0, side))
        taken[y0:y0 + side, x0:x0 + side] = True
        image[mask] = np.clip(COLOURS[kind] + rng.normal(0, 12, 3), 0, 255)
        label[mask] = kind + 1
        shapes.append((kind, mask))
    return image.round().astype(np.uint8), label, shapes


def write_split(rng: np.random.Generator, out: Path, split: str, count: int, size: int) -> None:
    from pycocotools import mask as mask_util

    coco_split = {"train": "train2017", "val": "val2017"}[split]
    images_dir = out / "coco" / coco_split
    seg_images = out / "cityscapes" / "leftImg8bit" / split / "shapes"
    seg_labels = out / "cityscapes" / "gtFine" / split / "shapes"
    for folder in (images_dir, seg_images, seg_labels, out / "coco" / "annotations"):
        folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n in range(count):
        image, label, shapes = make_image(rng, size)
        name = f"shapes_{split}_{n:05d}"
        Image.fromarray(image).save(images_dir / f"{name}.png")
        Image.fromarray(image).save(seg_images / f"{name}_leftImg8bit.png")
        Image.fromarray(label).save(seg_labels / f"{name}_gtFine_labelTrainIds.png")
        images.append({"id": n + 1, "file_name": f"{name}.png", "height": size, "width": size})
        for kind, mask in shapes:
            ys, xs = np.nonzero(mask)
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": CATEGORIES[kind]["id"],
                                "bbox": box, "area": int(mask.sum()), "iscrowd": 0,
                                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")}})
    document = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (out / "coco" / "annotations" / f"instances_{coco_split}.json").write_text(json.dumps(document))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (at least 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 32 or args.train < 1 or args.val < 0:
        parser.error("--size must be at least 32, --train at least 1, --val at least 0")
    rng = np.random.default_rng(args.seed)
    write_split(rng, args.out, "train", args.train, args.size)
    if args.val:
        write_split(rng, args.out, "val", args.val, args.size)
    print(f"wrote {args.train} + {args.val} images of {args.size} px to {args.out / 'coco'} and {args.out / 'cityscapes'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
