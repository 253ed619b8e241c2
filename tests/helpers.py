"""What several test files share: pictures to send, golden reference folders, waiting, racing processes.

Server and port helpers (``LocalServer``, ports, worker memory) are in ``codeformer/tools/local_server.py``;
this module holds no fixtures (those are in ``conftest.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import pillow_heif
import torch
from PIL import Image, ImageCms
from torch import nn

import codeformer.imageio  # noqa: F401  (registers pillow-heif's HEIF writer that ``encode`` uses)
from codeformer.icc import rgb_profile_for_gray
from codeformer.scheduler import DeviceScheduler
from codeformer.serving.request import ADMITTED_LINE, FINISHED_LINE
from codeformer.stages.face_batch import FaceBatchNet, FaceBatchRun
from codeformer.tools.inputs import cmyk_icc_profile, gray_icc_profile

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# host spellings that all mean this machine; what the URL tests send
# (tests/test_fetch.py, tests/test_http_server.py, tests/test_faults.py)
LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "localhost",
    "[::1]",
    "0.0.0.0",
    "2130706433",
    "127.1",
    "0x7f000001",
    "0177.0.0.1",
    "[::ffff:127.0.0.1]",
]
# what Cog (coglet 0.23) writes before the text of an exception that failed an async run()
COG_FAILURE_PREFIX = "Prediction failed: Async prediction failed: "
PROJECT_ERRORS = ("InputError", "CodeFormerError", "ConfigError", "ShuttingDownError")


def project_sentence(error: str) -> str:
    """A failed prediction's error without Cog's prefix and the project's class name.

    Asserts the shape: ``Prediction failed: Async prediction failed: InputError: images[0] ...``.
    """
    assert error.startswith(COG_FAILURE_PREFIX), error
    name, separator, sentence = error.removeprefix(COG_FAILURE_PREFIX).partition(": ")
    assert separator and name in PROJECT_ERRORS, error
    return sentence


@contextlib.contextmanager
def project_folder() -> Iterator[Path]:
    """A temporary folder inside the project (where local-path inputs are accepted), removed after.

    Its name is git-ignored (``.test-inputs-*``), so a killed run leaves the tree clean for git.
    """
    folder = Path(tempfile.mkdtemp(prefix=".test-inputs-", dir=PROJECT_ROOT))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- pictures --------------------------------------------------------------------------------


@contextlib.contextmanager
def recording_connections() -> Iterator[list[object]]:
    """Every address a socket of this process (any thread, any library) connects to in the block."""
    made: list[object] = []
    real_connect = socket.socket.connect

    def recording_connect(sock: socket.socket, address: object) -> None:
        made.append(address)
        real_connect(sock, address)

    socket.socket.connect = recording_connect  # type: ignore[method-assign]
    try:
        yield made
    finally:
        socket.socket.connect = real_connect  # type: ignore[method-assign]


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """A Pillow image -> file bytes in ``fmt`` ("PNG", "JPEG", "TIFF", ...) with Pillow's ``params``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def exif_turned(image: Image.Image, fmt: str, orientation: int = 6, **params: Any) -> bytes:
    """``image`` stored as it is, tagged with EXIF orientation ``orientation`` (6: turn 90° clockwise).

    JPEG keeps the EXIF tag; Pillow's AVIF and pillow-heif's HEIC encoders move it into the
    container's ``irot``/``imir`` boxes, as phones do (pillow-heif only from EXIF bytes: given
    an ``Image.Exif``, it writes the tag alone, which HEIF readers, ours included, ignore).
    """
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **params)


def deep_heif(fmt: str, samples: np.ndarray, bits: int) -> bytes:
    """A HEIC or AVIF storing (H, W) or (H, W, 3) integer ``samples`` in 0..2**bits - 1 with ``bits`` bits.

    HEIC: pillow-heif, from its 16-bit modes (samples in the top bits), lossless; AVIF:
    OpenCV's libavif encoder, which takes the values as they are (BGR order, at quality 100).
    """
    samples = np.ascontiguousarray(samples, dtype=np.uint16)
    if fmt == "AVIF":
        pixels = samples[..., ::-1] if samples.ndim == 3 else samples
        params = [cv2.IMWRITE_AVIF_DEPTH, bits, cv2.IMWRITE_AVIF_QUALITY, 100]
        ok, data = cv2.imencode(".avif", np.ascontiguousarray(pixels), params)
        assert ok, "OpenCV could not write the AVIF"
        return data.tobytes()
    height, width = samples.shape[:2]
    mode = "RGB;16" if samples.ndim == 3 else "L;16"
    heif = pillow_heif.from_bytes(mode, (width, height), (samples << (16 - bits)).astype("<u2").tobytes())
    buffer = io.BytesIO()
    heif.save(buffer, quality=-1, chroma=444, bit_depth=bits)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB, (H, W) gray or 16-bit -> PNG bytes."""
    return encode(Image.fromarray(image), "PNG")


def jpeg_bytes(image: np.ndarray, quality: int = 92) -> bytes:
    """(H, W, 3) uint8 RGB -> JPG bytes."""
    return encode(Image.fromarray(image), "JPEG", quality=quality)


def flat_canvas(width: int = 64, height: int = 64) -> np.ndarray:
    """(H, W, 3) uint8 mid grey: the seed-0 random detector finds no face on it, so only the detector runs."""
    return np.full((height, width, 3), 127, np.uint8)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 uniform noise: the seed-0 random detector finds 2 faces at 300x400, 3 at 600x800."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def face_photo(width: int, height: int) -> np.ndarray:
    """A crop of the astronaut portrait (scikit-image, public domain) resized to (height, width, 3) RGB."""
    from skimage import data as skdata

    portrait = skdata.astronaut()[:300, 100:400]  # (300, 300, 3) RGB around the face
    return np.asarray(Image.fromarray(portrait).resize((width, height), Image.Resampling.BICUBIC))


def srgb_profile() -> bytes:
    """The sRGB ICC profile that LittleCMS builds (``ImageCms.createProfile``): an RGB profile to embed."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def cmyk_to_srgb(image: Image.Image, profile: bytes) -> np.ndarray:
    """(H, W, 3) uint8: CMYK ``image`` through ``profile`` to sRGB by the README's rule."""
    converted = ImageCms.profileToProfile(
        image,
        ImageCms.ImageCmsProfile(io.BytesIO(profile)),
        ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")),
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        outputMode="RGB",
        flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
    )
    assert converted is not None
    return np.asarray(converted)


def colour_tagged_inputs() -> list[tuple[str, bytes, bytes | None, np.ndarray]]:
    """One request's worth of inputs: (file name, bytes, the profile its output carries, its RGB).

    Flat 64x48 pictures: a JPEG with the sRGB profile (kept byte for byte), a gray PNG with a
    linear gray profile (an RGB profile with its tone curve, pixels unchanged), a CMYK JPEG of
    half-strength cyan with a CMYK profile (converted by it to sRGB, no profile) and a PNG
    without a profile (none).
    """
    size = (64, 48)
    srgb, gray, cmyk = srgb_profile(), gray_icc_profile(1.0), cmyk_icc_profile()
    cyan = Image.new("CMYK", size, (128, 0, 0, 0))
    return [
        (
            "srgb.jpg",
            encode(Image.new("RGB", size, (127,) * 3), "JPEG", quality=95, icc_profile=srgb),
            srgb,
            np.full((48, 64, 3), 127, np.uint8),
        ),
        (
            "gray.png",
            encode(Image.new("L", size, 127), "PNG", icc_profile=gray),
            rgb_profile_for_gray(gray),
            np.full((48, 64, 3), 127, np.uint8),
        ),
        ("cmyk.jpg", encode(cyan, "JPEG", quality=95, icc_profile=cmyk), None, cmyk_to_srgb(cyan, cmyk)),
        ("plain.png", png_bytes(flat_canvas(64, 48)), None, flat_canvas(64, 48)),
    ]


# -- geometry ----------------------------------------------------------------------------------


def all_levels_crops() -> np.ndarray:
    """(2, 512, 512, 3) uint8 where every channel of every face holds all 256 levels, differently."""
    levels = np.arange(512 * 512, dtype=np.int64).reshape(512, 512) % 256
    face0 = np.stack([levels, (levels * 7 + 3) % 256, 255 - levels], axis=-1)
    face1 = np.stack([(levels * 13 + 100) % 256, levels[::-1], (levels + 128) % 256], axis=-1)
    return np.stack([face0, face1]).astype(np.uint8)


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    """A (2, 3) float64 similarity: rotate by ``angle``, scale, then translate (e.g. face -> image)."""
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[cos, -sin, tx], [sin, cos, ty]], dtype=np.float64)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Random values on a coarse grid enlarged bicubically: float64 in [0, 1], smooth at ``cells`` scale."""
    coarse = rng.random((cells, cells, *shape[2:]))
    # bicubic overshoots a little; clip so that callers can scale to levels without wrapping
    return np.clip(cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


# -- golden reference outputs ------------------------------------------------------------------

# The official pipeline's outputs for two photos ship with the tests (golden/README.md says how
# they were made); the full reference set of seven, in shared/ beside the project where it is
# present, adds the other five. The subset's photos are always read from the project.
GOLDEN_SUBSET_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_FULL_DIR = PROJECT_ROOT.parent / "shared" / "reference" / "golden"


def golden_photos() -> dict[str, Path]:
    """Photo name ("01") -> its folder of official outputs, in name order."""
    folders = {folder.name: folder for folder in GOLDEN_SUBSET_DIR.iterdir() if folder.is_dir()}
    if GOLDEN_FULL_DIR.is_dir():
        for folder in GOLDEN_FULL_DIR.iterdir():
            if folder.is_dir():
                folders.setdefault(folder.name, folder)
    return dict(sorted(folders.items()))


GOLDEN_PHOTOS = golden_photos()


def golden_photo(name: str) -> np.ndarray:
    """The golden photo ``name`` (its .jpg, or its .png where it has none), BGR."""
    folder = GOLDEN_PHOTOS[name]
    path = folder / f"{name}.jpg" if (folder / f"{name}.jpg").exists() else folder / f"{name}.png"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


# -- waiting on a server -----------------------------------------------------------------------

T = TypeVar("T")


def wait_for(read: Callable[[], T], accept: Callable[[T], bool], what: str, timeout_s: float = 60.0) -> T:
    """Call ``read`` until ``accept`` takes its value, and return that value; fail after ``timeout_s``.

    A server's state settles a moment after the answer that changed it (coglet marks the slot
    free, and forwards the worker's log lines, on channels of its own): a test that reads
    ``/health-check`` or the log right after a response races with it, so it polls.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if accept(value):
            return value
        assert time.monotonic() < deadline, f"{what}: not seen within {timeout_s:.0f} s, last {value!r:.500}"
        time.sleep(0.05)


# -- processes racing on one folder ---------------------------------------------------------


def run_python(
    script: str, stdin: str | bytes = b"", env: Mapping[str, str] | None = None, timeout_s: float = 300.0
) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python process in the project, ``stdin`` on its standard input
    (text when given text); ``env`` is added to this process's. Fails on a non-zero exit."""
    completed = subprocess.run(
        [sys.executable, "-c", script],
        input=stdin,
        cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=isinstance(stdin, str),
        timeout=timeout_s,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def run_python_together(
    script: str, env: Mapping[str, str] | None = None, copies: int = 2, timeout_s: float = 600.0
) -> list[subprocess.CompletedProcess[str]]:
    """Start ``copies`` Python processes on ``script`` (dedented) at once, in the project, and wait for all.

    For the locks around a shared weights folder: the processes start together so that the
    second one arrives while the first is still at work. ``env`` is added to this process's.
    """
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    command = [sys.executable, "-c", textwrap.dedent(script)]
    processes = [
        subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(copies)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout_s)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


# -- holding the device thread --------------------------------------------------------------
GATE_POLL_S = 0.005


@dataclasses.dataclass(frozen=True)
class StandInRun(FaceBatchRun):
    """A ``FaceBatchRun`` whose device half is ``compute`` (faces -> rows); the request's half is
    the product's own. Every face finite, or with ``finite=False`` none (each is computed again
    with ``forward``)."""

    compute: Callable[[torch.Tensor], torch.Tensor] | None = None
    finite: bool = True

    def launch(self, faces: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.compute is not None
        rows = self.compute(torch.as_tensor(faces))
        return rows, (None if self.finite else torch.zeros(len(rows), dtype=torch.bool))


def stand_in_run(
    net: FaceBatchNet,
    compute: Callable[[torch.Tensor], torch.Tensor],
    to_host: bool = True,
    forward: Callable[..., torch.Tensor] | None = None,
) -> StandInRun:
    """A ``StandInRun`` of ``net``; given a ``forward`` (net, chunk), its faces are all non-finite."""
    return StandInRun(net, False, forward or nn.Identity(), nn.Identity(), to_host, compute, forward is None)


class GatedEvent:
    """A CUDA event's stand-in for ``runtime.Download``: ``synchronize`` returns once the test
    opens ``gate`` (raising ``error`` then, if one is set), and notes the threads that waited."""

    def __init__(self, error: Exception | None = None) -> None:
        self.gate = threading.Event()
        self.error = error
        self.waited_on: list[str] = []

    def synchronize(self) -> None:
        self.waited_on.append(threading.current_thread().name)
        assert self.gate.wait(60), "the test never opened the gate"
        if self.error is not None:
            raise self.error


def hold_device_until(scheduler: DeviceScheduler, requests: int, timeout_s: float = 600.0) -> None:
    """Occupy ``scheduler``'s device thread until ``requests`` requests are in progress at once
    (or ``timeout_s`` passes); the calls queued meanwhile run after, in order. Returns once
    the device thread holds the gate."""
    holding = threading.Event()

    def gate() -> None:
        holding.set()
        deadline = time.monotonic() + timeout_s
        while scheduler.in_progress < requests and time.monotonic() < deadline:
            time.sleep(GATE_POLL_S)

    # a device call waits for its answer: it is made from a thread of its own
    threading.Thread(target=scheduler.call, args=(gate,), name="device-gate", daemon=True).start()
    if not holding.wait(timeout_s):
        raise RuntimeError("the device thread never took the gate")


def requests_admitted(server_log: str) -> int:
    """How many requests the server's log shows past admission (their ``request: admitted`` lines).

    With free slots a running prediction leaves the server's health READY: this says it runs.
    """
    return sum(ADMITTED_LINE in line for line in server_log.splitlines())


def requests_finished(server_log: str, images: int) -> int:
    """How many requests of ``images`` images the server's log shows finished (their
    ``request: finished, N image(s)`` lines): a cancelled one must never get there."""
    return sum(f"{FINISHED_LINE}, {images} image(s)," in line for line in server_log.splitlines())


# -- predictors in process ------------------------------------------------------------------
# the fetch deadline of ``faceless_predictor``: the input matrix's one-byte-a-second URL
# (tests/test_bad_inputs.py) waits this long
FACELESS_FETCH_TIMEOUT_S = 3


def set_up_predictor(weights_dir: Path, max_faces: int = 1):
    """A ``predict.Predictor`` after ``setup()``, on ``weights_dir``, capped at ``max_faces`` per image."""
    import pytest

    from predict import Predictor

    with pytest.MonkeyPatch.context() as env:
        env.setenv("CODEFORMER_WEIGHTS_DIR", str(weights_dir))
        env.setenv("CODEFORMER_MAX_FACES", str(max_faces))
        env.delenv("CODEFORMER_WEIGHTS_URL", raising=False)
        predictor = Predictor()
        predictor.setup()
    return predictor
