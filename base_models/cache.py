"""Preprocessing cache: every slice decoded once into windowed uint8 channels, memory-mapped.

One ``.npy`` file of shape (n_images, n_windows, size, size) per (image set, image size,
windows), under ``<workdir>/cache/``; rows are in ``image_id`` order. Its name carries a hash of
the image ids, their paths and the settings, so every model, fold and epoch that needs the
same pixels reuses it, and a changed dataset or setting gets a fresh file. A JSON sidecar
(written after the array, both atomically) lists the slices that could not be decoded: they
are stored as blank images, so they still get a prediction, and their names are reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from stackkit.contract import RELATIVE, Workdir
from stackkit.errors import ContractError
from stackkit.contract.io import atomic_path, write_json

from base_models.pixels import read_windowed

CACHE_VERSION = 1
CHUNK = 64  # slices per decode task: big enough to amortize inter-process transfer
SERIAL_BELOW = 256  # decoding fewer slices than this is faster than starting processes


@dataclass
class PixelCache:
    """Windowed pixels of a set of images, rows in sorted ``image_id`` order."""

    pixels: np.ndarray  # (n, n_windows, size, size) uint8, usually a read-only memmap
    image_ids: np.ndarray  # sorted, object
    bad: dict[str, str] = field(default_factory=dict)  # image_id -> why it could not be decoded
    path: Path | None = None

    def rows(self, image_ids) -> np.ndarray:
        """Row of each image id in ``pixels`` (all ids must be cached)."""
        ids = np.asarray(image_ids, dtype=object)
        rows = np.searchsorted(self.image_ids, ids)
        rows = np.clip(rows, 0, len(self.image_ids) - 1)
        if len(ids) and not (self.image_ids[rows] == ids).all():
            missing = ids[self.image_ids[rows] != ids][0]
            raise KeyError(f"image_id {missing!r} is not in the pixel cache")
        return rows


def resolve_paths(metadata: pd.DataFrame, wd: Workdir, source: str = str(RELATIVE.metadata)) -> np.ndarray:
    """Absolute file path per metadata row; relative paths are taken from the work directory if they exist there."""
    if "path" not in metadata.columns:
        raise ContractError(
            f"{source}: no 'path' column, so base train cannot find the DICOM files; "
            "run `data prepare` (it records each file's path)"
        )
    paths = metadata["path"].astype("string").fillna("").to_numpy(dtype=object)
    relative = np.array([bool(p) and not os.path.isabs(p) for p in paths])
    if relative.any():
        probe = paths[int(np.argmax(relative))]
        if not os.path.exists(probe) and (wd.root / probe).exists():
            paths = np.where(relative, np.array([str(wd.root / p) for p in paths], dtype=object), paths)
    return paths


def cache_key(image_ids: Sequence[str], paths: Sequence[str], size: int, windows) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, "size": int(size), "windows": [[float(c), float(w)] for c, w in windows]}).encode())
    digest.update("\n".join(f"{i}\t{p}" for i, p in zip(image_ids, paths)).encode())
    return digest.hexdigest()


def _decode_chunk(paths: list[str], windows, size: int) -> tuple[np.ndarray, list[str | None]]:
    out = np.empty((len(paths), len(windows), size, size), dtype=np.uint8)
    errors: list[str | None] = []
    for k, path in enumerate(paths):
        if not path:
            out[k] = 0
            errors.append("no path in data/metadata.parquet")
            continue
        out[k], error = read_windowed(path, windows, size)
        errors.append(error)
    return out, errors


def load_or_build_cache(
    wd: Workdir,
    metadata: pd.DataFrame,
    *,
    size: int,
    windows,
    workers: int | None = None,
    progress: bool = True,
    build: bool = True,
) -> PixelCache:
    """The pixel cache for every image in ``metadata``: loaded if present and complete, else built.

    ``build=False`` only loads (used by non-zero ranks after rank 0 built it).
    """
    windows = [(float(c), float(w)) for c, w in windows]
    order = np.argsort(metadata["image_id"].to_numpy(dtype=object), kind="stable")
    image_ids = metadata["image_id"].to_numpy(dtype=object)[order]
    paths = resolve_paths(metadata, wd)[order]
    key = cache_key(image_ids, paths, size, windows)
    stem = f"pixels-{size}px-{len(windows)}w-{key[:16]}"
    array_path = wd.cache_dir / f"{stem}.npy"
    info_path = wd.cache_dir / f"{stem}.json"

    cached = _load(array_path, info_path, key, (len(image_ids), len(windows), size, size))
    if cached is not None:
        pixels, bad = cached
        return PixelCache(pixels, image_ids, bad, array_path)
    if not build:
        raise ContractError(f"{array_path}: pixel cache missing or incomplete; rank 0 should have built it")

    shape = (len(image_ids), len(windows), size, size)
    bad: dict[str, str] = {}
    with atomic_path(array_path) as tmp:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _fill(pixels, image_ids, paths, windows, size, workers, progress, bad)
        pixels.flush()
        del pixels
    write_json({"key": key, "version": CACHE_VERSION, "size": size, "windows": windows, "n_images": len(image_ids), "bad": bad}, info_path)
    return PixelCache(np.load(array_path, mmap_mode="r"), image_ids, bad, array_path)


def _fill(pixels, image_ids, paths, windows, size, workers, progress, bad) -> None:
    from tqdm.auto import tqdm

    n = len(paths)
    starts = list(range(0, n, CHUNK))
    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    bar = tqdm(total=n, desc=f"decode DICOM -> {size}px cache", unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or n < SERIAL_BELOW:
            results = (_decode_chunk(list(paths[s : s + CHUNK]), windows, size) for s in starts)
            _store(results, starts, pixels, image_ids, paths, bad, bar)
        else:
            import multiprocessing

            # fork where the OS has it (as torch's DataLoader does): children only run numpy/pydicom,
            # and unlike spawn it works from scripts without an `if __name__ == "__main__"` guard
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                results = pool.map(_decode_chunk, [list(paths[s : s + CHUNK]) for s in starts], [windows] * len(starts), [size] * len(starts))
                _store(results, starts, pixels, image_ids, paths, bad, bar)
    finally:
        bar.close()


def _store(results, starts, pixels, image_ids, paths, bad, bar) -> None:
    for start, (block, errors) in zip(starts, results):
        pixels[start : start + len(block)] = block
        for k, error in enumerate(errors):
            if error is not None:
                bad[str(image_ids[start + k])] = f"{paths[start + k]}: {error}"
        bar.update(len(block))


def _load(array_path: Path, info_path: Path, key: str, shape) -> tuple[np.ndarray, dict[str, str]] | None:
    if not (array_path.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        pixels = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if info.get("key") != key or pixels.shape != tuple(shape) or pixels.dtype != np.uint8:
        return None
    return pixels, dict(info.get("bad", {}))
