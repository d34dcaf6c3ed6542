"""A task work directory's files (contract v5): labels at the target unit, optional slice labels, folds per
slice, unit-level prediction tables, and :class:`TaskCore`, what every command of a unit task reads once.

A work directory whose task is ``rsna2019`` (no ``data/task.json``) never comes here: its files are read by
:mod:`stackkit.contract.validate` exactly as in v4. Every check names the file, the column and the unit (or
image) id, as there.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stackkit.contract import Workdir
from stackkit.contract.io import read_table
from stackkit.contract.records.task import read_task
from stackkit.contract.tasks import TaskSchema, normalized_predictions
from stackkit.contract.validate import (check_id_coverage, check_ids, check_numeric, check_probabilities, check_zero_one, ids_in,
                                        read_metadata, require_columns, row_ref, validate_folds, verify_data_file)
from stackkit.errors import ContractError, LeakageError, StackkitError


def is_unit_task(schema: TaskSchema) -> bool:
    """A task scored per study or patient (v5); ``rsna2019`` (per slice) keeps the v4 path."""
    return schema.unit != "slice"


def _check_unit_coverage(ids: pd.Series, expected, source, schema: TaskSchema, what: str) -> None:
    """``ids`` (a unit-level table's) equal ``expected`` as sets: no unknown unit, none missing."""
    check_id_coverage(ids, expected, source, what, column=schema.unit_column, unit=schema.unit)


def units_of(metadata: pd.DataFrame, schema: TaskSchema, split: str) -> np.ndarray:
    """The sorted unit ids of ``split``'s slices."""
    return np.sort(pd.unique(metadata.loc[metadata["split"] == split, schema.unit_column].to_numpy(dtype=object)))


def validate_unit_labels(frame: pd.DataFrame, source, schema: TaskSchema, metadata: pd.DataFrame | None = None) -> pd.DataFrame:
    """data/labels.parquet of a unit task: the unit's id column + ``schema.labels`` as int8, one row per train
    unit (softmax groups one-hot: exactly one 1 per row). Returned sorted by unit id."""
    unit, columns = schema.unit_column, list(schema.labels)
    require_columns(frame, (unit, *columns), source, f"task {schema.name!r} has one row per train {schema.unit}: {unit} + {', '.join(columns)}")
    frame = check_zero_one(check_ids(frame[[unit, *columns]], source, column=unit), columns, source)
    for group in (g for g in schema.groups if g.kind == "softmax"):
        totals = frame[list(group.classes)].to_numpy(dtype=np.int64).sum(axis=1)
        if (totals != 1).any():
            pos = int(np.argmax(totals != 1))
            raise ContractError(f"{source}: {int(totals[pos])} of {', '.join(group.classes)} are 1 at {row_ref(frame, pos)}; "
                                f"expected exactly one (softmax group '{group.name}')")
    if metadata is not None:
        _check_unit_coverage(frame[unit], units_of(metadata, schema, "train"), source, schema, "train")
    return frame.sort_values(unit, kind="stable").reset_index(drop=True)


def validate_slice_labels(frame: pd.DataFrame, source, schema: TaskSchema, metadata: pd.DataFrame | None = None) -> pd.DataFrame:
    """data/slice_labels.parquet (optional): image_id + any of ``schema.prediction_columns`` as int8, train slices only."""
    require_columns(frame, ("image_id",), source)
    columns = [c for c in frame.columns if c != "image_id"]
    unknown = [c for c in columns if c not in schema.prediction_columns]
    if unknown or not columns:
        raise ContractError(f"{source}: column {unknown[0]!r} is not a prediction column of task {schema.name!r}" if unknown else
                            f"{source}: no label column" + f"; expected image_id + some of {', '.join(schema.prediction_columns)}")
    frame = check_zero_one(check_ids(frame, source), columns, source)
    if metadata is not None:
        known = ids_in(frame["image_id"], metadata.loc[metadata["split"] == "train", "image_id"])
        if not known.all():
            pos = int(np.argmax(~known))
            raise ContractError(f"{source}: image_id '{frame['image_id'].iloc[pos]}' at row {pos + 1} is not a train image in data/metadata.parquet")
    return frame.reset_index(drop=True)


def check_unit_rows(frame: pd.DataFrame, source, schema: TaskSchema, *, expected_units, folds: pd.DataFrame | None = None,
                    remedy: str = "refit with `stack fit`") -> pd.DataFrame:
    """The keys of a unit-level table: every expected unit once and no other; with ``folds`` (the units'
    folds) a ``fold`` column that agrees with data/folds.parquet (a LeakageError naming ``remedy`` otherwise)."""
    unit = schema.unit_column
    require_columns(frame, (unit, *(["fold"] if folds is not None else [])), source)
    frame = check_ids(frame, source, column=unit)
    _check_unit_coverage(frame[unit], expected_units, source, schema, "train" if folds is not None else "test")
    if folds is not None:
        frame = check_numeric(frame, ["fold"], source)
        expected = folds.set_index(unit)["fold"].reindex(frame[unit]).to_numpy()
        bad = frame["fold"].to_numpy() != expected
        if bad.any():
            pos = int(np.argmax(bad))
            raise LeakageError(f"{source}: fold {frame['fold'].iloc[pos]:g} at {row_ref(frame, pos)} disagrees with data/folds.parquet "
                               f"(fold {expected[pos]}); {remedy}")
        frame["fold"] = expected.astype(np.int8)
    return frame


def validate_unit_predictions(frame: pd.DataFrame, source, schema: TaskSchema, *, expected_units, folds: pd.DataFrame | None = None) -> pd.DataFrame:
    """A unit-level prediction table (stack/<stacker>/oof.parquet, test.parquet): the unit id (+ ``fold`` with
    ``folds``, the units' folds, checked) + ``schema.labels`` probabilities, every expected unit once; sorted by unit."""
    unit, columns = schema.unit_column, list(schema.labels)
    require_columns(frame, (unit, *columns), source, f"expected {unit} + {', '.join(columns)}")
    keep = [unit, *(["fold"] if folds is not None and "fold" in frame.columns else []), *columns]
    frame = check_unit_rows(frame[keep], source, schema, expected_units=expected_units, folds=folds)
    frame = check_probabilities(frame, source, columns=columns)
    return frame.sort_values(unit, kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class TaskCore:
    """A unit task's data/, read and cross-checked once: metadata (every slice), labels (one row per train
    unit), folds (one row per train slice) and the optional slice labels."""

    schema: TaskSchema
    metadata: pd.DataFrame
    labels: pd.DataFrame
    folds: pd.DataFrame
    slice_labels: pd.DataFrame | None = None

    @property
    def n_folds(self) -> int:
        return int(self.folds["fold"].max()) + 1

    @functools.cached_property
    def unit_folds(self) -> pd.DataFrame:
        """The unit id and its fold (all slices of a patient share one), one row per train unit, sorted by unit."""
        unit = self.schema.unit_column
        of = self.metadata.set_index("image_id")[unit].reindex(self.folds["image_id"]).to_numpy(dtype=object)
        table = pd.DataFrame({unit: of, "fold": self.folds["fold"].to_numpy()}).drop_duplicates(unit)
        return table.sort_values(unit, kind="stable").reset_index(drop=True)

    def slices(self, split: str) -> pd.DataFrame:
        """image_id, the unit's id column, study_id (the series z orders) and z of ``split``'s slices."""
        columns = list(dict.fromkeys(["image_id", self.schema.unit_column, "study_id", "z"]))
        return self.metadata.loc[self.metadata["split"] == split, columns].reset_index(drop=True)


def _check_unit_splits(metadata: pd.DataFrame, schema: TaskSchema, source) -> None:
    """A unit (a patient with two series) lies in one split: its series are scored as one."""
    spread = metadata.groupby(schema.unit_column, sort=False)["split"].nunique()
    if (spread > 1).any():
        which = spread.index[(spread > 1).to_numpy()][0]
        raise ContractError(f"{source}: {schema.unit_column} '{which}' is in both train and test splits; a {schema.unit} belongs to one")


def load_task_core(workdir, schema: TaskSchema | None = None) -> TaskCore:
    """data/ of a unit task (``schema``: the work directory's, read when not given), every file validated and
    checked against data/prepare.json's sha256 when it records them."""
    wd = Workdir.of(workdir)
    schema = read_task(wd) if schema is None else schema
    if not is_unit_task(schema):
        raise StackkitError(f"{wd.task_record}: task {schema.name!r} is scored per slice; read it with stackkit.contract.validate.load_core")
    metadata = read_metadata(wd)
    _check_unit_splits(metadata, schema, wd.relative(wd.metadata))
    labels = validate_unit_labels(_read(wd, wd.labels, "labels file"), wd.relative(wd.labels), schema, metadata)
    folds = validate_folds(_read(wd, wd.folds, "folds file"), wd.relative(wd.folds), metadata)
    check_id_coverage(folds["image_id"], metadata.loc[metadata["split"] == "train", "image_id"], wd.relative(wd.folds), "train")
    slice_labels = None
    if wd.slice_labels.exists():
        slice_labels = validate_slice_labels(_read(wd, wd.slice_labels, "slice labels file"), wd.relative(wd.slice_labels), schema, metadata)
    return TaskCore(schema, metadata, labels, folds, slice_labels)


def _read(wd: Workdir, path: os.PathLike, what: str) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise ContractError(f"{path}: not found; run `data prepare --task` first")
    verify_data_file(wd, path)
    return read_table(path, what=what)


def unit_columns_to_labels(schema: TaskSchema, maxima: pd.DataFrame) -> pd.DataFrame:
    """Per-unit values of the prediction columns (indexed by unit id) -> the schema's labels: a binary group
    its column; a softmax group its class columns where all are given, else its injury classes and the
    healthy class 1 - their max, normalised to sum 1; a predicted derived label its column where given,
    else the max of its groups' injury probabilities."""
    out, injury = {}, {}
    for group in schema.groups:
        if group.kind == "binary":
            out[group.name] = injury[group.name] = maxima[group.name].to_numpy(np.float64)
            continue
        sick = maxima[list(group.classes[1:])].to_numpy(np.float64)
        healthy = (maxima[group.classes[0]].to_numpy(np.float64) if group.classes[0] in maxima.columns
                   else np.clip(1.0 - sick.max(axis=1), 1e-6, 1.0))
        classes = np.column_stack([healthy, sick])
        classes /= np.maximum(classes.sum(axis=1, keepdims=True), 1e-12)
        out.update(zip(group.classes, classes.T))
        injury[group.name] = 1.0 - classes[:, 0]
    for derived in (d for d in schema.derived if d.predicted):
        out[derived.name] = (maxima[derived.name].to_numpy(np.float64) if derived.name in maxima.columns
                             else np.max([injury[m] for m in derived.of], axis=0))
    frame = pd.DataFrame({c: out[c] for c in schema.labels})
    frame.insert(0, schema.unit_column, maxima.index.to_numpy(dtype=object))
    return frame


def unit_max_predictions(core: TaskCore, predictions: pd.DataFrame) -> pd.DataFrame:
    """A model's slice predictions (image_id + ``schema.prediction_columns``) as its plain unit-level prediction:
    per unit the max over its slices (every series) of each column, in the schema's labels, sorted by unit."""
    schema = core.schema
    unit = core.metadata.set_index("image_id")[schema.unit_column].reindex(predictions["image_id"]).to_numpy(dtype=object)
    maxima = predictions[list(schema.prediction_columns)].groupby(unit, sort=True).max()
    return unit_columns_to_labels(schema, maxima)


def write_task_data(workdir, schema: TaskSchema, metadata: pd.DataFrame, labels: pd.DataFrame, folds: pd.DataFrame,
                    slice_labels: pd.DataFrame | None = None) -> Workdir:
    """data/ of a unit task written as one set (metadata, labels, folds, the optional slice labels and
    task.json), each table checked first as its reader checks it; for whoever assembles data/ in code."""
    from stackkit.contract.io import replace_dir, write_parquet
    from stackkit.contract.records.task import TaskRecord, write_task_record
    from stackkit.contract.validate import validate_metadata

    wd = Workdir.of(workdir)
    if not is_unit_task(schema):
        raise StackkitError(f"task {schema.name!r} is scored per slice: its data/ is written by `data prepare`")
    metadata = validate_metadata(metadata, "metadata")
    _check_unit_splits(metadata, schema, "metadata")
    tables = {wd.metadata.name: metadata, wd.labels.name: validate_unit_labels(labels, "labels", schema, metadata)}
    folds = validate_folds(folds, "folds", metadata)
    check_id_coverage(folds["image_id"], metadata.loc[metadata["split"] == "train", "image_id"], "folds", "train")
    tables[wd.folds.name] = folds
    if slice_labels is not None:
        tables[wd.slice_labels.name] = validate_slice_labels(slice_labels, "slice labels", schema, metadata)
    with replace_dir(wd.data_dir) as folder:
        for name, table in tables.items():
            write_parquet(table, folder / name)
        write_task_record(folder, TaskRecord(schema.name))
    return wd


def mean_unit_predictions(schema: TaskSchema, frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The mean of unit-level predictions of the same units, softmax groups renormalised, sorted by unit."""
    unit, labels = schema.unit_column, list(schema.labels)
    aligned = [f.assign(**{unit: f[unit].astype(str)}).set_index(unit).sort_index()[labels] for f in frames]
    mean = pd.DataFrame(np.mean([a.to_numpy(np.float64) for a in aligned], axis=0), columns=labels,
                        index=pd.Index(aligned[0].index.to_numpy(dtype=object), name=unit))
    probabilities = normalized_predictions(schema, mean, "the stacker's test sets")
    out = pd.DataFrame({c: probabilities[c].astype(np.float32) for c in labels})
    out.insert(0, unit, mean.index.to_numpy(dtype=object))
    return out
