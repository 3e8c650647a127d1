"""Evaluate the zoo's COCO Mask R-CNN weights on val2017 and check mmdetection's published box/mask AP.

    python eval/coco.py --model maskrcnn_resnet50_fpn_gc_r16 --data /data/coco
    python eval/coco.py --all --data /data/coco --json-out coco.json
    torchrun --nproc-per-node 8 eval/coco.py --all --data /data/coco

Exit code: 0 PASS (or nothing to compare), 1 FAIL, 2 bad input.

**Data.** ``--data`` holds ``val2017/`` (the images) and ``annotations/instances_val2017.json``
(``--split`` picks another split, ``--annotations`` another file). Images are taken in image-id
order, so ``--limit N`` evaluates the same first N images every time.

**Protocol** (mmdetection 2.x's test pipeline, as the published numbers were made): one image
per forward (``--batch-size 1``: a larger batch pads images to the largest one, and a GC block's
global context pools over the padding), float32 (``--amp``: float16 autocast on a GPU), the
model's own resize / normalisation / thresholds (see :mod:`gczoo.models.detection`), boxes as
``[x, y, w, h]`` with the detection score, masks thresholded at ``model.meta["mask_threshold"]``
and RLE-encoded, both scored with pycocotools' ``COCOeval`` (AP@[.50:.95], all areas, 100
detections). Labels are COCO category ids already.

**Saved detections.** ``--save-predictions FILE`` writes the detections as a COCO results list
(each entry with ``bbox`` and ``segmentation``); ``--predictions FILE [FILE ...]`` scores such
files instead of running the model (also mmdetection's ``*.bbox.json`` / ``*.segm.json``), and
compares them with the published numbers of ``--model``.

A ``--checkpoint``, a ``--limit`` run, and a split other than the 5000 images of val2017 are
reported without PASS/FAIL.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__:  # imported as eval.<script> (the tests)
    from . import flags
else:  # run as a script (python eval/<script>.py, torchrun): its folder is the first entry of sys.path
    import flags


def build_parser() -> argparse.ArgumentParser:
    parser = flags.make_parser(__doc__, batch_size=1, tolerance=0.2)
    parser.add_argument("--split", default="val2017", help="image folder and annotation name (default val2017)")
    parser.add_argument("--annotations", type=Path, metavar="FILE",
                        help="instances annotation file (default: COCO_ROOT/annotations/instances_SPLIT.json)")
    parser.add_argument("--save-predictions", type=Path, metavar="FILE", help="write the detections as COCO results JSON")
    parser.add_argument("--predictions", type=Path, nargs="+", metavar="FILE",
                        help="score saved COCO results (ours, or mmdetection's .bbox.json/.segm.json) instead of "
                             "running the model")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch and the extras are imported

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from gczoo.fileio import atomic_path
from gczoo.registry import check_name, model_entry, split_name
from gczoo.weights import sha256_of

if __package__:  # imported as eval.<script> (the tests)
    from . import common
else:  # run as a script (python eval/<script>.py, torchrun): its folder is the first entry of sys.path
    import common

try:
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ModuleNotFoundError as _missing:
    sys.exit(common.missing_extra("coco", _missing))

BadInput = common.BadInput

TASK = "coco-2017-val"
NUM_VAL_IMAGES = 5000
FAMILY = "maskrcnn"
#: metric name -> (pycocotools iouType, the result field it scores)
IOU_TYPES = {"box_ap": ("bbox", "bbox"), "mask_ap": ("segm", "segmentation")}


# --------------------------------------------------------------------------- data

def _quiet():
    """pycocotools prints progress on stdout; keep the script's output to its own lines."""
    return contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(data: Path, split: str, annotations: Optional[Path]) -> Tuple[COCO, Path]:
    """The annotations as a pycocotools ``COCO`` object, and the image folder."""
    if not data.is_dir():
        raise BadInput(f"--data {data} does not exist or is not a directory; give the COCO root "
                       f"(with {split}/ and annotations/instances_{split}.json).")
    annotations = annotations or data / "annotations" / f"instances_{split}.json"
    if not annotations.is_file():
        raise BadInput(f"Annotation file {annotations} does not exist. The COCO layout is "
                       f"COCO_ROOT/annotations/instances_{split}.json (or pass --annotations FILE).")
    images = data / split
    if not images.is_dir():
        raise BadInput(f"Image folder {images} does not exist. The COCO layout is COCO_ROOT/{split}/*.jpg.")
    try:
        with open(annotations, "rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BadInput(f"{annotations} is not a COCO instances annotation file ({err.__class__.__name__}: {err}).") from None
    except RecursionError:
        raise BadInput(f"{annotations} is nested too deeply to parse; it is not a COCO instances annotation file.") from None
    problems = annotation_problems(data)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise BadInput(f"{annotations} is not a COCO instances annotation file pycocotools can score safely "
                       f"({len(problems)} problem(s)); fix these entries:\n  {shown}")
    with _quiet():
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    if not coco.getImgIds():
        raise BadInput(f"{annotations} lists no images.")
    return coco, images


#: Coordinates of a box or polygon may lie this many times the image's longer side from its origin
#: (objects cut by the border stay within one side); beyond that pycocotools' C code overflows.
COORDINATE_BOUND = 2
#: Numbers in one polygon (COCO's largest has a few thousand).
MAX_POLYGON_NUMBERS = 100_000


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def region_problem(entry: dict, height: int, width: int, ground_truth: bool = True) -> Optional[str]:
    """What is wrong with an entry's ``bbox`` and ``segmentation`` on an image of ``height`` x ``width``, or None.

    Coordinates must be finite and within :data:`COORDINATE_BOUND` image sides; a box's size not
    negative; an RLE of the image's size. Ground truth may also hold polygons (at least 3, at most
    :data:`MAX_POLYGON_NUMBERS` / 2 points) and uncompressed RLEs (counts covering the image); a result
    only compressed RLEs (what pycocotools' ``loadRes`` reads).
    """
    bound = COORDINATE_BOUND * max(height, width)

    def bad_numbers(numbers) -> bool:
        return not all(_finite(v) and abs(v) <= bound for v in numbers)

    if "bbox" in entry:
        box = entry["bbox"]
        if not (isinstance(box, list) and len(box) == 4) or bad_numbers(box) or box[2] < 0 or box[3] < 0:
            return f"bbox {str(box)[:60]} is not [x, y, width, height] within {bound} pixels of a {width}x{height} image"
    if "segmentation" not in entry:
        return None
    seg = entry["segmentation"]
    if isinstance(seg, list) and ground_truth:
        for poly in seg:
            if not (isinstance(poly, list) and 6 <= len(poly) <= MAX_POLYGON_NUMBERS and len(poly) % 2 == 0):
                return (f"a polygon is not a list of 3 to {MAX_POLYGON_NUMBERS // 2} x, y pairs "
                        f"({str(poly)[:60]})")
            if bad_numbers(poly):
                return (f"a polygon has coordinates that are not finite or lie beyond {bound} pixels of a "
                        f"{width}x{height} image ({str(poly)[:60]})")
        return None
    if isinstance(seg, dict):
        if seg.get("size") != [height, width]:
            return f"the RLE size {str(seg.get('size'))[:40]} is not the image's [{height}, {width}]"
        counts = seg.get("counts")
        if isinstance(counts, str):
            return None
        if (ground_truth and isinstance(counts, list) and all(_integer(c) and c >= 0 for c in counts)
                and sum(counts) == height * width):
            return None
        return ("the RLE counts are neither a compressed string nor run lengths covering the image" if ground_truth
                else "the RLE counts are not a compressed string")
    return f"segmentation is {'neither polygons nor' if ground_truth else 'not'} an RLE"


def annotation_problems(data) -> List[str]:
    """Everything in a COCO instances file that pycocotools would crash on (a segfault in its C code,
    a ``KeyError``) or mis-score silently: the sections, ids, categories, boxes, polygons and RLEs."""
    if not isinstance(data, dict):
        return ["the file holds no object with 'images', 'annotations' and 'categories'"]
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        return [f"no {' / '.join(repr(k) for k in missing)} list (every COCO instances file has all three)"]
    problems: List[str] = []
    sizes: Dict[int, Tuple[int, int]] = {}
    for n, image in enumerate(data["images"]):
        if not (isinstance(image, dict) and _integer(image.get("id"))) or image["id"] in sizes:
            problems.append(f"images[{n}]: no integer 'id' of its own")
            continue
        h, w = image.get("height"), image.get("width")
        sizes[image["id"]] = (h, w) if _integer(h) and _integer(w) and h > 0 and w > 0 else None
    categories = set()
    for n, category in enumerate(data["categories"]):
        if not (isinstance(category, dict) and _integer(category.get("id"))) or category["id"] in categories:
            problems.append(f"categories[{n}]: no integer 'id' of its own")
        else:
            categories.add(category["id"])
    ids = set()
    for n, ann in enumerate(data["annotations"]):
        where = f"annotations[{n}]"
        if not isinstance(ann, dict):
            problems.append(f"{where}: not an object")
            continue
        if not _integer(ann.get("id")) or ann["id"] in ids:
            problems.append(f"{where}: no integer 'id' of its own")
        else:
            ids.add(ann["id"])
        if ann.get("image_id") not in sizes:
            problems.append(f"{where}: image_id {str(ann.get('image_id'))[:30]} is not among the images")
        if ann.get("category_id") not in categories:
            problems.append(f"{where}: category_id {str(ann.get('category_id'))[:30]} is not among the categories")
        if not ("bbox" in ann and "segmentation" in ann and _finite(ann.get("area")) and ann["area"] >= 0):
            problems.append(f"{where}: needs 'bbox', 'segmentation' and a finite 'area' of at least 0")
            continue
        if ann.get("iscrowd", 0) not in (0, 1):
            problems.append(f"{where}: iscrowd is {str(ann.get('iscrowd'))[:20]}, not 0 or 1")
        size = sizes.get(ann.get("image_id"))
        problem = region_problem(ann, *size) if size else None
        if problem:
            problems.append(f"{where} (image {ann['image_id']}): {problem}")
    return problems


def select_images(coco: COCO, images: Path, limit: Optional[int]) -> List[int]:
    """Image ids in id order (the first ``limit``), each checked to exist on disk."""
    ids = sorted(coco.getImgIds())[:limit]
    malformed = [i for i in ids if not (isinstance(coco.imgs[i].get("file_name"), str) and coco.imgs[i]["file_name"]
                                        and all(isinstance(coco.imgs[i].get(k), int) for k in ("height", "width")))]
    if malformed:
        raise BadInput(f"{len(malformed)} image(s) of the annotations lack a 'file_name' string or integer 'height'/"
                       f"'width' (image ids {', '.join(map(str, malformed[:5]))}); every entry of 'images' needs all three.")
    missing = [coco.imgs[i]["file_name"] for i in ids if not (images / coco.imgs[i]["file_name"]).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInput(f"{len(missing)} image(s) of the annotations are missing from {images}: "
                       f"{', '.join(missing[:3])}{more}.")
    return ids


class CocoImages(Dataset):
    """RGB images as float tensors in 0-1 (torchvision's detection input); an unreadable image
    yields its error message instead of failing in a worker."""

    def __init__(self, coco: COCO, folder: Path, ids: Sequence[int], indices: Sequence[int]):
        self.coco, self.folder, self.ids, self.indices = coco, folder, ids, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            return read_image(self.folder, self.coco.imgs[self.ids[index]]), index, ""
        except BadInput as err:
            return torch.zeros(3, 1, 1), index, str(err)


def read_image(folder: Path, info: dict) -> torch.Tensor:
    """The image of annotation entry ``info``, float RGB in 0-1; :class:`BadInput` naming the file
    when it cannot be decoded or its size is not the annotated one."""
    path = folder / info["file_name"]
    try:  # pixels as stored: no EXIF rotation, the frame the annotations use
        with Image.open(path) as pil:
            image = pil_to_tensor(pil.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadInput(f"{path}: {err}") from None
    if tuple(image.shape[1:]) != (info["height"], info["width"]):
        raise BadInput(f"{path} is {image.shape[2]}x{image.shape[1]}, the annotations say {info['width']}x{info['height']}")
    return image.float() / 255


def _collate(batch):
    return tuple(zip(*batch))


# --------------------------------------------------------------------------- detections and AP

def to_coco_results(image_id: int, det: Dict[str, torch.Tensor], mask_threshold: float) -> List[dict]:
    """One image's detections as COCO result entries (``bbox`` as x, y, w, h; ``segmentation`` as RLE)."""
    boxes = det["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    out = []
    masks = None
    if "masks" in det:
        binary = (det["masks"][:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)
        masks = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for k, (box, score, label) in enumerate(zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist())):
        entry = {"image_id": image_id, "category_id": int(label), "bbox": [round(v, 3) for v in box], "score": round(score, 5)}
        if masks is not None:
            entry["segmentation"] = {"size": masks[k]["size"], "counts": masks[k]["counts"].decode("ascii")}
        out.append(entry)
    return out


def average_precision(coco: COCO, results: List[dict], image_ids: Sequence[int], metric: str) -> float:
    """pycocotools' AP@[.50:.95] (percent) of ``results`` on ``image_ids`` for ``box_ap``/``mask_ap``.

    Entries are split as mmdetection does (bbox results without masks, segm results without
    boxes), so a mask's area, not its box's, decides its area range. No detection at all is AP 0.
    """
    iou_type, key = IOU_TYPES[metric]
    entries = [{k: v for k, v in r.items() if k in ("image_id", "category_id", "score", key)} for r in results if key in r]
    if not entries:
        return 0.0
    with _quiet():
        dt = coco.loadRes(entries)
        evaluator = COCOeval(coco, dt, iou_type)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return max(float(evaluator.stats[0]), 0.0) * 100  # pycocotools reports -1 when no ground truth


def predict(model: torch.nn.Module, coco: COCO, folder: Path, ids: List[int], args: argparse.Namespace,
            dist: common.Distributed) -> Tuple[List[dict], float]:
    """Every image's COCO results (all ranks together) and images per second of the whole launch."""
    dataset = CocoImages(coco, folder, ids, dist.shard(len(ids)))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=_collate)
    threshold = model.meta["mask_threshold"]
    local: Dict[int, List[dict]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for images, indices, errors in common.progress(loader, total=len(loader), desc="coco", dist=dist):
            unreadable = next((e for e in errors if e), None)
            if unreadable:
                raise BadInput(f"Cannot read image {unreadable}")
            with common.autocast(dist.device, args.amp):
                dets = model([im.to(dist.device) for im in images])
            for index, det in zip(indices, dets):
                local[index] = to_coco_results(ids[index], det, threshold)
    gathered = dist.gather(local, len(ids))
    seconds = time.perf_counter() - start
    return [r for index in range(len(ids)) for r in gathered[index]], len(ids) / seconds


def read_predictions(paths: Sequence[Path], coco: COCO, ids: Sequence[int]) -> List[dict]:
    """COCO result entries from files, restricted to ``ids``; bad input if unusable."""
    results: List[dict] = []
    for path in paths:
        if not path.is_file():
            raise BadInput(f"Predictions file {path} does not exist.")
        try:
            entries = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadInput(f"Predictions file {path} is not JSON ({err}).") from None
        except RecursionError:
            raise BadInput(f"Predictions file {path} is nested too deeply to parse; expected a COCO results list.") from None
        if not isinstance(entries, list) or not entries:
            raise BadInput(f"Predictions file {path} holds no detections; expected a non-empty COCO results list "
                           "(entries with image_id, category_id, score and bbox and/or segmentation).")
        for n, entry in enumerate(entries):
            if not (isinstance(entry, dict) and {"image_id", "category_id", "score"} <= set(entry)
                    and ("bbox" in entry or "segmentation" in entry)):
                raise BadInput(f"{path}, entry {n}: expected image_id, category_id, score and bbox and/or "
                               f"segmentation, got {str(entry)[:120]}.")
            if entry["image_id"] not in coco.imgs:
                raise BadInput(f"{path}, entry {n}: image_id {entry['image_id']} is not in the annotations.")
            size = coco.imgs[entry["image_id"]].get("height"), coco.imgs[entry["image_id"]].get("width")
            problem = ("score is not a finite number" if not _finite(entry["score"]) else
                       f"category_id {str(entry['category_id'])[:30]} is not among the categories"
                       if entry["category_id"] not in coco.cats else
                       region_problem(entry, *size, ground_truth=False) if all(_integer(v) and v > 0 for v in size)
                       else None)
            if problem:
                raise BadInput(f"{path}, entry {n}: {problem}.")
        results += entries
    selected = set(ids)
    return [r for r in results if r["image_id"] in selected]


# --------------------------------------------------------------------------- one weights tag

def _check_model(name: str) -> None:
    check_name(name)  # an unknown tag fails as in every command
    entry = model_entry(name)
    if entry["family"] != FAMILY:
        raise BadInput(f"{split_name(name)[0]} is not a COCO detection model; `gczoo list 'maskrcnn*'` lists them.")


def evaluate_weights(name: str, coco: COCO, folder: Path, ids: List[int], args: argparse.Namespace,
                     dist: common.Distributed) -> dict:
    """Measure (or score saved detections of) one weights tag; one report record, printed on rank 0."""
    _check_model(name)
    extra: dict = {}
    if args.predictions:
        arch, tag = split_name(name)
        tag = tag or model_entry(arch)["default_tag"]
        loaded = common.LoadedModel(model=None, arch=arch, tag=tag, weights_file=Path(args.predictions[0]),
                                    weights_sha256="", checkpoint=False)
        results = read_predictions(args.predictions, coco, ids)
        extra = {"predictions_files": [str(p.resolve()) for p in args.predictions],
                 "predictions_sha256": [sha256_of(p) for p in args.predictions]}
    else:
        loaded = common.load_model(name, dist.device, checkpoint=args.checkpoint, weights_file=args.weights_file)
        results, speed = predict(loaded.model, coco, folder, ids, args, dist)
        extra = {"images_per_s": round(speed, 3), "amp": dist.device.type == "cuda" and args.amp,
                 "batch_size": args.batch_size}
        if dist.is_main and args.save_predictions is not None:
            _write_json(args.save_predictions, results)
    # saved predictions may hold boxes only (or masks only): measure what they hold
    scored = [m for m, (_, key) in IOU_TYPES.items() if not args.predictions or any(key in r for r in results)]
    metrics = {m: average_precision(coco, results, ids, m) for m in scored}
    note = common.no_verdict_reason(args, len(ids), NUM_VAL_IMAGES, "val2017")
    published = [] if args.checkpoint else common.published_metrics(loaded.name, TASK)
    comparisons = [] if note else common.compare(metrics, published, args.tolerance)
    rec = common.record(loaded, task=TASK, metrics=metrics, comparisons=comparisons, protocol=_protocol(args),
                        dist=dist, samples=len(ids), limit=args.limit,
                        note=note or (None if comparisons else "no published number to compare"),
                        detections=len(results), **extra)
    if args.predictions:  # no weights were involved
        rec.update(weights_file=None, weights_sha256=None)
    if dist.is_main:
        print(_describe(rec), flush=True)
    return rec


def _write_json(path: Path, data) -> None:
    """Write JSON atomically: a partial file never carries the final name."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))


def _protocol(args: argparse.Namespace) -> dict:
    return {"split": args.split, "metric": "pycocotools COCOeval AP@[.50:.95], bbox and segm",
            "batch_size": args.batch_size, "source": "saved predictions" if args.predictions else "model"}


def _describe(rec: dict) -> str:
    name = f"{rec['model']}.{rec['tag']}" if rec["tag"] else rec["model"]
    values = ", ".join(f"{k} {rec[k]:.2f}" for k in IOU_TYPES if k in rec)
    lines = [f"{name}: {values} on {rec['samples']} images, {rec['detections']} detections, {rec['device']}"]
    return "\n".join(lines + common.verdict_lines(rec, digits=2))


def run(args: argparse.Namespace, dist: common.Distributed) -> int:
    if args.predictions and (args.all or args.checkpoint):
        raise BadInput("--predictions scores saved detections of one --model; it takes neither --all nor --checkpoint.")
    names = [args.model] if args.model is not None else common.weights_with_metrics(TASK)
    for name in names:  # a wrong model name fails before the data is read
        _check_model(name)
    coco, folder = load_ground_truth(args.data, args.split, args.annotations)
    ids = select_images(coco, folder, args.limit)
    records, errors = common.evaluate_each(names, lambda name: [evaluate_weights(name, coco, folder, ids, args, dist)],
                                           dist, keep_going=args.model is None)
    return common.finish(records, errors, args.json_out, dist)


if __name__ == "__main__":
    sys.exit(common.main(run, build_parser()))
