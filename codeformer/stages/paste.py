"""Paste the restored faces back into the working image (spec §6), one face region at a time.

The official helper warps every face, its mask and its parse mask over the whole canvas.
Here each face works inside its *region*: the bounding box of its warped 512x512 footprint,
widened by a margin that covers the 2x2 erosion, the 2·w_edge erosion and the soft-mask
blur, clipped to the canvas. Outside that box every official intermediate is exactly zero,
so the blend leaves those pixels as they are, and the cost grows with the face's area
instead of image area x faces.

Parity with the whole-canvas recipe is exact, not approximate:

- Warps. OpenCV quantises warp coordinates, and the rounding happens in terms of the
  *destination* pixel index, so simply warping into the region with a translated matrix
  moves a few sample points by one step (±1 level on rare pixels). Instead we compute, for
  each region pixel, the source coordinates that ``cv2.warpAffine`` computes for that pixel
  of the full canvas, and sample them with ``cv2.remap``, which interpolates exactly like
  the warp. Two OpenCV code paths matter (both checked once per process against
  ``cv2.warpAffine`` itself, see ``_warp_recipe``):
  * uint8 and float32 images (OpenCV >= 4.11 kernels): float32 coordinates
    ``fma(M0, x, f32(f32(y·M1) + M2))`` for the SIMD body of each row and
    ``f32(fma(x, M0, f32(y·M1))) + M2`` for the scalar tail of the last
    ``width mod lanes`` columns, sampled with float maps;
  * float64 images (gray faces, parse masks): the classic fixed-point path, 1/1024-px
    accumulators rounded to 1/32 px, sampled with int16 + interpolation-table maps.
  If the installed OpenCV computes differently, the translated-matrix warp is used and a
  warning is logged (results then differ by at most a level on rare pixels).
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

import functools
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from codeformer.config import FACE_SIZE
from codeformer.errors import InputError
from codeformer.nets.parsenet import ParseNet
from codeformer.runtime import autocast_dtype

logger = logging.getLogger(__name__)

# CelebAMask-HQ classes kept as "face" by the official MASK_COLORMAP (spec §6.3 9c): skin,
# nose, eyeglasses, eyes, brows, ears, mouth, lips, hair (1..13) and earrings (15); not
# background, hat, necklace, neck or cloth.
PARSE_FACE_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)
PARSE_NUM_CLASSES = 19
PARSE_BLUR_KSIZE = 101  # the parse mask is blurred twice with a 101x101, sigma 11 Gaussian
PARSE_BLUR_SIGMA = 11
PARSE_BLUR_PASSES = 2
PARSE_BORDER_ZERO_PX = 10  # then a 10-px band on every side is zeroed
MASK_EROSION_KERNEL = np.ones((2, 2), np.uint8)  # 2·upscale square, upscale 1

# Region margin beyond the footprint, on top of w_edge: 1 px for the 2x2 erosion, 1 px
# for the 3x3 substitute kernel when w_edge = 0, and slack for the footprint estimate.
REGION_EXTRA_MARGIN_PX = 4
AREA_STEP_TOLERANCE = 1e-4  # relative distance to a w_edge step that triggers the canvas-layout sum


# ---------------------------------------------------------------------------------------
# Warps that reproduce cv2.warpAffine's per-pixel arithmetic inside a region


@dataclass(frozen=True)
class _Region:
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

    def shifted(self, origin: _Region) -> _Region:
        """This box in the coordinates of ``origin``'s top-left corner."""
        return _Region(self.x0 - origin.x0, self.y0 - origin.y0, self.x1 - origin.x0, self.y1 - origin.y0)


@dataclass(frozen=True)
class _WarpRecipe:
    """How this OpenCV computes warpAffine coordinates (found by ``_warp_recipe``)."""

    float_lanes: int | None  # columns per SIMD step of the uint8/float32 kernels; None: emulation off
    float_fused: bool  # whether those kernels use fused multiply-adds
    fixed_point: bool  # whether float64 warps follow the fixed-point recipe


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add, correctly rounded, computed in float64.

    a·b of two float32 values is exact in float64; the float64 sum is rounded once more to
    float32, which is wrong only if it lands exactly on a float32 midpoint while the exact
    sum does not; that case is nudged one float64 step toward the exact sum first.
    """
    product = a.astype(np.float64) * b.astype(np.float64)
    addend = np.asarray(c, dtype=np.float64)
    total = product + addend
    # exact rounding error of the float64 addition (Knuth's two-sum)
    addend_part = total - product
    error = (product - (total - addend_part)) + (addend - addend_part)
    rounded = total.astype(np.float32)
    halfway = np.abs(total - rounded.astype(np.float64)) * 2.0 == np.spacing(np.abs(rounded)).astype(
        np.float64
    )
    ambiguous = halfway & (error != 0.0)
    if np.any(ambiguous):
        nudged = np.nextafter(total, total + np.sign(error) * np.inf)
        rounded = np.where(ambiguous, nudged.astype(np.float32), rounded)
    return rounded


def _float_maps(
    inverse_affine: np.ndarray, region: _Region, canvas_width: int, recipe: _WarpRecipe
) -> tuple[np.ndarray, np.ndarray]:
    """float32 source coordinates (map_x, map_y), each (h, w), of the region's pixels.

    The same numbers cv2.warpAffine (OpenCV >= 4.11 uint8/float32 kernels) computes for
    these pixels of the (canvas_width)-wide canvas: the matrix is inverted in float64 and
    rounded to float32; a row's constant term is f32(f32(y·M1) + M2); the SIMD body of a
    row adds M0·x with a fused multiply-add; the scalar tail (the last width mod lanes
    columns of the canvas) evaluates fma(x, M0, f32(y·M1)) + M2.
    """
    matrix = cv2.invertAffineTransform(inverse_affine).astype(np.float32)  # canvas -> face
    xs = np.arange(region.x0, region.x1, dtype=np.float32)[None, :]  # (1, w)
    ys = np.arange(region.y0, region.y1, dtype=np.float32)[:, None]  # (h, 1)
    assert recipe.float_lanes is not None
    tail_start = canvas_width - canvas_width % recipe.float_lanes if recipe.float_lanes else 0
    in_tail = xs >= tail_start  # (1, w)
    maps = []
    for m_x, m_y, m_const in (matrix[0], matrix[1]):
        m_x, m_y, m_const = np.float32(m_x), np.float32(m_y), np.float32(m_const)
        row_scaled = ys * m_y  # (h, 1) float32
        row_const = row_scaled + m_const
        if recipe.float_fused:
            body = _fma32(np.broadcast_to(m_x, xs.shape), xs, row_const)
            tail = _fma32(xs, np.broadcast_to(m_x, xs.shape), row_scaled) + m_const
        else:
            body = xs * m_x + row_const
            tail = (xs * m_x + row_scaled) + m_const
        maps.append(np.ascontiguousarray(np.where(in_tail, tail, body), dtype=np.float32))
    return maps[0], maps[1]


def _fixed_maps(inverse_affine: np.ndarray, region: _Region) -> tuple[np.ndarray, np.ndarray]:
    """(int16 (h, w, 2) integer coordinates, uint16 (h, w) table indices) of the region's pixels.

    OpenCV's fixed-point warpAffine (used for float64 images): per column round(M0·x·1024),
    per row round((M1·y + M2)·1024) + 16, summed and shifted to 1/32 px; the integer part
    goes to map1 and (fy·32 + fx) to map2, which cv2.remap interpolates exactly as the warp.
    """
    m = cv2.invertAffineTransform(inverse_affine).ravel()  # float64 canvas -> face, as the warp inverts
    xs = np.arange(region.x0, region.x1, dtype=np.float64)
    ys = np.arange(region.y0, region.y1, dtype=np.float64)
    col_x = np.rint(m[0] * xs * 1024).astype(np.int64)
    col_y = np.rint(m[3] * xs * 1024).astype(np.int64)
    row_x = np.rint((m[1] * ys + m[2]) * 1024).astype(np.int64) + 16
    row_y = np.rint((m[4] * ys + m[5]) * 1024).astype(np.int64) + 16
    fixed_x = (row_x[:, None] + col_x[None, :]) >> 5  # (h, w) in 1/32 px
    fixed_y = (row_y[:, None] + col_y[None, :]) >> 5
    int16 = np.iinfo(np.int16)
    integer_xy = np.stack([fixed_x >> 5, fixed_y >> 5], axis=-1).clip(int16.min, int16.max)
    table_index = (fixed_y & 31) * 32 + (fixed_x & 31)
    return integer_xy.astype(np.int16), table_index.astype(np.uint16)


class _RegionWarper:
    """Warps 512x512 face-space images into one face's region, as the full-canvas warp would."""

    def __init__(self, inverse_affine: np.ndarray, region: _Region, canvas_width: int) -> None:
        self.inverse_affine = inverse_affine
        self.region = region
        self.canvas_width = canvas_width
        self.recipe = _warp_recipe()
        self._float_maps: tuple[np.ndarray, np.ndarray] | None = None
        self._fixed_maps: tuple[np.ndarray, np.ndarray] | None = None

    def warp(self, image: np.ndarray) -> np.ndarray:
        """Bilinear, border constant 0 (what warpAffine does with flags 1 and, for warps, 3)."""
        size = (self.region.x1 - self.region.x0, self.region.y1 - self.region.y0)
        if image.dtype == np.float64 and self.recipe.fixed_point:
            if self._fixed_maps is None:
                self._fixed_maps = _fixed_maps(self.inverse_affine, self.region)
            map1, map2 = self._fixed_maps
        elif image.dtype in (np.uint8, np.float32) and self.recipe.float_lanes is not None:
            if self._float_maps is None:
                self._float_maps = _float_maps(
                    self.inverse_affine, self.region, self.canvas_width, self.recipe
                )
            map1, map2 = self._float_maps
        else:
            shifted = self.inverse_affine.copy()
            shifted[:, 2] -= (self.region.x0, self.region.y0)
            return cv2.warpAffine(image, shifted, size, flags=cv2.INTER_LINEAR, borderValue=0)
        return cv2.remap(image, map1, map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


@functools.cache
def _warp_recipe() -> _WarpRecipe:
    """Find, once, which coordinate recipe reproduces this OpenCV's warpAffine bit for bit.

    A noise source through a rotation + magnification like a real face's, onto a canvas
    191 px wide (191 mod 4, 8, 16, 32, 64 all differ, so the SIMD width shows in the
    scalar-tail columns); every candidate is compared with cv2.warpAffine itself.
    """
    rng = np.random.default_rng(20240919)
    canvas_size = (191, 160)  # (width, height)
    angle, scale = 0.23, 0.41
    inverse_affine = np.array(
        [
            [scale * np.cos(angle), -scale * np.sin(angle), -20.5],
            [scale * np.sin(angle), scale * np.cos(angle), -35.25],
        ]
    )
    region = _Region(0, 0, *canvas_size)

    def matches(source: np.ndarray, maps: tuple[np.ndarray, np.ndarray], flags: int) -> bool:
        expected = cv2.warpAffine(source, inverse_affine, canvas_size, flags=flags)
        got = cv2.remap(source, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        return np.array_equal(expected, got)

    noise_f32 = rng.random((FACE_SIZE, FACE_SIZE), dtype=np.float32) * 255
    noise_u8 = rng.integers(0, 256, (FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    float_lanes, float_fused = None, False
    for fused in (True, False):
        for lanes in (16, 8, 32, 4, 64, 0):
            candidate = _WarpRecipe(lanes, fused, False)
            maps = _float_maps(inverse_affine, region, canvas_size[0], candidate)
            if matches(noise_f32, maps, cv2.INTER_LINEAR) and matches(noise_u8, maps, cv2.INTER_LINEAR):
                float_lanes, float_fused = lanes, fused
                break
        if float_lanes is not None:
            break

    noise_f64 = rng.random((FACE_SIZE, FACE_SIZE, 3)) * 255
    fixed = _fixed_maps(inverse_affine, region)
    fixed_point = matches(noise_f64, fixed, cv2.INTER_LINEAR) and matches(
        noise_f64[..., 0].copy(), fixed, cv2.INTER_AREA
    )
    recipe = _WarpRecipe(float_lanes, float_fused, fixed_point)
    if float_lanes is None or not fixed_point:
        logger.warning(
            "OpenCV %s computes warpAffine coordinates differently from the recipes known here "
            "(%s); paste-back warps each face region with a translated matrix instead, which can "
            "differ from the full-canvas warp by one grey level on rare pixels",
            cv2.__version__,
            recipe,
        )
    return recipe


# ---------------------------------------------------------------------------------------
# Paste-back


def _face_region(inverse_affine: np.ndarray, canvas_hw: tuple[int, int]) -> _Region:
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
    return _Region(x0, y0, x1, y1)


def _w_edge(total_face_area: np.float32) -> int:
    # the official int(total_face_area ** 0.5) // 20 on a float32 NumPy scalar
    return int(total_face_area**0.5) // 20


def _edge_width(eroded_mask: np.ndarray, region: _Region, canvas_hw: tuple[int, int]) -> int:
    """w_edge from the float32 sum of the 2x2-eroded mask, as summed over the whole canvas.

    The region holds every non-zero value, but NumPy's pairwise float32 sum groups them by
    their position in the flattened canvas, so the region sum may differ in the last bits.
    That matters only next to a w_edge step; there the canvas layout is rebuilt and summed.
    """
    area = np.sum(eroded_mask)
    low = _w_edge(np.float32(area * (1 - AREA_STEP_TOLERANCE)))
    high = _w_edge(np.float32(area * (1 + AREA_STEP_TOLERANCE)))
    if low == high:
        return low
    canvas = np.zeros(canvas_hw, dtype=np.float32)
    canvas[region.slices] = eroded_mask
    return _w_edge(np.sum(canvas))


@dataclass(frozen=True)
class _Patch:
    """The floating-point canvas values one face's blend left in its region."""

    region: _Region
    values: np.ndarray  # (h, w, 3) float32 or float64


def _read_canvas(image: np.ndarray, patches: list[_Patch], region: _Region, dtype: np.dtype) -> np.ndarray:
    """The region of the official img as it stands: image values, overwritten by the patches in order."""
    values = image[region.slices].astype(dtype)  # exact: uint8 levels are exact in any float
    for patch in patches:
        overlap = _Region(
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


def _blend_dtype(mask_dtype: np.dtype, face_dtype: np.dtype, canvas_dtype: np.dtype) -> np.dtype:
    """The dtype of mask·face + (1 − mask)·canvas under NumPy's promotion rules."""
    mask, face, canvas = (np.zeros((0, 1, 1), d) for d in (mask_dtype, face_dtype, canvas_dtype))
    return (mask * face + (1 - mask) * canvas).dtype


def _check_paste_inputs(
    image: np.ndarray, faces: np.ndarray, inverse_affines: np.ndarray, parse_masks: np.ndarray | None
) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"image must be an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    face_shape = (FACE_SIZE, FACE_SIZE, 3)
    if faces.ndim != 4 or faces.shape[1:] != face_shape or faces.dtype not in (np.uint8, np.float64):
        raise InputError(
            f"faces must be an (F, {FACE_SIZE}, {FACE_SIZE}, 3) uint8 or float64 array, "
            f"got {faces.dtype} {faces.shape}"
        )
    if inverse_affines.shape != (len(faces), 2, 3):
        raise InputError(
            f"inverse_affines must be ({len(faces)}, 2, 3), one per face, got {inverse_affines.shape}"
        )
    determinants = (
        inverse_affines[:, 0, 0] * inverse_affines[:, 1, 1]
        - inverse_affines[:, 0, 1] * inverse_affines[:, 1, 0]
    )
    if not np.all(np.isfinite(inverse_affines)) or np.any(np.abs(determinants) < 1e-12):
        raise InputError(
            "inverse_affines must be finite and invertible (a face of non-zero size), "
            f"got determinants {determinants.tolist()}; re-run alignment"
        )
    if parse_masks is not None and (
        parse_masks.shape != (len(faces), FACE_SIZE, FACE_SIZE) or parse_masks.dtype != np.float64
    ):
        raise InputError(
            f"parse_masks must be ({len(faces)}, {FACE_SIZE}, {FACE_SIZE}) float64 (FaceParser.masks) "
            f"or None, got {parse_masks.dtype} {parse_masks.shape}"
        )


def paste_faces(
    image: np.ndarray,
    faces: np.ndarray,
    inverse_affines: np.ndarray,
    parse_masks: np.ndarray | None,
) -> np.ndarray:
    """Blend restored faces into the working image in order (spec §6.3–§6.6).

    image: (H, W, 3) uint8 BGR working image (not modified).
    faces: (F, 512, 512, 3) uint8 BGR, or float64 for gray inputs (spec §5.5).
    inverse_affines: (F, 2, 3) float64 face -> image matrices (upscale 1: no extra offset).
    parse_masks: (F, 512, 512) float64 in [0, 1] from ``FaceParser.masks``, or None for the
        no-parsing path (§6.4).
    Returns a new (H, W, 3) uint8 image, equal to the official full-canvas result.
    """
    _check_paste_inputs(image, faces, inverse_affines, parse_masks)
    canvas_hw = image.shape[:2]
    # The official img is the whole canvas, turned floating point by the first face. Outside
    # the face regions it keeps the image's values exactly, so we keep only what the faces
    # wrote: one floating-point patch per face, in order, the later ones on top.
    canvas_dtype = image.dtype
    patches: list[_Patch] = []
    face_mask = np.ones((FACE_SIZE, FACE_SIZE), dtype=np.float32)
    for index in range(len(faces)):
        inverse_affine = np.asarray(inverse_affines[index], dtype=np.float64)
        region = _face_region(inverse_affine, canvas_hw)
        if region.empty:
            # every intermediate is zero on the canvas; only the dtype of img changes
            mask_dtype = np.dtype(np.float32 if parse_masks is None else np.float64)
            face_dtype = np.result_type(np.float32, faces.dtype)
            canvas_dtype = _blend_dtype(mask_dtype, face_dtype, canvas_dtype)
            continue
        warper = _RegionWarper(inverse_affine, region, canvas_hw[1])
        inv_restored = warper.warp(faces[index])  # (h, w, 3) uint8, or float64 for gray faces
        inv_mask = warper.warp(face_mask)  # (h, w) float32 in [0, 1]
        # 2x2 kernel, anchor (1, 1): min over the pixel and its up/left/up-left neighbours
        inv_mask_erosion = cv2.erode(inv_mask, MASK_EROSION_KERNEL)
        pasted_face = inv_mask_erosion[:, :, None] * inv_restored  # float32 (float64 for gray)
        w_edge = _edge_width(inv_mask_erosion, region, canvas_hw)
        erosion_radius = 2 * w_edge
        # an empty kernel (w_edge 0) makes OpenCV erode with a 3x3 square, as officially
        inv_mask_center = cv2.erode(inv_mask_erosion, np.ones((erosion_radius, erosion_radius), np.uint8))
        blur_size = 2 * w_edge
        inv_soft_mask = cv2.GaussianBlur(inv_mask_center, (blur_size + 1, blur_size + 1), 0)[:, :, None]
        if parse_masks is not None:
            inv_parse_mask = warper.warp(parse_masks[index])[:, :, None]  # float64
            # the official (parse < soft) selection, i.e. the minimum, in float64
            inv_soft_mask = np.minimum(inv_parse_mask, inv_soft_mask)
        current = _read_canvas(image, patches, region, canvas_dtype)  # (h, w, 3) as img holds it now
        # float64 with parse masks, float32 without; no rounding between faces
        blended = inv_soft_mask * pasted_face + (1 - inv_soft_mask) * current
        canvas_dtype = blended.dtype
        patches.append(_Patch(region, blended))
    output = image.copy()
    for patch in patches:
        # Official finalisation truncates toward zero (astype) and switches to uint16 when the
        # maximum exceeds 256. Colour faces never leave [0, 255] (a convex mix of values in
        # [0, 255]), so clipping changes nothing there; gray faces re-coloured by AdaIN can,
        # and our output is always uint8, so they are clipped first instead of wrapping.
        output[patch.region.slices] = np.clip(patch.values, 0, 255).astype(np.uint8)
    return output


# ---------------------------------------------------------------------------------------
# Face parsing


def face_pixels_to_masks(face_pixels: np.ndarray) -> np.ndarray:
    """(F, 512, 512) bool face-class pixels -> (F, 512, 512) float64 blend masks in [0, 1].

    Spec §6.3 step 9 c–f: 255 on face pixels, two 101x101 σ 11 Gaussian blurs in float64
    (REFLECT_101), a 10-px zero band on every side, / 255.
    """
    masks = np.empty(face_pixels.shape, dtype=np.float64)
    band = PARSE_BORDER_ZERO_PX
    for index, face_pixels_one in enumerate(face_pixels):
        parse_mask = np.where(face_pixels_one, 255.0, 0.0)  # (512, 512) float64
        for _ in range(PARSE_BLUR_PASSES):
            parse_mask = cv2.GaussianBlur(parse_mask, (PARSE_BLUR_KSIZE, PARSE_BLUR_KSIZE), PARSE_BLUR_SIGMA)
        parse_mask[:band, :] = 0
        parse_mask[-band:, :] = 0
        parse_mask[:, :band] = 0
        parse_mask[:, -band:] = 0
        masks[index] = parse_mask / 255.0
    return masks


class FaceParser:
    """Runs a loaded ParseNet over restored faces and turns its labels into blend masks."""

    def __init__(
        self, net: ParseNet, device: torch.device, batch_size: int = 4, channels_last: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.net = net
        self.device = device
        self.batch_size = batch_size
        self.channels_last = channels_last
        colormap = torch.zeros(PARSE_NUM_CLASSES, dtype=torch.bool)
        colormap[list(PARSE_FACE_CLASSES)] = True
        self._face_classes = colormap.to(device)  # class index -> kept as face

    def labels(self, faces: np.ndarray, mixed_precision: bool = False) -> np.ndarray:
        """(F, 512, 512, 3) uint8/float64 BGR faces -> (F, 512, 512) bool, True on face classes."""
        precision = autocast_dtype(self.device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(faces), self.batch_size):
                faces_bgr = torch.from_numpy(np.ascontiguousarray(faces[start : start + self.batch_size]))
                faces_bgr = faces_bgr.to(self.device)
                # official: astype float32, then / 255 in float32, BGR -> RGB, (v - 0.5) / 0.5
                unit = faces_bgr.to(torch.float32) / 255.0
                faces_in = ((unit.flip(-1).permute(0, 3, 1, 2) - 0.5) / 0.5).contiguous(
                    memory_format=memory_format
                )  # (B, 3, 512, 512) float in [-1, 1]
                with torch.autocast(self.device.type, dtype=precision, enabled=mixed_precision):
                    logits = self.net(faces_in)[0]  # (B, 19, 512, 512)
                labels = logits.argmax(dim=1)  # first maximum wins, as NumPy's argmax
                chunks.append(self._face_classes[labels])
            keep = torch.cat(chunks) if chunks else torch.zeros((0, FACE_SIZE, FACE_SIZE), dtype=torch.bool)
            return keep.cpu().numpy()

    def masks(self, faces: np.ndarray, mixed_precision: bool = False) -> np.ndarray:
        """(F, 512, 512, 3) uint8 BGR (or float64 gray) faces -> (F, 512, 512) float64 masks in [0, 1].

        Spec §6.3 step 9 a–f: ParseNet labels, 255 on face classes, two 101x101 σ 11 Gaussian
        blurs in float64 (REFLECT_101), a 10-px zero band on every side, / 255.
        ``mixed_precision`` runs ParseNet under autocast (bfloat16 on CPU, float16 on CUDA).
        """
        face_shape = (FACE_SIZE, FACE_SIZE, 3)
        if faces.ndim != 4 or faces.shape[1:] != face_shape or faces.dtype not in (np.uint8, np.float64):
            raise InputError(
                f"faces must be an (F, {FACE_SIZE}, {FACE_SIZE}, 3) uint8 or float64 array, "
                f"got {faces.dtype} {faces.shape}"
            )
        masks = face_pixels_to_masks(self.labels(faces, mixed_precision))
        logger.debug("parsed %d faces (mixed_precision=%s)", len(faces), mixed_precision)
        return masks
