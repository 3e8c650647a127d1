"""torch.hub entry points generated from the registry (used by the repository's ``hubconf.py``)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from .cards import metric_values
from .registry import create_model, list_models, model_entry

__all__ = ["entrypoints"]


def _hub_entrypoint(arch: str) -> Callable[..., torch.nn.Module]:
    model = model_entry(arch)

    def load(pretrained: bool = False, tag: Optional[str] = None, **kwargs: Any) -> torch.nn.Module:
        return create_model(f"{arch}.{tag}" if tag else arch, pretrained=pretrained, **kwargs)

    tags = ", ".join(f"{t}{' (default)' if t == model['default_tag'] else ''}" for t in model["weights"]) or "none"
    results = "".join(f"\n    {t}: {metric_values(m)} ({m['source']})"
                      for t, entry in model["weights"].items() for m in entry["metrics"])
    load.__name__ = load.__qualname__ = arch
    load.__doc__ = (f"{model['summary']}\n\n"
                    + (f"Published results of its weights:{results}\n\n" if results else "")
                    + f"Args:\n    pretrained: load weights (tags: {tags}).\n"
                    f"    tag: weights tag (default: the default tag).\n"
                    f"    **kwargs: passed to gczoo.create_model (num_classes, features_only, ...).\n\n"
                    f"Model card: `gczoo info {arch}`.")
    return load


def entrypoints() -> Dict[str, Callable[..., torch.nn.Module]]:
    """``{arch: function}`` for every architecture in the zoo."""
    return {arch: _hub_entrypoint(arch) for arch in list_models()}
