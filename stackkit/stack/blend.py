"""Blend math: pure numpy over (n_sources, n_images, 6) probability arrays.

A blend mixes its sources per label in **logit space**: ``z = sum_s w[s, l] * logit(p_s[:, l])``
with non-negative weights summing to 1, then ``p = sigmoid(z / T[l] + b[l])`` (a temperature and
a bias recalibrate it), then optionally ``any = max(any, max(subtypes))``, then clipping to
``[c, 1 - c]``. A weighted mean of logits is a weighted geometric mean of odds: a source that is
confidently right is not pulled halfway back to 0.5 by one that is unsure. (``space="probability"``,
the linear pool ``logit(sum_s w * p_s)``, is kept for records written by older versions.)

Fitting (:func:`fit_weights`) is convex: with ``a = w / T`` the blend's logit is
``b + sum_s a_s logit(p_s)``, a logistic regression on the sources' logits with ``a >= 0``, solved
per label by L-BFGS-B with the analytic gradient. Without recalibration the weights stay on the
simplex (``T = 1``, ``b = 0``).

The default blend (:func:`choose_blend`) is chosen on honest numbers only: every recipe (with
or without recalibration, any-consistency and a fitted clip) is refitted on the other folds for
each fold k and scored on fold k; every single source's out-of-fold score is a candidate too.
The lowest blend that beats the best single source on every fold and by ``MIN_BLEND_GAIN``
overall is kept, else that source: the kept blend is never worse on CV than its best source, and
each post-processing step stays only where the per-fold refit says it helps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from stackkit.contract import LABEL_WEIGHTS, LABELS
from stackkit.contract.records.blend import SPACES  # blend.json's `space`: the contract's
from stackkit.metric import weighted_log_loss

N_LABELS = len(LABELS)
ANY = LABELS.index("any")
SUBTYPES = [i for i in range(N_LABELS) if i != ANY]
# Inputs are clipped to this before the logit (a source that outputs exactly 0 or 1 would give inf).
LOGIT_EPS = 1e-7
DEFAULT_CLIP = 1e-6
# The metric clips at 1e-7 itself: a blend clip this small changes nothing.
NO_CLIP = 1e-7
CLIP_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2)
TEMPERATURE_BOUNDS = (0.25, 4.0)


def logit(p: np.ndarray, eps: float = LOGIT_EPS) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    # 0.5 * (1 + tanh(z / 2)) is the overflow-free form of 1 / (1 + exp(-z))
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def normalize_weights(weights, n_sources: int | None = None) -> np.ndarray:
    """(n_sources, 6) non-negative weights, each label's column summing to 1.

    Accepts (n_sources,) shared weights (broadcast to every label). Negative or non-finite
    weights are refused; a column that is all zero becomes equal weights.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = np.repeat(w[:, None], N_LABELS, axis=1)
    if w.ndim != 2 or w.shape[1] != N_LABELS or (n_sources is not None and w.shape[0] != n_sources):
        raise ValueError(f"weights must have shape ({n_sources or 'n_sources'}, {N_LABELS}) or ({n_sources or 'n_sources'},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("blend weights must be finite and non-negative")
    total = w.sum(axis=0, keepdims=True)
    equal = np.full_like(w, 1.0 / len(w))
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), equal)


def _temperature_vector(temperature) -> np.ndarray:
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (N_LABELS,)).copy()
    if not np.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    return t


def apply_blend(preds: np.ndarray, weights, temperature=1.0, clip: float = DEFAULT_CLIP, any_consistency: bool = True,
                space: str = "logit", bias=0.0) -> np.ndarray:
    """Blend ``preds`` (n_sources, n, 6) probabilities into (n, 6) probabilities (see module docstring)."""
    preds = np.asarray(preds, dtype=np.float64)
    _check_preds(preds)
    return blend_logits(logit(preds), weights, temperature, clip, any_consistency, space, bias)


def blend_logits(source_logits: np.ndarray, weights, temperature=1.0, clip: float = DEFAULT_CLIP, any_consistency: bool = True,
                 space: str = "logit", bias=0.0) -> np.ndarray:
    """:func:`apply_blend` on ``logit(preds)`` computed once (weight searches evaluate many blends of the same sources)."""
    _check_preds(source_logits)
    if not 0.0 <= clip < 0.5:
        raise ValueError(f"clip must be in [0, 0.5), got {clip}")
    blended = sigmoid(mixed_logits(source_logits, weights, space) / _temperature_vector(temperature) + _bias_vector(bias))
    if any_consistency:
        enforce_any_consistency(blended, out=blended)
    return np.clip(blended, clip, 1.0 - clip, out=blended)


def mixed_logits(source_logits: np.ndarray, weights, space: str = "logit") -> np.ndarray:
    """(n, 6) logit of the weighted mix, before recalibration and post-processing."""
    w = normalize_weights(weights, source_logits.shape[0])
    if space == "logit":
        return np.einsum("snl,sl->nl", source_logits, w)
    if space == "probability":
        return logit(np.einsum("snl,sl->nl", sigmoid(source_logits), w))
    raise ValueError(f"blend space must be one of {SPACES}, got {space!r}")


def _bias_vector(bias) -> np.ndarray:
    b = np.broadcast_to(np.asarray(bias, dtype=np.float64), (N_LABELS,)).copy()
    if not np.isfinite(b).all():
        raise ValueError(f"bias must be finite, got {bias!r}")
    return b


def _check_preds(preds: np.ndarray) -> None:
    if preds.ndim != 3 or preds.shape[2] != N_LABELS:
        raise ValueError(f"preds must have shape (n_sources, n, {N_LABELS}), got {preds.shape}")


def enforce_any_consistency(p: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``any >= max(subtypes)`` row by row: a slice with a subtype has, by definition, some hemorrhage."""
    result = p if out is not None and out is p else np.array(p, dtype=np.float64, copy=True)
    result[:, ANY] = np.maximum(result[:, ANY], result[:, SUBTYPES].max(axis=1))
    return result


@dataclass
class BlendParams:
    """A blend: weights (n_sources, 6), per-label temperature and bias, clip, any-consistency, averaging space."""

    weights: np.ndarray
    temperature: np.ndarray = field(default_factory=lambda: np.ones(N_LABELS))
    clip: float = DEFAULT_CLIP
    any_consistency: bool = True
    space: str = "logit"
    bias: np.ndarray = field(default_factory=lambda: np.zeros(N_LABELS))

    def __post_init__(self):
        self.weights = normalize_weights(self.weights)
        self.temperature = _temperature_vector(self.temperature)
        self.bias = _bias_vector(self.bias)
        self.clip = float(self.clip)
        if not 0.0 <= self.clip < 0.5:
            raise ValueError(f"clip must be in [0, 0.5), got {self.clip}")
        if self.space not in SPACES:
            raise ValueError(f"blend space must be one of {SPACES}, got {self.space!r}")

    @classmethod
    def equal(cls, n_sources: int, *, clip: float = DEFAULT_CLIP, any_consistency: bool = True,
              space: str = "probability") -> "BlendParams":
        """Equal weights, no recalibration: the blend that fits nothing (a linear pool by default)."""
        return cls(np.ones((n_sources, N_LABELS)), np.ones(N_LABELS), clip, any_consistency, space)

    @classmethod
    def single(cls, n_sources: int, source: int) -> "BlendParams":
        """One source as it is: weight 1, no recalibration, no post-processing (``NO_CLIP`` is the metric's own clip)."""
        weights = np.zeros((n_sources, N_LABELS))
        weights[source] = 1.0
        return cls(weights, np.ones(N_LABELS), NO_CLIP, False, "logit")

    def apply(self, preds: np.ndarray) -> np.ndarray:
        return apply_blend(preds, self.weights, self.temperature, self.clip, self.any_consistency, self.space, self.bias)

    def apply_logits(self, source_logits: np.ndarray) -> np.ndarray:
        return blend_logits(source_logits, self.weights, self.temperature, self.clip, self.any_consistency, self.space, self.bias)

    @property
    def formula(self) -> str:
        mix = "sum_s w[s,label] * logit(p_s)" if self.space == "logit" else "logit(sum_s w[s,label] * p_s)"
        return f"p = clip(any_consistency(sigmoid({mix} / temperature[label] + bias[label])), clip, 1 - clip)"

    def score(self, preds: np.ndarray, y: np.ndarray):
        return weighted_log_loss(y, self.apply(preds))

    def score_logits(self, source_logits: np.ndarray, y: np.ndarray):
        return weighted_log_loss(y, self.apply_logits(source_logits))

    def to_json(self, source_names: list[str]) -> dict:
        return {
            "weights": {label: {name: float(self.weights[s, l]) for s, name in enumerate(source_names)} for l, label in enumerate(LABELS)},
            "temperature": {label: float(self.temperature[l]) for l, label in enumerate(LABELS)},
            "bias": {label: float(self.bias[l]) for l, label in enumerate(LABELS)},
            "clip": self.clip,
            "any_consistency": bool(self.any_consistency),
            "space": self.space,
        }

    @classmethod
    def from_json(cls, record: dict, source_names: list[str]) -> "BlendParams":
        """Inverse of :meth:`to_json`; raises KeyError/TypeError/ValueError on a malformed record."""
        weights = np.array([[float(record["weights"][label][name]) for label in LABELS] for name in source_names])
        temperature = np.array([float(record["temperature"][label]) for label in LABELS])
        # records of older versions: no bias; written before the space was recorded, all averaged logits
        bias = np.array([float(record["bias"][label]) for label in LABELS]) if "bias" in record else np.zeros(N_LABELS)
        return cls(weights, temperature, float(record["clip"]), bool(record["any_consistency"]), str(record.get("space", "logit")), bias)


# --- fitting ------------------------------------------------------------------------------------

# Wider than the Optuna search range: the solver may need a strong recalibration of a mix of
# overconfident sources, and the loss itself keeps it from running off.
FIT_TEMPERATURE_BOUNDS = (0.05, 20.0)
# A blend is kept only if its cross-validated loss is this much (relative) below the best single
# source's AND it is below that source on every fold: smaller or uneven gains are within the noise
# of choosing among a dozen candidates. bench_stack seed 2 (before per-fold test sets): 0.6% below on
# CV but above on 2 of 5 folds, 2.0% worse on the held-out test; bench_defaults (per-fold test sets,
# tuning seeds of two scenarios): the plain lowest-CV rule was never better on held-out labels by
# more than 0.3% and up to 3.6% worse (lgbm blended with the base models).
MIN_BLEND_GAIN = 0.005
BIAS_BOUND = 10.0


def _softmax(theta: np.ndarray) -> np.ndarray:
    e = np.exp(theta - theta.max())
    return e / e.sum()


def _fit_group(logits: np.ndarray, y: np.ndarray, label_weights: np.ndarray, calibrate: bool):
    """Shared simplex weights and, with ``calibrate``, a temperature and a bias per label in ``logits`` (S, n, L).

    Minimizes sum_l lw[l] * mean BCE(y[:, l], sigmoid(sum_s w_s x[s, :, l] / T_l + b_l)). For one
    label this is a logistic regression with non-negative coefficients ``a = w / T`` (convex);
    the softmax / log-temperature parameterization keeps the weights on the simplex.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    n_sources, n, n_group = logits.shape
    lw = label_weights / label_weights.sum()
    lo, hi = np.log(FIT_TEMPERATURE_BOUNDS[0]), np.log(FIT_TEMPERATURE_BOUNDS[1])

    def loss_and_grad(params):
        theta, log_t, bias = params[:n_sources], params[n_sources:n_sources + n_group], params[n_sources + n_group:]
        w = _softmax(theta)
        u = np.einsum("snl,s->nl", logits, w)
        scale = np.exp(-log_t)
        z = u * scale + bias
        bce = np.logaddexp(0.0, z) - y * z  # BCE with logits, overflow-free
        loss = float((bce.mean(axis=0) * lw).sum())
        residual = (sigmoid(z) - y) * (lw / n)  # dLoss/dz, (n, L)
        grad_w = np.einsum("snl,nl->s", logits, residual * scale)
        grad_theta = w * (grad_w - (w * grad_w).sum())
        grad_log_t = -(residual * u * scale).sum(axis=0)
        grad_bias = residual.sum(axis=0)
        return loss, np.concatenate([grad_theta, grad_log_t, grad_bias])

    start = np.zeros(n_sources + 2 * n_group)
    if calibrate:
        bounds = [(None, None)] * n_sources + [(lo, hi)] * n_group + [(-BIAS_BOUND, BIAS_BOUND)] * n_group
    else:
        bounds = [(None, None)] * n_sources + [(0.0, 0.0)] * (2 * n_group)
    # the problem is tiny per iteration: multi-threaded BLAS inside L-BFGS-B only adds wake-up latency
    with threadpool_limits(1, user_api="blas"):
        result = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 300})
    x = result.x
    return _softmax(x[:n_sources]), np.exp(x[n_sources:n_sources + n_group]), x[n_sources + n_group:]


def fit_weights(source_logits: np.ndarray, y: np.ndarray, *, per_label: bool = True, calibrate: bool = True):
    """(weights (S, 6), temperature (6,), bias (6,)) fitted on ``source_logits`` (S, n, 6); deterministic."""
    y = np.asarray(y, dtype=np.float64)
    n_sources = source_logits.shape[0]
    weights, temperature, bias = np.empty((n_sources, N_LABELS)), np.ones(N_LABELS), np.zeros(N_LABELS)
    if per_label:
        for l in range(N_LABELS):
            w, t, b = _fit_group(source_logits[:, :, [l]], y[:, [l]], LABEL_WEIGHTS[[l]], calibrate)
            weights[:, l], temperature[l], bias[l] = w, t[0], b[0]
    else:
        w, temperature, bias = _fit_group(source_logits, y, LABEL_WEIGHTS, calibrate)
        weights[:] = w[:, None]
    return weights, temperature, bias


def best_clip(probabilities: np.ndarray, y: np.ndarray, clip_grid=CLIP_GRID) -> float:
    """The clip of ``clip_grid`` with the lowest loss of ``probabilities`` (already post-processed otherwise)."""
    scores = [weighted_log_loss(y, np.clip(probabilities, c, 1.0 - c)).overall for c in clip_grid]
    return float(clip_grid[int(np.argmin(scores))])


@dataclass(frozen=True)
class Recipe:
    """How a blend is fitted: weights always; recalibration, any-consistency and a fitted clip each on or off."""

    calibrate: bool = True
    any_consistency: bool = True
    fit_clip: bool = True

    @property
    def name(self) -> str:
        steps = ["weights"] + [s for s, on in (("temperature+bias", self.calibrate), ("any-consistency", self.any_consistency),
                                                 ("clip", self.fit_clip)) if on]
        return " + ".join(steps)

    def post(self, probabilities: np.ndarray, y: np.ndarray | None = None, clip: float | None = None):
        """(post-processed probabilities, clip): the clip is fitted on ``y`` when not given."""
        p = enforce_any_consistency(probabilities) if self.any_consistency else probabilities
        if clip is None:
            clip = best_clip(p, y) if self.fit_clip else NO_CLIP
        return np.clip(p, clip, 1.0 - clip), clip


def recipes(*, allow_any_consistency: bool = True) -> list[Recipe]:
    """Every combination of the post-processing steps, simplest first (ties go to the simpler one)."""
    anys = (False, True) if allow_any_consistency else (False,)
    return [Recipe(c, a, f) for c in (False, True) for a in anys for f in (False, True)]


def fit_blend(preds: np.ndarray, y: np.ndarray, *, per_label: bool = True, any_consistency: bool = True,
              calibrate: bool = True, fit_clip: bool = True, source_logits: np.ndarray | None = None) -> BlendParams:
    """A blend fitted on all of ``preds`` by one :class:`Recipe` (weights by the convex solver, then the clip)."""
    y = np.asarray(y, dtype=np.float64)
    x = logit(preds) if source_logits is None else source_logits
    recipe = Recipe(calibrate, any_consistency, fit_clip)
    weights, temperature, bias = fit_weights(x, y, per_label=per_label, calibrate=calibrate)
    raw = sigmoid(mixed_logits(x, weights) / temperature + bias)
    _, clip = recipe.post(raw, y)
    return BlendParams(weights, temperature, clip, any_consistency, "logit", bias)


def cross_validated_blend(preds: np.ndarray, y: np.ndarray, folds: np.ndarray, fit) -> tuple[np.ndarray, list[dict]]:
    """Out-of-fold blended predictions: for each fold k, ``fit(preds_rest, y_rest) -> BlendParams`` on the other folds, applied to fold k.

    Returns the (n, 6) pooled out-of-fold blend and, per fold, its score and fitted parameters.
    """
    preds = np.asarray(preds, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    pooled = np.empty(preds.shape[1:], dtype=np.float64)
    per_fold = []
    for k in np.unique(folds):
        held = folds == k
        params = fit(preds[:, ~held], y[~held])
        pooled[held] = params.apply(preds[:, held])
        per_fold.append({"fold": int(k), "n": int(held.sum()), "score": weighted_log_loss(y[held], pooled[held]).overall, "params": params})
    return pooled, per_fold


def cross_validate_recipes(source_logits: np.ndarray, y: np.ndarray, folds: np.ndarray, recipe_list, *, per_label: bool = True,
                           on_fold=None) -> dict[Recipe, np.ndarray]:
    """Pooled out-of-fold predictions of every recipe: weights refitted on the other folds for each fold k.

    The weights do not depend on the post-processing steps, so they are fitted once per fold and
    recalibration setting; the clip is fitted on the training folds' rows only.
    """
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    pooled = {r: np.empty(y.shape, dtype=np.float64) for r in recipe_list}
    for calibrate in sorted({r.calibrate for r in recipe_list}):
        for k in np.unique(folds):
            held = folds == k
            x_train, y_train = source_logits[:, ~held], y[~held]
            weights, temperature, bias = fit_weights(x_train, y_train, per_label=per_label, calibrate=calibrate)
            raw_train = sigmoid(mixed_logits(x_train, weights) / temperature + bias)
            raw_held = sigmoid(mixed_logits(source_logits[:, held], weights) / temperature + bias)
            for recipe in (r for r in recipe_list if r.calibrate == calibrate):
                _, clip = recipe.post(raw_train, y_train)
                pooled[recipe][held] = recipe.post(raw_held, clip=clip)[0]
            if on_fold is not None:
                on_fold()
    return pooled


@dataclass
class Candidate:
    """One way to turn the sources into submission probabilities, scored out of fold."""

    name: str
    kind: str  # "source" (one source as it is) or "blend" (a recipe refitted per fold)
    cv: object  # metric.Score of the pooled out-of-fold predictions
    per_fold: list[dict]
    recipe: Recipe | None = None
    source: int | None = None
    pooled: np.ndarray | None = None  # (n, 6) out-of-fold predictions; kept for the chosen candidate only
    final_fit: object = None  # for extra blends: final_fit(preds, y) -> BlendParams on all rows

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "cv": self.cv.as_dict(), "per_fold": self.per_fold}


@dataclass
class BlendChoice:
    """The blend kept for submission, its honest scores, and every candidate it was chosen from."""

    params: BlendParams
    chosen: Candidate
    candidates: list[Candidate]
    in_sample: object
    reason: str

    @property
    def cv(self):
        return self.chosen.cv


def _folds_not_below(blend: Candidate, source: Candidate) -> int:
    """How many folds ``blend`` does not score below ``source`` on."""
    return sum(b["overall"] >= s["overall"] for b, s in zip(blend.per_fold, source.per_fold))


def _clearly_better(blend: Candidate, source: Candidate, min_gain: float = MIN_BLEND_GAIN, every_fold: bool = True) -> bool:
    """``blend`` is ``min_gain`` below ``source`` overall and (``every_fold``) below it on every fold."""
    return (not every_fold or _folds_not_below(blend, source) == 0) and blend.cv.overall <= source.cv.overall * (1.0 - min_gain)


def _per_fold(y: np.ndarray, pooled: np.ndarray, folds: np.ndarray) -> list[dict]:
    return [{"fold": int(k), "n": int((folds == k).sum()), "overall": weighted_log_loss(y[folds == k], pooled[folds == k]).overall}
            for k in np.unique(folds)]


@dataclass(frozen=True)
class ChoiceOptions:
    """:func:`choose_blend`'s keywords (see its docstring); ``on_fold()`` is called after each recipe CV fit."""

    per_label: bool = True
    allow_any_consistency: bool = True
    extra_fits: dict | None = None
    on_fold: object = None
    min_gain: float = MIN_BLEND_GAIN
    every_fold: bool = True


def choose_blend(preds: np.ndarray, y: np.ndarray, folds: np.ndarray, source_names: list[str], options: ChoiceOptions | None = None,
                 **fields) -> BlendChoice:
    """The blend or single source kept for submission, chosen on cross-validated scores.

    Candidates: every single source, every recipe and every ``extra_fits`` blend. The lowest
    blend that is below the best single source on every fold and at least MIN_BLEND_GAIN below
    it overall is kept; when there is none, the best single source.

    ``extra_fits``: {name: (cv_fit, final_fit)}, each ``fit(preds, y) -> BlendParams``; ``cv_fit``
    is refitted per fold, ``final_fit`` gives the blend kept when it wins.

    Every candidate is scored on predictions it was not fitted on (a source's OOF file, or a
    blend refitted on the other folds), then the winner is refitted on all rows for submission.
    The keywords are :class:`ChoiceOptions`' fields: pass them, or ``options`` (then ``fields`` override it).
    """
    o = ChoiceOptions(**fields) if options is None else replace(options, **fields)
    per_label = o.per_label
    preds = np.asarray(preds, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    source_logits = logit(preds)
    candidates = [Candidate(name, "source", weighted_log_loss(y, preds[s]), _per_fold(y, preds[s], folds), source=s, pooled=preds[s])
                  for s, name in enumerate(source_names)]
    if len(source_names) > 1:
        recipe_list = recipes(allow_any_consistency=o.allow_any_consistency)
        pooled = cross_validate_recipes(source_logits, y, folds, recipe_list, per_label=per_label, on_fold=o.on_fold)
        candidates += [Candidate(r.name, "blend", weighted_log_loss(y, pooled[r]), _per_fold(y, pooled[r], folds), recipe=r,
                                 pooled=pooled[r]) for r in recipe_list]
        for name, (cv_fit, final_fit) in (o.extra_fits or {}).items():
            extra, _ = cross_validated_blend(preds, y, folds, cv_fit)
            candidates.append(Candidate(name, "blend", weighted_log_loss(y, extra), _per_fold(y, extra, folds),
                                        final_fit=final_fit, pooled=extra))
    best_source = min((c for c in candidates if c.kind == "source"), key=lambda c: c.cv.overall)
    eligible = [c for c in candidates if c.kind == "blend" and _clearly_better(c, best_source, o.min_gain, o.every_fold)]
    # min keeps the first of equal scores: simpler recipes first
    best = min(eligible, key=lambda c: c.cv.overall) if eligible else best_source
    for candidate in candidates:
        if candidate is not best:
            candidate.pooled = None
    if best.kind == "source":
        params = BlendParams.single(len(source_names), best.source)
    elif best.recipe is not None:
        r = best.recipe
        params = fit_blend(preds, y, per_label=per_label, any_consistency=r.any_consistency, calibrate=r.calibrate,
                           fit_clip=r.fit_clip, source_logits=source_logits)
    else:
        params = best.final_fit(preds, y)
    return BlendChoice(params, best, candidates, params.score_logits(source_logits, y), _choice_reason(best, candidates))


def _choice_reason(best: Candidate, candidates: list[Candidate]) -> str:
    """Why ``best`` was kept, in one line for the summary and blend.json."""
    runner_up = min((c for c in candidates if c is not best), key=lambda c: c.cv.overall, default=None)
    lowest = min(candidates, key=lambda c: c.cv.overall)
    if best is lowest:
        reason = f"lowest cross-validated loss of {len(candidates)} candidates ({best.cv.overall:.5f}"
        reason += f"; next: {runner_up.name} {runner_up.cv.overall:.5f})" if runner_up else ")"
    elif best.kind == "blend":
        reason = (f"the lowest blend below the best source on every fold and >= {MIN_BLEND_GAIN:.1%} overall ({best.cv.overall:.5f}); "
                  f"{lowest.name} ({lowest.cv.overall:.5f}) is not")
    else:
        worse_folds = _folds_not_below(lowest, best)
        reason = (f"the best single source ({best.cv.overall:.5f}): the best blend ({lowest.name}, {lowest.cv.overall:.5f}) is "
                  + (f"not below it on {worse_folds} of {len(best.per_fold)} folds" if worse_folds else f"less than {MIN_BLEND_GAIN:.1%} below it")
                  + " on cross-validation")
    return reason
