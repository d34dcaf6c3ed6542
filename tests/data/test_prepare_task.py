"""`data prepare --task`: the synthetic RSNA 2022 / RSNA 2023 datasets read back into a task work
directory's data/ at the schema's units (ids, counts and labels those of the synth), the
slice-level labels the competitions had, folds grouped by patient, and one-line refusals."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import Workdir
from stackkit.contract.records.task import read_task
from stackkit.contract.task_files import load_task_core
from stackkit.contract.tasks import get_task
from stackkit.contract.validate import read_folds, read_metadata, verify_data_file
from stackkit.data import synth_abdominal as abdominal
from stackkit.data import synth_cspine as cspine
from stackkit.data.prepare_task import prepare_task_data
from stackkit.data.synth import TEST_DIR, TRAIN_DIR
from stackkit.data.synth_tasks import synthesize_task
from stackkit.errors import ContractError, StackkitError
from stackkit.testing import dicom as h
from stackkit.testing.cli import one_line_error

pytest.importorskip("pydicom")

CSPINE, ABDOMINAL = cspine.TASK, abdominal.TASK


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("tasks")
    out = {}
    # seeds as test_synth_tasks': fractures, both image-level injuries and a patient with two series among the training units
    for task, patients, slices, seed in ((CSPINE, 10, (21, 24), 4), (ABDOMINAL, 12, (16, 20), 0)):
        summary = synthesize_task(task, base / task, patients=patients, size=32, slices=slices, seed=seed, progress=False)
        out[task] = (base / task, summary)
    return out


@pytest.fixture(scope="module")
def prepared(roots, tmp_path_factory) -> dict:
    return {task: (prepare_task_data(Workdir(tmp_path_factory.mktemp(task)), task=task, root=root, n_folds=3, progress=False,
                                     workers=1), root, summary) for task, (root, summary) in roots.items()}


def _work(result) -> Workdir:
    return Workdir(result.metadata.parent.parent)


@pytest.mark.parametrize("task", [CSPINE, ABDOMINAL])
def test_units_ids_and_labels_are_the_synths(prepared, task):
    result, root, summary = prepared[task]
    wd, schema = _work(result), get_task(task)
    assert read_task(wd) == schema
    metadata = read_metadata(wd)
    train = metadata["split"] == "train"
    assert int(train.sum()) == summary["train_images"] and int((~train).sum()) == summary["test_images"]
    labels = pd.read_parquet(wd.labels)
    train_csv = pd.read_csv(root / "train.csv", dtype={"StudyInstanceUID": str, "patient_id": str})
    unit_csv = "StudyInstanceUID" if task == CSPINE else "patient_id"
    assert list(labels.columns) == [schema.unit_column, *schema.labels]
    assert all(labels[c].dtype == np.int8 for c in schema.labels)
    expected = train_csv.rename(columns={unit_csv: schema.unit_column}).sort_values(schema.unit_column)
    pd.testing.assert_frame_equal(labels, expected[list(labels.columns)].astype({c: np.int8 for c in schema.labels})
                                  .reset_index(drop=True))
    # every slice under its unit's folder, the unit's id taken from it
    folder_unit = metadata["path"].map(lambda p: Path(p).relative_to(root).parts[1])
    assert (metadata[schema.unit_column] == folder_unit).all()
    assert set(metadata.loc[train, schema.unit_column]) == set(labels[schema.unit_column])
    assert metadata.loc[~train, schema.unit_column].nunique() == result.test_units == len(pd.read_csv(root / "test_labels.csv"))
    assert all(i.startswith(s + ".") for i, s in zip(metadata["image_id"], metadata["series_id"]))  # the SOPInstanceUID


def test_cspine_slice_labels_are_the_boxed_slices_of_each_vertebra_and_of_the_study(prepared):
    result, root, _ = prepared[CSPINE]
    wd = _work(result)
    metadata, slices = read_metadata(wd), pd.read_parquet(wd.slice_labels)
    assert list(slices.columns) == ["image_id", *cspine.VERTEBRAE, "patient_overall"]
    # every training study is decided here: the synth gives every one a segmentation and its boxes
    assert set(slices["image_id"]) == set(metadata.loc[metadata["split"] == "train", "image_id"])
    where = metadata.set_index("image_id")["path"].reindex(slices["image_id"]).map(lambda p: (Path(p).parent.name, int(Path(p).stem)))
    boxes = pd.read_csv(root / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    segmentation = pd.read_csv(root / "segmentations.csv", dtype={"StudyInstanceUID": str})
    vertebra = dict(zip(zip(segmentation["StudyInstanceUID"], segmentation["slice_number"]), segmentation["vertebra"]))
    boxed = set(zip(boxes["StudyInstanceUID"], boxes["slice_number"]))
    expected = np.array([[key in boxed and vertebra.get(key) == v for v in cspine.VERTEBRAE] for key in where], dtype=np.int8)
    np.testing.assert_array_equal(slices[list(cspine.VERTEBRAE)].to_numpy(), expected)
    assert slices[list(cspine.VERTEBRAE)].to_numpy().sum() == len(boxes) > 0
    np.testing.assert_array_equal(slices["patient_overall"], [key in boxed for key in where])


def test_abdominal_slice_labels_are_the_image_level_labels(prepared):
    result, root, _ = prepared[ABDOMINAL]
    wd = _work(result)
    metadata, slices = read_metadata(wd), pd.read_parquet(wd.slice_labels)
    assert list(slices.columns) == ["image_id", "bowel_injury", "extravasation_injury"]
    assert set(slices["image_id"]) == set(metadata.loc[metadata["split"] == "train", "image_id"])
    image = pd.read_csv(root / "image_level_labels.csv")
    path = metadata.set_index("image_id")["path"]
    for column, name in (("bowel_injury", "Bowel"), ("extravasation_injury", "Active_Extravasation")):
        positive = path.reindex(slices.loc[slices[column] == 1, "image_id"])
        listed = image[image["injury_name"] == name]
        assert sorted(Path(p).relative_to(root / "train_images").as_posix() for p in positive) == sorted(
            f"{p}/{s}/{n}.dcm" for p, s, n in listed[["patient_id", "series_id", "instance_number"]].itertuples(index=False))
        assert len(listed) > 0


def test_abdominal_study_is_the_series_ordered_by_z(prepared):
    result, root, _ = prepared[ABDOMINAL]
    metadata = read_metadata(_work(result))
    meta = pd.concat([pd.read_csv(root / "train_series_meta.csv"), pd.read_csv(root / "test_series_meta.csv")])
    assert sorted(metadata["study_id"].unique()) == sorted(meta["series_id"].astype(str))
    assert metadata.groupby("study_id")["patient_id"].nunique().eq(1).all()
    assert (metadata.groupby("patient_id")["study_id"].nunique() > 1).any()  # some patients have two series


@pytest.mark.parametrize("task", [CSPINE, ABDOMINAL])
def test_folds_cover_the_training_slices_grouped_by_patient(prepared, task):
    result, _, _ = prepared[task]
    wd = _work(result)
    metadata = read_metadata(wd)
    folds = read_folds(wd, metadata)
    assert set(folds["image_id"]) == set(metadata.loc[metadata["split"] == "train", "image_id"])
    per_patient = folds.merge(metadata, on="image_id").groupby("patient_id")["fold"].nunique()
    assert per_patient.eq(1).all() and sorted(folds["fold"].unique()) == [0, 1, 2]
    assert sum(result.fold_units) == result.train_units
    for path in (wd.metadata, wd.labels, wd.folds, wd.slice_labels, wd.task_record):
        verify_data_file(wd, path)  # listed in prepare.json and unchanged
    core = load_task_core(wd)  # what every command of a unit task reads: each file validated against the others
    assert len(core.labels) == result.train_units and len(core.slice_labels) == result.slice_labeled_images
    assert core.unit_folds["fold"].value_counts().sort_index().tolist() == result.fold_units


def test_the_same_data_gives_the_same_files(prepared, roots, tmp_path):
    result, root, _ = prepared[ABDOMINAL]
    again = prepare_task_data(Workdir(tmp_path), task=ABDOMINAL, root=root, n_folds=3, progress=False, workers=1)
    for path in (again.metadata, again.labels, again.folds):
        pd.testing.assert_frame_equal(pd.read_parquet(path).drop(columns="path", errors="ignore"),
                                      pd.read_parquet(_work(result).data_dir / path.name).drop(columns="path", errors="ignore"))


# --- refusals ----------------------------------------------------------------------------------------


def _drop_series(root: Path) -> None:
    meta = pd.read_csv(root / "train_series_meta.csv")
    shutil.rmtree(root / "train_images" / str(meta["patient_id"].iloc[0]) / str(meta["series_id"].iloc[0]))


def _box_of_unknown_study(root: Path) -> None:
    boxes = pd.read_csv(root / "train_bounding_boxes.csv", dtype=str)
    boxes.loc[0, "StudyInstanceUID"] = "1.2.3.4"
    boxes.to_csv(root / "train_bounding_boxes.csv", index=False)


def _image_label_of_unknown_patient(root: Path) -> None:
    image = pd.read_csv(root / "image_level_labels.csv")
    image.loc[0, "patient_id"] = 99
    image.to_csv(root / "image_level_labels.csv", index=False)


def _other_tasks_labels(root: Path) -> None:
    pd.DataFrame({c: [0] for c in abdominal.LABEL_COLUMNS}).to_csv(root / "train.csv", index=False)


REFUSALS = [
    (ABDOMINAL, _drop_series, r"train_series_meta\.csv: row 1 \(patient_id \d+, series_id \d+\) has no images: "
                              r"train_images/\d+/\d+ is missing or holds no \.dcm file"),
    (CSPINE, lambda root: shutil.rmtree(next((root / "train_images").iterdir())),
     r"train\.csv: row \d+ \(StudyInstanceUID [\d.]+\) has no images"),
    (CSPINE, _box_of_unknown_study, r"train_bounding_boxes\.csv: row 1 \(StudyInstanceUID 1\.2\.3\.4\) is not in train\.csv"),
    (ABDOMINAL, _image_label_of_unknown_patient, r"image_level_labels\.csv: row 1 \(patient_id 99, series_id \d+\) is not in "
                                                 r"train_series_meta\.csv"),
    (CSPINE, _other_tasks_labels, r"train\.csv: a label file of task rsna2023-abdominal"),
]


@pytest.mark.parametrize("task, damage, message", REFUSALS, ids=["missing-series", "missing-study", "unknown-study-box",
                                                                 "unknown-patient-image", "other-task"])
def test_a_broken_dataset_is_one_line_and_writes_nothing(roots, tmp_path, task, damage, message):
    root = h.copy_dataset(roots[task][0], tmp_path / "data")
    damage(root)
    wd = Workdir(tmp_path / "work")
    with pytest.raises(ContractError, match=message):
        prepare_task_data(wd, task=task, root=root, n_folds=3, progress=False, workers=1)
    assert not wd.root.exists()
    result = CliRunner().invoke(cli, ["data", "prepare", "--workdir", str(wd.root), "--task", task, "--root", str(root),
                                      "--folds", "3", "-q", "--workers", "1"])
    assert result.exit_code == 2
    assert len(one_line_error(result)) < 400


@pytest.mark.parametrize("args, message", [
    (["--task", "rsna2024-lumbar", "--root", "."], r"unknown task 'rsna2024-lumbar'; known tasks: rsna2019, rsna2022-cspine"),
    (["--task", "rsna2019", "--root", "."], r"--task rsna2019: prepare it from its DICOM folders"),
    (["--task", CSPINE], r"--task needs --root"),
    (["--task", CSPINE, "--root", ".", "--labels", "x.csv"], r"--labels are for RSNA 2019"),
    (["--root", "."], r"--root goes with --task"),
])
def test_bad_task_options_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["data", "prepare", "--workdir", str(tmp_path / "w"), *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, one_line_error(result)), result.output


def test_unknown_task_is_refused_by_the_library(tmp_path):
    with pytest.raises(ContractError, match=r"unknown task 'cspine'"):
        prepare_task_data(Workdir(tmp_path), task="cspine", root=tmp_path)
    with pytest.raises(StackkitError, match=r"--folds 1: need at least 2 folds"):
        prepare_task_data(Workdir(tmp_path), task=CSPINE, root=tmp_path, n_folds=1)


def test_an_unreadable_file_is_skipped_with_its_slice_label_or_refused_with_strict(roots, tmp_path):
    root = h.copy_dataset(roots[ABDOMINAL][0], tmp_path / "data")
    image = pd.read_csv(root / "image_level_labels.csv").iloc[0]
    broken = root / "train_images" / str(image["patient_id"]) / str(image["series_id"]) / f"{image['instance_number']}.dcm"
    h.not_dicom(broken)
    with pytest.raises(StackkitError, match=rf"{broken}: not a DICOM Part 10 file .*--strict"):
        prepare_task_data(Workdir(tmp_path / "strict"), task=ABDOMINAL, root=root, n_folds=3, progress=False, strict=True, workers=1)
    with pytest.warns(UserWarning, match="skipped unreadable DICOM"):
        result = prepare_task_data(Workdir(tmp_path / "w"), task=ABDOMINAL, root=root, n_folds=3, progress=False, workers=1)
    assert result.skipped[0][0] == str(broken)
    assert result.train_images == roots[ABDOMINAL][1]["train_images"] - 1
    metadata = pd.read_parquet(result.metadata)
    assert str(broken) not in set(metadata["path"])
    assert len(pd.read_parquet(_work(result).slice_labels)) == result.train_images


def test_rsna2019_prepare_after_a_task_leaves_no_task_record(roots, tmp_path):
    wd = Workdir(tmp_path / "work")
    prepare_task_data(wd, task=CSPINE, root=roots[CSPINE][0], n_folds=3, progress=False, workers=1)
    source = h.small_dicom_dataset(tmp_path / "rsna", patients=6)
    result = CliRunner().invoke(cli, ["data", "prepare", "--workdir", str(wd.root), "--dicom-dir", str(source.out_dir / TRAIN_DIR),
                                      "--test-dicom-dir", str(source.out_dir / TEST_DIR), "--labels", str(source.labels_csv), "--folds", "3",
                                      "-q", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert not wd.task_record.exists() and not wd.slice_labels.exists()
    assert read_task(wd).name == "rsna2019"
