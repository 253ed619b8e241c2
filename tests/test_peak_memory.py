"""``benchmarks/bench_stages.py --peak-memory``: four images at the pixel limit stay within the bound.

The most elongated accepted shape (16:1) is the worst case: its detector copy is the
largest the pipeline makes. Run in a fresh process, so that the peak is this request's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# docs/inputs.md, "How pixels are read": the documented bound on the request's own growth above
# the warm worker on the CPU. Measured with the retained heap off (CODEFORMER_RETAINED_MEMORY_MB=0):
# with it on, the growth also holds freed memory glibc keeps for reuse, up to that setting, and
# how much of it is already resident before the request varies from run to run (2.5 to 5.2 GB
# measured), which would make the figure a measure of the allocator's history
DOCUMENTED_PEAK_GROWTH_MIB = 3 * 1024


@pytest.mark.process
def test_four_images_at_the_limit_stay_within_the_documented_peak(
    faceless_weights_dir: Path, tmp_path: Path
) -> None:
    script = PROJECT_ROOT / "benchmarks" / "bench_stages.py"
    output = tmp_path / "peak.json"
    command = [sys.executable, str(script), "--peak-memory", f"--weights-dir={faceless_weights_dir}"]
    command += ["--output", str(output)]
    env = {**os.environ, "CODEFORMER_RETAINED_MEMORY_MB": "0"}
    completed = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert json.loads(output.read_text()) == report
    assert report["images"] == 4 and report["image_size"] == [25296, 1581]
    assert report["image_size"][0] * report["image_size"][1] <= report["max_pixels"]
    assert 0 < report["peak_growth_mib"] < DOCUMENTED_PEAK_GROWTH_MIB, report
