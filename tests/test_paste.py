"""Paste-back (docs/reference.md §6): region-local paste_faces against the full-canvas recipe, and
golden parity."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import GOLDEN_PHOTOS, similarity, smooth_noise
from official_recipe import reference_canvas, reference_paste

from codeformer.nets.parsenet import ParseNet
from codeformer.pipeline import to_gray_faces
from codeformer.stages import paste
from codeformer.stages.parse import FaceMasks, FaceParser, face_pixels_to_masks
from codeformer.stages.paste import paste_faces
from codeformer.stages.prepare import to_working_image
from codeformer.stages.regions import Region, face_region
from codeformer.stages.restore import RestoredFaces

logger = logging.getLogger(__name__)

FACE = 512


# ---------------------------------------------------------------------------------------
# Synthetic data


def random_masks(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 512, 512) parse masks from random blobs, through the official post-processing."""
    face_pixels = np.stack([smooth_noise(rng, (FACE, FACE), 6) > 0.45 for _ in range(count)])
    return face_pixels_to_masks(face_pixels)


def paste_arrays(
    image: np.ndarray, faces: np.ndarray, inverse_affines: np.ndarray, parse_masks: np.ndarray | None
) -> np.ndarray:
    """``paste_faces`` on bare arrays, typed as the restore and parse stages hand them over."""
    masks = None if parse_masks is None else FaceMasks(parse_masks)
    return paste_faces(image, RestoredFaces(faces), inverse_affines, masks)


CANVAS_HW = (700, 900)
# (scale, angle, tx, ty): mostly inside, overlapping, cut by each canvas edge, rotated by
# more than 90 degrees, one tiny face (w_edge 0), and one fully outside the canvas
SYNTHETIC_FACES = [
    (0.45, 0.10, 300.0, 150.0),
    (0.62, -0.35, 420.0, 260.0),
    (0.38, 2.00, 80.0, -60.0),
    (0.50, -0.05, 650.0, 480.0),
    (0.30, 3.00, 880.0, 690.0),
    (0.03, 0.70, 120.0, 600.0),
    (0.40, 0.00, 1200.0, 100.0),
]


def synthetic_case(
    seed: int, noise_faces: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*CANVAS_HW, 3), dtype=np.uint8)
    count = len(SYNTHETIC_FACES)
    if noise_faces:  # the harshest case for interpolation: neighbouring pixels unrelated
        faces = rng.integers(0, 256, (count, FACE, FACE, 3), dtype=np.uint8)
    else:
        faces = np.stack(
            [(smooth_noise(rng, (FACE, FACE, 3), 12) * 255).astype(np.uint8) for _ in range(count)]
        )
    jitter = rng.uniform(-0.5, 0.5, (count, 2))
    inverse_affines = np.stack(
        [
            similarity(s, a, tx + dx, ty + dy)
            for (s, a, tx, ty), (dx, dy) in zip(SYNTHETIC_FACES, jitter, strict=True)
        ]
    )
    return image, faces, inverse_affines, random_masks(rng, count)


def compare(ours: np.ndarray, reference: np.ndarray, label: str) -> tuple[int, float]:
    difference = np.abs(ours.astype(np.int32) - reference.astype(np.int32))
    max_difference, fraction = int(difference.max()), float(np.mean(difference > 0))
    logger.info("%s: max difference %d, fraction differing %.2e", label, max_difference, fraction)
    return max_difference, fraction


# ---------------------------------------------------------------------------------------
# Region-local paste equals the full-canvas recipe


def test_synthetic_case_covers_the_careful_points() -> None:
    """The synthetic faces do reach w_edge 0, the canvas edges and the outside of the canvas."""
    _, _, inverse_affines, _ = synthetic_case(0)
    w_edges, clipped = [], []
    for inverse_affine in inverse_affines:
        inv_mask = cv2.warpAffine(np.ones((FACE, FACE), np.float32), inverse_affine, CANVAS_HW[::-1])
        w_edges.append(int(np.sum(cv2.erode(inv_mask, np.ones((2, 2), np.uint8))) ** 0.5) // 20)
        region = face_region(inverse_affine, CANVAS_HW)
        clipped.append(
            region.x0 == 0 or region.y0 == 0 or region.x1 == CANVAS_HW[1] or region.y1 == CANVAS_HW[0]
        )
    assert 0 in w_edges[:-1]  # the tiny face is on the canvas but has w_edge 0
    assert w_edges[-1] == 0 and face_region(inverse_affines[-1], CANVAS_HW).empty
    assert sum(clipped) >= 4
    assert max(w_edges) >= 8
    footprints = [
        cv2.warpAffine(np.ones((FACE, FACE), np.float32), ia, CANVAS_HW[::-1]) > 0 for ia in inverse_affines
    ]
    assert (footprints[0] & footprints[1]).any()  # later faces are blended over earlier ones


@pytest.mark.parametrize("use_parse", [True, False], ids=["parse", "no_parse"])
@pytest.mark.parametrize("gray", [False, True], ids=["colour", "gray"])
@pytest.mark.parametrize("seed", [0, 1])
def test_region_paste_equals_full_canvas(use_parse: bool, gray: bool, seed: int) -> None:
    image, faces, inverse_affines, parse_masks = synthetic_case(seed)
    if gray:
        faces = to_gray_faces(faces)
    masks = parse_masks if use_parse else None
    reference = reference_paste(image, faces, inverse_affines, masks)
    ours = paste_arrays(image, faces, inverse_affines, masks)
    assert ours.dtype == np.uint8 and ours.shape == image.shape
    assert reference.dtype == np.uint8  # no value leaves [0, 255] here
    max_difference, fraction = compare(ours, reference, f"seed {seed} gray={gray} parse={use_parse}")
    # OpenCV's per-pixel warp arithmetic is reproduced, so the two agree bit for bit
    assert max_difference == 0, f"max difference {max_difference}, fraction {fraction:.2e}"


def test_region_paste_smooth_faces_single_and_repeated() -> None:
    """Smooth faces, each face alone and all together; the input image is not modified."""
    image, faces, inverse_affines, parse_masks = synthetic_case(3, noise_faces=False)
    image_before = image.copy()
    for index in range(len(faces)):
        one = slice(index, index + 1)
        reference = reference_paste(image, faces[one], inverse_affines[one], parse_masks[one])
        assert np.array_equal(
            paste_arrays(image, faces[one], inverse_affines[one], parse_masks[one]), reference
        )
    first = paste_arrays(image, faces, inverse_affines, parse_masks)
    second = paste_arrays(image, faces, inverse_affines, parse_masks)
    assert np.array_equal(first, second)  # no state carried between calls
    assert np.array_equal(image, image_before)
    assert not np.array_equal(first, image)


def test_gray_faces_out_of_range_are_clipped_not_wrapped() -> None:
    """AdaIN-recoloured gray faces can leave [0, 255]; our output clips where the official wraps."""
    image, faces, inverse_affines, parse_masks = synthetic_case(4, noise_faces=False)
    gray = to_gray_faces(faces[:2]) * 1.6 - 60.0  # roughly [-60, 350]
    ours = paste_arrays(image, gray, inverse_affines[:2], parse_masks[:2])
    canvas = reference_canvas(image, gray, inverse_affines[:2], parse_masks[:2])
    expected = np.clip(canvas, 0, 255).astype(np.uint8)
    assert canvas.max() > 256 and canvas.min() < 0
    assert np.array_equal(ours, expected)


def test_zero_faces_return_a_copy() -> None:
    image = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = paste_arrays(image, np.zeros((0, FACE, FACE, 3), np.uint8), np.zeros((0, 2, 3)), None)
    assert np.array_equal(out, image) and out is not image and not np.shares_memory(out, image)
    out_parse = paste_arrays(
        image, np.zeros((0, FACE, FACE, 3), np.uint8), np.zeros((0, 2, 3)), np.zeros((0, FACE, FACE))
    )
    assert np.array_equal(out_parse, image)


@pytest.mark.parametrize("side", [20, 40, 60, 100])
def test_edge_width_near_a_step_uses_the_canvas_sum(side: int) -> None:
    """An eroded-mask area right at a w_edge step (400·k²) gives the canvas-layout answer."""
    canvas_hw = (300, 310)
    eroded = np.zeros(canvas_hw, np.float32)
    rng = np.random.default_rng(side)
    eroded[17 : 17 + side, 23 : 23 + side] = 1.0
    # a few fractional pixels nudge the sum around the step by float32 rounding amounts
    eroded[17, 23 : 23 + side] = rng.choice([1.0, 1.0 - 2**-20, 1.0 + 2**-20], size=side).astype(np.float32)
    expected = int(np.sum(eroded) ** 0.5) // 20
    region = Region(10, 12, 10 + side + 20, 12 + side + 20)
    assert paste._edge_width(eroded[region.slices], region, canvas_hw) == expected


# ---------------------------------------------------------------------------------------
# Pasting the unchanged crop back


def soft_mask_and_erosion(
    inverse_affine: np.ndarray, canvas_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The official (soft mask, 2x2-eroded mask) of one face over the whole canvas (§6.3 steps 2–8)."""
    inv_mask = cv2.warpAffine(np.ones((FACE, FACE), np.float32), inverse_affine, canvas_hw[::-1])
    erosion = cv2.erode(inv_mask, np.ones((2, 2), np.uint8))
    w_edge = int(np.sum(erosion) ** 0.5) // 20
    center = cv2.erode(erosion, np.ones((2 * w_edge, 2 * w_edge), np.uint8))
    return cv2.GaussianBlur(center, (2 * w_edge + 1, 2 * w_edge + 1), 0), erosion


def test_pasting_the_unchanged_crop_changes_little() -> None:
    """Crop faces out of a smooth image with the forward affine and paste them straight back.

    The image is smooth (gradient under 3 levels/px, curvature negligible), so bilinear
    resampling reproduces it up to the 1/32-px coordinate rounding (≤ 1/64 px x gradient,
    under 0.05 level) plus the uint8 rounding of each warp (0.5 level each; the crop's
    error passes through the second warp's convex weights): the warped-back face r differs
    from the image I by less than 1.1, and both are integers, so by at most 1. Where the
    2x2-eroded mask is 1, the blend m·r + (1 − m)·I lies between them and the final cast
    truncates toward the one below: at most 1 level. On the 1-px rim where the eroded mask
    e is below 1, the premultiplied face (docs/reference.md §9 item 10) also pulls the value down by
    m·(1 − e)·r, under 1 level for faces this size (checked), so at most 2 levels there.
    Outside every face region nothing changes.
    """
    rng = np.random.default_rng(9)
    image = (smooth_noise(rng, (600, 800, 3), 5) * 200 + 20).astype(np.uint8)  # gradient < 3 levels/px
    inverse_affines = np.stack([similarity(0.42, 0.15, 150.0, 90.0), similarity(0.5, -0.3, 450.0, 200.0)])
    crops = np.stack(
        [
            cv2.warpAffine(image, cv2.invertAffineTransform(ia), (FACE, FACE), borderValue=(135, 133, 132))
            for ia in inverse_affines
        ]
    )
    canvas_hw = image.shape[:2]
    rim = np.zeros(canvas_hw, bool)
    untouched = np.ones(canvas_hw, bool)
    for ia in inverse_affines:
        soft, erosion = soft_mask_and_erosion(ia, canvas_hw)
        face_rim = (erosion > 0) & (erosion < 1)
        assert face_rim.any() and np.max(soft * (1 - erosion) * 255) < 1.0
        rim |= face_rim
        untouched[face_region(ia, canvas_hw).slices] = False
    full_masks = face_pixels_to_masks(np.ones((2, FACE, FACE), bool))
    for masks in (None, full_masks):
        out = paste_arrays(image, crops, inverse_affines, masks)
        difference = np.abs(out.astype(int) - image).max(axis=2)
        logger.info("unchanged crop: max %d, fraction %.2e", difference.max(), np.mean(difference > 0))
        assert difference[~rim].max() <= 1
        assert difference[rim].max() <= 2
        assert not difference[untouched].any()
        assert difference.any()  # the faces did go through the warps


# ---------------------------------------------------------------------------------------
# Golden parity


def read_case(folder: Path, suffix: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(working image, restored faces, inverse affines) of one golden photo."""
    detections = json.loads((folder / "detections.json").read_text())
    decoded = cv2.imread(str(folder / detections["image"]), cv2.IMREAD_COLOR)
    image, _ = to_working_image(decoded)
    assert list(image.shape[:2]) == detections["work_hw"]
    faces = np.stack(
        [cv2.imread(str(folder / f"restored_{i}{suffix}.png")) for i in range(detections["num_faces"])]
    )
    inverse_affines = np.array([face["inverse_affine"] for face in detections["faces"]], dtype=np.float64)
    return image, faces, inverse_affines


GOLDEN_CASES = [(photo, "", "output.png", True) for photo in GOLDEN_PHOTOS] + [
    ("01", "", "output_noparse.png", False),
    ("01", "_w0", "output_w0.png", True),
    ("01", "_w1", "output_w1.png", True),
]


@pytest.mark.parity
@pytest.mark.parametrize(
    ("photo", "suffix", "expected_name", "use_parse"),
    GOLDEN_CASES,
    ids=[f"{c[0]}-{c[2]}" for c in GOLDEN_CASES],
)
def test_golden_paste_parity(
    parse_net: ParseNet, photo: str, suffix: str, expected_name: str, use_parse: bool
) -> None:
    folder = GOLDEN_PHOTOS[photo]
    image, faces, inverse_affines = read_case(folder, suffix)
    restored = RestoredFaces(faces)
    masks = FaceParser(parse_net, torch.device("cpu")).masks(restored) if use_parse else None
    ours = paste_faces(image, restored, inverse_affines, masks)
    expected = cv2.imread(str(folder / expected_name), cv2.IMREAD_UNCHANGED)
    assert ours.shape == expected.shape and expected.dtype == np.uint8
    difference = np.abs(ours.astype(np.int32) - expected)
    within_one = float(np.mean(difference <= 1))
    logger.info(
        "golden %s/%s: max %d, within 1 level %.5f, identical %.5f",
        photo,
        expected_name,
        difference.max(),
        within_one,
        np.mean(difference == 0),
    )
    assert within_one >= 0.999
    assert difference.max() <= 3
