"""Stacking predictions made elsewhere (`base import`, no CNN) on unusual but legal data.

One-slice study, duplicate z, head-to-foot series, a patient with several studies, a test file
in another order: all must succeed with correct results, and the stack must beat its inputs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import read_json, write_parquet
from stackkit.contract.validate import load_core

from stackkit.testing.contract import make_contract_frames, with_folds


def study_correlated_predictions(metadata, labels, ids, *, strength, seed):
    """A model that sees each slice with independent noise: neighbors carry information."""
    rng = np.random.default_rng(seed)
    y = labels.set_index("image_id").reindex(pd.Index(ids))[list(LABELS)].to_numpy(dtype=float)
    y = np.nan_to_num(y, nan=0.0)
    logit = strength * (2 * y - 1) - 1.5 + rng.normal(0, 2.0, size=y.shape)
    frame = pd.DataFrame(1 / (1 + np.exp(-logit)), columns=list(LABELS)).astype(np.float32)
    frame.insert(0, "image_id", np.asarray(ids))
    return frame


@pytest.fixture
def unusual_workdir(tmp_path):
    metadata, labels, folds = make_contract_frames(n_patients=40, n_folds=4, seed=5)
    # an explicit one-slice study of a new train patient, in fold 0
    one = pd.DataFrame([("ID_onesliceimg", "ID_onepatient", "ID_onestudy", "train", 12.5)], columns=metadata.columns)
    metadata = pd.concat([metadata, one], ignore_index=True)
    labels = pd.concat([labels, pd.DataFrame([["ID_onesliceimg", 0, 0, 0, 0, 1, 1]], columns=labels.columns).astype(labels.dtypes.to_dict())], ignore_index=True)
    folds = pd.concat([folds, pd.DataFrame({"image_id": ["ID_onesliceimg"], "fold": np.int8(0)})], ignore_index=True)
    folds["fold"] = folds["fold"].astype(np.int8)
    wd = Workdir(tmp_path / "work")
    write_parquet(metadata, wd.metadata)
    write_parquet(labels, wd.labels)
    write_parquet(folds, wd.folds)
    return wd


def test_stacking_imported_predictions_on_unusual_studies(unusual_workdir, tmp_path):
    from features.api import run_stack_features
    from stackkit.stack.fit import run_stack_fit
    from base_models.importer import import_predictions
    from stackkit.submit import validate_submission, write_submission

    wd = unusual_workdir
    metadata, labels, folds = load_core(wd)
    per_study = metadata.groupby("study_id").agg(n=("z", "size"), unique_z=("z", "nunique"), patient=("patient_id", "first"),
                                                 descending=("z", lambda z: False))
    assert (per_study["n"] == 1).any()
    assert (per_study["unique_z"] < per_study["n"]).any()  # duplicate z positions
    assert metadata.groupby("patient_id")["study_id"].nunique().max() > 1
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    for name, strength, seed in (("cnn_a", 2.0, 1), ("cnn_b", 1.5, 2)):
        oof = study_correlated_predictions(metadata, labels, folds["image_id"], strength=strength, seed=seed)
        test = study_correlated_predictions(metadata, labels, test_ids, strength=strength, seed=seed + 10)
        write_parquet(with_folds(oof, folds), tmp_path / f"{name}_oof.parquet")
        write_parquet(test.iloc[::-1], tmp_path / f"{name}_test.parquet")  # another order
        import_predictions(wd, name, oof_path=tmp_path / f"{name}_oof.parquet", test_path=tmp_path / f"{name}_test.parquet")

    run_stack_features(wd, lags=2, progress=False)
    train = pd.read_parquet(wd.features_train)
    one = train.loc[train["image_id"] == "ID_onesliceimg"].iloc[0]
    assert np.isnan(one["cnn_a__any__lag1"]) and np.isnan(one["cnn_a__any__lead2"])
    assert one["cnn_a__any__study_max"] == pytest.approx(one["cnn_a__any__pred"])

    summary = run_stack_fit(wd, stackers=["lgbm"], progress=False)
    blend = read_json(wd.blend)
    base_scores = [score["overall"] for score in blend["base_oof_scores"].values()]
    assert sorted(blend["base_oof_scores"]) == ["cnn_a", "cnn_b"]
    assert summary.cv.overall < min(base_scores)
    stack_oof = pd.read_parquet(wd.stack_dir("lgbm") / "oof.parquet")
    assert sorted(stack_oof["image_id"]) == sorted(folds["image_id"])

    out = write_submission(wd, str(tmp_path / "sub.csv.gz"))
    validate_submission(tmp_path / "sub.csv.gz", test_ids)
