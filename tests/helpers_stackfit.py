"""Work directories for the stack fit / blend / submit tests, written as other tools would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir
from stackkit.io import write_parquet

from conftest import make_contract_frames, noisy_predictions


def base_model_workdir(root: Path, *, n_patients: int = 24, models=(("m1", 1, 2.0), ("m2", 2, 1.0)), seed: int = 0) -> Workdir:
    """data/ (metadata, labels, folds) + preds/<m>/oof|test.parquet for each (name, seed, strength)."""
    wd = Workdir(Path(root))
    metadata, labels, folds = make_contract_frames(n_patients=n_patients, seed=seed)
    write_parquet(metadata, wd.metadata)
    write_parquet(labels, wd.labels)
    write_parquet(folds, wd.folds)
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    for name, model_seed, strength in models:
        oof = noisy_predictions(labels, folds["image_id"], strength=strength, seed=model_seed)
        oof.insert(1, "fold", folds["fold"].to_numpy())
        write_parquet(oof, wd.oof(name))
        write_parquet(noisy_predictions(labels, test_ids, strength=strength, seed=model_seed + 100), wd.test(name))
    return wd


def synthetic_sources(n: int, strengths, *, seed: int = 0, n_folds: int = 4):
    """(preds (S, n, 6), y (n, 6), folds (n,)): one source per strength (0 = pure noise), any = max(subtypes)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.25).astype(np.float64)
    y[:, -1] = y[:, :-1].max(axis=1)
    preds = np.stack([1 / (1 + np.exp(-(s * (2 * y - 1) - 1.0 + rng.normal(0, 1.5, y.shape)))) for s in strengths])
    folds = rng.permutation(np.arange(n) % n_folds)
    return preds, y, folds


def read_submission(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"ID": str})
