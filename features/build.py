"""Study-aware level-2 features from base-model predictions: pure functions over arrays.

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
import re
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, RESERVED_MODEL_NAMES, env_threads, slice_order
from stackkit.errors import ContractError, LeakageError, StackkitError

TOP_K = 3
ROLL_WINDOWS = (3, 5)
FEATURE_SETS = ("basic", "wide")
WIDE_ROLL_WINDOWS = (7, 9)  # besides ROLL_WINDOWS, in the wide set
DICOM_META_COLUMNS = ("slice_thickness", "pixel_spacing", "window_center", "window_width")
TRAIN_KEY_COLUMNS = ("image_id", "study_id", "fold", "slice_index")
TEST_KEY_COLUMNS = ("image_id", "study_id", "slice_index")
# Column-name prefixes of the non-model features; a model of that name would be ambiguous.
SLICE_PREFIX = "slice"
META_PREFIX = "meta"
MODELS_PREFIX = "models"
# the contract's model-name rule (stackkit.contract.check_model_name) refuses exactly these
assert set(RESERVED_MODEL_NAMES) == {SLICE_PREFIX, META_PREFIX, MODELS_PREFIX}

SLICE_FEATURES = {
    "position": "relative position in the study along z: slice_index / (n - 1), 0 = lowest z, 1 = highest z; 0.5 for a 1-slice study",
    "index": "0-based position in the study ordered by z (ties by image_id)",
    "reverse_index": "0-based position counted from the highest z: n - 1 - slice_index",
    "count": "number of slices (images) in the study",
    "z_gap_prev": "z of this slice minus z of the previous slice in z order (NaN for the first slice)",
    "z_gap_next": "z of the next slice minus z of this slice in z order (NaN for the last slice)",
    "z_duplicates": "number of slices of the study sharing this slice's z (1 when unique)",
}


def roll_windows(feature_set: str = "basic") -> tuple[int, ...]:
    """The centered rolling-mean windows of a feature set."""
    return ROLL_WINDOWS + (WIDE_ROLL_WINDOWS if feature_set == "wide" else ())


def _roll_text(w: int) -> str:
    return f"centered mean over {w} slices in z order, truncated at the study's edges (mean of the available slices)"


def model_feature_names(lags: int, feature_set: str = "basic") -> list[tuple[str, str]]:
    """(feature, definition) pairs computed for every model and label, in column order.

    ``wide`` is ``basic`` followed by its own columns, so a basic column keeps its name and text.
    """
    check_feature_set(feature_set)
    out = [("pred", "the model's predicted probability")]
    out += [(f"lag{k}", f"prediction of the slice {k} below in z order (NaN past the study's first slice)") for k in range(1, lags + 1)]
    out += [(f"lead{k}", f"prediction of the slice {k} above in z order (NaN past the study's last slice)") for k in range(1, lags + 1)]
    out += [(f"diff_lag{k}", f"pred - lag{k}") for k in range(1, lags + 1)]
    out += [(f"diff_lead{k}", f"pred - lead{k}") for k in range(1, lags + 1)]
    out += [
        ("study_max", "maximum prediction over the study's slices"),
        ("study_mean", "mean prediction over the study's slices"),
        ("study_std", "population standard deviation (ddof=0) of the predictions over the study's slices; 0 for a 1-slice study"),
        (f"study_top{TOP_K}_mean", f"mean of the min({TOP_K}, n) largest predictions of the study"),
        ("study_rank", "average 1-based rank of the prediction among the study's slices (ties share the mean of their ranks) divided by n; the maximum gets 1.0"),
    ]
    out += [(f"roll{w}_mean", _roll_text(w)) for w in ROLL_WINDOWS]
    if feature_set == "wide":
        out += [
            ("study_min", "minimum prediction over the study's slices"),
            ("minus_study_mean", "pred - study_mean: the prediction minus the mean prediction over the study's slices"),
            ("minus_study_max", "pred - study_max: the prediction minus the maximum prediction over the study's slices (0 at the maximum)"),
        ]
        out += [(f"roll{w}_mean", _roll_text(w)) for w in WIDE_ROLL_WINDOWS]
    return out


def check_feature_set(feature_set) -> None:
    """A one-line error for a feature set that is not one of :data:`FEATURE_SETS`."""
    if feature_set not in FEATURE_SETS:
        raise StackkitError(f"--feature-set: expected one of {', '.join(FEATURE_SETS)}, got {feature_set!r}")


# Features that depend on the direction of the study along z, and what reversing the study makes of them.
_SWAP_SLICE = {"z_gap_prev": "z_gap_next", "z_gap_next": "z_gap_prev", "index": "reverse_index", "reverse_index": "index"}
_COMPLEMENT_SLICE = ("position",)  # p -> 1 - p
_DIRECTIONAL = re.compile(r"^(?P<prefix>diff_)?(?P<side>lag|lead)(?P<k>\d+)$")


def reversal_map(columns) -> tuple[np.ndarray, np.ndarray]:
    """How features change when a study is reversed in z: (source, complement).

    The reversed study's column j is column ``source[j]`` of the original (``lag<k>`` <->
    ``lead<k>``, ``diff_lag<k>`` <-> ``diff_lead<k>``, ``z_gap_prev`` <-> ``z_gap_next``,
    ``index`` <-> ``reverse_index``), and ``1 -`` that where ``complement[j]`` (``position``).
    Every other column (study aggregates, ranks, centered rolling means, across-model columns,
    DICOM metadata) does not depend on the direction. Rows are reversed by the caller.
    """
    names = list(columns)
    column_of = {name: j for j, name in enumerate(names)}
    source = np.arange(len(names), dtype=np.int64)
    complement = np.zeros(len(names), dtype=bool)
    for j, name in enumerate(names):
        head, _, feature = name.rpartition("__")
        partner = None
        if head == SLICE_PREFIX:
            partner = _SWAP_SLICE.get(feature)
            complement[j] = feature in _COMPLEMENT_SLICE
        elif head and not head.startswith((META_PREFIX + "__", MODELS_PREFIX + "__")):
            match = _DIRECTIONAL.match(feature)
            if match:
                partner = f"{match['prefix'] or ''}{'lead' if match['side'] == 'lag' else 'lag'}{match['k']}"
        if partner is not None:
            partner_name = f"{head}__{partner}"
            if partner_name not in column_of:
                raise StackkitError(f"feature column '{name}' has no '{partner_name}' to swap with when a study is reversed; rebuild features with `stack features`")
            source[j] = column_of[partner_name]
    return source, complement


def reverse_features(X: np.ndarray, source: np.ndarray, complement: np.ndarray) -> np.ndarray:
    """The features of the same slices in a study reversed in z (see :func:`reversal_map`)."""
    out = np.asarray(X)[:, source]
    if complement.any():
        out[:, complement] = 1.0 - out[:, complement]
    return out


def feature_columns(models, lags: int, meta_columns=(), feature_set: str = "basic") -> dict[str, str]:
    """Ordered {column: definition} for the given models: slice, meta, across-model, per-model blocks.

    Adding or removing a model adds or removes only its own block; every other name keeps its
    relative order.
    """
    columns: dict[str, str] = {f"{SLICE_PREFIX}__{name}": text for name, text in SLICE_FEATURES.items()}
    for col in meta_columns:
        columns[f"{META_PREFIX}__{col}"] = f"data/metadata.parquet column '{col}' as a number (NaN where missing or not numeric)"
    for label in LABELS:
        columns[f"{MODELS_PREFIX}__{label}__mean"] = f"mean of the '{label}' prediction across models"
        columns[f"{MODELS_PREFIX}__{label}__std"] = f"population standard deviation (ddof=0) of the '{label}' prediction across models; 0 with one model"
        if feature_set == "wide":
            columns[f"{MODELS_PREFIX}__{label}__max"] = f"maximum of the '{label}' prediction across models"
            columns[f"{MODELS_PREFIX}__{label}__min"] = f"minimum of the '{label}' prediction across models"
    per_model = model_feature_names(lags, feature_set)
    for model in sorted(models):
        for label in LABELS:
            for feature, text in per_model:
                columns[f"{model}__{label}__{feature}"] = f"{model}, {label}: {text}"
    return columns


# --- global order and study segments -----------------------------------------------------------


@dataclass(frozen=True)
class StudyLayout:
    """Rows in output order and the study segments over them.

    ``order[i]`` is the metadata row at output position i; train rows occupy ``[0, n_train)``.
    Per-row arrays (``segment``, ``index``, ``reverse``) are in output order.
    """

    order: np.ndarray
    n_train: int
    starts: np.ndarray
    counts: np.ndarray
    segment: np.ndarray
    index: np.ndarray
    reverse: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.order)


def study_layout(study_codes: np.ndarray, z: np.ndarray, image_ids, is_test: np.ndarray) -> StudyLayout:
    """Sort rows by (split, study, z, image_id) and describe the study segments.

    ``study_codes`` must follow the sorted order of the study ids (``pd.factorize(sort=True)``).
    """
    n = len(study_codes)
    order = slice_order(study_codes, z, image_ids, leading=is_test)
    s_sorted = study_codes[order]
    is_start = np.empty(n, dtype=bool)
    is_start[:1] = True
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=is_start[1:])
    # a study listed in both splits (refused upstream) still never mixes train and test rows
    test_sorted = is_test[order]
    is_start[1:] |= test_sorted[1:] != test_sorted[:-1]
    starts = np.flatnonzero(is_start)
    counts = np.diff(np.append(starts, n))
    segment = np.cumsum(is_start) - 1
    index = np.arange(n) - starts[segment]
    reverse = counts[segment] - 1 - index
    n_train = int(n - np.count_nonzero(is_test))
    return StudyLayout(order, n_train, starts, counts, segment, index, reverse)


# --- feature kernels (arrays in output order) -------------------------------------------------


class Plan:
    """Index sets derived once from the layout and shared by every (model, label) column.

    Edge positions (a study's first/last k slices) are few, so shifted and rolling columns are
    computed with plain slices over the whole array and then patched at those positions only.
    """

    def __init__(self, layout: StudyLayout, lags: int, windows=ROLL_WINDOWS):
        self.layout = layout
        n = layout.n_rows
        self.first_k = {k: np.flatnonzero(layout.index < k) for k in range(1, lags + 1)}
        self.last_k = {k: np.flatnonzero(layout.reverse < k) for k in range(1, lags + 1)}
        self.segment_key = layout.segment.astype(np.uint64) << np.uint64(32)
        self.base_rank = (layout.index + 1.0) / layout.counts[layout.segment]  # rank of untied values
        self.ends = layout.starts + layout.counts
        self.windows = tuple(windows)
        self.edges = {}
        for w in windows:
            half = w // 2
            pos = np.flatnonzero((layout.index < half) | (layout.reverse < half))
            lo = pos - np.minimum(layout.index[pos], half)
            hi = pos + np.minimum(layout.reverse[pos], half) + 1
            self.edges[w] = (pos, lo, hi)
        self.n = n


def lag(values: np.ndarray, plan: Plan, k: int, out: np.ndarray) -> np.ndarray:
    """out[i] = values[i - k] inside the study, NaN before its first slice."""
    out[:k] = np.nan
    out[k:] = values[: len(values) - k]
    out[plan.first_k[k]] = np.nan
    return out


def lead(values: np.ndarray, plan: Plan, k: int, out: np.ndarray) -> np.ndarray:
    """out[i] = values[i + k] inside the study, NaN after its last slice."""
    n = len(values)
    out[n - k :] = np.nan
    out[: n - k] = values[k:]
    out[plan.last_k[k]] = np.nan
    return out


def rolling_mean(cumulative: np.ndarray, plan: Plan, window: int, out: np.ndarray) -> np.ndarray:
    """Centered mean over ``window`` slices, truncated at study edges; ``cumulative`` = [0, cumsum(values)]."""
    n, half = plan.n, window // 2
    if n > 2 * half:
        interior = out[half : n - half]
        np.subtract(cumulative[2 * half + 1 :], cumulative[: n - 2 * half], out=interior, casting="same_kind")
        interior /= np.float32(window)
    pos, lo, hi = plan.edges[window]
    out[pos] = (cumulative[hi] - cumulative[lo]) / (hi - lo)
    return out


class SegmentStats:
    """Per-study reductions of one prediction column (arrays of one value per study) and its rank."""

    def __init__(self, values: np.ndarray, plan: Plan, minimum: bool = False):
        layout = plan.layout
        starts, counts = layout.starts, layout.counts
        self.max = np.maximum.reduceat(values, starts)
        self.min = np.minimum.reduceat(values, starts) if minimum else None
        self.mean = np.add.reduceat(values, starts, dtype=np.float64) / counts
        dev = values - np.repeat(self.mean, counts)
        np.multiply(dev, dev, out=dev)
        self.std = np.sqrt(np.add.reduceat(dev, starts) / counts)
        del dev
        # One sort orders every study by value: the segment id in the high 32 bits, the float32
        # bit pattern (monotonic for non-negative floats) in the low 32 bits.
        bits = (values + np.float32(0.0)).view(np.uint32)  # + 0 turns -0.0 into +0.0
        key = plan.segment_key | bits
        # Stable sort is timsort here: keys are already ordered by segment, so it only sorts
        # short runs and gallops over the rest (~7x faster than quicksort at RSNA scale).
        by_value = np.argsort(key, kind="stable")
        # sorting keeps every study in place, so its top K are its last K sorted positions
        top_sum = np.zeros(len(starts), dtype=np.float64)
        for t in range(TOP_K):
            at = np.maximum(plan.ends - 1 - t, starts)
            top_sum += np.where(counts > t, values[by_value[at]], 0.0)
        self.top_mean = top_sum / np.minimum(counts, TOP_K)
        rank_sorted = plan.base_rank.copy()
        key_sorted = key[by_value]
        tied = key_sorted[1:] == key_sorted[:-1]
        if tied.any():
            # tied values share the mean of the ranks they span; only tied positions are touched
            in_tie = np.zeros(len(values), dtype=bool)
            in_tie[1:] |= tied
            in_tie[:-1] |= tied
            pos = np.flatnonzero(in_tie)
            run_start = np.ones(len(pos), dtype=bool)
            run_start[1:] = ~tied[pos[1:] - 1]
            run_first = np.flatnonzero(run_start)
            run_last = np.append(run_first[1:], len(pos)) - 1
            run_of = np.cumsum(run_start) - 1
            avg_rank = (layout.index[pos[run_first]] + layout.index[pos[run_last]]) / 2.0 + 1.0
            rank_sorted[pos] = avg_rank[run_of] / counts[layout.segment[pos]]
        self.rank = np.empty(len(values), dtype=np.float64)
        self.rank[by_value] = rank_sorted


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


class _FeatureMatrix:
    """The output columns: one float32 matrix in Fortran order, so each feature column is one
    contiguous array and the train and test frames are views of its two row blocks (no copy)."""

    def __init__(self, n_rows: int, definitions: dict[str, str]):
        self.names = list(definitions)
        self.column_of = {name: j for j, name in enumerate(self.names)}
        self.matrix = _empty_matrix(n_rows, len(self.names))

    def __call__(self, name: str) -> np.ndarray:
        return self.matrix[:, self.column_of[name]]


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
    col = _FeatureMatrix(rows.n_rows, definitions)
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
        columns_of_model = functools.partial(_model_columns, col, plan=plan, lags=lags, wide=wide)
        for model in pool.map(columns_of_model, models, [aligned[m] for m in models]):
            steps.set_postfix_str(model)
            steps.update(1)
    _cross_model_columns(col, [aligned[m] for m in models], wide=wide)
    del aligned

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
    steps.update(1)
    steps.close()
    return train, test, definitions


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
    fold_pos = rows.positions_of(folds["image_id"], "data/folds.parquet")
    if ((fold_pos >= n_train)).any():
        pos = int(np.argmax(fold_pos >= n_train))
        raise ContractError(f"data/folds.parquet: image_id '{folds['image_id'].iloc[pos]}' at row {pos + 1} is a test image; folds cover train images only")
    fold_sorted = np.full(n_train, -1, dtype=np.int16)
    fold_sorted[fold_pos] = folds["fold"].to_numpy()
    if (fold_sorted < 0).any():
        pos = int(np.argmax(fold_sorted < 0))
        raise ContractError(f"data/folds.parquet: train image_id '{rows.sorted_ids[pos]}' has no fold; rebuild folds with `data prepare`")
    _check_study_folds(fold_sorted, rows.layout, rows.study_sorted, "data/folds.parquet")
    return fold_sorted


def _slice_columns(col: _FeatureMatrix, rows: _Rows) -> None:
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
    oof_source, test_source = f"preds/{model}/oof.parquet", f"preds/{model}/test.parquet"
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


def _model_columns(col: _FeatureMatrix, model: str, preds: np.ndarray, plan: Plan, lags: int, wide: bool = False) -> str:
    """Every column of one model; models write disjoint columns, so they run in parallel.

    ``wide``: also the wide set's columns (its rolling windows come from ``plan``)."""
    counts = plan.layout.counts
    cumulative = np.zeros(preds.shape[1] + 1, dtype=np.float64)
    for j, label in enumerate(LABELS):
        p = preds[j]
        prefix = f"{model}__{label}__"
        col(prefix + "pred")[:] = p
        for k in range(1, lags + 1):
            lagged = lag(p, plan, k, col(f"{prefix}lag{k}"))
            np.subtract(p, lagged, out=col(f"{prefix}diff_lag{k}"))
            led = lead(p, plan, k, col(f"{prefix}lead{k}"))
            np.subtract(p, led, out=col(f"{prefix}diff_lead{k}"))
        stats = SegmentStats(p, plan, minimum=wide)
        col(prefix + "study_max")[:] = np.repeat(stats.max, counts)
        col(prefix + "study_mean")[:] = np.repeat(stats.mean.astype(np.float32), counts)
        col(prefix + "study_std")[:] = np.repeat(stats.std.astype(np.float32), counts)
        col(prefix + f"study_top{TOP_K}_mean")[:] = np.repeat(stats.top_mean.astype(np.float32), counts)
        col(prefix + "study_rank")[:] = stats.rank
        if wide:
            col(prefix + "study_min")[:] = np.repeat(stats.min, counts)
            # the float64 mean: the difference is rounded once
            np.subtract(p, np.repeat(stats.mean, counts), out=col(prefix + "minus_study_mean"))
            np.subtract(p, np.repeat(stats.max, counts), out=col(prefix + "minus_study_max"))
        np.cumsum(p, dtype=np.float64, out=cumulative[1:])
        for w in plan.windows:
            rolling_mean(cumulative, plan, w, col(f"{prefix}roll{w}_mean"))
    return model


def _cross_model_columns(col: _FeatureMatrix, model_preds: list[np.ndarray], wide: bool = False) -> None:
    """Mean and std (and with ``wide`` max and min) over models, summed in model order after the
    parallel part: the same bits on every run."""
    n_models = len(model_preds)
    for j, label in enumerate(LABELS):
        total = np.zeros(model_preds[0].shape[1], dtype=np.float64)
        total_sq = np.zeros_like(total)
        for preds in model_preds:
            total += preds[j]
            total_sq += np.square(preds[j], dtype=np.float64)
        mean = total / n_models
        col(f"{MODELS_PREFIX}__{label}__mean")[:] = mean
        # population variance from the sums; clip the tiny negatives of rounding
        if n_models == 1:
            col(f"{MODELS_PREFIX}__{label}__std")[:] = 0.0
        else:
            col(f"{MODELS_PREFIX}__{label}__std")[:] = np.sqrt(np.maximum(total_sq / n_models - mean * mean, 0.0))
        if wide:
            highest, lowest = col(f"{MODELS_PREFIX}__{label}__max"), col(f"{MODELS_PREFIX}__{label}__min")
            highest[:] = lowest[:] = model_preds[0][j]
            for preds in model_preds[1:]:
                np.maximum(highest, preds[j], out=highest)
                np.minimum(lowest, preds[j], out=lowest)


def _feature_threads(n_models: int) -> int:
    """Threads for the per-model kernels: $STACKKIT_THREADS, else the usable cores; at most one per model."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(env_threads(cores), n_models))


def _empty_matrix(n_rows: int, n_columns: int) -> np.ndarray:
    """Uninitialized (n_rows, n_columns) float32 in Fortran order, without transparent huge pages.

    numpy madvises large allocations for huge pages; where the kernel compacts memory on such
    faults (THP defrag=madvise, common on VMs) the first write to a multi-GB array costs 3x the
    CPU and stalls for seconds. Small pages are faster for an array written once, column by column.
    """
    toggle = getattr(getattr(np, "_core", np.core).multiarray, "_set_madvise_hugepage", None)
    previous = toggle(False) if toggle is not None else None
    try:
        return np.empty((n_rows, n_columns), dtype=np.float32, order="F")
    finally:
        if toggle is not None:
            toggle(previous)


def _frame(block: np.ndarray, names: list[str], keys: dict[str, np.ndarray]) -> pd.DataFrame:
    frame = pd.DataFrame(block, columns=names, copy=False)
    for position, (name, values) in enumerate(keys.items()):
        if values.dtype == object:
            values = pd.array(values, dtype="str")
        frame.insert(position, name, values)
    return frame
