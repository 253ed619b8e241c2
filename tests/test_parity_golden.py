"""End-to-end parity with the official pipeline: same weights, same photos, same output.

The golden folders hold the official pipeline's outputs under the seed-0 random weights:
two photos in tests/golden, all seven where shared/ is beside the project (the READMEs there
describe each file). The official output keeps the enlarged
working size for small photos; ours is resized back to the input size with INTER_AREA, so
the official output is resized the same way before comparing (issue: parity targets).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import GOLDEN_PHOTOS

from codeformer.config import RequestOptions
from codeformer.image_sizes import WORKING_MIN_SIDE
from codeformer.imageio import decode_image

pytestmark = pytest.mark.parity  # the whole pipeline at full size, per photo

MAX_PIXELS = 40_000_000


def _input_of(folder: Path) -> Path:
    return next(p for p in folder.iterdir() if p.stem == folder.name and p.suffix in (".jpg", ".png"))


def _official_at_input_size(official: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    if official.shape[:2] == tuple(input_hw):
        return official
    return cv2.resize(official, (input_hw[1], input_hw[0]), interpolation=cv2.INTER_AREA)


# On a CPU with AVX-512 (where the targets were set and met on all photos) at least 99.9 %
# of values within 1 grey level and none more than 3 away. With AVX2 kernels only, the
# detector's landmarks move 6e-5 px (test_detect_align), a few crop pixels by 1 level, and
# the random-weight CodeFormer flips codes on them (it restores the golden crops themselves
# within 1 level): measured on an AVX2-only AMD EPYC, photo 02 has 18 values up to 10 levels
# off, photo 06 97.57 % within 1 level, 1.03 % beyond 3, max 50 (the code before the input
# work of issue #11 gave the same figures). A shifted face, a wrong mask or a colour cast
# moves far more than that.
AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
MIN_WITHIN_ONE, MAX_OVER_THREE = (0.999, 0.0) if AVX512 else (0.97, 0.015)


def assert_close_to_official(ours: np.ndarray, official: np.ndarray, what: str) -> None:
    assert ours.shape == official.shape, f"{what}: shape {ours.shape} != {official.shape}"
    diff = np.abs(ours.astype(np.int16) - official.astype(np.int16))
    within_one = float((diff <= 1).mean())
    over_three = float((diff > 3).mean())
    figures = f"{within_one:.5%} within 1 level, {over_three:.5%} beyond 3, max {diff.max()}"
    assert within_one >= MIN_WITHIN_ONE, f"{what}: {figures}"
    assert over_three <= MAX_OVER_THREE, f"{what}: {figures}"


@pytest.fixture(scope="module")
def golden_inputs() -> dict[str, tuple[np.ndarray, dict]]:
    cases = {}
    for photo, folder in GOLDEN_PHOTOS.items():
        path = _input_of(folder)
        image = decode_image(path.read_bytes(), path.name, MAX_PIXELS)
        cases[photo] = (image, json.loads((folder / "detections.json").read_text()))
    return cases


@pytest.mark.parametrize("photo", GOLDEN_PHOTOS)
def test_baseline_matches_the_official_output(photo, restorer_seed0, golden_inputs) -> None:
    image, meta = golden_inputs[photo]
    [result] = restorer_seed0.restore([image], RequestOptions.parse(fidelity=0.5, profile="baseline"))
    assert list(result.working_size) == meta["work_hw"]
    assert len(result.faces) == meta["num_faces"]
    # the enlargement factor of docs/reference.md §4.1 (512 / short side), not the ratio of the rounded sizes
    factor = WORKING_MIN_SIDE / min(meta["input_hw"]) if meta["work_hw"] != meta["input_hw"] else 1.0
    for face, official in zip(result.faces, meta["faces"], strict=True):
        # ours are in input pixels; the official ones in working-image pixels
        np.testing.assert_allclose(np.asarray(face.landmarks) * factor, official["landmarks_5"], atol=0.02)
        np.testing.assert_allclose(np.asarray(face.box) * factor, official["bbox"], atol=0.05)
    official = cv2.imread(str(GOLDEN_PHOTOS[photo] / "output.png"), cv2.IMREAD_COLOR)
    assert_close_to_official(result.image, _official_at_input_size(official, meta["input_hw"]), photo)


@pytest.mark.parametrize(
    ("fidelity", "profile", "golden_file"),
    [(0.0, "baseline", "output_w0.png"), (1.0, "baseline", "output_w1.png")],
)
def test_fidelity_extremes_match_the_official_output(
    fidelity, profile, golden_file, restorer_seed0, golden_inputs
) -> None:
    image, meta = golden_inputs["01"]
    [result] = restorer_seed0.restore([image], RequestOptions.parse(fidelity=fidelity, profile=profile))
    official = cv2.imread(str(GOLDEN_PHOTOS["01"] / golden_file), cv2.IMREAD_COLOR)
    assert_close_to_official(result.image, _official_at_input_size(official, meta["input_hw"]), golden_file)
