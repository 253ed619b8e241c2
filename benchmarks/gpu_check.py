"""One command for the first machine with a GPU: does every configuration work, and how fast is it?

    python benchmarks/gpu_check.py [--device cuda] [--weights-dir weights/] [--images data/1.jpg ..]
        [--configs baseline/safe fast/optimized/inductor ..] [--repeats 3] [--budget-s 540]
        [--server [--concurrency 1 2 4 N [--duration-s 30 | --requests 20]] [--sweep-config NAME]]

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

``--server``: the same checks through the Cog HTTP server (gpu_check_server.py: one server
per compile backend; per-request latency, the server's logged stage ms; agreement of the
decoded JPGs), with ``peak_gpu_mb`` and ``compiles_after_warmup`` null: the server does not
show them. ``--concurrency K ..`` (with --server) then sweeps ``--sweep-config`` (default
baseline/safe) with K clients sending back to back, as ``run_bench.py --concurrency`` does
(N = the predictor's concurrency max; 409s counted, not retried): JSON ``concurrency`` {levels,
concurrency_max, stop, config, results {K: throughput_images_per_s, per_request, rejected_409,
errors, ..}, not_run, reasons}; a 409 at K <= N or a failed request fails the run.

``--budget-s``: a pass that would end past the budget (judged by the one before) is not
started; what was measured is written, configurations left out get SKIP.

Output: a line per configuration on stdout (``PASS``/``FAIL``/``SKIP``, figures) and one JSON:
``environment``, ``device``, ``weights``, ``images``, ``bounds``, ``not_run`` and ``configs``:
``name``, ``verdict``, ``reasons``, ``timed_passes``, ``stages_ms`` {stage: {p50, p95, ..};
``request`` = the whole}, ``host_ms``, ``device_ms``, ``peak_gpu_mb``, ``compiles_after_warmup``,
``agreement`` {reference, within_one, over_three, mean_abs}; with --server ``observed_through``.

Exit codes: 0 every configuration that ran passed; 1 at least one failed; 2 bad arguments;
3 no CUDA device for ``--device cuda`` (said on stderr at once, before any weights load).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import concurrent_load
import harness
import numpy as np
from gpu_check_local import Checker
from gpu_check_server import ServerChecker
from gpu_check_verdicts import BOUNDS, Outcome, agreement, judge, plan, verdict_line

from codeformer.errors import ConfigError

EXIT_FAILED, EXIT_NO_CUDA = 1, 3


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, concurrent_load.LoadPlan | None]:
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
    parser.add_argument("--server", action="store_true", help="through the Cog HTTP server, not in process")
    concurrent_load.add_arguments(parser)
    parser.add_argument(
        "--sweep-config", default="baseline/safe", help="the configuration --concurrency sweeps"
    )
    args = parser.parse_args(argv)
    try:
        load = concurrent_load.check_arguments(args)
    except ConfigError as exc:
        parser.error(str(exc))  # exits 2
    if load is not None and not args.server:
        parser.error("--concurrency needs --server: the sweep sends HTTP requests")
    return args, load


def main(argv: list[str] | None = None) -> int:
    args, load = parse_args(argv)
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
    configs = plan(torch.device(args.device).type, args.configs)
    if load is not None and args.sweep_config not in [config.name for config in configs]:
        print(
            f"gpu_check: --sweep-config {args.sweep_config} is not in --configs; add it there",
            file=sys.stderr,
        )
        return 2
    outcomes: list[Outcome] = []
    sweep: dict | None = None
    with contextlib.ExitStack() as stack:
        weights_dir = args.weights_dir or stack.enter_context(harness.random_weights_folder())
        label = harness.portable_path(args.weights_dir) if args.weights_dir else harness.RANDOM_WEIGHTS_LABEL
        kind = ServerChecker if args.server else Checker
        checker = kind(args, weights_dir, paths, started + args.budget_s)
        stack.callback(checker.close)  # stops the server (if any) before the weights folder goes
        reference: list[np.ndarray] = []  # baseline/safe's outputs on the device
        for config in configs:
            outcomes.append(outcome := checker.run(config))
            if outcome.verdict == "PASS" and config.name == "baseline/safe":
                reference = outcome.outputs
                if cpu := checker.cpu_reference(outcome):
                    judge(outcome, agreement(outcome.outputs, *cpu))
            elif outcome.verdict == "PASS" and reference:
                judge(outcome, agreement(outcome.outputs, reference, "baseline/safe"))
            print(verdict_line(outcome), flush=True)
            if load is not None and config.name == args.sweep_config and outcome.verdict == "PASS":
                sweep = checker.sweep(config, load)
                print(concurrent_load.render({config.name: sweep["results"]}, load.server_max), flush=True)
                for reason in sweep["reasons"]:
                    print(f"FAIL concurrency {reason}", flush=True)
    report = {
        "command": harness.command_line(),
        "created": harness.now_iso(),
        "environment": harness.environment_info(),
        "torch": torch.__version__,
        "device": str(checker.device),
        "device_name": torch.cuda.get_device_name(checker.device) if checker.device.type == "cuda" else None,
        "through": "server" if args.server else "in process",
        "weights": label,
        "images": [harness.portable_path(path) for path in paths],
        "budget_s": args.budget_s,
        "elapsed_s": time.monotonic() - started,
        "bounds": BOUNDS,
        "configs": [outcome.as_report() for outcome in outcomes],
        "not_run": [outcome.config.name for outcome in outcomes if outcome.verdict == "SKIP"],
        "concurrency": sweep,
    }
    harness.write_report(report, args.output)
    if report["not_run"]:
        print(f"not run (budget {args.budget_s:.0f} s): {' '.join(report['not_run'])}")
    print(f"wrote {harness.portable_path(args.output)}")
    failed = any(outcome.verdict == "FAIL" for outcome in outcomes) or bool(sweep and sweep["reasons"])
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
