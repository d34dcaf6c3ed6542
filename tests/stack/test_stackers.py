"""Level-2 stackers: one shared test class over every registered stacker, the fold-leakage
guards of the stacking layer, and its bad-input table."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import FoldModelFiles

from stackkit.contract import LABELS, Workdir
from stackkit.errors import LeakageError, StackkitError
from stackkit.contract.io import read_json, write_json, write_parquet
from stackkit.metric import prior_score, weighted_log_loss
from stackkit.stack.stackers import STACKERS, NeuralStacker, StackData, get_stacker
from stackkit.stack.crossfit import (
    early_stopping_split,
    fit_stacker,
    load_stack_inputs,
    load_stacker_models,
    save_stacker_result,
)
from stackkit.contract.validate import load_core, read_oof, read_test

from stackkit.testing.embeddings import import_models_with_embeddings
from stackkit.testing.stack import FAST_PARAMS, write_stack_workdir

ALL_STACKERS = sorted(STACKERS)


@pytest.fixture(scope="module")
def stack_workdir(tmp_path_factory) -> Workdir:
    """Features of two base models that also exported embeddings (one test file per fold model):
    stackers that use embeddings are tested with them, the others ignore them."""
    root = tmp_path_factory.mktemp("stack")
    wd = write_stack_workdir(root / "work")
    return import_models_with_embeddings(wd, ("model0", "model1"), tmp=root / "exported")


@pytest.fixture(scope="module")
def stack_inputs(stack_workdir):
    return load_stack_inputs(stack_workdir)


@pytest.fixture(scope="module")
def fitted(stack_inputs):
    """One K-fold fit per stacker, shared by the tests of the class (fits are the slow part)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fit_stacker(name, FAST_PARAMS[name], stack_inputs, seed=0, progress=False)
        return cache[name]

    return get


def _single_fold_data(inputs, k=0):
    fit_rows, valid_rows = early_stopping_split(inputs.folds, inputs.groups, k, seed=0)
    return inputs.train.take(fit_rows), inputs.train.take(valid_rows), inputs.train.take(np.flatnonzero(inputs.folds == k))


def test_every_default_stacker_is_registered():
    assert set(ALL_STACKERS) >= {"lgbm", "xgb", "mlp", "seq"}
    assert FAST_PARAMS.keys() >= set(ALL_STACKERS), "give every registered stacker small test parameters"


def test_importing_stackers_does_not_import_torch():
    code = "import sys, stackkit.stack.crossfit, stackkit.stack.stackers; sys.exit(int(any(m in sys.modules for m in ('torch', 'lightgbm', 'xgboost'))))"
    assert subprocess.run([sys.executable, "-c", code], cwd=str(_repo_root())).returncode == 0


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ALL_STACKERS)
class TestStacker:
    def test_beats_prior_and_covers_every_image(self, name, fitted, stack_inputs, stack_workdir):
        result = fitted(name)
        prior = prior_score(stack_inputs.train.Y).overall
        assert result.score.overall < 0.75 * prior, (result.score.overall, prior)
        assert len(result.fold_scores) == stack_inputs.n_folds
        assert result.score.overall == pytest.approx(weighted_log_loss(stack_inputs.train.Y, result.oof[list(LABELS)].to_numpy()).overall)
        # the contract's validating readers accept both frames: every image once, folds equal folds.parquet
        metadata, _labels, folds = load_core(stack_workdir)
        oof = result.oof
        assert oof["image_id"].is_unique and set(oof["image_id"]) == set(folds["image_id"])
        merged = oof.merge(folds, on="image_id", suffixes=("", "_expected"))
        assert (merged["fold"] == merged["fold_expected"]).all()
        assert set(result.test["image_id"]) == set(metadata.loc[metadata["split"] == "test", "image_id"])
        assert result.test["image_id"].is_unique
        for frame in (result.oof, result.test):
            values = frame[list(LABELS)].to_numpy()
            assert values.dtype == np.float32 and np.isfinite(values).all()
            assert ((values > 0) & (values < 1)).all()
        assert len(result.models) == stack_inputs.n_folds
        if STACKERS[name].per_label:
            assert list(result.importance.columns) == ["feature", *LABELS]
            assert list(result.importance["feature"]) == stack_inputs.feature_columns
            # the informative columns (noisy copies of the label) carry the gain of their own label
            top = result.importance.set_index("feature")["any"].idxmax()
            assert "__any__" in top, top
        else:
            assert result.importance is None

    def test_deterministic_for_a_seed(self, name, fitted, stack_inputs):
        again = fit_stacker(name, FAST_PARAMS[name], stack_inputs, seed=0, progress=False)
        first = fitted(name)
        pd.testing.assert_frame_equal(again.oof, first.oof)
        pd.testing.assert_frame_equal(again.test, first.test)

    def test_save_load_gives_identical_predictions(self, name, fitted, stack_inputs, stack_workdir):
        result = fitted(name)
        save_stacker_result(stack_workdir, result)
        directory = stack_workdir.stack_dir(name)
        metadata, _labels, folds = load_core(stack_workdir)
        saved_oof = read_oof(directory / "oof.parquet", folds, stack_workdir)
        saved_test = read_test(directory / "test.parquet", metadata, stack_workdir)
        pd.testing.assert_frame_equal(saved_oof, result.oof)
        pd.testing.assert_frame_equal(saved_test, result.test)
        meta = read_json(directory / "meta.json")
        assert meta["folds_hash"] == stack_inputs.folds_hash and meta["feature_columns"] == stack_inputs.feature_columns
        assert meta["score"]["overall"] == pytest.approx(result.score.overall)
        models = load_stacker_models(stack_workdir, name)
        assert len(models) == len(result.models)
        for loaded, original in zip(models, result.models):
            np.testing.assert_array_equal(loaded.predict(stack_inputs.test), original.predict(stack_inputs.test))
        for k, loaded in enumerate(models):
            held = np.flatnonzero(stack_inputs.folds == k)
            np.testing.assert_array_equal(loaded.predict(stack_inputs.train.take(held)), result.oof[list(LABELS)].to_numpy()[held])
        # nothing but safe formats: no pickle anywhere
        for path in directory.rglob("*"):
            if path.is_file():
                assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"

    @pytest.mark.parametrize(
        "damage, message",
        [
            ("truncate", r"sha256 mismatch"),
            ("flip_byte", r"sha256 mismatch"),
            ("drop_sidecar", r"sha256 sidecar .* missing"),
            # sidecar regenerated for the cut file: the format check still refuses it (LightGBM aborts, XGBoost can segfault)
            ("truncate_and_rehash", r"not a readable|incomplete (LightGBM|XGBoost) model"),
        ],
    )
    def test_damaged_model_file_is_refused_before_loading(self, name, damage, message, fitted, tmp_path):
        model = fitted(name).models[0]
        written = model.save(tmp_path / "fold0")
        model_file = written[0]  # the booster / state_dict file itself
        data = model_file.read_bytes()
        if damage == "truncate":
            model_file.write_bytes(data[: len(data) // 2])
        elif damage == "flip_byte":
            model_file.write_bytes(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])
        elif damage == "drop_sidecar":
            model_file.with_name(model_file.name + ".sha256").unlink()
        else:
            model_file.write_bytes(data[: len(data) // 2])
            model_file.with_name(model_file.name + ".sha256").write_text(hashlib.sha256(data[: len(data) // 2]).hexdigest() + "\n")
        with pytest.raises(StackkitError, match=message) as info:
            STACKERS[name].load(tmp_path / "fold0")
        assert "\n" not in str(info.value) and model_file.name in str(info.value)

    def test_nan_label_is_refused_naming_the_image(self, name, stack_inputs):
        train, valid, _ = _single_fold_data(stack_inputs)
        Y = train.Y.copy()
        Y[7, 2] = np.nan
        bad = StackData(train.X, train.study_codes, train.slice_index, Y, train.image_ids)
        with pytest.raises(StackkitError, match=rf"'{LABELS[2]}' is nan at row 8 \(image_id {train.image_ids[7]}\)"):
            get_stacker(name).fit(bad, valid, FAST_PARAMS[name])

    def test_nan_features_are_handled(self, name, stack_inputs):
        train, valid, held = _single_fold_data(stack_inputs)
        rng = np.random.default_rng(3)
        holes = lambda X: np.where(rng.random(X.shape) < 0.1, np.float32(np.nan), X)  # noqa: E731
        with_nan = [StackData(holes(d.X), d.study_codes, d.slice_index, d.Y, d.image_ids) for d in (train, valid, held)]
        with_nan[0].X[:, 0] = np.nan  # an entirely missing column too
        stacker = get_stacker(name).fit(with_nan[0], with_nan[1], FAST_PARAMS[name])
        probabilities = stacker.predict(with_nan[2])
        assert probabilities.shape == (len(held), len(LABELS)) and np.isfinite(probabilities).all()
        assert weighted_log_loss(held.Y, probabilities).overall < 0.8 * prior_score(held.Y).overall

    def test_infinite_feature_is_refused(self, name, stack_inputs):
        train, valid, _ = _single_fold_data(stack_inputs)
        X = train.X.copy()
        X[4, 3] = np.inf
        bad = StackData(X, train.study_codes, train.slice_index, train.Y, train.image_ids)
        with pytest.raises(StackkitError, match=rf"feature column 3 is inf at row 5 \(image_id {train.image_ids[4]}\)"):
            get_stacker(name).fit(bad, valid, FAST_PARAMS[name])

    def test_suggest_params_are_accepted(self, name):
        optuna = pytest.importorskip("optuna")
        stacker = get_stacker(name)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        params = stacker.suggest_params(study.ask())
        assert stacker.resolve_params(params) == params


# --- device: every torch stacker follows its `device` parameter (stack fit --device) --------------

TORCH_STACKERS = sorted(name for name, cls in STACKERS.items() if issubclass(cls, NeuralStacker))
NO_GPU = r"^stacker '{name}': device 'cuda' but no CUDA GPU is visible \(torch\.cuda\.is_available\(\) is False\); use --device cpu or auto$"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a CUDA GPU, whatever it has."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("stackkit.stack.fit._cuda_visible", lambda: False)


def test_every_torch_stacker_takes_a_device_that_tuning_leaves_alone():
    optuna = pytest.importorskip("optuna")
    from stackkit.stack.fit import device_overrides

    assert TORCH_STACKERS == ["mlp", "seq", "seq_emb", "transformer"]
    for name in TORCH_STACKERS:
        stacker = get_stacker(name)
        assert stacker.default_params()["device"] == "cpu"
        assert device_overrides(name, "cuda") == {"device": "cuda"} and device_overrides(name, "cpu") == {}
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        assert stacker.suggest_params(trial)["device"] == "cpu" and "device" not in trial.params


@pytest.mark.parametrize("name", TORCH_STACKERS)
def test_device_cuda_without_a_gpu_is_refused_before_any_work(name, stack_inputs, no_gpu):
    train, valid, _ = _single_fold_data(stack_inputs)
    unlabeled = StackData(train.X, train.study_codes, train.slice_index)  # refused for its labels, were the device checked later
    with pytest.raises(StackkitError, match=NO_GPU.format(name=name)) as info:
        get_stacker(name).fit(unlabeled, valid, {**FAST_PARAMS[name], "device": "cuda"})
    assert "\n" not in str(info.value)
    with pytest.raises(StackkitError, match=rf"^stacker '{name}': device must be cpu, cuda or cuda:N, got 'tpu'$"):
        get_stacker(name).fit(unlabeled, valid, {**FAST_PARAMS[name], "device": "tpu"})


def test_stack_fit_device_cuda_without_a_gpu_exits_2_with_one_line(stack_workdir, no_gpu):
    from click.testing import CliRunner

    from stackkit.cli import cli
    from stackkit.testing.contract import snapshot

    before = snapshot(stack_workdir.root)
    result = CliRunner().invoke(cli, ["stack", "fit", "--stackers", "seq", "--device", "cuda", "--workdir", str(stack_workdir.root)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == ["Error: --device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu or auto"]
    assert snapshot(stack_workdir.root) == before


@pytest.mark.parametrize("name", TORCH_STACKERS)
def test_a_model_fitted_for_a_gpu_loads_and_predicts_on_a_cpu_only_machine(name, fitted, stack_inputs, tmp_path, no_gpu):
    import copy
    import io

    import torch

    model = fitted(name).models[0]
    expected = model.predict(stack_inputs.test)
    for_gpu = copy.copy(model)
    for_gpu.params = {**model.params, "device": "cuda"}  # what `stack fit --device cuda` saves
    for_gpu.save(tmp_path / "fold0")
    state = torch.load(io.BytesIO((FoldModelFiles(tmp_path / "fold0").torch_model).read_bytes()), weights_only=True)
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    loaded = STACKERS[name].load(tmp_path / "fold0")
    assert loaded.params["device"] == "cuda"
    np.testing.assert_array_equal(loaded.predict(stack_inputs.test), expected)


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", TORCH_STACKERS)
def test_a_fit_on_the_gpu_matches_a_fit_on_the_cpu(name, stack_inputs, tmp_path, monkeypatch):
    import io

    import torch

    train, valid, held = _single_fold_data(stack_inputs)
    params = {**FAST_PARAMS[name], "dropout": 0.0}  # dropout masks come from each device's own RNG
    on_cpu = get_stacker(name).fit(train, valid, params, seed=0).predict(held)
    # cuDNN's TF32 convolutions round to 10 bits: compare float32 with float32
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        gpu = get_stacker(name).fit(train, valid, {**params, "device": "cuda"}, seed=0)
        on_gpu = gpu.predict(held)
    assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape
    assert all(p.device.type == "cpu" for p in gpu.module.parameters())  # kept (and saved) on the CPU
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-2)
    assert np.abs(on_gpu - on_cpu).mean() < 1e-3
    assert weighted_log_loss(held.Y, on_gpu).overall == pytest.approx(weighted_log_loss(held.Y, on_cpu).overall, rel=0.02)
    gpu.save(tmp_path / "fold0")
    state = torch.load(io.BytesIO((FoldModelFiles(tmp_path / "fold0").torch_model).read_bytes()), weights_only=True)
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # loaded on a machine without a GPU
    np.testing.assert_allclose(STACKERS[name].load(tmp_path / "fold0").predict(held), on_gpu, atol=1e-5)


# --- leakage: the early-stopping split never sees the held-out fold -----------------------------


def test_early_stopping_split_is_grouped_and_excludes_the_held_out_fold(stack_inputs):
    folds, groups = stack_inputs.folds, stack_inputs.groups
    for k in range(stack_inputs.n_folds):
        fit_rows, valid_rows = early_stopping_split(folds, groups, k, seed=0)
        assert not np.isin(fit_rows, np.flatnonzero(folds == k)).any()
        assert not np.isin(valid_rows, np.flatnonzero(folds == k)).any()
        np.testing.assert_array_equal(np.sort(np.concatenate([fit_rows, valid_rows])), np.flatnonzero(folds != k))
        assert not set(groups[fit_rows]) & set(groups[valid_rows]), "a patient on both sides of the early-stopping split"
        assert 0.05 < len(valid_rows) / (len(fit_rows) + len(valid_rows)) < 0.35
        again = early_stopping_split(folds, groups, k, seed=0)
        np.testing.assert_array_equal(again[1], valid_rows)


def test_fit_stacker_never_trains_or_stops_on_the_held_out_fold(stack_inputs, monkeypatch):
    seen = []
    cls = STACKERS["lgbm"]
    original_fit = cls.fit

    def recording_fit(self, train, valid, params=None, seed=0, **kwargs):
        seen.append((set(train.image_ids), set(valid.image_ids)))
        return original_fit(self, train, valid, params, seed, **kwargs)

    monkeypatch.setattr(cls, "fit", recording_fit)
    fit_stacker("lgbm", FAST_PARAMS["lgbm"], stack_inputs, progress=False)
    assert len(seen) == stack_inputs.n_folds
    ids = stack_inputs.train_keys["image_id"].to_numpy()
    patient = dict(zip(ids, stack_inputs.groups))
    for k, (train_ids, valid_ids) in enumerate(seen):
        held = set(ids[stack_inputs.folds == k])
        assert not held & train_ids and not held & valid_ids
        assert train_ids | valid_ids == set(ids) - held
        assert not {patient[i] for i in train_ids} & {patient[i] for i in valid_ids}


# --- bad inputs: one table ----------------------------------------------------------------------


def _other_folds_hash(wd):
    manifest = read_json(wd.features_manifest)
    manifest["folds_hash"] = "0" * 64
    write_json(manifest, wd.features_manifest)


def _swap_fold_in_features(wd):
    train = pd.read_parquet(wd.features_train)
    train.loc[3, "fold"] = (int(train.loc[3, "fold"]) + 1) % (int(train["fold"].max()) + 1)
    write_parquet(train, wd.features_train)


def _refold_data(wd):
    # folds.parquet rewritten after the features were built: the manifest's hash is now stale
    folds = pd.read_parquet(wd.folds)
    metadata = pd.read_parquet(wd.metadata).set_index("image_id")
    patients = metadata.loc[folds["image_id"], "patient_id"].to_numpy()
    first = patients[0]
    folds.loc[patients == first, "fold"] = (folds.loc[patients == first, "fold"] + 1) % (folds["fold"].max() + 1)
    write_parquet(folds, wd.folds)


def _drop_features(wd):
    wd.features_train.unlink()


def _drop_feature_column(wd):
    train = pd.read_parquet(wd.features_train)
    write_parquet(train.drop(columns=[read_json(wd.features_manifest)["feature_columns"][2]]), wd.features_train)


def _drop_test_image(wd):
    test = pd.read_parquet(wd.features_test)
    write_parquet(test.iloc[1:], wd.features_test)


def _text_feature(wd):
    train = pd.read_parquet(wd.features_train)
    column = read_json(wd.features_manifest)["feature_columns"][0]
    train[column] = train[column].astype(str)
    write_parquet(train, wd.features_train)


LOAD_ERRORS = [
    ("manifest folds_hash differs", _other_folds_hash, LeakageError, r"different folds file: rerun .*stack features"),
    ("folds.parquet changed after features", _refold_data, LeakageError, r"folds_hash .* differs from data/folds.parquet"),
    ("fold column disagrees", _swap_fold_in_features, LeakageError, r"features/train.parquet: fold \d at row 4 \(image_id ID_\w+\) disagrees .*different folds file"),
    ("features missing", _drop_features, StackkitError, r"features/train.parquet: not found; run `stack features`"),
    ("feature column missing", _drop_feature_column, StackkitError, r"missing column\(s\) model0__epidural__next1"),
    ("test image missing", _drop_test_image, StackkitError, r"features/test.parquet: 1 test image\(s\) missing"),
    ("text feature", _text_feature, StackkitError, r"feature column 'model0__epidural__prob' has dtype"),
]


@pytest.mark.parametrize("case, damage, error, message", LOAD_ERRORS, ids=[c[0] for c in LOAD_ERRORS])
def test_load_stack_inputs_refuses(case, damage, error, message, stack_workdir, tmp_path):
    wd = Workdir(tmp_path / "work")
    shutil.copytree(stack_workdir.root, wd.root, ignore=shutil.ignore_patterns("stack"))
    damage(wd)
    with pytest.raises(error, match=message) as info:
        load_stack_inputs(wd)
    assert "\n" not in str(info.value)


CALL_ERRORS = [
    ("unknown stacker", lambda inputs: fit_stacker("catboost", None, inputs, progress=False), r"unknown stacker 'catboost'; valid stackers: lgbm, xgb, mlp, seq, seq_emb, transformer"),
    ("unknown parameter", lambda inputs: fit_stacker("lgbm", {"num_leaf": 3}, inputs, progress=False), r"unknown parameter\(s\) num_leaf; valid: .*num_leaves"),
    ("wrong feature count", lambda inputs: fitted_one(inputs).predict(StackData(inputs.test.X[:, :5], inputs.test.study_codes, inputs.test.slice_index)), r"have 5 columns but the model was fitted on \d+"),
    ("unfitted predict", lambda inputs: get_stacker("mlp").predict(inputs.test), r"stacker 'mlp' is not fitted"),
]


def fitted_one(inputs):
    train, valid, _ = _single_fold_data(inputs)
    return get_stacker("lgbm").fit(train, valid, FAST_PARAMS["lgbm"])


@pytest.mark.parametrize("case, call, message", CALL_ERRORS, ids=[c[0] for c in CALL_ERRORS])
def test_stacker_calls_refuse(case, call, message, stack_inputs):
    with pytest.raises(StackkitError, match=message) as info:
        call(stack_inputs)
    assert "\n" not in str(info.value)


def test_load_stacker_models_without_a_fit(stack_workdir):
    with pytest.raises(StackkitError, match=r"meta.json: not found; run `stack fit --stackers xgb`"):
        load_stacker_models(Workdir(stack_workdir.root / "empty"), "xgb")


@pytest.mark.parametrize("rows_per_block", [1, 7, 8192])
def test_the_neural_feature_scaler_standardizes_block_by_block_as_over_the_whole_array(rows_per_block):
    from stackkit.stack.stackers.neural import FeatureScaler

    rng = np.random.default_rng(3)
    X = rng.normal(2.0, 3.0, size=(50, 6)).astype(np.float32)
    X[rng.random(X.shape) < 0.1] = np.nan
    X[:, 4] = np.nan  # all missing in training: mean 0, scale 1, an indicator column
    X[:, 5] = 1.5  # constant: scale 1
    scaler = FeatureScaler.fit(X[:40])
    rows = X[10:]
    whole = (rows - scaler.mean) / scaler.scale
    whole[np.isnan(rows)] = 0.0
    expected = np.concatenate([whole, np.isnan(rows)[:, scaler.indicator_columns]], axis=1).astype(np.float32)
    out = scaler.transform(rows, pad_rows=2, rows_per_block=rows_per_block)
    assert out.dtype == np.float32 and out.shape == (len(rows) + 2, 6 + len(scaler.indicator_columns))
    np.testing.assert_array_equal(out[:-2], expected)
    np.testing.assert_array_equal(out[-2:], 0.0)
    flipped = scaler.transform(rows, block_map=lambda block: block[:, ::-1].copy(), rows_per_block=rows_per_block)
    np.testing.assert_array_equal(flipped, scaler.transform(rows[:, ::-1].copy()))
