"""Shared pieces of the synthetic task datasets (``stackkit.data.synth_cspine``,
``stackkit.data.synth_abdominal``): one CT series written as DICOM files with the headers
``stackkit.data.synth`` writes for RSNA 2019 (its pixel encoder and DICOM byte writer, reused),
the train/test split by patient, the folders and the CSV files.

Unlike the 2019 files these use valid numeric UIDs (as the 2022 and 2023 competitions did) and
name each file ``<InstanceNumber>.dcm`` inside its series folder. The RSNA 2019 12-bit quirk is
not drawn: it was a defect of that competition's data; the pixels are int16 (signed) or 12-bit
unsigned, half each, both with intercept -1024.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract.io import write_text
from stackkit.data.synth import EXPLICIT_VR_FRACTION, _check_arguments, _dicom_bytes, _encode_pixels, _write_file
from stackkit.errors import StackkitError

TRAIN_IMAGES = "train_images"
TEST_IMAGES = "test_images"
TRAIN_CSV = "train.csv"
SAMPLE_SUBMISSION = "sample_submission.csv"
# The test split's labels in train.csv's format, held back (Kaggle's hidden answers): only scoring reads them.
HELD_OUT_CSV = "test_labels.csv"


@dataclass(frozen=True)
class SeriesSpec:
    """Header values of one series; ``instance_numbers`` and ``z`` per drawn slice (drawn order)."""

    patient_id: str
    study_uid: str
    series_uid: str
    series_number: int
    instance_numbers: np.ndarray
    z: np.ndarray
    pixel_spacing: float
    slice_thickness: float
    window: tuple[int, int]
    study_date: str


@dataclass(frozen=True)
class DatasetPlan:
    """A task dataset's checked arguments and its two image folders."""

    out_dir: Path
    train_dir: Path
    test_dir: Path
    patients: int
    size: int
    slices: tuple[int, int]


def start_dataset(task: str, out_dir, patients, size, slices, test_fraction, min_slices: int) -> DatasetPlan:
    """The 2019 synth's argument checks plus the task's fewest slices per series, then the folders."""
    low, high = _check_arguments(patients, size, slices, test_fraction)
    if low < min_slices:
        raise StackkitError(f"data synth --task {task}: --slices {low},{high} is too few; "
                            f"MIN must be at least {min_slices} to draw the anatomy")
    train_dir, test_dir = make_task_folders(out_dir)
    return DatasetPlan(Path(out_dir), train_dir, test_dir, int(patients), int(size), (low, high))


def make_task_folders(out_dir) -> tuple[Path, Path]:
    """train_images/ and test_images/ under ``out_dir``; refuses folders already holding .dcm files
    (two datasets mixed would be silently wrong)."""
    out_dir = Path(out_dir)
    folders = out_dir / TRAIN_IMAGES, out_dir / TEST_IMAGES
    for folder in folders:
        if folder.is_dir() and next(folder.rglob("*.dcm"), None) is not None:
            raise StackkitError(f"{folder}: already contains .dcm files; choose an empty --out folder or delete it first")
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StackkitError(f"{out_dir}: cannot create the dataset folders ({exc.strerror or exc})") from exc
    return folders


def split_test_patients(rng: np.random.Generator, patients: int, test_fraction: float) -> np.ndarray:
    """(patients,) bool: which patients form the test split (at least one of each split)."""
    n_test = int(round(patients * float(test_fraction)))
    n_test = min(max(n_test, 1 if test_fraction > 0 else 0), patients - 1)
    chosen = np.zeros(patients, dtype=bool)
    chosen[rng.choice(patients, size=n_test, replace=False)] = True
    return chosen


def draw_patients(seed: int, patients: int, test_fraction: float, id_range: tuple[int, int]):
    """(the dataset's random stream, one distinct number per patient in ``id_range``, the test split), drawn in that order."""
    rng = np.random.default_rng(seed)
    numbers = unique_numbers(rng, patients, *id_range)
    return rng, numbers, split_test_patients(rng, patients, test_fraction)


def unique_numbers(rng: np.random.Generator, count: int, low: int, high: int) -> np.ndarray:
    """``count`` distinct integers in [low, high), in drawn order (ids like the competitions' numbers)."""
    return rng.choice(np.arange(low, high), size=count, replace=False)


def slice_layout(n: int, rng: np.random.Generator, spacing: float, first: int = 1):
    """(instance numbers, z) of n slices drawn top (head) first: most series number them head first,
    some feet first, as scanners do; z falls from head to feet."""
    z = np.round(float(rng.uniform(-50.0, 50.0)) - spacing * np.arange(n) + rng.normal(0.0, 0.02, n), 3)
    numbers = first + np.arange(n)
    if rng.random() < 0.25:
        numbers = numbers[::-1].copy()
    return numbers, z


def write_series(folder: Path, hu: np.ndarray, spec: SeriesSpec, rng: np.random.Generator) -> None:
    """``hu`` (n, size, size) as n CT DICOM files ``<InstanceNumber>.dcm`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    n, size = len(hu), hu.shape[-1]
    encodings = rng.choice(["signed", "unsigned"], size=n)
    explicit = rng.random(n) < EXPLICIT_VR_FRACTION
    corner = round(-spec.pixel_spacing * size / 2.0, 3)
    center, width = spec.window
    for k in range(n):
        number = int(spec.instance_numbers[k])
        pixel_bytes, pixel_tags = _encode_pixels(hu[k], str(encodings[k]))
        header = dict(
            SOPInstanceUID=f"{spec.series_uid}.{number}", StudyDate=spec.study_date, Modality="CT",
            PatientID=spec.patient_id, StudyInstanceUID=spec.study_uid, SeriesInstanceUID=spec.series_uid,
            StudyID="", SeriesNumber=spec.series_number, InstanceNumber=number,
            ImagePositionPatient=[corner, corner, float(spec.z[k])], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            SliceThickness=spec.slice_thickness, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
            Rows=size, Columns=size, PixelSpacing=[spec.pixel_spacing, spec.pixel_spacing], BitsAllocated=16,
            **pixel_tags, WindowCenter=center, WindowWidth=width, RescaleSlope=1,
        )
        _write_file(folder / f"{number}.dcm", _dicom_bytes(header, pixel_bytes, bool(explicit[k])))


def study_date(rng: np.random.Generator, year: int) -> str:
    return f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    write_text(frame.to_csv(index=False, lineterminator="\n"), path)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel-centre coordinates in [-1, 1], each (size, size); y grows towards the patient's back."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="ij")


def add_noise(hu: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Scanner noise inside the body (not in the air around it)."""
    noise = rng.normal(0.0, sigma, size=hu.shape).astype(np.float32)
    return (hu + noise * (hu > -900)).astype(np.float32)
