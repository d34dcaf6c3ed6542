"""The latent world of the held-out benchmark (:mod:`stackkit.testing.exported`): the scenarios'
dials, the studies with their labels and latent evidence, and the simulated base models (their
latent components, heads and embeddings). The module docstring of :mod:`stackkit.testing.exported`
describes the model; this module holds its parts, vectorized over whole columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from stackkit.contract import LABELS

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


def hex_ids(values: np.ndarray, prefix: str = "ID_", digits: int = 9) -> np.ndarray:
    """``prefix`` + ``digits`` lowercase hex digits of each non-negative integer, without a Python loop."""
    values = np.asarray(values, dtype=np.uint64)
    shifts = np.arange(digits - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    nibbles = ((values[:, None] >> shifts) & np.uint64(0xF)).astype(np.uint8)
    chars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    text = np.ascontiguousarray(chars).view(f"S{digits}").ravel().astype(str)
    return np.char.add(prefix, text).astype(object)


def distinct_ids(rng: np.random.Generator, n: int, digits: int) -> np.ndarray:
    """``n`` distinct random ids (as the RSNA files' hashed ones look)."""
    return hex_ids(rng.choice(16 ** digits, size=n, replace=False), digits=digits)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def neighbor_smooth(values: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """(prev + 2 self + next) / norm along rows, not across study boundaries; keeps unit variance."""
    prev = np.where(first[:, None], 0.0, np.roll(values, 1, axis=0))
    nxt = np.where(last[:, None], 0.0, np.roll(values, -1, axis=0))
    weight = 4.0 + (~first)[:, None] + (~last)[:, None]  # 2^2 + 1 + 1 at most
    return (prev + 2.0 * values + nxt) / np.sqrt(weight)


def study_rows(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(study of each row, slice number in its study) for studies of ``sizes`` rows, laid out study by study."""
    study_of_row = np.repeat(np.arange(len(sizes)), sizes)
    start_of_study = np.cumsum(sizes) - sizes
    return study_of_row, np.arange(len(study_of_row)) - start_of_study[study_of_row]


def persistent_noise(rng: np.random.Generator, n_columns: int, first: np.ndarray, slice_no: np.ndarray,
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
class Studies:
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


def _slice_z(rng: np.random.Generator, sizes: np.ndarray, study_of_row: np.ndarray, slice_no: np.ndarray, first: np.ndarray) -> np.ndarray:
    """z of every row: ~5 mm apart, 15 % of series head-to-foot, a few slices at the previous slice's z."""
    n_studies = len(sizes)
    spacing = rng.choice([4.5, 5.0, 5.0, 5.0, 5.5], n_studies) * np.where(rng.random(n_studies) < 0.15, -1.0, 1.0)
    z = np.round(rng.normal(50.0, 30.0, n_studies)[study_of_row] + spacing[study_of_row] * slice_no, 3)
    duplicate = (rng.random(len(z)) < 0.003) & ~first
    z[duplicate] = z[np.flatnonzero(duplicate) - 1]
    return z


def _lesion_runs(rng: np.random.Generator, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(present, run_start, run_end) per study and subtype: one run per subtype present, the runs of a
    study spread around one focus; ``run_end`` exclusive, in slices."""
    n_studies = len(sizes)
    positive = rng.random(n_studies) < POSITIVE_STUDY_RATE
    present = positive[:, None] & (rng.random((n_studies, N_SUBTYPES)) < SUBTYPE_PRESENCE)
    none_yet = positive & ~present.any(axis=1)
    present[np.flatnonzero(none_yet), rng.choice(N_SUBTYPES, none_yet.sum(), p=SUBTYPE_PRESENCE / SUBTYPE_PRESENCE.sum())] = True
    share = rng.beta(2.0, 2.0 / SUBTYPE_RUN_SHARE - 2.0, (n_studies, N_SUBTYPES))  # mean = SUBTYPE_RUN_SHARE
    run_length = np.maximum(1, np.rint(share * sizes[:, None]))
    focus = rng.uniform(0.3, 0.7, n_studies)[:, None] * sizes[:, None]
    center = np.clip(focus + rng.normal(0, 0.12, (n_studies, N_SUBTYPES)) * sizes[:, None], 0, sizes[:, None] - 1)
    run_start = np.clip(np.rint(center - run_length / 2), 0, np.maximum(sizes[:, None] - run_length, 0))
    return present, run_start, run_start + run_length


def _evidence(rng: np.random.Generator, scenario: "Scenario", s: Studies, sizes: np.ndarray, runs: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The (n, 6) latent evidence of the lesions (a sine bump over each run, partial volume just outside
    it) and of the mimics, and each lesion's intensity (n_studies, 5)."""
    present, run_start, run_end = runs
    n_studies, n = len(sizes), len(s.z)
    at = s.slice_no[:, None].astype(np.float64)
    start_r, end_r = run_start[s.study_of_row], run_end[s.study_of_row]
    inside = present[s.study_of_row] & (at >= start_r) & (at < end_r)
    length_r = (run_end - run_start)[s.study_of_row]
    bump = scenario.run_end_visibility + (1.0 - scenario.run_end_visibility) * np.sin(np.pi * (at - start_r + 0.5) / length_r)
    distance_out = np.maximum(start_r - at, at - (end_r - 1))
    outside = scenario.partial_volume * np.exp(-distance_out / 0.8)
    lesion_intensity = rng.lognormal(0.0, 0.45, (n_studies, N_SUBTYPES))
    intensity = lesion_intensity[s.study_of_row]
    jitter = np.exp(0.25 * neighbor_smooth(rng.normal(size=(n, N_SUBTYPES)), s.first, s.last))
    evidence = np.zeros((n, len(LABELS)))
    evidence[:, :N_SUBTYPES] = np.where(present[s.study_of_row], intensity * jitter * np.where(inside, bump, outside), 0.0)
    has_mimic = rng.random((n_studies, N_SUBTYPES)) < scenario.mimic_rate
    mimic_start = np.floor(rng.random((n_studies, N_SUBTYPES)) * sizes[:, None])[s.study_of_row]
    mimic_length = rng.integers(1, MIMIC_LENGTH + 1, (n_studies, N_SUBTYPES))[s.study_of_row]
    in_mimic = has_mimic[s.study_of_row] & (at >= mimic_start) & (at < mimic_start + mimic_length)
    mimic = rng.lognormal(-0.6, 0.4, (n_studies, N_SUBTYPES))[s.study_of_row] * jitter
    evidence[:, :N_SUBTYPES] = np.where(in_mimic & ~inside, np.maximum(evidence[:, :N_SUBTYPES], mimic), evidence[:, :N_SUBTYPES])
    evidence[:, -1] = evidence[:, :N_SUBTYPES].max(axis=1)
    return evidence, lesion_intensity


def _run_labels(s: Studies, present: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(n, 6) int8: a subtype's label on the slices of its runs [start, end), `any` their max."""
    at = s.slice_no[:, None].astype(np.float64)
    y = np.zeros((len(s.z), len(LABELS)), dtype=np.int8)
    y[:, :N_SUBTYPES] = present[s.study_of_row] & (at >= start[s.study_of_row]) & (at < end[s.study_of_row])
    y[:, -1] = y[:, :N_SUBTYPES].max(axis=1)
    return y


def make_studies(rng: np.random.Generator, n_patients: int, test_fraction: float, scenario: "Scenario") -> Studies:
    studies_per_patient = 1 + (rng.random(n_patients) < 0.08)
    patient_of_study = np.repeat(np.arange(n_patients), studies_per_patient)
    n_studies = len(patient_of_study)
    sizes = np.clip(np.rint(rng.normal(40, 8, n_studies)), 25, 60).astype(np.int64)
    study_of_row, slice_no = study_rows(sizes)
    n_in_study = sizes[study_of_row]
    first, last = slice_no == 0, slice_no == n_in_study - 1
    z = _slice_z(rng, sizes, study_of_row, slice_no, first)
    present, run_start, run_end = runs = _lesion_runs(rng, sizes)
    s = Studies(patient_of_study, study_of_row, slice_no, first, last, z, None, None, None)
    s.y = _run_labels(s, present, run_start, run_end)
    s.evidence, lesion_intensity = _evidence(rng, scenario, s, sizes, runs)

    s.is_test_patient = np.zeros(n_patients, dtype=bool)
    s.is_test_patient[rng.permutation(n_patients)[: int(round(test_fraction * n_patients))]] = True
    if scenario.label_edge_spread or scenario.label_miss_rate:
        # annotators disagree: where a run starts and ends, and whether a faint lesion is there at all
        shape = (n_studies, N_SUBTYPES)
        label_start = np.clip(run_start + np.rint(rng.normal(0, scenario.label_edge_spread, shape)), 0, sizes[:, None] - 1)
        label_end = np.clip(run_end + np.rint(rng.normal(0, scenario.label_edge_spread, shape)), label_start + 1, sizes[:, None])
        annotated = present & ~((rng.random(shape) < scenario.label_miss_rate) & (lesion_intensity < 0.7))
        s.y = _run_labels(s, annotated, label_start, label_end)
    return s


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
    head_knots: list | None = None  # per label, set by fit_head: raw score -> calibrated logit
    head_logit: list | None = None


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(max(rows, cols), min(rows, cols))))
    q = q * np.sign(np.diag(r))
    return q.T if rows < cols else q


def make_model(rng: np.random.Generator, index: int, n_studies: int, n_folds: int, embedding_dim: int,
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



def model_components(rng, model: _Model, rows: np.ndarray, world: "World") -> np.ndarray:
    """(n_rows, 6, 3) latent components one fold model computes for ``rows``: what it sees."""
    n, scenario = len(rows), world.scenario
    evidence = world.evidence if world.perceived_evidence is None else world.perceived_evidence
    signal = model.strength * LABEL_VISIBILITY * scenario.evidence_gain * evidence[rows]
    if scenario.fold_error_persistence:
        # the fold model's own errors persist along z too: drawn over every image, in slice order
        fold_noise = persistent_noise(rng, len(LABELS), world.first, world.slice_no, scenario.fold_error_persistence)[rows]
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


def fit_head(model: _Model, components: np.ndarray, y: np.ndarray, n_bins: int = 200) -> None:
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


def head_probabilities(model: _Model, components: np.ndarray, fold: np.ndarray | int) -> np.ndarray:
    """What the head of fold model ``fold`` (one per row, or one for all) outputs: its trained
    head on the raw score, then miscalibrated (its own temperature and bias, plus the fold model's)."""
    score = _head_score(model, components)
    logit = np.column_stack([np.interp(score[:, j], model.head_knots[j], model.head_logit[j]) for j in range(len(LABELS))])
    fold_strength = np.reshape(model.fold_strength[fold], (-1, 1))
    logit = (fold_strength * logit + model.bias + model.fold_bias[fold]) / model.temperature
    return _sigmoid(logit)


def embed(rng, model: _Model, components: np.ndarray, fold: np.ndarray | int) -> np.ndarray:
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
class World:
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
