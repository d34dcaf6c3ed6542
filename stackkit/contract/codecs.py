"""Byte codecs of the stackers' model files: .npz arrays (no pickles) and JSON records, written
with sha256 sidecars (:func:`stackkit.contract.io.write_artifact`) and read back checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from stackkit.contract.io import json_default, read_artifact, write_artifact
from stackkit.errors import StackkitError


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The .npz bytes of ``arrays`` (no pickles), for write_artifact."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_npz(raw: bytes, source, what: str, keys) -> dict[str, np.ndarray]:
    """``keys`` of the .npz bytes ``raw`` (pickles refused); a bad or incomplete file is a one-line error naming ``source``."""
    import io
    import zipfile

    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise StackkitError(f"{source}: not a readable {what} ({exc}); refit with `stack fit`") from exc


def write_json_artifact(obj: dict, path: str | os.PathLike) -> Path:
    return write_artifact(path, (json.dumps(obj, indent=2, default=json_default) + "\n").encode("utf-8"))


def read_json_artifact(path: str | os.PathLike) -> dict:
    raw = read_artifact(path)
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StackkitError(f"{path}: not valid JSON ({exc}); refit with `stack fit`") from exc
