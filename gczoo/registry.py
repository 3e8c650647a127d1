"""The zoo's registry: every name, builder and weights tag comes from ``weights_manifest.json``.

Families:

* ``gc_resnet`` -- architectures built by :mod:`gczoo.models.gc_resnet`; registered with timm
  (``timm.create_model`` works after ``import gczoo``) with their pretrained cfgs as data.
* ``timm`` -- timm's own GC models, listed here with their weights and published numbers
  and built by timm.
* ``maskrcnn`` -- detection models built by :mod:`gczoo.models.detection` (not timm models).
* ``slowonly`` -- Kinetics video models built by :mod:`gczoo.models.video` (not timm models).

Names follow timm: ``arch`` or ``arch.tag``; the tag selects weights (default: the
manifest's ``default_tag``).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .manifest import load_manifest

if TYPE_CHECKING:  # torch and timm are imported where a model is built, so listing names stays fast
    import torch

__all__ = ["create_model", "list_models", "split_name", "model_entry", "weights_entry", "check_name",
           "entrypoint", "pretrained_tag", "builder_module", "UnknownModelError", "TIMM_FAMILIES"]

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
    the zoo never replaces timm's models.
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


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Create a zoo model by name (``arch`` or ``arch.tag``), like ``timm.create_model``.

    ``pretrained=True`` loads the weights of the tag (default: the manifest's default tag),
    fetched and verified by :mod:`gczoo.weights`. Other keyword arguments go to the builder
    (``num_classes``, ``features_only``, ``gc_ratio``, ``gc_stages``, ...).
    ``hf-hub:ORG/REPO[@REVISION]`` names a repo written by ``gczoo publish`` (any family).
    """
    if name.startswith("hf-hub:"):
        from . import hosted

        return hosted.create_model(name, pretrained=pretrained, **kwargs)
    import timm

    arch, tag = check_name(name)
    model = model_entry(arch)
    if "gc_stages" in kwargs and kwargs["gc_stages"] is None:
        kwargs["gc_stages"] = ()  # "no GC blocks"; timm would drop a None and build the default
    if model["family"] == "timm":
        if pretrained:
            tag, entry = weights_entry(arch, tag)
            _overlay_weights_file(arch, tag, entry, kwargs)
        return timm.create_model(f"{arch}.{tag}" if tag else arch, pretrained=pretrained, **kwargs)
    if model["family"] in TIMM_FAMILIES:
        builder_module(model["family"])
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    if tag is not None:
        kwargs.setdefault("pretrained_cfg", tag)
    return entrypoint(arch)(pretrained=pretrained, **kwargs)
