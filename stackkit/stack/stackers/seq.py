"""Sequence stacker: each whole study is one sequence of slices ordered by ``slice_index``.

Per-slice standardized features -> linear projection -> 1-D convolution along the slices ->
bidirectional GRU (packed, so padding never enters the recurrence) -> six logits per slice.
Studies are padded to the longest one in a batch; the loss is masked to real slices.
Training reverses half of the studies (a study read bottom-up is as valid as top-down) and
prediction averages the forward and the reversed study (test-time augmentation); early stopping
scores that average. A reversed study is what the same study looks like stored the other way
round: its rows in the opposite order *and* its direction-dependent features swapped (lags with
leads, the z gaps, index with reverse index, position -> 1 - position), from the feature names
(:func:`features.build.reversal_map`). Without feature names only the row order is reversed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stackkit.contract import LABELS
from stackkit.errors import StackkitError
from stackkit.stack.inputs import StackData
from stackkit.stack.stackers.base import default_threads
from stackkit.stack.stackers.neural import NeuralStacker, to_device


def _seq_module(n_inputs: int, params: dict):
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    hidden = int(params["hidden"])
    kernel = int(params["kernel_size"])

    class StudySequenceNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.project = nn.Linear(n_inputs, hidden)
            self.conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
            self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
            self.dropout = nn.Dropout(float(params["dropout"]))
            self.head = nn.Linear(3 * hidden, 6)

        def forward(self, x, lengths, mask):
            keep = mask.unsqueeze(-1).to(x.dtype)
            projected = torch.relu(self.project(x)) * keep
            # zeroed padding acts as the convolution's zero padding at the study's end
            local = torch.relu(self.conv(projected.transpose(1, 2))).transpose(1, 2) * keep
            packed = pack_padded_sequence(local, lengths, batch_first=True, enforce_sorted=False)
            context, _ = self.gru(packed)
            context, _ = pad_packed_sequence(context, batch_first=True, total_length=x.shape[1])
            return self.head(self.dropout(torch.cat([local, context], dim=-1)))

    return StudySequenceNet()


def study_layout(study_codes: np.ndarray, slice_index: np.ndarray):
    """Per row: its study number (0..S-1) and position in the study; per study: its length.

    Rows need not be sorted; positions follow ``slice_index`` order within each study.
    """
    order = np.lexsort((np.asarray(slice_index), np.asarray(study_codes)))
    codes_sorted = np.asarray(study_codes)[order]
    _, starts, lengths = np.unique(codes_sorted, return_index=True, return_counts=True)
    study_sorted = np.repeat(np.arange(len(lengths)), lengths)
    row_study = np.empty(len(order), dtype=np.int64)
    row_position = np.empty(len(order), dtype=np.int64)
    row_study[order] = study_sorted
    row_position[order] = np.arange(len(order)) - starts[study_sorted]
    return row_study, row_position, lengths.astype(np.int64)


SEQUENCE_INPUTS = ("all", "slice")


def slice_feature_columns(feature_names) -> np.ndarray:
    """Column positions of the features of the slice itself: every model's prediction, the
    across-model aggregates and every column that belongs to no label (position, z gaps, DICOM
    metadata). Lags, leads, their differences, rolling means and study aggregates are left out:
    a model that reads the whole study in order computes those itself.
    """
    from features.columns import MODELS_PREFIX

    keep = []
    for position, name in enumerate(feature_names):
        parts = str(name).split("__")
        if len(parts) != 3 or parts[1] not in LABELS or parts[0] == MODELS_PREFIX or parts[2] == "pred":
            keep.append(position)
    return np.asarray(keep, dtype=np.int64)


class SequenceStacker(NeuralStacker):
    """Shared by the stackers that see whole studies: the reversal of a study's features, and the
    columns they read (``inputs``: ``all`` features, or the ``slice``'s own, see
    :func:`slice_feature_columns`)."""

    def __init__(self):
        super().__init__()
        self.reversal: tuple[np.ndarray, np.ndarray] | None = None
        self.columns: np.ndarray | None = None  # positions read from the features; None = all

    def _fit(self, train, valid, X_train, Y_train, X_valid, Y_valid, params, seed) -> None:
        inputs = params.get("inputs", "all")
        if inputs not in SEQUENCE_INPUTS:
            raise StackkitError(f"stacker '{self.name}': inputs must be one of {', '.join(SEQUENCE_INPUTS)}, got {inputs!r}")
        self.columns = None if inputs == "all" or train.feature_names is None else slice_feature_columns(train.feature_names)
        super()._fit(train, valid, self._columns(X_train), Y_train, self._columns(X_valid), Y_valid, params, seed)

    def _predict(self, data, X) -> np.ndarray:
        return super()._predict(data, self._columns(X))

    def _columns(self, X: np.ndarray) -> np.ndarray:
        return X if self.columns is None else X[:, self.columns]

    def _fit_inputs(self, train: StackData, X_train: np.ndarray, params: dict) -> None:
        n = X_train.shape[1]
        if train.feature_names is None:
            self.reversal = (np.arange(n, dtype=np.int64), np.zeros(n, dtype=bool))
        else:
            from features.columns import reversal_map

            names = np.asarray(train.feature_names, dtype=object)
            self.reversal = reversal_map(names if self.columns is None else names[self.columns])

    def _reversed_features(self, X: np.ndarray) -> np.ndarray:
        from features.columns import reverse_features

        return reverse_features(X, *self.reversal)

    def _state(self) -> dict:
        source, complement = self.reversal
        state = {**super()._state(), "reversal_source": source.tolist(), "reversal_complement": np.flatnonzero(complement).tolist()}
        if self.columns is not None:
            state["columns"] = self.columns.tolist()
        return state

    def _load_models(self, directory: Path, state: dict) -> None:
        if "reversal_source" not in state:
            raise StackkitError(f"{directory}: a '{self.name}' model saved without its study reversal (an older stackkit); refit with `stack fit`")
        source = np.asarray(state["reversal_source"], dtype=np.int64)
        complement = np.zeros(len(source), dtype=bool)
        complement[np.asarray(state["reversal_complement"], dtype=np.int64)] = True
        self.reversal = (source, complement)
        self.columns = np.asarray(state["columns"], dtype=np.int64) if "columns" in state else None
        super()._load_models(directory, state)


class SeqStacker(SequenceStacker):
    name = "seq"

    def default_params(self) -> dict:
        return {
            "hidden": 32,
            "kernel_size": 3,
            "dropout": 0.1,
            # 64 studies per batch at 6e-3: 2.5x faster per fit than 16 at 3e-3 on 2 CPU cores, and blended
            # with lgbm better on held-out labels (bench_defaults, persistent seed 0: 0.0420 against 0.0427)
            "lr": 6e-3,
            "weight_decay": 1e-4,
            "batch_size": 64,  # studies per batch
            "max_epochs": 40,
            "patience": 5,
            "inputs": "all",  # or "slice": each slice's own features only (see slice_feature_columns)
            "device": "cpu",  # stack fit --device cuda puts it on a GPU
            "num_threads": default_threads(),
        }

    def suggest_params(self, trial) -> dict:
        params = self.default_params()
        params.update(
            hidden=trial.suggest_categorical("hidden", [16, 32, 64]),
            kernel_size=trial.suggest_categorical("kernel_size", [3, 5]),
            dropout=trial.suggest_float("dropout", 0.0, 0.4),
            lr=trial.suggest_float("lr", 5e-4, 1e-2, log=True),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        )
        return params

    def _build_module(self, n_inputs, params):
        return _seq_module(n_inputs, params)

    def _prepare(self, X, data, Y):
        import torch

        Z = self._standardize(X)
        row_study, row_position, lengths = study_layout(data.study_codes, data.slice_index)
        reversed_position = lengths[row_study] - 1 - row_position
        shape = (len(lengths), int(lengths.max()) if len(lengths) else 0)
        forward = np.zeros((*shape, Z.shape[1]), dtype=np.float32)
        backward = np.zeros_like(forward)
        forward[row_study, row_position] = Z
        backward[row_study, reversed_position] = self._standardize(self._reversed_features(X))
        prepared = {
            "forward": torch.from_numpy(forward),
            "backward": torch.from_numpy(backward),
            "lengths": torch.from_numpy(lengths),
            "row_study": torch.from_numpy(row_study),
            "row_position": torch.from_numpy(row_position),
            "reversed_position": torch.from_numpy(reversed_position),
        }
        if Y is not None:
            targets_forward = np.zeros((*shape, 6), dtype=np.float32)
            targets_backward = np.zeros_like(targets_forward)
            targets_forward[row_study, row_position] = Y
            targets_backward[row_study, reversed_position] = Y
            prepared["targets_forward"] = torch.from_numpy(targets_forward)
            prepared["targets_backward"] = torch.from_numpy(targets_backward)
        return prepared

    def _to_device(self, prepared, device):
        # the lengths stay on the CPU: pack_padded_sequence takes them there
        return {key: value if key == "lengths" else to_device(value, device) for key, value in prepared.items()}

    @staticmethod
    def _batch_mask(lengths, width, device):
        import torch

        return torch.arange(width, device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)

    def _train_batches(self, module, prepared, params, generator):
        import torch

        lengths_all = prepared["lengths"]
        device = prepared["forward"].device
        order = torch.randperm(len(lengths_all), generator=generator)
        flip_all = torch.rand(len(lengths_all), generator=generator) < 0.5
        for studies in torch.split(order, int(params["batch_size"])):
            lengths = lengths_all[studies]
            width = int(lengths.max())
            flip = flip_all[studies].view(-1, 1, 1).to(device)
            on_device = studies.to(device)
            x = torch.where(flip, prepared["backward"][on_device, :width], prepared["forward"][on_device, :width])
            y = torch.where(flip, prepared["targets_backward"][on_device, :width], prepared["targets_forward"][on_device, :width])
            mask = self._batch_mask(lengths, width, device)
            yield module(x, lengths, mask), y, mask

    def _predict_logits(self, module, prepared, params, tta):
        import torch

        lengths_all = prepared["lengths"]
        device = prepared["forward"].device
        n_studies = len(lengths_all)
        width = int(lengths_all.max())
        logits_forward = torch.zeros((n_studies, width, 6), device=device)
        logits_backward = torch.zeros((n_studies, width, 6), device=device)
        # longer batches at prediction time: no gradients to hold
        step = max(1, 4 * int(params["batch_size"]))
        for start in range(0, n_studies, step):
            studies = torch.arange(start, min(start + step, n_studies))
            lengths = lengths_all[studies]
            w = int(lengths.max())
            mask = self._batch_mask(lengths, w, device)
            studies = studies.to(device)
            logits_forward[studies, :w] = module(prepared["forward"][studies, :w], lengths, mask)
            if tta:
                logits_backward[studies, :w] = module(prepared["backward"][studies, :w], lengths, mask)
        rows_forward = logits_forward[prepared["row_study"], prepared["row_position"]]
        if not tta:
            return rows_forward
        rows_backward = logits_backward[prepared["row_study"], prepared["reversed_position"]]
        # average probabilities, returned as logits so the caller applies one sigmoid
        probability = 0.5 * (torch.sigmoid(rows_forward) + torch.sigmoid(rows_backward))
        return torch.logit(probability, eps=1e-7)
