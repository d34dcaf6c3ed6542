"""The unit stack's blend (issue 19): per target (a group or a predicted derived label), simplex
weights over the stackers, chosen on honest numbers.

A target's sources are (n, k) class probabilities (a binary target: (1 - p, p)). The blend mixes
them in log space, ``z_c = sum_s w_s log p_s,c``, then ``p = softmax(z / T + b)`` (``b_0 = 0``):
for two classes this is stackkit.stack.blend's logit-space mix, and a softmax group stays a
distribution summing to 1. The weights (and with recalibration T and b) minimise the target's
share of the task's metric: each unit weighted by the weight of its true class (divided by the
unit's total weight where the metric averages rows, as rsna2022-cspine does).

As in :func:`stackkit.stack.blend.choose_blend`: every stacker alone (its out-of-fold
predictions) and every recipe (refitted on the other folds for each fold k, scored on fold k) is a
candidate; the lowest recipe that is at least ``MIN_BLEND_GAIN`` below the best single stacker
overall (and, with ``every_fold``, below it on every fold) is kept, else that stacker.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from stackkit.contract.tasks import TaskSchema
from stackkit.errors import StackkitError
from stackkit.stack.blend import MIN_BLEND_GAIN
from stackkit.stack.unit_models import Target, targets

EPS = 1e-7
T_BOUNDS = (0.05, 20.0)
BIAS_BOUND = 10.0
RECIPES = {"weights": False, "weights + temperature+bias": True}
# Unlike RSNA 2019's blend, a recipe need not win on every fold: with a few hundred units a fold holds
# a handful of positives. bench_tasks, tuning seeds: the blend's held-out loss 0.340 / 0.278 (spine /
# abdomen) with the overall gain alone, 0.353 / 0.277 with every fold required too.
EVERY_FOLD = False
BLEND_VERSION = 1


def mix(sources: np.ndarray, weights: np.ndarray, temperature: float = 1.0, bias=None) -> np.ndarray:
    """(n, k) probabilities of (S, n, k) ``sources`` mixed in log space (module docstring)."""
    z = np.einsum("snk,s->nk", np.log(np.clip(sources, EPS, 1.0)), np.asarray(weights, dtype=np.float64)) / temperature
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def weighted_loss(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """sum(w * -log p(true class)) / sum(w)."""
    p_true = np.clip(p[np.arange(len(y)), y], EPS, 1.0)
    return float(np.sum(w * -np.log(p_true)) / np.sum(w))


def _unpack(params: np.ndarray, n_sources: int, k: int, calibrate: bool):
    theta = params[:n_sources]
    w = np.exp(theta - theta.max())
    w /= w.sum()
    if not calibrate:
        return w, 1.0, np.zeros(k)
    return w, float(np.exp(params[n_sources])), np.concatenate([[0.0], params[n_sources + 1:]])


def fit_mix(sources: np.ndarray, y: np.ndarray, w: np.ndarray, calibrate: bool) -> tuple[np.ndarray, float, np.ndarray]:
    """(weights (S,), temperature, bias (k,)) minimising :func:`weighted_loss`; deterministic."""
    from scipy.optimize import minimize

    n_sources, _, k = sources.shape
    if n_sources == 1 and not calibrate:
        return np.ones(1), 1.0, np.zeros(k)
    start = np.zeros(n_sources + (k if calibrate else 0))
    bounds = [(-20.0, 20.0)] * n_sources + ([(np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1]))] + [(-BIAS_BOUND, BIAS_BOUND)] * (k - 1)
                                             if calibrate else [])

    def loss(params):
        weights, temperature, bias = _unpack(params, n_sources, k, calibrate)
        return weighted_loss(mix(sources, weights, temperature, bias), y, w)

    result = minimize(loss, start, method="L-BFGS-B", bounds=bounds, options={"maxiter": 200})
    return _unpack(result.x, n_sources, k, calibrate)


def metric_weights(schema: TaskSchema, labels: pd.DataFrame, target_list: list[Target]) -> dict[str, np.ndarray]:
    """Per target, each unit's weight in the task's metric (the true class's weight; over the
    unit's total weight for a row-averaged metric)."""
    out = {t.name: np.asarray(t.weights, dtype=np.float64)[t.classes_of(labels)] for t in target_list}
    if schema.reduction == "row":
        total = np.sum(list(out.values()), axis=0)
        out = {name: w / total for name, w in out.items()}
    return out


def _per_fold(p: np.ndarray, y: np.ndarray, w: np.ndarray, folds: np.ndarray) -> list[float]:
    return [weighted_loss(p[folds == k], y[folds == k], w[folds == k]) for k in np.unique(folds)]


def _cv_recipe(sources, y, w, folds, calibrate: bool) -> np.ndarray:
    pooled = np.empty(sources.shape[1:])
    for k in np.unique(folds):
        held = folds == k
        weights, t, b = fit_mix(sources[:, ~held], y[~held], w[~held], calibrate)
        pooled[held] = mix(sources[:, held], weights, t, b)
    return pooled


def choose_target_blend(names: list[str], sources: np.ndarray, y: np.ndarray, w: np.ndarray, folds: np.ndarray,
                        min_gain: float = MIN_BLEND_GAIN, every_fold: bool = EVERY_FOLD) -> tuple[dict, np.ndarray]:
    """(the target's blend record, its honest out-of-fold (n, k) probabilities)."""
    candidates = []
    for s, name in enumerate(names):
        candidates.append({"name": name, "kind": "stacker", "pooled": sources[s]})
    if len(names) > 1:
        for recipe, calibrate in RECIPES.items():
            candidates.append({"name": recipe, "kind": "blend", "calibrate": calibrate,
                               "pooled": _cv_recipe(sources, y, w, folds, calibrate)})
    for c in candidates:
        c["cv"] = weighted_loss(c["pooled"], y, w)
        c["per_fold"] = _per_fold(c["pooled"], y, w, folds)
    best_single = min((c for c in candidates if c["kind"] == "stacker"), key=lambda c: c["cv"])
    eligible = [c for c in candidates if c["kind"] == "blend" and c["cv"] <= best_single["cv"] * (1.0 - min_gain)
                and (not every_fold or all(b < s for b, s in zip(c["per_fold"], best_single["per_fold"])))]
    best = min(eligible, key=lambda c: c["cv"]) if eligible else best_single
    if best["kind"] == "blend":
        weights, t, b = fit_mix(sources, y, w, best["calibrate"])
        reason = (f"{best['name']} is >= {min_gain:.1%} below the best single stacker ({best_single['name']}, {best_single['cv']:.5f}) "
                  f"on cross-validation ({best['cv']:.5f})" + (" and below it on every fold" if every_fold else ""))
    else:
        weights, t, b = np.array([float(n == best["name"]) for n in names]), 1.0, np.zeros(sources.shape[2])
        reason = f"the best single stacker ({best['cv']:.5f}); no blend is >= {min_gain:.1%} below it on cross-validation"
    record = {"chosen": best["name"], "reason": reason, "weights": {n: float(v) for n, v in zip(names, weights)},
              "temperature": float(t), "bias": [float(v) for v in b],
              "candidates": [{"name": c["name"], "kind": c["kind"], "cv": c["cv"], "per_fold": c["per_fold"]} for c in candidates]}
    return record, best["pooled"]


def target_sources(target: Target, frames: Mapping[str, pd.DataFrame], names: list[str]) -> np.ndarray:
    """(S, n, k) class probabilities of ``target`` from each stacker's frame (label columns)."""
    out = []
    for name in names:
        values = frames[name][list(target.columns)].to_numpy(np.float64)
        out.append(np.column_stack([1.0 - values[:, 0], values[:, 0]]) if len(target.columns) == 1 else values)
    return np.stack(out)


def apply_unit_blend(schema: TaskSchema, blend: dict, stacker_tests: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The blend record applied to the stackers' predictions (each: unit id + ``schema.labels``):
    unit id + ``schema.labels`` in the first stacker's unit order, softmax groups summing to 1."""
    unit = schema.unit_column
    try:
        names, parts = list(blend["stackers"]), blend["parts"]
    except (KeyError, TypeError) as exc:
        raise StackkitError(f"blend record: no {exc} entry; refit the unit stack") from exc
    absent = [n for n in names if n not in stacker_tests]
    if absent:
        raise StackkitError(f"blend record: stacker {absent[0]!r} has no predictions (given: {', '.join(stacker_tests) or 'none'})")
    ids = stacker_tests[names[0]][unit].astype(str)
    frames = {}
    for name in names:
        frame = stacker_tests[name].assign(**{unit: stacker_tests[name][unit].astype(str)}).set_index(unit)
        if not ids.isin(frame.index).all() or len(frame) != len(ids):
            raise StackkitError(f"stacker {name!r}: its units differ from stacker {names[0]!r}'s")
        frames[name] = frame.loc[ids.to_numpy()]
    out = {}
    for target in targets(schema):
        part = parts.get(target.name)
        if part is None:
            raise StackkitError(f"blend record: no entry for {target.name!r} (task {schema.name!r})")
        weights = np.array([float(part["weights"][n]) for n in names])
        p = mix(target_sources(target, frames, names), weights, float(part["temperature"]), np.asarray(part["bias"], dtype=np.float64))
        out.update(target.as_columns(p))
    frame = pd.DataFrame({c: out[c] for c in schema.labels})
    frame.insert(0, unit, stacker_tests[names[0]][unit].to_numpy())
    return frame
