"""The level-2 stacker interface and the helpers every implementation shares.

One small abstract base (:class:`Stacker`), one module per implementation, helpers written once
here: input validation, label weights, missing-value handling for neural stackers, and saving /
loading model files with sha256 sidecars.

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
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from stackkit.contract import LABEL_WEIGHTS, LABELS, env_threads
from stackkit.metric import weighted_bce
from stackkit.errors import StackkitError, one_line
from stackkit.contract.io import read_artifact, write_artifact

N_LABELS = len(LABELS)
STACKER_JSON = "stacker.json"
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


@dataclass(frozen=True)
class StackData:
    """Rows (CT slices) handed to a stacker.

    ``X``: float32 (n, f) features. ``study_codes``: int (n,) one code per study.
    ``slice_index``: int (n,) position of the slice in its study (ordered by z).
    ``Y``: (n, 6) 0/1 labels in LABELS order, ``None`` for prediction.
    ``image_ids``: optional (n,) ids, used only to name rows in error messages.
    ``feature_names``: optional names of the f columns (features/manifest.json): sequence
    stackers derive from them how a study reversed in z looks (:func:`features.build.reversal_map`).
    ``embeddings``: optional per-slice embeddings of the base models that have them, one
    :class:`EmbeddingSet` per embedding space: one for OOF rows, one per base fold model (or one)
    for test rows. Stackers that do not use embeddings ignore them.
    """

    X: np.ndarray
    study_codes: np.ndarray
    slice_index: np.ndarray
    Y: np.ndarray | None = None
    image_ids: np.ndarray | None = None
    feature_names: tuple[str, ...] | None = None  # names of X's columns (features/manifest.json order), when known
    embeddings: tuple["EmbeddingSet", ...] = ()

    def __post_init__(self):
        n = len(self.X)
        if np.ndim(self.X) != 2:
            raise StackkitError(f"features must be a 2-D (rows, features) array, got shape {np.shape(self.X)}")
        for name in ("study_codes", "slice_index", "Y", "image_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise StackkitError(f"StackData.{name} has {len(value)} rows but X has {n}; they must align row by row")
        if self.feature_names is not None and len(self.feature_names) != np.shape(self.X)[1]:
            raise StackkitError(f"StackData.feature_names has {len(self.feature_names)} names but X has {np.shape(self.X)[1]} columns")
        for emb in self.embeddings:
            if len(emb.rows) != n:
                raise StackkitError(f"StackData.embeddings has {len(emb.rows)} rows but X has {n}; they must align row by row")

    def __len__(self) -> int:
        return len(self.X)

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def take(self, rows: np.ndarray) -> "StackData":
        """The subset ``rows`` (integer positions or a boolean mask), every array sliced alike."""
        rows = np.asarray(rows)
        return StackData(
            X=self.X[rows],
            study_codes=self.study_codes[rows],
            slice_index=self.slice_index[rows],
            Y=None if self.Y is None else self.Y[rows],
            image_ids=None if self.image_ids is None else self.image_ids[rows],
            feature_names=self.feature_names,
            embeddings=tuple(e.take(rows) for e in self.embeddings),
        )

    def without_embeddings(self) -> "StackData":
        return StackData(self.X, self.study_codes, self.slice_index, self.Y, self.image_ids, self.feature_names)


@dataclass(frozen=True)
class EmbeddingSet:
    """The embeddings of several base models in one space (OOF rows, or one base fold model's test rows).

    ``names``: the models; ``arrays``: per model a (file rows, D_m) array, memory-mapped float16
    (never loaded whole); ``rows``: int64 (n, n_models), the file row each data row reads.

    Reading a row of a memory-mapped file maps more than the row: the kernel maps the cached
    pages around a faulting page too (64 KiB by default), so gathering scattered rows from a
    35 GB set of files would leave most of it resident in the process. :meth:`gather` therefore
    reads in chunks and drops the mapped pages of a file after every :attr:`RELEASE_BYTES` (64 MB) it
    may have mapped (the pages stay in the OS page cache; only this process lets go of them).
    """

    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]
    rows: np.ndarray
    # per model, bytes possibly mapped since its pages were last released (shared by subsets)
    _mapped: list = field(default=None, compare=False, repr=False)

    RELEASE_BYTES: ClassVar[int] = 64 << 20
    FAULT_AROUND_BYTES: ClassVar[int] = 64 << 10
    CHUNK_ROWS: ClassVar[int] = 1024

    def __post_init__(self):
        if len(self.names) != len(self.arrays) or np.shape(self.rows)[1:] != (len(self.names),):
            raise StackkitError(f"EmbeddingSet: {len(self.names)} names, {len(self.arrays)} arrays and rows of shape {np.shape(self.rows)} disagree")
        if self._mapped is None:
            from stackkit.contract.embeddings import advise_random

            for array in self.arrays:
                advise_random(array)  # scattered rows: no readahead
            object.__setattr__(self, "_mapped", [0] * len(self.arrays))

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(a.shape[1]) for a in self.arrays)

    def take(self, rows: np.ndarray) -> "EmbeddingSet":
        return EmbeddingSet(self.names, self.arrays, self.rows[np.asarray(rows)], self._mapped)

    def gather(self, model: int, positions: np.ndarray) -> np.ndarray:
        """float32 (len(positions), D) embeddings of data rows ``positions`` for model ``model``:
        sorted reads of the distinct file rows in chunks, cast per chunk (never the whole array)."""
        from stackkit.contract.embeddings import release_pages

        array = self.arrays[model]
        file_rows = self.rows[np.asarray(positions), model]
        unique, inverse = np.unique(file_rows, return_inverse=True)
        values = np.empty((len(unique), int(array.shape[1])), dtype=np.float32)
        row_bytes = int(array.shape[1]) * int(np.dtype(array.dtype).itemsize)
        for start in range(0, len(unique), self.CHUNK_ROWS):
            chunk = unique[start : start + self.CHUNK_ROWS]
            values[start : start + len(chunk)] = array[chunk]
            self._mapped[model] += len(chunk) * (row_bytes + self.FAULT_AROUND_BYTES)
            if self._mapped[model] >= self.RELEASE_BYTES:
                release_pages(array)
                self._mapped[model] = 0
        return values[inverse]

    def release(self) -> None:
        """Drop this process's resident pages of every array (they stay in the OS page cache)."""
        from stackkit.contract.embeddings import release_pages

        for m, array in enumerate(self.arrays):
            release_pages(array)
            self._mapped[m] = 0


# --- validation -------------------------------------------------------------------------------


def _row_name(data: StackData, position: int) -> str:
    ident = f" (image_id {data.image_ids[position]})" if data.image_ids is not None else ""
    return f"row {position + 1}{ident}"


def check_labels(data: StackData, what: str = "training") -> np.ndarray:
    """Labels as float32 (n, 6); refuses missing labels, NaN and anything but 0/1.

    LightGBM would silently train on a NaN label as 0, so this runs before every fit.
    """
    if data.Y is None:
        raise StackkitError(f"{what} data has no labels; join data/labels.parquet on image_id")
    Y = np.asarray(data.Y, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[1] != N_LABELS:
        raise StackkitError(f"{what} labels have shape {Y.shape}; expected (rows, {N_LABELS}) in order {', '.join(LABELS)}")
    bad = ~((Y == 0) | (Y == 1))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise StackkitError(
            f"{what} label '{LABELS[col]}' is {Y[row, col]:g} at {_row_name(data, row)}; labels must be 0 or 1: "
            "fix data/labels.parquet (every labeled image needs all six labels)"
        )
    return Y.astype(np.float32)


def check_features(data: StackData, n_features: int | None = None, what: str = "training") -> np.ndarray:
    """Features as float32; refuses infinities and a column count that differs from the model's."""
    X = np.asarray(data.X, dtype=np.float32)
    if n_features is not None and X.shape[1] != n_features:
        raise StackkitError(
            f"{what} features have {X.shape[1]} columns but the model was fitted on {n_features}; "
            "rebuild features with the same models and lags (stack features) or refit (stack fit)"
        )
    inf = np.isinf(X)
    if inf.any():
        row, col = map(int, np.argwhere(inf)[0])
        raise StackkitError(f"{what} feature column {col} is {X[row, col]} at {_row_name(data, row)}; expected a finite number or NaN")
    return X


def label_weights() -> np.ndarray:
    """Per-label loss weights of the competition metric (``any`` counts twice), normalized to sum 1."""
    return (LABEL_WEIGHTS / LABEL_WEIGHTS.sum()).astype(np.float32)


def label_priors(Y: np.ndarray) -> np.ndarray:
    """Smoothed per-label frequency: the prediction for a label with one class only in training."""
    return ((Y.sum(axis=0) + 0.5) / (len(Y) + 1.0)).astype(np.float64)


def clip_probabilities(P: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(P, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS).astype(np.float32)


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

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        missing = np.isnan(X)
        Z = (X - self.mean) / self.scale
        Z[missing] = 0.0
        if len(self.indicator_columns):
            Z = np.concatenate([Z, missing[:, self.indicator_columns].astype(np.float32)], axis=1)
        return np.ascontiguousarray(Z, dtype=np.float32)

    def to_bytes(self) -> bytes:
        return npz_bytes(mean=self.mean, scale=self.scale, indicator_columns=self.indicator_columns)

    @classmethod
    def from_bytes(cls, raw: bytes, source) -> "FeatureScaler":
        arrays = read_npz(raw, source, "feature-scaler file", ("mean", "scale", "indicator_columns"))
        return cls(arrays["mean"], arrays["scale"], arrays["indicator_columns"])


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The .npz bytes of ``arrays`` (no pickles), for write_artifact."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_npz(raw: bytes, source, what: str, keys) -> dict[str, np.ndarray]:
    """``keys`` of the .npz bytes ``raw`` (pickles refused); a bad or incomplete file is a one-line error naming ``source``."""
    import io
    import zipfile

    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise StackkitError(f"{source}: not a readable {what} ({exc}); refit with `stack fit`") from exc


def write_json_artifact(obj: dict, path: str | os.PathLike) -> Path:
    return write_artifact(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode("utf-8"))


def read_json_artifact(path: str | os.PathLike) -> dict:
    raw = read_artifact(path)
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StackkitError(f"{path}: not valid JSON ({exc}); refit with `stack fit`") from exc


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


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
        meta = {"stacker": self.name, "params": self.params, "n_features": self.n_features, "state": self._state()}
        # stacker.json last: its presence marks a complete model directory
        written.append(write_json_artifact(meta, directory / STACKER_JSON))
        return written

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Stacker":
        directory = Path(directory)
        meta = read_json_artifact(directory / STACKER_JSON)
        if meta.get("stacker") != cls.name:
            raise StackkitError(f"{directory / STACKER_JSON}: holds a '{meta.get('stacker')}' model, expected '{cls.name}'")
        stacker = cls()
        stacker.params = dict(meta["params"])
        stacker.n_features = int(meta["n_features"])
        stacker._load_models(directory, meta.get("state") or {})
        return stacker

    def _state(self) -> dict:
        """Small JSON-able state saved in stacker.json besides the model files."""
        return {}

    @abc.abstractmethod
    def _save_models(self, directory: Path) -> list[Path]: ...

    @abc.abstractmethod
    def _load_models(self, directory: Path, state: dict) -> None: ...


# --- shared helpers for per-label GBDT stackers ---------------------------------------------------


FEATURE_SUBSETS = ("label", "all")


def label_feature_columns(feature_names, label: str) -> np.ndarray:
    """Column positions a per-label model of ``label`` reads: every model's columns of that label,
    the other labels' plain predictions (``<model>__<other>__pred``), the across-model aggregates
    of every label, and every column that belongs to no label (slice, DICOM metadata, ...).

    The other labels' lags, leads and study aggregates are left out: they cost most of the
    columns and add little to one label's model (bench/bench_stack.py measures it).
    """
    from features.build import MODELS_PREFIX

    keep = []
    for position, name in enumerate(feature_names):
        parts = str(name).split("__")
        if len(parts) != 3 or parts[1] not in LABELS:
            keep.append(position)  # not a per-label column
        elif parts[1] == label or parts[0] == MODELS_PREFIX or parts[2] == "pred":
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

    def _model_file(self, j: int) -> str:
        return f"{LABELS[j]}{self.model_suffix}"

    PROJECTION_FILE = "projection.npz"

    def _save_models(self, directory: Path) -> list[Path]:
        written = [
            write_artifact(directory / self._model_file(j), self._booster_bytes(b))
            for j, b in enumerate(self.boosters)
            if b is not None
        ]
        if self.projection is not None:
            arrays = {f"{kind}{m}": array for m, pair in enumerate(self.projection) for kind, array in zip(("mean", "components"), pair)}
            written.append(write_artifact(directory / self.PROJECTION_FILE, npz_bytes(**arrays)))
        return written

    def _load_models(self, directory: Path, state: dict) -> None:
        self.priors = [float(p) for p in state["priors"]]
        self.projection_models = list(state.get("projection_models") or [])
        self.projection = self._load_projection(directory) if self.projection_models else None
        columns = state.get("label_columns") or [None] * N_LABELS
        self.label_columns = [None if c is None else np.asarray(c, dtype=np.int64) for c in columns]
        width = self._n_columns
        if any(c is not None and (len(c) == 0 or c.min() < 0 or c.max() >= width) for c in self.label_columns):
            raise StackkitError(f"{directory / STACKER_JSON}: label_columns out of range for {width} columns; refit with `stack fit`")
        self.boosters = []
        for j, present in enumerate(state["has_booster"]):
            if not present:
                self.boosters.append(None)
                continue
            path = directory / self._model_file(j)
            self.boosters.append(self._booster_from_bytes(read_artifact(path), path))

    def _load_projection(self, directory: Path):
        path = directory / self.PROJECTION_FILE
        models = range(len(self.projection_models))
        arrays = read_npz(read_artifact(path), path, "embedding projection", [f"{kind}{m}" for m in models for kind in ("mean", "components")])
        return [(arrays[f"mean{m}"], arrays[f"components{m}"]) for m in models]

    model_suffix: ClassVar[str]

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
    MODEL_FILE = "model.pt"
    SCALER_FILE = "scaler.npz"

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
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(int(params["num_threads"]))
        try:
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
        finally:
            torch.set_num_threads(previous_threads)
        self.module = module.cpu() if device.type != "cpu" else module  # saved and reloaded on any machine

    def _predict(self, data, X) -> np.ndarray:
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(int(self.params["num_threads"]))
        try:
            device = predict_device(self.params.get("device", "cpu"))  # a model fitted on a GPU predicts on a machine without one
            prepared = self._to_device(self._prepare(X, data, None), device)
            module = self.module.to(device)
            try:
                with torch.no_grad():
                    return torch.sigmoid(self._predict_logits(module, prepared, self.params, True)).cpu().numpy()
            finally:
                self.module = module.cpu()
        finally:
            torch.set_num_threads(previous_threads)

    def _state(self) -> dict:
        return {"n_inputs": self.scaler.n_outputs}

    def _save_models(self, directory: Path) -> list[Path]:
        import io

        import torch

        buffer = io.BytesIO()
        # CPU tensors whatever device fitted it: loadable with weights_only=True on a machine without a GPU
        torch.save(self.module.cpu().state_dict(), buffer)
        return [
            write_artifact(directory / self.MODEL_FILE, buffer.getvalue()),
            write_artifact(directory / self.SCALER_FILE, self.scaler.to_bytes()),
        ]

    def _load_models(self, directory: Path, state: dict) -> None:
        import io
        import pickle  # only for its error type: weights_only=True never unpickles objects

        import torch

        scaler_path, model_path = directory / self.SCALER_FILE, directory / self.MODEL_FILE
        self.scaler = FeatureScaler.from_bytes(read_artifact(scaler_path), scaler_path)
        raw = read_artifact(model_path)
        module = self._build_module(int(state["n_inputs"]), self.params)
        try:
            module.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
        except (RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
            raise StackkitError(f"{model_path}: not a readable {self.name} state_dict ({one_line(exc)}); refit with `stack fit`") from exc
        module.eval()
        self.module = module
