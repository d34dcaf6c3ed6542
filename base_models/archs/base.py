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


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free (a BatchNorm follows), size-preserving padding."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, act: bool = True,
                conv: nn.Module | None = None) -> nn.Sequential:
    """Convolution (``conv`` if given, else a plain bias-free one) + BatchNorm (+ ReLU)."""
    if conv is None:
        conv = conv2d(in_channels, out_channels, kernel_size, stride)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ContextConv(nn.Module):
    """The first convolution of a context model: the center slice's channels and the neighbor
    slices' channels go through separate weights whose outputs are summed.

    Mathematically one convolution over all channels; split so that the neighbors' weights can
    start at zero and learn at their own (lower) rate. With Adam a zero-initialized weight that
    shares the center's learning rate reaches full size within a few dozen steps, and on the
    synthetic data such a model lost to the center-slice model.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, center: tuple[int, int],
                 convs: tuple[nn.Module, nn.Module] | None = None):
        super().__init__()
        lo, hi = int(center[0]), int(center[1])
        if not 0 <= lo < hi <= in_channels or hi - lo == in_channels:
            raise ValueError(f"center channels {center!r} must be a proper sub-range of 0..{in_channels}")
        self.center_range = (lo, hi)
        if convs is None:
            convs = (conv2d(hi - lo, out_channels, kernel_size, stride), conv2d(in_channels - (hi - lo), out_channels, kernel_size, stride))
        self.center, self.neighbors = convs

    @classmethod
    def around(cls, center_conv: nn.Conv2d, neighbor_conv: nn.Conv2d, in_channels: int, center: tuple[int, int]) -> "ContextConv":
        """A ContextConv over existing convolutions (e.g. a pretrained first layer and its neighbor twin)."""
        return cls(in_channels, center_conv.out_channels, center_conv.kernel_size, center_conv.stride, center,
                   convs=(center_conv, neighbor_conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.center_range
        return self.center(x[:, lo:hi]) + self.neighbors(torch.cat((x[:, :lo], x[:, hi:]), dim=1))


class BaseArch(nn.Module, abc.ABC):
    """Feature extractor + global average pooling + dropout + linear head (logits)."""

    #: registry name, set by each subclass
    name: str = ""

    def __init__(self, in_channels: int, n_outputs: int = 6, *, feature_dim: int, dropout: float = 0.1,
                 center_channels: tuple[int, int] | None = None):
        super().__init__()
        if in_channels < 1 or n_outputs < 1:
            raise ValueError(f"in_channels and n_outputs must be >= 1, got {in_channels}, {n_outputs}")
        self.in_channels = in_channels
        #: (start, stop) of the center slice's channels in a context model's input; None: one slice
        self.center_channels = None if center_channels is None else tuple(int(c) for c in center_channels)
        self.n_outputs = n_outputs
        self.feature_dim = feature_dim
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, n_outputs)

    def input_conv(self, out_channels: int, kernel_size: int, stride: int) -> nn.Module:
        """The first convolution over the input: a :class:`ContextConv` for a context model."""
        if self.center_channels is None:
            return conv2d(self.in_channels, out_channels, kernel_size, stride)
        return ContextConv(self.in_channels, out_channels, kernel_size, stride, self.center_channels)

    def neighbor_parameters(self) -> list[nn.Parameter]:
        """The weights that see the neighbor slices (empty without context)."""
        return [m.neighbors.weight for m in self.modules() if isinstance(m, ContextConv)]

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, feature_dim, h, w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(pooled))

    def init_weights(self, prior: torch.Tensor | None = None) -> None:
        """He init for convolutions; zero the last BN of residual branches (they start as identity)
        and the neighbor-slice weights (a context model starts as the center-slice model); the
        head's bias at logit(prior) so training starts from the label frequencies."""
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
        self.init_head(prior)

    def init_head(self, prior: torch.Tensor | None = None) -> None:
        """Zero the neighbor-slice weights; the head's weights small and its bias at logit(prior)."""
        for weight in self.neighbor_parameters():
            nn.init.zeros_(weight)
        nn.init.normal_(self.head.weight, std=0.01)
        if prior is None:
            nn.init.zeros_(self.head.bias)
        else:
            p = prior.clamp(1e-4, 1 - 1e-4).to(self.head.bias.dtype)
            with torch.no_grad():
                self.head.bias.copy_(torch.log(p / (1 - p)))
