"""Training starts: load what fits, initialise the rest as upstream does.

Two ways a zoo model starts training, both here so that every family loads the same way:

* **New classes** (:func:`fit_classes`): a model built with ``num_classes`` other than its
  weights' takes every tensor of the checkpoint that fits (same name, same shape) and keeps
  its own initialisation for the *class layers* that do not: the tensors under the modules a
  model lists in its ``class_layers`` attribute (module-name patterns). Each model initialises
  those layers as its upstream does (:func:`init_layers`), so a re-initialised layer
  starts exactly as in an upstream fine-tuning run. One :class:`NewClassesWarning` names them.
  Any other mismatch still raises :class:`gczoo.convert.StateDictMismatchError`.
* **ImageNet backbone** (:func:`load_backbone`, :func:`set_trainable`): the ImageNet file an
  upstream training config starts from (the manifest's ``backbones`` section, named by the
  weights tag's ``imagenet_start``) is loaded into the backbone alone. Blocks the file cannot
  hold keep their initialisation, which is the identity: GC blocks (last transform conv at
  zero), non-local blocks (last BatchNorm at zero) and mmcv DCN offsets (zero). Then the
  stem and the first stages are frozen (mmdetection's ``frozen_stages``) and the norms are
  made frozen, statistics-frozen (``norm_eval=True``) or trainable (``SyncBN`` rows).
"""
from __future__ import annotations

import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["NewClassesWarning", "NORM_MODES", "new_classes", "fit_classes", "init_layers", "normal_init",
           "kaiming_fan_out_init", "xavier_uniform_init", "backbone_state_dict", "load_backbone", "set_trainable",
           "freeze_stages"]

StateDict = Dict[str, torch.Tensor]

#: Backbone norm modes: ``"frozen"`` (statistics and affine fixed: inference, torchvision's detection
#: training), ``"frozen_stats"`` (statistics fixed, affine trained: mmdetection's ``norm_eval=True``
#: with ``BN(requires_grad=True)``), ``"trainable"`` (BatchNorm trained: mmdetection's ``SyncBN`` rows
#: with ``norm_eval=False``; ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` makes it synchronised
#: under multi-GPU data parallel).
NORM_MODES = ("frozen", "frozen_stats", "trainable")

#: Keys an ImageNet classification file cannot hold: blocks the zoo inserts (GC, NL, SNL blocks)
#: and mmcv DCN offset convs. They keep the model's initialisation, which is the identity.
_INSERTED = re.compile(r"\.(context_block|pre_block|conv_offset)\.")


class NewClassesWarning(UserWarning):
    """Class layers of a checkpoint did not fit the model's ``num_classes`` and were re-initialised."""


def normal_init(std: float) -> Callable[[nn.Module], None]:
    """Weights ~ N(0, std), bias 0: mmengine's ``NormalInit`` (``init_cfg=dict(type='Normal', std=...)``)."""

    def init(module: nn.Module) -> None:
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

    return init


def kaiming_fan_out_init(module: nn.Module) -> None:
    """He normal (fan_out, ReLU), bias 0: mmdetection's ``FCNMaskHead.init_weights`` for ``conv_logits``."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def xavier_uniform_init(module: nn.Module) -> None:
    """Xavier uniform, bias 0: mmengine's ``XavierInit(distribution='uniform')`` (mmdetection's FPN and shared fcs)."""
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def init_layers(model: nn.Module, layers: Dict[str, Callable[[nn.Module], None]]) -> None:
    """Run ``init`` on every module of ``model`` whose name matches a pattern of ``layers`` (``{pattern: init}``,
    the first matching pattern wins)."""
    for name, module in model.named_modules():
        for pattern, init in layers.items():
            if re.fullmatch(pattern, name):
                init(module)
                break


def _class_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of the model's class layers (``model.class_layers``: module-name patterns)."""
    patterns = getattr(model, "class_layers", None) or ()
    return {name: module for name, module in model.named_modules()
            if any(re.fullmatch(pattern, name) for pattern in patterns)}


def new_classes(model: nn.Module) -> bool:
    """Whether ``model`` was built for other classes than its weights' (``num_classes`` differs from
    ``pretrained_cfg["num_classes"]``, timm's rule for dropping a classifier)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    theirs = cfg.get("num_classes") if isinstance(cfg, dict) else getattr(cfg, "num_classes", None)
    return theirs is not None and getattr(model, "num_classes", theirs) != theirs


def fit_classes(state_dict: StateDict, model: nn.Module, label: str) -> StateDict:
    """The converted checkpoint with its class layers fitted to a model built for new classes.

    Only when ``model`` has new classes (:func:`new_classes`): every tensor under a class layer
    (``model.class_layers``) whose name or shape is not in the checkpoint takes the model's own
    value (the upstream initialisation), class-layer tensors the model lacks (``num_classes=0``)
    are dropped, and one :class:`NewClassesWarning` names the re-initialised tensors. Everything
    else is left for the strict check that follows.
    """
    patterns = tuple(getattr(model, "class_layers", None) or ())
    if not patterns or not new_classes(model):
        return state_dict
    layers = _class_modules(model)
    own = model.state_dict()
    out = {k: v for k, v in state_dict.items()
           if k in own or not any(re.fullmatch(p, k.rpartition(".")[0]) for p in patterns)}
    renewed: List[str] = []
    for key, value in own.items():
        if key.rpartition(".")[0] in layers and (key not in out or tuple(out[key].shape) != tuple(value.shape)):
            out[key] = value
            renewed.append(key)
    if renewed:
        warnings.warn(f"{label}: the model has num_classes={model.num_classes} where these weights have "
                      f"{model.pretrained_cfg['num_classes']}; {len(renewed)} class-layer tensors did not fit and "
                      f"were re-initialised as upstream initialises them: {', '.join(renewed)}. Every other "
                      "tensor was loaded. Train the model on your classes before using it.",
                      NewClassesWarning, stacklevel=2)
    return out


def backbone_state_dict(name: str, file: Optional[str] = None) -> StateDict:
    """The state dict of the manifest's ImageNet backbone ``name`` (a key of its ``backbones``
    section), fetched and verified by :mod:`gczoo.weights`, or read from a local ``file``."""
    from . import weights
    from .manifest import load_manifest

    entry = load_manifest()["backbones"][name]
    arch, _, tag = name.partition(".")
    path = file if file is not None else weights.fetch(arch, tag, entry)
    return weights.load_checkpoint(path, f"ImageNet backbone {name}")


def load_backbone(backbone: nn.Module, state_dict: StateDict, what: str) -> None:
    """Load an ImageNet classification state dict into ``backbone`` (strict but for the parts noted).

    The file's classifier (``fc.*``) is dropped (a detection or segmentation backbone has none,
    as mmengine's ``Pretrained`` init ignores it); the inserted blocks and DCN offsets
    (:data:`_INSERTED`) and BatchNorm counters the file lacks keep the model's values; counters the
    model lacks are dropped. Anything else that does not fit raises
    :class:`gczoo.convert.StateDictMismatchError` naming the keys.
    """
    from .convert import _check

    own = backbone.state_dict()
    out = {k: v for k, v in state_dict.items()
           if not k.startswith("fc.") and not (k.endswith(".num_batches_tracked") and k not in own)}
    for key, value in own.items():
        if key not in out and (_INSERTED.search(key) or key.endswith(".num_batches_tracked")):
            out[key] = value
    _check(out, backbone, "fc", what, "the detector's or segmenter's backbone")
    backbone.load_state_dict(out, strict=True)


def freeze_stages(backbone: nn.Module, stem: Sequence[str], stages: Sequence[str], frozen_stages: int) -> None:
    """mmdetection's ``frozen_stages``: -1 nothing, 0 the stem, ``n`` the stem and the first ``n`` stages.

    Parameters of the frozen modules stop requiring gradients and their BatchNorms become
    :class:`~gczoo.models.mmdet_ops.FrozenParamBatchNorm2d` (mmdetection keeps them in eval mode).
    """
    if frozen_stages < 0:
        return
    for name in list(stem) + list(stages[:frozen_stages]):
        parent, _, attr = name.rpartition(".")
        owner = backbone.get_submodule(parent) if parent else backbone
        setattr(owner, attr, _frozen_norms(getattr(owner, attr)))
        for p in getattr(owner, attr).parameters():
            p.requires_grad_(False)


def _frozen_norms(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` in it (or itself) replaced by a frozen copy."""
    from .models.mmdet_ops import FrozenParamBatchNorm2d

    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenParamBatchNorm2d(module.num_features, module.eps)
        frozen.load_state_dict({k: v for k, v in module.state_dict().items() if k != "num_batches_tracked"})
        return frozen.to(module.weight.device)
    for name, child in list(module.named_children()):
        setattr(module, name, _frozen_norms(child))
    return module


def set_trainable(backbone: nn.Module, norm: str, frozen_stages: int, stem: Sequence[str],
                  stages: Sequence[str]) -> None:
    """Apply a norm mode of :data:`NORM_MODES` and ``frozen_stages`` to a backbone built with the
    mode's norm layer (``FrozenParamBatchNorm2d`` for the frozen modes, ``nn.BatchNorm2d`` for
    ``"trainable"``)."""
    from .models.mmdet_ops import FrozenParamBatchNorm2d

    if norm not in NORM_MODES:
        raise ValueError(f"backbone_norm must be one of {NORM_MODES}, got {norm!r}")
    if norm == "frozen_stats":
        for m in backbone.modules():
            if isinstance(m, FrozenParamBatchNorm2d):
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
    freeze_stages(backbone, stem, stages, frozen_stages)
