"""RetinaFace-ResNet50: state-dict layout, strict loading of the official file format, output shapes."""

from __future__ import annotations

import math

import pytest
import torch

from codeformer.nets.retinaface import RetinaFace
from codeformer.tools import random_weights
from codeformer.weights import WEIGHT_FILES, checkpoint_filter_fn

DETECTOR_FILE = "detection_Resnet50_Final.pth"


def expected_anchor_count(height: int, width: int) -> int:
    """Two anchors per location of the stride-8, -16 and -32 grids (docs/reference.md §2.8, §3 step 4)."""
    return sum(2 * math.ceil(height / step) * math.ceil(width / step) for step in (8, 16, 32))


@pytest.fixture(scope="module")
def official_file() -> dict[str, torch.Tensor]:
    """What the official detection_Resnet50_Final.pth holds (seed-0 random values)."""
    return random_weights.file_object(DETECTOR_FILE, seed=0)


@pytest.fixture(scope="module")
def loaded_net(official_file: dict[str, torch.Tensor]) -> RetinaFace:
    net = RetinaFace()
    net.load_state_dict(checkpoint_filter_fn(official_file, WEIGHT_FILES["retinaface"]), strict=True)
    return net.eval()


def test_state_dict_keys_and_shapes_equal_the_manifest() -> None:
    manifest = random_weights.read_manifest("state_dict_keys_retinaface.txt")
    ours = [(key, tuple(value.shape)) for key, value in RetinaFace().state_dict().items()]
    assert len(ours) == len(manifest) == 456
    assert ours == manifest
    assert sum(key.endswith("num_batches_tracked") for key, _ in ours) == 73


def test_parameter_count() -> None:
    assert sum(p.numel() for p in RetinaFace().parameters()) == 27_293_600


def test_official_file_format_loads_strictly_and_sets_every_tensor(
    loaded_net: RetinaFace, official_file: dict[str, torch.Tensor]
) -> None:
    official = checkpoint_filter_fn(official_file, WEIGHT_FILES["retinaface"])
    ours = loaded_net.state_dict()
    assert set(ours) == set(official)
    for key, value in official.items():
        assert torch.equal(ours[key], value), key


def test_unstripped_file_does_not_load(official_file: dict[str, torch.Tensor]) -> None:
    with pytest.raises(RuntimeError, match="Missing key"):
        RetinaFace().load_state_dict(official_file, strict=True)


@pytest.mark.parametrize(("height", "width"), [(64, 96), (65, 97), (33, 40)])
def test_output_shapes_and_softmax(loaded_net: RetinaFace, height: int, width: int) -> None:
    batch = 2
    torch.manual_seed(0)
    x = torch.randn(batch, 3, height, width) * 50.0  # (N, 3, H, W) BGR minus mean, roughly
    with torch.inference_mode():
        loc, conf, landms = loaded_net(x)
    anchors = expected_anchor_count(height, width)
    assert loc.shape == (batch, anchors, 4)
    assert conf.shape == (batch, anchors, 2)
    assert landms.shape == (batch, anchors, 10)
    assert loc.dtype == conf.dtype == landms.dtype == torch.float32
    torch.testing.assert_close(conf.sum(dim=-1), torch.ones(batch, anchors))
    assert bool((conf >= 0).all())


def test_batch_items_are_independent(loaded_net: RetinaFace) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 80) * 50.0
    with torch.inference_mode():
        batched = loaded_net(x)
        single = loaded_net(x[1:])
    for both, one in zip(batched, single, strict=True):
        torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-4)


@pytest.mark.nets  # the full ResNet-50 detector on a 481x641 input
def test_spec_example_anchor_count(loaded_net: RetinaFace) -> None:
    # docs/reference.md §2.8: a 481 x 641 input gives 13,096 anchors (odd sizes exercise the ceil and the
    # FPN's nearest resize between grids that are not exact halves)
    with torch.inference_mode():
        loc, conf, landms = loaded_net(torch.zeros(1, 3, 481, 641))
    assert loc.shape[1] == conf.shape[1] == landms.shape[1] == 13_096
