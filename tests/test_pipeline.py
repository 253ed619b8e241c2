"""The composed pipeline through ``Restorer``: sizes, zero faces, the face cap, batching, profiles.

Random weights find faces wherever the detector's shaped head fires; a flat canvas gives
none, textured noise gives two. The face cap (max_faces=1) keeps these tests to one
CodeFormer forward per image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import noise

from codeformer.config import RequestOptions, Settings
from codeformer.errors import ConfigError, ImageFailedError, InputError
from codeformer.pipeline import Restorer
from codeformer.runtime import cpu_has_bf16_kernels

pytestmark = pytest.mark.nets  # every test runs the full-size networks (restorer_seed0)

MAX_SPEED = RequestOptions.parse(profile="max_speed")


@pytest.fixture(scope="module")
def one_face(restorer_seed0: Restorer) -> Restorer:
    """The same nets, capped at one face per image."""
    settings = Settings.from_env(max_faces=1, face_batch=4)
    return Restorer(restorer_seed0.runtime.safe_nets, restorer_seed0.device, settings)


@pytest.mark.parametrize("shape", [(300, 200), (512, 512), (700, 530)])
def test_zero_faces_return_the_input_unchanged(restorer_seed0: Restorer, shape: tuple[int, int]) -> None:
    canvas = np.full((*shape, 3), 127, np.uint8)
    [result] = restorer_seed0.restore([canvas])
    assert result.faces == [] and result.faces_dropped == 0
    np.testing.assert_array_equal(result.image, canvas)
    assert result.image is not canvas


def test_cap_keeps_the_best_face_and_output_keeps_the_input_size(one_face: Restorer) -> None:
    image = noise(300, 400)  # small: processed at 512 x 683, returned at 300 x 400
    [result] = one_face.restore([image], MAX_SPEED)
    assert result.working_size == (512, 683)
    assert result.image.shape == image.shape and result.image.dtype == np.uint8
    assert len(result.faces) == 1 and result.faces_dropped == 1
    assert not np.array_equal(result.image, image)
    face = result.faces[0]
    assert 0.8 < face.score <= 1.0  # a probability again, not the official score / scale
    assert face.landmarks.shape == (5, 2)
    assert set(result.timings) >= {"prepare", "detect", "align", "restore", "paste", "resize"}


def test_same_request_twice_gives_identical_bytes(one_face: Restorer) -> None:
    image = noise(300, 400, seed=1)
    options = RequestOptions.parse(fidelity=0.7, profile="max_speed")
    first = one_face.restore([image], options)[0].image
    second = one_face.restore([image], options)[0].image
    np.testing.assert_array_equal(first, second)


def test_images_restored_together_equal_images_restored_alone(one_face: Restorer) -> None:
    images = [noise(300, 400, seed=2), noise(520, 610, seed=3)]
    together = one_face.restore(images)
    alone = [one_face.restore([image])[0] for image in images]
    for joint, single in zip(together, alone, strict=True):
        assert len(joint.faces) == len(single.faces) == 1
        diff = np.abs(joint.image.astype(int) - single.image.astype(int))
        # batch 2 vs batch 1 changes float summation order only
        assert diff.max() <= 2 and (diff <= 1).mean() >= 0.999


def test_gray_photo_stays_gray(one_face: Restorer) -> None:
    gray = noise(300, 400, seed=4)[..., :1].repeat(3, axis=2)
    [result] = one_face.restore([gray], MAX_SPEED)
    assert len(result.faces) == 1
    np.testing.assert_array_equal(result.image[..., 0], result.image[..., 1])
    np.testing.assert_array_equal(result.image[..., 1], result.image[..., 2])


def test_profiles_share_geometry(one_face: Restorer) -> None:
    image = noise(300, 400, seed=5)
    results = {
        p: one_face.restore([image], RequestOptions.parse(profile=p))[0]
        for p in ("baseline", "fast", "max_speed")
    }
    boxes = {p: r.faces[0].box for p, r in results.items()}
    assert boxes["baseline"] == boxes["fast"] == boxes["max_speed"]  # detection always runs in float32
    # no parsing changes only the blend mask: outside the face's soft mask all agree
    same = np.all(results["fast"].image == results["max_speed"].image, axis=-1)
    assert same.mean() > 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fidelity": 1.5}, InputError, "codeformer_fidelity"),
        ({"profile": "turbo"}, InputError, "runtime_profile"),
        ({"stability": "optimized", "compile_backend": "cudagraphs"}, ConfigError, "needs a CUDA GPU"),
    ],
)
def test_bad_options_are_refused_before_any_work(restorer_seed0: Restorer, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        restorer_seed0.restore([np.zeros((8, 8, 3), np.uint8)], RequestOptions.parse(**kwargs))


@pytest.mark.parametrize(
    "image",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)],
    ids=["gray", "bgra", "float"],
)
def test_non_image_arrays_are_refused(restorer_seed0: Restorer, image: np.ndarray) -> None:
    """The pipeline's one image check: the stages after it (paste-back included) take the image as it is."""
    with pytest.raises(InputError, match=r"image 1: expected an \(H, W, 3\) uint8"):
        restorer_seed0.restore([np.zeros((8, 8, 3), np.uint8), image])


@pytest.mark.parametrize(
    ("shape", "match"),
    [((0, 8, 3), "no pixels"), ((8, 8 * 17, 3), "too elongated"), ((2000, 2000, 3), "over the limit")],
    ids=["empty", "aspect-17-to-1", "over-max-pixels"],
)
def test_images_over_the_size_limits_are_refused_naming_them(
    restorer_seed0: Restorer, shape: tuple[int, int, int], match: str
) -> None:
    """The pixel limits, checked once per image at the entry (``check_image_size``)."""
    restorer = Restorer(
        restorer_seed0.runtime.safe_nets, restorer_seed0.device, Settings.from_env(max_pixels=1024 * 1024)
    )
    with pytest.raises(ImageFailedError, match=match) as failure:
        restorer.restore([np.zeros((8, 8, 3), np.uint8), np.zeros(shape, np.uint8)])
    assert failure.value.indices == (1,)


def test_a_flipped_read_only_view_restores_as_its_copy(one_face: Restorer) -> None:
    """The entry copies a view the stages cannot take (negative strides, read-only) once."""
    image = noise(300, 400, seed=4)
    view = image[:, ::-1]
    view.flags.writeable = False
    [from_view] = one_face.restore([view], MAX_SPEED)
    [from_copy] = one_face.restore([view.copy()], MAX_SPEED)
    assert len(from_view.faces) == 1
    np.testing.assert_array_equal(from_view.image, from_copy.image)
    np.testing.assert_array_equal(view, image[:, ::-1])  # the caller's array is left as it was


def test_optimized_runtime_compiles_once_and_locks_its_backend(one_face: Restorer) -> None:
    restorer = Restorer(one_face.runtime.safe_nets, one_face.device, one_face.settings)
    image = noise(300, 400, seed=6)

    def optimized(fidelity: float = 0.5) -> RequestOptions:
        return RequestOptions.parse(fidelity, "max_speed", "optimized", "eager")

    [first] = restorer.restore([image], optimized())
    assert restorer.compile_backend == "eager"
    with torch._dynamo.config.patch(error_on_recompile=True):
        [second] = restorer.restore([image], optimized())
        # another fidelity, fidelity 0 (no fusion) and two faces in one batch: all warmed already
        restorer.restore([image], optimized(0.3))
        restorer.restore([image], optimized(0.0))
        pair = restorer.restore([image, noise(300, 400, seed=7)], optimized(0.9))
    assert [len(result.faces) for result in pair] == [1, 1]
    np.testing.assert_array_equal(first.image, second.image)
    assert first.image.shape == image.shape and len(first.faces) == 1
    with pytest.raises(ConfigError, match="fixed to 'eager'"):
        restorer.restore([image], RequestOptions.parse(stability="optimized", compile_backend="aot_eager"))
    # safe requests ignore compile_backend entirely
    safe = RequestOptions.parse(stability="safe", compile_backend="aot_eager")
    restorer.restore([np.full((64, 64, 3), 127, np.uint8)], safe)


def test_fast_runs_in_float32_where_mixed_precision_does_not_pay(restorer_seed0: Restorer) -> None:
    """With mixed precision off (what ``auto`` picks on a CPU whose bf16 is slower), ``fast``
    is ``baseline`` numerics on the same nets: identical pixels."""
    settings = Settings(max_faces=1, face_batch=1, mixed_precision="off")
    restorer = Restorer(restorer_seed0.runtime.safe_nets, restorer_seed0.device, settings)
    image = noise(300, 400, seed=4)
    fast_options = RequestOptions.parse(profile="fast")
    [baseline] = restorer.restore([image])
    [fast] = restorer.restore([image], fast_options)
    assert len(fast.faces) == 1
    np.testing.assert_array_equal(fast.image, baseline.image)
    if not cpu_has_bf16_kernels():
        return  # emulated bf16 takes many minutes per face here; the product never runs it on such a CPU
    mixed_settings = dataclasses.replace(settings, mixed_precision="on")
    [mixed] = Restorer(restorer_seed0.runtime.safe_nets, restorer_seed0.device, mixed_settings).restore(
        [image], fast_options
    )
    assert not np.array_equal(mixed.image, baseline.image)  # bf16 does change the numbers
