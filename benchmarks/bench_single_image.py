"""The fastest runtime_profile x stability_mode x compile_backend for one photo, warm and cold.

    python benchmarks/bench_single_image.py [--image data/1.jpg] [--warmup 1] [--repeats 3]
        [--profiles baseline,fast,max_speed] [--stability-modes safe,optimized]
        [--backends none,eager,aot_eager,inductor,cudagraphs]
        [--port 5000] [--weights-dir DIR | --weights-url URL | --random-weights]
        [--server-env KEY=VALUE ...] [--output benchmarks/last_bench_single_image.json]

Every combination that applies on this machine gets a fresh server (``python -m
codeformer.serve`` on ``--port``), so that its cold figures are real: process start to
READY, the first request after READY (which pays for compilation in optimized mode), and
process start to that first response. Then ``--warmup`` untimed requests (the first one
included) and ``--repeats`` timed ones give the steady-state latency. ``compile_backend``
only matters with ``stability_mode=optimized``, so safe mode is one combination per
profile; ``cudagraphs`` needs CUDA. The filters bound a run (each combination costs a
server start, 15-60 s on CPU); the JSON lists every combination that was not run and why.

Reports ``best_warm`` (lowest steady-state p50 latency) and ``best_cold`` (lowest first
request latency, and lowest process start to first response); a table goes to stdout and
the report to ``--output``. Exit code: 0, 1 when a combination failed, 2 for a bad setting
(taken port), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # run as a file (python benchmarks/bench_single_image.py): make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from benchmarks import stats  # noqa: E402
from benchmarks.run_bench import (  # noqa: E402
    EXIT_BAD_SETTING,
    EXIT_INTERRUPTED,
    EXIT_REQUEST_FAILED,
    PROJECT_ROOT,
    RESULTS_DIR,
    Requester,
    RequestSample,
    add_server_arguments,
    check_common_arguments,
    choose_weights,
    cold_figures,
    environment_info,
    format_table,
    now_iso,
    parse_server_env,
    request_options,
    run_profile,
    server_env_lines,
    sigterm_as_interrupt,
    split_names,
    start_local_server,
    write_json,
)
from codeformer.client import ServerError  # noqa: E402
from codeformer.config import COMPILE_BACKENDS, CUDA_ONLY_BACKENDS, PROFILES, STABILITY_MODES  # noqa: E402
from codeformer.errors import ConfigError  # noqa: E402
from codeformer.serve import DEFAULT_HOST, check_port_free  # noqa: E402

log = logging.getLogger("benchmarks.bench_single_image")

DEFAULT_IMAGE = PROJECT_ROOT / "data" / "1.jpg"
DEFAULT_OUTPUT = PROJECT_ROOT / "benchmarks" / "last_bench_single_image.json"
SERVER_LOG_DIR = RESULTS_DIR / "bench_single_image"


@dataclass(frozen=True)
class Combination:
    profile: str
    stability_mode: str
    compile_backend: str | None  # None in safe mode, where the server ignores it

    @property
    def label(self) -> str:
        parts = [self.profile, self.stability_mode]
        if self.compile_backend is not None:
            parts.append(self.compile_backend)
        return "/".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "stability_mode": self.stability_mode,
            "compile_backend": self.compile_backend,
        }


def all_combinations() -> list[Combination]:
    """Every distinct combination: safe once per profile, optimized once per backend."""
    combinations = []
    for profile in PROFILES:
        for mode, stability in STABILITY_MODES.items():
            backends: list[str | None] = list(COMPILE_BACKENDS) if stability.compiled else [None]
            combinations.extend(Combination(profile, mode, backend) for backend in backends)
    return combinations


def plan_combinations(
    profiles: list[str], stability_modes: list[str], backends: list[str], cuda_available: bool
) -> tuple[list[Combination], list[dict[str, Any]]]:
    """The combinations to run, and every other one with the reason it is skipped."""
    selected: list[Combination] = []
    skipped: list[dict[str, Any]] = []
    for combination in all_combinations():
        reason = None
        if combination.profile not in profiles:
            reason = "excluded by --profiles"
        elif combination.stability_mode not in stability_modes:
            reason = "excluded by --stability-modes"
        elif combination.compile_backend is not None and combination.compile_backend not in backends:
            reason = "excluded by --backends"
        elif combination.compile_backend in CUDA_ONLY_BACKENDS and not cuda_available:
            reason = f"{combination.compile_backend} needs CUDA; this machine has none"
        if reason is None:
            selected.append(combination)
        else:
            skipped.append({**combination.as_dict(), "reason": reason})
    return selected, skipped


def cuda_available() -> bool:
    import torch  # only here: the plan needs to know, the rest of the client does not

    return torch.cuda.is_available()


def measure(
    combination: Combination,
    image: Path,
    args: argparse.Namespace,
    server_env: dict[str, str],
    on_request: Any,
) -> dict[str, Any]:
    """Fresh server, cold request, warm-ups, timed requests; the server is stopped on return."""
    options = request_options(
        combination.profile, combination.stability_mode, combination.compile_backend or "none", args.fidelity
    )
    log_path = SERVER_LOG_DIR / f"{combination.label.replace('/', '_')}.server.log"
    with contextlib.ExitStack() as stack:
        server, start_to_ready = start_local_server(
            args.port, server_env, log_path, args.ready_timeout, stack
        )
        requester = Requester(server.client, options, server)
        first = requester.send([image], "cold")
        cold = cold_figures(first, time.monotonic(), server, start_to_ready, combination.profile)
        on_request(first)
        samples, _ = run_profile(requester, [[image]], args.warmup, args.repeats, on_request, first)
    timed = [s for s in samples if s.phase == "timed"]
    succeeded = [s for s in timed if s.ok]
    errors = [s for s in samples if not s.ok]
    return {
        **combination.as_dict(),
        "label": combination.label,
        "options": options,
        "server_log": str(log_path),
        "cold": cold,
        "warm": stats.summarize(s.latency_s for s in succeeded),
        "warm_predict_time": stats.summarize(
            s.predict_time_s for s in succeeded if s.predict_time_s is not None
        ),
        "faces": {"found": first.faces_found[0], "kept": first.faces_kept[0]},
        "errors": len(errors),
        "error_messages": sorted({s.error for s in errors if s.error})[:5],
        "retries": sum(s.retries for s in samples),
        "samples": [
            {"phase": s.phase, "latency_s": s.latency_s, "predict_time_s": s.predict_time_s, "ok": s.ok}
            for s in samples
        ],
    }


def winners(results: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``best_warm`` by steady-state p50; ``best_cold`` by first request and by start to first response."""

    def pick(candidates: list[dict[str, Any]], value: Any, key: str) -> dict[str, Any] | None:
        scored = [(value(result), result) for result in candidates]
        scored = [(score, result) for score, result in scored if score is not None]
        if not scored:
            return None
        score, best = min(scored, key=lambda pair: pair[0])
        keys = ("label", "profile", "stability_mode", "compile_backend")
        return {**{k: best[k] for k in keys}, key: score}

    measured = [r for r in results if "error" not in r]
    cold_ok = [r for r in measured if r["cold"]["first_request_ok"]]
    best_warm = pick(measured, lambda r: r["warm"]["p50"], "warm_p50_s")
    if best_warm is not None:
        chosen = next(r for r in measured if r["label"] == best_warm["label"])
        best_warm["warm_avg_s"] = chosen["warm"]["avg"]
    best_cold = {
        "first_request": pick(cold_ok, lambda r: r["cold"]["first_request_s"], "first_request_s"),
        "start_to_first_response": pick(
            cold_ok, lambda r: r["cold"]["start_to_first_response_s"], "start_to_first_response_s"
        ),
    }
    return best_warm, best_cold


def _seconds(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    headers = [
        "combination", "start->READY", "1st req", "start->1st resp",
        "warm avg", "warm p50", "warm p95", "server p50", "faces", "errors", "retries",
    ]  # fmt: skip
    rows = []
    for result in report["combinations"]:
        if "error" in result:
            rows.append([result["label"], "FAILED", *["-"] * (len(headers) - 2)])
            continue
        cold, warm = result["cold"], result["warm"]
        rows.append(
            [
                result["label"],
                _seconds(cold["start_to_ready_s"], 1),
                _seconds(cold["first_request_s"]) + ("" if cold["first_request_ok"] else " FAILED"),
                _seconds(cold["start_to_first_response_s"], 1),
                _seconds(warm["avg"]),
                _seconds(warm["p50"]),
                _seconds(warm["p95"]),
                _seconds(result["warm_predict_time"]["p50"]),
                "-"
                if result["faces"]["kept"] is None
                else f"{result['faces']['kept']}/{result['faces']['found']}",
                str(result["errors"]),
                str(result["retries"]),
            ]
        )
    lines = [
        f"bench_single_image: {report['image']} ({report['image_size']}), warm-up {report['warmup']}, "
        f"repeats {report['repeats']}, fidelity {report['fidelity']}, device {report['device'] or 'unknown'}",
        report["weights"]["label"],
        *server_env_lines(report["server_env"]),
        "",
        format_table(headers, rows),
        "(seconds; 1st req = first request after READY; warm = timed requests after the warm-ups; "
        "faces = kept/found)",
        "",
    ]
    best_warm, best_cold = report["best_warm"], report["best_cold"]
    if best_warm:
        lines.append(
            f"best_warm: {best_warm['label']}  p50 {best_warm['warm_p50_s']:.2f} s "
            f"(avg {best_warm['warm_avg_s']:.2f} s)"
        )
    if best_cold["first_request"]:
        first = best_cold["first_request"]
        lines.append(
            f"best_cold (first request after READY): {first['label']}  {first['first_request_s']:.2f} s"
        )
    if best_cold["start_to_first_response"]:
        start = best_cold["start_to_first_response"]
        lines.append(
            f"best_cold (process start to first response): {start['label']}  "
            f"{start['start_to_first_response_s']:.1f} s"
        )
    if report["skipped"]:
        reasons: dict[str, int] = {}
        for item in report["skipped"]:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        lines.append("skipped: " + "; ".join(f"{n} {reason}" for reason, n in reasons.items()))
    return "\n".join(lines)


def image_size(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return f"{image.width}x{image.height}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="default: data/1.jpg")
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), help="default: all")
    parser.add_argument("--stability-modes", nargs="+", default=list(STABILITY_MODES), help="default: all")
    parser.add_argument(
        "--backends", nargs="+", default=list(COMPILE_BACKENDS), help="for optimized mode (default: all)"
    )
    add_server_arguments(parser)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: %(default)s")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        check_common_arguments(args)
        profiles = split_names(args.profiles, list(PROFILES), "--profiles")
        modes = split_names(args.stability_modes, list(STABILITY_MODES), "--stability-modes")
        backends = split_names(args.backends, list(COMPILE_BACKENDS), "--backends")
        server_env = parse_server_env(args.server_env)
        if not args.image.is_file():
            raise ConfigError(f"--image: no such file {args.image}")
        check_port_free(DEFAULT_HOST, args.port)
        plan, skipped = plan_combinations(profiles, modes, backends, cuda_available())
        if not plan:
            raise ConfigError("no combination left to run: widen --profiles/--stability-modes/--backends")
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_BAD_SETTING

    report: dict[str, Any] = {
        "tool": "bench_single_image",
        "started_at": now_iso(),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:])],
        "image": str(args.image),
        "image_size": image_size(args.image),
        "fidelity": args.fidelity,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "port": args.port,
        "server_env": server_env,
        "environment": environment_info(),
        "device": None,
        "weights": None,
        "note": "compile_backend only applies to stability_mode=optimized: safe mode is one combination "
        "per profile. The first request to each fresh server is the cold figure and the first warm-up.",
        "planned": [c.label for c in plan],
        "skipped": skipped,
        "combinations": [],
        "best_warm": None,
        "best_cold": {"first_request": None, "start_to_first_response": None},
    }
    results: list[dict[str, Any]] = report["combinations"]
    try:
        with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            weights = choose_weights(args, stack)
            report["weights"] = {"label": weights.label, "random": weights.random, "env": weights.env}
            env = {**weights.env, **server_env}
            total = len(plan) * (max(args.warmup, 1) + args.repeats)
            progress = stack.enter_context(tqdm(total=total, unit="req", file=sys.stderr))
            stack.enter_context(logging_redirect_tqdm())

            def on_request(sample: RequestSample) -> None:
                progress.update(1)
                progress.set_postfix_str(f"last {sample.latency_s:.1f}s{'' if sample.ok else ' FAILED'}")

            for combination in plan:
                progress.set_description(combination.label)
                done_before = progress.n
                try:
                    result = measure(combination, args.image, args, env, on_request)
                except ServerError as exc:
                    # one combination failing (setup, a crash) must not hide the others' figures
                    log.error("%s failed: %s", combination.label, exc)
                    result = {**combination.as_dict(), "label": combination.label, "error": str(exc)[-4000:]}
                    progress.update(max(args.warmup, 1) + args.repeats - (progress.n - done_before))
                results.append(result)
                if report["device"] is None and "cold" in result:
                    report["device"] = result["cold"].get("device")
    except KeyboardInterrupt:
        report["aborted"] = "interrupted"
        report["best_warm"], report["best_cold"] = winners(results)
        write_json(report, args.output)
        log.error("interrupted; the server was stopped; partial report in %s", args.output)
        return EXIT_INTERRUPTED
    report["finished_at"] = now_iso()
    report["best_warm"], report["best_cold"] = winners(results)
    write_json(report, args.output)
    print(render(report))
    print(f"\nJSON: {args.output}")
    failed = any("error" in r or r["errors"] for r in results)
    return EXIT_REQUEST_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
