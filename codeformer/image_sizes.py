"""The sizes of the copies the pipeline makes of an image, and the limit they are checked against.

The working image (``stages.prepare``: short side enlarged to 512) and the detector's copy
(``stages.detect``: short side ~640) are sized here, so that the decoder can refuse an
image from its header (``check_image_size``), before any of those arrays exists, without
importing a stage.
"""

from __future__ import annotations

from codeformer.errors import InputError

WORKING_MIN_SIDE = 512  # images whose short side is under this are enlarged first (docs/reference.md §4.1)
DETECTOR_SHORT_SIDE = 640  # the helper's resize=640: the detector sees the image at short side ~640

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


def detector_input_size(height: int, width: int) -> tuple[float, int, int]:
    """(nominal scale, h', w') of the detector's copy of an h x w image (docs/reference.md §3 step 1).

    The sizes are truncated, so the short side can come out as 639; the rows are later
    divided by the nominal scale, not by the actual ratio (§9 item 3).
    """
    scale = DETECTOR_SHORT_SIDE / min(height, width)
    return scale, int(height * scale), int(width * scale)


def check_image_size(height: int, width: int, max_pixels: int) -> None:
    """Refuse (``InputError``) an image whose own pixels, or any copy the pipeline makes of it, are too many.

    Checked from the header, before any of those arrays exists: the input itself, the
    working image (short side enlarged to 512) and the detector's copy (short side 640).
    """
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
