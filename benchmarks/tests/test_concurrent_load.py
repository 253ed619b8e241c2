"""The concurrency levels (benchmarks/load.py), ``run_bench.py --concurrency``: levels, counting,
one real run.

The counting tests use a stand-in server (a few lines of http.server with a fixed number of
slots, answering 409 beyond them) so that they run in a second; the last test sends real
requests to the real Cog server. No test looks at how long anything took.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.load import Requester, StopRule, level_report, parse_levels, run_level
from codeformer.config import PROJECT_ROOT
from codeformer.errors import ConfigError
from codeformer.serving.client import CogClient
from codeformer.serving.serve import runner_concurrency
from codeformer.tools.local_server import free_port
from predict import MAX_CONCURRENT_REQUESTS

RUN_BENCH = PROJECT_ROOT / "benchmarks" / "run_bench.py"
PHOTO = PROJECT_ROOT / "data" / "2.jpg"


# -- levels and the runner's concurrency -------------------------------------------------------
def test_levels_take_numbers_commas_and_n_once_each_in_order() -> None:
    assert parse_levels(["1", "2,4", "N"], 3) == [1, 2, 4, 3]
    assert parse_levels(["1", "n", "2", "1"], 1) == [1, 2]  # N = 1 is already there


@pytest.mark.parametrize("bad", ["0", "x", "-1", "2.5", "65", ""])
def test_a_level_that_is_no_client_count_is_refused_with_the_fix(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"--concurrency: .* whole numbers 1-64 or N"):
        parse_levels(["1", bad], 1)


def test_n_is_the_runners_concurrent_max_and_1_without_it(tmp_path: Path) -> None:
    runner = tmp_path / "runner.py"
    runner.write_text("class Plain:\n    def run(self): ...\n")
    assert runner_concurrency(f"{runner}:Plain") == 1
    runner.write_text("import cog\nclass Wide:\n    @cog.concurrent(max=3)\n    async def run(self): ...\n")
    assert runner_concurrency(f"{runner}:Wide") == 3
    with pytest.raises(ConfigError, match="cannot load"):
        runner_concurrency(f"{runner}")
    assert runner_concurrency() == MAX_CONCURRENT_REQUESTS  # the project's own predictor


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "1", "two"], "'two' is not a client count"),
        (["--concurrency", "1", "--requests", "0"], "--requests must be at least 1"),
        (["--duration-s", "5"], "apply to --concurrency only"),
    ],
)
def test_run_bench_refuses_bad_concurrency_flags_with_exit_2(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            str(RUN_BENCH),
            *flags,
            "--port",
            str(free_port()),
            "--output",
            str(tmp_path / "r.json"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert message in completed.stderr
    assert not (tmp_path / "r.json").exists()  # refused before any server started


# -- counting, against a stand-in server ---------------------------------------------------------
def _stand_in(slots: int, fail_every: int = 0) -> type[BaseHTTPRequestHandler]:
    """A handler with ``slots`` predictions at once (409 beyond), each failing every ``fail_every``."""
    free, lock, answered = threading.Semaphore(slots), threading.Lock(), [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            if not free.acquire(blocking=False):
                return self._answer(409, {"detail": "At capacity - all prediction slots busy"})
            try:
                time.sleep(0.02)  # a prediction long enough for the clients to overlap
                with lock:
                    answered[0] += 1
                    failed = fail_every and answered[0] % fail_every == 0
            finally:
                free.release()
            log = (
                "images[0] (2.jpg): 64x64, faces found=1 restored=1, read_decode=1ms detect=2ms, total=3ms\n"
            )
            status = "failed" if failed else "succeeded"
            body = {"status": status, "output": [], "logs": log, "metrics": {"predict_time": 0.02}}
            self._answer(200, body | ({"error": "images[0] (2.jpg): broken"} if failed else {}))

        def _answer(self, code: int, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

    return Handler


@pytest.fixture
def stand_in_url(request: pytest.FixtureRequest) -> Iterator[str]:
    slots, fail_every = getattr(request, "param", (1, 0))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _stand_in(slots, fail_every))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _requester(url: str) -> Requester:
    return Requester(CogClient(url), {"runtime_profile": "max_speed"})


@pytest.mark.parametrize("stand_in_url", [(1, 0)], indirect=True)
def test_a_count_level_gets_exactly_its_answers_and_counts_every_409(stand_in_url: str) -> None:
    report = run_level(_requester(stand_in_url), [[PHOTO]], clients=3, rule=StopRule(requests=6))
    assert report["succeeded"] == 6 and report["errors"] == 0  # 409s do not use up the count
    assert report["requests"] == report["succeeded"] + report["rejected_409"] + report["errors"]
    assert len(report["samples"]) == report["requests"]
    assert sum(report["succeeded_per_client"]) == 6 and len(report["succeeded_per_client"]) == 3
    assert report["throughput_images_per_s"] == pytest.approx(6 / report["wall_s"])
    assert report["per_request"]["count"] == report["predict_time"]["count"] == 6
    rejected = [s for s in report["samples"] if s["http_status"] == 409]
    assert len(rejected) == report["rejected_409"]
    assert all(s["retries"] == 0 for s in report["samples"])  # a 409 is counted, never retried in place
    assert {s["client"] for s in report["samples"]} <= {0, 1, 2}
    sent = [s["sent_at_s"] for s in report["samples"]]
    assert sent == sorted(sent)


@pytest.mark.parametrize("stand_in_url", [(4, 3)], indirect=True)
def test_failed_predictions_are_errors_and_a_duration_level_stops(stand_in_url: str) -> None:
    report = run_level(_requester(stand_in_url), [[PHOTO]], clients=2, rule=StopRule(duration_s=0.3))
    assert report["rejected_409"] == 0  # two clients, four slots
    assert report["errors"] == report["requests"] // 3 >= 1  # every third prediction fails
    assert report["error_messages"] == ["HTTP 200 failed: images[0] (2.jpg): broken"]
    assert report["throughput_images_per_s"] == pytest.approx(report["succeeded"] / report["wall_s"])


def test_a_server_that_does_not_answer_is_an_error_not_a_crash() -> None:
    requester = Requester(CogClient(f"http://127.0.0.1:{free_port()}"), {})
    report = run_level(requester, [[PHOTO]], clients=2, rule=StopRule(duration_s=30.0))
    assert report["requests"] == report["errors"] == 2  # each client stops after its first
    assert "did not answer" in report["error_messages"][0]


def test_level_report_of_no_answers_has_no_figures() -> None:
    report = level_report(2, [], 0.0)
    assert report["requests"] == 0 and report["throughput_images_per_s"] is None
    assert report["per_request"]["count"] == 0 and report["succeeded_per_client"] == [0, 0]


# -- a real run ----------------------------------------------------------------------------------
@pytest.mark.server  # the real server, seed-0 random weights, five small requests
def test_run_bench_concurrency_through_the_real_server(tmp_path: Path) -> None:
    output = tmp_path / "run.json"
    command = [
        sys.executable, str(RUN_BENCH), "--images", "2.jpg", "--profiles", "max_speed",
        "--warmup", "0", "--concurrency", "1", "2", "--requests", "2",
        "--random-weights", "--server-env", "CODEFORMER_MAX_FACES=1",
        "--port", str(free_port()), "--output", str(output),
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-6000:]
    report = json.loads(output.read_text())
    section = report["concurrency"]
    assert section["levels"] == [1, 2] and section["concurrency_max"] == runner_concurrency()
    assert section["stop"] == {"duration_s": None, "requests": 2, "busy_backoff_s": 0.1}
    assert report["profiles"] == {}  # the sweep replaces the timed rounds
    levels = section["profiles"]["max_speed"]["levels"]
    assert set(levels) == {"1", "2"}
    for level in levels.values():
        assert level["succeeded"] == 2 and level["errors"] == 0
        assert level["requests"] == level["succeeded"] + level["rejected_409"]
        assert level["throughput_images_per_s"] == pytest.approx(2 / level["wall_s"])
        assert level["per_request"]["count"] == 2
    assert {s["client"] for s in levels["2"]["samples"]} == {0, 1}
    assert " 409 " in completed.stdout and "@cog.concurrent max N = " in completed.stdout
