"""Detection post-processing (spec §3) and alignment geometry (§4.2-4.4, §6.1).

Three kinds of test: the recipe's pieces against direct transcriptions of the spec; the
post-processing driven by a scripted network whose outputs are chosen by hand (quirks
included); and parity with the official pipeline's golden files under seed-0 weights.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import GOLDEN_PHOTOS
from torch import nn

from codeformer.config import FACE_SIZE
from codeformer.nets.retinaface import RetinaFace
from codeformer.stages.align import (
    FFHQ_TEMPLATE_512,
    AlignedFaces,
    AlignmentError,
    align_faces,
    estimate_affines,
    invert_affines,
    warp_crops,
)
from codeformer.stages.detect import (
    DETECTOR_MEAN_BGR,
    Detections,
    FaceDetector,
    detector_input_size,
    prior_boxes,
)
from codeformer.stages.prepare import to_working_image
from codeformer.tools import random_weights
from codeformer.weights import WEIGHT_FILES, checkpoint_filter_fn

CPU = torch.device("cpu")
logger = logging.getLogger(__name__)


# --- priors ------------------------------------------------------------------------------------


def transcribed_priors(height: int, width: int) -> list[tuple[float, float, float, float]]:
    """§3 step 4 word for word: levels, rows, columns, min sizes; Python floats (float64)."""
    anchors = []
    for step, min_sizes in zip((8, 16, 32), ((16, 32), (64, 128), (256, 512)), strict=True):
        for i in range(math.ceil(height / step)):
            for j in range(math.ceil(width / step)):
                for m in min_sizes:
                    anchors.append(
                        ((j + 0.5) * step / width, (i + 0.5) * step / height, m / width, m / height)
                    )
    return anchors


@pytest.mark.parametrize(("height", "width"), [(481, 641), (640, 1013), (639, 1101), (640, 640), (17, 9)])
def test_prior_count(height: int, width: int) -> None:
    expected = sum(2 * math.ceil(height / s) * math.ceil(width / s) for s in (8, 16, 32))
    assert prior_boxes(height, width).shape == (expected, 4)
    if (height, width) == (481, 641):
        assert expected == 13_096  # the spec's example


@pytest.mark.parametrize(("height", "width"), [(481, 641), (45, 70)])
def test_prior_values_equal_the_transcribed_formula(height: int, width: int) -> None:
    ours = prior_boxes(height, width)
    assert ours.dtype == torch.float32
    expected = torch.tensor(transcribed_priors(height, width), dtype=torch.float64).to(torch.float32)
    assert torch.equal(ours, expected)


def test_priors_are_cached_per_shape_on_the_device() -> None:
    detector = FaceDetector(ScriptedNet({}), CPU)
    first = detector.priors(64, 96)
    assert detector.priors(64, 96) is first
    assert detector.priors(96, 64) is not first
    assert first.device == CPU


# --- detector input ----------------------------------------------------------------------------


@pytest.mark.parametrize("short_side", [581, 606, 616, 623, 638])
def test_truncated_short_side_comes_out_639(short_side: int) -> None:
    scale, new_height, _ = detector_input_size(short_side, 1000)
    assert scale == 640 / short_side
    assert new_height == 639  # spec §3 step 1: int() truncation of h * scale


def test_detector_input_size_truncates_both_sides() -> None:
    scale, new_height, new_width = detector_input_size(1000, 1003)
    assert (new_height, new_width) == (640, int(1003 * 0.64))


# --- post-processing with a scripted network ---------------------------------------------------


class ScriptedNet(nn.Module):
    """Stands in for RetinaFace: chosen anchors get chosen scores and landmark offsets.

    Every other anchor has face probability 0; box offsets are 0, so a box is its prior.
    """

    def __init__(self, faces: dict[int, tuple[float, list[float]]]) -> None:
        super().__init__()
        self.faces = faces
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.inputs.append(x.clone())
        anchors = prior_boxes(x.shape[2], x.shape[3]).shape[0]
        loc = torch.zeros(1, anchors, 4)
        conf = torch.zeros(1, anchors, 2)
        conf[..., 0] = 1.0
        landms = torch.zeros(1, anchors, 10)
        for index, (score, offsets) in self.faces.items():
            conf[0, index] = torch.tensor([1.0 - score, score])
            landms[0, index] = torch.tensor(offsets)
        return loc, conf, landms


# For a 640 x 640 detector input: 80 * 80 * 2 stride-8 anchors come first, then the stride-16 grid.
STRIDE16_START = 80 * 80 * 2


def stride16_anchor(row: int, col: int, size_index: int) -> tuple[int, tuple[float, float], float]:
    """(anchor index, centre in px, prior size in px) of a stride-16 anchor of a 640 x 640 input."""
    index = STRIDE16_START + (row * 40 + col) * 2 + size_index
    return index, ((col + 0.5) * 16, (row + 0.5) * 16), (64.0, 128.0)[size_index]


def offsets_for(points: list[tuple[float, float]], size: float) -> list[float]:
    """Landmark head outputs that decode to ``points`` (relative to the anchor centre, px)."""
    return [coordinate / (0.1 * size) for point in points for coordinate in point]


FRONTAL = [(-20.0, -10.0), (20.0, -10.0), (0.0, 5.0), (-15.0, 20.0), (15.0, 20.0)]
# True eye distance 40, but the official (buggy) measure sqrt((le_y - re_y)^2 + (re_x - nose_x)^2)
# is |20 - 18| = 2 < 5, so the official code drops this face (facexlib would keep it).
BUGGY_SMALL = [(-20.0, 0.0), (20.0, 0.0), (18.0, 5.0), (-15.0, 20.0), (15.0, 20.0)]


def scripted_scene() -> tuple[ScriptedNet, list[dict]]:
    """Five candidate faces; two survive. Returns the net and the expected faces (640 px input)."""
    a_index, a_centre, a_size = stride16_anchor(10, 10, 1)
    b_index, _, b_size = stride16_anchor(10, 11, 1)  # overlaps A with IoU 0.78: suppressed
    c_index, _, c_size = stride16_anchor(30, 30, 1)  # dropped by the buggy eye distance
    d_index, _, d_size = stride16_anchor(30, 5, 0)  # score exactly 0.8: not > 0.8
    e_index, e_centre, e_size = stride16_anchor(5, 30, 0)
    faces = {
        a_index: (0.95, offsets_for(FRONTAL, a_size)),
        b_index: (0.90, offsets_for(FRONTAL, b_size)),
        c_index: (0.85, offsets_for(BUGGY_SMALL, c_size)),
        d_index: (0.80, offsets_for(FRONTAL, d_size)),
        e_index: (0.88, offsets_for([(x / 2, y / 2) for x, y in FRONTAL], e_size)),
    }
    expected = [
        {"centre": a_centre, "size": a_size, "score": 0.95, "points": FRONTAL},
        {"centre": e_centre, "size": e_size, "score": 0.88, "points": [(x / 2, y / 2) for x, y in FRONTAL]},
    ]
    return ScriptedNet(faces), expected


def assert_detections_match(detections: Detections, expected: list[dict], scale: float) -> None:
    """Rows of a 640 x 640 detector input, divided by the nominal ``scale`` (score included)."""
    assert len(detections) == len(expected)
    for face, want in enumerate(expected):
        (cx, cy), size = want["centre"], want["size"]
        box = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]) / scale
        points = np.array([(cx + x, cy + y) for x, y in want["points"]]) / scale
        np.testing.assert_allclose(detections.boxes[face], box, atol=1e-3)
        np.testing.assert_allclose(detections.landmarks[face], points, atol=1e-3)
        np.testing.assert_allclose(detections.scores[face], want["score"] / scale, rtol=1e-6)


def test_postprocessing_threshold_nms_eye_filter_at_scale_1() -> None:
    net, expected = scripted_scene()
    image = np.full((640, 640, 3), (10, 20, 30), dtype=np.uint8)
    detections = FaceDetector(net, CPU).detect(image)
    assert detections.boxes.dtype == detections.scores.dtype == detections.landmarks.dtype == np.float32
    assert detections.boxes.shape == (2, 4)
    assert detections.scores.shape == (2,)
    assert detections.landmarks.shape == (2, 5, 2)
    assert detections.dropped == 0
    assert_detections_match(detections, expected, scale=1.0)


def test_input_is_bgr_minus_mean_without_scaling() -> None:
    net, _ = scripted_scene()
    FaceDetector(net, CPU).detect(np.full((640, 640, 3), (10, 20, 30), dtype=np.uint8))
    (seen,) = net.inputs
    assert seen.shape == (1, 3, 640, 640)
    assert seen.dtype == torch.float32
    for channel, value in enumerate((10, 20, 30)):
        assert bool((seen[0, channel] == value - DETECTOR_MEAN_BGR[channel]).all())


def test_rows_are_divided_by_the_nominal_scale_score_too() -> None:
    # 1280 x 1280 -> detector input 640 x 640 by INTER_AREA; nominal scale 0.5, so every
    # coordinate doubles and so does the score (official quirk, spec §3 step 11)
    net, expected = scripted_scene()
    image = np.random.default_rng(0).integers(0, 256, (1280, 1280, 3), dtype=np.uint8)
    detections = FaceDetector(net, CPU).detect(image)
    assert_detections_match(detections, expected, scale=0.5)
    shrunk = cv2.resize(image, (640, 640), interpolation=cv2.INTER_AREA).astype(np.float32)
    seen = net.inputs[0][0].permute(1, 2, 0).numpy() + np.array(DETECTOR_MEAN_BGR, dtype=np.float32)
    np.testing.assert_array_equal(seen, shrunk)


def test_enlarging_uses_inter_linear_to_the_truncated_size() -> None:
    net = ScriptedNet({})
    image = np.random.default_rng(1).integers(0, 256, (581, 700, 3), dtype=np.uint8)
    detections = FaceDetector(net, CPU).detect(image)
    assert len(detections) == 0
    _, new_height, new_width = detector_input_size(581, 700)
    assert net.inputs[0].shape == (1, 3, new_height, new_width) == (1, 3, 639, int(700 * 640 / 581))
    enlarged = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    seen = net.inputs[0][0].permute(1, 2, 0).numpy() + np.array(DETECTOR_MEAN_BGR, dtype=np.float32)
    np.testing.assert_array_equal(seen, enlarged)


def test_max_faces_keeps_the_highest_scoring(caplog: pytest.LogCaptureFixture) -> None:
    net, expected = scripted_scene()
    image = np.zeros((640, 640, 3), dtype=np.uint8)
    with caplog.at_level(logging.INFO, logger="codeformer.stages.detect"):
        detections = FaceDetector(net, CPU).detect(image, max_faces=1)
    assert detections.dropped == 1
    assert "kept the 1 highest-scoring faces of 2" in caplog.text
    assert_detections_match(detections, expected[:1], scale=1.0)
    assert FaceDetector(net, CPU).detect(image, max_faces=2).dropped == 0


def test_repeated_requests_give_identical_results() -> None:
    net, _ = scripted_scene()
    detector = FaceDetector(net, CPU)
    image = np.zeros((640, 640, 3), dtype=np.uint8)[:, ::-1]  # a flipped view, read-only too
    image.flags.writeable = False
    first, second = detector.detect(image), detector.detect(image)
    assert len(first) == 2
    for name in ("boxes", "scores", "landmarks"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_no_faces_gives_empty_arrays() -> None:
    detections = FaceDetector(ScriptedNet({}), CPU).detect(np.zeros((640, 640, 3), dtype=np.uint8))
    assert len(detections) == 0
    assert detections.boxes.shape == (0, 4)
    assert detections.scores.shape == (0,)
    assert detections.landmarks.shape == (0, 5, 2)
    aligned = align_faces(np.zeros((640, 640, 3), dtype=np.uint8), detections)
    assert aligned.crops.shape == (0, FACE_SIZE, FACE_SIZE, 3)
    assert aligned.crops.dtype == np.uint8
    assert aligned.affines.shape == aligned.inverse_affines.shape == (0, 2, 3)


@pytest.mark.parametrize(
    "image",
    [np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64, 3), np.float32)],
    ids=["gray", "bgra", "float"],
)
def test_rejects_images_that_are_not_uint8_bgr(image: np.ndarray) -> None:
    from codeformer.errors import InternalError

    with pytest.raises(InternalError, match="uint8 BGR"):
        FaceDetector(ScriptedNet({}), CPU).detect(image)


# --- alignment geometry ------------------------------------------------------------------------


def aligned_faces_fields(count: int = 1) -> dict[str, np.ndarray]:
    """Well-formed ``AlignedFaces`` fields for ``count`` faces: grey crops, identity transforms."""
    identity = np.tile(np.eye(2, 3), (count, 1, 1))
    return {
        "crops": np.zeros((count, FACE_SIZE, FACE_SIZE, 3), np.uint8),
        "affines": identity,
        "inverse_affines": identity.copy(),
    }


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("crops", np.zeros((1, 256, 256, 3), np.uint8), "crops"),
        ("crops", np.zeros((512, 512, 3), np.uint8), "crops"),
        ("crops", np.zeros((1, 512, 512, 3), np.float32), "crops"),
        ("affines", np.zeros((1, 3, 3)), "affines"),
        ("inverse_affines", np.zeros((2, 2, 3)), "inverse_affines"),
        ("inverse_affines", np.zeros((1, 2, 3)), "invertible"),
        ("inverse_affines", np.full((1, 2, 3), np.nan), "invertible"),
    ],
)
def test_aligned_faces_reject_malformed_fields_as_internal_errors(
    field: str, value: np.ndarray, match: str
) -> None:
    """Checked once, when built: restore and paste-back take the crops and transforms as they are."""
    from codeformer.errors import InternalError

    with pytest.raises(InternalError, match=match):
        AlignedFaces(**{**aligned_faces_fields(), field: value})
    assert len(AlignedFaces(**aligned_faces_fields(2))) == 2


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[cos, -sin, tx], [sin, cos, ty]], dtype=np.float64)


def as_3x3(affine: np.ndarray) -> np.ndarray:
    return np.vstack([affine, [0.0, 0.0, 1.0]])


def test_inverse_composed_with_affine_is_identity() -> None:
    affines = np.stack([similarity(2.9, 0.1, 39.2, 134.1), similarity(0.37, -1.2, -1664.0, -86.6)])
    inverses = invert_affines(affines)
    assert inverses.shape == (2, 2, 3) and inverses.dtype == np.float64
    for affine, inverse in zip(affines, inverses, strict=True):
        np.testing.assert_allclose(as_3x3(inverse) @ as_3x3(affine), np.eye(3), atol=1e-9)
        np.testing.assert_allclose(as_3x3(affine) @ as_3x3(inverse), np.eye(3), atol=1e-9)


def test_landmarks_on_the_template_recover_a_known_similarity() -> None:
    # crop -> photo: scale 0.8, rotation 0.3 rad, crop centre onto the centre of a 600 x 600
    # photo, so that the whole rotated crop (half-diagonal 0.8 * 362 = 290 px) lies inside it
    linear = similarity(0.8, 0.3, 0.0, 0.0)[:, :2]
    crop_to_image = np.hstack([linear, (np.array([300.0, 300.0]) - linear @ [256.0, 256.0])[:, None]])
    image_to_crop = cv2.invertAffineTransform(crop_to_image)
    # where the template points sit in the photo
    landmarks = (FFHQ_TEMPLATE_512 @ crop_to_image[:, :2].T + crop_to_image[:, 2]).astype(np.float32)
    (affine,) = estimate_affines(landmarks[None])
    assert affine.dtype == np.float64
    # OpenCV fits in float32; the points themselves were rounded to float32
    np.testing.assert_allclose(affine[:, :2], image_to_crop[:, :2], atol=1e-5)
    np.testing.assert_allclose(affine[:, 2], image_to_crop[:, 2], atol=1e-3)

    # a smooth synthetic crop, put into the photo: warping the photo back recovers the crop
    yy, xx = np.mgrid[0:FACE_SIZE, 0:FACE_SIZE].astype(np.float32)
    crop = np.stack(
        [
            127 + 100 * np.sin(xx / 40.0),
            127 + 100 * np.cos(yy / 50.0),
            127 + 100 * np.sin((xx + yy) / 60.0),
        ],
        axis=-1,
    ).astype(np.uint8)
    photo = cv2.warpAffine(crop, crop_to_image, (600, 600), flags=cv2.INTER_LINEAR)
    (recovered,) = warp_crops(photo, affine[None])
    assert recovered.shape == (FACE_SIZE, FACE_SIZE, 3) and recovered.dtype == np.uint8
    inside = np.s_[4:-4, 4:-4]  # the crop's outermost pixels blend with the photo's black border
    difference = np.abs(recovered[inside].astype(int) - crop[inside].astype(int))
    # two bilinear resamplings of a smooth pattern: about 0.04 on average; a transform off by
    # one pixel would give about 0.9
    assert difference.mean() < 0.25
    assert difference.max() <= 2


def test_outside_the_image_is_filled_with_the_border_colour() -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    far_away = similarity(1.0, 0.0, 5000.0, 5000.0)[None]
    (crop,) = warp_crops(image, far_away)
    # the official crop's constant border, BGR (REFERENCE.md: borderValue=(135, 133, 132))
    assert (crop == np.array([135, 133, 132], dtype=np.uint8)).all()


def test_degenerate_landmarks_raise_alignment_error() -> None:
    landmarks = np.zeros((2, 5, 2), dtype=np.float32)
    landmarks[0] = FFHQ_TEMPLATE_512 / 2  # a valid face first: the error names face 1
    with pytest.raises(AlignmentError, match="face 1"):
        estimate_affines(landmarks)


# --- golden parity -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed0_detector() -> FaceDetector:
    net = RetinaFace()
    official = random_weights.file_object("detection_Resnet50_Final.pth", seed=0)
    net.load_state_dict(checkpoint_filter_fn(official, WEIGHT_FILES["retinaface"]), strict=True)
    return FaceDetector(net, CPU)


def read_golden_input(folder: Path) -> np.ndarray:
    name = folder.name
    path = folder / f"{name}.jpg" if (folder / f"{name}.jpg").exists() else folder / f"{name}.png"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


AFFINE_TOLERANCE = 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("photo", GOLDEN_PHOTOS)
def test_golden_parity(seed0_detector: FaceDetector, photo: str) -> None:
    folder = GOLDEN_PHOTOS[photo]
    reference = json.loads((folder / "detections.json").read_text())
    working, _ = to_working_image(read_golden_input(folder))
    assert list(working.shape[:2]) == reference["work_hw"]
    assert list(detector_input_size(*working.shape[:2])[1:]) == reference["detector_input_hw"]

    detections = seed0_detector.detect(working)
    faces = reference["faces"]
    assert len(detections) == reference["num_faces"] == len(faces)
    box_error = np.abs(detections.boxes - np.array([f["bbox"] for f in faces])).max()
    landmark_error = np.abs(detections.landmarks - np.array([f["landmarks_5"] for f in faces])).max()
    score_error = np.abs(detections.scores - np.array([f["score"] for f in faces])).max()
    assert box_error <= 0.01 and landmark_error <= 0.01
    assert score_error <= 1e-5

    aligned: AlignedFaces = align_faces(working, detections)
    affine_error = np.abs(aligned.affines - np.array([f["affine"] for f in faces])).max()
    inverse_error = np.abs(aligned.inverse_affines - np.array([f["inverse_affine"] for f in faces])).max()
    # The official pipeline's own thread-count noise is up to 1e-3 (golden README); on a CPU
    # with other convolution kernels (AVX2 only: photo 01 measured 1.14e-3) the LMEDS fit
    # moves a little more. The crops below, what the affines are for, must still agree.
    assert affine_error <= AFFINE_TOLERANCE
    assert inverse_error <= AFFINE_TOLERANCE

    differing = []
    for index, crop in enumerate(aligned.crops):
        golden_crop = cv2.imread(str(folder / f"crop_{index}.png"), cv2.IMREAD_COLOR)
        difference = np.abs(crop.astype(np.int16) - golden_crop.astype(np.int16))
        assert difference.max() <= 1, f"crop {index}"
        differing.append(float((difference > 0).mean()))

    # the measured figures, for reports: pytest -o log_cli=true -o log_cli_level=INFO
    logger.info(
        "golden %s: max |error| box %.3g px, landmarks %.3g px, score %.3g, affine %.3g, inverse %.3g; "
        "crop pixels differing (<= 1 level) %.4f",
        photo,
        box_error,
        landmark_error,
        score_error,
        affine_error,
        inverse_error,
        max(differing),
    )
