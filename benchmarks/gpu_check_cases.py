"""The requests gpu_check.py sends in each pass: the photos, and photos made from them.

A ``Case`` is one request: its encoded images and its fidelity. Besides each photo at the
default fidelity (``photo_cases``), ``generated_cases`` adds what the photos alone do not
reach: a group photo (the photos tiled 2 x 2, so that more faces than one face batch of 4
restore in one request) at fidelity 0 (CodeFormer's no-fusion graph) and at a fidelity the
set-up warm-up does not use; and a photo at three more detector input shapes (square,
portrait, wide). ``big_request_case`` is one request of four images at the 40 MP limit,
the largest request the server admits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from gpu_check_verdicts import FIDELITY

UNWARMED_FIDELITY = 0.9  # not one of the fidelities Restorer's warm-up runs: a new value must not compile
GROUP_CELL = (800, 600)  # (width, height) of each photo in the 2 x 2 group photo
# (width, height): other aspect ratios give the detector other input shapes than the photos'
DETECTOR_SIZES = ((640, 640), (720, 1280), (1920, 1080))
BIG_SIZE = (7744, 5164)  # 39.99 MP, 3:2: under gpu_check_verdicts.MAX_PIXELS and within the 16:1 aspect limit
BIG_IMAGES = 4  # codeformer.serving.schema.MAX_IMAGES


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[bytes, ...]  # encoded files, sent as one request
    fidelity: float


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """(H, W, 3) uint8 BGR -> JPG bytes."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as JPEG")
    return data.tobytes()


def decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("a photo given to gpu_check could not be decoded")
    return image


def photo_cases(paths: list[Path]) -> list[Case]:
    """Each photo as its own request at the default fidelity."""
    return [Case(path.name, (path.read_bytes(),), FIDELITY) for path in paths]


def group_photo(photos: list[np.ndarray]) -> np.ndarray:
    """The photos (repeated to four) each resized to ``GROUP_CELL`` and tiled 2 x 2: (1200, 1600, 3) BGR."""
    cells = [cv2.resize(photos[index % len(photos)], GROUP_CELL) for index in range(4)]
    return np.concatenate([np.concatenate(cells[:2], axis=1), np.concatenate(cells[2:], axis=1)], axis=0)


def generated_cases(paths: list[Path]) -> list[Case]:
    """The group photo at fidelity 0 and ``UNWARMED_FIDELITY``; the first photo at ``DETECTOR_SIZES``."""
    photos = [decode(path.read_bytes()) for path in paths]
    group = encode_jpeg(group_photo(photos))
    cases = [
        Case("group 2x2 w=0", (group,), 0.0),
        Case(f"group 2x2 w={UNWARMED_FIDELITY}", (group,), UNWARMED_FIDELITY),
    ]
    for width, height in DETECTOR_SIZES:
        resized = cv2.resize(photos[0], (width, height), interpolation=cv2.INTER_AREA)
        cases.append(Case(f"{paths[0].name} at {width}x{height}", (encode_jpeg(resized),), FIDELITY))
    return cases


def big_request_case(paths: list[Path]) -> Case:
    """``BIG_IMAGES`` images of ``BIG_SIZE`` (each photo enlarged, in turn) in one request."""
    photos = [decode(path.read_bytes()) for path in paths]
    images = tuple(
        encode_jpeg(cv2.resize(photos[index % len(photos)], BIG_SIZE, interpolation=cv2.INTER_LINEAR))
        for index in range(BIG_IMAGES)
    )
    return Case(f"{BIG_IMAGES} x {BIG_SIZE[0]}x{BIG_SIZE[1]}", images, FIDELITY)
