"""bench/train.py end to end without the oracles: it says so and times the zoo's training
iterations alone (a one-block-per-stage detector with small samplers, a tiny segmentation batch)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_bench_without_oracles_times_the_zoo_alone_and_says_so(tmp_path):
    tiny = ('{"layers": [1, 1, 1, 1], "rpn_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 50, '
            '"box_batch_size_per_image": 32}')
    missing = tmp_path / "no-oracle"
    cmd = [sys.executable, str(ROOT / "bench" / "train.py"), "--oracle-dir", str(missing), "--det-size", "48x64",
           "--det-batch", "1", "--seg-size", "32", "48", "--seg-batch", "2", "--rounds", "1", "--warmup", "0",
           "--threads", "1", "--workdir", str(tmp_path / "work"), "--zoo-kwargs", tiny]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)  # generous: a loaded 2-core machine
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert f"detection: mmdetection 3.3.0 oracle NOT FOUND under {missing}: zoo rows only" in out
    assert f"segmentation: mmsegmentation 1.2.2 oracle NOT FOUND under {missing}: zoo rows only" in out
    assert "torch threads:" in out and "load average at end:" in out
    rows = {}
    for line in out.splitlines():
        if line.startswith("| detection |") or line.startswith("| segmentation |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    assert rows["detection"][1:3] == ["maskrcnn_resnet50_fpn_gc_r16", "1x48x64"]
    assert rows["segmentation"][1:3] == ["gcnet_resnet50_d8 (+aux head)", "2x32x48"]
    for cells in rows.values():
        assert float(cells[3]) > 0 and cells[4] == cells[5] == cells[6] == cells[8] == "-"  # no upstream columns
        assert re.fullmatch(r"\d+ \(\d+\)", cells[7]), cells[7]  # peak +MiB (loaded MiB)
    assert not list((tmp_path / "work").glob("*maskrcnn*.pth"))  # no detection checkpoint without the oracle
