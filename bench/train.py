"""Training-iteration time and peak memory of the zoo against mmdetection 3.3.0 and
mmsegmentation 1.2.2 on the same config, weights, batch and image size, on CPU.

One timed step is one training iteration in train mode: forward with the losses, backward and
an SGD step (the configs' momentum and weight decay). The workers are the inference
benchmarks' own, started with ``--train`` (``bench/detection_worker.py``,
``bench/segmentation_worker.py``; their docstrings say what each side runs): the zoo in this
Python, the upstream library in its oracle's venv, both loading the same synthetic checkpoint in
the upstream layout (detection: the oracle's ``mmdet_ckpt.py``; segmentation:
``tests/mmseg_layout.py``) and holding the same batch (deterministic textured images with
objects / label maps written here). Images are at the training size already (mmdetection's and
mmsegmentation's resize and crop run in their data pipelines, outside the model; the zoo's
detector is built with ``min_size`` / ``max_size`` at the image size, so its own resize is the
identity). After ``--warmup`` untimed iterations per side, ``--rounds`` interleaved rounds
(rotating order, ``bench.common.interleaved_rounds``) of one iteration each; the ratio is the
median of the per-round ratios zoo / upstream (25-75% range beside it), of wall time and of
the workers' own process CPU time (less sensitive to other tenants of a shared machine). Peak memory: the
largest resident set a training iteration reached over the worker's resident set once the
model was loaded (gradients and momentum buffers included).

Without an oracle the script says so and times the zoo alone (detection on random weights).

    python bench/train.py                                     # Mask R-CNN R50 r16 2x480x640; GCNet R50-D8 2x256x512
    python bench/train.py --families segmentation --seg-size 512 1024 --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (ORACLES_ENV, ORACLES_HELP, Worker, environment_lines, interleaved_rounds, load_line,  # noqa: E402
                          oracles_dir, ratio_stats)
from bench.detection import make_checkpoint, parse_size  # noqa: E402
from bench.detection_worker import ROWS  # noqa: E402
from bench.segmentation import synthetic_input  # noqa: E402
from bench.segmentation_worker import MEAN, STD  # noqa: E402

DET_WORKER = ROOT / "bench" / "detection_worker.py"
SEG_WORKER = ROOT / "bench" / "segmentation_worker.py"


def detection_batch(h: int, w: int, batch: int, objects: int = 5, seed: int = 0) -> dict:
    """``batch`` textured uint8 RGB images with ``objects`` boxes each, elliptic masks, labels 0..79."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    for _ in range(batch):
        coarse = torch.rand((1, 3, h // 16 + 1, w // 16 + 1), generator=gen)
        image = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0] * 235
        size = (0.1 + 0.5 * torch.rand((objects, 2), generator=gen)) * torch.tensor([w, h])
        corner = torch.rand((objects, 2), generator=gen) * (torch.tensor([w, h]) - size)
        boxes = torch.cat([corner, corner + size], 1).round()
        centre, radius = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        masks = ((xs - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 \
            + ((ys - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2 <= 1
        image = image + 20 * masks.any(0)
        images.append((image + 10 * torch.rand((3, h, w), generator=gen)).clamp(0, 255).to(torch.uint8))
        targets.append({"boxes": boxes, "labels": torch.randint(0, 80, (objects,), generator=gen), "masks": masks})
    return {"images": images, "targets": targets}


def segmentation_batch(h: int, w: int, batch: int, num_classes: int = 19) -> dict:
    """``batch`` uint8 RGB images (``bench.segmentation.synthetic_input``) and label maps of ``num_classes``
    colour-quantised regions, with 255 (ignored) on a border strip."""
    images, labels = [], []
    for seed in range(batch):
        x = synthetic_input(h, w, seed)[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        image = x.round().clamp(0, 255).to(torch.uint8)
        label = (image.float().mean(0) / 256 * num_classes).long().clamp(0, num_classes - 1).to(torch.uint8)
        label[:, : max(w // 32, 1)] = 255
        images.append(image)
        labels.append(label)
    return {"images": torch.stack(images), "labels": torch.stack(labels)}


def _run(workers: Dict[str, Worker], request: dict, warmup: int, rounds: int) -> Dict[str, List[dict]]:
    replies: Dict[str, List[dict]] = {name: [] for name in workers}
    for worker in workers.values():
        for _ in range(warmup):
            worker.ask(**request)

    def step(name):
        return lambda: replies[name].append(workers[name].ask(**request))
    interleaved_rounds({name: step(name) for name in workers}, rounds)
    return replies


def _row(family: str, model: str, shape: str, replies: Dict[str, List[dict]], memory: Dict[str, str]) -> str:
    """A table row: median seconds, the median per-round ratios of wall and process CPU time, memory."""
    cells = []
    for key in ("seconds", "cpu_seconds"):
        zoo = [r[key] for r in replies["zoo"]]
        upstream = [r[key] for r in replies["upstream"]] if "upstream" in replies else None
        stats = ratio_stats(zoo, upstream)
        if key == "seconds":
            cells += [f"{statistics.median(zoo):.2f}", "-" if upstream is None else f"{statistics.median(upstream):.2f}"]
        cells.append("-" if upstream is None else f"{stats['ratio']:.3f} ({stats['q25']:.3f}-{stats['q75']:.3f})")
    return f"| {family} | {model} | {shape} | {' | '.join(cells)} | {memory['zoo']} | {memory.get('upstream', '-')} |"


def bench_detection(a, workdir: Path, have_oracle: bool) -> str:
    h, w = parse_size(a.det_size)
    batch_path = workdir / f"det_batch_{a.det_batch}x{h}x{w}.pt"
    torch.save(detection_batch(h, w, a.det_batch), batch_path)
    zoo_kwargs = dict(json.loads(a.zoo_kwargs), min_size=min(h, w), max_size=max(h, w))
    workers: Dict[str, Worker] = {}
    try:
        common = ["--row", a.det_row, "--train"]
        if have_oracle:
            ckpt = str(make_checkpoint(a.oracle_dir, a.det_row, workdir))
            workers["zoo"] = Worker(sys.executable, DET_WORKER, ["zoo", *common, "--checkpoint", ckpt,
                                                                 "--zoo-kwargs", json.dumps(zoo_kwargs)])
            workers["upstream"] = Worker(a.mmdet_python, DET_WORKER, ["mmdet", *common, "--checkpoint", ckpt,
                                                                      "--oracle-dir", str(a.oracle_dir)])
        else:
            workers["zoo"] = Worker(sys.executable, DET_WORKER, ["zoo", *common, "--zoo-kwargs", json.dumps(zoo_kwargs)])
        for worker in workers.values():
            worker.ask(image=str(batch_path))
        replies = _run(workers, {"run": str(batch_path)}, a.warmup, a.rounds)
    finally:
        for worker in workers.values():
            worker.close()
    memory = {name: "n/a" if min(r["peak_mib"] for r in rs) < 0 else
              f"{max(r['peak_mib'] - r['loaded_mib'] for r in rs):.0f} ({rs[0]['loaded_mib']:.0f})"
              for name, rs in replies.items()}
    return _row("detection", a.det_row, f"{a.det_batch}x{h}x{w}", replies, memory)


def bench_segmentation(a, workdir: Path, have_oracle: bool) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from mmseg_layout import mmseg_state_dict, write_checkpoint

    h, w = a.seg_size
    ckpt = write_checkpoint(workdir / "gcnet_r50_d8.pth", mmseg_state_dict("gc", 50, 19))
    batch_path = workdir / f"seg_batch_{a.seg_batch}x{h}x{w}.pt"
    torch.save(segmentation_batch(h, w, a.seg_batch), batch_path)
    common = ["--model", "gcnet", "--mode", "whole", "--checkpoint", str(ckpt), "--input", str(batch_path), "--train",
              "--threads", str(a.threads)]
    workers: Dict[str, Worker] = {}
    try:
        workers["zoo"] = Worker(sys.executable, SEG_WORKER, ["--side", "zoo", *common])
        if have_oracle:
            workers["upstream"] = Worker(a.mmseg_python, SEG_WORKER, ["--side", "mmseg", "--oracle-dir",
                                                                      str(a.oracle_dir / "mmseg_oracle"), *common])
        replies = _run(workers, {"cmd": "run"}, a.warmup, a.rounds)
        memory = {name: f"{wk.ask(cmd='memory')['peak_rss_increase_mib']:.0f} ({wk.ask(cmd='memory')['rss_loaded_mib']:.0f})"
                  for name, wk in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    return _row("segmentation", "gcnet_resnet50_d8 (+aux head)", f"{a.seg_batch}x{h}x{w}", replies, memory)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["detection", "segmentation"], choices=["detection", "segmentation"])
    ap.add_argument("--det-row", default="maskrcnn_resnet50_fpn_gc_r16", choices=sorted(ROWS))
    ap.add_argument("--det-size", default="480x640", help="detection image size HxW (the training size)")
    ap.add_argument("--det-batch", type=int, default=2)
    ap.add_argument("--seg-size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"),
                    help="segmentation crop size (the configs train on 512 1024)")
    ap.add_argument("--seg-batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the segmentation workers")
    ap.add_argument("--oracle-dir", type=Path, default=oracles_dir(), help=ORACLES_HELP)
    ap.add_argument("--mmdet-python", default="/tmp/mmdet-oracle/venv/bin/python")
    ap.add_argument("--mmseg-python", default="/tmp/mmseg-oracle/venv/bin/python")
    ap.add_argument("--workdir", help="where checkpoints and batches go (default: a temporary dir)")
    ap.add_argument("--zoo-kwargs", default="{}", help="JSON build arguments for the zoo detector; zoo-only smoke runs")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    oracle_dir = a.oracle_dir
    have = {"detection": oracle_dir is not None and (oracle_dir / "mmdet_ckpt.py").is_file() and (oracle_dir / "mmdet_oracle" / "run.py").is_file()
            and Path(a.mmdet_python).is_file(),
            "segmentation": oracle_dir is not None and (oracle_dir / "mmseg_oracle" / "run.py").is_file() and Path(a.mmseg_python).is_file()}
    if have["detection"] and json.loads(a.zoo_kwargs) and "detection" in a.families:
        ap.error("--zoo-kwargs changes the zoo's model; it is for zoo-only runs (give a missing --oracle-dir)")

    print("command: python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("\n".join(environment_lines("cpu")))
    for family, upstream in (("detection", "mmdetection 3.3.0"), ("segmentation", "mmsegmentation 1.2.2")):
        if family in a.families:
            print(f"{family}: " + (f"{upstream} oracle at {oracle_dir} ({a.mmdet_python if family == 'detection' else a.mmseg_python})"
                                   if have[family] else f"{upstream} oracle NOT FOUND under {oracle_dir or '$' + ORACLES_ENV}: zoo rows only"))
    print(f"rounds: {a.rounds} interleaved (after {a.warmup} warm-up per side); one step = forward with losses, "
          "backward, SGD step (fp32, train mode)")
    print("peak RSS: +MiB = the largest RSS a training iteration reached over the worker's RSS with the model loaded "
          "(loaded = that RSS)", flush=True)
    table = ["| family | model | batch x image | zoo s/iter | upstream s/iter | zoo / upstream (25-75%) | "
             "CPU time zoo / upstream (25-75%) | zoo peak +MiB (loaded) | upstream peak +MiB (loaded) |",
             "|---|---|---|---|---|---|---|---|---|"]
    benches = {"detection": bench_detection, "segmentation": bench_segmentation}
    with (tempfile.TemporaryDirectory(prefix="gczoo-bench-train-") if a.workdir is None
          else contextlib.nullcontext(a.workdir)) as workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        for family in a.families:
            table.append(benches[family](a, Path(workdir), have[family]))
            print(table[-1], flush=True)
    print("\n" + "\n".join(table) + "\n" + load_line())

if __name__ == "__main__":
    main()
