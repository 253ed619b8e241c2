"""The bad-input matrix, in-process through ``Predictor`` and through the real Cog HTTP server.

Every case is generated here (Pillow/NumPy). Each either succeeds with the right output
or fails with a message naming the input (``images[0] (name)``) and the problem; after
every failure a good request succeeds. Inputs that decode are kept free of faces (mid-grey
pictures, on which the random detector finds none), so the output must show the
decoded input itself: that checks the decoding rule end to end at little cost.

Cases already asserted elsewhere the same way are not repeated here:
- 0 and 5 images, unknown profile / mode / backend: test_predictor.py
  (test_image_count_outside_1_to_4_is_refused, test_bad_options_are_refused_before_any_input_is_read)
  and test_http_server.py (test_invalid_inputs_get_422_naming_the_field);
- fidelity out of range in-process: test_predictor.py (1.5 and -0.01); over HTTP only 1.5
  was covered, so -0.1 and 1.1 are here for HTTP;
- a backend change after the optimized runtime is initialised: both files'
  test_compile_backend_is_locked_by_the_first_optimized_request;
- a 404 URL and a local path outside the project: test_predictor.py and test_http_server.py;
- truncated JPEG and a text file in-process: test_predictor.py
  (test_a_corrupt_image_among_good_ones_fails_before_any_restore); here over HTTP.

Set ``BAD_INPUT_MATRIX_OUT=<file>`` to write the outcome of every case as JSON lines.
"""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cog_server import CogServer
from conftest import set_up_predictor
from PIL import Image
from weights_server import FileServer

from benchmarks.soak import find_worker_pid, png_header_claiming, reset_peak_rss, status_kib
from codeformer.client import CogClient, PredictionResult, data_uri
from codeformer.errors import CodeFormerError
from predict import Predictor

pytestmark = pytest.mark.slow

DEFAULTS = {
    "codeformer_fidelity": 0.5,
    "runtime_profile": "max_speed",  # no ParseNet pass: the profile does not matter to these cases
    "stability_mode": "safe",
    "compile_backend": "eager",
}
PIXEL_BOMB_MAX_GROWTH_KIB = 64 * 1024  # decoding 100000x100000 RGB would need 30 GB
MATRIX_OUT_ENV = "BAD_INPUT_MATRIX_OUT"


# -- generated inputs ----------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def stepped(width: int = 64, height: int = 48, step: int = 30) -> np.ndarray:
    """(H, W, 3) uint8 RGB: mid grey with a darker left quarter (asymmetric, so a rotation shows).

    The random detector finds no face on near-127 grey with low-contrast steps and ramps
    (it does on many other flat colours), so the output is the decoded input itself.
    """
    image = np.full((height, width, 3), 127, np.uint8)
    image[:, : width // 4] = 127 - step
    return image


def noise(width: int, height: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def face_photo(width: int, height: int) -> np.ndarray:
    """A crop of the astronaut portrait (scikit-image, public domain), (height, width, 3) RGB."""
    from skimage import data as skdata

    portrait = skdata.astronaut()[:300, 100:400]
    return np.asarray(Image.fromarray(portrait).resize((width, height), Image.Resampling.BICUBIC))


def sixteen_bit() -> tuple[bytes, np.ndarray]:
    # high byte a ramp 112..143, low byte 0x55: keeping the low byte would give a flat 85
    high = np.repeat((112 + np.arange(64) // 2).astype(np.uint16)[None, :], 48, axis=0)
    samples = (high << 8) | 0x55
    rgb = np.repeat(high.astype(np.uint8)[..., None], 3, axis=2)
    return encode(Image.fromarray(samples), "PNG"), rgb


def rgba() -> tuple[bytes, np.ndarray]:
    # black at alpha 128 over white is grey 127; ignoring alpha, or compositing over black, is 0
    pixels = np.zeros((48, 64, 4), np.uint8)
    pixels[..., 3] = 128
    expected = np.full((48, 64, 3), round(255 * (1 - 128 / 255)), np.uint8)
    return encode(Image.fromarray(pixels, "RGBA"), "PNG"), expected


def palette() -> tuple[bytes, np.ndarray]:
    image = Image.fromarray(stepped(step=15)).quantize(colors=8)
    assert image.mode == "P"
    return encode(image, "PNG"), np.asarray(image.convert("RGB"))


def gray_jpeg() -> tuple[bytes, np.ndarray]:
    gray = stepped()[..., 0]
    return encode(Image.fromarray(gray), "JPEG", quality=95), np.repeat(gray[..., None], 3, axis=2)


def cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    return encode(Image.fromarray(stepped()).convert("CMYK"), "JPEG", quality=95), stepped()


def exif_rotated() -> tuple[bytes, np.ndarray]:
    stored = stepped(96, 64)  # landscape as stored; orientation 6: rotate 90 degrees clockwise to show
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif), np.rot90(stored, k=-1)


def animated_gif() -> tuple[bytes, np.ndarray]:
    frames = [np.full((40, 56, 3), value, np.uint8) for value in (127, 40)]
    images = [Image.fromarray(frame) for frame in frames]
    data = encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return data, frames[0]


def multipage_tiff() -> tuple[bytes, np.ndarray]:
    pages = [stepped(), np.full((48, 64, 3), 90, np.uint8)]
    images = [Image.fromarray(page) for page in pages]
    return encode(images[0], "TIFF", save_all=True, append_images=images[1:]), pages[0]


def webp() -> tuple[bytes, np.ndarray]:
    return encode(Image.fromarray(stepped(step=15)), "WEBP", lossless=True), stepped(step=15)


def one_pixel() -> tuple[bytes, np.ndarray]:
    pixel = np.full((1, 1, 3), 127, np.uint8)
    return encode(Image.fromarray(pixel), "PNG"), pixel


def truncated(fmt: str) -> bytes:
    whole = encode(Image.fromarray(noise(128, 128)), fmt)
    return whole[: len(whole) // 2]


def closed_port_url(name: str) -> str:
    """A URL on 127.0.0.1 where nothing listens: the connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


@dataclass(frozen=True)
class Decodes:
    """A file that must decode: the output (no face) is ``expected`` (RGB) within ``tolerance``."""

    id: str
    name: str
    make: Callable[[], tuple[bytes, np.ndarray]]
    tolerance: float = 4.0  # mean absolute difference per channel level, from JPEG re-encoding


@dataclass(frozen=True)
class Refused:
    """A file that must fail naming ``images[0] (name)`` with ``reason`` in the message."""

    id: str
    name: str
    make: Callable[[], bytes]
    reason: str
    served_at_url: bool = False  # sent as an http URL (in both paths) instead of a data URI


DECODES = [
    Decodes("16-bit-png", "deep.png", sixteen_bit),
    Decodes("rgba-png", "alpha.png", rgba),
    Decodes("palette-png", "palette.png", palette),
    Decodes("gray-jpeg", "gray.jpg", gray_jpeg),
    Decodes("cmyk-jpeg", "cmyk.jpg", cmyk_jpeg, tolerance=12.0),  # CMYK round trip is lossy
    Decodes("exif-orientation-6", "rotated.jpg", exif_rotated),
    Decodes("animated-gif-first-frame", "anim.gif", animated_gif),
    Decodes("multipage-tiff-first-page", "pages.tiff", multipage_tiff),
    Decodes("webp", "photo.webp", webp),
    Decodes("1x1", "dot.png", one_pixel),
]

REFUSED = [
    Refused("zero-bytes", "empty.jpg", lambda: b"", "the file is empty (0 bytes)"),
    Refused("truncated-png", "cut.png", lambda: truncated("PNG"), "cannot decode the image"),
    Refused("truncated-jpeg", "cut.jpg", lambda: truncated("JPEG"), "cannot decode the image"),
    Refused("random-bytes-jpg", "noise.jpg", lambda: noise(64, 64).tobytes(), "not a readable image"),
    Refused("text-file", "notes.txt", lambda: b"shopping list:\n- milk\n", "not a readable image"),
    Refused(
        "html-at-image-url",
        "photo.jpg",
        lambda: b"<!doctype html><html><head><title>Not Found</title></head><body>404</body></html>",
        "not a readable image",
        served_at_url=True,
    ),
    Refused(
        "pixel-bomb-header",
        "bomb.png",
        lambda: png_header_claiming(100_000, 100_000),
        "100000x100000 is 10000.0 megapixels, over the limit",
    ),
]
# already covered in-process by test_predictor.py (see the module docstring)
IN_PROCESS_COVERED = {"truncated-jpeg", "text-file"}


def good_image() -> str:
    return data_uri(encode(Image.fromarray(np.full((48, 64, 3), 127, np.uint8)), "PNG"), name="ok.png")


def output_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("RGB"))


def assert_shows(output: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    assert output.shape == expected.shape, f"output {output.shape}, expected {expected.shape}"
    difference = np.abs(output.astype(np.int16) - expected.astype(np.int16)).mean()
    assert difference <= tolerance, f"mean difference {difference:.1f} > {tolerance}"


def record(path: str, case: str, outcome: str, message: str) -> None:
    """Append the case's outcome to $BAD_INPUT_MATRIX_OUT (for the issue's matrix), if set."""
    target = os.environ.get(MATRIX_OUT_ENV)
    if target:
        with open(target, "a") as out:
            out.write(json.dumps({"path": path, "case": case, "outcome": outcome, "message": message}) + "\n")


# -- in-process ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(weights_dir: Path) -> Predictor:
    return set_up_predictor(weights_dir)


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FileServer, Path]]:
    folder = tmp_path_factory.mktemp("bad-input-files")
    with FileServer(folder) as server:
        yield server, folder


def predict_in_process(predictor: Predictor, images: list[str], **options: object) -> list[bytes]:
    return [path.read_bytes() for path in predictor.predict(images=images, **{**DEFAULTS, **options})]


def assert_in_process_good_request(predictor: Predictor) -> None:
    [output] = predict_in_process(predictor, [good_image()])
    assert output_rgb(output).shape == (48, 64, 3)


def in_process_input(case: Refused, data: bytes, image_server: tuple[FileServer, Path]) -> str:
    if case.served_at_url:
        server, folder = image_server
        (folder / case.name).write_bytes(data)
        return server.url_for(case.name)
    return data_uri(data, name=case.name)


@pytest.mark.parametrize("case", DECODES, ids=lambda case: case.id)
def test_in_process_file_decodes_to_the_right_picture(predictor: Predictor, case: Decodes) -> None:
    data, expected = case.make()
    [output] = predict_in_process(predictor, [data_uri(data, name=case.name)])
    assert_shows(output_rgb(output), expected, case.tolerance)
    record("in-process", case.id, "succeeded", f"{expected.shape[1]}x{expected.shape[0]} JPG, as decoded")


@pytest.mark.parametrize(
    "case", [c for c in REFUSED if c.id not in IN_PROCESS_COVERED], ids=lambda case: case.id
)
def test_in_process_bad_file_fails_naming_it_then_a_good_request_succeeds(
    predictor: Predictor, case: Refused, image_server: tuple[FileServer, Path]
) -> None:
    item = in_process_input(case, case.make(), image_server)
    with pytest.raises(CodeFormerError) as error:
        predict_in_process(predictor, [item])
    message = str(error.value)
    assert message.startswith(f"images[0] ({case.name}): "), message
    assert case.reason in message
    record("in-process", case.id, "failed", message)
    assert_in_process_good_request(predictor)


def test_in_process_pixel_bomb_leaves_memory_flat(predictor: Predictor) -> None:
    if not reset_peak_rss(os.getpid()):
        pytest.skip("/proc/self/clear_refs is not writable here: cannot reset the peak RSS")
    before_kib = status_kib(os.getpid(), "VmRSS")
    with pytest.raises(CodeFormerError, match="over the limit"):
        predict_in_process(predictor, [data_uri(png_header_claiming(100_000, 100_000), name="bomb.png")])
    peak_growth_kib = status_kib(os.getpid(), "VmHWM") - before_kib
    record("in-process", "pixel-bomb-memory", "flat", f"peak RSS growth {peak_growth_kib} KiB")
    assert peak_growth_kib < PIXEL_BOMB_MAX_GROWTH_KIB


def test_in_process_unreachable_url_fails_naming_it(predictor: Predictor) -> None:
    url = closed_port_url("gone.jpg")
    with pytest.raises(CodeFormerError) as error:
        predict_in_process(predictor, [url])
    message = str(error.value)
    assert message.startswith("images[0] (gone.jpg): cannot read the file"), message
    record("in-process", "unreachable-url", "failed", message)
    assert_in_process_good_request(predictor)


def test_in_process_file_url_is_not_read(predictor: Predictor) -> None:
    with pytest.raises(CodeFormerError) as error:
        predict_in_process(predictor, ["file:///etc/passwd"])
    message = str(error.value)
    assert message.startswith("images[0] (passwd): file:// is not accepted"), message
    assert "root:" not in message
    record("in-process", "file-url", "failed", message)


def test_in_process_64x64_face_photo_keeps_its_size(predictor: Predictor) -> None:
    # tiny faces go through the enlargement to the working size and back (spec §4.1)
    [output] = predict_in_process(predictor, [data_uri(encode(Image.fromarray(face_photo(64, 64)), "PNG"))])
    assert output_rgb(output).shape == (64, 64, 3)
    record("in-process", "64x64-face", "succeeded", "64x64 JPG")


def test_in_process_same_image_four_times_gives_four_identical_outputs(predictor: Predictor) -> None:
    photo = data_uri(encode(Image.fromarray(face_photo(160, 160)), "JPEG", quality=92), name="face.jpg")
    outputs = predict_in_process(predictor, [photo] * 4)
    assert len(outputs) == 4 and all(output == outputs[0] for output in outputs)
    # a face was restored in each (a re-encode of the input would not prove batch independence)
    difference = np.abs(output_rgb(outputs[0]).astype(np.int16) - face_photo(160, 160)).mean()
    assert difference > 2.0
    record("in-process", "same-image-4x", "succeeded", "4 identical JPGs")


# -- HTTP ----------------------------------------------------------------------------------
@dataclass
class Running:
    server: CogServer
    client: CogClient
    files: FileServer
    folder: Path


@pytest.fixture(scope="module")
def running(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    folder = tmp_path_factory.mktemp("served-bad-inputs")
    log_path = tmp_path_factory.mktemp("bad-inputs-server") / "cog-server.log"
    env = {"CODEFORMER_WEIGHTS_DIR": str(weights_dir), "CODEFORMER_MAX_FACES": "1"}
    with FileServer(folder) as files, CogServer(env=env, log_path=log_path) as server:
        assert server.client is not None
        yield Running(server, server.client, files, folder)


def http_predict(running: Running, images: list[str], **options: object) -> PredictionResult:
    return running.client.predict({"images": images, **{**DEFAULTS, **options}})


def assert_http_good_request(running: Running) -> None:
    result = http_predict(running, [good_image()])
    assert result.status == "succeeded", result.error
    assert output_rgb(result.output_bytes()[0]).shape == (48, 64, 3)


def serve(running: Running, name: str, data: bytes) -> str:
    (running.folder / name).write_bytes(data)
    return running.files.url_for(name)


def assert_http_failed(result: PredictionResult, prefix: str, reason: str) -> None:
    assert result.http_status == 200, result.body
    assert result.status == "failed", result.body
    assert result.output == []
    assert prefix in result.error, result.error
    assert reason in result.error, result.error


@pytest.mark.parametrize("case", DECODES, ids=lambda case: case.id)
def test_http_file_decodes_to_the_right_picture(running: Running, case: Decodes) -> None:
    # sent as URLs: coglet downloads them and the predictor names them by their file name
    data, expected = case.make()
    result = http_predict(running, [serve(running, case.name, data)])
    assert result.status == "succeeded", result.error
    assert_shows(output_rgb(result.output_bytes()[0]), expected, case.tolerance)
    record("http", case.id, "succeeded", f"{expected.shape[1]}x{expected.shape[0]} JPG, as decoded")


@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case.id)
def test_http_bad_file_fails_naming_it_then_a_good_request_succeeds(running: Running, case: Refused) -> None:
    result = http_predict(running, [serve(running, case.name, case.make())])
    assert_http_failed(result, f"images[0] ({case.name}): ", case.reason)
    record("http", case.id, "failed", result.error)
    assert_http_good_request(running)


def test_http_empty_data_uri_fails_naming_it(running: Running) -> None:
    # a data URI is downloaded by coglet too; an empty one must still reach our check
    result = http_predict(running, [data_uri(b"", name="empty.jpg", media_type="image/jpeg")])
    assert_http_failed(result, "images[0] (", "the file is empty (0 bytes)")
    record("http", "zero-bytes-data-uri", "failed", result.error)
    assert_http_good_request(running)


def test_http_pixel_bomb_leaves_the_worker_memory_flat(running: Running) -> None:
    assert running.server.process is not None
    worker = find_worker_pid(running.server.process.pid)
    assert worker is not None, "no coglet worker among the server's children"
    if not reset_peak_rss(worker):
        pytest.skip(f"/proc/{worker}/clear_refs is not writable here: cannot reset the peak RSS")
    before_kib = status_kib(worker, "VmRSS")
    result = http_predict(running, [serve(running, "bomb.png", png_header_claiming(100_000, 100_000))])
    assert_http_failed(result, "images[0] (bomb.png): ", "over the limit")
    peak_growth_kib = status_kib(worker, "VmHWM") - before_kib
    record("http", "pixel-bomb-memory", "flat", f"worker peak RSS growth {peak_growth_kib} KiB")
    assert peak_growth_kib < PIXEL_BOMB_MAX_GROWTH_KIB


@pytest.mark.parametrize("fidelity", [-0.1, 1.1])
def test_http_fidelity_out_of_range_gets_422(running: Running, fidelity: float) -> None:
    result = http_predict(running, [good_image()], codeformer_fidelity=fidelity)
    assert result.http_status == 422, result.body
    [detail] = result.body["detail"]
    assert detail["loc"] == ["body", "input", "codeformer_fidelity"]
    record("http", f"fidelity-{fidelity}", "422", json.dumps(detail))


def test_http_unreachable_url_fails_naming_it(running: Running) -> None:
    url = closed_port_url("gone.jpg")
    result = http_predict(running, [url])
    assert result.http_status == 200 and result.status == "failed", result.body
    # coglet fetches an all-URL list itself, before predict(): its message names the host, port and path
    port = url.split(":")[2].split("/")[0]
    assert "/gone.jpg" in result.error and port in result.error, result.error
    assert "Connection refused" in result.error, result.error
    record("http", "unreachable-url", "failed", result.error)
    assert_http_good_request(running)


def test_http_file_url_is_not_read(running: Running) -> None:
    result = http_predict(running, ["file:///etc/passwd"])
    assert result.status != "succeeded", result.body
    assert "root:" not in json.dumps(result.body)
    record(
        "http", "file-url", f"{result.http_status} {result.status}", result.error or json.dumps(result.body)
    )
    assert_http_good_request(running)


def test_http_64x64_face_photo_keeps_its_size(running: Running) -> None:
    result = http_predict(running, [data_uri(encode(Image.fromarray(face_photo(64, 64)), "PNG"))])
    assert result.status == "succeeded", result.error
    assert output_rgb(result.output_bytes()[0]).shape == (64, 64, 3)
    record("http", "64x64-face", "succeeded", "64x64 JPG")


def test_http_same_image_four_times_gives_four_identical_outputs(running: Running) -> None:
    photo = data_uri(encode(Image.fromarray(face_photo(160, 160)), "JPEG", quality=92), name="face.jpg")
    result = http_predict(running, [photo] * 4)
    assert result.status == "succeeded", result.error
    outputs = result.output_bytes()
    assert len(outputs) == 4 and all(output == outputs[0] for output in outputs)
    assert result.logs.count("kept=1") == 4  # each copy had its face restored
    record("http", "same-image-4x", "succeeded", "4 identical JPGs")
