"""`submit` on a task work directory (contract v5): the unit blend of stack/blend.json applied to the stackers'
test predictions, in the competition's exact format (the schema's ``write_submission``).

RSNA 2022: ``row_id,fractured``, 8 rows per study (``<StudyInstanceUID>_<target>``); RSNA 2023: ``patient_id``
+ the 13 probability columns, one row per patient. Every test unit exactly once, softmax groups summing to 1;
the file is checked as written before it replaces anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import Workdir
from stackkit.contract.io import atomic_path, read_table
from stackkit.contract.records import read_task, read_unit_blend_record
from stackkit.contract.task_files import mean_unit_predictions, units_of, validate_unit_predictions
from stackkit.contract.tasks import TaskSchema, long_row_ids, write_submission as schema_submission
from stackkit.errors import ContractError, StackkitError, one_line
from stackkit.submit import recorded_file, submission_bytes, submission_target

# a written value may differ from the blend's by the %.7g rounding: a softmax group sums to 1 within this
GROUP_SUM_TOLERANCE = 1e-5


@dataclass(frozen=True)
class UnitSubmitResult:
    """What one `submit` wrote for a unit task (stackkit/render.py renders it)."""

    path: Path
    task: str
    unit: str
    units: int  # test units
    rows: int  # rows of the file
    sources: tuple[str, ...]


def blended_unit_predictions(wd: Workdir, schema: TaskSchema) -> tuple[pd.DataFrame, object]:
    """(unit id + ``schema.labels`` of every test unit, sorted; the blend record): the recorded blend applied
    to each test set of the stackers (their per-fold files, or their test files), then averaged."""
    from stackkit.contract.validate import read_metadata
    from stackkit.stack.units import apply_unit_blend

    record = read_unit_blend_record(wd.blend, schema)
    test_units = units_of(read_metadata(wd), schema, "test")
    if not len(test_units):
        raise ContractError(f"{wd.metadata}: no test {schema.unit}s (split == 'test'); nothing to submit")

    def read_source(name: str, relative: str, expected: str | None) -> pd.DataFrame:
        path = recorded_file(wd, name, relative, expected)
        return validate_unit_predictions(read_table(path, what="test prediction file"), relative, schema, expected_units=test_units)

    sources = record.stacker_sources
    blended = []
    for k in range(record.test_sets):
        frames = {}
        for stacker in record.blend["stackers"]:
            source = sources[stacker]
            entry = source["test_folds"][k] if source.get("test_folds") else {"path": source["test"], "sha256": source.get("test_sha256")}
            frames[stacker] = read_source(source["name"], entry["path"], entry["sha256"])
        blended.append(apply_unit_blend(schema, record.blend, frames))
    return mean_unit_predictions(schema, blended), record


def _sample_units(schema: TaskSchema, sample_submission) -> np.ndarray:
    """The units of a competition's sample submission (its id column; a long one's ids without ``_<column>``)."""
    sub = schema.submission
    frame = read_table(sample_submission, what="sample submission")
    if sub.id_column not in frame.columns:
        raise ContractError(f"{sample_submission}: no '{sub.id_column}' column; expected the competition's sample submission "
                            f"({sub.id_column}, {sub.value_column or ', '.join(sub.columns)})")
    ids = frame[sub.id_column].astype(str)
    if sub.layout == "wide":
        return pd.unique(ids.to_numpy(dtype=object))
    parts = ids.str.extract(r"^(?P<unit>.+)_(?P<column>" + "|".join(sub.columns) + r")$")
    bad = parts["unit"].isna().to_numpy()
    if bad.any():
        pos = int(np.argmax(bad))
        raise ContractError(f"{sample_submission}: {sub.id_column} {ids.iloc[pos]!r} at row {pos + 1} is not <{schema.unit_column}>_<target>")
    return pd.unique(parts["unit"].to_numpy(dtype=object))


def check_unit_coverage(schema: TaskSchema, units, *, test_dicom_dir=None, sample_submission=None, allow_incomplete=False) -> None:
    """Refuse a submission short of (or beyond) the sample submission's units, when one is given."""
    if test_dicom_dir is not None:
        raise StackkitError(f"--test-dicom-dir: task {schema.name!r} submits one entry per {schema.unit}; check it against "
                            "--sample-submission instead")
    if sample_submission is None:
        return
    expected = pd.Index(_sample_units(schema, sample_submission))
    have = pd.Index(np.asarray(units, dtype=object).astype(str))
    extra = ~have.isin(expected)
    if extra.any():
        raise ContractError(f"{sample_submission}: has no {schema.unit} {have[extra][0]} ({int(extra.sum())} of the submission's "
                            f"{schema.unit}s are not in it); is it the test set data/metadata.parquet was prepared from?")
    missing = ~expected.isin(have)
    if missing.any() and not allow_incomplete:
        raise ContractError(f"{sample_submission}: {int(missing.sum())} test {schema.unit}(s) have no prediction, e.g. "
                            f"{expected[missing][0]}; prepare them too, or pass --allow-incomplete")


def validate_unit_submission(path, schema: TaskSchema, units, *, compressed: bool) -> None:
    """A written file against the competition's format: the exact header, every test unit's rows once (a long
    file ``<unit id>_<column>`` per column), probabilities in [0, 1], softmax groups summing to 1."""
    sub = schema.submission
    header = [sub.id_column, sub.value_column] if sub.layout == "long" else [sub.id_column, *sub.columns]
    try:
        frame = pd.read_csv(path, dtype={sub.id_column: str}, keep_default_na=False, compression="gzip" if compressed else None)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ContractError(f"{path}: not a readable CSV ({one_line(exc)})") from None
    if list(frame.columns) != header:
        raise ContractError(f"{path}: header is {list(frame.columns)}; expected exactly {','.join(header)}")
    units = np.asarray(units, dtype=object).astype(str)
    ids = long_row_ids(units, sub.columns) if sub.layout == "long" else units
    if len(frame) != len(ids) or set(frame[sub.id_column]) != set(ids.tolist()):
        raise ContractError(f"{path}: {len(frame)} rows of {frame[sub.id_column].nunique()} distinct ids; expected the {len(ids)} ids "
                            f"of the {len(units)} test {schema.unit}s, each once")
    values = frame[header[1:]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ContractError(f"{path}: '{header[1 + col]}' is {frame[header[1 + col]].iloc[row]!r} at row {row + 1}; expected a probability")
    if sub.layout == "wide":
        for group in (g for g in schema.groups if g.kind == "softmax" and set(g.classes) <= set(sub.columns)):
            total = frame[list(group.classes)].to_numpy(dtype=np.float64).sum(axis=1)
            off = np.abs(total - 1.0) > GROUP_SUM_TOLERANCE
            if off.any():
                raise ContractError(f"{path}: {', '.join(group.classes)} sum to {total[int(np.argmax(off))]:.7g} at row "
                                    f"{int(np.argmax(off)) + 1}; expected 1 (group '{group.name}')")


def write_unit_submission(workdir, out: str | None = None, *, schema: TaskSchema | None = None, test_dicom_dir=None,
                          sample_submission=None, allow_incomplete: bool = False) -> UnitSubmitResult:
    """The competition's submission of a unit task (default ``WORKDIR/submission.csv``; ``.gz`` -> gzip), atomic,
    checked as written; ``schema``: the work directory's task (read when not given)."""
    wd = Workdir.of(workdir)
    schema = read_task(wd) if schema is None else schema
    target, compressed = submission_target(wd, out)
    predictions, record = blended_unit_predictions(wd, schema)
    units = predictions[schema.unit_column]
    check_unit_coverage(schema, units, test_dicom_dir=test_dicom_dir, sample_submission=sample_submission, allow_incomplete=allow_incomplete)
    frame = schema_submission(schema, predictions, source=f"{wd.relative(wd.blend)} applied to the stackers' test predictions")
    with atomic_path(target) as tmp:
        tmp.write_bytes(submission_bytes(frame, compressed))
        # checked before the rename: a file that fails the format never replaces a good one
        validate_unit_submission(tmp, schema, units, compressed=compressed)
    return UnitSubmitResult(target, schema.name, schema.unit, int(len(units)), int(len(frame)), tuple(s["name"] for s in record.sources))
