"""One command for the first machine with a GPU: does every configuration work, and how fast is it?

    python benchmarks/gpu_check.py [--device cuda] [--weights-dir weights/] [--images data/1.jpg ..]
        [--configs baseline/safe fast/optimized/inductor ..] [--repeats 3] [--budget-s 540]
        [--no-generated] [--big-request]
        [--server [--concurrency 1 2 4 N [--duration-s 30 | --requests 20]] [--sweep-config NAME]]

Every runtime_profile x stability_mode x compile_backend (cudagraphs only on CUDA; safe once
per profile) runs, in process, these requests (gpu_check_cases.py), each photo its own request:
the photos in data/ (or ``--images``) at fidelity 0.5; unless ``--no-generated``, a group
photo (the photos tiled 2 x 2: more faces than one face batch) at fidelity 0 and 0.9, and the
first photo at three more detector input shapes; with ``--big-request``, one request of four
40 MP images once per configuration after its timed passes (if the budget has a minute left).
``--warmup`` untimed passes, then ``--repeats`` timed ones. Seed-0 random weights in a temp
folder by default (no network; timings are real, faces are noise: the JSON's ``faces`` says
how many each request restored); ``--weights-dir`` for real ones. Checks:

- it runs (an exception fails it; the others still run), and no request compiles: each
  Restorer is set up as a server with ``CODEFORMER_COMPILE_BACKEND`` is (every optimized
  graph compiled and warmed in ``prepare_optimized``), and a graph compiled after that, or
  after the warm-up passes, fails the configuration;
- it compiled what it claims: each compile backend starts fresh (``torch._dynamo.reset()``:
  as in a new process), a recompile limit hit (dynamo then runs the function eager) fails the
  configuration, and so does any graph the cudagraphs backend ran without CUDA graphs;
  ``graphs_compiled``, ``cudagraph_skips`` and ``torch_warnings`` (the reasons, word for
  word) are reported for every configuration;
- agreement, over the restored photos: baseline/safe with baseline/safe on the CPU within
  tests/test_parity_golden.py's tolerance (>= 97% of values within 1 level, <= 1.5% beyond 3);
  every other configuration (fp16, channels_last, compiled; max_speed drops the ParseNet
  mask) with baseline/safe on the device: a mean absolute difference of 8 levels fails it;
- per-stage warm ms p50/p95 per request, host part (decode, prepare, align, paste, resize,
  encode) apart from device part (detect, restore, parse); peak GPU memory (not on CPU).

``--server``: the same checks through the Cog HTTP server (gpu_check_server.py: one server
per compile backend; the photos only, at fidelity 0.5; per-request latency, the server's
logged stage ms; agreement of the decoded JPGs), with ``peak_gpu_mb`` and
``compiles_after_warmup`` null: the server does not show them. ``--concurrency K ..`` (with
--server) then sweeps ``--sweep-config`` (default baseline/safe) with K clients sending back
to back, as ``run_bench.py --concurrency`` does (N = the predictor's concurrency max; 409s
counted, not retried): JSON ``concurrency`` {levels, concurrency_max, stop, config, results
{K: throughput_images_per_s, per_request, rejected_409, errors, ..}, not_run, reasons}; a
409 at K <= N or a failed request fails the run.

``--budget-s``: a pass that would end past the budget (judged by the one before) is not
started; what was measured is written, configurations left out get SKIP.

Output: a line per configuration on stdout (``PASS``/``FAIL``/``SKIP``, figures) and one JSON,
rewritten (atomically) as each configuration ends, so that a run stopped from outside leaves
what it measured: ``finished``, ``environment``, ``device``, ``weights``, ``images``,
``cases``, ``bounds``, ``not_run``, ``pending`` (not reached yet) and ``configs``: ``name``,
``verdict``, ``reasons``, ``timed_passes``, ``stages_ms`` {stage: {p50, p95, ..}; ``request``
= the whole}, ``host_ms``, ``device_ms``, ``peak_gpu_mb``, ``compiles_after_warmup``,
``graphs_compiled`` (set-up included), ``compiles_in_requests``, ``prepare_optimized_ms``
(where the configuration set up a Restorer), ``cudagraph_skips``, ``torch_warnings``, ``faces``
{case: per image},
``big_request``, ``agreement`` {reference, within_one, over_three, mean_abs}; with --server
``observed_through``.

Nothing on the in-process path imports Cog: it runs on a GPU machine with torch, OpenCV,
NumPy, Pillow and requests only.

Exit codes: 0 every configuration that ran passed; 1 at least one failed; 2 bad arguments;
3 no CUDA device for ``--device cuda`` (said on stderr at once, before any weights load).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
from gpu_check_cases import Case
from gpu_check_local import Checker
from gpu_check_server import ServerChecker
from gpu_check_verdicts import BOUNDS, Config, Outcome, agreement, judge, plan, verdict_line

from codeformer.errors import ConfigError

EXIT_FAILED, EXIT_NO_CUDA = 1, 3


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, harness.LoadPlan | None]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to try the checks here")
    parser.add_argument("--weights-dir", type=Path, help="real weights; default: seed-0 random ones")
    parser.add_argument("--images", type=Path, nargs="+", help="default: the photos in data/")
    parser.add_argument(
        "--configs", nargs="+", help="only these, in this order, e.g. baseline/safe fast/optimized/inductor"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes; a compile after them fails")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per configuration")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop cleanly within this many s")
    parser.add_argument("--max-faces", type=int, default=20, help="per photo (CODEFORMER_MAX_FACES)")
    parser.add_argument("--output", type=Path, default=harness.RESULTS_DIR / "gpu_check.json")
    parser.add_argument("--server", action="store_true", help="through the Cog HTTP server, not in process")
    parser.add_argument(
        "--no-generated",
        dest="generated",
        action="store_false",
        help="the photos only: no group photo (fidelity 0, > 4 faces) or other detector sizes",
    )
    parser.add_argument(
        "--big-request", action="store_true", help="also one request of four 40 MP images per configuration"
    )
    harness.add_concurrency_arguments(parser)
    parser.add_argument(
        "--sweep-config", default="baseline/safe", help="the configuration --concurrency sweeps"
    )
    args = parser.parse_args(argv)
    try:
        load = harness.check_concurrency_arguments(args)
    except ConfigError as exc:
        parser.error(str(exc))  # exits 2
    if load is not None and not args.server:
        parser.error("--concurrency needs --server: the sweep sends HTTP requests")
    return args, load


def case_report(case: Case) -> dict[str, Any]:
    return {"name": case.name, "images": len(case.images), "fidelity": case.fidelity}


def write(
    head: dict[str, Any],
    outcomes: list[Outcome],
    sweep: dict[str, Any] | None,
    configs: list[Config],
    started: float,
    path: Path,
    finished: bool = False,
) -> dict[str, Any]:
    """The report so far, written atomically to ``path``; ``pending``: configurations not reached yet."""
    done = {outcome.config.name for outcome in outcomes}
    report = head | {
        "finished": finished,
        "elapsed_s": time.monotonic() - started,
        "configs": [outcome.as_report() for outcome in outcomes],
        "not_run": [outcome.config.name for outcome in outcomes if outcome.verdict == "SKIP"],
        "pending": [config.name for config in configs if config.name not in done],
        "concurrency": sweep,
    }
    harness.write_report(report, path)
    return report


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
        cuda = checker.device.type == "cuda"
        head = {
            "command": harness.command_line(),
            "created": harness.now_iso(),
            "environment": harness.environment_info(),
            "torch": torch.__version__,
            "device": str(checker.device),
            "device_name": torch.cuda.get_device_name(checker.device) if cuda else None,
            "through": "server" if args.server else "in process",
            "weights": label,
            "images": [harness.portable_path(path) for path in paths],
            "cases": [] if args.server else [case_report(case) for case in checker.cases],
            "big_request": case_report(big) if (big := getattr(checker, "big_request", None)) else None,
            "budget_s": args.budget_s,
            "bounds": BOUNDS,
        }
        reference: list[np.ndarray] = []  # baseline/safe's outputs on the device
        for config in configs:
            outcomes.append(outcome := checker.run(config))
            if outcome.verdict == "PASS" and config.name == "baseline/safe":
                reference = outcome.outputs
                if cpu := checker.cpu_reference(outcome):
                    judge(outcome, agreement(outcome.outputs, *cpu))
            elif outcome.verdict == "PASS" and reference:
                judge(outcome, agreement(outcome.outputs, reference, "baseline/safe"))
            if outcome.outputs is not reference:
                outcome.outputs = []  # judged: only the reference is kept (4 x 40 MP photos add up)
            print(verdict_line(outcome), flush=True)
            if load is not None and config.name == args.sweep_config and outcome.verdict == "PASS":
                sweep = checker.sweep(config, load)
                print(harness.render_levels({config.name: sweep["results"]}, load.server_max), flush=True)
                for reason in sweep["reasons"]:
                    print(f"FAIL concurrency {reason}", flush=True)
            # after each configuration: a run stopped from outside still leaves what it measured
            write(head, outcomes, sweep, configs, started, args.output)
    report = write(head, outcomes, sweep, configs, started, args.output, finished=True)
    if report["not_run"]:
        print(f"not run (budget {args.budget_s:.0f} s): {' '.join(report['not_run'])}")
    print(f"wrote {harness.portable_path(args.output)}")
    failed = any(outcome.verdict == "FAIL" for outcome in outcomes) or bool(sweep and sweep["reasons"])
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
