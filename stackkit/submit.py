"""`submit`: the blend of stack/blend.json applied to the test predictions -> Kaggle CSV.

Format (RSNA 2019): header ``ID,Label``; six rows per test image, ``ID`` =
``<image_id>_<label>`` (image ids already start with ``ID_``: ``ID_63eb1e259_epidural``),
labels in the contract order, ``Label`` a probability. ``.csv.gz`` output is gzip-compressed.
Everything is checked before anything is written; the file is replaced atomically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.stack.blend import BlendParams
from stackkit.contract import LABELS, Workdir, file_sha256
from stackkit.errors import ContractError, StackkitError, one_line
from stackkit.contract.io import atomic_path, read_json
from stackkit.contract.records import read_blend_record, read_task
from stackkit.contract.tasks import long_row_ids
from stackkit.contract.validate import ids_in

ID_PATTERN = re.compile(r"^(ID_[0-9A-Za-z]+)_(" + "|".join(LABELS) + r")$")
FLOAT_FORMAT = "%.7g"
HEADER = ["ID", "Label"]


def load_blend(workdir: Workdir) -> tuple[dict, list[dict], BlendParams]:
    """blend.json, its sources and the BlendParams; one-line errors for a missing or malformed file."""
    path = workdir.blend
    blend = read_blend_record(path)
    record = blend.to_json()
    try:
        params = BlendParams.from_json(record, blend.source_names)
    except (KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"{path}: malformed blend record ({type(exc).__name__}: {one_line(exc, 120)}); rerun `stack fit`") from None
    return record, list(blend.sources), params


def recorded_file(workdir: Workdir, source: str, relative: str, expected: str | None) -> Path:
    """A blend source's file as blend.json names it: present, and unchanged since `stack fit` when its sha256 is recorded."""
    path = workdir.root / relative
    if not path.is_file():
        raise StackkitError(f"{workdir.blend}: source '{source}' refers to {path}, which does not exist; rerun `stack fit`")
    if expected and file_sha256(path) != expected:
        raise StackkitError(f"{path}: changed since stack/blend.json was fitted (sha256 differs); rerun `stack fit` before submitting")
    return path


def blended_test_predictions(workdir: Workdir) -> tuple[pd.DataFrame, dict]:
    """(image_id + six labels) for every test image, blended as recorded in blend.json."""
    from stackkit.contract.validate import read_metadata, read_test

    record, sources, params = load_blend(workdir)
    metadata = read_metadata(workdir)
    test_ids = np.sort(metadata.loc[metadata["split"] == "test", "image_id"].to_numpy(dtype=object))
    if len(test_ids) == 0:
        raise ContractError(f"{workdir.metadata}: no test images (split == 'test'); nothing to submit")
    def read_source_file(source: dict, relative: str, expected: str | None) -> np.ndarray:
        path = recorded_file(workdir, source["name"], relative, expected)
        frame = read_test(path, metadata, workdir)  # every test image exactly once, finite probabilities
        return frame.set_index("image_id").reindex(test_ids)[list(LABELS)].to_numpy(dtype=np.float64)

    # v3: the blend was fitted on single fold models' OOF predictions; it meets each base fold model's
    # test set in turn (a source without per-fold files enters every set with its average), then averages
    n_sets = record.get("test_sets", 1)
    averaged = [None if source.get("test_folds") else read_source_file(source, source["test"], source.get("test_sha256"))
                for source in sources]
    blended = np.zeros((len(test_ids), len(LABELS)), dtype=np.float64)
    stacked = np.empty((len(sources), len(test_ids), len(LABELS)), dtype=np.float64)
    for k in range(n_sets):
        for s, source in enumerate(sources):
            if averaged[s] is not None:
                stacked[s] = averaged[s]
            else:
                entry = source["test_folds"][k]
                stacked[s] = read_source_file(source, entry["path"], entry["sha256"])
        blended += params.apply(stacked)
    blended /= n_sets
    out = pd.DataFrame(blended, columns=list(LABELS))
    out.insert(0, "image_id", test_ids)
    return out, record


def to_long(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide (image_id + six labels) -> Kaggle long ``ID,Label``, six rows per image in LABELS order."""
    id_column = long_row_ids(frame["image_id"].to_numpy(dtype=object), LABELS)
    values = frame[list(LABELS)].to_numpy(dtype=np.float64).reshape(-1)  # row-major: image by image, labels in order
    return pd.DataFrame({"ID": id_column.astype(object), "Label": values})


def _check_wide(frame: pd.DataFrame, source: str) -> None:
    values = frame[list(LABELS)].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ContractError(f"{source}: blended '{LABELS[col]}' is {values[row, col]} for image_id {frame['image_id'].iloc[row]}; expected a probability")
    ids = frame["image_id"].astype(str)
    bad_ids = ~ids.str.fullmatch(r"ID_[0-9A-Za-z]+").to_numpy()
    if bad_ids.any():
        raise ContractError(
            f"{source}: image_id '{ids.iloc[int(np.argmax(bad_ids))]}' does not look like an RSNA id (ID_ + letters/digits); "
            "Kaggle ids are ID_<image>_<label>"
        )


def reference_test_ids(*, test_dicom_dir=None, sample_submission=None) -> tuple[np.ndarray, str] | None:
    """The real test set's image ids: the ``.dcm`` files of ``test_dicom_dir`` (RSNA names them
    ``<SOPInstanceUID>.dcm``, the image id) or the images of a sample submission; None without either."""
    if test_dicom_dir is not None:
        folder = Path(test_dicom_dir)
        if not folder.is_dir():
            raise StackkitError(f"{folder}: --test-dicom-dir is not a folder")
        ids = sorted(p.name[: -len(".dcm")] for p in folder.iterdir() if p.name.endswith(".dcm"))
        if not ids:
            raise StackkitError(f"{folder}: --test-dicom-dir holds no .dcm files")
        return np.asarray(ids, dtype=object), str(folder)
    if sample_submission is not None:
        from stackkit.contract.io import read_table

        frame = read_table(sample_submission, what="sample submission")
        if "ID" not in frame.columns:
            raise ContractError(f"{sample_submission}: no 'ID' column; expected the Kaggle sample submission (ID,Label)")
        parts = frame["ID"].astype(str).str.extract(ID_PATTERN)
        bad = parts[0].isna().to_numpy()
        if bad.any():
            pos = int(np.argmax(bad))
            raise ContractError(f"{sample_submission}: ID {frame['ID'].iloc[pos]!r} at row {pos + 1} is not ID_<image>_<label>")
        return pd.unique(parts[0].to_numpy(dtype=object)), str(sample_submission)
    return None


def check_coverage(workdir: Workdir, image_ids, *, test_dicom_dir=None, sample_submission=None, allow_incomplete=False) -> None:
    """Refuse a submission that is short of the real test set.

    Against ``--test-dicom-dir`` / ``--sample-submission`` when given (the images the user really has);
    else against data/prepare.json, which lists the test files `data prepare` skipped as unreadable.
    ``allow_incomplete`` lets a known-short submission through (Kaggle would reject it)."""
    have = pd.Index(np.asarray(image_ids, dtype=object).astype(str))
    reference = reference_test_ids(test_dicom_dir=test_dicom_dir, sample_submission=sample_submission)
    if reference is not None:
        expected, source = reference
        extra = ~ids_in(have, expected)
        if extra.any():
            raise ContractError(
                f"{source}: has no test image {have[extra][0]} ({int(extra.sum())} of the submission's images are not in it); "
                "is it the test set data/metadata.parquet was prepared from?"
            )
        missing = ~ids_in(expected, have)
        if missing.any() and not allow_incomplete:
            raise ContractError(
                f"{source}: {int(missing.sum())} test image(s) have no prediction, e.g. {pd.Index(expected)[missing][0]} "
                f"(the submission would lack {int(missing.sum()) * len(LABELS)} rows); fix them and rerun `data prepare` and "
                "the steps after it, or pass --allow-incomplete"
            )
        return
    record_path = workdir.prepare_record
    if not record_path.is_file() or allow_incomplete:
        return
    record = read_json(record_path)
    skipped = record.get("skipped_test_ids") if isinstance(record, dict) else None
    if not isinstance(skipped, list):
        raise ContractError(f"{record_path}: 'skipped_test_ids' must be a list; rerun `data prepare`")
    if skipped:
        raise ContractError(
            f"{record_path}: `data prepare` skipped {len(skipped)} unreadable test file(s), e.g. {skipped[0]}, so the submission "
            f"would lack {len(skipped) * len(LABELS)} rows; fix them and rerun `data prepare` and the steps after it, "
            "or pass --allow-incomplete"
        )


@dataclass(frozen=True)
class SubmitResult:
    """What one `submit` wrote (stackkit/cli.py renders it)."""

    path: Path
    images: int  # test images
    rows: int  # ID,Label rows: six per image
    sources: tuple[str, ...]  # the blend's sources


def submission_target(workdir: Workdir, out: str | None) -> tuple[Path, bool]:
    """(the submission's path: ``out`` or WORKDIR/submission.csv, gzip or not), refused unless a .csv or .csv.gz file name."""
    target = Path(out) if out else workdir.submission
    if target.is_dir():
        raise StackkitError(f"{target}: is a directory; pass --out with a file name such as submission.csv")
    name = target.name.lower()
    if not (name.endswith(".csv") or name.endswith(".csv.gz")):
        raise StackkitError(f"{target}: expected a .csv or .csv.gz file name")
    return target, name.endswith(".gz")


def submission_bytes(frame: pd.DataFrame, compressed: bool) -> bytes:
    """The CSV bytes of a submission frame (probabilities as %.7g), gzip-compressed reproducibly when ``compressed``."""
    data = frame.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n").encode("ascii")
    if compressed:
        import gzip

        # no file name and mtime 0 in the gzip header: the same predictions give the same bytes
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return data


def write_submission(workdir: Workdir, out: str | None = None, *, test_dicom_dir=None, sample_submission=None,
                     allow_incomplete: bool = False) -> SubmitResult:
    """Write the Kaggle submission (default ``WORKDIR/submission.csv``; ``.gz`` -> gzip). Atomic; refuses bad input before writing.

    A submission short of the real test set is refused (see :func:`check_coverage`). RSNA 2019's: a study- or
    patient-level task's is written by ``stackkit.unit_submit.write_unit_submission``."""
    schema = read_task(workdir)
    if schema.unit != "slice":
        raise StackkitError(f"{workdir.task_record}: task {schema.name!r} submits one entry per {schema.unit}: "
                            "use stackkit.unit_submit.write_unit_submission (the `submit` command does)")
    target, compressed = submission_target(workdir, out)
    wide, record = blended_test_predictions(workdir)
    _check_wide(wide, str(workdir.blend))
    check_coverage(workdir, wide["image_id"], test_dicom_dir=test_dicom_dir, sample_submission=sample_submission,
                   allow_incomplete=allow_incomplete)
    long = to_long(wide)
    data = submission_bytes(long, compressed)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
        # checked before the rename: a file that fails the format never replaces a good one
        validate_submission(tmp, wide["image_id"], compressed=compressed)
    return SubmitResult(path=target, images=int(len(wide)), rows=int(len(long)), sources=tuple(s["name"] for s in record["sources"]))


def validate_submission(path, test_image_ids, *, compressed: bool | None = None) -> None:
    """Check a file against the Kaggle RSNA 2019 submission format; raise ContractError (one line) if it does not match.

    Header exactly ``ID,Label``; every ``ID`` is ``ID_<image>_<label>`` with a known label; no
    duplicate ``ID``; each test image has exactly its six rows and no other image appears;
    ``Label`` is a number in [0, 1]. ``compressed``: gzip or not (default: from the ``.gz`` suffix).
    """
    path = Path(path)
    if compressed is None:
        compressed = path.name.lower().endswith(".gz")
    try:
        frame = pd.read_csv(path, dtype={"ID": str}, keep_default_na=False, na_values=[""], compression="gzip" if compressed else None)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ContractError(f"{path}: not a readable CSV ({one_line(exc)})") from None
    if list(frame.columns) != HEADER:
        raise ContractError(f"{path}: header is {list(frame.columns)}; expected exactly ID,Label")
    ids = frame["ID"].astype(str)
    parts = ids.str.extract(ID_PATTERN)
    bad = parts[0].isna().to_numpy()
    if bad.any():
        pos = int(np.argmax(bad))
        raise ContractError(f"{path}: ID '{ids.iloc[pos]}' at row {pos + 1} is not ID_<image>_<label> with a label in {', '.join(LABELS)}")
    dup = ids.duplicated().to_numpy()
    if dup.any():
        pos = int(np.argmax(dup))
        raise ContractError(f"{path}: ID '{ids.iloc[pos]}' at row {pos + 1} appears twice")
    label = pd.to_numeric(frame["Label"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(label) | (label < 0) | (label > 1)
    if bad.any():
        pos = int(np.argmax(bad))
        raise ContractError(f"{path}: Label {frame['Label'].iloc[pos]!r} at row {pos + 1} (ID {ids.iloc[pos]}) is not a probability in [0, 1]")
    expected = pd.Index(np.asarray(test_image_ids, dtype=object).astype(str))
    images = pd.Index(parts[0])
    unknown = ~ids_in(images, expected)
    if unknown.any():
        pos = int(np.argmax(unknown))
        raise ContractError(f"{path}: ID '{ids.iloc[pos]}' at row {pos + 1} is not a test image")
    counts = images.value_counts().reindex(expected, fill_value=0)
    wrong = counts[counts != len(LABELS)]
    if len(wrong):
        raise ContractError(f"{path}: test image '{wrong.index[0]}' has {int(wrong.iloc[0])} rows; expected {len(LABELS)} (one per label)")
