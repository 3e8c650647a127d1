"""Run one of timm's scripts with the zoo's architectures in timm's registry.

    python -m gczoo.timm_run train.py --model resnet50_gc_r16 ...
    torchrun --nproc_per_node 2 -m gczoo.timm_run train.py --model resnet50_gc_r16 ...

timm's scripts (``train.py``, ``validate.py``, ``inference.py``, ``benchmark.py``; they are in
timm's repository, not in its wheel) look models up by name in timm's registry and offer no
way to load a plugin (``train.py --device-modules`` alone imports extra modules). This command
imports the zoo's timm families, which registers them, then runs the script as
``python SCRIPT ARGS`` would: ``__name__ == "__main__"``, ``sys.argv = [SCRIPT, *ARGS]`` and
the script's folder first on ``sys.path``.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import List, Optional

from .registry import TIMM_FAMILIES, builder_module

__all__ = ["main"]

USAGE = "usage: python -m gczoo.timm_run SCRIPT [ARGS...]   (SCRIPT: timm's train.py, validate.py, inference.py, ...)"


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f"gczoo.timm_run: no script at {str(script)!r}. timm's train.py, validate.py, inference.py "
                         "and benchmark.py come with a clone of https://github.com/huggingface/pytorch-image-models "
                         "(they are not installed with timm).\n" + USAGE)
    for family in TIMM_FAMILIES:
        builder_module(family)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
