"""stackkit.testing.exported: a contract work directory, exports outside it, held-out test labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS
from stackkit.contract.validate import load_core
from stackkit.testing.exported import SCENARIOS, hex_ids, write_exported_benchmark


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_exported_benchmark(tmp_path_factory.mktemp("exported"), n_patients=40, n_models=2, seed=3, embedding_dim=24)


def test_writes_a_valid_contract_workdir_and_holds_out_the_test_labels(small):
    metadata, labels, folds = load_core(small.workdir)  # the project's own validators
    test_ids = set(metadata.loc[metadata["split"] == "test", "image_id"])
    heldout = pd.read_parquet(small.heldout_test_labels)
    assert set(heldout["image_id"]) == test_ids and len(heldout) == small.n_test
    assert not test_ids & set(labels["image_id"])
    assert not small.heldout_test_labels.is_relative_to(small.workdir.root)
    assert sorted(p.name for p in small.workdir.data_dir.iterdir()) == ["folds.parquet", "labels.parquet", "metadata.parquet"]
    assert metadata.groupby("patient_id")["split"].nunique().max() == 1
    assert folds["fold"].nunique() == small.n_folds == 5
    every = pd.concat([labels, heldout])
    assert (every["any"] == every[list(LABELS[:-1])].max(axis=1)).all()
    # each subtype is one contiguous run along z per study: at most one 0 -> 1 step in slice order
    # (`any`, their union, may have several; a duplicated z may swap two slices at a run's end)
    ordered = metadata.merge(every, on="image_id").sort_values(["study_id", "z", "image_id"])
    ordered = ordered[~ordered.duplicated(["study_id", "z"], keep=False).groupby(ordered["study_id"]).transform("any")]
    subtypes = list(LABELS[:-1])
    starts = ordered.groupby("study_id")[subtypes].transform(lambda v: (v.diff().fillna(v) == 1).sum())
    assert starts.to_numpy().max() == 1
    sizes = metadata.groupby("study_id").size()
    assert 25 <= sizes.min() and sizes.max() <= 60


def test_exports_are_accepted_by_base_import(small):
    from base_models.importer import import_predictions

    for model in small.models:
        assert not small.oof_files[model].is_relative_to(small.workdir.root)
        summary = import_predictions(small.workdir, model, oof_path=small.oof_files[model], test_path=small.test_files[model])
        assert 0 < summary.oof_logloss < 0.3
    assert small.workdir.model_names() == sorted(small.models)


def test_embeddings_have_the_contract_shapes(small):
    for model in small.models:
        oof = np.load(small.oof_embedding_files[model], allow_pickle=False)
        assert oof.dtype == np.float16 and oof.shape == (small.n_train, 24) and np.isfinite(oof).all()
        test = [np.load(p, allow_pickle=False) for p in small.test_embedding_files[model]]
        assert len(test) == small.n_folds
        assert all(t.dtype == np.float16 and t.shape == (small.n_test, 24) for t in test)
        assert not np.array_equal(test[0], test[1])  # a space per fold model


def test_embeddings_hold_more_than_the_probabilities(tmp_path):
    """A logistic regression on a model's logits gains from its embedding (the head wastes information)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    bench = write_exported_benchmark(tmp_path, n_patients=150, n_models=1, seed=0, embedding_dim=32)
    oof = pd.read_parquet(bench.oof_files["effnet_b3"])
    embedding = np.load(bench.oof_embedding_files["effnet_b3"]).astype(np.float64)
    y = pd.read_parquet(bench.workdir.labels).set_index("image_id").loc[oof["image_id"], "any"].to_numpy()
    p = np.clip(oof[list(LABELS)].to_numpy(np.float64), 1e-6, 1 - 1e-6)
    logits, fold = np.log(p / (1 - p)), oof["fold"].to_numpy()

    def cross_validated_loss(X):
        q = np.empty(len(y))
        for k in range(bench.n_folds):
            q[fold == k] = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1)).fit(X[fold != k], y[fold != k]).predict_proba(X[fold == k])[:, 1]
        return log_loss(y, q)

    # (measured: 3 % lower on this seed; the fold models' spaces differ, as the contract says they do)
    assert cross_validated_loss(np.hstack([logits, embedding])) < 0.99 * cross_validated_loss(logits)


def test_is_deterministic_for_a_seed(tmp_path):
    first = write_exported_benchmark(tmp_path / "a", n_patients=12, n_models=1, seed=5)
    again = write_exported_benchmark(tmp_path / "b", n_patients=12, n_models=1, seed=5)
    other = write_exported_benchmark(tmp_path / "c", n_patients=12, n_models=1, seed=6)
    for a, b, c in [(first.workdir.metadata, again.workdir.metadata, other.workdir.metadata),
                    (first.workdir.folds, again.workdir.folds, other.workdir.folds),
                    (first.oof_files["effnet_b3"], again.oof_files["effnet_b3"], other.oof_files["effnet_b3"])]:
        pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
        assert not pd.read_parquet(a).equals(pd.read_parquet(c))
    assert not first.oof_embedding_files and not first.test_embedding_files


def test_hex_ids_and_small_embeddings_refused(tmp_path):
    assert list(hex_ids(np.array([0, 255, 16**9 - 1]))) == ["ID_000000000", "ID_0000000ff", "ID_fffffffff"]
    with pytest.raises(ValueError, match="embedding_dim"):
        write_exported_benchmark(tmp_path, n_patients=6, n_models=1, embedding_dim=8)


@pytest.fixture(scope="module")
def persistent(tmp_path_factory):
    return write_exported_benchmark(tmp_path_factory.mktemp("persistent"), n_patients=30, n_models=2, seed=4, scenario="persistent")


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    return write_exported_benchmark(tmp_path_factory.mktemp("realistic"), n_patients=30, n_models=2, seed=4, scenario="realistic")


def _probabilities(path, ids) -> np.ndarray:
    return pd.read_parquet(path).set_index("image_id").loc[ids, list(LABELS)].to_numpy(np.float64)


@pytest.mark.parametrize("which", ["small", "persistent", "realistic"])
def test_test_file_is_the_mean_of_the_per_fold_model_files(which, request):
    bench = request.getfixturevalue(which)
    for model in bench.models:
        ids = pd.read_parquet(bench.test_files[model])["image_id"]
        folds = bench.test_fold_files[model]
        assert [p.name for p in folds] == [f"{model}_test_fold{k}.parquet" for k in range(bench.n_folds)]
        assert all(p.is_file() and not p.is_relative_to(bench.workdir.root) for p in folds)
        per_fold = np.stack([_probabilities(p, ids) for p in folds])
        assert per_fold.shape == (bench.n_folds, bench.n_test, len(LABELS)) and ((per_fold > 0) & (per_fold < 1)).all()
        np.testing.assert_allclose(per_fold.mean(axis=0), _probabilities(bench.test_files[model], ids), rtol=1e-6, atol=1e-7)


def test_persistent_fold_models_have_their_own_errors(persistent):
    """Fold models disagree on test images (their own errors), and their mean is smoother than any one."""
    for model in persistent.models:
        ids = pd.read_parquet(persistent.test_files[model])["image_id"]
        logits = np.stack([np.log(p / (1 - p)) for p in (_probabilities(f, ids) for f in persistent.test_fold_files[model])])
        spread = logits.std(axis=0)
        assert np.median(spread) > 0.1  # logit units: a real disagreement, not float noise
        assert not np.allclose(logits[0], logits[1])


def test_latent_evidence_covers_every_image_outside_the_work_directory(persistent):
    evidence = pd.read_parquet(persistent.latent_evidence)
    metadata = pd.read_parquet(persistent.workdir.metadata)
    assert not persistent.latent_evidence.is_relative_to(persistent.workdir.root)
    assert list(evidence.columns) == ["image_id", *LABELS] and len(evidence) == persistent.n_images
    assert set(evidence["image_id"]) == set(metadata["image_id"])
    values = evidence[list(LABELS)].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all()
    # `any` sees the strongest subtype; the evidence is higher on positive slices than on negative ones
    np.testing.assert_allclose(values[:, -1], values[:, :-1].max(axis=1))
    labels = pd.concat([pd.read_parquet(persistent.workdir.labels), pd.read_parquet(persistent.heldout_test_labels)])
    any_label = labels.set_index("image_id").loc[evidence["image_id"], "any"].to_numpy()
    assert values[any_label == 1, -1].mean() > 5 * values[any_label == 0, -1].mean()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_scenario_is_deterministic_for_a_seed(scenario, tmp_path):
    first = write_exported_benchmark(tmp_path / "a", n_patients=10, n_models=2, seed=7, scenario=scenario)
    again = write_exported_benchmark(tmp_path / "b", n_patients=10, n_models=2, seed=7, scenario=scenario)
    assert first.scenario == scenario and first.models == again.models
    files = [(first.latent_evidence, again.latent_evidence)]
    for model in first.models:
        files += [(first.oof_files[model], again.oof_files[model]), (first.test_files[model], again.test_files[model])]
        files += list(zip(first.test_fold_files[model], again.test_fold_files[model]))
    for a, b in files:
        assert a.read_bytes() == b.read_bytes(), a.name


def test_scenarios_differ_and_unknown_ones_are_refused(tmp_path):
    independent = write_exported_benchmark(tmp_path / "i", n_patients=10, n_models=1, seed=2)
    persistent = write_exported_benchmark(tmp_path / "p", n_patients=10, n_models=1, seed=2, scenario="persistent")
    # same studies and labels (the scenario changes the models' errors, not the data)
    pd.testing.assert_frame_equal(pd.read_parquet(independent.workdir.labels), pd.read_parquet(persistent.workdir.labels))
    assert independent.oof_files["effnet_b3"].read_bytes() != persistent.oof_files["effnet_b3"].read_bytes()
    assert write_exported_benchmark(tmp_path / "d", n_patients=6, scenario="persistent").models.__len__() == SCENARIOS["persistent"].n_models
    with pytest.raises(ValueError, match="unknown scenario"):
        write_exported_benchmark(tmp_path / "x", n_patients=6, scenario="nope")


def test_persistent_errors_persist_along_z(persistent):
    """A model's error (logit minus the ideal) on one slice predicts its neighbor's: correlation > 0.5."""
    meta = pd.read_parquet(persistent.workdir.metadata).sort_values(["study_id", "z", "image_id"])
    oof = pd.read_parquet(persistent.oof_files["effnet_b3"]).set_index("image_id").reindex(meta["image_id"])
    labels = pd.read_parquet(persistent.workdir.labels).set_index("image_id").reindex(meta["image_id"])
    keep = oof["any"].notna().to_numpy() & (labels["any"] == 0).to_numpy()  # negative slices: the error alone
    p = np.clip(oof["any"].to_numpy(np.float64), 1e-6, 1 - 1e-6)
    logit = np.log(p / (1 - p))
    same_study = meta["study_id"].to_numpy()[1:] == meta["study_id"].to_numpy()[:-1]
    pair = same_study & keep[1:] & keep[:-1]
    assert np.corrcoef(logit[1:][pair], logit[:-1][pair])[0, 1] > 0.5
