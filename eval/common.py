"""Machinery shared by the zoo's evaluation scripts (``eval/imagenet.py``, ``eval/coco.py``).

A script built on this module

1. makes its parser, with the shared flags, with :func:`make_parser` and adds its own flags;
2. runs its work through :func:`main`, which maps the outcome to the exit code: ``0`` PASS (or
   nothing to compare), ``1`` FAIL, ``2`` bad input -- :class:`BadInput` or one of the zoo's
   own errors (unknown model, malformed manifest, weights unavailable or corrupt, checkpoint
   that does not fit), printed as one message, never as a traceback;
3. loads the model of a weights tag or of a ``--checkpoint`` file with :func:`load_model`
   (weights fetched and verified by :mod:`gczoo.weights`, then converted by the manifest's
   converter, so a local file takes the same path as a download);
4. splits its samples over the ranks of a ``torchrun`` launch with :class:`Distributed`: rank
   ``r`` of ``w`` takes samples ``r, r + w, r + 2w, ...`` (no padding, so nothing is counted
   twice) and :meth:`Distributed.gather` collects exactly one result per sample on every rank,
   checking that no sample is missing or duplicated before any metric is computed;
5. compares its metrics with the manifest's published ones (:func:`published_metrics`,
   :func:`compare`; the metric names are whatever numeric fields a manifest metric has --
   ``top1``/``top5`` for ImageNet, ``box_ap``/``mask_ap`` for COCO) and writes a JSON report
   (:func:`record`, :func:`write_report`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import timm
import torch
import torch.distributed as torch_dist
import torchvision
from tqdm import tqdm

import gczoo
from gczoo.fileio import atomic_path
from gczoo.convert import StateDictMismatchError, filter_fn
from gczoo.manifest import ManifestError, load_manifest, metric_numbers
from gczoo.registry import UnknownModelError, create_model, model_entry, split_name, weights_entry
from gczoo.trained import build_args_of
from gczoo.weights import WeightsError, WeightsUnavailableError, fetch, load_checkpoint, sha256_of, verify_file

__all__ = [
    "EXIT_PASS", "EXIT_FAIL", "EXIT_BAD_INPUT", "PASS", "FAIL", "BadInput", "BAD_INPUT_ERRORS", "Distributed", "LoadedModel",
    "make_parser", "main", "missing_extra", "error_message", "load_model", "published_metrics", "weights_with_metrics", "compare",
    "verdict_of", "exit_code", "no_verdict_reason", "evaluate_each", "finish", "record", "write_report", "versions", "progress", "autocast", "format_table", "verdict_lines",
]

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
PASS, FAIL = "PASS", "FAIL"

#: Fields of a manifest metric that describe it; every other field is a published value.


class BadInput(Exception):
    """Input the evaluation cannot use (data, model, weights, checkpoint, flags); exit code 2."""


#: The zoo's own errors that mean bad input: unknown model or tag, malformed manifest, a
#: checkpoint that does not fit, weights unavailable, corrupt or unsafe.
BAD_INPUT_ERRORS = (BadInput, UnknownModelError, ManifestError, StateDictMismatchError, WeightsError)


# --------------------------------------------------------------------------- command line

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
                        help="weights from a local file (safetensors or a pickle, read with weights_only=True) "
                             "instead of the manifest's source; reported without PASS/FAIL")
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


def _check_common_args(args: argparse.Namespace) -> None:
    if args.checkpoint is not None and args.model is None:
        raise BadInput("--checkpoint needs --model NAME (the architecture the file holds weights for).")
    if args.weights_file is not None and (args.model is None or args.checkpoint is not None):
        raise BadInput("--weights-file needs --model NAME.TAG (the weights the file is a copy of) and no --checkpoint.")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise BadInput(f"Checkpoint {args.checkpoint} does not exist or is not a file.")
    for flag in ("batch_size", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise BadInput(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
    if args.workers < 0:
        raise BadInput(f"--workers must be 0 or more, got {args.workers}.")
    if args.tolerance < 0:
        raise BadInput(f"--tolerance must not be negative, got {args.tolerance}.")


def main(run: Callable[[argparse.Namespace, "Distributed"], int], parser: argparse.ArgumentParser,
         argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, set up (distributed) execution and call ``run(args, dist)``; return the exit code.

    ``run`` returns :data:`EXIT_PASS` or :data:`EXIT_FAIL` (see :func:`exit_code`); bad input,
    raised anywhere as :class:`BadInput` or a zoo error, becomes one ``error:`` line on stderr
    and :data:`EXIT_BAD_INPUT`. argparse's own usage errors exit with 2 as well.
    """
    args = parser.parse_args(argv)
    dist = None
    try:
        _check_common_args(args)
        dist = Distributed.setup(args.device)
        return run(args, dist)
    except BAD_INPUT_ERRORS as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if dist is not None:
            dist.close()


def error_message(err: Exception) -> str:
    """A bad-input error with advice in the terms of these scripts' command lines."""
    if isinstance(err, UnknownModelError):
        return f"{err} `gczoo list --pretrained` lists every model and weights tag."
    if isinstance(err, WeightsUnavailableError):
        return (f"{err.summary()}\nWithout network here: on a machine with network, `gczoo download {err.label} "
                "--to DIR` writes the upstream file the manifest pins; carry it over and add --weights-file FILE: "
                "it is checked against the manifest's hash before use, so the run still gives PASS/FAIL.")
    return str(err)


def missing_extra(extra: str, err: ModuleNotFoundError) -> int:
    """One line naming the extra that provides a missing module; returns :data:`EXIT_BAD_INPUT`."""
    print(f"error: {Path(sys.argv[0]).name} needs the '{extra}' extra ({err.name} is not installed): "
          f"pip install -e '.[{extra}]' in the clone", file=sys.stderr)
    return EXIT_BAD_INPUT


# --------------------------------------------------------------------------- distributed

@dataclass
class Distributed:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 when launched plainly).

    Under torchrun (``WORLD_SIZE`` > 1) the process group uses NCCL on GPUs and gloo on CPU;
    each rank runs on ``cuda:LOCAL_RANK`` when the device is a GPU.
    """

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def setup(cls, device: Optional[str]) -> "Distributed":
        try:
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as err:
            raise BadInput(f"--device {device!r} is not a device torch knows ({err}).") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"--device {device} asked for a GPU, but torch sees none; use --device cpu.")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world_size > 1:
            if dev.type == "cuda":
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(dev)
            torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return cls(rank=rank, world_size=world_size, device=dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, num_samples: int) -> range:
        """The indices of the samples this rank evaluates: every ``world_size``-th, from ``rank``."""
        return range(self.rank, num_samples, self.world_size)

    def gather(self, local: Dict[int, Any], num_samples: int) -> Dict[int, Any]:
        """Every rank's ``{sample index: result}`` merged, on every rank; exactly one per sample.

        A missing or duplicated index is a bug in the caller's sharding, so it raises
        ``RuntimeError`` instead of producing a metric over the wrong samples.
        """
        parts: List[Dict[int, Any]] = [local]
        if self.world_size > 1:
            parts = [{} for _ in range(self.world_size)]
            torch_dist.all_gather_object(parts, local)
        merged: Dict[int, Any] = {}
        for part in parts:
            for index, result in part.items():
                if index in merged:
                    raise RuntimeError(f"sample {index} was evaluated twice")
                merged[index] = result
        if len(merged) != num_samples or set(merged) != set(range(num_samples)):
            raise RuntimeError(f"gathered {len(merged)} results for {num_samples} samples")
        return merged

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        where = f"{self.device} ({name})"
        return where if self.world_size == 1 else f"{where} x {self.world_size} processes"

    def close(self) -> None:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def progress(iterable: Iterable, *, total: int, desc: str, dist: Distributed) -> Iterator:
    """A progress bar on stderr of rank 0 (other ranks stay quiet)."""
    return iter(tqdm(iterable, total=total, desc=desc, unit="batch", disable=not dist.is_main,
                     dynamic_ncols=True, leave=False))


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on a GPU when ``amp``; a no-op on CPU (CPU runs in float32)."""
    if device.type == "cuda" and amp:
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- models and weights

@dataclass
class LoadedModel:
    """A model in eval mode on its device, with where its weights came from."""

    model: torch.nn.Module
    arch: str
    tag: Optional[str]
    weights_file: Path
    weights_sha256: str
    checkpoint: bool  # weights from --checkpoint rather than the manifest's source

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else self.arch


def load_model(name: str, device: torch.device, *, checkpoint: Optional[Path] = None,
               weights_file: Optional[Path] = None, channels_last: bool = False, **kwargs: Any) -> LoadedModel:
    """Build ``name`` (``arch`` or ``arch.tag``) with the tag's verified weights or a local file.

    Without ``checkpoint`` the tag's file is fetched and verified by :func:`gczoo.weights.fetch`.
    A ``checkpoint`` goes through the tag's converter when the architecture has weights in the
    zoo (so an upstream-layout file works), and must be in the model's own layout otherwise.
    Either way keys and shapes are checked strictly before anything is loaded. A
    ``weights_file`` stands in for the download: it must match the manifest's hash
    (:func:`gczoo.weights.verify_file`), so the weights are the tag's and keep their verdict.
    """
    arch, tag = split_name(name)
    entry = model_entry(arch)
    if checkpoint is None:
        tag, wentry = weights_entry(arch, tag)
        if weights_file is not None:
            print(f"{arch}.{tag}: {weights_file} verified: {verify_file(arch, tag, wentry, weights_file)}",
                  file=sys.stderr, flush=True)
            path = weights_file
        else:
            path = fetch(arch, tag, wentry)
        model = create_model(f"{arch}.{tag}", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    else:
        path = checkpoint
        try:
            model = _from_checkpoint(name, arch, tag or entry["default_tag"], path, **kwargs)
        except StateDictMismatchError:
            raise
        except (OSError, RuntimeError, ValueError) as err:  # WeightsError (unreadable, unsafe) is a RuntimeError
            raise BadInput(f"Cannot load checkpoint {path} into {name}: {err}") from None
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(model=model, arch=arch, tag=tag, weights_file=Path(path).resolve(),
                       weights_sha256=sha256_of(path), checkpoint=checkpoint is not None)


def _from_checkpoint(name: str, arch: str, tag: Optional[str], path: Path, **kwargs: Any) -> torch.nn.Module:
    kwargs = {**build_args_of(path), **kwargs}  # weights trained by train/*.py: their classes
    if tag:  # the tag's converter, as for downloaded weights
        return create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    model = create_model(arch, **kwargs)
    check = filter_fn(arch, "checkpoint", "identity", str(path))
    model.load_state_dict(check(load_checkpoint(path, f"{arch} checkpoint"), model))
    return model


# --------------------------------------------------------------------------- published numbers

def published_metrics(name: str, task: str) -> List[dict]:
    """The manifest's metrics of the weights ``name`` (``arch.tag``) for ``task``, in manifest order."""
    arch, tag = split_name(name)
    _, entry = weights_entry(arch, tag)
    return [m for m in entry["metrics"] if m["task"] == task]


def weights_with_metrics(task: str) -> List[str]:
    """Every ``arch.tag`` of the manifest with at least one published metric for ``task``."""
    return [f"{arch}.{tag}" for arch, model in load_manifest()["models"].items()
            for tag, entry in model["weights"].items() if any(m["task"] == task for m in entry["metrics"])]


def compare(measured: Dict[str, float], published: Iterable[dict], tolerance: float) -> List[dict]:
    """One comparison per published metric: its numbers, source, protocol, delta and verdict.

    ``delta`` is measured minus published for each number both have; the metric PASSes when
    every ``|delta| <= tolerance`` (in the metric's own unit: points of a percentage). A
    published metric sharing no number with ``measured`` is left out.
    """
    out = []
    for metric in published:
        values = {k: v for k, v in metric_numbers(metric).items() if k in measured}
        if not values:
            continue
        delta = {k: round(measured[k] - v, 6) for k, v in values.items()}
        ok = all(abs(d) <= tolerance + 1e-9 for d in delta.values())
        out.append({"values": values, "delta": delta, "verdict": PASS if ok else FAIL,
                    "source": metric["source"], "protocol": metric["protocol"]})
    return out


def verdict_of(comparisons: Sequence[dict]) -> Optional[str]:
    """FAIL if any comparison fails, PASS if there is at least one and all pass, else ``None``."""
    if not comparisons:
        return None
    return FAIL if any(c["verdict"] == FAIL for c in comparisons) else PASS


def exit_code(verdicts: Iterable[Optional[str]]) -> int:
    """:data:`EXIT_FAIL` if any verdict is FAIL, else :data:`EXIT_PASS` (no verdict is not a failure)."""
    return EXIT_FAIL if any(v == FAIL for v in verdicts) else EXIT_PASS


def no_verdict_reason(args: argparse.Namespace, samples: int, full_set: int, dataset: str) -> Optional[str]:
    """Why a run is reported without PASS/FAIL (a ``--checkpoint``, a ``--limit`` run, a set other
    than the ``full_set`` samples of ``dataset``), or ``None`` when it is compared."""
    if args.checkpoint:
        return "weights from --checkpoint: no published number to compare"
    if args.limit is not None:
        return f"quick check on the first {samples} samples (--limit): not compared"
    if samples != full_set:
        return f"{samples} samples, not the {full_set} of {dataset}: not compared"
    return None


def evaluate_each(names: Sequence[str], evaluate: Callable[[str], List[dict]], dist: "Distributed",
                  keep_going: bool) -> tuple:
    """``(records, errors)`` of ``evaluate(name)`` (a list of report records) for every weights tag.

    With ``keep_going`` (``--all``), a tag whose model or weights are bad input is reported as an
    error and the others still run; :class:`BadInput` (the data's fault) always stops.
    """
    records: List[dict] = []
    errors: List[dict] = []
    for name in names:
        try:
            records += evaluate(name)
        except BAD_INPUT_ERRORS as err:
            if not keep_going or isinstance(err, BadInput):
                raise
            if dist.is_main:
                print(f"error: {name}: {error_message(err)}", file=sys.stderr, flush=True)
            errors.append({"name": name, "error": str(err)})
    return records, errors


def finish(records: List[dict], errors: List[dict], json_out: Optional[Path], dist: "Distributed") -> int:
    """Write the report (rank 0, with ``--json-out``) and return the exit code: bad input if a tag
    errored, else :func:`exit_code` of the verdicts."""
    if dist.is_main and json_out is not None:
        write_report(json_out, records, errors)
    return EXIT_BAD_INPUT if errors else exit_code(r["verdict"] for r in records)


# --------------------------------------------------------------------------- reports

def versions() -> Dict[str, str]:
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "gczoo": gczoo.__version__, "python": sys.version.split()[0]}


def record(loaded: LoadedModel, *, task: str, metrics: Dict[str, float], comparisons: List[dict],
           protocol: dict, dist: Distributed, samples: int, limit: Optional[int], note: Optional[str] = None,
           **extra: Any) -> dict:
    """One evaluation's report: model, weights and their sha256, metrics, published numbers, verdict.

    ``comparisons`` come from :func:`compare` (empty when there is nothing to compare with:
    a ``--checkpoint``, a ``--limit`` run, or no number published under this protocol);
    ``note`` says why there is no verdict. ``extra`` adds script-specific fields.
    """
    return {
        "model": loaded.arch,
        "tag": loaded.tag,
        "task": task,
        "weights_file": str(loaded.weights_file),
        "weights_sha256": loaded.weights_sha256,
        "checkpoint": loaded.checkpoint,
        **metrics,
        "published": comparisons,
        "delta": [c["delta"] for c in comparisons],
        "verdict": verdict_of(comparisons),
        "note": note,
        "protocol": protocol,
        "samples": samples,
        "limit": limit,
        "device": dist.describe(),
        "world_size": dist.world_size,
        "versions": versions(),
        **extra,
    }


def write_report(path: Path, records: List[dict], errors: Optional[List[dict]] = None) -> None:
    """Write ``{"verdict", "results", "errors"}`` as JSON, atomically (no half-written file)."""
    verdicts = [r["verdict"] for r in records]
    overall = FAIL if FAIL in verdicts else (PASS if verdicts and all(v == PASS for v in verdicts) else None)
    report = {"verdict": overall, "results": records, "errors": errors or []}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def verdict_lines(rec: dict, digits: int) -> List[str]:
    """The report lines under a record's measurement: one ``PASS``/``FAIL`` line per published
    metric (published numbers, delta with ``digits`` decimals, source), and ``no verdict: why``."""
    lines = []
    for c in rec["published"]:
        published = ", ".join(f"{k} {v}" for k, v in c["values"].items())
        delta = ", ".join(f"{k} {v:+.{digits}f}" for k, v in c["delta"].items())
        lines.append(f"  {c['verdict']}: published {published}; delta {delta} ({c['source']})")
    if rec["note"]:
        lines.append(f"  no verdict: {rec['note']}")
    return lines


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned columns."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
