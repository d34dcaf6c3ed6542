"""A held-out benchmark: a work directory's data/ plus base-model predictions exported elsewhere.

``write_exported_benchmark(root, n_patients=..., scenario=...)`` writes, vectorized over whole
columns (no Python loop over patients, studies or images):

    root/work/data/metadata.parquet, labels.parquet, folds.parquet   the contract layout
    root/heldout_test_labels.parquet       the test images' labels: outside the work directory
    root/latent_evidence.parquet           image_id + six columns, every image: the latent evidence
                                           before any model error (a benchmark's floor is a learner
                                           fed this instead of the predictions)
    root/exports/<model>_oof.parquet       image_id, fold, six probabilities (as `base import` takes)
    root/exports/<model>_test.parquet      image_id, six probabilities (mean of the fold models)
    root/exports/<model>_test_fold<k>.parquet   fold model k's test probabilities (their mean is the above)
    root/exports/<model>_oof_emb.npy       with embedding_dim > 0: float16, rows of the oof file
    root/exports/<model>_test_emb_fold<k>.npy                      fold model k's test embedding

Scenarios (``SCENARIOS``: frozen ``Scenario`` dataclasses of the dials below):

* ``independent``: the original generator, unchanged bit for bit. Stacking gains far more here
  than on real CNN predictions (a plain LightGBM 58 % below the best model on seed 0), for two reasons
  found while calibrating ``persistent``: the shared errors are added to every model's logit at
  the same size while the evidence is scaled by the model's strength, so a strong and a weak
  model's difference cancels them; and each label has its own error, so `any` is denoised by the
  five subtype channels (an absent subtype's prediction is pure error).
* ``persistent``: shared errors scaled with each model's strength (part of what it perceives),
  `any`'s raw score the max of the subtypes' (one backbone), errors persistent along z (AR(1),
  0.95 for the shared slice error, 0.7 for a model's and a fold model's own), larger
  per-fold-model errors (an OOF row has one fold model's, a test row the mean of K). Calibration
  target: the plain LightGBM of bench/bench_stack.py ~10 % below the best model (RSNA 2019 second
  stages: 9-14 %) on the tuning seeds; see the README for what it reaches.
* ``realistic``: ``persistent`` plus what real RSNA predictions have and it lacks: noisy labels
  (each annotated run's edges moved by ~1 slice from the lesion's, some faint lesions left
  unannotated: no learner reaches 0, the floor is 0.03-0.045), 2.5D base models (half their view is the
  1-2-1 mean over +-1 slice), an `any` score of its own (0.3 the subtypes' max), isotonic heads
  (calibrated on the rare labels too), smaller study offsets, whole lesions under-read and false
  runs seen by all models, fewer mimics, sharper lesion edges. Closer, not calibrated: the
  plain LightGBM gains 13 % / 27 % over the best model on tuning seeds 0 / 1 (1,200 patients),
  nearly all from neighbors and study aggregates (see the README).
* ``many_models``: ``persistent`` with ten models.

How the data are made, and why (what makes study-awareness and embeddings matter):

* Studies: 25-60 slices (mean ~40) about 5 mm apart, some head-to-foot, a few duplicate z.
* Labels: a hemorrhage-positive study has one contiguous run along z per subtype present,
  runs of one study clustered around a common focus, so ``any`` (the union) is smaller than
  the sum of the subtypes; slice prevalences close to RSNA 2019.
* Evidence: per slice and subtype a latent "visibility" that is smooth along z inside a run
  (highest in its middle, faint at its ends) and decays over a slice or two outside it (partial
  volume), scaled by a per-lesion intensity (some lesions are subtle). A run's faint ends are
  where neighbors and study aggregates help.
* A model's logit per label: its strength x evidence + an error per study shared by all models
  (a scan artifact fools everyone) + its own error per study + per-slice noise partly shared by
  all models (hard slices are hard for every CNN) and smoothed along z + its own per-slice
  noise. Its head is "trained": a monotone map from the raw score to the labels' rate (so it is
  roughly calibrated, as a CNN trained with BCE is), then miscalibrated its own way (per-label
  temperature and bias); one or two models are weak. Mimics (short runs of hemorrhage-like
  evidence in slices without one) fool every model alike. An OOF row comes from the fold model of its fold (a small perturbation of the
  model plus its own noise); a test row is the mean of the fold models' probabilities.
* Embeddings: the head of a model sums three latent components per label: its view of the
  evidence (kept), a nuisance response that carries no label information (added by the head
  with weight ``head_nuisance``: it should have been thrown away) and a second, independent
  view of the evidence (thrown away by the head). The embedding is these 18 components (the
  two views squashed by the head's calibrated map: pooled features are nonlinear in the
  evidence too) seen through a random orthonormal map into D dims plus small noise, the map
  slightly different per fold model, so a learner on the embedding can beat the head's own
  probabilities (a logistic regression on logits + embedding beats one on the logits alone).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import write_bytes, write_parquet

N_SUBTYPES = len(LABELS) - 1
# Per subtype (LABELS order, without `any`): chance that a positive study has it, and the mean
# share of the study's slices its run covers; together with POSITIVE_STUDY_RATE they give slice
# prevalences near RSNA 2019's (epidural 0.4 %, intraparenchymal 4.8 %, intraventricular 3.5 %,
# subarachnoid 4.7 %, subdural 6.3 %, any 14 %).
POSITIVE_STUDY_RATE = 0.36
SUBTYPE_PRESENCE = np.array([0.04, 0.42, 0.30, 0.44, 0.45])
SUBTYPE_RUN_SHARE = np.array([0.25, 0.29, 0.30, 0.27, 0.35])
# How visible each label is to a CNN (epidural and subarachnoid are the hard ones).
LABEL_VISIBILITY = np.array([0.8, 1.1, 1.3, 0.85, 1.0, 1.2])
# Base logit per label of an image without hemorrhage, and the logit gained per unit of evidence.
NEGATIVE_LOGIT = np.array([-7.0, -5.0, -5.0, -4.6, -4.4, -3.6])
EVIDENCE_GAIN = 11.0
# Quality of the models in order: the 5th and 6th (and 10th) are the weak ones.
MODEL_STRENGTH = np.array([1.0, 0.95, 0.9, 0.85, 0.55, 0.65, 1.0, 0.9, 0.8, 0.5])
MODEL_NAMES = ("effnet_b3", "seresnext50", "resnet34_ctx1", "densenet121", "resnet18", "effnet_b0",
               "seresnext101", "inception_v3", "regnety_16", "mobilenet_v3")
# Spread of the errors (logit units) of the "independent" scenario (see SCENARIOS for the others).
STUDY_ERROR_SHARED, STUDY_ERROR_MODEL = 0.7, 0.15
SLICE_ERROR_SHARED = 1.3
SLICE_ERROR_MODEL = 0.35  # x (1 + 1.2 x (1 - strength)): weak models are noisier
TEMPERATURE_SPREAD, BIAS_SPREAD = 0.15, 0.25  # per-label miscalibration (log-temperature, logit bias)
# Mimics (calcification, beam hardening): short runs of hemorrhage-like evidence in slices without
# one, seen by every model: false positives that neither neighbors nor other models explain away.
MIMIC_RATE, MIMIC_LENGTH = 0.12, 3
N_COMPONENTS = 3  # latent components per label a model's head mixes (see the module docstring)
# Rough spread of each component, so the embedding's dimensions are O(1) as a CNN's pooled features are.
COMPONENT_SCALE = 3.0


@dataclass(frozen=True)
class Scenario:
    """The generator's dials. Errors are in logit units; a ``*_persistence`` is the AR(1)
    coefficient along z of that error inside a study (0: the "independent" scenario's short
    +-1/+-2-slice smoothing, kept bit for bit)."""

    name: str
    description: str
    n_models: int = 6
    evidence_gain: float = EVIDENCE_GAIN
    # errors every model shares: a study offset, and a slice error (hard slices are hard for every CNN)
    study_error_shared: float = STUDY_ERROR_SHARED
    slice_error_shared: float = SLICE_ERROR_SHARED
    slice_shared_persistence: float = 0.0
    # share of the shared slice error's standard deviation common to the six labels (the rest is
    # per label): a CNN that misreads a slice misreads it for `any` and the subtypes alike
    slice_shared_label_common: float = 0.6
    # True: that common part goes to `any` and to one subtype per study (drawn by chance) only, not
    # to all five: a misread slice looks like one kind of blood, and the absent subtypes' predictions
    # do not reveal the error (with all six sharing it, a stacker reads it off them and subtracts it)
    slice_shared_one_subtype: bool = False
    # True: each model's head is fitted isotonic (pool adjacent violators), calibrated on the rare
    # labels too as a CNN trained with BCE is; False: a running max of the bins' rates, which
    # overstates every bin above a lucky one (epidural's negatives most), a loss any stacker removes
    head_isotonic: bool = False
    # a model's own errors: per study, and per slice (scaled by 1 + 1.2 x (1 - strength))
    study_error_model: float = STUDY_ERROR_MODEL
    slice_error_model: float = SLICE_ERROR_MODEL
    model_error_persistence: float = 0.0
    # per slice: weight of the model's own noise (shared by its K fold models) and of each fold
    # model's own noise (an OOF row has one fold model's, a test row the mean of K)
    model_noise_weight: float = 0.94
    fold_noise_weight: float = 0.35
    fold_error_persistence: float = 0.0
    fold_strength_spread: float = 0.04
    fold_bias_spread: float = 0.08
    temperature_spread: float = TEMPERATURE_SPREAD
    bias_spread: float = BIAS_SPREAD
    mimic_rate: float = MIMIC_RATE
    # a lesion's visibility over its run: run_end_visibility + (1 - it) x a sine bump (faint ends,
    # where neighbors help most), and partial_volume x exp(-distance / 0.8) just outside it
    run_end_visibility: float = 0.25
    partial_volume: float = 0.35
    # False ("independent"): shared errors are added to every model's logit at the same size while
    # the evidence is scaled by each model's strength, so the difference of a strong and a weak
    # model's logits cancels them and a stacker recovers the evidence. True: the shared errors are
    # part of what every model perceives and are scaled with the evidence: nothing cancels them.
    shared_error_scaled: bool = False
    # x the weight (uniform 0.25-0.5 per model and label) the head gives its model's own nuisance
    # response: an error of the model's own, the same in all its fold models
    head_nuisance_scale: float = 1.0
    # True: a model's raw `any` score is the max of its raw subtype scores (one backbone sees blood
    # and then its type), so `any` carries no error of its own that the subtypes could average
    # away; False ("independent"): `any` has its own view with its own errors
    any_from_subtypes: bool = False
    # Errors every model makes on whole lesions, which no neighbor or study aggregate can undo: a
    # lesion under- or over-read by all (its signal x exp(N(0, spread)) per study and subtype), and
    # runs of hemorrhage-like signal all models see where there is none (rate per study and subtype,
    # up to false_run_length slices, lognormal strength in evidence units) but that are not in the
    # latent evidence: the floor does not see them.
    shared_lesion_spread: float = 0.0
    false_run_rate: float = 0.0
    false_run_length: int = 6
    # Label noise (annotators disagree; RSNA's labels are noisy), so no learner reaches a floor of 0:
    # each annotated run's two edges are moved from the lesion's by round(N(0, label_edge_spread))
    # slices (where its faint ends are), and a faint lesion (intensity < 0.7) is left unannotated
    # with chance label_miss_rate; the evidence (and the floor's input) stays the lesion's own.
    label_edge_spread: float = 0.0
    label_miss_rate: float = 0.0
    # 2.5D base models (neighbor slices as channels, as RSNA 2019's best were): a model perceives
    # (1 - context_weight) x its slice's evidence + context_weight x its mean over +-1 slice (1-2-1)
    context_weight: float = 0.0
    # with any_from_subtypes False: a model's raw `any` score is (1 - any_subtype_share) x its own
    # view of `any` + any_subtype_share x the max of its subtype scores (one backbone, own `any` head)
    any_subtype_share: float = 0.0


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        "independent",
        "the original generator: short-range errors that neighbors and study aggregates largely remove "
        "(stacking gains far more than on real CNN predictions)",
    ),
    Scenario(
        "persistent",
        "errors persistent along z, shared by the models and scaled with what they see, whole lesions "
        "under-read and false runs seen by all, per-fold-model errors, `any` read off the subtypes",
        n_models=6,
        evidence_gain=7.0,
        shared_error_scaled=True, any_from_subtypes=True,
        study_error_shared=0.5, slice_error_shared=1.0, slice_shared_persistence=0.95,
        study_error_model=0.15, slice_error_model=0.3, model_error_persistence=0.7,
        model_noise_weight=0.7, fold_noise_weight=0.7, fold_error_persistence=0.7,
        fold_strength_spread=0.06, fold_bias_spread=0.1, head_nuisance_scale=0.3,
    ),
)}
# the persistent scenario with ten models (3 of them weak): what more models add when errors are shared
# persistent plus label noise, 2.5D models, an `any` view of its own and isotonic heads: see the README
SCENARIOS["realistic"] = replace(
    SCENARIOS["persistent"], name="realistic",
    description="persistent plus noisy labels (annotated run edges and missed faint lesions: the floor is far "
                "from 0), 2.5D base models (neighbors in their view), `any` its own view (0.3 the subtypes' max), "
                "isotonic heads, fewer mimics, sharper lesion edges, whole lesions under-read and false runs seen by all",
    any_from_subtypes=False, any_subtype_share=0.3, context_weight=0.5, head_isotonic=True,
    label_edge_spread=1.5, label_miss_rate=0.8,
    study_error_shared=0.15, study_error_model=0.05, slice_error_shared=0.8, slice_error_model=0.2,
    model_error_persistence=0.92, fold_error_persistence=0.92,
    shared_lesion_spread=0.6, false_run_rate=0.1, mimic_rate=0.04, partial_volume=0.15, run_end_visibility=0.45,
)
SCENARIOS["many_models"] = replace(SCENARIOS["persistent"], name="many_models", n_models=10,
                                   description="the persistent scenario with 10 models")


@dataclass(frozen=True)
class ExportedBenchmark:
    """Where everything was written, plus the counts a caller reports."""

    root: Path
    workdir: Workdir
    heldout_test_labels: Path
    models: tuple[str, ...]
    oof_files: dict[str, Path]
    test_files: dict[str, Path]
    oof_embedding_files: dict[str, Path]            # empty unless embedding_dim > 0
    test_embedding_files: dict[str, list[Path]]     # fold 0, 1, ... per model
    n_images: int
    n_train: int
    n_test: int
    n_studies: int
    n_patients: int
    n_folds: int
    embedding_dim: int
    test_fold_files: dict[str, list[Path]] = None   # fold model 0, 1, ...'s test predictions per model
    latent_evidence: Path | None = None             # the evidence every model sees, before any error
    scenario: str = "independent"


def hex_ids(values: np.ndarray, prefix: str = "ID_", digits: int = 9) -> np.ndarray:
    """``prefix`` + ``digits`` lowercase hex digits of each non-negative integer, without a Python loop."""
    values = np.asarray(values, dtype=np.uint64)
    shifts = np.arange(digits - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    nibbles = ((values[:, None] >> shifts) & np.uint64(0xF)).astype(np.uint8)
    chars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    text = np.ascontiguousarray(chars).view(f"S{digits}").ravel().astype(str)
    return np.char.add(prefix, text).astype(object)


def _distinct_ids(rng: np.random.Generator, n: int, digits: int) -> np.ndarray:
    """``n`` distinct random ids (as the RSNA files' hashed ones look)."""
    return hex_ids(rng.choice(16 ** digits, size=n, replace=False), digits=digits)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _neighbor_smooth(values: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """(prev + 2 self + next) / norm along rows, not across study boundaries; keeps unit variance."""
    prev = np.where(first[:, None], 0.0, np.roll(values, 1, axis=0))
    nxt = np.where(last[:, None], 0.0, np.roll(values, -1, axis=0))
    weight = 4.0 + (~first)[:, None] + (~last)[:, None]  # 2^2 + 1 + 1 at most
    return (prev + 2.0 * values + nxt) / np.sqrt(weight)


def _persistent_noise(rng: np.random.Generator, n_columns: int, first: np.ndarray, slice_no: np.ndarray,
                      persistence: float) -> np.ndarray:
    """(n, n_columns) unit-variance AR(1) noise along the rows, coefficient ``persistence``, restarted at
    every study's first row (independent across studies): an error that persists over a stretch of
    slices, correlation length about 1 / (1 - persistence) slices. Vectorized: one linear filter over
    the whole column, then what it carried across study boundaries is subtracted."""
    from scipy.signal import lfilter

    innovation = rng.normal(size=(len(first), n_columns))
    innovation[~first] *= np.sqrt(1.0 - persistence ** 2)  # a study's first row already has unit variance
    filtered = lfilter([1.0], [1.0, -persistence], innovation, axis=0)
    # row t of a study that starts at row s carries persistence^(t-s+1) x filtered[s-1] from the study before
    starts = np.flatnonzero(first)
    before_start = np.zeros((len(starts), n_columns))
    before_start[1:] = filtered[starts[1:] - 1]
    study = np.cumsum(first) - 1
    return filtered - persistence ** (slice_no + 1.0)[:, None] * before_start[study]


# --- studies, labels and the latent evidence ---------------------------------------------------


@dataclass
class _Studies:
    """Rows in anatomical order (study by study, slice_no 0..n-1); the tables are shuffled later."""

    patient_of_study: np.ndarray
    study_of_row: np.ndarray
    slice_no: np.ndarray
    first: np.ndarray  # row is the first / last slice of its study
    last: np.ndarray
    z: np.ndarray
    y: np.ndarray  # (n, 6) int8
    evidence: np.ndarray  # (n, 6) float64 >= 0
    is_test_patient: np.ndarray


def _make_studies(rng: np.random.Generator, n_patients: int, test_fraction: float, scenario: "Scenario") -> _Studies:
    studies_per_patient = 1 + (rng.random(n_patients) < 0.08)
    patient_of_study = np.repeat(np.arange(n_patients), studies_per_patient)
    n_studies = len(patient_of_study)
    sizes = np.clip(np.rint(rng.normal(40, 8, n_studies)), 25, 60).astype(np.int64)
    study_of_row = np.repeat(np.arange(n_studies), sizes)
    start_of_study = np.cumsum(sizes) - sizes
    slice_no = np.arange(len(study_of_row)) - start_of_study[study_of_row]
    n_in_study = sizes[study_of_row]
    first, last = slice_no == 0, slice_no == n_in_study - 1

    # z: ~5 mm apart, 15 % of series head-to-foot, a few slices at the previous slice's z
    spacing = rng.choice([4.5, 5.0, 5.0, 5.0, 5.5], n_studies) * np.where(rng.random(n_studies) < 0.15, -1.0, 1.0)
    z = np.round(rng.normal(50.0, 30.0, n_studies)[study_of_row] + spacing[study_of_row] * slice_no, 3)
    duplicate = (rng.random(len(z)) < 0.003) & ~first
    z[duplicate] = z[np.flatnonzero(duplicate) - 1]

    # one run per subtype present, runs of a study spread around one focus
    positive = rng.random(n_studies) < POSITIVE_STUDY_RATE
    present = positive[:, None] & (rng.random((n_studies, N_SUBTYPES)) < SUBTYPE_PRESENCE)
    none_yet = positive & ~present.any(axis=1)
    present[np.flatnonzero(none_yet), rng.choice(N_SUBTYPES, none_yet.sum(), p=SUBTYPE_PRESENCE / SUBTYPE_PRESENCE.sum())] = True
    share = rng.beta(2.0, 2.0 / SUBTYPE_RUN_SHARE - 2.0, (n_studies, N_SUBTYPES))  # mean = SUBTYPE_RUN_SHARE
    run_length = np.maximum(1, np.rint(share * sizes[:, None]))
    focus = rng.uniform(0.3, 0.7, n_studies)[:, None] * sizes[:, None]
    center = np.clip(focus + rng.normal(0, 0.12, (n_studies, N_SUBTYPES)) * sizes[:, None], 0, sizes[:, None] - 1)
    run_start = np.clip(np.rint(center - run_length / 2), 0, np.maximum(sizes[:, None] - run_length, 0))
    run_end = run_start + run_length  # exclusive

    at = slice_no[:, None].astype(np.float64)
    start_r, end_r = run_start[study_of_row], run_end[study_of_row]
    inside = present[study_of_row] & (at >= start_r) & (at < end_r)
    y = np.zeros((len(z), len(LABELS)), dtype=np.int8)
    y[:, :N_SUBTYPES] = inside
    y[:, -1] = y[:, :N_SUBTYPES].max(axis=1)

    # visibility: a sine bump over the run (faint at its ends), 0.35 x exp(-distance) just outside it
    length_r = run_length[study_of_row]
    bump = scenario.run_end_visibility + (1.0 - scenario.run_end_visibility) * np.sin(np.pi * (at - start_r + 0.5) / length_r)
    distance_out = np.maximum(start_r - at, at - (end_r - 1))
    outside = scenario.partial_volume * np.exp(-distance_out / 0.8)
    lesion_intensity = rng.lognormal(0.0, 0.45, (n_studies, N_SUBTYPES))
    intensity = lesion_intensity[study_of_row]
    jitter = np.exp(0.25 * _neighbor_smooth(rng.normal(size=(len(z), N_SUBTYPES)), first, last))
    evidence = np.zeros((len(z), len(LABELS)))
    evidence[:, :N_SUBTYPES] = np.where(present[study_of_row], intensity * jitter * np.where(inside, bump, outside), 0.0)
    has_mimic = rng.random((n_studies, N_SUBTYPES)) < scenario.mimic_rate
    mimic_start = np.floor(rng.random((n_studies, N_SUBTYPES)) * sizes[:, None])[study_of_row]
    in_mimic = has_mimic[study_of_row] & (at >= mimic_start) & (at < mimic_start + rng.integers(1, MIMIC_LENGTH + 1, (n_studies, N_SUBTYPES))[study_of_row])
    mimic = rng.lognormal(-0.6, 0.4, (n_studies, N_SUBTYPES))[study_of_row] * jitter
    evidence[:, :N_SUBTYPES] = np.where(in_mimic & ~inside, np.maximum(evidence[:, :N_SUBTYPES], mimic), evidence[:, :N_SUBTYPES])
    evidence[:, -1] = evidence[:, :N_SUBTYPES].max(axis=1)

    is_test_patient = np.zeros(n_patients, dtype=bool)
    is_test_patient[rng.permutation(n_patients)[: int(round(test_fraction * n_patients))]] = True
    if scenario.label_edge_spread or scenario.label_miss_rate:
        # annotators disagree: where a run starts and ends, and whether a faint lesion is there at all
        shape = (n_studies, N_SUBTYPES)
        label_start = np.clip(run_start + np.rint(rng.normal(0, scenario.label_edge_spread, shape)), 0, sizes[:, None] - 1)
        label_end = np.clip(run_end + np.rint(rng.normal(0, scenario.label_edge_spread, shape)), label_start + 1, sizes[:, None])
        annotated = present & ~((rng.random(shape) < scenario.label_miss_rate) & (lesion_intensity < 0.7))
        y[:, :N_SUBTYPES] = annotated[study_of_row] & (at >= label_start[study_of_row]) & (at < label_end[study_of_row])
        y[:, -1] = y[:, :N_SUBTYPES].max(axis=1)
    return _Studies(patient_of_study, study_of_row, slice_no, first, last, z, y, evidence, is_test_patient)


# --- base models -------------------------------------------------------------------------------


@dataclass
class _Model:
    strength: float
    temperature: np.ndarray      # (6,)
    bias: np.ndarray             # (6,)
    head_nuisance: np.ndarray    # (6,) weight the head gives the nuisance component
    study_error: np.ndarray      # (n_studies, 6)
    slice_noise: float
    fold_strength: np.ndarray    # (K,) multiplicative perturbation per fold model
    fold_bias: np.ndarray        # (K, 6)
    rotation: np.ndarray | None  # (K, 18, D): fold model k's map of the components into D dims
    head_isotonic: bool = False  # fit the head by pooling adjacent violators (else a running max)
    head_knots: list | None = None  # per label, set by _fit_head: raw score -> calibrated logit
    head_logit: list | None = None


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(max(rows, cols), min(rows, cols))))
    q = q * np.sign(np.diag(r))
    return q.T if rows < cols else q


def _make_model(rng: np.random.Generator, index: int, n_studies: int, n_folds: int, embedding_dim: int,
                scenario: Scenario) -> _Model:
    tier = MODEL_STRENGTH[index % len(MODEL_STRENGTH)]
    rotation = None
    if embedding_dim:
        n_latent = len(LABELS) * N_COMPONENTS
        if embedding_dim < n_latent:
            raise ValueError(f"embedding_dim {embedding_dim}: need at least {n_latent} (6 labels x {N_COMPONENTS} components)")
        shared = _orthonormal(rng, n_latent, embedding_dim)
        # each fold model's space is a small rotation of the model's: similar, not identical
        rotation = np.stack([_orthonormal(rng, n_latent, embedding_dim) * 0.1 + shared for _ in range(n_folds)])
        rotation /= np.linalg.norm(rotation, axis=2, keepdims=True)
    return _Model(
        strength=float(tier * np.exp(rng.normal(0, 0.05))),
        temperature=np.exp(rng.normal(0, scenario.temperature_spread, len(LABELS))),
        bias=rng.normal(0, scenario.bias_spread, len(LABELS)),
        head_nuisance=scenario.head_nuisance_scale * rng.uniform(0.25, 0.5, len(LABELS)),
        study_error=rng.normal(0, scenario.study_error_model, (n_studies, len(LABELS))),
        slice_noise=float(scenario.slice_error_model * (1.0 + 1.2 * (1.0 - tier))),
        fold_strength=np.exp(rng.normal(0, scenario.fold_strength_spread, n_folds)),
        fold_bias=rng.normal(0, scenario.fold_bias_spread, (n_folds, len(LABELS))),
        rotation=rotation,
        head_isotonic=scenario.head_isotonic,
    )



def _components(rng, model: _Model, rows: np.ndarray, world: "_World") -> np.ndarray:
    """(n_rows, 6, 3) latent components one fold model computes for ``rows``: what it sees."""
    n, scenario = len(rows), world.scenario
    evidence = world.evidence if world.perceived_evidence is None else world.perceived_evidence
    signal = model.strength * LABEL_VISIBILITY * scenario.evidence_gain * evidence[rows]
    if scenario.fold_error_persistence:
        # the fold model's own errors persist along z too: drawn over every image, in slice order
        fold_noise = _persistent_noise(rng, len(LABELS), world.first, world.slice_no, scenario.fold_error_persistence)[rows]
    else:
        fold_noise = rng.normal(size=(n, len(LABELS)))
    study_shared, slice_shared = world.study_shared[world.study_of_row[rows]], world.slice_shared[rows]
    if scenario.shared_error_scaled:
        study_shared, slice_shared = model.strength * study_shared, model.strength * slice_shared
    # (the sum in the original order: "independent" stays bit for bit what it was)
    view = (signal + study_shared + model.study_error[world.study_of_row[rows]]
            + slice_shared + model.slice_noise * (scenario.model_noise_weight * world.model_noise[rows]
                                                  + scenario.fold_noise_weight * fold_noise))
    if scenario.any_from_subtypes:
        view[:, -1] = (NEGATIVE_LOGIT[:N_SUBTYPES] + view[:, :N_SUBTYPES]).max(axis=1) - NEGATIVE_LOGIT[-1]
    elif scenario.any_subtype_share:
        share = scenario.any_subtype_share
        view[:, -1] = (1.0 - share) * view[:, -1] + share * ((NEGATIVE_LOGIT[:N_SUBTYPES] + view[:, :N_SUBTYPES]).max(axis=1) - NEGATIVE_LOGIT[-1])
    # the fold models of one architecture mostly share their quirks: so does the test mean of them
    nuisance = 0.95 * world.model_nuisance[rows] + 0.3 * rng.normal(size=(n, len(LABELS)))
    # a second look at the evidence the head throws away; noisier but independent of the first
    second_view = signal + 0.8 * rng.normal(size=(n, len(LABELS)))
    return np.stack([view, nuisance, second_view], axis=2)


def _head_score(model: _Model, components: np.ndarray) -> np.ndarray:
    """The head's raw score: the view plus the nuisance it failed to discard; the second view ignored."""
    return NEGATIVE_LOGIT + components[:, :, 0] + model.head_nuisance * components[:, :, 1]


def _fit_head(model: _Model, components: np.ndarray, y: np.ndarray, n_bins: int = 200) -> None:
    """Train the head: per label, the positive rate of the labels by quantile bin of its raw score,
    made monotone: a flexible, calibrated map, as a CNN trained with BCE roughly has."""
    score = _head_score(model, components)
    model.head_knots, model.head_logit = [], []
    for j in range(len(LABELS)):  # a loop over the six labels, not rows
        edges = np.unique(np.quantile(score[:, j], np.linspace(0, 1, n_bins + 1)))
        bin_of = np.clip(np.searchsorted(edges, score[:, j], side="right") - 1, 0, len(edges) - 2)
        count = np.bincount(bin_of, minlength=len(edges) - 1)
        positives = np.bincount(bin_of, weights=y[:, j], minlength=len(edges) - 1)
        center = np.bincount(bin_of, weights=score[:, j], minlength=len(edges) - 1) / np.maximum(count, 1)
        prior = (y[:, j].sum() + 0.5) / (len(y) + 1.0)
        if model.head_isotonic:
            # pool adjacent violators over the bins (weighted by their counts): a running max of noisy
            # bin rates overstates the rate of every bin after a lucky one (rare labels most)
            from sklearn.isotonic import IsotonicRegression

            rate = IsotonicRegression(y_min=0.0, y_max=1.0).fit_transform(np.arange(len(count)), (positives + 2.0 * prior) / (count + 2.0), sample_weight=count + 2.0)
            rate = np.clip(rate, prior / 50.0, None)
        else:
            rate = np.maximum.accumulate((positives + 2.0 * prior) / (count + 2.0))
        keep = count > 0
        model.head_knots.append(center[keep])
        model.head_logit.append(np.log(rate[keep] / (1.0 - np.minimum(rate[keep], 1 - 1e-6))))


def _head_probabilities(model: _Model, components: np.ndarray, fold: np.ndarray | int) -> np.ndarray:
    """What the head of fold model ``fold`` (one per row, or one for all) outputs: its trained
    head on the raw score, then miscalibrated (its own temperature and bias, plus the fold model's)."""
    score = _head_score(model, components)
    logit = np.column_stack([np.interp(score[:, j], model.head_knots[j], model.head_logit[j]) for j in range(len(LABELS))])
    fold_strength = np.reshape(model.fold_strength[fold], (-1, 1))
    logit = (fold_strength * logit + model.bias + model.fold_bias[fold]) / model.temperature
    return _sigmoid(logit)


def _embed(rng, model: _Model, components: np.ndarray, fold: np.ndarray | int) -> np.ndarray:
    """Components (standardized) through fold model ``fold``'s map into D dims, plus small noise: float16."""
    # pooled CNN features are nonlinear in the evidence, much as the head's output is: the two
    # views go through the head's calibrated map (so a linear read-out of them is well specified)
    squashed = components.copy()
    for j in range(len(LABELS)):
        for c in (0, 2):
            squashed[:, j, c] = np.interp(NEGATIVE_LOGIT[j] + components[:, j, c], model.head_knots[j], model.head_logit[j])
    flat = squashed.reshape(len(components), -1) / COMPONENT_SCALE
    if np.ndim(fold) == 0:
        embedded = flat @ model.rotation[fold]
    else:
        embedded = np.empty((len(flat), model.rotation.shape[2]))
        for k in range(len(model.rotation)):  # a loop over the K fold models, not over rows
            at = fold == k
            embedded[at] = flat[at] @ model.rotation[k]
    embedded += rng.normal(0, 0.05, embedded.shape)
    return embedded.astype(np.float16)



@dataclass
class _World:
    """What every model sees: the evidence and the errors all models share."""

    study_of_row: np.ndarray
    evidence: np.ndarray
    study_shared: np.ndarray   # (n_studies, 6)
    slice_shared: np.ndarray   # (n, 6) smoothed along z
    model_noise: np.ndarray    # (n, 6) rewritten per model: its own noise, shared by its fold models
    model_nuisance: np.ndarray  # (n, 6) rewritten per model: the nuisance response of its fold models
    scenario: Scenario
    first: np.ndarray          # row is its study's first slice (the rows are in slice order)
    slice_no: np.ndarray
    perceived_evidence: np.ndarray | None = None  # the evidence as every model reads it, when not the latent one


# --- writing -----------------------------------------------------------------------------------


def _frame(ids: np.ndarray, probabilities: np.ndarray, fold: np.ndarray | None = None) -> pd.DataFrame:
    columns = {"image_id": ids}
    if fold is not None:
        columns["fold"] = fold.astype(np.int8)
    columns.update({label: probabilities[:, j].astype(np.float32) for j, label in enumerate(LABELS)})
    return pd.DataFrame(columns)


def _write_npy(array: np.ndarray, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return write_bytes(buffer.getvalue(), path)


def _contract_tables(rng: np.random.Generator, s: _Studies, n_patients: int) -> tuple:
    """(image_ids, metadata, labels, is_test) in anatomical order: the rows of the study arrays."""
    n, n_studies = len(s.z), len(s.patient_of_study)
    image_ids = _distinct_ids(rng, n, 9)
    study_ids = _distinct_ids(rng, n_studies, 10)
    patient_ids = _distinct_ids(rng, n_patients, 8)
    is_test = s.is_test_patient[s.patient_of_study[s.study_of_row]]
    metadata = pd.DataFrame({
        "image_id": image_ids,
        "patient_id": patient_ids[s.patient_of_study[s.study_of_row]],
        "study_id": study_ids[s.study_of_row],
        "split": np.where(is_test, "test", "train").astype(object),
        "z": s.z,
    })
    label_frame = pd.DataFrame({"image_id": image_ids, **{label: s.y[:, j] for j, label in enumerate(LABELS)}})
    return image_ids, metadata, label_frame, is_test


def _write_work_data(rng: np.random.Generator, root: Path, metadata, label_frame, is_test, n_folds: int, seed: int) -> tuple:
    """(wd, folds, heldout labels path, test rows in file order), once data/ and the held-out labels are written."""
    from stackkit.data.prepare import make_folds

    # file order carries nothing: the tables are shuffled; the arrays keep anatomical order
    shuffled = rng.permutation(len(metadata))
    metadata_file = metadata.iloc[shuffled].reset_index(drop=True)
    labels_file = label_frame.iloc[shuffled].reset_index(drop=True)
    test_rows_shuffled = shuffled[is_test[shuffled]]
    labels_train = labels_file[~is_test[shuffled]].reset_index(drop=True)
    folds = make_folds(metadata_file, labels_train, n_folds, seed)

    wd = Workdir(root / "work")
    write_parquet(metadata_file, wd.metadata)
    write_parquet(labels_train, wd.labels)
    write_parquet(folds, wd.folds)
    heldout = root / "heldout_test_labels.parquet"
    write_parquet(labels_file[is_test[shuffled]].reset_index(drop=True), heldout)
    return wd, folds, heldout, test_rows_shuffled


def _export_rows(rng: np.random.Generator, image_ids, folds: pd.DataFrame, test_rows_shuffled) -> tuple:
    """(oof rows, their folds, test rows): array rows in the exporter's own order."""
    # exported rows in an order of their own (an exporter's, not the work directory's): importers
    # must align by image_id, and embeddings follow the rows of their prediction file
    row_of_id = pd.Series(np.arange(len(image_ids)), index=image_ids)
    export_order = rng.permutation(len(folds))
    oof_rows = row_of_id.loc[folds["image_id"].to_numpy()[export_order]].to_numpy()
    oof_fold = folds["fold"].to_numpy().astype(np.int64)[export_order]
    test_rows = rng.permutation(test_rows_shuffled)
    return oof_rows, oof_fold, test_rows


def _shared_world(rng: np.random.Generator, s: _Studies, scenario: Scenario) -> _World:
    """The errors every model shares, with the per-model arrays left to fill per model."""
    n, n_studies = len(s.z), len(s.patient_of_study)
    study_shared = rng.normal(0, scenario.study_error_shared, (n_studies, len(LABELS)))
    # hard slices are hard for every CNN, and so are their neighbors; partly shared across labels
    if scenario.slice_shared_persistence:
        # a stretch of slices every CNN misreads (an artifact, an anatomy they all find hard), as
        # long as a lesion's run: neighbors and study aggregates cannot tell it from a lesion
        rho = scenario.slice_shared_persistence
        common = scenario.slice_shared_label_common
        common_noise = common * _persistent_noise(rng, 1, s.first, s.slice_no, rho)
        if scenario.slice_shared_one_subtype:
            # the common part on `any` and one subtype per study (drawn after the label-specific part)
            routed = np.zeros((n, len(LABELS)))
            routed[:, -1] = 1.0
            label_noise = _persistent_noise(rng, len(LABELS), s.first, s.slice_no, rho)
            routed[np.arange(n), rng.integers(0, N_SUBTYPES, n_studies)[s.study_of_row]] = 1.0
            slice_shared = scenario.slice_error_shared * (common_noise * routed + np.sqrt(1.0 - common ** 2) * label_noise)
        else:
            slice_shared = scenario.slice_error_shared * (common_noise + np.sqrt(1.0 - common ** 2) * _persistent_noise(rng, len(LABELS), s.first, s.slice_no, rho))
    else:
        # smoothed twice: correlated over about +-2 slices
        common = scenario.slice_shared_label_common
        slice_shared = scenario.slice_error_shared * _neighbor_smooth(_neighbor_smooth(
            common * rng.normal(size=(n, 1)) + np.sqrt(1.0 - common ** 2) * rng.normal(size=(n, len(LABELS))), s.first, s.last), s.first, s.last) / 1.2
    perceived = None
    if scenario.shared_lesion_spread or scenario.false_run_rate:
        sizes = np.bincount(s.study_of_row)
        shape = (n_studies, N_SUBTYPES)
        lesion_factor = np.exp(rng.normal(0, scenario.shared_lesion_spread, shape))[s.study_of_row]
        at = s.slice_no[:, None].astype(np.float64)
        false_start = np.floor(rng.random(shape) * sizes[:, None])[s.study_of_row]
        false_length = rng.integers(2, scenario.false_run_length + 1, shape)[s.study_of_row]
        in_false = (rng.random(shape) < scenario.false_run_rate)[s.study_of_row] & (at >= false_start) & (at < false_start + false_length)
        # a bump over the false run, as a lesion's (faint at its ends)
        bump = 0.25 + 0.75 * np.sin(np.pi * (at - false_start + 0.5) / false_length)
        false_evidence = np.where(in_false, rng.lognormal(-0.9, 0.5, shape)[s.study_of_row] * bump, 0.0)
        perceived = np.empty_like(s.evidence)
        perceived[:, :N_SUBTYPES] = np.maximum(s.evidence[:, :N_SUBTYPES] * lesion_factor, false_evidence)
        perceived[:, -1] = perceived[:, :N_SUBTYPES].max(axis=1)
    if scenario.context_weight:
        # a 2.5D model reads its slice with its neighbors: the evidence it perceives is partly theirs
        seen = s.evidence if perceived is None else perceived
        prev = np.where(s.first[:, None], seen, np.roll(seen, 1, axis=0))
        nxt = np.where(s.last[:, None], seen, np.roll(seen, -1, axis=0))
        perceived = (1.0 - scenario.context_weight) * seen + scenario.context_weight * (prev + 2.0 * seen + nxt) / 4.0
    return _World(
        study_of_row=s.study_of_row,
        evidence=s.evidence,
        perceived_evidence=perceived,
        study_shared=study_shared,
        slice_shared=slice_shared,
        model_noise=np.empty((n, len(LABELS))),
        model_nuisance=np.empty((n, len(LABELS))),
        scenario=scenario,
        first=s.first,
        slice_no=s.slice_no,
    )


def write_exported_benchmark(
    root,
    *,
    n_patients: int,
    n_models: int | None = None,
    seed: int = 0,
    embedding_dim: int = 0,
    n_folds: int = 5,
    test_fraction: float = 0.2,
    scenario: str | Scenario = "independent",
) -> ExportedBenchmark:
    """Write the work directory's data/, the held-out test labels, the latent evidence and the
    exported predictions (see the module docstring) under ``root``; deterministic for ``seed``.
    ``scenario``: a name in SCENARIOS (or a Scenario); ``n_models`` defaults to the scenario's."""
    if isinstance(scenario, str):
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")
        scenario = SCENARIOS[scenario]
    n_models = scenario.n_models if n_models is None else n_models
    if n_models < 1:
        raise ValueError("n_models must be at least 1")
    root = Path(root)
    rng = np.random.default_rng(seed)
    s = _make_studies(rng, n_patients, test_fraction, scenario)
    n, n_studies = len(s.z), len(s.patient_of_study)

    image_ids, metadata, label_frame, is_test = _contract_tables(rng, s, n_patients)
    wd, folds, heldout, test_rows_shuffled = _write_work_data(rng, root, metadata, label_frame, is_test, n_folds, seed)
    # outside the work directory, like the held-out labels: the floor's input, never the pipeline's
    latent = write_parquet(_frame(image_ids, s.evidence), root / "latent_evidence.parquet")
    oof_rows, oof_fold, test_rows = _export_rows(rng, image_ids, folds, test_rows_shuffled)
    world = _shared_world(rng, s, scenario)
    exports = root / "exports"
    names = tuple(MODEL_NAMES[m] if m < len(MODEL_NAMES) else f"model{m:02d}" for m in range(n_models))
    oof_files, test_files, test_fold_files, oof_emb_files, test_emb_files = {}, {}, {}, {}, {}
    for m, name in enumerate(names):
        model_rng = np.random.default_rng([seed, m + 1])
        model = _make_model(model_rng, m, n_studies, n_folds, embedding_dim, scenario)
        if scenario.model_error_persistence:
            # a model's own errors persist along z as the shared ones do
            world.model_noise = _persistent_noise(model_rng, len(LABELS), s.first, s.slice_no, scenario.model_error_persistence)
        else:
            # a model's own errors: half of them smooth along z (neighboring slices look alike)
            world.model_noise = 0.5 * _neighbor_smooth(model_rng.normal(size=(n, len(LABELS))), s.first, s.last) + 0.87 * model_rng.normal(size=(n, len(LABELS)))
        world.model_nuisance = model_rng.normal(size=(n, len(LABELS)))
        oof_components = _components(model_rng, model, oof_rows, world)
        _fit_head(model, oof_components, s.y[oof_rows].astype(np.float64))
        oof_files[name] = write_parquet(_frame(image_ids[oof_rows], _head_probabilities(model, oof_components, oof_fold), oof_fold), exports / f"{name}_oof.parquet")
        if embedding_dim:
            oof_emb_files[name] = _write_npy(_embed(model_rng, model, oof_components, oof_fold), exports / f"{name}_oof_emb.npy")
        del oof_components
        test_probability = np.zeros((len(test_rows), len(LABELS)))
        test_emb_files[name], test_fold_files[name] = [], []
        for k in range(n_folds):  # the K fold models each predict every test image
            components = _components(model_rng, model, test_rows, world)
            fold_probability = _head_probabilities(model, components, k)
            test_probability += fold_probability / n_folds
            test_fold_files[name].append(write_parquet(_frame(image_ids[test_rows], fold_probability), exports / f"{name}_test_fold{k}.parquet"))
            if embedding_dim:
                test_emb_files[name].append(_write_npy(_embed(model_rng, model, components, k), exports / f"{name}_test_emb_fold{k}.npy"))
        test_files[name] = write_parquet(_frame(image_ids[test_rows], test_probability), exports / f"{name}_test.parquet")
        if not embedding_dim:
            del test_emb_files[name]
    return ExportedBenchmark(
        root=root, workdir=wd, heldout_test_labels=heldout, models=names, oof_files=oof_files, test_files=test_files,
        oof_embedding_files=oof_emb_files, test_embedding_files=test_emb_files, n_images=n, n_train=len(folds),
        n_test=len(test_rows), n_studies=n_studies, n_patients=n_patients, n_folds=n_folds, embedding_dim=embedding_dim,
        test_fold_files=test_fold_files, latent_evidence=latent, scenario=scenario.name,
    )
