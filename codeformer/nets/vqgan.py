"""VQGAN building blocks and the encoder / generator trunks that CodeFormer is built on.

Written from the clean-room specification (``docs/reference.md`` §2.1–2.4) of the official
``basicsr/archs/vqgan_arch.py``: the module tree and attribute names reproduce the official
state-dict keys (``encoder.blocks.N.norm1.weight`` ...) so that ``codeformer.pth`` loads
strictly. Only what inference needs is here: no quantiser distance search, no
discriminator, no losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6  # the VQGAN trunk's GroupNorm eps, not PyTorch's default 1e-5


def Norm(channels: int) -> nn.GroupNorm:
    """The trunk's normalisation: GroupNorm(32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) (SiLU)."""
    return F.silu(x)


class ResBlock(nn.Module):
    """Pre-activation residual block; a 1x1 ``conv_out`` shortcut exists only when channels change."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # attribute absent when in == out, so the state dict has no conv_out keys then
        if in_channels != out_channels:
            self.conv_out = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        shortcut = self.conv_out(x) if self.in_channels != self.out_channels else x
        return h + shortcut


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, scaled by C^-1/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(feature: torch.Tensor) -> torch.Tensor:
            # (B, C, H, W) -> (B, 1, H*W, C): one head whose width is the full channel count
            return feature.flatten(2).transpose(1, 2).unsqueeze(1)

        # SDPA's default scale is 1/sqrt(last dim) = C^-1/2, the official scale
        attended = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        # (B, 1, H*W, C) -> (B, C, H, W)
        attended = attended.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one pixel only, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (left, right, top, bottom): the asymmetric pad of the official block
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, 3, S, S) image -> (B, emb_dim, S / 2^(levels-1), ...) latent, as a flat ``blocks`` list.

    With the official settings (S 512, nf 64, ch_mult 1,2,2,4,4,8, 2 res blocks, attention at
    16) this is the 25-block list of docs/reference.md §2.2; block indices matter because CodeFormer taps
    skip features by index.
    """

    def __init__(
        self,
        in_channels: int,
        nf: int,
        emb_dim: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        resolution: int,
        attn_resolutions: Sequence[int],
    ) -> None:
        super().__init__()
        channel_mult = (1, *ch_mult)
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, nf, kernel_size=3, stride=1, padding=1)]
        current_res = resolution
        for level in range(len(ch_mult)):
            block_in = nf * channel_mult[level]
            block_out = nf * channel_mult[level + 1]
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(block_in, block_out))
                block_in = block_out
                if current_res in attn_resolutions:
                    blocks.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(block_in))
                current_res //= 2
        # bottleneck: res, attn, res at the lowest resolution
        blocks.append(ResBlock(block_in, block_in))
        blocks.append(AttnBlock(block_in))
        blocks.append(ResBlock(block_in, block_in))
        # the final GroupNorm is not followed by swish (a quirk of the official block list)
        blocks.append(Norm(block_in))
        blocks.append(nn.Conv2d(block_in, emb_dim, kernel_size=3, stride=1, padding=1))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Generator(nn.Module):
    """(B, emb_dim, 16, 16) latent -> (B, 3, 512, 512) unbounded image, as a flat ``blocks`` list.

    The 25-block list of docs/reference.md §2.4; there is no output activation.
    """

    def __init__(
        self,
        nf: int,
        emb_dim: int,
        ch_mult: Sequence[int],
        res_blocks: int,
        img_size: int,
        attn_resolutions: Sequence[int],
    ) -> None:
        super().__init__()
        num_levels = len(ch_mult)
        block_in = nf * ch_mult[-1]
        current_res = img_size // 2 ** (num_levels - 1)
        blocks: list[nn.Module] = [
            nn.Conv2d(emb_dim, block_in, kernel_size=3, stride=1, padding=1),
            # bottleneck: res, attn, res at the lowest resolution
            ResBlock(block_in, block_in),
            AttnBlock(block_in),
            ResBlock(block_in, block_in),
        ]
        for level in reversed(range(num_levels)):
            block_out = nf * ch_mult[level]
            for _ in range(res_blocks):
                blocks.append(ResBlock(block_in, block_out))
                block_in = block_out
                if current_res in attn_resolutions:
                    blocks.append(AttnBlock(block_in))
            if level != 0:
                blocks.append(Upsample(block_in))
                current_res *= 2
        # the final GroupNorm is not followed by swish (a quirk of the official block list)
        blocks.append(Norm(block_in))
        blocks.append(nn.Conv2d(block_in, 3, kernel_size=3, stride=1, padding=1))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
