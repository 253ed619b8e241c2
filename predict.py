"""Cog adapter: declare the inputs, read and decode the photos, call the pipeline, write JPGs.

All image work happens in ``codeformer``; this file only turns Cog inputs into arrays and
arrays into files. A request either returns one JPG per input, in input order, or fails
as a whole with a message naming the input (``images[i] (file name)``) and the reason.

What ``predict()`` receives for each image depends on the request (as coglet 0.23 does it):
- a list of URLs and data URIs only: coglet downloads them all first (a 404 fails the
  request before ``predict()``) and passes ``cog.Path`` files in the temp folder, named
  ``tmpXXXXXXXX`` + the URL's file name (``file.jpg`` for a data URI);
- a list that mixes URLs with local paths: ``cog.URLPath`` objects not yet fetched (read
  here from their stream), and the local paths as plain strings;
- in-process calls: whatever the caller passes; URL and data URI strings are fetched here.

A local path string (``cog predict --json '{"images": ["data/1.jpg"]}'``) is accepted only
when it resolves to a file inside the project folder, so that a request cannot read other
files of the server. ``pathlib.Path`` objects come from Cog's own downloads or from Python
callers, not from request JSON; they may also be Cog's downloads in the temp folder.
"""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
import tempfile
import time
import urllib.parse
from typing import TYPE_CHECKING

import numpy as np
import requests
import urllib3
from cog import BasePredictor, Input, Path, URLPath

from codeformer.config import COMPILE_BACKENDS, PROFILES, STABILITY_MODES
from codeformer.errors import CodeFormerError, ImageFailedError, InputError
from codeformer.schema import MAX_IMAGES, MIN_IMAGES

if TYPE_CHECKING:
    from codeformer import Restorer

log = logging.getLogger("codeformer.predict")

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent
# An upload this large is refused before decoding; a 40-megapixel PNG (the default
# CODEFORMER_MAX_PIXELS) is about 120 MB, so honest inputs stay far below it.
MAX_INPUT_BYTES = 256 * 1024 * 1024
URL_SCHEMES = ("http", "https", "data")
# cog.URLPath.convert() downloads into NamedTemporaryFile(suffix=<URL file name>) in the temp folder
DOWNLOAD_DIR = pathlib.Path(tempfile.gettempdir()).resolve()
COG_DOWNLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}(?P<name>.+)")


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
    if isinstance(item, URLPath):
        return _data_uri_name(item.source) if item.source.startswith("data:") else item.filename
    if isinstance(item, str) and item.startswith("data:"):
        return _data_uri_name(item)
    if isinstance(item, str) and urllib.parse.urlparse(item).scheme in URL_SCHEMES:
        return pathlib.PurePosixPath(urllib.parse.urlparse(item).path).name or item
    if isinstance(item, pathlib.Path) and pathlib.Path(item).parent == DOWNLOAD_DIR:
        downloaded = COG_DOWNLOAD_NAME.fullmatch(item.name)
        if downloaded:
            return downloaded.group("name")
    return pathlib.PurePath(str(item)).name or str(item)


def _read_stream(stream: object, label: str) -> bytes:
    data = stream.read(MAX_INPUT_BYTES + 1)  # type: ignore[attr-defined]
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{label}: the file is over {MAX_INPUT_BYTES >> 20} MB; send a smaller image")
    return data


def _read_local(item: str | pathlib.Path, label: str) -> bytes:
    candidate = pathlib.Path(item).expanduser()
    if not candidate.is_absolute():
        candidate = PROJECT_ROOT / candidate
    resolved = candidate.resolve()
    # request strings may only name project files; Path objects may also be Cog's downloads
    cog_download = (
        isinstance(item, pathlib.Path)
        and resolved.parent == DOWNLOAD_DIR
        and COG_DOWNLOAD_NAME.fullmatch(resolved.name) is not None
    )
    if not (resolved.is_relative_to(PROJECT_ROOT) or cog_download):
        raise InputError(
            f"{label}: local paths must point inside the project folder {PROJECT_ROOT}; "
            "send other files as an http(s) URL or a data URI"
        )
    if not resolved.is_file():
        raise InputError(f"{label}: no such file {resolved}")
    if resolved.stat().st_size > MAX_INPUT_BYTES:
        raise InputError(f"{label}: the file is over {MAX_INPUT_BYTES >> 20} MB; send a smaller image")
    return resolved.read_bytes()


def read_input(item: object, label: str) -> bytes:
    """The bytes of one request input (URL, data URI or local path); ``InputError`` names ``label``."""
    try:
        if isinstance(item, str) and urllib.parse.urlparse(item).scheme in URL_SCHEMES:
            item = Path.validate(item)
        elif isinstance(item, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", item):
            scheme = item.split(":", 1)[0]
            raise InputError(f"{label}: {scheme}:// is not accepted; send http(s), a data URI or a path")
        if isinstance(item, URLPath):
            return _read_stream(item.fileobj, label)
        if isinstance(item, str | pathlib.Path):
            return _read_local(item, label)
    except InputError:
        raise
    # OSError covers requests' and urllib's errors; urllib3 raises its own when a body is cut
    except (OSError, ValueError, requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise InputError(f"{label}: cannot read the file: {exc}") from exc
    raise InputError(f"{label}: expected a URL, a data URI or a path, got {type(item).__name__}")


def _stage_summary(timings: dict[str, float]) -> str:
    return " ".join(f"{stage}={ms:.0f}ms" for stage, ms in timings.items())


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load the three nets once (CUDA when present) and warm the default path."""
        # torch, OpenCV and the pipeline are imported here, not at module level, so that the
        # schema writer (python -m codeformer.schema) can read predict()'s signature cheaply
        from codeformer import Restorer
        from codeformer.compute_thread import ComputeThread
        from codeformer.runtime import autocast_dtype

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        package_logger = logging.getLogger("codeformer")
        if package_logger.level == logging.NOTSET:
            # the per-request lines are INFO; a host that configured logging at WARNING keeps them
            package_logger.setLevel(logging.INFO)
        start = time.perf_counter()
        self.restorer: Restorer = Restorer.load()
        load_ms = (time.perf_counter() - start) * 1000.0
        warmup_ms = self.restorer.warmup(profile="baseline", stability="safe", compile_backend="none")
        self._previous_output_dir: pathlib.Path | None = None
        # coglet calls predict() on threads whose malloc arenas would page-fault every CPU
        # forward's activations anew: run the pipeline on a thread of the main arena instead
        self._compute = ComputeThread() if self.restorer.device.type == "cpu" else None
        # measured here on a CPU, not in a request
        fast_dtype = (
            str(autocast_dtype(self.restorer.device)).removeprefix("torch.")
            if self.restorer.runtime.mixed_precision
            else "float32"
        )
        log.info(
            "setup: device=%s baseline=float32 fast/max_speed=%s load=%.0fms warmup=%.0fms "
            "max_pixels=%d max_faces=%d face_batch=%d",
            self.restorer.device,
            fast_dtype,
            load_ms,
            warmup_ms,
            self.restorer.limits.max_pixels,
            self.restorer.limits.max_faces,
            self.restorer.limits.face_batch,
        )

    def predict(
        self,
        # Cog reads inputs from Input() defaults; ruff's B008 only objects for the list annotation
        images: list[Path] = Input(  # noqa: B008
            description="1 to 4 photos (JPEG, PNG, WebP, BMP, TIFF). "
            "One restored JPG is returned per photo, in the same order, at the same size."
        ),
        codeformer_fidelity: float = Input(
            default=0.5,
            ge=0.0,
            le=1.0,
            description="Balance between quality and fidelity: lower gives cleaner, more "
            "generated faces; higher stays closer to the input face.",
        ),
        runtime_profile: str = Input(
            default="baseline",
            choices=list(PROFILES),
            description="baseline: float32, the reference numerics. fast: mixed precision. "
            "max_speed: mixed precision and a plain soft mask instead of face parsing at paste-back.",
        ),
        stability_mode: str = Input(
            default="safe",
            choices=list(STABILITY_MODES),
            description="safe: the nets as written. optimized: channels_last nets compiled with "
            "compile_backend (the first optimized request of a process fixes the backend).",
        ),
        compile_backend: str = Input(
            default="eager",
            choices=list(COMPILE_BACKENDS),
            description="torch.compile backend for stability_mode=optimized ('none': channels_last "
            "without compiling; cudagraphs needs a GPU). Ignored when stability_mode=safe.",
        ),
    ) -> list[Path]:
        from codeformer.imageio import decode_image, encode_jpeg

        request_start = time.perf_counter()
        self._discard_previous_outputs()
        if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
            raise InputError(f"images: send {MIN_IMAGES} to {MAX_IMAGES} images, got {len(images)}")
        # options first: a request that cannot run should not pay for downloads and decoding
        self.restorer.check_options(codeformer_fidelity, runtime_profile, stability_mode, compile_backend)

        labels = [describe(index, _input_name(item)) for index, item in enumerate(images)]
        decoded: list[np.ndarray] = []
        decode_ms: list[float] = []
        for item, label in zip(images, labels, strict=True):
            start = time.perf_counter()
            data = read_input(item, label)
            decoded.append(decode_image(data, label, self.restorer.limits.max_pixels))
            decode_ms.append((time.perf_counter() - start) * 1000.0)

        try:
            arguments = (decoded, codeformer_fidelity, runtime_profile, stability_mode, compile_backend)
            if self._compute is None:
                results = self.restorer.restore(*arguments)
            else:
                results = self._compute.call(self.restorer.restore, *arguments)
        except ImageFailedError as exc:
            raise CodeFormerError(f"{labels[exc.index]}: {exc.reason}") from exc

        output_dir = pathlib.Path(tempfile.mkdtemp(prefix="codeformer-outputs-"))
        self._previous_output_dir = output_dir
        outputs: list[Path] = []
        for index, (result, label) in enumerate(zip(results, labels, strict=True)):
            start = time.perf_counter()
            output_path = output_dir / f"restored_{index}.jpg"
            output_path.write_bytes(encode_jpeg(result.image))
            outputs.append(Path(output_path))
            timings = {"read_decode": decode_ms[index], **result.timings}
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
        log.info(
            "request: %d image(s), fidelity=%s profile=%s stability=%s%s, wall=%.0fms",
            len(images),
            codeformer_fidelity,
            runtime_profile,
            stability_mode,
            f" compile_backend={compile_backend}" if stability_mode != "safe" else "",
            (time.perf_counter() - request_start) * 1000.0,
        )
        return outputs

    def _discard_previous_outputs(self) -> None:
        # Cog has read the previous request's files by the time the next one starts (one
        # prediction at a time), so each request removes the last one's instead of leaking them.
        if self._previous_output_dir is not None:
            shutil.rmtree(self._previous_output_dir, ignore_errors=True)
            self._previous_output_dir = None
