"""Sequence stacker: each whole study is one sequence of slices ordered by ``slice_index``.

Per-slice standardized features -> linear projection -> 1-D convolution along the slices ->
bidirectional GRU (two one-way GRUs, the reverse one reading each study reversed, so padding never
enters a real slice's state) -> six logits per slice. Only real slices are gathered and projected.
Studies are padded to the longest one in a batch; the loss is masked to real slices.
Training reverses half of the studies (a study read bottom-up is as valid as top-down) and
prediction averages the forward and the reversed study (test-time augmentation); early stopping
scores that average. A reversed study is what the same study looks like stored the other way
round: its rows in the opposite order *and* its direction-dependent features swapped (lags with
leads, the z gaps, index with reverse index, position -> 1 - position), from the feature names
(:func:`stackkit.contract.columns.reversal_map`). Without feature names only the row order is reversed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stackkit.stack.inputs import StackData
from stackkit.stack.stackers.neural import NeuralStacker, to_device


def reversed_slots(lengths, width: int):
    """(studies, width) index: slot t of a study of length L -> slot L-1-t for t < L, padding slots unchanged.

    Gathering a padded batch along the slices with it reads every study from its last slice,
    padding still last; the map is its own inverse."""
    import torch

    slots = torch.arange(width, device=lengths.device).unsqueeze(0)
    last = (lengths - 1).unsqueeze(1)
    return torch.where(slots <= last, last - slots, slots)


def _seq_module(n_inputs: int, params: dict):
    import torch
    from torch import nn

    hidden = int(params["hidden"])
    kernel = int(params["kernel_size"])

    class StudySequenceNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.project = nn.Linear(n_inputs, hidden)
            self.conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
            # a bidirectional GRU as two one-way GRUs over dense padded batches: the reverse one reads each
            # study reversed (padding still last), so padding never enters a real slice's state, as with a
            # packed sequence, but both run torch's dense CPU kernel, ~1.6x faster than the packed one.
            # Created in this order, they draw the same initial weights as nn.GRU(bidirectional=True).
            self.gru = nn.GRU(hidden, hidden, batch_first=True)
            self.gru_reverse = nn.GRU(hidden, hidden, batch_first=True)
            self.dropout = nn.Dropout(float(params["dropout"]))
            self.head = nn.Linear(3 * hidden, 6)

        def forward(self, rows, slots, lengths, mask):
            """``rows``: the batch's real slices' features, one row each; ``slots``: where each sits in the
            flattened (studies, width) batch that ``mask`` shapes. Only real slices are projected."""
            keep = mask.unsqueeze(-1).to(rows.dtype)
            flat = torch.zeros((mask.numel(), hidden), dtype=rows.dtype, device=rows.device)
            # zero padding rows act as the convolution's zero padding at the study's end
            projected = flat.index_copy(0, slots, torch.relu(self.project(rows))).view(*mask.shape, hidden)
            local = torch.relu(self.conv(projected.transpose(1, 2))).transpose(1, 2) * keep
            reverse = reversed_slots(lengths.to(rows.device), mask.shape[1]).unsqueeze(-1).expand(-1, -1, hidden)
            forward_context, _ = self.gru(local)
            backward_context, _ = self.gru_reverse(local.gather(1, reverse))
            context = torch.cat([forward_context, backward_context.gather(1, reverse)], dim=-1) * keep
            return self.head(self.dropout(torch.cat([local, context], dim=-1)))

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            # models saved before the split hold one bidirectional GRU: its reverse weights are gru_reverse's
            for key in [k for k in state_dict if k.startswith(prefix + "gru.") and k.endswith("_reverse")]:
                state_dict[prefix + "gru_reverse." + key[len(prefix + "gru."):-len("_reverse")]] = state_dict.pop(key)
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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


def _with_zero_row(values: np.ndarray) -> np.ndarray:
    """``values`` with one row of zeros appended (where padded positions point)."""
    out = np.empty((len(values) + 1, values.shape[1]), dtype=np.float32)
    out[:-1] = values
    out[-1] = 0.0
    return out


class SequenceStacker(NeuralStacker):
    """Shared by the stackers that see whole studies: the reversal of a study's features."""

    def __init__(self):
        super().__init__()
        self.reversal: tuple[np.ndarray, np.ndarray] | None = None

    def _fit_inputs(self, train: StackData, X_train: np.ndarray, params: dict) -> None:
        n = X_train.shape[1]
        if train.feature_names is None:
            self.reversal = (np.arange(n, dtype=np.int64), np.zeros(n, dtype=bool))
        else:
            from stackkit.contract.columns import reversal_map

            self.reversal = reversal_map(train.feature_names)

    def _reversed_features(self, X: np.ndarray) -> np.ndarray:
        from stackkit.contract.columns import reverse_features

        return reverse_features(X, *self.reversal)

    def _state(self) -> dict:
        source, complement = self.reversal
        return {**super()._state(), "reversal_source": source.tolist(), "reversal_complement": np.flatnonzero(complement).tolist()}

    def _load_models(self, directory: Path, state: dict) -> None:
        if "reversal_source" not in state:
            from stackkit.errors import StackkitError

            raise StackkitError(f"{directory}: a '{self.name}' model saved without its study reversal (an older stackkit); refit with `stack fit`")
        source = np.asarray(state["reversal_source"], dtype=np.int64)
        complement = np.zeros(len(source), dtype=bool)
        complement[np.asarray(state["reversal_complement"], dtype=np.int64)] = True
        self.reversal = (source, complement)
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
            "device": "cpu",  # stack fit --device cuda puts it on a GPU
            # one thread: a GRU over 64 studies is a chain of small sequential ops, which a second
            # thread does not speed up but makes spin-wait (3 epochs of a fold on a busy 2-core
            # machine: 5.8 s with one thread, 104 s with two)
            "num_threads": 1,
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
        """Each row's standardized features, forward and as its study reversed, stored once (a zero row
        last, for the padding); batches gather them by the (study, position) -> row index maps, so
        memory holds two copies of the rows instead of two padded copies of every study."""
        import torch

        row_study, row_position, lengths = study_layout(data.study_codes, data.slice_index)
        reversed_position = lengths[row_study] - 1 - row_position
        n_rows = len(row_study)
        shape = (len(lengths), int(lengths.max()) if len(lengths) else 0)
        forward_rows = np.full(shape, n_rows, dtype=np.int64)
        backward_rows = np.full(shape, n_rows, dtype=np.int64)
        forward_rows[row_study, row_position] = np.arange(n_rows)
        backward_rows[row_study, reversed_position] = np.arange(n_rows)
        prepared = {
            "features": torch.from_numpy(self.scaler.transform(X, pad_rows=1)),
            "reversed": torch.from_numpy(self.scaler.transform(X, pad_rows=1, block_map=self._reversed_features)),
            "forward_rows": torch.from_numpy(forward_rows),
            "backward_rows": torch.from_numpy(backward_rows),
            "lengths": torch.from_numpy(lengths),
            "row_study": torch.from_numpy(row_study),
            "row_position": torch.from_numpy(row_position),
            "reversed_position": torch.from_numpy(reversed_position),
        }
        if Y is not None:
            prepared["targets"] = torch.from_numpy(_with_zero_row(np.asarray(Y, dtype=np.float32)))
        return prepared

    def _to_device(self, prepared, device):
        # the lengths stay on the CPU: each batch's width is read from them
        return {key: value if key == "lengths" else to_device(value, device) for key, value in prepared.items()}

    @staticmethod
    def _batch_mask(lengths, width, device):
        import torch

        return torch.arange(width, device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)

    @staticmethod
    def _batch_rows(prepared, studies, lengths, flip):
        """The batch's real slices as (features, slots in the flattened batch, mask, row of each slot): a study
        read forward takes its rows from the standardized features, a flipped one (read bottom-up) from their
        reversed copy in reversed order. Only real slices are gathered: padding costs no feature copy."""
        import torch

        width = int(lengths.max())
        mask = SeqStacker._batch_mask(lengths, width, studies.device)
        slots = torch.nonzero(mask.flatten()).squeeze(1)
        slot_rows = torch.where(flip.unsqueeze(1), prepared["backward_rows"][studies, :width], prepared["forward_rows"][studies, :width])
        row_of_slot = slot_rows.flatten()[slots]
        flipped = flip[slots // width]
        ids_forward, ids_flipped = row_of_slot[~flipped], row_of_slot[flipped]
        features = prepared["features"]
        rows = torch.empty((len(slots), features.shape[1]), dtype=features.dtype, device=features.device)
        torch.index_select(features, 0, ids_forward, out=rows[: len(ids_forward)])
        torch.index_select(prepared["reversed"], 0, ids_flipped, out=rows[len(ids_forward):])
        return rows, torch.cat([slots[~flipped], slots[flipped]]), mask, slot_rows

    def _train_batches(self, module, prepared, params, generator):
        import torch

        lengths_all = prepared["lengths"]
        device = prepared["features"].device
        order = torch.randperm(len(lengths_all), generator=generator)
        flip_all = torch.rand(len(lengths_all), generator=generator) < 0.5
        for studies in torch.split(order, int(params["batch_size"])):
            lengths = lengths_all[studies]
            flip = flip_all[studies].to(device)
            rows, slots, mask, slot_rows = self._batch_rows(prepared, studies.to(device), lengths, flip)
            # a flipped study is read bottom-up: its targets in reversed order too
            yield module(rows, slots, lengths, mask), prepared["targets"][slot_rows], mask

    def _predict_logits(self, module, prepared, params, tta):
        import torch

        lengths_all = prepared["lengths"]
        device = prepared["features"].device
        n_studies = len(lengths_all)
        width = int(lengths_all.max())
        logits_forward = torch.zeros((n_studies, width, 6), device=device)
        logits_backward = torch.zeros((n_studies, width, 6), device=device)
        # longer batches at prediction time: no gradients to hold
        step = max(1, 4 * int(params["batch_size"]))
        for start in range(0, n_studies, step):
            studies = torch.arange(start, min(start + step, n_studies), device=device)
            lengths = lengths_all[studies.cpu()]
            w = int(lengths.max())
            for flipped, logits in ((False, logits_forward), (True, logits_backward)):
                if flipped and not tta:
                    continue
                flip = torch.full((len(studies),), flipped, device=device)
                rows, slots, mask, _ = self._batch_rows(prepared, studies, lengths, flip)
                logits[studies, :w] = module(rows, slots, lengths, mask)
        rows_forward = logits_forward[prepared["row_study"], prepared["row_position"]]
        if not tta:
            return rows_forward
        rows_backward = logits_backward[prepared["row_study"], prepared["reversed_position"]]
        # average probabilities, returned as logits so the caller applies one sigmoid
        probability = 0.5 * (torch.sigmoid(rows_forward) + torch.sigmoid(rows_backward))
        return torch.logit(probability, eps=1e-7)
