"""Region warps (``codeformer.stages.warp``): the region maps reproduce the full-canvas
``cv2.warpAffine``, and the fused-coordinate fast path equals the exact multiply-add."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from helpers import similarity

from codeformer.stages import warp
from codeformer.stages.regions import Region
from codeformer.stages.warp import warp_into_region

logger = logging.getLogger(__name__)

FACE = 512


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_region_warp_equals_full_canvas_warp(dtype: str) -> None:
    rng = np.random.default_rng(7)
    if dtype == "uint8":
        source = rng.integers(0, 256, (FACE, FACE, 3), dtype=np.uint8)
    elif dtype == "float32":
        source = rng.random((FACE, FACE), dtype=np.float32)
    else:
        source = rng.random((FACE, FACE, 3)) * 255
    for trial in range(25):
        height, width = (int(v) for v in rng.integers(60, 700, 2))
        scale, angle = rng.uniform(0.05, 1.5), rng.uniform(-np.pi, np.pi)
        inverse_affine = similarity(scale, angle, rng.uniform(-200, width), rng.uniform(-200, height))
        x0, y0 = int(rng.integers(0, width - 5)), int(rng.integers(0, height - 5))
        x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
        region = Region(x0, y0, x1, y1)
        full = cv2.warpAffine(source, inverse_affine, (width, height))
        (got,) = warp_into_region([source], inverse_affine, region, width)
        assert np.array_equal(got, full[region.slices]), f"trial {trial}"


def test_fused_coordinates_fast_path_equals_the_exact_fma() -> None:
    """The float64 shortcut of the maps' fused multiply-add, on rows chosen to defeat it.

    Rows near zero (down to subnormals) make the float64 sum inexact: those rows must take
    the exact path; a row cancelling a column's product, zero rows and m_x = 0 are edges.
    """
    rng = np.random.default_rng(11)
    for trial in range(400):
        m_x = np.float32(rng.choice([-1.0, 1.0]) * 10 ** rng.uniform(-8, 3)) if trial % 40 else np.float32(0)
        start = int(rng.integers(0, 30000))
        xs = np.arange(start, start + int(rng.integers(0, 48)), dtype=np.float32)
        rows = (rng.choice([-1.0, 1.0], 32) * 10 ** rng.uniform(-45, 5, 32)).astype(np.float32)
        rows[:2] = 0.0
        if len(xs):
            rows[2] = np.float32(-np.float64(m_x) * xs[len(xs) // 2])
        got = np.empty((len(rows), len(xs)), np.float32)
        warp._fma32_grid(m_x, xs, rows, got)
        expected = warp._fma32(np.broadcast_to(m_x, xs.shape)[None, :], xs[None, :], rows[:, None])
        assert np.array_equal(got, expected), f"trial {trial}"


def test_translated_matrix_warp_differs_which_is_why_maps_are_used() -> None:
    """Measures what the naive region warp (translated matrix) would cost: rare ±1 levels."""
    rng = np.random.default_rng(8)
    source = rng.integers(0, 256, (FACE, FACE, 3), dtype=np.uint8)
    differing, total, worst = 0, 0, 0
    for _ in range(10):
        inverse_affine = similarity(rng.uniform(0.2, 0.8), rng.uniform(-0.5, 0.5), 150.0, 100.0)
        full = cv2.warpAffine(source, inverse_affine, (700, 600))
        x0, y0 = int(rng.integers(1, 150)), int(rng.integers(1, 100))
        shifted = inverse_affine.copy()
        shifted[:, 2] -= (x0, y0)
        naive = cv2.warpAffine(source, shifted, (700 - x0, 600 - y0))
        difference = np.abs(naive.astype(int) - full[y0:, x0:])
        differing += int(np.count_nonzero(difference))
        total += difference.size
        worst = max(worst, int(difference.max()))
    logger.info("translated-matrix region warp: max %d, fraction %.2e", worst, differing / total)
    assert worst <= 1 and differing / total < 1e-2
