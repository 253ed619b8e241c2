"""The fastest runtime_profile x stability_mode x compile_backend for one photo, warm and cold.

    python benchmarks/bench_single_image.py [--image data/1.jpg] [--warmup 1] [--repeats 3]
        [--profiles baseline,fast,max_speed] [--stability-modes safe,optimized]
        [--backends none,eager,aot_eager,inductor,cudagraphs]
        [--port 5000] [--weights-dir DIR | --weights-url URL | --random-weights]
        [--server-env KEY=VALUE ...] [--output benchmarks/results/bench_single_image.json]

Every combination that applies on this machine gets a fresh server (``python -m
codeformer.serving.serve`` on ``--port``), so that its cold figures are real: process start to
READY, the first request after READY (which pays for compilation in optimized mode), and
process start to that first response. Then ``--warmup`` untimed requests (the first one
included) and ``--repeats`` timed ones give the steady-state latency. ``compile_backend``
only matters with ``stability_mode=optimized``, so safe mode is one combination per
profile; ``cudagraphs`` needs CUDA. The filters bound a run (each combination costs a
server start); the JSON lists every combination that was not run and why.

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
from collections import Counter
from pathlib import Path
from typing import Any

import harness
from PIL import Image

from benchmarks import load, plans, reports
from benchmarks.plans import Configuration
from codeformer.config import COMPILE_BACKENDS, PROFILES, STABILITY_MODES
from codeformer.errors import ConfigError
from codeformer.serving.client import ServerError

log = logging.getLogger("benchmarks.bench_single_image")

DEFAULT_IMAGE = harness.PROJECT_ROOT / "data" / "1.jpg"
DEFAULT_OUTPUT = harness.RESULTS_DIR / "bench_single_image.json"
SERVER_LOG_DIR = harness.RESULTS_DIR / "bench_single_image"
# the two cold winners (plans.COLD_FIGURES): the report's key, the table's words, digits shown
BEST_COLD_LINES = (
    ("first_request", "first request after READY", 2),
    ("start_to_first_response", "process start to first response", 1),
)


def measure(
    combination: Configuration,
    image: Path,
    args: argparse.Namespace,
    server_env: dict[str, str],
    on_request: load.OnRequest,
) -> dict[str, Any]:
    """Fresh server, cold request, warm-ups, timed requests; the server is stopped on return."""
    options = load.request_options(combination.profile, combination.mode, combination.backend, args.fidelity)
    log_path = SERVER_LOG_DIR / f"{combination.label.replace('/', '_')}.server.log"
    with contextlib.ExitStack() as stack:
        server = harness.start_server(args.port, server_env, log_path, args.ready_timeout, stack)
        requester = load.Requester(server.client, options, server)
        first, cold = harness.send_cold(requester, [image], server, combination.profile, on_request)
        samples, round_seconds = load.run_profile(
            requester, [[image]], args.warmup, args.repeats, on_request, first
        )
    summary = load.profile_report(samples, round_seconds, options)
    return {
        **plans.combination_fields(combination),
        "label": combination.label,
        "options": options,
        "server_log": reports.portable_path(log_path),
        "cold": cold,
        "warm": summary["per_request"],
        "warm_predict_time": summary["predict_time"],
        "faces": {"found": first.faces_found[0], "restored": first.faces_restored[0]},
        **{key: summary[key] for key in ("errors", "error_messages", "retries")},
        "samples": [
            {key: getattr(s, key) for key in ("phase", "latency_s", "predict_time_s", "ok")} for s in samples
        ],
    }


def render(report: dict[str, Any]) -> str:
    headers = [
        "combination", "start->READY", "1st req", "start->1st resp",
        "warm avg", "warm p50", "warm p95", "server p50", "faces", "errors", "retries",
    ]  # fmt: skip
    sec = harness.seconds
    rows = []
    for result in report["combinations"]:
        if "error" in result:
            rows.append([result["label"], "FAILED", *["-"] * (len(headers) - 2)])
            continue
        cold, warm = result["cold"], result["warm"]
        failed = "" if cold["first_request_ok"] else " FAILED"
        rows.append(
            [result["label"], sec(cold["start_to_ready_s"], 1), sec(cold["first_request_s"]) + failed]
            + [sec(cold["start_to_first_response_s"], 1), *(sec(warm[key]) for key in ("avg", "p50", "p95"))]
            + [sec(result["warm_predict_time"]["p50"]), harness.faces_cell(result["faces"])]
            + [str(result["errors"]), str(result["retries"])]
        )
    lines = [
        f"bench_single_image: {report['image']} ({report['image_size']}), warm-up {report['warmup']}, "
        f"repeats {report['repeats']}, fidelity {report['fidelity']}, device {report['device'] or 'unknown'}",
        report["weights"]["label"],
        *harness.server_env_lines(report["server_env"]),
        "",
        harness.format_table(headers, rows),
        "(seconds; 1st req = first request after READY; warm = timed requests after the warm-ups; "
        "faces = restored/found)",
        "",
    ]
    best_warm, best_cold = report["best_warm"], report["best_cold"]
    if best_warm:
        lines.append(
            f"best_warm: {best_warm['label']}  p50 {best_warm['warm_p50_s']:.2f} s "
            f"(avg {best_warm['warm_avg_s']:.2f} s)"
        )
    for key, what, digits in BEST_COLD_LINES:
        if best_cold[key]:
            lines.append(
                f"best_cold ({what}): {best_cold[key]['label']}  {best_cold[key][key + '_s']:.{digits}f} s"
            )
    if report["skipped"]:
        reasons = Counter(item["reason"] for item in report["skipped"])
        lines.append("skipped: " + "; ".join(f"{n} {reason}" for reason, n in reasons.items()))
    return "\n".join(lines)


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
    harness.add_run_arguments(parser)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: %(default)s")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_arguments(build_parser(), argv)
    try:
        server_env, profiles = harness.check_run_arguments(args)
        modes = load.split_names(args.stability_modes, list(STABILITY_MODES), "--stability-modes")
        backends = load.split_names(args.backends, list(COMPILE_BACKENDS), "--backends")
        if not args.image.is_file():
            raise ConfigError(f"--image: no such file {args.image}")
        with Image.open(args.image) as image:
            image_size = image.size
        import torch  # only here: the plan needs to know, the rest of the client does not

        plan, skipped = plans.plan_combinations(profiles, modes, backends, torch.cuda.is_available())
        if not plan:
            raise ConfigError("no combination left to run: widen --profiles/--stability-modes/--backends")
    except ConfigError as exc:
        log.error("%s", exc)
        return harness.EXIT_BAD_SETTING

    report: dict[str, Any] = {
        "tool": "bench_single_image",
        "started_at": reports.now_iso(),
        "command": reports.command_line(),
        "image": reports.portable_path(args.image),
        "image_size": "{}x{}".format(*image_size),
        **{key: getattr(args, key) for key in ("fidelity", "warmup", "repeats", "port")},
        "server_env": server_env,
        "environment": reports.environment_info(),
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
        with harness.sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            weights = harness.choose_weights(args, stack)
            report["weights"] = weights.as_report()
            env = {**weights.env, **server_env}
            progress, on_request = harness.progress_bar(
                stack, len(plan) * (max(args.warmup, 1) + args.repeats)
            )
            for combination in plan:
                progress.set_description(combination.label)
                done_before = progress.n
                try:
                    result = measure(combination, args.image, args, env, on_request)
                except ServerError as exc:
                    # one combination failing (setup, a crash) must not hide the others' figures
                    log.error("%s failed: %s", combination.label, exc)
                    result = {
                        **plans.combination_fields(combination),
                        "label": combination.label,
                        "error": str(exc)[-4000:],
                    }
                    progress.update(max(args.warmup, 1) + args.repeats - (progress.n - done_before))
                results.append(result)
                if report["device"] is None and "cold" in result:
                    report["device"] = result["cold"].get("device")
    except KeyboardInterrupt:
        report["aborted"] = "interrupted"
        report["best_warm"], report["best_cold"] = plans.winners(results)
        reports.write_report(report, args.output)
        log.error("interrupted; the server was stopped; partial report in %s", args.output)
        return harness.EXIT_INTERRUPTED
    report["finished_at"] = reports.now_iso()
    report["best_warm"], report["best_cold"] = plans.winners(results)
    reports.write_report(report, args.output)
    print(render(report))
    print(f"\nJSON: {args.output}")
    failed = any("error" in r or r["errors"] for r in results)
    return harness.EXIT_REQUEST_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
