"""A held-out benchmark for the study- and patient-level tasks: exported per-slice predictions,
labels at the target unit and the latent evidence, in memory (the world is described in
:mod:`stackkit.testing.task_latent`).

    bench = make_task_benchmark("rsna2022-cspine", n_patients=400, seed=0)
    bench.oof["effnetv2_s"]            # image_id, fold, C1..C7, patient_overall: each row from the fold model that held its patient out
    bench.test_folds["effnetv2_s"][k]  # image_id, the same columns: fold model k on every test slice
    bench.test["effnetv2_s"]           # their mean
    max_aggregation(bench, bench.test["effnetv2_s"])   # study_id + the schema's labels: the plain aggregation
    schema_metric(bench.schema, bench.test_labels, ...)

Rows of every slice table are in the order of ``bench.slices`` (anatomical: series by series,
slice_no 0..n-1), OOF tables its train slices, test tables its test slices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from stackkit.contract.task_files import unit_columns_to_labels
from stackkit.contract.tasks import TaskSchema, get_task
from stackkit.testing.latent import distinct_ids
from stackkit.testing.task_latent import (MODEL_NAMES, SLICE_COLUMNS, TASK_DIALS, TaskDials, _abdominal_layout, _cspine_layout, _folds,
                                          _Layout, _model_probabilities, _Rows, _world)


@dataclass(frozen=True)
class TaskBenchmark:
    """One generated benchmark. ``slices``: every slice (image_id, the unit's id column, patient_id,
    series_id, slice_no, split; ``vertebra`` 1..7 for the spine, 0 outside C1..C7)."""

    schema: TaskSchema
    columns: tuple[str, ...]  # the per-slice prediction (and slice label) columns
    slices: pd.DataFrame
    folds: pd.DataFrame  # train units: the unit's id column, patient_id, fold
    labels: pd.DataFrame  # train units: the unit's id column + the schema's labels (softmax groups one-hot)
    test_labels: pd.DataFrame  # the same for the held-out test units
    slice_labels: pd.DataFrame  # image_id + columns, every slice: what a slice CNN is trained on
    latent: pd.DataFrame  # image_id + columns, every slice: the evidence before any model error
    models: tuple[str, ...]
    oof: dict[str, pd.DataFrame]  # per model: image_id, fold, columns (train slices)
    test: dict[str, pd.DataFrame]  # per model: image_id, columns (test slices): the fold models' mean
    test_folds: dict[str, list[pd.DataFrame]]  # per model, fold model 0, 1, ...: image_id, columns
    fold_predictions: dict[str, np.ndarray] | None = None  # per model (K, n_slices, C), with keep_fold_predictions

    @property
    def unit_column(self) -> str:
        return self.schema.unit_column

    @property
    def n_folds(self) -> int:
        return int(self.folds["fold"].max()) + 1


def _ids(rng: np.random.Generator, task: str, layout: _Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit ids, patient ids, series ids) as the competition's look."""
    n_units, n_series = len(layout.patient_of_unit), len(layout.sizes)
    numbers = rng.choice(np.arange(10_000, 65_536), size=n_units + n_series, replace=False).astype(str)
    if task == "rsna2022-cspine":  # StudyInstanceUIDs; one study (and one series) per patient
        units = np.char.add("1.2.826.0.1.3680043.", numbers[:n_units]).astype(object)
        return units, distinct_ids(rng, n_units, 8), np.char.add(units.astype(str), ".1").astype(object)
    units = numbers[:n_units].astype(object)  # 2023: integer patient and series ids
    return units, units, numbers[n_units:].astype(object)


def _slice_table(task: str, layout: _Layout, rows: _Rows, ids: tuple, is_test_unit: np.ndarray, image_ids) -> pd.DataFrame:
    unit_ids, patient_ids, series_ids = ids
    unit_column = get_task(task).unit_column
    table = {"image_id": image_ids, unit_column: unit_ids[rows.unit]}
    if unit_column != "patient_id":
        table["patient_id"] = patient_ids[layout.patient_of_unit[rows.unit]]
    table.update({"series_id": series_ids[rows.series], "slice_no": rows.slice_no.astype(np.int32),
                  "split": np.where(is_test_unit[rows.unit], "test", "train").astype(object)})
    if task == "rsna2022-cspine":
        at = rows.slice_no[:, None]  # where _paint places a slice: a fracture's slices are its vertebra's
        lo, hi = layout.intervals[rows.series, :7, 0], layout.intervals[rows.series, :7, 1]
        inside = (at >= lo) & (at < hi)
        table["vertebra"] = np.where(inside.any(axis=1), inside.argmax(axis=1) + 1, 0).astype(np.int8)
    return pd.DataFrame(table)


def _unit_tables(schema: TaskSchema, layout: _Layout, ids: tuple, fold: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(folds, train labels, test labels) at the target unit."""
    unit_ids, patient_ids, _ = ids
    labels = pd.DataFrame({schema.unit_column: unit_ids, **{c: layout.labels[c] for c in schema.labels if c in layout.labels}})
    folds = pd.DataFrame({schema.unit_column: unit_ids, "patient_id": patient_ids[layout.patient_of_unit], "fold": fold})
    folds = folds.loc[:, ~folds.columns.duplicated()]
    train = fold >= 0
    return (folds[train].reset_index(drop=True), labels[train].reset_index(drop=True), labels[~train].reset_index(drop=True))


def _frame(image_ids: np.ndarray, columns: tuple, values: np.ndarray, fold: np.ndarray | None = None) -> pd.DataFrame:
    table = {"image_id": image_ids}
    if fold is not None:
        table["fold"] = fold.astype(np.int8)
    table.update({c: values[:, j] for j, c in enumerate(columns)})
    return pd.DataFrame(table)


def _model_tables(probabilities: np.ndarray, image_ids: np.ndarray, columns: tuple, fold_of_row: np.ndarray) -> tuple:
    """(oof, test mean, per-fold test) frames of one model's (K, n, C) probabilities."""
    train = np.flatnonzero(fold_of_row >= 0)
    test = np.flatnonzero(fold_of_row < 0)
    oof = _frame(image_ids[train], columns, probabilities[fold_of_row[train], train], fold_of_row[train])
    per_fold = [_frame(image_ids[test], columns, p[test]) for p in probabilities]
    mean = _frame(image_ids[test], columns, probabilities[:, test].mean(axis=0, dtype=np.float64).astype(np.float32))
    return oof, mean, per_fold


def make_task_benchmark(task: str, n_patients: int, seed: int = 0, *, n_models: int | None = None, n_folds: int = 5,
                        test_fraction: float = 0.2, dials: TaskDials | None = None,
                        keep_fold_predictions: bool = False) -> TaskBenchmark:
    """Generate the benchmark of ``task`` (``rsna2022-cspine`` or ``rsna2023-abdominal``); deterministic
    for ``seed``. ``dials`` defaults to the task's TASK_DIALS, ``n_models`` to its dials'."""
    schema = get_task(task)
    if task not in SLICE_COLUMNS:
        raise ValueError(f"task {task!r}: the generator makes {' and '.join(SLICE_COLUMNS)} only")
    dials = TASK_DIALS[task] if dials is None else dials
    dials = dials if n_models is None else replace(dials, n_models=n_models)
    if dials.n_models < 1 or n_folds < 2 or n_patients < 2 * n_folds:
        raise ValueError(f"need n_models >= 1, n_folds >= 2 and n_patients >= 2 x n_folds (got {dials.n_models}, {n_folds}, {n_patients})")
    rng = np.random.default_rng(seed)
    layout = (_cspine_layout if task == "rsna2022-cspine" else _abdominal_layout)(rng, n_patients, dials)
    world, slice_y = _world(rng, layout, dials)
    rows, columns = world.rows, SLICE_COLUMNS[task]
    is_test_patient = np.zeros(len(layout.patient_of_unit), dtype=bool)
    is_test_patient[rng.permutation(len(is_test_patient))[: int(round(test_fraction * len(is_test_patient)))]] = True
    is_test_unit = is_test_patient[layout.patient_of_unit]
    fold = _folds(layout.patient_of_unit, layout.truth.max(axis=1), ~is_test_unit, n_folds, seed)
    ids = _ids(rng, task, layout)
    image_ids = distinct_ids(rng, rows.n, 10)
    slices = _slice_table(task, layout, rows, ids, is_test_unit, image_ids)
    folds, labels, test_labels = _unit_tables(schema, layout, ids, fold)
    fold_of_row = fold[rows.unit]
    models = tuple(MODEL_NAMES[m] if m < len(MODEL_NAMES) else f"model{m:02d}" for m in range(dials.n_models))
    oof, test, test_folds, kept = {}, {}, {}, {}
    for m, name in enumerate(models):  # a loop over models, each vectorized over every slice
        probabilities = _model_probabilities(np.random.default_rng([seed, m + 1]), m, world, fold_of_row)
        oof[name], test[name], test_folds[name] = _model_tables(probabilities, image_ids, columns, fold_of_row)
        if keep_fold_predictions:
            kept[name] = probabilities
    return TaskBenchmark(schema, columns, slices, folds, labels, test_labels, _frame(image_ids, columns, slice_y),
                         _frame(image_ids, columns, world.evidence.astype(np.float32)), models, oof, test, test_folds,
                         kept if keep_fold_predictions else None)


def to_schema_columns(schema: TaskSchema, maxima: pd.DataFrame) -> pd.DataFrame:
    """Per-unit aggregates of the slice columns (indexed by unit id) -> the schema's predicted
    labels: a binary group its column; a softmax group's injury classes their columns and the
    healthy class 1 - their max, normalised to sum 1; a predicted derived label its column where
    the slice models predict it (a fracture head's ``patient_overall``), else the max over its
    groups' injury probabilities (the contract's ``unit_columns_to_labels``)."""
    return unit_columns_to_labels(schema, maxima)


def unit_aggregates(unit: np.ndarray, values: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit ids in first-seen order, (n_units, 3 x F) float32): per column of ``values`` (n, F) the
    max, the mean and the mean of the top ``top_k`` over each unit's rows (all of them if fewer)."""
    codes, uniques = pd.factorize(unit)
    count = np.bincount(codes, minlength=len(uniques))
    order = np.argsort(codes, kind="stable")
    starts = np.cumsum(count) - count
    out = np.empty((len(uniques), 3 * values.shape[1]), dtype=np.float32)
    for j in range(values.shape[1]):  # a loop over feature columns, each vectorized over every row
        column = values[:, j].astype(np.float64)
        ranked = np.lexsort((-column, codes))  # by unit, then descending value
        rank = np.arange(len(ranked)) - starts[codes[ranked]]
        top = rank < top_k
        out[:, 3 * j] = np.maximum.reduceat(column[order], starts)
        out[:, 3 * j + 1] = np.bincount(codes, weights=column, minlength=len(uniques)) / count
        out[:, 3 * j + 2] = np.bincount(codes[ranked][top], weights=column[ranked][top], minlength=len(uniques)) / np.minimum(count, top_k)
    return uniques, out


def max_aggregation(bench: TaskBenchmark, predictions: pd.DataFrame) -> pd.DataFrame:
    """The plain aggregation of one model's slice predictions (image_id + columns): per unit the max
    over its slices (every series of it) of each column, in the schema's columns (to_schema_columns)."""
    unit = bench.slices.set_index("image_id")[bench.unit_column].reindex(predictions["image_id"]).to_numpy()
    maxima = predictions[list(bench.columns)].groupby(unit, sort=False).max()
    return to_schema_columns(bench.schema, maxima)


def prior_predictions(bench: TaskBenchmark, units: pd.DataFrame) -> pd.DataFrame:
    """The train labels' rates as every unit's prediction (of ``units``' id column)."""
    rates = bench.labels[list(bench.schema.labels)].mean(axis=0)
    frame = pd.DataFrame(np.broadcast_to(rates.to_numpy(), (len(units), len(rates))).copy(), columns=rates.index)
    frame.insert(0, bench.unit_column, units[bench.unit_column].to_numpy())
    return frame


__all__ = ["TaskBenchmark", "TaskDials", "TASK_DIALS", "make_task_benchmark", "max_aggregation", "prior_predictions", "to_schema_columns"]
