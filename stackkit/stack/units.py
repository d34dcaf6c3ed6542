"""Stacking to a coarser unit (issue 19): stackers on one row per study or patient, over the
patient-grouped folds, and their blend.

    result = fit_unit_stack(schema, train, labels, [test_fold0, ..., test_fold4])
    result.test            # unit id + schema.labels: the blend on the test units
    apply_unit_blend(schema, result.blend, {name: s.test_sets[0] for name, s in result.stackers.items()})

``train``: unit id, ``fold``, the features of :func:`features.units.unit_feature_table`. For each
stacker (:mod:`stackkit.stack.unit_models`), target and fold k, one model is fitted on the units of
the other folds (class weights = the metric's; early stopping, where a model has it, on one of
those other folds, never on fold k) and predicts fold k (its out-of-fold rows) and every test set;
a test set's prediction is the mean of the K fold models, softmax groups renormalised. The blend
(:mod:`stackkit.stack.unit_blend`) is chosen per target on cross-validated scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stackkit.contract.tasks import TaskSchema, TaskScore, schema_metric
from stackkit.errors import ContractError
from stackkit.stack.stackers.base import default_threads
from stackkit.stack.unit_blend import BLEND_VERSION, apply_unit_blend, choose_target_blend, metric_weights, target_sources
from stackkit.stack.unit_models import UNIT_STACKERS, make_model, target_features, targets

DEFAULT_UNIT_STACKERS = ("lgbm", "logreg")


@dataclass(frozen=True)
class UnitStackerResult:
    name: str
    params: dict
    oof: pd.DataFrame  # unit id, fold, schema.labels
    test_sets: list[pd.DataFrame]  # per test feature set: unit id, schema.labels
    score: TaskScore  # its OOF score (schema_metric on the train units)
    fold_models: list[dict[str, bytes]]  # per fold: file name -> bytes (LightGBM text, JSON)


@dataclass(frozen=True)
class UnitStackResult:
    stackers: dict[str, UnitStackerResult]
    oof: pd.DataFrame  # the blend's OOF: unit id, fold, schema.labels (softmax groups sum to 1)
    test_sets: list[pd.DataFrame]  # the blend applied to each test set (unit id, schema.labels)
    test: pd.DataFrame  # their mean, groups renormalised
    score: TaskScore  # the blend's cross-validated (honest) score
    blend: dict  # JSON-able: per target, weights over the stackers, candidates with CV scores, the choice and why


def _features(schema: TaskSchema, train: pd.DataFrame) -> list[str]:
    unit = schema.unit_column
    for column in (unit, "fold"):
        if column not in train.columns:
            raise ContractError(f"unit features: no column {column!r}; expected {unit}, fold and the features")
    features = [c for c in train.columns if c not in (unit, "fold")]
    if not features:
        raise ContractError("unit features: no feature columns")
    return features


def _finite(frame: pd.DataFrame, features: list[str], unit: str, source: str) -> np.ndarray:
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ContractError(f"{source}: no feature column {missing[0]!r} (the train features have it)")
    values = frame[features].to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ContractError(f"{source}: feature {features[col]!r} is {values[row, col]} for {unit} {frame[unit].iloc[row]!r}")
    return values


def _aligned_labels(schema: TaskSchema, train: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """``labels`` in ``train``'s unit order, every label 0/1; a missing column or unit is one line."""
    unit = schema.unit_column
    for column in (unit,) + schema.labels:
        if column not in labels.columns:
            raise ContractError(f"labels: no column {column!r}; task {schema.name!r} needs {unit}, {', '.join(schema.labels)}")
    table = labels.assign(**{unit: labels[unit].astype(str)}).drop_duplicates(unit).set_index(unit)
    ids = train[unit].astype(str)
    absent = ~ids.isin(table.index)
    if absent.any():
        raise ContractError(f"labels: no row for {unit} {ids[absent].iloc[0]!r} of the unit features")
    table = table.loc[ids.to_numpy(), list(schema.labels)]
    values = table.to_numpy(np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ContractError(f"labels: '{schema.labels[col]}' is {values[row, col]} for {unit} {table.index[row]!r}; expected 0 or 1")
    return table.reset_index()


def _folds(train: pd.DataFrame) -> np.ndarray:
    fold = pd.to_numeric(train["fold"], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(fold).all() or (fold < 0).any() or (fold != np.round(fold)).any():
        raise ContractError(f"unit features: fold {train['fold'][~(np.isfinite(fold) & (fold >= 0))].iloc[0]!r} is not a fold number")
    fold = fold.astype(np.int64)
    if len(np.unique(fold)) < 2:
        raise ContractError("unit features: fewer than 2 folds; cannot cross-validate")
    return fold


def _frame(schema: TaskSchema, ids, columns: dict[str, np.ndarray], fold: np.ndarray | None = None) -> pd.DataFrame:
    table = {schema.unit_column: np.asarray(ids, dtype=object)}
    if fold is not None:
        table["fold"] = fold.astype(np.int8)
    table.update({c: columns[c] for c in schema.labels})
    return pd.DataFrame(table)


def _fit_stacker(name: str, schema: TaskSchema, data: dict, seed: int, threads: int) -> UnitStackerResult:
    """One stacker: per target and fold, a model on the other folds (module docstring)."""
    fold, features, labels = data["fold"], data["features"], data["labels"]
    folds = np.unique(fold)
    oof, tests, fold_models = {}, [dict() for _ in data["tests"]], [dict() for _ in folds]
    for target in targets(schema):  # a loop over targets and folds, each fit vectorized over every unit
        chosen = target_features(target, features)
        columns = [features.index(f) for f in chosen]
        model = make_model(name, chosen)
        y = target.classes_of(labels)
        w = np.asarray(target.weights, dtype=np.float64)[y]
        x = data["train"][:, columns]
        pooled = np.empty((len(y), target.n_classes))
        summed = [np.zeros((len(t), target.n_classes)) for t in data["tests"]]
        for i, k in enumerate(folds):
            fit = fold != k
            # early stopping on the next training fold, a whole patient-grouped fold: never on fold k
            inner = fold[fit] == folds[(i + 1) % len(folds)]
            fitted = model.fit(x[fit], y[fit], w[fit], inner, target.n_classes, seed, threads)
            pooled[~fit] = model.predict(fitted, x[~fit])
            for total, test in zip(summed, data["tests"]):
                total += model.predict(fitted, test[:, columns])
            fold_models[i][f"{target.name}{model.suffix}"] = model.dump(fitted)
        oof.update(target.as_columns(pooled))
        for out, total in zip(tests, summed):
            mean = total / len(folds)
            out.update(target.as_columns(mean / mean.sum(axis=1, keepdims=True)))
    oof_frame = _frame(schema, data["ids"], oof, fold)
    return UnitStackerResult(name, {"model": name, "features": {t.name: target_features(t, features) for t in targets(schema)}},
                             oof_frame, [_frame(schema, ids, t) for ids, t in zip(data["test_ids"], tests)],
                             schema_metric(schema, labels, oof_frame, predictions_source=f"stacker {name} OOF"), fold_models)


def _prepare(schema: TaskSchema, train: pd.DataFrame, labels: pd.DataFrame, test_sets: Sequence[pd.DataFrame]) -> dict:
    unit = schema.unit_column
    features = _features(schema, train)
    if train[unit].astype(str).duplicated().any():
        raise ContractError(f"unit features: {unit} {train[unit][train[unit].astype(str).duplicated()].iloc[0]!r} appears twice")
    for i, test in enumerate(test_sets):
        if unit not in test.columns:
            raise ContractError(f"test features [{i}]: no column {unit!r}")
    return {"features": features, "fold": _folds(train), "labels": _aligned_labels(schema, train, labels),
            "train": _finite(train, features, unit, "unit features"), "ids": train[unit].to_numpy(),
            "tests": [_finite(t, features, unit, f"test features [{i}]") for i, t in enumerate(test_sets)],
            "test_ids": [t[unit].to_numpy() for t in test_sets]}


def _blend(schema: TaskSchema, stackers: dict[str, UnitStackerResult], data: dict) -> tuple[dict, pd.DataFrame]:
    names = list(stackers)
    target_list = targets(schema)
    weights = metric_weights(schema, data["labels"], target_list)
    oofs = {n: s.oof for n, s in stackers.items()}
    parts, pooled = {}, {}
    for target in target_list:
        record, p = choose_target_blend(names, target_sources(target, oofs, names), target.classes_of(data["labels"]),
                                        weights[target.name], data["fold"])
        parts[target.name] = {"columns": list(target.columns), **record}
        pooled.update(target.as_columns(p))
    blend = {"version": BLEND_VERSION, "task": schema.name, "stackers": names, "parts": parts}
    return blend, _frame(schema, data["ids"], pooled, data["fold"])


def mean_predictions(schema: TaskSchema, frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The mean of predictions of the same units (in the first's order), softmax groups renormalised."""
    unit = schema.unit_column
    first = frames[0][unit].astype(str).to_numpy()
    stacked = np.mean([f.assign(**{unit: f[unit].astype(str)}).set_index(unit).loc[first, list(schema.labels)].to_numpy(np.float64)
                       for f in frames], axis=0)
    out = dict(zip(schema.labels, stacked.T))
    for group in (g for g in schema.groups if g.kind == "softmax"):
        total = np.sum([out[c] for c in group.classes], axis=0)
        out.update({c: out[c] / total for c in group.classes})
    return _frame(schema, frames[0][unit].to_numpy(), out)


def fit_unit_stack(schema: TaskSchema, train: pd.DataFrame, labels: pd.DataFrame, test_sets: Sequence[pd.DataFrame], *,
                   stackers: Sequence[str] | None = None, seed: int = 0, threads: int | None = None) -> UnitStackResult:
    """Fit the unit stackers and their blend (module docstring). ``train``: unit id, fold, features;
    ``labels``: unit id + ``schema.labels``; ``test_sets``: one frame per base fold model's test
    features (or one), unit id + the same feature columns. ``stackers`` None = the default set.
    Deterministic for ``seed``."""
    names = list(DEFAULT_UNIT_STACKERS if stackers is None else stackers)
    unknown = [n for n in names if n not in UNIT_STACKERS]
    if unknown or not names or len(set(names)) != len(names):
        raise ContractError(f"unit stackers {names!r}: expected distinct names of {', '.join(UNIT_STACKERS)}")
    if not test_sets:
        raise ContractError("unit stack: no test feature sets given")
    data = _prepare(schema, train, labels, test_sets)
    threads = default_threads() if threads is None else threads
    fitted = {n: _fit_stacker(n, schema, data, seed, threads) for n in names}
    blend, oof = _blend(schema, fitted, data)
    test_sets_out = [apply_unit_blend(schema, blend, {n: s.test_sets[i] for n, s in fitted.items()}) for i in range(len(test_sets))]
    score = schema_metric(schema, data["labels"], oof, predictions_source="unit blend OOF")
    blend["cv"] = score.as_dict()
    return UnitStackResult(fitted, oof, test_sets_out, mean_predictions(schema, test_sets_out), score, blend)


def load_fold_model(stacker: str, features: list[str], raw: bytes, source: str):
    """(model kind, loaded model) of one saved fold model (``features``: those its target reads)."""
    model = make_model(stacker, features)
    return model, model.load(raw, source)


__all__ = ["DEFAULT_UNIT_STACKERS", "UnitStackResult", "UnitStackerResult", "apply_unit_blend", "fit_unit_stack", "load_fold_model"]
