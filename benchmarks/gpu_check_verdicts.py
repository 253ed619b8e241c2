"""What gpu_check.py decides, whichever way it ran a configuration: the plan, agreement, verdicts.

A ``Config`` is one runtime_profile x stability_mode x compile_backend; its ``Outcome`` holds
the reasons it failed, the per-request stage ms, the last pass's restored photos and the
figures for the JSON. ``run_passes`` is the warm-up-then-timed loop both checkers share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import harness
import numpy as np

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
    """Every configuration this device can run, or those ``wanted`` in their order; baseline/safe first.

    baseline/safe is the others' reference; a budget that ends early leaves out the last ones.
    """
    from codeformer.config import COMPILE_BACKENDS, CUDA_ONLY_BACKENDS, PROFILES

    backends = [b for b in COMPILE_BACKENDS if device_type == "cuda" or b not in CUDA_ONLY_BACKENDS]
    configs = [Config(p, "safe", "none") for p in PROFILES]
    configs += [Config(p, "optimized", b) for b in backends for p in PROFILES]
    unknown = sorted(set(wanted or ()) - {c.name for c in configs})
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {[c.name for c in configs]}")
    if wanted:
        configs = sorted((c for c in configs if c.name in wanted), key=lambda c: wanted.index(c.name))
    return sorted(configs, key=lambda c: c.name != "baseline/safe")


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


def summaries(requests: list[dict[str, float]]) -> dict[str, Any]:
    """Per-stage ms summaries, and the host and device parts as sums per request."""
    names = dict.fromkeys(stage for request in requests for stage in request)
    # a stage a request skips (resize at working size, parse in max_speed) is left out, not 0
    per_stage = {stage: harness.summarize(r[stage] for r in requests if stage in r) for stage in names}
    parts = {}
    for part, stages in (("host_ms", HOST_STAGES), ("device_ms", DEVICE_STAGES)):
        # a request with none of a part's stages (no log line read) has no figure, not 0 ms
        timed = [r for r in requests if any(stage in r for stage in stages)]
        parts[part] = harness.summarize(sum(r.get(stage, 0.0) for stage in stages) for r in timed)
    return {"stages_ms": per_stage, **parts}


def verdict_line(outcome: Outcome) -> str:
    figures, parts = outcome.figures, [f"{outcome.verdict} {outcome.config.name}"]
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
