"""The parse masks computed with torch (``face_pixels_to_masks_tensor``) against the host stage.

On the device pixel path (``codeformer.pipeline.pixels_on_device``) the fast profile computes its
blend masks on the device; the code is the same on any torch device, so these tests run it on
CPU tensors. Bound (issue 29,
``benchmarks.stage_checks``): given the same ParseNet labels, the device masks within 1
level (on the blend's 0-255 scale) of the host path's on at least 99.99 % of values, none
beyond 2.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from helpers import GOLDEN_PHOTOS, smooth_noise

from benchmarks.stage_checks import level_difference
from codeformer.config import FACE_SIZE
from codeformer.nets.parsenet import ParseNet
from codeformer.pipeline import to_gray_faces
from codeformer.stages.parse import (
    PARSE_MASK_OPERATOR,
    FaceParser,
    face_pixels_to_masks,
    face_pixels_to_masks_tensor,
    reflect_101_filter_matrix,
)
from codeformer.stages.restore import RestoredFaces

FACE = FACE_SIZE


def assert_within_bound(device_masks: np.ndarray, host_masks: np.ndarray) -> None:
    assert device_masks.dtype == np.float64
    difference = level_difference(device_masks, host_masks, 255.0)  # the masks' levels in the blend
    assert difference["within_bound"], difference
    assert device_masks.min() >= 0.0 and device_masks.max() <= 1.0


def generated_face_pixels() -> dict[str, np.ndarray]:
    """(512, 512) bool face-class maps the photos rarely give: the border, tiny and whole regions."""
    rng = np.random.default_rng(29)
    cases = {
        "none": np.zeros((FACE, FACE), bool),
        "whole_crop": np.ones((FACE, FACE), bool),
        "one_pixel": np.zeros((FACE, FACE), bool),
        "tiny_in_corner": np.zeros((FACE, FACE), bool),
        "touching_every_border": np.zeros((FACE, FACE), bool),
        "face_blob": smooth_noise(rng, (FACE, FACE), 6) > 0.5,
        "salt_and_pepper": rng.random((FACE, FACE)) < 0.5,
    }
    cases["one_pixel"][256, 256] = True
    cases["tiny_in_corner"][:3, -2:] = True
    frame = cases["touching_every_border"]
    frame[:40], frame[-3:], frame[:, :1], frame[:, -60:] = True, True, True, True
    return cases


GENERATED = generated_face_pixels()


def device_masks_on_cpu(face_pixels: np.ndarray) -> np.ndarray:
    operator = torch.tensor(PARSE_MASK_OPERATOR)
    return face_pixels_to_masks_tensor(torch.from_numpy(face_pixels), operator).numpy()


@pytest.mark.parametrize("name", list(GENERATED))
def test_device_masks_are_within_a_level_of_the_host_stage(name: str) -> None:
    face_pixels = GENERATED[name][None]
    assert_within_bound(device_masks_on_cpu(face_pixels), face_pixels_to_masks(face_pixels))


def test_device_masks_of_several_faces_are_each_faces_own() -> None:
    """A batch of faces gives each face the mask it gets alone (no mixing across the batch axis)."""
    face_pixels = np.stack([GENERATED["face_blob"], GENERATED["tiny_in_corner"], GENERATED["none"]])
    together = device_masks_on_cpu(face_pixels)
    for index, one in enumerate(face_pixels):
        np.testing.assert_array_equal(together[index], device_masks_on_cpu(one[None])[0])
    assert_within_bound(together, face_pixels_to_masks(face_pixels))


@pytest.mark.parametrize(("size", "ksize"), [(512, 101), (16, 31), (7, 11)])
def test_filter_matrix_reflects_the_border_as_opencv_does(size: int, ksize: int) -> None:
    """One Gaussian blur along one axis, against OpenCV's with BORDER_REFLECT_101; radius up to size - 2."""
    kernel = cv2.getGaussianKernel(ksize, ksize / 5, cv2.CV_64F)[:, 0]
    column = np.random.default_rng(size).random((size, 3))
    expected = cv2.sepFilter2D(column, cv2.CV_64F, np.ones(1), kernel, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(reflect_101_filter_matrix(size, kernel) @ column, expected, rtol=0, atol=1e-12)


def test_filter_matrix_refuses_a_kernel_wider_than_the_reflection() -> None:
    with pytest.raises(ValueError, match="11-tap kernel needs at least 6 pixels"):
        reflect_101_filter_matrix(5, np.ones(11) / 11)


@pytest.mark.parity  # ParseNet on two full-size faces
def test_parser_device_masks_match_its_host_masks_on_golden_and_gray_faces(parse_net: ParseNet) -> None:
    """``FaceParser.masks`` (host) against ``masks_tensor`` (the device path's code), on a golden
    photo's restored face and its gray version."""
    folder = next(iter(GOLDEN_PHOTOS.values()))
    face = cv2.imread(str(folder / "restored_0.png"), cv2.IMREAD_COLOR)
    parser = FaceParser(parse_net, torch.device("cpu"), batch_size=2)
    for faces in (face[None], to_gray_faces(face[None])):  # uint8, then float64 gray
        restored = RestoredFaces(faces)
        host = parser.masks(restored).masks
        on_device = parser.masks_tensor(torch.from_numpy(faces), False).numpy()
        assert_within_bound(on_device, host)
        assert host.max() > 0.0  # the labels held some face: the comparison is not of zeros


def test_level_difference_holds_the_stage_bound() -> None:
    """The measure itself: 0.01 % of values 1 level off pass; 2 levels everywhere, or any 3, do not."""
    host = np.zeros((100, 100))
    one_off = host.copy()
    one_off[0, 0] = 1.0
    assert level_difference(one_off, host, 1.0) == {
        "max_levels": 1.0,
        "within_one_level": 1.0,
        "within_bound": True,
    }
    assert not level_difference(host + 2.0, host, 1.0)["within_bound"]  # 0 % within one level
    three_off = host.copy()
    three_off[5, 5] = 3.0 / 255.0
    assert not level_difference(three_off, host, 255.0)["within_bound"]
    with pytest.raises(ValueError, match="differ"):
        level_difference(host[:1], host, 1.0)
