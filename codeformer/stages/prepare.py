"""The working image (docs/reference.md §4.1): gray test, then small images enlarged to short side 512."""

from __future__ import annotations

import cv2
import numpy as np

from codeformer.image_sizes import WORKING_MIN_SIDE

GRAY_THRESHOLD = 10.0  # mean of the three channel-difference variances at or under this means gray


# Within this distance of the threshold, the fast score and NumPy's float64 np.var (the
# official test) could fall on different sides: decide there as NumPy does. Both are within
# ~1e-10 of the exact value.
GRAY_EXACT_MARGIN = 1e-6


def is_gray(image: np.ndarray, threshold: float = GRAY_THRESHOLD) -> bool:
    """Whether a 3-channel image is (nearly) gray: mean population variance of channel differences."""
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    if image.dtype == np.uint8 and image.shape[2] == 3 and image.size > 0:
        score = _fast_gray_score(image)
        if abs(score - threshold) > GRAY_EXACT_MARGIN:
            return score <= threshold
    return _numpy_gray_score(image) <= threshold


def _numpy_gray_score(image: np.ndarray) -> float:
    """The official formula: np.var of the three int16 channel differences, averaged."""
    channels = [image[..., c].astype(np.int16) for c in range(3)]
    variances = [
        np.var(a - b)
        for a, b in ((channels[0], channels[1]), (channels[1], channels[2]), (channels[2], channels[0]))
    ]
    return float(sum(variances)) / 3.0


def _fast_gray_score(image: np.ndarray) -> float:
    """``_numpy_gray_score`` of a uint8 image from OpenCV's sums, without NumPy's temporaries.

    var(d) = E[|d|²] − E[d]² for a channel difference d: E[|d|²] = std² + mean² of
    ``cv2.meanStdDev(|d|)`` (integer sums inside, one square root), and E[d] from the
    channel sums, which ``cv2.sumElems`` returns exactly.
    """
    pixels = image.shape[0] * image.shape[1]
    planes = cv2.split(image)
    channel_sums = cv2.sumElems(image)
    total = 0.0
    for a, b in ((0, 1), (1, 2), (2, 0)):
        mean, std = cv2.meanStdDev(cv2.absdiff(planes[a], planes[b]))
        mean_difference = (channel_sums[a] - channel_sums[b]) / pixels
        total += float(std[0, 0]) ** 2 + float(mean[0, 0]) ** 2 - mean_difference**2
    return total / 3.0


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
