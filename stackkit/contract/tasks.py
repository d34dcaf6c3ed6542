"""Task schemas (planned for contract v5): what a competition predicts, how it is scored, how it is submitted.

A :class:`TaskSchema` is a small declarative, frozen record; the metric (:func:`schema_metric`) and
the submission writer (:func:`write_submission`) are computed from it, never written per task.
Not wired into the pipeline yet: every command still reads ``stackkit.contract.LABELS`` and
``stackkit.metric`` (the RSNA 2019 task, which the ``rsna2019`` schema reproduces exactly).

The built-in schemas follow the published metrics:

- ``rsna2019`` (RSNA Intracranial Hemorrhage Detection): the weighted multi-label log loss of
  ``stackkit.metric``: binary cross-entropy per (image, label), weight 2 for ``any`` and 1 for the
  five subtypes, ``sum(w * bce) / sum(w)`` over all pairs, probabilities clipped to [1e-7, 1 - 1e-7].
- ``rsna2022-cspine`` (RSNA 2022 Cervical Spine Fracture Detection): the evaluation page
  (kaggle.com/competitions/rsna-2022-cervical-spine-fracture-detection/overview/evaluation)
  defines ``L_ij = -w_j [y_ij log p_ij + (1 - y_ij) log(1 - p_ij)]`` "averaged across all rows",
  the weights by the true value come from the host (discussion 340392: a vertebra 1 / 2,
  ``patient_overall`` 7 / 14). Kaggle published no scoring code. The reconstruction the
  competitors trained on (discussion 341854, with the row-wise weight normalisation of discussion
  344565) and MLE-bench's grader built on it (openai/mle-bench,
  ``mlebench/competitions/rsna-2022-cervical-spine-fracture-detection/grade.py``) normalise per
  study: ``loss_i = sum_j w_ij l_ij / sum_j w_ij`` over the study's 8 targets, the score the mean
  of ``loss_i`` over studies. So ``patient_overall`` and the vertebrae are pooled within each
  study's row, not averaged as two target types, and every study counts once (reduction
  ``row``); clipped at 1e-15 as there.
- ``rsna2023-abdominal`` (RSNA 2023 Abdominal Trauma Detection): the host's metric notebook
  (kaggle.com/code/metric/rsna-trauma-metric): per group (bowel, extravasation, kidney, liver,
  spleen) the predicted probabilities are normalised to sum 1 and scored with
  ``sklearn.metrics.log_loss(y_true, y_pred, sample_weight=w)``, a weighted mean over patients
  with the weight of the true class (bowel 1/2, extravasation 1/6, organs healthy/low/high 1/2/4);
  ``any_injury`` is derived, for the labels and the normalised predictions alike, as the max over
  the groups of ``1 - p(healthy)`` and scored the same way with weights 1/6; the score is the
  mean of the six losses (reduction ``group``). Clipped at 1e-15, sklearn's ``log_loss`` eps until
  1.2 (later versions clip at float64's eps, 2.2e-16: the two differ only for a probability
  within 1e-15 of 0 or 1).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stackkit.contract import LABELS
from stackkit.errors import ContractError, one_line

# Target unit -> the contract's id column of that unit (data/metadata.parquet).
UNITS = {"slice": "image_id", "study": "study_id", "patient": "patient_id"}
ROLLUPS = ("mean", "max")
GROUP_KINDS = ("binary", "softmax")
# pooled: sum(w * l) / sum(w) over every (unit, part); row: per unit sum(w * l) / sum(w) over its
# parts, then the mean over units; group: per part sum(w * l) / sum(w) over units, then the mean.
REDUCTIONS = ("pooled", "row", "group")
LAYOUTS = ("long", "wide")


def _as_tuple(obj, *names: str) -> None:
    """Lists written in a declaration become tuples: a frozen schema is hashable and immutable."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, list):
            object.__setattr__(obj, name, tuple(value))


@dataclass(frozen=True)
class Group:
    """One scored group. ``binary``: one probability column named ``name``, ``weights`` =
    (negative, positive), by the true value. ``softmax``: ``classes`` are k >= 2 columns, the first
    the healthy class; probabilities are normalised to sum 1 within the group, exactly one class is
    true per unit, and ``weights`` has one weight per class (the true class's counts)."""

    name: str
    kind: str
    weights: tuple[float, ...]
    classes: tuple[str, ...] = ()

    def __post_init__(self):
        _as_tuple(self, "weights", "classes")

    @property
    def columns(self) -> tuple[str, ...]:
        return self.classes if self.kind == "softmax" else (self.name,)


@dataclass(frozen=True)
class Derived:
    """A label derived from groups: the max over ``of`` of each member's injury probability (a
    binary group's p, a softmax group's 1 - p(first class)). ``predicted``: the models predict it
    as a column of its own, the submission carries it and it is scored against the labels' column
    when they have one, else against the rule (2019 ``any``, 2022 ``patient_overall``); otherwise
    the truth and the prediction both come from the rule and nothing is submitted (2023
    ``any_injury``). ``weights`` = (negative, positive)."""

    name: str
    of: tuple[str, ...]
    weights: tuple[float, float]
    predicted: bool = True

    def __post_init__(self):
        _as_tuple(self, "of", "weights")


@dataclass(frozen=True)
class Submission:
    """The competition's file: ``long``, one row per (unit, column) with id ``<unit id>_<column>``
    in ``id_column`` and the probability in ``value_column``; or ``wide``, one row per unit, its id
    in ``id_column`` and one column per entry of ``columns``."""

    layout: str
    id_column: str
    columns: tuple[str, ...]
    value_column: str | None = None

    def __post_init__(self):
        _as_tuple(self, "columns")


@dataclass(frozen=True)
class TaskSchema:
    """A task: its groups and derived labels, the target ``unit`` (slice, study or patient), how a
    unit's series roll up (``series_rollup``: ``mean`` or ``max`` of the series' predictions where
    a unit holds several, None where each holds one), the metric's ``reduction`` and ``clip``, and
    the submission. Checked at construction: a bad field is one ContractError naming it."""

    name: str
    unit: str
    groups: tuple[Group, ...]
    derived: tuple[Derived, ...]
    reduction: str
    submission: Submission
    series_rollup: str | None = None
    clip: float = 1e-15
    # what a slice-level base model predicts (preds/<model>/ columns); () means the predicted labels
    slice_columns: tuple[str, ...] = ()

    def __post_init__(self):
        _as_tuple(self, "groups", "derived", "slice_columns")
        _check_header(self)
        _check_groups(self)
        _check_derived(self)
        _check_names(self)
        _check_submission(self)

    @property
    def unit_column(self) -> str:
        return UNITS[self.unit]

    @property
    def labels(self) -> tuple[str, ...]:
        """The columns the models predict, in order: every group's columns, then the predicted derived labels."""
        return tuple(c for g in self.groups for c in g.columns) + tuple(d.name for d in self.derived if d.predicted)

    @property
    def prediction_columns(self) -> tuple[str, ...]:
        """The columns of a base model's per-slice predictions: ``slice_columns``, else the labels."""
        return self.slice_columns or self.labels

    @property
    def parts(self) -> tuple[str, ...]:
        """What the metric scores, in order: every group (by name), then every derived label."""
        return tuple(g.name for g in self.groups) + tuple(d.name for d in self.derived)


def _refuse(schema, field: str, value, expected: str) -> ContractError:
    return ContractError(f"task schema {schema.name!r}: {field} is {one_line(repr(value), 80)}; expected {expected}")


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _name(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_weights(schema, field: str, weights, count: int, meaning: str) -> None:
    if not isinstance(weights, tuple) or len(weights) != count or not all(_number(w) and w > 0 for w in weights):
        raise _refuse(schema, field, weights, f"{count} positive numbers ({meaning})")


def _check_header(schema) -> None:
    if not _name(schema.name):
        raise ContractError(f"task schema: name is {schema.name!r}; expected a non-empty name")
    if schema.unit not in UNITS:
        raise _refuse(schema, "unit", schema.unit, " or ".join(UNITS))
    if schema.series_rollup is not None and schema.series_rollup not in ROLLUPS:
        raise _refuse(schema, "series_rollup", schema.series_rollup, f"None or {' or '.join(ROLLUPS)}")
    if schema.unit == "slice" and schema.series_rollup is not None:
        raise _refuse(schema, "series_rollup", schema.series_rollup, "None for unit 'slice' (a slice is in one series)")
    if schema.unit == "patient" and schema.series_rollup is None:
        raise _refuse(schema, "series_rollup", None, f"{' or '.join(ROLLUPS)} for unit 'patient' (a patient may have several series)")
    if schema.reduction not in REDUCTIONS:
        raise _refuse(schema, "reduction", schema.reduction, " or ".join(REDUCTIONS))
    if not _number(schema.clip) or not 0 < schema.clip < 0.5:
        raise _refuse(schema, "clip", schema.clip, "a number in (0, 0.5)")


def _named_entries(schema, field: str, entries, kind: type):
    """(field[i], entry) of a tuple of ``kind``, each checked to be one, with a name."""
    if not isinstance(entries, tuple):
        raise _refuse(schema, field, entries, f"a tuple of {kind.__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, kind):
            raise _refuse(schema, f"{field}[{i}]", entry, f"a {kind.__name__}")
        if not _name(entry.name):
            raise _refuse(schema, f"{field}[{i}].name", entry.name, "a non-empty name")
        yield f"{field}[{i}]", entry


def _check_groups(schema) -> None:
    if not schema.groups:
        raise _refuse(schema, "groups", schema.groups, "at least one Group")
    for field, group in _named_entries(schema, "groups", schema.groups, Group):
        if group.kind not in GROUP_KINDS:
            raise _refuse(schema, f"{field}.kind", group.kind, " or ".join(GROUP_KINDS))
        if group.kind == "binary":
            if group.classes:
                raise _refuse(schema, f"{field}.classes", group.classes, "none for a binary group (its column is its name)")
            _check_weights(schema, f"{field}.weights", group.weights, 2, "negative, positive")
            continue
        if not isinstance(group.classes, tuple) or len(group.classes) < 2 or not all(_name(c) for c in group.classes):
            raise _refuse(schema, f"{field}.classes", group.classes, "2 or more class column names, the healthy class first")
        _check_weights(schema, f"{field}.weights", group.weights, len(group.classes), "one per class")


def _check_derived(schema) -> None:
    known = [g.name for g in schema.groups]
    for field, derived in _named_entries(schema, "derived", schema.derived, Derived):
        if not isinstance(derived.of, tuple) or not derived.of:
            raise _refuse(schema, f"{field}.of", derived.of, "one or more group names")
        unknown = [m for m in derived.of if m not in known]
        if unknown:
            raise _refuse(schema, f"{field}.of", unknown[0], f"a group of the schema ({', '.join(known)})")
        _check_weights(schema, f"{field}.weights", derived.weights, 2, "negative, positive")
        if not isinstance(derived.predicted, bool):
            raise _refuse(schema, f"{field}.predicted", derived.predicted, "true or false")


def _check_names(schema) -> None:
    """Every label, softmax group name and derived name once, none the unit's id column."""
    seen = {schema.unit_column: "the unit's id column"}
    entries = []
    for i, group in enumerate(schema.groups):
        entries.append((f"groups[{i}].name", group.name))
        entries += [(f"groups[{i}].classes[{k}]", c) for k, c in enumerate(group.classes)]
    entries += [(f"derived[{i}].name", d.name) for i, d in enumerate(schema.derived)]
    for field, name in entries:
        if name in seen:
            raise _refuse(schema, field, name, f"a label not used already (it is {seen[name]})")
        seen[name] = field


def _check_submission(schema) -> None:
    sub = schema.submission
    if not isinstance(sub, Submission):
        raise _refuse(schema, "submission", sub, "a Submission")
    if sub.layout not in LAYOUTS:
        raise _refuse(schema, "submission.layout", sub.layout, " or ".join(LAYOUTS))
    if not _name(sub.id_column):
        raise _refuse(schema, "submission.id_column", sub.id_column, "a column name")
    if sub.layout == "long" and (not _name(sub.value_column) or sub.value_column == sub.id_column):
        raise _refuse(schema, "submission.value_column", sub.value_column, "a column name other than the id column for a long submission")
    labels = schema.labels
    if not isinstance(sub.columns, tuple) or len(set(sub.columns)) != len(sub.columns):
        raise _refuse(schema, "submission.columns", sub.columns, "each predicted label once")
    extra = [c for c in sub.columns if c not in labels]
    if extra:
        raise _refuse(schema, "submission.columns", extra[0], f"a predicted label ({', '.join(labels)})")
    missing = [c for c in labels if c not in sub.columns]
    if missing:
        raise _refuse(schema, "submission.columns", sub.columns, f"every predicted label (missing {missing[0]!r})")
    columns = schema.slice_columns
    if not isinstance(columns, tuple) or not all(_name(c) for c in columns) or len(set(columns)) != len(columns):
        raise _refuse(schema, "slice_columns", columns, "distinct column names")
    if schema.unit == "slice" and columns and columns != labels:
        raise _refuse(schema, "slice_columns", columns, f"() or the predicted labels for a slice-level task ({', '.join(labels)})")


@dataclass(frozen=True)
class TaskScore:
    """``overall``: the task's metric; ``parts``: per group and derived label (by name), the
    weighted mean loss over units, ``sum(w * l) / sum(w)`` (for rsna2019, each label's mean BCE)."""

    overall: float
    parts: dict[str, float]

    def as_dict(self) -> dict:
        return {"overall": self.overall, "parts": dict(self.parts)}


def _by_unit(frame, schema: TaskSchema, source: str) -> pd.DataFrame:
    """``frame`` indexed by its unit ids (as strings), each unit once."""
    column = schema.unit_column
    if not isinstance(frame, pd.DataFrame):
        raise ContractError(f"{source}: expected a table, got {type(frame).__name__}")
    if column not in frame.columns:
        raise ContractError(f"{source}: no '{column}' column; task {schema.name!r} has one row per {schema.unit}")
    ids = frame[column].astype(str)
    repeated = ids.duplicated().to_numpy()
    if repeated.any():
        pos = int(np.argmax(repeated))
        raise ContractError(f"{source}: {column} {ids.iloc[pos]!r} at row {pos + 1} appears twice; expected one row per {schema.unit}")
    return frame.set_index(pd.Index(ids.to_numpy(dtype=object), name=column))


def _numbers(frame: pd.DataFrame, columns, source: str, schema: TaskSchema) -> np.ndarray:
    """(n, len(columns)) float64 of the named columns; a missing column is an error, text becomes NaN."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ContractError(f"{source}: no column {missing[0]!r}; task {schema.name!r} needs {', '.join(columns)}")
    if not len(columns):
        return np.empty((len(frame), 0))
    return np.column_stack([pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=np.float64) for c in columns])


def _refuse_cell(bad: np.ndarray, frame: pd.DataFrame, columns, source: str, expected: str) -> None:
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        value = frame[columns[col]].iloc[row]
        value = value.item() if isinstance(value, np.generic) else value  # 1.5, not np.float64(1.5)
        raise ContractError(f"{source}: '{columns[col]}' is {one_line(repr(value), 40)} "
                            f"for {frame.index.name} {frame.index[row]}; expected {expected}")


def _truth(schema: TaskSchema, frame: pd.DataFrame, source: str) -> dict[str, np.ndarray]:
    """Label column -> 0/1 values; a softmax group one-hot; a predicted derived label's column where present."""
    present = [d.name for d in schema.derived if d.predicted and d.name in frame.columns]
    columns = [c for g in schema.groups for c in g.columns] + present
    values = _numbers(frame, columns, source, schema)
    _refuse_cell(~np.isin(values, (0.0, 1.0)), frame, columns, source, "0 or 1")
    out = dict(zip(columns, values.T))
    for group in (g for g in schema.groups if g.kind == "softmax"):
        totals = np.sum([out[c] for c in group.classes], axis=0)
        if (totals != 1).any():
            pos = int(np.argmax(totals != 1))
            raise ContractError(f"{source}: {int(totals[pos])} of {', '.join(group.classes)} are 1 for {frame.index.name} "
                                f"{frame.index[pos]}; expected exactly one (group '{group.name}')")
    return out


def normalized_predictions(schema: TaskSchema, frame: pd.DataFrame, source: str = "predictions") -> dict[str, np.ndarray]:
    """Predicted column -> probabilities, checked (``frame`` indexed by unit): binary columns in
    [0, 1]; a softmax group's non-negative with a positive sum, divided by that sum."""
    out = {}
    binary = [g.name for g in schema.groups if g.kind == "binary"] + [d.name for d in schema.derived if d.predicted]
    values = _numbers(frame, binary, source, schema)
    _refuse_cell(~np.isfinite(values) | (values < 0) | (values > 1), frame, binary, source, "a probability in [0, 1]")
    out.update(zip(binary, values.T))
    for group in (g for g in schema.groups if g.kind == "softmax"):
        values = _numbers(frame, group.classes, source, schema)
        _refuse_cell(~np.isfinite(values) | (values < 0), frame, group.classes, source, "a non-negative probability")
        totals = values.sum(axis=1, keepdims=True)
        if (totals <= 0).any():
            pos = int(np.argmax(totals[:, 0] <= 0))
            raise ContractError(f"{source}: {', '.join(group.classes)} are all 0 for {frame.index.name} {frame.index[pos]}; "
                                f"expected a positive probability in group '{group.name}'")
        out.update(zip(group.classes, (values / totals).T))
    return out


def _bce(y: np.ndarray, p: np.ndarray, clip: float) -> np.ndarray:
    p = np.clip(p, clip, 1.0 - clip)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def _loss_table(schema: TaskSchema, y: dict, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(loss, weight), each (n_units, n_parts) in ``schema.parts`` order."""
    losses, weights, injury_true, injury_pred = [], [], {}, {}
    for g in schema.groups:
        if g.kind == "binary":
            truth, pred = y[g.name], p[g.name]
            losses.append(_bce(truth, pred, schema.clip))
            weights.append(np.where(truth == 1, g.weights[1], g.weights[0]))
        else:
            truth_k = np.column_stack([y[c] for c in g.classes])
            pred_k = np.column_stack([p[c] for c in g.classes])
            true_class = truth_k.argmax(axis=1)
            p_true = np.clip(pred_k[np.arange(len(true_class)), true_class], schema.clip, 1.0 - schema.clip)
            losses.append(-np.log(p_true))
            weights.append(np.asarray(g.weights, dtype=np.float64)[true_class])
            truth, pred = 1.0 - truth_k[:, 0], 1.0 - pred_k[:, 0]
        injury_true[g.name], injury_pred[g.name] = truth, pred
    for d in schema.derived:
        truth = y[d.name] if d.name in y else np.max([injury_true[m] for m in d.of], axis=0)
        pred = p[d.name] if d.predicted else np.max([injury_pred[m] for m in d.of], axis=0)
        losses.append(_bce(truth, pred, schema.clip))
        weights.append(np.where(truth == 1, d.weights[1], d.weights[0]))
    return np.column_stack(losses), np.column_stack(weights)


def schema_metric(schema: TaskSchema, labels: pd.DataFrame, predictions: pd.DataFrame, *,
                  labels_source: str = "labels", predictions_source: str = "predictions") -> TaskScore:
    """The task's metric of ``predictions`` on every unit of ``labels`` (both: the unit's id column
    and the label columns; softmax groups one-hot in the labels). Units only in ``predictions``
    are ignored; a labelled unit without a prediction is an error."""
    truth = _by_unit(labels, schema, labels_source)
    if truth.empty:
        raise ContractError(f"{labels_source}: no rows; cannot score zero units")
    pred = _by_unit(predictions, schema, predictions_source)
    absent = ~truth.index.isin(pred.index)
    if absent.any():
        raise ContractError(f"{predictions_source}: {int(absent.sum())} labelled {schema.unit}(s) have no prediction, "
                            f"e.g. {schema.unit_column} {truth.index[int(np.argmax(absent))]}")
    loss, weight = _loss_table(schema, _truth(schema, truth, labels_source),
                               normalized_predictions(schema, pred.loc[truth.index], predictions_source))
    weighted = weight * loss
    parts = weighted.sum(axis=0) / weight.sum(axis=0)
    if schema.reduction == "pooled":
        # means before the sums: with rsna2019's weights (1 and 2) this is stackkit.metric's arithmetic, bit for bit
        overall = weighted.mean(axis=0).sum() / weight.mean(axis=0).sum()
    elif schema.reduction == "row":
        overall = (weighted.sum(axis=1) / weight.sum(axis=1)).mean()
    else:
        overall = parts.mean()
    return TaskScore(float(overall), {name: float(v) for name, v in zip(schema.parts, parts)})


def write_submission(schema: TaskSchema, predictions: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """``predictions`` (the unit's id column + the predicted columns) in the competition's format,
    units in the given order, softmax groups normalised to sum 1."""
    frame = _by_unit(predictions, schema, source)
    if frame.empty:
        raise ContractError(f"{source}: no rows; nothing to submit")
    probabilities = normalized_predictions(schema, frame, source)
    sub = schema.submission
    values = np.column_stack([probabilities[c] for c in sub.columns])
    ids = frame.index.to_numpy(dtype=object).astype(str)
    if sub.layout == "wide":
        out = pd.DataFrame(values, columns=list(sub.columns))
        out.insert(0, sub.id_column, ids.astype(object))
        return out
    return pd.DataFrame({sub.id_column: long_row_ids(ids, sub.columns).astype(object), sub.value_column: values.reshape(-1)})


def long_row_ids(ids, columns) -> np.ndarray:
    """A long submission's row ids: ``<id>_<column>`` for every id, its columns in order (row-major)."""
    ids = np.asarray(ids, dtype=object).astype(str)
    return np.char.add(np.char.add(np.repeat(ids, len(columns)), "_"), np.tile(np.array(columns), len(ids)))


_SUBTYPES = LABELS[:-1]
_VERTEBRAE = tuple(f"C{i}" for i in range(1, 8))
_ORGANS = ("kidney", "liver", "spleen")

RSNA2019 = TaskSchema(
    name="rsna2019",
    unit="slice",
    groups=tuple(Group(label, "binary", (1.0, 1.0)) for label in _SUBTYPES),
    derived=(Derived("any", _SUBTYPES, (2.0, 2.0), predicted=True),),
    reduction="pooled",
    submission=Submission("long", "ID", LABELS, value_column="Label"),
    clip=1e-7,  # stackkit.metric.EPS
)

RSNA2022_CSPINE = TaskSchema(
    name="rsna2022-cspine",
    unit="study",
    groups=tuple(Group(v, "binary", (1.0, 2.0)) for v in _VERTEBRAE),
    derived=(Derived("patient_overall", _VERTEBRAE, (7.0, 14.0), predicted=True),),
    reduction="row",
    submission=Submission("long", "row_id", _VERTEBRAE + ("patient_overall",), value_column="fractured"),
    # a slice CNN predicts "this slice shows a fractured Cn", and the study's fracture as a whole
    slice_columns=_VERTEBRAE + ("patient_overall",),
)

RSNA2023_ABDOMINAL = TaskSchema(
    name="rsna2023-abdominal",
    unit="patient",
    groups=(Group("bowel", "softmax", (1.0, 2.0), ("bowel_healthy", "bowel_injury")),
            Group("extravasation", "softmax", (1.0, 6.0), ("extravasation_healthy", "extravasation_injury")))
    + tuple(Group(o, "softmax", (1.0, 2.0, 4.0), (f"{o}_healthy", f"{o}_low", f"{o}_high")) for o in _ORGANS),
    derived=(Derived("any_injury", ("bowel", "extravasation") + _ORGANS, (1.0, 6.0), predicted=False),),
    reduction="group",
    submission=Submission("wide", "patient_id", ("bowel_healthy", "bowel_injury", "extravasation_healthy", "extravasation_injury")
                          + tuple(f"{o}_{level}" for o in _ORGANS for level in ("healthy", "low", "high"))),
    series_rollup="mean",
    # a slice CNN predicts each injury class on the slice (image-level bowel/extravasation labels,
    # organ grades given to every slice of the patient); the healthy classes are their complement
    slice_columns=("bowel_injury", "extravasation_injury") + tuple(f"{o}_{level}" for o in _ORGANS for level in ("low", "high")),
)

TASKS: dict[str, TaskSchema] = {t.name: t for t in (RSNA2019, RSNA2022_CSPINE, RSNA2023_ABDOMINAL)}
DEFAULT_TASK = RSNA2019.name


def get_task(name) -> TaskSchema:
    """The built-in schema called ``name``; one line listing the known ones otherwise."""
    if not isinstance(name, str) or name not in TASKS:
        raise ContractError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
