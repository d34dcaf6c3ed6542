"""XGBoost stacker: one ``hist`` booster per label, early stopping on the inner split.

Boosters are cut to their best iteration and saved as UBJSON (``save_raw("ubj")``); loaded from
the verified bytes, after a structural walk (XGBoost's reader can segfault on a cut file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stackkit.errors import StackkitError, one_line
from stackkit.stack.stackers.base import default_threads
from stackkit.stack.stackers.gbdt import PerLabelStacker
from stackkit.stack.stackers.ubjson import UBJSONError, check_ubjson


def _xgboost():
    """The xgboost module, or a one-line error saying which of the two builds to install."""
    try:
        import xgboost
    except ImportError:
        raise StackkitError("XGBoost is not installed: pip install 'stackkit[cpu]' (xgboost-cpu) or 'stackkit[gpu]' (xgboost with CUDA)") from None
    return xgboost


class XGBStacker(PerLabelStacker):
    name = "xgb"

    def default_params(self) -> dict:
        return {
            "eta": 0.08,
            "max_depth": 4,
            "min_child_weight": 1.0,
            "subsample": 0.8,
            "colsample_bytree": 0.8,
            "lambda": 1.0,
            "max_bin": 64,
            "num_boost_round": 300,
            "early_stopping_rounds": 20,
            "feature_subsets": "label",
            "embedding_components": 8,  # per model with embeddings: PCA fitted on the training rows, appended (0: off)
            "device": "cpu",
            "nthread": default_threads(),
        }

    def suggest_params(self, trial) -> dict:
        params = self.default_params()
        params.update(
            eta=trial.suggest_float("eta", 0.02, 0.2, log=True),
            max_depth=trial.suggest_int("max_depth", 2, 7),
            min_child_weight=trial.suggest_float("min_child_weight", 0.5, 20.0, log=True),
            subsample=trial.suggest_float("subsample", 0.5, 1.0),
            colsample_bytree=trial.suggest_float("colsample_bytree", 0.3, 1.0),
            **{"lambda": trial.suggest_float("lambda", 1e-3, 10.0, log=True)},
        )
        return params

    def _fit_label(self, X_train, y_train, X_valid, y_valid, params, seed, label_position, cache):
        xgb = _xgboost()

        booster_params = self._library_params(params)
        booster_params.update(objective="binary:logistic", eval_metric="logloss", tree_method="hist", seed=seed, verbosity=0)
        # quantile sketching is a large share of a fit: one matrix per fold and label serves every trial
        key = ("xgb-matrix", int(params["max_bin"]))
        if cache is not None and key in cache:
            train_matrix, valid_matrix = cache[key]
        else:
            train_matrix = xgb.QuantileDMatrix(X_train, label=y_train, max_bin=int(params["max_bin"]), nthread=int(params["nthread"]))
            valid_matrix = xgb.QuantileDMatrix(X_valid, label=y_valid, ref=train_matrix, max_bin=int(params["max_bin"]), nthread=int(params["nthread"]))
            if cache is not None:
                cache[key] = (train_matrix, valid_matrix)
        booster = xgb.train(
            booster_params,
            train_matrix,
            num_boost_round=int(params["num_boost_round"]),
            evals=[(valid_matrix, "valid")],
            early_stopping_rounds=int(params["early_stopping_rounds"]),
            verbose_eval=False,
        )
        # keep only the trees up to the best iteration so saved and in-memory models agree
        return booster[: booster.best_iteration + 1]

    def _predict_label(self, booster, X) -> np.ndarray:
        xgb = _xgboost()

        if self.params.get("device", "cpu") != "cpu":
            # inplace_predict keeps a CUDA booster from copying the data to the GPU one DMatrix at a time
            return booster.inplace_predict(X)
        return booster.predict(xgb.DMatrix(X, nthread=int(self.params.get("nthread", 2))))

    def _label_gain(self, booster) -> np.ndarray:
        gain = np.zeros(booster.num_features(), dtype=np.float64)
        for key, value in booster.get_score(importance_type="total_gain").items():
            gain[int(key[1:])] = value  # keys are "f<column>"
        return gain

    def _booster_bytes(self, booster) -> bytes:
        return bytes(booster.save_raw("ubj"))

    def _booster_from_bytes(self, raw: bytes, source: Path):
        xgb = _xgboost()

        try:
            check_ubjson(raw)
        except UBJSONError as exc:
            raise StackkitError(f"{source}: incomplete XGBoost model (UBJSON {exc}); refit with `stack fit`") from None
        booster = xgb.Booster()
        try:
            booster.load_model(bytearray(raw))
        except xgb.core.XGBoostError as exc:
            raise StackkitError(f"{source}: not a readable XGBoost model ({one_line(str(exc).split('Stack trace')[0])}); refit with `stack fit`") from exc
        return booster
