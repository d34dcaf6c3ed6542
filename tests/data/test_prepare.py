"""`data prepare`: DICOM folders + label CSV -> contract-valid metadata, labels and folds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS, Workdir
from stackkit.errors import StackkitError
from stackkit.data.prepare import PrepareResult, SkippedDicomWarning, make_folds, parse_label_csv, prepare_data
from stackkit.data.synth import TEST_DIR, TRAIN_CSV, TRAIN_DIR
from stackkit.contract.validate import load_core
from stackkit.testing import dicom as h

pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepare") / "data"
    h.small_dicom_dataset(root, patients=16, seed=5)
    return root


def run(data: Path, workdir: Path, **kwargs) -> PrepareResult:
    args = dict(
        dicom_dir=data / TRAIN_DIR, test_dicom_dir=data / TEST_DIR, labels_csv=data / TRAIN_CSV,
        n_folds=4, seed=0, workers=1, progress=False,
    )
    return prepare_data(Workdir(workdir), **{**args, **kwargs})


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    summary = run(source, workdir, workers=2)
    return workdir, summary, load_core(Workdir(workdir))


def test_outputs_are_contract_valid_and_match_the_dicoms(source, prepared):
    workdir, summary, (metadata, labels, folds) = prepared
    train_files = sorted(p.stem for p in (source / TRAIN_DIR).glob("*.dcm"))
    test_files = sorted(p.stem for p in (source / TEST_DIR).glob("*.dcm"))
    assert sorted(metadata.loc[metadata.split == "train", "image_id"]) == train_files
    assert sorted(metadata.loc[metadata.split == "test", "image_id"]) == test_files
    assert summary.train_images == len(train_files) and summary.test_images == len(test_files)
    assert summary.skipped == []
    for column in ("series_id", "slice_thickness", "pixel_spacing", "window_center", "rescale_intercept", "rows", "path"):
        assert column in metadata.columns and metadata[column].notna().all()
    assert metadata["z"].dtype == np.float64
    assert sorted(labels["image_id"]) == train_files == sorted(folds["image_id"])
    assert all(labels[label].dtype == np.int8 for label in LABELS) and folds["fold"].dtype == np.int8
    # labels equal the CSV
    long = pd.read_csv(source / TRAIN_CSV)
    wide = labels.set_index("image_id")
    expected = long.set_index("ID")["Label"]
    got = pd.Series(
        wide[list(LABELS)].to_numpy().reshape(-1),
        index=[f"{i}_{label}" for i in wide.index for label in LABELS],
    )
    assert (got.sort_index() == expected.sort_index()).all()


def test_patients_in_one_fold_and_study_any_stratified(prepared):
    _, summary, (metadata, labels, folds) = prepared
    merged = folds.merge(metadata, on="image_id").merge(labels, on="image_id")
    assert (merged.groupby("patient_id")["fold"].nunique() == 1).all()
    assert sorted(merged["fold"].unique()) == [0, 1, 2, 3]
    study = merged.groupby("study_id").agg(fold=("fold", "first"), any=("any", "max"))
    overall = study["any"].mean()
    assert 0 < overall < 1
    per_fold = study.groupby("fold")["any"].mean()
    # every fold gets positive and negative studies near the overall rate
    assert (per_fold > 0).all() and (per_fold < 1).all()
    assert (per_fold - overall).abs().max() <= 0.35


def test_folds_deterministic_and_seed_dependent(prepared):
    _, _, (metadata, labels, folds) = prepared
    again = make_folds(metadata, labels, 4, seed=0).set_index("image_id")["fold"]
    assert again.reindex(folds["image_id"]).tolist() == folds["fold"].tolist()
    shuffled = make_folds(metadata.sample(frac=1, random_state=3), labels.sample(frac=1, random_state=4), 4, seed=0)
    assert shuffled.set_index("image_id")["fold"].reindex(folds["image_id"]).tolist() == folds["fold"].tolist()
    other = make_folds(metadata, labels, 4, seed=1).set_index("image_id")["fold"]
    assert other.reindex(folds["image_id"]).tolist() != folds["fold"].tolist()


def test_wide_label_csv_gives_the_same_labels(source, prepared, tmp_path):
    _, _, (_, labels, _) = prepared
    wide_csv = tmp_path / "wide.csv"
    labels.sample(frac=1, random_state=0).to_csv(wide_csv, index=False)
    parsed = parse_label_csv(wide_csv).set_index("image_id").sort_index()
    pd.testing.assert_frame_equal(parsed, labels.set_index("image_id").sort_index())
    long_parsed = parse_label_csv(source / TRAIN_CSV).set_index("image_id").sort_index()
    pd.testing.assert_frame_equal(long_parsed, parsed)


def test_non_strict_skips_corrupt_files_by_name_and_drops_their_labels(data, tmp_path):
    train_files = sorted((data / TRAIN_DIR).glob("*.dcm"))
    broken, no_preamble = train_files[0], train_files[1]
    h.truncate(broken)
    h.strip_preamble(no_preamble)
    with pytest.warns(SkippedDicomWarning) as record:
        summary = run(data, tmp_path / "work")
    messages = [str(w.message) for w in record]
    assert any(str(broken) in m and "truncated" in m for m in messages)
    assert any(str(no_preamble) in m and "DICM" in m for m in messages)
    assert any("dropped the labels of 2 skipped image(s)" in m for m in messages)
    assert [Path(p).name for p, _ in summary.skipped] == [broken.name, no_preamble.name]
    metadata, labels, folds = load_core(Workdir(tmp_path / "work"))
    assert broken.stem not in set(metadata["image_id"]) and broken.stem not in set(labels["image_id"])
    assert summary.train_images == len(train_files) - 2 == len(folds)


def test_skipped_test_files_are_recorded_for_submit(data, tmp_path):
    import json

    test_files = sorted((data / TEST_DIR).glob("*.dcm"))
    h.truncate(test_files[0])
    with pytest.warns(SkippedDicomWarning):
        run(data, tmp_path / "work")
    record = json.loads(Workdir(tmp_path / "work").prepare_record.read_text())
    assert record["skipped_test_ids"] == [test_files[0].stem]
    assert record["test_files"] == len(test_files)
    assert [s["split"] for s in record["skipped"]] == ["test"]


def _edit_csv(edit):
    def corrupt(data: Path) -> dict:
        path = data / TRAIN_CSV
        path.write_text(edit(path.read_text()))
        return {}

    return corrupt


def _lines(edit):
    return _edit_csv(lambda text: "\n".join(edit(text.strip().split("\n"))) + "\n")


def _first_file(folder):
    return lambda data: sorted((data / folder).glob("*.dcm"))[0]


def _strict(corrupt):
    def apply(data: Path) -> dict:
        corrupt(_first_file(TRAIN_DIR)(data))
        return {"strict": True}

    return apply


def _empty_test_dir(data: Path) -> dict:
    for path in (data / TEST_DIR).glob("*.dcm"):
        path.unlink()
    return {}


def _duplicate_sop(data: Path) -> dict:
    source = _first_file(TRAIN_DIR)(data)
    shutil.copy(source, data / TRAIN_DIR / "copy.dcm")
    return {}


def _label_a_test_image(data: Path) -> dict:
    image = _first_file(TEST_DIR)(data).stem
    with open(data / TRAIN_CSV, "a") as handle:
        handle.writelines(f"{image}_{label},0\n" for label in LABELS)
    return {}


def _wide_with_half(data: Path) -> dict:
    labels = parse_label_csv(data / TRAIN_CSV).astype({label: float for label in LABELS})
    labels.loc[2, "subdural"] = 0.5
    labels.to_csv(data / "wide.csv", index=False)
    return {"labels_csv": data / "wide.csv"}


BAD_INPUTS = [
    ("csv header", _edit_csv(lambda t: t.replace("ID,Label", "image,label", 1)), r"header is image,label; expected 'ID,Label'"),
    ("unknown label", _edit_csv(lambda t: t.replace("_subdural,", "_subdurl,", 1)), r"row 5 \(ID ID_\w+_subdurl\) names label 'subdurl'"),
    ("label not 0/1", _lines(lambda ls: ls[:3] + [ls[3].rsplit(",", 1)[0] + ",2"] + ls[4:]), r"row 3 .* has Label 2; labels must be 0 or 1"),
    ("missing row", _lines(lambda ls: ls[:4] + ls[5:]), r"has 5 of the 6 labels \(missing subarachnoid\)"),
    ("duplicate row", _lines(lambda ls: ls + [ls[1]]), r"row \d+ \(ID ID_\w+_epidural\) repeats an earlier row"),
    ("malformed id", _lines(lambda ls: ls[:1] + ["nounderscore,0"] + ls[1:]), r"row 1 \(ID nounderscore\) is not of the form"),
    ("unknown image", _lines(lambda ls: ls + [f"ID_ffffffff0_{label},0" for label in LABELS]), r"labels for image ID_ffffffff0, which is not in"),
    ("unlabeled image", _lines(lambda ls: ls[:1] + ls[7:]), r"no labels for training image ID_\w+"),
    ("labeled test image", _label_a_test_image, r"which is in the test folder"),
    ("wide not 0/1", _wide_with_half, r"row 3 \(image_id ID_\w+\) has subdural 0.5"),
    ("labels missing", lambda d: {"labels_csv": d / "nope.csv"}, r"nope.csv: label file not found"),
    ("empty labels", _edit_csv(lambda t: "ID,Label\n"), r"no label rows|empty"),
    ("empty dir", _empty_test_dir, r"stage_2_test: --test-dicom-dir folder contains no .dcm files"),
    ("missing dir", lambda d: {"dicom_dir": d / "absent"}, r"absent: --dicom-dir folder does not exist"),
    ("strict truncated", _strict(h.truncate), r"pixel data has \d+ bytes, expected 512 .*truncated.*without --strict"),
    ("strict no preamble", _strict(h.strip_preamble), r"no 'DICM' preamble.*without --strict"),
    ("strict not dicom", _strict(h.not_dicom), r"not a DICOM Part 10 file"),
    ("strict no position", _strict(h.delete_tag("ImagePositionPatient")), r"required tag ImagePositionPatient \(0020,0032\) is missing"),
    ("strict bad position", _strict(h.non_numeric_position), r"ImagePositionPatient is not readable"),
    ("duplicate SOPInstanceUID", _duplicate_sop, r"copy.dcm: SOPInstanceUID ID_\w+ is also used by"),
    ("too many folds", lambda d: {"n_folds": 40}, r"--folds 40: only \d+ labeled patient\(s\)"),
    ("one fold", lambda d: {"n_folds": 1}, r"--folds 1: need at least 2 folds"),
]


@pytest.mark.parametrize("corrupt, match", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_fail_with_one_line_and_leave_artifacts_untouched(data, prepared, tmp_path, corrupt, match):
    previous, _, _ = prepared
    workdir = tmp_path / "work"
    shutil.copytree(previous, workdir)
    (workdir / "preds").mkdir()
    (workdir / "preds" / "keep.txt").write_text("existing artifact\n")
    before = snapshot(workdir)
    overrides = corrupt(data)
    with pytest.raises(StackkitError, match=match) as info:
        run(data, workdir, **overrides)
    assert "\n" not in str(info.value)
    assert snapshot(workdir) == before
