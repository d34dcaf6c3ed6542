"""Any timm model as a backbone: ``--arch timm:<name>`` (e.g. ``timm:resnet18``, ``timm:efficientnet_b0``).

The backbone is ``timm.create_model(name, num_classes=0)``; its features are
``forward_features`` and the pooled features (the embeddings) ``forward_head(pre_logits=True)``;
BaseArch adds dropout and the linear head. Weights: random (the default), timm's published ones
(``pretrained=True``, fetched by timm from its hub) or a local ``.safetensors`` file of the
timm model's state_dict (``weights=PATH``: how offline Kaggle kernels bring weights). With
context the model's first convolution (``pretrained_cfg['first_conv']``) sees the center slice's
channels, with the loaded filters, and a zero-initialized twin sees the neighbors (as the
built-in architectures' :class:`~base_models.archs.base.ContextConv`).

timm is imported only here, when such a model is asked for.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

from stackkit.contract import file_sha256
from stackkit.errors import StackkitError

from base_models.archs.base import BaseArch, ContextConv

PREFIX = "timm:"
#: torch.library definitions kept alive for the process (see import_timm)
_TORCHVISION_FALLBACK: list = []


def import_timm():
    """``import timm``, also beside a torchvision whose compiled operators cannot load.

    PyPI's x86_64 torchvision is a CUDA build: beside the CPU build of torch its ``_C`` extension
    fails to load, which torchvision tolerates (its ops are then unavailable) except that two
    fake-kernel registrations (``torchvision::nms``, ``qnms``) are made unconditionally and kill
    the import ('operator torchvision::nms does not exist'). timm needs none of those operators:
    their schemas are declared here, without kernels, and the import is retried."""
    try:
        import timm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for module in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[module]
        fragment = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            fragment.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_FALLBACK.append(fragment)
        import timm
    return timm


def timm_name(arch: str) -> str | None:
    """``timm:<name>`` -> ``<name>``; None for any other architecture name."""
    return arch[len(PREFIX):] if arch.startswith(PREFIX) else None


def check_timm_arch(arch: str) -> None:
    """One line for a timm model name timm does not know, with its closest names."""
    name = timm_name(arch)
    timm = import_timm()
    if name and timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6) if name else []
    hint = f"similar: {', '.join(close)}" if close else "see timm.list_models('*PATTERN*')"
    raise StackkitError(f"--arch {arch!r}: timm has no model {name!r}; {hint}")


def weights_option(arch, pretrained, weights) -> tuple[str, str] | None:
    """--pretrained / --weights: timm architectures only, one of them; (path, sha256) of the weights file."""
    if (pretrained or weights is not None) and not str(arch).startswith("timm:"):
        option = "--pretrained" if pretrained else f"--weights {weights}"
        raise StackkitError(f"{option}: only for --arch timm:<name> (the built-in architectures train from scratch)")
    if pretrained and weights is not None:
        raise StackkitError(f"--weights {weights}: give --pretrained (timm's published weights) or --weights FILE, not both")
    if weights is None:
        return None
    path = Path(weights)
    if not path.is_file():
        raise StackkitError(f"--weights {weights}: no such file")
    return str(path), file_sha256(path)


def _first_conv_name(backbone) -> str:
    name = backbone.pretrained_cfg.get("first_conv")
    return name[0] if isinstance(name, (list, tuple)) else name


def _classifier_prefixes(backbone) -> tuple[str, ...]:
    names = backbone.pretrained_cfg.get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def _weight_mismatch(expected: dict, given: dict) -> str | None:
    """The first key (in the model's order) where ``given`` does not fit ``expected``, described."""
    for key, value in expected.items():
        if key not in given:
            return f"{key} missing"
        if tuple(given[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(given[key].shape)}, the model {tuple(value.shape)}"
    extra = [k for k in given if k not in expected]
    return f"{extra[0]} is not in the model" if extra else None


def load_weights(backbone, path: Path, arch: str) -> None:
    """A timm model's state_dict from a ``.safetensors`` file into ``backbone`` (num_classes=0).

    The file's classifier is dropped (stackkit has its own head) and its first convolution is
    adapted to the backbone's input channels as timm does for pretrained weights; anything else
    that does not fit is one line naming the file and the first key that does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from timm.models import adapt_input_conv

    path = Path(path)
    if path.suffix != ".safetensors":
        raise StackkitError(f"--weights {path}: expected a .safetensors file (pickled checkpoints are not loaded)")
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise StackkitError(f"--weights {path}: no such file") from None
    except (SafetensorError, OSError) as exc:
        raise StackkitError(f"--weights {path}: not a readable safetensors file ({exc})") from None
    drop = _classifier_prefixes(backbone)
    state = {k: v for k, v in state.items() if not (drop and k.startswith(drop))}
    expected = backbone.state_dict()
    conv_key = f"{_first_conv_name(backbone)}.weight"
    if conv_key in state and conv_key in expected and state[conv_key].ndim == 4:
        if state[conv_key].shape[1] != expected[conv_key].shape[1]:
            state[conv_key] = adapt_input_conv(int(expected[conv_key].shape[1]), state[conv_key])
    problem = _weight_mismatch(expected, state)
    if problem:
        raise StackkitError(f"--weights {path}: does not fit {arch}: {problem}")
    backbone.load_state_dict(state, strict=True)


def create_backbone(arch: str, in_chans: int, pretrained: bool):
    """timm's model without its classifier; ``pretrained`` fetches timm's published weights."""
    timm = import_timm()
    check_timm_arch(arch)
    if not pretrained:
        return timm.create_model(timm_name(arch), pretrained=False, num_classes=0, in_chans=in_chans)
    try:
        return timm.create_model(timm_name(arch), pretrained=True, num_classes=0, in_chans=in_chans)
    except Exception as exc:  # hub, network and missing-weights errors come in many types
        raise StackkitError(
            f"--pretrained: timm could not fetch the published weights of {arch} ({type(exc).__name__}); "
            "offline, pass --weights FILE.safetensors (the timm model's state_dict, saved where its hub can be reached)"
        ) from None


def _context_first_conv(backbone, in_channels: int, center: tuple[int, int], arch: str) -> None:
    """Replace the first convolution by a ContextConv: the original for the center channels and
    a twin of the same geometry for the neighbors (zeroed by ``init_weights``)."""
    name = _first_conv_name(backbone)
    conv = backbone.get_submodule(name) if name else None
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise StackkitError(f"--context with {arch}: its first layer ({name!r}) is not a plain convolution; use --context 0")
    neighbors = copy.deepcopy(conv)
    n_neighbor = in_channels - (center[1] - center[0])
    neighbors.weight = nn.Parameter(conv.weight.new_zeros((conv.out_channels, n_neighbor, *conv.kernel_size)))
    neighbors.register_parameter("bias", None)
    neighbors.in_channels = n_neighbor
    parent_name, _, child = name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, child, ContextConv.around(conv, neighbors, in_channels, center))


class _PreLogits(nn.Module):
    """timm's own pooling (and whatever its head does before the classifier): (B, ...) -> (B, D)."""

    def __init__(self, backbone):
        super().__init__()
        self.forward_head = backbone.forward_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(x, pre_logits=True)


class TimmArch(BaseArch):
    """A timm backbone + BaseArch's dropout and linear head; ``name`` is ``timm:<model>``."""

    def __init__(self, arch: str, in_channels: int, n_outputs: int = 6, *, dropout: float = 0.1,
                 center_channels: tuple[int, int] | None = None, pretrained: bool = False, weights: str | None = None):
        center = None if center_channels is None else tuple(int(c) for c in center_channels)
        stem_channels = in_channels if center is None else center[1] - center[0]
        backbone = create_backbone(arch, stem_channels, pretrained and weights is None)
        # what forward_head(pre_logits=True) returns: num_features, or a wider head's (e.g. MobileNetV3)
        pooled_dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        super().__init__(in_channels, n_outputs, feature_dim=int(pooled_dim), dropout=dropout,
                         center_channels=center)
        self.name = arch
        if weights is not None:
            load_weights(backbone, weights, arch)
        if center is not None:
            _context_first_conv(backbone, in_channels, center, arch)
        self.backbone = backbone
        self.pool = _PreLogits(backbone)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def init_weights(self, prior: torch.Tensor | None = None) -> None:
        """The backbone keeps its weights (timm's initialization, or the loaded ones); only the
        neighbor-slice weights are zeroed and the head initialized (see BaseArch.init_weights)."""
        self.init_head(prior)
