"""A replica's whole life (``codeformer/serving/lifecycle.py``, ``codeformer/serving/serve.py``).

First the parts alone, in this process: the in-flight files and the drain, coglet's
prediction folders swept by age, the probes against a stand-in ``/health-check``. Then two
real servers (random weights on the CPU, traffic on 127.0.0.1 only): one is stopped by
SIGTERM while an async prediction with a webhook runs, after predictions whose coglet
folders must not stay; the other loses its worker to ``kill -9``.
"""

from __future__ import annotations

import contextlib
import contextvars
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import PROJECT_ROOT, flat_canvas, noise, png_bytes, project_sentence, requests_admitted, wait_for

from codeformer.errors import RequestCancelled, ShuttingDownError
from codeformer.serving.client import WebhookReceiver, data_uri
from codeformer.serving.lifecycle import (
    COGLET_PREDICTIONS_DIR,
    DRAINING_FILE,
    HEALTH_STATES,
    PREDICTION_ID_VAR,
    REQUEST_FILE_PREFIX,
    SERVED_FILE_PREFIX,
    SHUTDOWN_GRACE_ENV,
    SLOTS_DIR_PREFIX,
    InFlight,
    drain,
    health_status,
    live_slot_folders,
    probe,
    remove_orphaned_slot_folders,
    shutdown_grace_s,
)
from codeformer.serving.schema import DEFAULT_PREDICTOR_REF, write_schema
from codeformer.serving.serve import EXIT_WORKER_GONE, image_environment
from codeformer.tools.local_server import LocalServer, find_worker_pid, free_port

GRACE_S = 300  # the servers' drain grace period: far longer than any request here
HOUR_S = 3600.0


def cheap_request() -> dict:
    return {
        "images": [data_uri(png_bytes(flat_canvas(64, 48)), name="flat.png")],
        "runtime_profile": "max_speed",
    }


def slow_request() -> dict:
    """Two faces at seed 0 through the float32 nets: seconds of work on the CPU."""
    return {"images": [data_uri(png_bytes(noise(300, 400)), name="noise.png")], "runtime_profile": "baseline"}


# -- in this process ---------------------------------------------------------------------------
@pytest.fixture
def in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InFlight]:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    slots = InFlight()
    yield slots
    slots.remove()


def hold_request(
    slots: InFlight, errors: list[Exception] | None = None
) -> tuple[threading.Event, threading.Thread]:
    """A prediction that stays in ``run()`` until the returned event (or its cancel flag) is set.

    On its cancel flag it raises ``RequestCancelled``, as the request's thread does at its next
    device call; what leaves ``request()`` goes to the returned list.
    """
    entered, release, cancel = threading.Event(), threading.Event(), threading.Event()
    errors: list[Exception] = []

    def run() -> None:
        try:
            with slots.request(cancel):
                entered.set()
                while not release.wait(0.01):
                    if cancel.is_set():
                        raise RequestCancelled("the prediction was cancelled")
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert entered.wait(60)
    return release, thread, errors


def test_a_drain_refuses_new_predictions_and_waits_for_the_running_one(
    in_flight: InFlight, tmp_path: Path
) -> None:
    release, running, _ = hold_request(in_flight)
    assert [folder.name for folder in live_slot_folders(tmp_path)] == [in_flight.folder.name]
    left: list[int] = []
    drainer = threading.Thread(target=lambda: left.append(drain(GRACE_S, tmp_path)), daemon=True)
    drainer.start()
    wait_for(in_flight.draining, bool, "the drain marker")
    with pytest.raises(ShuttingDownError, match="shutting down"), in_flight.request():
        pass
    assert drainer.is_alive()  # one prediction still runs
    release.set()
    running.join(60)
    drainer.join(60)
    assert left == [0]
    assert not list(in_flight.folder.glob(f"{REQUEST_FILE_PREFIX}*"))


def test_a_drain_past_its_grace_period_fails_what_still_runs_naming_the_shutdown(
    in_flight: InFlight, tmp_path: Path
) -> None:
    assert drain(0.05, tmp_path, owner_pid=os.getpid() + 1_000_000) == 0  # another worker's: none
    assert not in_flight.draining()
    _, running, errors = hold_request(in_flight)
    assert drain(0.05, tmp_path, owner_pid=os.getpid()) == 1
    running.join(60)
    [error] = errors
    assert isinstance(error, ShuttingDownError), error
    assert "shutdown grace period of 0.05 s ran out" in str(error)
    assert not list(in_flight.folder.glob(f"{REQUEST_FILE_PREFIX}*"))


def test_a_cancel_without_a_drain_stays_a_cancel(in_flight: InFlight) -> None:
    with pytest.raises(RequestCancelled), in_flight.request(threading.Event()):
        raise RequestCancelled("the prediction was cancelled")


# coglet's ContextVar holding the prediction's id around run(), as its worker makes it
PREDICTION_ID = contextvars.ContextVar(PREDICTION_ID_VAR)


def as_prediction(prediction_id: str, slots: InFlight, release: threading.Event | None = None) -> None:
    """``slots.request()`` inside a context where coglet's ContextVar names ``prediction_id``."""

    def run() -> None:
        PREDICTION_ID.set(prediction_id)
        with slots.request():
            if release is not None:
                assert release.wait(60)

    contextvars.Context().run(run)


def make_coglet_folders(root: Path, ages: dict[str, float]) -> None:
    now = time.time()
    for name, age in ages.items():
        (root / name / "inputs").mkdir(parents=True)
        os.utime(root / name, (now - age, now - age))


def test_only_old_folders_of_predictions_this_worker_served_go(in_flight: InFlight, tmp_path: Path) -> None:
    root = tmp_path / "coglet-predictions"
    # ids the file system refuses or that leave the folder: the prediction still succeeds
    unsafe = ["../escape", "nul\x00byte", "x" * 300, "a/b", ".."]
    for prediction_id in ("served-long-ago", "served-just-now", "running-long", *unsafe):
        as_prediction(prediction_id, in_flight)
    served = {
        path.name.removeprefix(SERVED_FILE_PREFIX) for path in in_flight.folder.glob(f"{SERVED_FILE_PREFIX}*")
    }
    assert served == {"served-long-ago", "served-just-now", "running-long"}
    release = threading.Event()
    running = threading.Thread(target=as_prediction, args=("running-long", in_flight, release), daemon=True)
    running.start()
    wait_for(lambda: len(list(in_flight.folder.glob(f"{REQUEST_FILE_PREFIX}*"))), bool, "running-long starts")
    # another coglet server on this machine (another replica, another model) owns other-server's folder
    ages = {"served-long-ago": HOUR_S, "served-just-now": 1.0, "running-long": HOUR_S, "other-server": HOUR_S}
    make_coglet_folders(root, ages)
    assert in_flight.remove_stale_prediction_dirs(retention_s=60.0, root=root) == 1
    assert sorted(path.name for path in root.iterdir()) == ["other-server", "running-long", "served-just-now"]
    release.set()
    running.join(60)
    assert in_flight.remove_stale_prediction_dirs(retention_s=0.0, root=root) == 2  # as the worker exits
    assert [path.name for path in root.iterdir()] == ["other-server"]


def test_a_killed_workers_folders_go_with_coglets_folders_of_its_predictions(tmp_path: Path) -> None:
    root = tmp_path / "coglet-predictions"
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    killed = tmp_path / f"{SLOTS_DIR_PREFIX}{gone.pid}-abcdefgh"
    alive = tmp_path / f"{SLOTS_DIR_PREFIX}{os.getpid()}-abcdefgh"
    for folder in (killed, alive):
        folder.mkdir()
        (folder / f"{SERVED_FILE_PREFIX}served-{folder.name}").touch()
    (killed / f"{REQUEST_FILE_PREFIX}0").write_text("was-running")
    (killed / f"{REQUEST_FILE_PREFIX}1").write_text("")  # a prediction coglet gave no id
    make_coglet_folders(root, {"was-running": 1.0, f"served-{killed.name}": 1.0, f"served-{alive.name}": 1.0})
    assert remove_orphaned_slot_folders(tmp_path, root) == 3
    assert [path.name for path in tmp_path.glob(f"{SLOTS_DIR_PREFIX}*")] == [alive.name]
    assert [path.name for path in root.iterdir()] == [f"served-{alive.name}"]


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_a_bad_grace_period_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(SHUTDOWN_GRACE_ENV, value)
    with pytest.raises(ValueError, match=SHUTDOWN_GRACE_ENV):
        shutdown_grace_s()


@pytest.fixture
def health_stub() -> Iterator[tuple[str, list[str]]]:
    """A stand-in ``/health-check``: 200 and ``{"status": states[-1]}``, as coglet answers in every state."""
    states = ["READY"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": states[-1]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", states
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("state", sorted(HEALTH_STATES))
def test_the_probes_read_the_health_state_not_the_http_status(
    health_stub: tuple[str, list[str]], state: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, states = health_stub
    states.append(state)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # no drain on this machine's replicas
    assert probe("live", url)[0] == (state in {"UNKNOWN", "STARTING", "READY", "BUSY"})
    assert probe("ready", url)[0] == (state in {"READY", "BUSY"})  # a busy replica stays in rotation


def test_a_draining_replica_is_live_but_not_ready(
    health_stub: tuple[str, list[str]], in_flight: InFlight, tmp_path: Path
) -> None:
    url, _ = health_stub
    assert probe("ready", url)[0]
    assert drain(GRACE_S, tmp_path) == 0
    assert probe("live", url)[0]
    passes, why = probe("ready", url)
    assert not passes and "draining" in why


def test_a_server_that_does_not_answer_is_neither_live_nor_ready() -> None:
    from codeformer.tools.local_server import closed_port_url

    url = closed_port_url().rstrip("/")
    assert probe("live", url) == (False, "health no answer")
    assert not probe("ready", url)[0]


# -- real servers ----------------------------------------------------------------------------
def coglet_folder(prediction_id: str) -> Path:
    return COGLET_PREDICTIONS_DIR / prediction_id


def make_old_folder(prediction_id: str) -> Path:
    """coglet's folder for ``prediction_id`` (made if missing), its time set an hour back."""
    folder = coglet_folder(prediction_id)
    folder.mkdir(parents=True, exist_ok=True)
    long_ago = time.time() - HOUR_S
    os.utime(folder, (long_ago, long_ago))
    return folder


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_no_process_left(server_pid: int) -> None:
    """Nothing of the server's process group (coglet's worker included) outlives it for long.

    A worker that outlives coglet for a moment is reaped by init: waited for, briefly.
    """
    wait_for(lambda: process_group_alive(server_pid), lambda alive: not alive, "the server's group gone", 30)


def put_slow_prediction(
    server: LocalServer, webhooks: WebhookReceiver, prediction_id: str
) -> requests.Response:
    """``PUT /predictions/{prediction_id}``: ``slow_request``, async, every webhook event."""
    return requests.put(
        f"{server.url}/predictions/{prediction_id}",
        json={"input": slow_request(), "webhook": webhooks.url},
        headers={"Prefer": "respond-async"},
        timeout=60,
    )


def start_slow_prediction(server: LocalServer, webhooks: WebhookReceiver, prediction_id: str) -> None:
    """``put_slow_prediction``; returns once its work has started."""
    admitted = requests_admitted(server.log_text())
    response = put_slow_prediction(server, webhooks, prediction_id)
    assert response.status_code == 202, response.text
    wait_for(
        lambda: requests_admitted(server.log_text()),
        lambda count: count > admitted,
        f"{prediction_id} admitted",
    )


@pytest.mark.server
def test_sigterm_delivers_the_running_prediction_and_leaves_nothing(
    weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"CODEFORMER_WEIGHTS_DIR": str(weights_dir), SHUTDOWN_GRACE_ENV: str(GRACE_S)}
    with WebhookReceiver() as webhooks, LocalServer(env) as server:
        client, process = server.client, server.process
        assert process is not None
        worker = find_worker_pid(server.pid)
        assert worker is not None

        # the first answer lost on its way back: predict_async sends the same PUT again
        real_put, lost = client.session.put, []

        def put_answer_lost(*args: object, **kwargs: object) -> requests.Response:
            response = real_put(*args, **kwargs)
            if not lost:
                lost.append(response.status_code)
                raise requests.ConnectionError("the answer was lost")
            return response

        monkeypatch.setattr(client.session, "put", put_answer_lost)
        # coglet leaves a folder per prediction; once old, the worker removes those it served,
        # never another coglet server's (one on this machine may still run that prediction)
        other_server = make_old_folder(f"other-server-{os.getpid()}")
        earlier = [f"old-{os.getpid()}-{number}" for number in range(3)]
        for prediction_id in earlier:
            result = client.predict_async(cheap_request(), webhooks, prediction_id=prediction_id)
            assert result.status == "succeeded", result.body
            assert coglet_folder(prediction_id).is_dir()  # coglet made it
            make_old_folder(prediction_id)
        assert lost == [202]
        assert client.predict_async(cheap_request(), webhooks).status == "succeeded"
        assert [prediction_id for prediction_id in earlier if coglet_folder(prediction_id).exists()] == []
        assert other_server.is_dir()
        other_server.rmdir()

        # SIGTERM while an async prediction runs
        slow_id = f"slow-{os.getpid()}"
        start_slow_prediction(server, webhooks, slow_id)
        retried = put_slow_prediction(server, webhooks, slow_id)  # its answer "lost": sent again
        assert retried.status_code == 202, retried.text
        [slots] = live_slot_folders(owner_pid=worker)
        assert list(slots.glob(f"{REQUEST_FILE_PREFIX}*")), "the slow prediction ended before the SIGTERM"
        process.send_signal(signal.SIGTERM)

        wait_for(lambda: (slots / DRAINING_FILE).exists(), bool, "the drain")
        refused = client.predict(cheap_request(), retry_busy=False)
        # coglet 0.23 answers a failed prediction 200 (503 only before set-up): `probe ready` is the signal
        assert (refused.http_status, refused.status) == (200, "failed"), refused.body
        assert "shutting down" in project_sentence(refused.error)

        assert process.wait(timeout=GRACE_S) == 0, server.log_tail()
        final = webhooks.wait(slow_id, timeout_s=10)
        assert final["status"] == "succeeded", final
        assert len(final["output"]) == 1
        terminal = [body for body in webhooks.received(slow_id) if body["status"] != "processing"]
        assert terminal == [final]  # it ran once, the retry started nothing
        assert_no_process_left(process.pid)
        assert not slots.exists()
        assert not coglet_folder(slow_id).exists()  # the worker removed its folders as it exited


@pytest.mark.server
def test_a_drain_fails_what_outlives_it_and_a_killed_worker_stops_the_server(weights_dir: Path) -> None:
    env = {"CODEFORMER_WEIGHTS_DIR": str(weights_dir)}
    with WebhookReceiver() as webhooks, LocalServer(env) as server:
        process = server.process
        assert process is not None
        worker = find_worker_pid(server.pid)
        assert worker is not None

        # the image's pre-stop step, with a grace period the slow prediction outlives
        running_id = f"running-{os.getpid()}"
        start_slow_prediction(server, webhooks, running_id)
        drain_command = [sys.executable, "-m", "codeformer.serving.lifecycle", "drain", "--grace-s", "1"]
        drained = subprocess.run(
            [*drain_command, "--worker", str(worker)],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert drained.returncode == 1, drained.stderr
        final = webhooks.wait(running_id, timeout_s=10)
        assert final["status"] == "failed", final
        assert "shutdown grace period of 1 s ran out" in project_sentence(final["error"])
        refused = server.client.predict(cheap_request(), retry_busy=False)
        assert "shutting down" in project_sentence(refused.error)
        assert probe("live", server.url)[0]
        assert not probe("ready", server.url)[0]

        # kill -9 of the worker (what the OOM killer does): the server goes, nothing answers 409
        os.kill(worker, signal.SIGKILL)
        answers: list[int] = []
        health: list[str] = []
        while process.poll() is None:
            try:
                health.append(requests.get(f"{server.url}/health-check", timeout=10).json()["status"])
                answer = requests.post(
                    f"{server.url}/predictions", json={"input": cheap_request()}, timeout=60
                )
            except requests.ConnectionError:
                break  # it stopped listening
            answers.append(answer.status_code)
        assert process.wait(timeout=60) == EXIT_WORKER_GONE, server.log_tail()
        assert 409 not in answers, answers
        assert "BUSY" not in health, health  # a dead replica never looks busy
        assert_no_process_left(process.pid)


@pytest.mark.server
def test_the_images_entry_ignores_sigterm_and_stops_after_its_pre_stop_drain(
    weights_dir: Path, tmp_path: Path
) -> None:
    """The image's own entry, ``python -m cog.server.http --await-explicit-shutdown true``:
    SIGTERM changes nothing, and ``drain --shutdown`` (the pre-stop step) lets the async
    prediction reach its webhook, then stops the server."""
    write_schema(DEFAULT_PREDICTOR_REF)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **image_environment(DEFAULT_PREDICTOR_REF, os.environ),
        "PORT": str(port),
        "CODEFORMER_WEIGHTS_DIR": str(weights_dir),
    }
    command = [
        sys.executable,
        "-m",
        "cog.server.http",
        "--host",
        "127.0.0.1",
        "--await-explicit-shutdown",
        "true",
    ]
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log, WebhookReceiver() as webhooks:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda: health_status(url), lambda status: status == "READY", "READY", 600)
            worker = find_worker_pid(process.pid)
            assert worker is not None
            prediction_id = f"image-{os.getpid()}"
            response = requests.put(
                f"{url}/predictions/{prediction_id}",
                json={"input": slow_request(), "webhook": webhooks.url},
                headers={"Prefer": "respond-async"},
                timeout=60,
            )
            assert response.status_code == 202, response.text
            [slots] = live_slot_folders(owner_pid=worker)
            wait_for(lambda: list(slots.glob(f"{REQUEST_FILE_PREFIX}*")), bool, "the prediction in run()")
            process.send_signal(signal.SIGTERM)

            drain_command = [
                sys.executable,
                "-m",
                "codeformer.serving.lifecycle",
                "drain",
                "--worker",
                str(worker),
            ]
            drained = subprocess.run(
                [*drain_command, "--shutdown", "--url", url],
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=GRACE_S,
            )
            assert drained.returncode == 0, drained.stderr
            assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
            final = webhooks.wait(prediction_id, timeout_s=10)
            assert final["status"] == "succeeded", final
            assert_no_process_left(process.pid)
            assert not coglet_folder(prediction_id).exists()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
