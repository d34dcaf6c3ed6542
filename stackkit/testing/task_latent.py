"""Held-out benchmark data for the study- and patient-level tasks of issue 19 (``rsna2022-cspine``,
``rsna2023-abdominal``): exported per-slice base-model predictions made by a generator, in memory.

``make_task_benchmark(task, n_patients, seed)`` returns a :class:`TaskBenchmark`: every slice
(anatomical order, series by series), the train/test split by patient, K patient-grouped folds
(sklearn ``StratifiedGroupKFold`` on the unit's "any" label), labels at the target unit (train:
``labels``; held out: ``test_labels``), per model the OOF slice predictions (each row from the
fold model that held its patient out), every fold model's test predictions and their mean, the
slice labels a slice CNN trains on, and the latent evidence (a floor is a learner fed that instead
of the predictions). Vectorized over whole columns: the only loops run over lesion kinds, models
and fold models.

The world, per task:

* ``rsna2022-cspine`` (unit: study, one per patient): each series covers C1..C7 in order along z
  (skull base above, thoracic spine below; C2 with the dens tallest; ``vertebra`` per slice is
  known, 0 outside the cervical spine). A study is fractured with chance ~0.48; a fractured study
  has one or more fractured vertebrae (C2 and C7 most often, per-vertebra rates near the
  competition's). A fracture is a run of a few slices inside its vertebra only, brightest in its
  middle, with a lognormal per-lesion intensity (some are subtle). Slice prediction columns
  ``C1``..``C7``: "this slice shows a fractured Cn", as a slice CNN with a fracture head and a
  vertebra head outputs p(fracture) x p(vertebra): one fracture score per slice (errors shared by
  the columns) attributed by the model's own, slightly wrong, soft vertebra boundaries; and
  ``patient_overall``: the fracture head itself, p(fracture) x p(in C1..C7) (the plain max over
  the vertebrae's maxima under-predicts a study with several suspicious vertebrae).
* ``rsna2023-abdominal`` (unit: patient, one or two series each, the same injuries in both at the
  series' own coordinates): bowel and extravasation injuries are short runs; a kidney, liver or
  spleen injury extends over a share of the organ's slices, and that extent grades it (``high``
  at or above an organ's threshold, else ``low``; high ones also brighter). Injuries are
  correlated (one trauma); prevalences near the competition's. Slice columns ``bowel_injury``,
  ``extravasation_injury``, ``<organ>_low``, ``<organ>_high``: a slice CNN confuses the grades
  (each grade column also sees ``grade_confusion`` x the other grade's evidence), so telling them
  apart takes the number of slices that show an injury (study aggregates), not the maximum.

Base models (as :mod:`stackkit.testing.latent`'s ``realistic`` scenario): a raw logit per slice
and column = strength x (gain x what it perceives + errors shared by every model: a unit offset
and a slice error persistent along z) + its own unit offset and persistent slice error + each fold
model's own persistent error, strength and bias. Every model perceives the same distortions the
latent evidence lacks: whole lesions under- or over-read and false runs (degenerative change,
artefacts) where there is none; mimics are in the latent evidence too. Its head is trained as a
multiple-instance slice model is: a logistic map fitted on the OOF maximum over each unit's slices
against the unit's label of that column (so max aggregation is roughly calibrated), then
miscalibrated its own way (temperature and bias per column); models differ in strength. The
heads are fitted on the metric's class weights (``head_weight_power`` 1) for the spine and on
those weights to the power 0.7 for the abdomen (CNNs trained with partly weighted cross-entropy:
max aggregation under-predicts the rare injuries a little, for the metric's weights).

Calibration (bench/bench_tasks.py, tuning seeds 0 and 1, 1,000 patients, half held out): the
plain unit-level LightGBM is ~9 % (spine) and ~7 % (abdomen) below the best base model's max
aggregation, as published second stages gained; the floor (LightGBM on the latent evidence) is
far lower (spine ~0.09 against ~0.35; abdomen ~0.13 against ~0.30). Errors every model shares
dominate, so averaging models gains little; most of the LightGBM's gain is the derived label
(``patient_overall``; ``any_injury`` from weighted groups) and, for the organs, the grade read
off the number of slices that show an injury.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stackkit.contract.tasks import get_task
from stackkit.testing.latent import distinct_ids, persistent_noise, study_rows

VERTEBRAE = tuple(f"C{i}" for i in range(1, 8))
ORGANS = ("kidney", "liver", "spleen")
SLICE_COLUMNS = {task: get_task(task).slice_columns for task in ("rsna2022-cspine", "rsna2023-abdominal")}
MODEL_NAMES = ("effnetv2_s", "convnext_t", "resnet50_lstm", "seresnext50", "resnet18", "densenet121",
               "regnety_8", "mobilenet_v3")
MODEL_STRENGTH = np.array([1.0, 0.95, 0.9, 0.8, 0.6, 0.7, 0.85, 0.5])
NEGATIVE_LOGIT = -4.0
# RSNA 2022 train: patient_overall 0.476; C1..C7 0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195
FRACTURED_STUDY_RATE = 0.476
VERTEBRA_RATE = np.array([0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195])
VERTEBRA_HEIGHT = np.array([0.10, 0.20, 0.14, 0.14, 0.14, 0.14, 0.14])  # share of the cervical spine's slices
# RSNA 2023 train: bowel 2.0 %, extravasation 6.4 %, kidney 5.8 % (38 % of them high), liver 10 % (26 %), spleen 11 % (46 %)
INJURY_RATE = np.array([0.020, 0.064, 0.058, 0.100, 0.110])  # bowel, extravasation, kidney, liver, spleen
HIGH_SHARE = np.array([0.38, 0.26, 0.46])
ORGAN_RANGE = np.array([[0.35, 0.95], [0.08, 0.95], [0.30, 0.60], [0.06, 0.42], [0.12, 0.38]])  # share of the series
EXTENT = (0.04, 0.6)  # an organ injury's share of the organ's slices: uniform; high from the organ's threshold on
TRAUMA_CORRELATION = 0.3


@dataclass(frozen=True)
class TaskDials:
    """The generator's dials (errors in logit units; ``*_persistence``: AR(1) coefficient along z)."""

    n_models: int = 5
    slices: tuple[int, int] = (150, 300)  # slices per series, uniform
    evidence_gain: float = 6.0
    # errors every model makes dominate (persistent along z: a stretch of slices all CNNs misread);
    # each model's and fold model's own are small, so averaging models gains little (as on real CNNs)
    study_error_shared: float = 0.5
    slice_error_shared: float = 1.4
    shared_persistence: float = 0.95
    study_error_model: float = 0.1
    slice_error_model: float = 0.1  # x (1 + 1.2 x (1 - strength)): weak models are noisier
    model_persistence: float = 0.8
    fold_error: float = 0.15
    fold_persistence: float = 0.8
    fold_strength_spread: float = 0.06
    fold_bias_spread: float = 0.1
    temperature_spread: float = 0.1
    bias_spread: float = 0.15
    error_common: float = 1.0  # share of an error's sd common to the slice's columns (one fracture head: 1)
    boundary_jitter: float = 0.5  # slices: a model's error on where a vertebra or organ starts and ends
    boundary_width: float = 1.0  # slices: how soft its boundaries are
    mimic_rate: float = 0.15  # per unit and lesion kind: fracture-like evidence where there is none (in the latent too)
    false_run_rate: float = 0.1  # the same, perceived by every model but not in the latent evidence
    lesion_spread: float = 0.5  # a lesion under- or over-read by every model: exp(N(0, spread))
    partial_volume: float = 0.3
    run_end_visibility: float = 0.3
    grade_confusion: float = 0.0
    # a head is fitted with positives weighted positive_weight ** this: 1 = trained on the metric's
    # class weights (max aggregation ready for the metric), 0 = plain BCE (it under-predicts injuries)
    head_weight_power: float = 1.0


TASK_DIALS = {
    "rsna2022-cspine": TaskDials(),
    "rsna2023-abdominal": TaskDials(slices=(80, 160), error_common=0.3, grade_confusion=0.5, head_weight_power=0.7),
}


@dataclass
class _Layout:
    """A task's units, series and lesions; ``intervals`` (n_series, C, 2) in slice units per column."""

    patient_of_unit: np.ndarray
    unit_of_series: np.ndarray
    sizes: np.ndarray
    intervals: np.ndarray
    slot_interval: np.ndarray  # (S,) the column whose interval a lesion kind lies in
    lesions: "_Runs"
    truth: np.ndarray  # (U, C) 0/1: the unit's label of each slice column (what a head is fitted to)
    positive_weight: np.ndarray  # (C,) the metric's weight of a positive over a negative, per column (the heads' too)
    labels: dict  # schema label column -> (U,) 0/1
    mix: np.ndarray  # (C, C): column j perceives sum_i evidence_i x mix[i, j]
    union_column: int | None = None  # a column whose evidence and slice label are the max of those before it


@dataclass
class _Runs:
    """Per unit and lesion kind (U, S): a run of slices at ``start`` / ``length`` (shares of its interval)."""

    present: np.ndarray
    column: np.ndarray
    start: np.ndarray
    length: np.ndarray
    intensity: np.ndarray


@dataclass
class _Rows:
    series: np.ndarray
    unit: np.ndarray
    slice_no: np.ndarray

    @property
    def first(self) -> np.ndarray:
        """Whether each row is its series' first slice."""
        return self.slice_no == 0

    @property
    def n(self) -> int:
        return len(self.series)


def _rows(layout: _Layout) -> _Rows:
    series, slice_no = study_rows(layout.sizes)
    return _Rows(series, layout.unit_of_series[series], slice_no)


def _cspine_layout(rng: np.random.Generator, n_units: int, dials: TaskDials) -> _Layout:
    sizes = rng.integers(dials.slices[0], dials.slices[1] + 1, n_units)
    top, bottom = rng.uniform(0.03, 0.15, n_units), rng.uniform(0.05, 0.25, n_units)
    heights = VERTEBRA_HEIGHT * np.exp(rng.normal(0, 0.08, (n_units, 7)))
    heights *= ((1.0 - top - bottom) * sizes / heights.sum(axis=1))[:, None]
    bounds = (top * sizes)[:, None] + np.concatenate([np.zeros((n_units, 1)), np.cumsum(heights, axis=1)], axis=1)
    # C1..C7, then the whole cervical spine: the slice CNN's fracture head (patient_overall, no vertebra)
    intervals = np.stack([np.column_stack([bounds[:, :-1], bounds[:, 0]]), np.column_stack([bounds[:, 1:], bounds[:, -1]])], axis=2)
    fractured = rng.random(n_units) < FRACTURED_STUDY_RATE
    # per vertebra given a fractured study, ~1.5 vertebrae each; one drawn by the rates where none was
    present = fractured[:, None] & (rng.random((n_units, 7)) < 0.85 * VERTEBRA_RATE / FRACTURED_STUDY_RATE)
    none = fractured & ~present.any(axis=1)
    present[np.flatnonzero(none), rng.choice(7, none.sum(), p=VERTEBRA_RATE / VERTEBRA_RATE.sum())] = True
    lesions = _Runs(present, np.broadcast_to(np.arange(7), (n_units, 7)), rng.random((n_units, 7)),
                    rng.uniform(0.12, 0.45, (n_units, 7)), rng.lognormal(0.0, 0.6, (n_units, 7)))
    labels = {v: present[:, i].astype(np.int8) for i, v in enumerate(VERTEBRAE)}
    labels["patient_overall"] = present.any(axis=1).astype(np.int8)
    mix = np.zeros((8, 8))
    mix[:7] = 1.0  # one fracture score per slice, every column sees it (each model attributes it to a vertebra)
    truth = np.column_stack([present, present.any(axis=1)]).astype(np.int8)
    return _Layout(np.arange(n_units), np.arange(n_units), sizes, intervals, np.arange(7), lesions,
                   truth, np.full(8, 2.0), labels, mix, union_column=7)


def _abdominal_layout(rng: np.random.Generator, n_units: int, dials: TaskDials) -> _Layout:
    from scipy.stats import norm

    series_count = 1 + (rng.random(n_units) < 0.5)
    unit_of_series = np.repeat(np.arange(n_units), series_count)
    sizes = rng.integers(dials.slices[0], dials.slices[1] + 1, len(unit_of_series))
    # each series covers the organs at its own height: shares jittered per series, then in slices
    kind_range = np.clip(ORGAN_RANGE + rng.normal(0, 0.03, (len(sizes), 5, 2)), 0.0, 1.0) * sizes[:, None, None]
    slot_interval = np.array([0, 1, 2, 4, 6])
    intervals = kind_range[:, [0, 1, 2, 2, 3, 3, 4, 4]]
    # one trauma: injuries correlated through a shared severity (Gaussian copula)
    latent = np.sqrt(TRAUMA_CORRELATION) * rng.normal(size=(n_units, 1)) + np.sqrt(1 - TRAUMA_CORRELATION) * rng.normal(size=(n_units, 5))
    present = latent > norm.ppf(1.0 - INJURY_RATE)
    extent = rng.uniform(*EXTENT, (n_units, 5))
    threshold = EXTENT[0] + (EXTENT[1] - EXTENT[0]) * (1.0 - HIGH_SHARE)
    high = np.zeros((n_units, 5), dtype=bool)
    high[:, 2:] = extent[:, 2:] >= threshold
    length = np.column_stack([rng.uniform(0.03, 0.10, n_units), rng.uniform(0.02, 0.08, n_units), extent[:, 2:]])
    column = slot_interval + high
    lesions = _Runs(present, column, rng.random((n_units, 5)), length, rng.lognormal(0.0, 0.5, (n_units, 5)) * np.exp(0.3 * high))
    truth = np.zeros((n_units, 8), dtype=np.int8)
    rows, kinds = np.nonzero(present)
    truth[rows, column[rows, kinds]] = 1
    labels = {}
    for k, name in enumerate(("bowel", "extravasation")):
        labels[f"{name}_healthy"], labels[f"{name}_injury"] = (1 - truth[:, k]), truth[:, k]
    for o, organ in enumerate(ORGANS):
        low, hi = truth[:, 2 + 2 * o], truth[:, 3 + 2 * o]
        labels.update({f"{organ}_healthy": (1 - low - hi).astype(np.int8), f"{organ}_low": low, f"{organ}_high": hi})
    mix = np.eye(8)
    for o in range(3):  # a slice CNN confuses the grades
        mix[2 + 2 * o, 3 + 2 * o] = mix[3 + 2 * o, 2 + 2 * o] = dials.grade_confusion
    positive_weight = np.array([2.0, 6.0, 2.0, 4.0, 2.0, 4.0, 2.0, 4.0])
    return _Layout(np.arange(n_units), unit_of_series, sizes, intervals, slot_interval, lesions, truth, positive_weight, labels, mix)


def _paint(layout: _Layout, rows: _Rows, runs: _Runs, dials: TaskDials) -> tuple[np.ndarray, np.ndarray]:
    """(evidence, inside), each (n, C): the runs' visibility (a bump, faint at its ends, partial
    volume just outside within the interval) and whether a row lies in a run."""
    n, n_columns = rows.n, layout.intervals.shape[1]
    evidence, inside_any = np.zeros((n, n_columns)), np.zeros((n, n_columns), dtype=bool)
    at, index, unit = rows.slice_no.astype(np.float64), np.arange(n), rows.unit
    for s, interval in enumerate(layout.slot_interval):  # a loop over lesion kinds, not rows
        lo, hi = layout.intervals[rows.series, interval].T
        run = np.maximum(1.0, runs.length[unit, s] * (hi - lo))
        start = lo + runs.start[unit, s] * np.maximum(hi - lo - run, 0.0)
        present = runs.present[unit, s]
        inside = present & (at >= start) & (at < start + run)
        bump = dials.run_end_visibility + (1 - dials.run_end_visibility) * np.sin(np.pi * np.clip((at - start + 0.5) / run, 0, 1))
        distance = np.maximum(start - at, at - (start + run - 1))
        near = present & ~inside & (at >= lo) & (at < hi)
        visible = runs.intensity[unit, s] * np.where(inside, bump, np.where(near, dials.partial_volume * np.exp(-distance / 0.8), 0.0))
        column = runs.column[unit, s]
        evidence[index, column] = np.maximum(evidence[index, column], visible)
        inside_any[index, column] |= inside
    if layout.union_column is not None:
        evidence[:, layout.union_column] = evidence[:, :layout.union_column].max(axis=1)
        inside_any[:, layout.union_column] = inside_any[:, :layout.union_column].any(axis=1)
    return evidence, inside_any


def _spurious(rng: np.random.Generator, layout: _Layout, rate: float, strength: float) -> _Runs:
    """Short runs of lesion-like evidence where there may be none, on each kind's first column."""
    shape = layout.lesions.present.shape
    return _Runs(rng.random(shape) < rate, np.broadcast_to(layout.slot_interval, shape), rng.random(shape),
                 rng.uniform(0.03, 0.12, shape), rng.lognormal(np.log(strength), 0.4, shape))


def _column_noise(rng: np.random.Generator, rows: _Rows, n_columns: int, persistence: float, common: float) -> np.ndarray:
    """(n, C) unit-variance AR(1) noise along z, ``common`` of its sd the same in every column."""
    shared = persistent_noise(rng, 1, rows.first, rows.slice_no, persistence)
    if common >= 1.0:
        return np.repeat(shared, n_columns, axis=1)
    own = persistent_noise(rng, n_columns, rows.first, rows.slice_no, persistence)
    return common * shared + np.sqrt(1.0 - common ** 2) * own


@dataclass
class _World:
    layout: _Layout
    rows: _Rows
    evidence: np.ndarray  # (n, C) latent
    signal: np.ndarray  # (n, C) what every model perceives, mixed, before its strength and the gain
    shared_error: np.ndarray  # (n, C)
    dials: TaskDials


def _world(rng: np.random.Generator, layout: _Layout, dials: TaskDials) -> tuple[_World, np.ndarray]:
    """The world every model sees, and the slice labels (n, C) int8."""
    rows = _rows(layout)
    evidence, inside = _paint(layout, rows, layout.lesions, dials)
    mimics, _ = _paint(layout, rows, _spurious(rng, layout, dials.mimic_rate, 0.5), dials)
    evidence = np.maximum(evidence, mimics)
    lesions = layout.lesions
    misread = _Runs(lesions.present, lesions.column, lesions.start, lesions.length,
                    lesions.intensity * np.exp(rng.normal(0, dials.lesion_spread, lesions.present.shape)))
    perceived = np.maximum(_paint(layout, rows, misread, dials)[0], mimics)
    perceived = np.maximum(perceived, _paint(layout, rows, _spurious(rng, layout, dials.false_run_rate, 0.6), dials)[0])
    n_columns = evidence.shape[1]
    unit_error = dials.study_error_shared * rng.normal(size=(len(layout.patient_of_unit), n_columns))
    shared = unit_error[rows.unit] + dials.slice_error_shared * _column_noise(rng, rows, n_columns, dials.shared_persistence, dials.error_common)
    world = _World(layout, rows, evidence, perceived @ layout.mix, shared, dials)
    return world, inside.astype(np.int8)


def _membership_offset(rng: np.random.Generator, world: _World) -> np.ndarray:
    """(n, C) log of a model's soft membership of each slice in each column's interval (its boundaries jittered)."""
    from scipy.special import log_expit

    layout, rows, dials = world.layout, world.rows, world.dials
    bounds = layout.intervals + rng.normal(0, dials.boundary_jitter, layout.intervals.shape)
    lo, hi = bounds[rows.series, :, 0], bounds[rows.series, :, 1]
    at = rows.slice_no[:, None] + 0.5
    return log_expit((at - lo) / dials.boundary_width) + log_expit((hi - at) / dials.boundary_width)


def _platt(x: np.ndarray, y: np.ndarray, positive_weight: np.ndarray, ridge: float = 1.0,
           iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Per column (x, y: (U, C)) a logistic map p = sigmoid(a x + b) by Newton's method, a >= 0,
    positives weighted ``positive_weight`` (C,) as the metric weighs them (a CNN trained on the
    metric's weights); a ridge on the standardized slope keeps a separable column finite."""
    from scipy.special import expit

    mean, sd = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / sd
    w = np.where(y > 0, positive_weight, 1.0)
    slope, intercept = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for _ in range(iterations):  # Newton steps, all columns at once
        p = expit(slope * z + intercept)
        h, r = w * np.maximum(p * (1 - p), 1e-9), w * (p - y)
        g0, g1 = (r * z).sum(axis=0) + ridge * slope, r.sum(axis=0) + 1e-3 * intercept
        h00, h01, h11 = (h * z * z).sum(axis=0) + ridge, (h * z).sum(axis=0), h.sum(axis=0) + 1e-3
        det = h00 * h11 - h01 ** 2
        slope, intercept = slope - (h11 * g0 - h01 * g1) / det, intercept - (h00 * g1 - h01 * g0) / det
    a = np.maximum(slope, 1e-3) / sd
    return a, intercept - a * mean


def _unit_max(values: np.ndarray, unit: np.ndarray, n_units: int) -> np.ndarray:
    out = np.full((n_units, values.shape[1]), -np.inf)
    np.maximum.at(out, unit, values)
    return out


@dataclass
class _Model:
    strength: float
    temperature: np.ndarray  # (C,)
    bias: np.ndarray  # (C,)
    fold_strength: np.ndarray  # (K,)
    fold_bias: np.ndarray  # (K, C)
    own_error: np.ndarray  # (n, C): the model's own errors, shared by its fold models
    log_membership: np.ndarray  # (n, C): log of its soft membership of each slice in each column's interval


def _model(rng: np.random.Generator, index: int, world: _World, n_folds: int) -> _Model:
    dials, rows = world.dials, world.rows
    n_columns = world.evidence.shape[1]
    unit_error = dials.study_error_model * rng.normal(size=(len(world.layout.patient_of_unit), n_columns))
    tier = MODEL_STRENGTH[index % len(MODEL_STRENGTH)]
    noise = dials.slice_error_model * (1.0 + 1.2 * (1.0 - tier))  # weak models are noisier
    own = unit_error[rows.unit] + noise * _column_noise(rng, rows, n_columns, dials.model_persistence, dials.error_common)
    return _Model(
        strength=float(tier * np.exp(rng.normal(0, 0.05))),
        temperature=np.exp(rng.normal(0, dials.temperature_spread, n_columns)),
        bias=rng.normal(0, dials.bias_spread, n_columns),
        fold_strength=np.exp(rng.normal(0, dials.fold_strength_spread, n_folds)),
        fold_bias=rng.normal(0, dials.fold_bias_spread, (n_folds, n_columns)),
        own_error=own,
        log_membership=_membership_offset(rng, world),
    )


def _fold_logits(rng: np.random.Generator, model: _Model, world: _World, n_folds: int) -> np.ndarray:
    """(K, n, C) raw logits of the model's K fold models over every slice: of p(lesion) x p(in the
    column's vertebra or organ), as a lesion head times a localisation head."""
    from scipy.special import log_expit

    dials, rows = world.dials, world.rows
    out = np.empty((n_folds,) + world.evidence.shape)
    for k in range(n_folds):  # a loop over the K fold models, not rows
        strength = model.strength * model.fold_strength[k]
        fold_error = dials.fold_error * _column_noise(rng, rows, out.shape[2], dials.fold_persistence, dials.error_common)
        lesion = NEGATIVE_LOGIT + strength * (dials.evidence_gain * world.signal + world.shared_error) + model.own_error + fold_error
        log_p = np.minimum(log_expit(lesion) + model.log_membership, -1e-12)
        out[k] = log_p - np.log(-np.expm1(log_p))
    return out


def _model_probabilities(rng: np.random.Generator, index: int, world: _World, fold_of_row: np.ndarray) -> np.ndarray:
    """(K, n, C) float32 probabilities of one model's fold models; the head fitted on the OOF unit maxima."""
    from scipy.special import expit

    n_folds = int(fold_of_row.max()) + 1
    model = _model(rng, index, world, n_folds)
    logits = _fold_logits(rng, model, world, n_folds)
    train = fold_of_row >= 0
    oof = logits[fold_of_row[train], np.flatnonzero(train)]
    n_units = len(world.layout.patient_of_unit)
    unit_max = _unit_max(oof, world.rows.unit[train], n_units)
    fitted = np.isfinite(unit_max[:, 0])
    a, b = _platt(unit_max[fitted], world.layout.truth[fitted].astype(np.float64),
                  world.layout.positive_weight ** world.dials.head_weight_power)
    head = a * logits + b + model.bias + model.fold_bias[:, None, :]
    return expit(head / model.temperature).astype(np.float32)


def _folds(patient_of_unit: np.ndarray, stratum: np.ndarray, train_unit: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """(U,) fold of each train unit (-1 for test units): patient-grouped, stratified on ``stratum``."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(patient_of_unit), -1, dtype=np.int64)
    units = np.flatnonzero(train_unit)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The least populated class", category=UserWarning)
        for k, (_, held) in enumerate(splitter.split(np.zeros(len(units)), stratum[units], groups=patient_of_unit[units])):
            fold[units[held]] = k
    return fold
