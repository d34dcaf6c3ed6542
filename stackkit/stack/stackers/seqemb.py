"""Sequence stackers over whole studies that also read the base models' embeddings.

Two networks share everything but their sequence core (one small base class,
:class:`EmbeddingSequenceStacker`):

* ``seq_emb``: dilated 1-D convolutions + a 2-layer bidirectional GRU (the shape of RSNA 2019's
  1st-place sequence model);
* ``transformer``: a small pre-norm transformer encoder over the slices of a study (padding
  masks; sinusoidal positions from the slice order).

Per slice the input is the standardized study features (as in ``seq``) plus, for every base
model that exported embeddings (contract v2), its embedding standardized with training-row
statistics and projected to a small width (``proj``, e.g. Linear(2048, 32)) before anything
else: ten 2048-d models cost ten small matrices, not a 20,480-wide input. Embeddings are never
loaded whole: each batch of studies reads its rows from the memory-mapped float16 files
(:meth:`~stackkit.stack.inputs.EmbeddingSet.gather`) and casts them to float32.

Training augments with the real reversal of a study (rows reversed, direction features
swapped, see :mod:`.seq`) and random contiguous crops of a study; prediction averages the
forward and reversed passes, and early stopping scores that average. An embedding is only
comparable within one base fold model's space, so test rows (which carry one
:class:`EmbeddingSet` per base fold model) are predicted once per fold model's embeddings and
the probabilities averaged; OOF rows carry one set (each row embedded by the fold model that did
not train on it). With ``use_embeddings=False``, or data without embeddings, the networks run on
the study features alone.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path

import numpy as np

from stackkit.errors import StackkitError
from stackkit.stack.inputs import N_LABELS, StackData
from stackkit.stack.stackers.base import default_threads
from stackkit.stack.stackers.neural import to_device
from stackkit.stack.stackers.seq import SequenceStacker, study_layout

# rows used to estimate each embedding column's mean / std (spread over the studies' slices)
STATS_ROWS = 32768


def _fusion_module(n_inputs: int, dims: tuple[int, ...], params: dict):
    """Per-slice input: features -> hidden, each embedding -> proj, concatenated -> hidden."""
    import torch
    from torch import nn

    hidden, proj = int(params["hidden"]), int(params["proj"])

    class InputFusion(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Linear(n_inputs, hidden)
            self.embeddings = nn.ModuleList([nn.Linear(d, proj) for d in dims])
            for m, d in enumerate(dims):
                self.register_buffer(f"mean{m}", torch.zeros(d))
                self.register_buffer(f"scale{m}", torch.ones(d))
            self.dropout = nn.Dropout(float(params["dropout"]))
            self.fuse = nn.Linear(hidden + proj * len(dims), hidden)

        def forward(self, x, embeddings, flat_index):
            parts = [torch.relu(self.features(x))]
            b, w = x.shape[:2]
            for m, (project, flat) in enumerate(zip(self.embeddings, embeddings)):
                z = (flat - getattr(self, f"mean{m}")) / getattr(self, f"scale{m}")
                projected = self.dropout(torch.relu(project(z)))
                # projected rows scattered into the padded (batch, width) grid; padding stays 0
                grid = projected.new_zeros((b * w, projected.shape[1]))
                grid[flat_index] = projected
                parts.append(grid.view(b, w, -1))
            return torch.relu(self.fuse(torch.cat(parts, dim=-1)))

    return InputFusion()


def _conv_gru_module(n_inputs: int, dims: tuple[int, ...], params: dict):
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    hidden, kernel = int(params["hidden"]), int(params["kernel_size"])
    dilations = tuple(int(d) for d in params["dilations"])

    class ConvGRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inputs = _fusion_module(n_inputs, dims, params)
            self.convs = nn.ModuleList([nn.Conv1d(hidden, hidden, kernel, padding=d * (kernel // 2), dilation=d) for d in dilations])
            self.gru = nn.GRU(hidden, hidden, num_layers=int(params["gru_layers"]), batch_first=True, bidirectional=True,
                              dropout=float(params["dropout"]) if int(params["gru_layers"]) > 1 else 0.0)
            self.dropout = nn.Dropout(float(params["dropout"]))
            self.head = nn.Linear(3 * hidden, N_LABELS)

        def forward(self, x, embeddings, flat_index, lengths, mask):
            keep = mask.unsqueeze(-1).to(x.dtype)
            h = self.inputs(x, embeddings, flat_index) * keep
            for conv in self.convs:
                # residual dilated convolutions; zeroed padding is the convolution's zero padding
                h = h + torch.relu(conv(h.transpose(1, 2))).transpose(1, 2) * keep
            packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            context, _ = self.gru(packed)
            context, _ = pad_packed_sequence(context, batch_first=True, total_length=x.shape[1])
            return self.head(self.dropout(torch.cat([h, context], dim=-1)))

    return ConvGRUNet()


def _transformer_module(n_inputs: int, dims: tuple[int, ...], params: dict):
    import torch
    from torch import nn

    hidden = int(params["hidden"])

    class StudyTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inputs = _fusion_module(n_inputs, dims, params)
            layer = nn.TransformerEncoderLayer(hidden, int(params["heads"]), dim_feedforward=2 * hidden,
                                               dropout=float(params["dropout"]), batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, int(params["layers"]), enable_nested_tensor=False)
            self.norm = nn.LayerNorm(hidden)
            self.dropout = nn.Dropout(float(params["dropout"]))
            self.head = nn.Linear(2 * hidden, N_LABELS)

        @staticmethod
        def positions(width: int, dim: int, device):
            """Sinusoidal encoding of the slice's place in the (cropped, possibly reversed) sequence."""
            t = torch.arange(width, dtype=torch.float32, device=device).unsqueeze(1)
            freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
            table = torch.zeros(width, dim, device=device)
            table[:, 0::2] = torch.sin(t * freq)
            table[:, 1::2] = torch.cos(t * freq[: dim // 2])
            return table

        def forward(self, x, embeddings, flat_index, lengths, mask):
            keep = mask.unsqueeze(-1).to(x.dtype)
            h = self.inputs(x, embeddings, flat_index) * keep
            encoded = self.encoder(h + self.positions(x.shape[1], hidden, x.device), src_key_padding_mask=~mask)
            context = self.norm(encoded) * keep
            return self.head(self.dropout(torch.cat([h, context], dim=-1)))

    return StudyTransformer()


class EmbeddingSequenceStacker(SequenceStacker):
    """Shared by ``seq_emb`` and ``transformer``: embedding statistics, study batches streamed
    from the memory-mapped embeddings, augmentation and the averaged prediction passes."""

    uses_embeddings = True

    def __init__(self):
        super().__init__()
        self.embedding_names: tuple[str, ...] = ()
        self.embedding_dims: tuple[int, ...] = ()
        self._embedding_stats: list[tuple[np.ndarray, np.ndarray]] = []

    def common_params(self) -> dict:
        return {
            "hidden": 32,
            "proj": 32,  # width of each model's embedding projection
            "dropout": 0.1,
            "lr": 4e-3,
            "weight_decay": 1e-4,
            "batch_size": 16,  # studies per batch
            "max_epochs": 30,
            "patience": 5,
            "crop_prob": 0.5,  # share of training studies cut to a random contiguous part
            "min_crop": 0.5,  # shortest crop, as a share of the study's slices
            "use_embeddings": True,
            "device": "cpu",  # stack fit --device cuda puts it on a GPU
            "num_threads": default_threads(),
        }

    def suggest_common(self, trial) -> dict:
        return dict(
            hidden=trial.suggest_categorical("hidden", [32, 64]),
            proj=trial.suggest_categorical("proj", [8, 16, 32, 64]),
            dropout=trial.suggest_float("dropout", 0.0, 0.4),
            lr=trial.suggest_float("lr", 5e-4, 5e-3, log=True),
            weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            crop_prob=trial.suggest_float("crop_prob", 0.0, 0.8),
        )

    # -- inputs
    def _fit_inputs(self, train: StackData, X_train: np.ndarray, params: dict) -> None:
        super()._fit_inputs(train, X_train, params)
        self.embedding_names, self.embedding_dims, self._embedding_stats = (), (), []
        if not params["use_embeddings"] or not train.embeddings:
            return
        if len(train.embeddings) != 1:
            raise StackkitError(f"training data carries {len(train.embeddings)} embedding sets; fit on OOF rows (one set)")
        emb = train.embeddings[0]
        self.embedding_names, self.embedding_dims = tuple(emb.names), emb.dims
        # rows spread evenly over the studies in slice order: the same whatever the row order
        order = np.lexsort((np.asarray(train.slice_index), np.asarray(train.study_codes)))
        sample = order[np.unique(np.linspace(0, len(order) - 1, min(STATS_ROWS, len(order))).astype(np.int64))]
        for m, dim in enumerate(emb.dims):
            total, total_sq = np.zeros(dim), np.zeros(dim)
            for start in range(0, len(sample), 4096):
                values = emb.gather(m, sample[start : start + 4096]).astype(np.float64)
                total += values.sum(axis=0)
                total_sq += np.square(values).sum(axis=0)
            mean = total / len(sample)
            std = np.sqrt(np.maximum(total_sq / len(sample) - mean * mean, 0.0))
            self._embedding_stats.append((mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)))
        emb.release()

    def _check_embeddings(self, data: StackData) -> tuple:
        if not self.embedding_names:
            return ()
        if not data.embeddings:
            raise StackkitError(
                f"stacker '{self.name}' was fitted with the embeddings of {', '.join(self.embedding_names)} but the data has none; "
                "pass the same embeddings (or refit with `stack fit --no-embeddings`)"
            )
        for emb in data.embeddings:
            if tuple(emb.names) != self.embedding_names or emb.dims != self.embedding_dims:
                raise StackkitError(
                    f"stacker '{self.name}' was fitted on embeddings {list(zip(self.embedding_names, self.embedding_dims))} but the "
                    f"data has {list(zip(emb.names, emb.dims))}; refit with `stack fit`"
                )
        return tuple(data.embeddings)

    def _prepare(self, X, data, Y):
        row_study, row_position, lengths = study_layout(data.study_codes, data.slice_index)
        order = np.lexsort((row_position, row_study))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        # raw features kept by reference: a batch standardizes (and reverses) only its own rows,
        # so no (rows, features) copy is made at any scale
        return {
            "X": X,
            "Y": None if Y is None else np.asarray(Y, dtype=np.float32),
            "order": order,
            "starts": starts,
            "lengths": lengths,
            "sets": self._check_embeddings(data),
        }

    def _batch(self, prepared, studies, reverse, crop_start, crop_length, variant: int, device):
        """Tensors of one batch of studies: features (B, W, f), per model the flat (N, D)
        embeddings, the flat grid index of each row, lengths, mask; and the data rows (N,).
        All on ``device`` but the lengths, which pack_padded_sequence takes on the CPU."""
        import torch

        lengths = crop_length
        width = int(lengths.max())
        batch_of = np.repeat(np.arange(len(studies)), lengths)
        step = np.arange(len(batch_of)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        flipped = reverse[batch_of]
        position = crop_start[batch_of] + np.where(flipped, lengths[batch_of] - 1 - step, step)
        rows = prepared["order"][prepared["starts"][studies][batch_of] + position]
        raw = prepared["X"][rows]
        if flipped.any():
            raw[flipped] = self._reversed_features(raw[flipped])
        features = self._standardize(raw)
        x = np.zeros((len(studies), width, features.shape[1]), dtype=np.float32)
        x[batch_of, step] = features
        embeddings = []
        if prepared["sets"]:
            emb = prepared["sets"][variant]
            embeddings = [torch.from_numpy(emb.gather(m, rows)) for m in range(len(emb.names))]
        flat_index = torch.from_numpy(batch_of * width + step)
        lengths_t = torch.from_numpy(lengths.astype(np.int64))
        mask = torch.arange(width).unsqueeze(0) < lengths_t.unsqueeze(1)
        x, embeddings, flat_index, mask = to_device((torch.from_numpy(x), embeddings, flat_index, mask), device)
        return (x, embeddings, flat_index, lengths_t, mask), (batch_of, step, rows)

    def _train_batches(self, module, prepared, params, generator):
        import torch

        lengths_all = prepared["lengths"]
        device = next(module.parameters()).device
        n_studies = len(lengths_all)
        order = torch.randperm(n_studies, generator=generator).numpy()
        reverse_all = (torch.rand(n_studies, generator=generator) < 0.5).numpy()
        crop = (torch.rand(n_studies, generator=generator) < float(params["crop_prob"])).numpy()
        u_length, u_start = torch.rand(n_studies, generator=generator).numpy(), torch.rand(n_studies, generator=generator).numpy()
        shortest = np.maximum(1, np.ceil(float(params["min_crop"]) * lengths_all)).astype(np.int64)
        crop_length = np.where(crop, shortest + np.floor(u_length * (lengths_all - shortest + 1)).astype(np.int64), lengths_all)
        crop_length = np.minimum(crop_length, lengths_all)
        crop_start = np.floor(u_start * (lengths_all - crop_length + 1)).astype(np.int64)
        Y = torch.from_numpy(prepared["Y"])
        for start in range(0, n_studies, int(params["batch_size"])):
            studies = order[start : start + int(params["batch_size"])]
            inputs, (batch_of, step, rows) = self._batch(prepared, studies, reverse_all[studies], crop_start[studies],
                                                         crop_length[studies], 0, device)
            logits = module(*inputs)
            at = to_device((torch.from_numpy(batch_of), torch.from_numpy(step)), device)
            yield logits[at], to_device(Y[torch.from_numpy(rows)], device), None
        self._release(prepared)

    def _predict_logits(self, module, prepared, params, tta):
        import torch

        lengths_all = prepared["lengths"]
        device = next(module.parameters()).device
        n_studies, n_rows = len(lengths_all), len(prepared["X"])
        step_size = max(1, 4 * int(params["batch_size"]))
        variants = range(max(1, len(prepared["sets"])))
        directions = (False, True) if tta else (False,)
        total = torch.zeros((n_rows, N_LABELS), dtype=torch.float64, device=device)
        zeros = np.zeros(n_studies, dtype=np.int64)
        for variant in variants:
            for reverse in directions:
                for start in range(0, n_studies, step_size):
                    studies = np.arange(start, min(start + step_size, n_studies))
                    flags = np.full(len(studies), reverse)
                    inputs, (batch_of, step, rows) = self._batch(prepared, studies, flags, zeros[studies], lengths_all[studies], variant, device)
                    logits = module(*inputs)[to_device((torch.from_numpy(batch_of), torch.from_numpy(step)), device)]
                    total[to_device(torch.from_numpy(rows), device)] += torch.sigmoid(logits.double())
        self._release(prepared)
        probability = total / (len(variants) * len(directions))
        # averaged probabilities, returned as logits so the caller applies one sigmoid
        return torch.logit(probability, eps=1e-7).float()

    @staticmethod
    def _release(prepared) -> None:
        for emb in prepared["sets"]:
            emb.release()

    # -- the module and its persistence
    def _build_module(self, n_inputs, params):
        import torch

        module = self._network(n_inputs, self.embedding_dims, params)
        for m, (mean, scale) in enumerate(self._embedding_stats):
            getattr(module.inputs, f"mean{m}").copy_(torch.from_numpy(mean))
            getattr(module.inputs, f"scale{m}").copy_(torch.from_numpy(scale))
        return module

    @abc.abstractmethod
    def _network(self, n_inputs: int, dims: tuple[int, ...], params: dict):
        """The torch module: (features, embeddings, flat_index, lengths, mask) -> (B, W, 6) logits."""

    def _state(self) -> dict:
        return {**super()._state(), "embedding_names": list(self.embedding_names), "embedding_dims": list(self.embedding_dims)}

    def _load_models(self, directory: Path, state: dict) -> None:
        self.embedding_names = tuple(state.get("embedding_names") or ())
        self.embedding_dims = tuple(int(d) for d in state.get("embedding_dims") or ())
        self._embedding_stats = []  # the module's buffers hold them
        super()._load_models(directory, state)


class SeqEmbStacker(EmbeddingSequenceStacker):
    """Dilated convolutions + 2-layer biGRU over a study's slices, with the base models' embeddings."""

    name = "seq_emb"

    def default_params(self) -> dict:
        return {**self.common_params(), "kernel_size": 3, "dilations": [1, 2, 4], "gru_layers": 2}

    def suggest_params(self, trial) -> dict:
        params = self.default_params()
        params.update(self.suggest_common(trial), kernel_size=trial.suggest_categorical("kernel_size", [3, 5]))
        return params

    def _network(self, n_inputs, dims, params):
        return _conv_gru_module(n_inputs, dims, params)


class TransformerStacker(EmbeddingSequenceStacker):
    """A small transformer encoder over a study's slices, with the base models' embeddings."""

    name = "transformer"

    def default_params(self) -> dict:
        return {**self.common_params(), "heads": 4, "layers": 2}

    def suggest_params(self, trial) -> dict:
        params = self.default_params()
        params.update(self.suggest_common(trial), layers=trial.suggest_int("layers", 1, 3))
        return params

    def _network(self, n_inputs, dims, params):
        return _transformer_module(n_inputs, dims, params)
