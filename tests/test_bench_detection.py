"""bench/detection.py end to end without the mmdetection oracle: it says so and times the zoo alone
(a one-block-per-stage model on a tiny image, through the real worker process)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_detection_bench_without_oracle_times_the_zoo_alone_and_says_so(tmp_path):
    tiny = '{"layers": [1, 1, 1, 1], "min_size": 48, "max_size": 64, "rpn_post_nms_top_n_test": 50}'
    cmd = [sys.executable, str(ROOT / "bench" / "detection.py"), "--oracle-dir", str(tmp_path / "no-oracle"),
           "--rows", "maskrcnn_resnet50_fpn_gc_r16", "--sizes", "40x56", "--rounds", "2", "--warmup", "0",
           "--workdir", str(tmp_path / "work"), "--zoo-kwargs", tiny]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "oracle: NOT FOUND" in out and "zoo rows only" in out
    assert "torch threads:" in out and "load average at end:" in out
    rows = [line for line in out.splitlines() if line.startswith("| maskrcnn_resnet50_fpn_gc_r16 | 40x56 |")]
    assert len(rows) == 2  # printed as measured, then in the final table
    cells = [c.strip() for c in rows[-1].strip("|").split("|")]
    _, _, zoo_s, mmdet_s, ratio, zoo_mem, mmdet_mem, detections = cells
    assert float(zoo_s) > 0 and mmdet_s == ratio == mmdet_mem == "-"
    assert re.fullmatch(r"\d+ \(\d+\)", zoo_mem), zoo_mem  # peak +MiB (loaded MiB)
    assert re.fullmatch(r"\d+(/\d+)* / -", detections), detections
    assert not list((tmp_path / "work").glob("*.pth"))  # no checkpoint maker without the oracle

