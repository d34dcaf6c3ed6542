"""`stack features` on a task work directory (contract v5): one row per study or patient.

Every model's slice predictions (preds/<model>/, ``schema.prediction_columns``) are aggregated along each
series and rolled up to the task's unit by :func:`features.units.unit_feature_table`; the train rows from
the OOF predictions (each from the fold model that held the unit's patient out), the test rows from the
test predictions and, where models have them, once per base fold model (``features/test_fold<k>.parquet``),
as the RSNA 2019 path does. features/ is written as one set, its manifest last with the inputs' sha256.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.api import test_fold_sets
from stackkit.contract import Workdir, file_sha256, folds_hash
from stackkit.contract.io import check_set_target, replace_dir, write_parquet
from stackkit.contract.records import FeaturesManifest, read_task, write_features_manifest
from stackkit.contract.task_files import TaskCore, is_unit_task, load_task_core
from stackkit.contract.tasks import TaskSchema
from stackkit.errors import StackkitError

UNIT_FEATURE_SET = "unit"  # the manifest's feature_set of a unit task's features


@dataclass(frozen=True)
class UnitFeaturesResult:
    """What one `stack features` wrote for a unit task (stackkit/render.py renders it)."""

    task: str
    unit: str
    rows_train: int  # train units
    rows_test: int  # test units
    columns: int  # feature columns
    models: tuple[str, ...]
    test_fold_sets: int  # test feature sets written once per base fold model (0: none)
    models_without_test_folds: tuple[str, ...]
    seconds: float
    train: Path
    test: Path
    manifest: Path


def check_unit_feature_options(schema: TaskSchema, *, lags=None, dicom_meta: bool = False, feature_set=None) -> None:
    """The slice-level options mean nothing for a unit task: each is refused with one line, before any work."""
    why = f"task {schema.name!r} stacks per {schema.unit}: its features aggregate each {schema.unit}'s slices"
    if lags is not None:
        raise StackkitError(f"--lags: {why} (no neighbour lags); leave --lags out")
    if dicom_meta:
        raise StackkitError(f"--dicom-meta: {why} (no per-slice DICOM columns); leave --dicom-meta out")
    if feature_set is not None:
        raise StackkitError(f"--feature-set {feature_set}: {why} (one feature set); leave --feature-set out")


def _read_predictions(wd: Workdir, core: TaskCore, models: list[str]) -> tuple[dict, dict, dict]:
    """(oof, test, per-fold test or None) by model, each file validated with the task's columns and checked against model.json."""
    from stackkit.contract.validate import read_oof, read_test, read_test_folds, verify_model_files

    columns = core.schema.prediction_columns
    oof, test, test_folds = {}, {}, {}
    for model in models:
        oof[model] = read_oof(wd.oof(model), core.folds, wd, columns)
        test[model] = read_test(wd.test(model), core.metadata, wd, columns)
        test_folds[model] = read_test_folds(wd, model, core.metadata, core.n_folds, test=test[model], columns=columns)
        verify_model_files(wd, model)
    return oof, test, test_folds


def definitions(feature_columns: list[str], unit: str) -> dict[str, str]:
    """Each feature column in words (features.units' module docstring defines the statistics)."""
    out = {}
    for name in feature_columns:
        parts = name.split("__")
        if len(parts) == 3:
            source = "the models' (mean over models)" if parts[0] == "models" else f"model {parts[0]}'s"
            out[name] = f"{parts[2]} of {source} '{parts[1]}' over each series' slices, rolled up to the {unit}"
        else:
            out[name] = f"{parts[-1]} of the {unit}"
    return out


def run_unit_features(workdir, schema: TaskSchema | None = None, *, lags=None, dicom_meta: bool = False, feature_set=None,
                      progress: bool = True) -> UnitFeaturesResult:
    """features/ of a unit task: train.parquet (unit id, fold, float32 features), test.parquet (unit id,
    features), test_fold<k>.parquet per base fold model where models have per-fold test files, and the
    manifest. ``schema``: the work directory's task (read when not given). ``progress`` is accepted for
    the CLI's sake; the unit tables are small."""
    from features.units import unit_feature_table

    started = time.perf_counter()
    wd = Workdir.of(workdir)
    schema = read_task(wd) if schema is None else schema
    if not is_unit_task(schema):
        raise StackkitError(f"task {schema.name!r} is scored per slice: use features.api.run_stack_features")
    check_unit_feature_options(schema, lags=lags, dicom_meta=dicom_meta, feature_set=feature_set)
    check_set_target(wd.features_dir)
    core = load_task_core(wd, schema)
    models = wd.model_names()
    if not models:
        raise StackkitError("no predictions under preds/: run base train or base import")
    oof, test, test_folds = _read_predictions(wd, core, models)
    unit = schema.unit_column
    train = unit_feature_table(core.slices("train"), oof, schema)
    train.insert(1, "fold", core.unit_folds.set_index(unit)["fold"].reindex(train[unit]).to_numpy().astype(np.int8))
    test_slices = core.slices("test")
    test_table = unit_feature_table(test_slices, test, schema)
    fold_tables = [unit_feature_table(test_slices, predictions, schema) for predictions in test_fold_sets(test, test_folds)]
    feature_columns = [c for c in train.columns if c not in (unit, "fold")]
    manifest = _manifest(wd, core, models, test_folds, feature_columns, {"train": len(train), "test": len(test_table)})
    with replace_dir(wd.features_dir) as folder:
        write_parquet(train, folder / wd.features_train.name)
        write_parquet(test_table, folder / wd.features_test.name)
        for k, table in enumerate(fold_tables):
            write_parquet(table, folder / wd.features_test_fold(k).name)
        write_features_manifest(folder, manifest)
    return UnitFeaturesResult(schema.name, schema.unit, len(train), len(test_table), len(feature_columns), tuple(models), len(fold_tables),
                              tuple(manifest.models_without_test_folds) if fold_tables else (), time.perf_counter() - started,
                              wd.features_train, wd.features_test, wd.features_manifest)


def _manifest(wd: Workdir, core: TaskCore, models: list[str], test_folds: dict, feature_columns: list[str], rows: dict) -> FeaturesManifest:
    n_sets = max((len(frames) for frames in test_folds.values() if frames), default=0)
    inputs = [wd.metadata, wd.labels, wd.folds] + [p for m in models for p in (wd.oof(m), wd.test(m), *wd.test_fold_files(m))]
    unit = core.schema.unit_column
    return FeaturesManifest(
        folds_hash=folds_hash(core.folds["image_id"].to_numpy(dtype=object), core.folds["fold"].to_numpy()),
        lags=None, feature_set=UNIT_FEATURE_SET, dicom_meta=False, models=list(models),
        key_columns={"train": [unit, "fold"], "test": [unit]}, feature_columns=feature_columns,
        columns=definitions(feature_columns, core.schema.unit), rows=rows, test_folds=n_sets,
        test_fold_files=[wd.features_test_fold(k).name for k in range(n_sets)],
        models_without_test_folds=[m for m in models if not test_folds.get(m)] if n_sets else list(models),
        inputs={wd.relative(p): file_sha256(p) for p in inputs}, task=core.schema.name)

