"""One command for the first machine with a GPU: does every configuration work, and how fast is it?

    python benchmarks/gpu_check.py [--device cuda] [--weights-dir weights/] [--images data/1.jpg ..]
        [--configs baseline/safe fast/optimized/inductor ..] [--repeats 3] [--budget-s 540]

Every runtime_profile x stability_mode x compile_backend (cudagraphs only on CUDA; safe once
per profile) runs on the photos in data/ (or ``--images``), one photo per request: ``--warmup``
untimed passes, then ``--repeats`` timed ones. Seed-0 random weights in a temp folder by
default (no network; timings are real, faces are noise); ``--weights-dir`` for real ones. Checks:

- it runs (an exception fails it; the others still run), and compiles no graph after warm-up;
- agreement, over the restored photos: baseline/safe with baseline/safe on the CPU within
  tests/test_parity_golden.py's tolerance (>= 97% of values within 1 level, <= 1.5% beyond 3);
  every other configuration (fp16, channels_last, compiled; max_speed drops the ParseNet
  mask) with baseline/safe on the device: a mean absolute difference of 8 levels fails it;
- per-stage warm ms p50/p95 per request, host part (decode, prepare, align, paste, resize,
  encode) apart from device part (detect, restore, parse); peak GPU memory (not on CPU).

``--budget-s``: a pass that would end past the budget (judged by the one before) is not
started; what was measured is written, configurations left out get SKIP.

Output: a line per configuration on stdout (``PASS``/``FAIL``/``SKIP``, figures) and one JSON:
``environment``, ``device``, ``weights``, ``images``, ``bounds``, ``not_run`` and ``configs``:
``name``, ``verdict``, ``reasons``, ``timed_passes``, ``stages_ms`` {stage: {p50, p95, ..};
``request`` = the whole}, ``host_ms``, ``device_ms``, ``peak_gpu_mb``, ``compiles_after_warmup``,
``agreement`` {reference, within_one, over_three, mean_abs}.

Exit codes: 0 every configuration that ran passed; 1 at least one failed; 2 bad arguments;
3 no CUDA device for ``--device cuda`` (said on stderr at once, before any weights load).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import numpy as np
import stats

EXIT_FAILED, EXIT_NO_CUDA = 1, 3
HOST_STAGES = ("decode", "prepare", "align", "paste", "resize", "encode")
DEVICE_STAGES = ("detect", "restore", "parse")
# tests/test_parity_golden.py's tolerance where its stricter AVX-512 figures do not apply
MIN_WITHIN_ONE, MAX_OVER_THREE = 0.97, 0.015
# levels of 255, generous: on a 2-core CPU (seed-0 weights, tests/golden/04) max_speed/safe measured
# 0.77 and baseline/optimized/none 0.29 (2.1% of its values more than 3 levels off: channels_last)
MAX_MEAN_ABS = 8.0
BOUNDS = {"min_within_one": MIN_WITHIN_ONE, "max_over_three": MAX_OVER_THREE, "max_mean_abs": MAX_MEAN_ABS}
FIDELITY, MAX_PIXELS = 0.5, 40_000_000


@dataclass(frozen=True)
class Config:
    profile: str
    stability: str
    backend: str

    @property
    def name(self) -> str:
        return f"{self.profile}/{self.stability}" + ("" if self.stability == "safe" else f"/{self.backend}")


@dataclass
class Outcome:
    config: Config
    reasons: list[str] = field(default_factory=list)
    requests: list[dict[str, float]] = field(default_factory=list)  # stage -> ms, per timed request
    outputs: list[np.ndarray] = field(default_factory=list)  # the last pass's restored photos
    figures: dict[str, Any] = field(default_factory=dict)
    timed_passes: int = 0

    @property
    def verdict(self) -> str:
        return "FAIL" if self.reasons else ("PASS" if self.timed_passes else "SKIP")

    def as_report(self) -> dict[str, Any]:
        head = {"name": self.config.name, "verdict": self.verdict, "reasons": self.reasons}
        return head | {"timed_passes": self.timed_passes} | self.figures


def plan(device_type: str, wanted: list[str] | None) -> list[Config]:
    """Every configuration this device can run, baseline/safe first (the others' reference)."""
    from codeformer.config import COMPILE_BACKENDS, CUDA_ONLY_BACKENDS, PROFILES

    backends = [b for b in COMPILE_BACKENDS if device_type == "cuda" or b not in CUDA_ONLY_BACKENDS]
    configs = [Config(p, "safe", "none") for p in PROFILES]
    configs += [Config(p, "optimized", b) for b in backends for p in PROFILES]
    unknown = sorted(set(wanted or ()) - {c.name for c in configs})
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {[c.name for c in configs]}")
    return [c for c in configs if not wanted or c.name in wanted]


def agreement(ours: list[np.ndarray], reference: list[np.ndarray], label: str) -> dict[str, Any]:
    """The golden parity figures of ``ours`` against ``reference``, over all photos together."""
    flat = [np.concatenate([a.ravel() for a in images]).astype(np.int16) for images in (ours, reference)]
    diff = np.abs(flat[0] - flat[1])
    within_one, over_three, mean_abs = float((diff <= 1).mean()), float((diff > 3).mean()), float(diff.mean())
    return dict(reference=label, within_one=within_one, over_three=over_three, mean_abs=mean_abs)


def judge(outcome: Outcome, figures: dict[str, Any]) -> None:
    """Fail ``outcome`` where its agreement is outside its bound (the docstring's "agreement")."""
    outcome.figures["agreement"] = figures
    within, beyond, what = figures["within_one"], figures["over_three"], figures["reference"]
    if outcome.config.name == "baseline/safe" and (within < MIN_WITHIN_ONE or beyond > MAX_OVER_THREE):
        outcome.reasons.append(
            f"differs from {what}: {within:.3%} within 1 level (>= {MIN_WITHIN_ONE:.0%}), "
            f"{beyond:.3%} beyond 3 (<= {MAX_OVER_THREE:.1%})"
        )
    elif outcome.config.name != "baseline/safe" and figures["mean_abs"] > MAX_MEAN_ABS:
        outcome.reasons.append(f"mean abs difference {figures['mean_abs']:.2f} > {MAX_MEAN_ABS}")


class Checker:
    """Runs configurations on one device within a deadline; one ``Restorer`` per compile backend."""

    def __init__(
        self, args: argparse.Namespace, weights_dir: Path, photos: list[bytes], deadline: float
    ) -> None:
        import torch

        self.torch, self.args, self.weights_dir, self.photos = torch, args, weights_dir, photos
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

    def one_pass(self, restorer: Any, config: Config) -> tuple[list[dict[str, float]], list, float]:
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

    def fits(self, expected_s: float) -> bool:
        return time.monotonic() + expected_s < self.deadline

    def run(self, config: Config) -> Outcome:
        """Warm-up passes, then timed passes while the budget lasts; failures become reasons."""
        from torch._dynamo.utils import counters

        outcome, cuda, last_s = Outcome(config), self.device.type == "cuda", 0.0
        if cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for _ in range(self.args.warmup):
                if not self.fits(last_s):
                    return outcome
                _, outcome.outputs, last_s = self.one_pass(self.restorer(config.backend), config)
            graphs = counters["stats"]["unique_graphs"]
            for _ in range(self.args.repeats):
                if not self.fits(last_s):
                    break
                requests, outcome.outputs, last_s = self.one_pass(self.restorer(config.backend), config)
                outcome.requests += requests
                outcome.timed_passes += 1
            recompiles = counters["stats"]["unique_graphs"] - graphs
        except Exception as exc:  # a check tool reports every failure and goes on to the next configuration
            outcome.reasons.append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            return outcome
        if outcome.requests:
            outcome.figures.update(summaries(outcome.requests))
        outcome.figures["compiles_after_warmup"] = recompiles
        if recompiles:
            outcome.reasons.append(f"{recompiles} graph(s) compiled after warm-up")
        if cuda:
            outcome.figures["peak_gpu_mb"] = self.torch.cuda.max_memory_allocated(self.device) / 2**20
        return outcome

    def cpu_reference(self) -> list[np.ndarray] | None:
        """baseline/safe on the CPU, once, untimed; None when the budget has no room left."""
        if not self.fits(0.0):
            return None
        restorer = self.restorer("none", self.torch.device("cpu"))
        return self.one_pass(restorer, Config("baseline", "safe", "none"))[1]


def summaries(requests: list[dict[str, float]]) -> dict[str, Any]:
    """Per-stage ms summaries, and the host and device parts as sums per request."""
    names = dict.fromkeys(stage for request in requests for stage in request)
    # a stage a request skips (resize at working size, parse in max_speed) is left out, not 0
    per_stage = {stage: stats.summarize(r[stage] for r in requests if stage in r) for stage in names}
    host = stats.summarize(sum(r.get(stage, 0.0) for stage in HOST_STAGES) for r in requests)
    device = stats.summarize(sum(r.get(stage, 0.0) for stage in DEVICE_STAGES) for r in requests)
    return {"stages_ms": per_stage, "host_ms": host, "device_ms": device}


def verdict_line(outcome: Outcome) -> str:
    figures, parts = outcome.figures, [f"{outcome.verdict} {outcome.config.name}"]
    if "stages_ms" in figures:
        for name, ms in (("request", figures["stages_ms"]["request"]), ("host", figures["host_ms"])):
            parts.append(f"{name} p50={ms['p50']:.1f} p95={ms['p95']:.1f} ms")
        parts.append(f"device p50={figures['device_ms']['p50']:.1f} p95={figures['device_ms']['p95']:.1f} ms")
    if "peak_gpu_mb" in figures:
        parts.append(f"peak {figures['peak_gpu_mb']:.0f} MiB")
    if agreed := figures.get("agreement"):
        parts.append(f"mean abs {agreed['mean_abs']:.2f} vs {agreed['reference']}")
    return "  ".join(parts + outcome.reasons)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to try the checks here")
    parser.add_argument("--weights-dir", type=Path, help="real weights; default: seed-0 random ones")
    parser.add_argument("--images", type=Path, nargs="+", help="default: the photos in data/")
    parser.add_argument("--configs", nargs="+", help="only these, e.g. baseline/safe fast/optimized/inductor")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes; a compile after them fails")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per configuration")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop cleanly within this many s")
    parser.add_argument("--max-faces", type=int, default=20, help="per photo (CODEFORMER_MAX_FACES)")
    parser.add_argument("--output", type=Path, default=harness.RESULTS_DIR / "gpu_check.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # the one heavy import before the CUDA check: nothing else loads without a GPU

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "nothing checked. Run it on a GPU machine; --device cpu tries the checks here",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    started = time.monotonic()
    paths = args.images or sorted((harness.PROJECT_ROOT / "data").glob("*.jpg"))
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        weights_dir = args.weights_dir or stack.enter_context(harness.random_weights_folder())
        label = harness.portable_path(args.weights_dir) if args.weights_dir else harness.RANDOM_WEIGHTS_LABEL
        checker = Checker(args, weights_dir, [path.read_bytes() for path in paths], started + args.budget_s)
        reference: list[np.ndarray] = []  # baseline/safe's outputs on the device
        for config in plan(checker.device.type, args.configs):
            outcomes.append(outcome := checker.run(config))
            if outcome.verdict == "PASS" and config.name == "baseline/safe":
                reference = outcome.outputs
                cpu = checker.cpu_reference() if checker.device.type == "cuda" else outcome.outputs
                if cpu is not None:
                    judge(outcome, agreement(outcome.outputs, cpu, "baseline/safe on cpu"))
            elif outcome.verdict == "PASS" and reference:
                judge(outcome, agreement(outcome.outputs, reference, "baseline/safe"))
            print(verdict_line(outcome), flush=True)
    report = {
        "command": harness.command_line(),
        "created": harness.now_iso(),
        "environment": harness.environment_info(),
        "torch": torch.__version__,
        "device": str(checker.device),
        "device_name": torch.cuda.get_device_name(checker.device) if checker.device.type == "cuda" else None,
        "weights": label,
        "images": [harness.portable_path(path) for path in paths],
        "budget_s": args.budget_s,
        "elapsed_s": time.monotonic() - started,
        "bounds": BOUNDS,
        "configs": [outcome.as_report() for outcome in outcomes],
        "not_run": [outcome.config.name for outcome in outcomes if outcome.verdict == "SKIP"],
    }
    harness.write_report(report, args.output)
    if report["not_run"]:
        print(f"not run (budget {args.budget_s:.0f} s): {' '.join(report['not_run'])}")
    print(f"wrote {harness.portable_path(args.output)}")
    return EXIT_FAILED if any(outcome.verdict == "FAIL" for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
