"""The real Cog HTTP server (coglet, via ``python -m codeformer.serving.serve``) on 127.0.0.1.

The session's shared server (``shared_server``, conftest: seed-0 weights, at most one face
per image); weights downloaded at setup into an empty folder are tested in
``tests/test_faults.py``. Photos where the pipeline matters are crops of a portrait;
requests that only need to go through the plumbing use a flat grey canvas, on which the
random detector finds no face.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import (
    LOOPBACK_SPELLINGS,
    PROJECT_ROOT,
    colour_tagged_inputs,
    exif_turned,
    face_photo,
    flat_canvas,
    jpeg_bytes,
    png_bytes,
    project_folder,
    project_sentence,
    srgb_profile,
    wait_for,
)
from PIL import Image
from weights_server import FileServer

from codeformer.serving.client import READY, CogClient, PredictionResult, data_uri
from codeformer.serving.records import SETUP_MARKER, read_records
from codeformer.serving.serve import check_port_free
from codeformer.tools.local_server import LocalServer, find_worker_pid, minor_faults

pytestmark = pytest.mark.server

CHEAP = {"runtime_profile": "max_speed"}


def jpeg_sizes(result: PredictionResult) -> list[tuple[int, int]]:
    sizes = []
    for data in result.output_bytes():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG"
            sizes.append(image.size)
    return sizes


@dataclass
class Running:
    server: LocalServer
    client: CogClient
    images: FileServer  # serves ``image_dir`` over http
    image_dir: Path


@pytest.fixture(scope="module")
def running(shared_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    image_dir = tmp_path_factory.mktemp("served-images")
    (image_dir / "face.png").write_bytes(png_bytes(face_photo(256, 192)))
    (image_dir / "canvas.jpg").write_bytes(jpeg_bytes(flat_canvas(80, 48)))
    (image_dir / "corrupt.jpg").write_bytes(b"this is not an image")
    with FileServer(image_dir) as images:
        yield Running(shared_server, shared_server.client, images, image_dir)


def good_request() -> dict:
    return {"images": [data_uri(png_bytes(flat_canvas()), name="ok.png")], **CHEAP}


def assert_good_request_succeeds(client: CogClient) -> None:
    result = client.predict(good_request())
    assert result.status == "succeeded", result.error
    assert jpeg_sizes(result) == [(64, 64)]


# -- start-up ------------------------------------------------------------------------------
def test_health_check_is_ready_after_setup(running: Running) -> None:
    health = wait_for(running.client.health, lambda health: health["status"] == READY, "health READY")
    assert health["setup"]["status"] == "succeeded" and health["setup"]["completed_at"]
    # coglet forwards the worker's stderr on its own schedule: the lines setup() logs last
    # sometimes reach it after setup is marked done, and are then filed as user logs, not
    # setup logs (seen under load). The server's own output has them either way.
    wait_for(
        running.server.log_text,
        lambda log: bool(read_records(log, SETUP_MARKER)),
        "the setup_timings record in the server's output",
    )


def test_the_served_schema_bounds_the_image_count(running: Running) -> None:
    schema = requests.get(f"{running.server.url}/openapi.json", timeout=10).json()
    images = schema["components"]["schemas"]["Input"]["properties"]["images"]
    assert (images["minItems"], images["maxItems"]) == (1, 4)


def test_a_taken_port_is_reported_before_starting(running: Running) -> None:
    from codeformer.errors import ConfigError

    with pytest.raises(ConfigError, match=f"port {running.server.port} .* already in use"):
        check_port_free("127.0.0.1", running.server.port)


# -- success -------------------------------------------------------------------------------
def test_data_uri_and_http_url_inputs_give_jpgs_in_order_at_input_size(running: Running) -> None:
    inputs = {
        "images": [
            data_uri(jpeg_bytes(face_photo(200, 260)), name="tall.jpg"),
            running.images.url_for("face.png"),
        ],
        **CHEAP,
    }
    result = running.client.predict(inputs)
    assert result.http_status == 200
    assert result.status == "succeeded", result.error
    assert jpeg_sizes(result) == [(200, 260), (256, 192)]
    # the request's figures are the prediction's metrics, beside Cog's predict_time: recorded
    # on the request's thread, which resolves the prediction's scope (run()'s context, copied)
    metrics = result.metrics
    assert set(metrics) == {
        "predict_time",
        "images",
        "admission_pixels",
        "admission_wait_ms",
        "shared_forwards",
        "wall_ms",
        "options",
    }
    assert metrics["options"] == {
        "codeformer_fidelity": 0.5,
        "runtime_profile": "max_speed",
        "stability_mode": "safe",
        "compile_backend": "none",
    }
    assert metrics["shared_forwards"] == 0  # alone on the server
    assert metrics["wall_ms"] > 0 and metrics["admission_wait_ms"] >= 0
    assert metrics["admission_pixels"] == 200 * 260 + 256 * 192  # the two images, from their headers
    # per image, in order, named as errors name it (a data URI by its name= parameter)
    tall, face = metrics["images"]
    assert (tall["label"], tall["width"], tall["height"]) == ("images[0] (tall.jpg)", 200, 260)
    assert (face["label"], face["width"], face["height"]) == ("images[1] (face.png)", 256, 192)
    assert 1 in (tall["faces_restored"], face["faces_restored"])
    for image in (tall, face):
        assert image["faces_restored"] <= image["faces_found"]
        assert {"read_decode", "prepare", "detect", "encode"} <= image["stages_ms"].keys()
        assert ("restore" in image["stages_ms"]) == (image["faces_restored"] > 0)
    # the logs keep one human line per image and one per request, not the figures as JSON again
    assert "images[0] (tall.jpg): 200x260, faces found=" in result.logs
    assert "request: finished, 2 image(s)" in result.logs
    assert "{" not in result.logs


def test_every_spelling_of_this_machine_is_fetched_when_private_urls_are_allowed(running: Running) -> None:
    # the suite's servers run with CODEFORMER_ALLOW_PRIVATE_URLS=1 (conftest); production's
    # refusal of the same URLs: tests/test_faults.py
    spellings = [host for host in LOOPBACK_SPELLINGS if host != "[::1]"]  # the file server is IPv4
    urls = [f"http://{host}:{running.images.port}/canvas.jpg" for host in spellings]
    for start in range(0, len(urls), 4):
        result = running.client.predict({"images": urls[start : start + 4], **CHEAP})
        assert result.status == "succeeded", result.error
        assert jpeg_sizes(result) == [(80, 48)] * len(urls[start : start + 4])


def test_a_local_path_inside_the_project_is_read_alongside_a_url(running: Running) -> None:
    # a mixed list: both reach run() as strings; the URL is fetched by codeformer.serving.fetch
    with project_folder() as folder:
        (folder / "canvas.png").write_bytes(png_bytes(flat_canvas(72, 40)))
        relative = str((folder / "canvas.png").relative_to(PROJECT_ROOT))
        inputs = {"images": [relative, running.images.url_for("canvas.jpg")], **CHEAP}
        result = running.client.predict(inputs)
    assert result.status == "succeeded", result.error
    assert jpeg_sizes(result) == [(72, 40), (80, 48)]


def test_each_output_carries_the_colour_profile_its_input_kind_gets(running: Running) -> None:
    # an sRGB-tagged JPEG, a gray-profiled PNG, a CMYK-profiled JPEG, an untagged PNG
    inputs = colour_tagged_inputs()
    result = running.client.predict(
        {"images": [data_uri(data, name=name) for name, data, _, _ in inputs], **CHEAP}
    )
    assert result.status == "succeeded", result.error
    for output, (name, _, carried, _) in zip(result.output_bytes(), inputs, strict=True):
        with Image.open(io.BytesIO(output)) as image:
            assert image.format == "JPEG"
            assert image.info.get("icc_profile") == carried, name
            assert "exif" not in image.info, name


def test_heic_and_avif_phone_photos_are_restored_upright_with_their_profile(running: Running) -> None:
    upright = face_photo(120, 160)  # (160, 120, 3): a portrait, as shown
    stored = Image.fromarray(np.rot90(upright, k=1))  # as the phone stored it; orientation 6 turns it back
    profile = srgb_profile()
    files = {
        f"phone.{ext}": exif_turned(stored, fmt, 6, quality=95, icc_profile=profile)
        for fmt, ext in [("HEIF", "heic"), ("AVIF", "avif")]
    }
    result = running.client.predict(
        {"images": [data_uri(data, name=name) for name, data in files.items()], **CHEAP}
    )
    assert result.status == "succeeded", result.error
    assert jpeg_sizes(result) == [(120, 160), (120, 160)]
    for output, name in zip(result.output_bytes(), files, strict=True):
        with Image.open(io.BytesIO(output)) as image:
            assert image.info.get("icc_profile") == profile, name
            assert "exif" not in image.info, name
            shown = np.asarray(image.convert("RGB")).astype(int)
        # upright, not upside down (turned twice) nor mirrored
        assert np.abs(shown - upright).mean() < np.abs(shown - upright[::-1, ::-1]).mean() / 2, name
        assert np.abs(shown - upright).mean() < np.abs(shown - upright[:, ::-1]).mean() / 2, name


# -- refused by the schema: 422 ------------------------------------------------------------
@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"images": []}, "images"),
        ({"images": ["data:,x"] * 5}, "images"),
        ({}, "images"),
        ({"images": ["data:,x"], "codeformer_fidelity": 1.5}, "codeformer_fidelity"),
        ({"images": ["data:,x"], "runtime_profile": "turbo"}, "runtime_profile"),
        ({"images": ["data:,x"], "stability_mode": "reckless"}, "stability_mode"),
        ({"images": ["data:,x"], "compile_backend": "tensorrt"}, "compile_backend"),
    ],
    ids=[
        "0-images",
        "5-images",
        "no-images",
        "fidelity-1.5",
        "unknown-profile",
        "unknown-mode",
        "unknown-backend",
    ],
)
def test_invalid_inputs_get_422_naming_the_field(running: Running, inputs: dict, field: str) -> None:
    result = running.client.predict(inputs)
    assert result.http_status == 422, result.body
    [detail] = result.body["detail"]
    assert detail["loc"] == ["body", "input", field]


# -- failed predictions, and the server stays healthy --------------------------------------
def test_a_corrupt_image_among_good_ones_fails_the_request(running: Running) -> None:
    good = data_uri(png_bytes(flat_canvas()), name="good.png")
    bad = running.images.url_for("corrupt.jpg")
    result = running.client.predict({"images": [good, bad, good], **CHEAP})
    assert result.http_status == 200
    assert result.status == "failed"
    # "Prediction failed: Async prediction failed: InputError: " is Cog's; no server folder after it
    assert project_sentence(result.error).startswith("images[1] (corrupt.jpg): not a readable image")
    assert str(PROJECT_ROOT) not in result.error
    assert result.output == []
    # what the request recorded before it failed: coglet returns it with the failure
    assert "images" not in result.metrics
    assert (result.metrics["image_count"], result.metrics["failed_at"]) == (
        3,
        "images[1] (corrupt.jpg): read",
    )
    assert_good_request_succeeds(running.client)


# -- memory --------------------------------------------------------------------------------
def test_a_repeated_face_request_reuses_the_workers_memory(running: Running) -> None:
    """coglet runs predictions on threads of its own, whose malloc arenas map every block over
    64 MB afresh (~4.5 M page faults for a 2-face photo at baseline, measured through the
    server). The device calls run on the Restorer's device thread, on glibc's main arena instead
    (codeformer.host_memory), so the second request's activations reuse the first one's memory."""
    assert running.server.process is not None
    worker = find_worker_pid(running.server.process.pid)
    assert worker is not None
    request = {"images": [data_uri(png_bytes(face_photo(256, 192)), name="face.png")], **CHEAP}
    first = running.client.predict(request)
    assert first.status == "succeeded", first.error
    [record] = first.metrics["images"]
    assert record["faces_restored"] == 1  # a face went through CodeFormer: not vacuous
    before = minor_faults(worker)
    second = running.client.predict(request)
    assert second.status == "succeeded", second.error
    # one 512x512 forward touches ~1.8 M pages of activations; reused memory faults none of them
    assert minor_faults(worker) - before < 50_000


# -- output folders do not outlive the server ------------------------------------------------
def test_stopping_the_server_removes_the_workers_output_folders(weights_dir: Path, tmp_path: Path) -> None:
    from codeformer.serving.outputs import OUTPUT_DIR_PREFIX

    temp_dir = tmp_path / "temp"
    temp_dir.mkdir()
    env = {"CODEFORMER_WEIGHTS_DIR": str(weights_dir), "CODEFORMER_MAX_FACES": "1", "TMPDIR": str(temp_dir)}
    with LocalServer(env, log_path=tmp_path / "server.log") as server:
        result = server.client.predict(good_request())
        assert result.status == "succeeded", result.error
        left = list(temp_dir.glob(f"{OUTPUT_DIR_PREFIX}*"))
        assert len(left) == 1 and any(left[0].iterdir()), left  # the last request's JPG, kept for Cog
    assert not list(temp_dir.glob(f"{OUTPUT_DIR_PREFIX}*"))
