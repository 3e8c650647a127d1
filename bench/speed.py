"""Side-by-side speed of GC-ResNet-50 against torchvision's ResNet-50.

One run builds, on the same device and in the same process:

* ``resnet50``: torchvision's ResNet-50, the reference every ratio is taken to;
* ``gczoo_body``: gczoo's GC-ResNet-50 body with no GC block (control: the ResNet body alone);
* ``resnet50_gc_r16``: gczoo's model, GC r16 in every bottleneck of c3-c5 (13 blocks);
* ``straightforward``: the same network with the straightforward GC block of
  ``bench/reference.py`` at the same places;
* ``timm_gc``: the same network with timm's ``GlobalContext`` (r16, fusion add) at the same places.

Each round times every model once (in a rotating order), so slow drifts of a shared machine
hit all of them alike; the table gives the median time, the median and 25-75% spread of
the per-round ratio to ``resnet50``, and the median per-round ratio to ``gczoo_body`` (the GC
blocks' own cost, on the same body). Inference runs under ``torch.inference_mode``; a training
step is forward, cross-entropy, backward and an SGD step.

Examples (see bench/RESULTS.md)::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python bench/speed.py --threads 2 --batch 8 --rounds 40
    python bench/speed.py --device cuda --amp bf16 --channels-last --batch 256 --compile
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torchvision  # noqa: E402

import gczoo  # noqa: E402
from bench.common import environment_lines, interleaved_rounds, load_line, ratio_stats  # noqa: E402
from bench.reference import straightforward_like, swap_context_blocks, timm_like  # noqa: E402

MODELS = ("resnet50", "gczoo_body", "resnet50_gc_r16", "straightforward", "timm_gc")


def build(name: str) -> nn.Module:
    if name == "resnet50":
        return torchvision.models.resnet50()
    if name == "gczoo_body":
        return gczoo.create_model("resnet50_gc_r16", gc_stages=())
    model = gczoo.create_model("resnet50_gc_r16")
    if name == "straightforward":
        swap_context_blocks(model, straightforward_like)
    elif name == "timm_gc":
        swap_context_blocks(model, timm_like)
    elif name != "resnet50_gc_r16":
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return model


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, train: bool,
              amp_dtype) -> Callable[[], None]:
    device_type = x.device.type

    def ctx():
        return torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if not train:
        def step():
            with torch.inference_mode(), ctx():
                model(x)
        return step

    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with ctx():
            loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> List[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    rows = []
    for train in {"infer": [False], "train": [True], "both": [False, True]}[args.mode]:
        for compiled in ([False, True] if args.compile == "both" else [args.compile == "yes"]):
            steps: Dict[str, Callable[[], None]] = {}
            for name in args.models:
                torch.manual_seed(0)
                model = build(name).to(device=device, memory_format=fmt).train(train)
                if compiled:
                    model = torch.compile(model, mode=args.compile_mode, backend=args.compile_backend)
                steps[name] = make_step(model, x, target, train, amp_dtype)
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    steps[name]()
                sync(device)
                print(f"# warm-up {name} {'train' if train else 'infer'} "
                      f"{'compiled' if compiled else 'eager'}: {time.perf_counter() - t0:.1f} s", flush=True)
            times = interleaved_rounds(steps, args.rounds, args.iters, sync=lambda: sync(device))
            base, body = times.get("resnet50"), times.get("gczoo_body")
            for name, ts in times.items():
                to_body = ratio_stats(ts, body)["ratio"]
                rows.append(dict(mode="train" if train else "infer", compiled=compiled, model=name,
                                 ms=1e3 * statistics.median(ts), to_body=to_body, **ratio_stats(ts, base)))
            steps.clear()
    return rows


def environment(args) -> str:
    lines = environment_lines(args.device)
    lines[1] += f", timm {timm.__version__}"
    lines.insert(2, f"batch {args.batch}, {args.size}x{args.size}, {'channels_last' if args.channels_last else 'NCHW'}, "
                    f"amp {args.amp}, rounds {args.rounds} x {args.iters} iters, warm-up {args.warmup}, "
                    f"compile mode {args.compile_mode if args.compile != 'no' else '-'}"
                    f"{'' if args.compile == 'no' or args.compile_backend == 'inductor' else ', backend ' + args.compile_backend}")
    return "\n".join(lines + [load_line()])


def table(rows: List[dict]) -> str:
    lines = ["| mode | graph | model | median ms | ratio to resnet50 (median) | ratio 25-75% | ratio to gczoo_body (median) |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {'compiled' if r['compiled'] else 'eager'} | {r['model']} | "
                     f"{r['ms']:.1f} | {r['ratio']:.3f} | {r['q25']:.3f}-{r['q75']:.3f} | {r['to_body']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype")
    p.add_argument("--mode", choices=("infer", "train", "both"), default="infer")
    p.add_argument("--compile", choices=("no", "yes", "both"), default="no", help="torch.compile the models")
    p.add_argument("--compile-mode", default="default", help='e.g. "reduce-overhead" (CUDA graphs)')
    p.add_argument("--compile-backend", default="inductor", help='torch.compile backend ("eager": smoke runs)')
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--iters", type=int, default=1, help="steps per model per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = p.parse_args(argv)
    if "resnet50" not in args.models:
        args.models.insert(0, "resnet50")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False on this machine")
    rows = run(args)
    print("\ncommand: python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    print(environment(args))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
