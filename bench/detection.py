"""Detection latency and peak memory of the zoo against mmdetection 3.3.0 on the same weights
and image, one image at a time on CPU.

For each row the script makes a synthetic checkpoint in mmdetection's layout (the oracle's
``mmdet_ckpt.py``) and starts two persistent workers (``bench/detection_worker.py``): the zoo's
model in this Python, mmdetection's own model in the oracle's venv, both loading that same
file once. For each image size (the oracle's deterministic synthetic image, ``synth_image.py``)
each side gets ``--warmup`` untimed requests, then ``--rounds`` interleaved rounds (alternating,
rotated order: ``bench.common.interleaved_rounds``) of one single-image request each. A run is
timed inside its worker: from the uint8 image array to final boxes, scores, labels and binary
masks at the original image size (resize, normalisation, padding, network, post-processing,
mask pasting; see ``detection_worker.py``). The ratio is the median of the per-round ratios
zoo / mmdetection, with its 25-75% range. Peak memory: the peak RSS during a run over the
worker's RSS once its model was loaded (largest over the timed runs), and that loaded RSS.

Without the oracle (``--oracle-dir`` / ``--oracle-python`` missing) the script says so and times
the zoo alone, on random weights (no checkpoint maker) and a random image.

    python bench/detection.py                      # the three rows at 800x1216 and 480x640
    python bench/detection.py --rows maskrcnn_resnet50_fpn_gc_r16 --sizes 480x640 --rounds 5
    python bench/detection.py --device cuda        # both sides on the GPU (bench/gpu.sh part D)

On CUDA the memory columns are CUDA memory (peak allocated during one inference over what
the loaded model holds) instead of RSS.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (ORACLES_ENV, ORACLES_HELP, Worker, environment_lines, interleaved_rounds, load_line,  # noqa: E402
                          oracles_dir, ratio_stats)
from bench.detection_worker import ROWS  # noqa: E402

DEFAULT_ROWS = ("maskrcnn_resnet50_fpn_gc_r16", "cascade_maskrcnn_resnext101_32x4d_fpn",
                "cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r16")
WORKER = Path(__file__).resolve().with_name("detection_worker.py")


def make_checkpoint(oracle_dir: Path, row: str, workdir: Path) -> Path:
    arch, gc, cascade, dcn = ROWS[row]
    path = workdir / f"{row}.pth"
    if not path.exists():
        flags = ["--cascade"] * cascade + ["--dcn"] * dcn
        subprocess.run([sys.executable, str(oracle_dir / "mmdet_ckpt.py"), "--arch", arch, "--gc", gc, *flags,
                        "--out", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


def make_image(oracle_dir: Optional[Path], h: int, w: int, workdir: Path) -> Path:
    """The oracle's synthetic test image at ``h x w`` (a random one without the oracle), as uint8 RGB .npy."""
    path = workdir / f"image_{h}x{w}.npy"
    if oracle_dir is not None:
        sys.path.insert(0, str(oracle_dir / "mmdet_oracle"))
        from synth_image import make

        rgb = make(h, w).permute(1, 2, 0).numpy()
    else:
        rgb = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    np.save(path, np.ascontiguousarray(rgb))
    return path


def parse_size(text: str):
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=sorted(ROWS))
    ap.add_argument("--sizes", nargs="+", default=["800x1216", "480x640"], help="image sizes HxW")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--oracle-dir", type=Path, default=oracles_dir(), help=ORACLES_HELP)
    ap.add_argument("--oracle-python", default="/tmp/mmdet-oracle/venv/bin/python", help="the mmdetection oracle's venv")
    ap.add_argument("--workdir", help="where checkpoints and images go (reused if there; default: a temporary dir)")
    ap.add_argument("--zoo-kwargs", default="{}", help="JSON build arguments for the zoo model; zoo-only smoke runs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where both sides run")
    a = ap.parse_args(argv)

    oracle_dir = a.oracle_dir
    have_oracle = oracle_dir is not None and (oracle_dir / "mmdet_ckpt.py").is_file() and (oracle_dir / "mmdet_oracle" / "run.py").is_file() \
        and Path(a.oracle_python).is_file()
    if have_oracle and json.loads(a.zoo_kwargs):
        ap.error("--zoo-kwargs changes the zoo's model; it is for zoo-only runs (give a missing --oracle-dir)")
    tmp = tempfile.TemporaryDirectory(prefix="gczoo-bench-det-") if a.workdir is None else None
    workdir = Path(a.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)

    cuda = torch.device(a.device).type == "cuda"
    lines = [f"# gczoo detection vs mmdetection 3.3.0, one image per request, {a.device} fp32", *environment_lines(a.device)]
    if have_oracle:
        lines.append(f"oracle: {oracle_dir} with {a.oracle_python}; synthetic checkpoints from mmdet_ckpt.py, "
                     "image from mmdet_oracle/synth_image.py")
    else:
        lines.append(f"oracle: NOT FOUND ({oracle_dir or '$' + ORACLES_ENV}/mmdet_ckpt.py, mmdet_oracle/run.py, "
                     f"{a.oracle_python}): "
                     "zoo rows only, random weights and a random image; no ratios")
    lines.append(f"rounds: {a.rounds} interleaved (after {a.warmup} warm-up per side and size); "
                 "timed in each worker from the uint8 image array to final boxes/scores/labels/binary masks at the "
                 "original size (preprocessing and mask pasting included)")
    memory = "CUDA memory allocated" if cuda else "RSS"
    lines.append(f"peak {memory}: +MiB = peak {memory} during one inference over the worker's {memory} with the model "
                 f"loaded (largest over the timed runs); loaded = that {memory}")
    print("\n".join(lines), flush=True)

    table = ["| model | image | zoo s | mmdet s | zoo / mmdet (25-75%) | zoo peak +MiB (loaded) | "
             "mmdet peak +MiB (loaded) | detections zoo / mmdet |", "|---|---|---|---|---|---|---|---|"]
    sizes = [parse_size(s) for s in a.sizes]
    images = {hw: make_image(oracle_dir if have_oracle else None, *hw, workdir) for hw in sizes}
    try:
        for row in a.rows:
            workers: Dict[str, Worker] = {}
            try:
                if have_oracle:
                    ckpt = make_checkpoint(oracle_dir, row, workdir)
                    workers["zoo"] = Worker(sys.executable, WORKER, ["zoo", "--row", row, "--checkpoint", str(ckpt),
                                                                     "--device", a.device])
                    workers["mmdet"] = Worker(a.oracle_python, WORKER, ["mmdet", "--row", row, "--checkpoint", str(ckpt),
                                                                "--oracle-dir", str(oracle_dir), "--device", a.device])
                    print(f"versions: zoo {workers['zoo'].ready['versions']}; mmdet {workers['mmdet'].ready['versions']}",
                          flush=True)
                else:
                    workers["zoo"] = Worker(sys.executable, WORKER, ["zoo", "--row", row, "--zoo-kwargs", a.zoo_kwargs,
                                                                     "--device", a.device])
                for (h, w), image in images.items():
                    replies: Dict[str, List[dict]] = {name: [] for name in workers}
                    for worker in workers.values():
                        worker.ask(image=str(image))
                        for _ in range(a.warmup):
                            worker.ask(run=str(image))

                    def step(name):
                        return lambda: replies[name].append(workers[name].ask(run=str(image)))

                    interleaved_rounds({name: step(name) for name in workers}, a.rounds)
                    secs = {name: [r["seconds"] for r in rs] for name, rs in replies.items()}
                    stats = ratio_stats(secs["zoo"], secs.get("mmdet"))

                    def cell(name, key):
                        if name not in replies:
                            return "-"
                        rs = replies[name]
                        if key == "seconds":
                            return f"{statistics.median(secs[name]):.2f}"
                        if key == "mem":
                            if min(r["peak_mib"] for r in rs) < 0:
                                return "n/a"
                            return (f"{max(r['peak_mib'] - r['loaded_mib'] for r in rs):.0f} "
                                    f"({rs[0]['loaded_mib']:.0f})")
                        return "/".join(sorted({str(r["detections"]) for r in rs}))

                    ratio = "-" if "mmdet" not in replies else f"{stats['ratio']:.3f} ({stats['q25']:.3f}-{stats['q75']:.3f})"
                    table.append(f"| {row} | {h}x{w} | {cell('zoo', 'seconds')} | {cell('mmdet', 'seconds')} | {ratio} | "
                                 f"{cell('zoo', 'mem')} | {cell('mmdet', 'mem')} | {cell('zoo', 'n')} / {cell('mmdet', 'n')} |")
                    print(table[-1], flush=True)
            finally:
                for worker in workers.values():
                    worker.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("\n" + "\n".join(table))
    print(load_line())


if __name__ == "__main__":
    main()
