"""DICOM test data: small synthetic datasets, prepared work directories, and ways to break DICOM files."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np

from stackkit.contract import Workdir

from stackkit.data.synth import SynthResult, synthesize
from stackkit.data.decoding import quiet_rsna_ids


def small_dicom_dataset(out: Path, *, patients: int = 8, seed: int = 0) -> SynthResult:
    return synthesize(out, patients=patients, size=16, slices=(4, 7), test_fraction=0.25, seed=seed, progress=False)


def copy_dataset(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _rewrite(path: Path, edit) -> None:
    import pydicom

    with quiet_rsna_ids():
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

    with quiet_rsna_ids():
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


SMALL_PATIENTS = 24
SMALL_SIZE = 32
SMALL_FOLDS = 3


def prepared_workdir(root: Path, *, patients: int, size: int, folds: int, seed: int = 0) -> Workdir:
    """synth -> prepare into ``root``: the same two library calls as `data synth` and `data prepare`."""
    from stackkit.data.prepare import prepare_data
    from stackkit.data.synth import synthesize

    dicom = root / "dicom"
    synthesize(dicom, patients=patients, size=size, seed=seed, progress=False)
    wd = Workdir(root / "work")
    prepare_data(wd, dicom_dir=dicom / "stage_2_train", test_dicom_dir=dicom / "stage_2_test",
                 labels_csv=dicom / "stage_2_train.csv", n_folds=folds, seed=seed, progress=False)
    return wd


def fresh_workdir(source: Workdir, target: Path) -> Workdir:
    """A new work directory holding a copy of ``source``'s data/ files (and its pixel cache, if any)."""
    import shutil

    wd = Workdir(target)
    shutil.copytree(source.data_dir, wd.data_dir)
    if source.cache_dir.is_dir():
        shutil.copytree(source.cache_dir, wd.cache_dir)
    return wd


def dicom_bytes(stored: np.ndarray, *, pixel_representation: int, bits_stored: int, intercept: float, slope: float = 1.0) -> bytes:
    """One CT slice as DICOM bytes with the given pixel encoding (for HU conversion tests)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    dtype = np.int16 if pixel_representation else np.uint16
    ds.PixelData = stored.astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def real_dicom_copy(name: str, dest: Path, *, index: int = 0, **tags) -> Path:
    """A copy of pydicom's real test file ``name`` at ``dest``, its pixel data and transfer syntax as they
    are (compressed stays compressed, deflated is deflated again on save), with the tags `data prepare`
    requires filled in where the file lacks them (many of pydicom's files are not patient images) and
    ``tags`` set: ``index`` makes PatientID, StudyInstanceUID and SOPInstanceUID unique per copy."""
    import pydicom
    from pydicom.data import get_testdata_file

    source = get_testdata_file(name, download=False)
    if source is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    with quiet_rsna_ids():
        ds = pydicom.dcmread(source)
        defaults = dict(PatientID=f"P{index}", StudyInstanceUID=f"1.2.3.{index}", SOPInstanceUID=f"1.2.3.{index}.1",
                        ImagePositionPatient=[0.0, 0.0, float(index)])
        for keyword, value in defaults.items():
            if not ds.get(keyword) or index:
                setattr(ds, keyword, value)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        meta = ds.file_meta
        meta.MediaStorageSOPClassUID = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dest, enforce_file_format=True)
    return dest
