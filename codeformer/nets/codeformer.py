"""CodeFormer (Zhou et al., NeurIPS 2022): a VQGAN whose codes are predicted by a transformer.

Written from the clean-room specification (``docs/reference.md`` §2.1–2.7) of the official
``basicsr/archs/codeformer_arch.py``. Module and attribute names reproduce the official
state-dict keys (515 entries, 94,112,707 parameters, no buffers) so that the ``params_ema``
entry of ``codeformer.pth`` loads strictly. Inference only: no dropout, no training-only
branches, no nearest-neighbour quantisation (the codes come from the transformer's logits).

Order: attention, transformer layer, fuse block, codebook, AdaIN, the model. The
checkpoint filter (unwrapping ``params_ema``) is ``codeformer.weights.checkpoint_filter_fn``,
shared by the three nets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from codeformer.nets.vqgan import Encoder, Generator, ResBlock

LAYER_NORM_EPS = 1e-5
ADAIN_EPS = 1e-5  # added to the unbiased variance (docs/reference.md §2.7 step 6)
SFT_LEAKY_SLOPE = 0.2

# Where the encoder's skip features are tapped and where the generator fuses them, keyed by
# the spatial width of the feature in the 512 net (docs/reference.md §2.2, §2.4), i.e. by its level: a
# feature of level L has nf * ch_mult[L] channels (64, 128, 128, 256, 256, 512 officially).
# Widths outside connect_list are unused.
ENCODER_SKIP_BLOCKS = {"512": 2, "256": 5, "128": 8, "64": 11, "32": 14, "16": 18}
GENERATOR_FUSE_BLOCKS = {"16": 6, "32": 9, "64": 12, "128": 15, "256": 18, "512": 21}
FUSE_LEVELS = {"512": 0, "256": 1, "128": 2, "64": 3, "32": 4, "16": 5}


class SelfAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters and numerics.

    The packed ``in_proj_weight`` holds W_q, W_k, W_v as consecutive row blocks; each
    projection splits into heads of contiguous channels; per head softmax(QK^T/sqrt(d))V;
    heads concatenated; then ``out_proj``. Batch-first here (the official layer is
    sequence-first; the arithmetic per token is the same).
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query_key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query_key, value: (B, L, E) -> (B, L, E). Queries and keys share one input."""
        batch, length, _ = value.shape
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)

        def heads(projected: torch.Tensor) -> torch.Tensor:
            # (B, L, E) -> (B, heads, L, E / heads)
            return projected.view(batch, length, self.num_heads, -1).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(F.linear(query_key, weight_q, bias_q)),
            heads(F.linear(query_key, weight_k, bias_k)),
            heads(F.linear(value, weight_v, bias_v)),
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, self.embed_dim))


class TransformerSALayer(nn.Module):
    """Pre-norm self-attention layer; the position embedding enters queries and keys only."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(embed_dim, num_heads)
        self.linear1 = nn.Linear(embed_dim, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, tokens: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L, E); query_pos: (L, E), broadcast over the batch."""
        normed = self.norm1(tokens)
        tokens = tokens + self.self_attn(normed + query_pos, normed)
        # exact (erf) GELU, as nn.GELU() defaults to
        return tokens + self.linear2(F.gelu(self.linear1(self.norm2(tokens))))


class FuseSFTBlock(nn.Module):
    """Controllable feature transform: the decoder feature modulated by the encoder skip, times w."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.encode_enc = ResBlock(2 * in_channels, out_channels)
        self.scale = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.LeakyReLU(SFT_LEAKY_SLOPE),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        self.shift = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.LeakyReLU(SFT_LEAKY_SLOPE),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )

    def forward(
        self, enc_feat: torch.Tensor, dec_feat: torch.Tensor, w: float | torch.Tensor
    ) -> torch.Tensor:
        # the encoder feature comes first in the concatenation
        fused = self.encode_enc(torch.cat([enc_feat, dec_feat], dim=1))
        return dec_feat + w * (dec_feat * self.scale(fused) + self.shift(fused))


class Codebook(nn.Module):
    """The VQGAN codebook (``quantize.embedding.weight``, codebook_size x emb_dim)."""

    def __init__(self, codebook_size: int, emb_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, emb_dim)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) integer indices -> (..., emb_dim) rows exactly as stored.

        The official one-hot x codebook product in float32 yields the stored rows bit for
        bit, so plain indexing is the same computation without the (tokens x 1024) matmul.
        """
        return self.embedding.weight[indices]


def _mean_std(feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) mean and sqrt(unbiased variance + eps) over space, as (B, C, 1, 1)."""
    flat = feature.float().flatten(2)  # float32 statistics even under autocast
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + ADAIN_EPS).sqrt()[..., None, None]
    return mean, std


def adaptive_instance_normalization(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Give ``content`` the per-channel mean and std of ``style`` (both (B, C, H, W))."""
    content_mean, content_std = _mean_std(content)
    style_mean, style_std = _mean_std(style)
    return (content.float() - content_mean) / content_std * style_std + style_mean


class CodeFormer(nn.Module):
    """512x512 face in [-1, 1] -> restored face; ``w`` trades quality (0) for fidelity (1).

    ``CodeFormer()`` is the official released configuration.
    """

    def __init__(
        self,
        dim_embd: int = 512,
        n_head: int = 8,
        n_layers: int = 9,
        codebook_size: int = 1024,
        latent_size: int = 256,
        connect_list: Sequence[str] = ("32", "64", "128", "256"),
        img_size: int = 512,
        nf: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
        res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        emb_dim: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.emb_dim = emb_dim
        self.latent_side = img_size // 2 ** (len(ch_mult) - 1)  # 16: the token grid is 16 x 16
        if self.latent_side**2 != latent_size:
            raise ValueError(f"latent_size {latent_size} does not match a {self.latent_side}^2 token grid")
        self.connect_list = tuple(connect_list)
        # block index -> width key, fixed at construction so forward branches on Python ints only
        self.encoder_taps = {ENCODER_SKIP_BLOCKS[width]: width for width in self.connect_list}
        self.generator_fuses = {GENERATOR_FUSE_BLOCKS[width]: width for width in self.connect_list}

        # registration order reproduces the official state-dict order
        self.position_emb = nn.Parameter(torch.zeros(latent_size, dim_embd))
        self.encoder = Encoder(3, nf, emb_dim, ch_mult, res_blocks, img_size, attn_resolutions)
        self.quantize = Codebook(codebook_size, emb_dim)
        self.generator = Generator(nf, emb_dim, ch_mult, res_blocks, img_size, attn_resolutions)
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.ModuleList(
            TransformerSALayer(dim_embd, n_head, mlp_dim=2 * dim_embd) for _ in range(n_layers)
        )
        self.idx_pred_layer = nn.Sequential(
            nn.LayerNorm(dim_embd, eps=LAYER_NORM_EPS),
            nn.Linear(dim_embd, codebook_size, bias=False),
        )
        self.fuse_convs_dict = nn.ModuleDict(
            {
                width: FuseSFTBlock(nf * ch_mult[FUSE_LEVELS[width]], nf * ch_mult[FUSE_LEVELS[width]])
                for width in self.connect_list
            }
        )

    def forward(
        self, x: torch.Tensor, w: float | torch.Tensor = 0.0, adain: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, 3, 512, 512) float RGB in [-1, 1].

        ``w``: a number in [0, 1], or a 0-d tensor on ``x``'s device. A number 0 skips the
        fusion; a tensor always fuses (a tensor's value cannot steer Python without a device
        sync). Compiled nets take w > 0 as a tensor: then it is an input of the graph, not a
        constant or a host scalar, so one graph serves every w > 0 and CUDA graphs can take it.

        Returns (out (B, 3, 512, 512) unbounded, nominally [-1, 1]; logits (B, 256, 1024)
        before softmax; lq_feat (B, 256, 16, 16) encoder output).
        """
        skips: dict[str, torch.Tensor] = {}
        feature = x
        for index, block in enumerate(self.encoder.blocks):
            feature = block(feature)
            if index in self.encoder_taps:
                skips[self.encoder_taps[index]] = feature
        lq_feat = feature  # (B, 256, 16, 16)
        batch = lq_feat.shape[0]

        # The code choice is a hard top-1 over 1024 logits, so the transformer always runs in
        # float32: under bf16 autocast its rounding alone flips some of the codes, and it is a
        # small part of the network's work.
        with torch.autocast(lq_feat.device.type, enabled=False):
            # (B, 256, 16, 16) -> (B, 256 tokens row-major, 256) -> (B, 256, 512)
            tokens = self.feat_emb(lq_feat.float().flatten(2).transpose(1, 2))
            for layer in self.ft_layers:
                tokens = layer(tokens, self.position_emb)
            logits = self.idx_pred_layer(tokens)  # (B, 256, 1024)

        # top-1 of the softmax, as the official code does (argmax of logits bar rounding ties)
        code_indices = logits.softmax(dim=2).topk(1, dim=2).indices.squeeze(2)  # (B, 256)
        side = self.latent_side
        # (B, 256, emb) -> (B, 16, 16, emb) -> (B, emb, 16, 16), in the memory format of lq_feat
        quant_feat = (
            self.quantize.lookup(code_indices).view(batch, side, side, self.emb_dim).permute(0, 3, 1, 2)
        )
        quant_feat = quant_feat.contiguous(memory_format=_memory_format_of(lq_feat))
        if adain:
            quant_feat = adaptive_instance_normalization(quant_feat, lq_feat)

        feature = quant_feat
        # w == 0 skips fusion: the same result as the formula with w = 0, without its cost
        fuse = isinstance(w, torch.Tensor) or w > 0
        for index, block in enumerate(self.generator.blocks):
            feature = block(feature)
            if fuse and index in self.generator_fuses:
                width = self.generator_fuses[index]
                feature = self.fuse_convs_dict[width](skips[width], feature, w)
        return feature, logits, lq_feat


def _memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last when ``tensor`` is stored that way (and not also plainly contiguous)."""
    if tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
