"""OpenCV's pixel operations in torch (``codeformer.stages.device_warp``) against OpenCV itself.

On a GPU the request's pixel stages run on the device; the code is the same on any torch
device, so these tests run it on CPU tensors. Bound (issue 29, ``benchmarks.stage_checks``):
within 1 level of the host stage on at least 99.99 % of values, none beyond 2.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from fake_cuda import CUDA, DeviceLog, fake_cuda_mode, to_fake_cuda
from helpers import GOLDEN_PHOTOS, face_photo, golden_photo, noise, similarity, smooth_noise

from benchmarks.stage_checks import level_difference
from codeformer.config import FACE_SIZE
from codeformer.nets.retinaface import RetinaFace
from codeformer.stages import detect
from codeformer.stages.align import estimate_affines, warp_crops
from codeformer.stages.detect import FaceDetector, resize_for_detector
from codeformer.stages.device_warp import (
    detector_input_tensor,
    gray_sums_tensor,
    resize_tensor,
    warp_affine_tensor,
    warp_crops_tensor,
    working_image_tensor,
)
from codeformer.stages.prepare import (
    is_gray,
    is_gray_from_sums,
    to_working_image,
)
from codeformer.tools import random_weights
from codeformer.weights import WEIGHT_FILES, checkpoint_filter_fn

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
    """A 200 x 328 output: 328 columns leave a remainder after OpenCV's SIMD lanes."""
    rng = np.random.default_rng(len(case))
    height, width = 301, 457
    image = source_image(dtype, height, width, 3, seed=3)
    affine = cv2.invertAffineTransform(WARP_CASES[case](rng, height, width))
    expected = cv2.warpAffine(image, affine, (328, 200), flags=cv2.INTER_LINEAR, borderValue=BORDER)
    warped = warp_affine_tensor(as_batch(image), torch.from_numpy(affine[None]), (200, 328), BORDER)
    assert_within_bound(as_images(warped)[0], expected)


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


# -- the stages: working image, detector input, crops ------------------------------------------


def gray(image: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[..., None], 3, axis=2)


def portrait(width: int, height: int) -> np.ndarray:
    """``face_photo`` as a BGR array, as decoding gives it."""
    return np.ascontiguousarray(face_photo(width, height)[..., ::-1])


# uint8 BGR images of the sizes and kinds the stages meet: each takes another resize path
GENERATED_PHOTOS = {
    "tiny_enlarged": lambda: portrait(45, 61),  # factor 11.4 to the working image
    "shrunk_non_integer": lambda: portrait(1100, 1000),  # INTER_AREA 1000 -> 640
    "shrunk_by_2": lambda: noise(1280, 1920),  # OpenCV's block-sum INTER_AREA
    "odd_remainder": lambda: noise(641, 1283),  # 1283 -> 1281: a one-pixel remainder
    "enlarged_for_detector": lambda: noise(533, 701),  # INTER_LINEAR to a 640 short side
    "gray": lambda: gray(portrait(300, 400)),
    "sixteen_to_one": lambda: noise(40, 640),  # working 512 x 8192, detector 640 x 10240
}
STAGE_PHOTOS = [f"golden_{name}" for name in GOLDEN_PHOTOS] + sorted(GENERATED_PHOTOS)


def stage_photo(case: str) -> np.ndarray:
    if case.startswith("golden_"):
        return golden_photo(case.removeprefix("golden_"))
    return GENERATED_PHOTOS[case]()


@pytest.mark.parametrize("case", STAGE_PHOTOS)
def test_working_image_and_detector_input_match_the_host_stages(case: str) -> None:
    photo = stage_photo(case)
    working, factor = to_working_image(photo)
    working_on_device, device_factor = working_image_tensor(torch.from_numpy(photo))
    assert device_factor == factor
    assert_within_bound(working_on_device.numpy(), working)

    detector_input, scale = resize_for_detector(working)
    detector_input_on_device, device_scale = detector_input_tensor(working_on_device)
    assert device_scale == scale
    assert_within_bound(detector_input_on_device.numpy(), detector_input)


@pytest.mark.parametrize("photo", sorted(GOLDEN_PHOTOS))
def test_crops_of_the_golden_faces_match_warp_crops(photo: str) -> None:
    faces = json.loads((GOLDEN_PHOTOS[photo] / "detections.json").read_text())["faces"]
    affines = np.array([face["affine"] for face in faces], dtype=np.float64)
    image = golden_photo(photo)
    crops = warp_crops(to_working_image(image)[0], affines)
    crops_on_device = warp_crops_tensor(working_image_tensor(torch.from_numpy(image))[0], affines)
    assert crops_on_device.shape == (len(faces), FACE_SIZE, FACE_SIZE, 3)
    assert_within_bound(crops_on_device.numpy(), crops)


@pytest.mark.parametrize("case", sorted(WARP_CASES))
def test_crops_of_generated_faces_match_warp_crops(case: str) -> None:
    """Tilted faces, faces at or past the border, tiny (0.05) and huge (8x) faces, on a 16:1 image too."""
    rng = np.random.default_rng(len(case))
    for image in (noise(301, 457), gray(noise(37, 592))):
        height, width = image.shape[:2]
        affines = np.stack(
            [cv2.invertAffineTransform(WARP_CASES[case](rng, height, width)) for _ in range(2)]
        )
        crops = warp_crops_tensor(torch.from_numpy(image), affines)
        assert_within_bound(crops.numpy(), warp_crops(image, affines))


def test_no_faces_give_no_crops() -> None:
    crops = warp_crops_tensor(torch.from_numpy(noise(20, 30)), np.zeros((0, 2, 3)))
    assert crops.shape == (0, FACE_SIZE, FACE_SIZE, 3) and crops.dtype == torch.uint8


@pytest.fixture(scope="module")
def seed0_detector() -> FaceDetector:
    net = RetinaFace()
    official = random_weights.file_object("detection_Resnet50_Final.pth", seed=0)
    net.load_state_dict(checkpoint_filter_fn(official, WEIGHT_FILES["retinaface"]), strict=True)
    return FaceDetector(net, torch.device("cpu"))


@pytest.mark.nets
@pytest.mark.parametrize("case", ["golden_01", "shrunk_non_integer"])
def test_landmarks_from_the_device_input_match_the_host_path(case: str, seed0_detector: FaceDetector) -> None:
    """The seed-0 detector on the device stages' input finds the host path's faces, landmarks within 0.05 px;
    the crops cut at them match."""
    photo = stage_photo(case)
    working, _ = to_working_image(photo)
    detections = seed0_detector.detect(working)
    working_on_device, _ = working_image_tensor(torch.from_numpy(photo))
    rows = seed0_detector.detect_rows(*detector_input_tensor(working_on_device))
    device_detections = seed0_detector.detections(rows)
    assert len(detections) > 0
    assert device_detections.landmarks.shape == detections.landmarks.shape
    assert np.abs(device_detections.landmarks - detections.landmarks).max() <= 0.05
    affines = estimate_affines(device_detections.landmarks)
    assert_within_bound(warp_crops_tensor(working_on_device, affines).numpy(), warp_crops(working, affines))


# -- on CUDA: what crosses between host and device ----------------------------------------------


@pytest.mark.filterwarnings("ignore:`create_unbacked_symint` is deprecated:FutureWarning")
def test_on_cuda_the_stages_copy_only_the_affines_and_the_detector_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fake CUDA tensors: working image, detector input and crops from an image already on the
    device upload the (F, 2, 3) affines only (pinned), and wait for nothing; the detector takes
    its input as it is and downloads its rows. Every anchor a candidate: a fake tensor has no
    value for the host to read whether the candidates ran out."""
    monkeypatch.setattr(detect, "MAX_CANDIDATES", 10**7)
    mode = fake_cuda_mode()
    net = to_fake_cuda(RetinaFace().eval(), mode)
    with mode:
        detector = FaceDetector(net, CUDA)
    affines = np.stack([similarity(0.5, 0.2, 10.0, 20.0)] * 3)
    for height, width in [(300, 400), (1100, 1500)]:  # enlarged, then shrunk for the detector
        with mode, DeviceLog() as log:
            image = torch.empty((height, width, 3), dtype=torch.uint8, device=CUDA)
            working, _ = working_image_tensor(image)
            detector_input, scale = detector_input_tensor(working)
            crops = warp_crops_tensor(working, affines)
        assert (crops.device, crops.shape) == (CUDA, (3, FACE_SIZE, FACE_SIZE, 3))
        assert detector_input.device == CUDA
        assert log.uploads == log.pinned_uploads and len(log.uploads) == 1, log.uploads
        assert (log.downloads, log.waits, log.inexact_divisions) == ([], [], [])
        with mode, DeviceLog() as log:
            rows = detector.detect_rows(detector_input, scale)
        assert rows.device.type == "cpu"
        assert (log.uploads, len(log.downloads)) == ([], 1)


def near_gray(height: int, width: int, spread: int, seed: int) -> np.ndarray:
    """A gray picture with each channel moved by up to ``spread`` levels: spreads 3 to 6 score around
    the threshold of 10, on either side."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 1))
    return np.clip(base + rng.integers(-spread, spread + 1, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(near_gray(37, 53, spread, seed), id=f"spread{spread}-seed{seed}")
        for spread in (0, 2, 3, 4, 5, 6, 40)
        for seed in range(4)
    ]
    + [
        pytest.param(near_gray(1, 1, 3, 0), id="one-pixel"),
        pytest.param(near_gray(8, 128, 4, 1), id="16-to-1"),
        pytest.param(np.zeros((5, 7, 3), np.uint8), id="black"),
        pytest.param(noise(40, 30, 3), id="colour-noise"),
    ],
)
def test_the_gray_test_from_device_sums_decides_as_the_host(image: np.ndarray) -> None:
    """``gray_sums_tensor``'s six integer sums, downloaded, give ``is_gray``'s answer."""
    sums = gray_sums_tensor(torch.from_numpy(image))
    assert sums.dtype == torch.int64 and sums.shape == (6,)
    assert is_gray_from_sums(sums.tolist(), image) == is_gray(image)
