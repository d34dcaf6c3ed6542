"""The base models' embeddings (contract v2) as stacker inputs, aligned with the feature rows.

:func:`load_embedding_sets` reads every model's embedding files (hash-checked, memory-mapped,
never loaded whole) and maps each features row to its row in the model's files (embedding
rows follow ``oof.parquet`` / ``test.parquet`` rows, features follow the study order). The
training rows get one :class:`EmbeddingSet` (each OOF row embedded by the fold model that did
not train on it); the test rows get one set per base fold model (``test_fold<k>.npy``), or one
when every model has a single ``test.npy``. A model with a single test file contributes it to
every test set.

:func:`fit_projection` / :func:`project` are a low-dimensional projection of the embeddings for
stackers that want plain columns (GBDTs): PCA per model, fitted on training rows only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stackkit.contract import Workdir
from stackkit.contract.embeddings import has_embeddings, read_model_embeddings
from stackkit.contract.io import read_table
from stackkit.contract.records import read_model_record
from stackkit.errors import ContractError
from stackkit.stack.inputs import EmbeddingSet


def _file_rows(ids_in_file: np.ndarray, wanted: np.ndarray, source: str) -> np.ndarray:
    rows = pd.Index(np.asarray(ids_in_file, dtype=object)).get_indexer(pd.Index(np.asarray(wanted, dtype=object)))
    if (rows < 0).any():
        pos = int(np.argmax(rows < 0))
        raise ContractError(f"{source}: has no row for image_id '{wanted[pos]}' of the features; rerun `stack features`")
    return rows.astype(np.int64)


def load_embedding_sets(wd: Workdir, models, train_ids, test_ids, n_folds: int) -> tuple[tuple[EmbeddingSet, ...], tuple[EmbeddingSet, ...]]:
    """(train sets, test sets) over the ``models`` that have embeddings; ((), ()) when none has."""
    found = []
    for model in models:
        record = read_model_record(wd.model_json(model))
        if record is None or not has_embeddings(record):
            continue
        oof_ids = read_table(wd.oof(model), what="OOF prediction file", columns=["image_id"])["image_id"].astype(str).to_numpy(dtype=object)
        test_file_ids = read_table(wd.test(model), what="test prediction file", columns=["image_id"])["image_id"].astype(str).to_numpy(dtype=object)
        emb = read_model_embeddings(wd, model, record, n_oof=len(oof_ids), n_test=len(test_file_ids), n_folds=n_folds)
        train_rows = _file_rows(oof_ids, train_ids, wd.relative(wd.oof(model)))
        test_rows = _file_rows(test_file_ids, test_ids, wd.relative(wd.test(model)))
        found.append((model, emb, train_rows, test_rows))
    if not found:
        return (), ()
    names = tuple(f[0] for f in found)
    train = EmbeddingSet(names, tuple(f[1].oof for f in found), np.stack([f[2] for f in found], axis=1))
    n_sets = n_folds if any(f[1].per_fold_test for f in found) else 1
    test_rows = np.stack([f[3] for f in found], axis=1)
    test = tuple(
        EmbeddingSet(names, tuple(f[1].test[k] if f[1].per_fold_test else f[1].test[0] for f in found), test_rows)
        for k in range(n_sets)
    )
    return (train,), test


# --- a low-dimensional projection for column-wise stackers -----------------------------------------


def fit_projection(emb: EmbeddingSet, rows: np.ndarray, n_components: int = 8, max_rows: int = 32768, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per model (mean (D,), components (D, c)): PCA fitted on the data rows ``rows`` only
    (a training fold's rows; at most ``max_rows`` of them, drawn with ``seed``)."""
    rows = np.asarray(rows)
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    out = []
    for m in range(len(emb.names)):
        values = emb.gather(m, rows).astype(np.float64)
        mean = values.mean(axis=0)
        values -= mean
        # the covariance's eigenvectors: one (D, D) product and eigh, cheaper than an SVD of the rows
        eigenvalues, vectors = np.linalg.eigh(values.T @ values)
        top = vectors[:, np.argsort(eigenvalues)[::-1][:n_components]]
        # a deterministic sign: the largest entry of each component positive
        top *= np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(top.shape[1])])
        out.append((mean.astype(np.float32), top.astype(np.float32)))
    emb.release()
    return out


def project(emb: EmbeddingSet, projection, positions: np.ndarray | None = None, chunk: int = 65536) -> np.ndarray:
    """float32 (n, n_models * c) projected embeddings of the data rows ``positions`` (all when None), in chunks."""
    positions = np.arange(len(emb.rows)) if positions is None else np.asarray(positions)
    width = sum(c.shape[1] for _, c in projection)
    out = np.empty((len(positions), width), dtype=np.float32)
    for start in range(0, len(positions), chunk):
        part = positions[start : start + chunk]
        col = 0
        for m, (mean, components) in enumerate(projection):
            out[start : start + len(part), col : col + components.shape[1]] = (emb.gather(m, part) - mean) @ components
            col += components.shape[1]
    return out


def projection_names(emb: EmbeddingSet, projection) -> list[str]:
    return [f"{name}__emb__pc{j + 1}" for name, (_, c) in zip(emb.names, projection) for j in range(c.shape[1])]
