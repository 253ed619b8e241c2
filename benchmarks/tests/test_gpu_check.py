"""benchmarks/gpu_check.py: it refuses a machine without CUDA at once, and runs its checks on the CPU.

The script runs by path in a fresh interpreter; what it sends and decides (the plan, the
cases, what compiled, agreement, the report) is checked where it lives,
``benchmarks.gpu_checks`` and ``benchmarks.plans``. No test looks at how long
anything took.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from benchmarks.gpu_checks import (
    MAX_MEAN_ABS,
    BackendRestorers,
    Case,
    CompileCounts,
    Outcome,
    ProgressReport,
    agreement,
    compile_counts,
    generated_cases,
    group_photo,
    judge,
    judge_compiles,
    summaries,
    takes_device_path,
    torch_warnings,
)
from benchmarks.headline import (
    HEADLINE_PIXELS,
    count_syncs,
    goal_verdicts,
    headline_configs,
    megapixel_copies,
    megapixel_photo,
)
from benchmarks.plans import Configuration
from benchmarks.plans import check_plan as plan
from codeformer.config import PROJECT_ROOT

GPU_CHECK = PROJECT_ROOT / "benchmarks" / "gpu_check.py"
EXIT_NO_CUDA = 3  # gpu_check's own exit code for "no CUDA device"
PHOTO = PROJECT_ROOT / "tests/golden/04/04.jpg"
# A GPU machine has torch, OpenCV, NumPy, Pillow and requests, but neither Cog nor pytest: the
# in-process check runs here with both made unimportable (None in sys.modules: import raises)
WITHOUT_COG = (
    "import runpy, sys\n"
    "for name in ('cog', 'coglet', 'pytest'):\n"
    "    sys.modules[name] = None\n"
    f"sys.path.insert(0, {str(GPU_CHECK.parent)!r})\n"
    f"sys.argv = [{str(GPU_CHECK)!r}, *sys.argv[1:]]\n"
    f"runpy.run_path({str(GPU_CHECK)!r}, run_name='__main__')\n"
)


def run_by_path(*args: str, cwd: Path, without_cog: bool = True) -> subprocess.CompletedProcess[str]:
    """gpu_check.py in a fresh interpreter; ``without_cog``: where ``import cog`` (coglet, pytest) fails."""
    script = ["-c", WITHOUT_COG] if without_cog else [str(GPU_CHECK)]
    return subprocess.run(
        [sys.executable, *script, *args], cwd=cwd, capture_output=True, text=True, timeout=600
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
    names = [config.label for config in plan("cpu", None)]
    assert names[0] == "baseline/safe"  # the others' reference runs first
    assert len(names) == len(set(names)) == 3 + 3 * 4
    assert not any(name.endswith("/cudagraphs") for name in names)
    assert sum(name.endswith("/cudagraphs") for name in (c.label for c in plan("cuda", None))) == 3
    assert [c.label for c in plan("cpu", ["fast/optimized/eager", "baseline/safe"])] == [
        "baseline/safe",
        "fast/optimized/eager",
    ]
    # --configs' order otherwise: a budget that runs out leaves out the last named
    wanted = ["max_speed/safe", "fast/optimized/eager", "baseline/safe", "fast/optimized/none"]
    assert [c.label for c in plan("cpu", wanted)] == [wanted[2], wanted[0], wanted[1], wanted[3]]
    with pytest.raises(SystemExit, match="unknown"):
        plan("cpu", ["baseline/optimized/cudagraphs"])


def test_baseline_safe_is_held_to_the_parity_tolerance_and_the_others_to_the_mean_bound() -> None:
    reference = np.zeros((10, 10, 3), np.uint8)
    two_percent_off = reference.copy()
    two_percent_off.reshape(-1)[:6] = 4  # 6 of 300 values beyond 3 levels: over the 1.5% allowed
    figures = agreement([two_percent_off], [reference], "baseline/safe on cpu")
    assert figures["over_three"] == pytest.approx(0.02) and figures["mean_abs"] == pytest.approx(0.08)
    baseline = Outcome(Configuration("baseline", "safe", "none"))
    judge(baseline, figures)
    assert baseline.verdict == "FAIL" and "beyond 3" in baseline.reasons[0]
    optimized = Outcome(Configuration("baseline", "optimized", "none"), timed_passes=1)
    judge(optimized, figures)  # the same difference is well inside the mean bound
    assert optimized.verdict == "PASS" and optimized.figures["agreement"] == figures
    far_off = agreement([reference + np.uint8(MAX_MEAN_ABS + 1)], [reference], "baseline/safe")
    fast = Outcome(Configuration("fast", "safe", "none"), timed_passes=1)
    judge(fast, far_off)
    assert fast.verdict == "FAIL" and "mean abs" in fast.reasons[0]


@pytest.mark.process  # a fresh interpreter restoring one face with the full-size nets
def test_on_the_cpu_it_checks_and_reports_what_the_budget_allows(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    completed = run_by_path(
        *("--device", "cpu", "--configs", "baseline/safe", "fast/safe", "--budget-s", "120"),
        *("--images", str(PROJECT_ROOT / "tests/golden/04/04.jpg"), "--max-faces", "1"),
        *("--warmup", "0", "--repeats", "1", "--output", str(output), "--no-generated"),
        *("--headline-repeats", "1"),
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-2000:]
    report = json.loads(output.read_text())
    # first the headline: max_speed as loaded and optimized (on a CPU, not compiled), one face
    headline = report["headline"]
    for label in ("max_speed/safe", "max_speed/optimized/none"):
        figures = headline[label]
        assert figures["faces"] == 1 and figures["latency_ms"]["count"] == 1, label
        assert figures["codeformer_batch_1_ms"]["count"] == figures["parsenet_batch_1_ms"]["count"] == 1
        assert figures["retinaface_640x853_ms"]["count"] == 1 and "retinaface_640x5120_ms" not in figures
        assert not any(key.endswith("_peak_mb") for key in figures)  # device memory: CUDA only
        assert figures["weights_mb"]["codeformer"] > figures["weights_mb"]["parsenet"] > 0
        assert figures["syncs_per_request"] is None and "peak_gpu_mb" not in figures  # CUDA only
    assert "goals" not in headline  # the goals are a GPU's
    assert report["finished"] and report["pending"] == []
    assert [case["name"] for case in report["cases"]] == ["04.jpg"]
    assert report["images"] == ["tests/golden/04/04.jpg"]
    configs = {config["name"]: config for config in report["configs"]}
    baseline = configs["baseline/safe"]
    assert baseline["verdict"] == "PASS" and baseline["compiles_after_warmup"] == 0
    assert baseline["graphs_compiled"] == baseline["cudagraph_skips"] == 0 and baseline["faces"] == {
        "04.jpg": [1]
    }
    assert baseline["agreement"]["within_one"] == 1.0  # on the CPU, its own reference
    assert set(baseline["stages_ms"]) >= {"decode", "detect", "restore", "paste", "encode", "request"}
    assert baseline["host_ms"]["count"] == baseline["device_ms"]["count"] == 1
    assert "peak_gpu_mb" not in baseline
    # first the moved stages, device against host on the photo and its face; then each configuration
    stages = report["stages"]
    assert list(stages) == ["detector_input", "crops", "parse_masks", "paste"]
    for name, unit in (
        ("detector_input", "image"),
        ("crops", "face"),
        ("parse_masks", "face"),
        ("paste", "image"),
    ):
        stage = stages[name]
        assert (stage["count"], stage["unit"]) == (1, unit), name
        assert stage["within_bound"] and stage["max_levels"] <= stage["bound"]["max_levels"], name
        assert stage[f"host_ms_per_{unit}"]["count"] == stage[f"device_ms_per_{unit}"]["count"] == 1
    assert stages["detector_input"]["max_landmark_shift_px"] <= 0.05
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("headline max_speed/safe  one-face 1 MP p50=")
    assert lines[1].startswith("headline max_speed/optimized/none")
    assert lines[2].startswith("PASS stage detector_input: 1 images")
    assert "landmarks within" in lines[2]
    assert lines[3].startswith("PASS stage crops: 1 faces")
    assert lines[4].startswith("PASS stage parse_masks: 1 faces")
    assert lines[5].startswith("PASS stage paste: 1 images")
    assert lines[6].startswith("PASS baseline/safe")
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
def test_bad_concurrency_flags_exit_2_naming_the_fix(flags: list[str], message: str, tmp_path: Path) -> None:
    # the concurrency flags read the predictor's concurrency max: Cog's side, so with Cog
    completed = run_by_path("--device", "cpu", *flags, cwd=tmp_path, without_cog=False)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert message in completed.stderr


@pytest.mark.server  # two real servers' worth of set-up: the check's, and the sweep's requests
def test_through_the_server_on_the_cpu_it_checks_and_sweeps(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    completed = run_by_path(
        *("--server", "--device", "cpu", "--configs", "baseline/safe", "--budget-s", "400"),
        *("--images", str(PROJECT_ROOT / "tests/golden/04/04.jpg"), "--max-faces", "1"),
        *("--warmup", "0", "--repeats", "1", "--output", str(output), "--megapixel"),
        *("--concurrency", "1", "2", "--requests", "1"),
        cwd=tmp_path,
        without_cog=False,  # the server it starts runs Cog; the check itself needs no Cog either
    )
    report = json.loads(output.read_text())
    assert report["through"] == "server"
    assert [Path(image).name for image in report["images"]] == ["04-1mp.jpg"]  # what was sent
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
    assert report["stages"] == {}  # the moved stages are checked in process only
    assert completed.stdout.splitlines()[0].startswith("PASS baseline/safe")


def test_the_in_process_path_imports_no_cog_module() -> None:
    # the script loaded by path (all its module-level imports; --help then exits), and what
    # its in-process checks import when they run
    probe = (
        "import runpy, sys\n"
        "for name in ('cog', 'coglet', 'pytest'):\n"
        "    sys.modules[name] = None\n"
        f"sys.path[:0] = [{str(GPU_CHECK.parent)!r}]  # as running the script by path does\n"
        f"sys.argv = [{str(GPU_CHECK)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(GPU_CHECK)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import codeformer.pipeline, codeformer.imageio, codeformer.weights\n"
        "import codeformer.tools.random_weights, benchmarks.gpu_checks\n"
        "loaded = [name for name, module in sys.modules.items() if module is not None]\n"
        "print(sorted(name for name in loaded if name.split('.')[0] in ('cog', 'coglet')))\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.startswith("usage: ")  # the script was loaded and parsed its flags
    assert completed.stdout.strip().splitlines()[-1] == "[]"


def test_the_report_is_rewritten_as_each_configuration_ends(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    configs = [Configuration(profile, "safe", "none") for profile in ("baseline", "fast", "max_speed")]
    labels = [config.label for config in configs]
    progress = ProgressReport({"device": "cpu"}, configs, output, started=0.0)
    outcomes: list[Outcome] = []
    seen_on_disk: list[dict[str, Any]] = []
    for config in configs:
        if output.exists():
            seen_on_disk.append(json.loads(output.read_text()))
        outcomes.append(Outcome(config, outputs=[np.zeros((2, 2, 3), np.uint8)], timed_passes=1))
        progress.write(outcomes, None)  # what gpu_check's main does after each configuration
    # before the 2nd configuration, the 1st is on disk; before the 3rd, the first two
    assert [[config["name"] for config in report["configs"]] for report in seen_on_disk] == [
        labels[:1],
        labels[:2],
    ]
    assert [report["pending"] for report in seen_on_disk] == [labels[1:], labels[2:]]
    assert not any(report["finished"] for report in seen_on_disk)
    progress.write(outcomes, None, finished=True)
    final = json.loads(output.read_text())
    assert final["finished"] and final["pending"] == [] and len(final["configs"]) == 3
    assert final["device"] == "cpu" and final["not_run"] == []
    assert [path.name for path in tmp_path.iterdir()] == [output.name]  # no partial file left


def test_each_compile_backend_starts_with_none_of_the_previous_ones_graphs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch._dynamo.utils import counters

    from codeformer.pipeline import Restorer

    class SetUp:
        """What the check asks of a Restorer before a request: its set-up time."""

        def prepare_optimized(self) -> float:
            return 1.0

    monkeypatch.setattr(Restorer, "load", staticmethod(lambda *args, **kwargs: SetUp()))
    restorers = BackendRestorers(Path("unused"), torch.device("cpu"), max_faces=1)
    double = torch.compile(lambda x: x * 2, backend="eager")

    def graphs_compiled_by_a_call() -> int:
        before = counters["stats"]["unique_graphs"]
        double(torch.ones(3))
        return counters["stats"]["unique_graphs"] - before

    first = restorers.get("eager")
    assert graphs_compiled_by_a_call() == 1
    assert restorers.get("eager") is first and graphs_compiled_by_a_call() == 0
    assert restorers.get("aot_eager") is not first  # a new backend: new Restorers ...
    assert graphs_compiled_by_a_call() == 1  # ... and dynamo's entries are gone
    assert list(restorers.loaded) == ["cpu:aot_eager"]
    assert restorers.setup_ms == 1.0


def test_a_recompile_limit_hit_or_a_graph_run_without_cuda_graphs_fails_the_configuration() -> None:
    def one_pass() -> None:
        # on a CPU tensor the cudagraphs backend runs the graph without CUDA graphs, and says so
        torch.compile(lambda x: x + 1, backend="cudagraphs")(torch.ones(2))
        with torch._dynamo.config.patch(recompile_limit=1):
            shifted = torch.compile(lambda x: x - 1, backend="eager", dynamic=False)
            shifted(torch.ones(1))
            shifted(torch.ones(2))  # a second shape: over the limit of one graph, runs eager

    def checked(config: Configuration) -> Outcome:
        """A warm-up pass and a timed one, measured as gpu_check's Checker.run measures them."""
        outcome = Outcome(config, timed_passes=1)
        with torch_warnings() as warnings:
            before = after_setup = compile_counts()  # the Restorer's set-up compiled nothing
            one_pass()
            after_warmup = compile_counts()
            one_pass()
            end = compile_counts()
        judge_compiles(outcome, CompileCounts(before, after_setup, after_warmup, end), warnings)
        return outcome

    outcome = checked(Configuration("baseline", "optimized", "cudagraphs"))
    assert outcome.verdict == "FAIL"
    assert outcome.figures["cudagraph_skips"] == 1 and outcome.figures["graphs_compiled"] >= 2
    warnings = outcome.figures["torch_warnings"]
    assert any("skipping cudagraphs due to cpu device" in line for line in warnings)
    assert any("hit config.recompile_limit" in line for line in warnings)
    assert any(reason.startswith("ran eager past dynamo's recompile limit") for reason in outcome.reasons)
    assert any("ran without CUDA graphs" in reason for reason in outcome.reasons)
    # the Restorer was set up before the passes: what they compiled, requests compiled
    assert outcome.figures["compiles_in_requests"] == outcome.figures["graphs_compiled"]
    assert any("compiled inside requests" in reason for reason in outcome.reasons)
    # the same skip under another backend's configuration is reported, not judged
    torch._dynamo.reset()  # the lambdas compile again
    other = checked(Configuration("baseline", "optimized", "eager"))
    assert other.figures["cudagraph_skips"] == 1
    assert not any("CUDA graphs" in reason for reason in other.reasons)
    torch._dynamo.reset()


def test_a_graph_compiled_after_the_warm_up_fails_the_configuration() -> None:
    outcome = Outcome(Configuration("fast", "optimized", "eager"), timed_passes=1)
    counts = CompileCounts(
        before={"graphs": 5, "cudagraph_skips": 0},
        after_setup={"graphs": 7, "cudagraph_skips": 0},
        after_warmup={"graphs": 7, "cudagraph_skips": 0},
        end={"graphs": 8, "cudagraph_skips": 0},
    )
    judge_compiles(outcome, counts, [], setup_ms=12.5)
    assert outcome.figures["graphs_compiled"] == 3 and outcome.figures["prepare_optimized_ms"] == 12.5
    assert outcome.figures["compiles_after_warmup"] == outcome.figures["compiles_in_requests"] == 1
    assert outcome.reasons == [
        "1 graph(s) compiled inside requests, after set-up",
        "1 graph(s) compiled after warm-up",
    ]


def test_the_generated_requests_reach_more_faces_than_a_batch_fidelity_0_and_new_shapes() -> None:
    photo = np.full((300, 400, 3), 80, np.uint8)
    assert group_photo([photo]).shape == (1200, 1600, 3)
    cases = generated_cases([PHOTO])
    assert {case.fidelity for case in cases} >= {0.0, 0.5, 0.9}
    shapes = set()
    for case in cases:
        assert isinstance(case, Case) and len(case.images) == 1
        image = cv2.imdecode(np.frombuffer(case.images[0], np.uint8), cv2.IMREAD_COLOR)
        shapes.add(image.shape[:2])
    assert {(640, 640), (1280, 720), (1080, 1920), (1200, 1600)} <= shapes


def test_the_headline_photo_is_one_megapixel_in_the_photos_aspect() -> None:
    photo = cv2.imread(str(PHOTO))
    resized = megapixel_photo(photo)
    height, width = resized.shape[:2]
    assert abs(height * width - HEADLINE_PIXELS) < 0.01 * HEADLINE_PIXELS
    assert width / height == pytest.approx(photo.shape[1] / photo.shape[0], rel=0.01)


def test_megapixel_copies_are_the_headline_photos_as_jpgs_in_their_folder(tmp_path: Path) -> None:
    [copy] = megapixel_copies([PHOTO], tmp_path)
    assert copy.parent == tmp_path and copy.suffix == ".jpg"
    resized = cv2.imread(str(copy))
    assert resized.shape == megapixel_photo(cv2.imread(str(PHOTO))).shape


def test_the_headline_compares_max_speed_safe_with_the_production_backend() -> None:
    assert [config.label for config in headline_configs("cuda")] == [
        "max_speed/safe",
        "max_speed/optimized/inductor-cudagraphs",
    ]
    assert headline_configs("cpu")[1].backend == "none"  # no CUDA graphs, no full-net compile on a CPU


def test_the_headline_goals_judge_latency_speedup_and_set_up() -> None:
    def latency(p50: float) -> dict[str, Any]:
        return {"count": 3, "p50": p50}

    safe, optimized = "max_speed/safe", "max_speed/optimized/inductor-cudagraphs"
    fast = {
        safe: {"latency_ms": latency(30.0)},
        optimized: {"latency_ms": latency(12.0), "setup_ms": 45_000.0},
    }
    goals = goal_verdicts(fast, safe, optimized)
    assert [goals[goal]["verdict"] for goal in ("latency_ms", "speedup", "setup_ms")] == ["PASS"] * 3
    assert goals["speedup"]["value"] == pytest.approx(2.5)
    slow = {
        safe: {"latency_ms": latency(20.0)},
        optimized: {"latency_ms": latency(16.0), "setup_ms": 90_000.0},
    }
    goals = goal_verdicts(slow, safe, optimized)
    assert [goals[goal]["verdict"] for goal in ("latency_ms", "speedup", "setup_ms")] == ["FAIL"] * 3
    # the optimized configuration failed or was not reached: no verdict, not a pass
    goals = goal_verdicts({safe: {"latency_ms": latency(20.0)}, optimized: {"error": "x"}}, safe, optimized)
    assert {goal["verdict"] for goal in goals.values()} == {None}


def test_syncs_are_counted_on_cuda_only() -> None:
    """Off CUDA nothing waits for a device: no count, and the call is not made for it."""
    calls: list[int] = []
    assert count_syncs(torch, torch.device("cpu"), lambda: calls.append(1)) is None
    assert calls == []


def test_the_host_part_of_a_device_path_request_is_its_decode_and_encode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same stage figures split two ways: on the device pixel path paste and align are device work."""
    monkeypatch.delenv("CODEFORMER_PIXEL_STAGES", raising=False)
    request = {"decode": 4.0, "detect": 3.0, "align": 1.0, "restore": 5.0, "parse": 2.0, "paste": 6.0}
    request |= {"encode": 2.0, "request": 25.0}
    host_path, device_path = summaries([request]), summaries([request], pixels_on_device=True)
    assert (host_path["host_ms"]["p50"], host_path["device_ms"]["p50"]) == (13.0, 10.0)
    assert (device_path["host_ms"]["p50"], device_path["device_ms"]["p50"]) == (6.0, 17.0)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    fast, baseline = Configuration("fast", "safe", "none"), Configuration("baseline", "safe", "none")
    assert takes_device_path(cuda, fast) and not takes_device_path(cuda, baseline)
    assert not takes_device_path(cpu, fast)
    monkeypatch.setenv("CODEFORMER_PIXEL_STAGES", "host")
    assert not takes_device_path(cuda, fast)
