"""Shallow MLP stacker: standardized per-slice features -> one hidden layer -> six logits.

torch is imported inside the functions: importing ``stackkit.stack.stackers`` stays light.
"""

from __future__ import annotations

import numpy as np

from stackkit.stack.stackers.base import default_threads
from stackkit.stack.stackers.neural import NeuralStacker


def _mlp_module(n_inputs: int, params: dict):
    from torch import nn

    hidden = int(params["hidden"])
    return nn.Sequential(
        nn.Linear(n_inputs, hidden),
        nn.ReLU(),
        nn.Dropout(float(params["dropout"])),
        nn.Linear(hidden, 6),
    )


class MLPStacker(NeuralStacker):
    name = "mlp"

    def default_params(self) -> dict:
        return {
            "hidden": 64,
            "dropout": 0.2,
            "lr": 2e-3,
            "weight_decay": 1e-4,
            "batch_size": 256,
            "max_epochs": 60,
            "patience": 6,
            "device": "cpu",  # stack fit --device cuda puts it on a GPU
            "num_threads": default_threads(),
        }

    def suggest_params(self, trial) -> dict:
        params = self.default_params()
        params.update(
            hidden=trial.suggest_categorical("hidden", [32, 64, 128]),
            dropout=trial.suggest_float("dropout", 0.0, 0.5),
            lr=trial.suggest_float("lr", 3e-4, 1e-2, log=True),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        )
        return params

    def _build_module(self, n_inputs, params):
        return _mlp_module(n_inputs, params)

    def _prepare(self, X, data, Y):
        import torch

        return torch.from_numpy(self._standardize(X)), None if Y is None else torch.from_numpy(np.asarray(Y, dtype=np.float32))

    def _train_batches(self, module, prepared, params, generator):
        import torch

        X, Y = prepared
        order = torch.randperm(len(X), generator=generator)
        for rows in torch.split(order, int(params["batch_size"])):
            yield module(X[rows]), Y[rows], None

    def _predict_logits(self, module, prepared, params, tta):
        return module(prepared[0])
