"""`data prepare` rules at the command line: image ids, files named in errors, skipped files always
shown, data/ refused as a plain file, data/ recorded as a verified set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import Workdir
from stackkit.contract.io import write_parquet
from stackkit.contract.validate import load_core
from stackkit.data.synth import TEST_DIR, TRAIN_CSV, TRAIN_DIR
from stackkit.errors import ContractError
from stackkit.testing import dicom as h

pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rules") / "data"
    h.small_dicom_dataset(root, patients=8, seed=3)
    return root


def args(data: Path, work: Path, *extra) -> list[str]:
    return ["data", "prepare", "--workdir", str(work), "--dicom-dir", str(data / TRAIN_DIR), "--test-dicom-dir",
            str(data / TEST_DIR), "--labels", str(data / TRAIN_CSV), "--folds", "2", "--workers", "1", "-q", *extra]


def train_files(data: Path) -> list[Path]:
    return sorted((data / TRAIN_DIR).glob("*.dcm"))


def _set_tag(index: int, keyword: str, value):
    def setup(data, work):
        path = train_files(data)[index]
        h._rewrite(path, lambda ds: setattr(ds, keyword, value))
        return str(path)

    return setup


def _data_is_a_file(data, work):
    work.mkdir()
    (work / "data").write_text("my notes\n")
    return str(work / "data")


def _copy_of_a_file(data, work):
    first = train_files(data)[0]
    copy = first.with_name("copy.dcm")
    copy.write_bytes(first.read_bytes())
    return str(copy)


def _skipped_then_failed(data, work):
    """One file unreadable (skipped) and another one's SOPInstanceUID changed (the run fails): the skip is shown too."""
    h.truncate(train_files(data)[1], drop=300)
    _set_tag(2, "SOPInstanceUID", "1.2.3.999")(data, work)
    return str(train_files(data)[1])


# name, setup(data, work) -> the file the message must name, extra options, message (regex, {file} = that file)
CASES = [
    ("data-path-is-a-file", _data_is_a_file, [], r"{file}: exists as a file where stackkit writes the folder data/; the file is left as it is"),
    ("study-under-two-patient-ids", _set_tag(0, "PatientID", "ZZ_other"), [],
     r"{file}: PatientID ZZ_other, but \S+\.dcm of the same study \S+ has PatientID \S+; a study belongs to one patient"),
    ("sop-differs-from-file-name", _set_tag(0, "SOPInstanceUID", "1.2.3.999"), [],
     r"labels for image (\S+), which is not in \S+ \({file} is there, with SOPInstanceUID 1\.2\.3\.999: .*pass --image-id filename"),
    ("same-sop-in-two-files", _copy_of_a_file, [], r"{file}: SOPInstanceUID \S+ is also used by \S+\.dcm; every image needs its own id \(--image-id sop\)"),
    ("modality-list-malformed", lambda data, work: "", ["--modality", "C T"], r"--modality 'C T': expected DICOM Modality codes"),
]


@pytest.mark.parametrize("setup, extra, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_prepare_errors_are_one_line_naming_the_file(data, tmp_path, setup, extra, message):
    work = tmp_path / "work"
    named = setup(data, work)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} if work.exists() else {}
    result = CliRunner().invoke(cli, args(data, work, *extra))
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert re.search(message.format(file=re.escape(named)), errors[0]), errors[0]
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} if work.exists() else {}
    assert after == before  # the user's files untouched, nothing left behind (no .data.tmp-*)
    assert not list(work.glob(".data*")) if work.exists() else True


def test_skipped_files_are_shown_when_the_run_fails(data, tmp_path):
    skipped = _skipped_then_failed(data, tmp_path / "work")
    result = CliRunner().invoke(cli, args(data, tmp_path / "work"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert f"warning: skipped unreadable DICOM {skipped}: pixel data has" in result.output
    assert lines[-1].startswith("Error: ") and "labels for image" in lines[-1]


def test_image_id_filename_matches_labels_by_file_name(data, tmp_path):
    renamed = _set_tag(0, "SOPInstanceUID", "1.2.3.999")(data, tmp_path)
    result = CliRunner().invoke(cli, args(data, tmp_path / "work", "--image-id", "filename"))
    assert result.exit_code == 0, result.output
    metadata, labels, _ = load_core(Workdir(tmp_path / "work"))
    assert (metadata["image_id"] == metadata["path"].map(lambda p: Path(p).stem)).all()
    assert Path(renamed).stem in set(labels["image_id"]) and "1.2.3.999" not in set(metadata["image_id"])
    record = json.loads(Workdir(tmp_path / "work").prepare_record.read_text())
    assert record["image_id"] == "filename" and record["modalities"] == ["CT"]


def test_data_is_a_verified_set(data, tmp_path):
    wd = Workdir(tmp_path / "work")
    assert CliRunner().invoke(cli, args(data, wd.root)).exit_code == 0
    record = json.loads(wd.prepare_record.read_text())
    assert sorted(record["sha256"]) == ["folds.parquet", "labels.parquet", "metadata.parquet"]
    metadata, labels, folds = load_core(wd)  # as written: accepted
    flipped = labels.copy()
    flipped.loc[0, "any"] = 1 - flipped.loc[0, "any"]
    write_parquet(flipped, wd.labels)
    with pytest.raises(ContractError, match=r"labels\.parquet: sha256 \w+\.\.\. differs .* recorded in data/prepare\.json .*rerun `data prepare`"):
        load_core(wd)
    write_parquet(labels, wd.labels)  # the same rows again: the same bytes, accepted
    pd.testing.assert_frame_equal(load_core(wd)[1], labels)
