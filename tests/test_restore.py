"""The restore stage: exact tensor conversions, chunked inference, and parity with the golden faces."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import GOLDEN_SUBSET_DIR, all_levels_crops

from codeformer.errors import InternalError
from codeformer.nets.codeformer import CodeFormer
from codeformer.nets.parsenet import PARSE_CLASSES
from codeformer.stages.face_batch import crops_to_tensor
from codeformer.stages.parse import FaceParser
from codeformer.stages.restore import FaceRestorer, RestoredFaces, tensor_to_faces
from codeformer.tools import random_weights

CPU = torch.device("cpu")


def spec_output_to_face(out: np.ndarray) -> np.ndarray:
    """Spec §5.3 in NumPy (tensor2img with min_max (-1, 1), rgb2bgr): one (3, H, W) float32 output."""
    clamped = np.clip(out.astype(np.float32), -1.0, 1.0)
    unit = (clamped - np.float32(-1.0)) / np.float32(1.0 - -1.0)
    bgr = unit.transpose(1, 2, 0)[..., ::-1]
    return (bgr * np.float32(255.0)).round().astype(np.uint8)


def test_tensor_to_faces_is_the_spec_recipe_bit_for_bit() -> None:
    generator = np.random.default_rng(0)
    # every level's exact input value, values on the rounding half-way points, and out-of-range values
    levels = (np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    halfway = (np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(127.5) - np.float32(1.0)
    samples = generator.uniform(-1.3, 1.3, size=2 * 3 * 512 * 512).astype(np.float32)
    samples[: levels.size] = levels
    samples[levels.size : levels.size + halfway.size] = halfway
    out = samples.reshape(2, 3, 512, 512)
    faces = tensor_to_faces(torch.from_numpy(out))
    assert faces.dtype == np.uint8 and faces.shape == (2, 512, 512, 3)
    np.testing.assert_array_equal(faces, np.stack([spec_output_to_face(face) for face in out]))


def test_crop_round_trip_is_exact_for_every_level() -> None:
    crops = all_levels_crops()
    np.testing.assert_array_equal(tensor_to_faces(crops_to_tensor(crops, CPU)), crops)


class RecordingNet:
    """Stands in for CodeFormer: returns its input and records how it was called."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[dict[str, object]] = []

    def __call__(self, x: torch.Tensor, w: float, adain: bool) -> tuple[torch.Tensor, None, None]:
        self.calls.append(
            {
                "batch": x.shape[0],
                "w": w,
                "adain": adain,
                "inference_mode": torch.is_inference_mode_enabled(),
                "autocast": torch.is_autocast_enabled("cpu"),
                "autocast_dtype": torch.get_autocast_dtype("cpu"),
            }
        )
        if self.fail:
            raise RuntimeError("out of memory")
        out = x * 1.0  # in the real net's output dtype under autocast
        return (out.to(torch.bfloat16) if torch.is_autocast_enabled("cpu") else out), None, None


def test_restore_runs_chunks_in_order_under_inference_mode() -> None:
    crops = np.random.default_rng(1).integers(0, 256, size=(5, 512, 512, 3), dtype=np.uint8)
    net = RecordingNet()
    faces = FaceRestorer(net, CPU, batch_size=2).restore(crops, fidelity=0.7)  # type: ignore[arg-type]
    # an identity network gives back every crop, in order, bit for bit
    np.testing.assert_array_equal(faces, crops)
    assert [call["batch"] for call in net.calls] == [2, 2, 1]
    assert all(call["w"] == 0.7 and call["adain"] is True for call in net.calls)
    assert all(call["inference_mode"] and not call["autocast"] for call in net.calls)


def test_restore_mixed_precision_uses_bfloat16_autocast_on_cpu() -> None:
    crops = np.random.default_rng(2).integers(0, 256, size=(1, 512, 512, 3), dtype=np.uint8)
    net = RecordingNet()
    faces = FaceRestorer(net, CPU).restore(crops, fidelity=0.5, mixed_precision=True)  # type: ignore[arg-type]
    assert net.calls[0]["autocast"] and net.calls[0]["autocast_dtype"] == torch.bfloat16
    assert faces.dtype == np.uint8 and faces.shape == crops.shape
    # bf16 keeps 8 bits of mantissa: a level can move by at most a few steps
    assert np.abs(faces.astype(int) - crops).max() <= 2


class OverflowingNet(RecordingNet):
    """RecordingNet whose reduced-precision output is NaN for faces marked by a white top-left pixel.

    Stands for fp16 overflow in CodeFormer's decoder: the same faces in float32 are finite.
    """

    def __call__(self, x: torch.Tensor, w: float, adain: bool) -> tuple[torch.Tensor, None, None]:
        out, _, _ = super().__call__(x, w, adain)
        if torch.is_autocast_enabled("cpu"):
            marked = (x[:, :, 0, 0] == 1.0).all(dim=1)  # (B,): white in [-1, 1]
            out = torch.where(marked[:, None, None, None], torch.nan, out)
        return out, None, None


def test_reduced_precision_faces_with_non_finite_output_are_computed_again_in_float32(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the faces that overflowed, whichever chunks they were in: each face's result is its own."""
    crops = np.random.default_rng(3).integers(0, 255, size=(4, 512, 512, 3), dtype=np.uint8)
    crops[[1, 2], 0, 0] = 255  # one face in each chunk overflows
    net = OverflowingNet()
    restorer = FaceRestorer(net, CPU, batch_size=2)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="codeformer.stages.face_batch"):
        faces = restorer.restore(crops, fidelity=0.5, mixed_precision=True)
    # the two chunks in bfloat16, then the two overflowing faces together in float32
    assert [(call["batch"], call["autocast"]) for call in net.calls] == [(2, True), (2, True), (2, False)]
    float32_faces = FaceRestorer(RecordingNet(), CPU).restore(crops, 0.5)  # type: ignore[arg-type]
    np.testing.assert_array_equal(faces[1:3], float32_faces[1:3])  # recomputed, bit for bit
    for index in (0, 3):  # the finite faces keep their reduced-precision result
        alone = restorer.restore(crops[index : index + 1], 0.5, mixed_precision=True)
        np.testing.assert_array_equal(faces[index : index + 1], alone)
    assert [record.getMessage() for record in caplog.records] == [
        "CodeFormer: 2 faces gave non-finite values in bfloat16; computing them again in float32"
    ]


def test_the_float32_recompute_uses_the_float32_net_when_one_is_given() -> None:
    crops = np.full((1, 512, 512, 3), 255, np.uint8)  # marked: always NaN in reduced precision
    reduced, float32 = OverflowingNet(), RecordingNet()
    restorer = FaceRestorer(reduced, CPU, float32_net=float32)  # type: ignore[arg-type]
    np.testing.assert_array_equal(restorer.restore(crops, 0.5, mixed_precision=True), crops)
    assert [call["autocast"] for call in reduced.calls] == [True]
    assert [call["autocast"] for call in float32.calls] == [False]


class OverflowingParseNet(torch.nn.Module):
    """Logits that make red-ish pixels skin (class 1); NaN everywhere in reduced precision."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits = torch.zeros(x.shape[0], PARSE_CLASSES, *x.shape[2:])
        logits[:, 1] = x[:, 0]  # RGB red in [-1, 1]: skin where it is positive
        if torch.is_autocast_enabled("cpu"):
            logits = torch.full_like(logits, torch.nan)
        return logits, None, None


def test_parse_labels_with_non_finite_logits_are_computed_again_in_float32() -> None:
    faces = np.random.default_rng(4).integers(0, 256, size=(3, 512, 512, 3), dtype=np.uint8)
    parser = FaceParser(OverflowingParseNet(), CPU, batch_size=2)  # type: ignore[arg-type]
    expected = parser.labels(faces, mixed_precision=False)
    assert 0 < expected.mean() < 1
    np.testing.assert_array_equal(parser.labels(faces, mixed_precision=True), expected)


def test_restore_of_no_faces_returns_an_empty_batch_without_running_the_net() -> None:
    net = RecordingNet()
    faces = FaceRestorer(net, CPU).restore(np.empty((0, 512, 512, 3), np.uint8), 0.5)  # type: ignore[arg-type]
    assert faces.shape == (0, 512, 512, 3) and faces.dtype == np.uint8
    assert net.calls == []


def test_restore_propagates_network_errors_instead_of_returning_the_input() -> None:
    crops = np.zeros((1, 512, 512, 3), np.uint8)
    with pytest.raises(RuntimeError, match="out of memory"):
        FaceRestorer(RecordingNet(fail=True), CPU).restore(crops, 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "faces",
    [
        np.zeros((1, 256, 256, 3), np.uint8),
        np.zeros((512, 512, 3), np.uint8),
        np.zeros((1, 512, 512, 3), np.float32),
    ],
    ids=["small", "one_face", "float32"],
)
def test_restored_faces_reject_malformed_faces_as_internal_errors(faces: np.ndarray) -> None:
    """Checked once, when built: the parser and paste-back take the faces as they are."""
    with pytest.raises(InternalError, match="faces"):
        RestoredFaces(faces)


@pytest.mark.parametrize("dtype", [np.uint8, np.float64])  # float64: a gray input's faces
def test_restored_faces_take_colour_and_gray_faces(dtype: type) -> None:
    assert len(RestoredFaces(np.zeros((2, 512, 512, 3), dtype))) == 2


# Golden parity: the official pipeline's restored face 0 of photo 01, under seed-0 random weights.
GOLDEN_01 = GOLDEN_SUBSET_DIR / "01"
RAW_STEP = 4  # the subset keeps every 4th row and column of the raw output (tests/golden/README.md)


@pytest.fixture(scope="module")
def restorer() -> FaceRestorer:
    net = CodeFormer().eval()
    net.load_state_dict(random_weights.state_dict("codeformer.pth", seed=0), strict=True)
    return FaceRestorer(net, CPU)


def golden_crop() -> np.ndarray:
    crop = cv2.imread(str(GOLDEN_01 / "crop_0.png"), cv2.IMREAD_COLOR)
    assert crop is not None and crop.shape == (512, 512, 3)
    return crop[None]


def assert_within_noise_floor(faces: np.ndarray, golden_png: Path) -> None:
    """CodeFormer alone differs from itself by ~4e-5 across thread counts: a level here and there."""
    expected = cv2.imread(str(golden_png), cv2.IMREAD_COLOR)
    difference = np.abs(faces[0].astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 2, f"max difference {difference.max()} levels"
    assert (difference > 0).mean() < 0.005, f"{(difference > 0).mean():.4%} of values differ"


@pytest.mark.parity
def test_golden_face_at_fidelity_half(restorer: FaceRestorer) -> None:
    x = crops_to_tensor(golden_crop(), CPU)
    with torch.inference_mode():
        raw = restorer.net(x, w=0.5, adain=True)[0]
    assert raw.shape == (1, 3, 512, 512)
    expected_raw = np.load(GOLDEN_01 / "restored_0_raw_every4.npy")  # (1, 3, 128, 128) float32
    assert np.abs(raw.numpy()[..., ::RAW_STEP, ::RAW_STEP] - expected_raw).max() < 1e-3
    assert_within_noise_floor(tensor_to_faces(raw), GOLDEN_01 / "restored_0.png")


@pytest.mark.parity
@pytest.mark.parametrize(
    ("fidelity", "golden_name"), [(0.0, "restored_0_w0.png"), (1.0, "restored_0_w1.png")]
)
def test_golden_face_at_fidelity_extremes(restorer: FaceRestorer, fidelity: float, golden_name: str) -> None:
    faces = restorer.restore(golden_crop(), fidelity)
    assert_within_noise_floor(faces, GOLDEN_01 / golden_name)
