"""The working image (docs/reference.md §4.1): gray test, then small images enlarged to short side 512."""

from __future__ import annotations

import cv2
import numpy as np

from codeformer.errors import InputError

WORKING_MIN_SIDE = 512  # images whose short side is under this are enlarged first
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


# The detector's activations grow in proportion to its input's pixels. Its copy has a
# 640-pixel short side, so the aspect ratio alone decides its size: at most 16:1 keeps it
# at or under 640 x 10240 (6.6 megapixels), whatever the image's own size.
MAX_ASPECT_RATIO = 16.0


def working_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of ``to_working_image``'s output, computed without allocating it."""
    short_side = min(height, width)
    if short_side >= WORKING_MIN_SIDE:
        return height, width
    factor = WORKING_MIN_SIDE / short_side
    # cv2.resize with dsize (0, 0) rounds src size x factor to the nearest integer
    return round(height * factor), round(width * factor)


def check_image_size(height: int, width: int, max_pixels: int) -> None:
    """Refuse (``InputError``) an image whose own pixels, or any copy the pipeline makes of it, are too many.

    Checked from the header, before any of those arrays exists: the input itself, the
    working image (short side enlarged to 512) and the detector's copy (short side 640).
    """
    from codeformer.stages.detect import detector_input_size  # detect imports torch; prepare need not

    if height < 1 or width < 1:
        raise InputError(f"the image has no pixels ({width}x{height})")
    size = f"{width}x{height}"
    if width * height > max_pixels:
        raise InputError(
            f"{size} is {width * height / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:.1f} "
            "(CODEFORMER_MAX_PIXELS); send a smaller image"
        )
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise InputError(
            f"{size} is too elongated (aspect ratio {aspect:.1f}:1, at most {MAX_ASPECT_RATIO:.0f}:1): "
            "the face detector would need a copy of it with a 640-pixel short side; crop it into parts "
            "or pad it towards a square"
        )
    working_height, working_width = working_size(height, width)
    _, detector_height, detector_width = detector_input_size(working_height, working_width)
    for what, (copy_height, copy_width) in (
        ("working copy", (working_height, working_width)),
        ("face detector's copy", (detector_height, detector_width)),
    ):
        if copy_height * copy_width > max_pixels:
            raise InputError(
                f"the pipeline's {what} of this {size} image is {copy_width}x{copy_height} "
                f"({copy_width * copy_height / 1e6:.1f} megapixels), over the limit of "
                f"{max_pixels / 1e6:.1f} (CODEFORMER_MAX_PIXELS); raise the limit or send a larger image"
            )
