"""Tuning a stacker (stackkit.stack.tune): honest OOF by per-fold selection, pruning, the time budget, dataset reuse."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from stackkit.contract import LABELS
from stackkit.metric import weighted_log_loss
from stackkit.stack.crossfit import fit_stacker, load_stack_inputs
from stackkit.stack.storage import make_storage
from stackkit.stack.tune import honest_fold_choice, tune_stacker
from stackkit.testing.stack import FAST_PARAMS, write_stack_workdir

LGBM_FAST = {k: v for k, v in FAST_PARAMS["lgbm"].items() if k != "num_boost_round"} | {"num_boost_round": 60}


@pytest.fixture(scope="module")
def tune_workdir(tmp_path_factory):
    return write_stack_workdir(tmp_path_factory.mktemp("tune") / "work", n_patients=30)


@pytest.fixture(scope="module")
def inputs(tune_workdir):
    return load_stack_inputs(tune_workdir)


def test_honest_choice_removes_the_selection_bias_of_many_equal_trials():
    """30 trials of equal true loss 0.2 with fold noise: the best trial's own score is biased low, the honest one is not."""
    rng = np.random.default_rng(0)
    sizes = np.full(5, 100.0)
    selected, honest = [], []
    for _ in range(300):
        losses = 0.2 + rng.normal(0, 0.01, size=(30, 5))
        selected.append((losses @ sizes).min() / sizes.sum())
        chosen = honest_fold_choice(losses, sizes)
        honest.append(losses[chosen, np.arange(5)].mean())
    assert np.mean(selected) < 0.2 - 0.006  # the minimum of 30 noisy means
    assert abs(np.mean(honest) - 0.2) < 0.001


def test_honest_choice_never_uses_a_folds_own_loss():
    losses = np.array([[0.1, 0.5, 0.5], [0.4, 0.4, 0.4]])  # trial 0 wins overall by luck on fold 0
    chosen = honest_fold_choice(losses, np.ones(3))
    assert chosen.tolist() == [1, 0, 0]


def _tune(inputs, tmp_path, **kwargs):
    storage = make_storage(str(tmp_path / "journal.log"), None)
    args = dict(storage=storage, study_name="t", trials=6, timeout=None, seed=0, inputs_key="k", overrides=LGBM_FAST, progress=False)
    return tune_stacker("lgbm", inputs, **{**args, **kwargs}), storage


def test_tuned_oof_is_assembled_from_per_fold_choices(inputs, tmp_path):
    tuned, storage = _tune(inputs, tmp_path)
    study = optuna.load_study(study_name="t", storage=storage)
    done = {t.number: t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    assert 0 in done and done[0].params["num_leaves"] == 15  # trial 0 is the defaults
    # each fold's rows hold the chosen trial's refitted predictions for that fold
    for k, number in enumerate(tuned.fold_trials):
        refit = fit_stacker("lgbm", done[number].user_attrs["params"], inputs, folds=[k], progress=False, predict_test=False)
        rows = inputs.folds == k
        assert np.allclose(tuned.result.oof[list(LABELS)].to_numpy()[rows], refit.oof[list(LABELS)].to_numpy()[rows], atol=1e-6)
    assert np.isclose(tuned.result.score.overall, weighted_log_loss(inputs.train.Y, tuned.result.oof[list(LABELS)].to_numpy()).overall)
    assert tuned.selected_score.overall == pytest.approx(min(t.value for t in done.values()))
    assert tuned.result.tuning["fold_trials"] == tuned.fold_trials


def test_a_rerun_stays_honest_and_refits_chosen_trials_of_earlier_runs(inputs, tmp_path):
    first, _ = _tune(inputs, tmp_path, trials=3)
    second, _ = _tune(inputs, tmp_path, trials=2)  # trials of the first run are no longer in memory
    assert second.info.trials_total == 5
    assert np.isfinite(second.result.oof[list(LABELS)].to_numpy()).all()


def test_pruning_stops_bad_trials_after_a_fold(inputs, tmp_path):
    tuned, storage = _tune(inputs, tmp_path, trials=12)
    states = [t.state for t in optuna.load_study(study_name="t", storage=storage).get_trials()]
    assert optuna.trial.TrialState.PRUNED in states
    pruned = [t for t in optuna.load_study(study_name="t", storage=storage).get_trials() if t.state == optuna.trial.TrialState.PRUNED]
    assert all(len(t.intermediate_values) < inputs.n_folds for t in pruned)


def test_time_budget_stops_the_study(inputs, tmp_path):
    tuned, _ = _tune(inputs, tmp_path, trials=500, timeout=2.0)
    assert 1 <= tuned.info.trials_run < 500


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
            fit_stacker("lgbm", {**LGBM_FAST, "num_leaves": leaves}, inputs, progress=False, caches=caches, predict_test=False)
            if leaves == 7:
                first = len(made)
    finally:
        lgb.Dataset.__init__ = original
    assert first > 0 and len(made) == first  # the second fit built no dataset


def test_honest_oof_of_trials_run_elsewhere_is_refitted_fold_by_fold(inputs, tmp_path):
    """Another worker's (or an earlier call's) trials are not in memory: each chosen fold is refitted, none left empty."""
    from stackkit.stack.tune import _honest_oof

    tuned, storage = _tune(inputs, tmp_path, trials=3)
    study = optuna.load_study(study_name="t", storage=storage)
    candidates = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    sizes = np.bincount(inputs.folds).astype(float)
    honest, fold_trials = _honest_oof("lgbm", inputs, candidates, {}, sizes, 0)
    assert fold_trials == tuned.fold_trials
    assert np.isfinite(honest).all()
    assert np.allclose(honest, tuned.result.oof[list(LABELS)].to_numpy(), atol=1e-6)
