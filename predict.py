"""Cog adapter: declare the inputs, validate the options, hand the request to the package.

``codeformer.serving.request.restore_request`` does the work, the same the command line runs;
its module docstring says what a request returns and how it fails. Its figures become the
prediction's metrics, beside ``predict_time``.

``run`` is async so that Cog runs several predictions at once (``@cog.concurrent``), each
request's blocking work on a thread of its own. Images arrive as strings: coglet hands URLs
and data URIs through unfetched (``defer_cog_fetching``, applied when this module is
imported); local paths must lie inside the project folder.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections.abc import Iterable
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import cog
from cog import BaseRunner, Input, Path

from codeformer.config import (
    COMPILE_BACKENDS,
    DEFAULT_COMPILE_BACKEND,
    DEFAULT_FIDELITY,
    DEFAULT_PROFILE,
    DEFAULT_STABILITY,
    PROFILES,
    PROJECT_ROOT,
    STABILITY_MODES,
    RequestOptions,
)
from codeformer.errors import InputError, reported_as_failure
from codeformer.progress import StepReached
from codeformer.serving.fetch import check_fetching_deferred, defer_cog_fetching
from codeformer.serving.lifecycle import InFlight, start_sweeper
from codeformer.serving.outputs import OutputFolders, new_output_dir, remove_orphaned_output_dirs
from codeformer.serving.records import SETUP_MARKER, record_line
from codeformer.serving.request import restore_request
from codeformer.serving.schema import MAX_IMAGES, MIN_IMAGES

if TYPE_CHECKING:
    from codeformer import Restorer

log = logging.getLogger("codeformer.predict")

# Predictions one worker runs at once (Cog reads it from @cog.concurrent on run()): while one
# request is in the nets, others download, decode, paste back and encode, and faces of
# different requests share a forward on a GPU (codeformer/scheduler.py). Memory stays bounded
# by pixels in flight (CODEFORMER_MAX_PIXELS_IN_FLIGHT), not by this number. 4 covers a face
# batch of 4 one-face requests; more slots only queue longer on a device that is already busy.
MAX_CONCURRENT_REQUESTS = 4
# a failed prediction's ``failed_at`` when it was refused before its first step (image count,
# options, a replica that drains)
REFUSED_STEP = "checking the request"

# coglet imports this module in its worker before it normalises any request input
defer_cog_fetching()


def _choice_input(default: str, choices: Iterable[str], description: str) -> Any:
    """A Cog input restricted to ``choices``: the served schema lists them, coglet refuses others."""
    return Input(default=default, choices=list(choices), description=description)


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load the three nets once (CUDA when present), warm the default path and, with
        ``CODEFORMER_COMPILE_BACKEND`` set, build, compile and warm the optimized nets."""
        # torch, OpenCV and the pipeline are imported here, not at module level, so that the
        # schema writer (python -m codeformer.serving.schema) can read run()'s signature cheaply
        from codeformer import Restorer, weights
        from codeformer.pipeline import pixels_on_device
        from codeformer.runtime import autocast_dtype

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        package_logger = logging.getLogger("codeformer")
        if package_logger.level == logging.NOTSET:
            # the per-request lines are INFO; a host that configured logging at WARNING keeps them
            package_logger.setLevel(logging.INFO)
        # before anything slow: a cog that would fetch URL inputs itself must not serve
        check_fetching_deferred()
        start = time.perf_counter()
        # Files present in weights/ (baked into the image) are verified, never downloaded.
        with weights.record_load_times() as load_times:
            self.restorer: Restorer = Restorer.load()
        # build: the rest of Restorer.load, i.e. constructing the nets, moving them to the
        # device, the runtime's set-up (and any download, which an image with weights never has)
        build_ms = (time.perf_counter() - start) * 1000.0 - load_times.load_ms - load_times.verify_ms
        warmup_ms = self.restorer.warmup()  # the default options' path
        fast = RequestOptions(profile=PROFILES["fast"])
        if pixels_on_device(self.restorer.settings.pixel_stages, self.restorer.device, fast):
            warmup_ms += self.restorer.warmup(fast)  # the device pixel path's kernels, max_speed's too
        # CODEFORMER_COMPILE_BACKEND set: every optimized profile's graphs compiled now, not in a request
        prepare_optimized_ms = self.restorer.prepare_optimized()
        self.output_folders = OutputFolders()
        # the last requests' files are removed when the worker exits (coglet ends it normally
        # on SIGTERM and SIGINT); folders of workers that were killed are removed here
        atexit.register(self.output_folders.discard_all)
        stale_output_dirs = remove_orphaned_output_dirs()
        # predictions in run(), for a drain before a stop (codeformer/serving/lifecycle.py)
        self.in_flight = InFlight()
        atexit.register(self.in_flight.remove)
        start_sweeper(self.remove_stale_folders)  # also when no request comes
        # measured here on a CPU, not in a request
        fast_dtype = (
            str(autocast_dtype(self.restorer.device)).removeprefix("torch.")
            if self.restorer.runtime.mixed_precision
            else "float32"
        )
        log.info(
            "setup: device=%s baseline=float32 fast/max_speed=%s build=%.0fms verify=%.0fms load=%.0fms "
            "warmup=%.0fms max_pixels=%d max_pixels_in_flight=%d max_faces=%d face_batch=%d "
            "batch_wait=%gms fetch_timeout=%gs stale_output_dirs_removed=%d compile_backend=%s "
            "prepare_optimized=%.0fms",
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
            self.restorer.settings.compile_backend or "unset",
            prepare_optimized_ms,
        )
        setup_record = {
            "cog": version("cog"),
            "coglet": version("coglet"),
            "device": str(self.restorer.device),
            "precision": {"baseline": "float32", "fast/max_speed": fast_dtype},
            "fetch_timeout_s": self.restorer.settings.fetch_timeout_s,
            "build_ms": round(build_ms, 1),
            "verify_ms": round(load_times.verify_ms, 1),
            "load_ms": round(load_times.load_ms, 1),
            "warmup_ms": round(warmup_ms, 1),
            "prepare_optimized_ms": round(prepare_optimized_ms, 1),
        }
        # the same figures as JSON, for programs (codeformer.serving.records reads them back)
        log.info("%s", record_line(SETUP_MARKER, setup_record))

    @cog.concurrent(max=MAX_CONCURRENT_REQUESTS)
    async def run(
        self,
        # Cog reads inputs from Input() defaults; ruff's B008 only objects for the list annotation
        images: list[Path] = Input(  # noqa: B008
            description="1 to 4 photos (JPEG, PNG, WebP, BMP, TIFF, HEIC, AVIF). "
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
            "measured on CPU: channels_last without compiling; cudagraphs and inductor-cudagraphs "
            "need a GPU). "
            "Ignored when stability_mode=safe.",
        ),
    ) -> list[Path]:
        request_start = time.perf_counter()
        cancel = threading.Event()
        reached = StepReached()  # the request's steps, as the progress bar names them
        try:
            with self.in_flight.request(cancel):  # fails at once while the replica drains
                if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
                    raise InputError(f"images: send {MIN_IMAGES} to {MAX_IMAGES} images, got {len(images)}")
                # options first, parsed once: a request that cannot run should not pay for downloads
                options = RequestOptions.parse(
                    codeformer_fidelity, runtime_profile, stability_mode, compile_backend
                )
                self.restorer.check_options(options)
                # to_thread copies the context: coglet routes the thread's log lines and metrics
                # to this prediction
                return await asyncio.to_thread(
                    self.serve_request, list(images), options, cancel, request_start, reached
                )
        except asyncio.CancelledError:
            # a real cancel: the thread stops at its next device call, holds no output, and
            # frees its pixels
            cancel.set()
            raise
        except Exception as exc:
            # coglet returns the metrics recorded before a failure: say how far the request got
            self.record_metric("image_count", len(images))
            self.record_metric("failed_at", reached.name or REFUSED_STEP)
            raise reported_as_failure(exc) from exc

    def serve_request(
        self,
        images: list[Any],
        options: RequestOptions,
        cancel: threading.Event | None = None,
        request_start: float | None = None,
        reached: StepReached | None = None,
    ) -> list[Path]:
        """The blocking part of ``run``: the request (``restore_request``), then its JPGs as
        files and its figures as the prediction's metrics. ``reached`` notes each step as it
        starts, for a failed request's ``failed_at``."""
        from codeformer.scheduler import check_cancel

        self.remove_stale_folders()
        restored = restore_request(
            self.restorer, images, options, cancel, PROJECT_ROOT, request_start, reached or StepReached()
        )
        check_cancel(cancel)  # nobody will read the files of a cancelled request
        output_dir = new_output_dir()
        outputs = [Path(output_dir / f"restored_{index}.jpg") for index in range(len(restored.jpgs))]
        for output, jpg in zip(outputs, restored.jpgs, strict=True):
            output.write_bytes(jpg)
        self.output_folders.returned(output_dir)
        # Cog returns them in the prediction's "metrics", beside its predict_time. This thread
        # records into the prediction's scope: to_thread copied run()'s context, where coglet
        # set it; outside a prediction (in-process callers) record_metric does nothing.
        for name, value in restored.metrics.items():
            self.record_metric(name, value)
        return outputs

    def remove_stale_folders(self) -> None:
        """Remove this worker's output folders that Cog has read, and coglet's old folders of its own."""
        self.output_folders.discard_expired()
        self.in_flight.remove_stale_prediction_dirs()
