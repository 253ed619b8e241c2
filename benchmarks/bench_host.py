"""Host stages of a one-face request, without the nets: what a GPU deployment's latency rests on.

    python benchmarks/bench_host.py [--side 1000] [--face-px 384] [--parse] [--repeats 30]
        [--mode rgb|gray|cmyk] [--icc] [--allocator gpu|default]
        [--output benchmarks/results/bench_host.json]

A square photo (``--image``, default data/3.jpg, centre-cropped and resized to ``--side``,
stored as a quality-92 JPEG, gray or CMYK with ``--mode``; ``--icc`` embeds a profile of
its kind, which decode and encode then handle by the README's colour rule: sRGB's for RGB
(carried), a gamma-2.2 gray one (made into an RGB one), a generated CMYK one (the pixels
converted through it)) with one face whose 512x512 crop covers ``--face-px`` pixels,
placed by its five landmarks. Each repeat decodes the file, prepares the working image,
aligns the face, pastes the aligned crop back in place of a restored face (max_speed's
square soft mask; ``--parse`` adds a float64 parse mask as baseline does), resizes back if
the working image was enlarged, and encodes the JPG: the stages a request runs on the host
whatever its device (``bench_stages.py`` reports the same stages inside full requests).

The passes run on one thread started after the allocator is set up, as a server's requests
do. ``--allocator gpu`` (the default) sets glibc's malloc up as a ``Restorer`` on a GPU does
(``codeformer.host_memory.device_thread_starter``); ``default`` leaves glibc's defaults, as
before that setting. The report gives the minor page faults per pass and the SHA-256 of the
JPG every pass encodes (the allocator must not change a byte). Figures are per-stage medians and
minima; on a shared CPU compare runs made together.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import cv2
import harness
import numpy as np
import torch
from generated_inputs import cmyk_icc_profile, gray_icc_profile
from PIL import Image, ImageCms

from codeformer.config import FACE_SIZE, Settings
from codeformer.host_memory import device_thread_starter
from codeformer.imageio import decode_with_profile, encode_jpeg
from codeformer.stages.align import FFHQ_TEMPLATE_512, align_faces
from codeformer.stages.detect import Detections
from codeformer.stages.parse import FaceMasks
from codeformer.stages.paste import paste_faces
from codeformer.stages.prepare import check_image_size, is_gray, to_working_image
from codeformer.stages.restore import RestoredFaces

MAX_PIXELS = 40_000_000
STAGES = ("decode", "prepare", "align", "paste", "resize", "encode")
T = TypeVar("T")


def square_photo(source: Path, side: int, mode: str = "rgb", icc: bool = False) -> bytes:
    """The centre square of ``source`` resized to side x side, as JPEG bytes of ``mode``.

    RGB is written by OpenCV (``encode_jpeg``) as before, with or without sRGB's profile;
    gray and CMYK by Pillow (OpenCV writes no CMYK), with or without a profile of their kind.
    """
    image = cv2.imread(str(source))
    if image is None:
        raise SystemExit(f"--image {source}: not a readable image; pass a JPEG or PNG photo")
    height, width = image.shape[:2]
    crop = min(height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    square = cv2.resize(
        image[top : top + crop, left : left + crop], (side, side), interpolation=cv2.INTER_AREA
    )
    if mode == "rgb":
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() if icc else None
        return encode_jpeg(square, quality=92, icc_profile=srgb)
    picture = Image.fromarray(cv2.cvtColor(square, cv2.COLOR_BGR2RGB)).convert(
        "L" if mode == "gray" else "CMYK"
    )
    profile = (gray_icc_profile(2.2) if mode == "gray" else cmyk_icc_profile()) if icc else None
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=92, **({"icc_profile": profile} if profile else {}))
    return buffer.getvalue()


def one_face(side: int, face_px: float, angle: float) -> Detections:
    """One face whose aligned crop spans ``face_px`` pixels, tilted by ``angle``, near the centre."""
    scale = face_px / FACE_SIZE
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    centre = np.array([side * 0.48, side * 0.52])
    landmarks = (FFHQ_TEMPLATE_512 - FACE_SIZE / 2) @ np.array([[cos, sin], [-sin, cos]]) + centre
    return Detections(
        boxes=np.zeros((1, 4), np.float32),  # paste-back reads only the landmarks' transform
        scores=np.ones(1, np.float32),
        landmarks=landmarks[None].astype(np.float32),
    )


def host_pass(
    data: bytes, detections: Detections, parse_masks: np.ndarray | None
) -> tuple[dict[str, float], bytes]:
    """One request's host stages, in the pipeline's order: (stage -> ms, the JPG)."""
    marks = [("start", time.perf_counter())]
    decoded = decode_with_profile(data, "photo.jpg", MAX_PIXELS)
    image = decoded.pixels
    marks.append(("decode", time.perf_counter()))
    check_image_size(*image.shape[:2], MAX_PIXELS)
    is_gray(image)
    working, _ = to_working_image(image)
    marks.append(("prepare", time.perf_counter()))
    aligned = align_faces(working, detections)
    marks.append(("align", time.perf_counter()))
    masks = None if parse_masks is None else FaceMasks(parse_masks)
    output = paste_faces(working, RestoredFaces(aligned.crops), aligned.inverse_affines, masks)
    marks.append(("paste", time.perf_counter()))
    if output.shape[:2] != image.shape[:2]:
        output = cv2.resize(output, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
    marks.append(("resize", time.perf_counter()))
    jpg = encode_jpeg(output, icc_profile=decoded.icc_profile)
    marks.append(("encode", time.perf_counter()))
    return {stage: (end - start) * 1000.0 for (_, start), (stage, end) in itertools.pairwise(marks)}, jpg


def on_new_thread(function: Callable[[], T]) -> T:
    """``function()`` on a thread started now (so with the malloc arena glibc gives it now)."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(function()), name="request")
    thread.start()
    thread.join()
    if not results:
        raise SystemExit("the passes failed on their thread (its traceback is above)")
    return results[0]


def timed_passes(
    data: bytes, detections: Detections, parse_masks: np.ndarray | None, repeats: int
) -> tuple[list[dict[str, float]], float, set[str]]:
    """(per-pass stage ms, minor page faults per pass, the JPGs' SHA-256s), after three untimed passes.

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", type=Path, default=harness.PROJECT_ROOT / "data" / "3.jpg")
    parser.add_argument("--side", type=int, default=1000, help="photo side in pixels (1000: one megapixel)")
    parser.add_argument("--face-px", type=float, default=384.0, help="pixels the 512x512 face crop spans")
    parser.add_argument("--angle", type=float, default=0.12, help="face tilt in radians")
    parser.add_argument("--parse", action="store_true", help="paste with a parse mask, as baseline does")
    parser.add_argument("--mode", choices=["rgb", "gray", "cmyk"], default="rgb", help="the photo's pixels")
    parser.add_argument("--icc", action="store_true", help="store the photo with an ICC profile of its mode")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--allocator",
        choices=("gpu", "default"),
        default="gpu",
        help="gpu: glibc's malloc as a Restorer on a GPU sets it up; default: glibc's defaults",
    )
    parser.add_argument(
        "--output", type=Path, default=harness.PROJECT_ROOT / "benchmarks/results/bench_host.json"
    )
    args = parser.parse_args()

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
        lambda: timed_passes(data, detections, parse_masks, args.repeats)
    )
    totals = [sum(p.values()) for p in passes]

    rows, figures = [], {}
    for stage, values in [*((s, [p[s] for p in passes]) for s in STAGES), ("host", totals)]:
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
        "command": harness.command_line(),
        "environment": harness.environment_info(),
        "image": harness.portable_path(args.image),
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
    harness.write_report(report, args.output)
    print(f"wrote {harness.portable_path(args.output)}")


if __name__ == "__main__":
    main()
