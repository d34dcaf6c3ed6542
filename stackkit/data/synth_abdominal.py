"""A synthetic dataset in the RSNA 2023 Abdominal Trauma Detection layout.

``synthesize_abdominal(out_dir)`` writes::

    out_dir/train_images/<patient_id>/<series_id>/<instance_number>.dcm   one or two series per patient
    out_dir/test_images/<patient_id>/<series_id>/<instance_number>.dcm
    out_dir/train.csv               patient_id, bowel_healthy, bowel_injury, extravasation_healthy,
                                    extravasation_injury, kidney_healthy, kidney_low, kidney_high,
                                    liver_*, spleen_* (the same three), any_injury: 0/1, one class per group
    out_dir/train_series_meta.csv   patient_id, series_id, aortic_hu, incomplete_organ (0/1)
    out_dir/test_series_meta.csv    patient_id, series_id, aortic_hu
    out_dir/image_level_labels.csv  patient_id, series_id, instance_number, injury_name: each image
                                    showing a bowel injury (``Bowel``) or active extravasation
                                    (``Active_Extravasation``), in every series of a training patient
    out_dir/sample_submission.csv   patient_id and the 13 probability columns (uniform per group)
    out_dir/test_labels.csv         the test patients' labels in train.csv's format, held back: no
                                    pipeline step reads them, only scoring

Ids are numbers as in the competition (patient 10000..65534, series 100..65534); instance numbers
start anywhere (file names are not positions) and most series number from the head down.

Each patient's anatomy is drawn once, in patient coordinates ``u`` (0 at the diaphragm, 1 at the
pelvis), and every series samples it at its own slices, with its own contrast phase
(``aortic_hu``: the aorta's HU, about 130-220 portal venous, 250-400 arterial; the organs enhance
with it) and noise: body with subcutaneous fat, spine, aorta, liver, spleen, two kidneys (soft
tissue ellipses whose section follows their z extent), bowel loops holding air or fluid. An organ
injury is a darker region (45 HU below the organ) whose z extent grades it: ``low`` covers
``LOW_EXTENT`` of the organ's length, ``high`` ``HIGH_EXTENT``, so the grade needs the slices of
the whole organ. Bowel injury is free air beside a bowel loop, active extravasation a blush of
contrast brighter than the aorta, each over a few slices. A second series is sometimes cut at
the top (``incomplete_organ`` 1), missing the top of the liver and spleen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.data.synth_ct import (HELD_OUT_CSV, SAMPLE_SUBMISSION, TRAIN_CSV, SeriesSpec, add_noise, grid, slice_layout,
                                    draw_patients, start_dataset, study_date, unique_numbers, write_csv, write_series)

TASK = "rsna2023-abdominal"
ORGANS = ("kidney", "liver", "spleen")
GRADES = ("healthy", "low", "high")
LABEL_COLUMNS = (("patient_id", "bowel_healthy", "bowel_injury", "extravasation_healthy", "extravasation_injury")
                 + tuple(f"{o}_{g}" for o in ORGANS for g in GRADES) + ("any_injury",))
SERIES_META_CSV = "train_series_meta.csv"
TEST_SERIES_META_CSV = "test_series_meta.csv"
IMAGE_LABELS_CSV = "image_level_labels.csv"
SERIES_META_COLUMNS = ("patient_id", "series_id", "aortic_hu", "incomplete_organ")
IMAGE_LABEL_COLUMNS = ("patient_id", "series_id", "instance_number", "injury_name")
INJURY_NAMES = {"bowel": "Bowel", "extravasation": "Active_Extravasation"}
UID_ROOT = "1.2.123.12345.1.2.3"
MIN_SLICES = 16  # a lesion's z extent (>= 0.08) then always holds a slice
DEFAULT_SLICES = (24, 32)
# Fraction of the organ's z length an injury covers, by grade.
LOW_EXTENT, HIGH_EXTENT = (0.10, 0.25), (0.55, 0.80)
# Injuries far more common than in the competition (any_injury about 2/3 here, 0.27 there): a demo's
# few dozen patients still hold positives of every class.
GRADE_PROBABILITY = {"kidney": (0.85, 0.075, 0.075), "liver": (0.8, 0.1, 0.1), "spleen": (0.8, 0.1, 0.1)}
BOWEL_PROBABILITY, EXTRAVASATION_PROBABILITY, TWO_SERIES_PROBABILITY = 0.12, 0.15, 0.4
ABDOMEN_LENGTH_MM, FIELD_OF_VIEW_MM = 350.0, 360.0
INJURY_DROP_HU = 45.0
# organ -> z0, z1 (u), centre x, y, semi-axes x, y, HU = base + gain * aortic_hu. x < 0 is the
# image's left, the patient's right (liver); the kidney is mirrored to both sides.
ORGAN_SHAPES = {
    "kidney": (0.35, 0.72, 0.30, 0.30, 0.11, 0.15, 40.0, 0.45),
    "liver": (0.02, 0.55, -0.38, -0.02, 0.34, 0.40, 55.0, 0.12),
    "spleen": (0.05, 0.42, 0.50, 0.08, 0.16, 0.24, 50.0, 0.15),
}


@dataclass(frozen=True)
class Anatomy:
    """One patient, drawn once: ``organs`` name -> (z0, z1, cx, cy, ax, ay, base, gain); ``injury``
    name -> (low extent, high extent, position along the organ, dx, dy, kidney side); ``loops``
    (k, 6): cx, cy, r, z0, z1, air; ``bowel`` and ``blush``: cx, cy, r, z0, z1 of each lesion."""

    organs: dict
    injury: dict
    loops: np.ndarray
    bowel: tuple
    blush: tuple
    texture_phase: float


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    organs, injury = {}, {}
    for name, (z0, z1, cx, cy, ax, ay, base, gain) in ORGAN_SHAPES.items():
        dz0, dz1, dx, dy = rng.normal(0.0, 0.02, 4)
        scale = rng.uniform(0.9, 1.1, 2)
        organs[name] = (z0 + dz0, z1 + dz1, cx + dx, cy + dy, ax * scale[0], ay * scale[1], base, gain)
        injury[name] = (rng.uniform(*LOW_EXTENT), rng.uniform(*HIGH_EXTENT), rng.random(), *rng.normal(0.0, 0.1, 2),
                        int(rng.integers(2)))
    k = 6
    centre, half = rng.uniform(0.55, 0.85, k), rng.uniform(0.08, 0.15, k)
    loops = np.column_stack([rng.uniform(-0.45, 0.45, k), rng.uniform(-0.45, 0.1, k), rng.uniform(0.07, 0.11, k),
                             centre - half, centre + half, rng.random(k) < 0.5])
    angle, at, half = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 0.8), rng.uniform(0.04, 0.07)
    cx, cy, r = loops[0, :3]
    bowel = (cx + 1.6 * r * np.cos(angle), cy + 1.6 * r * np.sin(angle), 0.05, at - half, at + half)
    at, half = rng.uniform(0.2, 0.85), rng.uniform(0.04, 0.07)
    blush = (rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.2), rng.uniform(0.04, 0.07), at - half, at + half)
    return Anatomy(organs, injury, loops, bowel, blush, float(rng.uniform(0, 6)))


def _ellipse(x, y, u, centre, axes, extent) -> np.ndarray:
    """(n, size, size) mask of an ellipsoid-like organ (``centre`` cx, cy; ``axes`` ax, ay; ``extent``
    z0, z1 in u) whose section shrinks towards both z ends."""
    (cx, cy), (ax, ay), (z0, z1) = centre, axes, extent
    along = (u - (z0 + z1) / 2.0) / max((z1 - z0) / 2.0, 1e-6)
    section = np.sqrt(np.clip(1.0 - along**2, 0.0, 1.0))[:, None, None]
    return (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= section**2) & (section > 0)


def _body(u, x, y, aortic_hu: float, anatomy: Anatomy) -> np.ndarray:
    radius = np.sqrt((x / 0.88) ** 2 + (y / 0.70) ** 2)
    texture = 5.0 * np.sin(6.0 * x + anatomy.texture_phase) * np.cos(5.0 * y)
    hu = np.where(radius <= 0.9, 35.0 + texture, np.where(radius <= 1.0, -100.0, -1000.0))
    hu = np.where(x**2 + (y - 0.42) ** 2 <= 0.12**2, 450.0, hu)  # vertebral body
    hu = np.where(x**2 + (y - 0.58) ** 2 <= 0.05**2, 15.0, hu)  # spinal canal
    hu = np.where((x - 0.06) ** 2 + (y - 0.22) ** 2 <= 0.055**2, aortic_hu, hu)  # aorta
    hu = np.broadcast_to(hu, (len(u),) + hu.shape).astype(np.float32)
    for cx, cy, r, z0, z1, air in anatomy.loops:
        wall = _ellipse(x, y, u, (cx, cy), (r, r), (z0, z1))
        lumen = _ellipse(x, y, u, (cx, cy), (0.6 * r, 0.6 * r), (z0, z1))
        hu = np.where(wall, np.where(lumen, -700.0 if air else 15.0, 45.0), hu)
    return hu


def _organ(x, y, u, anatomy: Anatomy, name: str, grade: int):
    """(organ mask, injury mask) of one organ (both kidneys for ``kidney``, the injury in one)."""
    z0, z1, cx, cy, ax, ay, _, _ = anatomy.organs[name]
    low, high, position, dx, dy, side = anatomy.injury[name]
    sides = (cx, -cx) if name == "kidney" else (cx,)
    masks = [_ellipse(x, y, u, (s, cy), (ax, ay), (z0, z1)) for s in sides]
    extent = (low, high)[grade - 1] if grade else 0.0
    start = z0 + position * (1.0 - extent) * (z1 - z0)
    hurt_cx = sides[side % len(sides)] + dx * ax
    spread = 0.35 + 0.15 * grade  # a high-grade injury is also wider
    inside = ((x - hurt_cx) / (ax * spread)) ** 2 + ((y - cy - dy * ay) / (ay * spread)) ** 2 <= 1.0
    along = ((u >= start) & (u <= start + extent * (z1 - z0)))[:, None, None]
    injury = masks[side % len(sides)] & inside & along & (grade > 0)
    return np.logical_or.reduce(masks), injury


def render(u: np.ndarray, size: int, anatomy: Anatomy, grades: dict, aortic_hu: float, rng: np.random.Generator):
    """(hu (n, size, size), truth) of one series at patient positions ``u``. ``grades``: organ -> 0/1/2
    (healthy/low/high), ``bowel`` and ``extravasation`` -> 0/1. ``truth`` per slice (n,) bool:
    ``<organ>`` present, ``<organ>_injury`` its injury shown, ``bowel``, ``extravasation``."""
    y, x = grid(size)
    u = np.asarray(u, dtype=np.float32)
    hu = _body(u, x, y, aortic_hu, anatomy)
    truth = {}
    for name in ORGANS:
        organ, injury = _organ(x, y, u, anatomy, name, int(grades.get(name, 0)))
        _, _, _, _, _, _, base, gain = anatomy.organs[name]
        hu = np.where(organ, base + gain * aortic_hu - INJURY_DROP_HU * injury, hu)
        truth[name], truth[f"{name}_injury"] = organ.any(axis=(1, 2)), injury.any(axis=(1, 2))
    for lesion, (cx, cy, r, z0, z1), value in (("bowel", anatomy.bowel, -600.0), ("extravasation", anatomy.blush, aortic_hu + 80.0)):
        mask = _ellipse(x, y, u, (cx, cy), (r, r), (z0, z1)) & bool(grades.get(lesion, 0))
        hu = np.where(mask, value, hu)
        truth[lesion] = mask.any(axis=(1, 2))
    return add_noise(hu, rng, 8.0), truth


def _choose_grades(rng: np.random.Generator) -> dict:
    grades = {name: int(rng.choice(3, p=GRADE_PROBABILITY[name])) for name in ORGANS}
    grades["bowel"] = int(rng.random() < BOWEL_PROBABILITY)
    grades["extravasation"] = int(rng.random() < EXTRAVASATION_PROBABILITY)
    return grades


def _coverage(n: int, rng: np.random.Generator, incomplete: bool) -> np.ndarray:
    """Patient positions u of n slices, top first; an incomplete series starts below the liver's top."""
    top = rng.uniform(0.12, 0.2) if incomplete else rng.uniform(-0.08, -0.03)
    return np.linspace(top, rng.uniform(1.02, 1.08), n)


def _write_patient(folder: Path, patient: int, series_ids, slice_counts, size: int, rng: np.random.Generator):
    """One patient's series; returns (grades, series meta rows, image-level label rows)."""
    grades, anatomy = _choose_grades(rng), draw_anatomy(rng)
    meta, images = [], []
    arterial_first = rng.random() < 0.5
    for i, (series, n) in enumerate(zip(series_ids, slice_counts)):
        incomplete = i == 1 and rng.random() < 0.3
        aortic = float(rng.uniform(250, 400) if (i == 0) == arterial_first else rng.uniform(130, 220))
        hu, truth = render(_coverage(n, rng, incomplete), size, anatomy, grades, aortic, rng)
        spacing = round(ABDOMEN_LENGTH_MM / n * float(rng.uniform(0.95, 1.05)), 3)
        numbers, z = slice_layout(n, rng, spacing, first=int(rng.integers(1, 300)))
        uid = f"{UID_ROOT}.{patient}"
        spec = SeriesSpec(str(patient), uid, f"{uid}.{series}", int(series), numbers, z, round(FIELD_OF_VIEW_MM / size, 6),
                          spacing, (40, 400), study_date(rng, 2023))
        write_series(folder / str(patient) / str(series), hu, spec, rng)
        meta.append((patient, int(series), round(aortic, 2), int(incomplete)))
        for lesion, name in INJURY_NAMES.items():
            images += [(patient, int(series), int(number), name) for number in np.sort(numbers[truth[lesion]])]
    return grades, meta, images


def _label_table(patients: np.ndarray, grades: list[dict]) -> pd.DataFrame:
    columns = {"patient_id": patients}
    for group in ("bowel", "extravasation"):
        hurt = np.array([g[group] for g in grades], dtype=np.int8)
        columns[f"{group}_healthy"], columns[f"{group}_injury"] = 1 - hurt, hurt
    for organ in ORGANS:
        grade = np.array([g[organ] for g in grades])
        columns.update({f"{organ}_{name}": (grade == k).astype(np.int8) for k, name in enumerate(GRADES)})
    table = pd.DataFrame(columns)
    table["any_injury"] = (1 - table[[c for c in LABEL_COLUMNS if c.endswith("_healthy")]].min(axis=1)).astype(np.int8)
    return table[list(LABEL_COLUMNS)]


def _sample_submission(patients: np.ndarray) -> pd.DataFrame:
    sample = pd.DataFrame({"patient_id": patients})
    for column in LABEL_COLUMNS[1:-1]:
        sample[column] = 0.5 if column.split("_")[0] in INJURY_NAMES else round(1 / 3, 6)
    return sample


def synthesize_abdominal(out_dir, *, patients: int = 40, size: int = 64, slices=DEFAULT_SLICES, test_fraction: float = 0.25,
                         seed: int = 0, progress: bool = True) -> dict:
    """Write the dataset under ``out_dir`` (see the module docstring); return a summary dict.
    Deterministic: the same arguments give byte-identical files."""
    plan = start_dataset(TASK, out_dir, patients, size, slices, test_fraction, MIN_SLICES)
    (low, high), patients, size, out_dir = plan.slices, plan.patients, plan.size, plan.out_dir
    rng, numbers, is_test = draw_patients(seed, patients, test_fraction, (10000, 65535))
    ids = np.sort(numbers)
    per_patient = np.where(rng.random(patients) < TWO_SERIES_PROBABILITY, 2, 1)
    series_ids = np.split(unique_numbers(rng, int(per_patient.sum()), 100, 65535), np.cumsum(per_patient)[:-1])
    grades, meta, images, n_images = [], [], [], np.zeros(patients, dtype=np.int64)

    from tqdm.auto import tqdm

    for p in tqdm(range(patients), desc=f"data synth {TASK}", unit="patient", disable=not progress):
        counts = [int(rng.integers(low, high + 1)) for _ in series_ids[p]]
        folder = plan.test_dir if is_test[p] else plan.train_dir
        g, m, i = _write_patient(folder, int(ids[p]), series_ids[p], counts, size, rng)
        grades.append(g)
        meta += m
        images += i if not is_test[p] else []
        n_images[p] = sum(counts)
    table = _label_table(ids, grades)
    meta = pd.DataFrame(meta, columns=list(SERIES_META_COLUMNS))
    in_test = meta["patient_id"].isin(ids[is_test])
    write_csv(table[~is_test], out_dir / TRAIN_CSV)
    write_csv(table[is_test], out_dir / HELD_OUT_CSV)
    write_csv(meta[~in_test], out_dir / SERIES_META_CSV)
    write_csv(meta.loc[in_test, list(SERIES_META_COLUMNS[:3])], out_dir / TEST_SERIES_META_CSV)
    write_csv(pd.DataFrame(images, columns=list(IMAGE_LABEL_COLUMNS)), out_dir / IMAGE_LABELS_CSV)
    write_csv(_sample_submission(ids[is_test]), out_dir / SAMPLE_SUBMISSION)
    return {"task": TASK, "out_dir": str(out_dir), "patients": patients, "train_patients": int((~is_test).sum()),
            "test_patients": int(is_test.sum()), "series": len(meta), "train_images": int(n_images[~is_test].sum()),
            "test_images": int(n_images[is_test].sum()), "held_out_labels_csv": str(out_dir / HELD_OUT_CSV),
            "prevalence": {c: round(float(table.loc[~is_test, c].mean()), 4) for c in LABEL_COLUMNS[1:]}}
