"""Atomic writers and defensive readers.

Every artifact is written to a temporary file in the destination folder, flushed to disk and
then moved over the destination with ``os.replace``: an interrupted write leaves either the
previous complete file or the new complete file, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from stackkit.contract.hashing import file_sha256
from stackkit.errors import ContractError, StackkitError, one_line

TMP_PREFIX = ".stackkit-tmp-"
SIDECAR_SUFFIX = ".sha256"
# Sets (a folder replaced as a whole) are built in ``.<name>.tmp-XXXX`` beside the folder; the
# replaced version briefly lives in ``.<name>.old-XXXX``. Readers skip names starting with '.'.
SET_TMP = ".tmp-"
SET_OLD = ".old-"
# Fault-injection hook for tests (tests/test_faults.py): with STACKKIT_TEST_HOLD_WRITE=N (or file:N,
# set:N), the N-th write point (a temporary file written in full but not yet renamed, or a set folder complete but not
# yet switched in) writes its temporary path to $STACKKIT_TEST_HOLD_MARK and sleeps, so that a test
# can SIGKILL the process with the write provably in flight.
HOLD_ENV = "STACKKIT_TEST_HOLD_WRITE"
HOLD_MARK_ENV = "STACKKIT_TEST_HOLD_MARK"
_write_points: dict[str, int] = {}


class ArtifactWriteError(StackkitError):
    """Writing an artifact failed (disk full, quota, read-only, permissions, a vanished folder)."""

    def __init__(self, path, exc: BaseException):
        self.path = Path(path)
        super().__init__(f"{path}: {os_error_reason(exc)}")


_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)


def os_error_reason(exc: BaseException, verb: str = "write") -> str:
    """What went wrong and the fix, for an OSError (pyarrow's included: its errno is only in the text)."""
    code = getattr(exc, "errno", None)
    if code is None:
        match = _ERRNO_IN_TEXT.search(str(exc))
        code = int(match.group(1)) if match else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        kept = ", the previous files are intact" if verb == "write" else ""
        return f"cannot {verb}: {what}; free some space (or use --workdir on a larger disk) and rerun{kept}"
    if code == errno.EROFS:
        return f"cannot {verb}: read-only file system; use --workdir on a writable disk"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot {verb}: permission denied; fix the permissions or use another --workdir"
    if code == errno.ENOENT:
        return f"cannot {verb}: no such file or folder (moved or deleted while running?); check the path and rerun"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot {verb}: a part of the path is a file, not a folder; choose another path"
    if code == errno.EISDIR:
        return f"cannot {verb}: the path is a folder, not a file; choose another path"
    detail = getattr(exc, "strerror", None) or one_line(exc, 120)
    return f"cannot {verb} ({detail}); check the disk and the path, then rerun"


def _hold_point(tmp: Path, kind: str, name: str) -> None:
    """The fault-injection hook (see HOLD_ENV); free when the variable is unset.

    ``N`` holds at the N-th write point of any kind; ``file:N`` / ``set:N`` count only temporary
    files (``atomic_path``) or only set folders (``replace_dir``); ``file=NAME:N`` only those
    whose destination is called NAME."""
    wanted = os.environ.get(HOLD_ENV)
    if not wanted:
        return
    want_kind, _, number = wanted.rpartition(":")
    for key in ("", kind, f"{kind}={name}"):
        _write_points[key] = _write_points.get(key, 0) + 1
    if _write_points.get(want_kind) == int(number):
        mark = os.environ.get(HOLD_MARK_ENV)
        if mark:
            Path(mark).write_text(str(tmp))
        time.sleep(600)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Any OSError of the write (also one raised by the caller's code writing ``tmp``, such as
    pyarrow's, which names no file) becomes an :class:`ArtifactWriteError` naming ``path``;
    the temporary file is removed and the previous ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise ArtifactWriteError(path, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; artifacts get the permissions an ordinary open() would give them
        os.chmod(tmp, 0o666 & ~_current_umask())
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _hold_point(tmp, "file", path.name)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ArtifactWriteError(path, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --- sets: folders replaced as a whole -------------------------------------------------------


def check_set_target(path: str | os.PathLike) -> Path:
    """A set's folder must be a folder or absent: a plain file (or a link to one) in its place is the
    user's, never replaced. One-line :class:`StackkitError` naming it; writers call this before any
    work (and :func:`replace_dir` again before it creates anything)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StackkitError(
            f"{path}: exists as a file where stackkit writes the folder {path.name}/; the file is left as it is: "
            "move or rename it, or use another --workdir"
        )
    return path


def _set_leftovers(path: Path) -> list[Path]:
    prefixes = (f".{path.name}{SET_TMP}", f".{path.name}{SET_OLD}")
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if p.name.startswith(prefixes)]


def recover_set(path: str | os.PathLike, *, clean: bool = True) -> None:
    """Repair what an interrupted :func:`replace_dir` left beside ``path``.

    A replaced old set (``.<name>.old-*``) is moved back when ``path`` is missing (the switch was
    interrupted between its two renames, on a file system without an atomic exchange). With
    ``clean`` (writers), unfinished new sets (``.<name>.tmp-*``) and old sets beside a present
    ``path`` are deleted; readers pass ``clean=False``, so they never remove a set another process
    is still writing."""
    path = Path(path)
    for leftover in sorted(_set_leftovers(path)):
        with contextlib.suppress(OSError):
            if SET_OLD in leftover.name and not path.exists():
                os.rename(leftover, path)
            elif clean:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(directory: Path) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _link_tree(source: Path, target: Path) -> None:
    """``source`` recreated at ``target`` with hard links (no data copied); copies where links fail."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            _link_tree(child, target / child.name)
    else:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike, *, keep: Iterable[str] | bool = ()) -> Iterator[Path]:
    """Replace the folder ``path`` as a set: yield an empty sibling folder to write the new set into.

    On success the new folder is switched in with one atomic exchange (``renameat2``; two renames
    with recovery where the file system lacks it) and the old one is deleted, so a reader sees the
    old set or the new set, never a mix. On any failure the new folder is deleted and ``path`` is
    untouched; OSErrors become an :class:`ArtifactWriteError` naming ``path``. ``keep``: entries
    of the old folder carried into the new one (hard links) when the new one does not write them;
    ``True`` keeps every such entry (names starting with '.', temporaries, never).
    """
    path = check_set_target(path)
    recover_set(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{SET_TMP}", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_current_umask())
    except OSError as exc:
        raise ArtifactWriteError(path, exc) from exc
    try:
        yield tmp
        if path.is_dir() and keep:
            for entry in path.iterdir():  # never a leftover temporary ('.'-names) of an interrupted writer
                if not entry.name.startswith(".") and (keep is True or entry.name in keep) and not (tmp / entry.name).exists():
                    _link_tree(entry, tmp / entry.name)
        _fsync_tree(tmp)
        _hold_point(tmp, "set", path.name)
        check_set_target(path)  # a file put there while the set was written: refused, not swapped away
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old set
        else:
            old = path.with_name(f".{path.name}{SET_OLD}{tmp.name.rsplit('-', 1)[-1]}")
            os.rename(path, old)
            _hold_point(old, "set-switch", path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except ArtifactWriteError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_set(path, clean=False)
        # name the file in the destination, not in the temporary folder
        try:
            shown = path / exc.path.relative_to(tmp)
        except ValueError:
            raise exc from exc.__cause__
        raise ArtifactWriteError(shown, exc.__cause__ or exc) from exc.__cause__
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_set(path, clean=False)  # the old set back in place if the switch failed half-way
        raise ArtifactWriteError(path, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_set(path, clean=False)
        raise


def tree_sha256(directory: str | os.PathLike, *, exclude: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every file under ``directory`` by POSIX relative path; top-level names in ``exclude`` skipped."""
    directory = Path(directory)
    skip = set(exclude)
    hashes = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory)
        if rel.parts[0] in skip or rel.name.startswith(TMP_PREFIX):
            continue
        hashes[rel.as_posix()] = file_sha256(file)
    return hashes


def write_set_record(directory: str | os.PathLike, record_name: str, record: dict, *, exclude: Iterable[str] = ()) -> dict:
    """Write a set's record (``model.json``, ``manifest.json``, ``meta.json``) last, with ``sha256`` of every other file."""
    directory = Path(directory)
    record = dict(record)
    record["sha256"] = tree_sha256(directory, exclude=(record_name, *exclude))
    write_json(record, directory / record_name)
    return record


def verify_set(directory: str | os.PathLike, record_path: str | os.PathLike, hashes, *, names: Iterable[str] | None = None,
               remedy: str) -> None:
    """Check files of a set against the sha256 its record lists (all of them, or ``names``).

    A file missing or with another hash means the set was edited or mixed with another version:
    one-line :class:`ContractError` naming the file, the record and ``remedy``."""
    directory = Path(directory)
    if not isinstance(hashes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise ContractError(f"{record_path}: 'sha256' must map file names to hex digests; {remedy}")
    for name in (hashes if names is None else [n for n in names if n in hashes]):
        file = directory / name
        if not file.is_file():
            raise ContractError(f"{file}: listed in {record_path} but missing; {remedy}")
        actual = file_sha256(file)
        if actual != hashes[name].lower():
            raise ContractError(
                f"{file}: sha256 {actual[:12]}... differs from {hashes[name][:12]}... recorded in {record_path} "
                f"(changed or mixed with another run since); {remedy}"
            )


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
    return write_text(json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def json_default(value):
    """JSON for numpy scalars and arrays (stacker states) and paths (provenance records)."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
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


def sidecar(path: str | os.PathLike) -> Path:
    """The sha256 sidecar of ``path``: ``<name>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def has_sidecar(path: str | os.PathLike) -> bool:
    """``path`` and its sidecar both exist (the sidecar is written last: a complete artifact)."""
    return Path(path).is_file() and sidecar(path).is_file()


def write_artifact(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically, then its sha256 sidecar (sidecar last: a file without one is refused)."""
    path = Path(path)
    sidecar_path = sidecar(path)
    write_bytes(data, path)
    write_text(f"{file_sha256(path)}  {path.name}\n", sidecar_path)
    return path


def read_artifact(path: str | os.PathLike, remedy: str = "refit with `stack fit`") -> bytes:
    """Bytes of ``path`` after checking them against the sha256 sidecar; one-line StackkitError naming ``remedy`` otherwise.

    The bytes are read once and checked before any library sees them: a truncated LightGBM
    model handed over by path can abort the process."""
    path = Path(path)
    sidecar_path = sidecar(path)
    if not path.is_file():
        raise StackkitError(f"{path}: model file not found; {remedy}")
    if not sidecar_path.is_file():
        raise StackkitError(f"{path}: sha256 sidecar {sidecar_path.name} missing; refusing to load an unverified model file: {remedy}")
    try:
        expected = sidecar_path.read_text(encoding="utf-8").split()[0].strip().lower()
    except (IndexError, UnicodeDecodeError) as exc:
        raise StackkitError(f"{sidecar_path}: unreadable sha256 sidecar; {remedy}") from exc
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise StackkitError(
            f"{path}: sha256 mismatch (file {actual[:12]}..., sidecar {expected[:12]}...): the model file is corrupted or was "
            f"changed; {remedy}"
        )
    return data
