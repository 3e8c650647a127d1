"""gczoo: Global Context Networks (GCNet) for PyTorch, timm and torch.hub.

``import gczoo`` registers the zoo's architectures with timm. The public API:
:func:`create_model`, :func:`list_models`, :func:`model_info`, :func:`gcify`, and the
blocks in :mod:`gczoo.blocks`.

Start-up stays fast: the package imports neither torch nor timm itself (the command line lists
names and shows cards from the manifest alone). The public names are loaded on first use
(PEP 562), and the timm registration runs as soon as timm is loaded: at once when it already
is, else right after ``import timm`` completes (the one thing that can look the models up).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from .manifest import ManifestError, load_manifest
from .registry import FAMILY_MODULES, TIMM_FAMILIES, UnknownModelError, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "ContextBlock", "NonLocalBlock", "SimplifiedNonLocalBlock", "SqueezeExcitation",
    "ManifestError", "UnknownModelError", "create_model", "gcify", "list_models", "load_manifest", "model_info",
    "__version__",
]

#: public name -> module that defines it, imported on first access
_LAZY = {
    "ContextBlock": "gczoo.blocks", "NonLocalBlock": "gczoo.blocks", "SimplifiedNonLocalBlock": "gczoo.blocks",
    "SqueezeExcitation": "gczoo.blocks", "gcify": "gczoo.gcify", "model_info": "gczoo.cards",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "models":
        return importlib.import_module("gczoo.models")
    raise AttributeError(f"module 'gczoo' has no attribute {name!r}")


def _register_with_timm() -> None:
    """Import the modules of the timm-registered families (each registers itself at import).

    A module already in ``sys.modules`` is left alone: it is being imported (it imported timm)
    and registers itself when it finishes.
    """
    for family in TIMM_FAMILIES:
        module = FAMILY_MODULES[family]
        if module not in sys.modules:
            importlib.import_module(module)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds ``timm`` through the other finders and runs :func:`_register_with_timm` once it is loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register_with_timm()


if "timm" in sys.modules:
    _register_with_timm()
else:
    sys.meta_path.insert(0, _RegisterAfterTimm())
