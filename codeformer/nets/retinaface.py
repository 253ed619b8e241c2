"""RetinaFace with a ResNet-50 body: the face detector of the official pipeline (docs/reference.md §2.8).

Provenance: the ``cfg_re50`` configuration of ``facelib/detection/retinaface`` in
sczhou/CodeFormer (itself from biubug6/Pytorch_Retinaface), written here from the
specification. State-dict keys and shapes match ``detection_Resnet50_Final.pth`` once its
``nn.DataParallel`` prefix is stripped (``codeformer.weights.checkpoint_filter_fn``); the key manifest is
``codeformer/tools/manifests/state_dict_keys_retinaface.txt``.

Order: ResNet-50 body, FPN, SSH, heads, model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ANCHORS_PER_LOCATION = 2  # two min sizes per pyramid level
PYRAMID_CHANNELS = 256  # cfg_re50 out_channel
BODY_RETURN_CHANNELS = (512, 1024, 2048)  # layer2, layer3, layer4 at strides 8, 16, 32


# --- ResNet-50 body (torchvision v1.5 layout: stride on the 3x3 conv) ---------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _resnet_layer(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_channels, width, stride)]
    layers += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet50Body(nn.Module):
    """ResNet-50 without avgpool/fc; returns the layer2, layer3 and layer4 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _resnet_layer(64, 64, 3, stride=1)
        self.layer2 = _resnet_layer(256, 128, 4, stride=2)
        self.layer3 = _resnet_layer(512, 256, 6, stride=2)
        self.layer4 = _resnet_layer(1024, 512, 3, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)  # (N, 512, H/8, W/8)
        c4 = self.layer3(c3)  # (N, 1024, H/16, W/16)
        c5 = self.layer4(c4)  # (N, 2048, H/32, W/32)
        return c3, c4, c5


# --- FPN and SSH -------------------------------------------------------------------------------
# The official helpers use LeakyReLU with slope 0 when out_channel > 64 (always, at 256
# channels), which is a plain ReLU. Keys: ".0" conv, ".1" BatchNorm.


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv_bn_no_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv, BN."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def conv_bn_1x1(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.output1 = conv_bn_1x1(in_channels[0], out_channels)
        self.output2 = conv_bn_1x1(in_channels[1], out_channels)
        self.output3 = conv_bn_1x1(in_channels[2], out_channels)
        self.merge1 = conv_bn(out_channels, out_channels)
        self.merge2 = conv_bn(out_channels, out_channels)

    def forward(
        self, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = features
        out1 = self.output1(c3)
        out2 = self.output2(c4)
        out3 = self.output3(c5)
        # legacy "nearest" to an explicit size: src = floor(dst * in / out)
        out2 = self.merge2(out2 + F.interpolate(out3, size=out2.shape[-2:], mode="nearest"))
        out1 = self.merge1(out1 + F.interpolate(out2, size=out1.shape[-2:], mode="nearest"))
        return out1, out2, out3


class SSH(nn.Module):
    """Context module: 3x3, "5x5" and "7x7" branches (stacked 3x3 convs), concatenated."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv3X3 = conv_bn_no_relu(in_channels, out_channels // 2)
        self.conv5X5_1 = conv_bn(in_channels, out_channels // 4)
        self.conv5X5_2 = conv_bn_no_relu(out_channels // 4, out_channels // 4)
        self.conv7X7_2 = conv_bn(out_channels // 4, out_channels // 4)
        self.conv7x7_3 = conv_bn_no_relu(out_channels // 4, out_channels // 4)  # lower-case x: official key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3 = self.conv3X3(x)
        context = self.conv5X5_1(x)
        branch5 = self.conv5X5_2(context)
        branch7 = self.conv7x7_3(self.conv7X7_2(context))
        return F.relu(torch.cat([branch3, branch5, branch7], dim=1))


# --- Heads -------------------------------------------------------------------------------------


class _Head(nn.Module):
    """1x1 conv predicting ``values`` numbers per anchor, flattened to (N, H*W*anchors, values).

    Anchor a at a location owns channels [a*values, (a+1)*values), so the flattening order
    is rows, columns, anchors: the order the priors are generated in.
    """

    values: int

    def __init__(self, in_channels: int = PYRAMID_CHANNELS) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(in_channels, ANCHORS_PER_LOCATION * self.values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class ClassHead(_Head):
    values = 2  # background, face logits


class BboxHead(_Head):
    values = 4  # centre and log-size offsets


class LandmarkHead(_Head):
    values = 10  # five (x, y) offsets


# --- Model -------------------------------------------------------------------------------------


class RetinaFace(nn.Module):
    """RetinaFace-ResNet50 in the official ``cfg_re50`` configuration, inference only.

    Input: (N, 3, H, W) float32, BGR minus the mean (104, 117, 123), no scaling.
    Output: ``(loc, conf, landms)`` of shapes (N, P, 4), (N, P, 2) softmaxed (index 1 is
    the face probability) and (N, P, 10), where P = 2 * sum over strides s in (8, 16, 32)
    of ceil(H/s) * ceil(W/s), levels in that order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = ResNet50Body()
        self.fpn = FPN(BODY_RETURN_CHANNELS, PYRAMID_CHANNELS)
        self.ssh1 = SSH(PYRAMID_CHANNELS, PYRAMID_CHANNELS)
        self.ssh2 = SSH(PYRAMID_CHANNELS, PYRAMID_CHANNELS)
        self.ssh3 = SSH(PYRAMID_CHANNELS, PYRAMID_CHANNELS)
        self.ClassHead = nn.ModuleList([ClassHead() for _ in range(3)])
        self.BboxHead = nn.ModuleList([BboxHead() for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([LandmarkHead() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pyramid = self.fpn(self.body(x))
        features = (self.ssh1(pyramid[0]), self.ssh2(pyramid[1]), self.ssh3(pyramid[2]))
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features, strict=True)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features, strict=True)], dim=1)
        landms = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features, strict=True)], dim=1)
        return loc, F.softmax(logits, dim=-1), landms
