"""`stack features`: read the work directory, build the features, write features/ atomically."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import Workdir, file_sha256, folds_hash
from stackkit.errors import ContractError, StackkitError
from stackkit.contract.io import atomic_path, check_set_target, replace_dir
from stackkit.contract.records import FeaturesManifest, write_features_manifest

from features.build import build_features, build_test_features
from stackkit.contract.columns import DICOM_META_COLUMNS, TEST_KEY_COLUMNS, TRAIN_KEY_COLUMNS, check_feature_set

log = logging.getLogger(__name__)


def _read_inputs(wd: Workdir, models: list, dicom_meta: bool, progress: bool) -> tuple:
    """(metadata, folds, oof by model, test by model, per-fold test by model), each model's files validated
    and checked against model.json; a model without per-fold test files (v3) maps to None."""
    from tqdm.auto import tqdm

    from stackkit.contract.validate import load_core, read_oof, read_test, read_test_folds, verify_model_files

    with _object_strings():
        metadata, _labels, folds = load_core(wd)
        if not models:
            raise StackkitError("no predictions under preds/: run base train or base import")
        if dicom_meta and not any(c in metadata.columns for c in DICOM_META_COLUMNS):
            raise ContractError(
                f"{wd.metadata}: --dicom-meta needs DICOM header columns ({', '.join(DICOM_META_COLUMNS)}), found none; "
                "run `data prepare` from the DICOM files or drop --dicom-meta"
            )
        n_folds = int(folds["fold"].max()) + 1
        oof_by_model, test_by_model, test_folds_by_model = {}, {}, {}
        for model in tqdm(models, desc="read predictions", unit="model", disable=not progress):
            oof_by_model[model] = read_oof(wd.oof(model), folds, wd)
            test_by_model[model] = read_test(wd.test(model), metadata, wd)
            test_folds_by_model[model] = read_test_folds(wd, model, metadata, n_folds, test=test_by_model[model])
            # contents first (their errors are the more precise), then that they are the set model.json lists
            verify_model_files(wd, model)
    return metadata, folds, oof_by_model, test_by_model, test_folds_by_model


def test_fold_sets(test_by_model: dict, test_folds_by_model: dict) -> list[dict]:
    """Per base fold k, the test predictions each model's fold model k made; [] when no model has per-fold files.

    A model with only an averaged test.parquet contributes it to every set: the best it has."""
    n_sets = max((len(frames) for frames in test_folds_by_model.values() if frames), default=0)
    return [{m: (frames[k] if frames else test_by_model[m]) for m, frames in test_folds_by_model.items()} for k in range(n_sets)]


def _features_manifest(wd: Workdir, folds: pd.DataFrame, definitions, rows: dict, test_folds_by_model: dict, *, lags,
                       dicom_meta: bool, feature_set: str = "basic") -> FeaturesManifest:
    """features/manifest.json's record, without the tables' sha256 (its writer adds them). ``test_folds_by_model``
    holds every model, in order; ``rows``: the train and test tables' row counts."""
    models = list(test_folds_by_model)
    n_sets = max((len(frames) for frames in test_folds_by_model.values() if frames), default=0)
    inputs = [wd.metadata, wd.folds] + [p for m in models for p in (wd.oof(m), wd.test(m), *wd.test_fold_files(m))]
    return FeaturesManifest(
        folds_hash=folds_hash(folds["image_id"].to_numpy(dtype=object), folds["fold"].to_numpy()),
        lags=int(lags),
        feature_set=feature_set,
        dicom_meta=bool(dicom_meta),
        models=models,
        key_columns={"train": list(TRAIN_KEY_COLUMNS), "test": list(TEST_KEY_COLUMNS)},
        feature_columns=list(definitions),
        columns=definitions,
        rows=rows,
        # v3: test features once per base fold model (features/test_fold<k>.parquet), 0 when no model has per-fold files
        test_folds=n_sets,
        test_fold_files=[wd.features_test_fold(k).name for k in range(n_sets)],
        models_without_test_folds=[m for m in models if not test_folds_by_model.get(m)] if n_sets else list(models),
        inputs={wd.relative(p): file_sha256(p) for p in inputs},
    )


@dataclass(frozen=True)
class FeatureTiming:
    """Wall and CPU seconds of the three phases of `stack features`."""

    read_seconds: float
    build_seconds: float
    write_seconds: float
    read_cpu: float
    build_cpu: float
    write_cpu: float


@dataclass(frozen=True)
class FeaturesResult:
    """What one `stack features` wrote (stackkit/cli.py renders it)."""

    rows_train: int
    rows_test: int
    columns: int  # feature columns
    models: tuple[str, ...]
    lags: int
    feature_set: str
    test_fold_sets: int  # test feature sets written once per base fold model (0: none)
    models_without_test_folds: tuple[str, ...]  # with test_fold_sets: the models whose averaged test.parquet entered every set
    seconds: float
    cpu_seconds: float
    timing: FeatureTiming
    train: Path
    test: Path
    manifest: Path


def run_stack_features(workdir: Workdir, *, lags: int = 2, dicom_meta: bool = False, progress: bool = True,
                       feature_set: str = "basic") -> FeaturesResult:
    """Build study-aware features from every model under preds/ and write features/.

    Writes features/train.parquet, features/test.parquet and features/manifest.json as one set:
    written into a sibling folder (the manifest last, with the tables' sha256) that replaces
    features/ in one switch, so readers never see tables and a manifest of two runs.
    ``feature_set``: ``"basic"`` or ``"wide"`` (features.build's module docstring), recorded in the manifest.
    Returns a :class:`FeaturesResult`: rows, columns, models, seconds and output paths.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    wd = Workdir.of(workdir)
    if isinstance(lags, bool) or not isinstance(lags, (int, np.integer)) or lags < 0:
        raise StackkitError(f"--lags: expected a non-negative integer, got {lags!r}")
    check_feature_set(feature_set)
    check_set_target(wd.features_dir)  # a file in features/' place: refused before any work
    models = wd.model_names()
    metadata, folds, oof_by_model, test_by_model, test_folds_by_model = _read_inputs(wd, models, dicom_meta, progress)
    read_seconds, read_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    log.info("read %d models in %.1fs", len(models), read_seconds)

    train, test, definitions = build_features(
        metadata, oof_by_model, test_by_model, folds, lags=lags, dicom_meta=dicom_meta, progress=progress, feature_set=feature_set
    )
    del oof_by_model
    fold_sets = test_fold_sets(test_by_model, test_folds_by_model)
    build_seconds = time.perf_counter() - started - read_seconds
    build_cpu = time.process_time() - cpu_started - read_cpu

    manifest = _features_manifest(wd, folds, definitions, {"train": len(train), "test": len(test)}, test_folds_by_model,
                                  lags=lags, dicom_meta=dicom_meta, feature_set=feature_set)
    # features/ is replaced as a set: both tables and the manifest (last, with their sha256) are
    # written into a sibling folder that is switched in at once; any failure keeps the old set.
    with replace_dir(wd.features_dir) as folder:
        with atomic_path(folder / wd.features_train.name) as train_tmp:
            write_feature_table(train, train_tmp)
        with atomic_path(folder / wd.features_test.name) as test_tmp:
            write_feature_table(test, test_tmp)
        # one set at a time: at RSNA size each is ~0.7 GB in memory
        for k, predictions in enumerate(fold_sets):
            fold_test = build_test_features(metadata, predictions, lags=lags, dicom_meta=dicom_meta, feature_set=feature_set)
            with atomic_path(folder / wd.features_test_fold(k).name) as fold_tmp:
                write_feature_table(fold_test, fold_tmp)
            del fold_test
        write_features_manifest(folder, manifest)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    timing = FeatureTiming(read_seconds, build_seconds, seconds - read_seconds - build_seconds, read_cpu, build_cpu, cpu - read_cpu - build_cpu)
    return FeaturesResult(rows_train=len(train), rows_test=len(test), columns=len(definitions), models=tuple(models), lags=int(lags),
                          feature_set=feature_set, test_fold_sets=len(fold_sets),
                          models_without_test_folds=tuple(manifest.models_without_test_folds) if fold_sets else (),
                          seconds=seconds, cpu_seconds=cpu, timing=timing, train=wd.features_train, test=wd.features_test,
                          manifest=wd.features_manifest)


@contextlib.contextmanager
def _object_strings():
    """Read ids as object strings while the validators run.

    pandas 3's Arrow-backed ``str`` arrays implement ``Index.isin`` with one Python scalar per
    value (~4 us each); stackkit.contract.validate.check_id_coverage calls it on every id column, which
    costs ~3 s per 650,000-row file, most of the step's budget at RSNA scale. Object strings
    hash in C (~15x faster). Drop this once check_id_coverage converts ids to object itself.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the option is deprecated for pandas 4, still honoured in 3.x
        try:
            context = pd.option_context("future.infer_string", False)
        except (KeyError, pd.errors.OptionError):  # pandas 4: option gone
            context = contextlib.nullcontext()
        with context:
            yield


def write_feature_table(frame: pd.DataFrame, path: os.PathLike) -> None:
    """Write a features frame with pyarrow straight from its column arrays (no consolidated copy).

    Float features are not dictionary-encoded (probabilities rarely repeat, and trying costs
    most of the write time); study_id is.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, names = [], []
    for name in frame.columns:
        series = frame[name]
        if series.dtype == np.float32:
            arrays.append(pa.array(series.to_numpy(copy=False)))
        else:
            arrays.append(pa.array(series))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    # lz4 without dictionaries or float statistics: ~10x faster than the defaults on
    # probability columns, which neither dictionaries nor snappy shrink.
    pq.write_table(
        table,
        path,
        compression="lz4",
        use_dictionary=["study_id"],
        write_statistics=[name for name in names if frame[name].dtype != np.float32],
        row_group_size=1 << 20,
    )
