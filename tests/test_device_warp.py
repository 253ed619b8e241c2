"""OpenCV's pixel operations in torch (``codeformer.stages.device_warp``) against OpenCV itself.

On a GPU the request's pixel stages run on the device; the code is the same on any torch
device, so these tests run it on CPU tensors. Bound (issue 29, ``benchmarks.stage_checks``):
within 1 level of the host stage on at least 99.99 % of values, none beyond 2.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from helpers import noise, similarity, smooth_noise

from benchmarks.stage_checks import level_difference
from codeformer.stages.device_warp import resize_tensor, warp_affine_tensor

BORDER = (135.0, 133.0, 132.0)


def assert_within_bound(device_output: np.ndarray, host_output: np.ndarray) -> dict:
    assert device_output.dtype == host_output.dtype
    difference = level_difference(device_output, host_output, 1.0)
    assert difference["within_bound"], difference
    return difference


def as_batch(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (1, C, H, W) tensor view, as the device stages take an HWC upload."""
    return torch.from_numpy(image).permute(2, 0, 1)[None]


def as_images(warped: torch.Tensor) -> np.ndarray:
    """(N, C, h, w) tensor -> (N, h, w, C) array."""
    return warped.permute(0, 2, 3, 1).numpy()


def source_image(dtype: str, height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Uniform noise (the worst case for interpolation) in ``dtype``, 0-255."""
    rng = np.random.default_rng(seed)
    values = rng.random((height, width, channels)) * 255
    return values.round().astype(np.uint8) if dtype == "uint8" else values.astype(dtype)


# crop -> image similarities (scale = face size in the image / 512) of the face classes
# alignment meets; the warp takes their inverse, image -> crop, as warp_crops does
WARP_CASES = {
    "tilted": lambda rng, h, w: similarity(rng.uniform(0.3, 1.2), rng.uniform(-np.pi, np.pi), w / 3, h / 3),
    "at_border": lambda rng, h, w: similarity(0.8, rng.uniform(-0.5, 0.5), w - 200.0, -150.0),
    "tiny": lambda rng, h, w: similarity(0.05, rng.uniform(-np.pi, np.pi), w / 2, h / 2),
    "huge": lambda rng, h, w: similarity(8.0, rng.uniform(-np.pi, np.pi), -1500.0, -1800.0),
    "outside": lambda rng, h, w: similarity(0.5, 0.3, w + 400.0, h + 10.0),
}


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
@pytest.mark.parametrize("case", sorted(WARP_CASES))
def test_warp_matches_opencv(case: str, dtype: str) -> None:
    rng = np.random.default_rng(len(case))
    height, width = 301, 457
    image = source_image(dtype, height, width, 3, seed=3)
    affines = np.stack([cv2.invertAffineTransform(WARP_CASES[case](rng, height, width)) for _ in range(2)])
    warped = as_images(warp_affine_tensor(as_batch(image), torch.from_numpy(affines), (512, 512), BORDER))
    for affine, got in zip(affines, warped, strict=True):
        expected = cv2.warpAffine(image, affine, (512, 512), flags=cv2.INTER_LINEAR, borderValue=BORDER)
        assert_within_bound(got, expected)


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_warp_matches_opencv_on_odd_sizes_and_one_channel(dtype: str) -> None:
    """Output widths that leave a remainder after OpenCV's SIMD lanes, 1-pixel-wide images and outputs."""
    rng = np.random.default_rng(11)
    for (height, width), (out_height, out_width) in [
        ((97, 1), (33, 1)),
        ((1, 53), (7, 191)),
        ((63, 211), (45, 317)),
    ]:
        image = source_image(dtype, height, width, 1, seed=height)
        affine = similarity(rng.uniform(0.5, 3), rng.uniform(-np.pi, np.pi), rng.uniform(-20, 20), 5.0)
        expected = cv2.warpAffine(
            image, affine, (out_width, out_height), flags=cv2.INTER_LINEAR, borderValue=9
        )
        got = as_images(warp_affine_tensor(as_batch(image), affine[None], (out_height, out_width), 9))[
            0, ..., 0
        ]
        assert_within_bound(got, expected)


def test_warp_of_a_batch_equals_each_image_warped_alone() -> None:
    """(N, C, H, W) with one matrix per image gives what each (1, C, H, W) gives with its own."""
    rng = np.random.default_rng(5)
    images = np.stack([noise(120, 90, seed) for seed in range(3)])  # (3, 120, 90, 3) uint8
    affines = np.stack([similarity(rng.uniform(0.2, 2), rng.uniform(-3, 3), 10.0, 20.0) for _ in range(3)])
    batch = warp_affine_tensor(torch.from_numpy(images).permute(0, 3, 1, 2), affines, (64, 48), BORDER)
    for image, affine, got in zip(images, affines, batch, strict=True):
        alone = warp_affine_tensor(as_batch(image), affine[None], (64, 48), BORDER)[0]
        assert torch.equal(got, alone)


def test_identity_warp_returns_the_image_and_the_border_outside() -> None:
    image = (smooth_noise(np.random.default_rng(0), (40, 30, 3), 4) * 255).round().astype(np.uint8)
    shift = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.0, 30.0], [0.0, 1.0, 0.0]]])
    same, moved = warp_affine_tensor(as_batch(image), shift, (40, 60), BORDER).permute(0, 2, 3, 1)
    assert np.array_equal(same[:, :30].numpy(), image)
    assert np.array_equal(moved[:, 30:].numpy(), image)
    assert np.all(moved[:, :30].numpy() == np.array(BORDER, np.uint8))


def test_warp_refuses_unsupported_inputs() -> None:
    with pytest.raises(ValueError, match="uint8, float32 or float64"):
        warp_affine_tensor(torch.zeros(1, 3, 4, 4, dtype=torch.int32), np.zeros((1, 2, 3)), (4, 4))
    with pytest.raises(ValueError, match="matrices must be"):
        warp_affine_tensor(torch.zeros(2, 3, 4, 4), np.zeros((3, 2, 3)), (4, 4))
    with pytest.raises(ValueError, match="border_value has 2 values for 3 channels"):
        warp_affine_tensor(torch.zeros(1, 3, 4, 4), np.eye(2, 3)[None], (4, 4), (1.0, 2.0))


# (source h, w) -> cv2.resize's call: INTER_LINEAR by a factor (dsize (0, 0), as the working
# image), INTER_LINEAR to a size (the detector's enlargement) or INTER_AREA to a size (its shrink)
RESIZE_CASES = {
    "factor_enlarge_odd": ((37, 511), ("factor", 512 / 37)),
    "factor_enlarge_tiny": ((7, 9), ("factor", 512 / 7)),
    "factor_enlarge_16_to_1": ((32, 512), ("factor", 16.0)),
    "factor_enlarge_one_pixel_wide": ((3, 1), ("factor", 512.0)),
    "size_enlarge_non_integer": ((513, 700), ("size", (639, 871))),
    "area_shrink_non_integer": ((1921, 1000), ("size", (1229, 640))),
    "area_shrink_remainder": ((1281, 1922), ("size", (640, 960))),
    "area_shrink_by_2": ((256, 384), ("size", (128, 192))),
    "area_shrink_by_4": ((256, 384), ("size", (64, 96))),
    "area_shrink_by_3": ((300, 450), ("size", (100, 150))),
    "area_shrink_16_to_1": ((70, 1120), ("size", (40, 640))),
    "area_shrink_uneven_axes": ((200, 300), ("size", (100, 75))),
    "area_shrink_one_pixel_wide": ((1, 2000), ("size", (1, 77))),
}


@pytest.mark.parametrize("gray", [False, True], ids=["colour", "gray"])
@pytest.mark.parametrize("case", sorted(RESIZE_CASES))
def test_resize_matches_opencv(case: str, gray: bool) -> None:
    (height, width), (kind, target) = RESIZE_CASES[case]
    image = source_image("uint8", height, width, 1 if gray else 3, seed=height + width)
    if gray:
        image = np.repeat(image, 3, axis=2)
    if kind == "factor":
        expected = cv2.resize(image, (0, 0), fx=target, fy=target, interpolation=cv2.INTER_LINEAR)
        got = resize_tensor(as_batch(image)[0], expected.shape[:2], cv2.INTER_LINEAR, (target, target))
    else:
        out_height, out_width = target
        interpolation = cv2.INTER_AREA if out_height < height else cv2.INTER_LINEAR
        expected = cv2.resize(image, (out_width, out_height), interpolation=interpolation)
        got = resize_tensor(as_batch(image)[0], target, interpolation)
    assert_within_bound(got.permute(1, 2, 0).numpy(), expected)


def test_resize_refuses_area_enlargement_and_other_dtypes() -> None:
    with pytest.raises(ValueError, match="INTER_AREA to shrink"):
        resize_tensor(torch.zeros(3, 4, 4, dtype=torch.uint8), (8, 8), cv2.INTER_AREA)
    with pytest.raises(ValueError, match="uint8"):
        resize_tensor(torch.zeros(3, 4, 4), (2, 2), cv2.INTER_AREA)
