"""Evaluate the zoo's ImageNet-1k weights on the validation set and check the published numbers.

    python eval/imagenet.py --model resnet50_gc_r16.tv2_in1k --data /data/imagenet/val
    python eval/imagenet.py --all --data /data/imagenet/val --json-out imagenet.json
    torchrun --nproc-per-node 8 eval/imagenet.py --all --data /data/imagenet/val

Exit code: 0 PASS (or nothing to compare), 1 FAIL, 2 bad input.

**Data.** ``--data`` is either

* the standard validation layout: 1000 folders named after the ImageNet-1k synsets
  (``n01440764`` ... ``n15075141``), each with its images; or
* a flat folder of ``ILSVRC2012_val_NNNNNNNN.JPEG`` with a ground-truth file, found in the
  folder or its parent (or given with ``--ground-truth``):

  - ``LOC_val_solution.csv`` (ImageNet Object Localization Challenge): ``ImageId,
    PredictionString``, whose first word is the image's synset. Read as is.
  - the devkit's ``ILSVRC2012_validation_ground_truth.txt``: line *i* is the ILSVRC2012_ID of
    image *i*. Those IDs number the synsets in the order of the devkit's ``data/meta.mat``
    (ID 1 is n02119789, kit fox), **not** in sorted synset order (whose first class, index 0,
    is n01440764, tench), so they cannot be used without that table. ``meta.mat`` is a MATLAB
    file that the zoo neither ships nor parses (it would take scipy); give the table as
    ``--synset-ids FILE``, lines ``WNID ILSVRC2012_ID [name]`` -- the format of
    ``map_clsloc.txt`` of the ILSVRC CLS-LOC devkit, which is picked up by itself when it lies
    next to the ground truth -- or one WNID per line in ILSVRC2012_ID order, written from
    ``meta.mat`` with any MATLAB reader.

Classes are numbered in the standard sorted-synset order (timm's ``ImageNetInfo``, the order
of torchvision's and timm's ImageNet-1k heads). Images are taken in file-name order, so
``--limit N`` takes the same first N images from either layout.

**Protocols.** A published number holds for one preprocessing: the manifest gives each metric
its ``protocol`` (input size, crop_pct or resize, interpolation). Each protocol becomes a timm
data config (mean/std from the weights' pretrained_cfg) and transform; the weights are
evaluated once per distinct transform, and each number is compared with the measurement made
under its own protocol. Protocols that differ only in how they write the same transform share
one pass: torchvision's "resize 232, crop 224" and timm's "224, crop_pct 0.965" both resize to
232 and crop 224. ``--img-size``/``--crop-pct`` replace the protocol by the weights' test
config with those changes: one pass, compared only with numbers published under that same
transform, and the report says so. A ``--checkpoint``, a ``--limit`` run, and a folder with
other than the 50,000 validation images are reported without PASS/FAIL.
"""
from __future__ import annotations

import argparse
import csv
import errno
import math
import os
import re
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__:  # imported as eval.<script> (the tests)
    from . import flags
else:  # run as a script (python eval/<script>.py, torchrun): its folder is the first entry of sys.path
    import flags

LOC_SOLUTION = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
SYNSET_IDS = "map_clsloc.txt"


def build_parser() -> argparse.ArgumentParser:
    parser = flags.make_parser(__doc__, batch_size=64, tolerance=0.1)
    parser.add_argument("--img-size", type=int, help="evaluate at this size instead of the published protocols")
    parser.add_argument("--crop-pct", type=float, help="center-crop fraction instead of the published protocols")
    parser.add_argument("--ground-truth", type=Path, metavar="FILE",
                        help=f"flat layout: {LOC_SOLUTION} or {DEVKIT_GROUND_TRUTH} (default: looked up in --data "
                             "and its parent)")
    parser.add_argument("--synset-ids", type=Path, metavar="FILE",
                        help=f"with {DEVKIT_GROUND_TRUTH}: lines 'WNID ILSVRC2012_ID' ({SYNSET_IDS}) or one WNID per "
                             "line in ILSVRC2012_ID order (the devkit's meta.mat order)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch and the extras are imported

import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from gczoo.manifest import ManifestError
from gczoo.registry import model_entry, split_name

if __package__:  # imported as eval.<script> (the tests)
    from . import common
else:  # run as a script (python eval/<script>.py, torchrun): its folder is the first entry of sys.path
    import common

BadInput = common.BadInput

TASK = "imagenet-1k"
NUM_CLASSES = 1000
NUM_VAL_IMAGES = 50_000
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")

Sample = Tuple[Path, int]


# --------------------------------------------------------------------------- data

def synsets() -> List[str]:
    """The 1000 ImageNet-1k synsets in class-index order (sorted WNIDs)."""
    return list(ImageNetInfo().label_names())


def find_samples(data: Path, ground_truth: Optional[Path] = None, synset_ids: Optional[Path] = None,
                 subset: bool = False) -> List[Sample]:
    """``(image path, class index)`` of every validation image in ``data``, in file-name order.

    With ``subset`` (a ``--limit`` run) the folder layout may hold only some of the synset folders.
    """
    if not data.is_dir():
        raise BadInput(f"--data {data} does not exist or is not a directory; give the ImageNet validation folder.")
    entries = sorted(data.iterdir())
    folders = [p for p in entries if p.is_dir()]
    flat = [p for p in entries if VAL_FILE.fullmatch(p.name)]
    if flat:
        samples = _flat_samples(data, flat, ground_truth, synset_ids)
    elif folders:
        samples = _folder_samples(data, folders, subset)
    else:
        raise BadInput(f"{data} is neither ImageNet validation layout: expected 1000 synset folders "
                       f"(n01440764, ...) or ILSVRC2012_val_NNNNNNNN.JPEG files with a ground-truth file.")
    if not samples:
        raise BadInput(f"{data} holds no images.")
    return sorted(samples, key=lambda s: (s[0].name, s[1]))


def _folder_samples(data: Path, folders: List[Path], subset: bool = False) -> List[Sample]:
    index = {wnid: i for i, wnid in enumerate(synsets())}
    names = [f.name for f in folders]
    unknown = [n for n in names if n not in index]
    if subset and not unknown and len(folders) < NUM_CLASSES:
        print(f"note: {data} has {len(folders)} of the {NUM_CLASSES} synset folders; a --limit run takes them as "
              "they are (a full evaluation needs all of them)", file=sys.stderr)
    elif len(folders) != NUM_CLASSES or unknown:
        what = f"; not ImageNet-1k synsets: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else "") \
            if unknown else ""
        raise BadInput(f"{data} has {len(folders)} class folders{what}. The ImageNet-1k validation layout has "
                       f"{NUM_CLASSES}, one per synset (n01440764 ... n15075141), even where a folder is empty.")
    images = [(path, index[folder.name]) for folder in folders for path in sorted(folder.iterdir())
              if path.suffix.lower() in get_img_extensions(as_set=True)]
    _check_regular_files([path for path, _ in images])
    return images


def _not_regular(path: Path) -> Optional[str]:
    """What ``path`` is when it is not a regular file (links followed), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop"
        return "a broken symbolic link" if path.is_symlink() else f"unreadable ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"


def _check_regular_files(paths: Sequence[Path]) -> None:
    """Every image of the set must be a regular file: a FIFO would block a reader forever, a link loop
    or broken link cannot be read, and skipping them would evaluate fewer images than the set has."""
    bad = [(p, what) for p in paths if (what := _not_regular(p)) is not None]
    if bad:
        shown = ", ".join(f"{p} ({what})" for p, what in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise BadInput(f"{len(bad)} image(s) of the validation set are not regular files: {shown}. "
                       "Replace them with the image files (or remove them and the ground truth's lines).")


def _first_existing(candidates: Sequence[Path]) -> Optional[Path]:
    return next((p for p in candidates if p.is_file()), None)


def _flat_samples(data: Path, files: List[Path], ground_truth: Optional[Path],
                  synset_ids: Optional[Path]) -> List[Sample]:
    if ground_truth is None:
        places = (data, data.parent, data.parent / "ILSVRC2012_devkit_t12" / "data")
        ground_truth = _first_existing([d / n for d in places for n in (LOC_SOLUTION, DEVKIT_GROUND_TRUTH)])
        if ground_truth is None:
            raise BadInput(f"{data} holds ILSVRC2012_val_*.JPEG files but no ground truth: put {LOC_SOLUTION} or "
                           f"the devkit's {DEVKIT_GROUND_TRUTH} in it or its parent, or pass --ground-truth FILE.")
    elif not ground_truth.is_file():
        raise BadInput(f"--ground-truth {ground_truth} does not exist.")
    if ground_truth.suffix == ".csv":
        labels = _read_loc_solution(ground_truth)
    else:
        labels = _read_devkit_ground_truth(ground_truth, synset_ids)
    samples = []
    _check_regular_files(files)
    for path in files:
        if path.stem not in labels:
            raise BadInput(f"{ground_truth} has no label for {path.name}; is it the ground truth of this validation set?")
        samples.append((path, labels[path.stem]))
    return samples


def _read_loc_solution(path: Path) -> Dict[str, int]:
    """``{image id: class index}`` from ``LOC_val_solution.csv`` (first word of PredictionString)."""
    index = {wnid: i for i, wnid in enumerate(synsets())}
    labels = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["ImageId", "PredictionString"]:
            raise BadInput(f"{path}: expected the header 'ImageId,PredictionString' of {LOC_SOLUTION}, got {header}.")
        for line, row in enumerate(rows, start=2):
            wnid = row[1].split()[0] if len(row) == 2 and row[1].split() else None
            if wnid not in index:
                raise BadInput(f"{path}, line {line}: expected 'ImageId,<ImageNet-1k synset> ...', got {row}.")
            labels[row[0]] = index[wnid]
    return labels


def _read_devkit_ground_truth(path: Path, synset_ids: Optional[Path]) -> Dict[str, int]:
    """``{image id: class index}`` from the devkit's ground truth and the ILSVRC2012_ID table."""
    if synset_ids is None:
        synset_ids = _first_existing([d / SYNSET_IDS for d in (path.parent, path.parent.parent)])
        if synset_ids is None:
            raise BadInput(
                f"{path} labels images by ILSVRC2012_ID, numbered in the order of the devkit's data/meta.mat, "
                f"not in sorted synset order, and gczoo does not read meta.mat. Pass --synset-ids FILE (lines "
                f"'WNID ILSVRC2012_ID', like {SYNSET_IDS} of the CLS-LOC devkit, or one WNID per line in ID "
                f"order), or use {LOC_SOLUTION} or the 1000-folder layout instead.")
    elif not synset_ids.is_file():
        raise BadInput(f"--synset-ids {synset_ids} does not exist.")
    to_index = _read_synset_ids(synset_ids)
    labels = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not line.strip().isdigit() or int(line) not in to_index:
                raise BadInput(f"{path}, line {number}: expected an ILSVRC2012_ID from 1 to {NUM_CLASSES}, "
                               f"got {line.strip()!r}.")
            labels[f"ILSVRC2012_val_{number:08d}"] = to_index[int(line)]
    return labels


def _read_synset_ids(path: Path) -> Dict[int, int]:
    """``{ILSVRC2012_ID: class index}`` from lines ``WNID [ID [name]]`` (ID: the line number if absent)."""
    index = {wnid: i for i, wnid in enumerate(synsets())}
    table = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            words = line.split()
            if not words:
                continue
            ilsvrc_id = int(words[1]) if len(words) > 1 and words[1].isdigit() else number
            if words[0] not in index or ilsvrc_id in table:
                raise BadInput(f"{path}, line {number}: expected 'WNID ILSVRC2012_ID' with a new ImageNet-1k synset "
                               f"and a new ID, got {line.strip()!r}.")
            table[ilsvrc_id] = index[words[0]]
    if sorted(table) != list(range(1, NUM_CLASSES + 1)):
        raise BadInput(f"{path} maps {len(table)} ILSVRC2012_IDs; expected IDs 1..{NUM_CLASSES}, one per synset.")
    return table


class ValImages(Dataset):
    """Images and labels; an unreadable image yields its error message instead of failing in a worker."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], transform, input_size: Tuple[int, ...]):
        self.samples, self.indices, self.transform, self.input_size = samples, indices, transform, input_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), label, index, ""
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return torch.zeros(self.input_size), label, index, f"{path}: {err}"


# --------------------------------------------------------------------------- protocols

@dataclass
class Pass:
    """One evaluation pass: a data config, its transform, and the published metrics made under it."""

    config: dict
    transform: T.Compose
    published: List[dict]

    @property
    def protocol(self) -> dict:
        return {"input_size": self.config["input_size"][-1], "resize": _resize_of(self.transform),
                "crop_pct": self.config["crop_pct"], "crop_mode": self.config["crop_mode"],
                "interpolation": self.config["interpolation"], "mean": list(self.config["mean"]),
                "std": list(self.config["std"])}


def _resize_of(transform: T.Compose) -> Optional[int]:
    return next((t.size for t in transform.transforms if isinstance(t, T.Resize)), None)


def _make_pass(model: torch.nn.Module, overrides: dict) -> Pass:
    config = resolve_data_config(args=overrides, model=model, use_test_size=True)
    return Pass(config, create_transform(**config, is_training=False), [])


def plan_passes(model: torch.nn.Module, published: List[dict], img_size: Optional[int],
                crop_pct: Optional[float]) -> List[Pass]:
    """The passes that measure every published metric under its protocol (or one overridden pass)."""
    overridden = img_size is not None or crop_pct is not None
    candidates = [(metric, _make_pass(model, _protocol_args(metric))) for metric in published]
    if overridden or not published:
        run = _make_pass(model, {k: v for k, v in dict(img_size=img_size, crop_pct=crop_pct).items() if v is not None})
        run.published = [m for m, p in candidates if repr(p.transform) == repr(run.transform)]
        return [run]
    passes: Dict[str, Pass] = {}
    for metric, candidate in candidates:
        passes.setdefault(repr(candidate.transform), candidate).published.append(metric)
    return list(passes.values())


def _protocol_args(metric: dict) -> dict:
    """timm data-config arguments of a manifest metric's protocol, checked against its ``resize``."""
    protocol = metric["protocol"]
    try:
        args = dict(img_size=int(protocol["input_size"]), crop_pct=float(protocol["crop_pct"]),
                    interpolation=protocol["interpolation"])
    except (KeyError, TypeError, ValueError) as err:
        raise ManifestError(f"ImageNet metric {metric['source']!r}: protocol {protocol} needs input_size, "
                            f"crop_pct and interpolation ({err}).") from None
    resize = protocol.get("resize")
    if resize is not None and math.floor(args["img_size"] / args["crop_pct"]) != resize:
        raise ManifestError(f"ImageNet metric {metric['source']!r}: protocol {protocol} resizes to {resize}, "
                            f"but its crop_pct gives {math.floor(args['img_size'] / args['crop_pct'])}.")
    return args


# --------------------------------------------------------------------------- evaluation

def evaluate(model: torch.nn.Module, samples: List[Sample], run: Pass, args: argparse.Namespace,
             dist: common.Distributed) -> Tuple[Dict[str, float], float]:
    """Top-1/top-5 accuracy (percent) over ``samples`` and images per second of the whole launch."""
    indices = dist.shard(len(samples))
    dataset = ValImages(samples, indices, run.transform, tuple(run.config["input_size"]))
    cuda = dist.device.type == "cuda"
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=cuda)
    local: Dict[int, Tuple[int, List[int]]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels, index, errors in common.progress(loader, total=len(loader), desc="imagenet", dist=dist):
            unreadable = next((e for e in errors if e), None)
            if unreadable:
                raise BadInput(f"Cannot read image {unreadable}")
            images = images.to(dist.device, non_blocking=True,
                               memory_format=torch.channels_last if cuda else torch.contiguous_format)
            with common.autocast(dist.device, args.amp):
                logits = model(images)
            if logits.ndim != 2 or logits.shape[1] != NUM_CLASSES:
                raise BadInput(f"The model outputs {tuple(logits.shape[1:])} per image; ImageNet-1k needs "
                               f"{NUM_CLASSES} class scores.")
            top5 = logits.float().topk(5, dim=1).indices.cpu().tolist()
            local.update(zip(index.tolist(), zip(labels.tolist(), top5)))
    results = dist.gather(local, len(samples))
    seconds = time.perf_counter() - start
    top1 = sum(pred[0] == label for label, pred in results.values())
    top5 = sum(label in pred for label, pred in results.values())
    n = len(results)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}, n / seconds


def evaluate_weights(name: str, samples: List[Sample], args: argparse.Namespace,
                     dist: common.Distributed) -> List[dict]:
    """Every pass of one weights tag (or checkpoint): one report record per pass, printed on rank 0."""
    cuda = dist.device.type == "cuda"
    loaded = common.load_model(name, dist.device, checkpoint=args.checkpoint, weights_file=args.weights_file,
                               channels_last=cuda)
    published = [] if args.checkpoint else _published(loaded.name)
    note = common.no_verdict_reason(args, len(samples), NUM_VAL_IMAGES, "the validation set")
    override = {k: v for k, v in dict(img_size=args.img_size, crop_pct=args.crop_pct).items() if v is not None}
    records = []
    for run in plan_passes(loaded.model, published, args.img_size, args.crop_pct):
        metrics, speed = evaluate(loaded.model, samples, run, args, dist)
        comparisons = [] if note else common.compare(metrics, run.published, args.tolerance)
        why = note or (None if comparisons else "no number was published under this protocol")
        records.append(common.record(
            loaded, task=TASK, metrics=metrics, comparisons=comparisons, protocol=run.protocol, dist=dist,
            samples=len(samples), limit=args.limit, note=why, override=override or None,
            images_per_s=round(speed, 2), amp=cuda and args.amp, channels_last=cuda))
        if dist.is_main:
            print(_describe(records[-1]), flush=True)
    return records


def _numbers(values: Dict[str, float], sign: bool = False) -> str:
    return ", ".join(f"{k} {v:+.3f}" if sign else f"{k} {v:.3f}" for k, v in values.items())


def _describe(rec: dict) -> str:
    p = rec["protocol"]
    name = f"{rec['model']}.{rec['tag']}" if rec["tag"] else rec["model"]
    lines = [f"{name}: top1 {rec['top1']:.3f}, top5 {rec['top5']:.3f} on {rec['samples']} images, "
             f"{rec['images_per_s']:.1f} images/s, {rec['device']}",
             f"  protocol: {p['input_size']} px, resize {p['resize']}, crop_pct {p['crop_pct']}, {p['interpolation']}"
             + (f" (overridden: {rec['override']})" if rec["override"] else "")]
    return "\n".join(lines + common.verdict_lines(rec, digits=3))


def _summary(records: List[dict], errors: List[dict]) -> str:
    rows = []
    for r in records:
        for c in r["published"] or [None]:
            rows.append([f"{r['model']}.{r['tag']}", r["protocol"]["input_size"], r["protocol"]["crop_pct"],
                         f"{r['top1']:.3f}", f"{r['top5']:.3f}",
                         c and _numbers(c["values"]), c and _numbers(c["delta"], sign=True),
                         c["verdict"] if c else "-"])
    rows += [[e["name"], "", "", "", "", "", "", "ERROR"] for e in errors]
    return common.format_table(["weights", "size", "crop", "top-1", "top-5", "published", "delta", "verdict"], rows)


def _published(name: str) -> List[dict]:
    """The published ImageNet-1k metrics of a weights tag; bad input if it has none."""
    arch, tag = split_name(name)
    if tag is None and model_entry(arch)["default_tag"] is None:
        raise BadInput(f"{arch} has no ImageNet weights in the zoo; evaluate your own with --checkpoint FILE.")
    published = common.published_metrics(name, TASK)
    if not published:
        raise BadInput(f"{name} has no ImageNet-1k weights with a published number (`gczoo list --pretrained` "
                       f"shows the zoo's weights; `python eval/imagenet.py --all` evaluates every ImageNet one).")
    return published


def run(args: argparse.Namespace, dist: common.Distributed) -> int:
    if args.img_size is not None and args.img_size < 1:
        raise BadInput(f"--img-size must be at least 1, got {args.img_size}.")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise BadInput(f"--crop-pct must be in (0, 1], got {args.crop_pct}.")
    # a wrong model name or a model without ImageNet numbers fails before the data is scanned
    if args.model is not None and args.checkpoint:
        model_entry(args.model)
    elif args.model is not None:
        _published(args.model)
    samples = find_samples(args.data, args.ground_truth, args.synset_ids, subset=args.limit is not None)
    if args.limit is not None:
        samples = samples[:args.limit]
    names = [args.model] if args.model is not None else common.weights_with_metrics(TASK)
    records, errors = common.evaluate_each(names, lambda name: evaluate_weights(name, samples, args, dist),
                                           dist, keep_going=args.model is None)
    if args.model is None and dist.is_main:
        print("\n" + _summary(records, errors))
    return common.finish(records, errors, args.json_out, dist)


if __name__ == "__main__":
    sys.exit(common.main(run, build_parser()))
