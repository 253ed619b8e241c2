"""The working image (docs/reference.md §4.1): gray test, then small images enlarged to short side 512."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from codeformer.image_sizes import WORKING_MIN_SIDE

GRAY_THRESHOLD = 10.0  # mean of the three channel-difference variances at or under this means gray
CHANNEL_PAIRS = ((0, 1), (1, 2), (2, 0))  # the differences the gray test takes, in the official order


# Within this distance of the threshold, the fast score and NumPy's float64 np.var (the
# official test) could fall on different sides: decide there as NumPy does. Both are within
# ~1e-10 of the exact value.
GRAY_EXACT_MARGIN = 1e-6


def is_gray(image: np.ndarray, threshold: float = GRAY_THRESHOLD) -> bool:
    """Whether a 3-channel image is (nearly) gray: mean population variance of channel differences."""
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    if image.dtype == np.uint8 and image.shape[2] == 3 and image.size > 0:
        return _decided(_fast_gray_score(image), image, threshold)
    return _numpy_gray_score(image) <= threshold


def _decided(score: float, image: np.ndarray, threshold: float) -> bool:
    """``score <= threshold``, or where a fast ``score`` lies within ``GRAY_EXACT_MARGIN`` of
    the threshold (rare), the official formula's verdict on ``image``."""
    if abs(score - threshold) > GRAY_EXACT_MARGIN:
        return score <= threshold
    return _numpy_gray_score(image) <= threshold


def _numpy_gray_score(image: np.ndarray) -> float:
    """The official formula: np.var of the three int16 channel differences, averaged."""
    channels = [image[..., c].astype(np.int16) for c in range(3)]
    variances = [np.var(channels[a] - channels[b]) for a, b in CHANNEL_PAIRS]
    return float(sum(variances)) / 3.0


def _score(second_moments: list[float], means: list[float]) -> float:
    """The gray score from each channel difference d's E[d²] and E[d]: the mean of var(d) = E[d²] − E[d]²."""
    return sum(moment - mean**2 for moment, mean in zip(second_moments, means, strict=True)) / 3.0


def is_gray_from_sums(sums: Sequence[int], image: np.ndarray, threshold: float = GRAY_THRESHOLD) -> bool:
    """``is_gray`` of (H, W, 3) uint8 ``image`` from its six channel-difference sums.

    ``sums``: Σd and Σd² of each channel difference d, in ``CHANNEL_PAIRS`` order: on the
    device pixel path ``device_warp.gray_sums_tensor``'s, downloaded (``.tolist()``).

    The score is computed in float64 from exact sums, within ~1e-10 of the exact value;
    within ``GRAY_EXACT_MARGIN`` of the threshold the host image decides, as NumPy does (rare).
    """
    pixels = image.shape[0] * image.shape[1]
    totals = [float(value) for value in sums]
    score = _score([total / pixels for total in totals[1::2]], [total / pixels for total in totals[0::2]])
    return _decided(score, image, threshold)


def _fast_gray_score(image: np.ndarray) -> float:
    """``_numpy_gray_score`` of a uint8 image from OpenCV's sums, without NumPy's temporaries.

    var(d) = E[|d|²] − E[d]² for a channel difference d: E[|d|²] = std² + mean² of
    ``cv2.meanStdDev(|d|)`` (integer sums inside, one square root), and E[d] from the
    channel sums, which ``cv2.sumElems`` returns exactly.
    """
    pixels = image.shape[0] * image.shape[1]
    planes = cv2.split(image)
    channel_sums = cv2.sumElems(image)
    second_moments, means = [], []
    for a, b in CHANNEL_PAIRS:
        mean, std = cv2.meanStdDev(cv2.absdiff(planes[a], planes[b]))
        second_moments.append(float(std[0, 0]) ** 2 + float(mean[0, 0]) ** 2)
        means.append((channel_sums[a] - channel_sums[b]) / pixels)
    return _score(second_moments, means)


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
