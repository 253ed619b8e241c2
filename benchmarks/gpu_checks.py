"""What ``benchmarks/gpu_check.py`` sends and decides: its requests, what compiled, agreement, verdicts.

Sections, in order:

- the requests (``Case``: one request's encoded images and its fidelity): each photo at the
  default fidelity (``photo_cases``); ``generated_cases`` adds what the photos alone do not
  reach: a group photo (the photos tiled 2 x 2, so that more faces than one face batch of 4
  restore in one request) at fidelity 0 (CodeFormer's no-fusion graph) and at a fidelity the
  set-up warm-up does not use, and a photo at three more detector input shapes (square,
  portrait, wide); ``big_request_case`` is one request of four images at the 40 MP limit, the
  largest request the server admits;
- what compiled: dynamo's graph counters (``compile_counts``), the warnings torch logs when
  it falls back to eager at its recompile limit or runs a graph without CUDA graphs
  (``torch_warnings``), and ``judge_compiles``, which fails a configuration on either, or on
  any graph compiled inside a request; ``BackendRestorers`` sets a Restorer up per compile
  backend as a new process would (``torch._dynamo.reset()`` between backends);
- agreement and verdicts: a configuration's ``Outcome`` (reasons it failed, per-request stage
  ms, the last pass's restored photos, figures for the JSON), ``agreement`` and ``judge``
  (tests/test_parity_golden.py's tolerance for baseline/safe, a mean bound for the others),
  ``run_passes`` (warm-up then timed, within the budget), ``summaries``, ``verdict_line``;
- ``ProgressReport``: the JSON, rewritten atomically as each configuration ends.

Nothing here imports Cog: gpu_check runs on a bare GPU machine with torch, OpenCV and NumPy.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks import reports, summary
from benchmarks.host_pass import HOST_STAGES
from benchmarks.plans import REFERENCE, Configuration
from codeformer.config import GRAPH_REPLAYING_BACKENDS

# a request's stages by where they run: on the host pixel path (baseline; everything on a CPU)
# and on the device pixel path (fast and max_speed on CUDA: codeformer.pipeline.pixels_on_device),
# where prepare is part of detect's device call, and align is the landmark fit (host, tens of
# microseconds) and the crops' warp (device)
HOST_PATH_PARTS = {"host_ms": HOST_STAGES, "device_ms": ("detect", "restore", "parse")}
DEVICE_PATH_PARTS = {
    "host_ms": ("decode", "encode"),
    "device_ms": ("detect", "align", "restore", "parse", "paste"),
}
# tests/test_parity_golden.py's tolerance where its stricter AVX-512 figures do not apply
MIN_WITHIN_ONE, MAX_OVER_THREE = 0.97, 0.015
# levels of 255, generous: channels_last, fp16 and max_speed's plain mask move some values by
# more than 3 levels (the parity tolerance would fail them) while their mean stays well below it
MAX_MEAN_ABS = 8.0
BOUNDS = {"min_within_one": MIN_WITHIN_ONE, "max_over_three": MAX_OVER_THREE, "max_mean_abs": MAX_MEAN_ABS}
FIDELITY, MAX_PIXELS = 0.5, 40_000_000


# -- the requests ----------------------------------------------------------------------------
UNWARMED_FIDELITY = 0.9  # not one of the fidelities Restorer's warm-up runs: a new value must not compile
GROUP_CELL = (800, 600)  # (width, height) of each photo in the 2 x 2 group photo
# (width, height): other aspect ratios give the detector other input shapes than the photos'
DETECTOR_SIZES = ((640, 640), (720, 1280), (1920, 1080))
BIG_SIZE = (7744, 5164)  # 39.99 MP, 3:2: under MAX_PIXELS and within the 16:1 aspect limit
BIG_IMAGES = 4  # codeformer.serving.schema.MAX_IMAGES


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[bytes, ...]  # encoded files, sent as one request
    fidelity: float


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """(H, W, 3) uint8 BGR -> JPG bytes."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as JPEG")
    return data.tobytes()


def decode(data: bytes) -> np.ndarray:
    """JPG or PNG bytes -> (H, W, 3) uint8 BGR, as the pipeline's images are."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("an image given to gpu_check (or answered by the server) could not be decoded")
    return image


def photo_cases(paths: list[Path]) -> list[Case]:
    """Each photo as its own request at the default fidelity."""
    return [Case(path.name, (path.read_bytes(),), FIDELITY) for path in paths]


def group_photo(photos: list[np.ndarray]) -> np.ndarray:
    """The photos (repeated to four) each resized to ``GROUP_CELL`` and tiled 2 x 2: (1200, 1600, 3) BGR."""
    cells = [cv2.resize(photos[index % len(photos)], GROUP_CELL) for index in range(4)]
    return np.concatenate([np.concatenate(cells[:2], axis=1), np.concatenate(cells[2:], axis=1)], axis=0)


def generated_cases(paths: list[Path]) -> list[Case]:
    """The group photo at fidelity 0 and ``UNWARMED_FIDELITY``; the first photo at ``DETECTOR_SIZES``."""
    photos = [decode(path.read_bytes()) for path in paths]
    group = encode_jpeg(group_photo(photos))
    cases = [
        Case("group 2x2 w=0", (group,), 0.0),
        Case(f"group 2x2 w={UNWARMED_FIDELITY}", (group,), UNWARMED_FIDELITY),
    ]
    for width, height in DETECTOR_SIZES:
        resized = cv2.resize(photos[0], (width, height), interpolation=cv2.INTER_AREA)
        cases.append(Case(f"{paths[0].name} at {width}x{height}", (encode_jpeg(resized),), FIDELITY))
    return cases


def big_request_case(paths: list[Path]) -> Case:
    """``BIG_IMAGES`` images of ``BIG_SIZE`` (each photo enlarged, in turn) in one request."""
    photos = [decode(path.read_bytes()) for path in paths]
    images = tuple(
        encode_jpeg(cv2.resize(photos[index % len(photos)], BIG_SIZE, interpolation=cv2.INTER_LINEAR))
        for index in range(BIG_IMAGES)
    )
    return Case(f"{BIG_IMAGES} x {BIG_SIZE[0]}x{BIG_SIZE[1]}", images, FIDELITY)


def case_report(case: Case) -> dict[str, Any]:
    return {"name": case.name, "images": len(case.images), "fidelity": case.fidelity}


# -- what compiled ---------------------------------------------------------------------------
# what a run must not do quietly: dynamo falling back to eager at its recompile limit
# ("torch._dynamo hit config.recompile_limit"), the cudagraphs backend running a graph without
# graphs ("skipping cudagraphs due to ..."); the loggers that say so (torch's own names)
WATCHED_LOGGERS = ("torch._dynamo.convert_frame", "torch._inductor.cudagraph_utils.__cudagraphs")
RECOMPILE_LIMIT_HIT = "hit config."
CUDAGRAPH_SKIP = "skipping cudagraphs"


class _Messages(logging.Handler):
    """Collects the first line of each WARNING or worse record, once per distinct message."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = (record.getMessage().splitlines() or [""])[0]
        if line not in self.lines:
            self.lines.append(line)


@contextlib.contextmanager
def torch_warnings() -> Iterator[list[str]]:
    """The warnings ``WATCHED_LOGGERS`` log in the block (artifact loggers do not propagate)."""
    handler = _Messages()
    loggers = [logging.getLogger(name) for name in WATCHED_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def compile_counts() -> dict[str, int]:
    """Graphs dynamo compiled, and graphs the cudagraphs backend skipped, in this process so far."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


@dataclass
class CompileCounts:
    """``compile_counts()`` at the marks of one configuration's run; None where it was not reached."""

    before: dict[str, int]  # before its Restorer was set up
    after_setup: dict[str, int]
    after_warmup: dict[str, int] | None
    end: dict[str, int]


def judge_compiles(
    outcome: Outcome, counts: CompileCounts, warnings: list[str], setup_ms: float | None = None
) -> None:
    """Record what compiled in ``outcome``'s figures, and fail it where something must not have.

    Figures: ``graphs_compiled`` (from the Restorer's set-up to the last pass),
    ``prepare_optimized_ms`` (where a Restorer was set up), ``compiles_in_requests`` (where a
    pass ran), ``cudagraph_skips``, ``torch_warnings`` (word for word) and
    ``compiles_after_warmup``. Failures: a graph compiled inside a request or after the
    warm-up, a recompile limit hit (dynamo then runs the function eager), and, for an
    optimized cudagraphs configuration, any graph run without CUDA graphs (reported, not
    judged, under the other backends).
    """
    figures, end = outcome.figures, counts.end
    figures["graphs_compiled"] = end["graphs"] - counts.before["graphs"]
    if setup_ms is not None:
        figures["prepare_optimized_ms"] = setup_ms
    if outcome.timed_passes or outcome.outputs:
        in_requests = end["graphs"] - counts.after_setup["graphs"]
        figures["compiles_in_requests"] = in_requests
        if in_requests:
            outcome.reasons.append(f"{in_requests} graph(s) compiled inside requests, after set-up")
    figures["cudagraph_skips"] = end["cudagraph_skips"] - counts.before["cudagraph_skips"]
    figures["torch_warnings"] = warnings
    if counts.after_warmup is not None:
        recompiles = end["graphs"] - counts.after_warmup["graphs"]
        figures["compiles_after_warmup"] = recompiles
        if recompiles:
            outcome.reasons.append(f"{recompiles} graph(s) compiled after warm-up")
    for line in warnings:
        if RECOMPILE_LIMIT_HIT in line:
            outcome.reasons.append(f"ran eager past dynamo's recompile limit: {line}")
    skips = figures["cudagraph_skips"]
    if outcome.config.backend in GRAPH_REPLAYING_BACKENDS and outcome.config.mode == "optimized" and skips:
        skipped = [line for line in warnings if CUDAGRAPH_SKIP in line]
        outcome.reasons.append(f"{skips} graph(s) ran without CUDA graphs: {skipped}")


class BackendRestorers:
    """A Restorer per compile backend and device, set up as the server is with CODEFORMER_COMPILE_BACKEND.

    On the checked ``device`` its optimized nets are built, compiled and warmed at set-up
    (``Restorer.prepare_optimized``), so that any graph a request then compiles is a failure;
    a CPU reference (another device) runs safe only and is set up without them. Each compile
    backend on the checked device starts as in a new process: the previous backend's Restorers
    are dropped and ``torch._dynamo.reset()`` clears every compiled entry, so that no backend's
    graphs count against another's recompile limit (torch.compile entries of one function
    share one cache).
    """

    def __init__(self, weights_dir: Path, device: Any, max_faces: int) -> None:
        self.weights_dir, self.device, self.max_faces = weights_dir, device, max_faces
        self.loaded: dict[str, Any] = {}  # "device:backend" -> Restorer
        self.backend: str | None = None  # the compile backend of the checked device's Restorers
        self.setup_ms: float | None = None  # the last Restorer's prepare_optimized

    def get(self, backend: str, device: Any = None) -> Any:
        from codeformer.config import Settings
        from codeformer.pipeline import Restorer

        device = device or self.device
        checked = device == self.device
        if checked and backend != self.backend:
            self._fresh_compiler(backend)
        key = f"{device}:{backend}"
        if key not in self.loaded:
            settings = Settings.from_env(
                device.type, max_faces=self.max_faces, compile_backend=backend if checked else ""
            )
            restorer = Restorer.load(self.weights_dir, device, settings)
            self.setup_ms = restorer.prepare_optimized()
            self.loaded[key] = restorer
        return self.loaded[key]

    def _fresh_compiler(self, backend: str) -> None:
        """Drop the checked device's Restorers and dynamo's compiled entries: ``backend`` starts afresh."""
        import torch

        for key in [key for key in self.loaded if key.startswith(f"{self.device}:")]:
            del self.loaded[key]
        gc.collect()
        torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.backend = backend


# -- agreement and verdicts ------------------------------------------------------------------
@dataclass
class Outcome:
    config: Configuration
    reasons: list[str] = field(default_factory=list)
    requests: list[dict[str, float]] = field(default_factory=list)  # stage -> ms, per timed request
    outputs: list[np.ndarray] = field(default_factory=list)  # the last pass's restored photos
    figures: dict[str, Any] = field(default_factory=dict)
    timed_passes: int = 0

    @property
    def verdict(self) -> str:
        return "FAIL" if self.reasons else ("PASS" if self.timed_passes else "SKIP")

    def as_report(self) -> dict[str, Any]:
        head = {"name": self.config.label, "verdict": self.verdict, "reasons": self.reasons}
        return head | {"timed_passes": self.timed_passes} | self.figures


def agreement(ours: list[np.ndarray], reference: list[np.ndarray], label: str) -> dict[str, Any]:
    """The golden parity figures of ``ours`` against ``reference``, over all photos together."""
    flat = [np.concatenate([a.ravel() for a in images]).astype(np.int16) for images in (ours, reference)]
    diff = np.abs(flat[0] - flat[1])
    within_one, over_three, mean_abs = float((diff <= 1).mean()), float((diff > 3).mean()), float(diff.mean())
    return dict(reference=label, within_one=within_one, over_three=over_three, mean_abs=mean_abs)


def judge(outcome: Outcome, figures: dict[str, Any]) -> None:
    """Fail ``outcome`` where its agreement is outside its bound.

    baseline/safe (against baseline/safe on the CPU): at least ``MIN_WITHIN_ONE`` of the values
    within 1 level, at most ``MAX_OVER_THREE`` beyond 3; any other configuration (against
    baseline/safe on the device): a mean absolute difference of at most ``MAX_MEAN_ABS``.
    """
    outcome.figures["agreement"] = figures
    within, beyond, what = figures["within_one"], figures["over_three"], figures["reference"]
    if outcome.config == REFERENCE and (within < MIN_WITHIN_ONE or beyond > MAX_OVER_THREE):
        outcome.reasons.append(
            f"differs from {what}: {within:.3%} within 1 level (>= {MIN_WITHIN_ONE:.0%}), "
            f"{beyond:.3%} beyond 3 (<= {MAX_OVER_THREE:.1%})"
        )
    elif outcome.config != REFERENCE and figures["mean_abs"] > MAX_MEAN_ABS:
        outcome.reasons.append(f"mean abs difference {figures['mean_abs']:.2f} > {MAX_MEAN_ABS}")


PassResult = tuple[list[dict[str, float]], list[np.ndarray], float]  # stage ms per photo, outputs, s


def run_passes(
    outcome: Outcome,
    one_pass: Callable[[], PassResult],
    warmup: int,
    repeats: int,
    fits: Callable[[float], bool],
    after_warmup: Callable[[], None] = lambda: None,
) -> None:
    """``warmup`` untimed passes, then up to ``repeats`` timed ones, each only if ``fits(last pass s)``."""
    last_s = 0.0
    for _ in range(warmup):
        if not fits(last_s):
            return
        _, outcome.outputs, last_s = one_pass()
    after_warmup()
    for _ in range(repeats):
        if not fits(last_s):
            break
        requests, outcome.outputs, last_s = one_pass()
        outcome.requests += requests
        outcome.timed_passes += 1


def takes_device_path(device: Any, config: Configuration) -> bool:
    """Whether ``config``'s requests take the device pixel path on ``device`` (with the environment's
    ``CODEFORMER_PIXEL_STAGES``, which the server checked through inherits too)."""
    from codeformer.config import PROFILES, RequestOptions, Settings
    from codeformer.pipeline import pixels_on_device

    setting = Settings.from_env(device.type).pixel_stages
    return pixels_on_device(setting, device, RequestOptions(profile=PROFILES[config.profile]))


def summaries(requests: list[dict[str, float]], pixels_on_device: bool = False) -> dict[str, Any]:
    """Per-stage ms summaries, and the host and device parts as sums per request.

    ``pixels_on_device``: the requests took the device pixel path, which moves stages to the device.
    """
    names = dict.fromkeys(stage for request in requests for stage in request)
    # a stage a request skips (resize at working size, parse in max_speed) is left out, not 0
    per_stage = {stage: summary.summarize(r[stage] for r in requests if stage in r) for stage in names}
    parts = {}
    for part, stages in (DEVICE_PATH_PARTS if pixels_on_device else HOST_PATH_PARTS).items():
        # a request with none of a part's stages (no log line read) has no figure, not 0 ms
        timed = [r for r in requests if any(stage in r for stage in stages)]
        parts[part] = summary.summarize(sum(r.get(stage, 0.0) for stage in stages) for r in timed)
    return {"stages_ms": per_stage, **parts}


def verdict_line(outcome: Outcome) -> str:
    figures, parts = outcome.figures, [f"{outcome.verdict} {outcome.config.label}"]
    if "stages_ms" in figures:
        request, host, device = figures["stages_ms"]["request"], figures["host_ms"], figures["device_ms"]
        for name, ms in (("request", request), ("host", host), ("device", device)):
            if ms["count"]:  # none: the server's stage figures were not found
                parts.append(f"{name} p50={ms['p50']:.1f} p95={ms['p95']:.1f} ms")
    if figures.get("peak_gpu_mb") is not None:  # None through the server: not observable there
        parts.append(f"peak {figures['peak_gpu_mb']:.0f} MiB")
    if agreed := figures.get("agreement"):
        parts.append(f"mean abs {agreed['mean_abs']:.2f} vs {agreed['reference']}")
    return "  ".join(parts + outcome.reasons)


# -- the report ------------------------------------------------------------------------------
class ProgressReport:
    """gpu_check's JSON at ``path``, rewritten (atomically) after each configuration.

    A run stopped from outside leaves what it measured: ``finished`` false, ``pending`` the
    configurations not reached yet, ``not_run`` those the budget left out (SKIP).
    """

    def __init__(
        self, head: dict[str, Any], configs: list[Configuration], path: Path, started: float
    ) -> None:
        self.head, self.configs, self.path, self.started = head, configs, path, started  # started: monotonic

    def write(
        self, outcomes: list[Outcome], sweep: dict[str, Any] | None, finished: bool = False
    ) -> dict[str, Any]:
        done = {outcome.config.label for outcome in outcomes}
        report = self.head | {
            "finished": finished,
            "elapsed_s": time.monotonic() - self.started,
            "configs": [outcome.as_report() for outcome in outcomes],
            "not_run": [outcome.config.label for outcome in outcomes if outcome.verdict == "SKIP"],
            "pending": [config.label for config in self.configs if config.label not in done],
            "concurrency": sweep,
        }
        reports.write_report(report, self.path)
        return report
