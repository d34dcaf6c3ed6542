"""Architectures by name: ``ARCHITECTURES`` maps each registry name to its class.

Add a family by writing one module with :class:`~base_models.archs.base.BaseArch` subclasses
and listing them here. ``timm:<name>`` names any timm model (``base_models.archs.timm_models``,
imported only then).
"""

from __future__ import annotations

from stackkit.errors import StackkitError

from base_models.archs.base import BaseArch
from base_models.archs.resnet import ResNet18, ResNetSmall, ResNetTiny

ARCHITECTURES: dict[str, type[BaseArch]] = {cls.name: cls for cls in (ResNetTiny, ResNetSmall, ResNet18)}


def create_model(arch: str, in_channels: int, n_outputs: int = 6, **kwargs) -> BaseArch:
    """``arch`` built for ``in_channels``; ``pretrained`` and ``weights`` (keywords) only for ``timm:`` models."""
    if arch.startswith("timm:"):
        from base_models.archs.timm_models import TimmArch

        return TimmArch(arch, in_channels, n_outputs, **kwargs)
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise StackkitError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}") from None
    return cls(in_channels, n_outputs, **kwargs)


__all__ = ["ARCHITECTURES", "BaseArch", "create_model"]
