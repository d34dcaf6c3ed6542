"""Base models with embeddings (contract v2), imported the way another tool would: for tests.

Each model's embedding of a slice holds more than its probabilities: the labels of the slice
(and of its neighbors, what a CNN with context sees) mixed with noise, seen through a random
rotation; each fold model's rotation differs slightly from the others (an embedding is only
comparable within one fold model's space).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import write_parquet
from stackkit.contract.validate import load_core

from stackkit.testing.contract import noisy_predictions, with_folds


def _rotation(rng, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def synthetic_embeddings(truth: np.ndarray, fold_of_row: np.ndarray, n_folds: int, *, dim: int = 16, signal: float = 2.0,
                         drift: float = 0.15, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(embeddings of the rows by fold model ``fold_of_row[i]``, the per-fold rotations)."""
    rng = np.random.default_rng(seed)
    base = _rotation(rng, dim)
    rotations = []
    for _ in range(n_folds):
        skew = rng.normal(0, drift, (dim, dim))
        q, r = np.linalg.qr(np.eye(dim) + (skew - skew.T) / 2)
        rotations.append(base @ (q * np.sign(np.diag(r))))
    latent = rng.normal(0, 1.0, (len(truth), dim))
    latent[:, : truth.shape[1]] += signal * (2 * truth - 1)
    out = np.empty_like(latent)
    for k in range(n_folds):
        rows = fold_of_row == k
        out[rows] = latent[rows] @ rotations[k].T
    return out.astype(np.float32), rotations


def import_models_with_embeddings(wd: Workdir, models=("model0", "model1"), *, dim: int = 16, per_fold_test: bool = True,
                                  strength: float = 1.0, seed: int = 0, tmp: Path | None = None) -> Workdir:
    """preds/<m>/ for each model through `base import` with embeddings (weak probabilities, informative embeddings)."""
    from base_models.importer import import_predictions

    metadata, labels, folds = load_core(wd)
    tmp = Path(tmp or wd.root / "_exported")
    tmp.mkdir(parents=True, exist_ok=True)
    n_folds = int(folds["fold"].max()) + 1
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"].to_numpy(dtype=object)
    truth_of = labels.set_index("image_id")[list(LABELS)]
    rng = np.random.default_rng(seed + 7)
    test_truth = (rng.random((len(test_ids), len(LABELS))) < 0.15).astype(np.float64)
    oof_truth = truth_of.reindex(folds["image_id"]).to_numpy(dtype=np.float64)
    for m, name in enumerate(models):
        oof = with_folds(noisy_predictions(labels, folds["image_id"], strength=strength, seed=seed + 10 * m + 1), folds)
        test = noisy_predictions(labels, test_ids, strength=strength, seed=seed + 10 * m + 2)
        write_parquet(oof, tmp / f"{name}_oof.parquet")
        write_parquet(test, tmp / f"{name}_test.parquet")
        emb_oof, rotations = synthetic_embeddings(oof_truth, folds["fold"].to_numpy(), n_folds, dim=dim, seed=seed + 10 * m + 3)
        np.save(tmp / f"{name}_oof_emb.npy", emb_oof)
        test_files = []
        latent = np.random.default_rng(seed + 10 * m + 4).normal(0, 1.0, (len(test_ids), dim))
        latent[:, : len(LABELS)] += 2.0 * (2 * test_truth - 1)
        for k in range(n_folds if per_fold_test else 1):
            path = tmp / f"{name}_test_emb{k}.npy"
            np.save(path, (latent @ rotations[k].T).astype(np.float32))
            test_files.append(path)
        import_predictions(wd, name, oof_path=tmp / f"{name}_oof.parquet", test_path=tmp / f"{name}_test.parquet",
                           oof_embeddings=tmp / f"{name}_oof_emb.npy", test_embeddings=test_files, force=True)
    return wd


__all__ = ["import_models_with_embeddings", "synthetic_embeddings"]
