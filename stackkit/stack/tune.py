"""Optuna studies for ``stack fit --tune``: one per stacker, one for the blend.

Studies are opened with ``load_if_exists=True``: a rerun with the same study name and storage,
or a second worker started beside the first (same journal file, or the same database from
another machine), adds its trials to the same study. Each call runs ``trials`` more trials
(or until ``timeout``). TPE is seeded for reproducibility and uses ``constant_liar`` so
concurrent workers do not all sample around the same point (see :func:`open_study` for how the
sampler is seeded; workers started at the same instant with one seed may still draw the same
random start-up trials: give them different ``--seed`` values to avoid that).

Every trial records an ``inputs_key`` (a digest of what it was fitted on). The best trial is
picked only among trials with the current key, so a study continued after the features or
the stackers changed never hands back parameters scored on other data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
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
               inputs_key: str | None = None) -> int:
    """``trials`` more trials (fewer if ``timeout`` seconds pass) with a tqdm bar; returns how many ran here.

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


@dataclass
class TunedStacker:
    """A tuned stacker: ``result`` holds the honest OOF (``result.score``) with the selected trial's test predictions and models."""

    result: object  # crossfit.StackerResult
    selected_score: object  # the best trial's own OOF score: optimistic, the trial was chosen on it
    fold_trials: list[int]  # per fold k: the trial whose parameters were best on the other folds
    info: StudyInfo

    def as_dict(self) -> dict:
        return {"honest": self.result.score.as_dict(), "selected": self.selected_score.as_dict(), "fold_trials": self.fold_trials,
                "study": self.info.as_dict()}


class _DefaultsTrial:
    """Answers every ``suggest_*`` with the stacker's default: the names and values to enqueue as trial 0."""

    def __init__(self, defaults: dict):
        self.defaults, self.values = defaults, {}

    def _suggest(self, name, *args, **kwargs):
        self.values[name] = self.defaults[name]
        return self.defaults[name]

    suggest_float = suggest_int = suggest_categorical = _suggest


def honest_fold_choice(fold_losses: np.ndarray, fold_sizes: np.ndarray) -> np.ndarray:
    """Per fold k, the row (trial) with the lowest loss on the OTHER folds: (trials, folds) -> (folds,).

    A fold's own loss never takes part in choosing the parameters whose predictions fill it,
    so the assembled OOF is an honest estimate however many trials were run.
    """
    total = fold_losses @ fold_sizes  # (trials,)
    others = (total[:, None] - fold_losses * fold_sizes[None, :]) / (fold_sizes.sum() - fold_sizes)[None, :]
    return np.argmin(others, axis=0)  # first of equal losses: the earlier trial


def tune_stacker(name: str, inputs, *, storage, study_name: str, trials: int, timeout: float | None, seed: int,
                 inputs_key: str, overrides: dict | None = None, progress: bool = True, verbose: bool = False) -> TunedStacker:
    """Tune stacker ``name`` on OOF weighted log loss with per-fold pruning; honest OOF by per-fold selection.

    Trial 0 is the stacker's defaults. Each trial reports its running loss after every fold
    (Optuna's median pruner stops trials that are clearly worse) and records its per-fold losses.
    Trials run here keep their OOF in memory; a trial of an earlier run or another worker that
    is chosen for some fold is refitted on that fold only.
    """
    import time

    import optuna

    from stackkit.stack.crossfit import FoldPruned, fit_stacker
    from stackkit.stack.stackers import get_stacker
    from stackkit.metric import weighted_log_loss

    stacker = get_stacker(name)
    overrides = dict(overrides or {})
    fold_sizes = np.bincount(inputs.folds, minlength=inputs.n_folds).astype(np.float64)
    deadline = None if timeout is None else time.monotonic() + timeout
    kept_oof: dict[int, np.ndarray] = {}
    best_here: dict = {}
    caches: dict = {}

    def objective(trial):
        params = {**stacker.suggest_params(trial), **overrides}
        trial.set_user_attr("inputs_key", inputs_key)
        trial.set_user_attr("params", json.loads(json.dumps(params, default=_json_scalar)))

        def on_fold(k, fold_loss):
            done = len(losses) + 1
            losses.append(fold_loss)
            trial.report(float(np.dot(losses, fold_sizes[:done]) / fold_sizes[:done].sum()), step=k)
            if trial.should_prune():
                raise FoldPruned
            if deadline is not None and time.monotonic() > deadline and best_here:
                raise FoldPruned  # the time budget is spent and a complete trial exists

        losses: list[float] = []
        try:
            result = fit_stacker(name, params, inputs, seed=seed, progress=False, on_fold=on_fold, caches=caches)
        except FoldPruned:
            raise optuna.TrialPruned() from None
        trial.set_user_attr("fold_losses", [float(v) for v in result.fold_scores])
        kept_oof[trial.number] = result.oof[list(LABELS)].to_numpy(dtype=np.float32)
        value = float(result.score.overall)
        if not best_here or value < best_here["value"]:
            best_here.update(value=value, number=trial.number, result=result)
        return value

    with optuna_logging(verbose):
        study = open_study(study_name, storage, seed=seed, pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
        defaults = _DefaultsTrial(stacker.default_params())
        stacker.suggest_params(defaults)
        study.enqueue_trial(defaults.values, skip_if_exists=True)
        remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
        ran = run_trials(study, objective, trials=trials, timeout=remaining, progress=progress, desc=f"tune {name}", inputs_key=inputs_key)
        candidates = [t for t in completed_trials(study, inputs_key) if len(t.user_attrs.get("fold_losses", [])) == inputs.n_folds]
        if not candidates:
            raise StackkitError(f"study '{study_name}': no trial of stacker '{name}' completed; see the errors above or rerun with more --trials")
        best = min(candidates, key=lambda t: t.value)
        if best_here and best_here["number"] == best.number:
            result = best_here["result"]
        else:
            result = fit_stacker(name, dict(best.user_attrs["params"]), inputs, seed=seed, progress=progress)
        selected_score = result.score
        honest, fold_trials = _honest_oof(name, inputs, candidates, kept_oof, fold_sizes, seed)
        result.oof = result.oof.copy()
        result.oof[list(LABELS)] = honest
        result.score = weighted_log_loss(inputs.train.Y, honest)
        result.tuning = {"selected_trial": int(best.number), "selected_score": selected_score.as_dict(), "honest_score": result.score.as_dict(),
                         "fold_trials": fold_trials, "oof": "per fold k: the OOF of the trial best on the other folds (honest)"}
        info = StudyInfo(study_name, len(study.get_trials(deepcopy=False)), ran, float(best.value), best.number,
                         study_history(study, inputs_key))
    return TunedStacker(result, selected_score, fold_trials, info)


def _honest_oof(name, inputs, candidates, kept_oof: dict, fold_sizes, seed: int) -> tuple[np.ndarray, list[int]]:
    """(n, 6) OOF whose fold k comes from the trial best on the other folds, and those trials' numbers.

    A chosen trial that ran in another process or an earlier call is refitted on that fold only.
    """
    from stackkit.stack.crossfit import fit_stacker

    chosen = honest_fold_choice(np.array([t.user_attrs["fold_losses"] for t in candidates]), fold_sizes)
    honest = np.empty((len(inputs.train), len(LABELS)), dtype=np.float32)
    for k, position in enumerate(chosen):
        trial = candidates[int(position)]
        rows = inputs.folds == k
        if trial.number in kept_oof:  # ran in this call: every fold's OOF is in memory
            honest[rows] = kept_oof[trial.number][rows]
        else:
            refit = fit_stacker(name, dict(trial.user_attrs["params"]), inputs, seed=seed, progress=False, folds=[k], predict_test=False)
            honest[rows] = refit.oof[list(LABELS)].to_numpy(dtype=np.float32)[rows]
    return honest, [int(candidates[int(p)].number) for p in chosen]


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


def search_blend(preds: np.ndarray, y: np.ndarray, source_names: list[str], *, per_label: bool, any_consistency: bool,
                 trials: int, timeout: float | None = None, seed: int = 0, storage=None, study_name: str | None = None,
                 progress: bool = False, verbose: bool = False) -> tuple[BlendParams, StudyInfo | None]:
    """The blend-fitting procedure used both in-sample and inside every CV fold.

    1. ``fit_blend``: L-BFGS weights and temperatures, grid clip (deterministic).
    2. ``trials`` Optuna trials over weights/temperature/clip, started from equal weights and from
       step 1's solution (enqueued). In a persistent ``storage`` the study continues across runs.
    Returns the best in-sample candidate among step 1, equal weights (logit mean and linear pool) and
    the matching trials.
    """
    import optuna

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

    with optuna_logging(verbose):
        if storage is None:
            study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
        else:
            study = open_study(study_name, storage, seed=seed)
        for start in (fitted, equal):
            study.enqueue_trial(blend_as_trial_params(start, source_names, per_label=per_label), skip_if_exists=True)
        ran = run_trials(study, objective, trials=trials, timeout=timeout, progress=progress, desc="tune blend", inputs_key=inputs_key)
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
