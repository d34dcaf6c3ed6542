"""Readers that validate contract files once, at the boundary.

Every check names the file, the column and the first offending row (1-based data row) and
image id, says what was expected and how to fix it. Downstream code trusts what these return.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from stackkit.contract import LABELS, METADATA_REQUIRED, SPLITS, Workdir
from stackkit.errors import ContractError, LeakageError, StackkitError
from stackkit.contract.io import read_json, read_table, verify_set
from stackkit.contract.records import read_model_record, read_task_record


def row_ref(frame: pd.DataFrame, position: int) -> str:
    """``row N (image_id X)``: the 1-based data row, with the row's id (``ID`` in the RSNA long format, the unit's id
    in a task's unit-level table)."""
    key = next((c for c in ("image_id", "ID", "study_id", "patient_id") if c in frame.columns), None)
    return f"row {position + 1}" + (f" ({key} {frame[key].iloc[position]})" if key is not None else "")


def require_columns(frame: pd.DataFrame, columns, source, hint: str = "") -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        got = ", ".join(map(str, list(frame.columns)[:12]))
        raise ContractError(
            f"{source}: missing column(s) {', '.join(missing)}; found [{got}]" + (f"; {hint}" if hint else "")
        )


def check_ids(frame: pd.DataFrame, source, column: str = "image_id") -> pd.DataFrame:
    """Ids must be non-empty strings and unique."""
    ids = frame[column]
    null = ids.isna().to_numpy()
    if null.any():
        raise ContractError(f"{source}: column '{column}' is empty at {row_ref(frame, int(np.argmax(null)))}")
    frame = frame.copy()
    frame[column] = ids.astype(str)
    dup = frame[column].duplicated().to_numpy()
    if dup.any():
        pos = int(np.argmax(dup))
        raise ContractError(f"{source}: duplicate {column} '{frame[column].iloc[pos]}' at row {pos + 1}; each id must appear once")
    return frame


def check_numeric(frame: pd.DataFrame, columns, source, *, finite: bool = True) -> pd.DataFrame:
    frame = frame.copy()
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna().to_numpy() & frame[col].notna().to_numpy()
        if bad.any():
            pos = int(np.argmax(bad))
            raise ContractError(f"{source}: column '{col}' has non-numeric value {frame[col].iloc[pos]!r} at {row_ref(frame, pos)}")
        arr = values.to_numpy(dtype=np.float64)
        if finite:
            nonfinite = ~np.isfinite(arr)
            if nonfinite.any():
                pos = int(np.argmax(nonfinite))
                raise ContractError(f"{source}: column '{col}' has {arr[pos]} at {row_ref(frame, pos)}; expected a finite number")
        frame[col] = arr
    return frame


# A prediction file looks like logits (and the error suggests --logits) only when at least this share of
# its values is outside [0, 1] and some are negative: logits of rare labels are mostly negative, while a
# file of probabilities with a few stray values (a 1.7, a -0.1) is a broken file, not logits.
LOGIT_SHARE = 0.5


def looks_like_logits(values: np.ndarray) -> bool:
    values = np.asarray(values, dtype=np.float64)
    outside = (values < 0.0) | (values > 1.0)
    return values.size > 0 and outside.mean() >= LOGIT_SHARE and bool((values < 0.0).any())


def check_probabilities(frame: pd.DataFrame, source, *, logits_hint: bool = False, columns=LABELS) -> pd.DataFrame:
    """``columns`` numeric, finite and in [0, 1] (stored as float32); one line naming the first bad row otherwise.

    ``logits_hint`` (`base import`): say "pass --logits" when the values look like logits (``looks_like_logits``);
    else the error counts the values out of range, so that a stray value is reported as one."""
    columns = list(columns)
    frame = check_numeric(frame, columns, source)
    values = frame[columns].to_numpy()
    bad = (values < 0.0) | (values > 1.0)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        if logits_hint and looks_like_logits(values):
            hint = f"; {bad.mean():.0%} of the values are outside [0, 1], some negative: these look like logits: pass --logits"
        else:
            hint = f"; {int(bad.sum())} of {bad.size} values are outside [0, 1]: fix or remove them"
        raise ContractError(
            f"{source}: column '{columns[col]}' has {values[row, col]:.6g} at {row_ref(frame, int(row))}; "
            f"expected a probability in [0, 1]{hint}"
        )
    for col in columns:
        frame[col] = frame[col].to_numpy().astype(np.float32)
    return frame


def ids_in(values, allowed) -> np.ndarray:
    """Boolean membership of string ids in ``allowed``, through Arrow's hash set: pandas 3's
    string-dtype ``isin`` converts value by value (seconds for the 100,000s of RSNA ids)."""

    def strings(items) -> pa.Array:
        if isinstance(items, (pd.Series, pd.Index)):
            items = items.to_numpy(dtype=object)
        items = list(items) if isinstance(items, (set, frozenset, list, tuple)) else np.asarray(items, dtype=object)
        return pa.array(items, type=pa.large_string(), from_pandas=True)

    found = pc.is_in(strings(values), value_set=strings(allowed))
    return pc.fill_null(found, False).to_numpy(zero_copy_only=False).astype(bool)


def check_id_coverage(ids: pd.Series, expected: pd.Series | np.ndarray, source, what: str, *, column: str = "image_id",
                      unit: str = "image") -> None:
    """``ids`` must equal ``expected`` as sets: no unknown id, none missing. ``column``/``unit``: how the ids are
    named (a task's unit-level tables: ``study_id``/``study``, ``patient_id``/``patient``)."""
    known = ids_in(ids, expected)
    if not known.all():
        pos = int(np.argmax(~known))
        raise ContractError(f"{source}: {column} '{ids.iloc[pos]}' at row {pos + 1} is not a {what} {unit} in data/metadata.parquet")
    present = ids_in(expected, ids)
    if not present.all():
        missing = pd.Index(np.asarray(expected, dtype=object))[~present]
        raise ContractError(
            f"{source}: {len(missing)} {what} {unit}(s) missing, e.g. {column} '{missing[0]}'; every {what} {unit} must appear exactly once"
        )


# --- the contract files --------------------------------------------------------------------


def validate_metadata(frame: pd.DataFrame, source) -> pd.DataFrame:
    require_columns(frame, METADATA_REQUIRED, source, "run `data prepare` or add them")
    frame = check_ids(frame, source)
    for col in ("patient_id", "study_id"):
        null = frame[col].isna().to_numpy()
        if null.any():
            raise ContractError(f"{source}: column '{col}' is empty at {row_ref(frame, int(np.argmax(null)))}")
        frame[col] = frame[col].astype(str)
    split = frame["split"].astype(str)
    bad = ~split.isin(SPLITS).to_numpy()
    if bad.any():
        pos = int(np.argmax(bad))
        raise ContractError(f"{source}: column 'split' has {split.iloc[pos]!r} at {row_ref(frame, pos)}; expected 'train' or 'test'")
    frame["split"] = split
    frame = check_numeric(frame, ["z"], source)
    # a study belongs to one patient and one split
    per_study = frame.groupby("study_id", sort=False).agg(patients=("patient_id", "nunique"), splits=("split", "nunique"))
    if (per_study["patients"] > 1).any():
        study = per_study.index[(per_study["patients"] > 1).to_numpy()][0]
        raise ContractError(f"{source}: study_id '{study}' has several patient_id values; a study belongs to one patient")
    if (per_study["splits"] > 1).any():
        study = per_study.index[(per_study["splits"] > 1).to_numpy()][0]
        raise ContractError(f"{source}: study_id '{study}' is in both train and test splits")
    return frame


def check_zero_one(frame: pd.DataFrame, columns, source) -> pd.DataFrame:
    """``columns`` as int8 in {0, 1} (labels); one line naming the column and the first bad row otherwise."""
    frame = check_numeric(frame, columns, source)
    for col in columns:
        arr = frame[col].to_numpy()
        bad = (arr != 0) & (arr != 1)
        if bad.any():
            pos = int(np.argmax(bad))
            raise ContractError(f"{source}: column '{col}' has {arr[pos]:g} at {row_ref(frame, pos)}; labels must be 0 or 1")
        frame[col] = arr.astype(np.int8)
    return frame


def validate_labels(frame: pd.DataFrame, source, metadata: pd.DataFrame | None = None) -> pd.DataFrame:
    require_columns(frame, ("image_id", *LABELS), source, "expected image_id plus the six label columns")
    frame = check_zero_one(check_ids(frame[["image_id", *LABELS]], source), LABELS, source)
    if metadata is not None:
        train_ids = metadata.loc[metadata["split"] == "train", "image_id"]
        check_id_coverage(frame["image_id"], train_ids, source, "train")
    return frame.reset_index(drop=True)


def validate_folds(frame: pd.DataFrame, source, metadata: pd.DataFrame | None = None, labels: pd.DataFrame | None = None) -> pd.DataFrame:
    require_columns(frame, ("image_id", "fold"), source)
    frame = check_ids(frame[["image_id", "fold"]], source)
    frame = check_numeric(frame, ["fold"], source)
    fold = frame["fold"].to_numpy()
    bad = (fold != np.round(fold)) | (fold < 0) | (fold > 127)
    if bad.any():
        pos = int(np.argmax(bad))
        raise ContractError(f"{source}: column 'fold' has {fold[pos]:g} at {row_ref(frame, pos)}; expected an integer 0..K-1")
    frame["fold"] = fold.astype(np.int8)
    k = int(frame["fold"].max()) + 1
    present = np.unique(frame["fold"].to_numpy())
    if len(present) != k:
        raise ContractError(f"{source}: folds must be numbered 0..{k - 1} without gaps; found {present.tolist()}")
    if labels is not None:
        check_id_coverage(frame["image_id"], labels["image_id"], source, "labeled")
    if metadata is not None:
        merged = frame.merge(metadata[["image_id", "patient_id", "study_id"]], on="image_id", how="left")
        if merged["patient_id"].isna().any():
            pos = int(np.argmax(merged["patient_id"].isna().to_numpy()))
            raise ContractError(f"{source}: image_id '{merged['image_id'].iloc[pos]}' at row {pos + 1} is not in data/metadata.parquet")
        for group in ("patient_id", "study_id"):
            spread = merged.groupby(group, sort=False)["fold"].nunique()
            if (spread > 1).any():
                which = spread.index[(spread > 1).to_numpy()][0]
                raise LeakageError(
                    f"{source}: {group.replace('_id', '')} '{which}' is spread over several folds; all images of a patient must share one fold"
                )
    return frame.reset_index(drop=True)


def validate_predictions(
    frame: pd.DataFrame,
    source,
    *,
    expected_ids,
    what: str,
    folds: pd.DataFrame | None = None,
    logits_hint: bool = False,
    columns=LABELS,
) -> pd.DataFrame:
    """Check a prediction table (oof when ``folds`` is given, else test) and return it clean.

    Returns image_id (+ fold) + ``columns`` as float32, in the input's row order. ``columns``: the six
    labels, or a task work directory's ``schema.prediction_columns`` (v5). ``logits_hint``: see
    :func:`check_probabilities` (for files given to `base import`).
    """
    columns = list(columns)
    hint = "expected image_id plus the six label columns" if columns == list(LABELS) else f"expected image_id plus {', '.join(columns)}"
    require_columns(frame, ("image_id", *columns), source, hint)
    keep = ["image_id", *(["fold"] if folds is not None and "fold" in frame.columns else []), *columns]
    frame = check_ids(frame[keep], source)
    frame = check_probabilities(frame, source, logits_hint=logits_hint, columns=columns)
    check_id_coverage(frame["image_id"], expected_ids, source, what)
    if folds is not None:
        frame = attach_folds(frame, folds, source)
        frame = frame[["image_id", "fold", *columns]]
    return frame.reset_index(drop=True)


def attach_folds(frame: pd.DataFrame, folds: pd.DataFrame, source) -> pd.DataFrame:
    """Fill a missing ``fold`` column from folds.parquet; refuse one that disagrees (it would leak)."""
    fold_of = folds.set_index("image_id")["fold"]
    expected = fold_of.reindex(frame["image_id"]).to_numpy()
    if "fold" not in frame.columns:
        frame = frame.copy()
        frame["fold"] = expected.astype(np.int8)
        return frame
    frame = check_numeric(frame, ["fold"], source)
    given = frame["fold"].to_numpy()
    bad = given != expected
    if bad.any():
        pos = int(np.argmax(bad))
        raise LeakageError(
            f"{source}: fold {given[pos]:g} at {row_ref(frame, pos)} disagrees with data/folds.parquet (fold {expected[pos]}); "
            "predictions made on other folds would leak labels into stacking: retrain on data/folds.parquet"
        )
    frame["fold"] = given.astype(np.int8)
    return frame


# --- readers over a work directory -----------------------------------------------------------


def _source(path: Path, workdir: Workdir | None) -> str:
    return str(path) if workdir is None else workdir.relative(path)


def _require_file(path: Path, hint: str) -> None:
    if not Path(path).is_file():
        raise ContractError(f"{path}: not found; {hint}")


DATA_REMEDY = "rerun `data prepare` to rebuild data/ (change labels in the label CSV, not in data/)"


def _recorded_hashes(record_path: Path):
    """The ``sha256`` map of a set's record; None without a record (a folder assembled by hand) or without hashes."""
    if not record_path.is_file():
        return None
    record = read_json(record_path)
    return record.get("sha256") if isinstance(record, dict) else None


def verify_data_file(workdir: Workdir, path: Path) -> None:
    """Check one data/ file against the sha256 that data/prepare.json records (when it records them):
    a file edited by hand or copied from another run is refused, naming it and the fix."""
    hashes = _recorded_hashes(workdir.prepare_record)
    if hashes is None:
        return
    verify_set(workdir.data_dir, _source(workdir.prepare_record, workdir), hashes, names=[Path(path).name], remedy=DATA_REMEDY)


def read_metadata(workdir: Workdir) -> pd.DataFrame:
    _require_file(workdir.metadata, "run `data prepare` first")
    verify_data_file(workdir, workdir.metadata)
    return validate_metadata(read_table(workdir.metadata, what="metadata file"), _source(workdir.metadata, workdir))


def read_labels(workdir: Workdir, metadata: pd.DataFrame | None = None) -> pd.DataFrame:
    _require_file(workdir.labels, "run `data prepare` first")
    verify_data_file(workdir, workdir.labels)
    return validate_labels(read_table(workdir.labels, what="labels file"), _source(workdir.labels, workdir), metadata)


def read_folds(workdir: Workdir, metadata: pd.DataFrame | None = None, labels: pd.DataFrame | None = None) -> pd.DataFrame:
    _require_file(workdir.folds, "run `data prepare` first")
    verify_data_file(workdir, workdir.folds)
    return validate_folds(read_table(workdir.folds, what="folds file"), _source(workdir.folds, workdir), metadata, labels)


def read_oof(path: os.PathLike, folds: pd.DataFrame, workdir: Workdir | None = None, columns=LABELS) -> pd.DataFrame:
    """A model's oof.parquet: image_id, fold + ``columns`` (the six labels, or a task's prediction columns)."""
    _require_file(Path(path), "write it with `base train` or `base import`")
    source = _source(Path(path), workdir)
    return validate_predictions(read_table(path, what="OOF prediction file"), source, expected_ids=folds["image_id"], what="labeled",
                                folds=folds, columns=columns)


def read_test(path: os.PathLike, metadata: pd.DataFrame, workdir: Workdir | None = None, columns=LABELS) -> pd.DataFrame:
    """A model's test.parquet (or test_fold<k>.parquet): image_id + ``columns``, every test image once."""
    _require_file(Path(path), "write it with `base train` or `base import`")
    source = _source(Path(path), workdir)
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    return validate_predictions(read_table(path, what="test prediction file"), source, expected_ids=test_ids, what="test", columns=columns)


def read_test_folds(workdir: Workdir, model: str, metadata: pd.DataFrame, n_folds: int,
                    test: pd.DataFrame | None = None, columns=LABELS) -> list[pd.DataFrame] | None:
    """preds/<model>/test_fold<k>.parquet (v3) for k = 0..K-1, each validated like test.parquet and
    put in its row order; None for a model with only an averaged test.parquet. ``test``: the model's
    test.parquet as ``read_test`` returned it, when the caller has read it already.

    One per fold model or none: a partial set (or one past fold K-1) is an error, because a test
    set with some fold models missing would not be distributed like the OOF rows."""
    present = workdir.model_folder(model).present_test_folds()
    if not present:
        return None
    expected = sorted(workdir.test_fold(model, k).name for k in range(n_folds))
    if present != expected:
        raise ContractError(
            f"{workdir.preds_dir(model)}: model '{model}' has per-fold test files {', '.join(present)}; expected exactly "
            f"test_fold0..test_fold{n_folds - 1}.parquet (one per fold of data/folds.parquet) or none: "
            f"rerun `base train` or `base import --force` for it"
        )
    found = [workdir.test_fold(model, k) for k in range(n_folds)]
    if test is None:
        test = read_test(workdir.test(model), metadata, workdir, columns)
    order = test["image_id"]
    frames = []
    for path in found:
        frame = read_test(path, metadata, workdir, columns)
        frames.append(frame.set_index("image_id").reindex(order).reset_index())
    return frames


def verify_model_files(workdir: Workdir, model: str, names=None) -> None:
    """Check preds/<model>/ files against the sha256 its model.json records (when it records them):
    ``names``, else oof.parquet, test.parquet and any test_fold<k>.parquet.

    A work directory assembled by hand may have no model.json; a record that lists hashes must
    match, else the folder mixes two versions of the model or was edited since."""
    files = workdir.model_folder(model)
    record = read_model_record(files.record)
    hashes = None if record is None else record.sha256
    if hashes is None:
        return
    if names is None:
        fold_files = files.present_test_folds()
        unlisted = [name for name in fold_files if isinstance(hashes, dict) and name not in hashes]
        if unlisted:
            raise ContractError(f"{files.path / unlisted[0]}: not listed in {_source(files.record, workdir)} "
                                f"(added after the model was written); rerun `base train` or `base import --force` for model '{model}'")
        names = [files.oof.name, files.test.name, *fold_files]
    verify_set(files.path, _source(files.record, workdir), hashes, names=names,
               remedy=f"rerun `base train` or `base import --force` for model '{model}'")


def load_core(workdir: Workdir) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """metadata, labels, folds: read and cross-checked. An RSNA 2019 (per-slice) work directory's: a study- or
    patient-level task's data/ (v5) is read by ``stackkit.contract.task_files.load_task_core``, and refused here."""
    record = read_task_record(workdir.data_dir)
    if record is not None and record.schema.unit != "slice":
        raise StackkitError(f"{workdir.task_record}: task {record.task!r} is scored per {record.schema.unit}, and this step reads "
                            "per-slice (RSNA 2019) work directories only")
    metadata = read_metadata(workdir)
    labels = read_labels(workdir, metadata)
    folds = read_folds(workdir, metadata, labels)
    return metadata, labels, folds
