"""The sizes of the pipeline's copies of an image, and the pixel limit checked from the header."""

from __future__ import annotations

import re

import numpy as np
import pytest

from codeformer.errors import InputError
from codeformer.image_sizes import check_image_size, detector_input_size, working_size
from codeformer.stages.prepare import to_working_image


@pytest.mark.parametrize(
    ("width", "height", "reason"),
    [
        (30000, 1, "30000x1 is too elongated (aspect ratio 30000.0:1, at most 16:1)"),
        (1, 30000, "1x30000 is too elongated"),
        (1089, 68, "too elongated"),
        (9000, 9000, "81.0 megapixels, over the limit of 40.0"),
        (0, 5, "no pixels"),
    ],
)
def test_sizes_are_checked_before_any_copy_is_made(width: int, height: int, reason: str) -> None:
    with pytest.raises(InputError, match=re.escape(reason)):
        check_image_size(height, width, 40_000_000)


def test_the_copies_the_pipeline_makes_count_against_the_limit() -> None:
    # 100x100 itself is 0.01 MP; the pipeline's detector copy of it is 640x640 = 0.41 MP
    check_image_size(100, 100, 640 * 640)
    with pytest.raises(InputError, match=r"face detector's copy of this 100x100 image is 640x640"):
        check_image_size(100, 100, 640 * 640 - 1)
    # working_size computes what the resize makes, without making it
    assert working_size(100, 150) == to_working_image(np.zeros((100, 150, 3), np.uint8))[0].shape[:2]


@pytest.mark.parametrize("short_side", [581, 606, 616, 623, 638])
def test_truncated_short_side_comes_out_639(short_side: int) -> None:
    scale, new_height, _ = detector_input_size(short_side, 1000)
    assert scale == 640 / short_side
    assert new_height == 639  # docs/reference.md §3 step 1: int() truncation of h * scale


def test_detector_input_size_truncates_both_sides() -> None:
    scale, new_height, new_width = detector_input_size(1000, 1003)
    assert (new_height, new_width) == (640, int(1003 * 0.64))
