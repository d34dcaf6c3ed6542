"""`base train`'s settings: what a run is asked for (:class:`TrainOptions`, train_base's keywords),
the model configuration recorded in model.json (:class:`TrainConfig`), one run's context
(:class:`TrainRun`) and the checks at the boundary, before any data is read."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from stackkit.contract import LABELS, Workdir, check_model_name
from stackkit.errors import StackkitError

from base_models import DEFAULT_WINDOWS
from base_models.data import MAX_CONTEXT, center_channels, context_offsets

WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.25
# OneCycleLR divides by the warm-up length: a tiny run (a few batches) gets a schedule long enough to
# have one, and stops early in it
MIN_SCHEDULE_STEPS = int(math.ceil(2 / WARMUP_FRACTION)) + 1
# A context model starts as the center-slice model (its neighbor weights are zero) and learns
# what the neighbors add at this fraction of the learning rate. On the demo data (seed 0, 9
# epochs, OOF weighted log loss, all with the z-order flip below): one learning rate for all
# weights 0.187, x0.3 0.199, x0.1 0.182; the center-slice model 0.183.
NEIGHBOR_LR_SCALE = 0.1


@dataclass(frozen=True)
class TrainOptions:
    """What `base train` is asked for: :func:`base_models.train.train_base`'s keywords (see its docstring)."""

    name: str
    arch: str = "resnet_tiny"
    context: int = 0
    epochs: int = 9
    batch_size: int = 16
    lr: float = 5e-3
    img_size: int = 64
    folds: list[int] | None = None
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    tta: bool = False
    workers: int = 0
    windows: list[tuple[float, float]] | None = None
    progress: bool = True
    decode_workers: int | None = None
    on_fold_done: Callable[[int], None] | None = None
    embeddings: bool = True
    amp: bool = True
    pretrained: bool = False
    weights: str | os.PathLike | None = None
    pseudo_labels: list | None = None


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    context: int
    epochs: int
    batch_size: int
    lr: float
    img_size: int
    seed: int
    tta: bool
    windows: tuple[tuple[float, float], ...]
    amp: bool = True  # mixed precision on CUDA (never on the CPU)
    pretrained: bool = False  # timm's published weights (timm: architectures)
    weights: tuple[str, str] | None = None  # (path, sha256) of a .safetensors file (timm: architectures)
    pseudo_labels: tuple[dict, ...] = ()  # PseudoLabels.record() per fold model

    @property
    def n_slices(self) -> int:
        return len(context_offsets(self.context))

    @property
    def in_channels(self) -> int:
        return self.n_slices * len(self.windows)

    @property
    def center_channels(self) -> tuple[int, int] | None:
        return center_channels(self.context, len(self.windows))

    def as_dict(self) -> dict:
        return {
            "arch": self.arch, "context": self.context, "epochs": self.epochs, "batch_size": self.batch_size,
            "lr": self.lr, "img_size": self.img_size, "seed": self.seed, "tta": self.tta,
            "windows": [list(w) for w in self.windows], "in_channels": self.in_channels,
            "optimizer": "AdamW", "weight_decay": WEIGHT_DECAY, "schedule": "onecycle",
            "augment": "hflip+zflip" if self.context else "hflip",
            "neighbor_lr_scale": NEIGHBOR_LR_SCALE if self.context else None,
            "amp": self.amp, "pretrained": self.pretrained,
            "weights": None if self.weights is None else {"path": self.weights[0], "sha256": self.weights[1]},
            "pseudo_labels": [dict(r) for r in self.pseudo_labels] or None,
        }

    def model_options(self) -> dict:
        """create_model's keywords beyond the channels: weights for timm architectures."""
        if not self.arch.startswith("timm:"):
            return {}
        return {"pretrained": self.pretrained, "weights": None if self.weights is None else self.weights[0]}


@dataclass
class TrainRun:
    """One `base train` call once its inputs are read: the work directory, the options, the model
    configuration, the device and process group, the core tables and the folds."""

    wd: Workdir
    options: TrainOptions
    config: TrainConfig
    dev: object  # torch.device
    env: object  # base_models.distributed.DistEnv
    metadata: object  # pandas frames of stackkit.contract.validate.load_core
    labels: object
    fold_frame: object
    available: list[int]
    requested: list[int]
    pseudo: tuple = ()
    targets: object = None  # base_models.targets.TrainTargets: the columns learnt, their loss weights, a unit task's data/

    @property
    def columns(self) -> tuple[str, ...]:
        """What the model's heads predict: the six labels, or a unit task's prediction columns."""
        return LABELS if self.targets is None else tuple(self.targets.columns)

    @property
    def name(self) -> str:
        return self.options.name


# --- validation at the boundary ------------------------------------------------------------------


def train_config(options: TrainOptions, default_windows=DEFAULT_WINDOWS) -> TrainConfig:
    """The model configuration of ``options``, checked (a bad option is one line before any data is read);
    ``default_windows``: the task's pixel windows, used when ``options.windows`` is None."""
    windows = options.windows
    try:
        windows = tuple((float(c), float(w)) for c, w in (default_windows if windows is None else windows))
    except (TypeError, ValueError):
        raise StackkitError(f"windows {windows!r}: expected a list of (center, width) pairs in HU") from None
    _check_options(options, windows)
    from base_models.archs.timm_models import weights_option

    o = options
    config = TrainConfig(o.arch, int(o.context), int(o.epochs), int(o.batch_size), float(o.lr), int(o.img_size), int(o.seed),
                         bool(o.tta), windows, amp=bool(o.amp), pretrained=bool(o.pretrained),
                         weights=weights_option(o.arch, o.pretrained, o.weights))
    _probe_model(config)
    return config


def _check_options(options: TrainOptions, windows) -> None:
    from base_models.archs import ARCHITECTURES

    name, arch, context, lr, workers = options.name, options.arch, options.context, options.lr, options.workers

    check_model_name(name, "--name")
    if isinstance(arch, str) and arch.startswith("timm:"):
        from base_models.archs.timm_models import check_timm_arch

        check_timm_arch(arch)
    elif arch not in ARCHITECTURES:
        raise StackkitError(f"--arch {arch!r}: unknown architecture; choose one of {', '.join(ARCHITECTURES)}")
    if context not in range(MAX_CONTEXT + 1):
        raise StackkitError(f"--context {context!r}: expected 0, 1 or 2 (neighbor slices on each side)")
    checks = (("--epochs", options.epochs, 1), ("--batch-size", options.batch_size, 2), ("--img-size", options.img_size, 16))
    for option, value, low in checks:
        if not isinstance(value, (int, np.integer)) or value < low:
            raise StackkitError(f"{option} {value!r}: expected an integer >= {low}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise StackkitError(f"--lr {lr!r}: expected a positive number")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise StackkitError(f"--workers {workers!r}: expected an integer >= 0")
    if not windows:
        raise StackkitError("windows: expected at least one (center, width) pair")
    for window in windows:
        if not all(math.isfinite(v) for v in window) or window[1] <= 0:
            raise StackkitError(f"window {window!r}: expected (center, width) in HU with width > 0")


def _probe_model(config: TrainConfig) -> None:
    """Build the model once before any data is read: a name, weights file or hub that fails is one line now."""
    if config.arch.startswith("timm:"):
        from base_models.archs import create_model

        create_model(config.arch, config.in_channels, len(LABELS), center_channels=config.center_channels,
                     **config.model_options())


def resolve_device(device: str):
    import torch

    text = str(device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise StackkitError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise StackkitError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StackkitError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise StackkitError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def resolve_folds(folds, available: list[int]) -> list[int]:
    if folds is None:
        return list(available)
    requested = sorted({int(f) for f in folds})
    unknown = [f for f in requested if f not in available]
    if not requested or unknown:
        raise StackkitError(
            f"--folds {','.join(map(str, folds)) or '(empty)'}: data/folds.parquet has folds "
            f"{','.join(map(str, available))}; pick among them"
        )
    return requested
