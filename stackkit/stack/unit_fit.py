"""`stack fit` on a task work directory (contract v5): the unit stackers and their blend, written as RSNA 2019's are.

The stackers and the blend are :func:`stackkit.stack.units.fit_unit_stack`'s (one row per study or patient,
on the patient-grouped folds of data/folds.parquet, the blend chosen per target on cross-validated scores).
Here: the options checked against the task, features/ read back and checked against its manifest (inputs
unchanged, same folds, same task), and stack/ replaced as one set: per stacker ``oof.parquet`` (unit id,
fold, ``schema.labels``), ``test.parquet`` (the mean over the test sets, groups renormalised),
``test_fold<k>.parquet`` (one per base fold model's test features), its fold models ``fold<k>/`` (each file
with a sha256 sidecar, ``stacker.json`` last) and ``meta.json`` last; then ``blend.json`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import STACKER_RECORD, PredictionFolder, Workdir, file_sha256
from stackkit.contract.io import check_set_target, replace_dir, verify_set, write_artifact, write_parquet
from stackkit.contract.records import (FoldModelRecord, StackerRecord, UnitBlendRecord, manifest_test_fold_paths, write_fold_model_record,
                                       write_stacker_record, write_unit_blend_record)
from stackkit.contract.records.features import RERUN_FEATURES
from stackkit.contract.task_files import (TaskCore, check_unit_rows, load_task_core, mean_unit_predictions, unit_max_predictions, units_of,
                                         validate_unit_predictions)
from stackkit.contract.tasks import TaskSchema, TaskScore, schema_metric
from stackkit.errors import ContractError, StackkitError
from stackkit.stack.fit import StackFitOptions, check_seed, kept_stackers

# Stackers that read a study's slices in order: nothing to read in a table of one row per unit.
SEQUENCE_STACKERS = ("seq", "seq_emb", "transformer")


@dataclass(frozen=True)
class UnitFitResult:
    """What one `stack fit` did on a unit task (stackkit/render.py renders it)."""

    task: str
    unit: str
    cv: TaskScore  # the blend's cross-validated score
    stacker_scores: dict[str, TaskScore]  # each stacker's OOF score
    base_scores: dict[str, TaskScore]  # each base model's plain aggregation (max over the unit's slices)
    weights: dict[str, dict[str, float]]  # per target: stacker -> weight
    test_sets: int
    models_without_test_folds: tuple[str, ...]
    stackers_kept: tuple[str, ...]
    blend: Path
    report: Path
    stack_dirs: dict[str, Path]
    seconds: float


def check_unit_fit_options(schema: TaskSchema, o: StackFitOptions) -> list[str] | None:
    """The stacker names (None: the unit stack's default set); every option that means nothing for a unit
    task is refused with one line, before any work."""
    task = f"task {schema.name!r} stacks one row per {schema.unit}"
    refused = [("--tune", o.tune, f"{task}; its stackers have no Optuna search yet: leave --tune out"),
               ("--timeout", o.timeout is not None, "only with --tune, which a unit task does not have"),
               ("--storage", o.storage is not None, "only with --tune, which a unit task does not have"),
               ("--study-name", o.study_name is not None, "only with --tune, which a unit task does not have"),
               ("--heartbeat", o.heartbeat_interval is not None, "only with --tune, which a unit task does not have"),
               ("--base-in-blend", o.blend_base_models, f"{task}; its blend mixes the stackers only"),
               ("--shared-weights", not o.per_label_weights, f"{task}; its blend has weights per target"),
               ("--no-any-consistency", not o.any_consistency, f"{task}; its blend keeps each softmax group summing to 1 and has no any >= max rule"),
               ("--device cuda", o.device == "cuda", f"{task}; its stackers run on the CPU: use --device cpu or auto")]
    for option, given, why in refused:
        if given:
            raise StackkitError(f"{option}: {why}")
    check_seed(o.seed)
    if o.stackers is None:
        return None
    names = list(dict.fromkeys(o.stackers))
    sequence = [n for n in names if n in SEQUENCE_STACKERS]
    if sequence:
        raise StackkitError(f"--stackers {sequence[0]}: a sequence stacker reads each study's slices in order; {task}: "
                            "use the unit stackers (leave --stackers out for the default set)")
    return names


def load_unit_features(wd: Workdir, core: TaskCore) -> tuple[pd.DataFrame, list[pd.DataFrame], object, str]:
    """(train, test sets, manifest, folds hash): features/ checked against its manifest and data/."""
    from stackkit.stack.crossfit import checked_features_manifest, features_frame

    schema, unit = core.schema, core.schema.unit_column
    manifest, current_hash, columns = checked_features_manifest(wd, core.folds)
    if manifest.task != schema.name:
        raise ContractError(f"{wd.relative(wd.features_manifest)}: built for task {manifest.task or 'rsna2019'!r}, "
                            f"data/task.json says {schema.name!r}; {RERUN_FEATURES}")
    if manifest.sha256 is not None:
        verify_set(wd.features_dir, wd.relative(wd.features_manifest), manifest.sha256, remedy=RERUN_FEATURES)
    train = features_frame(wd.features_train, [unit, "fold"], columns, wd, id_column=unit)
    train = check_unit_rows(train, wd.relative(wd.features_train), schema, expected_units=core.unit_folds[unit], folds=core.unit_folds,
                            remedy=f"features were built from a different folds file: {RERUN_FEATURES}")
    tests = []
    for path in (wd.features_test, *manifest_test_fold_paths(wd, manifest)):
        frame = features_frame(path, [unit], columns, wd, id_column=unit)
        tests.append(check_unit_rows(frame, wd.relative(path), schema, expected_units=units_of(core.metadata, schema, "test"))[[unit, *columns]])
    # with per-fold test features, the stackers meet each base fold model's set; test.parquet is then not one of them
    tests = tests[1:] if len(tests) > 1 else tests
    return train[[unit, "fold", *columns]], tests, manifest, current_hash


def fold_scores(schema: TaskSchema, labels: pd.DataFrame, oof: pd.DataFrame) -> list[dict]:
    """The task's metric of ``oof`` (unit id, fold, labels) on each fold's units."""
    out = []
    for k in np.unique(oof["fold"].to_numpy()):
        rows = oof[oof["fold"] == k]
        score = schema_metric(schema, labels[labels[schema.unit_column].isin(rows[schema.unit_column])], rows)
        out.append({"fold": int(k), **score.as_dict()})
    return out


def _fold_model_files(name: str, k: int, files: dict) -> dict[str, bytes]:
    for file_name, data in files.items():
        if not isinstance(file_name, str) or not file_name or "/" in file_name or file_name.startswith(".") or not isinstance(data, bytes):
            raise StackkitError(f"stacker {name!r}: fold {k} model file {file_name!r} is not a plain file name with bytes")
    return files


def save_unit_stacker(wd: Workdir, core: TaskCore, stacker, n_sets: int, meta: dict) -> dict:
    """stack/<stacker>/ as one set (module docstring); returns its blend.json source entry. ``meta``: the
    StackerRecord's shared fields (seconds, feature_columns, folds_hash, created)."""
    schema, unit = core.schema, core.schema.unit_column
    shown = f"stack/{stacker.name}"
    oof = validate_unit_predictions(stacker.oof, f"{shown} OOF", schema, expected_units=core.unit_folds[unit], folds=core.unit_folds)
    test_units = units_of(core.metadata, schema, "test")
    sets = [validate_unit_predictions(t, f"{shown} test set {k}", schema, expected_units=test_units) for k, t in enumerate(stacker.test_sets)]
    record = StackerRecord(stacker=stacker.name, params=stacker.params, score=stacker.score.as_dict(),
                           fold_scores=fold_scores(schema, core.labels, oof), n_folds=len(stacker.fold_models),
                           n_test_folds=len(sets) if n_sets > 1 else 0, **meta)
    with replace_dir(wd.stack_dir(stacker.name)) as folder:
        files = PredictionFolder(folder, STACKER_RECORD)
        for k, models in enumerate(stacker.fold_models):
            fold = files.fold_model(k)
            for file_name, data in _fold_model_files(stacker.name, k, models).items():
                write_artifact(fold.path / file_name, data)
            # written last: it marks the fold model complete
            write_fold_model_record(fold.path, FoldModelRecord(stacker.name, dict(stacker.params), len(meta["feature_columns"]),
                                                               {"files": sorted(models)}))
        write_parquet(oof, files.oof)
        write_parquet(mean_unit_predictions(schema, sets), files.test)
        for k in range(record.n_test_folds):
            write_parquet(sets[k], files.test_fold(k))
        write_stacker_record(folder, record)
    published = wd.stacker_folder(stacker.name)

    def rel(path: Path) -> str:  # the names blend.json records: stack/... once switched in
        return wd.relative(wd.published(path))

    return {"name": shown, "kind": "stacker", "oof": rel(published.oof), "test": rel(published.test),
            "test_sha256": file_sha256(published.test),
            "test_folds": [{"path": rel(published.test_fold(k)), "sha256": file_sha256(published.test_fold(k))}
                           for k in range(record.n_test_folds)],
            "oof_score": stacker.score.as_dict()}


def base_scores(wd: Workdir, core: TaskCore, models: list[str]) -> dict[str, TaskScore]:
    """Every base model's plain aggregation (the max over each unit's slices), scored with the task's metric."""
    from stackkit.contract.validate import read_oof

    return {m: schema_metric(core.schema, core.labels,
                             unit_max_predictions(core, read_oof(wd.oof(m), core.folds, wd, core.schema.prediction_columns)))
            for m in models}


def run_unit_fit(workdir, schema: TaskSchema | None = None, options: StackFitOptions | None = None, **fields) -> UnitFitResult:
    """`stack fit` on a unit task: the keywords are :class:`StackFitOptions`' (or ``options``); ``schema`` the work
    directory's task (read when not given)."""
    from stackkit.contract.records import read_task
    from stackkit.stack.units import fit_unit_stack

    started = time.perf_counter()
    wd = Workdir.of(workdir)
    schema = read_task(wd) if schema is None else schema
    o = StackFitOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    names = check_unit_fit_options(schema, o)
    check_set_target(wd.stack_root)  # a file in stack/'s place: refused before any fitting
    core = load_task_core(wd, schema)
    train, tests, manifest, current_hash = load_unit_features(wd, core)
    result = fit_unit_stack(schema, train, core.labels, tests, stackers=names, seed=int(o.seed))
    fitted = list(result.stackers)
    kept = kept_stackers(wd, fitted)
    meta = {"seconds": time.perf_counter() - started, "feature_columns": [c for c in train.columns if c not in (schema.unit_column, "fold")],
            "folds_hash": current_hash, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    models = manifest.models if manifest.models is not None else wd.model_names()
    bases = base_scores(wd, core, models)
    with replace_dir(wd.stack_root, keep=True) as staged:
        swd = wd.staged_stack(staged)
        sources = [save_unit_stacker(swd, core, result.stackers[n], len(tests), meta) for n in fitted]
        record = UnitBlendRecord(
            task=schema.name, unit=schema.unit, sources=sources, blend=result.blend, test_sets=len(tests), created=meta["created"],
            scores={"cv": {**result.score.as_dict(), "per_fold": fold_scores(schema, core.labels, result.oof)}},
            test_sets_method=("blend applied per base fold model's test set, then averaged" if len(tests) > 1
                              else "blend applied to the averaged test predictions"),
            models_without_test_folds=list(manifest.models_without_test_folds), seed=int(o.seed), folds_hash=current_hash,
            base_oof_scores={m: s.as_dict() for m, s in bases.items()}, stackers_kept=kept)
        write_unit_blend_record(record, swd.blend)
        from stackkit.stack.report import unit_fit_report

        unit_fit_report(swd, record.to_json())
    return UnitFitResult(schema.name, schema.unit, result.score, {n: s.score for n, s in result.stackers.items()}, bases,
                         blend_weights(result.blend), len(tests), tuple(manifest.models_without_test_folds), tuple(kept), wd.blend, wd.report_html,
                         {n: wd.stack_dir(n) for n in fitted}, time.perf_counter() - started)


def blend_weights(blend: dict) -> dict[str, dict[str, float]]:
    """Per target of a unit blend record: stacker -> weight (what the summary line shows)."""
    parts = blend.get("parts") if isinstance(blend, dict) else None
    return {target: {n: float(w) for n, w in (part.get("weights") or {}).items()}
            for target, part in (parts or {}).items() if isinstance(part, dict)}
