"""benchmarks/gpu_check.py: it refuses a machine without CUDA at once, and runs its checks on the CPU.

No test looks at how long anything took.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_check import EXIT_NO_CUDA
from gpu_check import main as gpu_check_main
from gpu_check_verdicts import MAX_MEAN_ABS, Config, Outcome, agreement, judge, plan
from harness import PROJECT_ROOT

GPU_CHECK = PROJECT_ROOT / "benchmarks" / "gpu_check.py"


def run_by_path(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GPU_CHECK), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_with_its_own_code(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    completed = run_by_path("--output", str(output), cwd=tmp_path)
    assert completed.returncode == EXIT_NO_CUDA, completed.stderr[-2000:]
    assert completed.stderr.count("\n") == 1 and "no CUDA device" in completed.stderr
    assert completed.stdout == ""
    assert not output.exists()  # nothing was checked, so nothing is reported


def test_the_plan_has_every_configuration_once_and_cudagraphs_only_on_cuda() -> None:
    names = [config.name for config in plan("cpu", None)]
    assert names[0] == "baseline/safe"  # the others' reference runs first
    assert len(names) == len(set(names)) == 3 + 3 * 4
    assert not any(name.endswith("/cudagraphs") for name in names)
    assert sum(name.endswith("/cudagraphs") for name in (c.name for c in plan("cuda", None))) == 3
    assert [c.name for c in plan("cpu", ["fast/optimized/eager", "baseline/safe"])] == [
        "baseline/safe",
        "fast/optimized/eager",
    ]
    with pytest.raises(SystemExit, match="unknown"):
        plan("cpu", ["baseline/optimized/cudagraphs"])


def test_baseline_safe_is_held_to_the_parity_tolerance_and_the_others_to_the_mean_bound() -> None:
    reference = np.zeros((10, 10, 3), np.uint8)
    two_percent_off = reference.copy()
    two_percent_off.reshape(-1)[:6] = 4  # 6 of 300 values beyond 3 levels: over the 1.5% allowed
    figures = agreement([two_percent_off], [reference], "baseline/safe on cpu")
    assert figures["over_three"] == pytest.approx(0.02) and figures["mean_abs"] == pytest.approx(0.08)
    baseline = Outcome(Config("baseline", "safe", "none"))
    judge(baseline, figures)
    assert baseline.verdict == "FAIL" and "beyond 3" in baseline.reasons[0]
    optimized = Outcome(Config("baseline", "optimized", "none"), timed_passes=1)
    judge(optimized, figures)  # the same difference is well inside the mean bound
    assert optimized.verdict == "PASS" and optimized.figures["agreement"] == figures
    far_off = agreement([reference + np.uint8(MAX_MEAN_ABS + 1)], [reference], "baseline/safe")
    fast = Outcome(Config("fast", "safe", "none"), timed_passes=1)
    judge(fast, far_off)
    assert fast.verdict == "FAIL" and "mean abs" in fast.reasons[0]


@pytest.mark.slow  # a fresh interpreter restoring one face with the full-size nets
def test_on_the_cpu_it_checks_and_reports_what_the_budget_allows(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    completed = run_by_path(
        *("--device", "cpu", "--configs", "baseline/safe", "fast/safe", "--budget-s", "120"),
        *("--images", str(PROJECT_ROOT / "tests/golden/04/04.jpg"), "--max-faces", "1"),
        *("--warmup", "0", "--repeats", "1", "--output", str(output)),
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["images"] == ["tests/golden/04/04.jpg"]
    configs = {config["name"]: config for config in report["configs"]}
    baseline = configs["baseline/safe"]
    assert baseline["verdict"] == "PASS" and baseline["compiles_after_warmup"] == 0
    assert baseline["agreement"]["within_one"] == 1.0  # on the CPU, its own reference
    assert set(baseline["stages_ms"]) >= {"decode", "detect", "restore", "paste", "encode", "request"}
    assert baseline["host_ms"]["count"] == baseline["device_ms"]["count"] == 1
    assert "peak_gpu_mb" not in baseline
    assert completed.stdout.splitlines()[0].startswith("PASS baseline/safe")
    # fast/safe ran if the budget had room for it, else it is named as not run
    assert configs["fast/safe"]["verdict"] in {"PASS", "SKIP"}
    assert (configs["fast/safe"]["verdict"] == "SKIP") == ("fast/safe" in report["not_run"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "1", "2"], "--concurrency needs --server"),
        (["--server", "--concurrency", "1", "0"], "'0' is not a client count"),
        (["--server", "--requests", "2"], "apply to --concurrency only"),
    ],
)
def test_bad_concurrency_flags_exit_2_naming_the_fix(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        gpu_check_main(["--device", "cpu", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # two real servers' worth of set-up: the check's, and the sweep's requests
def test_through_the_server_on_the_cpu_it_checks_and_sweeps(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    completed = run_by_path(
        *("--server", "--device", "cpu", "--configs", "baseline/safe", "--budget-s", "400"),
        *("--images", str(PROJECT_ROOT / "tests/golden/04/04.jpg"), "--max-faces", "1"),
        *("--warmup", "0", "--repeats", "1", "--output", str(output)),
        *("--concurrency", "1", "2", "--requests", "1"),
        cwd=tmp_path,
    )
    report = json.loads(output.read_text())
    assert report["through"] == "server"
    [baseline] = report["configs"]
    assert baseline["verdict"] == "PASS", completed.stdout + completed.stderr[-2000:]
    assert baseline["observed_through"] == "server"
    assert baseline["peak_gpu_mb"] is None and baseline["compiles_after_warmup"] is None
    # the server's JPGs against this process's baseline/safe, encoded and decoded the same way
    assert baseline["agreement"]["reference"].startswith("baseline/safe in process on cpu")
    assert set(baseline["stages_ms"]) >= {"decode", "detect", "restore", "paste", "encode", "request"}
    assert baseline["host_ms"]["count"] == baseline["device_ms"]["count"] == 1
    assert baseline["stages_ms"]["request"]["p50"] >= baseline["stages_ms"]["restore"]["p50"]
    sweep = report["concurrency"]
    assert sweep["config"] == "baseline/safe" and sweep["not_run"] == []
    assert sweep["levels"] == [1, 2] and set(sweep["results"]) == {"1", "2"}
    for level in sweep["results"].values():
        assert level["succeeded"] == 1
        assert level["requests"] == level["succeeded"] + level["rejected_409"] + level["errors"]
    # a 409 at K <= the predictor's concurrency max, or any failed request, fails the run, and only that
    assert all("409" in reason for reason in sweep["reasons"])
    assert completed.returncode == (1 if sweep["reasons"] else 0), completed.stderr[-2000:]
    assert completed.stdout.splitlines()[0].startswith("PASS baseline/safe")
