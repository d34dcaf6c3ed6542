"""Embeddings (contract v2, optional per model): validation, writing and hash-checked reading.

``preds/<model>/embeddings/oof.npy`` is float16 (n_oof, D), row i the embedding of
``oof.parquet``'s row i by the fold model that did not train on that image;
``test_fold<k>.npy`` (one per fold model k) or ``test.npy`` (one embedding per test image) is
float16 (n_test, D) aligned with ``test.parquet``'s rows. ``model.json`` records
``embedding_dim``, the files (``embeddings``) and the sha256 of each (under ``sha256``, keyed by
the path relative to the model folder); :func:`read_model_embeddings` refuses a file whose hash
differs. Arrays are opened memory-mapped and never loaded whole: an RSNA-sized 2048-d file is
3.5 GB per model.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stackkit.contract import PredictionFolder, Workdir, file_sha256
from stackkit.errors import ContractError, StackkitError, one_line

EMBEDDING_DTYPE = np.float16
ACCEPTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
FLOAT16_MAX = float(np.finfo(np.float16).max)
# rows checked / copied per step: bounded memory whatever the file size
CHUNK_BYTES = 64 << 20


def _chunk_rows(dim: int, itemsize: int = 4) -> int:
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def open_npy(path, what: str) -> np.ndarray:
    """A ``.npy`` file memory-mapped read-only (never unpickled); one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise StackkitError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise ContractError(f"{path}: empty file, expected a NumPy .npy {what}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ContractError(f"{path}: not a readable NumPy .npy {what} ({one_line(exc, 120)}); write it with numpy.save") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise ContractError(f"{path}: not a single .npy array (an .npz archive?); write one array with numpy.save")
    return array


def check_embedding_array(array: np.ndarray, source, *, n_rows: int, dim: int | None = None, what: str = "embeddings") -> int:
    """Shape, dtype, row count, one dimension, finite values (and float16 range); returns D."""
    if array.ndim != 2:
        raise ContractError(f"{source}: {what} have shape {array.shape}; expected a 2-D (rows, dimension) array")
    if array.dtype not in ACCEPTED_DTYPES:
        raise ContractError(f"{source}: {what} have dtype {array.dtype}; expected float16 or float32")
    rows, d = map(int, array.shape)
    if d < 1:
        raise ContractError(f"{source}: {what} have dimension 0; expected at least one column")
    if rows != n_rows:
        raise ContractError(f"{source}: {what} have {rows} rows but the prediction file has {n_rows}; row i must embed the prediction file's row i")
    if dim is not None and d != dim:
        raise ContractError(f"{source}: {what} have dimension {d} but the model's other embedding files have {dim}; one model has one dimension")
    step = _chunk_rows(d)
    for start in range(0, rows, step):
        block = np.asarray(array[start : start + step])
        finite = np.isfinite(block)
        if not finite.all():
            row, col = map(int, np.argwhere(~finite)[0])
            raise ContractError(f"{source}: {what} have {block[row, col]} at row {start + row + 1}, column {col + 1}; expected finite numbers")
        if block.dtype != EMBEDDING_DTYPE:
            big = np.abs(block) > FLOAT16_MAX
            if big.any():
                row, col = map(int, np.argwhere(big)[0])
                raise ContractError(
                    f"{source}: {what} have {block[row, col]:.6g} at row {start + row + 1}, column {col + 1}, beyond float16's range "
                    f"(±{FLOAT16_MAX:g}); embeddings are stored as float16: rescale them"
                )
    return d


def write_embeddings(array: np.ndarray, path, rows: np.ndarray | None = None) -> Path:
    """``array[rows]`` (all rows when None) as a float16 ``.npy``, atomically, copied in bounded chunks."""
    from numpy.lib.format import open_memmap

    from stackkit.contract.io import atomic_path

    n = len(array) if rows is None else len(rows)
    dim = int(array.shape[1])
    with atomic_path(path) as tmp:
        out = open_memmap(tmp, mode="w+", dtype=EMBEDDING_DTYPE, shape=(n, dim))
        step = _chunk_rows(dim)
        for start in range(0, n, step):
            stop = min(n, start + step)
            part = array[start:stop] if rows is None else array[np.asarray(rows[start:stop])]
            out[start:stop] = np.asarray(part).astype(EMBEDDING_DTYPE, copy=False)
        out.flush()
        del out
    return Path(path)


def write_embedding_parts(path, n_rows: int, dim: int, parts) -> Path:
    """A float16 ``.npy`` of ``n_rows`` rows assembled from ``parts`` [(array, destination rows)],
    atomically and in bounded chunks; every row must be written exactly once."""
    from numpy.lib.format import open_memmap

    from stackkit.contract.io import atomic_path

    seen = np.zeros(n_rows, dtype=np.int64)
    for array, destination in parts:
        if array.ndim != 2 or array.shape[1] != dim or len(destination) != len(array):
            raise ContractError(f"{path}: a part of shape {array.shape} does not fit {len(destination)} rows of dimension {dim}")
        np.add.at(seen, np.asarray(destination), 1)
    if (seen != 1).any():
        raise ContractError(f"{path}: {int((seen == 0).sum())} rows missing and {int((seen > 1).sum())} written twice; the parts must cover every row once")
    with atomic_path(path) as tmp:
        out = open_memmap(tmp, mode="w+", dtype=EMBEDDING_DTYPE, shape=(n_rows, dim))
        step = _chunk_rows(dim)
        for array, destination in parts:
            destination = np.asarray(destination)
            for start in range(0, len(array), step):
                out[destination[start : start + step]] = np.asarray(array[start : start + step]).astype(EMBEDDING_DTYPE, copy=False)
        out.flush()
        del out
    return Path(path)


def _test_files(folder: PredictionFolder, n_test_files: int) -> list[Path]:
    """``test.npy`` for one test embedding file, ``test_fold<k>.npy`` for one per fold model."""
    return [folder.test_embeddings(None if n_test_files == 1 else k) for k in range(n_test_files)]


def embedding_record(dim: int, n_test_files: int) -> dict:
    """model.json entries for the embedding files of a model folder (their sha256 go with every other file's)."""
    folder = PredictionFolder(Path())  # paths relative to the model folder
    return {"embedding_dim": int(dim), "embeddings": {"oof": folder.oof_embeddings.as_posix(),
                                                      "test": [path.as_posix() for path in _test_files(folder, n_test_files)]}}


@dataclass(frozen=True)
class ModelEmbeddings:
    """One model's embedding files, memory-mapped: ``oof`` (n_oof, D) and ``test`` (one array per
    fold model, or a single one), each float16 and aligned with oof.parquet / test.parquet rows."""

    model: str
    dim: int
    oof: np.ndarray
    test: tuple[np.ndarray, ...]

    @property
    def per_fold_test(self) -> bool:
        return len(self.test) > 1


def _as_json(record) -> dict:
    """A model.json record as written: a ``ModelRecord`` or its JSON object."""
    return record if isinstance(record, dict) else {**record.to_json(), "sha256": record.sha256}


def has_embeddings(record) -> bool:
    record = _as_json(record)
    return record.get("embedding_dim") is not None and isinstance(record.get("embeddings"), dict)


def read_model_embeddings(wd: Workdir, model: str, record: dict, *, n_oof: int, n_test: int, n_folds: int | None = None,
                          check_hashes: bool = True) -> ModelEmbeddings:
    """The files ``record`` (preds/<model>/model.json) lists, hash-checked against it, then memory-mapped."""
    json_path = wd.model_json(model)
    record = _as_json(record)
    try:
        dim = int(record["embedding_dim"])
        oof_rel = str(record["embeddings"]["oof"])
        test_rel = [str(t) for t in record["embeddings"]["test"]]
        hashes = dict(record.get("sha256") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"{json_path}: malformed embeddings record ({one_line(exc, 80)}); re-import or retrain the model") from exc
    if not test_rel or (n_folds is not None and len(test_rel) not in (1, n_folds)):
        raise ContractError(f"{json_path}: lists {len(test_rel)} test embedding files; expected 1 (test.npy) or one per fold ({n_folds})")
    root = wd.preds_dir(model)
    arrays = []
    for rel, rows in [(oof_rel, n_oof)] + [(t, n_test) for t in test_rel]:
        path = root / rel
        if check_hashes:
            expected = hashes.get(rel)
            if not expected:
                raise ContractError(f"{path}: model.json records no sha256 for it; refusing an unverified embedding file: re-import or retrain")
            if not path.is_file():
                raise StackkitError(f"{path}: embedding file not found (model.json lists it); re-import or retrain the model")
            actual = file_sha256(path)
            if actual != expected:
                raise ContractError(
                    f"{path}: sha256 mismatch (file {actual[:12]}..., model.json {str(expected)[:12]}...): the embedding file is "
                    "corrupted or was changed; re-import or retrain the model"
                )
        array = open_npy(path, "embedding file")
        if array.ndim != 2 or array.dtype != EMBEDDING_DTYPE or array.shape != (rows, dim):
            raise ContractError(f"{path}: shape {array.shape} dtype {array.dtype}; model.json expects float16 ({rows}, {dim})")
        arrays.append(array)
    return ModelEmbeddings(model, dim, arrays[0], tuple(arrays[1:]))


def _mmap_of(array):
    base = array
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    handle = getattr(base, "_mmap", None) if base is not None else None
    return handle if isinstance(handle, mmap.mmap) and hasattr(handle, "madvise") else None


def _madvise(array: np.ndarray, advice: str) -> None:
    handle = _mmap_of(array)
    if handle is not None and hasattr(mmap, advice):
        try:
            handle.madvise(getattr(mmap, advice))
        except (OSError, ValueError):
            pass


def advise_random(array: np.ndarray) -> None:
    """Tell the kernel a memory-mapped array is read at scattered rows (no readahead)."""
    _madvise(array, "MADV_RANDOM")


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped array from this process (they stay in the page
    cache): reading a 35 GB set of files once would otherwise count all of it in the process's RSS."""
    _madvise(array, "MADV_DONTNEED")


__all__ = [
    "EMBEDDING_DTYPE",
    "advise_random",
    "ModelEmbeddings",
    "check_embedding_array",
    "embedding_record",
    "has_embeddings",
    "open_npy",
    "read_model_embeddings",
    "release_pages",
    "write_embedding_parts",
    "write_embeddings",
]
