"""The edges of the real Cog server as the image runs it: hostile bodies and file names.

The session's shared server (``shared_server``, conftest); every request here is cheap (a
flat canvas, on which the detector finds no face, or an input that fails). Its HTTP front is
coglet's own: bodies, chunked transfer, unknown keys and error texts are Cog's rules
(README, "Local server"). After each hostile request a good one must succeed. All traffic
stays on 127.0.0.1. Production's URL rule through the server: ``tests/test_faults.py``.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import pytest
import requests
from helpers import flat_canvas, png_bytes, project_folder, project_sentence, wait_for
from weights_server import FileServer

from codeformer.serving.client import CogClient, data_uri
from codeformer.tools.local_server import LocalServer, status_kib
from predict import PROJECT_ROOT

pytestmark = pytest.mark.server

CHEAP = {"runtime_profile": "max_speed", "stability_mode": "safe"}
DECLARED_BYTES = 20_000_000_000  # a declared 20 GB body ...
SENT_BYTES = 20 * 1024 * 1024  # ... of which 20 MB are sent
MAX_GROWTH_KIB = 300 * 1024
OVER_COGS_LIMIT_BYTES = 300 * 1024 * 1024  # coglet answers 413 past ~100 MB
# names that coglet 0.23 would read as a cancel if they reached its error text as written
CANCEL_LIKE_NAMES = ["cancelled.png", "CancelledError.png", "job_was_cancelled.jpg"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """A file server on 127.0.0.1 (the suite's servers fetch from it: CODEFORMER_ALLOW_PRIVATE_URLS=1)."""
    folder = tmp_path_factory.mktemp("edge-files")
    (folder / "photo.png").write_bytes(png_bytes(flat_canvas(64, 48)))
    for name in CANCEL_LIKE_NAMES:
        (folder / name).write_bytes(b"not an image")
    with FileServer(folder) as server:
        yield server


@pytest.fixture(scope="module")
def server(shared_server: LocalServer) -> LocalServer:
    return shared_server


def good_request() -> dict:
    return {"images": [data_uri(png_bytes(flat_canvas(64, 48)), name="ok.png")], **CHEAP}


def assert_good_request_succeeds(client: CogClient) -> None:
    result = client.predict(good_request())
    assert result.status == "succeeded", result.error
    assert len(result.output) == 1


def process_state(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process."""
    return status_kib(pid, "Threads"), len(os.listdir(f"/proc/{pid}/fd"))


# -- bodies: coglet's own limits ---------------------------------------------------------------
def test_a_declared_20_gb_body_reserves_nothing_and_leaves_nothing_behind(server: LocalServer) -> None:
    pid = server.pid
    before_rss, before_state = status_kib(pid, "VmRSS"), process_state(pid)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(
            b"POST /predictions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % DECLARED_BYTES
        )
        chunk = b" " * (1 << 20)
        for _ in range(SENT_BYTES // len(chunk)):
            client.sendall(chunk)
        growth = wait_for(  # the server has read most of what was sent: the bound means something
            lambda: status_kib(pid, "VmRSS") - before_rss,
            lambda grown: grown >= SENT_BYTES // 2 // 1024,
            "the server to buffer what was sent",
        )
        assert growth < MAX_GROWTH_KIB, f"the server grew {growth} KiB for {SENT_BYTES >> 20} MB sent"
    # the client went away: its connection and anything the server started for it end
    wait_for(lambda: process_state(pid), lambda state: state == before_state, "threads and fds as before")
    assert status_kib(pid, "VmRSS") - before_rss < MAX_GROWTH_KIB
    assert_good_request_succeeds(server.client)


def test_a_body_over_cogs_limit_gets_413(server: LocalServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(
            b"POST /predictions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % OVER_COGS_LIMIT_BYTES
        )
        chunk = b" " * (1 << 20)
        try:
            for _ in range(OVER_COGS_LIMIT_BYTES // len(chunk)):
                client.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the body ended, as it should
        status_line = client.makefile("rb").readline()
    assert status_line.startswith(b"HTTP/1.1 413"), status_line
    assert_good_request_succeeds(server.client)


def test_a_chunked_body_is_read(server: LocalServer) -> None:
    body = json.dumps({"input": good_request()}).encode()
    pieces = (body[start : start + 1000] for start in range(0, len(body), 1000))  # sent chunked
    response = requests.post(
        f"{server.url}/predictions",
        data=pieces,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded", response.json()
    assert_good_request_succeeds(server.client)


# -- unknown keys: Cog drops them and says so --------------------------------------------------
def test_a_misspelled_key_is_dropped_and_named_in_the_log(server: LocalServer) -> None:
    log_start = len(server.log_text())
    result = server.client.predict({**good_request(), "codeformer_fidelty": 0.9})
    assert result.status == "succeeded", result.error
    log = server.log_text()[log_start:]
    [dropped] = [line for line in log.splitlines() if "Stripped unknown input fields" in line]
    assert "codeformer_fidelty" in dropped


# -- a failure is never reported as a cancel ---------------------------------------------------
@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("kind", ["data URI", "URL", "local path"])
def test_a_failing_input_named_like_a_cancel_fails_as_failed(
    server: LocalServer, files: FileServer, kind: str, position: int
) -> None:
    name = CANCEL_LIKE_NAMES[position]
    with project_folder() as folder:
        (folder / name).write_bytes(b"not an image")
        bad = {
            "data URI": data_uri(b"not an image", name=name, media_type="image/png"),
            "URL": files.url_for(name),  # fetched, and not an image
            "local path": str((folder / name).relative_to(PROJECT_ROOT)),
        }[kind]
        images = [data_uri(png_bytes(flat_canvas(64, 48)), name="ok.png")] * 3
        images[position] = bad
        result = server.client.predict({"images": images, **CHEAP})
    assert result.status == "failed", result.body
    sentence = project_sentence(result.error)
    shown = name.replace("cancelled", "cancel%6Ced").replace("Cancelled", "Cancel%6Ced")
    assert sentence.startswith(f"images[{position}] ({shown}): "), sentence
    assert_good_request_succeeds(server.client)
