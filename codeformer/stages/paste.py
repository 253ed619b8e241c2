"""Paste the restored faces back into the working image (docs/reference.md §6), one face region at a time.

The official helper warps every face, its mask and its parse mask over the whole canvas.
Here each face works inside its *region*: the bounding box of its warped 512x512 footprint,
widened by a margin that covers the 2x2 erosion, the 2·w_edge erosion and the soft-mask
blur, clipped to the canvas. Outside that box every official intermediate is exactly zero,
so the blend leaves those pixels as they are, and the cost grows with the face's area
instead of image area x faces.

Parity with the whole-canvas recipe is exact, not approximate:

- Warps: ``warp_into_region`` (``codeformer.stages.warp``) gives each region pixel the
  value the full-canvas ``cv2.warpAffine`` gives it.
- Erosions, blur, products and sums run on the same values in the same dtypes; the margin
  makes the region edges see only zeros, so OpenCV's +inf erosion border and the
  REFLECT_101 blur border behave as on the canvas (at the canvas edges they *are* the
  canvas's).
- w_edge comes from a float32 sum of the eroded mask; a region sum can differ from the
  canvas sum in the last bits, so when the area sits within 1e-4 of a w_edge step the sum
  is redone on a zero canvas laid out exactly as the official one (rare).
- The official img turns floating point at the first face and is cast once at the end.
  Outside the regions it holds the image's levels exactly, so only per-face floating-point
  patches are kept (later faces read the earlier patches they overlap), and the output is
  the image with each patch's truncated values written over it, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from codeformer.config import FACE_SIZE
from codeformer.stages.parse import FaceMasks
from codeformer.stages.regions import Region, blend_edge_width, face_region
from codeformer.stages.restore import RestoredFaces
from codeformer.stages.warp import warp_into_region

MASK_EROSION_KERNEL = np.ones((2, 2), np.uint8)  # 2·upscale square, upscale 1
AREA_STEP_TOLERANCE = 1e-4  # relative distance to a w_edge step that triggers the canvas-layout sum


def _edge_width(eroded_mask: np.ndarray, region: Region, canvas_hw: tuple[int, int]) -> int:
    """w_edge from the float32 sum of the 2x2-eroded mask, as summed over the whole canvas.

    The region holds every non-zero value, but NumPy's pairwise float32 sum groups them by
    their position in the flattened canvas, so the region sum may differ in the last bits.
    That matters only next to a w_edge step; there the canvas layout is rebuilt and summed.
    """
    area = np.sum(eroded_mask)
    low = blend_edge_width(np.float32(area * (1 - AREA_STEP_TOLERANCE)))
    high = blend_edge_width(np.float32(area * (1 + AREA_STEP_TOLERANCE)))
    if low == high:
        return low
    canvas = np.zeros(canvas_hw, dtype=np.float32)
    canvas[region.slices] = eroded_mask
    return blend_edge_width(np.sum(canvas))


@dataclass(frozen=True)
class _Patch:
    """The floating-point canvas values one face's blend left in its region."""

    region: Region
    values: np.ndarray  # (h, w, 3) float32 or float64


def _read_canvas(image: np.ndarray, patches: list[_Patch], region: Region, dtype: np.dtype) -> np.ndarray:
    """The region of the official img as it stands: image values, overwritten by the patches in order."""
    values = image[region.slices].astype(dtype)  # exact: uint8 levels are exact in any float
    for patch in patches:
        overlap = Region(
            max(region.x0, patch.region.x0),
            max(region.y0, patch.region.y0),
            min(region.x1, patch.region.x1),
            min(region.y1, patch.region.y1),
        )
        if overlap.empty:
            continue
        target = overlap.shifted(region)
        source = overlap.shifted(patch.region)
        values[target.slices] = patch.values[source.slices]
    return values


def _three_channels(mask: np.ndarray) -> np.ndarray:
    """(h, w) mask -> (h, w, 3): NumPy multiplies equal shapes faster than an (h, w, 1) broadcast."""
    return cv2.merge([mask, mask, mask])


def _product(values: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """values · factor in NumPy's result dtype, rounded as ``values * factor`` is; reuses ``values``.

    ``values`` must be an array the caller owns and no longer needs. Widening it first (uint8
    or float32 into float32/float64) is exact, as NumPy's own promotion is.
    """
    values = values.astype(np.result_type(values, factor), copy=False)
    return np.multiply(values, factor, out=values)


def _sum(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """first + second as NumPy computes it, written into whichever operand has the result dtype."""
    dtype = np.result_type(first, second)
    out = first if first.dtype == dtype else second if second.dtype == dtype else None
    return np.add(first, second, out=out)


def _blend_dtype(mask_dtype: np.dtype, face_dtype: np.dtype, canvas_dtype: np.dtype) -> np.dtype:
    """The dtype of mask·face + (1 − mask)·canvas under NumPy's promotion rules."""
    mask, face, canvas = (np.zeros((0, 1, 1), d) for d in (mask_dtype, face_dtype, canvas_dtype))
    return (mask * face + (1 - mask) * canvas).dtype


def paste_faces(
    image: np.ndarray,
    restored: RestoredFaces,
    inverse_affines: np.ndarray,
    masks: FaceMasks | None,
) -> np.ndarray:
    """Blend restored faces into the working image in order (docs/reference.md §6.3–§6.6).

    image: (H, W, 3) uint8 BGR working image (not modified), from an input the pipeline's
        entry checked (``Restorer.restore``, ``decode_image``).
    restored: the (F, 512, 512, 3) uint8 BGR faces, or float64 for gray inputs (docs/reference.md §5.5).
    inverse_affines: (F, 2, 3) float64 face -> image matrices (upscale 1: no extra offset), one per
        face, finite and invertible: ``AlignedFaces.inverse_affines``, checked when built.
    masks: the faces' (F, 512, 512) float64 parse masks in [0, 1] (``FaceParser.masks``), or
        None for the no-parsing path (§6.4).
    Every input was checked where it was built; none is checked again here.
    Returns a new (H, W, 3) uint8 image, equal to the official full-canvas result.
    """
    faces = restored.faces
    parse_masks = None if masks is None else masks.masks
    canvas_hw = image.shape[:2]
    # The official img is the whole canvas, turned floating point by the first face. Outside
    # the face regions it keeps the image's values exactly, so we keep only what the faces
    # wrote: one floating-point patch per face, in order, the later ones on top.
    canvas_dtype = image.dtype
    patches: list[_Patch] = []
    face_mask = np.ones((FACE_SIZE, FACE_SIZE), dtype=np.float32)
    for index in range(len(faces)):
        inverse_affine = np.asarray(inverse_affines[index], dtype=np.float64)
        region = face_region(inverse_affine, canvas_hw)
        if region.empty:
            # every intermediate is zero on the canvas; only the dtype of img changes
            mask_dtype = np.dtype(np.float32 if parse_masks is None else np.float64)
            face_dtype = np.result_type(np.float32, faces.dtype)
            canvas_dtype = _blend_dtype(mask_dtype, face_dtype, canvas_dtype)
            continue
        face_space = [faces[index], face_mask] + ([] if parse_masks is None else [parse_masks[index]])
        # (h, w, 3) uint8 (float64 for gray faces), (h, w) float32 in [0, 1], [(h, w) float64]
        inv_restored, inv_mask, *inv_parse_mask = warp_into_region(
            face_space, inverse_affine, region, canvas_hw[1]
        )
        # 2x2 kernel, anchor (1, 1): min over the pixel and its up/left/up-left neighbours
        inv_mask_erosion = cv2.erode(inv_mask, MASK_EROSION_KERNEL)
        pasted_face = _product(inv_restored, _three_channels(inv_mask_erosion))  # float32 (float64 for gray)
        w_edge = _edge_width(inv_mask_erosion, region, canvas_hw)
        erosion_radius = 2 * w_edge
        # an empty kernel (w_edge 0) makes OpenCV erode with a 3x3 square, as officially
        inv_mask_center = cv2.erode(inv_mask_erosion, np.ones((erosion_radius, erosion_radius), np.uint8))
        blur_size = 2 * w_edge
        inv_soft_mask = cv2.GaussianBlur(inv_mask_center, (blur_size + 1, blur_size + 1), 0)
        if inv_parse_mask:
            # the official (parse < soft) selection, i.e. the minimum, in float64
            inv_soft_mask = np.minimum(inv_parse_mask[0], inv_soft_mask)
        # the official blend, soft·pasted + (1 − soft)·img: float64 with parse masks, float32
        # without; no rounding between faces
        soft_mask = _three_channels(inv_soft_mask)
        weighted_face = _product(pasted_face, soft_mask)
        keep = np.subtract(1, soft_mask, out=soft_mask)  # 1 − soft, in the soft mask's dtype
        # the region of img as it stands, in the dtype NumPy would promote it to for the product
        current = _read_canvas(image, patches, region, np.result_type(keep, canvas_dtype))
        blended = _sum(weighted_face, _product(current, keep))
        canvas_dtype = blended.dtype
        patches.append(_Patch(region, blended))
    output = image.copy()
    for patch in patches:
        # Official finalisation truncates toward zero (astype) and switches to uint16 when the
        # maximum exceeds 256. Colour faces never leave [0, 255] (a convex mix of values in
        # [0, 255]), so clipping changes nothing there; gray faces re-coloured by AdaIN can,
        # and our output is always uint8, so they are clipped first instead of wrapping.
        # (assigning float values to uint8 truncates as astype does)
        output[patch.region.slices] = np.clip(patch.values, 0, 255, out=patch.values)
    return output
