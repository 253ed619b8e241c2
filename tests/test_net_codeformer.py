"""CodeFormer: official keys and shapes, strict loading, block numerics, and the forward contract.

Full 512x512 forwards cost seconds on CPU, so they are few and their results are shared
through module-scoped fixtures.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codeformer.nets.codeformer import (
    Codebook,
    CodeFormer,
    SelfAttention,
    adaptive_instance_normalization,
)
from codeformer.nets.vqgan import AttnBlock, Downsample, ResBlock, Upsample
from codeformer.runtime import cpu_has_bf16_kernels
from codeformer.tools import random_weights

MANIFEST = "state_dict_keys_codeformer.txt"
OFFICIAL_PARAMETER_COUNT = 94_112_707
FIDELITY = 0.5


def smooth_face(seed: int) -> torch.Tensor:
    """A deterministic smooth (1, 3, 512, 512) image in [-1, 1], a stand-in for an aligned face."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=512, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def net() -> CodeFormer:
    model = CodeFormer().eval()
    model.load_state_dict(random_weights.state_dict("codeformer.pth", seed=0), strict=True)
    return model


@pytest.fixture(scope="module")
def face_a() -> torch.Tensor:
    return smooth_face(1)


@pytest.fixture(scope="module")
def fused_output(net: CodeFormer, face_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """net(face_a, w=0.5, adain=True), the reference that several tests compare with."""
    with torch.inference_mode():
        return net(face_a, w=FIDELITY, adain=True)


def test_state_dict_keys_and_shapes_equal_the_official_manifest() -> None:
    state = CodeFormer().state_dict()
    ours = [(key, tuple(value.shape)) for key, value in state.items()]
    assert ours == random_weights.read_manifest(MANIFEST)
    assert len(ours) == 515


def test_parameter_count_and_no_buffers() -> None:
    model = CodeFormer()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETER_COUNT
    assert list(model.buffers()) == []


@pytest.mark.nets  # the full-size net built and loaded twice: 5-6 s each
@pytest.mark.parametrize("seed", [0, 7])
def test_random_release_weights_load_strictly(seed: int) -> None:
    model = CodeFormer()
    state = random_weights.state_dict("codeformer.pth", seed=seed)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.quantize.embedding.weight, state["quantize.embedding.weight"])
    assert torch.equal(
        model.ft_layers[8].self_attn.in_proj_weight, state["ft_layers.8.self_attn.in_proj_weight"]
    )


def test_self_attention_matches_pytorch_multihead_attention() -> None:
    torch.manual_seed(0)
    ours = SelfAttention(512, 8).eval()
    torch.nn.init.normal_(ours.in_proj_bias, std=0.1)
    reference = torch.nn.MultiheadAttention(512, 8).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    query_key = torch.randn(2, 256, 512)  # (B, L, E)
    value = torch.randn(2, 256, 512)
    with torch.inference_mode():
        expected = reference(query_key.transpose(0, 1), query_key.transpose(0, 1), value.transpose(0, 1))[0]
        actual = ours(query_key, value)
    torch.testing.assert_close(actual, expected.transpose(0, 1), atol=2e-5, rtol=1e-4)


def test_attn_block_is_single_head_attention_scaled_by_channels() -> None:
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.inference_mode():
        h = block.norm(x)
        q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, N)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 64**-0.5, dim=2)  # (B, N_i, N_j)
        attended = torch.bmm(v, weights.transpose(1, 2)).reshape(2, 64, 8, 8)
        expected = x + block.proj_out(attended)
        actual = block(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_resampling_blocks_pad_right_bottom_and_repeat_pixels() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 32, 8, 8)
    down, up = Downsample(32).eval(), Upsample(32).eval()
    with torch.inference_mode():
        padded = torch.zeros(1, 32, 9, 9)
        padded[:, :, :8, :8] = x
        torch.testing.assert_close(down(x), F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2))
        repeated = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(up(x), up.conv(repeated))
    assert down(x).shape == (1, 32, 4, 4)
    assert up(x).shape == (1, 32, 16, 16)


def test_res_block_has_a_conv_shortcut_only_when_channels_change() -> None:
    assert hasattr(ResBlock(64, 128), "conv_out")
    assert not hasattr(ResBlock(64, 64), "conv_out")


def test_codebook_lookup_equals_one_hot_product_bit_for_bit() -> None:
    torch.manual_seed(0)
    codebook = Codebook(1024, 256)
    indices = torch.randint(0, 1024, (2, 256))
    one_hot = F.one_hot(indices, 1024).float()
    assert torch.equal(codebook.lookup(indices), one_hot @ codebook.embedding.weight.detach())


def test_adain_uses_unbiased_variance_plus_eps() -> None:
    torch.manual_seed(0)
    content = torch.randn(2, 8, 16, 16) * 3 + 1
    style = torch.randn(2, 8, 16, 16) * 0.5 - 2
    result = adaptive_instance_normalization(content, style)
    style_flat, result_flat = style.flatten(2), result.flatten(2)
    torch.testing.assert_close(result_flat.mean(2), style_flat.mean(2), atol=1e-5, rtol=1e-5)
    # the content's std is inflated by eps the same way, so the ratio of (var + eps) carries over
    content_var = content.flatten(2).var(2)
    expected_var = content_var / (content_var + 1e-5) * (style_flat.var(2) + 1e-5)
    torch.testing.assert_close(result_flat.var(2), expected_var, atol=1e-5, rtol=1e-4)


@pytest.mark.nets
def test_forward_returns_official_shapes(fused_output: tuple[torch.Tensor, ...]) -> None:
    out, logits, lq_feat = fused_output
    assert out.shape == (1, 3, 512, 512) and out.dtype == torch.float32
    assert logits.shape == (1, 256, 1024)
    assert lq_feat.shape == (1, 256, 16, 16)
    assert torch.isfinite(out).all()


@pytest.mark.nets
def test_fidelity_changes_only_the_generator(
    net: CodeFormer, face_a: torch.Tensor, fused_output: tuple[torch.Tensor, ...]
) -> None:
    with torch.inference_mode():
        plain_out, plain_logits, plain_lq = net(face_a, w=0.0, adain=True)
    fused_out, fused_logits, fused_lq = fused_output
    # fusion happens after the codes are chosen: encoder and transformer outputs are the same
    assert torch.equal(plain_lq, fused_lq)
    assert torch.equal(plain_logits, fused_logits)
    assert (plain_out - fused_out).abs().mean() > 1e-3


@pytest.mark.nets
def test_compiled_channels_last_batch_matches_single_face(
    net: CodeFormer, face_a: torch.Tensor, fused_output: tuple[torch.Tensor, ...]
) -> None:
    """The 'optimized' path: one graph under torch.compile, channels_last, several faces per call."""
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # fullgraph: no graph breaks allowed
    batch = torch.cat([smooth_face(2), face_a]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        batch_out, batch_logits, batch_lq = compiled(batch, w=FIDELITY, adain=True)
    single_out, single_logits, single_lq = fused_output
    assert batch_out.shape == (2, 3, 512, 512)
    # face_a sits second, so leaking across the batch (or ignoring sample 1) would show here
    torch.testing.assert_close(batch_lq[1:], single_lq, atol=1e-3, rtol=1e-3)
    assert torch.equal(batch_logits[1:].argmax(-1), single_logits.argmax(-1))
    torch.testing.assert_close(batch_out[1:], single_out, atol=5e-3, rtol=1e-3)
    assert (batch_out[0] - batch_out[1]).abs().mean() > 1e-2


@pytest.mark.nets
@pytest.mark.skipif(
    not cpu_has_bf16_kernels(),
    reason="this CPU has no bf16 kernels: one emulated bf16 CodeFormer forward takes many minutes "
    "(~100x float32), and the product runs float32 here (mixed precision 'auto')",
)
def test_bfloat16_autocast_stays_close_to_float32(
    net: CodeFormer, face_a: torch.Tensor, fused_output: tuple[torch.Tensor, ...]
) -> None:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low_out, low_logits, low_lq = net(face_a, w=FIDELITY, adain=True)
    out, logits, lq_feat = fused_output
    assert low_out.shape == out.shape and torch.isfinite(low_out.float()).all()
    # bf16 keeps 8 mantissa bits: about 2 % relative error through the encoder
    assert ((low_lq.float() - lq_feat).abs().mean() / lq_feat.abs().mean()) < 0.05
    # codes are a hard top-1 (the transformer runs in float32); a few near-ties may flip
    assert (low_logits.argmax(-1) == logits.argmax(-1)).float().mean() > 0.9
    # with random weights a flipped code changes its whole neighbourhood, hence the loose bound
    correlation = torch.corrcoef(torch.stack([low_out.float().flatten(), out.flatten()]))[0, 1]
    assert correlation > 0.8
