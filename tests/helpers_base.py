"""Fixtures for the base-model tests: one small synthetic DICOM dataset, prepared once per session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from stackkit.contract import Workdir

SMALL_PATIENTS = 24
SMALL_SIZE = 32
SMALL_FOLDS = 3


def prepared_workdir(root: Path, *, patients: int, size: int, folds: int, seed: int = 0) -> Workdir:
    """synth -> prepare into ``root``: the same two library calls as `data synth` and `data prepare`."""
    from stackkit.prepare import prepare_data
    from stackkit.synth import synthesize

    dicom = root / "dicom"
    synthesize(dicom, patients=patients, size=size, seed=seed, progress=False)
    wd = Workdir(root / "work")
    prepare_data(wd, dicom_dir=dicom / "stage_2_train", test_dicom_dir=dicom / "stage_2_test",
                 labels_csv=dicom / "stage_2_train.csv", n_folds=folds, seed=seed, progress=False)
    return wd


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Workdir:
    """A prepared work directory (24 patients, 32 px, 3 folds) with ONE train slice truncated after
    `data prepare` (so metadata lists it but its pixels cannot be decoded).

    Tests copy ``data/`` into their own work directory (see ``fresh_workdir``) so they never
    share outputs; the DICOM files themselves are shared read-only.
    """
    import pandas as pd

    wd = prepared_workdir(tmp_path_factory.mktemp("base_small"), patients=SMALL_PATIENTS, size=SMALL_SIZE, folds=SMALL_FOLDS)
    metadata = pd.read_parquet(wd.metadata)
    victim = metadata.loc[metadata["split"] == "train"].sort_values("image_id").iloc[3]
    data = Path(victim["path"]).read_bytes()
    Path(victim["path"]).write_bytes(data[: len(data) - 200])  # pixel data cut short
    (wd.root / "truncated.txt").write_text(str(victim["image_id"]))
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
