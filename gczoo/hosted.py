"""Models from repos written by ``gczoo publish``: names ``hf-hub:ORG/REPO[@REVISION]``.

A published repo holds ``config.json`` and ``model.safetensors`` in the zoo's layout. For
classifiers ``config.json`` is timm's hub layout (``architecture``, ``num_classes``,
``num_features``, ``pretrained_cfg``), so after ``import gczoo`` timm's own
``timm.create_model("hf-hub:ORG/REPO", pretrained=True)`` builds the model and the zoo's builder
loads the weights; for the other families it names the zoo's architecture, family and tag.
Weights always come through :func:`gczoo.weights.fetch_with_source` (gczoo's bounded download into
the hub cache, offline rules, sha256 checked against the hub's LFS hash before the file enters the
cache), never through an unverified path.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Tuple

from safetensors import safe_open

__all__ = ["PREFIX", "WEIGHTS_FILE", "CONVERTER_KEY", "split_repo", "read_config", "repo_of", "fetch_weights",
           "create_model"]

PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"
#: safetensors metadata key of a published file: the converter that maps it onto the model.
CONVERTER_KEY = "gczoo_converter"
#: the converters a zoo-layout file may ask for (a full state dict, or one without classifier).
LAYOUT_CONVERTERS = ("identity", "new_head")


def split_repo(name: str) -> Tuple[str, str]:
    """``"hf-hub:org/repo@rev"`` (prefix optional) -> ``("org/repo", "rev")``; revision default ``main``."""
    repo, _, revision = name[len(PREFIX):].partition("@") if name.startswith(PREFIX) else name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r} is not a hub repo name; expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    return repo, revision or "main"


def read_config(repo_id: str, revision: str = "main") -> dict:
    """The repo's ``config.json``, checked to name an architecture of this zoo."""
    from .registry import UnknownModelError, list_models
    from .weights import WeightsError, fetch_hub_file

    label = f"{PREFIX}{repo_id}@{revision}"
    path = fetch_hub_file(repo_id, "config.json", revision)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{label}: config.json is not valid JSON ({err})") from err
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str):
        raise WeightsError(f"{label}: config.json names no 'architecture'; it was not written by `gczoo publish` "
                           "or timm's push_to_hf_hub")
    if arch not in list_models():
        raise UnknownModelError(
            f"{label}: config.json names the architecture {arch!r}, which this gczoo version does not have "
            f"(`gczoo list` shows them). Upgrade gczoo, or load the repo with the library that wrote it.")
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
    with safe_open(path, framework="pt") as f:
        converter = (f.metadata() or {}).get(CONVERTER_KEY, "identity")
    if converter not in LAYOUT_CONVERTERS:
        raise WeightsError(f"hf-hub:{repo_id}: {WEIGHTS_FILE} asks for converter {converter!r}; a published "
                           f"zoo-layout file uses one of {', '.join(LAYOUT_CONVERTERS)}")
    return str(path), converter


def create_model(name: str, pretrained: bool = False, **kwargs: Any):
    """Build the model a published repo describes (any family); ``pretrained`` loads its weights."""
    import timm

    from .registry import TIMM_FAMILIES, builder_module, entrypoint, model_entry

    repo_id, revision = split_repo(name)
    config = read_config(repo_id, revision)
    arch = config["architecture"]
    family = model_entry(arch)["family"]
    if "pretrained_cfg" in config:  # a classifier, timm's layout: what timm.create_model("hf-hub:...") does
        cfg = dict(config["pretrained_cfg"], hf_hub_id=f"{repo_id}@{revision}", source="hf-hub")
        if "num_classes" in config:
            cfg["num_classes"] = config["num_classes"]
        kwargs = {**config.get("model_args", {}), **kwargs}
        if family == "timm":  # timm builds these; the weights still come through the zoo's verified fetch
            if pretrained:
                path, _ = fetch_weights(arch, repo_id, revision)
                kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=path,
                                                        source=None)
        if family in TIMM_FAMILIES:
            builder_module(family)
        return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
    cfg = {"tag": config.get("tag"), "hf_hub_id": f"{repo_id}@{revision}", "source": "hf-hub"}
    return entrypoint(arch)(pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
