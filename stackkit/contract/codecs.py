"""Byte codecs of the stackers' model files: .npz arrays (no pickles), written with sha256 sidecars
(:func:`stackkit.contract.io.write_artifact`) and read back checked. The fold model's JSON record is
:mod:`stackkit.contract.records.stacker`."""

from __future__ import annotations

import numpy as np

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
