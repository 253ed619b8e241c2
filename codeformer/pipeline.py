"""The restoration pipeline: prepare -> detect -> align -> restore -> parse -> paste back -> resize.

``Restorer`` holds the models and nothing per request: every call gets its images and
options as arguments, so one warm process serves any sequence of requests, and several at
once: ``restore`` may be called from many threads. Host stages (prepare, align, paste-back,
resize) run on the caller's thread; every torch call goes through the Restorer's
``DeviceScheduler`` (``codeformer.scheduler``), one at a time on its device thread, with faces
of different calls sharing CodeFormer/ParseNet forwards of up to ``Settings.face_batch`` faces.
The detector and the parser are split into their host and device steps, so that off the CPU
the device thread does device work only.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from codeformer import weights
from codeformer.config import (
    FACE_SIZE,
    GRAPH_REPLAYING_BACKENDS,
    PROFILES,
    STABILITY_MODES,
    RequestOptions,
    Settings,
)
from codeformer.device_faults import out_of_memory_reason, require_cuda
from codeformer.errors import CodeFormerError, ConfigError, ImageFailedError, InputError, RequestCancelled
from codeformer.host_memory import device_thread_starter
from codeformer.image_sizes import DETECTOR_SHORT_SIDE, check_image_size
from codeformer.imageio import DecodedImage
from codeformer.progress import Progress
from codeformer.runtime import (
    Download,
    Nets,
    Runtime,
    cuda_numerics,
    downloads,
    load_compile_cache,
    pick_device,
    save_compile_cache,
    staged,
    upload,
)
from codeformer.scheduler import DeviceScheduler, PixelBudget
from codeformer.stages.align import AlignedFaces, align_faces, estimate_affines, invert_affines
from codeformer.stages.detect import Detections, FaceDetector
from codeformer.stages.device_paste import (
    PastePlan,
    blend_and_resize,
    edge_widths,
    paste_and_resize_tensor,
    plan_paste,
)
from codeformer.stages.device_warp import (
    detector_input_tensor,
    gray_sums_tensor,
    warp_crops_tensor,
    working_image_tensor,
)
from codeformer.stages.face_batch import FaceBatchRun
from codeformer.stages.parse import FaceMasks, FaceParser, face_pixels_to_masks
from codeformer.stages.paste import paste_faces
from codeformer.stages.prepare import (
    is_gray,
    is_gray_from_sums,
    to_working_image,
)
from codeformer.stages.restore import FaceRestorer, RestoredFaces

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = RequestOptions()  # frozen: safe as a default argument

T = TypeVar("T")

# The stages whose calls batch across requests: the first element of their batch keys, and
# what a request tells the scheduler it has passed (DeviceScheduler.finished)
RESTORE_STAGE, PARSE_STAGE = "restore", "parse"

# docs/reference.md §5.5: 0.2989 R + 0.5870 G + 0.1140 B
GRAY_WEIGHTS_BGR = np.array([0.1140, 0.5870, 0.2989])


@dataclass(frozen=True)
class Face:
    """One detected face, in input-image pixel coordinates."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float  # detector face probability in (0.8, 1]
    landmarks: np.ndarray  # (5, 2): eyes, nose, mouth corners (image-left first)


@dataclass
class RestoreResult:
    image: np.ndarray  # (H, W, 3) uint8 BGR, the input's size
    faces: list[Face]
    faces_dropped: int  # detections over Settings.max_faces, lowest scores first
    working_size: tuple[int, int]  # (H, W) the pipeline ran at (docs/reference.md §4.1)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds


@dataclass
class _Stages:
    detector: FaceDetector
    restorer: FaceRestorer
    parser: FaceParser


def pixels_on_device(setting: str, device: torch.device, options: RequestOptions) -> bool:
    """Whether a request's pixel stages run on the nets' device: the device pixel path.

    The path: one upload of each decoded image; the working image, the detector's input,
    the aligned crops, the parse masks, paste-back and the final resize on the device
    (``codeformer.stages.device_warp``, ``device_paste``); one download of the finished
    pixels. Only the landmark fit (``estimate_affines``) and the encode stay on the host.
    Its stages are within a level of the host stages (tests/test_device_warp.py,
    test_device_paste.py), not bit-identical, so baseline, whose promise is the official
    output, always takes the host stages. For fast and max_speed: ``setting``
    (``Settings.pixel_stages``) ``auto`` takes the path on CUDA, where host pixel work
    dominated a request, and not on a CPU, where the host stages are the faster OpenCV
    kernels; ``host`` and ``device`` force it off and on.
    """
    if not options.profile.mixed_precision:
        return False
    if setting == "auto":
        return device.type == "cuda"
    return setting == "device"


@dataclass(frozen=True)
class _Call:
    """What one ``restore`` call carries to every stage."""

    stages: _Stages
    options: RequestOptions
    mixed_precision: bool
    cancel: threading.Event | None
    progress: Progress
    labels: Sequence[str]  # each image's name in its progress steps, ``images[0] (photo.jpg)``
    fast_math: bool  # the profile trades precision for speed: on CUDA, TF32 and cuDNN autotuning
    pixels_on_device: bool  # the device pixel path (``pixels_on_device``)

    def on_device(self, function: Callable[..., T], device: torch.device) -> Callable[..., T]:
        """``function`` run with this call's CUDA numerics (``runtime.cuda_numerics``)."""

        def run(*args: Any) -> T:
            with cuda_numerics(device, self.fast_math):
                return function(*args)

        return run


@dataclass
class _ImageWork:
    """What one image carries between stages within a call."""

    working: np.ndarray | torch.Tensor  # (h, w, 3) uint8 BGR; a device tensor on the device pixel path
    factor: float
    gray: bool
    detections: Detections
    aligned: AlignedFaces  # the (F, 512, 512, 3) uint8 crops and the transforms back
    timings: dict[str, float]


def _checked_image(index: int, image: object, max_pixels: int) -> np.ndarray:
    """The library's one check of an input image: (H, W, 3) uint8 BGR within the size limits.

    ``InputError`` for an array that is not such an image; ``ImageFailedError`` naming
    ``index`` for one over ``check_image_size``'s limits, before any copy of it is made. A
    read-only or non-contiguous array (a flipped view, a channel slice) is copied once here,
    so that every later stage, and ``torch.from_numpy``, can take it as it is.
    """
    if not (
        isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    ):
        raise InputError(f"image {index}: expected an (H, W, 3) uint8 BGR array")
    try:
        check_image_size(*image.shape[:2], max_pixels)
    except InputError as exc:
        raise ImageFailedError(index, str(exc)) from exc
    if not (image.flags.c_contiguous and image.flags.writeable):
        image = image.copy()  # C order, writable
    return image


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0


def _call(function: Callable[..., T], *args: object, cancel: threading.Event | None = None) -> T:
    """``function(*args)`` on the calling thread (``cancel`` is for the scheduler's signature)."""
    return function(*args)


def to_gray_faces(faces: np.ndarray) -> np.ndarray:
    """(F, 512, 512, 3) uint8 BGR -> float64 gray on 3 channels (docs/reference.md §5.5, no AdaIN)."""
    gray = faces.astype(np.float64) @ GRAY_WEIGHTS_BGR
    return np.repeat(gray[..., None], 3, axis=-1)


def to_gray_faces_tensor(faces: torch.Tensor) -> torch.Tensor:
    """``to_gray_faces`` on ``faces``' device: (F, 512, 512, 3) uint8 -> float64, in new memory."""
    weights = torch.tensor(GRAY_WEIGHTS_BGR, dtype=torch.float64).to(faces.device)  # 24 bytes up
    gray = faces.to(torch.float64) @ weights  # (F, 512, 512)
    return gray[..., None].expand(*gray.shape, 3).contiguous()


# CodeFormer's two graphs per batch class: with fusion (every w > 0: w is a graph input) and
# without (w = 0)
WARM_FIDELITIES = (0.5, 0.0)


def warm_compiled(
    restorer: FaceRestorer,
    parser: FaceParser,
    mixed_precision: bool,
    backend: str,
    face_size: int = FACE_SIZE,
) -> None:
    """Run every graph a request can reach on the compiled ``restorer`` and ``parser`` once: compile them now.

    A request's chunks are padded to one of ``FaceBatchNet.chunk_sizes`` (1, 2, 4 by default),
    each a graph of its own; CodeFormer has one graph with fusion and one without
    (``WARM_FIDELITIES``). Nothing may fall back quietly: dynamo's recompile limit, and under a
    graph-replaying backend a graph it would run without CUDA graphs, raise ``ConfigError``
    naming the backend.
    """
    from torch._dynamo.exc import FailOnRecompileLimitHit
    from torch._dynamo.utils import counters

    skips_before = counters["inductor"]["cudagraph_skips"]
    # (B, H, W, 3) uint8 BGR
    crops = torch.full((restorer.batch_size, face_size, face_size, 3), 127, dtype=torch.uint8)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for batch in restorer.chunk_sizes:
                for fidelity in WARM_FIDELITIES:
                    restorer.restore_tensor(crops[:batch], fidelity, mixed_precision)
                parser.labels_tensor(crops[:batch], mixed_precision)
    except FailOnRecompileLimitHit as exc:
        raise ConfigError(
            f"compile_backend={backend!r}: dynamo's recompile limit was reached while compiling the "
            "optimized nets, so some would run eager; see the log's 'hit config.recompile_limit' line"
        ) from exc
    skipped = counters["inductor"]["cudagraph_skips"] - skips_before
    if backend in GRAPH_REPLAYING_BACKENDS and skipped:
        raise ConfigError(
            f"compile_backend={backend!r} would run {skipped} graph(s) without CUDA graphs here (the "
            "log's 'skipping cudagraphs due to' lines say why); choose another backend"
        )


def locate_on_device(
    image: np.ndarray, detector: FaceDetector, device: torch.device
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """The device pixel path's start: (H, W, 3) uint8 host image -> (working image, factor, sums, rows).

    The image's one upload to ``device``; the working image (h, w, 3) uint8 stays there for
    alignment and paste-back; the gray test's (6,) int64 sums (``is_gray_from_sums``) and the
    detector's (F', 16) rows come back to the host.
    """
    with torch.inference_mode():
        on_device = upload(torch.from_numpy(image), device)  # the image's one upload
        gray_sums = gray_sums_tensor(on_device)
        working, factor = working_image_tensor(on_device)
        pixels, scale = detector_input_tensor(working)
        rows = detector.detect_rows(pixels, scale)
        # downloaded once the rows are: the device has long finished the sums
        return working, factor, gray_sums.cpu(), rows


def plan_paste_on_device(
    working: torch.Tensor, inverse_affines: np.ndarray
) -> tuple[PastePlan, Download | None]:
    """The device pixel path's paste-back, first half (``device_paste.plan_paste``): queued, no wait."""
    with torch.inference_mode():
        return plan_paste(working, inverse_affines)


def paste_on_device(
    working: torch.Tensor,
    restored: RestoredFaces,
    plan: PastePlan,
    w_edges: list[int],
    masks: FaceMasks | None,
    size: tuple[int, int],
) -> Download:
    """The device pixel path's end: paste-back's second half, and the resize to the input's (H, W).

    ``working``, ``restored`` and ``masks`` on the device; ``plan`` and ``w_edges`` from
    ``plan_paste_on_device`` and ``device_paste.edge_widths``. Returns the (H, W, 3) uint8
    output on its way to the host: the image's one pixel-sized download, queued.
    """
    with torch.inference_mode():
        face_masks = None if masks is None else masks.masks
        return downloads(blend_and_resize(working, restored.faces, plan, w_edges, face_masks, size))[0]


class Restorer:
    """The three nets on one device, and the stages that use them."""

    def __init__(self, nets: Nets, device: torch.device, settings: Settings | None = None) -> None:
        self.device = device
        self.settings = settings or Settings.from_env(device.type)
        # one device thread; on a CPU with glibc, on glibc's main malloc arena (codeformer.host_memory)
        start = device_thread_starter(device, self.settings.retained_memory_mb)
        batch_wait_s = self.settings.batch_wait_ms / 1000.0
        self.scheduler = DeviceScheduler(
            self.settings.face_batch, batch_wait_s, start_thread=start, device=device
        )
        weakref.finalize(self, self.scheduler.stop)  # the thread ends with the Restorer, or at exit
        # Image-sized host work around device calls on the host pixel path (the detector's
        # resize, the parse masks' blurs): on a GPU on the request's thread, so that the device
        # serves others meanwhile.
        # On a CPU the device is the CPU anyway, and on the device thread the work's buffers
        # reuse the memory glibc's main arena keeps; a request thread's arena cannot (with
        # several large images at once, the peak grew past the README's bound).
        self._image_work: Callable[..., Any] = self.scheduler.call if device.type == "cpu" else _call
        # the server's admission control (predict.py); the library's own callers bring their own arrays
        self.admission = PixelBudget(self.settings.max_pixels_in_flight)
        self.runtime = Runtime(nets, device, self.settings.mixed_precision, self.settings.compile_backend)
        self._stages: dict[tuple[str, str, bool], _Stages] = {}

    @classmethod
    def load(
        cls,
        weights_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        settings: Settings | None = None,
    ) -> Restorer:
        """Load (downloading if missing) the three nets onto ``device`` (CUDA if present, else CPU).

        ``settings`` default to the environment's (``Settings.from_env``), read here once. With
        ``Settings.require_gpu``, no usable CUDA is a ``ConfigError`` that says why.
        """
        target = pick_device(device)
        settings = settings or Settings.from_env(target.type)
        if settings.require_gpu:
            require_cuda(target)  # before the weights: the GPU image never serves on the CPU
        codeformer, retinaface, parsenet = weights.load_nets(weights_dir, settings)
        nets = Nets(*(net.to(target).eval() for net in (codeformer, retinaface, parsenet)))
        return cls(nets, target, settings)

    @property
    def compile_backend(self) -> str | None:
        return self.runtime.compile_backend

    def check_options(self, options: RequestOptions) -> None:
        """Raise ``ConfigError`` if this process cannot serve ``options`` (the compile-backend lock).

        ``restore`` checks where the lock is taken (``_stages_for``); a caller that has work
        to do first (downloads) checks before it, so that a request that cannot run pays for none.
        """
        if options.stability.compiled:
            self.runtime.check_backend(options.compile_backend)

    def _mixed_precision(self, options: RequestOptions) -> bool:
        """The profile asks for mixed precision and it pays on this device (``Runtime.mixed_precision``)."""
        return options.profile.mixed_precision and self.runtime.mixed_precision

    def _stages_for(self, options: RequestOptions) -> _Stages:
        """The stages of ``options``' nets, built (and compiled) on first use; runs on the device thread."""
        self.check_options(options)  # again here: another request may have fixed the backend meanwhile
        compiled = options.stability.compiled
        mixed_precision = self._mixed_precision(options)
        key = (
            options.stability.name,
            options.compile_backend if compiled else "",
            compiled and mixed_precision,
        )
        if key not in self._stages:
            nets = self.runtime.nets_for(options.stability, options.compile_backend, mixed_precision)
            # a reduced-precision face that is not finite is computed again with the nets as loaded
            float32 = self.runtime.safe_nets
            batch = self.settings.face_batch
            stages = _Stages(
                detector=FaceDetector(nets.retinaface, self.device),
                restorer=FaceRestorer(nets.codeformer, self.device, batch, float32.codeformer),
                parser=FaceParser(nets.parsenet, self.device, batch, float32.parsenet),
            )
            if compiled and options.compile_backend != "none":
                start = time.perf_counter()
                warm_compiled(stages.restorer, stages.parser, mixed_precision, options.compile_backend)
                log.info(
                    "compiled and warmed the optimized nets (compile_backend=%s, mixed precision %s): "
                    "%.0f ms",
                    options.compile_backend,
                    "on" if mixed_precision else "off",
                    (time.perf_counter() - start) * 1000.0,
                )
            self._stages[key] = stages  # only once warm: no request sees a half-compiled set
        return self._stages[key]

    def prepare_optimized(self) -> float:
        """With ``Settings.compile_backend`` set, build the optimized nets now; returns ms (0 unset).

        Every profile's nets (one set per precision: fast and max_speed share theirs), compiled
        with that backend and every graph a request can reach warmed (``warm_compiled``), so
        that no request compiles or builds anything; ``none`` builds the channels_last copies.
        Unset, the first optimized request does this, and every request waits for it. With
        ``Settings.compile_cache``, that file's artifacts are loaded first, and where there was
        none, what was compiled is written to it (``runtime.load_compile_cache``).
        """
        backend = self.settings.compile_backend
        if not backend:
            return 0.0
        start = time.perf_counter()
        cache = self.settings.compile_cache
        loaded = 0 if cache is None else load_compile_cache(cache)
        if cache is not None:
            log.info("compile cache %s: %d artifacts loaded", cache, loaded)
        prepared: set[bool] = set()
        for profile in PROFILES.values():
            options = RequestOptions(
                profile=profile, stability=STABILITY_MODES["optimized"], compile_backend=backend
            )
            if (mixed_precision := self._mixed_precision(options)) not in prepared:
                prepared.add(mixed_precision)
                self.scheduler.call(self._stages_for, options)
        if cache is not None and not loaded:
            log.info("compile cache %s: %d artifacts written", cache, save_compile_cache(cache))
        return (time.perf_counter() - start) * 1000.0

    def warmup(self, options: RequestOptions = DEFAULT_OPTIONS) -> float:
        """Run one synthetic image through ``options``' path so its first real request pays no set-up; ms."""
        start = time.perf_counter()
        canvas = np.full((FACE_SIZE, FACE_SIZE, 3), 127, np.uint8)
        self.restore([canvas], options)
        # the detector rarely fires on a flat canvas: run restore and parse on a face-sized crop too
        stages = self.scheduler.call(self._stages_for, options)
        mixed_precision = self._mixed_precision(options)
        if pixels_on_device(self.settings.pixel_stages, self.device, options):
            self.scheduler.call(self._warm_device_pixels, canvas, stages, options)
            return (time.perf_counter() - start) * 1000.0
        restore = stages.restorer.restore
        restored = self.scheduler.call(restore, canvas[None], options.fidelity, mixed_precision)
        if options.profile.use_parse:
            self.scheduler.call(stages.parser.masks, RestoredFaces(restored), mixed_precision)
        return (time.perf_counter() - start) * 1000.0

    def _warm_device_pixels(self, canvas: np.ndarray, stages: _Stages, options: RequestOptions) -> None:
        """The device pixel path after detection, on a face filling ``canvas`` (512 x 512): crop,
        restore, parse, paste back. On the device thread."""
        identity = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # working image -> crop, and back
        mixed_precision = self._mixed_precision(options)
        with torch.inference_mode(), cuda_numerics(self.device, options.profile.mixed_precision):
            working = upload(torch.from_numpy(canvas), self.device)
            crops = warp_crops_tensor(working, identity)
            restored = stages.restorer.restore_tensor(crops, options.fidelity, mixed_precision, to_host=False)
            masks = None
            if options.profile.use_parse:
                masks = FaceMasks(stages.parser.masks_tensor(restored, mixed_precision, to_host=False))
            face_masks = None if masks is None else masks.masks
            paste_and_resize_tensor(working, restored, identity, face_masks, canvas.shape[:2])

    def restore(
        self,
        images: Sequence[np.ndarray | DecodedImage],
        options: RequestOptions = DEFAULT_OPTIONS,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[RestoreResult]:
        """Restore every face of every image with ``options``; one result per image, in order.

        ``progress`` is told each image's detection and paste-back, and the CodeFormer pass
        over all the faces, as they start (``codeformer.progress``), each image's step named
        by its label (``labels``, e.g. ``images[0] (photo.jpg)``; default ``images[0]``, ...).

        ``images``: (H, W, 3) uint8 BGR arrays, each checked once, here (``_checked_image``),
        or ``DecodedImage``s, checked when decoded (``imageio.decode_header``); the stages
        take them as they are.
        Raises ``InputError`` for arrays that are not images, ``ConfigError`` for options this
        process cannot serve (``check_options``, on the device thread, where a request fixes
        the compile backend), ``ImageFailedError`` (with the images'
        indices) when an image is over the size limits (``check_image_size``), cannot be
        processed, or the device runs out of memory for it,
        ``DeviceBrokenError`` when the device fails for good (``codeformer.device_faults``),
        and ``RequestCancelled`` once ``cancel`` is set (checked before each device call).
        Nothing is returned partially.
        """
        max_pixels = self.settings.max_pixels
        checked = [
            image.pixels if isinstance(image, DecodedImage) else _checked_image(index, image, max_pixels)
            for index, image in enumerate(images)
        ]
        with self.scheduler.caller():
            stages = self.scheduler.call(self._stages_for, options, cancel=cancel)
            call = _Call(
                stages,
                options,
                self._mixed_precision(options),
                cancel,
                progress or Progress(),
                labels or [f"images[{index}]" for index in range(len(images))],
                fast_math=options.profile.mixed_precision,
                pixels_on_device=pixels_on_device(self.settings.pixel_stages, self.device, options),
            )
            if not options.profile.use_parse:
                self.scheduler.finished(PARSE_STAGE)  # no parse batch waits for this request's faces
            work = [self._locate_faces(index, image, call) for index, image in enumerate(checked)]
            restored = self._restore_faces(work, call)
            self.scheduler.finished(RESTORE_STAGE)
            return [
                self._finish(index, image, item, faces, call)
                for index, (image, item, faces) in enumerate(zip(checked, work, restored, strict=True))
            ]

    def _locate_faces(self, index: int, image: np.ndarray, call: _Call) -> _ImageWork:
        call.progress.step(f"{call.labels[index]}: detect faces")
        timings: dict[str, float] = {}
        detector = call.stages.detector
        try:
            if not call.pixels_on_device:
                with _timed(timings, "prepare"):
                    gray = is_gray(image)
                    working, factor = to_working_image(image)
            with _timed(timings, "detect"):
                if call.pixels_on_device:  # prepare and detect in one device call
                    locate = call.on_device(locate_on_device, self.device)
                    located = self.scheduler.call(locate, image, detector, self.device, cancel=call.cancel)
                    working, factor, gray_sums, rows = located
                    gray = is_gray_from_sums(gray_sums.tolist(), image)
                else:
                    # FaceDetector.detect in its steps: only the net's part on the device thread
                    pixels, scale = self._image_work(detector.input_for, working, cancel=call.cancel)
                    detect_rows = call.on_device(detector.detect_rows, self.device)
                    rows = self.scheduler.call(detect_rows, pixels, scale, cancel=call.cancel)
                    del pixels  # the detector's copy, up to 640 x 10240 x 3, not kept to paste-back
                detections = detector.detections(rows, self.settings.max_faces)
            with _timed(timings, "align"):
                if call.pixels_on_device:
                    affines = estimate_affines(detections.landmarks)  # the landmark fit stays on the host
                    crops = self.scheduler.call(warp_crops_tensor, working, affines, cancel=call.cancel)
                    aligned = AlignedFaces(crops, affines, invert_affines(affines))
                else:
                    aligned = align_faces(working, detections)
        except RequestCancelled:
            raise
        except CodeFormerError as exc:
            raise ImageFailedError(index, str(exc)) from exc
        except torch.OutOfMemoryError as exc:
            raise ImageFailedError(index, out_of_memory_reason("detecting faces", exc)) from None
        if detections.dropped:
            log.warning(
                "image %d: kept the %d highest-scoring faces, dropped %d (CODEFORMER_MAX_FACES=%d)",
                index,
                len(detections.scores),
                detections.dropped,
                self.settings.max_faces,
            )
        return _ImageWork(working, factor, gray, detections, aligned, timings)

    def _restore_faces(self, work: list[_ImageWork], call: _Call) -> list[RestoredFaces]:
        """Run CodeFormer over the faces of all images at once; returns each image's ``RestoredFaces``.

        The faces go to the scheduler as one bare (F, 512, 512, 3) array, which it may join
        with other requests' faces; each image's share is typed (and checked) once, here.
        """
        counts = [len(item.aligned) for item in work]
        total = sum(counts)
        call.progress.step(f"restore {total} face{'s' * (total != 1)}")
        if total == 0:
            return [RestoredFaces(item.aligned.crops) for item in work]
        start = time.perf_counter()
        fidelity = call.options.fidelity
        restorer = call.stages.restorer
        # on the device pixel path each image's (F, 512, 512, 3) uint8 crops on the device, else
        # joined here, on the request's thread: on CUDA in pinned memory, for the device thread
        # to upload without a host copy; the scheduler uploads and joins batches
        on_device = call.pixels_on_device
        crops = [item.aligned.crops for item in work if len(item.aligned)]
        if not on_device:
            crops = staged(crops, self.device)
        run = restorer.restoring(fidelity, call.mixed_precision, to_host=not on_device)
        # requests with the same nets, fidelity, precision and numerics may share the forward
        key = (RESTORE_STAGE, id(call.stages.restorer), fidelity, call.mixed_precision, call.fast_math)
        try:
            restored = self._run_batched(key, run, crops, call)
        except torch.OutOfMemoryError as exc:
            # the request's faces share one call: it fails for every image that has faces
            with_faces = [index for index, count in enumerate(counts) if count]
            raise ImageFailedError(
                with_faces, out_of_memory_reason(f"restoring {total} faces", exc)
            ) from None
        if not on_device:
            restored = restored.numpy()
        per_face_ms = (time.perf_counter() - start) * 1000.0 / total
        bounds = np.cumsum([0, *counts])
        for item, count in zip(work, counts, strict=True):
            item.timings["restore"] = per_face_ms * count
        return [RestoredFaces(restored[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _run_batched(self, key: Hashable, run: FaceBatchRun, faces: Any, call: _Call) -> torch.Tensor:
        """``run`` over this request's ``faces`` (an array or tensor, or a list of parts): launched
        on the device thread, maybe in one forward with other requests' faces of ``key``, and
        completed here, on the request's thread; its rows. ``call``'s numerics and cancel flag
        hold for its device calls, the float32 recompute's included."""

        def device_call(function: Callable[..., T], *args: Any) -> T:
            return self.scheduler.call(call.on_device(function, self.device), *args, cancel=call.cancel)

        launched = self.scheduler.batched(key, call.on_device(run.launch, self.device), faces, call.cancel)
        return run.complete(launched, faces, device_call)

    def _finish(
        self, index: int, image: np.ndarray, item: _ImageWork, faces: RestoredFaces, call: _Call
    ) -> RestoreResult:
        call.progress.step(f"{call.labels[index]}: paste back")
        timings = item.timings
        if len(faces) == 0:
            # nothing to paste: the input comes back as it was (not a resized working copy)
            output = image.copy()
        else:
            try:
                output = self._paste(image, item, faces, call)
            except RequestCancelled:
                raise
            except CodeFormerError as exc:
                raise ImageFailedError(index, str(exc)) from exc
            except torch.OutOfMemoryError as exc:
                # on the device pixel path paste-back runs on the device too
                finishing = "parsing and pasting back" if call.pixels_on_device else "parsing"
                raise ImageFailedError(
                    index, out_of_memory_reason(f"{finishing} {len(faces)} faces", exc)
                ) from None
        return RestoreResult(
            image=output,
            faces=self._faces_in_input_pixels(item),
            faces_dropped=item.detections.dropped,
            working_size=tuple(item.working.shape[:2]),
            timings=timings,
        )

    def _paste(self, image: np.ndarray, item: _ImageWork, faces: RestoredFaces, call: _Call) -> np.ndarray:
        timings = item.timings
        on_device = call.pixels_on_device
        if item.gray and on_device:
            restored = RestoredFaces(
                self.scheduler.call(to_gray_faces_tensor, faces.faces, cancel=call.cancel)
            )
        elif item.gray:
            restored = RestoredFaces(to_gray_faces(faces.faces))
        else:
            restored = faces
        masks = None
        if call.options.profile.use_parse:
            parser = call.stages.parser

            # on the device pixel path the masks themselves, kept there; else ParseNet's labels
            run = (
                parser.masking(call.mixed_precision, to_host=False)
                if on_device
                else parser.labelling(call.mixed_precision)
            )
            with _timed(timings, "parse"):
                # FaceParser.masks in its steps: on the device thread ParseNet's labels, or on
                # the device pixel path the masks themselves (gray faces arrive as float64 and
                # batch with gray faces only); on the host path the labels' blurs on the host
                key = (
                    PARSE_STAGE,
                    id(parser),
                    call.mixed_precision,
                    call.fast_math,
                    str(restored.faces.dtype),
                    on_device,
                )
                faces = restored.faces if on_device else staged([restored.faces], self.device)
                parsed = self._run_batched(key, run, faces, call)
                if not on_device:
                    parsed = self._image_work(face_pixels_to_masks, parsed.numpy(), cancel=call.cancel)
                masks = FaceMasks(parsed)
        if on_device:
            with _timed(timings, "paste"):
                # two device calls: the host reads the faces' areas in between (their w_edges
                # set kernel sizes), here, while the device thread serves others
                plan_paste_call = call.on_device(plan_paste_on_device, self.device)
                inverse_affines = item.aligned.inverse_affines
                plan, areas = self.scheduler.call(
                    plan_paste_call, item.working, inverse_affines, cancel=call.cancel
                )
                paste = call.on_device(paste_on_device, self.device)
                w_edges = edge_widths(plan, areas)
                size = image.shape[:2]
                output = self.scheduler.call(
                    paste, item.working, restored, plan, w_edges, masks, size, cancel=call.cancel
                )
                # on CUDA the pixels arrived in pinned memory: copied out here, so that the
                # pinned block goes back to torch's cache now, not after the encode (pinned
                # blocks are kept, rounded up to a power of two, for reuse)
                return output.numpy().copy() if self.device.type == "cuda" else output.numpy()
        with _timed(timings, "paste"):
            output = paste_faces(item.working, restored, item.aligned.inverse_affines, masks)
        if output.shape[:2] != image.shape[:2]:
            with _timed(timings, "resize"):
                output = cv2.resize(output, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
        return output

    @staticmethod
    def _faces_in_input_pixels(item: _ImageWork) -> list[Face]:
        # The official rows are divided by the nominal detector scale, score included
        # (docs/reference.md §3 step 11); undo that for the score, and undo the §4.1 enlargement.
        detector_scale = DETECTOR_SHORT_SIDE / min(item.working.shape[:2])
        det = item.detections
        return [
            Face(
                box=tuple(float(v) / item.factor for v in det.boxes[i]),
                score=float(det.scores[i]) * detector_scale,
                landmarks=det.landmarks[i].astype(np.float64) / item.factor,
            )
            for i in range(len(det.scores))
        ]
