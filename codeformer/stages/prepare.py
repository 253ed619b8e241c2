"""The working image (spec §4.1): gray test, then small images enlarged to short side 512."""

from __future__ import annotations

import cv2
import numpy as np

WORKING_MIN_SIDE = 512  # images whose short side is under this are enlarged first
GRAY_THRESHOLD = 10.0  # mean of the three channel-difference variances at or under this means gray


def is_gray(image: np.ndarray, threshold: float = GRAY_THRESHOLD) -> bool:
    """Whether a 3-channel image is (nearly) gray: mean population variance of channel differences."""
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    channels = [image[..., c].astype(np.int16) for c in range(3)]
    variances = [
        np.var(a - b)
        for a, b in ((channels[0], channels[1]), (channels[1], channels[2]), (channels[2], channels[0]))
    ]
    return float(sum(variances)) / 3.0 <= threshold


def to_working_image(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(working image, enlargement factor); the factor is 1.0 when nothing was done.

    OpenCV's factor-based resize (dsize (0, 0), fx = fy = f) maps pixels with f itself, not
    with output/input size; the official code uses it, and the two differ by tens of levels.
    """
    height, width = image.shape[:2]
    short_side = min(height, width)
    if short_side >= WORKING_MIN_SIDE:
        return image, 1.0
    factor = WORKING_MIN_SIDE / short_side
    return cv2.resize(image, (0, 0), fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR), factor
