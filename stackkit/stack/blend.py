"""Blend math: pure numpy over (n_sources, n_images, 6) probability arrays.

A blend averages in one of two spaces. **Probability space** (the linear pool,
``q = sum_s w[s, l] * p_s[:, l]``, then ``z = logit(q)``) is what equal weights use: log loss is
convex, so the pool never scores worse than the weighted mean of its sources' losses, and
one overconfident source cannot drag it far. Fitted weights average in **logit space**: ``z = sum_s w[s, l] * logit(p_s[:, l])``, then
``p = sigmoid(z / T[l])``, then (optionally) ``any = max(any, max(subtypes))``, then
clipping to ``[c, 1 - c]``. A weighted mean of logits is a weighted geometric mean of odds:
a source that is confidently right is not pulled halfway back to 0.5 by one that is unsure,
which usually gives a lower log loss than averaging probabilities. The temperature ``T``
recalibrates the blend (``T > 1`` softens, ``T < 1`` sharpens); the clip bounds the loss of a
confident miss.

Weights are non-negative and each label's column sums to 1 (``normalize_weights``).
``fit_blend`` finds weights and temperatures by L-BFGS on softmax-parameterized weights with
an analytic gradient (each label's log loss is independent, so per-label weights are fitted
label by label), and the clip by a small grid search. ``cross_validated_blend`` refits it on
the other folds for every fold: the honest estimate of what the fitted blend scores on new data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stackkit.contract import LABEL_WEIGHTS, LABELS
from stackkit.metric import weighted_log_loss

N_LABELS = len(LABELS)
ANY = LABELS.index("any")
SUBTYPES = [i for i in range(N_LABELS) if i != ANY]
# Inputs are clipped to this before the logit (a source that outputs exactly 0 or 1 would give inf).
LOGIT_EPS = 1e-7
DEFAULT_CLIP = 1e-6
CLIP_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2)
TEMPERATURE_BOUNDS = (0.25, 4.0)
SPACES = ("logit", "probability")


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
                space: str = "logit") -> np.ndarray:
    """Blend ``preds`` (n_sources, n, 6) probabilities into (n, 6) probabilities (see module docstring)."""
    preds = np.asarray(preds, dtype=np.float64)
    _check_preds(preds)
    return blend_logits(logit(preds), weights, temperature, clip, any_consistency, space)


def blend_logits(source_logits: np.ndarray, weights, temperature=1.0, clip: float = DEFAULT_CLIP, any_consistency: bool = True,
                 space: str = "logit") -> np.ndarray:
    """:func:`apply_blend` on ``logit(preds)`` computed once (weight searches evaluate many blends of the same sources)."""
    _check_preds(source_logits)
    w = normalize_weights(weights, source_logits.shape[0])
    if not 0.0 <= clip < 0.5:
        raise ValueError(f"clip must be in [0, 0.5), got {clip}")
    if space == "logit":
        z = np.einsum("snl,sl->nl", source_logits, w)
    elif space == "probability":
        z = logit(np.einsum("snl,sl->nl", sigmoid(source_logits), w))
    else:
        raise ValueError(f"blend space must be one of {SPACES}, got {space!r}")
    blended = sigmoid(z / _temperature_vector(temperature))
    if any_consistency:
        enforce_any_consistency(blended, out=blended)
    return np.clip(blended, clip, 1.0 - clip, out=blended)


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
    """A blend: weights (n_sources, 6), per-label temperature, clip, any-consistency, averaging space."""

    weights: np.ndarray
    temperature: np.ndarray = field(default_factory=lambda: np.ones(N_LABELS))
    clip: float = DEFAULT_CLIP
    any_consistency: bool = True
    space: str = "logit"

    def __post_init__(self):
        self.weights = normalize_weights(self.weights)
        self.temperature = _temperature_vector(self.temperature)
        self.clip = float(self.clip)
        if self.space not in SPACES:
            raise ValueError(f"blend space must be one of {SPACES}, got {self.space!r}")

    @classmethod
    def equal(cls, n_sources: int, *, clip: float = DEFAULT_CLIP, any_consistency: bool = True,
              space: str = "probability") -> "BlendParams":
        """Equal weights, no recalibration: the blend that fits nothing (a linear pool by default)."""
        return cls(np.ones((n_sources, N_LABELS)), np.ones(N_LABELS), clip, any_consistency, space)

    def apply(self, preds: np.ndarray) -> np.ndarray:
        return apply_blend(preds, self.weights, self.temperature, self.clip, self.any_consistency, self.space)

    def apply_logits(self, source_logits: np.ndarray) -> np.ndarray:
        return blend_logits(source_logits, self.weights, self.temperature, self.clip, self.any_consistency, self.space)

    @property
    def formula(self) -> str:
        mix = "sum_s w[s,label] * logit(p_s)" if self.space == "logit" else "logit(sum_s w[s,label] * p_s)"
        return f"p = clip(any_consistency(sigmoid({mix} / temperature[label])), clip, 1 - clip)"

    def score(self, preds: np.ndarray, y: np.ndarray):
        return weighted_log_loss(y, self.apply(preds))

    def score_logits(self, source_logits: np.ndarray, y: np.ndarray):
        return weighted_log_loss(y, self.apply_logits(source_logits))

    def to_json(self, source_names: list[str]) -> dict:
        return {
            "weights": {label: {name: float(self.weights[s, l]) for s, name in enumerate(source_names)} for l, label in enumerate(LABELS)},
            "temperature": {label: float(self.temperature[l]) for l, label in enumerate(LABELS)},
            "clip": self.clip,
            "any_consistency": bool(self.any_consistency),
            "space": self.space,
        }

    @classmethod
    def from_json(cls, record: dict, source_names: list[str]) -> "BlendParams":
        """Inverse of :meth:`to_json`; raises KeyError/TypeError/ValueError on a malformed record."""
        weights = np.array([[float(record["weights"][label][name]) for label in LABELS] for name in source_names])
        temperature = np.array([float(record["temperature"][label]) for label in LABELS])
        # records written before the space was recorded all averaged logits
        return cls(weights, temperature, float(record["clip"]), bool(record["any_consistency"]), str(record.get("space", "logit")))


# --- fitting ------------------------------------------------------------------------------------


def _softmax(theta: np.ndarray) -> np.ndarray:
    e = np.exp(theta - theta.max())
    return e / e.sum()


def _fit_label_group(logits: np.ndarray, y: np.ndarray, label_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shared weights and one temperature per label for the labels in ``logits`` (S, n, L).

    Minimizes sum_l label_weights[l] * mean BCE(y[:, l], sigmoid(sum_s w_s x[s, :, l] / T_l))
    over w = softmax(theta) and log T, with the analytic gradient.
    """
    from scipy.optimize import minimize

    n_sources, n, n_group = logits.shape
    lw = label_weights / label_weights.sum()
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])

    def loss_and_grad(params):
        theta, log_t = params[:n_sources], params[n_sources:]
        w = _softmax(theta)
        u = np.einsum("snl,s->nl", logits, w)
        z = u / np.exp(log_t)
        # BCE with logits: softplus(z) - y*z, written to avoid overflow
        bce = np.logaddexp(0.0, z) - y * z
        loss = float((bce.mean(axis=0) * lw).sum())
        residual = (sigmoid(z) - y) * (lw / n)  # dLoss/dz, (n, L)
        grad_u = residual / np.exp(log_t)
        grad_w = np.einsum("snl,nl->s", logits, grad_u)
        grad_theta = w * (grad_w - (w * grad_w).sum())
        grad_log_t = -(residual * z).sum(axis=0)
        return loss, np.concatenate([grad_theta, grad_log_t])

    start = np.zeros(n_sources + n_group)
    bounds = [(None, None)] * n_sources + [(lo, hi)] * n_group
    from threadpoolctl import threadpool_limits

    # the problem is tiny per iteration: multi-threaded BLAS inside L-BFGS-B only adds wake-up latency
    with threadpool_limits(1, user_api="blas"):
        result = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 200})
    return _softmax(result.x[:n_sources]), np.exp(result.x[n_sources:])


def fit_blend(preds: np.ndarray, y: np.ndarray, *, per_label: bool = True, any_consistency: bool = True,
              clip_grid=CLIP_GRID, source_logits: np.ndarray | None = None) -> BlendParams:
    """Weights and temperatures by L-BFGS (per label or shared over labels), then the clip by grid search.

    Deterministic: no random start. The post-steps (any-consistency, clip) are not in the smooth
    objective; the clip is chosen afterwards on the full blend pipeline. ``source_logits``:
    ``logit(preds)`` when the caller has it already.
    """
    y = np.asarray(y, dtype=np.float64)
    x = logit(preds) if source_logits is None else source_logits
    n_sources = x.shape[0]
    weights = np.empty((n_sources, N_LABELS))
    temperature = np.empty(N_LABELS)
    if per_label:
        for l in range(N_LABELS):
            w, t = _fit_label_group(x[:, :, [l]], y[:, [l]], LABEL_WEIGHTS[[l]])
            weights[:, l], temperature[l] = w, t[0]
    else:
        w, t = _fit_label_group(x, y, LABEL_WEIGHTS)
        weights[:] = w[:, None]
        temperature[:] = t
    best = None
    for clip in clip_grid:
        params = BlendParams(weights, temperature, clip, any_consistency)
        score = params.score_logits(x, y).overall
        if best is None or score < best[0] - 1e-12:
            best = (score, params)
    return best[1]


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
