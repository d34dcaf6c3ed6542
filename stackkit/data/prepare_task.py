"""``data prepare --task``: an RSNA 2022 Cervical Spine or RSNA 2023 Abdominal Trauma dataset, in
the competition's layout, -> a task work directory's ``data/`` set (contract v5).

The label files are read and checked against the image folders by
:func:`stackkit.data.task_labels.read_task_labels`; the DICOM headers by the reader `data prepare`
uses for RSNA 2019 (no pixels decoded; the image id is the SOPInstanceUID). The ids come from the
folders, as the competitions name them in their CSV files: 2022 ``<study>/<slice>.dcm``, the unit
and ``study_id`` the study (one per patient); 2023 ``<patient>/<series>/<slice>.dcm``, the unit the
patient and ``study_id`` the series (the slices of a series are ordered by z).

Written as one set, like RSNA 2019's (nothing unless every check passes): ``metadata.parquet``
(every slice), ``labels.parquet`` (one row per training unit), ``slice_labels.parquet`` (the
competition's slice-level labels as prediction columns, for the training slices they decide),
``folds.parquet`` (every training slice; a patient's slices in one fold, stratified on the unit's
any-injury), ``task.json`` and ``prepare.json`` with the sha256 of each.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import Workdir
from stackkit.contract.io import check_set_target
from stackkit.contract.tasks import TaskSchema, get_task
from stackkit.contract.validate import validate_folds
from stackkit.data import synth_abdominal as abdominal
from stackkit.data import synth_cspine as cspine
from stackkit.data.prepare import ScanOptions, grouped_folds, metadata_from_headers, modalities_option, report_skipped, write_data_set
from stackkit.data.synth_ct import TEST_IMAGES, TRAIN_IMAGES
from stackkit.data.task_labels import TaskLabels, image_files, read_task_labels
from stackkit.errors import ContractError, StackkitError

# task -> folder levels above each .dcm file (2022 <study>/, 2023 <patient>/<series>/)
DEPTH = {cspine.TASK: 1, abdominal.TASK: 2}


@dataclass(frozen=True, kw_only=True)
class TaskPrepareOptions(ScanOptions):
    """What `data prepare --task` is asked for: :func:`prepare_task_data`'s keywords."""

    task: str
    root: str | os.PathLike


@dataclass(frozen=True)
class TaskPrepareResult:
    """What one `data prepare --task` wrote (stackkit/cli.py renders its scalar fields)."""

    task: str
    metadata: Path
    labels: Path
    folds: Path
    train_images: int
    test_images: int
    train_units: int
    test_units: int
    series: int
    n_folds: int
    slice_labeled_images: int  # training slices with a row in data/slice_labels.parquet
    fold_units: list  # per fold: its training units
    skipped: list  # (file, reason) of every DICOM file skipped


def prepare_task_data(workdir: Workdir, options: TaskPrepareOptions | None = None, **fields) -> TaskPrepareResult:
    """Read ``root`` (a ``task`` dataset), check everything, then write data/ as one set.

    Unreadable DICOM files are skipped with a warning (``strict``: the first is an error), and
    their slice-level labels with them; a training unit left without a slice is an error."""
    from stackkit.data.dicom import scan_headers

    o = TaskPrepareOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    workdir = Workdir.of(workdir)
    schema = get_task(o.task)
    if o.task not in DEPTH:
        raise StackkitError(f"--task {o.task}: prepare it from its DICOM folders and label CSV "
                            "(--dicom-dir, --test-dicom-dir, --labels) without --task")
    if int(o.n_folds) < 2:
        raise StackkitError(f"--folds {o.n_folds}: need at least 2 folds")
    check_set_target(workdir.data_dir)  # before the scan: a long run must not end on this
    found = read_task_labels(o.task, o.root)
    files = _dataset_files(Path(o.root), found, DEPTH[o.task])
    modalities = modalities_option(o.modalities)
    headers, skipped = scan_headers(files["path"].tolist(), workers=o.workers, progress=o.progress, modalities=modalities)
    report_skipped(skipped, o.strict)
    metadata = _task_metadata(headers, files, o.root)
    labels = _unit_labels(found, metadata, schema, Path(o.root))
    slice_labels = SLICE_LABELS[o.task](found, files, metadata, labels)
    folds = task_folds(metadata, labels, schema, o.n_folds, o.seed)
    folds = validate_folds(folds, "data prepare (folds)", metadata)

    record = {"task": o.task, "root": str(Path(o.root).resolve()), "train_files": int((files["split"] == "train").sum()),
              "test_files": int((files["split"] == "test").sum()), "image_id": "sop", "modalities": list(modalities),
              "skipped": [{"path": path, "reason": reason} for path, reason in skipped]}
    tables = {workdir.metadata: metadata, workdir.labels: labels, workdir.folds: folds}
    if slice_labels is not None:
        tables[workdir.slice_labels] = slice_labels
    write_data_set(workdir, tables, record, task=o.task)
    return _summary(workdir, o, metadata, labels, folds, slice_labels, skipped)


# --- files and metadata ---------------------------------------------------------------------------


def _dataset_files(root: Path, found: TaskLabels, depth: int) -> pd.DataFrame:
    """Every image of both splits: path, folder (as ``found.series`` names it), number (the file's stem),
    split, the unit's id and series_id (from ``found.series``, which read_task_labels matched to the folders)."""
    frames = []
    for images in (TRAIN_IMAGES, TEST_IMAGES):
        listed = image_files(root / images, depth)
        listed["folder"] = images + "/" + listed["folder"]
        frames.append(listed)
    files = pd.concat(frames, ignore_index=True)
    series = found.series.rename(columns={found.series.columns[0]: "unit"})[["unit", "series_id", "split", "folder"]]
    files = files.merge(series, on="folder", how="inner", validate="many_to_one")
    files["path"] = [os.path.join(os.path.abspath(root), folder, f"{number}.dcm")
                     for folder, number in zip(files["folder"], files["number"])]
    return files.astype({"unit": str, "series_id": str}).reset_index(drop=True)


def _task_metadata(headers: pd.DataFrame, files: pd.DataFrame, root) -> pd.DataFrame:
    """data/metadata.parquet: the headers with patient and study taken from the folders (the ids of
    the label files): the unit is the patient, ``study_id`` its series (2022: the study itself)."""
    where = files.set_index("path").reindex(headers["path"])
    headers["patient_id"] = where["unit"].to_numpy(dtype=object)
    headers["study_id"] = where["series_id"].to_numpy(dtype=object)
    train = set(files.loc[files["split"] == "train", "path"])
    return metadata_from_headers(headers, train, Path(root) / TRAIN_IMAGES)


def _unit_labels(found: TaskLabels, metadata: pd.DataFrame, schema: TaskSchema, root: Path) -> pd.DataFrame:
    """data/labels.parquet: the training units' labels, every unit with a readable slice."""
    labels, unit = found.labels, schema.unit_column
    have = metadata.loc[metadata["split"] == "train", unit].unique()
    empty = ~labels[unit].isin(have).to_numpy()
    if empty.any():
        raise ContractError(f"{root / TRAIN_IMAGES}: every image of {unit} {labels[unit].iloc[int(np.argmax(empty))]} was "
                            "skipped as unreadable; fix or remove its files and its rows in the label files")
    return labels.sort_values(unit, kind="stable").reset_index(drop=True)


def task_folds(metadata: pd.DataFrame, labels: pd.DataFrame, schema: TaskSchema, n_folds: int, seed: int) -> pd.DataFrame:
    """``image_id``, ``fold`` of every training slice, in image_id order: grouped by patient,
    stratified on the unit's any-injury (the max over the groups of the injury indicators)."""
    unit = schema.unit_column
    injured = [labels[g.name] if g.kind == "binary" else 1 - labels[g.classes[0]] for g in schema.groups]
    any_injury = pd.Series(np.max(np.column_stack(injured), axis=1), index=labels[unit].to_numpy())
    train = metadata.loc[metadata["split"] == "train", list(dict.fromkeys(["image_id", "patient_id", unit]))]
    train = train.sort_values("image_id", kind="stable").reset_index(drop=True)
    return grouped_folds(train["image_id"], train["patient_id"], any_injury.reindex(train[unit]).to_numpy(), n_folds, seed)


# --- slice-level labels ---------------------------------------------------------------------------


def _train_slices(files: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """The readable training slices: image_id, unit, folder and the file's number (a string, as folders name it)."""
    ids = metadata.set_index("path")["image_id"]
    train = files.loc[files["split"] == "train"].copy()
    train["image_id"] = ids.reindex(train["path"]).to_numpy(dtype=object)
    return train.loc[train["image_id"].notna(), ["image_id", "unit", "folder", "number"]].reset_index(drop=True)


def _slice_table(slices: pd.DataFrame, values: dict) -> pd.DataFrame:
    out = pd.DataFrame({"image_id": slices["image_id"].to_numpy(dtype=object)})
    for column, value in values.items():
        out[column] = np.asarray(value, dtype=np.int8)
    return out.sort_values("image_id", kind="stable").reset_index(drop=True)


def _cspine_slice_labels(found: TaskLabels, files, metadata, labels) -> pd.DataFrame | None:
    """C1..C7 per slice: 1 where the slice's fracture box lies on that vertebra (segmentation), and
    patient_overall: 1 on a boxed slice. Decided for the healthy studies (every slice 0) and for the
    fractured ones with both a segmentation and boxes."""
    slices = _train_slices(files, metadata)
    where = TRAIN_IMAGES + "/" + found.slice_labels["study_id"] + "/" + found.slice_labels["slice_number"].astype(str)
    vertebra = pd.Series(found.slice_labels["vertebra"].to_numpy(), index=where.to_numpy())
    boxed = set(TRAIN_IMAGES + "/" + found.boxes["study_id"] + "/" + found.boxes["slice_number"].astype(str))
    key = slices["folder"] + "/" + slices["number"]
    healthy = set(labels.loc[labels["patient_overall"] == 0, "study_id"])
    decided = (set(found.slice_labels["study_id"]) & set(found.boxes["study_id"])) | healthy
    keep = slices["unit"].isin(decided).to_numpy()
    level = vertebra.reindex(key).to_numpy(dtype=object)[keep]
    fractured = key.isin(boxed).to_numpy()[keep]
    # a box marks a slice showing a fracture: the slice's own patient_overall, on whichever vertebra
    values = {**{v: fractured & (level == v) for v in cspine.VERTEBRAE}, "patient_overall": fractured}
    table = _slice_table(slices.loc[keep], values)
    return table if len(table) else None


def _abdominal_slice_labels(found: TaskLabels, files, metadata, labels) -> pd.DataFrame | None:
    """bowel_injury and extravasation_injury per slice: 1 on the images image_level_labels.csv lists.
    Decided for a patient when each injury is either absent or has its images listed."""
    slices = _train_slices(files, metadata)
    image = found.slice_labels
    where = (TRAIN_IMAGES + "/" + image["patient_id"] + "/" + image["series_id"] + "/" + image["instance_number"].astype(str))
    key = (slices["folder"] + "/" + slices["number"]).to_numpy(dtype=object)
    values, decided = {}, np.ones(len(slices), dtype=bool)
    for group, name in abdominal.INJURY_NAMES.items():
        column = f"{group}_injury"
        listed = image["patient_id"][image["injury_name"] == name]
        known = labels.loc[(labels[column] == 0) | labels["patient_id"].isin(listed), "patient_id"]
        decided &= slices["unit"].isin(known).to_numpy()
        values[column] = np.isin(key, where[image["injury_name"] == name].to_numpy(dtype=object))
    table = _slice_table(slices.loc[decided], {c: v[decided] for c, v in values.items()})
    return table if len(table) else None


SLICE_LABELS = {cspine.TASK: _cspine_slice_labels, abdominal.TASK: _abdominal_slice_labels}


def _summary(workdir: Workdir, o: TaskPrepareOptions, metadata, labels, folds, slice_labels, skipped) -> TaskPrepareResult:
    train = metadata["split"] == "train"
    fold_units = folds.merge(metadata[["image_id", "patient_id"]], on="image_id").groupby("fold")["patient_id"].nunique()
    return TaskPrepareResult(
        task=o.task, metadata=workdir.metadata, labels=workdir.labels, folds=workdir.folds,
        train_images=int(train.sum()), test_images=int((~train).sum()), train_units=len(labels),
        test_units=int(metadata.loc[~train, "patient_id"].nunique()), series=int(metadata["study_id"].nunique()),
        n_folds=int(o.n_folds), slice_labeled_images=0 if slice_labels is None else len(slice_labels),
        fold_units=fold_units.astype(int).tolist(), skipped=list(skipped),
    )


def prepare_any(workdir: Workdir, *, task=None, root=None, dicom_dir=None, test_dicom_dir=None, labels_csv=None, image_id="sop",
                **common):
    """`data prepare`'s options checked and dispatched: ``task`` and ``root`` to :func:`prepare_task_data`,
    RSNA 2019's folders and label file to :func:`stackkit.data.prepare.prepare_data`; ``common``: the
    options both take (n_folds, seed, strict, workers, progress, modalities)."""
    given = [f"--{n}" for n, v in (("dicom-dir", dicom_dir), ("test-dicom-dir", test_dicom_dir), ("labels", labels_csv)) if v]
    if task is None:
        if root is not None:
            raise StackkitError("--root goes with --task; RSNA 2019 takes --dicom-dir, --test-dicom-dir and --labels")
        if len(given) < 3:
            raise StackkitError("RSNA 2019 needs --dicom-dir, --test-dicom-dir and --labels (or --task NAME --root DIR)")
        from stackkit.data.prepare import prepare_data

        return prepare_data(workdir, dicom_dir=dicom_dir, test_dicom_dir=test_dicom_dir, labels_csv=labels_csv, image_id=image_id,
                            **common)
    if given:
        raise StackkitError(f"--task reads its files under --root; {', '.join(given)} are for RSNA 2019 (without --task)")
    if root is None:
        raise StackkitError("--task needs --root, the dataset's folder")
    if image_id != "sop":
        raise StackkitError("--task: image ids are the files' SOPInstanceUIDs (--image-id sop)")
    return prepare_task_data(workdir, task=task, root=root, **common)
