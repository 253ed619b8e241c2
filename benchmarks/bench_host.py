"""Host stages of a one-face request, without the nets: what a GPU deployment's latency rests on.

    python benchmarks/bench_host.py [--side 1000] [--face-px 384] [--parse] [--repeats 30]
        [--output benchmarks/results/bench_host.json]

A square photo (``--image``, default data/3.jpg, centre-cropped and resized to ``--side``,
stored as a quality-92 JPEG) with one face whose 512x512 crop covers ``--face-px`` pixels,
placed by its five landmarks. Each repeat decodes the file, prepares the working image,
aligns the face, pastes the aligned crop back in place of a restored face (max_speed's
square soft mask; ``--parse`` adds a float64 parse mask as baseline does), resizes back if
the working image was enlarged, and encodes the JPG: the stages a request runs on the host
whatever its device (``bench_stages.py`` reports the same stages inside full requests).
Figures are per-stage medians and minima; on a shared CPU compare runs made together.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import cv2
import harness
import numpy as np

from codeformer.config import FACE_SIZE
from codeformer.imageio import decode_image, encode_jpeg
from codeformer.stages.align import FFHQ_TEMPLATE_512, align_faces
from codeformer.stages.detect import Detections
from codeformer.stages.paste import paste_faces
from codeformer.stages.prepare import check_image_size, is_gray, to_working_image

MAX_PIXELS = 40_000_000
STAGES = ("decode", "prepare", "align", "paste", "resize", "encode")


def square_photo(source: Path, side: int) -> bytes:
    """The centre square of ``source`` resized to side x side, as JPEG bytes."""
    image = cv2.imread(str(source))
    if image is None:
        raise SystemExit(f"--image {source}: not a readable image; pass a JPEG or PNG photo")
    height, width = image.shape[:2]
    crop = min(height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    square = cv2.resize(
        image[top : top + crop, left : left + crop], (side, side), interpolation=cv2.INTER_AREA
    )
    return encode_jpeg(square, quality=92)


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


def host_pass(data: bytes, detections: Detections, parse_masks: np.ndarray | None) -> dict[str, float]:
    """One request's host stages, in the pipeline's order: stage -> ms."""
    marks = [("start", time.perf_counter())]
    image = decode_image(data, "photo.jpg", MAX_PIXELS)
    marks.append(("decode", time.perf_counter()))
    check_image_size(*image.shape[:2], MAX_PIXELS)
    is_gray(image)
    working, _ = to_working_image(image)
    marks.append(("prepare", time.perf_counter()))
    aligned = align_faces(working, detections)
    marks.append(("align", time.perf_counter()))
    output = paste_faces(working, aligned.crops, aligned.inverse_affines, parse_masks)
    marks.append(("paste", time.perf_counter()))
    if output.shape[:2] != image.shape[:2]:
        output = cv2.resize(output, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
    marks.append(("resize", time.perf_counter()))
    encode_jpeg(output)
    marks.append(("encode", time.perf_counter()))
    return {stage: (end - start) * 1000.0 for (_, start), (stage, end) in itertools.pairwise(marks)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", type=Path, default=harness.PROJECT_ROOT / "data" / "3.jpg")
    parser.add_argument("--side", type=int, default=1000, help="photo side in pixels (1000: one megapixel)")
    parser.add_argument("--face-px", type=float, default=384.0, help="pixels the 512x512 face crop spans")
    parser.add_argument("--angle", type=float, default=0.12, help="face tilt in radians")
    parser.add_argument("--parse", action="store_true", help="paste with a parse mask, as baseline does")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--output", type=Path, default=harness.PROJECT_ROOT / "benchmarks/results/bench_host.json"
    )
    args = parser.parse_args()

    data = square_photo(args.image, args.side)
    detections = one_face(args.side, args.face_px, args.angle)
    # a parse mask shaped like the official one: 1 inside, 0 on the 10-pixel band, float64
    parse_masks = None
    if args.parse:
        parse_masks = np.zeros((1, FACE_SIZE, FACE_SIZE))
        parse_masks[:, 10:-10, 10:-10] = 1.0
    for _ in range(3):  # first-call costs: imports, OpenCV's recipe checks, allocator growth
        host_pass(data, detections, parse_masks)
    passes = [host_pass(data, detections, parse_masks) for _ in range(args.repeats)]
    totals = [sum(p.values()) for p in passes]

    rows, figures = [], {}
    for stage, values in [*((s, [p[s] for p in passes]) for s in STAGES), ("host", totals)]:
        figures[stage] = {"median_ms": statistics.median(values), "min_ms": min(values)}
        rows.append([stage, f"{figures[stage]['median_ms']:.2f}", f"{figures[stage]['min_ms']:.2f}"])
    megapixels = args.side * args.side / 1e6
    print(f"{args.side}x{args.side} photo, one {args.face_px:.0f}-px face, {args.repeats} repeats")
    print(harness.format_table(["stage", "median ms", "min ms"], rows))
    print(f"host: {figures['host']['median_ms'] / megapixels:.1f} ms/megapixel (median, one face)")
    report = {
        "command": harness.command_line(),
        "environment": harness.environment_info(),
        "image": harness.portable_path(args.image),
        "side": args.side,
        "face_px": args.face_px,
        "parse": args.parse,
        "repeats": args.repeats,
        "stages": figures,
        "host_ms_per_megapixel": figures["host"]["median_ms"] / megapixels,
    }
    harness.write_report(report, args.output)
    print(f"wrote {harness.portable_path(args.output)}")


if __name__ == "__main__":
    main()
