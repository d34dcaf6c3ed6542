"""Helpers for the data-layer tests: a small synthetic dataset and ways to break DICOM files."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

from stackkit.synth import synthesize


def small_dataset(out: Path, *, patients: int = 8, seed: int = 0) -> dict:
    return synthesize(out, patients=patients, size=16, slices=(4, 7), test_fraction=0.25, seed=seed, progress=False)


def copy_dataset(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _rewrite(path: Path, edit) -> None:
    import pydicom

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Invalid value for VR UI")
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=True)


def delete_tag(keyword: str):
    def corrupt(path: Path) -> None:
        _rewrite(path, lambda ds: delattr(ds, keyword))

    return corrupt


def truncate(path: Path, drop: int = 50) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-drop])


def strip_preamble(path: Path) -> None:
    """The file meta and data set without the 128-byte preamble and 'DICM' (a pre-Part-10 file)."""
    path.write_bytes(path.read_bytes()[132:])


def not_dicom(path: Path) -> None:
    path.write_text("this is not a DICOM file\n" * 20)


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def non_numeric_position(path: Path) -> None:
    """Replace the ImagePositionPatient text with letters of the same length, keeping the layout."""
    import pydicom

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Invalid value for VR UI")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    text = "\\".join(str(v) for v in ds["ImagePositionPatient"].value)
    data = path.read_bytes()
    encoded = text.encode()
    if len(encoded) % 2:
        encoded += b" "
    assert data.count(encoded) == 1, (path, encoded)
    path.write_bytes(data.replace(encoded, re.sub(rb"[0-9]", b"x", encoded)))


def add_undefined_length_sequence(path: Path) -> None:
    """Explicit VR with a sequence of undefined length: the fast reader hands such files to pydicom."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    def edit(ds):
        item = Dataset()
        item.PatientID = "other"
        ds.OtherPatientIDsSequence = Sequence([item])
        ds["OtherPatientIDsSequence"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    _rewrite(path, edit)


def first_train_file(root: Path) -> Path:
    return sorted((root / "stage_2_train").glob("*.dcm"))[0]
