"""What a level-2 stacker reads: :class:`StackData` (the per-slice features, the study structure,
the labels when fitting, optional base-model embeddings as :class:`EmbeddingSet`) and the checks
every fit and prediction runs on it (:func:`check_labels`, :func:`check_features`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from stackkit.contract import LABELS
from stackkit.errors import StackkitError

N_LABELS = len(LABELS)


@dataclass(frozen=True)
class StackData:
    """Rows (CT slices) handed to a stacker.

    ``X``: float32 (n, f) features. ``study_codes``: int (n,) one code per study.
    ``slice_index``: int (n,) position of the slice in its study (ordered by z).
    ``Y``: (n, 6) 0/1 labels in LABELS order, ``None`` for prediction.
    ``image_ids``: optional (n,) ids, used only to name rows in error messages.
    ``feature_names``: optional names of the f columns (features/manifest.json): sequence
    stackers derive from them how a study reversed in z looks (:func:`stackkit.contract.columns.reversal_map`).
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


def label_array(frame, image_ids: np.ndarray) -> np.ndarray:
    """(n, 6) float64: ``frame``'s six label columns (labels or probabilities) in the order of ``image_ids``."""
    return frame.set_index("image_id").reindex(image_ids)[list(LABELS)].to_numpy(dtype=np.float64)
