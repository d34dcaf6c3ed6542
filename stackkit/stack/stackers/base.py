"""The level-2 stacker interface and the helpers every implementation shares.

One small abstract base (:class:`Stacker`), one module per implementation, helpers written once
here: threads, label weights and priors, probability clipping, saving / loading model files with
sha256 sidecars. The inputs and their checks are :mod:`stackkit.stack.inputs`; the per-label GBDT
base is :mod:`.gbdt`, the torch base :mod:`.neural`.

Data passed to a stacker is a :class:`StackData`: the per-slice feature matrix plus the study
structure (study code and slice position) so that sequence models see whole studies, and the
labels when fitting. Every stacker takes the same ``fit(train, valid, params, seed)`` /
``predict(data)`` signature whether it uses the study structure or not.

Missing features: GBDT stackers (``lgbm``, ``xgb``) take NaN as "missing" natively. Neural
stackers (``mlp``, ``seq``, ``seq_emb``, ``transformer``) standardize every feature with the training mean / std, replace NaN
by 0 (the training mean after standardization) and append one 0/1 missing-indicator column for
each feature that had a NaN in the training rows. Infinite features are refused by every stacker.

Saved files: each model file ``F`` gets a sidecar ``F.sha256`` holding its hex digest. Loading
reads the bytes once, checks the digest and only then hands the bytes to the library (never
the path: a truncated LightGBM model file passed by path can abort the process).
"""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from stackkit.contract import LABEL_WEIGHTS, env_threads
from stackkit.contract.records import FoldModelRecord, read_fold_model_record, write_fold_model_record
from stackkit.errors import StackkitError
from stackkit.stack.inputs import N_LABELS, EmbeddingSet, StackData, check_features, check_labels


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Threads per fit: every core this process may use, unless $STACKKIT_THREADS says otherwise.
# Idle 2-core machine: one RSNA-size lgbm fold 174 s with 2 threads vs 363 s with 1. OpenMP
# spin-waits, so on a machine shared with other busy processes STACKKIT_THREADS=1 is faster.
def default_threads() -> int:
    return env_threads(available_cores())


# Predicted probabilities are kept away from 0/1 so that one confident miss cannot dominate a score.
PROB_EPS = 1e-6


def label_weights() -> np.ndarray:
    """Per-label loss weights of the competition metric (``any`` counts twice), normalized to sum 1."""
    return (LABEL_WEIGHTS / LABEL_WEIGHTS.sum()).astype(np.float32)


def label_priors(Y: np.ndarray) -> np.ndarray:
    """Smoothed per-label frequency: the prediction for a label with one class only in training."""
    return ((Y.sum(axis=0) + 0.5) / (len(Y) + 1.0)).astype(np.float64)


def clip_probabilities(P: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(P, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS).astype(np.float32)



# --- the interface ----------------------------------------------------------------------------


class Stacker(abc.ABC):
    """A level-2 model: slice features -> six probabilities.

    Subclasses set ``name`` and ``per_label`` and implement the abstract methods; ``save`` /
    ``load`` write ``stacker.json`` (name, parameters, feature count and whatever
    :meth:`_state` returns) plus the files of :meth:`_save_models`, every one with a sha256
    sidecar.
    """

    name: ClassVar[str]
    per_label: ClassVar[bool]  # one model per label (GBDT) or one multi-output model (NN)
    # reads StackData.embeddings (the base models' embeddings) when the data carries them
    uses_embeddings: ClassVar[bool] = False

    def __init__(self):
        self.params: dict | None = None
        self.n_features: int | None = None
        self._cache: dict | None = None

    # -- parameters
    @abc.abstractmethod
    def default_params(self) -> dict:
        """Parameters used when none are given: CPU-friendly, a few seconds per fold on the demo."""

    @abc.abstractmethod
    def suggest_params(self, trial) -> dict:
        """Full parameter dict with the main parameters drawn from ``trial`` (an Optuna trial)."""

    def resolve_params(self, params: dict | None) -> dict:
        """Defaults overridden by ``params``; unknown names are refused (a typo would be silently ignored)."""
        merged = self.default_params()
        unknown = sorted(set(params or {}) - set(merged))
        if unknown:
            raise StackkitError(
                f"stacker '{self.name}': unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(merged))}"
            )
        merged.update(params or {})
        return merged

    # -- fitting
    def fit(self, train: StackData, valid: StackData, params: dict | None = None, seed: int = 0, cache: dict | None = None) -> "Stacker":
        """Fit on ``train``; ``valid`` is the inner early-stopping split (never the held-out fold).

        ``cache``: a dict kept by the caller for one fold's rows across fits with other parameters
        (tuning trials): stackers may keep what does not depend on the parameters there (binned
        GBDT datasets). Only ever pass the same fold's cache with the same rows.
        """
        params = self.resolve_params(params)
        self._check_params(params)
        Y_train = check_labels(train, "training")
        Y_valid = check_labels(valid, "early-stopping")
        X_train = check_features(train, what="training")
        X_valid = check_features(valid, X_train.shape[1], what="early-stopping")
        self.params = params
        self.n_features = int(X_train.shape[1])
        self._cache = cache
        try:
            self._fit(train, valid, X_train, Y_train, X_valid, Y_valid, params, int(seed))
        finally:
            self._cache = None
        return self

    def predict(self, data: StackData) -> np.ndarray:
        """(n, 6) float32 probabilities in LABELS order."""
        if self.n_features is None:
            raise StackkitError(f"stacker '{self.name}' is not fitted; call fit() or load() first")
        X = check_features(data, self.n_features, what="prediction")
        if len(X) == 0:
            return np.zeros((0, N_LABELS), dtype=np.float32)
        return clip_probabilities(self._predict(data, X))

    def feature_importance(self) -> np.ndarray | None:
        """(n_features, 6) total gain per feature and label for tree models, else None."""
        return None

    def _check_params(self, params: dict) -> None:
        """Refuse, before any work, parameters this machine cannot honour (a torch stacker on a missing GPU)."""

    def fits_folds_apart(self, params: dict) -> bool:
        """Whether a K-fold fit with ``params`` runs its folds in separate processes, one per core
        (:mod:`stackkit.stack.folds`): for a stacker that uses one thread and leaves the other cores idle."""
        return False

    def prediction_scope(self):
        """Context inside which several fitted models of this stacker predict at once, one per thread of
        this process (:func:`stackkit.stack.crossfit.predict_test_sets`, for a stacker that fits its folds apart)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def _fit(self, train, valid, X_train, Y_train, X_valid, Y_valid, params: dict, seed: int) -> None: ...

    @abc.abstractmethod
    def _predict(self, data: StackData, X: np.ndarray) -> np.ndarray: ...

    # -- persistence
    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the fitted model into ``directory``; returns the files written (sidecars excluded)."""
        if self.n_features is None:
            raise StackkitError(f"stacker '{self.name}' is not fitted; nothing to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = self._save_models(directory)
        # stacker.json last: its presence marks a complete model directory
        written.append(write_fold_model_record(directory, FoldModelRecord(self.name, self.params, self.n_features, self._state())))
        return written

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Stacker":
        directory = Path(directory)
        record = read_fold_model_record(directory, cls.name)
        stacker = cls()
        stacker.params = record.params
        stacker.n_features = record.n_features
        stacker._load_models(directory, record.state)
        return stacker

    def _state(self) -> dict:
        """Small JSON-able state saved in stacker.json besides the model files."""
        return {}

    @abc.abstractmethod
    def _save_models(self, directory: Path) -> list[Path]: ...

    @abc.abstractmethod
    def _load_models(self, directory: Path, state: dict) -> None: ...


__all__ = ["N_LABELS", "EmbeddingSet", "StackData", "Stacker", "available_cores", "check_features",
           "check_labels", "clip_probabilities", "default_threads", "label_priors", "label_weights"]
