"""Machinery shared by the zoo's training scripts (``train/detection.py``, ``train/segmentation.py``).

A script describes its task as a :class:`Job` (the model, a training set indexed by
``(sample, augmentation seed)``, how a batch becomes losses, how the model is evaluated) and hands
it to :func:`train`, which owns everything else:

* the **recipe** of the weights tag (manifest ``recipes``: SGD, warmup, schedule, loss weights),
  scaled to the run's total batch size by the linear scaling rule (Goyal et al. 2017): the
  learning rate by ``batch / recipe batch``, iteration counts (iteration schedules, warmup) by
  its inverse, so the run sees as many samples at the same per-sample step size; each loss a
  step returns is multiplied by its ``loss_weights`` entry (the config's ``loss_weight``);
* **data order and randomness as a function of (seed, iteration)**: the sample at position ``p``
  of the stream is ``permutation(seed, epoch)[p mod N]`` with ``epoch = p // N``, each sample's
  augmentation draws from ``numpy.random.default_rng((seed, iteration, position))``, and the
  torch generator is re-seeded from ``(seed, iteration, rank)`` before every step (dropout,
  proposal sampling). A run resumed at iteration ``k`` therefore computes what an uninterrupted
  run computes from ``k`` on;
* ``torchrun`` data parallel (:class:`eval.common.Distributed`: gloo on CPU, NCCL on GPU;
  ``DistributedDataParallel``; SyncBN where the recipe has it, on GPUs), AMP (``--amp``:
  bfloat16 or float16 autocast on a GPU, float16 with a gradient scaler);
* a progress bar (loss, lr, ETA) on rank 0 and a JSON-lines log (``OUT/log.jsonl``);
* checkpoints (``OUT/checkpoint.pt``: model, optimizer, iteration, RNG states, args and a
  fingerprint of model and data) written atomically (temporary file, fsync, rename) every
  ``--checkpoint-every`` iterations; ``--resume`` refuses a checkpoint of another model or data;
* a non-finite loss (or non-finite weights before a checkpoint) stops the run before anything is
  written, naming the last good checkpoint;
* final weights ``OUT/model.safetensors`` in the model's layout, with the metadata
  :mod:`gczoo.trained` reads, so ``create_model(NAME.TAG, pretrained=True,
  pretrained_cfg_overlay=dict(file=...))`` and ``eval/*.py --checkpoint`` load them.

Exit codes: 0 done, 2 bad input (data, model, flags, a checkpoint of another run), 3 the run
stopped (non-finite loss, a checkpoint that could not be written).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the eval scripts' package (a clone's eval/)
    sys.path.insert(0, str(ROOT))

from eval import common as eval_common  # noqa: E402
from gczoo.fileio import atomic_path  # noqa: E402
from gczoo.hosted import CONVERTER_KEY  # noqa: E402
from gczoo.manifest import load_manifest  # noqa: E402
from gczoo.registry import model_entry, split_name, weights_entry  # noqa: E402
from gczoo.trained import BUILD_ARGS_KEY  # noqa: E402

BadInput = eval_common.BadInput
Distributed = eval_common.Distributed
EXIT_DONE, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 2, 3
CHECKPOINT, LOG, WEIGHTS = "checkpoint.pt", "log.jsonl", "model.safetensors"


class TrainingStopped(Exception):
    """The run cannot go on (exit code 3); the last good checkpoint is intact."""


class NonFiniteLoss(TrainingStopped):
    """A loss (or a weight about to be checkpointed) is NaN or infinite."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (full disk, file size limit, permissions)."""


class ResumeMismatch(BadInput):
    """``--resume`` names a checkpoint of another model, data set or batch size."""


# --------------------------------------------------------------------------- command line

def make_parser(doc: str, *, task: str) -> argparse.ArgumentParser:
    """The flags every training script shares (each script adds its own)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit code: 0 done, 2 bad input, 3 stopped (non-finite loss, checkpoint not "
                                            "written); the last good checkpoint is kept.")
    parser.add_argument("--model", required=True, metavar="NAME[.TAG]",
                        help="architecture and weights tag; the tag names the recipe (default: the model's default tag)")
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="dataset root")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help=f"run folder: {CHECKPOINT}, {LOG}, {WEIGHTS}")
    parser.add_argument("--recipe", metavar="NAME", help=f"a {task} recipe of the manifest (default: the tag's)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--pretrained", action="store_true", help="start from the tag's weights, fine-tuning them "
                       "(class layers that do not fit your classes are re-initialised)")
    start.add_argument("--pretrained-backbone", nargs="?", const=True, default=False, metavar="FILE",
                       help="start as the paper did: the ImageNet backbone the tag's upstream config names (manifest "
                            "imagenet_start; FILE: a local copy of it), GC blocks as identity. Without either flag the "
                            "model starts from its own random initialisation")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                        help='extra create_model arguments, e.g. \'{"layers": [1, 1, 1, 1]}\' for a depth-reduced model')
    parser.add_argument("--batch-size", type=int, default=2, help="images per process (default 2, as the recipes)")
    parser.add_argument("--iterations", type=int, metavar="N", help="total iterations (default: the recipe's, scaled)")
    parser.add_argument("--lr", type=float, help="base learning rate (default: the recipe's, scaled)")
    parser.add_argument("--warmup", type=int, metavar="N", help="warmup iterations (default: the recipe's, scaled)")
    parser.add_argument("--seed", type=int, default=0, help="data order, augmentation and model randomness")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading processes per process")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--amp", action="store_true", help="autocast on a GPU (see --amp-dtype); CPU runs float32")
    parser.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--checkpoint-every", type=int, default=1000, metavar="N", help="iterations between checkpoints")
    parser.add_argument("--eval-every", type=int, metavar="N",
                        help="iterations between evaluations on the val split (default: the recipe's; 0: only at the end)")
    parser.add_argument("--eval-limit", type=int, metavar="N", help="evaluate on the first N val samples only")
    parser.add_argument("--log-every", type=int, default=10, metavar="N", help="iterations between log lines")
    parser.add_argument("--resume", type=Path, metavar="FILE", help=f"continue the run of a checkpoint (e.g. OUT/{CHECKPOINT})")
    parser.add_argument("--until", type=int, metavar="N",
                        help="stop after iteration N with a checkpoint (continue later with --resume)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "iterations", "checkpoint_every", "log_every", "until", "eval_limit", "warmup"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            raise BadInput(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'warmup' else 1}, got {value}.")
    if args.eval_every is not None and args.eval_every < 0:
        raise BadInput(f"--eval-every must be 0 or more, got {args.eval_every}.")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise BadInput(f"--lr must be a positive number, got {args.lr}.")
    if not isinstance(args.model_kwargs, dict):
        raise BadInput(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}.")
    if args.resume is not None and not args.resume.is_file():
        raise BadInput(f"--resume {args.resume}: no such checkpoint file.")


def main(run: Callable[[argparse.Namespace, Distributed], int], parser: argparse.ArgumentParser,
         argv: Optional[Sequence[str]] = None) -> int:
    """Parse, set up (distributed) execution, ``run``; bad input and stops become one ``error:`` line."""
    try:
        args = parser.parse_args(argv)
    except json.JSONDecodeError as err:
        parser.error(f"--model-kwargs is not JSON: {err}")
    dist = None
    try:
        check_args(args)
        dist = Distributed.setup(args.device)
        torch.manual_seed(derived_seed(args.seed))  # the model's initialisation
        return run(args, dist)
    except eval_common.BAD_INPUT_ERRORS as err:
        print(f"error: {eval_common.error_message(err)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except TrainingStopped as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    finally:
        if dist is not None:
            dist.close()


# --------------------------------------------------------------------------- recipes

def recipe_for(name: str, recipe: Optional[str], task: str) -> tuple:
    """``(recipe name, recipe)`` of ``--recipe`` or of the weights tag of ``name``."""
    arch, tag = split_name(name)
    tag, entry = weights_entry(arch, tag)
    recipes = load_manifest().get("recipes", {})
    key = recipe or entry.get("recipe")
    if key is None:
        raise BadInput(f"{arch}.{tag} names no training recipe; pass --recipe NAME ({_names(recipes, task)}).")
    if key not in recipes or recipes[key]["task"] != task:
        raise BadInput(f"--recipe {key!r} is not a {task} recipe of the manifest ({_names(recipes, task)}).")
    return key, recipes[key]


def _names(recipes: dict, task: str) -> str:
    return ", ".join(k for k, r in recipes.items() if r["task"] == task)


@dataclass
class Schedule:
    """The learning rate of each iteration: linear warmup from ``base_lr * warmup_factor``, then
    step decay at ``milestones`` (mmdetection's ``MultiStepLR``) or poly decay to ``min_lr``
    (mmsegmentation's ``PolyLR``)."""

    base_lr: float
    total: int
    warmup: int = 0
    warmup_factor: float = 1.0
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    poly_power: Optional[float] = None
    min_lr: float = 0.0

    def lr(self, iteration: int) -> float:
        """Learning rate of the step from ``iteration`` (0-based) to ``iteration + 1``."""
        if self.poly_power is not None:
            lr = (self.base_lr - self.min_lr) * (1 - iteration / self.total) ** self.poly_power + self.min_lr
        else:
            lr = self.base_lr * self.gamma ** sum(iteration >= m for m in self.milestones)
        if iteration < self.warmup:  # mmengine LinearLR: factor rises linearly to 1 over the warmup
            lr *= self.warmup_factor + (1 - self.warmup_factor) * iteration / self.warmup
        return lr


def scaled_schedule(recipe: dict, total_batch: int, iterations_per_epoch: int, args: argparse.Namespace) -> Schedule:
    """The recipe's schedule for ``total_batch`` images per iteration (linear scaling rule)."""
    scale = total_batch / recipe["batch_size"]
    opt, sched = recipe["optimizer"], recipe["schedule"]
    if "epochs" in sched:
        total = sched["epochs"] * iterations_per_epoch
        milestones = [m * iterations_per_epoch for m in sched["milestones"]]
    else:
        total = max(1, round(sched["iterations"] / scale))
        milestones = []
    if args.iterations is not None:  # milestones keep their place in the run
        milestones = [round(m * args.iterations / total) for m in milestones]
        total = args.iterations
    warmup = recipe.get("warmup", {})
    warm = args.warmup if args.warmup is not None else round(warmup.get("iterations", 0) / scale)
    return Schedule(base_lr=args.lr or opt["lr"] * scale, total=total, warmup=min(warm, total),
                    warmup_factor=warmup.get("start_factor", 1.0), milestones=milestones,
                    gamma=sched.get("gamma", 0.1), poly_power=sched.get("poly_power"),
                    min_lr=sched.get("min_lr", 0.0) * scale)


def weighted_losses(losses: Dict[str, torch.Tensor], recipe_name: str, weights: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """Each loss times the recipe's weight for it; a cascade's ``NAME_stageK`` losses take ``NAME``'s
    weight (the stage weights are the model's ``roi_heads.stage_loss_weights``)."""
    out = {}
    for name, value in losses.items():
        base = re.sub(r"_stage\d+$", "", name)
        if base not in weights:
            raise BadInput(f"recipe {recipe_name!r} has no loss weight for the model's loss {name!r} (it weights "
                           f"{sorted(weights)}); pass a --recipe of this kind of model.")
        out[name] = weights[base] * value
    return out


def eval_interval(recipe: dict, iterations_per_epoch: int, total_batch: int, args: argparse.Namespace) -> int:
    """Iterations between evaluations (0: only at the end)."""
    if args.eval_every is not None:
        return args.eval_every
    every = recipe["eval_every"]
    if "epochs" in every:
        return every["epochs"] * iterations_per_epoch
    return max(1, round(every["iterations"] * recipe["batch_size"] / total_batch))


# --------------------------------------------------------------------------- data order

def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a function of ``parts`` only (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class IterationSampler(Sampler):
    """Batches of ``(sample index, augmentation seed)`` for this rank, from iteration ``start``.

    Global iteration ``t`` (0-based) covers stream positions ``t*B .. t*B+B-1`` (``B`` the total
    batch); rank ``r`` takes positions ``t*B + r*b ..`` (``b`` per rank). The sample at position
    ``p`` is ``permutation(seed, p // N)[p % N]``.
    """

    def __init__(self, num_samples: int, batch: int, dist: Distributed, seed: int, start: int, stop: int):
        self.n, self.b, self.world, self.rank = num_samples, batch, dist.world_size, dist.rank
        self.seed, self.start, self.stop = seed, start, stop
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(derived_seed(self.seed, epoch)).permutation(self.n)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[List[tuple]]:
        total = self.b * self.world
        for t in range(self.start, self.stop):
            batch = []
            for j in range(self.rank * self.b, (self.rank + 1) * self.b):
                p = t * total + j
                batch.append((int(self._perm(p // self.n)[p % self.n]), derived_seed(self.seed, t, j)))
            yield batch


def file_list_digest(paths: Sequence[Path], root: Path) -> str:
    """sha256 over the relative names and sizes of the data files (cheap, order-independent)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p.relative_to(root)}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the run

@dataclass
class Job:
    """What a script hands to :func:`train`.

    ``collate`` returns the batch, or a message naming the unusable sample in it;
    ``step(model, batch)`` returns the named losses of one batch (``model`` may be DDP-wrapped);
    ``evaluate(model)`` the val metrics of the bare model in eval mode (or ``{}`` without a val
    split); ``build_args`` the ``create_model`` arguments the weights need (stored with them),
    ``training_args`` those that act in training only (not stored with the weights; a resume must match them);
    ``data_digest`` identifies the training data; ``counts`` (e.g. dropped annotations) go to the log.
    """

    name: str
    model: nn.Module
    dataset: Dataset
    collate: Callable
    step: Callable[[nn.Module, Any], Dict[str, torch.Tensor]]
    evaluate: Callable[[nn.Module], Dict[str, Any]]
    recipe_name: str
    recipe: dict
    build_args: dict
    data_digest: str
    num_samples: int
    counts: Dict[str, int] = field(default_factory=dict)
    training_args: dict = field(default_factory=dict)
    keep_keys: Callable[[str], bool] = lambda key: True  # keys of the final weights


def fingerprint(job: Job, total_batch: int) -> Dict[str, str]:
    """What a resumed run must share with the checkpoint: model, data, recipe and batch."""
    shapes = [(k, list(v.shape)) for k, v in job.model.state_dict().items()]
    model = hashlib.sha256(json.dumps([job.name, job.build_args, job.training_args, shapes]).encode()).hexdigest()
    return {"model": model, "data": job.data_digest, "recipe": job.recipe_name, "total_batch": str(total_batch)}


class RunLog:
    """``OUT/log.jsonl``: one JSON object a line (rank 0), appended (a resumed run continues it)."""

    def __init__(self, path: Path, dist: Distributed):
        self.path, self.active = path, dist.is_main

    def write(self, **record: Any) -> None:
        if self.active:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: temporary file beside ``path``, fsync, rename; the previous file survives a failure."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        cause = next((e for e in (err, err.__context__) if isinstance(e, OSError)), err)
        raise CheckpointWriteError(
            f"could not write the checkpoint of iteration {state['iteration']} to {path} "
            f"({getattr(cause, 'strerror', None) or cause}); "
            f"nothing was overwritten: {_previous(path)}. Free space (or raise the file size limit) and continue "
            f"with --resume {path}.") from None


def _previous(path: Path) -> str:
    if not path.is_file():
        return "no earlier checkpoint exists"
    try:
        it = torch.load(path, map_location="cpu", weights_only=True)["iteration"]
    except Exception:  # an unreadable previous file is named, not trusted
        return f"{path} holds an earlier checkpoint"
    return f"{path} still holds iteration {it}"


def load_resume(path: Path, expected: Dict[str, str]) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BadInput(f"--resume {path} is not a checkpoint of train/*.py ({type(err).__name__}: {err}).") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise BadInput(f"--resume {path} is not a checkpoint of train/*.py (no fingerprint).")
    wrong = [f"{k}: checkpoint {state['fingerprint'].get(k)!r}, this run {v!r}" for k, v in expected.items()
             if state["fingerprint"].get(k) != v]
    if wrong:
        raise ResumeMismatch(f"--resume {path} was made by another run ({'; '.join(wrong)}). Resume with the "
                             "model, data, recipe and total batch size it was made with, or start a new --out.")
    return state


def run_record(args: argparse.Namespace, total_batch: int, base_lr: float, syncbn: bool, amp: bool) -> Dict[str, Any]:
    """How the run went beyond its recipe (stored with the weights as ``gczoo_run``, shown by ``gczoo publish``):
    its start (``tag`` weights, ``imagenet`` backbone, ``random``), total batch, base learning rate, SyncBN, AMP."""
    start = "tag" if args.pretrained else "imagenet" if args.pretrained_backbone else "random"
    return {"start": start, "total_batch": total_batch, "base_lr": base_lr, "syncbn": syncbn,
            "amp": args.amp_dtype if amp else None}


def save_weights(path: Path, job: Job, model: nn.Module, iteration: int, metrics: dict, run: Dict[str, Any]) -> None:
    """The final weights in the model's layout, with what :mod:`gczoo.trained` reads to load them
    and ``run`` (:func:`run_record`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if job.keep_keys(k)}
    script = "train/" + ("detection.py" if job.recipe["task"] == "detection" else "segmentation.py")
    metadata = {"format": "pt", CONVERTER_KEY: "identity", BUILD_ARGS_KEY: json.dumps(job.build_args),
                "gczoo_model": job.name, "gczoo_recipe": job.recipe_name, "gczoo_iterations": str(iteration),
                "gczoo_metrics": json.dumps(metrics), "gczoo_trained_by": script, "gczoo_run": json.dumps(run)}
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(tensors, metadata=metadata))


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())


def train(job: Job, args: argparse.Namespace, dist: Distributed) -> int:
    """Run the training loop described in the module docstring; ``0`` when done."""
    args.out.mkdir(parents=True, exist_ok=True)
    total_batch = args.batch_size * dist.world_size
    per_epoch = max(1, math.ceil(job.num_samples / total_batch))
    schedule = scaled_schedule(job.recipe, total_batch, per_epoch, args)
    every_eval = eval_interval(job.recipe, per_epoch, total_batch, args)
    model = job.model.to(dist.device)
    syncbn = dist.world_size > 1 and job.recipe["norm"] == "syncbn" and dist.device.type == "cuda"
    if syncbn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cfg = job.recipe["optimizer"]
    optimizer = torch.optim.SGD(params, lr=schedule.base_lr, momentum=opt_cfg["momentum"], weight_decay=opt_cfg["weight_decay"])
    amp = args.amp and dist.device.type == "cuda"
    amp_dtype = getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    expected = fingerprint(job, total_batch)
    checkpoint_path, log = args.out / CHECKPOINT, RunLog(args.out / LOG, dist)
    start = 0
    if args.resume is not None:
        state = load_resume(args.resume, expected)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        start = state["iteration"]
    stop = min(schedule.total, args.until or schedule.total)
    if start >= stop:
        raise BadInput(f"--resume {args.resume} is at iteration {start}; the run ends at {stop}: nothing to do.")
    wrapped = model
    if dist.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    sampler = IterationSampler(job.num_samples, args.batch_size, dist, args.seed, start, stop)
    loader = DataLoader(job.dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=job.collate,
                        persistent_workers=False)
    log.write(event="start", iteration=start, model=job.name, recipe=job.recipe_name, total_batch=total_batch,
              world_size=dist.world_size, device=dist.describe(), base_lr=schedule.base_lr, iterations=schedule.total,
              warmup=schedule.warmup, milestones=list(schedule.milestones), eval_every=every_eval,
              samples=job.num_samples, data=job.counts, args={k: str(v) for k, v in vars(args).items()})
    last_good = start if args.resume is not None else None
    bar = tqdm(total=stop, initial=start, desc=job.name, unit="it", disable=not dist.is_main, dynamic_ncols=True)
    model.train()
    metrics: Dict[str, Any] = {}
    t0 = time.perf_counter()
    for it, batch in zip(range(start + 1, stop + 1), loader):
        _check_batch(batch, dist, it, checkpoint_path, last_good)
        lr = schedule.lr(it - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(derived_seed(args.seed, it, dist.rank))
        with torch.autocast(device_type=dist.device.type, dtype=amp_dtype, enabled=amp):
            losses = weighted_losses(job.step(wrapped, batch), job.recipe_name, job.recipe["loss_weights"])
        loss = sum(losses.values())
        values = torch.stack([loss.detach().float()] + [v.detach().float() for v in losses.values()])
        if dist.world_size > 1:
            torch_dist.all_reduce(values)
            values /= dist.world_size
        if not bool(torch.isfinite(values).all()):
            named = ", ".join(f"{k} {float(v):.4g}" for k, v in zip(losses, values[1:]))
            _stop_non_finite(log, bar, it, f"the loss is {float(values[0])} at iteration {it} ({named})",
                             checkpoint_path, last_good)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        record = {k: round(float(v), 6) for k, v in zip(["loss", *losses], values.tolist())}
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}", refresh=False)
        if it % args.log_every == 0 or it in (start + 1, stop):
            log.write(event="train", iteration=it, lr=lr, seconds=round(time.perf_counter() - t0, 3), **record)
        if every_eval and it % every_eval == 0 and it != stop:
            metrics = _evaluate(job, model, log, it)
        if it % args.checkpoint_every == 0 or it == stop:
            if not _all_finite(model):
                _stop_non_finite(log, bar, it, f"the weights hold NaN or infinite values after iteration {it}",
                                 checkpoint_path, last_good)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "iteration": it, "rng": {"torch": torch.get_rng_state()}, "fingerprint": expected,
                     "args": {k: str(v) for k, v in vars(args).items()}}
            if dist.is_main:
                save_checkpoint(checkpoint_path, state)
            if dist.world_size > 1:
                torch_dist.barrier()
            last_good = it
            log.write(event="checkpoint", iteration=it, path=str(checkpoint_path))
    bar.close()
    if stop < schedule.total:
        if dist.is_main:
            print(f"stopped at iteration {stop} of {schedule.total} (--until); continue with --resume {checkpoint_path}",
                  file=sys.stderr, flush=True)
        return EXIT_DONE
    metrics = _evaluate(job, model, log, stop)
    if dist.is_main:
        save_weights(args.out / WEIGHTS, job, model, stop, metrics, run_record(args, total_batch, schedule.base_lr, syncbn, amp))
        log.write(event="done", iteration=stop, weights=str(args.out / WEIGHTS), metrics=metrics)
        print(f"{job.name}: {stop} iterations; weights {args.out / WEIGHTS}; "
              + (", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)) or "no val split"),
              flush=True)
    return EXIT_DONE


def _evaluate(job: Job, model: nn.Module, log: RunLog, it: int) -> Dict[str, Any]:
    model.eval()
    try:
        metrics = job.evaluate(model)
    finally:
        model.train()
    if metrics:
        log.write(event="eval", iteration=it, **metrics)
    return metrics


def _check_batch(batch: Any, dist: Distributed, it: int, checkpoint: Path, last_good: Optional[int]) -> None:
    """A collate function returns a message instead of a batch when a sample is unusable; every
    rank stops together (no rank waits for the others in a collective)."""
    problem = batch if isinstance(batch, str) else ""
    if dist.world_size > 1:
        flag = torch.tensor([1.0 if problem else 0.0], device=dist.device)
        torch_dist.all_reduce(flag)
        if flag.item() and not problem:
            problem = "another process stopped on an unusable sample (its message names it)"
    if problem:
        kept = f"{checkpoint} (iteration {last_good}) is intact" if last_good is not None else "no checkpoint was written"
        raise BadInput(f"{problem} (iteration {it}); {kept}.")


def _stop_non_finite(log: RunLog, bar: tqdm, it: int, what: str, checkpoint: Path, last_good: Optional[int]) -> None:
    bar.close()
    kept = (f"the last good checkpoint is {checkpoint} (iteration {last_good}); continue from it with --resume and a "
            "lower --lr, or check the data" if last_good is not None else
            "no checkpoint was written yet; lower --lr or check the data")
    log.write(event="stopped", iteration=it, reason=what)
    raise NonFiniteLoss(f"{what}. Training stopped before writing anything; {kept}.")


def model_family(name: str) -> str:
    return model_entry(split_name(name)[0])["family"]
