"""Face parsing (docs/reference.md §6.3 step 9): ``FaceParser`` against the plain official recipe,
and the typed masks.

``parse_net`` (conftest) is ParseNet on the seed-0 weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import smooth_noise
from official_recipe import reference_parse_mask

from codeformer.errors import InternalError
from codeformer.nets.parsenet import ParseNet
from codeformer.pipeline import to_gray_faces
from codeformer.stages.parse import FaceMasks, FaceParser
from codeformer.stages.restore import RestoredFaces

FACE = 512


@pytest.mark.parity
def test_face_parser_matches_the_plain_recipe(parse_net: ParseNet) -> None:
    rng = np.random.default_rng(10)
    faces = np.stack([(smooth_noise(rng, (FACE, FACE, 3), 8) * 255).astype(np.uint8) for _ in range(2)])
    gray = to_gray_faces(faces[:1])
    parser = FaceParser(parse_net, torch.device("cpu"), batch_size=2)
    masks = parser.masks(RestoredFaces(faces)).masks
    gray_masks = parser.masks(RestoredFaces(gray)).masks
    assert masks.shape == (2, FACE, FACE) and masks.dtype == np.float64
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    for face, mask in [(faces[0], masks[0]), (faces[1], masks[1]), (gray[0], gray_masks[0])]:
        # official input: astype float32, / 255, BGR -> RGB, CHW, (x - 0.5) / 0.5, batch 1
        face_input = face.astype("float32") / 255.0
        face_input = torch.from_numpy(face_input[:, :, ::-1].transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            logits = parse_net((face_input - 0.5) / 0.5)[0][0].numpy()
        expected = reference_parse_mask(logits)
        assert np.abs(mask - expected).max() < 1e-3  # batched convolutions may flip a rare argmax


def test_face_parser_takes_no_faces(parse_net: ParseNet) -> None:
    parser = FaceParser(parse_net, torch.device("cpu"))
    empty = parser.masks(RestoredFaces(np.zeros((0, FACE, FACE, 3), np.uint8)))
    assert empty.masks.shape == (0, FACE, FACE) and len(empty) == 0


@pytest.mark.parametrize(
    "masks",
    [np.zeros((1, FACE, FACE), np.float32), np.zeros((FACE, FACE)), np.zeros((1, 256, 256))],
    ids=["float32", "one_mask", "small"],
)
def test_face_masks_reject_malformed_masks_as_internal_errors(masks: np.ndarray) -> None:
    """Checked once, when built: paste-back takes the masks as they are."""
    with pytest.raises(InternalError, match="parse masks"):
        FaceMasks(masks)
