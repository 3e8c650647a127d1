"""Weights files the zoo writes itself (``train/*.py``, ``gczoo publish``): safetensors in the
model's own layout whose metadata says how to load them.

``gczoo_converter`` names the converter that maps the file onto the model (``identity``: the
full state dict; :data:`gczoo.hosted.CONVERTER_KEY`); ``gczoo_build_args`` holds, as JSON, the
``create_model`` arguments the weights need beyond the tag's (``num_classes``, ``label_ids``,
...), so ``eval/*.py --checkpoint`` rebuilds the model the file was trained as.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

from .fileio import safetensors_metadata
from .hosted import CONVERTER_KEY

__all__ = ["BUILD_ARGS_KEY", "metadata_of", "converter_of", "build_args_of"]

BUILD_ARGS_KEY = "gczoo_build_args"


def metadata_of(path: os.PathLike) -> Dict[str, str]:
    """The safetensors metadata of ``path`` (empty for another format); a header that lies is the named
    error of :func:`gczoo.fileio.safetensors_metadata`."""
    if Path(path).suffix != ".safetensors":
        return {}
    return safetensors_metadata(path, "weights file")


def converter_of(path: os.PathLike) -> Optional[str]:
    """The converter a zoo-written file declares, or ``None`` (an upstream file: the tag's converter)."""
    return metadata_of(path).get(CONVERTER_KEY)


def build_args_of(path: os.PathLike) -> dict:
    """The ``create_model`` arguments stored with trained weights (``{}`` when none)."""
    text = metadata_of(path).get(BUILD_ARGS_KEY)
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}
