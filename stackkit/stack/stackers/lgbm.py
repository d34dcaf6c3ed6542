"""LightGBM stacker: one booster per label, native API, early stopping on the inner split.

Models are saved as LightGBM text (``booster.model_to_string()``) and loaded from the verified
bytes with ``lgb.Booster(model_str=...)``, never from a path.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from stackkit.errors import StackkitError, one_line
from stackkit.stack.stackers.base import default_threads
from stackkit.stack.stackers.gbdt import PerLabelStacker


class LGBMStacker(PerLabelStacker):
    name = "lgbm"

    def default_params(self) -> dict:
        return {
            "learning_rate": 0.08,
            "num_leaves": 15,
            "min_data_in_leaf": 20,
            # 0.5/0.5/31 measured on bench/bench_stack.py (seed 0, folds 0-1): faster and no worse than 0.8/0.8/63
            "feature_fraction": 0.5,
            "bagging_fraction": 0.5,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            "max_bin": 31,
            "num_boost_round": 300,
            "early_stopping_rounds": 20,
            "feature_subsets": "label",
            "embedding_components": 8,  # per model with embeddings: PCA fitted on the training rows, appended (0: off)
            "num_threads": default_threads(),
        }

    def suggest_params(self, trial) -> dict:
        params = self.default_params()
        params.update(
            learning_rate=trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            num_leaves=trial.suggest_int("num_leaves", 4, 63, log=True),
            min_data_in_leaf=trial.suggest_int("min_data_in_leaf", 5, 100, log=True),
            feature_fraction=trial.suggest_float("feature_fraction", 0.3, 1.0),
            bagging_fraction=trial.suggest_float("bagging_fraction", 0.5, 1.0),
            lambda_l2=trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
        )
        return params

    def _booster_params(self, params: dict, seed: int) -> dict:
        booster_params = self._library_params(params)
        booster_params.update(
            objective="binary",
            metric="binary_logloss",
            verbosity=-1,
            seed=seed,
            deterministic=True,
            force_row_wise=True,  # with deterministic=True: same trees on every run and machine
            feature_pre_filter=False,  # a binned dataset is reused by trials with other min_data_in_leaf
        )
        return booster_params

    def _fit_label(self, X_train, y_train, X_valid, y_valid, params, seed, label_position, cache):
        import lightgbm as lgb

        # binning is a large share of a fit: one binned dataset per fold and label serves every trial
        key = ("lgb-dataset", int(params["max_bin"]))
        if cache is not None and key in cache:
            train_set, valid_set = cache[key]
        else:
            dataset_params = {"max_bin": int(params["max_bin"]), "feature_pre_filter": False, "verbosity": -1}
            train_set = lgb.Dataset(X_train, label=y_train, params=dataset_params, free_raw_data=True)
            valid_set = lgb.Dataset(X_valid, label=y_valid, reference=train_set)
            if cache is not None:
                cache[key] = (train_set, valid_set)
        with warnings.catch_warnings():
            # row subsets of the feature matrix are copies already; the memory warning does not apply
            warnings.filterwarnings("ignore", message="Usage of np.ndarray subset")
            return lgb.train(
                self._booster_params(params, seed),
                train_set,
                num_boost_round=int(params["num_boost_round"]),
                valid_sets=[valid_set],
                callbacks=[lgb.early_stopping(int(params["early_stopping_rounds"]), verbose=False)],
            )

    def _predict_label(self, booster, X) -> np.ndarray:
        return booster.predict(X, num_iteration=booster.best_iteration or None)

    def _label_gain(self, booster) -> np.ndarray:
        return booster.feature_importance(importance_type="gain", iteration=booster.best_iteration or None)

    def _booster_bytes(self, booster) -> bytes:
        # only the trees up to the best iteration: the file predicts exactly what the fit predicted
        return booster.model_to_string(num_iteration=booster.best_iteration or None).encode("utf-8")

    def _booster_from_bytes(self, raw: bytes, source: Path):
        import lightgbm as lgb

        text = raw.decode("utf-8", errors="replace")
        # LightGBM aborts the whole process (C++ Fatal) on a cut model string, even one whose
        # sidecar was regenerated: require the markers a complete model_to_string() writes.
        if not text.startswith("tree\n") or "\nend of trees\n" not in text or "\nend of parameters\n" not in text:
            raise StackkitError(f"{source}: incomplete LightGBM model text (no 'end of trees' / 'end of parameters'); refit with `stack fit`")
        try:
            return lgb.Booster(model_str=text)
        except (lgb.basic.LightGBMError, UnicodeDecodeError) as exc:
            raise StackkitError(f"{source}: not a readable LightGBM model ({one_line(exc)}); refit with `stack fit`") from exc
