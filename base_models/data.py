"""Slice order, neighbor context and the torch Dataset over the pixel cache.

Context layout (documented choice): with ``context = k > 0`` a sample stacks three slices,
``st - k``, ``st``, ``st + k`` (neighbors in z order inside the study, ties by image_id),
neighbor-major: channels are ``[windows of st-k] + [windows of st] + [windows of st+k]``, i.e.
9 channels for 3 windows. Where a neighbor would fall outside the study, the center slice is
repeated in its place. ``context = 0`` gives just the windows of ``st``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackkit.contract import slice_order

MAX_CONTEXT = 2


def context_offsets(context: int) -> tuple[int, ...]:
    if context not in range(MAX_CONTEXT + 1):
        raise ValueError(f"context must be 0..{MAX_CONTEXT}, got {context}")
    return (0,) if context == 0 else (-context, 0, context)


def center_channels(context: int, n_windows: int) -> tuple[int, int] | None:
    """(start, stop) of the center slice's channels in the neighbor-major input; None without context."""
    n_slices = len(context_offsets(context))
    if n_slices == 1:
        return None
    center = n_slices // 2
    return center * n_windows, (center + 1) * n_windows


def slice_positions(metadata: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, position, study_start): rows sorted by (study_id, z, image_id), each row's 0-based
    position in its study, and the sorted index where its study starts."""
    study, _ = pd.factorize(metadata["study_id"].to_numpy(dtype=object), sort=True)
    order = slice_order(study, metadata["z"].to_numpy(dtype=np.float64), metadata["image_id"].to_numpy(dtype=object))
    sorted_study = study[order]
    new_study = np.ones(len(order), dtype=bool)
    new_study[1:] = sorted_study[1:] != sorted_study[:-1]
    start_sorted = np.maximum.accumulate(np.where(new_study, np.arange(len(order)), 0))
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order)) - start_sorted
    study_start = np.empty(len(order), dtype=np.int64)
    study_start[order] = start_sorted
    return order, position, study_start


def neighbor_table(metadata: pd.DataFrame, context: int) -> np.ndarray:
    """(n_rows, n_slices) metadata row numbers of each row's context slices (see module docstring)."""
    offsets = context_offsets(context)
    order, position, study_start = slice_positions(metadata)
    study_size = np.bincount(study_start, minlength=len(order))[study_start]
    rows = np.arange(len(order))
    table = np.empty((len(order), len(offsets)), dtype=np.int64)
    for j, offset in enumerate(offsets):
        target = position + offset
        inside = (target >= 0) & (target < study_size)
        neighbor = order[np.where(inside, study_start + target, 0)] if len(order) else rows
        table[:, j] = np.where(inside, neighbor, rows)
    return table


class SliceDataset:
    """Samples of stacked uint8 channels from the cache; fetched a whole batch at a time.

    ``pixel_rows``: (n_samples, n_slices) cache rows per sample. ``labels``: (n_samples, 6) or
    None. Items are (uint8 tensor (C, H, W), float32 labels (6,)) and a batch fetch returns the
    stacked pair, so the DataLoader does one fancy-index read of the memmap per batch.
    """

    def __init__(self, pixels: np.ndarray, pixel_rows: np.ndarray, labels: np.ndarray | None = None):
        self.pixels = pixels
        # a memmap travels to DataLoader workers as its file name, not as a copy of the data
        self._pixels_path = getattr(pixels, "filename", None)
        self.pixel_rows = np.asarray(pixel_rows, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.pixel_rows)

    def __getitems__(self, indices):
        import torch

        rows = self.pixel_rows[np.asarray(indices, dtype=np.int64)]
        unique, inverse = np.unique(rows, return_inverse=True)
        block = np.asarray(self.pixels[unique])[inverse.reshape(rows.shape)]  # (B, S, W, H, W)
        b, s, c, h, w = block.shape
        x = torch.from_numpy(np.ascontiguousarray(block.reshape(b, s * c, h, w)))
        y = torch.zeros((b, 6)) if self.labels is None else torch.from_numpy(self.labels[np.asarray(indices)])
        return x, y

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._pixels_path is not None:
            state["pixels"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.pixels is None:
            self.pixels = np.load(self._pixels_path, mmap_mode="r")

    def __getitem__(self, index):
        x, y = self.__getitems__([index])
        return x[0], y[0]


def batch_identity(batch):
    """collate_fn for datasets whose ``__getitems__`` already returns a stacked batch."""
    return batch
