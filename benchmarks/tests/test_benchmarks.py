"""The HTTP benchmarks: summary maths, planning, the port guard, clean stops, and one real run.

The end-to-end run starts the real Cog server with seed-0 random weights and sends two
small requests (the cold one and one timed), at most one face each, so that it stays near a
minute on a CPU. No test looks at how long anything took.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.host_pass import host_figures
from benchmarks.load import (
    RequestSample,
    batches,
    discover_images,
    faces_per_image,
    profile_report,
    setup_info,
    split_names,
    stage_ms_per_image,
)
from benchmarks.plans import Configuration, configurations, plan_combinations, winners
from benchmarks.reports import command_line, portable_path
from benchmarks.summary import cdf_points, summarize, throughput
from codeformer.config import COMPILE_BACKENDS, PROFILES, PROJECT_ROOT, RequestOptions
from codeformer.errors import ConfigError
from codeformer.serving.records import SETUP_MARKER, record_line
from codeformer.serving.request import request_metrics
from codeformer.serving.serve import check_port_free
from codeformer.tools.local_server import free_port

RUN_BENCH = PROJECT_ROOT / "benchmarks" / "run_bench.py"
BENCH_SINGLE_IMAGE = PROJECT_ROOT / "benchmarks" / "bench_single_image.py"
BENCH_STAGES = PROJECT_ROOT / "benchmarks" / "bench_stages.py"
SUMMARY_FIELDS = {"count", "avg", "min", "max", "p50", "p95", "p99"}


def port_is_free(port: int) -> bool:
    try:
        check_port_free("127.0.0.1", port)
    except ConfigError:
        return False
    return True


# -- percentile and summary maths -------------------------------------------------------------
def test_summarize_hand_computed() -> None:
    # percentiles interpolate linearly between ranks: p95 at rank 2.85 is 3 + 0.85 * (4 - 3)
    summary = summarize([4.0, 1.0, 3.0, 2.0])
    assert summary == pytest.approx(
        {"count": 4, "avg": 2.5, "min": 1.0, "max": 4.0, "p50": 2.5, "p95": 3.85, "p99": 3.97}
    )
    assert all(type(summary[key]) is float for key in SUMMARY_FIELDS - {"count"})  # JSON-ready


def test_summarize_of_one_sample_is_that_sample_everywhere() -> None:
    assert summarize([7.5]) == {
        "count": 1, "avg": 7.5, "min": 7.5, "max": 7.5, "p50": 7.5, "p95": 7.5, "p99": 7.5
    }  # fmt: skip


def test_summarize_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, math.nan])


def test_summarize_skewed_samples() -> None:
    # one slow request among nine fast ones: the mean moves, the median does not
    summary = summarize([1.0] * 9 + [11.0])
    assert summary["avg"] == pytest.approx(2.0)
    assert summary["p50"] == 1.0
    assert summary["p95"] == pytest.approx(6.5)  # rank 8.55: 1 + 0.55 * 10
    assert summary["p99"] == pytest.approx(10.1)  # rank 8.91
    assert (summary["min"], summary["max"], summary["count"]) == (1.0, 11.0, 10)


def test_summarize_of_no_samples_has_count_zero_and_no_figures() -> None:
    summary = summarize([])
    assert summary["count"] == 0
    assert set(summary) == SUMMARY_FIELDS
    assert all(summary[key] is None for key in SUMMARY_FIELDS - {"count"})


def test_throughput_and_cdf() -> None:
    assert throughput(10, 4.0) == 2.5
    assert throughput(3, 0.0) is None
    assert cdf_points([3.0, 1.0, 2.0, 2.0]) == ([1.0, 2.0, 2.0, 3.0], [0.25, 0.5, 0.75, 1.0])


# -- inputs, log parsing, reports --------------------------------------------------------------
def test_discover_images_orders_numerically_and_takes_a_count(tmp_path: Path) -> None:
    for name in ("10.jpg", "2.jpg", "1.jpg", "notes.txt", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in discover_images(tmp_path)] == ["1.jpg", "2.jpg", "10.jpg", "b.png"]
    assert [p.name for p in discover_images(tmp_path, ["2"])] == ["1.jpg", "2.jpg"]
    assert [p.name for p in discover_images(tmp_path, ["10.jpg", "1.jpg"])] == ["10.jpg", "1.jpg"]
    with pytest.raises(ConfigError, match="has only 4 images"):
        discover_images(tmp_path, ["5"])
    with pytest.raises(ConfigError, match="no such file missing.jpg"):
        discover_images(tmp_path, ["missing.jpg"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="make_samples"):
        discover_images(empty)


def test_batches_keep_order_and_a_short_last_batch() -> None:
    paths = [Path(f"{i}.jpg") for i in range(5)]
    assert batches(paths, 2) == [paths[0:2], paths[2:4], paths[4:5]]


def test_split_names_accepts_commas_and_spaces_and_rejects_unknown() -> None:
    assert split_names(["max_speed,baseline", "fast", "baseline"], list(PROFILES), "--profiles") == [
        "max_speed",
        "baseline",
        "fast",
    ]
    with pytest.raises(ConfigError, match="--profiles: unknown 'turbo'"):
        split_names(["turbo"], list(PROFILES), "--profiles")


def _metrics(images: list[dict], options: RequestOptions) -> dict:
    """A prediction's metrics as the server returns them: Cog's predict_time, then the request's."""
    return {"predict_time": 0.4, **request_metrics(images, options, 2.04, 390.0)}


TWO_IMAGES = [
    {
        "label": "images[0] (file.jpg)",
        "width": 470,
        "height": 192,
        "faces_found": 3,
        "faces_restored": 1,
        "stages_ms": {"read_decode": 12.04, "detect": 40.0, "restore": 300.0, "paste": 20.0, "encode": 4.0},
    },
    {
        "label": "images[1] (b (1) {x}.jpg)",
        "width": 64,
        "height": 64,
        "faces_found": 0,
        "faces_restored": 0,
        "stages_ms": {"read_decode": 3.0, "detect": 5.0, "encode": 1.0},
    },
]


def test_faces_per_image_reads_the_metrics_images() -> None:
    assert faces_per_image(_metrics(TWO_IMAGES, RequestOptions()), 3) == ([3, 0, None], [1, 0, None])
    assert faces_per_image({"predict_time": 0.1}, 1) == ([None], [None])  # a failed request's


def test_stage_ms_per_image_reads_each_images_stages_rounded_to_a_tenth() -> None:
    stages = stage_ms_per_image(_metrics(TWO_IMAGES, RequestOptions()), 3)
    assert stages[0] == {"read_decode": 12.0, "detect": 40, "restore": 300, "paste": 20, "encode": 4}
    assert stages[1] == {"read_decode": 3, "detect": 5, "encode": 1}
    assert stages[2] == {}  # not returned: no figures rather than zeros


def test_setup_info_reads_the_setup_record() -> None:
    record = {"device": "cuda:0", "build_ms": 1.0, "verify_ms": 2.0, "load_ms": 2792.0, "warmup_ms": 45546.0}
    server_log = f"INFO codeformer.predict: setup: device=cuda:0 ...\n{record_line(SETUP_MARKER, record)}\n"
    assert setup_info(server_log) == {"device": "cuda:0", "setup_load_s": 2.792, "setup_warmup_s": 45.546}
    assert setup_info("INFO codeformer.predict: setup: device=cpu load=1ms warmup=2ms") == {}


def test_the_setup_record_is_read_from_the_servers_own_log_too() -> None:
    # coglet writes each worker line into its log as a JSON object, quotes escaped
    setup = {"device": "cpu", "load_ms": 10.0, "warmup_ms": 20.0}
    lines = [
        {"level": "INFO", "fields": {"message": "starting"}, "target": "coglet::setup"},
        {
            "level": "INFO",
            "fields": {
                "message": f"INFO codeformer.predict: {record_line(SETUP_MARKER, setup)}",
                "source": "Stderr",
            },
            "target": "coglet::setup",
        },
    ]
    server_log = "\n".join(json.dumps(line) for line in lines) + "\n"
    assert setup_info(server_log) == {"device": "cpu", "setup_load_s": 0.01, "setup_warmup_s": 0.02}


def _sample(
    phase: str, round_index: int | None, latency: float, ok: bool = True, images: int = 2
) -> RequestSample:
    return RequestSample(
        phase=phase,
        round=round_index,
        images=[f"{i}.jpg" for i in range(images)],
        latency_s=latency,
        http_status=200,
        status="succeeded" if ok else "failed",
        retries=1 if phase == "warmup" else 0,
        predict_time_s=latency - 0.5,
        faces_found=[2] * images,
        faces_restored=[1] * images,
        error=None if ok else "HTTP 200 failed: images[0] (0.jpg): broken",
    )


def test_bench_stages_host_figures_count_only_the_host_stages() -> None:
    stages = {"decode": 5.0, "prepare": 1.0, "detect": 900.0, "align": 2.0, "restore": 4000.0}
    stages |= {"parse": 700.0, "paste": 8.0, "resize": 3.0, "encode": 1.0}
    figures = host_figures(stages, faces=4, megapixels=2.0)
    assert figures == {"host_ms": 20.0, "host_ms_per_face": 5.0, "host_ms_per_megapixel": 10.0}
    assert host_figures({"decode": 4.0}, faces=0, megapixels=0.5)["host_ms_per_face"] is None


@pytest.mark.process  # a subprocess that imports torch and runs five passes
def test_bench_stages_host_reports_every_host_stage(tmp_path: Path) -> None:
    output = tmp_path / "host.json"
    arguments = ["--host", "--side", "400", "--face-px", "300", "--parse", "--repeats", "2"]
    arguments += ["--output", str(output)]
    arguments += ["--mode", "cmyk", "--icc"]  # the photo converted through its CMYK profile
    completed = subprocess.run(
        [sys.executable, str(BENCH_STAGES), *arguments], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(output.read_text())
    # a 400-px photo is enlarged to a 512-px working image, so the resize back is timed too
    assert set(report["stages"]) == {"decode", "prepare", "align", "paste", "resize", "encode", "host"}
    assert report["side"] == 400 and report["parse"] is True and report["repeats"] == 2
    assert report["mode"] == "cmyk" and report["icc"] is True and report["decode_encode_median_ms"] > 0
    # by default malloc is set up as a GPU process has it; the allocator changes no byte of the JPG
    assert report["allocator"] == "gpu" and len(report["output_sha256"]) == 64
    assert report["minor_faults_per_pass"] >= 0


def test_profile_report_separates_timed_from_warmup_and_failures() -> None:
    samples = [
        _sample("cold", None, 30.0),
        _sample("warmup", None, 9.0),
        _sample("timed", 0, 4.0),
        _sample("timed", 0, 6.0, ok=False),
        _sample("timed", 1, 8.0),
    ]
    report = profile_report(samples, [10.0, 8.0], {"runtime_profile": "fast"})
    assert report["requests"] == 3 and report["images"] == 6 and report["warmup_requests"] == 2
    assert report["per_request"]["count"] == 2 and report["per_request"]["avg"] == pytest.approx(6.0)
    # each image of a 2-image request is charged half the request's latency
    assert report["per_image"]["count"] == 4 and report["per_image"]["max"] == pytest.approx(4.0)
    assert report["round_totals"]["values"] == [10.0, 8.0] and report["round_totals"]["avg"] == 9.0
    assert report["throughput_images_per_s"] == pytest.approx(4 / 18.0)  # succeeded images only
    assert report["client_overhead"]["p50"] == pytest.approx(0.5)
    assert report["faces"]["found"] == 4 and report["faces"]["restored"] == 2  # round 0, succeeded only
    assert report["errors"] == 1 and report["error_messages"] == [
        "HTTP 200 failed: images[0] (0.jpg): broken"
    ]
    assert report["retries"] == 1


def test_reports_hold_no_machine_paths(tmp_path: Path) -> None:
    assert portable_path(PROJECT_ROOT / "data" / "1.jpg") == "data/1.jpg"
    assert portable_path(tmp_path / "weights") == "<temp>/weights"
    assert portable_path("/opt/models/weights") == ".../weights"
    argv = [
        str(RUN_BENCH),
        "--output",
        str(tmp_path / "r.json"),
        f"--plot={tmp_path / 'c.png'}",
        "--port",
        "5",
    ]
    assert command_line(argv) == [
        "run_bench.py",
        "--output",
        "<temp>/r.json",
        "--plot=<temp>/c.png",
        "--port",
        "5",
    ]


# -- bench_single_image planning (benchmarks/plans.py) ---------------------------------------
def test_configurations_are_every_distinct_choice_once_safe_first() -> None:
    cpu, cuda = configurations(cuda=False), configurations(cuda=True)
    assert len(cpu) == len(set(cpu)) == len(PROFILES) * (1 + 4)  # safe + four backends without CUDA
    assert len(cuda) == len(set(cuda)) == len(PROFILES) * (1 + 6) and set(cpu) < set(cuda)
    assert [c.label for c in cpu[:4]] == [
        "baseline/safe",
        "fast/safe",
        "max_speed/safe",
        "baseline/optimized/none",
    ]
    assert all(c.backend == "none" for c in cuda if c.mode == "safe")  # safe mode ignores the backend
    assert {c.backend for c in set(cuda) - set(cpu)} == {"cudagraphs", "inductor-cudagraphs"}
    assert Configuration("max_speed", "optimized", "inductor").label == "max_speed/optimized/inductor"


def test_plan_runs_safe_once_per_profile_and_skips_cudagraphs_without_cuda() -> None:
    plan, skipped = plan_combinations(["max_speed"], ["safe", "optimized"], ["none", "cudagraphs"], False)
    assert [c.label for c in plan] == ["max_speed/safe", "max_speed/optimized/none"]
    reasons = {(s["profile"], s["compile_backend"]): s["reason"] for s in skipped}
    assert "needs CUDA" in reasons[("max_speed", "cudagraphs")]
    assert reasons[("max_speed", "eager")] == "excluded by --backends"
    assert reasons[("baseline", None)] == "excluded by --profiles"
    assert len(plan) + len(skipped) == len(PROFILES) * (1 + len(COMPILE_BACKENDS))  # safe + each backend


def test_plan_keeps_cudagraphs_with_cuda() -> None:
    plan, _ = plan_combinations(["fast"], ["optimized"], ["cudagraphs"], True)
    assert plan == [Configuration("fast", "optimized", "cudagraphs")]


def test_winners_pick_the_lowest_warm_p50_and_cold_figures() -> None:
    def result(label: str, p50: float, first: float, start: float, ok: bool = True) -> dict:
        profile, mode, *backend = label.split("/")
        return {
            "label": label,
            "profile": profile,
            "stability_mode": mode,
            "compile_backend": backend[0] if backend else None,
            "warm": {"p50": p50, "avg": p50 + 1},
            "cold": {"first_request_s": first, "start_to_first_response_s": start, "first_request_ok": ok},
        }

    results = [
        result("baseline/safe", 9.0, 12.0, 60.0),
        result("max_speed/optimized/eager", 5.0, 30.0, 75.0),
        result("max_speed/safe", 6.0, 8.0, 55.0),
        result("fast/safe", 1.0, 1.0, 1.0, ok=False) | {"warm": {"p50": None, "avg": None}},
        {"label": "fast/optimized/inductor", "error": "setup failed"},
    ]
    best_warm, best_cold = winners(results)
    assert best_warm is not None
    assert best_warm["label"] == "max_speed/optimized/eager" and best_warm["warm_avg_s"] == 6.0
    assert best_cold["first_request"]["label"] == "max_speed/safe"
    assert best_cold["start_to_first_response"]["start_to_first_response_s"] == 55.0


# -- the port guard and clean stops -----------------------------------------------------------
@pytest.mark.parametrize("script", [RUN_BENCH, BENCH_SINGLE_IMAGE], ids=lambda p: p.name)
def test_a_taken_port_fails_fast_with_a_clear_message(script: Path, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        completed = subprocess.run(
            [
                sys.executable,
                str(script),
                "--port",
                str(port),
                "--random-weights",
                "--output",
                str(tmp_path / "r.json"),
            ],
            cwd=tmp_path,  # also checks that the scripts run as files from anywhere
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert completed.returncode == 2, completed.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in completed.stderr
    assert "--port" in completed.stderr  # the fix
    assert not (tmp_path / "r.json").exists()
    assert "random weights" not in completed.stderr  # refused before writing 570 MB of weights


@pytest.mark.server
def test_ctrl_c_while_waiting_for_the_server_stops_it(tmp_path: Path) -> None:
    port = free_port()
    output = tmp_path / "interrupted.json"
    command = [
        sys.executable,
        str(RUN_BENCH),
        "--port",
        str(port),
        "--random-weights",
        "--output",
        str(output),
    ]
    bench = subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while port_is_free(port):  # coglet listens (health STARTING) long before setup ends
            assert bench.poll() is None, bench.communicate()
            assert time.monotonic() < deadline, "the server never started listening"
            time.sleep(0.2)
        bench.send_signal(signal.SIGINT)
        _, stderr = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 130, stderr
    assert "interrupted" in stderr
    assert port_is_free(port), "the server outlived the benchmark"
    report = json.loads(output.read_text())
    assert report["aborted"].startswith("KeyboardInterrupt")
    assert report["weights"] is None or report["weights"]["random"] is True


# -- a real run --------------------------------------------------------------------------------
@pytest.mark.server
def test_end_to_end_run_writes_every_reported_figure(tmp_path: Path) -> None:
    port = free_port()
    output, plot = tmp_path / "run.json", tmp_path / "cdf.png"
    command = [
        sys.executable, str(RUN_BENCH),
        "--image-dir", str(PROJECT_ROOT / "data"), "--images", "2.jpg",
        "--profiles", "max_speed", "--warmup", "0", "--repeats", "1",
        "--random-weights", "--server-env", "CODEFORMER_MAX_FACES=1",
        "--port", str(port), "--output", str(output), "--plot", str(plot),
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-6000:]
    assert port_is_free(port), "the server outlived the benchmark"

    report = json.loads(output.read_text())
    for machine_path in (str(PROJECT_ROOT), str(tmp_path)):
        assert machine_path not in output.read_text()  # a committed report names no machine
    assert report["weights"]["random"] is True
    assert "RANDOM weights" in report["weights"]["label"] and "RANDOM weights" in completed.stdout
    assert report["config"]["server_env"] == {"CODEFORMER_MAX_FACES": "1"}

    cold = report["cold"]
    assert cold["first_request_ok"] is True
    assert cold["device"] in ("cpu", "cuda")
    assert 0 < cold["start_to_ready_s"] < cold["start_to_first_response_s"]
    assert cold["first_request_s"] > 0

    profile = report["profiles"]["max_speed"]
    assert profile["options"]["runtime_profile"] == "max_speed"
    for figure in ("round_totals", "per_request", "per_image", "predict_time", "client_overhead"):
        assert set(profile[figure]) >= SUMMARY_FIELDS, figure
        assert profile[figure]["count"] == 1, figure
    assert len(profile["round_totals"]["values"]) == 1  # one sample per repeat
    assert profile["per_request"]["p99"] == profile["per_request"]["min"]  # a single request
    assert (
        profile["predict_time"]["avg"] <= profile["per_request"]["avg"]
    )  # server time is inside the client's
    assert profile["throughput_images_per_s"] > 0
    assert profile["faces"]["found"] >= profile["faces"]["restored"] and profile["faces"]["restored"] <= 1
    assert profile["faces"]["per_image"]["2.jpg"]["restored"] == profile["faces"]["restored"]
    assert profile["errors"] == 0
    assert profile["retries"] == sum(sample["retries"] for sample in profile["samples"])
    assert [s["phase"] for s in profile["samples"]] == ["cold", "timed"]

    assert "max_speed" in completed.stdout and "img/s" in completed.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run.server.log").is_file()
    assert os.path.getsize(tmp_path / "run.server.log") > 0


SCRIPTS = sorted(
    path
    for path in (PROJECT_ROOT / "benchmarks").glob("*.py")
    if 'if __name__ == "__main__"' in path.read_text()
)


@pytest.mark.process  # a fresh interpreter per script, each importing torch
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_script_runs_by_path_from_another_folder(script: Path, tmp_path: Path) -> None:
    # a script imports harness (which puts the project root on sys.path) before any project module
    completed = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.startswith("usage: ")


def test_every_script_is_documented_and_every_documented_script_exists() -> None:
    docs = (PROJECT_ROOT / "docs" / "benchmarks.md").read_text()
    documented = set(re.findall(r"benchmarks/(\w+\.py)", docs))
    assert {path.name for path in SCRIPTS} <= documented
    assert {name for name in documented if not (PROJECT_ROOT / "benchmarks" / name).is_file()} == set()
