"""Faults at the pipeline and server level: damaged weights, cut downloads, cancellation, memory guard.

test_weights.py covers the weights manager alone (retries, locks, refetch of one file).
Here the same faults meet the real consumers: the Cog server's setup (through
``Predictor.setup`` -> ``Restorer.load``), two pipeline loaders racing on an empty folder,
a prediction cancelled through ``POST /predictions/{id}/cancel``, and a request with more
faces than ``CODEFORMER_FACE_BATCH``.

How coglet 0.23 cancels an async ``run()`` (read from its worker bridge): it cancels the
prediction's asyncio task, so ``CancelledError`` is raised where run() awaits its
request thread; run() sets the request's cancel flag, which the thread reads before
each device call (``codeformer.scheduler``), and the same worker serves the next request.
The prediction's id can be given by the client (``{"id": ..., "input": ...}`` on a sync
``POST /predictions``) or read from the 202 answer of a ``Prefer: respond-async`` request;
the test uses the first, so that it can also read the canceled prediction's final answer.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import (
    LOOPBACK_SPELLINGS,
    flat_canvas,
    noise,
    png_bytes,
    project_sentence,
    requests_admitted,
    requests_finished,
    run_python_together,
    wait_for,
)
from PIL import Image
from weights_server import FileServer

from codeformer.config import RequestOptions, Settings
from codeformer.pipeline import Restorer
from codeformer.serving.client import READY, CogClient, PredictionResult, ServerError, data_uri
from codeformer.tools.local_server import LocalServer, closed_port_url, find_worker_pid
from codeformer.weights import WEIGHT_FILES

pytestmark = pytest.mark.server

CODEFORMER = WEIGHT_FILES["codeformer"].name
RETINAFACE = WEIGHT_FILES["retinaface"].name
PARSENET = WEIGHT_FILES["parsenet"].name
FAST_RETRIES = {
    "CODEFORMER_DOWNLOAD_ATTEMPTS": "3",
    "CODEFORMER_DOWNLOAD_BACKOFF": "0.01",
    "CODEFORMER_DOWNLOAD_TIMEOUT": "30",
}
FACE_BATCH = 1
MAX_FACES = 3


def good_request() -> dict:
    canvas = flat_canvas(64, 48)  # no face: only the detector runs
    return {"images": [data_uri(png_bytes(canvas), name="ok.png")], "runtime_profile": "max_speed"}


def assert_good_request_succeeds(client: CogClient) -> None:
    result = client.predict(good_request())
    assert result.status == "succeeded", result.error
    assert len(result.output) == 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.part"))


# -- one server: started on a damaged cache, with a mirror that cuts a download ------------
@dataclass
class Running:
    server: LocalServer
    client: CogClient
    mirror: FileServer
    cache: Path


@pytest.fixture(scope="module")
def running(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The server after a setup that met a truncated file, a corrupt file and a cut download."""
    cache = tmp_path_factory.mktemp("damaged-cache")
    whole = (weights_dir / CODEFORMER).read_bytes()
    (cache / CODEFORMER).write_bytes(whole[: len(whole) // 2])  # truncated
    (cache / RETINAFACE).write_bytes(np.random.default_rng(3).bytes(4096))  # not a checkpoint
    # PARSENET missing: its first download is cut halfway (RST)
    log_path = tmp_path_factory.mktemp("faults-server") / "cog-server.log"
    with FileServer(weights_dir) as mirror:
        mirror.fail(PARSENET, "cut", times=1)
        env = {
            "CODEFORMER_WEIGHTS_DIR": str(cache),
            "CODEFORMER_WEIGHTS_URL": mirror.url,
            "CODEFORMER_MAX_FACES": str(MAX_FACES),
            "CODEFORMER_FACE_BATCH": str(FACE_BATCH),
            # production's URL rule (the suite allows private URLs): weight downloads do not
            # go through it, image URLs do
            "CODEFORMER_ALLOW_PRIVATE_URLS": "0",
            **FAST_RETRIES,
        }
        with LocalServer(env, log_path=log_path) as server:
            yield Running(server, server.client, mirror, cache)


def test_setup_recovers_a_truncated_a_corrupt_and_a_cut_weight_file(
    running: Running, weights_dir: Path
) -> None:
    wait_for(running.client.health, lambda health: health["status"] == READY, "health READY after setup")
    for name in (CODEFORMER, RETINAFACE, PARSENET):
        assert sha256(running.cache / name) == sha256(weights_dir / name), name
        assert running.mirror.completed_count(name) == 1, name
    assert running.mirror.request_count(PARSENET) == 2  # the cut attempt, then the good one
    assert leftovers(running.cache) == []
    setup_logs = running.client.health()["setup"]["logs"]
    assert f"{running.cache / CODEFORMER} does not load" in setup_logs
    assert f"{running.cache / RETINAFACE} does not load" in setup_logs
    assert_good_request_succeeds(running.client)


def test_a_cancelled_prediction_stops_and_the_worker_serves_the_next_request(running: Running) -> None:
    assert running.server.process is not None
    worker_before = find_worker_pid(running.server.process.pid)
    long_images = [data_uri(png_bytes(noise(300, 400, seed)), name=f"n{seed}.png") for seed in range(4)]
    prediction_id = f"cancel-me-{os.getpid()}"
    admitted_before = requests_admitted(running.server.log_text())
    body = {"id": prediction_id, "input": {"images": long_images, "runtime_profile": "baseline"}}
    answers: list[requests.Response] = []
    worker = threading.Thread(
        target=lambda: answers.append(
            requests.post(f"{running.server.url}/predictions", json=body, timeout=900)
        ),
        daemon=True,
    )
    worker.start()
    wait_for(
        lambda: requests_admitted(running.server.log_text()) > admitted_before or not worker.is_alive(),
        bool,
        "the long prediction running (admitted)",
        timeout_s=120,
    )
    assert worker.is_alive(), "the long prediction ended before it was seen running"
    time.sleep(2.0)  # let run() get into the networks (detecting the first of 4 images)

    assert running.client.cancel(prediction_id) == 200
    worker.join(timeout=600)
    [answer] = answers
    canceled = PredictionResult(answer.status_code, answer.json(), 0, 0.0)
    assert canceled.status == "canceled", canceled.body
    assert canceled.output == []
    assert "images" not in canceled.metrics  # run() did not run to its end

    # the slot is freed a moment after the canceled answer (coglet's Idle message comes later)
    wait_for(running.client.health, lambda health: health["status"] == READY, "health READY after the cancel")
    assert_good_request_succeeds(running.client)
    assert find_worker_pid(running.server.process.pid) == worker_before  # the same worker, not a restart
    assert running.client.cancel("no-such-prediction") == 404
    # the cancelled request never finished in the background either
    server_log = running.server.log_text()
    assert requests_finished(server_log, 1) > 0  # the line finished requests log is there
    assert requests_finished(server_log, 4) == 0


def test_more_faces_than_the_face_batch_are_restored_in_chunks_over_http(running: Running) -> None:
    image = data_uri(png_bytes(noise(600, 800)), name="crowd.png")
    result = running.client.predict({"images": [image], "runtime_profile": "max_speed"})
    assert result.status == "succeeded", result.error
    [record] = result.metrics["images"]  # 3 faces > CODEFORMER_FACE_BATCH=1
    assert (record["faces_found"], record["faces_restored"]) == (MAX_FACES, MAX_FACES)
    [output] = result.output_bytes()
    with Image.open(io.BytesIO(output)) as restored:
        assert restored.size == (800, 600)


# -- production's URL rule through the server ------------------------------------------------
def test_every_spelling_of_this_machine_is_refused_without_a_request(running: Running) -> None:
    """This server runs with production's rule (CODEFORMER_ALLOW_PRIVATE_URLS=0); the rule's
    cases in-process: tests/test_fetch.py. Nothing reaches the mirror on 127.0.0.1."""
    spellings = [f"http://{host}:{running.mirror.port}/photo.png" for host in LOOPBACK_SPELLINGS]
    for start in range(0, len(spellings), 4):  # up to four images a request
        batch = spellings[start : start + 4]
        result = running.client.predict({"images": batch, "runtime_profile": "max_speed"})
        assert result.status == "failed", result.body
        sentence = project_sentence(result.error)
        # the first URL fails the request: refused before any later one is fetched
        assert sentence.startswith("images[0] (photo.png): "), sentence
        assert "address; only public addresses are fetched (CODEFORMER_ALLOW_PRIVATE_URLS=1" in sentence
    for url in spellings:  # each alone, so that every spelling is the one refused
        result = running.client.predict({"images": [url], "runtime_profile": "max_speed"})
        assert result.status == "failed" and "only public addresses are fetched" in result.error, url
    assert running.mirror.request_count("photo.png") == 0
    assert_good_request_succeeds(running.client)


# -- the face batch inside the pipeline: which batch sizes reach each network --------------
@dataclass(frozen=True)
class NetBatches:
    codeformer: list[int]
    parsenet: list[int]


@pytest.fixture(scope="module")
def net_batches(restorer_seed0: Restorer) -> NetBatches:
    """Restore 2 faces with face_batch=1 (profile fast: ParseNet runs) and record each net's batch sizes."""
    settings = Settings.from_env(max_faces=2, face_batch=1)
    nets = restorer_seed0.runtime.safe_nets
    restorer = Restorer(nets, restorer_seed0.device, settings)
    seen: dict[str, list[int]] = {"codeformer": [], "parsenet": []}
    hooks = [
        net.register_forward_pre_hook(
            lambda module, args, name=name: seen[name].append(int(args[0].shape[0]))
        )
        for name, net in (("codeformer", nets.codeformer), ("parsenet", nets.parsenet))
    ]
    try:
        [result] = restorer.restore([noise(300, 400)], RequestOptions.parse(profile="fast"))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(result.faces) == 2
    return NetBatches(seen["codeformer"], seen["parsenet"])


def test_codeformer_runs_one_chunk_per_face_batch(net_batches: NetBatches) -> None:
    assert net_batches.codeformer == [1, 1]


def test_parsenet_runs_one_chunk_per_face_batch(net_batches: NetBatches) -> None:
    assert net_batches.parsenet == [1, 1]


# -- weights faults that must end in a clear error or a complete file ----------------------
def test_unreachable_weight_source_ends_in_setup_failed_with_the_fix(tmp_path: Path) -> None:
    unreachable = closed_port_url()
    env = {
        "CODEFORMER_WEIGHTS_DIR": str(tmp_path / "empty"),
        "CODEFORMER_WEIGHTS_URL": unreachable,
        **FAST_RETRIES,
    }
    server = LocalServer(env, ready_timeout_s=300, log_path=tmp_path / "server.log")
    with pytest.raises(ServerError) as raised:
        server.start()  # stops the server itself when it fails
    message = str(raised.value)
    assert "server health is SETUP_FAILED" in message, message  # not a hang, not a crash loop
    assert f"{unreachable}{CODEFORMER}" in message
    assert "CODEFORMER_WEIGHTS_URL" in message and "python -m codeformer.weights fetch" in message
    assert leftovers(tmp_path / "empty") == []
    assert not (tmp_path / "empty" / CODEFORMER).exists()


def test_two_pipelines_loading_at_once_into_an_empty_folder_both_get_whole_files(
    weights_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "shared-cache"
    script = f"""
        from codeformer.config import Settings
        from codeformer.pipeline import Restorer
        Restorer.load({str(cache)!r}, "cpu", Settings.from_env(max_faces=1, face_batch=1))
        print("loaded")
        """
    with FileServer(weights_dir) as mirror:
        # ParseNet trickles in (64 KiB chunks, 2 ms apart) so the second loader arrives mid-download
        mirror.fail(PARSENET, "slow", delay=0.002)
        for loader in run_python_together(script, {"CODEFORMER_WEIGHTS_URL": mirror.url, **FAST_RETRIES}):
            assert loader.returncode == 0, loader.stderr[-3000:]
            assert loader.stdout.strip() == "loaded"
        for name in (CODEFORMER, RETINAFACE, PARSENET):
            assert sha256(cache / name) == sha256(weights_dir / name), name
            # the lock makes the second loader wait and read the first one's file
            assert mirror.request_count(name) == 1, name
    assert leftovers(cache) == []
