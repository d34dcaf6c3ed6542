"""The blend's Optuna search (``stack fit --tune``): weights, temperatures and clip, started from the
fitted blend and equal weights; studies are opened and run as :mod:`stackkit.stack.tune` does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
from stackkit.stack.tune import StudyInfo, completed_trials, digest, open_study, optuna_logging, run_trials, study_history

BLEND_WEIGHT_PREFIX = "w"
CLIP_RANGE = (CLIP_GRID[0], CLIP_GRID[-1])


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
