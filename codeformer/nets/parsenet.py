"""ParseNet, the face-parsing network of the official pipeline (docs/reference.md §2.9).

Provenance: the architecture of ``facelib/parsing/parsenet.py`` in sczhou/CodeFormer (commit
b33cc7d) as built by the pipeline (in 512, out 512, 19 classes, base_ch 64, res_depth 10,
LeakyReLU 0.2, BatchNorm), written from the clean-room description in docs/reference.md §2.9. The
state-dict keys and shapes equal ``codeformer/tools/manifests/state_dict_keys_parsenet.txt``
(238 entries, 21,303,254 parameters), so the released ``parsing_parsenet.pth`` loads strictly.

Only ``out_mask`` (19 class logits) is used by the pipeline; ``out_img`` is returned because
the official forward returns it and it costs one 3×3 convolution.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Scale = Literal["none", "up", "down"]

LEAKY_SLOPE = 0.2  # relu_type "LeakyReLU" in the official ParseNet
BN_EPS = 1e-5
# The official build, ParseNet(in_size=512, out_size=512, parsing_ch=19) with the class's
# other defaults: 512 -> 32 px in four stride-2 residual blocks and back, channels from 64
# doubling up to a cap of 256 (a floor of 32 that these numbers never reach).
PARSE_SIZE = 512
MIN_FEATURE_SIZE = 32
BASE_CHANNELS = 64
MAX_CHANNELS = 256
MIN_CHANNELS = 32
RESIDUAL_DEPTH = 10
PARSE_CLASSES = 19  # CelebAMask-HQ labels, background included


class _BatchNorm(nn.Module):
    """BatchNorm wrapped one level deep so that keys read ``.norm.norm.*`` like the official NormLayer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ConvLayer(nn.Module):
    """(nearest ×2 if "up") → reflection pad → k×k conv (stride 2 if "down") → [BN] → [LeakyReLU].

    The conv carries a bias only when there is no BatchNorm after it, as in the official layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        scale: Scale = "none",
        batch_norm: bool = True,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.upsample = scale == "up"
        self.pad = kernel_size // 2
        self.conv2d = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=2 if scale == "down" else 1,
            padding=0,
            bias=not batch_norm,
        )
        # Plain attributes keep the "none" norm/activation parameter-free and out of the state dict.
        self.norm = _BatchNorm(out_channels) if batch_norm else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.pad:
            x = F.pad(x, (self.pad, self.pad, self.pad, self.pad), mode="reflect")
        x = self.conv2d(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation:
            x = F.leaky_relu(x, LEAKY_SLOPE)
        return x


class ResidualBlock(nn.Module):
    """shortcut(x) + conv2(conv1(x)), no activation after the sum.

    The resampling sits in conv1 for "up" blocks and in conv2 (stride 2) for "down" blocks; the
    shortcut is a biased plain conv with the same resampling unless the block keeps shape.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: Scale = "none") -> None:
        super().__init__()
        if scale == "none" and in_channels == out_channels:
            self.shortcut_func: nn.Module = nn.Identity()
        else:
            self.shortcut_func = ConvLayer(
                in_channels, out_channels, 3, scale, batch_norm=False, activation=False
            )
        self.conv1 = ConvLayer(in_channels, out_channels, 3, "up" if scale == "up" else "none")
        self.conv2 = ConvLayer(
            out_channels, out_channels, 3, "down" if scale == "down" else "none", activation=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_func(x) + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """Encoder (4 downs) → 10 residual blocks with a long skip → decoder (4 ups) → two heads.

    Input (N, 3, 512, 512) RGB in [-1, 1]; returns ``(out_mask, out_img)`` with out_mask
    (N, 19, 512, 512) class logits and out_img (N, 3, 512, 512).
    """

    def __init__(self) -> None:
        super().__init__()
        down_steps = up_steps = int(math.log2(PARSE_SIZE // MIN_FEATURE_SIZE))  # 4

        def width(channels: int) -> int:
            return max(MIN_CHANNELS, min(channels, MAX_CHANNELS))

        # encoder.0 is a plain biased conv: no norm, no activation
        encoder: list[nn.Module] = [ConvLayer(3, BASE_CHANNELS, 3, batch_norm=False, activation=False)]
        head_ch = BASE_CHANNELS
        for _ in range(down_steps):
            cin, cout = width(head_ch), width(head_ch * 2)
            encoder.append(ResidualBlock(cin, cout, "down"))
            head_ch *= 2
        self.encoder = nn.Sequential(*encoder)

        self.body = nn.Sequential(
            *[ResidualBlock(width(head_ch), width(head_ch)) for _ in range(RESIDUAL_DEPTH)]
        )

        decoder: list[nn.Module] = []
        for _ in range(up_steps):
            cin, cout = width(head_ch), width(head_ch // 2)
            decoder.append(ResidualBlock(cin, cout, "up"))
            head_ch //= 2
        self.decoder = nn.Sequential(*decoder)

        self.out_img_conv = ConvLayer(width(head_ch), 3, batch_norm=False, activation=False)
        self.out_mask_conv = ConvLayer(width(head_ch), PARSE_CLASSES, batch_norm=False, activation=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)  # (N, 256, 32, 32)
        # the long skip around the whole body is part of the official forward
        features = features + self.body(features)
        features = self.decoder(features)  # (N, 64, 512, 512)
        out_img = self.out_img_conv(features)  # (N, 3, 512, 512)
        out_mask = self.out_mask_conv(features)  # (N, 19, 512, 512) logits
        return out_mask, out_img
