"""Unit features for a study- or patient-level task: slice predictions aggregated along each series,
then rolled up to the target unit (issue 19).

    table = unit_feature_table(slices, {"effnet": oof_effnet, "convnext": oof_convnext}, schema)

Per model and prediction column, along each series (slices ordered by z): the max, the mean, the
mean of the top 3 and 5 slices and of the top 10 % of the series, the mean of the 5 slices centred
on the max, and the max of a 3- and 5-slice rolling mean; on request (``stats``; they did not help
on the benchmark, see DEFAULT_STATS) the std, the share of slices above 0.5 and the position of
the max (0 at the lowest z, 1 at the highest) (a fracture's evidence is a short
run: one bright slice is often noise, three in a row rarely are). A unit with several series takes
``schema.series_rollup`` (mean or max) of its series' values. Across models, per column and stat,
the mean (``models__<column>__<stat>``) and, for the max, the max over models
(``models__<column>__maxmax``); per unit its number of series and slices (``unit__n_series``,
``unit__n_slices``).

Everything is computed over whole arrays sorted by (unit, series, z): reductions run with
``np.*.reduceat`` over series segments, the only loops are over statistics and window offsets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from stackkit.contract.tasks import TaskSchema
from stackkit.errors import ContractError

TOP_K = (3, 5)
TOP_FRACTION = 0.1
ROLLING = (3, 5)
PEAK_HALF_WIDTH = 2  # the window around the max: 2 slices either side
ABOVE = 0.5
STATS = ("max", "mean", "top3", "top5", "top10pct", "std", "above50", "argmax_pos", "peak_mean", "roll3", "roll5")
# What the table holds by default: bench_tasks' tuning seeds (400 patients, the default unit stack),
# held-out loss spine / abdomen 0.332 / 0.262 without std, above50 and argmax_pos, 0.340 / 0.278 with
# every stat; each of those three alone made it worse, dropping the rolling means (0.344 / 0.280),
# the peak window (0.340 / 0.278), the top-k means (0.340 / 0.281) or the unit's counts (0.342 / 0.274) too.
DEFAULT_STATS = ("max", "mean", "top3", "top5", "top10pct", "peak_mean", "roll3", "roll5")
CROSS_MODEL_PREFIX = "models"
UNIT_PREFIX = "unit"
SEP = "__"


def feature_name(source: str, column: str, stat: str) -> str:
    return f"{source}{SEP}{column}{SEP}{stat}"


def feature_column(name: str) -> str | None:
    """The prediction column a feature name reads (None for ``unit__*``)."""
    parts = name.split(SEP)
    return parts[1] if len(parts) == 3 else None


def _ordered_slices(slices: pd.DataFrame, schema: TaskSchema) -> pd.DataFrame:
    unit = schema.unit_column
    needed = ["image_id", unit, "study_id", "z"]
    missing = [c for c in needed if c not in slices.columns]
    if missing:
        raise ContractError(f"slices: no column {missing[0]!r}; unit features need {', '.join(dict.fromkeys(needed))}")
    frame = slices[list(dict.fromkeys(needed))].copy()
    if frame["image_id"].duplicated().any():
        dup = frame.loc[frame["image_id"].duplicated(), "image_id"].iloc[0]
        raise ContractError(f"slices: image_id {dup!r} appears twice")
    z = pd.to_numeric(frame["z"], errors="coerce")
    if z.isna().any():
        raise ContractError(f"slices: z is not a number for image_id {frame.loc[z.isna(), 'image_id'].iloc[0]!r}")
    frame["z"] = z.to_numpy(np.float64)
    frame[unit] = frame[unit].astype(str)
    frame["study_id"] = frame["study_id"].astype(str)
    # image_id last: ties in z are ordered the same whatever the input's row order
    return frame.sort_values([unit, "study_id", "z", "image_id"], kind="stable").reset_index(drop=True)


def _model_values(name: str, frame: pd.DataFrame, image_ids: pd.Series, columns: tuple) -> np.ndarray:
    """(n_slices, C) float64 of one model's predictions in the order of ``image_ids``."""
    source = f"predictions[{name!r}]"
    missing = [c for c in ("image_id",) + tuple(columns) if c not in frame.columns]
    if missing:
        raise ContractError(f"{source}: no column {missing[0]!r}; expected image_id, {', '.join(columns)}")
    ids = frame["image_id"]
    if ids.duplicated().any():
        raise ContractError(f"{source}: image_id {ids[ids.duplicated()].iloc[0]!r} appears twice")
    position = pd.Index(ids).get_indexer(image_ids)
    if (position < 0).any():
        raise ContractError(f"{source}: no prediction for image_id {image_ids.iloc[int(np.argmax(position < 0))]!r}")
    values = np.column_stack([pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64) for c in columns])[position]
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ContractError(f"{source}: '{columns[col]}' is {float(values[row, col])!r} for image_id {image_ids.iloc[row]!r}; "
                            "expected a probability in [0, 1]")
    return values


class _Segments:
    """Series segments of rows sorted by (unit, series, z)."""

    def __init__(self, series_code: np.ndarray):
        self.code = series_code
        self.count = np.bincount(series_code)
        self.starts = np.cumsum(self.count) - self.count
        self.ends = self.starts + self.count
        self.index = np.arange(len(series_code)) - self.starts[series_code]  # slice number within its series

    def sum(self, values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values, self.starts, axis=0)

    def max(self, values: np.ndarray) -> np.ndarray:
        return np.maximum.reduceat(values, self.starts, axis=0)


def _top_means(seg: _Segments, values: np.ndarray, ks: list[np.ndarray]) -> list[np.ndarray]:
    """Per k (an array of one k per series): the mean of each series' k largest values, per column;
    and the row of each series' max (the first of equal maxima along z)."""
    # within a series, descending; values lie in [0, 1] so the series code separates them exactly
    key = seg.code[:, None] * 4.0 + (1.0 - values)
    order = np.argsort(key, axis=0, kind="stable")
    ranked = np.take_along_axis(values, order, axis=0)
    rank = seg.index[:, None]  # order keeps each series' rows inside its own segment
    out = [seg.sum(np.where(rank < np.minimum(k, seg.count)[seg.code][:, None], ranked, 0.0)) / np.minimum(k, seg.count)[:, None]
           for k in ks]
    return out, order[seg.starts]


def _window_mean_at(seg: _Segments, values: np.ndarray, centre: np.ndarray, half: int) -> np.ndarray:
    """Per series and column, the mean of the rows within ``half`` of row ``centre`` (same series)."""
    total = np.zeros(centre.shape)
    count = np.zeros(centre.shape)
    lo, hi = seg.starts[:, None], seg.ends[:, None]
    columns = np.arange(values.shape[1])[None, :]
    for offset in range(-half, half + 1):
        row = centre + offset
        inside = (row >= lo) & (row < hi)
        total += np.where(inside, values[np.clip(row, 0, len(values) - 1), columns], 0.0)
        count += inside
    return total / count


def _rolling_max(seg: _Segments, values: np.ndarray, width: int, fallback: np.ndarray) -> np.ndarray:
    """Per series, the max over its full windows of ``width`` consecutive slices of their mean
    (``fallback``, the series mean, for a series shorter than the window)."""
    cumulative = np.vstack([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
    rows = np.arange(len(values))
    first = rows - width + 1
    full = (seg.index >= width - 1)[:, None]
    window = (cumulative[rows + 1] - cumulative[np.maximum(first, 0)]) / width
    best = seg.max(np.where(full, window, -np.inf))
    return np.where(np.isfinite(best), best, fallback)


def _series_stats(seg: _Segments, values: np.ndarray) -> dict[str, np.ndarray]:
    """Stat name -> (n_series, C) float64."""
    count = seg.count[:, None].astype(np.float64)
    mean = seg.sum(values) / count
    std = np.sqrt(np.maximum(seg.sum(values * values) / count - mean * mean, 0.0))
    ks = [np.full(len(seg.count), k) for k in TOP_K] + [np.maximum(1, np.round(TOP_FRACTION * seg.count)).astype(np.int64)]
    tops, argmax_row = _top_means(seg, values, ks)
    length = np.maximum(seg.count - 1, 1)[:, None]
    stats = {"max": seg.max(values), "mean": mean, "top3": tops[0], "top5": tops[1], "top10pct": tops[2], "std": std,
             "above50": seg.sum((values > ABOVE).astype(np.float64)) / count,
             "argmax_pos": (argmax_row - seg.starts[:, None]) / length,
             "peak_mean": _window_mean_at(seg, values, argmax_row, PEAK_HALF_WIDTH)}
    stats.update({f"roll{w}": _rolling_max(seg, values, w, mean) for w in ROLLING})
    return stats


def _roll_up(per_series: np.ndarray, unit_code: np.ndarray, n_units: int, how: str) -> np.ndarray:
    """(n_units, ...) from (n_series, ...) by ``how`` over each unit's series (series sorted by unit)."""
    count = np.bincount(unit_code, minlength=n_units)
    starts = np.cumsum(count) - count
    if how == "max":
        return np.maximum.reduceat(per_series, starts, axis=0)
    return np.add.reduceat(per_series, starts, axis=0) / count.reshape((-1,) + (1,) * (per_series.ndim - 1))


def unit_feature_table(slices: pd.DataFrame, predictions: Mapping[str, pd.DataFrame], schema: TaskSchema, *,
                       stats: Sequence[str] = DEFAULT_STATS) -> pd.DataFrame:
    """One row per unit, sorted by unit id: the unit id column, then float32 features
    ``<model>__<column>__<stat>``, ``models__<column>__<stat>`` and ``unit__<stat>`` (module docstring).

    ``slices``: image_id, the unit's id column, study_id (the series that z orders), z, for every
    slice to aggregate; ``predictions[model]``: image_id + ``schema.prediction_columns`` for those
    slices, any row order (rows of other slices are ignored). A slice without a prediction is one
    ContractError naming the model and the image_id. ``stats``: which of ``STATS`` per model and column."""
    unknown = [s for s in stats if s not in STATS]
    if unknown or not stats:
        raise ContractError(f"unit features: unknown stat {unknown[0] if unknown else None!r}; expected some of {', '.join(STATS)}")
    if not predictions:
        raise ContractError("unit features: no model predictions given")
    ordered = _ordered_slices(slices, schema)
    unit = schema.unit_column
    columns = tuple(schema.prediction_columns)
    series_key = ordered[unit] + "\x00" + ordered["study_id"]
    series_code = pd.factorize(series_key, sort=False)[0]  # rows are sorted, so codes follow the sort
    seg = _Segments(series_code)
    unit_of_series = ordered[unit].to_numpy()[seg.starts]
    unit_code, unit_ids = pd.factorize(unit_of_series, sort=False)
    how = schema.series_rollup or "mean"
    blocks, per_model = {}, {}
    for name in predictions:  # a loop over models, each vectorized over every slice
        per_series = _series_stats(seg, _model_values(name, predictions[name], ordered["image_id"], columns))
        per_model[name] = {s: _roll_up(v, unit_code, len(unit_ids), how) for s, v in per_series.items()}
        for j, column in enumerate(columns):
            blocks.update({feature_name(name, column, s): per_model[name][s][:, j] for s in stats})
    for j, column in enumerate(columns):
        for s in stats:
            blocks[feature_name(CROSS_MODEL_PREFIX, column, s)] = np.mean([per_model[m][s][:, j] for m in per_model], axis=0)
        blocks[feature_name(CROSS_MODEL_PREFIX, column, "maxmax")] = np.max([per_model[m]["max"][:, j] for m in per_model], axis=0)
    blocks[f"{UNIT_PREFIX}{SEP}n_series"] = np.bincount(unit_code, minlength=len(unit_ids))
    blocks[f"{UNIT_PREFIX}{SEP}n_slices"] = np.bincount(unit_code, weights=seg.count, minlength=len(unit_ids))
    table = pd.DataFrame({k: np.asarray(v, dtype=np.float32) for k, v in blocks.items()})
    table.insert(0, unit, np.asarray(unit_ids, dtype=object))
    return table
