"""The per-label GBDT stacker base (:class:`PerLabelStacker`: ``lgbm``, ``xgb``): one booster per
label, the per-label column subsets (:func:`label_feature_columns`) and the PCA projection of the
base models' embeddings appended to the features. GBDT stackers take NaN as "missing" natively.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

import numpy as np

from stackkit.contract import LABELS, FoldModelFiles
from stackkit.contract.columns import split_column
from stackkit.contract.codecs import npz_bytes, read_npz
from stackkit.contract.io import read_artifact, write_artifact
from stackkit.errors import StackkitError
from stackkit.stack.inputs import N_LABELS, StackData
from stackkit.stack.stackers.base import Stacker, label_priors


FEATURE_SUBSETS = ("label", "all")


def label_feature_columns(feature_names, label: str) -> np.ndarray:
    """Column positions a per-label model of ``label`` reads: every model's columns of that label,
    the other labels' plain predictions (``<model>__<other>__pred``), the across-model aggregates
    of every label, and every column that belongs to no label (slice, DICOM metadata, ...).

    The other labels' lags, leads and study aggregates are left out: they cost most of the
    columns and add little to one label's model (bench/bench_stack.py measures it).
    """
    keep = []
    for position, name in enumerate(feature_names):
        column = split_column(name)
        if column is None or column.label is None:
            keep.append(position)  # not a per-label column
        elif column.label == label or not column.per_model or column.feature == "pred":
            keep.append(position)
    return np.asarray(keep, dtype=np.int64)


class PerLabelStacker(Stacker):
    """One booster per label; a label with one class only in training is predicted by its prior.

    With ``feature_subsets="label"`` each label's booster reads only :func:`label_feature_columns`
    (needs the feature names, which ``stack fit`` passes along); ``"all"`` reads every column.
    """

    per_label = True
    # parameters stackkit itself acts on (boosting schedule, columns): never passed to the library
    OWN_PARAMS: ClassVar[tuple[str, ...]] = ("num_boost_round", "early_stopping_rounds", "feature_subsets", "embedding_components")

    def _library_params(self, params: dict) -> dict:
        return {k: v for k, v in params.items() if k not in self.OWN_PARAMS}

    def __init__(self):
        super().__init__()
        self.boosters: list = []  # one per label, None where the label had one class only
        self.priors: list[float] = []
        self.label_columns: list[np.ndarray | None] = []  # per label: column positions, None = all
        self.projection = None  # per embedding model (mean, components), or None without embeddings
        self.projection_models: list[str] = []

    def _columns_for(self, feature_names, params: dict) -> list[np.ndarray | None]:
        subsets = params.get("feature_subsets", "all")
        if subsets not in FEATURE_SUBSETS:
            raise StackkitError(f"stacker '{self.name}': feature_subsets must be one of {', '.join(FEATURE_SUBSETS)}, got {subsets!r}")
        if subsets == "all" or feature_names is None:
            return [None] * N_LABELS
        return [label_feature_columns(feature_names, label) for label in LABELS]

    # -- embeddings: a low-dimensional projection appended to the features

    def _fit_projection(self, train: StackData, valid: StackData, X_train, X_valid, params: dict, seed: int):
        """(X_train, X_valid, feature names) with each model's embedding PCA appended, fitted on ``train``'s rows only."""
        components = int(params.get("embedding_components", 0))
        self.projection, self.projection_models = None, []
        if components <= 0 or not train.embeddings:
            return X_train, X_valid, train.feature_names
        from stackkit.stack.embeddings import fit_projection, project, projection_names

        emb = train.embeddings[0]
        self.projection = fit_projection(emb, np.arange(len(train)), components, seed=seed)
        self.projection_models = list(emb.names)
        names = None if train.feature_names is None else (*train.feature_names, *projection_names(emb, self.projection))
        return (np.concatenate([X_train, project(emb, self.projection)], axis=1),
                np.concatenate([X_valid, project(valid.embeddings[0], self.projection)], axis=1), names)

    def _embedding_views(self, data: StackData, X: np.ndarray) -> list[np.ndarray]:
        """The feature matrix once per embedding space of ``data`` (one per base fold model for test rows)."""
        if self.projection is None:
            return [X]
        from stackkit.stack.embeddings import project

        if not data.embeddings or list(data.embeddings[0].names) != self.projection_models:
            raise StackkitError(f"stacker '{self.name}' was fitted with the embeddings of {', '.join(self.projection_models)}; "
                                f"the data has {', '.join(data.embeddings[0].names) if data.embeddings else 'none'}: refit with `stack fit`")
        # an embedding space is only comparable within one base fold model: predict once per space, average
        return [np.concatenate([X, project(emb, self.projection)], axis=1) for emb in data.embeddings]

    def _fit(self, train, valid, X_train, Y_train, X_valid, Y_valid, params, seed) -> None:
        priors = label_priors(Y_train)
        self.priors = [float(p) for p in priors]
        X_train, X_valid, feature_names = self._fit_projection(train, valid, X_train, X_valid, params, seed)
        self.label_columns = self._columns_for(feature_names, params)
        self.boosters = []
        for j in range(N_LABELS):
            if Y_train[:, j].min() == Y_train[:, j].max():
                self.boosters.append(None)
                continue
            columns = self.label_columns[j]
            cache = None if self._cache is None else self._cache.setdefault((self.name, j, None if columns is None else len(columns)), {})
            x_fit = X_train if columns is None else X_train[:, columns]
            x_valid = X_valid if columns is None else X_valid[:, columns]
            self.boosters.append(self._fit_label(x_fit, Y_train[:, j], x_valid, Y_valid[:, j], params, seed, j, cache))

    def _predict(self, data, X) -> np.ndarray:
        views = self._embedding_views(data, X)
        out = np.zeros((len(X), N_LABELS), dtype=np.float64)
        for view in views:
            for j, booster in enumerate(self.boosters):
                columns = self.label_columns[j] if self.label_columns else None
                out[:, j] += self.priors[j] if booster is None else self._predict_label(booster, view if columns is None else view[:, columns])
        return out / len(views)

    @property
    def _n_columns(self) -> int:
        """Columns the boosters read: the features plus each embedding model's projection."""
        return self.n_features + sum(c.shape[1] for _, c in self.projection or [])

    def feature_importance(self) -> np.ndarray | None:
        gain = np.zeros((self._n_columns, N_LABELS), dtype=np.float64)
        for j, booster in enumerate(self.boosters):
            if booster is not None:
                columns = self.label_columns[j] if self.label_columns else None
                label_gain = self._label_gain(booster)
                if columns is None:
                    gain[: len(label_gain), j] = label_gain
                else:
                    gain[columns, j] = label_gain
        # the feature columns only (the importance table names them); the projection's share is left out
        return gain[: self.n_features]

    def _state(self) -> dict:
        return {"priors": self.priors, "has_booster": [b is not None for b in self.boosters],
                "label_columns": [None if c is None else [int(i) for i in c] for c in self.label_columns],
                "projection_models": self.projection_models}

    def _save_models(self, directory: Path) -> list[Path]:
        files = FoldModelFiles(directory)
        written = [
            write_artifact(files.booster(self.name, LABELS[j]), self._booster_bytes(b))
            for j, b in enumerate(self.boosters)
            if b is not None
        ]
        if self.projection is not None:
            arrays = {f"{kind}{m}": array for m, pair in enumerate(self.projection) for kind, array in zip(("mean", "components"), pair)}
            written.append(write_artifact(files.projection, npz_bytes(**arrays)))
        return written

    def _load_models(self, directory: Path, state: dict) -> None:
        self.priors = [float(p) for p in state["priors"]]
        self.projection_models = list(state.get("projection_models") or [])
        self.projection = self._load_projection(directory) if self.projection_models else None
        columns = state.get("label_columns") or [None] * N_LABELS
        self.label_columns = [None if c is None else np.asarray(c, dtype=np.int64) for c in columns]
        width = self._n_columns
        if any(c is not None and (len(c) == 0 or c.min() < 0 or c.max() >= width) for c in self.label_columns):
            raise StackkitError(f"{FoldModelFiles(directory).record}: label_columns out of range for {width} columns; refit with `stack fit`")
        self.boosters = []
        for j, present in enumerate(state["has_booster"]):
            if not present:
                self.boosters.append(None)
                continue
            path = FoldModelFiles(directory).booster(self.name, LABELS[j])
            self.boosters.append(self._booster_from_bytes(read_artifact(path), path))

    def _load_projection(self, directory: Path):
        path = FoldModelFiles(directory).projection
        models = range(len(self.projection_models))
        arrays = read_npz(read_artifact(path), path, "embedding projection", [f"{kind}{m}" for m in models for kind in ("mean", "components")])
        return [(arrays[f"mean{m}"], arrays[f"components{m}"]) for m in models]

    @abc.abstractmethod
    def _fit_label(self, X_train, y_train, X_valid, y_valid, params, seed, label_position, cache: dict | None):
        """One label's booster; ``cache`` (or None) keeps this fold and label's binned datasets across trials."""

    @abc.abstractmethod
    def _predict_label(self, booster, X) -> np.ndarray: ...

    @abc.abstractmethod
    def _label_gain(self, booster) -> np.ndarray: ...

    @abc.abstractmethod
    def _booster_bytes(self, booster) -> bytes: ...

    @abc.abstractmethod
    def _booster_from_bytes(self, raw: bytes, source: Path): ...
