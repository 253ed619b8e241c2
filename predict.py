"""Cog adapter: declare the inputs, read and decode the photos, call the pipeline, write JPGs.

All image work happens in ``codeformer``; this file only turns Cog inputs into arrays and
arrays into files. A request either returns one JPG per input, in input order, or fails
as a whole with a message naming the input (``images[i] (file name)``) and the reason.

``predict`` is async so that Cog can run several predictions at once (``concurrency: max``
in cog.yaml): each request's blocking work (fetch, decode, pipeline, encode) runs on a
thread of its own, the device work of all of them through the Restorer's one scheduler
(``codeformer.scheduler``), and a request is admitted to decoding only while the pixels
in flight stay under ``CODEFORMER_MAX_PIXELS_IN_FLIGHT``. A cancel stops its own request
at its next device call and touches no other.

Each image arrives as a string (``codeformer.fetch.defer_cog_fetching``, applied when
this module is imported, stops coglet from downloading URLs itself):
- an http(s) URL or a data URI: fetched by ``codeformer.fetch`` under one deadline for the
  request, with a size cap and checked redirects;
- a local path (``cog predict --json '{"images": ["data/1.jpg"]}'``): accepted only when it
  resolves to a file inside the project folder, so that a request cannot read other files
  of the server. Python callers may pass ``pathlib.Path`` objects under the same rule.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import pathlib
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from cog import BasePredictor, Input, Path

from codeformer.config import (
    COMPILE_BACKENDS,
    DEFAULT_COMPILE_BACKEND,
    DEFAULT_FIDELITY,
    DEFAULT_PROFILE,
    DEFAULT_STABILITY,
    PROFILES,
    STABILITY_MODES,
    RequestOptions,
)
from codeformer.errors import CodeFormerError, ImageFailedError, InputError
from codeformer.fetch import MAX_INPUT_BYTES, Deadline, defer_cog_fetching, fetch, is_remote
from codeformer.outputs import OutputFolders, new_output_dir, remove_orphaned_output_dirs
from codeformer.schema import MAX_IMAGES, MIN_IMAGES

if TYPE_CHECKING:
    from codeformer import Restorer

log = logging.getLogger("codeformer.predict")

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent
URL_LIKE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")

# coglet imports this module in its worker before it normalises any request input
defer_cog_fetching()


def describe(index: int, name: str) -> str:
    """How errors and logs name an input: ``images[1] (corrupt.jpg)``."""
    return f"images[{index}] ({name})"


def _data_uri_name(uri: str) -> str:
    """The ``name=``/``filename=`` parameter of a data URI if it has one, else its media type."""
    header = uri.split(",", 1)[0].removeprefix("data:")
    media_type, *parameters = header.split(";")
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        if key.strip().lower() in ("name", "filename") and value:
            return urllib.parse.unquote(value)
    return f"data URI, {media_type or 'text/plain'}"


def _input_name(item: object) -> str:
    text = str(item)
    if text.startswith("data:"):
        return _data_uri_name(text)
    if URL_LIKE.match(text):
        return pathlib.PurePosixPath(urllib.parse.urlsplit(text).path).name or text
    return pathlib.PurePath(text).name or text


def _read_local(item: str | pathlib.Path) -> bytes:
    candidate = pathlib.Path(item).expanduser()
    if not candidate.is_absolute():
        candidate = PROJECT_ROOT / candidate
    resolved = candidate.resolve()
    # the messages name no server folder: the client sent the path, the label names the file
    if not resolved.is_relative_to(PROJECT_ROOT):
        raise InputError(
            "local paths must point inside the project folder (e.g. data/1.jpg); "
            "send other files as an http(s) URL or a data URI"
        )
    if not resolved.is_file():
        raise InputError("no such file in the project folder")
    if resolved.stat().st_size > MAX_INPUT_BYTES:
        raise InputError(f"the file is over {MAX_INPUT_BYTES >> 20} MB; send a smaller image")
    return resolved.read_bytes()


def read_input(item: object, label: str, deadline: Deadline) -> bytes:
    """The bytes of one request input (URL, data URI or local path); ``InputError`` names ``label``."""
    try:
        if isinstance(item, str) and is_remote(item):
            return fetch(item, deadline)
        if isinstance(item, str) and URL_LIKE.match(item):
            scheme = item.split(":", 1)[0]
            raise InputError(f"{scheme}:// is not accepted; send http(s), a data URI or a path")
        if isinstance(item, str | pathlib.Path):
            return _read_local(item)
        raise InputError(f"expected a URL, a data URI or a path, got {type(item).__name__}")
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from None


def _choice_input(default: str, choices: Iterable[str], description: str) -> Any:
    """A Cog input restricted to ``choices``: the served schema lists them, coglet refuses others."""
    return Input(default=default, choices=list(choices), description=description)


def _stage_summary(timings: dict[str, float]) -> str:
    return " ".join(f"{stage}={ms:.0f}ms" for stage, ms in timings.items())


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load the three nets once (CUDA when present) and warm the default path."""
        # torch, OpenCV and the pipeline are imported here, not at module level, so that the
        # schema writer (python -m codeformer.schema) can read predict()'s signature cheaply
        from codeformer import Restorer, weights
        from codeformer.runtime import autocast_dtype

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        package_logger = logging.getLogger("codeformer")
        if package_logger.level == logging.NOTSET:
            # the per-request lines are INFO; a host that configured logging at WARNING keeps them
            package_logger.setLevel(logging.INFO)
        start = time.perf_counter()
        # Files present in weights/ (baked into the image) are verified, never downloaded.
        with weights.record_load_times() as load_times:
            self.restorer: Restorer = Restorer.load()
        # build: the rest of Restorer.load, i.e. constructing the nets, moving them to the
        # device, the runtime's set-up (and any download, which an image with weights never has)
        build_ms = (time.perf_counter() - start) * 1000.0 - load_times.load_ms - load_times.verify_ms
        warmup_ms = self.restorer.warmup()  # the default options' path
        self.output_folders = OutputFolders()
        # the last requests' files are removed when the worker exits (coglet ends it normally
        # on SIGTERM and SIGINT); folders of workers that were killed are removed here
        atexit.register(self.output_folders.discard_all)
        stale_output_dirs = remove_orphaned_output_dirs()
        # measured here on a CPU, not in a request
        fast_dtype = (
            str(autocast_dtype(self.restorer.device)).removeprefix("torch.")
            if self.restorer.runtime.mixed_precision
            else "float32"
        )
        log.info(
            # load=...ms warmup=...ms stay adjacent: benchmarks/server_log.py reads them
            "setup: device=%s baseline=float32 fast/max_speed=%s build=%.0fms verify=%.0fms load=%.0fms "
            "warmup=%.0fms max_pixels=%d max_pixels_in_flight=%d max_faces=%d face_batch=%d "
            "batch_wait=%gms fetch_timeout=%gs stale_output_dirs_removed=%d",
            self.restorer.device,
            fast_dtype,
            build_ms,
            load_times.verify_ms,
            load_times.load_ms,
            warmup_ms,
            self.restorer.settings.max_pixels,
            self.restorer.settings.max_pixels_in_flight,
            self.restorer.settings.max_faces,
            self.restorer.settings.face_batch,
            self.restorer.settings.batch_wait_ms,
            self.restorer.settings.fetch_timeout_s,
            stale_output_dirs,
        )

    async def predict(
        self,
        # Cog reads inputs from Input() defaults; ruff's B008 only objects for the list annotation
        images: list[Path] = Input(  # noqa: B008
            description="1 to 4 photos (JPEG, PNG, WebP, BMP, TIFF). "
            "One restored JPG is returned per photo, in the same order, at the same size."
        ),
        codeformer_fidelity: float = Input(
            default=DEFAULT_FIDELITY,
            ge=0.0,
            le=1.0,
            description="Balance between quality and fidelity: lower gives cleaner, more "
            "generated faces; higher stays closer to the input face.",
        ),
        runtime_profile: str = _choice_input(
            DEFAULT_PROFILE,
            PROFILES,
            "baseline: float32, the reference numerics. fast: mixed precision. "
            "max_speed: mixed precision and a plain soft mask instead of face parsing at paste-back.",
        ),
        stability_mode: str = _choice_input(
            DEFAULT_STABILITY,
            STABILITY_MODES,
            "safe: the nets as written. optimized: channels_last nets compiled with "
            "compile_backend (the first optimized request of a process fixes the backend).",
        ),
        compile_backend: str = _choice_input(
            DEFAULT_COMPILE_BACKEND,
            COMPILE_BACKENDS,
            "torch.compile backend for stability_mode=optimized ('none', the default and fastest "
            "measured on CPU: channels_last without compiling; cudagraphs needs a GPU). "
            "Ignored when stability_mode=safe.",
        ),
    ) -> list[Path]:
        request_start = time.perf_counter()
        if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
            raise InputError(f"images: send {MIN_IMAGES} to {MAX_IMAGES} images, got {len(images)}")
        # options first, parsed once: a request that cannot run should not pay for downloads
        options = RequestOptions.parse(codeformer_fidelity, runtime_profile, stability_mode, compile_backend)
        self.restorer.check_options(options)
        cancel = threading.Event()
        # to_thread copies the context: coglet routes the thread's log lines to this prediction
        work = asyncio.to_thread(self.serve_request, list(images), options, cancel, request_start)
        try:
            return await work
        except asyncio.CancelledError:
            # the thread stops at its next device call, holds no output, and frees its pixels
            cancel.set()
            raise

    def serve_request(
        self,
        images: list[Any],
        options: RequestOptions,
        cancel: threading.Event | None = None,
        request_start: float | None = None,
    ) -> list[Path]:
        """The blocking part of ``predict``: fetch, admit, decode, restore, encode, on the calling thread."""
        from codeformer.imageio import decode_image, encode_jpeg, read_size
        from codeformer.scheduler import check_cancel

        request_start = time.perf_counter() if request_start is None else request_start
        self.output_folders.discard_expired()
        labels = [describe(index, _input_name(item)) for index, item in enumerate(images)]
        deadline = Deadline.after(self.restorer.settings.fetch_timeout_s)
        stage_ms: list[dict[str, float]] = [{} for _ in images]
        files: list[bytes] = []
        for item, label, timings in zip(images, labels, stage_ms, strict=True):
            check_cancel(cancel)
            start = time.perf_counter()
            files.append(read_input(item, label, deadline))
            timings["read_decode"] = (time.perf_counter() - start) * 1000.0
        # each header once more (decode_image reads it too): the pixels this request will hold
        pixels = 0
        for data, label in zip(files, labels, strict=True):
            _, width, height = read_size(data, label)
            pixels += width * height

        with self.restorer.admission.hold(pixels, cancel) as admission_ms:
            # progress for the operator (and the tests): the request is past its downloads
            log.info(
                "request: admitted, %d image(s), %.1f MP, %.1f MP in flight after a %.0f ms wait",
                len(images),
                pixels / 1e6,
                self.restorer.admission.in_flight / 1e6,
                admission_ms,
            )
            decoded: list[np.ndarray] = []
            for data, label, timings in zip(files, labels, stage_ms, strict=True):
                start = time.perf_counter()
                decoded.append(decode_image(data, label, self.restorer.settings.max_pixels))
                timings["read_decode"] += (time.perf_counter() - start) * 1000.0
            del files
            try:
                results = self.restorer.restore(decoded, options, cancel)
            except ImageFailedError as exc:
                raise CodeFormerError(f"{', '.join(labels[i] for i in exc.indices)}: {exc.reason}") from exc
            del decoded

            output_dir = new_output_dir()
            outputs: list[Path] = []
            try:
                for index, (result, label) in enumerate(zip(results, labels, strict=True)):
                    start = time.perf_counter()
                    output_path = output_dir / f"restored_{index}.jpg"
                    output_path.write_bytes(encode_jpeg(result.image))
                    outputs.append(Path(output_path))
                    timings = {**stage_ms[index], **result.timings}
                    timings["encode"] = (time.perf_counter() - start) * 1000.0
                    height, width = result.image.shape[:2]
                    log.info(
                        "%s: %dx%d, faces found=%d kept=%d, %s, total=%.0fms",
                        label,
                        width,
                        height,
                        len(result.faces) + result.faces_dropped,
                        len(result.faces),
                        _stage_summary(timings),
                        sum(timings.values()),
                    )
                check_cancel(cancel)  # nobody will read the files of a cancelled request
            finally:
                if cancel is not None and cancel.is_set():
                    shutil.rmtree(output_dir, ignore_errors=True)
                else:
                    self.output_folders.returned(output_dir)
        log.info(
            "request: %d image(s), fidelity=%s profile=%s stability=%s%s, admission_wait=%.0fms, wall=%.0fms",
            len(images),
            options.fidelity,
            options.profile.name,
            options.stability.name,
            f" compile_backend={options.compile_backend}" if options.stability.compiled else "",
            admission_ms,
            (time.perf_counter() - request_start) * 1000.0,
        )
        return outputs
