"""The zoo's registry: every name, builder and weights tag comes from ``weights_manifest.json``.

Families:

* ``gc_resnet`` -- architectures built by :mod:`gczoo.models.gc_resnet`; registered with timm
  (``timm.create_model`` works after ``import gczoo``) with their pretrained cfgs as data.
* ``timm`` -- timm's own GC models, listed here with their weights and published numbers
  and built by timm. Local weights for them (``pretrained_cfg_overlay=dict(file=...)`` or
  ``state_dict=...``, a ``pretrained_cfg`` dict with a file, ``checkpoint_path=``) are read and checked
  as the zoo's own: through ``gczoo.create_model`` and, after ``import gczoo``, ``timm.create_model``
  (:func:`guard_timm_family`).
* ``maskrcnn`` -- detection models built by :mod:`gczoo.models.detection` (not timm models).
* ``slowonly`` -- Kinetics video models built by :mod:`gczoo.models.video` (not timm models).

Names follow timm: ``arch`` or ``arch.tag``; the tag selects weights (default: the
manifest's ``default_tag``).
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import logging
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .manifest import load_manifest

if TYPE_CHECKING:  # torch and timm are imported where a model is built, so listing names stays fast
    import torch

__all__ = ["create_model", "list_models", "split_name", "model_entry", "weights_entry", "check_name",
           "entrypoint", "pretrained_tag", "builder_module", "guard_timm_family", "UnknownModelError", "TIMM_FAMILIES"]

_logger = logging.getLogger(__name__)
#: ``arch.tag`` of backbone weights whose new classifier head was already warned about (once per process).
_WARNED_NEW_HEAD: set = set()

#: Module that builds each family (``None``: timm builds it).
FAMILY_MODULES = {"gc_resnet": "gczoo.models.gc_resnet", "maskrcnn": "gczoo.models.detection", "timm": None,
                  "slowonly": "gczoo.models.video", "segmentation": "gczoo.models.segmentation"}

#: Families whose module registers its architectures with timm when imported (``import gczoo``
#: imports these modules as soon as timm is loaded).
TIMM_FAMILIES = ("gc_resnet",)


class UnknownModelError(ValueError):
    """A model name or weights tag that the manifest does not hold."""


def builder_module(family: str) -> ModuleType:
    """The imported module that builds ``family``. A module of :data:`TIMM_FAMILIES` registers its
    architectures with timm when imported, so timm knows them after this call whatever was imported before."""
    return importlib.import_module(FAMILY_MODULES[family])


def _manifest() -> dict:
    return load_manifest()


def split_name(name: str) -> Tuple[str, Optional[str]]:
    """``"resnet50_gc_r16.tv_in1k"`` -> ``("resnet50_gc_r16", "tv_in1k")``; no tag -> ``None``."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _all_names() -> List[str]:
    models = _manifest()["models"]
    return sorted(list(models) + [f"{a}.{t}" for a, m in models.items() for t in m["weights"]])


def _unknown_model(name: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, _all_names(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownModelError(f"Unknown model {name!r}.{hint}")


def model_entry(name: str) -> dict:
    """The manifest entry of an architecture (a tag in ``name`` is ignored)."""
    arch, _ = split_name(name)
    models = _manifest()["models"]
    if arch not in models:
        raise _unknown_model(name)
    return models[arch]


def weights_entry(name: str, tag: Optional[str] = None) -> Tuple[str, dict]:
    """``(tag, entry)`` of the weights named by ``name`` (``arch.tag``) or by ``tag``; default tag if neither."""
    arch, name_tag = split_name(name)
    model = model_entry(arch)
    tag = tag or name_tag or model["default_tag"]
    if tag is None:
        raise UnknownModelError(f"{arch} has no pretrained weights in the zoo.")
    if tag not in model["weights"]:
        raise UnknownModelError(f"Unknown weights tag {tag!r} for {arch}; its tags are: "
                                f"{', '.join(model['weights']) or 'none (no pretrained weights)'}.")
    return tag, model["weights"][tag]


def check_name(name: str) -> Tuple[str, Optional[str]]:
    """``(arch, tag)`` of ``name``; :class:`UnknownModelError` (with close matches or the tag list)
    if the manifest holds no such architecture or weights tag. Every command checks names with it."""
    arch, tag = split_name(name)
    model_entry(arch)
    if tag is not None:
        weights_entry(arch, tag)
    return arch, tag


def list_models(pattern: str = "*", pretrained: bool = False) -> List[str]:
    """Names in the zoo matching a shell-style ``pattern``; with ``pretrained``, every ``arch.tag``."""
    models = _manifest()["models"]
    names = [f"{a}.{t}" for a, m in models.items() for t in m["weights"]] if pretrained else list(models)
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(split_name(n)[0], pattern))


def _timm_cfg(entry: Optional[dict], base: dict, feature_stride: int) -> dict:
    """A complete timm pretrained-cfg dict (``timm.models.PretrainedCfg`` fields) for one weights entry.

    ``entry`` ``None`` gives the cfg of an architecture without weights: the manifest's defaults,
    no file, the zoo's own license and the paper as origin. ``pool_size`` is the final feature
    map at ``input_size`` (``ceil(size / feature_stride)``, every stride-2 layer of a ResNet
    rounding up); ``license`` is the SPDX id in lower case, as timm writes it.
    """
    cfg = dict(base, **(entry["pretrained_cfg"] if entry else {}))
    for key in ("input_size", "test_input_size", "mean", "std"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    cfg["pool_size"] = tuple(-(-size // feature_stride) for size in cfg["input_size"][1:])
    if "test_input_size" in cfg:
        cfg["test_pool_size"] = tuple(-(-size // feature_stride) for size in cfg["test_input_size"][1:])
    if entry is None:
        cfg["license"] = _manifest()["defaults"]["license"]
        cfg["origin_url"] = "https://arxiv.org/abs/" + base["paper_ids"].partition(":")[2]
        return cfg
    for source in entry["sources"]:
        if source["type"] == "hf_hub":
            cfg.setdefault("hf_hub_id", source["repo_id"])
            cfg.setdefault("hf_hub_filename", source["filename"])
        else:
            cfg.setdefault("url", source["url"])
            cfg.setdefault("origin_url", source["url"])
    cfg["license"] = entry["license"].split()[0].lower()
    cfg["notes"] = (entry["training"],)
    return cfg


def default_cfgs(family: str, first_conv: str, classifier: str, feature_stride: int) -> dict:
    """timm ``DefaultCfg`` objects for every architecture of ``family``, default tag first.

    ``feature_stride``: the family's output stride (input size over final feature-map size).
    """
    from timm.models import generate_default_cfgs

    manifest = _manifest()
    base = dict(manifest["defaults"]["pretrained_cfg"], first_conv=first_conv, classifier=classifier,
                paper_name="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
                paper_ids="arXiv:1904.11492")
    cfgs: Dict[str, dict] = {}
    for arch, model in manifest["models"].items():
        if model["family"] != family:
            continue
        if not model["weights"]:
            cfgs[arch] = _timm_cfg(None, base, feature_stride)
            continue
        tags = [model["default_tag"]] + [t for t in model["weights"] if t != model["default_tag"]]
        for tag in tags:
            cfgs[f"{arch}.{tag}"] = _timm_cfg(model["weights"][tag], base, feature_stride)
    return generate_default_cfgs(cfgs)


def pretrained_tag(pretrained_cfg: Any) -> Optional[str]:
    """The weights tag in a ``pretrained_cfg`` argument (a tag string, timm PretrainedCfg or dict)."""
    if pretrained_cfg is None or isinstance(pretrained_cfg, str):
        return pretrained_cfg or None
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag")
    return getattr(pretrained_cfg, "tag", None)


def _overlay_weights_file(arch: str, tag: str, entry: dict, kwargs: dict) -> Tuple[dict, str]:
    """Point ``pretrained_cfg_overlay`` at verified weights.

    The caller may pass ``pretrained_cfg_overlay=dict(file=...)`` (timm's convention) to load a
    local checkpoint: it is read safely by :func:`gczoo.weights.load_checkpoint` (pickles only
    with ``weights_only=True``) and handed to timm as a state dict. Otherwise
    :func:`gczoo.weights.fetch` downloads and verifies the tag's weights. Returns the overlay
    and the converter to apply: the entry's, or that of the source which delivered the file.
    """
    from . import trained, weights

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    converter = entry["converter"]
    if overlay.get("file") and not overlay.get("state_dict"):
        overlay["state_dict"] = weights.load_checkpoint(overlay["file"], f"{arch}.{tag}")
        converter = trained.converter_of(overlay["file"]) or converter  # a zoo-layout file says so
    elif not overlay.get("state_dict"):
        path, source = weights.fetch_with_source(arch, tag, entry)
        overlay["file"], converter = str(path), source.get("converter", converter)
    kwargs["pretrained_cfg_overlay"] = overlay
    return overlay, converter


def _overlay_hosted_file(arch: str, repo: Tuple[str, str], kwargs: dict) -> Tuple[dict, str]:
    """Point ``pretrained_cfg_overlay`` at the verified weights of a published repo (``hf-hub:`` names).

    ``source`` is cleared so that timm loads that file instead of downloading the repo itself.
    """
    from . import hosted

    path, converter = hosted.fetch_weights(arch, *repo)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=path, source=None)
    kwargs["pretrained_cfg_overlay"] = overlay
    return overlay, converter


def entrypoint(arch: str) -> Callable[..., torch.nn.Module]:
    """The builder function of a ``gc_resnet``/``maskrcnn`` architecture, named after it (timm style).

    With ``pretrained=True`` the weights named by ``pretrained_cfg`` (timm passes the tag of
    ``arch.tag`` there; default: the manifest's default tag) are fetched and verified, and their
    converter runs as the ``pretrained_filter_fn``, checking the converted keys against the model.
    A ``pretrained_cfg`` from a published repo (``hf-hub:ORG/REPO``, see :mod:`gczoo.hosted`)
    loads that repo's weights instead.
    """
    from . import convert, hosted

    model = model_entry(arch)
    module = builder_module(model["family"])

    def build(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        kwargs = {**model["arch"], **kwargs}
        if pretrained:
            repo = hosted.repo_of(kwargs.get("pretrained_cfg"))
            if repo is not None:
                tag = f"(hf-hub:{repo[0]}@{repo[1]})"
                overlay, converter = _overlay_hosted_file(arch, repo, kwargs)
            else:
                tag, entry = weights_entry(arch, pretrained_tag(kwargs.get("pretrained_cfg")))
                overlay, converter = _overlay_weights_file(arch, tag, entry, kwargs)
            kwargs["pretrained_filter_fn"] = convert.filter_fn(
                arch, tag, converter, overlay.get("file") or "the given state dict")
        net = module.build(arch, pretrained=pretrained, **kwargs)
        if pretrained and converter in convert.HEADLESS and getattr(net, "num_classes", 0) and f"{arch}.{tag}" not in _WARNED_NEW_HEAD:
            _WARNED_NEW_HEAD.add(f"{arch}.{tag}")
            warnings.warn(f"{arch}.{tag}: these weights are a backbone without a classifier; the classifier head is "
                          "newly initialised and must be trained. Pass num_classes=0 for pooled features or "
                          "features_only=True for the feature maps.", UserWarning, stacklevel=2)
        return net

    build.__name__ = build.__qualname__ = arch
    build.__module__ = module.__name__
    build.__doc__ = f"{model['summary']}\n\n`gczoo info {arch}` shows the model card."
    return build


def register_timm_models(module_name: str, family: str) -> None:
    """Register every ``family`` architecture of the manifest with timm, from ``module_name``.

    A name timm already has from one of its own modules is left to timm, with a warning:
    the zoo never replaces timm's models. timm's own builders of the ``timm`` family are guarded
    here too (:func:`guard_timm_family`): this runs whenever timm is imported after gczoo.
    """
    import timm
    from timm.models import register_model

    short = module_name.rsplit(".", 1)[-1]
    for arch, model in _manifest()["models"].items():
        if model["family"] != family:
            continue
        if timm.models.is_model(arch) and not timm.models.is_model_in_modules(arch, [short]):
            _logger.warning("timm already has a model named %s; gczoo keeps timm's.", arch)
            continue
        register_model(entrypoint(arch))
    guard_timm_family()


#: Attribute of a guarded timm builder holding timm's own builder (:func:`guard_timm_family`).
_UNGUARDED = "_gczoo_unguarded"
#: Builder arguments under which timm adapts the weights it loads (feature wrappers, input channels):
#: left out of the reference model that local weights are checked against.
_ADAPTED_BY_TIMM = ("features_only", "out_indices", "feature_cls", "feature_cfg", "in_chans")


class _CheckedStateDict(dict):
    """A state dict :func:`_checked_timm_weights` has checked: a guarded builder does not check it again."""


def guard_timm_family() -> None:
    """Guard timm's own builders of the manifest's ``timm`` family (idempotent).

    timm keeps its models and builders; a guarded builder only hands local weights (a ``file`` or
    ``state_dict`` in ``pretrained_cfg_overlay`` or a ``pretrained_cfg`` dict) to the zoo first, so that
    ``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` reads and checks
    them as ``gczoo.create_model`` does (:func:`_checked_timm_weights`) instead of through timm's loader.
    """
    from timm.models import _registry

    builders = getattr(_registry, "_model_entrypoints", None)
    if not isinstance(builders, dict):  # another timm layout: gczoo.create_model still checks its own loads
        _logger.warning("gczoo cannot guard timm's builders of its timm family in this timm version; load local "
                        "weights for them through gczoo.create_model")
        return
    for arch, model in _manifest()["models"].items():
        build = builders.get(arch)
        if model["family"] == "timm" and build is not None and not hasattr(build, _UNGUARDED):
            builders[arch] = _guarded(arch, build)


def _guarded(arch: str, build: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """timm's builder ``build`` of ``arch``, with local weights checked by the zoo before timm loads them."""

    @functools.wraps(build)
    def guarded(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        if pretrained:
            kwargs = _checked_timm_weights(arch, build, kwargs)
        net = build(pretrained=pretrained, **kwargs)
        for cfg in {id(c): c for c in (getattr(net, "pretrained_cfg", None), getattr(net, "default_cfg", None))
                    if isinstance(c, dict)}.values():  # timm keeps the overlay: not a second copy of the weights
            if isinstance(cfg.get("state_dict"), _CheckedStateDict):
                del cfg["state_dict"]
        return net

    setattr(guarded, _UNGUARDED, build)
    return guarded


def _timm_builder(arch: str) -> Callable[..., torch.nn.Module]:
    """timm's own builder of ``arch`` (not the guarded one)."""
    from timm.models import model_entrypoint

    build = model_entrypoint(arch)
    return getattr(build, _UNGUARDED, build)


def _checked_timm_weights(arch: str, build: Callable[..., torch.nn.Module], kwargs: dict,
                          tag: Optional[str] = None, converter: Optional[str] = None) -> dict:
    """``kwargs`` of timm's builder ``build`` of ``arch``, its local weights read and checked as the zoo's own.

    Local weights are timm's ``file`` or ``state_dict`` of ``pretrained_cfg_overlay`` (or of a dict or
    ``PretrainedCfg`` passed as ``pretrained_cfg``). A file is read by :func:`gczoo.weights.load_checkpoint`
    (safetensors, or a pickle through ``torch.load(weights_only=True)`` after the archive check); the tensors
    go through ``converter`` (default: the file's own, else the tag's) and the zoo's strict check
    (:func:`gczoo.convert.filter_fn`: keys, shapes, dtype kinds, finite values) against ``arch`` built the same
    way without weights, and reach timm as the overlay's state dict. A ``local-dir`` source (timm picks a
    file in a folder) is refused; without local weights (timm's own download, a hub repo) ``kwargs`` are
    returned as they are.
    """
    import torch

    from . import convert, trained, weights

    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = kwargs.get("pretrained_cfg")
    get = cfg.get if isinstance(cfg, dict) else (lambda key: None) if cfg is None or isinstance(cfg, str) else \
        (lambda key: getattr(cfg, key, None))

    def field(key: str) -> Any:  # timm lays the overlay over the cfg
        return overlay[key] if key in overlay else get(key)

    source, file, state_dict = field("source"), field("file"), field("state_dict")
    if source == "hf-hub" or isinstance(state_dict, _CheckedStateDict):
        return kwargs
    tag = tag or pretrained_tag(cfg)
    label = f"{arch}.{tag}" if tag else arch
    if source == "local-dir":
        raise weights.WeightsError(
            f"{label}: gczoo does not load weights from a folder ({file}: timm would pick one of its files); "
            "pass the file itself: pretrained_cfg_overlay=dict(file=FOLDER/model.safetensors)")
    if isinstance(state_dict, Mapping) and not state_dict:
        state_dict = None  # timm passes over an empty one to the file
    if state_dict is None and not file:
        return kwargs
    from_file = state_dict is None
    if from_file:
        state_dict, where = weights.load_checkpoint(file, label), str(file)
    else:
        problem = weights.state_dict_problem(state_dict)
        if problem is not None:
            raise weights.WeightsError(f"{label}: the state_dict passed in pretrained_cfg_overlay holds {problem}; "
                                       "pass a mapping of names to tensors")
        where = "the given state dict"
    if converter is None:
        entry = model_entry(arch)["weights"].get(tag or model_entry(arch)["default_tag"], {})
        converter = (trained.converter_of(file) if from_file else None) or entry.get("converter", "identity")
    reference = {k: v for k, v in kwargs.items() if k not in _ADAPTED_BY_TIMM}
    reference.setdefault("pretrained_cfg", tag)
    with torch.random.fork_rng(devices=[]):  # the model's own initialisation stays as without the check
        reference = build(pretrained=False, **reference)
    cfg = getattr(reference, "pretrained_cfg", None) or {}
    if getattr(reference, "num_classes", None) != cfg.get("num_classes"):  # timm drops the file's classifier
        names = cfg.get("classifier") or ()  # then: none to check where the model has none (num_classes=0)
        names, own = (names,) if isinstance(names, str) else tuple(names), reference.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if k in own or k.rpartition(".")[0] not in names}
    checked = convert.filter_fn(arch, tag, converter, where)(dict(state_dict), reference)
    return {**kwargs, "pretrained_cfg_overlay": {**overlay, "state_dict": _CheckedStateDict(checked)}}


def _load_checkpoint_path(model: torch.nn.Module, name: str, path: Any) -> None:
    """timm's ``checkpoint_path``: ``model``'s own state dict from a local file, loaded after it is built;
    read by :func:`gczoo.weights.load_checkpoint` and checked strictly, never through timm's loader."""
    from . import convert, weights

    arch = split_name(name)[0]
    state_dict = weights.load_checkpoint(path, f"{name} checkpoint_path")
    checked = convert.filter_fn(arch, None, "identity", str(path))(state_dict, model)
    try:
        model.load_state_dict(checked)
    except RuntimeError as err:  # a classifier of another size: the check leaves it to timm, which drops it
        raise convert.StateDictMismatchError(  # when loading pretrained weights, but not a checkpoint_path
            f"{name}: {path} does not fit the model as built ({' '.join(str(err).split())}); checkpoint_path "
            "takes the model's own state dict: build the model with the arguments the checkpoint was saved "
            "with (e.g. its num_classes)") from err


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Create a zoo model by name (``arch`` or ``arch.tag``), like ``timm.create_model``.

    ``pretrained=True`` loads the weights of the tag (default: the manifest's default tag),
    fetched and verified by :mod:`gczoo.weights`. Other keyword arguments go to the builder
    (``num_classes``, ``features_only``, ``gc_ratio``, ``gc_stages``, ...).
    ``hf-hub:ORG/REPO[@REVISION]`` names a repo written by ``gczoo publish`` (any family).
    ``checkpoint_path`` (timm's: the model's own state dict, loaded once it is built) is read and
    checked as every weights file is, for every family.
    """
    checkpoint = kwargs.pop("checkpoint_path", None)
    net = _create(name, pretrained, kwargs)
    if checkpoint:
        _load_checkpoint_path(net, name, checkpoint)
    return net


def _create(name: str, pretrained: bool, kwargs: dict) -> torch.nn.Module:
    """:func:`create_model` without ``checkpoint_path``."""
    if name.startswith("hf-hub:"):
        from . import hosted

        return hosted.create_model(name, pretrained=pretrained, **kwargs)
    import timm

    arch, tag = check_name(name)
    model = model_entry(arch)
    if "gc_stages" in kwargs and kwargs["gc_stages"] is None:
        kwargs["gc_stages"] = ()  # "no GC blocks"; timm would drop a None and build the default
    if model["family"] == "timm":
        guard_timm_family()
        if pretrained:
            tag, entry = weights_entry(arch, tag)
            overlay, converter = kwargs.get("pretrained_cfg_overlay") or {}, None
            if not (overlay.get("file") or overlay.get("state_dict")):  # the tag's weights, fetched and verified
                _, converter = _overlay_weights_file(arch, tag, entry, kwargs)
            kwargs = _checked_timm_weights(arch, _timm_builder(arch), kwargs, tag, converter)
        return timm.create_model(f"{arch}.{tag}" if tag else arch, pretrained=pretrained, **kwargs)
    if model["family"] in TIMM_FAMILIES:
        builder_module(model["family"])
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    if tag is not None:
        kwargs.setdefault("pretrained_cfg", tag)
    return entrypoint(arch)(pretrained=pretrained, **kwargs)
