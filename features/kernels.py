"""Pure numpy kernels of the level-2 features: arrays in, arrays out (no frames, no contract errors).

The rows are in one global order (:func:`study_layout`) in which a study is one contiguous
segment, so every feature is a whole-column expression: shifted arrays masked at segment edges
(:func:`lag`, :func:`lead`), centered means from a cumulative sum (:func:`rolling_mean`), segment
reductions with ``ufunc.reduceat`` and ranks from one sort of (segment, value) keys
(:class:`SegmentStats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stackkit.contract.columns import MODELS_PREFIX, ROLL_WINDOWS, TOP_K
from stackkit.contract import LABELS, slice_order


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


# --- the feature matrix and the columns of the models ----------------------------------------


class FeatureMatrix:
    """The output columns: one float32 matrix in Fortran order, so each feature column is one
    contiguous array and the train and test frames are views of its two row blocks (no copy)."""

    def __init__(self, n_rows: int, definitions: dict[str, str]):
        self.names = list(definitions)
        self.column_of = {name: j for j, name in enumerate(self.names)}
        self.matrix = _empty_matrix(n_rows, len(self.names))

    def __call__(self, name: str) -> np.ndarray:
        return self.matrix[:, self.column_of[name]]


def model_columns(col: FeatureMatrix, model: str, preds: np.ndarray, plan: Plan, lags: int, wide: bool = False) -> str:
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


def cross_model_columns(col: FeatureMatrix, model_preds: list[np.ndarray], wide: bool = False) -> None:
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
