"""gpu_check.py's checks in this process: one compile backend at a time, on the chosen device.

In process, the check sees what the server cannot: the graphs dynamo compiled (``torch._dynamo``'s
counters), the graphs the cudagraphs backend refused and why, a recompile limit that sent a
function back to eager, and peak GPU memory. Each ``Case`` (gpu_check_cases.py) is its own
request, decode and encode included.

Each compile backend starts as in a new process: the previous backend's Restorers are dropped
and ``torch._dynamo.reset()`` clears every compiled entry, so that no backend's graphs count
against another's recompile limit (torch.compile entries of one function share one cache).

Nothing here imports Cog: this path runs on a bare GPU machine with torch, OpenCV and NumPy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gpu_check_cases import Case, big_request_case, generated_cases, photo_cases
from gpu_check_verdicts import MAX_PIXELS, Config, Outcome, PassResult, run_passes, summaries

# what a run must not do quietly: dynamo falling back to eager at its recompile limit
# ("torch._dynamo hit config.recompile_limit"), the cudagraphs backend running a graph without
# graphs ("skipping cudagraphs due to ..."); the loggers that say so (torch's own names)
WATCHED_LOGGERS = ("torch._dynamo.convert_frame", "torch._inductor.cudagraph_utils.__cudagraphs")
RECOMPILE_LIMIT_HIT = "hit config."
CUDAGRAPH_SKIP = "skipping cudagraphs"
# the 4 x 40 MP request is started only with this much budget left: decoding, pasting and
# encoding 160 MP on the host alone take tens of seconds
BIG_REQUEST_ESTIMATE_S = 60.0


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


class Checker:
    """Runs configurations on one device within a deadline; one compile backend at a time."""

    def __init__(
        self, args: argparse.Namespace, weights_dir: Path, paths: list[Path], deadline: float
    ) -> None:
        import torch

        self.torch, self.args, self.weights_dir = torch, args, weights_dir
        self.cases: list[Case] = photo_cases(paths) + (generated_cases(paths) if args.generated else [])
        self.big_request = big_request_case(paths) if args.big_request else None
        self.device, self.deadline = torch.device(args.device), deadline
        self.restorers: dict[str, Any] = {}
        self.backend: str | None = None  # the compile backend of this device's Restorers
        self.faces: dict[str, list[int]] = {}  # case name -> faces kept per image, in the last request
        self.setup_ms: float | None = None  # the last Restorer's prepare_optimized

    def restorer(self, backend: str, device: Any = None) -> Any:
        """A Restorer per backend and device, set up as the server is with CODEFORMER_COMPILE_BACKEND.

        On the checked device its optimized nets are built, compiled and warmed at set-up
        (``Restorer.prepare_optimized``), so that any graph a request then compiles is a
        failure; the CPU reference (``device``) runs safe only and is set up without them.
        """
        from codeformer.config import Settings
        from codeformer.pipeline import Restorer

        device = device or self.device
        checked = device == self.device
        if checked and backend != self.backend:
            self._fresh_compiler(backend)
        if f"{device}:{backend}" not in self.restorers:
            settings = Settings.from_env(
                device.type, max_faces=self.args.max_faces, compile_backend=backend if checked else ""
            )
            restorer = Restorer.load(self.weights_dir, device, settings)
            self.setup_ms = restorer.prepare_optimized()
            self.restorers[f"{device}:{backend}"] = restorer
        return self.restorers[f"{device}:{backend}"]

    def _fresh_compiler(self, backend: str) -> None:
        """Drop this device's Restorers and dynamo's compiled entries: ``backend`` starts afresh."""
        for key in [key for key in self.restorers if key.startswith(f"{self.device}:")]:
            del self.restorers[key]
        gc.collect()
        self.torch._dynamo.reset()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
        self.backend = backend

    def request(self, restorer: Any, config: Config, case: Case) -> tuple[dict[str, float], list[np.ndarray]]:
        """One request, decode and encode included: (stage -> ms summed over its images, restored images)."""
        from codeformer.config import RequestOptions
        from codeformer.imageio import decode_image, encode_jpeg

        options = RequestOptions.parse(case.fidelity, config.profile, config.stability, config.backend)
        began = time.perf_counter()
        images = [decode_image(data, f"{case.name} [{i}]", MAX_PIXELS) for i, data in enumerate(case.images)]
        timings = {"decode": (time.perf_counter() - began) * 1000}
        results = restorer.restore(images, options)
        restored = time.perf_counter()
        for result in results:
            encode_jpeg(result.image)
            for stage, ms in result.timings.items():
                timings[stage] = timings.get(stage, 0.0) + ms
        timings["encode"] = (time.perf_counter() - restored) * 1000
        timings["request"] = (time.perf_counter() - began) * 1000
        self.faces[case.name] = [len(result.faces) for result in results]
        return timings, [result.image for result in results]

    def one_pass(self, restorer: Any, config: Config) -> PassResult:
        """Every case as its own request: (stage -> ms per request, restored images, s)."""
        requests, outputs, start = [], [], time.perf_counter()
        for case in self.cases:
            timings, images = self.request(restorer, config, case)
            requests.append(timings)
            outputs += images
        return requests, outputs, time.perf_counter() - start

    def close(self) -> None:
        """Nothing to release: the restorers go with the process (``ServerChecker`` stops a server)."""

    def fits(self, expected_s: float) -> bool:
        return time.monotonic() + expected_s < self.deadline

    def run(self, config: Config) -> Outcome:
        """Warm-up passes, then timed passes while the budget lasts; failures become reasons.

        Figures besides the stage times: ``graphs_compiled`` (from the Restorer's set-up to the
        last pass), ``compiles_after_warmup``, ``cudagraph_skips`` and ``torch_warnings`` (a
        recompile limit hit or a skipped cudagraph, word for word); either fails the configuration.
        """
        outcome, cuda = Outcome(config), self.device.type == "cuda"
        self.faces, self.setup_ms = {}, None
        if cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        with torch_warnings() as warnings:
            before = after_setup = compile_counts()
            after_warmup: list[dict[str, int]] = []
            try:
                restorer = self.restorer(config.backend)
                after_setup = compile_counts()
                run_passes(
                    outcome,
                    lambda: self.one_pass(restorer, config),
                    self.args.warmup,
                    self.args.repeats,
                    self.fits,
                    after_warmup=lambda: after_warmup.append(compile_counts()),
                )
                if cuda:
                    outcome.figures["peak_gpu_mb"] = self.torch.cuda.max_memory_allocated(self.device) / 2**20
                if self.big_request is not None and outcome.timed_passes:
                    outcome.figures["big_request"] = self.run_big_request(restorer, config, self.big_request)
            except Exception as exc:  # a check tool reports each failure and goes on to the next one
                outcome.reasons.append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            end = compile_counts()
        outcome.figures["faces"] = dict(self.faces)  # per case: faces kept in each image
        outcome.figures["graphs_compiled"] = end["graphs"] - before["graphs"]
        if self.setup_ms is not None:  # this configuration set up a new Restorer
            outcome.figures["prepare_optimized_ms"] = self.setup_ms
        if outcome.timed_passes or outcome.outputs:
            in_requests = end["graphs"] - after_setup["graphs"]
            outcome.figures["compiles_in_requests"] = in_requests
            if in_requests:
                outcome.reasons.append(f"{in_requests} graph(s) compiled inside requests, after set-up")
        outcome.figures["cudagraph_skips"] = end["cudagraph_skips"] - before["cudagraph_skips"]
        outcome.figures["torch_warnings"] = warnings
        if after_warmup:
            recompiles = end["graphs"] - after_warmup[0]["graphs"]
            outcome.figures["compiles_after_warmup"] = recompiles
            if recompiles:
                outcome.reasons.append(f"{recompiles} graph(s) compiled after warm-up")
        for line in warnings:
            if RECOMPILE_LIMIT_HIT in line:
                outcome.reasons.append(f"ran eager past dynamo's recompile limit: {line}")
        skips = outcome.figures["cudagraph_skips"]
        if config.backend == "cudagraphs" and config.stability == "optimized" and skips:
            skipped = [line for line in warnings if CUDAGRAPH_SKIP in line]
            outcome.reasons.append(f"{skips} graph(s) ran without CUDA graphs: {skipped}")
        if outcome.requests:
            outcome.figures.update(summaries(outcome.requests))
        return outcome

    def run_big_request(self, restorer: Any, config: Config, case: Case) -> dict[str, Any]:
        """``case`` (the four-image 40 MP request) once, after the passes: its stage ms, faces, peak memory.

        Not started when the budget has less than ``BIG_REQUEST_ESTIMATE_S`` left: ``{"not_run": ...}``.
        """
        if not self.fits(BIG_REQUEST_ESTIMATE_S):
            return {"case": case.name, "not_run": f"less than {BIG_REQUEST_ESTIMATE_S} s of the budget left"}
        cuda = self.device.type == "cuda"
        if cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        timings, _ = self.request(restorer, config, case)
        figures = {"case": case.name, "stages_ms": timings, "faces": self.faces[case.name]}
        if cuda:
            figures["peak_gpu_mb"] = self.torch.cuda.max_memory_allocated(self.device) / 2**20
        return figures

    def cpu_reference(self, baseline: Outcome) -> tuple[list[np.ndarray], str] | None:
        """baseline/safe on the CPU, once, untimed (on a CPU: ``baseline``'s outputs); None past budget."""
        if self.device.type == "cpu":
            return baseline.outputs, "baseline/safe on cpu"
        if not self.fits(0.0):
            return None
        restorer = self.restorer("none", self.torch.device("cpu"))
        return self.one_pass(restorer, Config("baseline", "safe", "none"))[1], "baseline/safe on cpu"
