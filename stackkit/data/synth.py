"""A synthetic dataset in the RSNA 2019 Intracranial Hemorrhage Detection layout.

``synthesize(out_dir)`` writes::

    out_dir/stage_2_train/<SOPInstanceUID>.dcm
    out_dir/stage_2_test/<SOPInstanceUID>.dcm
    out_dir/stage_2_train.csv          RSNA long format: ``ID,Label``, ``ID_<image>_<label>``
    out_dir/stage_2_test_labels.csv    the test split's labels, same format, held back: no pipeline
                                       step reads them; only scoring (the demo's verdict) does

Each study is a head CT volume drawn with numpy over the whole volume at once: air, a skull
ring, brain with sulci at its surface, two lateral ventricles (CSF), Gaussian noise. Lesions of
the five hemorrhage subtypes are 3D shapes (intraparenchymal blob, intraventricular fill,
epidural lens against the skull, subdural crescent along it, thin subarachnoid band in the
sulci) whose density fades at their ends (partial volume). A slice is labeled with a subtype
when that lesion's blood fraction reaches ``VISIBLE_WEIGHT`` in at least one pixel of the
slice (seen in the slice), and also, as annotators label the faint edge slices of a bleed from
the slices around them, when the fraction reaches only ``EDGE_WEIGHT`` (a few HU against
5 HU of noise: the slice's own pixels show little) next to a slice where it is seen. So
labels are contiguous along z, and a slice's label needs its neighbours; ``any`` is the
maximum of the five.

The files imitate the real data's headers: RSNA-style ids (``ID_<9 hex>``, not valid UIDs) for
PatientID, StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID; file name =
SOPInstanceUID; file names and file order carry no slice order; some series are stored
head-to-foot (z falls as InstanceNumber rises); an occasional duplicate z position; some
patients have two studies; WindowCenter/WindowWidth sometimes multi-valued. Most files are
Implicit VR Little Endian (like RSNA), a minority Explicit VR Little Endian.

Pixel encodings (HU = true Hounsfield units drawn by this module):

* ``signed`` (about 45%): int16, PixelRepresentation 1, BitsStored 16, slope 1, intercept
  -1024, stored = HU + 1024.  ``pydicom.pixels.apply_modality_lut`` gives HU.
* ``unsigned`` (about 45%): uint16, PixelRepresentation 0, BitsStored 12, slope 1, intercept
  -1024, stored = HU + 1024 (always 0..4095).  ``apply_modality_lut`` gives HU.
* ``quirk`` (about 10%), the known RSNA defect: the scanner wrote HU as 12-bit two's
  complement but the header says unsigned: PixelRepresentation 0, BitsAllocated 16,
  BitsStored 12, HighBit 11, RescaleSlope 1, RescaleIntercept 0 (> -100, unlike every healthy
  file), stored = HU mod 4096 (air at -1000 HU is stored as 3096). ``apply_modality_lut``
  alone gives wrong values (air = +3096). How to recover HU::

      quirk = PixelRepresentation == 0 and BitsStored == 12 and RescaleIntercept > -100
      x = ds.pixel_array.astype(np.int32)
      if quirk:
          x[x >= 2048] -= 4096          # reinterpret the 12 stored bits as signed
      hu = x * RescaleSlope + RescaleIntercept

  HU in quirk files lies within [-1000, 2047], so the popular Kaggle variant of the fix
  (``x = x + 1000; x[x >= 4096] -= 4096; intercept = -1000``) gives the same HU.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS
from stackkit.errors import StackkitError
from stackkit.contract.io import write_text
from stackkit.data.decoding import quiet_rsna_ids

SUBTYPES = LABELS[:5]
TRAIN_DIR = "stage_2_train"
TEST_DIR = "stage_2_test"
TRAIN_CSV = "stage_2_train.csv"
# The test split's labels, kept apart from the inputs (Kaggle's hidden answers): only scoring reads them.
HELD_OUT_CSV = "stage_2_test_labels.csv"

# Blood fraction a pixel needs before the lesion counts as visible in that slice.
VISIBLE_WEIGHT = 0.3
# Blood fraction of a bleed's faint edge slice, labeled positive when a neighbouring slice shows
# the bleed (partial volume: the annotator read it from the slices around it).
EDGE_WEIGHT = 0.02
FIELD_OF_VIEW_MM = 250.0
SLICE_SPACING_MM = 5.0
QUIRK_FRACTION = 0.10
EXPLICIT_VR_FRACTION = 0.15
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Fixed (not the pydicom version's) so the same seed gives the same bytes across pydicom versions.
IMPLEMENTATION_UID = "2.25.98765432109876543210987654321"

# Probability that a study with hemorrhage has each subtype (epidural rarest).
SUBTYPE_PROBABILITY = {
    "epidural": 0.10,
    "intraparenchymal": 0.45,
    "intraventricular": 0.30,
    "subarachnoid": 0.40,
    "subdural": 0.40,
}
STUDY_HEMORRHAGE_PROBABILITY = 0.66


def _check_arguments(patients, size, slices, test_fraction) -> tuple[int, int]:
    if int(patients) < 2:
        raise StackkitError(f"data synth: --patients {patients} is too few; need at least 2 (one train, one test)")
    if not 16 <= int(size) <= 1024:
        raise StackkitError(f"data synth: --size {size} is out of range; use 16..1024 pixels")
    try:
        low, high = (int(v) for v in slices)
    except (TypeError, ValueError):
        raise StackkitError(f"data synth: --slices {slices!r} must be two integers MIN,MAX") from None
    if not 1 <= low <= high <= 512:
        raise StackkitError(f"data synth: --slices {low},{high} must satisfy 1 <= MIN <= MAX <= 512")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise StackkitError(f"data synth: test fraction {test_fraction} must be in [0, 1)")
    return low, high


class _IdMaker:
    """Unique RSNA-style ids ``ID_<9 hex>`` drawn from the seeded generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.used: set[str] = set()

    def __call__(self) -> str:
        while True:
            value = f"ID_{int(self.rng.integers(0, 16**9)):09x}"
            if value not in self.used:
                self.used.add(value)
                return value


# --- anatomy and lesions, vectorized over the whole volume -----------------------------------


@dataclass
class _Geometry:
    """Normalized coordinates of every voxel (slices, rows, cols) and the head's regions."""

    xn: np.ndarray  # in-plane coordinates scaled by the head section: the brain is ~unit size
    yn: np.ndarray
    u: np.ndarray  # position along the head axis, -1 (skull base) .. 1 (vertex); shape (n, 1, 1)
    radius: np.ndarray  # elliptic radius; skull between INNER and 1
    angle: np.ndarray
    brain: np.ndarray
    ventricles: np.ndarray
    sulci: np.ndarray


HEAD_AX, HEAD_AY = 0.78, 0.90  # head semi-axes as a fraction of half the field of view
INNER = 0.90  # inner skull surface (elliptic radius)


def _geometry(u: np.ndarray, size: int) -> _Geometry:
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(grid, grid, indexing="ij")
    u = u.astype(np.float32).reshape(-1, 1, 1)
    section = np.sqrt(np.clip(1.0 - (0.92 * u) ** 2, 0.12, 1.0))  # head narrows towards both ends
    xn = x[None] / (HEAD_AX * section)
    yn = y[None] / (HEAD_AY * section)
    radius = np.sqrt(xn**2 + yn**2)
    angle = np.arctan2(yn, xn)
    brain = radius <= INNER
    # Lateral ventricles: two ellipses, present in the middle of the head.
    vent_extent = np.sqrt(np.clip(1.0 - ((u - 0.1) / 0.45) ** 2, 0.0, 1.0))
    ventricles = np.zeros_like(brain)
    for side in (-1.0, 1.0):
        ventricles |= ((xn - side * 0.13) / 0.07) ** 2 + ((yn + 0.05) / 0.28) ** 2 <= vent_extent**2
    ventricles &= brain & (vent_extent > 0)
    sulci = brain & (radius > INNER - 0.05)
    return _Geometry(xn, yn, u, radius, angle, brain, ventricles, sulci)


def _soft(value: np.ndarray, edge: float) -> np.ndarray:
    """1 well inside (value <= 1 - edge), falling linearly to 0 at value = 1: partial volume."""
    return np.clip((1.0 - value) / edge, 0.0, 1.0)


def _angle_gap(angle: np.ndarray, center: float) -> np.ndarray:
    return np.abs(np.angle(np.exp(1j * (angle - center))))


def _lesion_weight(kind: str, geo: _Geometry, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Blood fraction in [0, 1] for every voxel and the blood density (HU) of one lesion."""
    center_u = float(rng.uniform(-0.5, 0.6))
    half_u = float(rng.uniform(0.2, 0.55))
    along = (geo.u - center_u) / half_u  # -1..1 inside the lesion's z extent
    # Denser in the middle, faint towards the ends along z.
    z_profile = _soft(along**2, 0.6) * (0.45 + 0.55 * np.sqrt(np.clip(1.0 - along**2, 0.0, 1.0)))
    if kind == "intraparenchymal":
        r = float(rng.uniform(0.0, 0.5))
        theta = float(rng.uniform(-np.pi, np.pi))
        cx, cy = r * np.cos(theta), r * np.sin(theta)
        ax, ay = rng.uniform(0.1, 0.22, size=2)
        shape = ((geo.xn - cx) / ax) ** 2 + ((geo.yn - cy) / ay) ** 2 + along**2
        weight = _soft(shape, 0.35) * z_profile * (geo.brain & ~geo.ventricles)
        density = rng.uniform(60, 85)
    elif kind == "intraventricular":
        side = float(rng.choice([-1.0, 1.0]))
        shape = ((geo.xn - side * 0.13) / 0.12) ** 2 + ((geo.yn + float(rng.uniform(-0.1, 0.1))) / 0.3) ** 2 + along**2
        weight = _soft(shape, 0.5) * z_profile * geo.ventricles
        density = rng.uniform(50, 75)
    elif kind == "epidural":
        theta = float(rng.uniform(-np.pi, np.pi))
        span = float(rng.uniform(0.35, 0.6))
        depth = float(rng.uniform(0.08, 0.16))
        # Lens: thickest mid-arc, thinning to nothing at both ends of the arc.
        gap = _angle_gap(geo.angle, theta) / span
        thickness = depth * np.sqrt(np.clip(1.0 - gap**2, 0.0, 1.0)) * np.sqrt(np.clip(1.0 - along**2, 0.0, 1.0))
        inside = (INNER - geo.radius) / np.maximum(thickness, 1e-6)
        weight = _soft(inside, 0.3) * (thickness > 0.01) * z_profile * geo.brain
        density = rng.uniform(65, 90)
    elif kind == "subdural":
        theta = float(rng.uniform(-np.pi, np.pi))
        span = float(rng.uniform(0.8, 1.6))
        depth = float(rng.uniform(0.04, 0.09))
        gap = _angle_gap(geo.angle, theta) / span
        inside = (INNER - geo.radius) / depth
        weight = _soft(inside, 0.35) * _soft(gap, 0.3) * z_profile * geo.brain
        density = rng.uniform(55, 85)
    elif kind == "subarachnoid":
        theta = float(rng.uniform(-np.pi, np.pi))
        span = float(rng.uniform(0.6, 1.4))
        gap = _angle_gap(geo.angle, theta) / span
        weight = _soft(gap, 0.4) * z_profile * geo.sulci
        density = rng.uniform(45, 70)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    return weight.astype(np.float32), float(density)


def _annotate(weight: np.ndarray) -> np.ndarray:
    """Per slice (axis 0, in z order) of one lesion's blood fraction: seen in the slice, or a faint
    edge slice next to one where it is seen (the annotator's reading of the surrounding slices)."""
    from scipy.ndimage import binary_dilation

    seen = (weight >= VISIBLE_WEIGHT).any(axis=(1, 2))
    reached = (weight >= EDGE_WEIGHT).any(axis=(1, 2))
    return seen | (reached & binary_dilation(seen))


def _draw_study(u: np.ndarray, size: int, rng: np.random.Generator, has_hemorrhage: bool):
    """(hu volume float32 (n, size, size), labels int8 (n, 6)) for slices at head positions u."""
    geo = _geometry(u, size)
    noise = rng.normal(0.0, 5.0, size=geo.brain.shape).astype(np.float32)
    # Grey/white matter contrast as a smooth in-plane pattern.
    texture = 4.0 * np.sin(5.0 * geo.xn + float(rng.uniform(0, 6))) * np.cos(4.0 * geo.yn)
    hu = np.full(geo.brain.shape, -1000.0, dtype=np.float32)
    skull = (geo.radius <= 1.0) & ~geo.brain
    hu[skull] = 900.0 + 300.0 * rng.random(int(skull.sum()), dtype=np.float32)
    hu = np.where(geo.brain, 34.0 + texture, hu)
    hu = np.where(geo.sulci, 14.0, hu)
    hu = np.where(geo.ventricles, 6.0, hu)
    labels = np.zeros((len(u), len(LABELS)), dtype=np.int8)
    if has_hemorrhage:
        chosen = [k for k in SUBTYPES if rng.random() < SUBTYPE_PROBABILITY[k]] or ["intraparenchymal"]
        for kind in chosen:
            weight, density = _lesion_weight(kind, geo, rng)
            hu = hu * (1.0 - weight) + density * weight
            labels[:, LABELS.index(kind)] = _annotate(weight)
    labels[:, -1] = labels[:, :5].max(axis=1)
    hu = hu + noise * (hu > -900)
    return hu, labels


# --- DICOM encoding --------------------------------------------------------------------------


def _encode_pixels(hu: np.ndarray, encoding: str) -> tuple[bytes, dict]:
    if encoding == "signed":
        stored = np.clip(np.rint(hu), -1024, 3071).astype(np.int16) + np.int16(1024)
        tags = dict(PixelRepresentation=1, BitsStored=16, HighBit=15, RescaleIntercept=-1024)
    elif encoding == "unsigned":
        stored = (np.clip(np.rint(hu), -1024, 3071) + 1024).astype(np.uint16)
        tags = dict(PixelRepresentation=0, BitsStored=12, HighBit=11, RescaleIntercept=-1024)
    else:  # the RSNA quirk: 12-bit two's complement HU declared unsigned, intercept 0
        value = np.clip(np.rint(hu), -1000, 2047).astype(np.int32)
        stored = np.mod(value, 4096).astype(np.uint16)
        tags = dict(PixelRepresentation=0, BitsStored=12, HighBit=11, RescaleIntercept=0)
    return stored.astype(stored.dtype.newbyteorder("<")).tobytes(), tags


def _dicom_bytes(header: dict, pixel_bytes: bytes, explicit: bool) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = header["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "STACKKIT_SYNTH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixel_bytes
    ds["PixelData"].VR = "OW"
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    # Temp name then rename: an interrupted run never leaves a truncated .dcm under its real name.
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- the dataset -----------------------------------------------------------------------------


def _study_positions(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Physical z of each instance (InstanceNumber order) and its head position u in -1..1."""
    spacing = SLICE_SPACING_MM * float(rng.uniform(0.95, 1.05))
    ascending = np.float64(rng.uniform(-80, 20)) + spacing * np.arange(n) + rng.normal(0, 0.05, n)
    if n > 3 and rng.random() < 0.08:
        k = int(rng.integers(1, n))
        ascending[k] = ascending[k - 1]  # duplicate position, as in the real data
    ascending = np.round(ascending, 3)
    extent = max(spacing * (n - 1), 1e-6)
    u = (ascending - ascending[0]) / extent * 1.8 - 0.9
    if rng.random() < 0.3:  # stored head-to-foot: InstanceNumber 1 is the top slice
        return ascending[::-1].copy(), u[::-1].copy()
    return ascending, u


@dataclass(frozen=True)
class SynthResult:
    """What one `data synth` wrote (stackkit/cli.py renders it)."""

    out_dir: Path
    patients: int
    train_patients: int
    test_patients: int
    studies: int
    train_images: int
    test_images: int
    labels_csv: Path  # stage_2_train.csv
    held_out_labels_csv: Path  # the test split's labels, which no step reads
    prevalence: dict  # label -> share of positive training images
    digest: str  # of the training labels: equal for equal datasets


def synthesize(
    out_dir,
    *,
    patients: int = 40,
    size: int = 64,
    slices: tuple[int, int] = (16, 32),
    test_fraction: float = 0.25,
    seed: int = 0,
    progress: bool = True,
) -> SynthResult:
    """Write a synthetic RSNA 2019 style dataset under ``out_dir``; return what it wrote.

    Deterministic: the same arguments give byte-identical files. Train/test split by patient.
    Refuses a folder whose stage_2_train/ or stage_2_test/ already holds .dcm files (a mix of
    two datasets would be silently wrong).
    """
    low, high = _check_arguments(patients, size, slices, test_fraction)
    patients, size = int(patients), int(size)
    out_dir = Path(out_dir)
    train_dir, test_dir = _make_dataset_folders(out_dir)

    rng = np.random.default_rng(seed)
    new_id = _IdMaker(rng)
    n_test = int(round(patients * float(test_fraction)))
    n_test = min(max(n_test, 1 if test_fraction > 0 else 0), patients - 1)
    patient_ids = [new_id() for _ in range(patients)]
    test_patients = set(rng.choice(patients, size=n_test, replace=False).tolist()) if n_test else set()
    plan = []  # (patient_index, study count) -> number of slices, to size the progress bar
    for p in range(patients):
        for _ in range(2 if rng.random() < 0.15 else 1):
            plan.append((p, int(rng.integers(low, high + 1))))

    from tqdm.auto import tqdm

    label_rows: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    label_ids: dict[str, list[str]] = {"train": [], "test": []}
    counts = {"train": 0, "test": 0}
    bar = tqdm(total=sum(n for _, n in plan), desc="data synth", unit="file", disable=not progress)
    with quiet_rsna_ids(), bar:
        for study_number, (p, n) in enumerate(plan):
            split = "test" if p in test_patients else "train"
            image_ids, labels = _write_study(test_dir if split == "test" else train_dir, patient_ids[p], study_number, n,
                                             size, rng, new_id, bar)
            counts[split] += n
            label_ids[split] += image_ids
            label_rows[split].append(labels)

    label_matrix = _write_long_labels(out_dir / TRAIN_CSV, label_ids["train"], label_rows["train"])
    _write_long_labels(out_dir / HELD_OUT_CSV, label_ids["test"], label_rows["test"])

    prevalence = {label: round(float(label_matrix[:, i].mean()), 4) if len(label_matrix) else 0.0 for i, label in enumerate(LABELS)}
    return SynthResult(out_dir=out_dir, patients=patients, train_patients=patients - n_test, test_patients=n_test, studies=len(plan),
                       train_images=counts["train"], test_images=counts["test"], labels_csv=out_dir / TRAIN_CSV,
                       held_out_labels_csv=out_dir / HELD_OUT_CSV, prevalence=prevalence,
                       digest=_dataset_digest(label_ids["train"], label_matrix))


def _write_long_labels(path: Path, image_ids: list[str], rows: list[np.ndarray]) -> np.ndarray:
    """The RSNA long label CSV (six rows per image in contract label order); returns the (n, 6) matrix."""
    matrix = np.concatenate(rows).astype(np.int8) if rows else np.zeros((0, len(LABELS)), np.int8)
    long_ids = [f"{image_id}_{label}" for image_id in image_ids for label in LABELS]
    csv = pd.DataFrame({"ID": long_ids, "Label": matrix.reshape(-1)})
    write_text(csv.to_csv(index=False, lineterminator="\n"), path)
    return matrix


def _make_dataset_folders(out_dir: Path) -> tuple[Path, Path]:
    """stage_2_train/ and stage_2_test/ under ``out_dir``; refuses folders that already hold .dcm files
    (a mix of two datasets would be silently wrong)."""
    train_dir, test_dir = out_dir / TRAIN_DIR, out_dir / TEST_DIR
    for folder in (train_dir, test_dir):
        if folder.is_dir() and any(folder.glob("*.dcm")):
            raise StackkitError(f"{folder}: already contains .dcm files; choose an empty --out folder or delete it first")
    try:
        train_dir.mkdir(parents=True, exist_ok=True)
        test_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StackkitError(f"{out_dir}: cannot create the dataset folders ({exc.strerror or exc})") from exc
    return train_dir, test_dir


def _write_study(folder: Path, patient_id: str, study_number: int, n: int, size: int, rng, new_id, bar) -> tuple[list[str], np.ndarray]:
    """One study's n DICOM files into ``folder``; returns their image ids and (n, 6) labels.

    The random draws happen in a fixed order, so a seed gives byte-identical files."""
    pixel_spacing = round(FIELD_OF_VIEW_MM / size, 6)
    study_id, series_id = new_id(), new_id()
    z, u = _study_positions(n, rng)
    hu, labels = _draw_study(u, size, rng, rng.random() < STUDY_HEMORRHAGE_PROBABILITY)
    encodings = rng.choice(["signed", "unsigned", "quirk"], size=n, p=[0.45, 0.45, QUIRK_FRACTION])
    explicit = rng.random(n) < EXPLICIT_VR_FRACTION
    multi_window = rng.random() < 0.3
    center, width = [(40, 80), (36, 80), (30, 80), (40, 150)][int(rng.integers(0, 4))]
    corner = [round(-FIELD_OF_VIEW_MM / 2 + float(v), 3) for v in rng.normal(0, 3, 2)]
    date = f"2019{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    image_ids = []
    for k in range(n):
        image_id = new_id()
        pixel_bytes, pixel_tags = _encode_pixels(hu[k], str(encodings[k]))
        header = dict(
            SOPInstanceUID=image_id,
            StudyDate=date,
            Modality="CT",
            PatientID=patient_id,
            StudyInstanceUID=study_id,
            SeriesInstanceUID=series_id,
            StudyID="",
            SeriesNumber=1 + study_number % 9,
            InstanceNumber=k + 1,
            ImagePositionPatient=[corner[0], corner[1], float(z[k])],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            SliceThickness=SLICE_SPACING_MM,
            SamplesPerPixel=1,
            PhotometricInterpretation="MONOCHROME2",
            Rows=size,
            Columns=size,
            PixelSpacing=[pixel_spacing, pixel_spacing],
            BitsAllocated=16,
            **pixel_tags,  # PixelRepresentation, BitsStored, HighBit, RescaleIntercept
            WindowCenter=[center, center] if multi_window else center,
            WindowWidth=[width, width] if multi_window else width,
            RescaleSlope=1,
        )
        _write_file(folder / f"{image_id}.dcm", _dicom_bytes(header, pixel_bytes, bool(explicit[k])))
        image_ids.append(image_id)
        bar.update(1)
    return image_ids, np.asarray(labels, dtype=np.int8).reshape(n, len(LABELS))


def _dataset_digest(image_ids, label_matrix) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(image_ids).encode())
    digest.update(np.ascontiguousarray(label_matrix).tobytes())
    return digest.hexdigest()[:16]
