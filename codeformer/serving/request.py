"""One request, from its inputs to JPG bytes: name, read, admit, decode, restore, encode.

``restore_request`` serves ``predict.py`` (Cog) and ``python -m codeformer``. It returns one JPG
per input, in input order, with the request's figures (``request_metrics``), or fails as a
whole with a ``CodeFormerError`` naming the input (``images[i] (file name): reason``).

An input is a string or a ``pathlib.Path``: http(s) URLs and data URIs are fetched by
``codeformer.serving.fetch`` under one deadline for the request; a local path is read only
inside ``local_root`` when it is set (the server), so that a request cannot read other files.
A request holds its images' pixels (``Restorer.admission``) from decode to encode; a set
``cancel`` event stops it at its next device call. It logs ``request: admitted`` when its work
starts, one line per image, and ``request: finished``. The rules in full: docs/inputs.md and
docs/serving.md.
"""

from __future__ import annotations

import logging
import pathlib
import re
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from codeformer.config import PROJECT_ROOT, RequestOptions
from codeformer.errors import CodeFormerError, ImageFailedError, InputError, labelled
from codeformer.progress import Progress, request_steps
from codeformer.serving.fetch import MAX_INPUT_BYTES, Deadline, Dialer, fetch, is_remote

if TYPE_CHECKING:
    from codeformer.pipeline import Restorer

log = logging.getLogger("codeformer.predict")

URL_LIKE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
Item = str | pathlib.Path
# how the two per-request log lines start: the tests wait on the first to know that a request
# runs, and look for the second to know that one finished
ADMITTED_LINE = "request: admitted"
FINISHED_LINE = "request: finished"


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


def input_name(item: object) -> str:
    """The file name an input goes by in messages: a data URI's ``name=``, a URL's or path's last part."""
    text = str(item)
    if text.startswith("data:"):
        return _data_uri_name(text)
    if URL_LIKE.match(text):
        return pathlib.PurePosixPath(urllib.parse.urlsplit(text).path).name or text
    return pathlib.PurePath(text).name or text


def _read_local(item: Item, local_root: pathlib.Path | None) -> bytes:
    candidate = pathlib.Path(item).expanduser()
    if local_root is not None and not candidate.is_absolute():
        candidate = local_root / candidate
    resolved = candidate.resolve()
    # the messages name no server folder: the client sent the path, the label names the file
    if local_root is not None and not resolved.is_relative_to(local_root):
        raise InputError(
            "local paths must point inside the project folder (e.g. data/1.jpg); "
            "send other files as an http(s) URL or a data URI"
        )
    if not resolved.is_file():
        raise InputError("no such file" + (" in the project folder" if local_root is not None else ""))
    if resolved.stat().st_size > MAX_INPUT_BYTES:
        raise InputError(f"the file is over {MAX_INPUT_BYTES >> 20} MB; send a smaller image")
    return resolved.read_bytes()


def read_input(
    item: object,
    deadline: Deadline,
    dialer: Dialer,
    local_root: pathlib.Path | None = PROJECT_ROOT,
) -> bytes:
    """The bytes of one request input (URL, data URI or local path); ``InputError`` saying why not."""
    if isinstance(item, str) and is_remote(item):
        return fetch(item, deadline, dialer)
    if isinstance(item, str) and URL_LIKE.match(item):
        scheme = item.split(":", 1)[0]
        raise InputError(f"{scheme}:// is not accepted; send http(s), a data URI or a path")
    if isinstance(item, str | pathlib.Path):
        return _read_local(item, local_root)
    raise InputError(f"expected a URL, a data URI or a path, got {type(item).__name__}")


def _stage_summary(timings: dict[str, float]) -> str:
    return " ".join(f"{stage}={ms:.0f}ms" for stage, ms in timings.items())


def request_metrics(
    images: Sequence[dict[str, Any]],
    options: RequestOptions,
    admission_wait_ms: float,
    wall_ms: float,
    shared_forwards: int = 0,
    admission_pixels: int = 0,
) -> dict[str, Any]:
    """One request's figures, JSON-ready: the prediction's Cog metrics (metric name -> value).

    ``images``: per input, in order, ``label``, ``width``, ``height``, ``faces_found``,
    ``faces_restored`` and ``stages_ms`` (stage -> milliseconds; Cog returns an object's keys
    sorted, the stages run in the pipeline's order: read_decode, prepare, detect, align,
    restore, parse, paste, resize, encode). Milliseconds are rounded to 0.1 ms; the log lines
    round the same figures to 1 ms.
    ``admission_pixels``: the pixels the request was admitted with (its images' sizes from
    their headers), which it held in flight from decode to encode.
    ``shared_forwards``: the request's CodeFormer/ParseNet forwards that also ran other
    requests' faces (``DeviceScheduler.shared_forwards``). It is the request's, not an
    image's: the pipeline sends all of a request's faces to CodeFormer as one call.
    ``options``: the inputs that ran, under their input names; ``compile_backend`` is
    ``"none"`` in the safe mode, which compiles nothing whatever the request said.
    The names follow Cog's metric rules (letters, digits and underscores, none reserved).
    """
    return {
        "images": [
            {**image, "stages_ms": {stage: round(ms, 1) for stage, ms in image["stages_ms"].items()}}
            for image in images
        ],
        "admission_pixels": admission_pixels,
        "admission_wait_ms": round(admission_wait_ms, 1),
        "shared_forwards": shared_forwards,
        "wall_ms": round(wall_ms, 1),
        "options": {
            "codeformer_fidelity": options.fidelity,
            "runtime_profile": options.profile.name,
            "stability_mode": options.stability.name,
            "compile_backend": options.compile_backend if options.stability.compiled else "none",
        },
    }


@dataclass(frozen=True)
class RestoredRequest:
    """What ``restore_request`` returns."""

    jpgs: list[bytes]  # one per input, in input order
    metrics: dict[str, Any]  # the request's figures (``request_metrics``)


def restore_request(
    restorer: Restorer,
    items: Sequence[object],
    options: RequestOptions,
    cancel: threading.Event | None = None,
    local_root: pathlib.Path | None = PROJECT_ROOT,
    request_start: float | None = None,
    progress: Progress | None = None,
) -> RestoredRequest:
    """One JPG per input, in order, and the request's figures: fetch, admit, decode, restore,
    encode, on the calling thread.

    ``progress`` (``codeformer.progress``) is told each step as it starts, ended even on failure.
    """
    progress = progress or Progress()
    progress.begin(request_steps(len(items)))
    try:
        return _restore_request(restorer, items, options, cancel, local_root, request_start, progress)
    finally:
        progress.end()


def _restore_request(
    restorer: Restorer,
    items: Sequence[object],
    options: RequestOptions,
    cancel: threading.Event | None,
    local_root: pathlib.Path | None,
    request_start: float | None,
    progress: Progress,
) -> RestoredRequest:
    from codeformer.imageio import DecodedImage, decode_header, encode_jpeg, read_header
    from codeformer.scheduler import check_cancel

    request_start = time.perf_counter() if request_start is None else request_start
    settings = restorer.settings
    labels = [describe(index, input_name(item)) for index, item in enumerate(items)]
    deadline = Deadline.after(settings.fetch_timeout_s)
    dialer = Dialer(allow_private=settings.allow_private_urls)
    stage_ms: list[dict[str, float]] = [{} for _ in items]
    # each input is read and its header parsed once (the pixels this request will hold), then
    # decoded from there; every InputError on the way is labelled here, and only here
    headers = []
    for item, label, timings in zip(items, labels, stage_ms, strict=True):
        check_cancel(cancel)
        progress.step(f"{label}: read")
        start = time.perf_counter()
        with labelled(label):
            headers.append(read_header(read_input(item, deadline, dialer, local_root)))
        timings["read_decode"] = (time.perf_counter() - start) * 1000.0
    pixels = sum(header.pixel_count for header in headers)

    with restorer.admission.hold(pixels, cancel) as admission_ms:
        # progress for the operator (and the tests): the request is past its downloads
        in_flight = restorer.admission.in_flight
        log.info(
            "%s, %d image(s), %.1f MP, %.1f MP in flight after a %.0f ms wait",
            ADMITTED_LINE,
            len(items),
            pixels / 1e6,
            in_flight / 1e6,
            admission_ms,
        )
        decoded: list[DecodedImage] = []
        for header, label, timings in zip(headers, labels, stage_ms, strict=True):
            start = time.perf_counter()
            with labelled(label):
                decoded.append(decode_header(header, settings.max_pixels))
            timings["read_decode"] += (time.perf_counter() - start) * 1000.0
        del headers
        shared_before = restorer.scheduler.shared_forwards()
        try:
            results = restorer.restore(decoded, options, cancel, progress, labels)  # checked when decoded
        except ImageFailedError as exc:
            raise CodeFormerError(f"{', '.join(labels[i] for i in exc.indices)}: {exc.reason}") from exc
        shared_forwards = restorer.scheduler.shared_forwards() - shared_before
        profiles = [image.icc_profile for image in decoded]  # the colour profile each output carries
        del decoded

        jpgs: list[bytes] = []
        image_figures: list[dict[str, Any]] = []
        for result, label, profile, timings in zip(results, labels, profiles, stage_ms, strict=True):
            progress.step(f"{label}: encode")
            start = time.perf_counter()
            jpgs.append(encode_jpeg(result.image, icc_profile=profile))
            timings.update(result.timings)
            timings["encode"] = (time.perf_counter() - start) * 1000.0
            height, width = result.image.shape[:2]
            image_figures.append(
                {
                    "label": label,
                    "width": width,
                    "height": height,
                    "faces_found": len(result.faces) + result.faces_dropped,
                    "faces_restored": len(result.faces),
                    "stages_ms": dict(timings),
                }
            )
            log.info(
                "%s: %dx%d, faces found=%d restored=%d, %s, total=%.0fms",
                label,
                width,
                height,
                len(result.faces) + result.faces_dropped,
                len(result.faces),
                _stage_summary(timings),
                sum(timings.values()),
            )
    wall_ms = (time.perf_counter() - request_start) * 1000.0
    log.info(
        "%s, %d image(s), fidelity=%s profile=%s stability=%s%s, admission_wait=%.0fms, wall=%.0fms",
        FINISHED_LINE,
        len(items),
        options.fidelity,
        options.profile.name,
        options.stability.name,
        f" compile_backend={options.compile_backend}" if options.stability.compiled else "",
        admission_ms,
        wall_ms,
    )
    return RestoredRequest(
        jpgs, request_metrics(image_figures, options, admission_ms, wall_ms, shared_forwards, pixels)
    )
