"""bench/segmentation.py end to end without the mmsegmentation oracle: the zoo's rows alone, said so."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_segmentation_bench_without_oracle_times_the_zoo_alone(tmp_path):
    missing = tmp_path / "no-oracle-here"
    cmd = [sys.executable, str(ROOT / "bench" / "segmentation.py"), "--oracle-dir", str(missing),
           "--whole-size", "32", "64", "--slide-size", "33", "90", "--crop", "33", "--stride", "24",
           "--rounds", "1", "--warmup", "0", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # generous: a loaded 2-core machine
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert f"mmsegmentation oracle: ABSENT (no mmseg_oracle/run.py at {missing}); zoo rows only" in lines
    assert any(line.startswith("device: cpu") for line in lines) and any(line.startswith("load average") for line in lines)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| whole")
            or line.startswith("| slide")]
    # windows at x = 0, 24, 48 and 57 of a 90-wide input, crop 33, stride 24 (the last one moved back to end at 90)
    assert [r[:4] for r in rows] == [["whole", "gcnet_r50_d8", "32x64", "1"], ["slide", "gcnet_r50_d8", "33x90", "4"]]
    for r in rows:
        float(r[4]), float(r[9])  # zoo time and peak memory are numbers
        assert r[5] == r[6] == r[7] == r[8] == r[10] == r[11] == "-"  # no mmsegmentation columns without the oracle
