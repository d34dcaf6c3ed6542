"""`base import`: register predictions made anywhere else as preds/<name>/.

Accepts Parquet or CSV, wide (``image_id`` + six label columns, optional ``fold``) or the
RSNA long format (``ID,Label`` with ``ID = <image_id>_<label>``), probabilities or logits.
Optional (contract v3): one test file per fold model (``--test-fold``), stored as
``test_fold<k>.parquet`` beside ``test.parquet`` (their mean when ``--test`` is not given).
In a task work directory (v5, ``data/task.json`` of a study- or patient-level task) the columns are
the task's ``schema.prediction_columns`` instead of the six labels, and model.json's score is the
task's metric of the model's plain aggregation (the max over each unit's slices).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, PredictionFolder, Workdir, check_model_name, folds_hash
from stackkit.contract.io import check_set_target, read_table
from stackkit.contract.records import ModelRecord, publish_model
from stackkit.errors import ContractError, StackkitError
from stackkit.metric import prior_score, weighted_log_loss
from stackkit.contract.validate import check_numeric, check_probabilities, load_core, validate_predictions

def _long_id(columns) -> re.Pattern:
    return re.compile(r"^(?P<image>.+)_(?P<label>" + "|".join(map(re.escape, columns)) + r")$")


def long_to_wide(frame: pd.DataFrame, source, *, probabilities: bool = True, columns=LABELS) -> pd.DataFrame:
    """RSNA long format (ID, Label) -> image_id + ``columns`` (the six labels, or a task's prediction columns).

    The values are checked here, where errors can name the ``Label`` column and the file's row:
    numbers, and with ``probabilities`` (no --logits) in [0, 1]."""
    columns = list(columns)
    ids = frame["ID"].astype(str)
    parts = ids.str.extract(_long_id(columns))
    bad = parts["label"].isna().to_numpy()
    if bad.any():
        pos = int(np.argmax(bad))
        what, example = (("six labels", "ID_63eb1e259_epidural") if columns == list(LABELS)
                         else (f"{len(columns)} prediction columns", f"<image_id>_{columns[0]}"))
        raise ContractError(f"{source}: ID {ids.iloc[pos]!r} at row {pos + 1} does not end in one of the {what} "
                            f"({', '.join(columns)}); expected IDs such as {example}")
    long_frame = frame[["Label"]].assign(ID=ids)
    if probabilities:
        values = check_probabilities(long_frame, source, logits_hint=True, columns=("Label",))["Label"]
    else:
        values = check_numeric(long_frame, ["Label"], source)["Label"]
    long = pd.DataFrame({"image_id": parts["image"], "label": parts["label"], "value": values.to_numpy()})
    dup = long.duplicated(["image_id", "label"]).to_numpy()
    if dup.any():
        pos = int(np.argmax(dup))
        raise ContractError(f"{source}: ID {ids.iloc[pos]!r} appears more than once (row {pos + 1})")
    wide = long.pivot(index="image_id", columns="label", values="value")
    wide = wide.reindex(columns=columns)
    missing = wide.isna().to_numpy()
    if missing.any():
        row, col = np.argwhere(missing)[0]
        raise ContractError(
            f"{source}: image {wide.index[row]!r} has no row for label '{columns[col]}'; the long format needs {'six' if len(columns) == 6 else len(columns)} rows per image"
        )
    # keep the file's first-appearance order of images
    order = pd.unique(long["image_id"])
    return wide.loc[order].reset_index().rename_axis(columns=None)


def read_prediction_file(path, *, logits: bool, what: str, columns=LABELS) -> pd.DataFrame:
    """Any accepted layout -> image_id (+ fold) + ``columns`` as probabilities (not yet id-checked)."""
    path = Path(path)
    columns = list(columns)
    frame = read_table(path, what=f"{what} prediction file")
    source = str(path)
    if {"ID", "Label"}.issubset(frame.columns) and "image_id" not in frame.columns:
        frame = long_to_wide(frame, source, probabilities=not logits, columns=columns)
    elif "image_id" not in frame.columns or not set(columns).issubset(frame.columns):
        got = ", ".join(map(str, list(frame.columns)[:12]))
        missing = [c for c in ("image_id", *columns) if c not in frame.columns]
        raise ContractError(
            f"{source}: missing column(s) {', '.join(missing)}; found [{got}]; expected image_id + "
            f"{', '.join(columns)} (wide) or ID,Label (RSNA long)"
        )
    return from_logits(frame, source, columns) if logits else frame


def from_logits(frame: pd.DataFrame, source, columns=LABELS) -> pd.DataFrame:
    """``columns`` through a sigmoid; a file whose every value is in [0, 1] is refused
    (probabilities: a sigmoid would turn 0.185 into 0.546 without a word)."""
    columns = list(columns)
    frame = check_numeric(frame, columns, source)
    values = frame[columns].to_numpy(dtype=np.float64)
    if ((values >= 0.0) & (values <= 1.0)).all():
        raise ContractError(f"{source}: --logits given, but every value is in [0, 1]: these look like probabilities; "
                            "leave out --logits")
    frame[columns] = 1.0 / (1.0 + np.exp(-values))
    return frame


def _input_positions(raw: pd.DataFrame, validated: pd.DataFrame) -> np.ndarray:
    """For each validated (written) row, its row in the prediction file as given (after the long
    format's pivot: one row per image, in first-appearance order)."""
    given = pd.Index(raw["image_id"].astype(str).to_numpy(dtype=object))
    return given.get_indexer(pd.Index(validated["image_id"].to_numpy(dtype=object)))


def check_import_embeddings(oof_embeddings, test_embeddings, *, n_oof: int, n_test: int, n_folds: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Open and validate the embedding files of an import (nothing is written): (oof, tests, D)."""
    from stackkit.contract.embeddings import check_embedding_array, open_npy

    test_embeddings = list(test_embeddings or ())
    if oof_embeddings is None:
        raise StackkitError(f"{test_embeddings[0]}: --test-embeddings given without --oof-embeddings; a model's embeddings need both")
    if not test_embeddings:
        raise StackkitError(f"{oof_embeddings}: --oof-embeddings given without --test-embeddings; a model's embeddings need both")
    if len(test_embeddings) not in (1, n_folds):
        raise StackkitError(
            f"{test_embeddings[-1]}: {len(test_embeddings)} --test-embeddings files; expected 1 (one embedding per test image) "
            f"or one per fold model ({n_folds}, fold 0 first)"
        )
    oof = open_npy(oof_embeddings, "OOF embedding file")
    dim = check_embedding_array(oof, str(oof_embeddings), n_rows=n_oof, what="OOF embeddings")
    tests = []
    for k, path in enumerate(test_embeddings):
        array = open_npy(path, "test embedding file")
        what = "test embeddings" if len(test_embeddings) == 1 else f"fold {k} test embeddings"
        check_embedding_array(array, str(path), n_rows=n_test, dim=dim, what=what)
        tests.append(array)
    return oof, tests, dim


def check_test_fold_count(test_path, test_folds: list, n_folds: int) -> None:
    """``--test`` and/or exactly one ``--test-fold`` per fold model (K, from data/folds.parquet), before any file is read."""
    if test_path is None and not test_folds:
        raise StackkitError(
            f"no test predictions: give --test FILE, or one --test-fold FILE per fold model ({n_folds}, fold 0 first), or both"
        )
    if test_folds and len(test_folds) != n_folds:
        raise StackkitError(
            f"{test_folds[-1]}: {len(test_folds)} --test-fold files; expected one per fold model ({n_folds}: the folds of "
            "data/folds.parquet, fold 0 first) or none"
        )


def read_test_fold_files(test_folds: list, test_ids, *, logits: bool, columns=LABELS) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """Each ``--test-fold`` file read and validated like ``--test``: (raw tables as given, validated tables)."""
    raws, frames = [], []
    for k, path in enumerate(test_folds):
        raw = read_prediction_file(path, logits=logits, what=f"fold {k} test", columns=columns)
        raws.append(raw)
        frames.append(validate_predictions(raw, str(path), expected_ids=test_ids, what="test", logits_hint=True, columns=columns))
    return raws, frames


def mean_of_folds(frames: list[pd.DataFrame], order, columns=LABELS) -> pd.DataFrame:
    """image_id (in ``order``) + the mean of the fold models' probabilities (probability space, float32)."""
    columns = list(columns)
    stack = np.stack([_in_order(f, order)[columns].to_numpy(np.float64) for f in frames])
    mean = pd.DataFrame(stack.mean(axis=0).astype(np.float32), columns=columns)
    mean.insert(0, "image_id", np.asarray(order, dtype=object))
    return mean


def _in_order(frame: pd.DataFrame, order) -> pd.DataFrame:
    """``frame``'s rows in the image order ``order`` (same set of ids, checked by the validators)."""
    return frame.set_index("image_id").reindex(pd.Index(np.asarray(order, dtype=object), name="image_id")).reset_index()


def check_fold_column(raw_oof: pd.DataFrame, oof_path, folds_from_data: bool) -> None:
    """An OOF file without a ``fold`` column (the RSNA long format has none) only with ``--folds-from-data``:
    predictions made on other folds than data/folds.parquet (a public OOF file, a random KFold) would
    leak labels into the stackers, and without the column nothing can check it (contract v4)."""
    if "fold" not in raw_oof.columns and not folds_from_data:
        raise ContractError(
            f"{oof_path}: no 'fold' column; OOF predictions made on other folds than data/folds.parquet leak labels into "
            "the stackers: add each row's fold (it is then checked), or pass --folds-from-data if they were made on "
            "data/folds.parquet's folds"
        )


@dataclass(frozen=True)
class ImportResult:
    """What one `base import` registered (stackkit/cli.py renders it)."""

    name: str
    directory: Path  # preds/<name>/
    n_oof: int
    n_test: int
    oof_logloss: float  # weighted log loss of the OOF predictions
    prior_logloss: float  # the same for the training labels' rates: the floor to beat
    test_fold_files: int  # per-fold-model test files stored (0: only test.parquet)
    test_given: bool  # test.parquet as given (else the mean of the fold files)
    embedding_dim: int | None
    embedding_test_files: int


@dataclass(frozen=True)
class ImportOptions:
    """What `base import` is given: :func:`import_predictions`' keywords."""

    oof_path: str | Path
    test_path: str | Path | None = None
    logits: bool = False
    force: bool = False
    oof_embeddings: str | Path | None = None
    test_embeddings: tuple = ()
    test_folds: tuple = ()
    folds_from_data: bool = False


def import_predictions(wd: Workdir, name: str, options: ImportOptions | None = None, **fields) -> ImportResult:
    """Register predictions made elsewhere as preds/<name>/; the keywords are :class:`ImportOptions`' fields
    (or pass ``options``; ``fields`` then override it).

    ``folds_from_data``: an OOF file without a ``fold`` column is accepted, its folds taken from
    data/folds.parquet (the caller vouches they were made on those folds); without it such a file is refused.

    ``test_folds`` (optional, contract v3): one test prediction file per fold model, fold 0
    first (exactly K, the number of folds of data/folds.parquet), each in any layout ``test_path``
    accepts; stored as ``test_fold<k>.parquet`` in ``test.parquet``'s row order. ``test_path``
    may then be None: ``test.parquet`` is the mean of the fold files' probabilities.

    ``oof_embeddings`` / ``test_embeddings`` (optional, contract v2): .npy files whose rows are
    aligned with the rows of ``oof_path`` / ``test_path`` as given (without ``test_path``: with the
    first ``test_folds`` file's); several test files are fold models 0, 1, ... in order, one is
    ``test.npy``. float32 is stored as float16."""
    options = ImportOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    check_model_name(name)
    against = _import_target(wd)
    metadata, folds = against.metadata, against.folds
    target = check_set_target(wd.preds_dir(name))
    if target.exists() and not options.force:
        raise StackkitError(f"{target}: model '{name}' already exists; pass --force to replace it or choose another name")
    n_folds = int(folds["fold"].max()) + 1
    check_test_fold_count(options.test_path, list(options.test_folds or ()), n_folds)
    (raw_oof, oof), (raw_test, test), fold_tests = _read_tables(wd, name, options, against)
    embeddings = None
    if options.oof_embeddings is not None or options.test_embeddings:
        oof_emb, test_embs, dim = check_import_embeddings(options.oof_embeddings, options.test_embeddings, n_oof=len(raw_oof),
                                                          n_test=len(raw_test), n_folds=n_folds)
        # the written rows follow the validated tables; the embeddings follow them row for row
        embeddings = _embedding_writer(oof_emb, _input_positions(raw_oof, oof), test_embs, _input_positions(raw_test, test), dim)

    score, overall, prior = against.score(oof)
    record = ModelRecord(name=name, source="imported", architecture=None, parameters=_parameters(options, raw_oof),
                         folds_hash=folds_hash(folds["image_id"], folds["fold"]),
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"), oof_logloss=score,
                         prior_logloss=prior, n_oof=int(len(oof)), n_test=int(len(test)))
    # preds/<name>/ is replaced as a set: every file (embeddings included) is written into a fresh sibling
    # folder, the record (model.json, with the sha256 of every other file) last, then the folder is switched in.
    record = publish_model(wd, record, (oof, test, fold_tests), embeddings=embeddings)
    return ImportResult(name=name, directory=target, n_oof=int(len(oof)), n_test=int(len(test)), oof_logloss=overall,
                        prior_logloss=prior, test_fold_files=len(fold_tests), test_given=options.test_path is not None,
                        embedding_dim=record.embedding_dim or None,
                        embedding_test_files=len(record.embeddings["test"]) if record.embedding_dim else 0)


@dataclass(frozen=True)
class _ImportTarget:
    """What an import is checked and scored against: RSNA 2019's six labels per slice, or a unit task's
    (v5) prediction columns, scored at the unit. ``score(oof)``: (model.json's oof_logloss, overall, prior)."""

    metadata: pd.DataFrame
    folds: pd.DataFrame
    columns: tuple[str, ...]
    score: Callable[[pd.DataFrame], tuple[dict, float, float]]


def _import_target(wd: Workdir) -> _ImportTarget:
    from stackkit.contract.records import read_task
    from stackkit.contract.task_files import is_unit_task, load_task_core

    schema = read_task(wd)
    if is_unit_task(schema):
        core = load_task_core(wd, schema)
        return _ImportTarget(core.metadata, core.folds, schema.prediction_columns, lambda oof: unit_model_score(core, oof))
    metadata, labels, folds = load_core(wd)

    def score(oof: pd.DataFrame) -> tuple[dict, float, float]:
        y_true = labels.set_index("image_id").loc[oof["image_id"], list(LABELS)].to_numpy()
        loss = weighted_log_loss(y_true, oof[list(LABELS)].to_numpy())
        return loss.as_dict(), loss.overall, prior_score(y_true).overall

    return _ImportTarget(metadata, folds, LABELS, score)


def unit_model_score(core, oof: pd.DataFrame) -> tuple[dict, float, float]:
    """A unit task's model score: the task's metric of its plain aggregation (the max over each unit's slices),
    beside the metric of the train labels' rates (the floor)."""
    from stackkit.contract.task_files import unit_max_predictions
    from stackkit.contract.tasks import schema_metric

    schema = core.schema
    loss = schema_metric(schema, core.labels, unit_max_predictions(core, oof))
    rates = core.labels[list(schema.labels)].mean(axis=0)
    prior = schema_metric(schema, core.labels, core.labels[[schema.unit_column]].assign(**rates.to_dict()))
    return {**loss.as_dict(), "aggregation": "max over the unit's slices"}, loss.overall, prior.overall


def _read_tables(wd: Workdir, name: str, options: ImportOptions, against: _ImportTarget) -> tuple:
    """((raw OOF, OOF), (raw test, test), per-fold tests): every prediction file read and validated, nothing
    written; the per-fold tables in test.parquet's row order, the raw tables as given (for the embeddings' rows)."""
    folds, columns = against.folds, against.columns
    raw_oof = read_prediction_file(options.oof_path, logits=options.logits, what="OOF", columns=columns)
    check_fold_column(raw_oof, options.oof_path, options.folds_from_data)
    oof = validate_predictions(raw_oof, str(options.oof_path), expected_ids=folds["image_id"], what="labeled", folds=folds,
                               logits_hint=True, columns=columns)
    test_ids = against.metadata.loc[against.metadata["split"] == "test", "image_id"]
    raw_test = test = None
    if options.test_path is not None:
        raw_test = read_prediction_file(options.test_path, logits=options.logits, what="test", columns=columns)
        test = validate_predictions(raw_test, str(options.test_path), expected_ids=test_ids, what="test", logits_hint=True, columns=columns)
    raw_folds, fold_tests = read_test_fold_files(list(options.test_folds or ()), test_ids, logits=options.logits, columns=columns)
    if test is None:
        # fold 0's file as given sets the row order; the mean is taken in probability space
        raw_test = raw_folds[0]
        test = validate_predictions(mean_of_folds(fold_tests, fold_tests[0]["image_id"], columns), str(wd.test(name)),
                                    expected_ids=test_ids, what="test", columns=columns)
    # every fold file is written in test.parquet's row order
    fold_tests = [_in_order(frame, test["image_id"]) for frame in fold_tests]
    return (raw_oof, oof), (raw_test, test), fold_tests


def _parameters(options: ImportOptions, raw_oof: pd.DataFrame) -> dict:
    """model.json's ``parameters`` of an imported model: the files given and how they were read."""
    parameters = {"oof_file": str(options.oof_path), "test_file": None if options.test_path is None else str(options.test_path),
                  "test_fold_files": [str(t) for t in options.test_folds or ()], "logits": options.logits,
                  "folds_from_data": "fold" not in raw_oof.columns}
    if options.oof_embeddings is not None or options.test_embeddings:
        parameters.update(oof_embeddings=str(options.oof_embeddings), test_embeddings=[str(t) for t in options.test_embeddings])
    return parameters


def _embedding_writer(oof_emb, oof_rows, test_embs, test_rows, dim: int):
    """publish_model's embeddings step: the files into the new model folder, their model.json entries back."""
    from stackkit.contract.embeddings import embedding_record, write_embeddings

    def write(folder: Path) -> dict:
        files = PredictionFolder(folder)
        write_embeddings(oof_emb, files.oof_embeddings, oof_rows)
        for k, array in enumerate(test_embs):
            write_embeddings(array, files.test_embeddings(k if len(test_embs) > 1 else None), test_rows)
        return embedding_record(dim, len(test_embs))

    return write
