"""The host stages of one request, without the nets: decode, prepare, align, paste, resize, encode.

    photo, face = square_photo(PROJECT_ROOT / "data" / "3.jpg", 1000), one_face(1000, 384.0, 0.12)
    stages_ms, jpg = host_pass(photo, face, None)

What a GPU deployment's latency rests on, whatever its device: ``benchmarks/bench_stages.py
--host`` times ``host_pass`` over a generated one-face photo (``square_photo``, ``one_face``),
and tests/test_host_memory.py counts its page faults on a request thread. ``host_figures``
sums the host stages of a full request's timings.
"""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageCms

from codeformer.config import FACE_SIZE
from codeformer.image_sizes import check_image_size
from codeformer.imageio import decode_with_profile, encode_jpeg
from codeformer.stages.align import FFHQ_TEMPLATE_512, align_faces
from codeformer.stages.detect import Detections
from codeformer.stages.parse import FaceMasks
from codeformer.stages.paste import paste_faces
from codeformer.stages.prepare import is_gray, to_working_image
from codeformer.stages.restore import RestoredFaces
from codeformer.tools.inputs import cmyk_icc_profile, gray_icc_profile

HOST_STAGES = ("decode", "prepare", "align", "paste", "resize", "encode")  # not detect/restore/parse
MAX_PIXELS = 40_000_000  # Settings' default CODEFORMER_MAX_PIXELS


def host_figures(stages_ms: dict[str, float], faces: int, megapixels: float) -> dict[str, float | None]:
    """The host stages' total ms for a pass, per face (None without faces) and per input megapixel."""
    host_ms = sum(stages_ms.get(stage, 0.0) for stage in HOST_STAGES)
    return {
        "host_ms": host_ms,
        "host_ms_per_face": host_ms / faces if faces > 0 else None,
        "host_ms_per_megapixel": host_ms / megapixels,
    }


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
