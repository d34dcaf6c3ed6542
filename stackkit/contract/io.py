"""Atomic writers and defensive readers.

Every artifact is written to a temporary file in the destination folder, flushed to disk and
then moved over the destination with ``os.replace``: an interrupted write leaves either the
previous complete file or the new complete file, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from stackkit.contract import file_sha256
from stackkit.errors import ContractError, StackkitError, one_line

TMP_PREFIX = ".stackkit-tmp-"
SIDECAR_SUFFIX = ".sha256"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise StackkitError(f"{path}: cannot write here ({exc.strerror or exc}); choose a writable location") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; artifacts get the permissions an ordinary open() would give them
    os.chmod(tmp, 0o666 & ~_current_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False, engine="pyarrow")
    return Path(path)


def write_json(obj, path: str | os.PathLike) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _json_default(value):
    # numpy scalars and paths show up in provenance records
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StackkitError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"{path}: not valid JSON ({exc})") from exc


def read_table(path: str | os.PathLike, *, what: str = "file", columns=None) -> pd.DataFrame:
    """Read a Parquet or CSV (optionally .gz) file, turning every read failure into one line."""
    path = Path(path)
    if not path.exists():
        raise StackkitError(f"{path}: {what} not found")
    if path.is_dir():
        raise StackkitError(f"{path}: is a directory, expected a {what}")
    if path.stat().st_size == 0:
        raise ContractError(f"{path}: empty file, expected a {what}")
    name = path.name.lower()
    try:
        if name.endswith((".csv", ".csv.gz", ".txt")):
            frame = pd.read_csv(path, usecols=columns)
        else:
            frame = pd.read_parquet(path, columns=columns, engine="pyarrow")
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        kind = "CSV" if name.endswith((".csv", ".csv.gz", ".txt")) else "Parquet"
        detail = one_line(exc, 200)
        raise ContractError(f"{path}: not a readable {kind} {what} ({detail}); rewrite it or restore a good copy") from exc
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/ArrowException family
        if type(exc).__module__.startswith("pyarrow"):
            detail = one_line(exc, 200)
            raise ContractError(f"{path}: not a readable Parquet {what} ({detail}); rewrite it or restore a good copy") from exc
        raise
    return frame


# --- files with sha256 sidecars ------------------------------------------------------------------


def write_artifact(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically, then its sha256 sidecar (sidecar last: a file without one is refused)."""
    path = Path(path)
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    write_bytes(data, path)
    write_text(f"{file_sha256(path)}  {path.name}\n", sidecar)
    return path


def read_artifact(path: str | os.PathLike, remedy: str = "refit with `stack fit`") -> bytes:
    """Bytes of ``path`` after checking them against the sha256 sidecar; one-line StackkitError naming ``remedy`` otherwise.

    The bytes are read once and checked before any library sees them: a truncated LightGBM
    model handed over by path can abort the process."""
    path = Path(path)
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if not path.is_file():
        raise StackkitError(f"{path}: model file not found; {remedy}")
    if not sidecar.is_file():
        raise StackkitError(f"{path}: sha256 sidecar {sidecar.name} missing; refusing to load an unverified model file: {remedy}")
    try:
        expected = sidecar.read_text(encoding="utf-8").split()[0].strip().lower()
    except (IndexError, UnicodeDecodeError) as exc:
        raise StackkitError(f"{sidecar}: unreadable sha256 sidecar; {remedy}") from exc
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise StackkitError(
            f"{path}: sha256 mismatch (file {actual[:12]}..., sidecar {expected[:12]}...): the model file is corrupted or was "
            f"changed; {remedy}"
        )
    return data
