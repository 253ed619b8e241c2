"""``benchmarks/soak.py``: the request plan, and a tiny bounded run whose JSON report is checked.

The run starts its own server (seed-0 random weights from the ``weights_dir`` fixture) and
sends every bad kind once between good requests. No timing is asserted: only that every
answer was the one its kind states (the schema's 422, a failure naming the image, or Cog
dropping an unknown key) and that the report carries the fields the reliability issue asks for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codeformer.config import PROJECT_ROOT
from codeformer.tools.inputs import BAD_KINDS, soak_plan


def test_plan_mixes_good_faces_and_every_bad_kind_in_turn() -> None:
    kinds = soak_plan(requests_total=48, face_every=3, bad_every=4)
    assert len(kinds) == 48 and len(BAD_KINDS) <= 48 // 4
    bad = [kind for kind in kinds if kind not in ("flat", "faces")]
    assert bad[: len(BAD_KINDS)] == [kind.name for kind in BAD_KINDS]
    assert [index for index, kind in enumerate(kinds) if kind in bad] == list(range(3, 48, 4))
    assert kinds[2] == "faces" and kinds[11] != "faces"  # 12 is a bad turn: bad wins
    assert soak_plan(5, face_every=0, bad_every=0) == ["flat"] * 5


@pytest.mark.server
def test_a_tiny_soak_run_reports_outcomes_latency_and_worker_memory(
    weights_dir: Path, tmp_path: Path
) -> None:
    report_path = tmp_path / "soak.json"
    total = 2 * len(BAD_KINDS)  # every bad kind once, each after a flat request
    command = [
        sys.executable,
        str(PROJECT_ROOT / "benchmarks" / "soak.py"),
        f"--requests={total}",
        "--bad-every=2",
        "--face-every=0",
        "--warmup=1",
        "--sample-every=2",
        f"--weights-dir={weights_dir}",
        f"--output={report_path}",
        f"--server-log={tmp_path / 'server.log'}",
    ]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert json.loads(completed.stdout) == report

    assert report["config"]["requests"] == total
    assert report["config"]["worker_pid"] is not None
    assert report["failures"]["unexpected_count"] == 0, report["failures"]["unexpected"]
    assert report["failures"]["expected_by_kind"] == {kind.name: 1 for kind in BAD_KINDS if not kind.dropped}
    dropped = {kind.name: 1 for kind in BAD_KINDS if kind.dropped}
    assert dropped and report["successes_by_kind"] == {"flat": len(BAD_KINDS), **dropped}
    assert report["busy_retries_total"] == sum(entry["busy_retries"] for entry in report["requests_log"])
    assert [entry["kind"] for entry in report["requests_log"]] == soak_plan(total, face_every=0, bad_every=2)

    latency = report["latency_s"]
    flat_after_warmup = len(BAD_KINDS) - 1  # the flat requests after the 1-request warm-up
    assert latency["samples"] == flat_after_warmup
    for window in ("first_10pct", "last_10pct"):
        assert latency[window]["count"] == max(1, flat_after_warmup // 10)
        assert latency[window]["p50"] > 0 and latency[window]["p95"] >= latency[window]["p50"]
    assert latency["last_over_first_p50"] > 0

    resources = report["resources"]
    for mark in ("start", "middle", "end"):
        assert resources[mark]["worker_rss_mib"] > 100  # the worker holds three nets
        assert resources[mark]["worker_open_fds"] > 0
    assert [sample["after_request"] for sample in resources["samples"]] == list(range(1, total, 2))
    assert report["worker_rss_growth_mib"] == pytest.approx(
        resources["end"]["worker_rss_mib"] - resources["start"]["worker_rss_mib"]
    )
