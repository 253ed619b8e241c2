"""Where a face lands on the canvas in paste-back (docs/reference.md §6.3): its region and edge width.

Geometry shared by the host paste-back (``codeformer.stages.paste``) and the device one
(``device_paste``): boxes of the canvas and numbers, no pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codeformer.config import FACE_SIZE


@dataclass(frozen=True)
class Region:
    """A half-open pixel box [x0, x1) x [y0, y1) of the canvas."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def empty(self) -> bool:
        return self.x1 <= self.x0 or self.y1 <= self.y0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def shifted(self, origin: Region) -> Region:
        """This box in the coordinates of ``origin``'s top-left corner."""
        return Region(self.x0 - origin.x0, self.y0 - origin.y0, self.x1 - origin.x0, self.y1 - origin.y0)


# Region margin beyond the footprint, on top of w_edge: 1 px for the 2x2 erosion, 1 px
# for the 3x3 substitute kernel when w_edge = 0, and slack for the footprint estimate.
REGION_EXTRA_MARGIN_PX = 4


def face_region(inverse_affine: np.ndarray, canvas_hw: tuple[int, int]) -> Region:
    """The face's footprint box plus the margin its masks need, clipped to the canvas.

    Bilinear sampling with a zero border is non-zero only where the source point lies in
    (-1, 512) x (-1, 512); the image of that square's corners bounds the footprint (plus
    slack for coordinate rounding). Eroding and blurring need w_edge + 2 more pixels; we add
    REGION_EXTRA_MARGIN_PX on top of the largest w_edge the box allows.
    """
    height, width = canvas_hw
    corners = np.array(
        [[-1.0, -1.0, 1.0], [FACE_SIZE, -1.0, 1.0], [-1.0, FACE_SIZE, 1.0], [FACE_SIZE, FACE_SIZE, 1.0]]
    )
    mapped = corners @ inverse_affine.T  # (4, 2) canvas coordinates
    low = np.floor(mapped.min(axis=0)) - 2
    high = np.ceil(mapped.max(axis=0)) + 3
    # w_edge is at most int(sqrt(area)) // 20, and the area at most the box's pixels on the canvas
    box_w = min(max(high[0] - low[0], 0.0), width)
    box_h = min(max(high[1] - low[1], 0.0), height)
    margin = int(np.sqrt(box_w * box_h)) // 20 + REGION_EXTRA_MARGIN_PX
    x0 = int(np.clip(low[0] - margin, 0, width))
    y0 = int(np.clip(low[1] - margin, 0, height))
    x1 = int(np.clip(high[0] + margin, 0, width))
    y1 = int(np.clip(high[1] + margin, 0, height))
    return Region(x0, y0, x1, y1)


def blend_edge_width(total_face_area: np.float32) -> int:
    """The official blend edge width, ``int(total_face_area ** 0.5) // 20`` on a float32 NumPy scalar."""
    return int(total_face_area**0.5) // 20
