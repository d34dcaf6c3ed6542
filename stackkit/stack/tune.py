"""Optuna studies for ``stack fit --tune``: one per stacker, one for the blend.

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
cross-validated on the other folds, and the selected parameters are refitted as one recipe over
all folds, whose loss on the outer fold is the honest estimate (:func:`tune_stacker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from stackkit.contract import LABELS
from stackkit.stack.blend import (
    CLIP_GRID,
    N_LABELS,
    TEMPERATURE_BOUNDS,
    BlendParams,
    fit_blend,
    logit,
)
from stackkit.errors import StackkitError, one_line

BLEND_WEIGHT_PREFIX = "w"
CLIP_RANGE = (CLIP_GRID[0], CLIP_GRID[-1])


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


TUNING_METHOD = ("outer fold o (seed % K) held out of the study: trials are scored, pruned and proposed on CV over the other "
                 "folds (each inner fit trains on K-2 folds); the best trial's parameters are refitted as one recipe over all "
                 "K folds (OOF, test predictions, fold models); honest = that recipe's loss on fold o, defaults_outer = the "
                 "defaults' loss on fold o, selected = the best trial's inner-CV loss (optimistic: chosen on it)")


def outer_fold_of(seed: int, n_folds: int) -> int:
    """The fold a tuning call holds out of its studies: ``seed % n_folds`` (deterministic, recorded)."""
    return int(seed) % int(n_folds)


@dataclass
class TunedStacker:
    """A tuned stacker: ``result`` is ONE recipe (the selected trial's parameters) fitted over all K folds.

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


def tune_stacker(name: str, inputs, *, storage, study_name: str, trials: int, timeout: float | None, seed: int,
                 inputs_key: str, overrides: dict | None = None, progress: bool = True, verbose: bool = False,
                 outer_fold: int | None = None) -> TunedStacker:
    """Tune stacker ``name`` with an outer fold the study never sees; refit the winner as one recipe.

    Fold ``o = outer_fold`` (default :func:`outer_fold_of` the seed) is held out of the study:
    every trial is a cross-validation over the other K-1 folds (each fit trains and early-stops
    on K-2 of them, ``fit_stacker(..., exclude_fold=o)``), reports its running loss after each
    fold (Optuna's median pruner stops clearly worse trials) and is scored by its pooled inner
    OOF loss; TPE only ever sees those scores. Trial 0 is the stacker's defaults. The trial best
    on the inner CV (among every trial of this key in the study: earlier runs and other workers
    count) is refitted over all K folds with ``fit_stacker(name, params, inputs)``: its OOF, test
    predictions and fold models are what is saved. Its loss on fold o is the honest estimate
    (fold o's model trained on the other folds, and no label of fold o took part in choosing
    the trial); the defaults are fitted on fold o too (one fit, shared binned datasets) for the
    comparison. ``inputs_key`` is mixed with o, so a continued study never mixes trials of
    another outer fold. The time budget ``timeout`` includes the refit: the study stops early
    enough to leave the time the final fits are expected to take.
    """
    import time

    import optuna

    from stackkit.stack.crossfit import FoldPruned, fit_stacker
    from stackkit.stack.stackers import get_stacker
    from stackkit.metric import Score, weighted_log_loss

    stacker = get_stacker(name)
    overrides = dict(overrides or {})
    n_folds = inputs.n_folds
    if n_folds < 3:
        raise StackkitError(f"--tune needs at least 3 folds (one held out of the study, two for its cross-validation); "
                            f"data/folds.parquet has {n_folds}")
    outer = outer_fold_of(seed, n_folds) if outer_fold is None else int(outer_fold)
    if not 0 <= outer < n_folds:
        raise StackkitError(f"outer fold {outer}: expected 0..{n_folds - 1}")
    inner = [k for k in range(n_folds) if k != outer]
    key = digest(inputs_key, "outer_fold", outer, n_folds)
    fold_sizes = np.bincount(inputs.folds, minlength=n_folds).astype(np.float64)
    inner_sizes = fold_sizes[inner]
    # a final fit trains on K-1 folds where a trial's fits train on K-2: scale their measured time
    growth = (n_folds - 1) / (n_folds - 2)
    deadline = None if timeout is None else time.monotonic() + timeout
    defaults = _DefaultsTrial(stacker.default_params())
    default_params = {**stacker.suggest_params(defaults), **overrides}  # trial 0's parameters
    fit_seconds: dict = {}  # trial number (and "defaults") -> seconds per inner fit, complete trials run here
    best_here: dict = {}
    study_caches: dict = {}  # per inner fold: training rows without fold o (never shared with full fits)

    def reserve() -> float:
        """Seconds the refit (K fits + test predictions) and the defaults' outer fit are expected to take."""
        if not best_here:
            return 0.0
        per_fit = fit_seconds[best_here["number"]]
        return growth * (n_folds * per_fit + fit_seconds.get("defaults", per_fit))

    def out_of_time() -> bool:
        return deadline is not None and bool(best_here) and time.monotonic() > deadline - reserve()

    def objective(trial):
        params = {**stacker.suggest_params(trial), **overrides}
        trial.set_user_attr("inputs_key", key)
        trial.set_user_attr("outer_fold", outer)
        trial.set_user_attr("params", json.loads(json.dumps(params, default=_json_scalar)))
        losses: list[float] = []

        def on_fold(k, fold_loss):
            losses.append(fold_loss)
            done = inner_sizes[: len(losses)]
            trial.report(float(np.dot(losses, done) / done.sum()), step=k)
            if trial.should_prune():
                raise FoldPruned
            if out_of_time():
                raise FoldPruned  # the budget (less the refit's share) is spent and a complete trial exists

        try:
            result = fit_stacker(name, params, inputs, seed=seed, progress=False, folds=inner, exclude_fold=outer,
                                 on_fold=on_fold, caches=study_caches, predict_test=False)
        except FoldPruned:
            raise optuna.TrialPruned() from None
        trial.set_user_attr("fold_losses", [float(v) for v in result.fold_scores])
        trial.set_user_attr("score", result.score.as_dict())
        value = float(result.score.overall)
        fit_seconds[trial.number] = result.seconds / len(inner)
        if _same_params(params, default_params):
            fit_seconds["defaults"] = fit_seconds[trial.number]
        if not best_here or value < best_here["value"]:
            best_here.update(value=value, number=trial.number)
        return value

    with optuna_logging(verbose):
        study = open_study(study_name, storage, seed=seed, pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
        # the defaults are a trial of every key (Optuna's skip_if_exists would also skip them for trials of other data)
        if not any(t.params == defaults.values for t in study.get_trials(deepcopy=False) if t.user_attrs.get("inputs_key") == key):
            study.enqueue_trial(defaults.values, user_attrs={"inputs_key": key})
        remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
        ran = run_trials(study, objective, trials=trials, timeout=remaining, progress=progress, desc=f"tune {name}", inputs_key=key,
                         stop=out_of_time)
        candidates = [t for t in completed_trials(study, key) if len(t.user_attrs.get("fold_losses", [])) == len(inner)]
        if not candidates:
            raise StackkitError(f"study '{study_name}': no trial of stacker '{name}' completed; see the errors above or rerun with more --trials")
        best = min(candidates, key=lambda t: t.value)
        params = dict(best.user_attrs["params"])
        full_caches: dict = {}  # per fold, all other folds' rows: shared by the refit and the defaults' outer fit
        result = fit_stacker(name, params, inputs, seed=seed, progress=progress, caches=full_caches)
        rows = inputs.folds == outer
        labels = list(LABELS)
        honest = weighted_log_loss(inputs.train.Y[rows], result.oof[labels].to_numpy()[rows])
        if _same_params(params, default_params):
            defaults_outer = honest
        else:
            plain = fit_stacker(name, default_params, inputs, seed=seed, progress=False, folds=[outer], caches=full_caches, predict_test=False)
            defaults_outer = weighted_log_loss(inputs.train.Y[rows], plain.oof[labels].to_numpy()[rows])
        selected = Score(float(best.user_attrs["score"]["overall"]), dict(best.user_attrs["score"]["per_label"]))
        states = [t.state for t in study.get_trials(deepcopy=False) if t.user_attrs.get("inputs_key") == key]
        info = StudyInfo(study_name, len(study.get_trials(deepcopy=False)), ran, float(best.value), best.number, study_history(study, key))
    result.tuning = {
        "outer_fold": outer,
        "inner_folds": inner,
        "honest": honest.as_dict(),
        "defaults_outer": defaults_outer.as_dict(),
        "selected": selected.as_dict(),
        "selected_trial": int(best.number),
        "selected_is_defaults": _same_params(params, default_params),
        "trials": {"run_now": ran, "complete": states.count(optuna.trial.TrialState.COMPLETE),
                   "pruned": states.count(optuna.trial.TrialState.PRUNED), "inputs_key": key},
        "method": TUNING_METHOD,
    }
    return TunedStacker(result, outer, honest, defaults_outer, selected, info)


def _same_params(a: dict, b: dict) -> bool:
    """Equal once both are JSON-normalized (how trial parameters are stored)."""
    return json.dumps(a, sort_keys=True, default=_json_scalar) == json.dumps(b, sort_keys=True, default=_json_scalar)


def _json_scalar(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# --- the blend ---------------------------------------------------------------------------------------


def suggest_blend(trial, source_names: list[str], *, per_label: bool, any_consistency: bool) -> BlendParams:
    """Weights in [0, 1] per source (and label), temperature per label (or shared), one clip; normalized by BlendParams."""
    if per_label:
        weights = np.array([[trial.suggest_float(f"{BLEND_WEIGHT_PREFIX}|{s}|{label}", 0.0, 1.0) for label in LABELS] for s in source_names])
        temperature = np.array([trial.suggest_float(f"t|{label}", *TEMPERATURE_BOUNDS, log=True) for label in LABELS])
    else:
        weights = np.array([trial.suggest_float(f"{BLEND_WEIGHT_PREFIX}|{s}", 0.0, 1.0) for s in source_names])
        temperature = np.full(N_LABELS, trial.suggest_float("t", *TEMPERATURE_BOUNDS, log=True))
    clip = trial.suggest_float("clip", *CLIP_RANGE, log=True)
    return BlendParams(weights, temperature, clip, any_consistency)


def blend_as_trial_params(params: BlendParams, source_names: list[str], *, per_label: bool) -> dict:
    """The trial parameters that :func:`suggest_blend` maps to ``params`` (to enqueue a start point)."""
    lo, hi = TEMPERATURE_BOUNDS
    t = np.clip(params.temperature, lo, hi)
    # weights scaled so the largest is 1: inside [0, 1] and the same blend after normalization
    w = params.weights / np.maximum(params.weights.max(axis=0, keepdims=True), 1e-12)
    out = {}
    if per_label:
        for s, name in enumerate(source_names):
            for l, label in enumerate(LABELS):
                out[f"{BLEND_WEIGHT_PREFIX}|{name}|{label}"] = float(w[s, l])
        for l, label in enumerate(LABELS):
            out[f"t|{label}"] = float(t[l])
    else:
        for s, name in enumerate(source_names):
            out[f"{BLEND_WEIGHT_PREFIX}|{name}"] = float(w[s, 0])
        out["t"] = float(t[0])
    out["clip"] = float(np.clip(params.clip, *CLIP_RANGE))
    return out


@dataclass(frozen=True)
class BlendSearch:
    """:func:`search_blend`'s keywords: the blend's form, the Optuna budget, its storage and study name."""

    per_label: bool
    any_consistency: bool
    trials: int
    timeout: float | None = None
    seed: int = 0
    storage: object = None
    study_name: str | None = None
    progress: bool = False
    verbose: bool = False


def search_blend(preds: np.ndarray, y: np.ndarray, source_names: list[str], options: BlendSearch | None = None,
                 **fields) -> tuple[BlendParams, StudyInfo | None]:
    """The blend-fitting procedure used both in-sample and inside every CV fold.

    1. ``fit_blend``: L-BFGS weights and temperatures, grid clip (deterministic).
    2. ``trials`` Optuna trials over weights/temperature/clip, started from equal weights and from
       step 1's solution (enqueued). In a persistent ``storage`` the study continues across runs.
    Returns the best in-sample candidate among step 1, equal weights (logit mean and linear pool) and
    the matching trials. The keywords are :class:`BlendSearch`' fields: pass them, or ``options``
    (then ``fields`` override it).
    """
    import optuna

    o = BlendSearch(**fields) if options is None else replace(options, **fields)
    per_label, any_consistency, trials, seed = o.per_label, o.any_consistency, o.trials, o.seed

    source_logits = logit(preds)  # once: every trial below blends the same sources
    fitted = fit_blend(preds, y, per_label=per_label, any_consistency=any_consistency, source_logits=source_logits)
    equal = BlendParams.equal(len(source_names), any_consistency=any_consistency, space="logit")
    pool = BlendParams.equal(len(source_names), any_consistency=any_consistency, space="probability")
    candidates = [(params.score_logits(source_logits, y).overall, params) for params in (fitted, equal, pool)]
    if trials <= 0:
        return min(candidates, key=lambda c: c[0])[1], None
    inputs_key = digest(source_names, per_label, any_consistency, preds.astype(np.float32), y.astype(np.int8))

    def objective(trial):
        trial.set_user_attr("inputs_key", inputs_key)
        params = suggest_blend(trial, source_names, per_label=per_label, any_consistency=any_consistency)
        return params.score_logits(source_logits, y).overall

    with optuna_logging(o.verbose):
        if o.storage is None:
            study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
        else:
            study = open_study(o.study_name, o.storage, seed=seed)
        for start in (fitted, equal):
            study.enqueue_trial(blend_as_trial_params(start, source_names, per_label=per_label), skip_if_exists=True)
        ran = run_trials(study, objective, trials=trials, timeout=o.timeout, progress=o.progress, desc="tune blend", inputs_key=inputs_key)
        matching = completed_trials(study, inputs_key)
        for trial in matching:
            params = _blend_from_trial(trial, source_names, per_label=per_label, any_consistency=any_consistency)
            candidates.append((trial.value, params))
        best_value, best = min(candidates, key=lambda c: c[0])
        best_trial = min(matching, key=lambda t: t.value) if matching else None
        info = StudyInfo(study.study_name, len(study.get_trials(deepcopy=False)), ran,
                         None if best_trial is None else float(best_trial.value),
                         None if best_trial is None else best_trial.number, study_history(study, inputs_key))
    return best, info


def _blend_from_trial(trial, source_names, *, per_label: bool, any_consistency: bool) -> BlendParams:
    import optuna

    # replaying suggest_blend on a FixedTrial reads the same parameter names back
    return suggest_blend(optuna.trial.FixedTrial(trial.params), source_names, per_label=per_label, any_consistency=any_consistency)
