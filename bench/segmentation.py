"""GCNet R50-D8 segmentation: the zoo's inference against mmsegmentation 1.2.2's own.

One command builds everything it needs in a temporary folder -- an mmsegmentation-layout
checkpoint (``tests/mmseg_layout.py``, the file the parity tests use; mmsegmentation loads it
strictly) and a deterministic normalised input -- then, per mode (whole image, sliding window)
and model, starts two persistent workers (``bench/segmentation_worker.py``): the zoo in this
venv and, when the mmsegmentation oracle is installed (``mmseg_oracle/`` in ``$GCZOO_ORACLES`` and
its venv, ``/tmp/mmseg-oracle/venv`` or ``$MMSEG_ORACLE_ROOT/venv``), mmsegmentation in the
oracle's venv. Both load the same checkpoint once and answer "run" requests in interleaved
rounds (rotating order). One timed step is one inference from the normalised ``(1, 3, H, W)``
tensor to the logits ``(1, 19, H, W)`` at input size (no pre-processing, no argmax), measured
by this process around the request (a pipe round trip, microseconds, is included on both sides).
The ratio column is the median of the per-round ratios of these wall times; the CPU-time ratio
(the workers' own process CPU seconds per inference) is printed beside it, being less sensitive
to other tenants of a shared machine.

Without the oracle the table has the zoo's rows alone, and says so.

Examples (see bench/RESULTS.md)::

    python bench/segmentation.py                    # whole 256x512; slide 257x641, crop 257, stride 171
    python bench/segmentation.py --full --rounds 5  # whole 512x1024; slide 769x1283, crop 769, stride 513
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Worker, environment_lines, interleaved_rounds, load_line, oracles_dir, ratio_stats  # noqa: E402
from bench.segmentation_worker import MEAN, STD  # noqa: E402
from gczoo.models.segmentation import sliding_windows  # noqa: E402

WORKER = ROOT / "bench" / "segmentation_worker.py"
HEADS = {"gcnet": "gc", "nonlocal": "nl"}


def default_oracle_dir() -> Optional[Path]:
    """``mmseg_oracle/`` in ``$GCZOO_ORACLES`` (:data:`bench.common.ORACLES_ENV`), or ``None``."""
    oracles = oracles_dir()
    return None if oracles is None else oracles / "mmseg_oracle"


def default_oracle_python() -> Path:
    return Path(os.environ.get("MMSEG_ORACLE_ROOT", "/tmp/mmseg-oracle")) / "venv" / "bin" / "python"


def synthetic_input(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A deterministic RGB image (smooth colour fields plus pixel noise), normalised as mmsegmentation does."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(height // 32, 1), max(width // 32, 1), generator=gen) * 255
    img = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    img = (img + 20 * torch.randn(img.shape, generator=gen)).round().clamp(0, 255)
    return ((img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).contiguous()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["whole", "slide"], choices=["whole", "slide"])
    ap.add_argument("--models", nargs="+", default=["gcnet"], choices=sorted(HEADS))
    ap.add_argument("--whole-size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    ap.add_argument("--slide-size", type=int, nargs=2, default=(257, 641), metavar=("H", "W"))
    ap.add_argument("--crop", type=int, default=257, help="sliding-window crop (square)")
    ap.add_argument("--stride", type=int, default=171, help="sliding-window stride")
    ap.add_argument("--full", action="store_true",
                    help="the configs' own sizes: whole 512x1024; slide 769x1283, crop 769, stride 513 (3 windows)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--oracle-dir", type=Path, default=default_oracle_dir(),
                    help="the mmseg_oracle folder (run.py; default: mmseg_oracle/ in $GCZOO_ORACLES)")
    ap.add_argument("--oracle-python", type=Path, default=default_oracle_python())
    ap.add_argument("--no-oracle", action="store_true", help="time the zoo alone")
    a = ap.parse_args(argv)
    if a.full:
        a.whole_size, a.slide_size, a.crop, a.stride = (512, 1024), (769, 1283), 769, 513
    torch.set_num_threads(a.threads)

    if a.no_oracle:
        oracle, oracle_line = False, "mmsegmentation oracle: not used (--no-oracle); zoo rows only"
    elif a.oracle_dir is None or not (a.oracle_dir / "run.py").is_file():
        oracle, oracle_line = False, (f"mmsegmentation oracle: ABSENT (no mmseg_oracle/run.py at {a.oracle_dir}); "
                                      "zoo rows only")
    elif not a.oracle_python.is_file():
        oracle, oracle_line = False, (f"mmsegmentation oracle: ABSENT (no venv python {a.oracle_python}; run "
                                      f"{a.oracle_dir}/setup.sh); zoo rows only")
    else:
        oracle, oracle_line = True, f"mmsegmentation oracle: {a.oracle_python} with {a.oracle_dir}"

    sys.path.insert(0, str(ROOT / "tests"))
    from mmseg_layout import mmseg_state_dict, write_checkpoint

    rows = []
    header = None
    with tempfile.TemporaryDirectory(prefix="gczoo-segbench-") as tmp:
        for model in a.models:
            checkpoint = write_checkpoint(Path(tmp) / f"{model}.pth", mmseg_state_dict(HEADS[model], 50, 19))
            for mode in a.modes:
                h, w = a.whole_size if mode == "whole" else a.slide_size
                x_path = Path(tmp) / f"x_{h}x{w}.pt"
                torch.save(synthetic_input(h, w), x_path)
                common = ["--model", model, "--mode", mode, "--checkpoint", str(checkpoint), "--input", str(x_path),
                          "--crop", str(a.crop), str(a.crop), "--stride", str(a.stride), str(a.stride),
                          "--threads", str(a.threads)]
                windows = len(sliding_windows(h, w, (a.crop,) * 2, (a.stride,) * 2)) if mode == "slide" else 1
                workers: Dict[str, Worker] = {"zoo": Worker(sys.executable, WORKER, ["--side", "zoo"] + common)}
                try:
                    if oracle:
                        workers["mmseg"] = Worker(a.oracle_python, WORKER, ["--side", "mmseg", "--oracle-dir",
                                                                          str(a.oracle_dir)] + common)
                        header = header or workers["mmseg"].ready.get("versions")
                    for _ in range(a.warmup):
                        for wk in workers.values():
                            wk.ask(cmd="run")
                    cpu: Dict[str, List[float]] = {k: [] for k in workers}
                    times = interleaved_rounds({k: (lambda k=k, wk=wk: cpu[k].append(wk.ask(cmd="run")["cpu_seconds"]))
                                                for k, wk in workers.items()}, rounds=a.rounds)
                    memory = {k: wk.ask(cmd="memory")["peak_rss_increase_mib"] for k, wk in workers.items()}
                    diff = float("nan")
                    if oracle:
                        outs = {}
                        for k, wk in workers.items():
                            wk.ask(cmd="save", path=f"{tmp}/{k}.pt")
                            outs[k] = torch.load(f"{tmp}/{k}.pt", weights_only=True)
                        diff = (outs["zoo"] - outs["mmseg"]).abs().max().item() / outs["mmseg"].abs().max().item()
                finally:
                    for wk in workers.values():
                        wk.close()
                stats = ratio_stats(times["zoo"], times.get("mmseg"))
                rows.append(dict(mode=mode, model=model, size=f"{h}x{w}", windows=windows,
                                 zoo=statistics.median(times["zoo"]),
                                 mmseg=statistics.median(times["mmseg"]) if oracle else None,
                                 zoo_mem=memory["zoo"], mmseg_mem=memory.get("mmseg"), diff=diff,
                                 cpu_ratio=ratio_stats(cpu["zoo"], cpu.get("mmseg"))["ratio"], **stats))

    print("command: python bench/segmentation.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    for line in environment_lines("cpu"):
        print(line)
    print(oracle_line)
    if header:
        print("oracle side: " + ", ".join(f"{k} {v}" for k, v in header.items()))
    print(f"slide: crop {a.crop}x{a.crop}, stride {a.stride}; rounds {a.rounds} (interleaved, rotating order), "
          f"warm-up {a.warmup}; fp32, NCHW input, batch 1, torch.no_grad; one step = normalised input -> logits at input size")
    print("peak memory: VmHWM - VmRSS of each worker process, the RSS taken once model and input are loaded "
          "(peak reset after loading): the most memory inference added")
    print(load_line())
    print()
    print("| mode | model | input | windows | zoo median s | mmseg median s | zoo/mmseg (median) | ratio 25-75% "
          "| CPU-time ratio (median) | zoo peak RSS +MiB | mmseg peak RSS +MiB | max abs logit diff / max abs logit |")
    print("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        fmt = lambda v, spec: "-" if v is None or v != v else format(v, spec)  # noqa: E731 (None / NaN -> "-")
        spread = "-" if r["q25"] != r["q25"] else f"{r['q25']:.3f}-{r['q75']:.3f}"
        print(f"| {r['mode']} | {r['model']}_r50_d8 | {r['size']} | {r['windows']} | {r['zoo']:.2f} | "
              f"{fmt(r['mmseg'], '.2f')} | {fmt(r['ratio'], '.3f')} | {spread} | {fmt(r['cpu_ratio'], '.3f')} | {r['zoo_mem']:.0f} | "
              f"{fmt(r['mmseg_mem'], '.0f')} | {fmt(r['diff'], '.1e')} |")


if __name__ == "__main__":
    main()
