"""Which configurations a benchmark runs, and which of them won.

Every script starts from ``configurations`` (the one list of runtime_profile x stability_mode
x compile_backend, from the product's choices) and narrows it down here: ``check_plan`` for
``benchmarks/gpu_check.py`` (baseline/safe first: the others' reference),
``plan_combinations`` for ``benchmarks/bench_single_image.py`` (profile by profile, with the
reason each one left out is skipped). ``winners`` picks bench_single_image's fastest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from codeformer.config import COMPILE_BACKENDS, CUDA_ONLY_BACKENDS, PROFILES, STABILITY_MODES


@dataclass(frozen=True)
class Configuration:
    """One runtime_profile x stability_mode x compile_backend a request can choose, by name.

    Safe mode runs the nets as written and ignores the backend, so a safe configuration holds
    ``"none"`` and its ``label`` names two parts ("baseline/safe"); an optimized one names
    three ("max_speed/optimized/none"). The benchmarks and gpu_check key their reports by label.
    """

    profile: str
    mode: str
    backend: str

    @property
    def label(self) -> str:
        return f"{self.profile}/{self.mode}" + ("" if self.mode == "safe" else f"/{self.backend}")


def configurations(cuda: bool) -> list[Configuration]:
    """Every distinct configuration a device can run: safe once per profile, then optimized
    once per backend (each backend's profiles together); the cudagraphs backends only with ``cuda``."""
    safe = [name for name, stability in STABILITY_MODES.items() if not stability.compiled]
    compiled = [name for name, stability in STABILITY_MODES.items() if stability.compiled]
    backends = [backend for backend in COMPILE_BACKENDS if cuda or backend not in CUDA_ONLY_BACKENDS]
    every = [Configuration(profile, mode, "none") for mode in safe for profile in PROFILES]
    every += [
        Configuration(profile, mode, backend)
        for mode in compiled
        for backend in backends
        for profile in PROFILES
    ]
    return every


REFERENCE = Configuration("baseline", "safe", "none")  # what every other configuration is compared with
COLD_FIGURES = ("first_request", "start_to_first_response")  # the report's keys; each figure is key + "_s"


def check_plan(device_type: str, wanted: Sequence[str] | None) -> list[Configuration]:
    """Every configuration this device can run, or those ``wanted`` in their order; baseline/safe first.

    baseline/safe is the others' reference; a budget that ends early leaves out the last ones.
    Raises ``SystemExit`` naming the choices for a label that is not one of them.
    """
    every = configurations(cuda=device_type == "cuda")
    unknown = sorted(set(wanted or ()) - {c.label for c in every})
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {[c.label for c in every]}")
    if wanted:
        every = sorted((c for c in every if c.label in wanted), key=lambda c: list(wanted).index(c.label))
    return sorted(every, key=lambda c: c != REFERENCE)


def combination_fields(configuration: Configuration) -> dict[str, str | None]:
    """A configuration as bench_single_image's JSON names it: no compile_backend in safe mode."""
    compiled = STABILITY_MODES[configuration.mode].compiled
    return {
        "profile": configuration.profile,
        "stability_mode": configuration.mode,
        "compile_backend": configuration.backend if compiled else None,
    }


def plan_combinations(
    profiles: Sequence[str], stability_modes: Sequence[str], backends: Sequence[str], cuda_available: bool
) -> tuple[list[Configuration], list[dict[str, Any]]]:
    """The configurations to run, profile by profile, and every other one with the reason it is skipped.

    Every distinct configuration is considered: safe once per profile, optimized once per
    backend (cudagraphs too without CUDA, so that the report says why it did not run).
    """
    order = list(PROFILES)
    # a stable sort: per profile, safe first, then optimized in COMPILE_BACKENDS' order
    every = sorted(configurations(cuda=True), key=lambda c: order.index(c.profile))
    selected: list[Configuration] = []
    skipped: list[dict[str, Any]] = []
    for configuration in every:
        compiled = STABILITY_MODES[configuration.mode].compiled
        reason = None
        if configuration.profile not in profiles:
            reason = "excluded by --profiles"
        elif configuration.mode not in stability_modes:
            reason = "excluded by --stability-modes"
        elif compiled and configuration.backend not in backends:
            reason = "excluded by --backends"
        elif configuration.backend in CUDA_ONLY_BACKENDS and not cuda_available:
            reason = f"{configuration.backend} needs CUDA; this machine has none"
        if reason is None:
            selected.append(configuration)
        else:
            skipped.append({**combination_fields(configuration), "reason": reason})
    return selected, skipped


def winners(results: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``best_warm`` by steady-state p50; ``best_cold`` by first request and by start to first response.

    ``results``: bench_single_image's per-configuration reports; one with an ``error`` is
    left out, and so is one whose first request failed from the cold figures.
    """

    def pick(candidates: list[dict[str, Any]], figure: Any, key: str) -> dict[str, Any] | None:
        scored = [result for result in candidates if figure(result) is not None]
        if not scored:
            return None
        best = min(scored, key=figure)
        return {
            **{k: best[k] for k in ("label", "profile", "stability_mode", "compile_backend")},
            key: figure(best),
        }

    measured = [r for r in results if "error" not in r]
    cold_ok = [r for r in measured if r["cold"]["first_request_ok"]]
    best_warm = pick(measured, lambda r: r["warm"]["p50"], "warm_p50_s")
    if best_warm is not None:
        best_warm["warm_avg_s"] = next(r for r in measured if r["label"] == best_warm["label"])["warm"]["avg"]
    best_cold = {
        key: pick(cold_ok, lambda r, figure=f"{key}_s": r["cold"][figure], f"{key}_s") for key in COLD_FIGURES
    }
    return best_warm, best_cold
