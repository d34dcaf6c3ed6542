"""A synthetic dataset in the RSNA 2022 Cervical Spine Fracture Detection layout.

``synthesize_cspine(out_dir)`` writes::

    out_dir/train_images/<StudyInstanceUID>/<slice_number>.dcm   slice numbers 1..n, as the competition
    out_dir/test_images/<StudyInstanceUID>/<slice_number>.dcm
    out_dir/train.csv                 StudyInstanceUID, patient_overall, C1..C7 (0/1)
    out_dir/train_bounding_boxes.csv  StudyInstanceUID, x, y, width, height, slice_number: one box
                                      (pixels; x the column, y the row) per slice showing a fracture
    out_dir/segmentations.csv         StudyInstanceUID, slice_number, vertebra (C1..C7): the vertebra
                                      whose bone each slice cuts (disc slices have no row). It stands
                                      in for the competition's NIfTI masks (segmentations/<uid>.nii),
                                      of which teams used this much: the vertebra per slice
    out_dir/test.csv                  row_id, StudyInstanceUID, prediction_type: 8 rows per test study
    out_dir/sample_submission.csv     row_id, fractured (0.5)
    out_dir/test_labels.csv           the test studies' labels in train.csv's format, held back: no
                                      pipeline step reads them, only scoring

The competition gave boxes and masks for a subset of the training studies; here every training
study has both. One study per patient, its PatientID the StudyInstanceUID.

Each study is a neck CT drawn top (C1) to bottom (C7), each slice cutting one vertebra: a bony
ellipse (cortex about 750 HU around marrow about 260 HU) whose size grows and whose centre moves
forward from C2 to C7, the posterior arch round the spinal canal; C1 is a ring around C2's dens.
The last slice of each vertebra cuts the disc below it. A fracture is a dark line (55 HU) about
two pixels wide across one vertebra's bone on 2 or 3 of its slices, so a study's targets need
the study: most of a fractured vertebra's slices look healthy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.data.synth_ct import (HELD_OUT_CSV, SAMPLE_SUBMISSION, TRAIN_CSV, SeriesSpec, add_noise, grid, slice_layout,
                                    draw_patients, start_dataset, study_date, write_csv, write_series)

TASK = "rsna2022-cspine"
VERTEBRAE = tuple(f"C{i}" for i in range(1, 8))
BOXES_CSV = "train_bounding_boxes.csv"
SEGMENTATIONS_CSV = "segmentations.csv"
TEST_CSV = "test.csv"
LABEL_COLUMNS = ("StudyInstanceUID", "patient_overall") + VERTEBRAE
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")
SEGMENTATION_COLUMNS = ("StudyInstanceUID", "slice_number", "vertebra")
TEST_COLUMNS = ("row_id", "StudyInstanceUID", "prediction_type")
UID_ROOT = "1.2.826.0.1.3680043"
# Three slices per vertebra at least: two through its bone, one through the disc below.
MIN_SLICES = 3 * len(VERTEBRAE)
DEFAULT_SLICES = (28, 36)
FRACTURE_PROBABILITY = 0.5
# Which vertebra breaks: C2 and C7 most often, as in the competition's data.
FRACTURE_WEIGHTS = np.array([0.10, 0.22, 0.08, 0.09, 0.12, 0.17, 0.22])
# Relative heights (C2 with its dens the tallest), jittered per study.
HEIGHTS = np.array([1.0, 1.6, 1.0, 1.0, 1.0, 1.0, 1.0])
NECK_LENGTH_MM = 120.0
FIELD_OF_VIEW_MM = 140.0
CORTEX_HU, MARROW_HU, DENS_HU, DISC_HU, CANAL_HU, FRACTURE_HU = 750.0, 260.0, 500.0, 85.0, 15.0, 55.0


def vertebra_levels(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(vertebra 1..7 of each slice, top first; whether the slice cuts its bone, else the disc below)."""
    weights = HEIGHTS * rng.uniform(0.85, 1.15, len(HEIGHTS))
    extra = (n - MIN_SLICES) * weights / weights.sum()
    counts = 3 + np.floor(extra).astype(int)
    # largest remainders get the slices the floors left over
    counts[np.argsort(np.floor(extra) - extra, kind="stable")[: n - int(counts.sum())]] += 1
    level = np.repeat(np.arange(1, len(VERTEBRAE) + 1), counts)
    bone = np.ones(n, dtype=bool)
    bone[np.cumsum(counts) - 1] = False
    return level, bone


def _neck(level: np.ndarray, bone: np.ndarray, size: int, rng: np.random.Generator):
    """(hu, own bone mask, (scale, cx, cy)) of the neck at each slice's vertebra, without fractures."""
    y, x = grid(size)
    k = (level - 1).astype(np.float32)[:, None, None]
    scale = float(rng.uniform(0.9, 1.1))
    cx, cy0 = (float(v) for v in rng.normal(0.0, 0.03, 2))
    a, b, cy = (0.14 + 0.012 * k) * scale, (0.10 + 0.008 * k) * scale, 0.08 + cy0 - 0.01 * k
    body = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    canal_y = cy + b + 0.10 * scale
    canal = np.sqrt((x - cx) ** 2 + (y - canal_y) ** 2) / (0.085 * scale)
    neck = (x / 0.8) ** 2 + ((y - 0.05) / 0.68) ** 2 <= 1.0
    texture = 6.0 * np.sin(7.0 * x + float(rng.uniform(0, 6))) * np.cos(5.0 * y)
    hu = np.where(neck, 40.0 + texture, -1000.0) + np.zeros_like(body)
    hu = np.where(((x - cx) / 0.10) ** 2 + ((y - (cy - b - 0.22)) / 0.07) ** 2 <= 1.0, -950.0, hu)  # trachea
    cut, c1 = bone[:, None, None], (level == 1)[:, None, None]
    cortex, marrow = (body <= 1.0) & (body > 0.72), body <= 0.72
    arch = (canal > 1.0) & (canal <= 1.7) & (y > canal_y - 0.03)
    own = cut & (cortex | arch | (marrow & ~c1))  # C1 has no body: the ring holds C2's dens
    hu = np.where(cut & (cortex | arch), CORTEX_HU, hu)
    hu = np.where(cut & marrow, np.where(c1 & (body <= 0.4), DENS_HU, np.where(c1, 40.0, MARROW_HU)), hu)
    hu = np.where(~cut & (body <= 1.0), DISC_HU, hu)
    hu = np.where(canal <= 1.0, CANAL_HU, hu)
    return hu.astype(np.float32), own, (scale, cx, cy0)


def draw_study(n: int, size: int, rng: np.random.Generator, fractured: frozenset):
    """(hu (n, size, size) top first, vertebra per slice, bone per slice, fracture mask (n, size, size))
    of one study whose vertebrae (1..7) in ``fractured`` are broken. The random draws do not depend
    on ``fractured``: the same generator state gives the same anatomy and noise with or without."""
    level, bone = vertebra_levels(n, rng)
    hu, own, (scale, cx, cy0) = _neck(level, bone, size, rng)
    y, x = grid(size)
    fracture = np.zeros(hu.shape, dtype=bool)
    draws = zip(rng.uniform(0.0, np.pi, 7), rng.normal(0.0, 0.3, 7), rng.integers(2, 4, 7), rng.random(7))
    for v, (theta, offset, length, start) in enumerate(draws, start=1):
        rows = np.flatnonzero((level == v) & bone)
        if v not in fractured or not len(rows):
            continue
        run = min(len(rows), int(length))
        chosen = rows[int(start * (len(rows) - run + 1)):][:run]
        px = cx + offset * (0.14 + 0.012 * (v - 1)) * scale
        py = 0.08 + cy0 - 0.01 * (v - 1)
        line = np.abs((x - px) * np.sin(theta) - (y - py) * np.cos(theta)) <= 1.1 * 2.0 / size
        fracture[chosen] = line[None] & own[chosen]
    hu = np.where(fracture, FRACTURE_HU, hu)
    return add_noise(hu, rng, 8.0), level, bone, fracture


def fracture_boxes(fracture: np.ndarray) -> np.ndarray:
    """(slice index, x, y, width, height) of each slice's fracture pixels, one pixel of margin."""
    size = fracture.shape[-1]
    slices = np.flatnonzero(fracture.any(axis=(1, 2)))
    rows, cols = fracture[slices].any(axis=2), fracture[slices].any(axis=1)
    first = lambda m: m.argmax(axis=1)  # noqa: E731
    last = lambda m: m.shape[1] - 1 - m[:, ::-1].argmax(axis=1)  # noqa: E731
    x0, y0 = np.maximum(first(cols) - 1, 0), np.maximum(first(rows) - 1, 0)
    x1, y1 = np.minimum(last(cols) + 1, size - 1), np.minimum(last(rows) + 1, size - 1)
    return np.column_stack([slices, x0, y0, x1 - x0 + 1, y1 - y0 + 1]).astype(np.int64)


def _choose_fractures(rng: np.random.Generator) -> frozenset:
    if rng.random() >= FRACTURE_PROBABILITY:
        return frozenset()
    count = 1 if rng.random() < 0.7 else 2
    return frozenset(int(v) + 1 for v in rng.choice(7, size=count, replace=False, p=FRACTURE_WEIGHTS))


def _write_study(folder: Path, uid: str, n: int, size: int, rng: np.random.Generator, fractured: frozenset):
    """One study's files; returns its (segmentation rows, box rows) by slice number."""
    hu, level, bone, fracture = draw_study(n, size, rng, fractured)
    spacing = round(NECK_LENGTH_MM / n * float(rng.uniform(0.95, 1.05)), 3)
    numbers, z = slice_layout(n, rng, spacing)
    spec = SeriesSpec(uid, uid, f"{uid}.1", 1, numbers, z, round(FIELD_OF_VIEW_MM / size, 6), spacing, (400, 1800),
                      study_date(rng, 2022))
    write_series(folder / uid, hu, spec, rng)
    segmentation = pd.DataFrame({"StudyInstanceUID": uid, "slice_number": numbers[bone],
                                 "vertebra": np.array(VERTEBRAE)[level[bone] - 1]}, columns=list(SEGMENTATION_COLUMNS))
    box = fracture_boxes(fracture)
    boxes = pd.DataFrame({"StudyInstanceUID": uid, "x": box[:, 1], "y": box[:, 2], "width": box[:, 3],
                          "height": box[:, 4], "slice_number": numbers[box[:, 0]]}, columns=list(BOX_COLUMNS))
    return segmentation.sort_values("slice_number"), boxes.sort_values("slice_number")


def _label_table(uids: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame(labels, columns=list(VERTEBRAE))
    table.insert(0, "patient_overall", labels.max(axis=1))
    table.insert(0, "StudyInstanceUID", uids)
    return table


def _write_test_files(out_dir: Path, uids: np.ndarray) -> None:
    targets = VERTEBRAE + ("patient_overall",)
    study = np.repeat(uids, len(targets))
    kind = np.tile(np.array(targets), len(uids))
    row_id = np.char.add(np.char.add(study.astype(str), "_"), kind)
    write_csv(pd.DataFrame({"row_id": row_id, "StudyInstanceUID": study, "prediction_type": kind}), out_dir / TEST_CSV)
    write_csv(pd.DataFrame({"row_id": row_id, "fractured": 0.5}), out_dir / SAMPLE_SUBMISSION)


def synthesize_cspine(out_dir, *, patients: int = 40, size: int = 64, slices=DEFAULT_SLICES, test_fraction: float = 0.25,
                      seed: int = 0, progress: bool = True) -> dict:
    """Write the dataset under ``out_dir`` (see the module docstring); return a summary dict.
    Deterministic: the same arguments give byte-identical files."""
    plan = start_dataset(TASK, out_dir, patients, size, slices, test_fraction, MIN_SLICES)
    (low, high), patients, size, out_dir = plan.slices, plan.patients, plan.size, plan.out_dir
    rng, numbers, is_test = draw_patients(seed, patients, test_fraction, (1000, 33000))
    uids = np.array([f"{UID_ROOT}.{number}" for number in numbers])
    labels = np.zeros((patients, len(VERTEBRAE)), dtype=np.int8)
    segmentations, boxes, images = [], [], np.zeros(patients, dtype=np.int64)

    from tqdm.auto import tqdm

    for p in tqdm(range(patients), desc=f"data synth {TASK}", unit="study", disable=not progress):
        fractured = _choose_fractures(rng)
        labels[p, [v - 1 for v in sorted(fractured)]] = 1
        images[p] = int(rng.integers(low, high + 1))
        folder = plan.test_dir if is_test[p] else plan.train_dir
        segmentation, box = _write_study(folder, uids[p], int(images[p]), size, rng, fractured)
        if not is_test[p]:
            segmentations.append(segmentation)
            boxes.append(box)
    table = _label_table(uids, labels)
    write_csv(table[~is_test], out_dir / TRAIN_CSV)
    write_csv(table[is_test], out_dir / HELD_OUT_CSV)
    write_csv(pd.concat(boxes, ignore_index=True), out_dir / BOXES_CSV)
    write_csv(pd.concat(segmentations, ignore_index=True), out_dir / SEGMENTATIONS_CSV)
    _write_test_files(out_dir, uids[is_test])
    return {"task": TASK, "out_dir": str(out_dir), "patients": patients, "train_studies": int((~is_test).sum()),
            "test_studies": int(is_test.sum()), "train_images": int(images[~is_test].sum()),
            "test_images": int(images[is_test].sum()), "held_out_labels_csv": str(out_dir / HELD_OUT_CSV),
            "prevalence": {c: round(float(table.loc[~is_test, c].mean()), 4) for c in LABEL_COLUMNS[1:]}}
