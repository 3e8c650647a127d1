"""The ``gczoo`` command line.

``gczoo demo [--model NAME[.TAG]] [--image F] [--out PNG]`` one model's natural output on a picture
``gczoo list [PATTERN] [--pretrained]`` model names (``arch`` or ``arch.tag``)
``gczoo info NAME[.TAG] [--full] [--measure] [--json]`` the model card (one screen; ``--full``: everything)
``gczoo table [--check F | --write F]`` the README's model table
``gczoo download NAME[.TAG] [--to DIR]`` fetch and verify weights (``--to``: the upstream file, for an air-gapped machine)
``gczoo pin NAME.TAG [--confirm SHA256] [--also-from URL]`` maintainers: record each source's sha256
                                      when a second source or the maintainer confirms it
``gczoo publish NAME.TAG|--all --out DIR`` maintainers: write hub-ready repo folders (gczoo.publish)
``gczoo publish --trained FILE --repo-name NAME --org ORG --out DIR [--metrics REPORT]`` the same for weights
                                      trained by train/*.py
``gczoo analyze NAME[.TAG] IMAGE... --out DIR`` query independence of the NL/SNL/GC blocks (table, attention maps)
``gczoo export NAME[.TAG] --format F --out FILE`` ONNX / TorchScript / torch.export file, checked (gczoo.export)

``demo`` and ``analyze`` obtain weights by the rule of :mod:`gczoo.loading` (``--checkpoint``, ``--weights-file``,
the tag's download, else seeded random weights, said so). Input files are checked before any download.
Exit codes: 0 success, 1 a check failed, 2 bad input or unavailable weights. Each subcommand is a
``_name(args) -> exit code`` function and its parser lines in :func:`_parser`; modules are imported
inside the functions, so ``--help``, ``list`` and ``info`` answer from the manifest without
importing torch.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import __version__
from .export import add_parser as _add_export_parser
from .fileio import atomic_path, read_image

__all__ = ["main"]


def _list(args: argparse.Namespace) -> int:
    from .registry import list_models

    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 2
    print("\n".join(names))
    return 0


def _info(args: argparse.Namespace) -> int:
    from .cards import model_card, model_info

    if args.json:
        print(json.dumps(model_info(args.name, measure=args.measure), indent=2, default=str))
    else:
        print(model_card(args.name, measure=args.measure, full=args.full))
    return 0


def _readme_block(text: str, path: Path) -> str:
    from .cards import TABLE_END, TABLE_START

    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no model table between the markers {TABLE_START!r} and {TABLE_END!r}")
    return text[start:end + len(TABLE_END)]


def _table(args: argparse.Namespace) -> int:
    from .cards import model_table

    table = model_table()
    target = args.check or args.write
    if target is None:
        print(table)
        return 0
    if not target.is_file():
        raise ValueError(f"{target}: no such file (--check and --write take the README holding the table)")
    text = target.read_text(encoding="utf-8")
    current = _readme_block(text, target)
    if args.write:
        with atomic_path(target) as tmp:
            tmp.write_text(text.replace(current, table), encoding="utf-8")
        print(f"wrote the model table into {target}")
        return 0
    if current != table:
        print(f"{target}'s model table differs from the manifest; run `gczoo table --write {target}`", file=sys.stderr)
        return 1
    print(f"{target}'s model table matches the manifest")
    return 0


#: The evaluation script of each task a weights tag publishes numbers for (``--weights-file`` in each).
_EVAL_SCRIPTS = {"imagenet-1k": "eval/imagenet.py", "coco-2017-val": "eval/coco.py",
                 "cityscapes-val": "eval/segmentation.py", "ade20k-val": "eval/segmentation.py"}


def _download(args: argparse.Namespace) -> int:
    """Into the cache; or, with ``--to``, the upstream file as served, which a machine without network checks."""
    from .registry import check_name, weights_entry

    arch, _ = check_name(args.name)
    tag, entry = weights_entry(args.name)
    name = f"{arch}.{tag}"
    from . import weights

    if args.to is None:
        print(weights.fetch(arch, tag, entry))
        print(f"(in the cache; for a machine without network: gczoo download {name} --to DIR)")
        return 0
    path, source = weights.download_upstream(arch, tag, entry, args.to)
    where = source.get("url") or f"hf://{source['repo_id']}/{source['filename']}@{source.get('revision', 'main')}"
    full = bool(source.get("sha256"))
    print(path)
    print(f"the upstream file as served by {where}, not converted; the manifest pins "
          + (f"its sha256 {source['sha256']}" if full else
             f"only the hash prefix {source['sha256_prefix']} of its file name (32 bits, forgeable in minutes)"))
    print("on a machine without network, pass this file with --weights-file: it is checked there against the "
          "manifest before use" + ("" if full else ", and accepted only with GCZOO_ALLOW_PREFIX_ONLY=1") + ":")
    print(f"  gczoo demo --model {name} --weights-file {path.name}")
    for script in sorted({_EVAL_SCRIPTS[m["task"]] for m in entry["metrics"] if m["task"] in _EVAL_SCRIPTS}):
        print(f"  python {script} --model {name} --weights-file {path.name} --data DIR")
    return 0


def _pin(args: argparse.Namespace) -> int:
    """Record each source's full sha256, but only on evidence beyond the one download: the digest
    is already pinned, the maintainer confirms it (``--confirm``), or a second, independent host
    serves the identical file (``--also-from``). A prefix-verified download alone proves 32 bits."""
    from .manifest import MANIFEST_PATH, dump_manifest, load_manifest
    from .registry import check_name, split_name

    path = args.manifest or MANIFEST_PATH
    if args.manifest is None:
        check_name(args.name)  # a misspelled name gets close matches, as in every command
    from . import weights
    manifest = copy.deepcopy(load_manifest(path))
    arch, tag = split_name(args.name)
    entry = manifest["models"].get(arch, {}).get("weights", {}).get(tag)
    if entry is None:
        raise ValueError(f"{path} has no weights {args.name!r}; pin takes NAME.TAG (`gczoo list --pretrained`)")
    confirmed = {d.strip().lower() for d in args.confirm or []}
    bad = sorted(d for d in confirmed if not re.fullmatch(r"[0-9a-f]{64}", d))
    if bad:
        raise ValueError(f"--confirm takes full sha256 digests (64 hex digits), got {', '.join(bad)}")
    digests = weights.pin(arch, tag, entry)
    second = weights.digests_from(arch, tag, entry, args.also_from) if args.also_from else [(None, "")] * len(digests)
    changed, unconfirmed = False, []
    for source, digest, (other, note) in zip(entry["sources"], digests, second):
        where = source.get("url") or f"{source['repo_id']}/{source['filename']}"
        if source.get("sha256") == digest:
            print(f"{where}: {digest} (already pinned)")
        elif digest in confirmed or other == digest:
            why = "confirmed by the maintainer" if digest in confirmed else f"identical from {args.also_from}"
            source["sha256"] = digest
            changed = True
            print(f"{where}: {digest} (recorded: {why})")
        else:
            seen = f"; {note} served {other}" if other else (f"; no second copy ({note})" if note else "")
            unconfirmed.append(f"{where}: downloaded {digest}{seen}")
    if changed:
        dump_manifest(manifest, path)
        print(f"updated {arch}.{tag} in {path}")
    if unconfirmed:
        print("not recorded (one download is not enough evidence for a pin):\n  " + "\n  ".join(unconfirmed)
              + "\ncheck each digest against a second, independent source (the hub's file page lists an LFS "
              "file's sha256; a second host: --also-from URL), then pass it with --confirm SHA256", file=sys.stderr)
        return 1
    return 0


def _publish(args: argparse.Namespace) -> int:
    """Maintainers: write hub-ready repo folders (see gczoo.publish); uploading stays with `hf upload`.
    With ``--trained``: one folder for weights trained by train/*.py."""
    from .publish import hosted_source, publish, publish_all, publish_trained

    if args.trained is not None:
        if args.name or args.all or args.checkpoint:
            raise ValueError("--trained FILE publishes weights trained by train/*.py, whose metadata names the model: "
                             "no NAME.TAG, --all or --checkpoint with it")
        if not (args.repo_name and args.org):
            raise ValueError("--trained needs --repo-name NAME and --org ORG: the hub repo ORG/NAME it is for")
        folder = publish_trained(args.trained, args.out, args.repo_name, args.org, metrics=args.metrics or (),
                                 overwrite=args.overwrite)
        print(f"{folder}\n  upload: hf upload {args.org}/{folder.name} {folder} .\n"
              f"  then: gczoo.create_model(\"hf-hub:{args.org}/{folder.name}\", pretrained=True)")
        return 0
    if args.repo_name or args.metrics:
        raise ValueError("--repo-name and --metrics go with --trained FILE")
    if args.all == bool(args.name):
        raise ValueError("publish takes NAME.TAG, --all or --trained FILE")
    if args.all and args.checkpoint:
        raise ValueError("--checkpoint goes with one NAME.TAG, not --all")
    org = args.org or "gczoo"
    folders = publish_all(args.out, org=org, overwrite=args.overwrite) if args.all else [
        publish(args.name, args.out, checkpoint=args.checkpoint, org=org, overwrite=args.overwrite)]
    for folder in folders:
        print(f"{folder}\n  upload: hf upload {org}/{folder.name} {folder} .\n"
              f"  then list it first among the tag's sources: {json.dumps(hosted_source(folder, org))}")
    return 0


# --------------------------------------------------------------------------- demo

def _demo_picture():
    """A deterministic test picture (a smooth colour gradient, uint8 CHW), so the demo needs no data set."""
    import torch

    y, x = torch.meshgrid(torch.linspace(0, 1, 300), torch.linspace(0, 1, 400), indexing="ij")
    return torch.stack([x, y, 1 - x * y]).mul(255).byte()


def _demo_input(args: argparse.Namespace):
    """``--image FILE`` as uint8 CHW RGB, bounded before decoding (gczoo.fileio.read_image), or the test picture."""
    if args.image is None:
        return _demo_picture()
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(read_image(args.image, what="--image"))


def _fit_picture(picture, fit):
    """``picture`` (uint8 CHW) scaled down to ``fit`` = (long, short) by :func:`gczoo.fileio.fitted_size`,
    the rule :func:`gczoo.fileio.read_image` applies to files."""
    from torchvision.transforms.functional import resize

    from .fileio import fitted_size

    height, width = picture.shape[-2:]
    new_width, new_height = fitted_size(width, height, fit)
    if (new_width, new_height) == (width, height):
        return picture
    return resize(picture, [new_height, new_width], antialias=True)


#: Height in pixels of one line of the caption under a demo picture (PIL's default bitmap font).
_CAPTION_LINE = 14


def _save_png(picture, path: Path, captions=()) -> None:
    """Save ``picture`` (uint8 CHW) as a PNG, with ``captions`` -- ``(text, (r, g, b) swatch or None, text colour)``
    lines -- written on a black band under it (the image itself is left as the model saw it)."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image

    image = to_pil_image(picture)
    if captions:
        width = max(image.width, 260)
        canvas = Image.new("RGB", (width, image.height + _CAPTION_LINE * len(captions) + 4))
        canvas.paste(image, (0, 0))
        draw = ImageDraw.Draw(canvas)
        for i, (text, swatch, colour) in enumerate(captions):
            y = image.height + 2 + i * _CAPTION_LINE
            x = 2
            if swatch is not None:
                draw.rectangle([x, y + 2, x + 10, y + 11], fill=tuple(swatch))
                x += 14
            draw.text((x, y), text, fill=colour)
        image = canvas
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _random_caption(loaded: bool) -> list:
    from .loading import SEED

    return [] if loaded else [(f"random weights (seed {SEED}): this output means nothing", None, (255, 80, 80))]


def _demo_classifier(model, name: str, loaded: bool, picture, args: argparse.Namespace) -> int:
    """Top-5 ImageNet classes; with the GC-ready weights, the check against torchvision's ResNet."""
    import torch
    import torchvision
    from timm.data import ImageNetInfo, create_transform, resolve_data_config
    from torchvision.transforms.functional import to_pil_image

    config = resolve_data_config({}, model=model)
    batch = create_transform(**config)(to_pil_image(picture)).unsqueeze(0)
    with torch.no_grad():
        logits = model(batch)
    print(f"forward pass: input {tuple(batch.shape)} (size {config['input_size'][1:]}, {config['interpolation']}, "
          f"crop_pct {config['crop_pct']}) -> logits {tuple(logits.shape)}")
    print("top-5 ImageNet classes" + ("" if loaded else " (random weights: these classes mean nothing)") + ":")
    info = ImageNetInfo()
    top = logits.softmax(-1)[0].topk(5)
    for p, i in zip(top.values, top.indices):
        print(f"  {p:.3f}  {info.index_to_description(int(i))}")
    if not loaded:
        return 0
    # The GC-ready weights claim: GC blocks start as the identity, so the model computes exactly
    # the torchvision ResNet whose weights it was given; check it on the same file.
    source = model.pretrained_cfg.get("hf_hub_id", "").split("/")[-1].split(".")[0]
    weights_file = model.pretrained_cfg.get("file")
    if source not in torchvision.models.list_models(module=torchvision.models) or not weights_file:
        return 0
    from .convert import is_zoo_layout
    from .weights import load_checkpoint

    reference = torchvision.models.get_model(source).eval()
    state_dict = load_checkpoint(weights_file, f"{name} weights")
    if is_zoo_layout(state_dict, model):  # the user's own weights (--checkpoint): nothing to compare with
        return 0
    reference.load_state_dict(state_dict)
    with torch.no_grad():
        diff = (reference(batch) - logits).abs().max().item()
    verdict = "PASS" if diff <= 1e-4 else "FAIL"
    print(f"{verdict}: {name} vs torchvision {source} loaded from the same file: "
          f"max |logit difference| = {diff:.2e}")
    return 0 if verdict == "PASS" else 1


def _demo_detection(model, name: str, loaded: bool, picture, args: argparse.Namespace) -> int:
    """Detections (boxes, masks, COCO names) drawn on the picture and saved as a PNG."""
    import torch
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from .models.mmdet_ops import TEST_SCALE

    picture = _fit_picture(picture, TEST_SCALE)  # the largest picture kept; the detector resizes again, by --min-size
    with torch.no_grad():
        det = model([picture.float() / 255])[0]
    keep = det["scores"] >= args.score_threshold
    categories = model.meta.get("categories") or []  # indexed by label (COCO category id)
    names = [f"{categories[label] if label < len(categories) else label} {score:.2f}"
             for label, score in zip(det["labels"][keep].tolist(), det["scores"][keep].tolist())]
    print(f"forward pass: image {tuple(picture.shape)} -> {len(det['scores'])} detections, "
          f"{int(keep.sum())} with score >= {args.score_threshold}"
          + ("" if loaded else " (random weights: these detections mean nothing)"))
    if not loaded and not keep.any():
        # Untrained heads score each of the 81 classes (80 + background) near 1/81 = 0.012: below the model's own
        # test-time filter (mmdetection's score_thr 0.05) or, past it, below the drawing threshold.
        print(f"  (untrained heads score every class near 1/81 = 0.012, so no detection reaches "
              f"{'the model filter 0.05' if not len(det['scores']) else f'--score-threshold {args.score_threshold}'}"
              "; real weights draw boxes)")
    for label in names[:10]:
        print(f"  {label}")
    drawn = picture
    if "masks" in det and keep.any():
        masks = det["masks"][keep][:, 0] >= model.meta["mask_threshold"]
        drawn = draw_segmentation_masks(drawn, masks, alpha=0.4)
    if keep.any():  # torchvision warns on an empty box list
        drawn = draw_bounding_boxes(drawn, det["boxes"][keep], labels=names, width=2)
    out = args.out or Path(f"gczoo-demo-{name}.png")
    _save_png(drawn, out, _random_caption(loaded))
    print(f"wrote {out}")
    return 0


def _demo_video(model, name: str, loaded: bool, picture, args: argparse.Namespace) -> int:
    """A static clip (the picture repeated over the model's frames) -> the top-5 Kinetics-400 class indices."""
    import torch
    from timm.data import create_transform, resolve_data_config
    from torchvision.transforms.functional import to_pil_image

    _, frames, height, width = model.pretrained_cfg["input_size"]
    frame = create_transform(**resolve_data_config({"input_size": (3, height, width)}))(to_pil_image(picture))
    clip = frame.unsqueeze(1).expand(-1, frames, -1, -1).unsqueeze(0)
    with torch.no_grad():
        logits = model(clip)
    print(f"forward pass: static clip {tuple(clip.shape)} (the picture repeated over {frames} frames) -> logits "
          f"{tuple(logits.shape)}")
    print("top-5 Kinetics-400 class indices" + ("" if loaded else " (random weights: these classes mean nothing)") + ":")
    top = logits.softmax(-1)[0].topk(5)
    for p, i in zip(top.values, top.indices):
        print(f"  {p:.3f}  class {int(i)}")
    return 0


#: Classes named in the segmentation demo's legend (the largest areas first).
_LEGEND_CLASSES = 5


def _demo_segmentation(model, name: str, loaded: bool, picture, args: argparse.Namespace) -> int:
    """Per-pixel classes at the picture's own size, coloured over it with a legend of the largest classes,
    saved as a PNG."""
    import torch
    from torchvision.utils import draw_segmentation_masks

    picture = _fit_picture(picture, model.meta["test_scale"])
    mean, std = (torch.tensor(model.pretrained_cfg[k]).view(3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        labels = model(((picture.float() / 255 - mean) / std)[None])["out"][0].argmax(0)
    classes = model.meta["classes"]
    area = torch.bincount(labels.flatten(), minlength=len(classes))
    present = area.nonzero().flatten().tolist()
    print(f"forward pass: image {tuple(picture.shape)} -> {len(classes)}-class map {tuple(labels.shape)} "
          f"({model.meta['dataset']}), {len(present)} classes present"
          + ("" if loaded else " (random weights: these classes mean nothing)"))
    palette = torch.randint(0, 256, (len(classes), 3), generator=torch.Generator().manual_seed(0)).tolist()
    largest = sorted(present, key=lambda i: -int(area[i]))
    legend = []
    for i in largest[:_LEGEND_CLASSES]:
        share = f"{int(area[i]) / labels.numel():.3f}"
        print(f"  {share}  {classes[i]}")
        legend.append((f"{classes[i]} {share}", palette[i], (255, 255, 255)))
    if len(largest) > _LEGEND_CLASSES:
        legend.append((f"+ {len(largest) - _LEGEND_CLASSES} more classes", None, (255, 255, 255)))
    masks = labels[None] == torch.tensor(present)[:, None, None]
    drawn = draw_segmentation_masks(picture, masks, alpha=0.6, colors=[tuple(palette[i]) for i in present])
    out = args.out or Path(f"gczoo-demo-{name}.png")
    _save_png(drawn, out, _random_caption(loaded) + legend)
    print(f"wrote {out}")
    return 0


def _detection_kwargs(args: argparse.Namespace) -> dict:
    """``--min-size``: the shorter image side (:func:`gczoo.models.mmdet_ops.test_scale_kwargs`)."""
    from .models.mmdet_ops import test_scale_kwargs

    return test_scale_kwargs(args.min_size)


@dataclass(frozen=True)
class Demo:
    """How the demo shows one family: ``run(model, name, loaded, picture, args) -> exit code`` prints (and saves)
    the family's natural output; ``model_kwargs(args)`` are builder arguments taken from its flags."""

    run: Callable[..., int]
    model_kwargs: Callable[[argparse.Namespace], dict] = lambda args: {}


#: family -> its demo. A new family adds one entry (and, if it needs them, its flags in ``_parser``).
DEMOS: Dict[str, Demo] = {
    "gc_resnet": Demo(_demo_classifier),
    "timm": Demo(_demo_classifier),
    "maskrcnn": Demo(_demo_detection, _detection_kwargs),
    "slowonly": Demo(_demo_video),
    "segmentation": Demo(_demo_segmentation),
}


def _check_files(**files: Optional[Path]) -> None:
    """Every file a command was given exists, before any download or model build (seconds, or minutes)."""
    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")


def _demo(args: argparse.Namespace) -> int:
    """The newcomer's first look: one model's natural output, with its weights if any (else seeded random ones)."""
    from .registry import check_name, model_entry

    arch, _ = check_name(args.model)
    family = model_entry(arch)["family"]
    if family not in DEMOS:
        raise ValueError(f"no demo for {arch} (family {family!r}) yet; the demo covers {', '.join(sorted(DEMOS))}")
    _check_files(image=args.image, weights_file=args.weights_file, checkpoint=args.checkpoint)
    picture = _demo_input(args)  # a bad picture fails now, not after a download
    from .loading import model_for_command

    demo = DEMOS[family]
    loaded = model_for_command(args.model, "gczoo demo --model {name} --weights-file FILE",
                               checkpoint=args.checkpoint, weights_file=args.weights_file, **demo.model_kwargs(args))
    code = demo.run(loaded.model, args.model, loaded.loaded, picture, args)
    print("(`gczoo list` names every model; `gczoo demo --model NAME` shows another, `gczoo info NAME` its card)")
    return code


def _analyze(args: argparse.Namespace) -> int:
    import importlib.util

    from .registry import check_name

    check_name(args.name)
    for image in args.images:
        if not image.is_file():
            raise ValueError(f"no image file at {image}")
    _check_files(weights_file=args.weights_file, checkpoint=args.checkpoint)
    if importlib.util.find_spec("matplotlib") is None:  # before torch is imported and the model built
        raise ValueError("the attention-map figure needs matplotlib: pip install 'gczoo[analysis]' "
                         "(or -e '.[analysis]' in the clone)")
    from .analysis import analyze_command

    try:
        analyze_command(args.name, args.images, args.out, checkpoint=args.checkpoint, weights_file=args.weights_file)
    except ImportError as err:  # matplotlib present but broken: the figure's extra, named
        raise ValueError(str(err)) from None
    return 0


def _weights_flags(parser: argparse.ArgumentParser) -> None:
    """The weights flags of the commands that show a model (see :mod:`gczoo.loading` for the rule)."""
    parser.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="your own weights (.safetensors or .pth): the zoo's layout (model.state_dict() saved), "
                             "or the upstream layout of the model's weights tag (converted)")
    parser.add_argument("--weights-file", type=Path, metavar="FILE",
                        help="a copy of the tag's weights (e.g. from `gczoo download --to`), checked against the "
                             "manifest's hash")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gczoo", description="Global Context Networks model zoo")
    parser.add_argument("--version", action="version", version=f"gczoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="one model's natural output on a picture (with its verified weights if any)")
    p.add_argument("--model", default="resnet50_gc_r16", metavar="NAME[.TAG]")
    _weights_flags(p)
    p.add_argument("--image", type=Path, metavar="FILE", help="your own picture (default: a colour gradient)")
    p.add_argument("--out", type=Path, metavar="PNG", help="detection and segmentation: where to save the drawing "
                                                           "(default gczoo-demo-NAME.png)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detection: smallest score drawn (default 0.5)")
    p.add_argument("--min-size", type=int, metavar="PX", help="detection: resize the shorter side to PX instead of "
                                                            "the model's 800 (a quicker look on a CPU)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("list", help="list model names")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--pretrained", action="store_true", help="list arch.tag for every weights tag")
    p.set_defaults(func=_list)
    p = sub.add_parser("info", help="show a model card (one screen; --full for everything)")
    p.add_argument("name", metavar="NAME[.TAG]")
    p.add_argument("--full", action="store_true",
                   help="the whole card: notes, training, sources and hashes, protocols, citation")
    p.add_argument("--measure", action="store_true", help="count parameters again and measure FLOPs (builds the model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)
    p = sub.add_parser("table", help="print, check or write the README's model table")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--check", type=Path, metavar="README")
    group.add_argument("--write", type=Path, metavar="README")
    p.set_defaults(func=_table)
    p = sub.add_parser("download", help="fetch and verify weights (optionally copy them to a folder)")
    p.add_argument("name", help="NAME or NAME.TAG")
    p.add_argument("--to", type=Path, metavar="DIR", help="for a machine without network: download the upstream file, "
                   "as served and verified, into DIR instead of the cache (pass it there with --weights-file)")
    p.set_defaults(func=_download)
    p = sub.add_parser("pin", help="maintainers: record each source's sha256 in the manifest")
    p.add_argument("name", help="NAME.TAG")
    p.add_argument("--manifest", type=Path, help="manifest to update (default: the package's)")
    p.add_argument("--confirm", action="append", metavar="SHA256",
                   help="a digest the maintainer checked against an independent source (repeatable)")
    p.add_argument("--also-from", metavar="URL",
                   help="a second host (http(s)://host[:port]; a hub endpoint for hub sources) to download each "
                        "source from again: a digest both hosts agree on is recorded")
    p.set_defaults(func=_pin)
    p = sub.add_parser("publish", help="maintainers: write hub-ready model repo folders (--trained: your own weights)",
                       description="Write hub-ready model repo folders: a tag's verified upstream weights "
                       "(NAME.TAG or --all, into OUT/NAME.TAG/), or weights trained by train/*.py (--trained FILE "
                       "--repo-name NAME --org ORG, into OUT/NAME/).")
    p.add_argument("name", nargs="?", help="NAME.TAG")
    p.add_argument("--all", action="store_true", help="every tag gczoo builds")
    p.add_argument("--out", type=Path, required=True, help="folder to write OUT/NAME.TAG/ (or OUT/REPO_NAME/) into")
    p.add_argument("--checkpoint", type=Path, help="the upstream file, already downloaded (its sha256 is checked)")
    p.add_argument("--trained", type=Path, metavar="FILE",
                   help="weights trained by train/detection.py or train/segmentation.py (their OUT/model.safetensors); "
                        "the card says they were trained by the publisher")
    p.add_argument("--repo-name", metavar="NAME", help="with --trained: the hub repo's name (the folder's too)")
    p.add_argument("--metrics", type=Path, action="append", metavar="REPORT",
                   help="with --trained: an eval/coco.py or eval/segmentation.py --json-out report of that file "
                        "(repeatable); shown as measured by the publisher, beside the training run's own numbers")
    p.add_argument("--org", help="hub organisation or user named in the cards (default: gczoo; required with --trained)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the repo folder even when it holds files publish did not write (they are deleted)")
    p.set_defaults(func=_publish)
    p = sub.add_parser("analyze", help="query independence of NL/SNL/GC blocks on images: table and attention maps")
    p.add_argument("name", help="NAME or NAME.TAG (weights: --checkpoint, --weights-file, the tag's, else random)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--out", type=Path, required=True, help="folder for the table (.md, .json) and figure (.png)")
    _weights_flags(p)
    p.set_defaults(func=_analyze)
    _add_export_parser(sub)
    return parser


def _error_message(err: Exception, args: argparse.Namespace) -> str:
    """The error in the terms of the command line (the library's own advice is for Python callers)."""
    from .registry import UnknownModelError

    if isinstance(err, UnknownModelError):
        return f"{err} `gczoo list --pretrained` lists every model and weights tag."
    weights = sys.modules.get("gczoo.weights")  # loaded if the command touched weights
    if weights is not None and isinstance(err, weights.WeightsUnavailableError):
        if weights.offline():
            advice = ("Downloading needs network: unset HF_HUB_OFFLINE / GCZOO_OFFLINE, or point GCZOO_MIRROR="
                      "http://host:port (URL sources) or HF_ENDPOINT (hub sources) at a mirror reachable from here.")
        else:
            advice = ("Check the network, or point GCZOO_MIRROR=http://host:port (URL sources) or HF_ENDPOINT "
                      "(hub sources) at a mirror holding the same files.")
        return f"{err.summary()}\n{advice}"
    return str(err)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .manifest import ManifestError
    from .registry import UnknownModelError

    try:
        return args.func(args)
    except Exception as e:
        weights = sys.modules.get("gczoo.weights")  # imported by the commands that touch weights
        if not isinstance(e, (UnknownModelError, ManifestError, ValueError) + ((weights.WeightsError,) if weights else ())):
            raise
        print(f"gczoo {args.command}: {_error_message(e, args)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
