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

from stackkit.stack.blend import (
    CLIP_GRID,
    LABELS,
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


def open_study(study_name: str, storage, *, seed: int = 0):
    """Create or continue ``study_name`` in ``storage`` (minimizing), with a TPE sampler seeded for this call.

    The sampler seed mixes ``seed`` with the number of trials already in the study, so a rerun
    does not redraw the first run's random start-up points yet stays reproducible; when another
    worker has a trial running, the process id is mixed in too (concurrent work is not
    reproducible anyway, and identical draws would be wasted trials).
    """
    import optuna

    try:
        with _storage_errors(study_name):
            study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True)
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


def run_trials(study, objective: Callable, *, trials: int, timeout: float | None, progress: bool, desc: str) -> int:
    """``trials`` more trials (fewer if ``timeout`` seconds pass) with a tqdm bar; returns how many ran here."""
    from tqdm.auto import tqdm

    ran = 0
    with tqdm(total=trials, desc=desc, unit="trial", file=sys.stderr, disable=not progress, leave=False) as bar:

        def on_trial_end(study, trial):
            nonlocal ran
            ran += 1
            bar.update(1)
            with contextlib.suppress(ValueError):  # no completed trial yet
                bar.set_postfix(best=f"{study.best_value:.5f}", refresh=False)

        with _storage_errors(study.study_name):
            study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[on_trial_end], gc_after_trial=False)
    return ran


def completed_trials(study, inputs_key: str | None = None) -> list:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if inputs_key is not None:
        done = [t for t in done if t.user_attrs.get("inputs_key") == inputs_key]
    return done


def study_history(study) -> list[float | None]:
    """Objective value per trial number (None for trials that did not complete): for the report."""
    import optuna

    return [t.value if t.state == optuna.trial.TrialState.COMPLETE else None for t in study.get_trials(deepcopy=False)]


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


def tune_stacker(name: str, inputs, *, storage, study_name: str, trials: int, timeout: float | None, seed: int,
                 inputs_key: str, progress: bool = True, verbose: bool = False):
    """Tune stacker ``name`` on OOF weighted log loss; returns (StackerResult of the best params, StudyInfo).

    The best trial's result is kept in memory when this process ran it; when the best trial
    came from an earlier run or another worker its parameters are refitted here.
    """
    from stackkit.stack.stackers import get_stacker
    from stackkit.stack.crossfit import fit_stacker

    stacker = get_stacker(name)
    best_here: dict = {}

    def objective(trial):
        params = {**stacker.default_params(), **stacker.suggest_params(trial)}
        trial.set_user_attr("inputs_key", inputs_key)
        trial.set_user_attr("params", json.loads(json.dumps(params, default=_json_scalar)))
        result = fit_stacker(name, params, inputs, seed=seed, progress=False)
        value = float(result.score.overall)
        if not best_here or value < best_here["value"]:
            best_here.update(value=value, number=trial.number, result=result)
        return value

    with optuna_logging(verbose):
        study = open_study(study_name, storage, seed=seed)
        ran = run_trials(study, objective, trials=trials, timeout=timeout, progress=progress, desc=f"tune {name}")
        candidates = completed_trials(study, inputs_key)
        if not candidates:
            raise StackkitError(f"study '{study_name}': no trial of stacker '{name}' completed; see the errors above or rerun with more --trials")
        best = min(candidates, key=lambda t: t.value)
        if best_here and best_here["number"] == best.number:
            result = best_here["result"]
        else:
            result = fit_stacker(name, dict(best.user_attrs["params"]), inputs, seed=seed, progress=progress)
        info = StudyInfo(study_name, len(study.get_trials(deepcopy=False)), ran, float(best.value), best.number, study_history(study))
    return result, info


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
        ran = run_trials(study, objective, trials=trials, timeout=timeout, progress=progress, desc="tune blend")
        matching = completed_trials(study, inputs_key)
        for trial in matching:
            params = _blend_from_trial(trial, source_names, per_label=per_label, any_consistency=any_consistency)
            candidates.append((trial.value, params))
        best_value, best = min(candidates, key=lambda c: c[0])
        best_trial = min(matching, key=lambda t: t.value) if matching else None
        info = StudyInfo(study.study_name, len(study.get_trials(deepcopy=False)), ran,
                         None if best_trial is None else float(best_trial.value),
                         None if best_trial is None else best_trial.number, study_history(study))
    return best, info


def _blend_from_trial(trial, source_names, *, per_label: bool, any_consistency: bool) -> BlendParams:
    import optuna

    # replaying suggest_blend on a FixedTrial reads the same parameter names back
    return suggest_blend(optuna.trial.FixedTrial(trial.params), source_names, per_label=per_label, any_consistency=any_consistency)
