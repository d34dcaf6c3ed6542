"""The RSNA 2019 weighted multi-label log loss.

Per image, binary cross-entropy of each label with weight 2 for ``any`` and 1 for the other
five; the score is sum(w * bce) / sum(w) over all (image, label) pairs. Probabilities are
clipped to [1e-7, 1 - 1e-7] for scoring only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stackkit.contract import LABEL_WEIGHTS, LABELS

EPS = 1e-7


@dataclass(frozen=True)
class Score:
    overall: float
    per_label: dict[str, float]

    def as_dict(self) -> dict:
        return {"overall": self.overall, "per_label": dict(self.per_label)}


def bce_matrix(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Element-wise binary cross-entropy, probabilities clipped to [EPS, 1 - EPS]."""
    y_true = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_prob, dtype=np.float64), EPS, 1.0 - EPS)
    return -(y_true * np.log(p) + (1.0 - y_true) * np.log1p(-p))


def weighted_log_loss(y_true, y_prob, weights: np.ndarray = LABEL_WEIGHTS, labels=LABELS) -> Score:
    """Score an (n_images, 6) array of probabilities against 0/1 labels in LABELS order (or the columns
    ``labels`` with one weight each: a task's slice-level prediction columns)."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    if y_true.shape != y_prob.shape or y_true.ndim != 2 or y_true.shape[1] != len(labels):
        raise ValueError(
            f"expected two (n, {len(labels)}) arrays, got {y_true.shape} and {y_prob.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("cannot score zero images")
    bce = bce_matrix(y_true, y_prob)
    per_label_mean = bce.mean(axis=0)
    overall = float((per_label_mean * weights).sum() / weights.sum())
    return Score(overall, {label: float(v) for label, v in zip(labels, per_label_mean)})


def prior_score(y_true, weights: np.ndarray = LABEL_WEIGHTS, labels=LABELS) -> Score:
    """Score of predicting each label's frequency: the floor any model must beat."""
    y_true = np.asarray(y_true, dtype=np.float64)
    return weighted_log_loss(y_true, np.broadcast_to(y_true.mean(axis=0), y_true.shape), weights, labels)


def weighted_bce(logits, targets, weights, mask=None):
    """The metric as a torch training loss: BCE-with-logits per label, weighted by ``weights``
    (any = 2) and normalized by their sum, averaged over rows; ``mask`` (the rows' leading shape,
    1 = a real slice) drops padding. torch comes with the tensors: nothing is imported here."""
    import torch.nn.functional as F

    per_label = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights
    per_row = per_label.sum(dim=-1) / weights.sum()
    if mask is None:
        return per_row.mean()
    mask = mask.to(per_row.dtype)
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)
