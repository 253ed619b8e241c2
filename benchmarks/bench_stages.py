"""Per-stage timings in process: every profile x stability mode next to the official recipe,
or (``--host``) the host stages of a one-face request alone, without the nets, or
(``--peak-memory``) the peak host memory of one request of four images at the pixel limit.

    python benchmarks/bench_stages.py [--images data/1.jpg ...] [--repeats 1] [--backend none]
        [--max-faces 20] [--output benchmarks/results/bench_stages.json]
    python benchmarks/bench_stages.py --host [--side 1000] [--face-px 384] [--parse] [--repeats 30]
        [--mode rgb|gray|cmyk] [--icc] [--allocator gpu|default]
        [--output benchmarks/results/bench_host.json]
    python benchmarks/bench_stages.py --peak-memory [--shape square|wide] [--weights-dir DIR]
        [--output benchmarks/results/peak_memory.json]

Random weights (seed 0) in the official formats; CPU unless CUDA is present. Each
configuration first runs the first photo untimed (compilation, allocator, first-call
costs), then ``--repeats`` timed passes over all photos. Ratios compare the per-photo median of the
timed passes against the official recipe and against baseline/safe; they are only
meaningful within one run on one machine.

The ``official`` row runs the official recipe in a fresh interpreter with the C library's
default allocator, as the official script runs. ``official/our-process`` runs it once more
inside this process, after ``Restorer`` has set the host allocator up
(``codeformer.host_memory``): the difference between the two rows is what
that setting alone is worth, the rest is the pipeline's own work.

Our rows also time decoding each file (``decode_image``) and encoding the result
(``encode_jpeg``), and report the host part of a request (decode, prepare, align, paste,
resize, encode: all but detect, restore and parse, the nets' stages, which a GPU runs) per
photo, per face and per megapixel of input (their s/photo includes these,
the official row's does not). Stage figures are medians over the timed passes.

``--host``: what a GPU deployment's latency rests on. A square photo (``--image``, default
data/3.jpg, centre-cropped and resized to ``--side``, stored as a quality-92 JPEG, gray or
CMYK with ``--mode``; ``--icc`` embeds a profile of its kind, which decode and encode then
handle by the README's colour rule: sRGB's for RGB (carried), a gamma-2.2 gray one (made
into an RGB one), a generated CMYK one (the pixels converted through it)) with one face
whose 512x512 crop covers ``--face-px`` pixels, placed by its five landmarks. Each repeat
decodes the file, prepares the working image, aligns the face, pastes the aligned crop back
in place of a restored face (max_speed's square soft mask; ``--parse`` adds a float64 parse
mask as baseline does), resizes back if the working image was enlarged, and encodes the JPG:
the stages a request runs on the host whatever its device (the default run reports the same
stages inside full requests). The passes run on one thread started after the allocator is
set up, as a server's requests do: ``--allocator gpu`` (the default) sets glibc's malloc up
as a ``Restorer`` on a GPU does (``codeformer.host_memory.device_thread_starter``),
``default`` leaves glibc's defaults. The report gives the minor page faults per pass and the
SHA-256 of the JPG every pass encodes (the allocator must not change a byte). Figures are
per-stage medians and minima; on a shared CPU compare runs made together.

``--peak-memory``: sets up the ``Predictor`` (weights from ``--weights-dir``, default seed-0
random ones), runs one warm-up request, then one request of four flat-grey PNGs of
``CODEFORMER_MAX_PIXELS`` pixels each (sent as data URIs, so fetching, decoding, the
pipeline and JPG encoding all count) and reports the process's resident memory before it
and at its peak (VmHWM), as one JSON line on stdout (and in ``--output``). Run it as its own
process, so that the peak is this request's. Shapes: ``square`` (6324x6324) and ``wide``
(25296x1581, 16:1, the most elongated image accepted, whose detector copy is the largest:
10240x640). Flat grey has no faces, so this is the memory of the images and of detection;
faces add one CodeFormer/ParseNet chunk of ``CODEFORMER_FACE_BATCH`` at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import harness
import numpy as np
import torch

from benchmarks import reports
from benchmarks.host_pass import (
    HOST_STAGES,
    MAX_PIXELS,
    host_figures,
    host_pass,
    one_face,
    square_photo,
)
from benchmarks.plans import configurations
from codeformer import weights
from codeformer.config import COMPILE_BACKENDS, FACE_SIZE, RequestOptions, Settings
from codeformer.host_memory import device_thread_starter
from codeformer.image_sizes import MAX_ASPECT_RATIO
from codeformer.imageio import decode_image, encode_jpeg
from codeformer.pipeline import Restorer
from codeformer.runtime import Nets
from codeformer.serving.client import data_uri
from codeformer.stages.detect import Detections
from codeformer.tools import local_server
from codeformer.tools.inputs import flat_canvas_png
from tests import official_recipe  # the tests' oracle, timed here as the "official" row

PROJECT_ROOT = harness.PROJECT_ROOT
GOLDEN_DIR = PROJECT_ROOT.parent / "shared" / "reference" / "golden"
PEAK_MEMORY_IMAGES = 4  # codeformer.serving.schema.MAX_IMAGES: the largest request
T = TypeVar("T")


def default_images() -> list[Path]:
    """The golden photos when present (the official recipe's own inputs), else data/*.jpg."""
    if GOLDEN_DIR.is_dir():
        return sorted(p for p in GOLDEN_DIR.glob("*/*") if p.stem == p.parent.name)
    return sorted((PROJECT_ROOT / "data").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)


def timed_passes(run, images: list, repeats: int) -> tuple[list[float], dict[str, float]]:
    """``run(images[:1])`` untimed (compilation, allocator, first-call costs), then ``repeats``
    timed ``run(images)``: (seconds per pass, each stage's median ms over the passes)."""
    run(images[:1])
    seconds, passes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        passes.append(run(images))
        seconds.append(time.perf_counter() - start)
    return seconds, {stage: statistics.median(p.get(stage, 0.0) for p in passes) for stage in passes[-1]}


def official_passes(
    nets: Nets, images: list[np.ndarray], fidelity: float, repeats: int
) -> tuple[list[float], dict[str, float]]:
    def official_pass(batch: list[np.ndarray]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for image in batch:
            _, stages = official_recipe.run(nets, image, fidelity)
            for stage, ms in stages.items():
                totals[stage] = totals.get(stage, 0.0) + ms
        return totals

    return timed_passes(official_pass, images, repeats)


def _official_in_child(
    weights_dir: str, images: list[np.ndarray], fidelity: float, repeats: int, threads: int
) -> tuple[list[float], dict[str, float]]:
    torch.set_num_threads(threads)
    nets = Nets(*(net.eval() for net in weights.load_nets(weights_dir)))
    return official_passes(nets, images, fidelity, repeats)


def official_in_own_process(
    weights_dir: str, images: list[np.ndarray], fidelity: float, repeats: int
) -> tuple[list[float], dict[str, float]]:
    """``official_passes`` in a fresh interpreter that never loads a ``Restorer``."""
    arguments = (weights_dir, images, fidelity, repeats, torch.get_num_threads())
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_official_in_child, arguments)


def on_new_thread(function: Callable[[], T]) -> T:
    """``function()`` on a thread started now (so with the malloc arena glibc gives it now)."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(function()), name="request")
    thread.start()
    thread.join()
    if not results:
        raise SystemExit("the passes failed on their thread (its traceback is above)")
    return results[0]


def host_passes(
    data: bytes, detections: Detections, parse_masks: np.ndarray | None, repeats: int
) -> tuple[list[dict[str, float]], float, set[str]]:
    """Three untimed passes, then ``repeats`` timed: (stage ms per pass, minor faults per pass, JPG hashes).

    Each JPG is freed before the next pass, as a server frees it once written: a pass's buffers
    kept alive would hold the heap's top, and so glibc's trimming, in place.
    """
    for _ in range(3):  # first-call costs: imports, OpenCV's recipe checks, allocator growth
        host_pass(data, detections, parse_masks)
    passes: list[dict[str, float]] = []
    digests: set[str] = set()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        timings, jpg = host_pass(data, detections, parse_masks)
        passes.append(timings)
        digests.add(hashlib.sha256(jpg).hexdigest())
        del jpg
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    return passes, faults / repeats, digests


def host_main(args: argparse.Namespace) -> None:
    """``--host``: the host stages of one generated one-face photo, ``args.repeats`` times."""
    data = square_photo(args.image, args.side, args.mode, args.icc)
    detections = one_face(args.side, args.face_px, args.angle)
    # a parse mask shaped like the official one: 1 inside, 0 on the 10-pixel band, float64
    parse_masks = None
    if args.parse:
        parse_masks = np.zeros((1, FACE_SIZE, FACE_SIZE))
        parse_masks[:, 10:-10, 10:-10] = 1.0
    if args.allocator == "gpu":  # what a Restorer on a GPU sets up (it needs no GPU to do so)
        device_thread_starter(torch.device("cuda"), Settings.from_env("cuda").retained_memory_mb)
    passes, faults_per_pass, digests = on_new_thread(
        lambda: host_passes(data, detections, parse_masks, args.repeats)
    )
    totals = [sum(p.values()) for p in passes]

    rows, figures = [], {}
    for stage, values in [*((s, [p[s] for p in passes]) for s in HOST_STAGES), ("host", totals)]:
        figures[stage] = {"median_ms": statistics.median(values), "min_ms": min(values)}
        rows.append([stage, f"{figures[stage]['median_ms']:.2f}", f"{figures[stage]['min_ms']:.2f}"])
    megapixels = args.side * args.side / 1e6
    decode_encode = statistics.median(p["decode"] + p["encode"] for p in passes)
    colour = f"{args.mode}, {'with' if args.icc else 'without'} an ICC profile"
    print(f"{args.side}x{args.side} {colour}, one {args.face_px:.0f}-px face, {args.repeats} repeats")
    print(harness.format_table(["stage", "median ms", "min ms"], rows))
    print(f"decode + encode: {decode_encode:.2f} ms (median)")
    print(f"host: {figures['host']['median_ms'] / megapixels:.1f} ms/megapixel (median, one face)")
    if len(digests) != 1:
        raise SystemExit(f"the passes encoded {len(digests)} different JPGs from the same photo")
    (output_sha256,) = digests
    print(f"allocator {args.allocator}: {faults_per_pass:.0f} minor faults/pass, JPG {output_sha256[:12]}")
    report = {
        "command": reports.command_line(),
        "environment": reports.environment_info(),
        "image": reports.portable_path(args.image),
        "side": args.side,
        "face_px": args.face_px,
        "parse": args.parse,
        "mode": args.mode,
        "icc": args.icc,
        "repeats": args.repeats,
        "decode_encode_median_ms": decode_encode,
        "allocator": args.allocator,
        "minor_faults_per_pass": faults_per_pass,
        "output_sha256": output_sha256,
        "stages": figures,
        "host_ms_per_megapixel": figures["host"]["median_ms"] / megapixels,
    }
    reports.write_report(report, args.output)
    print(f"wrote {reports.portable_path(args.output)}")


def shape_for(kind: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the largest image of that kind within ``max_pixels``."""
    if kind == "square":
        side = math.isqrt(max_pixels)
        return side, side
    height = math.isqrt(int(max_pixels / MAX_ASPECT_RATIO))
    return int(height * MAX_ASPECT_RATIO), height


def measure_peak_memory(weights_dir: Path, kind: str) -> dict[str, object]:
    """``--peak-memory``: the Predictor's resident memory before and at the peak of one request."""
    os.environ["CODEFORMER_WEIGHTS_DIR"] = str(weights_dir)
    max_pixels = Settings.from_env().max_pixels  # what the predictor will allow
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    options = {
        "codeformer_fidelity": 0.5,
        "runtime_profile": "baseline",
        "stability_mode": "safe",
        "compile_backend": "none",
    }
    asyncio.run(predictor.run(images=[data_uri(flat_canvas_png(640, 640), name="warm.png")], **options))
    width, height = shape_for(kind, max_pixels)
    image = data_uri(flat_canvas_png(width, height, compress_level=1), name=f"{kind}.png")
    pid = os.getpid()
    if not local_server.reset_peak_rss(pid):
        raise SystemExit("/proc/self/clear_refs is not writable: cannot reset the peak RSS")
    before_kib = local_server.status_kib(pid, "VmRSS")
    start = time.perf_counter()
    outputs = asyncio.run(predictor.run(images=[image] * PEAK_MEMORY_IMAGES, **options))
    seconds = time.perf_counter() - start
    peak_kib = local_server.status_kib(pid, "VmHWM")
    return {
        "shape": kind,
        "image_size": [width, height],
        "images": len(outputs),
        "max_pixels": max_pixels,
        "rss_before_mib": round(before_kib / 1024, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "peak_growth_mib": round((peak_kib - before_kib) / 1024, 1),
        "request_s": round(seconds, 2),
    }


def peak_memory_main(args: argparse.Namespace) -> None:
    """``--peak-memory``: the report as one JSON line on stdout, and in ``args.output``."""
    with contextlib.ExitStack() as stack:
        weights_dir = args.weights_dir or stack.enter_context(harness.random_weights_folder())
        report = measure_peak_memory(weights_dir, args.shape)
    reports.write_report(report, args.output)
    print(f"wrote {reports.portable_path(args.output)}", file=sys.stderr)
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (default 1; 30 with --host)")
    parser.add_argument(
        "--backend", default="none", choices=COMPILE_BACKENDS, help="compile_backend for the optimized mode"
    )
    parser.add_argument("--max-faces", type=int, default=20)
    parser.add_argument("--fidelity", type=float, default=0.5)
    parser.add_argument("--skip-official", action="store_true", help="do not time the official recipe")
    parser.add_argument(
        "--configs", nargs="*", default=None, help="only these profile/stability pairs (max_speed/optimized)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="the JSON report (default benchmarks/results/bench_stages.json; bench_host.json with --host, "
        "peak_memory.json with --peak-memory)",
    )
    host = parser.add_argument_group("--host: the host stages alone, on one generated photo with one face")
    host.add_argument("--host", action="store_true", help="time decode .. encode without the nets")
    host.add_argument("--image", type=Path, default=PROJECT_ROOT / "data" / "3.jpg", help="the photo to crop")
    host.add_argument("--side", type=int, default=1000, help="photo side in pixels (1000: one megapixel)")
    host.add_argument("--face-px", type=float, default=384.0, help="pixels the 512x512 face crop spans")
    host.add_argument("--angle", type=float, default=0.12, help="face tilt in radians")
    host.add_argument("--parse", action="store_true", help="paste with a parse mask, as baseline does")
    host.add_argument("--mode", choices=["rgb", "gray", "cmyk"], default="rgb", help="the photo's pixels")
    host.add_argument("--icc", action="store_true", help="store the photo with an ICC profile of its mode")
    host.add_argument(
        "--allocator",
        choices=("gpu", "default"),
        default="gpu",
        help="gpu: glibc's malloc as a Restorer on a GPU sets it up; default: glibc's defaults",
    )
    peak = parser.add_argument_group("--peak-memory: one request of four images at the pixel limit")
    peak.add_argument("--peak-memory", action="store_true", help="peak host memory of that request")
    peak.add_argument("--shape", choices=("square", "wide"), default="wide", help="the images' shape")
    peak.add_argument(
        "--weights-dir", type=Path, help="the Predictor's weights (default: seed-0 random ones)"
    )
    args = parser.parse_args()
    if args.host and args.peak_memory:
        parser.error("--host and --peak-memory are two modes: choose one")
    results_dir = harness.RESULTS_DIR
    if args.peak_memory:
        args.output = args.output or results_dir / "peak_memory.json"
        peak_memory_main(args)
        return
    if args.host:
        args.repeats = 30 if args.repeats is None else args.repeats
        args.output = args.output or results_dir / "bench_host.json"
        host_main(args)
        return
    args.repeats = 1 if args.repeats is None else args.repeats
    args.output = args.output or results_dir / "bench_stages.json"
    logging.basicConfig(level=logging.WARNING)

    paths = args.images or default_images()
    files = [(p.name, p.read_bytes()) for p in paths]
    images = [decode_image(data, name, MAX_PIXELS) for name, data in files]
    megapixels = sum(image.shape[0] * image.shape[1] for image in images) / 1e6
    scratch = contextlib.ExitStack()  # the random weights live until the official rows are done
    weights_dir = str(scratch.enter_context(harness.random_weights_folder()))
    restorer = Restorer.load(weights_dir)
    restorer.settings = dataclasses.replace(restorer.settings, max_faces=args.max_faces)
    threads = torch.get_num_threads()
    print(f"{len(images)} photos on {restorer.device}, torch {torch.__version__}, {threads} threads")

    rows: list[dict] = []

    def record(name: str, seconds: list[float], stages: dict[str, float], faces: int) -> None:
        photo_s = statistics.median(seconds) / len(images)
        row = {"config": name, "photo_s": photo_s, "faces": faces, "stages_ms": stages}
        rows.append(row)
        stage_text = " ".join(f"{k}={v:.0f}" for k, v in stages.items())
        print(f"{name:28s} {row['photo_s']:7.2f} s/photo  faces={faces:3d}  {stage_text}", flush=True)

    if not args.skip_official:
        seconds, stages = official_in_own_process(weights_dir, images, args.fidelity, args.repeats)
        record("official", seconds, stages, -1)
        nets = restorer.runtime.safe_nets
        seconds, stages = official_passes(nets, images, args.fidelity, args.repeats)
        record("official/our-process", seconds, stages, -1)
    scratch.close()

    # safe once per profile, then optimized with --backend (rows named profile/mode, as --configs)
    cuda = restorer.device.type == "cuda"
    plan = [c for c in configurations(cuda) if c.mode == "safe" or c.backend == args.backend]
    if not any(c.mode != "safe" for c in plan):
        raise SystemExit(f"--backend {args.backend}: needs CUDA, and this run is on {restorer.device}")
    for configuration in plan:
        label = f"{configuration.profile}/{configuration.mode}"
        if args.configs and label not in args.configs:
            continue
        results: list = []

        def our_pass(batch, configuration=configuration, results=results) -> dict[str, float]:
            options = RequestOptions.parse(
                args.fidelity, configuration.profile, configuration.mode, configuration.backend
            )
            totals: dict[str, float] = {"decode": 0.0, "encode": 0.0}
            decoded = []
            for name, data in batch:
                start = time.perf_counter()
                decoded.append(decode_image(data, name, restorer.settings.max_pixels))
                totals["decode"] += (time.perf_counter() - start) * 1000.0
            results[:] = restorer.restore(decoded, options)
            for result in results:
                start = time.perf_counter()
                encode_jpeg(result.image)
                totals["encode"] += (time.perf_counter() - start) * 1000.0
                for stage, ms in result.timings.items():
                    totals[stage] = totals.get(stage, 0.0) + ms
            return totals

        seconds, stages = timed_passes(our_pass, files, args.repeats)
        faces = sum(len(r.faces) for r in results)
        record(label, seconds, stages, faces)
        rows[-1].update(host_figures(stages, faces, megapixels))

    print(f"\nhost part ({'+'.join(HOST_STAGES)}) of a pass over {megapixels:.2f} megapixels")
    for row in rows:
        if "host_ms" in row:
            per_face = row["host_ms_per_face"]
            per_face_text = f"{per_face:7.1f} ms/face" if per_face is not None else "     no faces"
            print(
                f"{row['config']:28s} {row['host_ms']:7.1f} ms  {per_face_text}  "
                f"{row['host_ms_per_megapixel']:7.1f} ms/megapixel"
            )
    by_name = {row["config"]: row["photo_s"] for row in rows}
    print("\nspeed-up (higher is faster)")
    for row in rows:
        if "baseline/safe" in by_name:
            row["vs_baseline_safe"] = by_name["baseline/safe"] / row["photo_s"]
        if "official" in by_name:
            row["vs_official"] = by_name["official"] / row["photo_s"]
        ratios = "  ".join(f"{k}={v:.2f}x" for k, v in row.items() if k.startswith("vs_"))
        print(f"{row['config']:28s} {ratios}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "images": [str(p) for p in paths],
        "megapixels": megapixels,
        "device": str(restorer.device),
        "threads": threads,
        "repeats": args.repeats,
        "compile_backend": args.backend,
        "rows": rows,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
