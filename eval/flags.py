"""The flags every evaluation script shares, without importing torch: a script builds its parser and
parses its command line before its heavy imports, so ``--help`` and usage errors answer at once."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["make_parser"]


def make_parser(doc: str, *, batch_size: int, tolerance: float) -> argparse.ArgumentParser:
    """A script's parser: the first paragraph of its docstring, the exit codes, and the flags
    every evaluation script shares (each script chooses its defaults and adds its own flags)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     epilog="Exit code: 0 PASS or nothing to compare, 1 FAIL, 2 bad input.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="NAME[.TAG]",
                      help="model and weights tag to evaluate (default tag of the model if none)")
    what.add_argument("--all", action="store_true",
                      help="evaluate every weights tag of the manifest that has a published number for this task")
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="dataset directory")
    parser.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="your own weights (safetensors or a pickle, read with weights_only=True) in the zoo's "
                             "layout (model.state_dict() saved) or the upstream layout of the tag; reported without "
                             "PASS/FAIL")
    parser.add_argument("--weights-file", type=Path, metavar="FILE",
                        help="a copy of the weights of --model NAME.TAG (e.g. from `gczoo download --to` on a machine "
                             "with network), checked against the manifest's sha256 before use; keeps PASS/FAIL")
    parser.add_argument("--tolerance", type=float, default=tolerance, metavar="POINTS",
                        help=f"largest |measured - published| still called PASS (default {tolerance})")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"per process (default {batch_size})")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="data loading processes per process (0: load in the main process)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="quick check on the first N samples; reported as such, never PASS/FAIL")
    parser.add_argument("--amp", action="store_true",
                        help="on a GPU, run under float16 autocast (default: float32, as the published numbers)")
    return parser
