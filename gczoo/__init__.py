"""gczoo: Global Context Networks (GCNet) for PyTorch, timm and torch.hub.

``import gczoo`` registers the zoo's architectures with timm. The public API:
:func:`create_model`, :func:`list_models`, :func:`model_info`, :func:`gcify`, and the
blocks in :mod:`gczoo.blocks`.

Start-up stays fast: the package imports neither torch nor timm itself (the command line lists
names and shows cards from the manifest alone). The public names are loaded on first use
(PEP 562), and the timm registration runs as soon as timm is loaded: at once when it already
is, else right after ``import timm`` completes (the one thing that can look the models up).
timm's own scripts (``train.py``, ``validate.py``, ...) see the models through
``python -m gczoo.timm_run SCRIPT ARGS`` (:mod:`gczoo.timm_run`).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from .manifest import ManifestError, load_manifest
from .registry import FAMILY_MODULES, TIMM_FAMILIES, UnknownModelError, builder_module, create_model, list_models

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
    and registers itself when it finishes. A family that fails to import leaves timm usable and
    says why in a warning (``gczoo.create_model`` raises the error itself).
    """
    for family in TIMM_FAMILIES:
        module = FAMILY_MODULES[family]
        if module not in sys.modules:
            try:
                builder_module(family)
            except Exception as e:  # noqa: BLE001 -- the import of timm itself succeeded and must stand
                warnings.warn(f"gczoo could not register its {family} models with timm: {e!r}. "
                              f"`import {module}` shows the full error.", RuntimeWarning, stacklevel=2)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` until timm is imported; then runs :func:`_register_with_timm`.

    It finds ``timm`` through the finders behind it and wraps the loader of that spec, so the
    registration follows the execution of timm's module. Looking timm up without importing it
    (``importlib.util.find_spec``, as torch.hub's dependency check does) executes nothing, and
    the finder stays in place for the import that follows.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader, self)
                return spec
        return None


class _ThenRegister(importlib.abc.Loader):
    """Loads timm with its own loader, puts that loader back on the module, then registers the zoo."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterAfterTimm):
        self.loader, self.finder = loader, finder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _register_with_timm()


if "timm" in sys.modules:
    _register_with_timm()
else:
    sys.meta_path.insert(0, _RegisterAfterTimm())
