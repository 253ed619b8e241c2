"""gpu_check.py's checks in this process: a ``Restorer`` per compile backend, on the chosen device.

In process, the check sees what the server cannot: graphs compiled after warm-up (dynamo's
counters) and peak GPU memory. Every photo is its own request, decode and encode included.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from gpu_check_verdicts import FIDELITY, MAX_PIXELS, Config, Outcome, PassResult, run_passes, summaries


class Checker:
    """Runs configurations on one device within a deadline; one ``Restorer`` per compile backend."""

    def __init__(
        self, args: argparse.Namespace, weights_dir: Path, paths: list[Path], deadline: float
    ) -> None:
        import torch

        self.torch, self.args, self.weights_dir = torch, args, weights_dir
        self.photos = [path.read_bytes() for path in paths]
        self.device, self.deadline = torch.device(args.device), deadline
        self.restorers: dict[str, Any] = {}

    def restorer(self, backend: str, device: Any = None) -> Any:
        """A Restorer per backend and device: a process fixes its backend at its first optimized request."""
        from codeformer.config import Settings
        from codeformer.pipeline import Restorer

        device = device or self.device
        if f"{device}:{backend}" not in self.restorers:
            settings = Settings.from_env(device.type, max_faces=self.args.max_faces)
            self.restorers[f"{device}:{backend}"] = Restorer.load(self.weights_dir, device, settings)
        return self.restorers[f"{device}:{backend}"]

    def one_pass(self, restorer: Any, config: Config) -> PassResult:
        """Every photo as its own request, decode and encode included: (stage -> ms per photo, outputs, s)."""
        from codeformer.config import RequestOptions
        from codeformer.imageio import decode_image, encode_jpeg

        options = RequestOptions.parse(FIDELITY, config.profile, config.stability, config.backend)
        requests, outputs, start = [], [], time.perf_counter()
        for index, data in enumerate(self.photos):
            began = time.perf_counter()
            image = decode_image(data, f"photo {index}", MAX_PIXELS)
            decoded = time.perf_counter()
            [result] = restorer.restore([image], options)
            restored = time.perf_counter()
            encode_jpeg(result.image)
            timings = {"decode": (decoded - began) * 1000, **result.timings}
            timings["encode"] = (time.perf_counter() - restored) * 1000
            timings["request"] = (time.perf_counter() - began) * 1000
            requests.append(timings)
            outputs.append(result.image)
        return requests, outputs, time.perf_counter() - start

    def close(self) -> None:
        """Nothing to release: the restorers go with the process (``ServerChecker`` stops a server)."""

    def fits(self, expected_s: float) -> bool:
        return time.monotonic() + expected_s < self.deadline

    def run(self, config: Config) -> Outcome:
        """Warm-up passes, then timed passes while the budget lasts; failures become reasons."""
        from torch._dynamo.utils import counters

        outcome, cuda, graphs = Outcome(config), self.device.type == "cuda", [0]
        if cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        try:
            run_passes(
                outcome,
                lambda: self.one_pass(self.restorer(config.backend), config),
                self.args.warmup,
                self.args.repeats,
                self.fits,
                after_warmup=lambda: graphs.append(counters["stats"]["unique_graphs"]),
            )
        except Exception as exc:  # a check tool reports every failure and goes on to the next configuration
            outcome.reasons.append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            return outcome
        if len(graphs) == 1:  # the budget ended the warm-up: nothing was timed
            return outcome
        recompiles = counters["stats"]["unique_graphs"] - graphs[1]
        if outcome.requests:
            outcome.figures.update(summaries(outcome.requests))
        outcome.figures["compiles_after_warmup"] = recompiles
        if recompiles:
            outcome.reasons.append(f"{recompiles} graph(s) compiled after warm-up")
        if cuda:
            outcome.figures["peak_gpu_mb"] = self.torch.cuda.max_memory_allocated(self.device) / 2**20
        return outcome

    def cpu_reference(self, baseline: Outcome) -> tuple[list[np.ndarray], str] | None:
        """baseline/safe on the CPU, once, untimed (on a CPU: ``baseline``'s outputs); None past budget."""
        if self.device.type == "cpu":
            return baseline.outputs, "baseline/safe on cpu"
        if not self.fits(0.0):
            return None
        restorer = self.restorer("none", self.torch.device("cpu"))
        return self.one_pass(restorer, Config("baseline", "safe", "none"))[1], "baseline/safe on cpu"
