"""ResNet family (basic residual blocks): ``resnet_tiny``, ``resnet_small``, ``resnet18``.

Widths and depths are chosen for CT slices of 64-512 px and a CPU budget: the stem halves the
resolution (and for ``resnet18`` a max-pool halves it again, as in the original network), each
later stage halves it once more, and global average pooling removes the dependence on size.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from base_models.archs.base import BaseArch, conv_bn_act


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn_act(in_channels, out_channels, 3, stride)
        self.conv2 = conv_bn_act(out_channels, out_channels, 3, 1, act=False)
        self.last_bn = self.conv2[1]
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv_bn_act(in_channels, out_channels, 1, stride, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(BaseArch):
    """Stem + stages of basic blocks; stage ``i`` has ``widths[i]`` channels and ``depths[i]`` blocks."""

    widths: Sequence[int] = (16, 32, 64)
    depths: Sequence[int] = (1, 1, 1)
    stem_kernel: int = 3
    stem_pool: bool = False

    def __init__(self, in_channels: int, n_outputs: int = 6, *, dropout: float = 0.1,
                 center_channels: tuple[int, int] | None = None):
        super().__init__(in_channels, n_outputs, feature_dim=self.widths[-1], dropout=dropout,
                         center_channels=center_channels)
        first = self.input_conv(self.widths[0], self.stem_kernel, stride=2)
        stem: list[nn.Module] = [conv_bn_act(in_channels, self.widths[0], self.stem_kernel, stride=2, conv=first)]
        if self.stem_pool:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        stages = []
        channels = self.widths[0]
        for i, (width, depth) in enumerate(zip(self.widths, self.depths)):
            blocks = [BasicBlock(channels, width, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.init_weights()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class ResNetTiny(ResNet):
    name = "resnet_tiny"
    widths = (24, 48, 96)
    depths = (1, 1, 1)


class ResNetSmall(ResNet):
    name = "resnet_small"
    widths = (32, 64, 128, 256)
    depths = (1, 2, 2, 1)


class ResNet18(ResNet):
    name = "resnet18"
    widths = (64, 128, 256, 512)
    depths = (2, 2, 2, 2)
    stem_kernel = 7
    stem_pool = True
