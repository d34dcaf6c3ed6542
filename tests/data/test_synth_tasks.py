"""Synthetic RSNA 2022 Cervical Spine and RSNA 2023 Abdominal Trauma datasets: real DICOM files in
each competition's layout, exact CSV columns, slice-level labels consistent with the study labels,
determinism, and read_task_labels with its one-line errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stackkit.contract.tasks import get_task, schema_metric
from stackkit.data import synth_abdominal as abdominal
from stackkit.data import synth_cspine as cspine
from stackkit.data.dicom import read_header
from stackkit.data.synth_tasks import synthesize_task
from stackkit.data.task_labels import read_task_labels
from stackkit.errors import ContractError, StackkitError

pydicom = pytest.importorskip("pydicom")

CSPINE, ABDOMINAL = cspine.TASK, abdominal.TASK
ORGAN_COLUMNS = [f"{o}_{g}" for o in ("kidney", "liver", "spleen") for g in ("healthy", "low", "high")]
ABDOMINAL_LABELS = ["patient_id", "bowel_healthy", "bowel_injury", "extravasation_healthy", "extravasation_injury",
                    *ORGAN_COLUMNS, "any_injury"]


@pytest.fixture(scope="module")
def cspine_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cspine") / "data"
    synthesize_task(CSPINE, root, patients=10, size=32, slices=(21, 25), seed=4, progress=False)
    return root


@pytest.fixture(scope="module")
def abdominal_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("abdominal") / "data"
    # seed 0: both image-level injuries, every organ grade and an incomplete series among the training patients
    synthesize_task(ABDOMINAL, root, patients=12, size=32, slices=(16, 20), seed=0, progress=False)
    return root


def _hu(ds) -> np.ndarray:
    return pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float64)


def _numbers(folder: Path) -> list[int]:
    return sorted(int(p.stem) for p in folder.glob("*.dcm"))


# --- rsna2022-cspine ----------------------------------------------------------------------------


def test_cspine_layout_and_csv_columns_are_the_competitions(cspine_root):
    root = cspine_root
    assert sorted(p.name for p in root.iterdir()) == sorted([
        "train_images", "test_images", "train.csv", "train_bounding_boxes.csv", "segmentations.csv", "test.csv",
        "sample_submission.csv", "test_labels.csv"])
    train, held = pd.read_csv(root / "train.csv"), pd.read_csv(root / "test_labels.csv")
    assert list(train.columns) == list(held.columns) == ["StudyInstanceUID", "patient_overall", *[f"C{i}" for i in range(1, 8)]]
    assert list(pd.read_csv(root / "train_bounding_boxes.csv").columns) == ["StudyInstanceUID", "x", "y", "width", "height",
                                                                            "slice_number"]
    assert list(pd.read_csv(root / "segmentations.csv").columns) == ["StudyInstanceUID", "slice_number", "vertebra"]
    assert sorted(train["StudyInstanceUID"]) == sorted(p.name for p in (root / "train_images").iterdir())
    assert sorted(held["StudyInstanceUID"]) == sorted(p.name for p in (root / "test_images").iterdir())
    assert len(train) + len(held) == 10 and len(held) >= 1
    assert (train["patient_overall"] == train[[f"C{i}" for i in range(1, 8)]].max(axis=1)).all()
    assert 0 < train["patient_overall"].sum() < len(train)
    for study in (root / "train_images").iterdir():  # 1-based slice numbers, no gap, as the competition
        assert _numbers(study) == list(range(1, len(_numbers(study)) + 1)) and 21 <= len(_numbers(study)) <= 25
    test, sample = pd.read_csv(root / "test.csv"), pd.read_csv(root / "sample_submission.csv")
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert list(sample.columns) == ["row_id", "fractured"] and (sample["fractured"] == 0.5).all()
    assert list(sample["row_id"]) == list(test["row_id"]) and len(test) == 8 * len(held)
    assert list(test["row_id"]) == list(test["StudyInstanceUID"] + "_" + test["prediction_type"])
    assert list(test["prediction_type"][:8]) == [*(f"C{i}" for i in range(1, 8)), "patient_overall"]


def test_cspine_files_read_back_as_ct_with_plausible_hu(cspine_root):
    segmentation = pd.read_csv(cspine_root / "segmentations.csv")
    syntaxes, representations = set(), set()
    for study in sorted((cspine_root / "train_images").iterdir())[:4]:
        files = [pydicom.dcmread(study / f"{k}.dcm") for k in _numbers(study)]
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in files])
        assert np.all(np.diff(z) < 0) or np.all(np.diff(z) > 0)  # slice numbers follow z, one way or the other
        for k, ds in enumerate(files, start=1):
            assert (ds.Modality, ds.StudyInstanceUID, ds.PatientID, ds.InstanceNumber) == ("CT", study.name, study.name, k)
            assert ds.SOPInstanceUID == f"{ds.SeriesInstanceUID}.{k}" and ds.pixel_array.shape == (32, 32)
            assert float(ds.PixelSpacing[0]) > 0 and float(ds.RescaleSlope) == 1.0
            hu = _hu(ds)
            assert abs(hu[0, 0] + 1000) < 40 and 0 < hu[16, 24] < 80 and -1024 <= hu.min() and hu.max() < 3072  # air, neck
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
            representations.add(int(ds.PixelRepresentation))
        bone = segmentation.loc[segmentation["StudyInstanceUID"] == study.name, "slice_number"]
        assert all(_hu(files[k - 1]).max() > 500 for k in bone)  # the vertebra's cortex on every bone slice
        # C1 is the top slice: the highest z
        c1 = segmentation.loc[(segmentation["StudyInstanceUID"] == study.name) & (segmentation["vertebra"] == "C1"), "slice_number"]
        assert z[c1.to_numpy() - 1].max() == z.max()
    assert syntaxes == {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"} and representations == {0, 1}
    header = read_header(next((cspine_root / "train_images").iterdir()) / "1.dcm")
    assert header["modality"] == "CT" and header["rescale_intercept"] == -1024.0 and header["study_id"] == header["patient_id"]


def test_cspine_boxes_lie_on_slices_of_the_fractured_vertebrae(cspine_root):
    train = pd.read_csv(cspine_root / "train.csv").set_index("StudyInstanceUID")
    boxes = pd.read_csv(cspine_root / "train_bounding_boxes.csv")
    segmentation = pd.read_csv(cspine_root / "segmentations.csv")
    located = boxes.merge(segmentation, on=["StudyInstanceUID", "slice_number"], how="left")
    assert located["vertebra"].notna().all()  # every box is on a bone slice
    for uid, row in train.iterrows():
        counts = segmentation.loc[segmentation["StudyInstanceUID"] == uid, "vertebra"].value_counts()
        assert set(counts.index) == {f"C{i}" for i in range(1, 8)} and counts.min() >= 2
        boxed = located.loc[located["StudyInstanceUID"] == uid, "vertebra"]
        fractured = {c for c in counts.index if row[c] == 1}
        assert set(boxed) == fractured  # each fractured vertebra boxed at least once, nothing else boxed
        for vertebra in fractured:  # a few slices only: most of the vertebra looks healthy
            assert 1 <= (boxed == vertebra).sum() <= 3
    assert ((boxes[["x", "y"]] >= 0).all(axis=None) and (boxes["x"] + boxes["width"] <= 32).all()
            and (boxes["y"] + boxes["height"] <= 32).all() and (boxes[["width", "height"]] >= 1).all(axis=None))


def test_cspine_fracture_is_a_dark_line_inside_its_box():
    """The same generator state drawn with and without a broken C5: the images differ exactly on
    the fracture pixels, which are darker than the bone, and the boxes enclose them."""
    for seed in range(6):
        broken, level, bone, fracture = cspine.draw_study(28, 48, np.random.default_rng(seed), frozenset({5}))
        healthy, level_h, _, none = cspine.draw_study(28, 48, np.random.default_rng(seed), frozenset())
        assert not none.any() and (level == level_h).all()
        changed = broken != healthy
        assert (changed == fracture).all() and fracture.any()
        assert (healthy[fracture] - broken[fracture]).min() > 150  # bone (>= 260 HU) became soft tissue
        slices = np.flatnonzero(fracture.any(axis=(1, 2)))
        assert 2 <= len(slices) <= 3 and (level[slices] == 5).all() and bone[slices].all()
        for s, x, y, w, h in cspine.fracture_boxes(fracture):
            inside = np.zeros(fracture.shape[1:], dtype=bool)
            inside[y:y + h, x:x + w] = True
            assert fracture[s].any() and not (fracture[s] & ~inside).any()


# --- rsna2023-abdominal -------------------------------------------------------------------------


def test_abdominal_layout_and_csv_columns_are_the_competitions(abdominal_root):
    root = abdominal_root
    assert sorted(p.name for p in root.iterdir()) == sorted([
        "train_images", "test_images", "train.csv", "train_series_meta.csv", "test_series_meta.csv",
        "image_level_labels.csv", "sample_submission.csv", "test_labels.csv"])
    train, held = pd.read_csv(root / "train.csv"), pd.read_csv(root / "test_labels.csv")
    assert list(train.columns) == list(held.columns) == ABDOMINAL_LABELS
    for group in (["bowel_healthy", "bowel_injury"], ["extravasation_healthy", "extravasation_injury"],
                  *(ORGAN_COLUMNS[i:i + 3] for i in (0, 3, 6))):
        assert (train[group].sum(axis=1) == 1).all()
    healthy = [c for c in ABDOMINAL_LABELS if c.endswith("_healthy")]
    assert (train["any_injury"] == 1 - train[healthy].min(axis=1)).all() and 0 < train["any_injury"].sum() < len(train)
    meta, test_meta = pd.read_csv(root / "train_series_meta.csv"), pd.read_csv(root / "test_series_meta.csv")
    assert list(meta.columns) == ["patient_id", "series_id", "aortic_hu", "incomplete_organ"]
    assert list(test_meta.columns) == ["patient_id", "series_id", "aortic_hu"]
    assert set(meta["patient_id"]) == set(train["patient_id"]) and set(test_meta["patient_id"]) == set(held["patient_id"])
    assert set(pd.concat([meta, test_meta]).groupby("patient_id").size()) == {1, 2}  # one or two series per patient
    on_disk = sorted(f"{p.parent.name}/{p.name}" for p in (root / "train_images").glob("*/*"))
    assert on_disk == sorted(meta["patient_id"].astype(str) + "/" + meta["series_id"].astype(str))
    assert meta["aortic_hu"].between(100, 450).all() and set(meta["incomplete_organ"]) == {0, 1}
    assert list(pd.read_csv(root / "image_level_labels.csv").columns) == ["patient_id", "series_id", "instance_number",
                                                                          "injury_name"]
    sample = pd.read_csv(root / "sample_submission.csv")
    assert list(sample.columns) == ABDOMINAL_LABELS[:-1] and sorted(sample["patient_id"]) == sorted(held["patient_id"])


def test_abdominal_files_read_back_with_the_series_meta_in_their_pixels(abdominal_root):
    meta = pd.read_csv(abdominal_root / "train_series_meta.csv")
    for row in meta.itertuples():
        folder = abdominal_root / "train_images" / str(row.patient_id) / str(row.series_id)
        numbers, aorta = _numbers(folder), []
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and 16 <= len(numbers) <= 20
        for number in numbers:
            ds = pydicom.dcmread(folder / f"{number}.dcm")
            assert (ds.Modality, ds.PatientID, int(ds.SeriesNumber), int(ds.InstanceNumber)) == (
                "CT", str(row.patient_id), row.series_id, number)
            assert ds.SeriesInstanceUID.endswith(f".{row.patient_id}.{row.series_id}")
            hu = _hu(ds)
            aorta.append(hu[19, 16])
            assert abs(hu[0, 0] + 1000) < 40 and hu[20:24, 14:18].max() > 400  # air, the spine
        assert abs(np.median(aorta) - row.aortic_hu) < 15  # the aorta is as bright as the meta file says
    assert read_header(folder / f"{numbers[0]}.dcm")["patient_id"] == str(meta["patient_id"].iloc[-1])


def test_abdominal_image_level_labels_agree_with_the_patient_labels(abdominal_root):
    train = pd.read_csv(abdominal_root / "train.csv").set_index("patient_id")
    images = pd.read_csv(abdominal_root / "image_level_labels.csv")
    assert set(images["injury_name"]) == {"Bowel", "Active_Extravasation"}
    for name, group in (("Bowel", "bowel_injury"), ("Active_Extravasation", "extravasation_injury")):
        shown = images.loc[images["injury_name"] == name].groupby("patient_id").size()
        assert set(shown.index) == set(train.index[train[group] == 1])  # every injured patient, no other
        assert (shown >= 1).all()
    assert len(images) > 0 and not images.duplicated().any()


def test_organ_grade_is_the_extent_of_its_darker_region():
    """Many thin slices measure an injury's extent: low covers at most LOW_EXTENT's top of the
    organ's slices, high at least HIGH_EXTENT's bottom; the injured pixels are 45 HU darker."""
    u = np.linspace(-0.05, 1.05, 120)
    for seed in range(3):
        anatomy = abdominal.draw_anatomy(np.random.default_rng(seed))
        healthy, truth_h = abdominal.render(u, 32, anatomy, {}, 300.0, np.random.default_rng(9))
        for organ in abdominal.ORGANS:
            assert not truth_h[f"{organ}_injury"].any() and truth_h[organ].sum() > 25
            for grade, (low, high) in ((1, abdominal.LOW_EXTENT), (2, abdominal.HIGH_EXTENT)):
                hurt, truth = abdominal.render(u, 32, anatomy, {organ: grade}, 300.0, np.random.default_rng(9))
                extent = truth[f"{organ}_injury"].sum() / truth[organ].sum()
                assert low - 0.05 <= extent <= high + 0.05, (seed, organ, grade, extent)
                changed = (hurt != healthy).any(axis=(1, 2))
                assert (changed == truth[f"{organ}_injury"]).all()
                assert np.allclose((healthy - hurt)[hurt != healthy], abdominal.INJURY_DROP_HU, atol=1e-3)
    assert abdominal.LOW_EXTENT[1] < abdominal.HIGH_EXTENT[0]


# --- both ----------------------------------------------------------------------------------------


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", [CSPINE, ABDOMINAL])
def test_same_seed_same_bytes_other_seed_other_data(task, tmp_path):
    runs = [(tmp_path / f"run{i}", seed) for i, seed in enumerate((7, 7, 8))]  # two runs alike, one of another seed
    for root, seed in runs:
        synthesize_task(task, root, patients=3, size=16, slices=(21, 21), seed=seed, progress=False)
    first, again, other = (_digests(root) for root, _ in runs)
    assert first == again and len(first) > 50
    assert first != other


def test_read_task_labels_gives_the_schemas_unit_and_columns(cspine_root, abdominal_root):
    for task, root, id_column in ((CSPINE, cspine_root, "StudyInstanceUID"), (ABDOMINAL, abdominal_root, "patient_id")):
        schema = get_task(task)
        read = read_task_labels(task, root)
        raw = pd.read_csv(root / "train.csv", dtype={id_column: str})
        assert list(read.labels.columns) == [schema.unit_column, *schema.labels]
        assert list(read.labels[schema.unit_column]) == list(raw[id_column])
        assert (read.labels[list(schema.labels)].to_numpy() == raw[list(schema.labels)].to_numpy()).all()
        held = pd.read_csv(root / "test_labels.csv", dtype={id_column: str}).rename(columns={id_column: schema.unit_column})
        assert set(read.series.loc[read.series["split"] == "test", schema.unit_column]) == set(held[schema.unit_column])
        assert read.series["images"].sum() == len(list(root.rglob("*.dcm")))
        confident = read.labels.copy()
        confident[list(schema.labels)] = confident[list(schema.labels)].astype(float).clip(0.01, 0.99)
        perfect = schema_metric(schema, read.labels, confident)
        assert 0 < perfect.overall < 0.05  # the labels are scoreable at the schema's unit
    spine = read_task_labels(CSPINE, cspine_root)
    assert list(spine.slice_labels.columns) == ["study_id", "slice_number", "vertebra"]
    assert list(spine.boxes.columns) == ["study_id", "slice_number", "x", "y", "width", "height"]
    belly = read_task_labels(ABDOMINAL, abdominal_root)
    assert list(belly.slice_labels.columns) == ["patient_id", "series_id", "instance_number", "injury_name"]
    assert belly.boxes is None and belly.series["incomplete_organ"].isna().sum() == (belly.series["split"] == "test").sum()


def _edit_csv(name: str, change):
    def edit(root: Path) -> None:
        frame = pd.read_csv(root / name, dtype=str)
        change(frame).to_csv(root / name, index=False)
    return edit


def _set(row: int, column: str, value):
    def change(frame):
        frame.loc[row, column] = value
        return frame
    return change


def _append(values: dict):
    return lambda frame: pd.concat([frame, pd.DataFrame([values])], ignore_index=True).fillna("0")


def _first_series(root: Path) -> Path:
    return sorted((root / "train_images").glob("*/*"))[0]


def _label_healthy_image(root: Path, injury: str, number: int | None = None) -> None:
    """Add an image-level label for the first image of a patient without injuries."""
    train = pd.read_csv(root / "train.csv", dtype=str)
    patient = train.loc[train["any_injury"] == "0", "patient_id"].iloc[0]
    series = sorted((root / "train_images" / patient).iterdir())[0]
    number = _numbers(series)[0] if number is None else number
    row = {"patient_id": patient, "series_id": series.name, "instance_number": str(number), "injury_name": injury}
    _edit_csv("image_level_labels.csv", _append(row))(root)


CSPINE_ERRORS = [
    ("study folder missing", lambda r: shutil.rmtree(sorted((r / "train_images").iterdir())[0]),
     r"train\.csv: row \d+ \(StudyInstanceUID [\d.]+\) has no images: train_images/[\d.]+ is missing"),
    ("test study folder missing", lambda r: shutil.rmtree(sorted((r / "test_images").iterdir())[0]),
     r"test\.csv: row \d+ \(StudyInstanceUID [\d.]+\) has no images: test_images/"),
    ("folder without a row", lambda r: shutil.copytree(sorted((r / "train_images").iterdir())[0], r / "train_images" / "1.2.3"),
     r"train_images/1\.2\.3: a folder of images with no row in train\.csv"),
    ("box of an unknown study", _edit_csv("train_bounding_boxes.csv", _set(0, "StudyInstanceUID", "1.2.3")),
     r"train_bounding_boxes\.csv: row 1 \(StudyInstanceUID 1\.2\.3\) is not in train\.csv"),
    ("segmentation of an unknown study", _edit_csv("segmentations.csv", _set(2, "StudyInstanceUID", "1.2.3")),
     r"segmentations\.csv: row 3 \(StudyInstanceUID 1\.2\.3\) is not in train\.csv"),
    ("box on a slice that is not there", _edit_csv("train_bounding_boxes.csv", _set(0, "slice_number", "999")),
     r"train_bounding_boxes\.csv: row 1 \(StudyInstanceUID [\d.]+, slice_number 999\): no image train_images/[\d.]+/999\.dcm"),
    ("label not 0/1", _edit_csv("train.csv", _set(1, "C3", "2")), r"train\.csv: row 2 \(StudyInstanceUID [\d.]+\): 'C3' is 2; expected 0 or 1"),
    ("patient_overall unlike its vertebrae", _edit_csv("train.csv", _set(0, "patient_overall", "0")),
     r"train\.csv: row 1 .* has patient_overall unlike its vertebrae"),
    ("column missing", _edit_csv("segmentations.csv", lambda f: f.drop(columns="vertebra")),
     r"segmentations\.csv: no column 'vertebra'; task rsna2022-cspine's segmentations\.csv has columns"),
    ("the other task's label file", lambda r: shutil.copy(r.parent / "abdominal" / "train.csv", r / "train.csv"),
     r"train\.csv: a label file of task rsna2023-abdominal \(the columns of its train\.csv\)"),
    ("file missing", lambda r: (r / "segmentations.csv").unlink(), r"segmentations\.csv: missing; a rsna2022-cspine dataset has"),
]
ABDOMINAL_ERRORS = [
    ("series folder missing", lambda r: shutil.rmtree(_first_series(r)),
     r"train_series_meta\.csv: row \d+ \(patient_id \d+, series_id \d+\) has no images: train_images/\d+/\d+ is missing"),
    ("patient without a series", _edit_csv("train_series_meta.csv", lambda f: f[f["patient_id"] != f["patient_id"].iloc[0]]),
     r"train\.csv: row \d+ \(patient_id \d+\) has no series in train_series_meta\.csv"),
    ("series of an unknown patient", _edit_csv("train_series_meta.csv", _set(0, "patient_id", "99")),
     r"train_series_meta\.csv: row 1 \(patient_id 99, series_id \d+\) is not in train\.csv"),
    ("image label of an unknown series",
     _edit_csv("image_level_labels.csv", _append({"patient_id": "99", "series_id": "5", "instance_number": "1", "injury_name": "Bowel"})),
     r"image_level_labels\.csv: row \d+ \(patient_id 99, series_id 5\) is not in train_series_meta\.csv"),
    ("image of a healthy patient labelled", lambda r: _label_healthy_image(r, "Bowel"),
     r"image_level_labels\.csv: row \d+ \(patient_id \d+, series_id \d+, instance_number \d+\) marks an injury its patient does not"),
    ("image not there", lambda r: _label_healthy_image(r, "Bowel", number=0),
     r"image_level_labels\.csv: row \d+ \(patient_id \d+, series_id \d+, instance_number 0\): no image train_images/"),
    ("unknown injury name", lambda r: _label_healthy_image(r, "Liver"),
     r"image_level_labels\.csv: row \d+ .* has injury_name not one of Bowel, Active_Extravasation"),
    ("two classes of a group", _edit_csv("train.csv", lambda f: f.assign(kidney_low="1")),
     r"train\.csv: row \d+ \(patient_id \d+\) has not exactly one of kidney_healthy, kidney_low, kidney_high set to 1"),
    ("any_injury unlike its groups", _edit_csv("train.csv", lambda f: f.assign(any_injury="1")),
     r"train\.csv: row \d+ \(patient_id \d+\) has any_injury unlike its groups"),
    ("the other task's label file", lambda r: shutil.copy(r.parent / "cspine" / "train.csv", r / "train.csv"),
     r"train\.csv: a label file of task rsna2022-cspine \(the columns of its train\.csv\)"),
    ("the other task's slice file", lambda r: shutil.copy(r.parent / "cspine" / "segmentations.csv", r / "image_level_labels.csv"),
     r"image_level_labels\.csv: a label file of task rsna2022-cspine \(the columns of its segmentations\.csv\)"),
    ("aortic_hu not a number", _edit_csv("train_series_meta.csv", _set(1, "aortic_hu", "high")),
     r"train_series_meta\.csv: row 2 \(patient_id \d+, series_id \d+\) has aortic_hu that is not a number"),
]


def _copies(tmp_path: Path, cspine_root: Path, abdominal_root: Path) -> dict[str, Path]:
    shutil.copytree(cspine_root, tmp_path / "cspine")
    shutil.copytree(abdominal_root, tmp_path / "abdominal")
    return {CSPINE: tmp_path / "cspine", ABDOMINAL: tmp_path / "abdominal"}


@pytest.mark.parametrize("task, case, damage, message",
                         [(CSPINE, *c) for c in CSPINE_ERRORS] + [(ABDOMINAL, *c) for c in ABDOMINAL_ERRORS],
                         ids=[f"cspine-{c[0]}" for c in CSPINE_ERRORS] + [f"abdominal-{c[0]}" for c in ABDOMINAL_ERRORS])
def test_read_task_labels_refuses_bad_datasets_in_one_line(task, case, damage, message, tmp_path, cspine_root, abdominal_root):
    root = _copies(tmp_path, cspine_root, abdominal_root)[task]
    read_task_labels(task, root)  # intact before the damage
    damage(root)
    with pytest.raises(ContractError, match=message) as caught:
        read_task_labels(task, root)
    assert "\n" not in str(caught.value) and str(root) in str(caught.value)


def test_synthesize_task_refuses_bad_arguments_in_one_line(tmp_path, cspine_root):
    with pytest.raises(StackkitError, match=r"--slices 10,12 is too few; MIN must be at least 21"):
        synthesize_task(CSPINE, tmp_path / "a", slices=(10, 12), progress=False)
    with pytest.raises(StackkitError, match=r"--task 'rsna2019' has no synthetic dataset here"):
        synthesize_task("rsna2019", tmp_path / "b", progress=False)
    with pytest.raises(StackkitError, match=r"train_images: already contains \.dcm files"):
        synthesize_task(ABDOMINAL, cspine_root, patients=2, progress=False)
    with pytest.raises(StackkitError, match=r"--patients 1 is too few"):
        synthesize_task(ABDOMINAL, tmp_path / "c", patients=1, progress=False)


@pytest.mark.parametrize("task", ["rsna2022-cspine", "rsna2023-abdominal"])
def test_data_synth_task_writes_the_tasks_layout_through_the_cli(task, tmp_path):
    from stackkit.testing.cli import run_cli

    out = run_cli("data", "synth", "--task", task, "--patients", "3", "--out", tmp_path / "d", "--quiet").stdout
    assert out.startswith(f"data synth: task={task}, ") and out.count("\n") == 1
    assert read_task_labels(task, tmp_path / "d").labels.shape[0] >= 1
    refused = run_cli("data", "synth", "--task", task, "--slices", "9,3", "--out", tmp_path / "e", check=False)
    assert refused.returncode == 2 and "--slices" in refused.stderr
