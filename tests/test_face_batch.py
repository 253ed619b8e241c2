"""The face batch restore and parse share: its normalisation to the nets' input, bit for bit, and the
chunk sizes a compiled net sees.

``FaceBatchNet``'s chunked, mixed-precision runs are tested through the restorer and the
parser in ``test_restore.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import all_levels_crops

from codeformer.stages.face_batch import crops_to_tensor, face_batch_sizes, pad_chunk

CPU = torch.device("cpu")


def spec_crop_to_input(crop: np.ndarray) -> np.ndarray:
    """Spec §5.1 in NumPy: u / 255 in float64, float32, BGR->RGB, CHW, (v - 0.5) / 0.5 in float32."""
    unit = (crop.astype(np.float64) / 255.0).astype(np.float32)
    rgb = unit[..., ::-1].transpose(2, 0, 1)
    return (rgb - np.float32(0.5)) / np.float32(0.5)


def test_crops_to_tensor_is_the_spec_recipe_bit_for_bit() -> None:
    crops = all_levels_crops()
    tensor = crops_to_tensor(crops, CPU)
    assert tensor.dtype == torch.float32 and tensor.shape == (2, 3, 512, 512)
    expected = np.stack([spec_crop_to_input(crop) for crop in crops])
    np.testing.assert_array_equal(tensor.numpy(), expected)
    assert tensor.min() == -1.0 and tensor.max() == 1.0


def spec_parse_input(face: np.ndarray) -> np.ndarray:
    """Spec §6.3 step 9a in NumPy: float32 cast, / 255 in float32, BGR->RGB, CHW, (v - 0.5) / 0.5."""
    unit = face.astype(np.float32) / np.float32(255.0)
    return (unit[..., ::-1].transpose(2, 0, 1) - np.float32(0.5)) / np.float32(0.5)


def test_crops_to_tensor_is_also_the_parser_recipe_for_uint8_and_gray_float64_faces() -> None:
    """FaceParser reuses crops_to_tensor: ParseNet's official normalisation, bit for bit."""
    crops = all_levels_crops()
    gray = np.repeat((crops.astype(np.float64) @ [0.1140, 0.5870, 0.2989])[..., None], 3, axis=-1)
    for faces in (crops, gray):
        expected = np.stack([spec_parse_input(face) for face in faces])
        np.testing.assert_array_equal(crops_to_tensor(faces, CPU).numpy(), expected)


@pytest.mark.parametrize(
    ("batch_size", "sizes"), [(1, (1,)), (3, (1, 2, 3)), (4, (1, 2, 4)), (8, (1, 2, 4, 8))]
)
def test_compiled_chunks_come_in_powers_of_two_up_to_the_face_batch(
    batch_size: int, sizes: tuple[int, ...]
) -> None:
    assert face_batch_sizes(batch_size) == sizes


def test_a_chunk_is_padded_with_copies_of_its_last_face() -> None:
    chunk = torch.arange(3 * 2).reshape(3, 2)
    padded = pad_chunk(chunk, (1, 2, 4))
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]
    assert pad_chunk(chunk[:2], (1, 2, 4)) is not None and pad_chunk(chunk[:2], (1, 2, 4)).shape == (2, 2)
