"""Optuna studies for ``stack fit --tune``: one per stacker, one for the blend (its search: ``stack.blend_search``).

Studies are opened with ``load_if_exists=True``: a rerun with the same study name and storage,
or a second worker started beside the first (same journal file, or the same database from
another machine), adds its trials to the same study. Each call runs ``trials`` more trials
(or until ``timeout``). TPE is seeded for reproducibility and uses ``constant_liar`` so
concurrent workers do not all sample around the same point (see :func:`open_study` for how the
sampler is seeded; workers started at the same instant may still draw the same random start-up
trials). Workers of a stacker study share trials only with one ``--seed``: the seed is part of
its trials' key (fits depend on it) and picks the study's outer fold.

Every trial records an ``inputs_key`` (a digest of what it was fitted on). The best trial is
picked only among trials with the current key, so a study continued after the features or
the stackers changed never hands back parameters scored on other data.

A stacker's study never sees one outer fold (``seed % K``, part of the key): trials are
cross-validated on the other folds, and the selected parameters are refitted over all folds (bagged
with the defaults when they differ) as one recipe, whose loss on the outer fold is the honest estimate (:func:`tune_stacker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from stackkit.contract import LABELS
from stackkit.errors import StackkitError, one_line


@contextlib.contextmanager
def optuna_logging(verbose: bool = False):
    """Optuna's per-trial INFO lines off (a tqdm bar shows progress instead) unless ``verbose``."""
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def open_study(study_name: str, storage, *, seed: int = 0, pruner=None):
    """Create or continue ``study_name`` in ``storage`` (minimizing), with a TPE sampler seeded for this call.

    The sampler seed mixes ``seed`` with the number of trials already in the study, so a rerun
    does not redraw the first run's random start-up points yet stays reproducible; when another
    worker has a trial running, the process id is mixed in too (concurrent work is not
    reproducible anyway, and identical draws would be wasted trials).
    """
    import optuna

    try:
        with _storage_errors(study_name):
            study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
                                        pruner=pruner)
            existing = study.get_trials(deepcopy=False)
            others_running = any(t.state == optuna.trial.TrialState.RUNNING for t in existing)
            sampler_seed = int(digest(int(seed), len(existing), os.getpid() if others_running else 0)[:8], 16)
            study.sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)
            return study
    except ValueError as exc:  # e.g. an existing study of that name that maximizes
        raise StackkitError(f"study '{study_name}': cannot be continued ({exc}); pass another --study-name") from None


@contextlib.contextmanager
def _storage_errors(study_name: str):
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only database errors are turned into one line
        if type(exc).__module__.startswith("sqlalchemy"):
            orig = getattr(exc, "orig", None) or exc
            detail = one_line(str(orig).split("\n")[0])
            raise StackkitError(f"study '{study_name}': the Optuna storage failed ({type(orig).__name__}: {detail}); check the database") from None
        raise


def run_trials(study, objective: Callable, *, trials: int, timeout: float | None, progress: bool, desc: str,
               inputs_key: str | None = None, stop: Callable[[], bool] | None = None) -> int:
    """``trials`` more trials (fewer if ``timeout`` seconds pass or ``stop()`` turns true after a trial) with a
    tqdm bar; returns how many ran here.

    The bar's ``best=`` counts only trials of ``inputs_key`` (a continued study may hold trials
    scored on other data) and includes the trial that just ended.
    """
    import optuna
    from tqdm.auto import tqdm

    ran = 0
    known = [t.value for t in completed_trials(study, inputs_key)]
    best = min(known) if known else None
    with tqdm(total=trials, desc=desc, unit="trial", file=sys.stderr, disable=not progress, leave=False) as bar:

        def on_trial_end(study, trial):
            nonlocal ran, best
            ran += 1
            bar.update(1)
            if trial.state == optuna.trial.TrialState.COMPLETE and (inputs_key is None or trial.user_attrs.get("inputs_key") == inputs_key):
                best = trial.value if best is None else min(best, trial.value)
            if best is not None:
                bar.set_postfix(best=f"{best:.5f}", refresh=False)
            if stop is not None and stop():
                study.stop()

        with _storage_errors(study.study_name):
            study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[on_trial_end], gc_after_trial=False)
    return ran


def completed_trials(study, inputs_key: str | None = None) -> list:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if inputs_key is not None:
        done = [t for t in done if t.user_attrs.get("inputs_key") == inputs_key]
    return done


def study_history(study, inputs_key: str | None = None) -> list[float | None]:
    """Objective value per trial of ``inputs_key`` in trial order (None for trials that did not complete): for the report."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    if inputs_key is not None:
        trials = [t for t in trials if t.user_attrs.get("inputs_key") == inputs_key]
    return [t.value if t.state == optuna.trial.TrialState.COMPLETE else None for t in trials]


def digest(*parts) -> str:
    """A short key for what a trial was fitted on (arrays hashed by bytes, the rest by JSON)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
            h.update(str(part.shape).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class StudyInfo:
    name: str
    trials_total: int
    trials_run: int
    best_value: float | None
    best_trial: int | None
    history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "trials_total": self.trials_total, "trials_run_now": self.trials_run,
                "best_value": self.best_value, "best_trial": self.best_trial}


# --- stackers ------------------------------------------------------------------------------------


# A trial replaces the defaults only when it is clearly better on the inner CV: the blend's rule for
# a blend over the best single source (stack.blend.MIN_BLEND_GAIN), for the same reason: inner-CV gains
# uneven over the folds did not carry over to held-out labels (bench_stack, realistic tuning seed 1:
# a seq trial 3.8 % lower overall but 4.7 % higher on one fold was 2.4 % worse held out).
MIN_TUNED_GAIN = 0.005
# A selected trial is bagged with the defaults (the mean of the two recipes' predictions) rather than replacing
# them: on the tuning seeds of bench_stack a trial clearly better on every inner fold still did no better than the
# defaults on held-out labels (the OOF rows' setting, one unseen base fold model per row, is not the test rows'),
# while the mean of the two was 0.6-0.7 % below the defaults on each of the three stackers where a trial was selected
# on realistic seeds 0 and 1; on persistent seed 1 a selected lgbm trial 2.5 % worse held out was 0.7 % worse bagged.
BAG_RULE = "a selected trial other than the defaults is bagged with them: the mean of the two recipes' predictions"
SELECTION_RULE = (f"the lowest inner-CV trial among those below the defaults' trial on every inner fold and at least "
                  f"{MIN_TUNED_GAIN:.1%} below it overall; the defaults when no trial is")
TUNING_METHOD = ("outer fold o (seed % K) held out of the study: trials are scored, pruned and proposed on CV over the other "
                 "folds (each inner fit trains on K-2 folds); the selected trial (" + SELECTION_RULE + ") is refitted over all "
                 "K folds (OOF, test predictions, fold models); " + BAG_RULE + " (one recipe, the defaults' fold models in "
                 "defaults/); honest = that recipe's loss on fold o, selected_outer = the selected trial's alone, "
                 "defaults_outer = the defaults' loss on fold o, selected = the selected trial's inner-CV loss (optimistic "
                 "when it was chosen on it), best = the lowest inner-CV trial")


def outer_fold_of(seed: int, n_folds: int) -> int:
    """The fold a tuning call holds out of its studies: ``seed % n_folds`` (deterministic, recorded)."""
    return int(seed) % int(n_folds)


@dataclass
class TunedStacker:
    """A tuned stacker: ``result`` is ONE recipe fitted over all K folds: the selected trial's parameters,
    bagged with the defaults' (:data:`BAG_RULE`) when they differ.

    ``honest`` is that recipe's loss on the outer fold, which no trial ever trained, early-stopped
    or was scored on; ``defaults_outer`` the untuned defaults' loss on the same rows;
    ``selected_score`` the selected trial's inner-CV loss (optimistic: it was chosen on it).
    """

    result: object  # crossfit.StackerResult of the selected parameters; result.tuning holds the record below
    outer_fold: int
    honest: object  # metric.Score on the outer fold
    defaults_outer: object  # metric.Score on the outer fold
    selected_score: object  # metric.Score: the selected trial's CV over the inner folds
    info: StudyInfo
    # the defaults fitted over all K folds (``result`` itself when they were selected):
    # what the untuned `stack fit` would blend, for the submission's nested comparison (stack.nested)
    defaults_result: object = None

    def as_dict(self) -> dict:
        return {**self.result.tuning, "study": self.info.as_dict()}


class _DefaultsTrial:
    """Answers every ``suggest_*`` with the stacker's default: the names and values to enqueue as trial 0."""

    def __init__(self, defaults: dict):
        self.defaults, self.values = defaults, {}

    def _suggest(self, name, *args, **kwargs):
        self.values[name] = self.defaults[name]
        return self.defaults[name]

    suggest_float = suggest_int = suggest_categorical = _suggest


@dataclass(frozen=True)
class TuneOptions:
    """:func:`tune_stacker`'s keywords: the study (storage, name, trials, time budget) and the fits' seed and overrides.

    ``inputs_key``: a digest of what the trials are fitted on (mixed with the outer fold);
    ``outer_fold``: None for :func:`outer_fold_of` the seed."""

    storage: object
    study_name: str
    trials: int
    timeout: float | None
    seed: int
    inputs_key: str
    overrides: dict | None = None
    progress: bool = True
    verbose: bool = False
    outer_fold: int | None = None


@dataclass
class _Tuning:
    """One :func:`tune_stacker` call: the outer fold, the time budget, the defaults (trial 0), and what the
    trials run here measured (seconds per inner fit, the best value) that the budget's reserve is read from."""

    name: str
    inputs: object
    options: TuneOptions
    stacker: object
    overrides: dict
    outer: int
    inner: list[int]
    inner_sizes: np.ndarray  # rows per inner fold: a pruned trial's running loss is their weighted mean
    key: str
    deadline: float | None
    defaults: _DefaultsTrial
    default_params: dict  # trial 0's parameters
    fit_seconds: dict = field(default_factory=dict)  # trial number (and "defaults") -> seconds per inner fit, complete trials run here
    best_here: dict = field(default_factory=dict)
    study_caches: dict = field(default_factory=dict)  # per inner fold: training rows without fold o (never shared with full fits)

    @classmethod
    def start(cls, name: str, inputs, options: TuneOptions) -> "_Tuning":
        from stackkit.stack.stackers import get_stacker

        stacker = get_stacker(name)
        overrides = dict(options.overrides or {})
        n_folds = inputs.n_folds
        if n_folds < 3:
            raise StackkitError(f"--tune needs at least 3 folds (one held out of the study, two for its cross-validation); "
                                f"data/folds.parquet has {n_folds}")
        outer = outer_fold_of(options.seed, n_folds) if options.outer_fold is None else int(options.outer_fold)
        if not 0 <= outer < n_folds:
            raise StackkitError(f"outer fold {outer}: expected 0..{n_folds - 1}")
        inner = [k for k in range(n_folds) if k != outer]
        key = digest(options.inputs_key, "outer_fold", outer, n_folds)
        inner_sizes = np.bincount(inputs.folds, minlength=n_folds).astype(np.float64)[inner]
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        defaults = _DefaultsTrial(stacker.default_params())
        default_params = {**stacker.suggest_params(defaults), **overrides}
        return cls(name, inputs, options, stacker, overrides, outer, inner, inner_sizes, key, deadline, defaults, default_params)

    @property
    def n_folds(self) -> int:
        return self.inputs.n_folds

    def reserve(self) -> float:
        """Seconds the refit (K fits + test predictions) and the defaults' outer fit are expected to take."""
        if not self.best_here:
            return 0.0
        # a final fit trains on K-1 folds where a trial's fits train on K-2: scale their measured time
        growth = (self.n_folds - 1) / (self.n_folds - 2)
        per_fit = self.fit_seconds[self.best_here["number"]]
        # the selected recipe and the defaults are each fitted over all K folds
        return growth * self.n_folds * (per_fit + self.fit_seconds.get("defaults", per_fit))

    def out_of_time(self) -> bool:
        return self.deadline is not None and bool(self.best_here) and time.monotonic() > self.deadline - self.reserve()

    def objective(self, trial) -> float:
        import optuna

        from stackkit.stack.crossfit import FoldPruned, fit_stacker
        from stackkit.stack.folds import fits_apart

        params = {**self.stacker.suggest_params(trial), **self.overrides}
        trial.set_user_attr("inputs_key", self.key)
        trial.set_user_attr("outer_fold", self.outer)
        trial.set_user_attr("params", json.loads(json.dumps(params, default=_json_scalar)))
        inner, inner_sizes, losses = self.inner, self.inner_sizes, []

        def report(k, fold_loss):
            losses.append(fold_loss)
            done = inner_sizes[: len(losses)]
            trial.report(float(np.dot(losses, done) / done.sum()), step=k)

        def on_fold(k, fold_loss):
            report(k, fold_loss)
            if trial.should_prune():
                raise FoldPruned
            if self.out_of_time():
                raise FoldPruned  # the budget (less the refit's share) is spent and a complete trial exists

        # a stacker that fits its folds side by side in processes (seq, one thread each) fits a trial's folds
        # so too: twice the trials in the budget on 2 cores, for no pruning inside a trial
        apart = fits_apart(self.stacker, params)
        try:
            result = fit_stacker(self.name, params, self.inputs, seed=self.options.seed, progress=False, folds=inner,
                                 exclude_fold=self.outer, on_fold=None if apart else on_fold,
                                 caches=None if apart else self.study_caches, predict_test=False)
        except FoldPruned:
            raise optuna.TrialPruned() from None
        if apart:
            for k, fold_loss in zip(inner, result.fold_scores):
                report(k, fold_loss)  # the running losses, as a trial fitted fold by fold records them
        trial.set_user_attr("fold_losses", [float(v) for v in result.fold_scores])
        trial.set_user_attr("score", result.score.as_dict())
        value = float(result.score.overall)
        self.fit_seconds[trial.number] = result.seconds / len(inner)
        if _same_params(params, self.default_params):
            self.fit_seconds["defaults"] = self.fit_seconds[trial.number]
        if not self.best_here or value < self.best_here["value"]:
            self.best_here.update(value=value, number=trial.number)
        return value

    def refit_best(self, study, ran: int) -> TunedStacker:
        """The selected trial of this key refitted over all K folds (bagged with the defaults when it is not
        them); scored on the outer fold beside the defaults."""
        import optuna

        from stackkit.metric import Score, weighted_log_loss
        from stackkit.stack.crossfit import bag_results, fit_stacker
        from stackkit.stack.folds import fits_apart

        name, inputs, seed, outer = self.name, self.inputs, self.options.seed, self.outer
        candidates = [t for t in completed_trials(study, self.key) if len(t.user_attrs.get("fold_losses", [])) == len(self.inner)]
        if not candidates:
            raise StackkitError(f"study '{self.options.study_name}': no trial of stacker '{name}' completed; "
                                "see the errors above or rerun with more --trials")
        best = min(candidates, key=lambda t: t.value)
        chosen = select_trial(candidates, self.default_params)
        params = dict(chosen.user_attrs["params"])
        # per fold, all other folds' rows (binned datasets): shared by the refit and the defaults' fit. A stacker
        # whose folds fit side by side in processes (seq) keeps none: caches live in this process, and its two
        # full fits take half the time in processes
        full_caches: dict | None = None if fits_apart(self.stacker, params) else {}
        result = fit_stacker(name, params, inputs, seed=seed, progress=self.options.progress, caches=full_caches)
        rows = inputs.folds == outer
        labels = list(LABELS)

        def outer_loss(fitted) -> Score:
            return weighted_log_loss(inputs.train.Y[rows], fitted.oof[labels].to_numpy()[rows])

        selected_outer = outer_loss(result)
        is_defaults = _same_params(params, self.default_params)
        if is_defaults:
            defaults_result = result
        else:
            # over every fold, with test predictions: the bag's other half, and the submission's nested
            # score blends the defaults' OOF (stack.nested)
            defaults_result = fit_stacker(name, self.default_params, inputs, seed=seed, progress=False, caches=full_caches)
            result = bag_results(result, defaults_result, inputs)
        honest, defaults_outer = outer_loss(result), outer_loss(defaults_result)
        selected = Score(float(chosen.user_attrs["score"]["overall"]), dict(chosen.user_attrs["score"]["per_label"]))
        states = [t.state for t in study.get_trials(deepcopy=False) if t.user_attrs.get("inputs_key") == self.key]
        info = StudyInfo(self.options.study_name, len(study.get_trials(deepcopy=False)), ran, float(best.value), best.number,
                         study_history(study, self.key))
        result.tuning = {
            "outer_fold": outer,
            "inner_folds": self.inner,
            "honest": honest.as_dict(),
            "defaults_outer": defaults_outer.as_dict(),
            "selected": selected.as_dict(),
            "selected_trial": int(chosen.number),
            "selected_is_defaults": is_defaults,
            "bagged": not is_defaults,
            "selected_outer": selected_outer.as_dict(),
            "best_trial": int(best.number),
            "best": float(best.value),
            "rule": SELECTION_RULE,
            "trials": {"run_now": ran, "complete": states.count(optuna.trial.TrialState.COMPLETE),
                       "pruned": states.count(optuna.trial.TrialState.PRUNED), "inputs_key": self.key},
            "method": TUNING_METHOD,
        }
        return TunedStacker(result, outer, honest, defaults_outer, selected, info, defaults_result)


def tune_stacker(name: str, inputs, options: TuneOptions | None = None, **fields) -> TunedStacker:
    """Tune stacker ``name`` with an outer fold the study never sees; refit the winner as one recipe.

    The keywords are :class:`TuneOptions`' fields (or pass ``options``; ``fields`` then override it).
    Fold ``o = outer_fold`` (default :func:`outer_fold_of` the seed) is held out of the study:
    every trial is a cross-validation over the other K-1 folds (each fit trains and early-stops
    on K-2 of them, ``fit_stacker(..., exclude_fold=o)``), reports its running loss after each
    fold (Optuna's median pruner stops clearly worse trials) and is scored by its pooled inner
    OOF loss; TPE only ever sees those scores. Trial 0 is the stacker's defaults. Among every
    trial of this key in the study (earlier runs and other workers count), :func:`select_trial`
    picks the lowest inner-CV trial that is clearly better than the defaults (below them on every
    inner fold and by :data:`MIN_TUNED_GAIN`), else the defaults; it is refitted over all K folds
    with ``fit_stacker(name, params, inputs)`` and, when it is not the defaults, bagged with them
    (``crossfit.bag_results``: every prediction the mean of the two): that recipe's OOF, test
    predictions and fold models are what is saved. Its loss on fold o is the honest estimate
    (fold o's model trained on the other folds, and no label of fold o took part in choosing
    the trial); the defaults are fitted over all K folds too (sharing the binned datasets): their
    loss on fold o for the comparison, their OOF for the submission's nested score
    (``stack.nested``). ``inputs_key`` is mixed with o, so a continued study never mixes trials
    of another outer fold. The time budget ``timeout`` includes the refit: the study stops early
    enough to leave the time the final fits are expected to take.
    """
    import optuna

    options = TuneOptions(**fields) if options is None else replace(options, **fields)
    run = _Tuning.start(name, inputs, options)
    with optuna_logging(options.verbose):
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
        study = open_study(options.study_name, options.storage, seed=options.seed, pruner=pruner)
        # the defaults are a trial of every key (Optuna's skip_if_exists would also skip them for trials of other data)
        trials_of_key = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("inputs_key") == run.key]
        if not any(t.params == run.defaults.values for t in trials_of_key):
            study.enqueue_trial(run.defaults.values, user_attrs={"inputs_key": run.key})
        remaining = None if run.deadline is None else max(1.0, run.deadline - time.monotonic())
        ran = run_trials(study, run.objective, trials=options.trials, timeout=remaining, progress=options.progress,
                         desc=f"tune {name}", inputs_key=run.key, stop=run.out_of_time)
        return run.refit_best(study, ran)


def select_trial(candidates: list, default_params: dict, min_gain: float = MIN_TUNED_GAIN):
    """The trial whose parameters are refitted (:data:`SELECTION_RULE`), among complete trials of one key
    (each with ``fold_losses`` over the same inner folds); the lowest one when the defaults' trial is absent."""
    defaults = next((t for t in candidates if _same_params(t.user_attrs["params"], default_params)), None)
    if defaults is None:
        return min(candidates, key=lambda t: t.value)
    defaults_folds = np.asarray(defaults.user_attrs["fold_losses"], dtype=np.float64)
    clearly_better = [t for t in candidates if t.value <= defaults.value * (1.0 - min_gain)
                      and bool(np.all(np.asarray(t.user_attrs["fold_losses"], dtype=np.float64) < defaults_folds))]
    return min(clearly_better, key=lambda t: t.value) if clearly_better else defaults


def _same_params(a: dict, b: dict) -> bool:
    """Equal once both are JSON-normalized (how trial parameters are stored)."""
    return json.dumps(a, sort_keys=True, default=_json_scalar) == json.dumps(b, sort_keys=True, default=_json_scalar)


def _json_scalar(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
