"""Warp 512x512 face-space images into one box of the canvas, bit for bit as a full-canvas warp.

The official paste-back warps each face, its mask and its parse mask over the whole canvas
with ``cv2.warpAffine`` (docs/reference.md §6.3 steps 1, 2 and 9h). Paste-back here works inside each
face's region, and ``warp_into_region`` gives it exactly the pixels the full-canvas warp
would have put there.

Why not simply warp into the region with a translated matrix: OpenCV quantises warp
coordinates, and the rounding happens in terms of the *destination* pixel index, so a
translated matrix moves a few sample points by one step (±1 level on rare pixels).
Instead we compute, for each region pixel, the source coordinates ``cv2.warpAffine``
computes for that pixel of the full canvas, and sample them with ``cv2.remap``, which
interpolates exactly like the warp. Two OpenCV code paths matter (both checked once per
process against ``cv2.warpAffine`` itself, see ``_warp_recipe``):

- uint8 and float32 images (OpenCV >= 4.11 kernels): float32 coordinates
  ``fma(M0, x, f32(f32(y·M1) + M2))`` for the SIMD body of each row and
  ``f32(fma(x, M0, f32(y·M1))) + M2`` for the scalar tail of the last ``width mod lanes``
  columns, sampled with float maps;
- float64 images (gray faces, parse masks): the classic fixed-point path, 1/1024-px
  accumulators rounded to 1/32 px, sampled with int16 + interpolation-table maps.

If the installed OpenCV computes differently, the translated-matrix warp is used and a
warning is logged (results then differ by at most a level on rare pixels).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from codeformer.config import FACE_SIZE
from codeformer.stages.regions import Region

logger = logging.getLogger(__name__)


def warp_into_region(
    images: Sequence[np.ndarray], inverse_affine: np.ndarray, region: Region, canvas_width: int
) -> list[np.ndarray]:
    """Each 512x512 image (uint8, float32 or float64; 2-D or with channels) warped into ``region``.

    Returns, per image, ``cv2.warpAffine(image, inverse_affine, canvas size)[region.slices]``
    (bilinear, border constant 0), computed for the region's pixels only. ``canvas_width``
    matters because OpenCV's SIMD kernels treat a row's last ``width mod lanes`` columns
    apart. The coordinate maps are computed once per call, for the dtypes present.
    """
    recipe = _warp_recipe()
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    warped = []
    for image in images:
        if image.dtype == np.float64 and recipe.fixed_point:
            if "fixed" not in maps:
                maps["fixed"] = _fixed_maps(inverse_affine, region)
            map1, map2 = maps["fixed"]
        elif image.dtype in (np.uint8, np.float32) and recipe.float_lanes is not None:
            if "float" not in maps:
                maps["float"] = _float_maps(inverse_affine, region, canvas_width, recipe)
            map1, map2 = maps["float"]
        else:
            shifted = inverse_affine.copy()
            shifted[:, 2] -= (region.x0, region.y0)
            size = (region.x1 - region.x0, region.y1 - region.y0)
            warped.append(cv2.warpAffine(image, shifted, size, flags=cv2.INTER_LINEAR, borderValue=0))
            continue
        warped.append(
            cv2.remap(image, map1, map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        )
    return warped


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
        nudged = np.nextafter(total, np.where(error > 0, np.inf, -np.inf))
        rounded = np.where(ambiguous, nudged.astype(np.float32), rounded)
    return rounded


def _fma32_grid(m_x: np.float32, xs: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = float32 fma(m_x, xs[j], rows[i]): float32 (w,) columns, (h,) rows, (h, w) out.

    Fast path, exact: m_x·x is exact in float64, and so is its float64 sum with a row
    value whenever both terms are multiples of some power of two q (the smaller of their
    float32 ulps) and the sum's magnitude is under q·2^53; that sum rounded once to float32
    is the fused multiply-add's result. Warp coordinates meet the bound by ~10 bits; a row
    that cannot be shown to meet it (a row value very near zero) goes through ``_fma32``.
    """
    products = np.float64(m_x) * xs.astype(np.float64)  # (w,) exact
    rows64 = rows.astype(np.float64)
    # float64 sum, rounded to float32 on the way into out (NumPy's cast: round to nearest even)
    np.add(rows64[:, None], products[None, :], out=out, dtype=np.float64, casting="same_kind")

    def ulp(values: np.ndarray) -> np.ndarray:
        # a float32 value is a multiple of its ulp; zero is a multiple of every power of two
        return np.where(values == 0, np.inf, np.spacing(np.abs(values)).astype(np.float64))

    quantum = np.minimum(ulp(np.asarray(m_x)), ulp(rows))  # (h,)
    bound = np.abs(products).max(initial=0.0) + np.abs(rows64)
    unproven = bound >= quantum * 2.0**53
    if np.any(unproven):
        out[unproven] = _fma32(np.broadcast_to(m_x, xs.shape)[None, :], xs[None, :], rows[unproven][:, None])


def _float_maps(
    inverse_affine: np.ndarray, region: Region, canvas_width: int, recipe: _WarpRecipe
) -> tuple[np.ndarray, np.ndarray]:
    """float32 source coordinates (map_x, map_y), each (h, w), of the region's pixels.

    The same numbers cv2.warpAffine (OpenCV >= 4.11 uint8/float32 kernels) computes for
    these pixels of the (canvas_width)-wide canvas: the matrix is inverted in float64 and
    rounded to float32; a row's constant term is f32(f32(y·M1) + M2); the SIMD body of a
    row adds M0·x with a fused multiply-add; the scalar tail (the last width mod lanes
    columns of the canvas) evaluates fma(x, M0, f32(y·M1)) + M2.
    """
    matrix = cv2.invertAffineTransform(inverse_affine).astype(np.float32)  # canvas -> face
    xs = np.arange(region.x0, region.x1, dtype=np.float32)  # (w,)
    ys = np.arange(region.y0, region.y1, dtype=np.float32)  # (h,)
    assert recipe.float_lanes is not None
    tail_start = canvas_width - canvas_width % recipe.float_lanes if recipe.float_lanes else 0
    body_end = int(np.clip(tail_start - region.x0, 0, len(xs)))  # region columns before the tail
    body_xs, tail_xs = xs[:body_end], xs[body_end:]
    maps = []
    for m_x, m_y, m_const in matrix:
        row_scaled = ys * m_y  # (h,) float32
        row_const = row_scaled + m_const
        coordinates = np.empty((len(ys), len(xs)), dtype=np.float32)
        body, tail = coordinates[:, :body_end], coordinates[:, body_end:]
        if recipe.float_fused:
            _fma32_grid(m_x, body_xs, row_const, body)
            _fma32_grid(m_x, tail_xs, row_scaled, tail)
            tail += m_const
        else:
            body[...] = body_xs[None, :] * m_x + row_const[:, None]
            tail[...] = (tail_xs[None, :] * m_x + row_scaled[:, None]) + m_const
        maps.append(coordinates)
    return maps[0], maps[1]


def _fixed_maps(inverse_affine: np.ndarray, region: Region) -> tuple[np.ndarray, np.ndarray]:
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
    region = Region(0, 0, *canvas_size)

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
