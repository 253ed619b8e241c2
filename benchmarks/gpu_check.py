"""One command for the first machine with a GPU: does every configuration work, and how fast is it?

    python benchmarks/gpu_check.py [--device cuda] [--weights-dir weights/] [--images data/1.jpg ..]
        [--configs baseline/safe fast/optimized/inductor ..] [--repeats 3] [--budget-s 540]
        [--no-generated] [--big-request] [--no-headline] [--headline-repeats 10]
        [--server [--concurrency 1 2 4 N [--duration-s 30 | --requests 20]] [--sweep-config NAME]]

First, in process, the headline (``benchmarks.headline``), the figures a short lent GPU
must give before anything else, written to the JSON (``headline``) as each of its two
configurations ends: max_speed safe, then max_speed optimized with inductor-cudagraphs (on
CUDA): a one-face 1 MP request's latency (``--headline-repeats`` timed, after one untimed),
host-device syncs in one request (torch's sync debug mode: count and messages), CodeFormer's
and ParseNet's ms per call at each face batch (1, 2, 4) and the detector's at a 640x853 and
a 640x5120 input, each call's peak GPU memory above its start, the nets' weights in MiB,
peak and reserved GPU memory of the configuration, set-up ms, and
``goals`` (on CUDA): PASS/FAIL for latency < 15 ms, optimized >= 1.5x faster than safe,
set-up < 60 s.
``--no-headline`` skips it.

Then every runtime_profile x stability_mode x compile_backend (cudagraphs only on CUDA; safe once
per profile) runs, in process, these requests (``benchmarks.gpu_checks``), each photo its own request:
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
- per-stage warm ms p50/p95 per request, host part apart from device part (on the host
  pixel path: decode, prepare, align, paste, resize, encode against detect, restore,
  parse; on the device pixel path, fast and max_speed on CUDA: decode and encode against
  the rest, ``gpu_checks.DEVICE_PATH_PARTS``); peak GPU memory (not on CPU).
- before the configurations (in process only), each stage the device pixel path moved,
  against its host version on the photos (``benchmarks.stage_checks.moved_stages``): the
  detector's input (with the largest landmark shift it causes), the crops, the parse masks
  and paste-back with the final resize: ms per image or face both ways (``--repeats`` timed
  calls each) and the difference, which fails the run beyond the stage bound (>= 99.99% of
  values within 1 level, none beyond 2).

``--server``: the same checks through the Cog HTTP server (``ServerChecker``: one server
per compile backend; the photos only, at fidelity 0.5; per-request latency, the server's
logged stage ms; agreement of the decoded JPGs), with ``peak_gpu_mb`` and
``compiles_after_warmup`` null: the server does not show them. ``--concurrency K ..`` (with
--server) then sweeps ``--sweep-config`` (default baseline/safe) with K clients sending back
to back, as ``run_bench.py --concurrency`` does (N = the predictor's concurrency max; 409s
counted, not retried): JSON ``concurrency`` {levels, concurrency_max, stop, config, results
{K: throughput_images_per_s, per_request, rejected_409, errors, ..}, not_run, reasons}; a
409 at K <= N or a failed request fails the run.

``--megapixel`` sends each photo resized to about 1 MP (the headline's size), so that with
``--server`` and ``--max-faces 1`` the passes give the one-face 1 MP latency over HTTP, and
the sweep runs on it.

``--budget-s``: a pass that would end past the budget (judged by the one before) is not
started; what was measured is written, configurations left out get SKIP.

Output: a line per configuration on stdout (``PASS``/``FAIL``/``SKIP``, figures) and one JSON,
rewritten (atomically) as each configuration ends, so that a run stopped from outside leaves
what it measured: ``finished``, ``environment``, ``device``, ``weights``, ``images``,
``cases``, ``bounds``, ``stages`` {stage: {faces, host_ms_per_face, device_ms_per_face,
max_levels, within_one_level, within_bound, bound} or {error}}, ``not_run``, ``pending`` (not
reached yet) and ``configs``: ``name``,
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

Sections, in order: the command line; ``Checker`` (in this process: it sees what the server
cannot, the graphs dynamo compiled, the graphs the cudagraphs backend refused and why, a
recompile limit that sent a function back to eager, and peak GPU memory); ``ServerChecker``
(through the HTTP server); ``main``. What they send and decide (the cases, compile counts,
agreement, verdicts, the report) is ``benchmarks.gpu_checks``, where the tests check it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import numpy as np

from benchmarks import headline, load, plans, reports, stage_checks
from benchmarks.gpu_checks import (
    BOUNDS,
    FIDELITY,
    MAX_PIXELS,
    BackendRestorers,
    Case,
    CompileCounts,
    Outcome,
    PassResult,
    ProgressReport,
    agreement,
    big_request_case,
    case_report,
    compile_counts,
    decode,
    generated_cases,
    judge,
    judge_compiles,
    photo_cases,
    run_passes,
    summaries,
    takes_device_path,
    torch_warnings,
    verdict_line,
)
from benchmarks.plans import Configuration
from codeformer.errors import ConfigError
from codeformer.imageio import encode_jpeg
from codeformer.serving.client import ServerError
from codeformer.tools.local_server import LocalServer

EXIT_FAILED, EXIT_NO_CUDA = 1, 3
# the 4 x 40 MP request is started only with this much budget left: decoding, pasting and
# encoding 160 MP on the host alone are slow
BIG_REQUEST_ESTIMATE_S = 60.0


# -- the command line ------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, load.LoadPlan | None]:
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
    parser.add_argument(
        "--no-headline", dest="headline", action="store_false", help="skip the headline part (in process)"
    )
    parser.add_argument("--headline-repeats", type=int, default=10, help="timed calls per headline figure")
    parser.add_argument(
        "--megapixel",
        action="store_true",
        help="send each photo resized to about 1 MP, the headline's size (--server: its HTTP latency)",
    )
    harness.add_concurrency_arguments(parser)
    parser.add_argument(
        "--sweep-config", default="baseline/safe", help="the configuration --concurrency sweeps"
    )
    args = parser.parse_args(argv)
    try:
        load_plan = harness.check_concurrency_arguments(args)
    except ConfigError as exc:
        parser.error(str(exc))  # exits 2
    if load_plan is not None and not args.server:
        parser.error("--concurrency needs --server: the sweep sends HTTP requests")
    return args, load_plan


# -- in this process -------------------------------------------------------------------------
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
        self.restorers = BackendRestorers(weights_dir, self.device, args.max_faces)
        self.faces: dict[str, list[int]] = {}  # case name -> faces restored per image, in the last request

    def restorer(self, backend: str, device: Any = None) -> Any:
        """The Restorer for ``backend`` on ``device`` (default: the checked one), set up as a server's."""
        return self.restorers.get(backend, device)

    def request(
        self, restorer: Any, config: Configuration, case: Case
    ) -> tuple[dict[str, float], list[np.ndarray]]:
        """One request, decode and encode included: (stage -> ms summed over its images, restored images)."""
        from codeformer.config import RequestOptions
        from codeformer.imageio import decode_image, encode_jpeg

        options = RequestOptions.parse(case.fidelity, config.profile, config.mode, config.backend)
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

    def one_pass(self, restorer: Any, config: Configuration) -> PassResult:
        """Every case as its own request: (stage -> ms per request, restored images, s)."""
        requests, outputs, start = [], [], time.perf_counter()
        for case in self.cases:
            timings, images = self.request(restorer, config, case)
            requests.append(timings)
            outputs += images
        return requests, outputs, time.perf_counter() - start

    def close(self) -> None:
        """Nothing to release: the restorers go with the process (``ServerChecker`` stops a server)."""

    def stage_checks(self, paths: list[Path]) -> dict[str, Any]:
        """The stages moved to the device, each against its host version on the photos' faces.

        Its own copies of the nets (the configurations' Restorers come and go per backend):
        ``stage_checks.moved_stages`` on the photos, or the error that stopped it.
        """
        from codeformer import weights
        from codeformer.config import Settings

        try:
            settings = Settings.from_env(self.device.type, max_faces=self.args.max_faces)
            _, retinaface, parsenet = (
                net.to(self.device) for net in weights.load_nets(self.weights_dir, settings)
            )
            photos = [decode(path.read_bytes()) for path in paths]
            found = stage_checks.photo_faces(retinaface, self.device, photos, self.args.max_faces)
            found = [item for item in found if len(item.aligned)]
            if not found:
                return {"stages": {"error": "no face found in the photos", "within_bound": False}}
            return stage_checks.moved_stages(retinaface, parsenet, self.device, found, self.args.repeats)
        except Exception as exc:  # a check tool reports each failure and goes on to the next one
            return {"stages": {"error": f"{type(exc).__name__}: {exc}", "within_bound": False}}

    def headline(self, photo_path: Path, write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """``benchmarks.headline``'s figures per configuration, then ``goals``; ``write`` after each."""
        from codeformer.config import RequestOptions

        torch, cuda, repeats = self.torch, self.device.type == "cuda", self.args.headline_repeats
        photo = headline.megapixel_photo(decode(photo_path.read_bytes()))
        configs = headline.headline_configs(self.device.type)
        figures: dict[str, Any] = {"photo": {"path": reports.portable_path(photo_path), "shape": photo.shape}}
        for config in configs:
            entry = figures[config.label] = {}
            if not self.fits(0.0):
                entry["not_run"] = "budget spent"
                continue
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)
                restorer = self.restorer(config.backend)
                entry["setup_ms"] = self.restorers.setup_ms
                options = RequestOptions.parse(
                    headline.HEADLINE_FIDELITY, config.profile, config.mode, config.backend
                )

                def request(restorer: Any = restorer, options: Any = options) -> list[Any]:
                    return restorer.restore([photo], options)

                entry["latency_ms"] = headline.timed_ms(request, repeats)
                entry["faces"] = len(request()[0].faces)
                entry["syncs_per_request"] = headline.count_syncs(torch, self.device, request)
                if cuda:  # read before net_timings, which resets the peak for each net's own
                    entry["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                    entry["reserved_gpu_mb"] = torch.cuda.memory_reserved(self.device) / 2**20
                entry.update(headline.net_timings(restorer, config, repeats))
            except Exception as exc:  # a check tool reports each failure and goes on to the next one
                entry["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            if cuda:  # the goals are for a GPU
                figures["goals"] = headline.goal_verdicts(figures, configs[0].label, configs[1].label)
            print(headline.headline_line(config.label, entry), flush=True)
            write(figures)
        return figures

    def fits(self, expected_s: float) -> bool:
        return time.monotonic() + expected_s < self.deadline

    def run(self, config: Configuration) -> Outcome:
        """Warm-up passes, then timed passes while the budget lasts; failures become reasons.

        What compiled is judged by ``judge_compiles``: a graph compiled inside a request or
        after the warm-up, a recompile limit hit or a graph run without CUDA graphs fails it.
        """
        outcome, cuda = Outcome(config), self.device.type == "cuda"
        self.faces, self.restorers.setup_ms = {}, None
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
        outcome.figures["faces"] = dict(self.faces)  # per case: faces restored in each image
        counts = CompileCounts(before, after_setup, after_warmup[0] if after_warmup else None, end)
        judge_compiles(outcome, counts, warnings, self.restorers.setup_ms)
        if outcome.requests:
            outcome.figures.update(summaries(outcome.requests, takes_device_path(self.device, config)))
        return outcome

    def run_big_request(self, restorer: Any, config: Configuration, case: Case) -> dict[str, Any]:
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
        return self.one_pass(restorer, plans.REFERENCE)[1], "baseline/safe on cpu"


# -- through the server -----------------------------------------------------------------------
class ServerChecker:
    """``Checker``'s interface (``run``, ``cpu_reference``, ``device``), through the HTTP server.

    One ``LocalServer`` at a time, per compile backend (a process serves one backend; the
    plan keeps each backend's configurations together), with the weights folder,
    ``--max-faces`` and ``CODEFORMER_COMPILE_BACKEND`` (compiled at set-up) as environment, and
    ``CUDA_VISIBLE_DEVICES`` empty for ``--device cpu`` (the server takes CUDA whenever it sees
    it). Each photo is its own request.

    What the client sees: the latency of each request (the ``request`` stage) and the server's
    per-stage ms of each image from the prediction's metrics (``read_decode`` reported as
    ``decode``, so that it counts in the host part).
    Not observable through the server, so null in the JSON: peak GPU memory and graphs
    compiled after warm-up (run without --server for those).

    Agreement compares decoded JPGs: baseline/safe with baseline/safe computed in this process
    on the CPU and put through the same JPEG encode and decode (on a CPU device the two are
    equal; on CUDA, JPEG's quantization can turn a 1-level difference into a few, so a failure
    there is worth a run without --server before blaming the device), every other
    configuration with the server's baseline/safe JPGs (both encoded the same way).
    """

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

    def requester(self, config: Configuration) -> load.Requester:
        options = load.request_options(config.profile, config.mode, config.backend, FIDELITY)
        server = self.server_for(config.backend)
        return load.Requester(server.client, options, server, retry_busy=False)

    def one_pass(self, requester: load.Requester) -> PassResult:
        """Every photo as its own request: (stage -> ms per photo, decoded outputs, s)."""
        requests, outputs, start = [], [], time.perf_counter()
        for path in self.paths:
            sample, result = requester.send_result([path], "timed")
            if not sample.ok:  # a 409 too: one client, one request at a time, must never get one
                raise ServerError(f"{path.name}: {sample.error}")
            [stages] = load.stage_ms_per_image(result.metrics, 1)
            if "read_decode" in stages:  # an answer without stage figures gives none, not zeros
                stages["decode"] = stages.pop("read_decode")
            requests.append({**stages, "request": sample.latency_s * 1000})
            outputs += [decode(data) for data in result.output_bytes(requester.client.session)]
        return requests, outputs, time.perf_counter() - start

    def run(self, config: Configuration) -> Outcome:
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
            outcome.figures.update(summaries(outcome.requests, takes_device_path(self.device, config)))
        return outcome

    def cpu_reference(self, baseline: Outcome) -> tuple[list[np.ndarray], str] | None:
        """baseline/safe in this process on the CPU, JPEG-encoded and decoded like the server's answers."""
        if not self.fits(0.0):
            return None
        restorer = self.local.restorer("none", self.local.torch.device("cpu"))
        outputs = self.local.one_pass(restorer, plans.REFERENCE)[1]
        label = "baseline/safe in process on cpu, JPEG round trip"
        return [decode(encode_jpeg(image)) for image in outputs], label

    def sweep(self, config: Configuration, plan: load.LoadPlan) -> dict[str, Any]:
        """``plan``'s levels on ``config``, one photo per request, within the budget."""
        batches = [[path] for path in self.paths]
        levels = load.sweep_levels(self.requester(config), batches, plan, deadline=self.local.deadline)
        reasons = [
            f"K={k}: {level['rejected_409']} answer(s) 409 at or below the predictor's concurrency max"
            for k, level in levels.items()
            if level["rejected_409"] and int(k) <= plan.server_max
        ] + [f"K={k}: {level['errors']} failed request(s)" for k, level in levels.items() if level["errors"]]
        not_run = [k for k in plan.levels if str(k) not in levels]
        return {
            **plan.as_report(),
            "config": config.label,
            "results": levels,  # K -> load.level_report
            "not_run": not_run,
            "reasons": reasons,
        }


# -- the run ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args, load_plan = parse_args(argv)
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
    configs = plans.check_plan(torch.device(args.device).type, args.configs)
    if load_plan is not None and args.sweep_config not in [config.label for config in configs]:
        print(
            f"gpu_check: --sweep-config {args.sweep_config} is not in --configs; add it there",
            file=sys.stderr,
        )
        return 2
    outcomes: list[Outcome] = []
    sweep: dict | None = None
    with contextlib.ExitStack() as stack:
        weights_dir = args.weights_dir or stack.enter_context(harness.random_weights_folder())
        if args.megapixel:
            paths = headline.megapixel_copies(paths, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        label = reports.portable_path(args.weights_dir) if args.weights_dir else harness.RANDOM_WEIGHTS_LABEL
        kind = ServerChecker if args.server else Checker
        checker = kind(args, weights_dir, paths, started + args.budget_s)
        stack.callback(checker.close)  # stops the server (if any) before the weights folder goes
        cuda = checker.device.type == "cuda"
        head = {
            "command": reports.command_line(),
            "created": reports.now_iso(),
            "environment": reports.environment_info(),
            "torch": torch.__version__,
            "device": str(checker.device),
            "device_name": torch.cuda.get_device_name(checker.device) if cuda else None,
            "through": "server" if args.server else "in process",
            "weights": label,
            "images": [reports.portable_path(path) for path in paths],
            "cases": [] if args.server else [case_report(case) for case in checker.cases],
            "big_request": case_report(big) if (big := getattr(checker, "big_request", None)) else None,
            "budget_s": args.budget_s,
            "bounds": BOUNDS,
        }
        progress = ProgressReport(head, configs, args.output, started)
        if args.headline and not args.server:  # first: the figures a short lent GPU must give

            def write_headline(figures: dict[str, Any]) -> None:
                head["headline"] = figures
                progress.write(outcomes, sweep)

            checker.headline(paths[0], write_headline)
        # in process only: the moved stages, device against host (the server shows neither)
        head["stages"] = {} if args.server else checker.stage_checks(paths)
        for name, stage in head["stages"].items():
            print(stage_checks.stage_line(name, stage), flush=True)
        reference: list[np.ndarray] = []  # baseline/safe's outputs on the device
        for config in configs:
            outcomes.append(outcome := checker.run(config))
            if outcome.verdict == "PASS" and config == plans.REFERENCE:
                reference = outcome.outputs
                if cpu := checker.cpu_reference(outcome):
                    judge(outcome, agreement(outcome.outputs, *cpu))
            elif outcome.verdict == "PASS" and reference:
                judge(outcome, agreement(outcome.outputs, reference, "baseline/safe"))
            if outcome.outputs is not reference:
                outcome.outputs = []  # judged: only the reference is kept (4 x 40 MP photos add up)
            print(verdict_line(outcome), flush=True)
            if load_plan is not None and config.label == args.sweep_config and outcome.verdict == "PASS":
                sweep = checker.sweep(config, load_plan)
                print(
                    harness.render_levels({config.label: sweep["results"]}, load_plan.server_max), flush=True
                )
                for reason in sweep["reasons"]:
                    print(f"FAIL concurrency {reason}", flush=True)
            # after each configuration: a run stopped from outside still leaves what it measured
            progress.write(outcomes, sweep)
    report = progress.write(outcomes, sweep, finished=True)
    if report["not_run"]:
        print(f"not run (budget {args.budget_s:.0f} s): {' '.join(report['not_run'])}")
    print(f"wrote {reports.portable_path(args.output)}")
    failed = any(outcome.verdict == "FAIL" for outcome in outcomes) or bool(sweep and sweep["reasons"])
    failed = failed or not all(stage["within_bound"] for stage in report["stages"].values())
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
