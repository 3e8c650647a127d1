"""What every family benchmark shares: interleaved timing rounds, ratio statistics, the
environment header printed above each table, and worker processes with their memory readings.

The rounds follow the issue's protocol: each round runs every contender once, in an order
rotated by one per round, so a shared machine's slow drifts hit all of them alike; ratios are
taken per round and summarised by their median and 25-75% spread.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
#: The variable naming the folder of upstream's reference runners, the default of every bench's
#: ``--oracle-dir``: ``mmdet_ckpt.py`` and ``mmdet_oracle/`` (mmdetection 3.3.0), ``mmseg_oracle/``
#: (mmsegmentation 1.2.2), each running upstream's own configs and code on CPU. Unset: zoo rows only.
ORACLES_ENV = "GCZOO_ORACLES"
ORACLES_HELP = (f"folder of upstream's reference runners (mmdet_ckpt.py, mmdet_oracle/, mmseg_oracle/; default: "
                f"${ORACLES_ENV}); without them the zoo is timed alone, and the output says so")


def oracles_dir() -> Optional[Path]:
    """``$GCZOO_ORACLES`` as a path, or ``None`` when it is unset."""
    value = os.environ.get(ORACLES_ENV)
    return Path(value) if value else None
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def interleaved_rounds(steps: Dict[str, Callable[[], None]], rounds: int, iters: int = 1,
                       sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Seconds per step of each contender, one list entry per round (rotating order)."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / iters)
    return times


def ratio_stats(times: Sequence[float], base: Optional[Sequence[float]]) -> dict:
    """Median and 25-75% quartiles of the per-round ratios ``times / base`` (NaN without base)."""
    if not base:
        nan = float("nan")
        return dict(ratio=nan, q25=nan, q75=nan)
    ratios = [t / b for t, b in zip(times, base)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return dict(ratio=statistics.median(ratios), q25=q[0], q75=q[2])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_lines(device: str) -> List[str]:
    """Device, library versions, malloc settings and load: the lines above every table."""
    import torchvision
    import gczoo

    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name(torch.device(device))
    else:
        dev = cpu_name()
    malloc = ", ".join(f"{v}={os.environ[v]}" for v in MALLOC_VARS if v in os.environ) or "unset"
    return [
        f"device: {device} ({dev}); logical CPUs: {os.cpu_count()}; torch threads: {torch.get_num_threads()}",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"gczoo {gczoo.__version__}, python {platform.python_version()}",
        f"glibc malloc env: {malloc}",
    ]


def load_line() -> str:
    return f"load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}"


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``; Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs``, Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Worker:
    """A benchmark worker process (possibly in another venv, e.g. an oracle's) speaking JSON
    lines: one request object in, one reply object out; its first line is its ready reply."""

    def __init__(self, python: str, script: Path, args: List[str]):
        self.cmd = [str(python), str(script), *args]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker exited with {self.proc.wait()} (its stderr is above): {shlex.join(self.cmd)}")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
