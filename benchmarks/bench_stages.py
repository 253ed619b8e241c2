"""Per-stage timings of every profile x stability mode, next to the official recipe, in one run.

    python benchmarks/bench_stages.py [--images data/1.jpg ...] [--repeats 1] [--backend none]
        [--max-faces 20] [--output benchmarks/results/bench_stages.json]

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
photo, per face and per megapixel of input (their s/photo includes these ~10 ms a megapixel,
the official row's does not). Stage figures are medians over the timed passes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import statistics
import time
from pathlib import Path

import harness
import numpy as np
import torch

from codeformer import weights
from codeformer.config import PROFILES, RequestOptions
from codeformer.imageio import decode_image, encode_jpeg
from codeformer.pipeline import Restorer
from codeformer.runtime import Nets
from tests import official_recipe  # the tests' oracle, timed here as the "official" row

PROJECT_ROOT = harness.PROJECT_ROOT
GOLDEN_DIR = PROJECT_ROOT.parent / "shared" / "reference" / "golden"
HOST_STAGES = ("decode", "prepare", "align", "paste", "resize", "encode")  # not detect/restore/parse


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


def host_figures(stages_ms: dict[str, float], faces: int, megapixels: float) -> dict[str, float | None]:
    """The host stages' total ms for a pass, per face (None without faces) and per input megapixel."""
    host_ms = sum(stages_ms.get(stage, 0.0) for stage in HOST_STAGES)
    return {
        "host_ms": host_ms,
        "host_ms_per_face": host_ms / faces if faces > 0 else None,
        "host_ms_per_megapixel": host_ms / megapixels,
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--backend", default="none", help="compile_backend for the optimized mode")
    parser.add_argument("--max-faces", type=int, default=20)
    parser.add_argument("--fidelity", type=float, default=0.5)
    parser.add_argument("--skip-official", action="store_true", help="do not time the official recipe")
    parser.add_argument(
        "--configs", nargs="*", default=None, help="only these profile/stability pairs (max_speed/optimized)"
    )
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "benchmarks/results/bench_stages.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    paths = args.images or default_images()
    files = [(p.name, p.read_bytes()) for p in paths]
    images = [decode_image(data, name, 40_000_000) for name, data in files]
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

    for stability in ("safe", "optimized"):
        for profile in PROFILES:
            if args.configs and f"{profile}/{stability}" not in args.configs:
                continue
            results: list = []

            def our_pass(batch, profile=profile, stability=stability, results=results) -> dict[str, float]:
                options = RequestOptions.parse(args.fidelity, profile, stability, args.backend)
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
            record(f"{profile}/{stability}", seconds, stages, faces)
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
