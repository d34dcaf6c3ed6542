"""``data prepare``: DICOM folders + a label CSV -> data/metadata, data/labels, data/folds.

Layers: ``parse_label_csv`` and ``make_folds`` are pure functions over files/DataFrames;
``prepare_data`` scans the folders (``stackkit.data.dicom.scan_headers``), checks everything, and
writes the three contract files only once all of them have validated, so a failed run leaves
the work directory exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir
from stackkit.errors import ContractError, StackkitError
from stackkit.contract.records.task import TaskRecord, write_task_record
from stackkit.contract.io import check_set_target, read_table, replace_dir, write_parquet, write_set_record
from stackkit.contract.validate import ids_in, validate_folds, validate_labels, validate_metadata


# Warn file by file up to this many skipped files, then once for the rest.
MAX_LISTED_SKIPS = 20
# `data prepare --image-id`: where an image's id comes from.
IMAGE_ID_RULES = {
    "sop": "the SOPInstanceUID (0008,0018) of the file",
    "filename": "the file name without .dcm (RSNA 2019 names each file <image id>.dcm)",
}


class SkippedDicomWarning(UserWarning):
    """A DICOM file that could not be read was skipped (``--strict`` makes it an error)."""


# --- labels ----------------------------------------------------------------------------------


def parse_label_csv(path) -> pd.DataFrame:
    """The label file as ``image_id`` + six int8 label columns (contract order).

    Accepts the RSNA long format (``ID,Label`` with ``ID`` = ``ID_<image>_<label>``, six rows
    per image) or a wide table (``image_id`` plus the six label columns), CSV or Parquet.
    """
    path = Path(path)
    frame = read_table(path, what="label file")
    columns = [str(c).strip() for c in frame.columns]
    frame.columns = columns
    if columns == ["ID", "Label"]:
        return _parse_long(frame, path)
    if "image_id" in columns and all(label in columns for label in LABELS):
        return _parse_wide(frame, path)
    raise ContractError(
        f"{path}: header is {','.join(columns[:8])}; expected 'ID,Label' (RSNA long format) "
        f"or image_id,{','.join(LABELS)} (wide)"
    )


def _check_binary(values: pd.Series, path: Path, where, column: str) -> np.ndarray:
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(numeric, (0.0, 1.0))
    if bad.any():
        pos = int(np.argmax(bad))
        value = values.iloc[pos]
        shown = f"{value:g}" if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else repr(str(value))
        raise ContractError(f"{path}: {where(pos)} has {column} {shown}; labels must be 0 or 1")
    return numeric.astype(np.int8)


def _parse_long(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    if frame.empty:
        raise ContractError(f"{path}: no label rows under the 'ID,Label' header")
    ids = frame["ID"].astype(str).str.strip()

    def where(pos: int) -> str:
        return f"row {pos + 1} (ID {ids.iloc[pos]})"

    parts = ids.str.rpartition("_")
    image_ids, labels = parts[0], parts[2]
    malformed = (image_ids == "").to_numpy() | frame["ID"].isna().to_numpy()
    if malformed.any():
        pos = int(np.argmax(malformed))
        raise ContractError(f"{path}: {where(pos)} is not of the form ID_<image>_<label>")
    unknown = ~labels.isin(LABELS).to_numpy()
    if unknown.any():
        pos = int(np.argmax(unknown))
        raise ContractError(f"{path}: {where(pos)} names label '{labels.iloc[pos]}'; expected one of {', '.join(LABELS)}")
    values = _check_binary(frame["Label"], path, where, "Label")
    duplicate = ids.duplicated().to_numpy()
    if duplicate.any():
        pos = int(np.argmax(duplicate))
        raise ContractError(f"{path}: {where(pos)} repeats an earlier row; each ID must appear once")
    counts = image_ids.value_counts(sort=False)
    incomplete = counts[counts != len(LABELS)]
    if len(incomplete):
        image = incomplete.index[0]
        have = set(labels[image_ids == image])
        missing = [label for label in LABELS if label not in have]
        raise ContractError(
            f"{path}: image {image} has {incomplete.iloc[0]} of the {len(LABELS)} labels (missing {', '.join(missing)}); "
            "every image needs one row per label"
        )
    wide = (
        pd.DataFrame({"image_id": image_ids.to_numpy(), "label": labels.to_numpy(), "value": values})
        .pivot(index="image_id", columns="label", values="value")
        .reindex(columns=list(LABELS))
    )
    wide = wide.astype(np.int8).reset_index()
    wide.columns.name = None
    return wide


def _parse_wide(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    if frame.empty:
        raise ContractError(f"{path}: no label rows")
    ids = frame["image_id"]
    if ids.isna().any():
        pos = int(np.argmax(ids.isna().to_numpy()))
        raise ContractError(f"{path}: row {pos + 1} has an empty image_id")
    ids = ids.astype(str).str.strip()

    def where(pos: int) -> str:
        return f"row {pos + 1} (image_id {ids.iloc[pos]})"

    out = pd.DataFrame({"image_id": ids.to_numpy()})
    for label in LABELS:
        out[label] = _check_binary(frame[label], path, where, label)
    duplicate = ids.duplicated().to_numpy()
    if duplicate.any():
        pos = int(np.argmax(duplicate))
        raise ContractError(f"{path}: {where(pos)} repeats an earlier image_id; each image must appear once")
    return out


# --- folds -----------------------------------------------------------------------------------


def make_folds(metadata: pd.DataFrame, labels: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """``image_id``, ``fold`` (int8): patients never straddle folds; stratified on study-level ``any``.

    sklearn's ``StratifiedGroupKFold(shuffle=True, random_state=seed)`` with groups =
    patient_id and y = the maximum of ``any`` over each image's study. Rows are put in
    image_id order first, so the folds depend only on the data and the seed, never on the
    order in which files were scanned.
    """
    n_folds = int(n_folds)
    if n_folds < 2:
        raise StackkitError(f"--folds {n_folds}: need at least 2 folds")
    train = metadata.loc[metadata["split"] == "train", ["image_id", "patient_id", "study_id"]].merge(
        labels[["image_id", "any"]], on="image_id", how="inner", validate="one_to_one"
    )
    train = train.sort_values("image_id", kind="stable").reset_index(drop=True)
    study_any = train.groupby("study_id", sort=False)["any"].transform("max").to_numpy()
    return grouped_folds(train["image_id"], train["patient_id"], study_any, n_folds, seed)


def grouped_folds(image_ids: pd.Series, patients: pd.Series, strata: np.ndarray, n_folds: int, seed: int) -> pd.DataFrame:
    """``image_id``, ``fold`` (int8) of the given rows, in their order: sklearn's
    ``StratifiedGroupKFold(shuffle=True, random_state=seed)`` grouped by ``patients``, stratified on ``strata``."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_folds = int(n_folds)
    n_patients = patients.nunique()
    if n_patients < n_folds:
        raise StackkitError(
            f"--folds {n_folds}: only {n_patients} labeled patient(s); need at least one patient per fold (lower --folds)"
        )
    fold = np.full(len(image_ids), -1, dtype=np.int8)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # few positive studies is legitimate for small data; the split is still grouped
        warnings.filterwarnings("ignore", message=r"The least populated class", category=UserWarning)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(image_ids)), strata, groups=patients)):
            fold[held_out] = k
    return pd.DataFrame({"image_id": image_ids.to_numpy(), "fold": fold})


# --- the command -----------------------------------------------------------------------------


def _dicom_files(folder, option: str) -> list[str]:
    if folder is None:
        raise StackkitError(f"{option} is required")
    folder = Path(folder)
    if not folder.exists():
        raise StackkitError(f"{folder}: {option} folder does not exist")
    if not folder.is_dir():
        raise StackkitError(f"{folder}: {option} is not a folder")
    absolute = os.path.abspath(folder)
    with os.scandir(absolute) as entries:  # scandir: no pathlib objects for 100,000s of files
        paths = sorted(os.path.join(absolute, e.name) for e in entries if e.name.endswith(".dcm") and e.is_file())
    if not paths:
        raise StackkitError(f"{folder}: {option} folder contains no .dcm files")
    return paths


@dataclass(frozen=True, kw_only=True)
class ScanOptions:
    """How a `data prepare` reads its DICOM headers and splits the folds (shared by the RSNA 2019 and task layouts)."""

    n_folds: int = 5
    seed: int = 0
    strict: bool = False
    workers: int | None = None
    progress: bool = True
    modalities: object = None  # None (CT), a comma-separated string or a sequence of Modality values


@dataclass(frozen=True, kw_only=True)
class PrepareOptions(ScanOptions):
    """What `data prepare` is asked for: :func:`prepare_data`'s keywords."""

    dicom_dir: str | os.PathLike
    test_dicom_dir: str | os.PathLike
    labels_csv: str | os.PathLike
    image_id: str = "sop"


@dataclass(frozen=True)
class PrepareResult:
    """What one `data prepare` wrote (stackkit/cli.py renders it)."""

    metadata: Path
    labels: Path
    folds: Path
    train_images: int
    test_images: int
    patients: int
    studies: int
    n_folds: int
    fold_images: list  # per fold: its labeled images
    fold_any_rate: list  # per fold: the share of them with any hemorrhage
    prevalence: dict  # label -> share of positive labeled images
    dropped_labels: int  # label rows without a readable image
    skipped: list  # (file, reason) of every DICOM file skipped


def prepare_data(workdir: Workdir, options: PrepareOptions | None = None, **fields) -> PrepareResult:
    """Scan both DICOM folders, parse the labels, make folds, validate, then write data/ as one set.

    Unreadable or refused DICOM files (``stackkit.data.decoding``: a Modality not in
    ``modalities``, default CT; multi-frame; colour; truncated; no decoder) are skipped with a
    :class:`SkippedDicomWarning` per file, emitted as soon as the scan ends (before any later
    check can fail), and listed in the result's ``skipped``; with ``strict=True`` the first one
    is an error. ``image_id``: ``sop`` or ``filename`` (``IMAGE_ID_RULES``). Nothing is written
    unless every check passes. The keywords are :class:`PrepareOptions`' fields: pass them, or
    ``options`` (then ``fields`` override it).
    """
    from stackkit.data.dicom import scan_headers

    o = PrepareOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    dicom_dir, test_dicom_dir, labels_csv, n_folds, image_id = o.dicom_dir, o.test_dicom_dir, o.labels_csv, o.n_folds, o.image_id
    workdir = Workdir.of(workdir)
    if int(n_folds) < 2:
        raise StackkitError(f"--folds {n_folds}: need at least 2 folds")
    if image_id not in IMAGE_ID_RULES:
        raise StackkitError(f"--image-id {image_id!r}: expected one of {', '.join(IMAGE_ID_RULES)}")
    modalities = modalities_option(o.modalities)
    check_set_target(workdir.data_dir)  # before the scan: a long run must not end on this
    train_paths = _dicom_files(dicom_dir, "--dicom-dir")
    test_paths = _dicom_files(test_dicom_dir, "--test-dicom-dir")
    overlap = set(train_paths) & set(test_paths)
    if overlap:
        raise StackkitError(f"{sorted(overlap)[0]}: is in both --dicom-dir and --test-dicom-dir; use two different folders")
    labels = parse_label_csv(labels_csv)

    headers, skipped = scan_headers(train_paths + test_paths, workers=o.workers, progress=o.progress, modalities=modalities)
    report_skipped(skipped, o.strict)
    metadata = metadata_from_headers(headers, set(train_paths), dicom_dir, image_id)
    n_parsed = len(labels)
    labels = _match_labels(labels, metadata, skipped, (labels_csv, dicom_dir, test_dicom_dir), image_id)
    folds = make_folds(metadata, labels, n_folds, o.seed)
    folds = folds.set_index("image_id").reindex(labels["image_id"]).reset_index()
    folds = validate_folds(folds, "data prepare (folds)", metadata, labels)

    # Everything checked: only now touch the work directory.
    record = _prepare_record(train_paths, test_paths, skipped, image_id=image_id, modalities=modalities)
    write_data_set(workdir, {workdir.metadata: metadata, workdir.labels: labels, workdir.folds: folds}, record)

    return _prepare_summary(workdir, metadata, labels, folds, n_folds, skipped, dropped_labels=n_parsed - len(labels))


def modalities_option(value) -> tuple[str, ...]:
    """The modalities to read: None (CT), a comma-separated string (``--modality``) or a sequence of Modality values."""
    from stackkit.data.decoding import parse_modalities

    return parse_modalities(value) if value is None or isinstance(value, str) else tuple(value)


def write_data_set(workdir: Workdir, tables: dict, record: dict, task: str | None = None) -> None:
    """data/ replaced as one set: ``tables`` (a data/ path -> its frame), ``task.json`` for a ``task``,
    and prepare.json last with the sha256 of each, which every reader checks
    (stackkit.contract.validate.verify_data_file). Other files of the old data/ are carried along,
    never an earlier set's task record or slice labels (they would describe another dataset)."""
    own = {workdir.task_record.name, workdir.slice_labels.name}
    carried = [e.name for e in workdir.data_dir.iterdir() if e.name not in own] if workdir.data_dir.is_dir() else []
    with replace_dir(workdir.data_dir, keep=carried) as folder:
        for path, frame in tables.items():
            write_parquet(frame, folder / Path(path).name)
        if task is not None:
            write_task_record(folder, TaskRecord(task))
        write_set_record(folder, workdir.prepare_record.name, record)


def _prepare_record(train_paths, test_paths, skipped, *, image_id: str, modalities) -> dict:
    """data/prepare.json without its sha256 (written last, by write_set_record)."""
    test_set = set(test_paths)
    return {
        "train_files": len(train_paths),
        "test_files": len(test_paths),
        "image_id": image_id,
        "modalities": list(modalities),
        "skipped": [{"path": path, "reason": reason, "split": "test" if path in test_set else "train"} for path, reason in skipped],
        # submit refuses a submission that lacks these images (RSNA names files <image id>.dcm)
        "skipped_test_ids": sorted(Path(path).stem for path, _ in skipped if path in test_set),
    }


def _ids_of_skipped(skipped, labels: pd.DataFrame) -> set[str]:
    """Image ids of skipped files, from their file names (exact with --image-id filename; RSNA names
    files <SOPInstanceUID>.dcm, so also right there with the default rule)."""
    stems = {Path(path).stem for path, _ in skipped}
    return stems & set(labels["image_id"])


def report_skipped(skipped, strict: bool) -> None:
    """One warning per unreadable file (the first MAX_LISTED_SKIPS), or, with ``strict``, an error."""
    if skipped and strict:
        path, reason = skipped[0]
        more = f" ({len(skipped) - 1} more unreadable file(s))" if len(skipped) > 1 else ""
        raise StackkitError(f"{path}: {reason}{more}; fix or remove it, or run without --strict to skip unreadable files")
    for path, reason in skipped[:MAX_LISTED_SKIPS]:
        warnings.warn(f"skipped unreadable DICOM {path}: {reason}", SkippedDicomWarning, stacklevel=3)
    if len(skipped) > MAX_LISTED_SKIPS:
        warnings.warn(
            f"skipped {len(skipped) - MAX_LISTED_SKIPS} more unreadable DICOM file(s); the summary lists them all",
            SkippedDicomWarning,
            stacklevel=3,
        )


def metadata_from_headers(headers: pd.DataFrame, train_set: set, dicom_dir, image_id: str = "sop") -> pd.DataFrame:
    """Header rows -> validated metadata in slice order, with the split taken from the folder and
    the image id from the ``image_id`` rule."""
    headers.insert(3, "split", np.where(headers["path"].isin(train_set), "train", "test"))
    if image_id == "filename":
        headers["image_id"] = [Path(path).stem for path in headers["path"]]
    duplicate = headers["image_id"].duplicated(keep=False).to_numpy()
    if duplicate.any():
        clash = headers.loc[duplicate].sort_values(["image_id", "path"])
        image = clash["image_id"].iloc[0]
        files = clash.loc[clash["image_id"] == image, "path"].tolist()
        what = "file name" if image_id == "filename" else "SOPInstanceUID"
        raise StackkitError(f"{files[1]}: {what} {image} is also used by {files[0]}; every image needs its own id (--image-id {image_id})")
    _check_one_patient_per_study(headers)
    source = "data prepare (DICOM headers)"
    metadata = validate_metadata(headers.sort_values(["split", "study_id", "z", "image_id"]).reset_index(drop=True), source)
    if not (metadata["split"] == "train").any():
        raise StackkitError(f"{dicom_dir}: no readable training DICOM files (all {len(train_set)} skipped)")
    return metadata


def _check_one_patient_per_study(headers: pd.DataFrame) -> None:
    """A study under two PatientIDs: one line naming a file of each."""
    patients = headers.groupby("study_id", sort=False)["patient_id"].nunique()
    if not (patients > 1).any():
        return
    study = patients.index[(patients > 1).to_numpy()][0]
    rows = headers.loc[headers["study_id"] == study].sort_values(["patient_id", "path"]).drop_duplicates("patient_id")
    (path_a, patient_a), (path_b, patient_b) = rows[["path", "patient_id"]].head(2).itertuples(index=False)
    raise StackkitError(f"{path_b}: PatientID {patient_b}, but {path_a} of the same study {study} has PatientID {patient_a}; "
                        "a study belongs to one patient: fix the headers or remove one of the files")


def _match_labels(labels: pd.DataFrame, metadata: pd.DataFrame, skipped, sources, image_id: str = "sop") -> pd.DataFrame:
    """Labels of exactly the readable training images, in metadata order.

    Labels of skipped files go with them; any other mismatch between labels and images is an error
    naming the files. ``sources``: (label CSV, train folder, test folder).
    """
    labels_csv, dicom_dir, test_dicom_dir = sources
    skipped_ids = _ids_of_skipped(skipped, labels)
    dropped = ids_in(labels["image_id"], list(skipped_ids))
    if dropped.any():
        warnings.warn(
            f"dropped the labels of {int(dropped.sum())} skipped image(s), e.g. {labels['image_id'][dropped].iloc[0]}",
            SkippedDicomWarning,
            stacklevel=3,
        )
        labels = labels.loc[~dropped].reset_index(drop=True)
    split_of = metadata.set_index("image_id")["split"]
    label_split = labels["image_id"].map(split_of)
    if label_split.isna().any():
        image = labels["image_id"].iloc[int(np.argmax(label_split.isna().to_numpy()))]
        raise ContractError(f"{labels_csv}: labels for image {image}, which is not in {dicom_dir} "
                            f"({_why_not_found(image, metadata, skipped, dicom_dir, image_id)}); "
                            "the label file and the DICOM folder must describe the same images")
    if (label_split == "test").any():
        image = labels["image_id"].iloc[int(np.argmax((label_split == "test").to_numpy()))]
        path = metadata.loc[metadata["image_id"] == image, "path"].iloc[0]
        raise ContractError(
            f"{labels_csv}: labels for image {image} ({path}), which is in the test folder {test_dicom_dir}; "
            "test images must not be labeled here"
        )
    train_ids = metadata.loc[metadata["split"] == "train", "image_id"]
    unlabeled = ~ids_in(train_ids, labels["image_id"])
    if unlabeled.any():
        image = train_ids.iloc[int(np.argmax(unlabeled))]
        path = metadata.loc[metadata["image_id"] == image, "path"].iloc[0]
        raise ContractError(f"{labels_csv}: no labels for training image {image} ({path}); {int(unlabeled.sum())} training image(s) unlabeled")

    order = pd.Series(np.arange(len(train_ids)), index=train_ids.to_numpy())
    labels = labels.iloc[np.argsort(order.reindex(labels["image_id"]).to_numpy(), kind="stable")].reset_index(drop=True)
    labels = validate_labels(labels, f"{labels_csv}", metadata)
    return labels


def _why_not_found(image: str, metadata: pd.DataFrame, skipped, dicom_dir, image_id: str) -> str:
    """Why no readable file has id ``image``, naming the file where one has the name."""
    named = os.path.join(os.path.abspath(dicom_dir), f"{image}.dcm")
    readable = metadata.loc[metadata["path"] == named, "image_id"]
    if len(readable) and image_id == "sop":
        return (f"{named} is there, with SOPInstanceUID {readable.iloc[0]}: image ids come from --image-id sop; "
                "pass --image-id filename when the files are named by image id")
    reason = next((why for path, why in skipped if path == named), None)
    if reason is not None:
        return f"{named} was skipped: {reason}"
    rule = "file name" if image_id == "filename" else "SOPInstanceUID"
    more = f"; {len(skipped)} file(s) were skipped, see the warnings" if skipped else ""
    return f"no readable file has that {rule} and there is no {named}{more}"


def _prepare_summary(workdir: Workdir, metadata, labels, folds, n_folds: int, skipped, *, dropped_labels: int) -> PrepareResult:
    fold_studies = folds.merge(metadata[["image_id", "study_id"]], on="image_id").merge(labels[["image_id", "any"]], on="image_id")
    per_fold = fold_studies.groupby("fold").agg(images=("image_id", "size"), any_rate=("any", "mean"))
    return PrepareResult(
        metadata=workdir.metadata, labels=workdir.labels, folds=workdir.folds,
        train_images=int((metadata["split"] == "train").sum()), test_images=int((metadata["split"] == "test").sum()),
        patients=int(metadata["patient_id"].nunique()), studies=int(metadata["study_id"].nunique()), n_folds=int(n_folds),
        fold_images=per_fold["images"].astype(int).tolist(), fold_any_rate=[round(float(v), 4) for v in per_fold["any_rate"]],
        prevalence={label: round(float(labels[label].mean()), 4) for label in LABELS}, dropped_labels=int(dropped_labels),
        skipped=[(path, reason) for path, reason in skipped],
    )
