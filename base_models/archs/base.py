"""The abstract base every architecture derives from, and the building blocks they share.

An architecture maps (batch, in_channels, H, W) float images to (batch, n_outputs) logits.
Subclasses implement :meth:`BaseArch.features` (a feature map of ``feature_dim`` channels);
the base adds global average pooling, dropout and the linear head, so any input size from
about 32 to 512 px works.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BaseArch(nn.Module, abc.ABC):
    """Feature extractor + global average pooling + dropout + linear head (logits)."""

    #: registry name, set by each subclass
    name: str = ""

    def __init__(self, in_channels: int, n_outputs: int = 6, *, feature_dim: int, dropout: float = 0.1):
        super().__init__()
        if in_channels < 1 or n_outputs < 1:
            raise ValueError(f"in_channels and n_outputs must be >= 1, got {in_channels}, {n_outputs}")
        self.in_channels = in_channels
        self.n_outputs = n_outputs
        self.feature_dim = feature_dim
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, n_outputs)

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, feature_dim, h, w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(pooled))

    def init_weights(self, prior: torch.Tensor | None = None) -> None:
        """He init for convolutions; zero the last BN of residual branches (they start as identity);
        the head's bias at logit(prior) so training starts from the label frequencies."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            last_bn = getattr(module, "last_bn", None)
            if isinstance(last_bn, nn.BatchNorm2d):
                nn.init.zeros_(last_bn.weight)
        nn.init.normal_(self.head.weight, std=0.01)
        if prior is None:
            nn.init.zeros_(self.head.bias)
        else:
            p = prior.clamp(1e-4, 1 - 1e-4).to(self.head.bias.dtype)
            with torch.no_grad():
                self.head.bias.copy_(torch.log(p / (1 - p)))

    def scale_input_channels(self, channels, factor: float) -> None:
        """Multiply the first convolution's weights on ``channels`` by ``factor``.

        With ``factor`` 0 for the neighbor slices of a context model, training starts from a
        model that looks at the center slice only and learns how much the neighbors add.
        """
        first = next(m for m in self.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            first.weight[:, list(channels)] *= factor

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
