"""Models from repos written by ``gczoo publish``: names ``hf-hub:ORG/REPO[@REVISION]``.

A published repo holds ``config.json`` and ``model.safetensors`` in the zoo's layout. For
classifiers ``config.json`` is timm's hub layout (``architecture``, ``num_classes``,
``num_features``, ``pretrained_cfg``), so after ``import gczoo`` timm's own
``timm.create_model("hf-hub:ORG/REPO", pretrained=True)`` builds the model and the zoo's builder
loads the weights; for the other families it names the zoo's architecture, family and tag, and for
weights trained by the zoo's own scripts (``gczoo publish --trained``) the ``create_model`` arguments
they were trained with (``model_args``: classes, label ids, test sizes, depth), each key checked by
type and range (:data:`TRAINED_ARGS`).
Weights always come through :func:`gczoo.weights.fetch_with_source` (gczoo's bounded download into
the hub cache, offline rules, sha256 checked against the hub's LFS hash before the file enters the
cache), never through an unverified path.
"""
from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

__all__ = ["PREFIX", "WEIGHTS_FILE", "CONVERTER_KEY", "TRAINED_ARGS", "split_repo", "config_problems", "read_config",
           "repo_of", "fetch_weights", "create_model"]

PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"
#: safetensors metadata key of a published file: the converter that maps it onto the model.
CONVERTER_KEY = "gczoo_converter"
#: the converters a zoo-layout file may ask for (a full state dict, or one without classifier).
LAYOUT_CONVERTERS = ("identity", "new_head")
#: Families published in timm's hub layout (classifiers); the others get the zoo's short config.
CLASSIFIER_FAMILIES = ("gc_resnet", "timm")
#: Largest ``config.json`` read (a published one is about 1.5 KB).
MAX_CONFIG_BYTES = 64 << 10
#: Largest number of classes a repo may ask for: ImageNet-22k's 21,843, the largest label set of timm's classifiers.
MAX_CLASSES = 21843
#: Largest side of a repo's input size (timm's classifiers are evaluated at 1024 at most).
_MAX_SIDE = 2048
#: Most blocks a stage of a repo's ResNet may have (the deepest stage of ResNet-152 and -200: 36).
_MAX_BLOCKS = 36

_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9_.\-]{1,128}$"}
_CLASSES = {"type": "integer", "minimum": 0, "maximum": MAX_CLASSES}
_INPUT_SIZE = {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "integer", "minimum": 1, "maximum": _MAX_SIDE}}
_RGB = {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "number", "minimum": 0, "maximum": 1}}
_TEXT = {"type": "string"}
_SIDE = {"type": "integer", "minimum": 1, "maximum": _MAX_SIDE}
#: The ``create_model`` arguments a repo of trained weights may carry (``model_args`` of the short form):
#: the keys ``train/*.py`` records with the weights (:mod:`gczoo.trained`), nothing else.
TRAINED_ARGS = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "num_classes": {"type": "integer", "minimum": 1, "maximum": MAX_CLASSES},
        "label_ids": {"type": "array", "minItems": 1, "maxItems": MAX_CLASSES,
                      "items": {"type": "integer", "minimum": 0, "maximum": (1 << 31) - 1}},
        "min_size": _SIDE, "max_size": _SIDE,
        "layers": {"type": "array", "minItems": 4, "maxItems": 4,
                   "items": {"type": "integer", "minimum": 1, "maximum": _MAX_BLOCKS}},
    },
}
#: Which of :data:`TRAINED_ARGS` each family's builder takes (the others take none).
_FAMILY_ARGS = {"maskrcnn": frozenset(TRAINED_ARGS["properties"]), "segmentation": frozenset({"num_classes", "layers"})}
#: What ``gczoo publish`` writes into ``config.json`` (see :mod:`gczoo.publish`), as a schema for
#: :mod:`gczoo.manifest`'s validator: timm's hub layout for classifiers (keys of timm's
#: ``save_config_for_hf``, ``model_args`` limited to what the zoo records), else the zoo's short
#: form. No other key and no value outside these ranges is accepted from a repo.
CONFIG_SCHEMA = {
    "oneOf": [
        {"type": "object", "required": ["architecture", "pretrained_cfg"], "additionalProperties": False,
         "properties": {
             "architecture": _NAME, "num_classes": _CLASSES,
             "num_features": {"type": "integer", "minimum": 1, "maximum": 1 << 16},
             "global_pool": {"enum": ["avg"]},
             "model_args": {"type": "object", "additionalProperties": False,
                            "properties": {"num_classes": _CLASSES, "global_pool": {"enum": ["avg"]}}},
             "pretrained_cfg": {"type": "object", "additionalProperties": False, "properties": {
                 "tag": _NAME, "architecture": _NAME, "custom_load": {"enum": [False]},
                 "input_size": _INPUT_SIZE, "test_input_size": _INPUT_SIZE, "min_input_size": _INPUT_SIZE,
                 "fixed_input_size": {"type": "boolean"},
                 "interpolation": {"enum": ["bilinear", "bicubic", "nearest"]},
                 "crop_pct": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                 "test_crop_pct": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                 "crop_mode": {"enum": ["center", "squash", "border"]},
                 "mean": _RGB, "std": {**_RGB, "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                 "num_classes": _CLASSES,
                 "pool_size": {"type": ["array", "null"], "maxItems": 2,
                               "items": {"type": "integer", "minimum": 1, "maximum": _MAX_SIDE}},
                 "first_conv": _NAME, "classifier": _NAME, "license": _TEXT, "description": _TEXT,
                 "origin_url": _TEXT, "paper_name": _TEXT, "paper_ids": {"type": ["string", "array"], "items": _TEXT},
                 "notes": {"type": "array", "items": _TEXT}}}}},
        {"type": "object", "required": ["architecture", "family", "tag"], "additionalProperties": False,
         "properties": {"architecture": _NAME, "family": _NAME, "tag": _NAME, "gczoo_version": _TEXT,
                        "model_args": TRAINED_ARGS}},
    ]
}
#: Nesting of a valid config.json (pretrained_cfg.mean, model_args.label_ids: 3 levels), with room.
_MAX_CONFIG_DEPTH = 4


def split_repo(name: str) -> Tuple[str, str]:
    """``"hf-hub:org/repo@rev"`` (prefix optional) -> ``("org/repo", "rev")``; revision default ``main``."""
    repo, _, revision = name[len(PREFIX):].partition("@") if name.startswith(PREFIX) else name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r} is not a hub repo name; expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    return repo, revision or "main"


def _nesting_problem(config: Any) -> Optional[str]:
    """Where ``config`` nests deeper than :data:`_MAX_CONFIG_DEPTH` (found without recursion; ``None``
    stands for JSON too deep for Python's parser), or ``None`` when it does not."""
    from .manifest import _too_deep

    deep = _too_deep(config, _MAX_CONFIG_DEPTH) if config is not None else "(top level)"
    return f"{deep} is nested more than {_MAX_CONFIG_DEPTH} levels deep" if deep else None


def config_problems(config: Any) -> List[str]:
    """What makes ``config`` (parsed ``config.json``) other than one :data:`CONFIG_SCHEMA` allows: nesting
    too deep (alone, checked first), else each schema violation, then ``model_args`` its family's builder
    does not take or that contradict each other. Empty: valid."""
    from .manifest import _errors

    nesting = _nesting_problem(config)
    if nesting:
        return [nesting]
    problems = _errors(config, CONFIG_SCHEMA, CONFIG_SCHEMA, ())
    args = config.get("model_args", {}) if not problems and "family" in config else {}
    if args:
        allowed = _FAMILY_ARGS.get(config["family"], frozenset())
        problems += [f"model_args.{key}: not an argument of the {config['family']} family's models"
                     f"{' (they take: ' + ', '.join(sorted(allowed)) + ')' if allowed else ''}"
                     for key in sorted(set(args) - allowed)]
        if "label_ids" in args and args.get("num_classes", len(args["label_ids"]) + 1) != len(args["label_ids"]) + 1:
            problems.append(f"model_args.num_classes: {args['num_classes']} for {len(args['label_ids'])} label_ids "
                            "(a detector counts them plus background)")
    return problems


def read_config(repo_id: str, revision: str = "main") -> dict:
    """The repo's ``config.json``: at most :data:`MAX_CONFIG_BYTES`, valid by :func:`config_problems`,
    naming an architecture of this zoo; anything else is a :class:`gczoo.weights.WeightsError` naming the repo."""
    from .registry import UnknownModelError, list_models, model_entry
    from .weights import WeightsError, fetch_hub_file

    label = f"{PREFIX}{repo_id}@{revision}"
    path = fetch_hub_file(repo_id, "config.json", revision)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise WeightsError(f"{label}: config.json has {size} bytes, more than the {MAX_CONFIG_BYTES} a config "
                           "written by `gczoo publish` could need; refused unread")
    with open(path, "rb") as f:
        text = f.read(MAX_CONFIG_BYTES + 1)
    try:
        config = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{label}: config.json is not valid JSON ({err})") from err
    except RecursionError:
        config = None  # nested deeper than Python's parser goes: reported as too deep below
    nesting = _nesting_problem(config)
    arch = config.get("architecture") if isinstance(config, dict) and not nesting else None
    if isinstance(arch, str) and arch not in list_models():  # another library's model: say so first
        raise UnknownModelError(
            f"{label}: config.json names the architecture {arch[:100]!r}, which this gczoo version does not have "
            f"(`gczoo list` shows them). Upgrade gczoo, or load the repo with the library that wrote it.")
    problems = [nesting] if nesting else config_problems(config)
    if problems:
        raise WeightsError(f"{label}: config.json is not one `gczoo publish` or timm's push_to_hf_hub writes for a "
                           f"zoo model; refused:\n  " + "\n  ".join(problems[:10]))
    family = model_entry(arch)["family"]
    if (family in CLASSIFIER_FAMILIES) != ("pretrained_cfg" in config) or config.get("family", family) != family:
        raise WeightsError(f"{label}: config.json describes {arch} (family {family}) in the layout of another "
                           "family; refused")
    return config


def repo_of(pretrained_cfg: Any) -> Optional[Tuple[str, str]]:
    """``(repo_id, revision)`` when a pretrained cfg (dict or timm ``PretrainedCfg``) comes from a hub repo
    named by ``hf-hub:`` (timm sets ``source="hf-hub"`` and ``hf_hub_id``), else ``None``."""
    get = pretrained_cfg.get if isinstance(pretrained_cfg, dict) else lambda k: getattr(pretrained_cfg, k, None)
    if pretrained_cfg is None or isinstance(pretrained_cfg, str) or get("source") != "hf-hub":
        return None
    return split_repo(get("hf_hub_id"))


def fetch_weights(arch: str, repo_id: str, revision: str) -> Tuple[str, str]:
    """``(local path, converter)`` of the repo's verified ``model.safetensors``."""
    from .fileio import safetensors_metadata
    from .weights import WeightsError, WeightsUnavailableError, fetch_with_source

    source = {"type": "hf_hub", "repo_id": repo_id, "filename": WEIGHTS_FILE, "revision": revision,
              "format": "safetensors", "sha256": None}
    try:
        path, _ = fetch_with_source(arch, f"(hf-hub:{repo_id})", {"sources": [source]})
    except WeightsUnavailableError as err:
        reason = str(err).splitlines()[1].strip().lstrip("- ") if len(str(err).splitlines()) > 1 else str(err)
        raise WeightsUnavailableError(
            f"cannot obtain {WEIGHTS_FILE} of the hub repo {repo_id}@{revision}: {reason}. Offline, load it once "
            "with network access first (it is then served from the hub cache).") from err
    converter = safetensors_metadata(path, f"hf-hub:{repo_id}@{revision}").get(CONVERTER_KEY, "identity")
    if converter not in LAYOUT_CONVERTERS:
        raise WeightsError(f"hf-hub:{repo_id}: {WEIGHTS_FILE} asks for converter {converter!r}; a published "
                           f"zoo-layout file uses one of {', '.join(LAYOUT_CONVERTERS)}")
    return str(path), converter


def create_model(name: str, pretrained: bool = False, **kwargs: Any):
    """Build the model a published repo describes (any family); ``pretrained`` loads its weights."""
    import timm
    from timm.models import load_pretrained

    from . import convert
    from .registry import TIMM_FAMILIES, builder_module, entrypoint, model_entry
    from .weights import load_checkpoint

    repo_id, revision = split_repo(name)
    config = read_config(repo_id, revision)
    arch = config["architecture"]
    family = model_entry(arch)["family"]
    if "pretrained_cfg" in config:  # a classifier, timm's layout: what timm.create_model("hf-hub:...") does
        cfg = dict(config["pretrained_cfg"], hf_hub_id=f"{repo_id}@{revision}", source="hf-hub")
        if "num_classes" in config:
            cfg["num_classes"] = config["num_classes"]
        kwargs = {**config.get("model_args", {}), **kwargs}
        if family == "timm":  # timm builds these and adapts the classifier; the weights come through the
            model = timm.create_model(arch, pretrained_cfg=cfg, **kwargs)  # zoo's verified fetch and check
            if pretrained:
                path, converter = fetch_weights(arch, repo_id, revision)
                load_pretrained(model, dict(model.pretrained_cfg, state_dict=load_checkpoint(path, name)),
                                num_classes=model.num_classes, in_chans=kwargs.get("in_chans", 3),
                                filter_fn=convert.filter_fn(arch, f"({name})", converter, path))
            return model
        if family in TIMM_FAMILIES:
            builder_module(family)
        return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
    cfg = {"tag": config.get("tag"), "hf_hub_id": f"{repo_id}@{revision}", "source": "hf-hub"}
    kwargs = {**config.get("model_args", {}), **kwargs}  # trained weights: the classes (...) they were trained for
    return entrypoint(arch)(pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
