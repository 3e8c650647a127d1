"""``gczoo publish``: a verified upstream checkpoint -> a folder ready to upload as a Hugging Face model repo.

The folder ``OUT/{arch}.{tag}`` holds

* ``model.safetensors``: the tag's weights converted once to the zoo's layout (what
  ``create_model`` loads after its converter ran). Metadata: the upstream file's address and
  sha256, the converter applied, the gczoo version, and ``gczoo_converter``, the converter that
  maps this file onto the model (``identity``, or ``new_head`` for backbone weights without a
  classifier). Weights taken from a backbone-only conversion carry no classifier tensors.
* ``config.json``: for classifiers written by timm's own ``save_config_for_hf`` (timm's hub
  layout), so ``timm.create_model("hf-hub:ORG/REPO", pretrained=True)`` works after
  ``import gczoo``; for other families ``{"architecture", "family", "tag", "gczoo_version"}``.
* ``README.md``: the model card, with the hub's YAML metadata (built with huggingface_hub's
  ``ModelCardData``/``EvalResult``; ``model-index`` holds every published metric of the tag).

Output is deterministic: the same input gives byte-identical files (GC-block parameters a
converter takes from the model's initialisation are drawn from a fixed seed; safetensors
metadata is written in sorted order), so a published file's sha256 can be pinned.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

__all__ = ["publish", "publish_all", "publishable", "PublishError", "PUBLISHED_FILES"]

#: The files ``publish`` writes into a repo folder; a folder holding only these may be replaced.
PUBLISHED_FILES = frozenset({"model.safetensors", "config.json", "README.md"})

_HF = "https://huggingface.co"
_SEED = 0
#: Where each kind of metric source in the manifest can be read (the hub's model-index wants an address).
_SOURCE_HOMES = (
    ("torchvision ", "https://pytorch.org/vision/stable/models.html"),
    ("timm results-imagenet.csv", "https://github.com/huggingface/pytorch-image-models/blob/main/results/results-imagenet.csv"),
    ("mmdetection's GCNet model zoo README", "https://github.com/open-mmlab/mmdetection/blob/2.x/configs/gcnet/README.md"),
    ("GCNet (Cao et al.", "https://arxiv.org/abs/1904.11492"),
    ("mmsegmentation configs/gcnet/metafile.yaml",
     "https://github.com/open-mmlab/mmsegmentation/blob/main/configs/gcnet/metafile.yaml"),
    ("mmsegmentation configs/nonlocal_net/metafile.yaml",
     "https://github.com/open-mmlab/mmsegmentation/blob/main/configs/nonlocal_net/metafile.yaml"),
)
#: model-index description of each manifest task: (task type, task name, dataset type, dataset name, split, hub dataset).
_TASKS = {
    "imagenet-1k": ("image-classification", "Image Classification", "imagenet-1k", "ImageNet-1k", "validation",
                    "imagenet-1k"),
    "coco-2017-val": ("object-detection", "Object Detection", "coco", "COCO 2017", "validation", "coco"),
    "cityscapes-val": ("image-segmentation", "Semantic Segmentation", "cityscapes", "Cityscapes", "validation",
                       "cityscapes"),
    "ade20k-val": ("image-segmentation", "Semantic Segmentation", "ade20k", "ADE20K", "validation", "ade20k"),
}
_METRICS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "box_ap": "box AP", "mask_ap": "mask AP",
            "miou": "mIoU", "miou_ms_flip": "mIoU (multi-scale + flip)"}
_LICENSES = {"apache-2.0", "bsd-3-clause", "mit", "cc-by-4.0"}


class PublishError(ValueError):
    """The output folder cannot be written safely: a link, a file, or a folder holding files publish did not write."""


def publishable() -> List[str]:
    """Every ``arch.tag`` ``publish`` can write (timm's own models are hosted by timm already)."""
    from .registry import list_models, model_entry

    return [n for n in list_models(pretrained=True) if model_entry(n)["family"] != "timm"]


def publish(name: str, out: os.PathLike, checkpoint: Optional[os.PathLike] = None, org: str = "gczoo",
            progress: bool = True, overwrite: bool = False) -> Path:
    """Write ``out/{arch}.{tag}`` for the weights ``name`` (``arch.tag``); return the folder.

    The upstream file is fetched and verified by :mod:`gczoo.weights`, or read from
    ``checkpoint``, which must be that file (its sha256 is checked against the manifest's full
    pin; against a hash prefix only with ``GCZOO_ALLOW_PREFIX_ONLY=1``). A hosted copy listed
    among the sources (one with its own converter) is never the input: publishing starts from
    upstream. GC-block parameters a converter takes from the model's initialisation come from a
    fixed seed, so the same input and torch version give the same bytes.

    An existing ``out/{arch}.{tag}`` is replaced only when it is empty or holds nothing but
    :data:`PUBLISHED_FILES`, or with ``overwrite``; a link or a file there is never replaced
    (:class:`PublishError`, raised before any work).
    """
    import gczoo
    from . import convert, weights
    from .registry import create_model, model_entry, split_name, weights_entry

    arch, tag = split_name(name)
    if tag is None:
        raise ValueError(f"publish takes NAME.TAG, got {name!r} (`gczoo list --pretrained` shows them)")
    family = model_entry(arch)["family"]
    tag, entry = weights_entry(arch, tag)
    if family == "timm":
        raise ValueError(f"{arch}.{tag} is timm's own model, hosted by timm ({entry['sources'][0].get('repo_id')}); "
                         "gczoo publishes the models it builds")
    upstream = [s for s in entry["sources"] if "converter" not in s]
    out = Path(out)
    final = out / f"{arch}.{tag}"
    _check_destination(final, overwrite)
    if checkpoint is not None:
        source, digest = _verify_checkpoint(f"{arch}.{tag}", Path(checkpoint), upstream)
        path = Path(checkpoint)
    else:
        path, source = weights.fetch_with_source(arch, tag, dict(entry, sources=upstream), progress=progress)
        digest = _upstream_sha256(path)
    state_dict = weights.load_checkpoint(path, f"{arch}.{tag}")

    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = create_model(f"{arch}.{tag}")
    tensors = convert.filter_fn(arch, tag, entry["converter"], str(path))(state_dict, model)
    headless = entry["converter"] in convert.HEADLESS
    if headless:
        classifier = model.pretrained_cfg.get("classifier", "fc") + "."
        tensors = {k: v for k, v in tensors.items() if not k.startswith(classifier)}
    address = source.get("url") or f"{_HF}/{source['repo_id']}/resolve/{source['revision']}/{source['filename']}"
    if source.get("sha256"):
        verified = "the manifest's full sha256 pin"
    elif source["type"] == "hf_hub":
        verified = "the hub's own sha256 of the file (its LFS ETag); not pinned in the manifest"
    else:
        verified = (f"only the hash prefix {source['sha256_prefix']} carried in the file name "
                    f"({4 * len(source['sha256_prefix'])} bits); pin it with `gczoo pin`")
    metadata = {"format": "pt", "gczoo_upstream": address, "gczoo_upstream_sha256": digest,
                "gczoo_converted_by": entry["converter"], "gczoo_converter": "new_head" if headless else "identity",
                "gczoo_version": gczoo.__version__}

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out))
    try:
        _save_safetensors(tensors, tmp / "model.safetensors", metadata)
        _write_config(model, family, arch, tag, tmp / "config.json")
        card = _model_card(arch, tag, entry, family, metadata, org, verified,
                           sha256=weights.sha256_of(tmp / "model.safetensors"))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _check_destination(final, overwrite)  # again: minutes may have passed
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def publish_all(out: os.PathLike, org: str = "gczoo", names: Optional[Iterable[str]] = None,
                overwrite: bool = False) -> List[Path]:
    """:func:`publish` for every publishable tag (or ``names``), with a progress bar."""
    from tqdm import tqdm

    done = []
    with tqdm(list(names or publishable()), unit="repo", desc="gczoo publish") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            done.append(publish(name, out, org=org, progress=False, overwrite=overwrite))
    return done


def hosted_source(folder: os.PathLike, org: str = "gczoo") -> dict:
    """The manifest source for a published folder once uploaded to ``org/{folder name}``."""
    from .fileio import safetensors_metadata
    from .weights import WeightsError, sha256_of

    folder = Path(folder)
    converter = safetensors_metadata(folder / "model.safetensors", f"publish {folder.name}").get("gczoo_converter")
    if converter is None:
        raise WeightsError(f"{folder / 'model.safetensors'} was not written by `gczoo publish` (no gczoo_converter "
                           "in its metadata)")
    return {"type": "hf_hub", "repo_id": f"{org}/{folder.name}", "filename": "model.safetensors", "revision": "main",
            "format": "safetensors", "sha256": sha256_of(folder / "model.safetensors"), "converter": converter}


# --------------------------------------------------------------------------- pieces


def _check_destination(final: Path, overwrite: bool) -> None:
    """Refuse to replace what ``publish`` did not write: a link, a file, or a folder with other files (unless ``overwrite``)."""
    if final.is_symlink():
        raise PublishError(f"{final} is a symbolic link; publish neither follows nor removes links. Remove it, "
                           "or choose another --out")
    existing = next(p for p in (final, *final.parents) if p.exists())
    if not existing.is_dir():
        raise PublishError(f"{existing} is a file, not a folder; remove it, or choose another --out")
    if final.is_dir() and not overwrite:
        foreign = sorted(p.name for p in final.iterdir() if p.name not in PUBLISHED_FILES or not p.is_file())
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            raise PublishError(f"{final} holds files publish did not write ({shown}); publish would delete them. "
                               "Move them away, choose another --out, or pass --overwrite to replace the folder")


def _upstream_sha256(path: Path) -> str:
    """sha256 of the upstream file: recorded at pickle conversion by :mod:`gczoo.weights`, else the file's own."""
    from .fileio import safetensors_metadata
    from .weights import sha256_of

    return safetensors_metadata(path, str(path)).get("gczoo_source_sha256") or sha256_of(path)


def _verify_checkpoint(label: str, path: Path, upstream: List[dict]) -> Tuple[dict, str]:
    from .weights import WeakPinError, WeightsError, WeightsIntegrityError, allow_prefix_only, matching_source, sha256_of

    if not path.is_file():
        raise WeightsError(f"{label}: no checkpoint file at {path}")
    digest = sha256_of(path)
    source, by_prefix = matching_source(upstream, digest)
    if source is not None and (not by_prefix or allow_prefix_only()):
        return source, digest
    if source is not None:
        prefix = source["sha256_prefix"]
        raise WeakPinError(
            f"{label}: {path.name} matches only the hash prefix {prefix} of {source['url']} "
            f"({4 * len(prefix)} bits, forgeable), and a published file would turn that into a full pin. "
            "Publish without --checkpoint (downloaded from the origin), pin the upstream sha256 first "
            f"(`gczoo pin {label} --confirm SHA256`), or accept the risk with GCZOO_ALLOW_PREFIX_ONLY=1.")
    checkable = [s.get("sha256") or s.get("sha256_prefix") for s in upstream if s.get("sha256") or s.get("sha256_prefix")]
    if not checkable:
        raise WeightsError(f"{label}: no upstream source has a pinned sha256 to check {path.name} against; "
                           f"run `gczoo pin {label}` first, or publish without --checkpoint")
    raise WeightsIntegrityError(f"{label}: {path.name} (sha256 {digest}) is not the tag's upstream file "
                                f"(expected sha256 or prefix: {', '.join(checkable)})")


def _save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors file with its metadata in sorted key order (the library writes a hash map, in any order)."""
    from safetensors.torch import save_file

    from .weights import storable

    save_file(storable(tensors), str(path), metadata=metadata)
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > size:
            raise RuntimeError(f"{path}: sorted safetensors header is longer than the written one")
        f.seek(8)
        f.write(canonical.ljust(size, b" "))


def _write_config(model, family: str, arch: str, tag: str, path: Path) -> None:
    import gczoo

    if family == "gc_resnet":
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(path))
        return
    config = {"architecture": arch, "family": family, "tag": tag, "gczoo_version": gczoo.__version__}
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _source_home(text: str) -> str:
    for start, url in _SOURCE_HOMES:
        if text.startswith(start):
            return url
    raise ValueError(f"publish: no address known for the metric source {text[:80]!r}; add it to publish._SOURCE_HOMES")


def _eval_results(metrics: List[dict]) -> list:
    from huggingface_hub import EvalResult

    from .manifest import metric_numbers

    results = []
    for metric in metrics:
        if metric["task"] not in _TASKS:
            raise ValueError(f"publish: no model-index description of the task {metric['task']!r}; add it to publish._TASKS")
        task_type, task_name, dataset_type, dataset_name, split, _ = _TASKS[metric["task"]]
        # the protocol as dataset config: the hub groups results by it, so each source keeps its own numbers
        protocol = metric["protocol"].get("config") or ", ".join(f"{k}={v}" for k, v in metric["protocol"].items())
        for key, value in metric_numbers(metric).items():
            results.append(EvalResult(
                task_type=task_type, task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
                dataset_split=split, dataset_config=protocol, metric_type=key, metric_name=_METRICS.get(key, key), metric_value=value,
                source_name=metric["source"], source_url=_source_home(metric["source"]), verified=False))
    return results


def _license(text: str) -> dict:
    spdx = text.split()[0].lower()
    return {"license": spdx} if spdx in _LICENSES else {"license": "other", "license_name": text}


def _metric_line(metric: dict) -> str:
    from .cards import metric_values

    protocol = "; ".join(f"{k}: {v}" for k, v in metric["protocol"].items())
    return f"| {metric['task']} | {metric_values(metric)} | {protocol} | {metric['source']} |"


def _model_card(arch: str, tag: str, entry: dict, family: str, metadata: dict, org: str, verified: str,
                sha256: str) -> str:
    from huggingface_hub import ModelCardData

    from . import convert
    from .manifest import load_manifest
    from .registry import model_entry

    model = model_entry(arch)
    repo, name = f"{org}/{arch}.{tag}", f"{arch}.{tag}"
    detector = entry.get("detector")
    classifier = family == "gc_resnet"
    datasets = sorted({_TASKS[m["task"]][5] for m in entry["metrics"] + (detector or {}).get("metrics", [])})
    if classifier and (detector or "in1k" in tag):
        datasets = sorted(set(datasets) | {"imagenet-1k"})
    if detector:
        pipeline = "image-feature-extraction"
    elif classifier:
        pipeline = "image-classification"
    else:
        pipeline = _TASKS[entry["metrics"][0]["task"]][0] if entry["metrics"] else "image-segmentation"
    tags = ["gczoo", "gcnet", "global-context", pipeline] + (["timm"] if classifier else []) + (["backbone"] if detector else [])
    data = ModelCardData(
        library_name="timm" if classifier else "gczoo", pipeline_tag=pipeline, tags=tags, datasets=datasets,
        model_name=name, eval_results=_eval_results(entry["metrics"]) or None, **_license(entry["license"]))

    converter_doc = inspect.getdoc(convert.CONVERTERS[entry["converter"]]).split("\n\n")[0]
    lines = [f"# {name}", "", model["summary"], "", entry["training"], ""]
    if detector:
        lines += ["## What these weights are", "",
                  f"The backbone of the COCO detector `{detector['config']}` (mmdetection 2.x), taken out of its "
                  "checkpoint: the only GC blocks trained on real data that are public. They are **not** ImageNet "
                  "classifier weights: there is no classifier head (a model built with `num_classes > 0` gets a new, "
                  "untrained head and gczoo warns once), and BatchNorm was applied with fixed statistics inside the "
                  "detector. Use `features_only=True` for the c2..c5 feature maps (strides 4 to 32) or "
                  "`num_classes=0` for pooled features, and fine-tune.", "",
                  "The detector's published results, given as provenance of these weights and **not** as results "
                  "of this model:", "",
                  "| task | detector result | protocol | source |", "|---|---|---|---|",
                  *[_metric_line(m) for m in detector["metrics"]], ""]
    if entry["metrics"]:
        lines += ["## Published results", "",
                  "Numbers as published by their source for these weights (listed in the `model-index` above); "
                  "`gczoo info` shows the same with their protocol.", "",
                  "| task | result | protocol | source |", "|---|---|---|---|",
                  *[_metric_line(m) for m in entry["metrics"]], ""]
    lines += ["## Usage", "", "```python", "import gczoo", "",
              f'model = gczoo.create_model("hf-hub:{repo}", pretrained=True)',
              f'# or from the zoo\'s manifest: gczoo.create_model("{name}", pretrained=True)']
    if detector:
        lines.append(f'features = gczoo.create_model("hf-hub:{repo}", pretrained=True, features_only=True)')
    lines += ["```", ""]
    if classifier:
        lines += ["With timm (the model is registered by `import gczoo`):", "", "```python", "import gczoo  # noqa: F401",
                  "import timm", "", f'model = timm.create_model("hf-hub:{repo}", pretrained=True)', "```", ""]
    lines += ["With torch.hub:", "", "```python", "import torch", "",
              f'model = torch.hub.load("org/gczoo", "{arch}", pretrained=True, tag="{tag}")', "```", "",
              "## How this file differs from upstream", "",
              f"Converted once from the upstream checkpoint by gczoo's `{entry['converter']}` converter: {converter_doc}",
              ""]
    lines += [f"- {note}" for note in model.get("notes", [])]
    lines += ["", "## Provenance", "",
              f"- upstream file: {metadata['gczoo_upstream']}",
              f"- its sha256: `{metadata['gczoo_upstream_sha256']}`, checked at publishing against {verified}",
              f"- converter: `{metadata['gczoo_converted_by']}`; gczoo {metadata['gczoo_version']}",
              f"- `model.safetensors` sha256: `{sha256}` (publishing is deterministic: `gczoo publish {name}` "
              "reproduces this file bit for bit)",
              f"- license: {entry['license']}", "",
              "## Upload (maintainers)", "", "```bash", f"hf upload {repo} {name} .", "```", "",
              "## Citation", "", "```bibtex", load_manifest()["citation"], "```", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
