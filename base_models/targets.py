"""What `base train` learns per slice: RSNA 2019's six labels, or a unit task's prediction columns (v5).

A unit task's slice model learns ``schema.prediction_columns``, each training slice's target taken
from data/slice_labels.parquet where the slice has a value there (the competitions' slice-level
labels: 2022 the fractured vertebra on the slices showing the fracture, 2023 bowel and
extravasation per image), else the unit's label given to every slice of the unit, as the
competitions' teams did (2022 ``patient_overall``, 2023 the organ grades).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from stackkit.contract import LABEL_WEIGHTS, LABELS, Workdir
from stackkit.contract.records.task import read_task
from stackkit.contract.task_files import TaskCore, is_unit_task, load_task_core
from stackkit.contract.tasks import TaskSchema
from stackkit.contract.validate import load_core
from stackkit.errors import StackkitError
from stackkit.metric import Score, prior_score, weighted_log_loss

from base_models import DEFAULT_WINDOWS

# The pixel windows (center, width in HU) a task's slice model sees unless told otherwise.
TASK_WINDOWS: dict[str, tuple[tuple[float, float], ...]] = {
    "rsna2019": DEFAULT_WINDOWS,
    # bone (the header's window), marrow against the darker fracture line, soft tissue
    "rsna2022-cspine": ((400.0, 1800.0), (260.0, 600.0), (40.0, 400.0)),
    # soft tissue (free air, fat), enhanced organs against their darker injuries, contrast (the aorta, extravasation)
    "rsna2023-abdominal": ((40.0, 400.0), (120.0, 240.0), (300.0, 800.0)),
}


@dataclass(frozen=True)
class TrainTargets:
    """data/ as `base train` uses it: every slice's metadata, ``labels`` (image_id + ``columns``, one row
    per training slice), the folds, the loss weight of each column and, for a unit task, its data/ (``core``)."""

    metadata: pd.DataFrame
    labels: pd.DataFrame
    folds: pd.DataFrame
    columns: tuple[str, ...]
    weights: np.ndarray
    core: TaskCore | None = None

    def score(self, y_true, y_prob) -> Score:
        """The weighted log loss over ``columns`` (RSNA 2019's metric for its six labels)."""
        return weighted_log_loss(y_true, y_prob, self.weights, self.columns)

    def prior(self, y_true) -> Score:
        return prior_score(y_true, self.weights, self.columns)


def load_targets(workdir: Workdir, schema: TaskSchema | None = None) -> TrainTargets:
    """The work directory's data/, read and validated once: RSNA 2019's (``load_core``) or a unit task's
    (``schema``: the work directory's task, read when not given)."""
    wd = Workdir.of(workdir)
    schema = read_task(wd) if schema is None else schema
    if not is_unit_task(schema):
        metadata, labels, folds = load_core(wd)
        return TrainTargets(metadata, labels, folds, LABELS, LABEL_WEIGHTS)
    core = load_task_core(wd, schema)
    columns = tuple(schema.prediction_columns)
    # one weight per column: the unit metric's class weights do not carry over to slices
    return TrainTargets(core.metadata, slice_targets(core), core.folds, columns, np.ones(len(columns)), core)


def slice_targets(core: TaskCore) -> pd.DataFrame:
    """image_id + ``prediction_columns`` (float32) of every training slice (data/folds.parquet's, in its order):
    the slice label where data/slice_labels.parquet has one, else the slice's unit's label."""
    schema, unit = core.schema, core.schema.unit_column
    columns = list(schema.prediction_columns)
    ids = core.folds["image_id"]
    units = core.metadata.set_index("image_id")[unit].reindex(ids).to_numpy(dtype=object)
    known = [c for c in columns if c in core.labels.columns]
    values = np.full((len(ids), len(columns)), np.nan, dtype=np.float32)
    values[:, [columns.index(c) for c in known]] = core.labels.set_index(unit)[known].reindex(units).to_numpy(np.float32)
    if core.slice_labels is not None:
        given = core.slice_labels.set_index("image_id").reindex(ids)
        for column in given.columns:
            have = given[column].notna().to_numpy()
            values[have, columns.index(column)] = given[column].to_numpy(np.float32)[have]
    if np.isnan(values).any():
        row, col = map(int, np.argwhere(np.isnan(values))[0])
        raise StackkitError(f"data/slice_labels.parquet: no '{columns[col]}' for training image {ids.iloc[row]}, and the column is "
                            f"not a label of its {schema.unit}; `base train` needs a target for every prediction column")
    out = pd.DataFrame(values, columns=columns)
    out.insert(0, "image_id", ids.to_numpy(dtype=object))
    return out
