"""gczoo: Global Context Networks (GCNet) for PyTorch, timm and torch.hub.

``import gczoo`` registers the zoo's architectures with timm. The public API:
:func:`create_model`, :func:`list_models`, :func:`model_info`, :func:`gcify`, and the
blocks in :mod:`gczoo.blocks`.
"""
from . import models
from .blocks import ContextBlock, NonLocalBlock, SimplifiedNonLocalBlock, SqueezeExcitation
from .gcify import gcify
from .manifest import ManifestError, load_manifest
from .registry import UnknownModelError, create_model, list_models, model_info

__version__ = "0.1.0"

__all__ = [
    "ContextBlock", "NonLocalBlock", "SimplifiedNonLocalBlock", "SqueezeExcitation",
    "ManifestError", "UnknownModelError", "create_model", "gcify", "list_models", "load_manifest", "model_info",
    "__version__",
]
