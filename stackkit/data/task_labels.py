"""The label files of the RSNA 2022 Cervical Spine and RSNA 2023 Abdominal Trauma datasets, read
into frames at the task schema's unit and checked against the image folders.

``read_task_labels(task, root)`` reads the competition's files under ``root`` (as Kaggle gives
them, or as ``stackkit.data.synth_cspine`` / ``synth_abdominal`` write them) and returns
:class:`TaskLabels`. Every problem is one :class:`ContractError` line naming the file and the
row or column: a file missing or of the other task, a column missing, a value that is not 0/1, a
group with not exactly one class, a derived label (``patient_overall``, ``any_injury``) that
disagrees with its parts, a study or series without its images folder (or a folder without a
row), a slice-level label for a study or series the study labels do not have, or for an image
that is not there. The held-back ``test_labels.csv`` is never read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract.tasks import get_task
from stackkit.data import synth_abdominal as abdominal
from stackkit.data import synth_cspine as cspine
from stackkit.data.synth_ct import TEST_IMAGES, TRAIN_CSV, TRAIN_IMAGES
from stackkit.errors import ContractError, one_line

# task -> file -> its columns: what each reader expects, and how a file of another task is recognised.
FILES = {
    cspine.TASK: {TRAIN_CSV: cspine.LABEL_COLUMNS, cspine.BOXES_CSV: cspine.BOX_COLUMNS,
                  cspine.SEGMENTATIONS_CSV: cspine.SEGMENTATION_COLUMNS, cspine.TEST_CSV: cspine.TEST_COLUMNS},
    abdominal.TASK: {TRAIN_CSV: abdominal.LABEL_COLUMNS, abdominal.SERIES_META_CSV: abdominal.SERIES_META_COLUMNS,
                     abdominal.TEST_SERIES_META_CSV: abdominal.SERIES_META_COLUMNS[:3],
                     abdominal.IMAGE_LABELS_CSV: abdominal.IMAGE_LABEL_COLUMNS},
    "rsna2019": {"stage_2_train.csv": ("ID", "Label")},
}
_ID_COLUMNS = {"StudyInstanceUID": str, "patient_id": str, "series_id": str, "row_id": str}


@dataclass(frozen=True)
class TaskLabels:
    """``labels``: one row per training unit, the schema's unit column (``study_id`` or
    ``patient_id``) then its predicted labels in schema order. ``series``: one row per series
    folder of both splits: the unit, ``series_id``, ``split``, ``folder`` (relative to the root),
    ``images`` (its .dcm count), and for rsna2023-abdominal ``aortic_hu`` and ``incomplete_organ``
    (NaN in the test split). ``slice_labels``: 2022 the vertebra per slice (``study_id``,
    ``slice_number``, ``vertebra``), 2023 the image-level injuries (``patient_id``, ``series_id``,
    ``instance_number``, ``injury_name``). ``boxes``: 2022 the fracture boxes, None for 2023."""

    task: str
    labels: pd.DataFrame
    series: pd.DataFrame
    slice_labels: pd.DataFrame
    boxes: pd.DataFrame | None = None


def read_task_labels(task: str, root) -> TaskLabels:
    schema = get_task(task)
    if task not in (cspine.TASK, abdominal.TASK):
        raise ContractError(f"task {task!r}: its labels are read by data prepare (--labels), not by read_task_labels")
    root = Path(root)
    if not root.is_dir():
        raise ContractError(f"{root}: no such folder; expected a {task} dataset (train.csv, train_images/, ...)")
    labels, series, slice_labels, boxes = (_read_cspine if task == cspine.TASK else _read_abdominal)(root)
    labels = labels.rename(columns={"StudyInstanceUID": "study_id"})
    labels = labels[[schema.unit_column, *schema.labels]].astype({c: np.int8 for c in schema.labels})
    return TaskLabels(task, labels.reset_index(drop=True), series, slice_labels, boxes)


# --- checks shared by both tasks --------------------------------------------------------------


def _read_csv(root: Path, name: str, task: str) -> pd.DataFrame:
    path = root / name
    if not path.is_file():
        raise ContractError(f"{path}: missing; a {task} dataset has {name}")
    try:
        frame = pd.read_csv(path, dtype=_ID_COLUMNS)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise ContractError(f"{path}: not a readable CSV ({one_line(exc, 100)})") from None
    expected = FILES[task][name]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        for other, files in FILES.items():
            match = next((f for f, columns in files.items() if other != task and set(columns) <= set(frame.columns)), None)
            if match:
                raise ContractError(f"{path}: a label file of task {other} (the columns of its {match}); "
                                    f"task {task}'s {name} has columns {', '.join(expected)}")
        raise ContractError(f"{path}: no column {missing[0]!r}; task {task}'s {name} has columns {', '.join(expected)}")
    return frame


def _at(frame: pd.DataFrame, pos: int, keys) -> str:
    """``row 3 (patient_id 10004, series_id 21057)``: a data row (1-based) and its ids."""
    # the frame's own index: the file's data row, also after rows were filtered out
    return f"row {frame.index[pos] + 1} (" + ", ".join(f"{k} {frame[k].iloc[pos]}" for k in keys) + ")"


def _refuse_first(bad, frame: pd.DataFrame, path: Path, keys, problem: str) -> None:
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        raise ContractError(f"{path}: {_at(frame, int(np.argmax(bad)), keys)} {problem}")


def _integers(frame: pd.DataFrame, columns, path: Path, keys, allowed=None) -> pd.DataFrame:
    """``columns`` as int64, each value an integer (in ``allowed`` where given)."""
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values != np.round(values))
        if allowed is not None:
            bad |= ~np.isin(values, allowed)
        expected = " or ".join(map(str, allowed)) if allowed is not None else "an integer"
        if bad.any():
            pos = int(np.argmax(bad))
            value = frame[column].iloc[pos]
            value = value.item() if isinstance(value, np.generic) else value  # 2, not np.int64(2)
            raise ContractError(f"{path}: {_at(frame, pos, keys)}: {column!r} is {one_line(repr(value), 40)}; expected {expected}")
        frame[column] = values.astype(np.int64)
    return frame


def _unique(frame: pd.DataFrame, path: Path, keys) -> None:
    _refuse_first(frame.duplicated(list(keys)), frame, path, keys, "repeats an earlier row")


def _key(frame: pd.DataFrame, columns) -> pd.Series:
    """One string per row joining ``columns`` with '/', as the folders nest."""
    out = frame[columns[0]].astype(str)
    for column in columns[1:]:
        out = out + "/" + frame[column].astype(str)
    return out


def image_files(folder: Path, depth: int) -> pd.DataFrame:
    """Every ``<unit>[/<series>]/<number>.dcm`` under ``folder``: columns folder (``unit[/series]``), number."""
    pattern = "/".join(["*"] * depth + ["*.dcm"])
    paths = [p.relative_to(folder).as_posix() for p in folder.glob(pattern)] if folder.is_dir() else []
    parts = pd.Series(sorted(paths), dtype=object).str.rsplit("/", n=1)
    return pd.DataFrame({"folder": parts.str[0], "number": parts.str[1].str[:-4]}, dtype=object)


def _check_folders(listed: pd.Series, files: pd.DataFrame, root: Path, images: str, frame, path: Path, keys) -> None:
    """Each listed folder (``listed``, one per row of ``frame``) holds images, and each folder with images is listed."""
    absent = ~listed.isin(files["folder"]).to_numpy()
    if absent.any():
        pos = int(np.argmax(absent))
        raise ContractError(f"{path}: {_at(frame, pos, keys)} has no images: {images}/{listed.iloc[pos]} "
                            "is missing or holds no .dcm file")
    extra = files.loc[~files["folder"].isin(listed), "folder"]
    if len(extra):
        raise ContractError(f"{root / images / extra.iloc[0]}: a folder of images with no row in {path.name}")


def _check_known(frame: pd.DataFrame, key: pd.Series, known: pd.Series, path: Path, keys, where: str) -> None:
    _refuse_first(~key.isin(known).to_numpy(), frame, path, keys, f"is not in {where}")


def _check_images(frame: pd.DataFrame, folder: pd.Series, number: pd.Series, files, path, keys, images: str) -> None:
    """Each row's image ``<folder>/<number>.dcm`` exists."""
    wanted = folder + "/" + number.astype(str)
    missing = ~wanted.isin(files["folder"] + "/" + files["number"]).to_numpy()
    if missing.any():
        pos = int(np.argmax(missing))
        raise ContractError(f"{path}: {_at(frame, pos, keys)}: no image {images}/{wanted.iloc[pos]}.dcm")


def _series_frame(unit: str, listed: pd.DataFrame, split: str, images: str, files: pd.DataFrame) -> pd.DataFrame:
    counts = files["folder"].value_counts()
    out = listed.copy()
    folder = out.pop("_folder")
    out["split"], out["folder"] = split, images + "/" + folder
    out["images"] = counts.reindex(folder).to_numpy(dtype=np.int64)
    return out.rename(columns={"StudyInstanceUID": unit})


# --- rsna2022-cspine ----------------------------------------------------------------------------


def _read_cspine(root: Path):
    task, keys = cspine.TASK, ("StudyInstanceUID",)
    path = root / TRAIN_CSV
    labels = _read_csv(root, TRAIN_CSV, task)
    _unique(labels, path, keys)
    labels = _integers(labels, cspine.LABEL_COLUMNS[1:], path, keys, allowed=(0, 1))
    _refuse_first(labels["patient_overall"] != labels[list(cspine.VERTEBRAE)].max(axis=1), labels, path, keys,
                  "has patient_overall unlike its vertebrae; patient_overall is the max of C1..C7")
    train, test = image_files(root / TRAIN_IMAGES, 1), image_files(root / TEST_IMAGES, 1)
    _check_folders(labels["StudyInstanceUID"], train, root, TRAIN_IMAGES, labels, path, keys)
    tests = _read_csv(root, cspine.TEST_CSV, task)
    studies = tests.drop_duplicates("StudyInstanceUID")
    _check_folders(studies["StudyInstanceUID"], test, root, TEST_IMAGES, studies, root / cspine.TEST_CSV, keys)
    segmentation = _slice_file(root, cspine.SEGMENTATIONS_CSV, labels, train)
    _refuse_first(~segmentation["vertebra"].isin(cspine.VERTEBRAE), segmentation, root / cspine.SEGMENTATIONS_CSV,
                  ("StudyInstanceUID", "slice_number"), f"has vertebra not one of {', '.join(cspine.VERTEBRAE)}")
    boxes = _integers(_slice_file(root, cspine.BOXES_CSV, labels, train), ("x", "y", "width", "height"),
                      root / cspine.BOXES_CSV, keys)
    healthy = labels.loc[labels["patient_overall"] == 0, "StudyInstanceUID"]
    _refuse_first(boxes["StudyInstanceUID"].isin(healthy), boxes, root / cspine.BOXES_CSV, ("StudyInstanceUID", "slice_number"),
                  f"boxes a fracture of a study whose patient_overall is 0 in {TRAIN_CSV}")
    listed = [frame[["StudyInstanceUID"]].assign(series_id=frame["StudyInstanceUID"], _folder=frame["StudyInstanceUID"])
              for frame in (labels, studies)]
    series = pd.concat([_series_frame("study_id", listed[0], "train", TRAIN_IMAGES, train),
                        _series_frame("study_id", listed[1], "test", TEST_IMAGES, test)], ignore_index=True)
    rename = {"StudyInstanceUID": "study_id"}
    return (labels, series, segmentation.rename(columns=rename).reset_index(drop=True),
            boxes.rename(columns=rename)[["study_id", "slice_number", "x", "y", "width", "height"]].reset_index(drop=True))


def _slice_file(root: Path, name: str, labels: pd.DataFrame, files: pd.DataFrame) -> pd.DataFrame:
    """A 2022 per-slice file: its studies in train.csv, its slice numbers files of theirs."""
    path, keys = root / name, ("StudyInstanceUID", "slice_number")
    frame = _read_csv(root, name, cspine.TASK)
    _check_known(frame, frame["StudyInstanceUID"], labels["StudyInstanceUID"], path, keys[:1], f"{TRAIN_CSV}")
    frame = _integers(frame, ("slice_number",), path, keys)
    _check_images(frame, frame["StudyInstanceUID"], frame["slice_number"], files, path, keys, TRAIN_IMAGES)
    return frame


# --- rsna2023-abdominal -------------------------------------------------------------------------


def _read_abdominal(root: Path):
    task, keys, series_keys = abdominal.TASK, ("patient_id",), ("patient_id", "series_id")
    path = root / TRAIN_CSV
    labels = _read_csv(root, TRAIN_CSV, task)
    _unique(labels, path, keys)
    labels = _integers(labels, abdominal.LABEL_COLUMNS[1:], path, keys, allowed=(0, 1))
    schema = get_task(task)
    for group in (g for g in schema.groups if g.kind == "softmax"):
        _refuse_first(labels[list(group.classes)].sum(axis=1) != 1, labels, path, keys,
                      f"has not exactly one of {', '.join(group.classes)} set to 1")
    healthy = [g.classes[0] for g in schema.groups]
    _refuse_first(labels["any_injury"] != 1 - labels[healthy].min(axis=1), labels, path, keys,
                  "has any_injury unlike its groups; any_injury is 1 where any group is not healthy")
    meta = _series_meta(root, abdominal.SERIES_META_CSV, labels, keys)
    test_meta = _series_meta(root, abdominal.TEST_SERIES_META_CSV, None, keys)
    train, test = image_files(root / TRAIN_IMAGES, 2), image_files(root / TEST_IMAGES, 2)
    for frame, files, images, name in ((meta, train, TRAIN_IMAGES, abdominal.SERIES_META_CSV),
                                       (test_meta, test, TEST_IMAGES, abdominal.TEST_SERIES_META_CSV)):
        _check_folders(_key(frame, series_keys), files, root, images, frame, root / name, series_keys)
    image_labels = _image_labels(root, labels, meta, train)
    series = pd.concat([_series_frame("patient_id", frame.assign(_folder=_key(frame, series_keys)), split, images, files)
                        for frame, split, images, files in ((meta, "train", TRAIN_IMAGES, train),
                                                            (test_meta, "test", TEST_IMAGES, test))], ignore_index=True)
    return labels, series, image_labels.reset_index(drop=True), None


def _series_meta(root: Path, name: str, labels: pd.DataFrame | None, keys) -> pd.DataFrame:
    """A series meta file: (patient, series) once, aortic_hu a number; for train, incomplete_organ 0/1,
    every patient of train.csv with a series and every series's patient in train.csv."""
    path, series_keys = root / name, ("patient_id", "series_id")
    frame = _read_csv(root, name, abdominal.TASK)
    _unique(frame, path, series_keys)
    aortic = pd.to_numeric(frame["aortic_hu"], errors="coerce")
    _refuse_first(~np.isfinite(aortic.to_numpy(dtype=np.float64)), frame, path, series_keys, "has aortic_hu that is not a number")
    frame["aortic_hu"] = aortic.astype(np.float64)
    if labels is None:
        return frame.assign(incomplete_organ=np.nan)
    frame = _integers(frame, ("incomplete_organ",), path, series_keys, allowed=(0, 1))
    _check_known(frame, frame["patient_id"], labels["patient_id"], path, series_keys, TRAIN_CSV)
    _refuse_first(~labels["patient_id"].isin(frame["patient_id"]).to_numpy(), labels, root / TRAIN_CSV, keys,
                  f"has no series in {name}")
    return frame


def _image_labels(root: Path, labels: pd.DataFrame, meta: pd.DataFrame, files: pd.DataFrame) -> pd.DataFrame:
    name = abdominal.IMAGE_LABELS_CSV
    path, keys = root / name, ("patient_id", "series_id", "instance_number")
    frame = _read_csv(root, name, abdominal.TASK)
    series = _key(frame, keys[:2])
    _check_known(frame, series, _key(meta, keys[:2]), path, keys[:2], abdominal.SERIES_META_CSV)
    frame = _integers(frame, ("instance_number",), path, keys)
    _check_images(frame, series, frame["instance_number"], files, path, keys, TRAIN_IMAGES)
    names = {v: k for k, v in abdominal.INJURY_NAMES.items()}
    _refuse_first(~frame["injury_name"].isin(names), frame, path, keys, f"has injury_name not one of {', '.join(names)}")
    groups = list(abdominal.INJURY_NAMES)
    injured = labels.set_index("patient_id")[[f"{g}_injury" for g in groups]].reindex(frame["patient_id"]).to_numpy()
    which = frame["injury_name"].map(names).map(groups.index).to_numpy(dtype=np.int64)
    _refuse_first(injured[np.arange(len(frame)), which] == 0, frame, path, keys,
                  f"marks an injury its patient does not have in {TRAIN_CSV}")
    return frame
