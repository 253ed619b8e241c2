"""ParseNet: the official key/shape manifest, parameter count, strict loading, output shapes."""

from __future__ import annotations

import pytest
import torch

from codeformer.nets import ParseNet
from codeformer.tools import random_weights

MANIFEST = "state_dict_keys_parsenet.txt"
OFFICIAL_PARAMETERS = 21_303_254  # docs/reference.md §2.9 / Appendix C


@pytest.fixture(scope="module")
def net() -> ParseNet:
    model = ParseNet()
    model.load_state_dict(random_weights.state_dict("parsing_parsenet.pth", 0), strict=True)
    return model.eval()


def test_state_dict_keys_and_shapes_equal_the_manifest() -> None:
    ours = [(key, tuple(value.shape)) for key, value in ParseNet().state_dict().items()]
    manifest = random_weights.read_manifest(MANIFEST)
    assert len(manifest) == 238
    assert ours == manifest  # same keys, same shapes, same module order
    assert sum(key.endswith("num_batches_tracked") for key, _ in ours) == 36


def test_parameter_count_and_batchnorm_modules() -> None:
    model = ParseNet()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batch_norms) == 36 and all(m.eps == 1e-5 for m in batch_norms)


def test_strict_load_of_random_weights_reproduces_them(net: ParseNet) -> None:
    expected = random_weights.state_dict("parsing_parsenet.pth", 0)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    with pytest.raises(RuntimeError):
        ParseNet().load_state_dict({**expected, "extra.weight": torch.zeros(1)}, strict=True)


@pytest.mark.nets
def test_forward_shapes_at_512(net: ParseNet) -> None:
    x = torch.rand(1, 3, 512, 512) * 2 - 1  # RGB in [-1, 1]
    with torch.inference_mode():
        out_mask, out_img = net(x)
    assert out_mask.shape == (1, 19, 512, 512) and out_img.shape == (1, 3, 512, 512)
    assert out_mask.dtype == torch.float32 and torch.isfinite(out_mask).all()


@pytest.mark.nets  # without bf16 kernels (AVX2 only) bf16 is emulated: ~1 min even at 64 px
def test_channels_last_and_bf16_autocast(net: ParseNet) -> None:
    """The net is fully convolutional, so a 64-px input exercises every layer cheaply."""
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        reference_mask, _ = net(x)
        channels_last_mask, _ = net(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_mask, bf16_img = net(x)
    assert reference_mask.shape == (2, 19, 64, 64)
    scale = reference_mask.abs().max()  # random weights give logits of order 100
    # a different convolution algorithm: float32 rounding only
    assert (channels_last_mask - reference_mask).abs().max() < 1e-5 * scale
    assert bf16_mask.dtype == torch.bfloat16 and bf16_img.shape == (2, 3, 64, 64)
    # bf16 keeps ~3 significant digits; the logits still agree closely
    assert (bf16_mask.float() - reference_mask).abs().max() < 0.05 * scale


def test_batch_items_are_independent(net: ParseNet) -> None:
    """Eval-mode BatchNorm uses running statistics, so a face's logits do not depend on its batch."""
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        together, _ = net(x)
        alone, _ = net(x[1:])
    assert (together[1:] - alone).abs().max() < 1e-5 * alone.abs().max()
