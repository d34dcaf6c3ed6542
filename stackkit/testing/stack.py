"""A small work directory with data/ and features/ in the contract layout, for stacker tests.

Features are built here by hand, the way `stack features` lays them out (key columns, then
float32 features named ``<model>__<label>__<feature>``; rows sorted by (study_id, slice_index);
a manifest with the folds' hash), from two fake base models whose probabilities are noisy
copies of the labels, plus their neighbor-slice lags and the slice's relative position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir, folds_hash
from stackkit.contract.columns import TEST_KEY_COLUMNS, TRAIN_KEY_COLUMNS
from stackkit.contract.io import write_parquet
from stackkit.contract.records import FeaturesManifest, write_features_manifest

from stackkit.testing.contract import make_contract_frames, noisy_predictions


def build_feature_frames(metadata: pd.DataFrame, labels: pd.DataFrame, folds: pd.DataFrame, *, seed: int = 0):
    """(train, test, feature_columns): informative study-aware features for every image."""
    rng = np.random.default_rng(seed)
    frame = metadata.sort_values(["study_id", "z", "image_id"], kind="stable").reset_index(drop=True)
    frame["slice_index"] = frame.groupby("study_id", sort=False).cumcount().astype(np.int32)
    n_in_study = frame.groupby("study_id", sort=False)["image_id"].transform("size").to_numpy()
    y = labels.set_index("image_id").reindex(frame["image_id"])[list(LABELS)].to_numpy(dtype=float)
    # test images have no labels here; give them a plausible hidden truth so test features look alike
    hidden = rng.random(y.shape) < 0.15
    y = np.where(np.isnan(y), hidden, y)
    same_study_prev = frame["study_id"].eq(frame["study_id"].shift(1)).to_numpy()
    same_study_next = frame["study_id"].eq(frame["study_id"].shift(-1)).to_numpy()
    features: dict[str, np.ndarray] = {}
    for m, (strength, noise) in enumerate([(2.5, 1.2), (1.5, 1.5)]):
        logit = strength * (2 * y - 1) - 1.0 + rng.normal(0, noise, size=y.shape)
        prob = 1.0 / (1.0 + np.exp(-logit))
        for j, label in enumerate(LABELS):
            p = prob[:, j]
            features[f"model{m}__{label}__prob"] = p
            features[f"model{m}__{label}__prev1"] = np.where(same_study_prev, np.roll(p, 1), np.nan)
            features[f"model{m}__{label}__next1"] = np.where(same_study_next, np.roll(p, -1), np.nan)
    features["slice__position"] = np.where(n_in_study > 1, frame["slice_index"] / np.maximum(n_in_study - 1, 1), 0.5)
    feature_frame = pd.DataFrame({k: v.astype(np.float32) for k, v in features.items()})
    feature_columns = list(feature_frame.columns)
    keys = frame[["image_id", "study_id", "slice_index", "split"]]
    full = pd.concat([keys, feature_frame], axis=1)
    train = full[full["split"] == "train"].drop(columns="split")
    train = train.merge(folds, on="image_id", how="left")
    train["fold"] = train["fold"].astype(np.int8)
    train = train[["image_id", "study_id", "fold", "slice_index", *feature_columns]].reset_index(drop=True)
    test = full[full["split"] == "test"].drop(columns="split")[["image_id", "study_id", "slice_index", *feature_columns]]
    return train, test.reset_index(drop=True), feature_columns


def write_stack_workdir(root, *, n_patients: int = 40, n_folds: int = 4, seed: int = 0) -> Workdir:
    """data/metadata, labels, folds and features/train, test, manifest under ``root``."""
    wd = Workdir(Path(root))
    metadata, labels, folds = make_contract_frames(n_patients=n_patients, n_folds=n_folds, seed=seed)
    write_parquet(metadata, wd.metadata)
    write_parquet(labels, wd.labels)
    write_parquet(folds, wd.folds)
    train, test, feature_columns = build_feature_frames(metadata, labels, folds, seed=seed)
    write_parquet(train, wd.features_train)
    write_parquet(test, wd.features_test)
    manifest = FeaturesManifest(
        folds_hash=folds_hash(folds["image_id"].to_numpy(dtype=object), folds["fold"].to_numpy()),
        lags=1, feature_set=None, dicom_meta=None,
        models=["model0", "model1"],
        key_columns={"train": list(TRAIN_KEY_COLUMNS), "test": list(TEST_KEY_COLUMNS)},
        feature_columns=feature_columns,
        columns={c: "synthetic test feature" for c in feature_columns},
        rows=None,
    )
    write_features_manifest(wd.features_dir, manifest, hashes=False)
    return wd


# Small, single-threaded parameters: tests check behaviour, not accuracy, on a busy 2-core CI.
FAST_PARAMS = {
    "lgbm": {"num_threads": 1, "num_boost_round": 150, "early_stopping_rounds": 15},
    "xgb": {"nthread": 1, "num_boost_round": 150, "early_stopping_rounds": 15},
    "mlp": {"num_threads": 1, "max_epochs": 30, "patience": 4},
    "seq": {"num_threads": 1, "max_epochs": 25, "patience": 4},
    "seq_emb": {"num_threads": 1, "max_epochs": 20, "patience": 4, "proj": 16, "lr": 5e-3},
    "transformer": {"num_threads": 1, "max_epochs": 20, "patience": 4, "proj": 16, "lr": 5e-3},
}


def base_model_workdir(root: Path, *, n_patients: int = 24, models=(("m1", 1, 2.0), ("m2", 2, 1.0)), seed: int = 0,
                       per_fold_test=()) -> Workdir:
    """data/ (metadata, labels, folds) + preds/<m>/oof|test.parquet for each (name, seed, strength);
    the models named in ``per_fold_test`` also get test_fold<k>.parquet (v3), test.parquet their mean."""
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
        if name not in per_fold_test:
            write_parquet(noisy_predictions(labels, test_ids, strength=strength, seed=model_seed + 100), wd.test(name))
            continue
        n_folds = int(folds["fold"].max()) + 1
        fold_frames = [noisy_predictions(labels, test_ids, strength=strength, seed=model_seed + 100 + 7 * k) for k in range(n_folds)]
        for k, frame in enumerate(fold_frames):
            write_parquet(frame, wd.test_fold(name, k))
        mean = fold_frames[0].copy()
        mean[list(LABELS)] = np.mean([f[list(LABELS)].to_numpy(dtype=np.float64) for f in fold_frames], axis=0).astype(np.float32)
        write_parquet(mean, wd.test(name))
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
