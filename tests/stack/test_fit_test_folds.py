"""Contract v3: per-fold test predictions through `stack features`, `stack fit` and `submit`.

A train row's features come from the one base fold model that held its study out; with
preds/<m>/test_fold<k>.parquet the test features are built once per base fold model, so that
every test row is built exactly as an OOF row would be, stackers predict each set and average,
and the blend meets each set in turn.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.api import run_stack_features
from features.build import build_features, build_test_features
from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import read_json
from stackkit.errors import ContractError
from stackkit.stack.blend import BlendParams
from stackkit.stack.fit import run_stack_fit
from stackkit.submit import blended_test_predictions, load_blend
from stackkit.testing.contract import copy_workdir, make_contract_frames, noisy_predictions
from stackkit.testing.stack import base_model_workdir

FAST = "mlp"


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), fold=st.integers(0, 3), lags=st.integers(0, 3))
def test_per_fold_test_features_equal_the_features_an_oof_row_gets_from_that_fold_model(seed, fold, lags):
    """Copy fold k's train studies into the test split, give each model's fold-k test file the copied
    rows' OOF predictions (made by fold model k): their test features equal the originals' train features."""
    metadata, labels, folds = make_contract_frames(n_patients=16, n_folds=4, seed=seed)
    models = ("m1", "m2")
    oof = {}
    for m, model in enumerate(models):
        frame = noisy_predictions(labels, folds["image_id"], strength=1.5 + m, seed=seed + m)
        frame.insert(1, "fold", folds["fold"].to_numpy())
        oof[model] = frame
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    test = {model: noisy_predictions(labels, test_ids, seed=seed + 50 + m) for m, model in enumerate(models)}
    train_features, _, definitions = build_features(metadata, oof, test, folds, lags=lags, progress=False)

    in_fold = folds.loc[folds["fold"] == fold, "image_id"]
    originals = metadata[metadata["image_id"].isin(in_fold)]
    copies = originals.assign(image_id="T" + originals["image_id"], study_id="T" + originals["study_id"],
                              patient_id="T" + originals["patient_id"], split="test")
    copy_meta = pd.concat([metadata[metadata["split"] == "train"], copies], ignore_index=True)
    fold_k_test = {model: frame[frame["image_id"].isin(in_fold)].drop(columns="fold").assign(image_id=lambda f: "T" + f["image_id"])
                   for model, frame in oof.items()}
    copied_features = build_test_features(copy_meta, fold_k_test, lags=lags)

    expected = train_features.set_index("image_id").loc[in_fold, list(definitions)]
    got = copied_features.set_index("image_id").loc["T" + in_fold, list(definitions)]
    np.testing.assert_array_equal(got.to_numpy(), expected.to_numpy())


def test_build_test_features_is_the_test_frame_of_build_features():
    metadata, labels, folds = make_contract_frames(n_patients=16, seed=3)
    oof = {"m1": noisy_predictions(labels, folds["image_id"], seed=1)}
    test = {"m1": noisy_predictions(labels, metadata.loc[metadata["split"] == "test", "image_id"], seed=2)}
    _, full_test, _ = build_features(metadata, oof, test, folds, lags=2, progress=False)
    pd.testing.assert_frame_equal(build_test_features(metadata, test, lags=2), full_test)


@pytest.fixture(scope="module")
def fitted_template(tmp_path_factory):
    """m1 with per-fold test files, m2 with only an averaged test.parquet; features and a fitted FAST stacker."""
    wd = base_model_workdir(tmp_path_factory.mktemp("v3") / "work", n_patients=20, per_fold_test=("m1",))
    run_stack_features(wd, lags=1, progress=False)
    run_stack_fit(wd, stackers=[FAST], progress=False, blend_base_models=True)
    return wd


@pytest.fixture
def wd(fitted_template, tmp_path) -> Workdir:
    return copy_workdir(fitted_template, tmp_path / "work")


def test_stack_features_writes_one_test_set_per_base_fold_model(wd):
    manifest = read_json(wd.features_manifest)
    n_folds = int(pd.read_parquet(wd.folds)["fold"].max()) + 1
    assert manifest["test_folds"] == n_folds
    assert manifest["models_without_test_folds"] == ["m2"]
    averaged = pd.read_parquet(wd.features_test)
    for k in range(n_folds):
        fold_k = pd.read_parquet(wd.features_test_fold(k))
        assert list(fold_k.columns) == list(averaged.columns)
        assert fold_k["image_id"].tolist() == averaged["image_id"].tolist()
        # m1's columns come from fold model k; m2 (no per-fold files) enters every set with its average
        m1_k = pd.read_parquet(wd.test_fold("m1", k)).set_index("image_id").reindex(fold_k["image_id"])
        np.testing.assert_array_equal(fold_k["m1__any__pred"].to_numpy(), m1_k["any"].to_numpy())
        np.testing.assert_array_equal(fold_k["m2__any__pred"].to_numpy(), averaged["m2__any__pred"].to_numpy())
    assert not np.array_equal(pd.read_parquet(wd.features_test_fold(0))["m1__any__lag1"].to_numpy(),
                              pd.read_parquet(wd.features_test_fold(1))["m1__any__lag1"].to_numpy(), equal_nan=True)


def test_stacker_test_predictions_are_the_mean_over_the_test_sets(wd):
    meta = read_json(wd.stack_dir(FAST) / "meta.json")
    sets = [pd.read_parquet(wd.stack_dir(FAST) / name) for name in meta["test_folds"]]
    assert len(sets) == read_json(wd.features_manifest)["test_folds"]
    mean = np.mean([s[list(LABELS)].to_numpy(dtype=np.float64) for s in sets], axis=0)
    test = pd.read_parquet(wd.stack_dir(FAST) / "test.parquet")
    np.testing.assert_allclose(test[list(LABELS)].to_numpy(), mean, rtol=1e-6, atol=1e-7)
    assert not np.allclose(sets[0][list(LABELS)].to_numpy(), sets[1][list(LABELS)].to_numpy())


def test_blend_record_names_models_without_per_fold_files_and_submit_blends_each_set(wd):
    record = read_json(wd.blend)
    assert record["test_sets"] > 1 and record["models_without_test_folds"] == ["m2"]
    by_name = {s["name"]: s for s in record["sources"]}
    assert by_name["preds/m2"]["test_folds"] == [] and len(by_name["preds/m1"]["test_folds"]) == record["test_sets"]

    # force a real blend of all three sources, then check submit against the rule computed here
    _, sources, _ = load_blend(wd)
    names = [s["name"] for s in sources]
    params = BlendParams.equal(len(names))
    record.update(params.to_json(names))
    from stackkit.contract.io import write_json

    write_json(record, wd.blend)
    blended, _ = blended_test_predictions(wd)
    ids = blended["image_id"].to_numpy()

    def load(path):
        return pd.read_parquet(wd.root / path).set_index("image_id").reindex(ids)[list(LABELS)].to_numpy(dtype=np.float64)

    per_set = []
    for k in range(record["test_sets"]):
        stacked = np.stack([load(s["test_folds"][k]["path"]) if s["test_folds"] else load(s["test"]) for s in sources])
        per_set.append(params.apply(stacked))
    np.testing.assert_allclose(blended[list(LABELS)].to_numpy(), np.mean(per_set, axis=0), rtol=1e-12)
    averaged = params.apply(np.stack([load(s["test"]) for s in sources]))
    assert not np.allclose(blended[list(LABELS)].to_numpy(), averaged)  # not the blend of the averages


def test_a_partial_set_of_per_fold_test_files_is_one_line(wd):
    wd.test_fold("m1", 2).unlink()
    with pytest.raises(ContractError, match=r"model 'm1' has per-fold test files test_fold0.parquet, test_fold1.parquet, "
                                            r"test_fold3.parquet; expected exactly test_fold0..test_fold3.parquet"):
        run_stack_features(wd, lags=1, progress=False)


def test_a_per_fold_features_file_changed_after_stack_features_is_refused(wd):
    path = wd.features_test_fold(1)
    frame = pd.read_parquet(path)
    frame["m1__any__pred"] = np.float32(0.5)
    frame.to_parquet(path, index=False)
    with pytest.raises(ContractError, match=r"test_fold1.parquet: sha256 .* differs"):
        run_stack_fit(wd, stackers=[FAST], progress=False)


def test_a_stacker_edited_per_fold_test_file_is_refused_by_submit(wd):
    path = wd.stack_dir(FAST) / "test_fold0.parquet"
    frame = pd.read_parquet(path)
    frame["any"] = np.float32(0.25)
    frame.to_parquet(path, index=False)
    from stackkit.errors import StackkitError

    with pytest.raises(StackkitError, match=r"test_fold0.parquet: changed since stack/blend.json was fitted"):
        blended_test_predictions(wd)
