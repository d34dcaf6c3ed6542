"""Study-aware level-2 features from base-model predictions: the checks at this boundary and the assembly.

The column schema is :mod:`stackkit.contract.columns`; the numpy kernels over arrays are :mod:`features.kernels`.

Every image of the train and test sets is placed once in a global order: train rows first,
then test rows; inside each split by ``study_id``; inside a study by ``z`` (ties by
``image_id``). In that order a study is one contiguous segment, so every feature is a whole-
column numpy expression: shifted arrays masked at segment edges, segment reductions with
``ufunc.reduceat``, ranks from one sort of (segment, value) keys. Nothing loops over studies or
images; the loops are over models, labels and lag distances only.

Definitions (also written, per column, into features/manifest.json):

* ``slice__position``: slice_index / (n - 1), 0 at the lowest z and 1 at the highest; a
  1-slice study gets 0.5 (its only slice is both ends).
* ``study_rank``: the average 1-based rank of the prediction among the study's slices (ties
  share the mean of the ranks they span), divided by n; the study maximum gets 1.0.
* ``study_std`` and the across-model ``std`` are population standard deviations (ddof=0):
  0 for a 1-slice study or a single model.
* ``study_top3_mean``: mean of the min(3, n) largest predictions of the study.
* ``roll<w>_mean``: centered mean over w slices, truncated at study edges (mean of the
  slices available inside the study).

Feature sets (``--feature-set``): ``basic`` (the default) and ``wide``, which adds what RSNA
2019's top second stages also used, per model and label ``study_min``, ``minus_study_mean``
(pred - study mean), ``minus_study_max`` (pred - study max), ``roll7_mean`` and ``roll9_mean``,
and per label across models ``max`` and ``min``. None of them depends on the direction along z.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stackkit.contract.columns import (DICOM_META_COLUMNS, META_PREFIX, TEST_KEY_COLUMNS, TOP_K, TRAIN_KEY_COLUMNS,
                              check_feature_set, feature_columns, reversal_map, reverse_features, roll_windows)
from features.kernels import FeatureMatrix, Plan, StudyLayout, cross_model_columns, model_columns, study_layout
from stackkit.contract import LABELS, RELATIVE, RESERVED_MODEL_NAMES, env_threads
from stackkit.errors import ContractError, LeakageError, StackkitError


# --- validation of the inputs at this boundary ------------------------------------------------


class _PositionCache:
    """Output positions of id columns; models written by one tool share the row order, so an
    id column equal to the previous one reuses its positions (a string compare, not a hash lookup)."""

    def __init__(self, id_index: pd.Index, inverse: np.ndarray):
        self.id_index, self.inverse = id_index, inverse
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, ids, source: str) -> np.ndarray:
        ids = np.asarray(ids, dtype=object)
        for known_ids, positions in self.seen:
            if len(known_ids) == len(ids) and (known_ids is ids or np.array_equal(known_ids, ids)):
                return positions
        positions = _positions(ids, self.id_index, self.inverse, source)
        self.seen = [*self.seen[-3:], (ids, positions)]
        return positions


def _positions(ids, id_index: pd.Index, inverse: np.ndarray, source: str) -> np.ndarray:
    rows = id_index.get_indexer(pd.Index(np.asarray(ids, dtype=object), dtype=object))
    if (rows < 0).any():
        pos = int(np.argmax(rows < 0))
        raise ContractError(f"{source}: image_id '{np.asarray(ids)[pos]}' at row {pos + 1} is not in data/metadata.parquet")
    return inverse[rows]


def _check_study_folds(fold_sorted: np.ndarray, layout: StudyLayout, study_sorted_ids: np.ndarray, source: str) -> None:
    """Every study's train images must share one fold: its features mix its own slices' predictions."""
    n_train_studies = int(np.searchsorted(layout.starts, layout.n_train))
    if n_train_studies == 0:
        return
    starts = layout.starts[:n_train_studies]
    lo = np.minimum.reduceat(fold_sorted, starts)
    hi = np.maximum.reduceat(fold_sorted, starts)
    bad = lo != hi
    if bad.any():
        s = int(np.argmax(bad))
        raise LeakageError(
            f"{source}: study '{study_sorted_ids[starts[s]]}' has images in folds {int(lo[s])} and {int(hi[s])}; "
            "a study must lie in one fold or its neighbor/study features mix fold models (leakage): rebuild data/folds.parquet with `data prepare`"
        )


def _aligned_predictions(frame: pd.DataFrame, positions: np.ndarray, lo: int, hi: int, source: str, what: str,
                         out: np.ndarray) -> None:
    """Place the six prediction columns at their output positions in ``out`` (6, hi - lo); refuses gaps and strays."""
    missing_cols = [c for c in ("image_id", *LABELS) if c not in frame.columns]
    if missing_cols:
        raise ContractError(f"{source}: missing column(s) {', '.join(missing_cols)}; expected image_id plus the six label columns")
    outside = (positions < lo) | (positions >= hi)
    if outside.any():
        pos = int(np.argmax(outside))
        raise ContractError(f"{source}: image_id '{frame['image_id'].iloc[pos]}' at row {pos + 1} is not a {what} image")
    local = positions - lo
    seen = np.bincount(local, minlength=hi - lo)
    if (seen != 1).any():
        raise ContractError(f"{source}: expected every {what} image exactly once; {int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated")
    # label by label: a 1-D scatter per column, no (n, 6) row-major copy and transpose
    for j, label in enumerate(LABELS):
        out[j, local] = frame[label].to_numpy(dtype=np.float32)


# --- the builder ------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Every image in the output's row order (train rows first), with what the kernels need."""

    layout: StudyLayout
    z_sorted: np.ndarray
    sorted_ids: np.ndarray
    study_sorted: np.ndarray
    positions_of: "_PositionCache"

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows



def build_features(
    metadata: pd.DataFrame,
    oof_by_model: dict[str, pd.DataFrame],
    test_by_model: dict[str, pd.DataFrame],
    folds: pd.DataFrame,
    *,
    lags: int = 2,
    dicom_meta: bool = False,
    progress: bool = True,
    feature_set: str = "basic",
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """Train features, test features and {feature column: definition}.

    ``metadata``: data/metadata.parquet (image_id, study_id, split, z, optional DICOM columns);
    ``oof_by_model`` / ``test_by_model``: per model, the contract prediction tables (validated
    by stackkit.contract.validate); ``folds``: data/folds.parquet. Train rows are the metadata's
    ``split == 'train'`` images; OOF predictions fill train rows and test predictions fill test
    rows only. Frames are sorted by (study_id, slice_index); feature columns are float32.
    ``feature_set``: ``"basic"`` or ``"wide"`` (see the module docstring).
    """
    from tqdm.auto import tqdm

    models = _check_build_inputs(metadata, oof_by_model, test_by_model, lags, feature_set)
    lags = int(lags)
    steps = tqdm(total=len(models) + 2, desc="stack features", unit="step", disable=not progress, file=sys.stderr)
    rows = _row_order(metadata)
    fold_sorted = _sorted_folds(folds, rows)
    meta_columns = [c for c in DICOM_META_COLUMNS if c in metadata.columns] if dicom_meta else []
    definitions = feature_columns(models, lags, meta_columns, feature_set)
    col = FeatureMatrix(rows.n_rows, definitions)
    _slice_columns(col, rows)
    order = rows.layout.order
    for meta in meta_columns:
        col(f"{META_PREFIX}__{meta}")[:] = pd.to_numeric(metadata[meta], errors="coerce").to_numpy(dtype=np.float64)[order]
    steps.update(1)

    # validation first, in model order: the first bad file is the one reported
    aligned = {m: _model_predictions(m, oof_by_model[m], test_by_model[m], rows, fold_sorted) for m in models}
    plan = Plan(rows.layout, lags, roll_windows(feature_set))
    wide = feature_set == "wide"
    # numpy's kernels release the GIL: one thread per core overlaps models (about 1.7x on 2 cores)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=_feature_threads(len(models))) as pool:
        columns_of_model = functools.partial(model_columns, col, plan=plan, lags=lags, wide=wide)
        for model in pool.map(columns_of_model, models, [aligned[m] for m in models]):
            steps.set_postfix_str(model)
            steps.update(1)
    cross_model_columns(col, [aligned[m] for m in models], wide=wide)
    del aligned

    train, test = _split_frames(col, rows, fold_sorted)
    steps.update(1)
    steps.close()
    return train, test, definitions


def _split_frames(col: FeatureMatrix, rows: _Rows, fold_sorted: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and test frames: views of the matrix's two row blocks behind their key columns."""
    n_train = rows.layout.n_train
    slice_index = rows.layout.index.astype(np.int32)
    train = _frame(col.matrix[:n_train], col.names, {
        "image_id": rows.sorted_ids[:n_train],
        "study_id": rows.study_sorted[:n_train],
        "fold": fold_sorted.astype(np.int8),
        "slice_index": slice_index[:n_train],
    })
    test = _frame(col.matrix[n_train:], col.names, {
        "image_id": rows.sorted_ids[n_train:],
        "study_id": rows.study_sorted[n_train:],
        "slice_index": slice_index[n_train:],
    })
    return train, test


def build_test_features(
    metadata: pd.DataFrame,
    test_by_model: dict[str, pd.DataFrame],
    *,
    lags: int = 2,
    dicom_meta: bool = False,
    feature_set: str = "basic",
) -> pd.DataFrame:
    """The test features of one set of test predictions (e.g. base fold model k's, contract v3).

    Every feature is computed inside a study (or across models on one row), and no study has both
    train and test images, so this is exactly the test frame :func:`build_features` returns for
    the same test predictions; the train rows are simply not built.
    """
    test_meta = metadata[metadata["split"] == "test"].reset_index(drop=True)
    no_oof = {model: pd.DataFrame({"image_id": pd.Series([], dtype=object), **{label: pd.Series([], dtype=np.float32) for label in LABELS}})
              for model in test_by_model}
    no_folds = pd.DataFrame({"image_id": pd.Series([], dtype=object), "fold": pd.Series([], dtype=np.int8)})
    _train, test, _definitions = build_features(test_meta, no_oof, test_by_model, no_folds, lags=lags, dicom_meta=dicom_meta, progress=False,
                                            feature_set=feature_set)
    return test


def _check_build_inputs(metadata, oof_by_model, test_by_model, lags, feature_set="basic") -> list[str]:
    """The models, sorted; one-line errors for bad arguments before any work."""
    if isinstance(lags, bool) or not isinstance(lags, (int, np.integer)) or lags < 0:
        raise StackkitError(f"--lags: expected a non-negative integer, got {lags!r}")
    check_feature_set(feature_set)
    models = sorted(oof_by_model)
    if not models:
        raise StackkitError("no predictions under preds/: run base train or base import")
    if sorted(test_by_model) != models:
        raise StackkitError(f"models with OOF predictions {models} differ from models with test predictions {sorted(test_by_model)}")
    for model in models:
        if model in RESERVED_MODEL_NAMES:
            raise StackkitError(f"preds/{model}: the model name '{model}' is reserved for feature columns; rename the model folder")
    if len(metadata) == 0:
        raise ContractError("data/metadata.parquet: no images")
    return models


def _row_order(metadata: pd.DataFrame) -> _Rows:
    image_ids = metadata["image_id"].to_numpy(dtype=object)
    study_codes, study_names = pd.factorize(metadata["study_id"], sort=True)
    z = metadata["z"].to_numpy(dtype=np.float64)
    is_test = (metadata["split"] == "test").to_numpy()
    layout = study_layout(study_codes.astype(np.int64), z, image_ids, is_test)
    inverse = np.empty(len(metadata), dtype=np.int64)
    inverse[layout.order] = np.arange(len(metadata))
    id_index = pd.Index(image_ids, dtype=object)  # object ids hash in C; str inference costs ~0.2 s per column
    if not id_index.is_unique:
        dup = id_index[id_index.duplicated()][0]
        raise ContractError(f"data/metadata.parquet: duplicate image_id '{dup}'; each image must appear once")
    study_sorted = np.asarray(study_names, dtype=object)[study_codes[layout.order]]
    return _Rows(layout, z[layout.order], image_ids[layout.order], study_sorted, _PositionCache(id_index, inverse))


def _sorted_folds(folds: pd.DataFrame, rows: _Rows) -> np.ndarray:
    """The fold of every train row in output order; one per study (checked)."""
    n_train = rows.layout.n_train
    source = str(RELATIVE.folds)
    fold_pos = rows.positions_of(folds["image_id"], source)
    if ((fold_pos >= n_train)).any():
        pos = int(np.argmax(fold_pos >= n_train))
        raise ContractError(f"data/folds.parquet: image_id '{folds['image_id'].iloc[pos]}' at row {pos + 1} is a test image; folds cover train images only")
    fold_sorted = np.full(n_train, -1, dtype=np.int16)
    fold_sorted[fold_pos] = folds["fold"].to_numpy()
    if (fold_sorted < 0).any():
        pos = int(np.argmax(fold_sorted < 0))
        raise ContractError(f"data/folds.parquet: train image_id '{rows.sorted_ids[pos]}' has no fold; rebuild folds with `data prepare`")
    _check_study_folds(fold_sorted, rows.layout, rows.study_sorted, source)
    return fold_sorted


def _slice_columns(col: FeatureMatrix, rows: _Rows) -> None:
    layout, z_sorted, n_rows = rows.layout, rows.z_sorted, rows.n_rows
    index, reverse, counts_row = layout.index, layout.reverse, layout.counts[layout.segment]
    col("slice__position")[:] = np.where(counts_row > 1, index / np.maximum(counts_row - 1, 1), 0.5)
    col("slice__index")[:] = index
    col("slice__reverse_index")[:] = reverse
    col("slice__count")[:] = counts_row
    gap = np.diff(z_sorted)
    prev_gap, next_gap = col("slice__z_gap_prev"), col("slice__z_gap_next")
    prev_gap[0], prev_gap[1:] = np.nan, gap
    prev_gap[index == 0] = np.nan
    next_gap[-1], next_gap[:-1] = np.nan, gap
    next_gap[reverse == 0] = np.nan
    same_z_start = np.ones(n_rows, dtype=bool)
    same_z_start[1:] = (index[1:] == 0) | (z_sorted[1:] != z_sorted[:-1])
    run_first = np.flatnonzero(same_z_start)
    run_len = np.diff(np.append(run_first, n_rows))
    col("slice__z_duplicates")[:] = np.repeat(run_len, run_len)


def _model_predictions(model: str, oof: pd.DataFrame, test: pd.DataFrame, rows: _Rows, fold_sorted: np.ndarray) -> np.ndarray:
    """(6, n_rows) float32 predictions of one model in output order, each label one contiguous array."""
    n_rows, n_train = rows.n_rows, rows.layout.n_train
    oof_source, test_source = str(RELATIVE.oof(model)), str(RELATIVE.test(model))
    oof_pos = rows.positions_of(oof["image_id"], oof_source)
    test_pos = rows.positions_of(test["image_id"], test_source)
    if "fold" in oof.columns:
        given = oof["fold"].to_numpy()
        bad = given != fold_sorted[np.clip(oof_pos, 0, n_train - 1)]
        bad &= oof_pos < n_train
        if bad.any():
            pos = int(np.argmax(bad))
            raise LeakageError(
                f"{oof_source}: fold {given[pos]} for image_id '{oof['image_id'].iloc[pos]}' disagrees with data/folds.parquet "
                f"(fold {fold_sorted[oof_pos[pos]]}); predictions made on other folds would leak: retrain on data/folds.parquet"
            )
    preds = np.empty((len(LABELS), n_rows), dtype=np.float32)
    _aligned_predictions(oof, oof_pos, 0, n_train, oof_source, "train (labeled)", preds[:, :n_train])
    _aligned_predictions(test, test_pos, n_train, n_rows, test_source, "test", preds[:, n_train:])
    if not np.isfinite(preds).all():
        raise ContractError(f"preds/{model}: predictions must be finite probabilities")
    return preds




def _feature_threads(n_models: int) -> int:
    """Threads for the per-model kernels: $STACKKIT_THREADS, else the usable cores; at most one per model."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(env_threads(cores), n_models))



def _frame(block: np.ndarray, names: list[str], keys: dict[str, np.ndarray]) -> pd.DataFrame:
    frame = pd.DataFrame(block, columns=names, copy=False)
    for position, (name, values) in enumerate(keys.items()):
        if values.dtype == object:
            values = pd.array(values, dtype="str")
        frame.insert(position, name, values)
    return frame


# names other modules and user code import from here
__all__ = ["DICOM_META_COLUMNS", "TEST_KEY_COLUMNS", "TOP_K", "TRAIN_KEY_COLUMNS", "build_features", "build_test_features",
           "check_feature_set", "feature_columns", "reversal_map", "reverse_features", "roll_windows"]
