"""The ``gczoo`` command line.

``gczoo demo``                       the zoo at a glance: model table, a real forward pass, weights check
``gczoo list [PATTERN] [--pretrained]`` model names (``arch`` or ``arch.tag``)
``gczoo info NAME [--json]``          the model card
``gczoo table [--check F | --write F]`` the README's model table
``gczoo download NAME[.TAG] [--to DIR]`` fetch, verify and copy weights for an air-gapped machine
``gczoo pin NAME.TAG [--confirm SHA256] [--also-from URL]`` maintainers: record each source's sha256
                                      when a second source or the maintainer confirms it
``gczoo publish NAME.TAG|--all --out DIR`` maintainers: write hub-ready repo folders (gczoo.publish)
``gczoo analyze NAME[.TAG] IMAGE... --out DIR`` query independence of the NL/SNL/GC blocks (table, attention maps)

Exit codes: 0 success, 1 a check failed, 2 bad input or unavailable weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path
from typing import List, Optional

from .fileio import atomic_path

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
    from .cards import model_card
    from .registry import model_info

    if args.json:
        print(json.dumps(model_info(args.name), indent=2, default=str))
    else:
        print(model_card(args.name))
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


def _download(args: argparse.Namespace) -> int:
    from . import weights
    from .registry import split_name, weights_entry

    arch, _ = split_name(args.name)
    tag, entry = weights_entry(args.name)
    path = weights.export(arch, tag, entry, args.to) if args.to else weights.fetch(arch, tag, entry)
    print(path)
    print(f"load it offline with: gczoo.create_model({f'{arch}.{tag}'!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(path)!r}))")
    return 0


def _pin(args: argparse.Namespace) -> int:
    """Record each source's full sha256, but only on evidence beyond the one download: the digest
    is already pinned, the maintainer confirms it (``--confirm``), or a second, independent host
    serves the identical file (``--also-from``). A prefix-verified download alone proves 32 bits."""
    from . import weights
    from .manifest import MANIFEST_PATH, dump_manifest, load_manifest
    from .registry import split_name

    path = args.manifest or MANIFEST_PATH
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
    """Maintainers: write hub-ready repo folders (see gczoo.publish); uploading stays with `hf upload`."""
    from .publish import hosted_source, publish, publish_all

    if args.all == bool(args.name):
        raise ValueError("publish takes NAME.TAG or --all")
    if args.all and args.checkpoint:
        raise ValueError("--checkpoint goes with one NAME.TAG, not --all")
    folders = publish_all(args.out, org=args.org) if args.all else [
        publish(args.name, args.out, checkpoint=args.checkpoint, org=args.org)]
    for folder in folders:
        print(f"{folder}\n  upload: hf upload {args.org}/{folder.name} {folder} .\n"
              f"  then list it first among the tag's sources: {json.dumps(hosted_source(folder, args.org))}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The newcomer's first look: what is in the zoo, a real forward pass, and the weights check."""
    import torch
    import torchvision
    from safetensors.torch import load_file
    from timm.data import ImageNetInfo, create_transform, resolve_data_config
    from torchvision.transforms.functional import to_pil_image

    from .registry import create_model, list_models
    from .weights import WeightsError

    print("gczoo models (`gczoo list --pretrained` for weights tags, `gczoo info NAME` for a card):")
    print("  " + "\n  ".join(list_models()))
    name = args.model
    print(f"\n== {name}: downloading and verifying its default weights")
    try:
        model = create_model(name, pretrained=True).eval()
        loaded = True
    except WeightsError as e:
        print(f"weights unavailable, so this run uses random initialisation and verifies nothing:\n{e}")
        model = create_model(name).eval()
        loaded = False
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    # A deterministic test picture (a smooth colour gradient), so the demo needs no data set.
    size = config["input_size"][1:]
    y, x = torch.meshgrid(torch.linspace(0, 1, 300), torch.linspace(0, 1, 400), indexing="ij")
    picture = torch.stack([x, y, 1 - x * y]).mul(255).byte()
    batch = transform(to_pil_image(picture)).unsqueeze(0)
    with torch.no_grad():
        logits = model(batch)
    print(f"forward pass: input {tuple(batch.shape)} (size {size}, {config['interpolation']}, "
          f"crop_pct {config['crop_pct']}) -> logits {tuple(logits.shape)}")
    info = ImageNetInfo()
    if not loaded:
        print("  (random weights: these classes mean nothing)")
    top = logits.softmax(-1)[0].topk(5)
    for p, i in zip(top.values, top.indices):
        print(f"  {p:.3f}  {info.index_to_description(int(i))}")
    if not loaded:
        return 0
    # The GC-ready weights claim: GC blocks start as the identity, so the model computes exactly
    # the torchvision ResNet whose weights it was given; check it on the same file.
    source = model.pretrained_cfg.get("hf_hub_id", "").split("/")[-1].split(".")[0]
    if source not in torchvision.models.list_models(module=torchvision.models):
        return 0
    reference = torchvision.models.get_model(source).eval()
    reference.load_state_dict(load_file(model.pretrained_cfg["file"]))
    with torch.no_grad():
        diff = (reference(batch) - logits).abs().max().item()
    verdict = "PASS" if diff <= 1e-4 else "FAIL"
    print(f"{verdict}: {name} vs torchvision {source} loaded from the same file: "
          f"max |logit difference| = {diff:.2e}")
    return 0 if verdict == "PASS" else 1


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_command

    try:
        analyze_command(args.name, args.images, args.out, checkpoint=args.checkpoint)
    except ImportError as e:  # the figure's matplotlib: an extra
        print(f"gczoo analyze: {e}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gczoo", description="Global Context Networks model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="model table, a real forward pass, download and verification")
    p.add_argument("--model", default="resnet50_gc_r16")
    p.set_defaults(func=_demo)
    p = sub.add_parser("list", help="list model names")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--pretrained", action="store_true", help="list arch.tag for every weights tag")
    p.set_defaults(func=_list)
    p = sub.add_parser("info", help="show a model card")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)
    p = sub.add_parser("table", help="print, check or write the README's model table")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--check", type=Path, metavar="README")
    group.add_argument("--write", type=Path, metavar="README")
    p.set_defaults(func=_table)
    p = sub.add_parser("download", help="fetch and verify weights (optionally copy them to a folder)")
    p.add_argument("name", help="NAME or NAME.TAG")
    p.add_argument("--to", type=Path, help="folder to copy the verified safetensors file into")
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
    p = sub.add_parser("publish", help="maintainers: write hub-ready model repo folders")
    p.add_argument("name", nargs="?", help="NAME.TAG")
    p.add_argument("--all", action="store_true", help="every tag gczoo builds")
    p.add_argument("--out", type=Path, required=True, help="folder to write OUT/NAME.TAG/ into")
    p.add_argument("--checkpoint", type=Path, help="the upstream file, already downloaded (its sha256 is checked)")
    p.add_argument("--org", default="gczoo", help="hub organisation named in the cards (default: gczoo)")
    p.set_defaults(func=_publish)
    p = sub.add_parser("analyze", help="query independence of NL/SNL/GC blocks on images: table and attention maps")
    p.add_argument("name", help="NAME or NAME.TAG (weights: the tag, --checkpoint, else random initialisation)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--out", type=Path, required=True, help="folder for the table (.md, .json) and figure (.png)")
    p.add_argument("--checkpoint", type=Path, help="weights file (.safetensors or .pth): the zoo's layout, or the "
                   "upstream layout of the model's weights tag (converted)")
    p.set_defaults(func=_analyze)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .manifest import ManifestError
    from .registry import UnknownModelError
    from .weights import WeightsError

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (UnknownModelError, ManifestError, WeightsError, ValueError) as e:
        print(f"gczoo {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
