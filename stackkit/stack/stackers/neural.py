"""The torch stacker base (:class:`NeuralStacker`: ``mlp``, ``seq``, ``seq_emb``, ``transformer``):
the feature scaler, the training loop and the device helpers (torch imported inside the functions only).

Missing features: every feature is standardized with the training mean / std, NaN replaced by 0
(the training mean after standardization) and one 0/1 missing-indicator column appended for each
feature that had a NaN in the training rows (:class:`FeatureScaler`).
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stackkit.contract import FoldModelFiles
from stackkit.contract.codecs import npz_bytes, read_npz
from stackkit.contract.io import read_artifact, write_artifact
from stackkit.errors import StackkitError, one_line
from stackkit.metric import weighted_bce
from stackkit.stack.inputs import StackData
from stackkit.stack.stackers.base import Stacker, label_weights


@dataclass(frozen=True)
class FeatureScaler:
    """Standardization + NaN handling for neural stackers (see the module docstring)."""

    mean: np.ndarray
    scale: np.ndarray
    indicator_columns: np.ndarray  # features that had a NaN in training: get a 0/1 missing column

    @classmethod
    def fit(cls, X: np.ndarray, block: int = 64) -> "FeatureScaler":
        """Training mean / std per column, in float64 over blocks of ``block`` columns (no full float64 copy)."""
        X = np.asarray(X)
        n_columns = X.shape[1]
        mean = np.zeros(n_columns, dtype=np.float64)
        std = np.ones(n_columns, dtype=np.float64)
        any_missing = np.zeros(n_columns, dtype=bool)
        for start in range(0, n_columns, block):
            part = np.asarray(X[:, start : start + block], dtype=np.float64)
            missing = np.isnan(part)
            all_missing = missing.all(axis=0)
            filled = np.where(all_missing, 0.0, part)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: handled by all_missing
                mean[start : start + block] = np.where(all_missing, 0.0, np.nanmean(filled, axis=0))
                std[start : start + block] = np.where(all_missing, 1.0, np.nanstd(filled, axis=0))
            any_missing[start : start + block] = missing.any(axis=0)
        # constant columns would divide by zero; they carry no signal anyway
        scale = np.where(std > 1e-12, std, 1.0)
        return cls(mean.astype(np.float32), scale.astype(np.float32), np.flatnonzero(any_missing).astype(np.int64))

    @property
    def n_outputs(self) -> int:
        return len(self.mean) + len(self.indicator_columns)

    def transform(self, X: np.ndarray, *, pad_rows: int = 0, block_map=None, rows_per_block: int = 8192) -> np.ndarray:
        """Standardized float32 rows, then ``pad_rows`` rows of zeros (where a sequence batch's padding
        points). Written block by block into the one output array: at RSNA size (870k rows x ~1,000
        features, 3.4 GB) whole-array temporaries would triple the peak. ``block_map``: applied to each
        block of raw rows first (a study's reversal), so no transformed copy of ``X`` is made either."""
        X = np.asarray(X)
        n_rows, n_columns = len(X), len(self.mean)
        out = np.zeros((n_rows + int(pad_rows), self.n_outputs), dtype=np.float32)
        for start in range(0, n_rows, rows_per_block):
            part = np.asarray(X[start : start + rows_per_block], dtype=np.float32)
            if block_map is not None:
                part = block_map(part)
            missing = np.isnan(part)
            Z = (part - self.mean) / self.scale
            Z[missing] = 0.0
            out[start : start + len(part), :n_columns] = Z
            out[start : start + len(part), n_columns:] = missing[:, self.indicator_columns]
        return out

    def to_bytes(self) -> bytes:
        return npz_bytes(mean=self.mean, scale=self.scale, indicator_columns=self.indicator_columns)

    @classmethod
    def from_bytes(cls, raw: bytes, source) -> "FeatureScaler":
        arrays = read_npz(raw, source, "feature-scaler file", ("mean", "scale", "indicator_columns"))
        return cls(arrays["mean"], arrays["scale"], arrays["indicator_columns"])


# --- shared helpers for torch stackers (torch imported inside the functions only) -----------------


def fit_device(requested, stacker: str):
    """The ``torch.device`` a torch stacker fits on, from its ``device`` parameter (cpu, cuda or cuda:N).

    The one place every torch stacker refuses a GPU this machine does not have: a one-line
    :class:`StackkitError` at fit time, before any work. (``stack fit --device cuda`` refuses
    earlier still, in :func:`stackkit.stack.fit.resolve_device`.)
    """
    import torch

    try:
        device = torch.device(str(requested))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise StackkitError(f"stacker '{stacker}': device must be cpu, cuda or cuda:N, got {requested!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StackkitError(f"stacker '{stacker}': device {requested!r} but no CUDA GPU is visible "
                                "(torch.cuda.is_available() is False); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StackkitError(f"stacker '{stacker}': device {requested!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                                "use --device cuda or cpu")
    return device


def predict_device(requested):
    """Where a fitted torch stacker predicts: the device it was fitted for when this machine has it, else the CPU
    (models are saved as CPU state_dicts, so a model fitted on a GPU predicts anywhere)."""
    import torch

    try:
        device = torch.device(str(requested or "cpu"))
    except RuntimeError:  # not a device name (a hand-edited stacker.json): the CPU
        return torch.device("cpu")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        return torch.device("cpu")
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


@contextlib.contextmanager
def torch_threads(n_threads: int):
    """torch's (process-wide) intra-op thread count set to ``n_threads`` inside, restored after; left
    alone when it is already that, so models predicting at once on threads never race to set it."""
    import torch

    previous = torch.get_num_threads()
    if previous != int(n_threads):
        torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def to_device(prepared, device):
    """Every tensor in ``prepared`` (a tensor, or a tuple/list/dict of them) on ``device``; anything else as it is."""
    if device.type == "cpu":
        return prepared
    if isinstance(prepared, dict):
        return {k: to_device(v, device) for k, v in prepared.items()}
    if isinstance(prepared, (tuple, list)):
        return type(prepared)(to_device(v, device) for v in prepared)
    return prepared.to(device) if hasattr(prepared, "to") and hasattr(prepared, "device") else prepared


class NeuralStacker(Stacker):
    """One multi-output torch network; subclasses say how to build it and how to batch rows.

    Training: weighted BCE (metric weights, ``any`` twice), Adam, early stopping on the inner
    split's loss with the best epoch's weights kept. Inputs go through :class:`FeatureScaler`.
    Randomness comes from ``seed`` only (a forked torch RNG), so a fit is repeatable.

    Device: the ``device`` parameter (``cpu``, ``cuda``, ``cuda:N``; :func:`fit_device` refuses a
    GPU that is not there). The module, every batch and the loss live there, in float32; the
    fitted module is kept and saved on the CPU, and predicts on the CPU where the GPU is missing.
    """

    per_label = False

    def __init__(self):
        super().__init__()
        self.scaler: FeatureScaler | None = None
        self.module = None

    @abc.abstractmethod
    def _build_module(self, n_inputs: int, params: dict): ...

    @abc.abstractmethod
    def _prepare(self, X: np.ndarray, data: StackData, Y: np.ndarray | None):
        """Arrays/tensors the batching and prediction below work on, from the raw features ``X``
        (standardize them with :meth:`_standardize`)."""

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return self.scaler.transform(X)

    def _fit_inputs(self, train: StackData, X_train: np.ndarray, params: dict) -> None:
        """Hook before the module is built: fit whatever else the inputs need (the scaler is fitted)."""

    def _check_params(self, params: dict) -> None:
        fit_device(params.get("device", "cpu"), self.name)

    def fits_folds_apart(self, params: dict) -> bool:
        # a GPU is shared by the folds; several threads already use the cores
        return str(params.get("device", "cpu")) == "cpu" and int(params["num_threads"]) == 1

    def _to_device(self, prepared, device):
        """What :meth:`_prepare` returned, moved to ``device`` once per fit or prediction (all of its tensors by default)."""
        return to_device(prepared, device)

    @abc.abstractmethod
    def _train_batches(self, module, prepared, params: dict, generator):
        """Yield (logits, targets, mask-or-None) for one shuffled epoch."""

    @abc.abstractmethod
    def _predict_logits(self, module, prepared, params: dict, tta: bool):
        """(n, 6) logits tensor in the rows' original order."""

    def _fit(self, train, valid, X_train, Y_train, X_valid, Y_valid, params, seed) -> None:
        import copy

        import torch

        device = fit_device(params.get("device", "cpu"), self.name)
        self.scaler = FeatureScaler.fit(X_train)
        self._fit_inputs(train, X_train, params)
        prepared_train = self._to_device(self._prepare(X_train, train, Y_train), device)
        prepared_valid = self._to_device(self._prepare(X_valid, valid, None), device)
        targets_valid = torch.from_numpy(Y_valid).to(device)
        weights = torch.from_numpy(label_weights()).to(device)
        with torch_threads(int(params["num_threads"])):
            # the GPU's RNG (dropout on a GPU) is seeded and restored too
            rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                module = self._build_module(self.scaler.n_outputs, params).to(device)
                optimizer = torch.optim.AdamW(module.parameters(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"]))
                best_loss, best_state, stale = float("inf"), copy.deepcopy(module.state_dict()), 0
                for _epoch in range(int(params["max_epochs"])):
                    module.train()
                    for logits, targets, mask in self._train_batches(module, prepared_train, params, generator):
                        loss = weighted_bce(logits, targets, weights, mask)
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                    module.eval()
                    with torch.no_grad():
                        # score what prediction returns (with its test-time augmentation, if any)
                        valid_loss = float(weighted_bce(self._predict_logits(module, prepared_valid, params, True), targets_valid, weights))
                    if valid_loss < best_loss - 1e-5:
                        best_loss, best_state, stale = valid_loss, copy.deepcopy(module.state_dict()), 0
                    else:
                        stale += 1
                        if stale >= int(params["patience"]):
                            break
                module.load_state_dict(best_state)
                module.eval()
        self.module = module.cpu() if device.type != "cpu" else module  # saved and reloaded on any machine

    def _predict(self, data, X) -> np.ndarray:
        import torch

        with torch_threads(int(self.params["num_threads"])):
            device = predict_device(self.params.get("device", "cpu"))  # a model fitted on a GPU predicts on a machine without one
            prepared = self._to_device(self._prepare(X, data, None), device)
            module = self.module.to(device)
            try:
                with torch.no_grad():
                    return torch.sigmoid(self._predict_logits(module, prepared, self.params, True)).cpu().numpy()
            finally:
                self.module = module.cpu()

    def prediction_scope(self):
        return torch_threads(int(self.params["num_threads"]))

    def _state(self) -> dict:
        return {"n_inputs": self.scaler.n_outputs}

    def _save_models(self, directory: Path) -> list[Path]:
        import io

        import torch

        buffer = io.BytesIO()
        # CPU tensors whatever device fitted it: loadable with weights_only=True on a machine without a GPU
        torch.save(self.module.cpu().state_dict(), buffer)
        return [
            write_artifact(FoldModelFiles(directory).torch_model, buffer.getvalue()),
            write_artifact(FoldModelFiles(directory).scaler, self.scaler.to_bytes()),
        ]

    def _load_models(self, directory: Path, state: dict) -> None:
        import io
        import pickle  # only for its error type: weights_only=True never unpickles objects

        import torch

        scaler_path, model_path = FoldModelFiles(directory).scaler, FoldModelFiles(directory).torch_model
        self.scaler = FeatureScaler.from_bytes(read_artifact(scaler_path), scaler_path)
        raw = read_artifact(model_path)
        module = self._build_module(int(state["n_inputs"]), self.params)
        try:
            module.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
        except (RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            raise StackkitError(f"{model_path}: not a readable {self.name} state_dict ({one_line(exc)}); refit with `stack fit`") from exc
        module.eval()
        self.module = module
