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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import write_bytes, write_parquet
from stackkit.testing.latent import (MODEL_NAMES, N_SUBTYPES, SCENARIOS, Scenario, Studies, World, distinct_ids, embed, fit_head,
                                     head_probabilities, hex_ids, make_model, make_studies, model_components, neighbor_smooth,
                                     persistent_noise)


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


def _contract_tables(rng: np.random.Generator, s: Studies, n_patients: int) -> tuple:
    """(image_ids, metadata, labels, is_test) in anatomical order: the rows of the study arrays."""
    n, n_studies = len(s.z), len(s.patient_of_study)
    image_ids = distinct_ids(rng, n, 9)
    study_ids = distinct_ids(rng, n_studies, 10)
    patient_ids = distinct_ids(rng, n_patients, 8)
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


def _shared_world(rng: np.random.Generator, s: Studies, scenario: Scenario) -> World:
    """The errors every model shares, with the per-model arrays left to fill per model."""
    n, n_studies = len(s.z), len(s.patient_of_study)
    study_shared = rng.normal(0, scenario.study_error_shared, (n_studies, len(LABELS)))
    # hard slices are hard for every CNN, and so are their neighbors; partly shared across labels
    if scenario.slice_shared_persistence:
        # a stretch of slices every CNN misreads (an artifact, an anatomy they all find hard), as
        # long as a lesion's run: neighbors and study aggregates cannot tell it from a lesion
        rho = scenario.slice_shared_persistence
        common = scenario.slice_shared_label_common
        common_noise = common * persistent_noise(rng, 1, s.first, s.slice_no, rho)
        if scenario.slice_shared_one_subtype:
            # the common part on `any` and one subtype per study (drawn after the label-specific part)
            routed = np.zeros((n, len(LABELS)))
            routed[:, -1] = 1.0
            label_noise = persistent_noise(rng, len(LABELS), s.first, s.slice_no, rho)
            routed[np.arange(n), rng.integers(0, N_SUBTYPES, n_studies)[s.study_of_row]] = 1.0
            slice_shared = scenario.slice_error_shared * (common_noise * routed + np.sqrt(1.0 - common ** 2) * label_noise)
        else:
            slice_shared = scenario.slice_error_shared * (common_noise + np.sqrt(1.0 - common ** 2) * persistent_noise(rng, len(LABELS), s.first, s.slice_no, rho))
    else:
        # smoothed twice: correlated over about +-2 slices
        common = scenario.slice_shared_label_common
        slice_shared = scenario.slice_error_shared * neighbor_smooth(neighbor_smooth(
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
    return World(
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


@dataclass(frozen=True)
class _ModelExport:
    """What every simulated base model is exported from: the studies, the shared world, the rows
    (OOF rows with their fold, test rows) and where its files go."""

    s: Studies
    world: World
    scenario: Scenario
    image_ids: np.ndarray
    oof_rows: np.ndarray
    oof_fold: np.ndarray
    test_rows: np.ndarray
    exports: Path
    n_folds: int
    embedding_dim: int
    seed: int


def _export_model(x: _ModelExport, m: int, name: str) -> tuple:
    """Model ``m``'s files: (OOF predictions, OOF embeddings or None, test mean, per fold model test
    predictions, per fold model test embeddings); its own random stream ``[seed, m + 1]``."""
    s, world, scenario, n, n_folds, exports = x.s, x.world, x.scenario, len(x.s.z), x.n_folds, x.exports
    model_rng = np.random.default_rng([x.seed, m + 1])
    model = make_model(model_rng, m, len(s.patient_of_study), n_folds, x.embedding_dim, scenario)
    if scenario.model_error_persistence:
        # a model's own errors persist along z as the shared ones do
        world.model_noise = persistent_noise(model_rng, len(LABELS), s.first, s.slice_no, scenario.model_error_persistence)
    else:
        # a model's own errors: half of them smooth along z (neighboring slices look alike)
        world.model_noise = 0.5 * neighbor_smooth(model_rng.normal(size=(n, len(LABELS))), s.first, s.last) + 0.87 * model_rng.normal(size=(n, len(LABELS)))
    world.model_nuisance = model_rng.normal(size=(n, len(LABELS)))
    oof_components = model_components(model_rng, model, x.oof_rows, world)
    fit_head(model, oof_components, s.y[x.oof_rows].astype(np.float64))
    oof_file = write_parquet(_frame(x.image_ids[x.oof_rows], head_probabilities(model, oof_components, x.oof_fold), x.oof_fold),
                             exports / f"{name}_oof.parquet")
    oof_emb = None
    if x.embedding_dim:
        oof_emb = _write_npy(embed(model_rng, model, oof_components, x.oof_fold), exports / f"{name}_oof_emb.npy")
    del oof_components
    test_ids = x.image_ids[x.test_rows]
    test_probability = np.zeros((len(x.test_rows), len(LABELS)))
    fold_files, emb_files = [], []
    for k in range(n_folds):  # the K fold models each predict every test image
        components = model_components(model_rng, model, x.test_rows, world)
        fold_probability = head_probabilities(model, components, k)
        test_probability += fold_probability / n_folds
        fold_files.append(write_parquet(_frame(test_ids, fold_probability), exports / f"{name}_test_fold{k}.parquet"))
        if x.embedding_dim:
            emb_files.append(_write_npy(embed(model_rng, model, components, k), exports / f"{name}_test_emb_fold{k}.npy"))
    test_file = write_parquet(_frame(test_ids, test_probability), exports / f"{name}_test.parquet")
    return oof_file, oof_emb, test_file, fold_files, emb_files


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
    s = make_studies(rng, n_patients, test_fraction, scenario)
    n, n_studies = len(s.z), len(s.patient_of_study)

    image_ids, metadata, label_frame, is_test = _contract_tables(rng, s, n_patients)
    wd, folds, heldout, test_rows_shuffled = _write_work_data(rng, root, metadata, label_frame, is_test, n_folds, seed)
    # outside the work directory, like the held-out labels: the floor's input, never the pipeline's
    latent = write_parquet(_frame(image_ids, s.evidence), root / "latent_evidence.parquet")
    oof_rows, oof_fold, test_rows = _export_rows(rng, image_ids, folds, test_rows_shuffled)
    plan = _ModelExport(s, _shared_world(rng, s, scenario), scenario, image_ids, oof_rows, oof_fold, test_rows,
                        root / "exports", n_folds, embedding_dim, seed)
    names = tuple(MODEL_NAMES[m] if m < len(MODEL_NAMES) else f"model{m:02d}" for m in range(n_models))
    oof_files, test_files, test_fold_files, oof_emb_files, test_emb_files = {}, {}, {}, {}, {}
    for m, name in enumerate(names):
        oof_files[name], oof_emb, test_files[name], test_fold_files[name], test_embs = _export_model(plan, m, name)
        if embedding_dim:
            oof_emb_files[name], test_emb_files[name] = oof_emb, test_embs
    return ExportedBenchmark(
        root=root, workdir=wd, heldout_test_labels=heldout, models=names, oof_files=oof_files, test_files=test_files,
        oof_embedding_files=oof_emb_files, test_embedding_files=test_emb_files, n_images=n, n_train=len(folds),
        n_test=len(test_rows), n_studies=n_studies, n_patients=n_patients, n_folds=n_folds, embedding_dim=embedding_dim,
        test_fold_files=test_fold_files, latent_evidence=latent, scenario=scenario.name,
    )


__all__ = ["SCENARIOS", "ExportedBenchmark", "Scenario", "hex_ids", "write_exported_benchmark"]
