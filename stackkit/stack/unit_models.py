"""The unit stackers' models (issue 19): one model per target of a study- or patient-level task, on
the unit features of :mod:`features.units`.

A target is a binary group or a predicted derived label (two classes: negative, positive) or a
softmax group (its k classes); it reads the features of the prediction columns that bear on it
(its own, and for a derived label its groups'), plus the unit's own (``unit__*``). Each kind of
model fits ``(x, y, sample_weight)`` and predicts (n, k) probabilities whose rows sum to 1; each is
saved in a safe format (LightGBM text, JSON) and loaded from those bytes alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from features.units import feature_column
from stackkit.contract.tasks import TaskSchema
from stackkit.errors import StackkitError, one_line

PROB_EPS = 1e-6
# stats that are probabilities (or their means): logit-transformed before a linear model
LOGIT_STATS = ("max", "mean", "top3", "top5", "top10pct", "peak_mean", "roll3", "roll5", "maxmax")


@dataclass(frozen=True)
class Target:
    """One model per fold: ``name`` (a group or derived label), its label ``columns`` (one for a
    binary target, the classes of a softmax group), ``weights`` per class (a binary target's
    negative, positive) and the prediction columns whose features it ``reads``."""

    name: str
    columns: tuple[str, ...]
    weights: tuple[float, ...]
    reads: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return 2 if len(self.columns) == 1 else len(self.columns)

    def classes_of(self, labels) -> np.ndarray:
        """The class index per unit of a labels frame (0/1 for a binary target)."""
        if len(self.columns) == 1:
            return labels[self.columns[0]].to_numpy().astype(np.int64)
        return labels[list(self.columns)].to_numpy().argmax(axis=1)

    def as_columns(self, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        """Label column -> probabilities of (n, n_classes) class probabilities."""
        if len(self.columns) == 1:
            return {self.columns[0]: probabilities[:, 1]}
        return dict(zip(self.columns, probabilities.T))


def targets(schema: TaskSchema) -> list[Target]:
    """The schema's targets: every group, then every predicted derived label."""
    available = set(schema.prediction_columns)
    reads = {g.name: tuple(c for c in (g.name,) + g.classes if c in available) for g in schema.groups}
    out = [Target(g.name, g.columns, tuple(g.weights), reads[g.name] or tuple(schema.prediction_columns)) for g in schema.groups]
    for d in (d for d in schema.derived if d.predicted):
        own = (d.name,) if d.name in available else ()
        out.append(Target(d.name, (d.name,), tuple(d.weights), own + sum((reads[m] for m in d.of), ())))
    return out


def target_features(target: Target, features: list[str]) -> list[str]:
    """The feature names ``target`` reads: those of its prediction columns and the unit's own."""
    return [f for f in features if feature_column(f) in target.reads or feature_column(f) is None]


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _as_classes(p: np.ndarray) -> np.ndarray:
    """(n, k) class probabilities of a booster's output ((n,) positive probability for 2 classes)."""
    return np.column_stack([1.0 - p, p]) if p.ndim == 1 else p


class LGBMUnitModel:
    """LightGBM, small regularised trees (hundreds of units, rare positives); the number of rounds
    by early stopping on an inner split of the training rows, then refitted on all of them."""

    name = "lgbm"
    suffix = ".txt"
    # bench_tasks, tuning seeds, 400 patients (200 train units): 3 leaves, 15 units a leaf, 0.03 and 30 % of the
    # features a tree: held-out 0.359 / 0.330 (spine / abdomen) against 0.361 / 0.350 with 4, 5, 0.05 and 50 %
    params = {"learning_rate": 0.03, "num_leaves": 3, "min_data_in_leaf": 15, "feature_fraction": 0.3, "bagging_fraction": 0.8,
              "bagging_freq": 1, "lambda_l2": 2.0, "max_bin": 63, "max_rounds": 1000, "early_stopping_rounds": 50}

    def fit(self, x: np.ndarray, y: np.ndarray, w: np.ndarray, inner: np.ndarray, n_classes: int, seed: int, threads: int):
        import lightgbm as lgb

        p = dict(self.params)
        rounds, patience = p.pop("max_rounds"), p.pop("early_stopping_rounds")
        objective = {"objective": "binary"} if n_classes == 2 else {"objective": "multiclass", "num_class": n_classes}
        params = {**p, **objective, "num_threads": threads, "seed": seed, "deterministic": True, "force_row_wise": True,
                  "verbosity": -1, "feature_pre_filter": False}
        names = [f"f{i}" for i in range(x.shape[1])]
        fit = lgb.Dataset(x[~inner], y[~inner], weight=w[~inner], feature_name=names, params={"verbosity": -1})
        stop = lgb.Dataset(x[inner], y[inner], weight=w[inner], reference=fit)
        probe = lgb.train(params, fit, num_boost_round=rounds, valid_sets=[stop],
                          callbacks=[lgb.early_stopping(patience, verbose=False)])
        # the rounds found on the inner split, scaled to the larger training set of the refit
        n_rounds = max(1, int(round((probe.best_iteration or rounds) * len(x) / max(1, (~inner).sum()))))
        full = lgb.Dataset(x, y, weight=w, feature_name=names, params={"verbosity": -1})
        return lgb.train(params, full, num_boost_round=n_rounds)

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        return _as_classes(model.predict(x))

    def dump(self, model) -> bytes:
        return model.model_to_string().encode("utf-8")

    def load(self, raw: bytes, source: str):
        from stackkit.stack.stackers.lgbm import LGBMStacker

        # the RSNA 2019 stacker's reader: it refuses a cut model text before LightGBM aborts on it
        return LGBMStacker()._booster_from_bytes(raw, source)


class LogRegUnitModel:
    """L2 logistic regression (multinomial for a softmax group) on standardised features, the
    probability-like ones as logits; a different kind of error than the trees' for the blend."""

    name = "logreg"
    suffix = ".json"
    # bench_tasks, tuning seeds: C 0.02 held-out 0.344 / 0.271 (spine / abdomen); 0.01 0.342 / 0.272, 0.05 0.353 / 0.277, 0.2 0.374 / 0.304
    C = 0.02

    def __init__(self, logit_mask: np.ndarray | None = None):
        self.logit_mask = logit_mask

    def _transform(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        p = np.clip(x, PROB_EPS, 1.0 - PROB_EPS)
        return np.where(mask[None, :], np.log(p) - np.log1p(-p), x)

    def fit(self, x: np.ndarray, y: np.ndarray, w: np.ndarray, inner: np.ndarray, n_classes: int, seed: int, threads: int):
        from sklearn.linear_model import LogisticRegression

        mask = np.zeros(x.shape[1], dtype=bool) if self.logit_mask is None else self.logit_mask
        t = self._transform(x.astype(np.float64), mask)
        mean, scale = t.mean(axis=0), t.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        standard = (t - mean) / scale
        present = np.unique(y)
        coef, intercept = np.zeros((n_classes, x.shape[1])), np.zeros(n_classes)
        if len(present) > 1:
            model = LogisticRegression(C=self.C, max_iter=5000, random_state=seed).fit(standard, y, sample_weight=w)
            rows = model.coef_ if len(present) > 2 else np.vstack([np.zeros_like(model.coef_), model.coef_])
            shift = model.intercept_ if len(present) > 2 else np.concatenate([[0.0], model.intercept_])
            coef[present], intercept[present] = rows, shift
        # a class no training unit has (a rare injury in a small fold): about half a unit's worth of probability
        absent = np.setdiff1d(np.arange(n_classes), present)
        if len(absent):
            z = standard @ coef[present].T + intercept[present]
            top = z.max(axis=1, keepdims=True)
            intercept[absent] = np.log(0.5 / len(y)) + float(np.mean(top[:, 0] + np.log(np.exp(z - top).sum(axis=1))))
        return {"mean": mean.tolist(), "scale": scale.tolist(), "logit": mask.tolist(), "coef": coef.tolist(),
                "intercept": intercept.tolist()}

    def predict(self, model: dict, x: np.ndarray) -> np.ndarray:
        t = self._transform(x.astype(np.float64), np.asarray(model["logit"], dtype=bool))
        z = ((t - np.asarray(model["mean"])) / np.asarray(model["scale"])) @ np.asarray(model["coef"]).T + np.asarray(model["intercept"])
        return _softmax_rows(z)

    def dump(self, model: dict) -> bytes:
        return json.dumps(model).encode("utf-8")

    def load(self, raw: bytes, source: str) -> dict:
        try:
            model = json.loads(raw.decode("utf-8"))
            width = len(model["mean"])
            if len(model["scale"]) != width or len(model["logit"]) != width or any(len(r) != width for r in model["coef"]) \
                    or len(model["intercept"]) != len(model["coef"]):
                raise ValueError("inconsistent shapes")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise StackkitError(f"{source}: not a readable logistic-regression model ({one_line(exc)}); refit the unit stack") from exc
        return model


def logit_mask(features: list[str]) -> np.ndarray:
    return np.array([f.rsplit("__", 1)[-1] in LOGIT_STATS for f in features], dtype=bool)


def make_model(name: str, features: list[str]):
    if name == "lgbm":
        return LGBMUnitModel()
    if name == "logreg":
        return LogRegUnitModel(logit_mask(features))
    raise StackkitError(f"unknown unit stacker {name!r}; known: {', '.join(UNIT_STACKERS)}")


UNIT_STACKERS = ("lgbm", "logreg")
