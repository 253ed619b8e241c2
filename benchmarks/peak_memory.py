"""Peak host memory of one request of four images at the pixel limit, in a fresh process.

    python benchmarks/peak_memory.py --weights-dir /tmp/random-weights [--shape wide]

Sets up the ``Predictor`` (weights from ``--weights-dir``), runs one warm-up request, then
one request of four flat-grey PNGs of ``CODEFORMER_MAX_PIXELS`` pixels each (sent as data
URIs, so fetching, decoding, the pipeline and JPG encoding all count) and reports the
process's resident memory before it and at its peak (VmHWM), as JSON on stdout.

Shapes: ``square`` (6324x6324) and ``wide`` (25298x1581, 16:1, the most elongated image
accepted, whose detector copy is the largest: 10240x640). Flat grey has no faces, so this
is the memory of the images and of detection; faces add one CodeFormer/ParseNet chunk of
``CODEFORMER_FACE_BATCH`` at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

import harness  # noqa: F401 - importing it puts the project root on sys.path (see its docstring)

from codeformer.config import Settings
from codeformer.serving.client import data_uri
from codeformer.stages.prepare import MAX_ASPECT_RATIO
from codeformer.tools import local_server
from codeformer.tools.inputs import flat_canvas_png

IMAGES = 4


def shape_for(kind: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the largest image of that kind within ``max_pixels``."""
    if kind == "square":
        side = math.isqrt(max_pixels)
        return side, side
    height = math.isqrt(int(max_pixels / MAX_ASPECT_RATIO))
    return int(height * MAX_ASPECT_RATIO), height


def measure(weights_dir: Path, kind: str) -> dict[str, object]:
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
    outputs = asyncio.run(predictor.run(images=[image] * IMAGES, **options))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-dir", type=Path, required=True)
    parser.add_argument("--shape", choices=("square", "wide"), default="wide")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.weights_dir, args.shape)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
