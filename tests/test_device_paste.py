"""Paste-back on torch tensors (``codeformer.stages.device_paste``) against the host stage.

On a GPU a request's paste-back runs on the device; the code is the same on any torch
device, so these tests run it on CPU tensors. Bound (issue 29, ``benchmarks.stage_checks``):
given the same restored faces and parse masks, the output of ``paste_and_resize_tensor``
within 1 level of ``paste_faces`` plus the final INTER_AREA resize on at least 99.99 % of
values, none beyond 2.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import cv2
import numpy as np
import pytest
import torch
from helpers import GOLDEN_PHOTOS, similarity
from test_paste import random_masks, read_case

from benchmarks.stage_checks import level_difference
from codeformer.config import FACE_SIZE
from codeformer.nets.parsenet import ParseNet
from codeformer.pipeline import to_gray_faces
from codeformer.runtime import arrived
from codeformer.stages import device_paste
from codeformer.stages.device_paste import erode_tensor, gaussian_blur_tensor, paste_and_resize_tensor
from codeformer.stages.device_warp import warp_affine_tensor
from codeformer.stages.parse import FaceMasks, FaceParser
from codeformer.stages.paste import paste_faces
from codeformer.stages.prepare import to_working_image
from codeformer.stages.regions import face_region
from codeformer.stages.restore import RestoredFaces

logger = logging.getLogger(__name__)

FACE = FACE_SIZE


@dataclass(frozen=True)
class PasteCase:
    image: np.ndarray  # (H, W, 3) uint8 working image
    faces: np.ndarray  # (F, 512, 512, 3) uint8, float64 when gray
    inverse_affines: np.ndarray  # (F, 2, 3) float64
    masks: np.ndarray | None  # (F, 512, 512) float64 parse masks, or None (no parsing)
    output_hw: tuple[int, int]


def host_paste(case: PasteCase) -> np.ndarray:
    """``Restorer._paste``'s pixel part on the host: ``paste_faces``, then INTER_AREA to the output size."""
    masks = None if case.masks is None else FaceMasks(case.masks)
    pasted = paste_faces(case.image, RestoredFaces(case.faces), case.inverse_affines, masks)
    if pasted.shape[:2] == case.output_hw:
        return pasted
    return cv2.resize(pasted, case.output_hw[::-1], interpolation=cv2.INTER_AREA)


def device_paste_on_cpu(case: PasteCase) -> np.ndarray:
    masks = None if case.masks is None else torch.from_numpy(case.masks)
    image, faces = torch.from_numpy(case.image), torch.from_numpy(case.faces)
    pasted = paste_and_resize_tensor(image, faces, case.inverse_affines, masks, case.output_hw)
    assert pasted.dtype == torch.uint8
    return pasted.numpy()


def assert_within_bound(device_output: np.ndarray, host_output: np.ndarray, label: str) -> dict:
    difference = level_difference(device_output, host_output, 1.0)
    logger.info("%s: %s, values differing %.2e", label, difference, np.mean(device_output != host_output))
    assert difference["within_bound"], (label, difference)
    return difference


# ---------------------------------------------------------------------------------------
# Generated worst cases


def placed(scale: float, angle: float, centre_x: float, centre_y: float) -> np.ndarray:
    """The (2, 3) face -> image similarity that puts the crop's centre at (centre_x, centre_y)."""
    matrix = similarity(scale, angle, 0.0, 0.0)
    matrix[:, 2] = (centre_x, centre_y) - matrix[:, :2] @ (FACE / 2, FACE / 2)
    return matrix


@dataclass(frozen=True)
class Layout:
    """A working image's size, its faces' (scale, angle, centre x, centre y), and the output size."""

    working_hw: tuple[int, int]
    faces: tuple[tuple[float, float, float, float], ...]
    output_hw: tuple[int, int] | None = None  # the input's size when the working image was enlarged
    gray: bool = False


LAYOUTS = {
    "tilted": Layout((420, 520), ((0.45, 0.7, 130, 150), (0.4, -1.3, 360, 260), (0.3, 2.9, 430, 90))),
    # cut by each edge, a corner exactly at the canvas corner, and one beyond the canvas
    "border": Layout(
        (380, 460),
        (
            (0.5, 0.2, 15, 200),
            (0.45, 0.0, 250, -40),
            (0.4, -0.6, 450, 370),
            (0.3, 0.0, 76.8, 76.8),
            (0.4, 0.3, 760, 190),
        ),
    ),
    # a chain of overlaps, and a last face over the first only (its patch kept that long)
    "overlapping": Layout(
        (360, 420), ((0.5, 0.0, 200, 180), (0.5, 0.4, 250, 200), (0.45, -0.4, 220, 240), (0.3, 0.1, 110, 110))
    ),
    # eroded areas under 400 px (w_edge 0: OpenCV's 3x3 erosion) and just over
    "tiny": Layout(
        (160, 220), ((0.02, 0.3, 40, 40), (0.036, 0.0, 110, 60), (0.05, 1.0, 60, 120), (0.1, 0.5, 170, 100))
    ),
    "huge": Layout((640, 600), ((1.3, 0.05, 290, 330),)),  # past every edge of the canvas
    "gray": Layout(
        (380, 460), ((0.5, 0.4, 150, 160), (0.45, -0.2, 300, 220), (0.3, 0.0, 450, 30)), gray=True
    ),
    "wide_16_to_1": Layout(
        (512, 8192), ((0.4, 0.1, 300, 250), (0.45, -0.2, 4100, 20), (0.4, 0.0, 8180, 400))
    ),
    # a small input enlarged to a 512-px short side, and the output shrunk back by 300/512
    "enlarged": Layout((300, 437), ((0.45, 0.2, 180, 250), (0.4, -0.3, 520, 300)), output_hw=(300, 437)),
}


def generated_case(name: str) -> PasteCase:
    """Noise images and faces (neighbouring pixels unrelated: the harshest for the warps)."""
    layout = LAYOUTS[name]
    rng = np.random.default_rng(list(LAYOUTS).index(name))
    image = rng.integers(0, 256, (*layout.working_hw, 3), dtype=np.uint8)
    output_hw = layout.output_hw or layout.working_hw
    if layout.output_hw is not None:
        image, _ = to_working_image(image)  # faces are placed on the enlarged image
    count = len(layout.faces)
    faces = rng.integers(0, 256, (count, FACE, FACE, 3), dtype=np.uint8)
    if layout.gray:
        faces = to_gray_faces(faces)
        faces[-1] = faces[-1] * 1.6 - 60.0  # AdaIN can take a gray face out of [0, 255]: clipped
    inverse_affines = np.stack([placed(*face) for face in layout.faces])
    return PasteCase(image, faces, inverse_affines, random_masks(rng, count), output_hw)


def host_w_edges(case: PasteCase) -> list[int]:
    """The official w_edge of each face, from its 2x2-eroded mask over the whole canvas (§6.3 steps 2-6)."""
    width_height = case.image.shape[1::-1]
    w_edges = []
    for inverse_affine in case.inverse_affines:
        inv_mask = cv2.warpAffine(np.ones((FACE, FACE), np.float32), inverse_affine, width_height)
        w_edges.append(int(np.sum(cv2.erode(inv_mask, np.ones((2, 2), np.uint8))) ** 0.5) // 20)
    return w_edges


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_w_edges_are_the_host_ones_from_one_download(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each face's w_edge equals the official one; all faces' areas come down in one transfer."""
    case = generated_case(name)
    canvas_hw = case.image.shape[:2]
    regions = [face_region(inverse_affine, canvas_hw) for inverse_affine in case.inverse_affines]
    downloads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(
        torch.Tensor, "tolist", lambda tensor: downloads.append(tensor.shape) or tolist(tensor)
    )
    plan, areas = device_paste.plan_paste(torch.from_numpy(case.image), case.inverse_affines)
    assert downloads == [], "the first half reads nothing on the host"
    w_edges = device_paste.edge_widths(plan, arrived(areas))
    assert plan.regions == regions
    assert downloads == [(sum(not region.empty for region in regions),)]
    assert w_edges == host_w_edges(case)


def test_generated_cases_reach_what_they_are_named_for() -> None:
    tiny, huge, border = (host_w_edges(generated_case(name)) for name in ("tiny", "huge", "border"))
    assert tiny[:2] == [0, 0] and max(tiny) >= 1
    assert huge[0] >= 30
    assert border[-1] == 0  # beyond the canvas
    assert generated_case("enlarged").image.shape[:2] == (512, 746)  # 300 x 437 enlarged by 512/300


@pytest.mark.parametrize("use_parse", [True, False], ids=["parse", "no_parse"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_device_paste_is_within_the_bound_of_the_host_paste(name: str, use_parse: bool) -> None:
    case = generated_case(name)
    if not use_parse:
        case = replace(case, masks=None)
    host = host_paste(case)
    on_device = device_paste_on_cpu(case)
    assert on_device.shape == host.shape == (*case.output_hw, 3)
    assert_within_bound(on_device, host, f"{name} parse={use_parse}")
    background = host_paste(
        replace(case, faces=case.faces[:0], inverse_affines=case.inverse_affines[:0], masks=None)
    )
    assert np.mean(host != background) > 0.01  # the faces did land: the comparison is not of backgrounds


def test_device_paste_leaves_its_input_alone_and_repeats_exactly() -> None:
    case = generated_case("overlapping")
    image = torch.from_numpy(case.image.copy())
    faces, masks = torch.from_numpy(case.faces), torch.from_numpy(case.masks)
    first = paste_and_resize_tensor(image, faces, case.inverse_affines, masks, case.output_hw)
    second = paste_and_resize_tensor(image, faces, case.inverse_affines, masks, case.output_hw)
    assert torch.equal(first, second)
    assert np.array_equal(image.numpy(), case.image)
    none = paste_and_resize_tensor(image, faces[:0], case.inverse_affines[:0], None, case.output_hw)
    assert torch.equal(none, image) and none.data_ptr() != image.data_ptr()


def test_warping_a_huge_face_in_bands_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    case = generated_case("huge")
    arguments = (torch.from_numpy(case.image), torch.from_numpy(case.faces), case.inverse_affines)
    whole = paste_and_resize_tensor(*arguments, torch.from_numpy(case.masks), case.output_hw)
    monkeypatch.setattr(device_paste, "WARP_BAND_PIXELS", 7000)  # bands of 11 rows, the last one shorter
    assert torch.equal(
        paste_and_resize_tensor(*arguments, torch.from_numpy(case.masks), case.output_hw), whole
    )


# ---------------------------------------------------------------------------------------
# The mask steps against OpenCV


@pytest.mark.parametrize("size", [0, 2, 3, 4, 10, 33, 64])
def test_erosion_equals_opencv(size: int) -> None:
    """Exact: anchor size // 2, +inf border, 3x3 for an empty kernel, windows wider than the image."""
    rng = np.random.default_rng(size)
    for shape in ((45, 70), (1, 30), (30, 2)):
        mask = np.where(rng.random(shape) < 0.2, 0.0, rng.random(shape)).astype(np.float32)
        expected = cv2.erode(mask, np.ones((size, size), np.uint8))
        assert np.array_equal(erode_tensor(torch.from_numpy(mask), size).numpy(), expected), shape


@pytest.mark.parametrize("w_edge", [0, 1, 2, 3, 5, 9, 40])
def test_soft_mask_blur_is_opencvs(w_edge: int) -> None:
    """Within float32 rounding of cv2.GaussianBlur everywhere, and OpenCV's own value on a plateau of ones.

    A plateau's value (1 ± an ulp for some kernel sizes) is what the blend truncates over a
    whole face. Narrow images reflect a kernel wider than themselves more than once.
    """
    ksize = 2 * w_edge + 1
    rng = np.random.default_rng(w_edge)
    for shape in ((120, 150), (3, 200), (160, 7)):
        mask = np.zeros(shape, np.float32)
        mask[shape[0] // 3 :, 2:] = 1.0
        mask[rng.random(shape) < 0.1] = 0.5
        expected = cv2.GaussianBlur(mask, (ksize, ksize), 0)
        blurred = gaussian_blur_tensor(torch.from_numpy(mask), ksize).numpy()
        np.testing.assert_allclose(blurred, expected, rtol=0, atol=3e-7)
    plateau = np.zeros((4 * ksize + 20, 4 * ksize + 20), np.float32)
    plateau[5:-5, 5:-5] = 1.0
    centre = plateau.shape[0] // 2
    expected = cv2.GaussianBlur(plateau, (ksize, ksize), 0)[centre, centre]
    assert gaussian_blur_tensor(torch.from_numpy(plateau), ksize)[centre, centre].item() == expected


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_warp_into_a_window_is_the_canvas_warp_there(dtype: type) -> None:
    """``origin``: the window's pixels are the whole canvas warp's, bit for bit (float64: fixed point)."""
    rng = np.random.default_rng(7)
    source = torch.from_numpy((rng.random((FACE, FACE, 3)) * 255).astype(dtype)).permute(2, 0, 1)[None]
    matrix = torch.from_numpy(placed(0.43, 0.8, 1500.5, 900.25)[None])
    canvas = warp_affine_tensor(source, matrix, (1200, 1800))
    window = warp_affine_tensor(source, matrix, (300, 400), origin=(1310, 780))
    assert torch.equal(window, canvas[..., 780:1080, 1310:1710])
    assert window.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# Golden photos: their restored faces (the host path's), and parse masks


def assert_golden_within_bound(photo: str, masks: np.ndarray | None) -> None:
    folder = GOLDEN_PHOTOS[photo]
    image, faces, inverse_affines = read_case(folder)
    output_hw = tuple(json.loads((folder / "detections.json").read_text())["input_hw"])
    case = PasteCase(image, faces, inverse_affines, masks, output_hw)
    assert_within_bound(
        device_paste_on_cpu(case), host_paste(case), f"golden {photo} parse={masks is not None}"
    )


@pytest.mark.parametrize("use_parse", [True, False], ids=["parse", "no_parse"])
@pytest.mark.parametrize("photo", list(GOLDEN_PHOTOS))
def test_device_paste_of_golden_photos(photo: str, use_parse: bool) -> None:
    """The photos' faces and affines; parse masks from blobs through the host's mask post-processing."""
    face_count = json.loads((GOLDEN_PHOTOS[photo] / "detections.json").read_text())["num_faces"]
    masks = random_masks(np.random.default_rng(int(photo)), face_count) if use_parse else None
    assert_golden_within_bound(photo, masks)


@pytest.mark.parity  # ParseNet on a photo's two faces
def test_device_paste_of_a_golden_photo_with_parsenet_masks(parse_net: ParseNet) -> None:
    """The masks ``FaceParser`` makes on the seed-0 weights, as the pipeline hands them over."""
    photo = next(iter(GOLDEN_PHOTOS))
    _, faces, _ = read_case(GOLDEN_PHOTOS[photo])
    masks = FaceParser(parse_net, torch.device("cpu")).masks(RestoredFaces(faces)).masks
    assert masks.max() > 0.0  # some face pixels: the blend is not of zero masks
    assert_golden_within_bound(photo, masks)
