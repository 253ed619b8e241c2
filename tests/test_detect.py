"""Detection post-processing (docs/reference.md §3): priors, the detector's input, and the post-processing
driven by a scripted network whose outputs are chosen by hand (quirks included).

Parity with the official detections under seed-0 weights is in ``tests/test_align.py``
(one golden test checks the detections and the crops aligned from them).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from codeformer.config import PROJECT_ROOT
from codeformer.image_sizes import detector_input_size
from codeformer.stages import detect
from codeformer.stages.detect import (
    DETECTOR_MEAN_BGR,
    Detections,
    FaceDetector,
    prior_boxes,
)

CPU = torch.device("cpu")


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
        assert expected == 13_096  # docs/reference.md §2.8's example


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
    # coordinate doubles and so does the score (official quirk, docs/reference.md §3 step 11)
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


def test_max_faces_keeps_the_highest_scoring() -> None:
    net, expected = scripted_scene()
    image = np.zeros((640, 640, 3), dtype=np.uint8)
    detections = FaceDetector(net, CPU).detect(image, max_faces=1)
    assert detections.dropped == 1
    assert_detections_match(detections, expected[:1], scale=1.0)
    assert FaceDetector(net, CPU).detect(image, max_faces=2).dropped == 0


def test_repeated_requests_give_identical_results() -> None:
    net, _ = scripted_scene()
    detector = FaceDetector(net, CPU)
    image = np.zeros((640, 640, 3), dtype=np.uint8)  # views are copied once at Restorer.restore
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


# --- the GPU's detection steps (rows_without_waiting) against the exact ones --------------------
def _both_paths(detector: FaceDetector, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The face rows of ``rows_exact`` and of ``rows_without_waiting`` for the same net outputs."""
    pixels, scale = detector.input_for(image)
    size = (pixels.shape[0], pixels.shape[1])
    with torch.inference_mode():
        heads = detector.net(pixels.permute(2, 0, 1).unsqueeze(0).to(torch.float32) - detector._mean)
        answers = (detector.rows_exact(heads, size, scale), detector.rows_without_waiting(heads, size, scale))
    exact, without_waiting = (rows[rows[:, 15] > 0].numpy() for rows in answers)
    return exact, without_waiting


@pytest.mark.parametrize("max_candidates", [3, 4, 5, 2048], ids=lambda n: f"max{n}")
def test_detection_without_waiting_equals_the_exact_steps(
    max_candidates: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four candidates over the threshold: with room for 3 or 4, the candidates may have run
    out and the exact steps run again; with 5 or more, the fixed-size steps answer alone."""
    monkeypatch.setattr(detect, "MAX_CANDIDATES", max_candidates)
    net, expected = scripted_scene()
    exact, without_waiting = _both_paths(FaceDetector(net, CPU), np.full((640, 640, 3), 40, np.uint8))
    assert len(exact) == len(expected)
    np.testing.assert_array_equal(without_waiting, exact)


@pytest.mark.parametrize("photo", ["tests/golden/01/01.jpg", "data/2.jpg", "data/3.jpg"])
def test_detection_without_waiting_equals_the_exact_steps_on_photos(photo: str, restorer_seed0) -> None:
    detector = FaceDetector(restorer_seed0.runtime.safe_nets.retinaface, CPU)
    image = cv2.imread(str(PROJECT_ROOT / photo))
    exact, without_waiting = _both_paths(detector, image)
    assert len(exact) > 0
    np.testing.assert_array_equal(without_waiting, exact)
