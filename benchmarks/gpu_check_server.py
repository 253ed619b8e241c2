"""gpu_check.py --server: the same checks through the Cog HTTP server, and a concurrency sweep.

One ``LocalServer`` at a time, per compile backend (a process serves one backend; the
plan keeps each backend's configurations together), with the weights folder, ``--max-faces``
and ``CODEFORMER_COMPILE_BACKEND`` (compiled at set-up) as environment, and ``CUDA_VISIBLE_DEVICES`` empty for
``--device cpu`` (the server takes CUDA whenever it sees it). Each photo is its own request.

What the client sees: the latency of each request (the ``request`` stage) and the server's
per-stage ms from its per-image log line (whole ms; ``read_decode`` reported as ``decode``,
so that it counts in the host part; from the prediction's logs, else from the server's own
log file). Not observable through the server, so null in the JSON:
peak GPU memory and graphs compiled after warm-up (run without --server for those).

Agreement compares decoded JPGs: baseline/safe with baseline/safe computed in this process
on the CPU and put through the same JPEG encode and decode (on a CPU device the two are
equal; on CUDA, JPEG's quantization can turn a 1-level difference into a few, so a failure
there is worth a run without --server before blaming the device), every other configuration
with the server's baseline/safe JPGs (both encoded the same way).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

import cv2
import harness
import numpy as np
from gpu_check_local import Checker
from gpu_check_verdicts import FIDELITY, Config, Outcome, PassResult, run_passes, summaries
from harness import Requester, parse_stage_ms, request_options

from codeformer.imageio import encode_jpeg
from codeformer.serving.client import ServerError
from codeformer.tools.local_server import LocalServer


def decode_jpg(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 BGR, as the pipeline's images are."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


class ServerChecker:
    """``Checker``'s interface (``run``, ``cpu_reference``, ``device``), through the HTTP server."""

    def __init__(
        self, args: argparse.Namespace, weights_dir: Path, paths: list[Path], deadline: float
    ) -> None:
        # the CPU reference, in process, on what the server is sent: the photos only (the
        # generated cases run in process alone; with them the two output lists would not pair up)
        photos_only = argparse.Namespace(**{**vars(args), "generated": False})
        self.local = Checker(photos_only, weights_dir, paths, deadline)
        self.args, self.weights_dir, self.paths = args, weights_dir, paths
        self.device, self.fits = self.local.device, self.local.fits
        self.stack = contextlib.ExitStack()
        self.backend: str | None = None
        self.server: LocalServer | None = None

    def close(self) -> None:
        self.stack.close()

    def server_for(self, backend: str) -> LocalServer:
        """The server for ``backend``, started on first use; the previous backend's one is stopped."""
        if self.server is None or self.backend != backend:
            self.stack.close()
            self.server, self.backend = None, backend
            env = {
                "CODEFORMER_WEIGHTS_DIR": str(self.weights_dir),
                "CODEFORMER_MAX_FACES": str(self.args.max_faces),
                # as in production: the optimized nets compiled at set-up, not in a request
                "CODEFORMER_COMPILE_BACKEND": backend,
            }
            if self.device.type == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
            ready_timeout_s = max(self.local.deadline - time.monotonic(), 1.0)
            self.server = self.stack.enter_context(LocalServer(env, ready_timeout_s=ready_timeout_s))
        return self.server

    def requester(self, config: Config) -> Requester:
        options = request_options(config.profile, config.stability, config.backend, FIDELITY)
        server = self.server_for(config.backend)
        return Requester(server.client, options, server, retry_busy=False)

    def one_pass(self, requester: Requester) -> PassResult:
        """Every photo as its own request: (stage -> ms per photo, decoded outputs, s)."""
        requests, outputs, start = [], [], time.perf_counter()
        server = self.server_for(self.backend or "none")
        for path in self.paths:
            logged = len(server.log_text())
            sample, result = requester.send_result([path], "timed")
            if not sample.ok:  # a 409 too: one client, one request at a time, must never get one
                raise ServerError(f"{path.name}: {sample.error}")
            # the prediction's own logs, else the server's log since it was sent (one request at
            # a time): a line logged outside the prediction's context reaches only the latter
            [stages] = parse_stage_ms(result.logs, 1)
            if not stages:
                [stages] = parse_stage_ms(server.log_text()[logged:], 1)
            if "read_decode" in stages:  # a log without stage figures gives none, not zeros
                stages["decode"] = stages.pop("read_decode")
            requests.append({**stages, "request": sample.latency_s * 1000})
            outputs += [decode_jpg(data) for data in result.output_bytes(requester.client.session)]
        return requests, outputs, time.perf_counter() - start

    def run(self, config: Config) -> Outcome:
        outcome = Outcome(config)
        outcome.figures.update(observed_through="server", compiles_after_warmup=None, peak_gpu_mb=None)
        try:
            requester = self.requester(config)
            run_passes(
                outcome, lambda: self.one_pass(requester), self.args.warmup, self.args.repeats, self.fits
            )
        except Exception as exc:  # a check tool reports every failure and goes on to the next configuration
            outcome.reasons.append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            return outcome
        if outcome.requests:
            outcome.figures.update(summaries(outcome.requests))
        return outcome

    def cpu_reference(self, baseline: Outcome) -> tuple[list[np.ndarray], str] | None:
        """baseline/safe in this process on the CPU, JPEG-encoded and decoded like the server's answers."""
        if not self.fits(0.0):
            return None
        restorer = self.local.restorer("none", self.local.torch.device("cpu"))
        outputs = self.local.one_pass(restorer, Config("baseline", "safe", "none"))[1]
        label = "baseline/safe in process on cpu, JPEG round trip"
        return [decode_jpg(encode_jpeg(image)) for image in outputs], label

    def sweep(self, config: Config, plan: harness.LoadPlan) -> dict[str, Any]:
        """``plan``'s levels on ``config``, one photo per request, within the budget."""
        batches = [[path] for path in self.paths]
        levels = harness.sweep_levels(self.requester(config), batches, plan, deadline=self.local.deadline)
        reasons = [
            f"K={k}: {level['rejected_409']} answer(s) 409 at or below the predictor's concurrency max"
            for k, level in levels.items()
            if level["rejected_409"] and int(k) <= plan.server_max
        ] + [f"K={k}: {level['errors']} failed request(s)" for k, level in levels.items() if level["errors"]]
        not_run = [k for k in plan.levels if str(k) not in levels]
        return {
            **plan.as_report(),
            "config": config.name,
            "results": levels,  # K -> harness.level_report
            "not_run": not_run,
            "reasons": reasons,
        }
