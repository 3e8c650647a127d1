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

``gczoo publish --trained FILE`` (:func:`publish_trained`) writes the same three files for weights
trained by the zoo's own scripts (``train/*.py``): the file's tensors and training metadata after they
load strictly into the model its metadata describes, ``config.json`` with the build arguments
(``model_args``), and a card that says the publisher trained them, with the recipe and only the
publisher's own numbers (the run's final evaluation, ``eval/*.py`` reports), marked as not verified.

Output is deterministic: the same input gives byte-identical files (GC-block parameters a
converter takes from the model's initialisation are drawn from a fixed seed; safetensors
metadata is written in sorted order), so a published file's sha256 can be pinned.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

__all__ = ["publish", "publish_all", "publish_trained", "publishable", "read_trained", "PublishError",
           "TrainedWeightsError", "TrainedKeysError", "EvalReportError", "PUBLISHED_FILES", "TRAINED_METADATA"]

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

    def write(tmp: Path) -> None:
        _save_safetensors(tensors, tmp / "model.safetensors", metadata)
        _write_config(model, family, arch, tag, tmp / "config.json")
        card = _model_card(arch, tag, entry, family, metadata, org, verified,
                           sha256=weights.sha256_of(tmp / "model.safetensors"))
        (tmp / "README.md").write_text(card, encoding="utf-8")

    return _write_repo(out, final, overwrite, write)


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
    metadata = safetensors_metadata(folder / "model.safetensors", f"publish {folder.name}")
    converter = metadata.get("gczoo_converter")
    if "gczoo_trained_by" in metadata:
        raise WeightsError(f"{folder / 'model.safetensors'} holds weights trained by the publisher "
                           f"({metadata['gczoo_trained_by'][:40]}), not a tag's upstream weights: they load by their "
                           "hf-hub: name, never as a source of the tag")
    if converter is None:
        raise WeightsError(f"{folder / 'model.safetensors'} was not written by `gczoo publish` (no gczoo_converter "
                           "in its metadata)")
    return {"type": "hf_hub", "repo_id": f"{org}/{folder.name}", "filename": "model.safetensors", "revision": "main",
            "format": "safetensors", "sha256": sha256_of(folder / "model.safetensors"), "converter": converter}


# --------------------------------------------------------------------------- weights trained here


class TrainedWeightsError(ValueError):
    """A ``--trained`` file that cannot be published as weights trained by the zoo's scripts: not a
    safetensors file, not written by ``train/*.py`` (an upstream or published file), or metadata that is
    malformed or names an architecture, tag or recipe this gczoo does not have."""


class TrainedKeysError(TrainedWeightsError):
    """The trained tensors do not load strictly into the model their build arguments describe (names the keys)."""


class EvalReportError(ValueError):
    """A ``--metrics`` file that is not an ``eval/*.py --json-out`` report measuring the ``--trained`` file."""


#: The safetensors metadata ``train/common.py:save_weights`` writes with trained weights, all required.
TRAINED_METADATA = ("gczoo_converter", "gczoo_build_args", "gczoo_model", "gczoo_recipe", "gczoo_iterations",
                    "gczoo_metrics", "gczoo_trained_by")
#: How the run went beyond its recipe (``train/common.py:run_record``); files written before it was recorded lack it.
RUN_KEY = "gczoo_run"
#: Each start a run records, as the card says it.
_STARTS = {"tag": "the tag's own weights, fine-tuned (`--pretrained`)",
           "imagenet": "the ImageNet backbone the tag's upstream config names, GC blocks as identity "
                       "(`--pretrained-backbone`)",
           "random": "the model's random initialisation"}
#: Each recipe norm, as the card says it.
_NORMS = {"frozen_stats": "BatchNorm with fixed statistics and trained affine (mmdetection's norm_eval=True)",
          "syncbn": "SyncBatchNorm"}
#: Each training task of the manifest's recipes: (family of its models, training script, evaluation script).
_TRAINING = {"detection": ("maskrcnn", "train/detection.py", "eval/coco.py"),
             "segmentation": ("segmentation", "train/segmentation.py", "eval/segmentation.py")}
#: model-index task of each family trained here: (task type, task name).
_TRAINED_TASKS = {"maskrcnn": ("object-detection", "Object Detection"),
                  "segmentation": ("image-segmentation", "Semantic Segmentation")}
#: The metrics the evaluation code measures for trained models, with their names in cards.
_MEASURED = {"box_ap": "box AP", "mask_ap": "mask AP", "miou": "mIoU", "miou_ms_flip": "mIoU (multi-scale + flip)",
             "aacc": "aAcc"}
#: Counts of evaluated samples that a training run records beside its metrics.
_SAMPLE_COUNTS = ("val_images", "val_samples")
#: Largest ``--metrics`` report read (a report of one segmentation run is a few KB).
_MAX_REPORT_BYTES = 16 << 20
#: A Hugging Face user, organisation or repo name.
_HUB_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class TrainedFile:
    """A weights file of ``train/*.py`` with its metadata checked (:func:`read_trained`)."""

    path: Path
    sha256: str
    arch: str
    tag: str
    family: str
    recipe_name: str
    recipe: dict
    build_args: dict
    iterations: int
    metrics: dict
    metadata: dict
    run: Optional[dict]

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def scripts(self) -> Tuple[str, str]:
        """(training script, evaluation script) of the file's task."""
        return _TRAINING[self.recipe["task"]][1:]


def read_trained(path: os.PathLike) -> TrainedFile:
    """The metadata of a weights file written by ``train/*.py``, checked: every key of
    :data:`TRAINED_METADATA`, valid JSON where JSON is stored, an architecture, tag and recipe of this
    gczoo that belong together. Anything else is a :class:`TrainedWeightsError` naming the file."""
    from safetensors import safe_open

    from .hosted import CONVERTER_KEY
    from .manifest import load_manifest
    from .registry import UnknownModelError, model_entry, split_name, weights_entry
    from .trained import BUILD_ARGS_KEY
    from .weights import sha256_of

    path = Path(path)
    if not path.is_file():
        raise TrainedWeightsError(f"--trained {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as err:  # safetensors' own SafetensorError for anything that is not its format
        raise TrainedWeightsError(f"--trained {path} is not a safetensors file ({type(err).__name__}: {err}); "
                                  "train/detection.py and train/segmentation.py write OUT/model.safetensors") from None
    if "gczoo_trained_by" not in meta:
        if "gczoo_upstream" in meta:
            what = (f"was written by `gczoo publish` from the upstream file {meta['gczoo_upstream'][:200]}, not "
                    "trained here; publish upstream weights by their tag: `gczoo publish NAME.TAG`")
        else:
            what = ("has no gczoo training metadata (gczoo_trained_by), so it was not written by train/*.py; "
                    "publish upstream weights by their tag: `gczoo publish NAME.TAG [--checkpoint FILE]`")
        raise TrainedWeightsError(f"--trained {path} {what}")
    missing = [k for k in TRAINED_METADATA if k not in meta]
    if missing:
        raise TrainedWeightsError(f"--trained {path}: its training metadata lacks {', '.join(missing)} "
                                  "(train/common.py:save_weights writes all of them)")
    if meta[CONVERTER_KEY] != "identity":
        raise TrainedWeightsError(f"--trained {path}: metadata {CONVERTER_KEY} is {meta[CONVERTER_KEY][:60]!r}; "
                                  "trained weights are the model's own state dict ('identity')")
    build_args, metrics = (_metadata_json(path, meta, key) for key in (BUILD_ARGS_KEY, "gczoo_metrics"))
    bad = [k for k, v in metrics.items() if not (re.match(r"^[a-z0-9_]{1,40}$", k) and _is_number(v))]
    if bad or len(metrics) > 32:
        raise TrainedWeightsError(f"--trained {path}: metadata gczoo_metrics must map at most 32 names (a-z, 0-9, _) "
                                  "to numbers, "
                                  f"got {json.dumps(metrics)[:120]}")
    if not meta["gczoo_iterations"].isdigit() or int(meta["gczoo_iterations"]) < 1:
        raise TrainedWeightsError(f"--trained {path}: metadata gczoo_iterations is {meta['gczoo_iterations'][:40]!r}, "
                                  "not a positive whole number")
    arch, tag = split_name(meta["gczoo_model"])
    try:
        family = model_entry(arch)["family"]
        if tag is None:
            raise UnknownModelError("no weights tag")
        tag, _ = weights_entry(arch, tag)
    except UnknownModelError as err:
        raise TrainedWeightsError(f"--trained {path}: metadata gczoo_model names {meta['gczoo_model'][:100]!r}, not a "
                                  f"NAME.TAG of this gczoo version ({err}); `gczoo list --pretrained` lists them") from None
    recipes = load_manifest().get("recipes", {})
    recipe_name = meta["gczoo_recipe"]
    if recipe_name not in recipes:
        raise TrainedWeightsError(f"--trained {path}: metadata gczoo_recipe names {recipe_name[:100]!r}, not a recipe of "
                                  f"this gczoo version ({', '.join(recipes)})")
    recipe = recipes[recipe_name]
    expected_family, script, _ = _TRAINING[recipe["task"]]
    if family != expected_family or meta["gczoo_trained_by"] != script:
        raise TrainedWeightsError(f"--trained {path}: its metadata does not hold together: {arch} (family {family}) "
                                  f"trained by {meta['gczoo_trained_by'][:60]!r} with the {recipe['task']} recipe "
                                  f"{recipe_name} (written by {script} for {expected_family} models)")
    run = _run_record(path, meta) if RUN_KEY in meta else None
    return TrainedFile(path=path, sha256=sha256_of(path), arch=arch, tag=tag, family=family, recipe_name=recipe_name,
                       recipe=recipe, build_args=build_args, iterations=int(meta["gczoo_iterations"]), metrics=metrics,
                       metadata={k: meta[k] for k in (*TRAINED_METADATA, RUN_KEY) if k in meta}, run=run)


def _run_record(path: Path, meta: dict) -> dict:
    """The file's ``gczoo_run``, checked field by field."""
    run = _metadata_json(path, meta, RUN_KEY)
    ok = (set(run) == {"start", "total_batch", "base_lr", "syncbn", "amp"} and run["start"] in _STARTS
          and isinstance(run["total_batch"], int) and not isinstance(run["total_batch"], bool)
          and 0 < run["total_batch"] <= 1 << 20 and _is_number(run["base_lr"]) and math.isfinite(run["base_lr"])
          and run["base_lr"] > 0 and isinstance(run["syncbn"], bool) and run["amp"] in (None, "bfloat16", "float16"))
    if not ok:
        raise TrainedWeightsError(f"--trained {path}: metadata {RUN_KEY} is {json.dumps(run)[:160]}, not what "
                                  "train/common.py:run_record writes (start, total_batch, base_lr, syncbn, amp)")
    return run


def publish_trained(checkpoint: os.PathLike, out: os.PathLike, repo_name: str, org: str,
                    metrics: Iterable[os.PathLike] = (), overwrite: bool = False) -> Path:
    """Write ``out/{repo_name}`` for weights trained by ``train/*.py`` (``checkpoint``); return the folder.

    The file is checked first (:func:`read_trained`): a file of the zoo's training scripts, and its tensors
    load strictly (every key, every shape) into the model built as its metadata says (``create_model(
    gczoo_model, **gczoo_build_args)``; else :class:`TrainedKeysError` naming the keys). ``metrics`` are
    ``eval/*.py --json-out`` reports of this very file (matched by sha256), shown beside the numbers the
    training run measured itself; all are marked as the publisher's, not verified by gczoo.

    ``model.safetensors`` holds the same tensors with the training metadata (plus the trained file's sha256
    and the gczoo version), bytes deterministic; ``config.json`` the zoo's short form with the build
    arguments as ``model_args`` (checked by :func:`gczoo.hosted.config_problems`, as loading will), so
    ``gczoo.create_model("hf-hub:{org}/{repo_name}", pretrained=True)`` rebuilds the trained model.
    The folder rules are :func:`publish`'s.
    """
    import gczoo

    from .hosted import config_problems
    from .weights import sha256_of

    for value, flag in ((org, "--org"), (repo_name, "--repo-name")):
        if not isinstance(value, str) or not _HUB_NAME.match(value):
            raise ValueError(f"{flag} {str(value)[:100]!r} is not a Hugging Face name (letters, digits, '-', '_', '.'; "
                             "at most 96; no '--' or '..'; starting and ending with a letter or digit)")
    out = Path(out)
    final = out / repo_name
    _check_destination(final, overwrite)
    trained = read_trained(checkpoint)
    measured = ([_run_measurement(trained)] if set(trained.metrics) - set(_SAMPLE_COUNTS) else []) + [
        m for report in metrics for m in _report_measurements(Path(report), trained)]
    config = {"architecture": trained.arch, "family": trained.family, "tag": trained.tag,
              "gczoo_version": gczoo.__version__, "model_args": trained.build_args}
    problems = config_problems(config)
    if problems:
        raise TrainedWeightsError(f"--trained {trained.path}: its build arguments cannot go into a hub config.json, "
                                  f"which carries only what train/*.py records: {'; '.join(problems[:5])}")
    tensors = _verified_tensors(trained)
    metadata = {**trained.metadata, "format": "pt", "gczoo_trained_sha256": trained.sha256,
                "gczoo_version": gczoo.__version__}

    def write(tmp: Path) -> None:
        _save_safetensors(tensors, tmp / "model.safetensors", metadata)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        card = _trained_card(trained, measured, org, repo_name, sha256_of(tmp / "model.safetensors"))
        (tmp / "README.md").write_text(card, encoding="utf-8")

    return _write_repo(out, final, overwrite, write)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metadata_json(path: Path, meta: dict, key: str) -> dict:
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as err:
        raise TrainedWeightsError(f"--trained {path}: metadata {key} is not JSON ({type(err).__name__}: "
                                  f"{str(err)[:100]})") from None
    if not isinstance(value, dict):
        raise TrainedWeightsError(f"--trained {path}: metadata {key} is {json.dumps(value)[:80]}, not a JSON object")
    return value


def _verified_tensors(trained: TrainedFile) -> dict:
    """The file's tensors, after they loaded strictly into the model its metadata describes."""
    import torch
    from safetensors.torch import load_file

    from .registry import create_model

    try:
        tensors = load_file(str(trained.path))
    except Exception as err:  # a header whose offsets lie
        raise TrainedWeightsError(f"--trained {trained.path}: its tensors cannot be read ({type(err).__name__}: "
                                  f"{err})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        try:
            model = create_model(trained.name, **trained.build_args)
        except (TypeError, ValueError) as err:
            raise TrainedWeightsError(f"--trained {trained.path}: {trained.name} cannot be built with its build "
                                      f"arguments {json.dumps(trained.build_args)[:200]} ({err})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k} (file {list(tensors[k].shape)}, model {list(expected[k].shape)})"
              for k in sorted(set(tensors) & set(expected)) if tensors[k].shape != expected[k].shape]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if keys]
    if problems:
        raise TrainedKeysError(f"--trained {trained.path} does not fit {trained.name} built with "
                               f"{json.dumps(trained.build_args)[:200]}: keys {'; '.join(problems)}")
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise TrainedWeightsError(f"--trained {trained.path}: NaN or infinite values in {', '.join(sorted(broken)[:5])}")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise TrainedKeysError(f"--trained {trained.path} does not load into {trained.name}: "
                               f"{' '.join(str(err).split())[:300]}") from None
    return tensors


def _run_measurement(trained: TrainedFile) -> dict:
    """The training run's own final evaluation, as a measurement for the card."""
    script, evaluate = trained.scripts
    samples = next((trained.metrics[k] for k in _SAMPLE_COUNTS if k in trained.metrics), None)
    return {"by": f"the training run's final evaluation ({script}, with {evaluate}'s code)",
            "data": "the val split of the training data", "samples": samples, "protocol": "",
            "metrics": {k: v for k, v in trained.metrics.items() if k not in _SAMPLE_COUNTS}}


def _report_measurements(path: Path, trained: TrainedFile) -> List[dict]:
    """The results of an ``eval/*.py --json-out`` report that measured the trained file (by its sha256)."""
    _, evaluate = trained.scripts
    if not path.is_file():
        raise EvalReportError(f"--metrics {path}: no such file")
    if path.stat().st_size > _MAX_REPORT_BYTES:
        raise EvalReportError(f"--metrics {path}: {path.stat().st_size} bytes, more than an evaluation report "
                              f"needs ({_MAX_REPORT_BYTES}); refused unread")
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise EvalReportError(f"--metrics {path} is not JSON ({type(err).__name__}: {str(err)[:100]})") from None
    results = report.get("results") if isinstance(report, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise EvalReportError(f"--metrics {path} is not a report of {evaluate} --json-out (no list of results)")
    mine = [r for r in results if r.get("weights_sha256") == trained.sha256]
    if not mine:
        seen = sorted({str(r.get("weights_sha256"))[:64] for r in results})
        raise EvalReportError(
            f"--metrics {path} holds no result for {trained.path.name} (sha256 {trained.sha256}); it measured "
            f"{', '.join(seen[:3]) or 'nothing'}. Evaluate the trained file itself: {evaluate} --model "
            f"{trained.name} --checkpoint {trained.path} --data DIR --json-out {path.name}")
    task_type = _TRAINED_TASKS[trained.family][0]
    measured = []
    for r in mine:
        task, numbers = r.get("task"), {k: r[k] for k in _MEASURED if _is_number(r.get(k))}
        if r.get("model") != trained.arch or task not in _TASKS or _TASKS[task][0] != task_type or not numbers:
            raise EvalReportError(f"--metrics {path}: its result for {trained.path.name} is not a {task_type} "
                                  f"measurement of {trained.arch} (model {str(r.get('model'))[:60]!r}, task "
                                  f"{str(task)[:60]!r}, metrics {', '.join(numbers) or 'none'})")
        protocol = r.get("protocol") if isinstance(r.get("protocol"), dict) else {}
        limit = r.get("limit") if _is_number(r.get("limit")) else None
        measured.append({
            "by": f"{evaluate} (report {path.name})" + (f", first {limit} samples only (--limit)" if limit else ""),
            "data": f"the data given to {evaluate} --data (task label {task})",
            "samples": r.get("samples") if _is_number(r.get("samples")) else None,
            "protocol": "; ".join(f"{k}: {json.dumps(v)}" for k, v in protocol.items())[:300], "metrics": numbers})
    return measured


def _schedule(recipe: dict) -> str:
    sched, warmup = recipe["schedule"], recipe.get("warmup")
    if "epochs" in sched:
        text = (f"{sched['epochs']} epochs, learning rate x{sched['gamma']} at epochs "
                f"{' and '.join(map(str, sched['milestones'])) or 'none'}")
    else:
        text = f"{sched['iterations']} iterations, poly decay (power {sched['poly_power']}) to {sched['min_lr']}"
    if warmup:
        text += f"; linear warmup over {warmup['iterations']} iterations from {warmup['start_factor']} of the rate"
    return text


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else f"not a number ({value})"
    return str(value)


def _trained_card(trained: TrainedFile, measured: List[dict], org: str, repo_name: str, sha256: str) -> str:
    """The model card of trained weights: who trained them and how, and only the publisher's own numbers."""
    from huggingface_hub import EvalResult, ModelCardData

    import gczoo

    from .manifest import load_manifest
    from .registry import model_entry, weights_entry

    repo, (task_type, task_name) = f"{org}/{repo_name}", _TRAINED_TASKS[trained.family]
    script, evaluate = trained.scripts
    recipe, opt, run = trained.recipe, trained.recipe["optimizer"], trained.run
    source_name = "measured by the publisher (not verified by gczoo)"
    results = [EvalResult(task_type=task_type, task_name=task_name, dataset_type="custom",
                          dataset_name=f"{m['data']}" + (f", {m['samples']} samples" if m["samples"] else ""),
                          dataset_split="validation", metric_type=key, metric_name=_MEASURED[key], metric_value=value,
                          source_name=f"{source_name}: {m['by']}", source_url=f"{_HF}/{repo}", verified=False)
               for m in measured for key, value in m["metrics"].items() if key in _MEASURED and math.isfinite(value)]
    data = ModelCardData(library_name="gczoo", pipeline_tag=task_type, model_name=repo_name, eval_results=results or None,
                         tags=["gczoo", "gcnet", "global-context", task_type, "trained-with-gczoo"])
    args = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in trained.build_args.items()) or "none (the tag's own)"
    lines = [f"# {repo_name}", "",
             f"**These weights were trained by the publisher with gczoo's training script (`{script}`).** They are "
             "not weights published upstream by the GCNet, mmdetection or mmsegmentation authors, and gczoo has not "
             "verified how they perform: every number below is the publisher's own.", "",
             "## Model and training", "",
             f"- architecture: `{trained.arch}`: {model_entry(trained.arch)['summary']}",
             f"- built as `{trained.name}`, the zoo tag whose recipe the run followed",
             f"- started from: {_STARTS[run['start']] if run else 'not recorded by the training script'}",
             f"- build arguments: {args}",
             f"- recipe `{trained.recipe_name}` ({recipe['task']}): {recipe['source']}",
             f"- schedule: {_schedule(recipe)}",
             f"- optimizer: SGD, learning rate {opt['lr']}, momentum {opt['momentum']}, weight decay "
             f"{opt['weight_decay']}, for a total batch of {recipe['batch_size']} images (`{script}` scales the "
             "learning rate and iteration counts linearly to the run's own batch); normalisation: "
             f"{_NORMS[recipe['norm']]}",
             "- this run: " + (f"total batch {run['total_batch']}, base learning rate {run['base_lr']:.6g}, "
                               f"SyncBatchNorm {'used' if run['syncbn'] else 'not used'}, "
                               f"{'AMP ' + run['amp'] if run['amp'] else 'float32'}" if run else
                               "batch, learning rate and precision not recorded by the training script"),
             f"- iterations run: {trained.iterations}", ""]
    lines += ["## Results", ""]
    if measured:
        lines += [f"Measured by the publisher (not verified by gczoo); also in the `model-index` above, with the "
                  "publisher's evaluation as their source.", "",
                  "| metric | value | data | samples | measured by | protocol |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in (
            _MEASURED.get(key, key), _value(value), m["data"], m["samples"] or "not recorded", m["by"],
            m["protocol"] or "-")) + " |" for m in measured for key, value in m["metrics"].items()]
    else:
        lines += ["No metrics were measured for these weights: the training run had no val split, and no evaluation "
                  f"report was given. Measure them with `{evaluate} --model {trained.name} --checkpoint "
                  "model.safetensors --data DIR`."]
    _, entry = weights_entry(trained.arch, trained.tag)
    lines += ["", "## Usage", "", "```python", "import gczoo", "",
              f'model = gczoo.create_model("hf-hub:{repo}", pretrained=True)  # built with the arguments above',
              "```", "",
              "## Provenance", "",
              f"- trained file: sha256 `{trained.sha256}`, written by `{script}`",
              f"- `model.safetensors`: the same tensors and training metadata, sha256 `{sha256}`, written by "
              f"`gczoo publish --trained` (gczoo {gczoo.__version__}) after checking that they load strictly into "
              f"`{trained.name}` built with the build arguments",
              f"- license: the publisher's choice; weights trained from `{trained.name}` (`--pretrained`) derive from "
              f"weights under {entry['license']}", "",
              "## Upload (the publisher)", "", "```bash", f"hf upload {repo} {repo_name} .", "```", "",
              "## Citation", "", "```bibtex", load_manifest()["citation"], "```", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


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


def _write_repo(out: Path, final: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` fills a fresh folder beside ``final``, which then replaces ``final`` (checked by
    :func:`_check_destination` again: minutes may have passed); nothing half-written is ever left."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out))
    try:
        write(tmp)
        _check_destination(final, overwrite)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
    lines += ["With torch.hub (`OWNER/REPO`: the GitHub repository that hosts gczoo, e.g. a fork; a checkout loads "
              'with `torch.hub.load("/path/to/gczoo", ..., source="local")`):', "", "```python", "import torch", "",
              f'model = torch.hub.load("OWNER/REPO", "{arch}", pretrained=True, tag="{tag}", trust_repo=True)', "```",
              "",
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
