"""Tuning a stacker (stackkit.stack.tune): an outer fold the study never sees, one refitted recipe, pruning, the budget, dataset reuse."""

from __future__ import annotations

import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from stackkit.contract import LABEL_WEIGHTS, LABELS
from stackkit.errors import StackkitError
from stackkit.metric import weighted_log_loss
from stackkit.stack.crossfit import StackInputs, early_stopping_split, fit_stacker, load_stack_inputs
from stackkit.stack.stackers import STACKERS, Stacker
from stackkit.stack.storage import make_storage
from stackkit.stack.tune import MIN_TUNED_GAIN, outer_fold_of, select_trial, tune_stacker
from stackkit.testing.stack import FAST_PARAMS, write_stack_workdir

LGBM_FAST = {k: v for k, v in FAST_PARAMS["lgbm"].items() if k != "num_boost_round"} | {"num_boost_round": 60}


@pytest.fixture(scope="module")
def tune_workdir(tmp_path_factory):
    return write_stack_workdir(tmp_path_factory.mktemp("tune") / "work", n_patients=30)


@pytest.fixture(scope="module")
def inputs(tune_workdir):
    return load_stack_inputs(tune_workdir)


def _tune(inputs, tmp_path, name="lgbm", **kwargs):
    storage = make_storage(str(tmp_path / "journal.log"), None)
    args = dict(storage=storage, study_name="t", trials=6, timeout=None, seed=0, inputs_key="k",
                overrides=LGBM_FAST if name == "lgbm" else {}, progress=False)
    return tune_stacker(name, inputs, **{**args, **kwargs}), storage


def _trials(storage, name="t"):
    return optuna.load_study(study_name=name, storage=storage).get_trials()


# --- a case whose selection bias is known -----------------------------------------------------------


def _row_noise(noise_seed: int, image_ids) -> np.ndarray:
    """(n, 6) standard normal values, a fixed function of (noise_seed, image id, label): splitmix64 + the normal quantile."""
    from scipy.special import ndtri

    ids = np.array([zlib.crc32(str(i).encode()) for i in image_ids], dtype=np.uint64)
    x = (ids[:, None] * np.uint64(8) + np.arange(len(LABELS), dtype=np.uint64)[None, :]) ^ (np.uint64(noise_seed) << np.uint64(35))
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ndtri(((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53)


class NoiseStacker(Stacker):
    """Predicts its training rows' label rates, shifted per row by ``sigma`` x noise drawn from ``noise_seed``.

    The features are ignored and every ``noise_seed`` is as good as any other: all trials have
    the same expected loss, and they differ only by noise that the labels of the rows they are
    scored on may happen to favour.
    """

    name = "noise"
    per_label = False

    def default_params(self) -> dict:
        return {"noise_seed": 0, "sigma": 0.7}

    def suggest_params(self, trial) -> dict:
        return {**self.default_params(), "noise_seed": trial.suggest_int("noise_seed", 0, 2**20)}

    def _fit(self, train, valid, X_train, Y_train, X_valid, Y_valid, params, seed):
        self.prior = np.clip(Y_train.mean(axis=0), 0.01, 0.99)

    def _predict(self, data, X):
        logits = np.log(self.prior / (1 - self.prior)) + self.params["sigma"] * _row_noise(self.params["noise_seed"], data.image_ids)
        return 1.0 / (1.0 + np.exp(-logits))

    def _state(self) -> dict:
        return {"prior": self.prior.tolist()}

    def _save_models(self, directory: Path) -> list[Path]:
        return []

    def _load_models(self, directory: Path, state: dict) -> None:
        self.prior = np.array(state["prior"])


def _expected_loss(Y: np.ndarray, prior: np.ndarray, sigma: float) -> tuple[float, float]:
    """Mean and standard deviation over the noise of NoiseStacker's weighted log loss on labels ``Y`` (Gauss-Hermite)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    logits = np.log(prior / (1 - prior))[:, None] + sigma * nodes[None, :]  # (6, nodes)
    p = 1.0 / (1.0 + np.exp(-logits))
    loss = {1: -np.log(p), 0: -np.log1p(-p)}  # per label and node, for a positive or a negative row
    mean = {y: (loss[y] * weights).sum(axis=1) for y in (0, 1)}
    var = {y: ((loss[y] - mean[y][:, None]) ** 2 * weights).sum(axis=1) for y in (0, 1)}
    positives, n = Y.sum(axis=0), len(Y)
    w = LABEL_WEIGHTS / LABEL_WEIGHTS.sum()
    expected = float((w * (positives * mean[1] + (n - positives) * mean[0]) / n).sum())
    spread = float(np.sqrt((w**2 * (positives * var[1] + (n - positives) * var[0]) / n**2).sum()))
    return expected, spread


def _expected_inner_cv(inputs, outer: int, seed: int, sigma: float) -> tuple[float, float]:
    """The same for the pooled inner CV: each inner fold predicted from the rates of its fit rows (fold ``outer`` excluded)."""
    parts = []
    for k in (k for k in range(inputs.n_folds) if k != outer):
        fit_rows, _ = early_stopping_split(inputs.folds, inputs.groups, k, seed, exclude_fold=outer)
        held = inputs.folds == k
        parts.append((held.sum(), *_expected_loss(inputs.train.Y[held], np.clip(inputs.train.Y[fit_rows].mean(axis=0), 0.01, 0.99), sigma)))
    n = sum(p[0] for p in parts)
    return sum(p[0] * p[1] for p in parts) / n, float(np.sqrt(sum((p[0] * p[2]) ** 2 for p in parts))) / n


def test_the_outer_fold_removes_the_selection_bias_of_many_equal_trials(inputs, monkeypatch):
    """40 trials that differ only by noise: the lowest trial's inner CV is biased low, the outer fold's score is not.

    One run per outer fold (seeds 0..3 -> folds 0..3); scores are compared with their exact
    expectation over the noise (and its spread), computed from the labels.
    """
    monkeypatch.setitem(STACKERS, "noise", NoiseStacker)
    sigma = NoiseStacker().default_params()["sigma"]
    selected_z, honest_z = [], []
    for seed in range(inputs.n_folds):
        tuned = tune_stacker("noise", inputs, storage=None, study_name=f"bias-{seed}", trials=40, timeout=None, seed=seed,
                             inputs_key="k", progress=False)
        outer = tuned.outer_fold
        assert outer == seed == tuned.result.tuning["outer_fold"]
        rows = inputs.folds == outer
        true_outer, spread_outer = _expected_loss(inputs.train.Y[rows], tuned.result.models[outer].prior, sigma)
        true_inner, spread_inner = _expected_inner_cv(inputs, outer, seed, sigma)
        lowest = tuned.result.tuning["best"]
        selected_z.append((lowest - true_inner) / spread_inner)
        honest_z.append((tuned.honest.overall - true_outer) / spread_outer)
        assert lowest < true_inner - spread_inner  # the best of many noisy trials: optimistic
        assert abs(tuned.honest.overall - true_outer) < 3.5 * spread_outer  # an ordinary draw around the true loss
        assert selected_z[-1] < honest_z[-1]
    assert np.mean(selected_z) < -1.5  # the expected minimum of ~40 standard normals is about -2.2
    assert abs(np.mean(honest_z)) < 1.5  # not systematically below: the mean of 4 draws has spread 0.5


# --- one recipe, the outer fold out of the study --------------------------------------------------------


def test_saved_predictions_are_one_recipe_refitted_over_all_folds(inputs, tmp_path):
    tuned, storage = _tune(inputs, tmp_path, trials=8)
    done = {t.number: t for t in _trials(storage) if t.state == optuna.trial.TrialState.COMPLETE}
    assert 0 in done and done[0].params["num_leaves"] == 15  # trial 0 is the defaults
    best = min(done.values(), key=lambda t: t.value)
    tuning = tuned.result.tuning
    assert tuning["best_trial"] == best.number and tuning["best"] == pytest.approx(best.value)
    # the selection rule, restated: the lowest trial below the defaults on every inner fold and by MIN_TUNED_GAIN overall
    clearly = [t for t in done.values() if t.value <= done[0].value * (1 - MIN_TUNED_GAIN)
               and all(a < b for a, b in zip(t.user_attrs["fold_losses"], done[0].user_attrs["fold_losses"]))]
    chosen = min(clearly, key=lambda t: t.value) if clearly else done[0]
    assert tuning["selected_trial"] == chosen.number and tuning["selected"]["overall"] == pytest.approx(chosen.value)
    assert tuning["selected_is_defaults"] == (chosen.number == 0)
    plain = fit_stacker("lgbm", chosen.user_attrs["params"], inputs, seed=0, progress=False)
    assert np.array_equal(tuned.result.oof[list(LABELS)].to_numpy(), plain.oof[list(LABELS)].to_numpy())
    assert np.array_equal(tuned.result.test[list(LABELS)].to_numpy(), plain.test[list(LABELS)].to_numpy())
    assert len(tuned.result.models) == inputs.n_folds and tuned.result.params == plain.params
    rows = inputs.folds == tuning["outer_fold"]
    assert tuning["honest"]["overall"] == pytest.approx(weighted_log_loss(inputs.train.Y[rows], plain.oof[list(LABELS)].to_numpy()[rows]).overall)
    defaults = fit_stacker("lgbm", done[0].user_attrs["params"], inputs, seed=0, progress=False, folds=[tuning["outer_fold"]], predict_test=False)
    defaults_loss = weighted_log_loss(inputs.train.Y[rows], defaults.oof[list(LABELS)].to_numpy()[rows]).overall
    assert tuning["defaults_outer"]["overall"] == pytest.approx(defaults_loss)
    assert tuning["trials"]["run_now"] == 8 and tuning["trials"]["complete"] + tuning["trials"]["pruned"] == 8
    assert tuned.as_dict()["study"]["best_trial"] == best.number


def test_a_selected_trial_is_bagged_with_the_defaults(tune_workdir, inputs, tmp_path, monkeypatch):
    """A trial other than the defaults is saved as the mean of the two recipes, each refitted over all folds:
    OOF, test sets, scores; both sets of fold models are saved and reproduce the test predictions."""
    from stackkit.stack.crossfit import load_stacker_models, save_stacker_result
    from stackkit.stack.stackers.lgbm import LGBMStacker

    slow = {**LGBMStacker().default_params(), "learning_rate": 0.02, "num_leaves": 4, "min_data_in_leaf": 100}
    monkeypatch.setattr(LGBMStacker, "default_params", lambda self: dict(slow))  # 60 rounds at 0.02: every trial beats it
    tuned, storage = _tune(inputs, tmp_path, trials=4)
    tuning, labels = tuned.result.tuning, list(LABELS)
    assert not tuning["selected_is_defaults"] and tuning["bagged"]
    chosen = next(t for t in _trials(storage) if t.number == tuning["selected_trial"])
    selected = fit_stacker("lgbm", chosen.user_attrs["params"], inputs, seed=0, progress=False)
    defaults = fit_stacker("lgbm", {**slow, **LGBM_FAST}, inputs, seed=0, progress=False)
    assert tuned.result.params == selected.params != defaults.params
    for part in ("oof", "test"):
        mean = (getattr(selected, part)[labels].to_numpy(np.float64) + getattr(defaults, part)[labels].to_numpy(np.float64)) / 2
        np.testing.assert_allclose(getattr(tuned.result, part)[labels].to_numpy(), mean, rtol=1e-6)
    assert len(tuned.result.test_folds) == len(selected.test_folds)  # none here: one averaged test set
    for bagged, a, b in zip(tuned.result.test_folds, selected.test_folds, defaults.test_folds):
        np.testing.assert_allclose(bagged[labels].to_numpy(), (a[labels].to_numpy(np.float64) + b[labels].to_numpy(np.float64)) / 2, rtol=1e-6)
    oof = tuned.result.oof[labels].to_numpy()
    assert tuned.result.score.overall == pytest.approx(weighted_log_loss(inputs.train.Y, oof).overall)
    rows = inputs.folds == tuning["outer_fold"]
    outer_loss = lambda p: weighted_log_loss(inputs.train.Y[rows], p[rows]).overall  # noqa: E731
    assert tuning["honest"]["overall"] == pytest.approx(outer_loss(oof))
    assert tuning["selected_outer"]["overall"] == pytest.approx(outer_loss(selected.oof[labels].to_numpy()))
    assert tuning["defaults_outer"]["overall"] == pytest.approx(outer_loss(defaults.oof[labels].to_numpy()))
    np.testing.assert_array_equal(tuned.defaults_result.oof[labels].to_numpy(), defaults.oof[labels].to_numpy())

    save_stacker_result(tune_workdir, tuned.result)
    models, defaults_models = load_stacker_models(tune_workdir, "lgbm"), load_stacker_models(tune_workdir, "lgbm", defaults=True)
    assert len(models) == len(defaults_models) == inputs.n_folds
    data = next(iter(inputs.test_sets()))
    again = np.mean([m.predict(data) for m in models + defaults_models], axis=0)
    np.testing.assert_allclose(again, tuned.result.test[labels].to_numpy(), rtol=1e-5)
    save_stacker_result(tune_workdir, selected)  # a plain fit: no defaults beside its fold models
    with pytest.raises(StackkitError, match="holds no bagged defaults"):
        load_stacker_models(tune_workdir, "lgbm", defaults=True)

    # with per-fold test sets (v3), each set is bagged on its own
    import dataclasses

    from stackkit.stack.crossfit import bag_results

    two_sets = lambda r, shift: dataclasses.replace(r, test_folds=[r.test, r.test.assign(any=r.test["any"] * shift)])  # noqa: E731
    bagged = bag_results(two_sets(selected, 0.5), two_sets(defaults, 0.25), inputs)
    expected = (selected.test["any"].to_numpy(np.float64) * 0.5 + defaults.test["any"].to_numpy(np.float64) * 0.25) / 2
    np.testing.assert_allclose(bagged.test_folds[1]["any"].to_numpy(), expected, rtol=1e-6)
    with pytest.raises(StackkitError, match="cannot be bagged"):
        bag_results(two_sets(selected, 0.5), defaults, inputs)


def _trial(number, fold_losses, params=None):
    return SimpleNamespace(number=number, value=float(np.mean(fold_losses)), user_attrs={"fold_losses": fold_losses, "params": params or {"lr": number}})


DEFAULTS = {"lr": 0}


@pytest.mark.parametrize("others, expected", [
    ([], 0),  # only the defaults
    ([_trial(1, [0.05, 0.05, 0.11])], 0),  # 4 % lower overall, but worse on one fold
    ([_trial(1, [0.0998, 0.0997, 0.0998])], 0),  # below on every fold, by less than MIN_TUNED_GAIN
    ([_trial(1, [0.09, 0.09, 0.09]), _trial(2, [0.095, 0.094, 0.095])], 1),  # the lowest of the clearly better ones
    ([_trial(1, [0.05, 0.05, 0.101]), _trial(2, [0.095, 0.094, 0.095])], 2),  # the lowest overall is not clearly better
])
def test_a_trial_replaces_the_defaults_only_when_clearly_better_on_every_inner_fold(others, expected):
    defaults = _trial(0, [0.1, 0.1, 0.1], DEFAULTS)
    assert select_trial([defaults, *others], DEFAULTS).number == expected


def test_without_the_defaults_trial_the_lowest_trial_is_selected():
    assert select_trial([_trial(3, [0.2, 0.2]), _trial(4, [0.1, 0.3]), _trial(5, [0.19, 0.19])], DEFAULTS).number == 5


def test_the_outer_fold_is_never_fitted_during_the_study(inputs, tmp_path, monkeypatch):
    """Every fit of every trial holds out an inner fold and trains without the outer fold's rows; only the final fits touch it."""
    fits = []
    original = StackInputs.early_stopping_rows

    def recording(self, held_out_fold, seed, exclude_fold=None):
        fit_rows, valid_rows = original(self, held_out_fold, seed, exclude_fold)
        fits.append((int(held_out_fold), set(np.unique(self.folds[np.concatenate([fit_rows, valid_rows])]).tolist())))
        return fit_rows, valid_rows

    monkeypatch.setattr(StackInputs, "early_stopping_rows", recording)  # what every fold job calls, once per fit
    tuned, storage = _tune(inputs, tmp_path, trials=8, seed=6)
    outer = tuned.outer_fold
    assert outer == outer_fold_of(6, inputs.n_folds) == 2
    trials = _trials(storage)
    in_study = sum(len(t.intermediate_values) for t in trials)  # one report per fold fitted, pruned trials included
    assert in_study >= 8 and all(outer not in t.intermediate_values for t in trials)
    for held_out, trained_on in fits[:in_study]:
        assert held_out != outer and outer not in trained_on and held_out not in trained_on
    final = fits[in_study:]
    refit = [(k, set(range(inputs.n_folds)) - {k}) for k in range(inputs.n_folds)]
    # the selected recipe over all folds, then (unless it is the defaults) the defaults over all folds
    assert final == refit + ([] if tuned.result.tuning["selected_is_defaults"] else refit)


def test_a_continued_study_never_mixes_trials_of_another_outer_fold(inputs, tmp_path):
    first, storage = _tune(inputs, tmp_path, trials=3, outer_fold=0)
    again, _ = _tune(inputs, tmp_path, trials=2, outer_fold=0)  # the same outer fold: the study continues
    assert again.info.trials_total == 5 and again.result.tuning["trials"]["complete"] + again.result.tuning["trials"]["pruned"] == 5
    other, _ = _tune(inputs, tmp_path, trials=3, outer_fold=1)
    trials = _trials(storage)
    assert other.info.trials_total == 8 and other.info.best_trial >= 5 and len(other.info.history) == 3
    assert trials[5].params["num_leaves"] == 15 and trials[5].user_attrs["outer_fold"] == 1  # the defaults again, for the new key
    keys = {t.user_attrs["outer_fold"]: t.user_attrs["inputs_key"] for t in trials}
    assert keys[0] != keys[1] and other.result.tuning["trials"]["inputs_key"] == keys[1]


def test_tuning_needs_three_folds(tmp_path):
    two = load_stack_inputs(write_stack_workdir(tmp_path / "two", n_patients=12, n_folds=2))
    with pytest.raises(StackkitError, match="--tune needs at least 3 folds"):
        tune_stacker("lgbm", two, storage=None, study_name="x", trials=1, timeout=None, seed=0, inputs_key="k", progress=False)


# --- pruning, the budget, reuse --------------------------------------------------------------------------


def test_pruning_stops_bad_trials_after_a_fold(inputs, tmp_path):
    tuned, storage = _tune(inputs, tmp_path, trials=12)
    pruned = [t for t in _trials(storage) if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(len(t.intermediate_values) < inputs.n_folds - 1 for t in pruned)
    assert tuned.result.tuning["trials"]["pruned"] == len(pruned)


def test_time_budget_stops_the_study(inputs, tmp_path):
    import time

    started = time.monotonic()
    tuned, _ = _tune(inputs, tmp_path, trials=500, timeout=2.0)
    assert 1 <= tuned.info.trials_run < 500
    assert time.monotonic() - started < 30  # the refit's expected time is kept out of the study's share


def test_binned_datasets_are_reused_across_trials(inputs):
    import lightgbm as lgb

    made = []
    original = lgb.Dataset.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    caches: dict = {}
    lgb.Dataset.__init__ = counting
    try:
        for leaves in (7, 15):
            fit_stacker("lgbm", {**LGBM_FAST, "num_leaves": leaves}, inputs, progress=False, caches=caches, predict_test=False,
                        folds=[1, 2, 3], exclude_fold=0)
            if leaves == 7:
                first = len(made)
    finally:
        lgb.Dataset.__init__ = original
    assert first > 0 and len(made) == first  # the second fit built no dataset


def test_an_excluded_fold_is_neither_trained_nor_predicted(inputs):
    result = fit_stacker("lgbm", LGBM_FAST, inputs, progress=False, folds=[1, 2, 3], exclude_fold=0, predict_test=False)
    oof = result.oof[list(LABELS)].to_numpy()
    assert np.isnan(oof[inputs.folds == 0]).all() and np.isfinite(oof[inputs.folds != 0]).all()
    with pytest.raises(StackkitError, match="excluded from training"):
        fit_stacker("lgbm", LGBM_FAST, inputs, progress=False, exclude_fold=0)


def test_a_tuned_seq_fits_its_folds_in_processes_with_the_same_models(inputs, tmp_path, monkeypatch):
    """A stacker whose folds fit side by side (seq) fits each trial's inner folds and the final fits in fold
    processes, not one fold after another in this process; each trial still records its running fold losses,
    and the recipe's OOF is the one an in-process fit gives, bit for bit."""
    from stackkit.stack import folds as fold_module

    monkeypatch.setenv("STACKKIT_THREADS", "2")
    in_processes = []
    original = fold_module.fit_folds_in_processes

    def recording(name, params, wanted, job, processes, on_done=None):
        in_processes.append((name, list(wanted), processes))
        return original(name, params, wanted, job, processes, on_done=on_done)

    monkeypatch.setattr(fold_module, "fit_folds_in_processes", recording)
    quick = {"max_epochs": 4, "patience": 2, "hidden": 16}
    tuned, storage = _tune(inputs, tmp_path, name="seq", trials=2, overrides=quick)
    n_folds, inner = inputs.n_folds, tuned.result.tuning["inner_folds"]
    fits = 1 if tuned.result.tuning["selected_is_defaults"] else 2  # the recipe, then the defaults
    # each trial's 3 inner folds in 3 processes, the final fits' 4 folds in 2 (2 cores)
    assert in_processes == [("seq", inner, 3)] * 2 + [("seq", list(range(n_folds)), 2)] * fits
    for trial in _trials(storage):
        assert sorted(trial.intermediate_values) == inner and trial.state == optuna.trial.TrialState.COMPLETE
    monkeypatch.setenv("STACKKIT_THREADS", "1")  # one core: every fold in this process
    alone = fit_stacker("seq", tuned.result.params, inputs, seed=0, progress=False, predict_test=False)
    assert np.array_equal(alone.oof[list(LABELS)].to_numpy(), tuned.result.oof[list(LABELS)].to_numpy())
