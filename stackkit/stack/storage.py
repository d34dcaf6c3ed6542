"""Optuna storages for ``stack fit --tune``: where studies live so that reruns and other workers continue them.

* default (no URL): a journal file, ``WORKDIR/optuna/journal.log``
  (``optuna.storages.JournalStorage`` over ``optuna.storages.journal.JournalFileBackend``).
  Appends are guarded by a file lock, so several processes on one machine may tune the same
  study at once. (SQLite is not safe for that: concurrent writers hit "database is locked".)
* ``journal:PATH`` or a plain file path: a journal file at PATH.
* ``sqlite:///PATH``, ``postgresql://``, ``postgresql+psycopg2://``, ``mysql://`` (any
  ``mysql+driver://``): ``optuna.storages.RDBStorage``. For servers a heartbeat marks trials of
  a killed worker as failed after ``grace_period`` and ``RetryHeartbeatStaleTrialCallback``
  queues them again, so a crash on one machine does not leave a trial RUNNING forever.

Every failure to open a storage (unknown scheme, database down, wrong password, missing
driver) becomes one :class:`StackkitError` line; the password is never printed.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from pathlib import Path

from stackkit.contract import Workdir
from stackkit.errors import StackkitError, one_line

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
ACCEPTED = "journal:PATH or a file path (default: WORKDIR/optuna/journal.log), sqlite:///PATH, postgresql://, postgresql+psycopg2://, mysql://"
# Server databases: a worker that dies mid-trial stops beating; after the grace period its trial is failed and retried.
DEFAULT_HEARTBEAT_S = 60
DEFAULT_MAX_RETRY = 3

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def redact_url(url: str | None) -> str:
    """The storage URL with any password replaced by ``***`` (safe to print and to store in blend.json)."""
    if url is None:
        return "journal (default)"
    scheme = _scheme_of(url)
    if scheme and scheme.split("+")[0] in RDB_SCHEMES:
        try:
            from sqlalchemy.engine import make_url

            return make_url(url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - an unparsable URL still must not leak what looks like a password
            pass
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _scheme_of(url: str) -> str | None:
    match = _SCHEME.match(url)
    if not match or len(match.group(1)) == 1:  # "C:\..." is a Windows path, not a scheme
        return None
    return match.group(1).lower()


def describe_storage(url: str | None, workdir: Workdir) -> str:
    if url is None:
        return f"journal:{workdir.optuna_journal}"
    return redact_url(url)


def make_storage(url: str | None, workdir: Workdir, *, heartbeat_interval: int | None = None):
    """An Optuna storage for ``url`` (see the module docstring for the accepted forms)."""
    if url is None or url == "":
        return _journal(Path(workdir.optuna_journal))
    scheme = _scheme_of(url)
    if scheme is None:
        return _journal(Path(url))
    if scheme == "journal":
        path = url[len("journal:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise StackkitError(f"storage '{url}': journal: needs a file path, e.g. journal:optuna/journal.log")
        return _journal(Path(path))
    if scheme.split("+")[0] not in RDB_SCHEMES:
        raise StackkitError(f"storage '{redact_url(url)}': unknown scheme '{scheme}'; accepted: {ACCEPTED}")
    return _rdb(_with_installed_driver(url, scheme), scheme, heartbeat_interval, shown=redact_url(url))


def _with_installed_driver(url: str, scheme: str) -> str:
    """``postgresql://`` with the driver that is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; stackkit depends on
    psycopg2-binary, so a bare URL uses psycopg2 when psycopg 3 is absent.
    """
    import importlib.util

    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2" + url[len("postgresql"):]
    return url


def _journal(path: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # create it now so that an unwritable location fails here, in one line, not mid-study
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise StackkitError(f"{path}: cannot write the Optuna journal here ({exc.strerror or exc}); pass --storage with a writable path") from exc
    check_journal(path)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def check_journal(path: Path) -> None:
    """Every complete line of an Optuna journal file must be a JSON record with an ``op_code``.

    Optuna reads the journal lazily and fails mid-study with a JSONDecodeError (a corrupted line)
    or a UnicodeDecodeError (a binary file such as a Parquet file given as --storage); this reads it
    once up front and names the file and the line instead. A last line without its newline (a
    writer killed mid-append) is left to Optuna, which skips it."""
    import json

    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    break
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    record = None
                if not isinstance(record, dict) or "op_code" not in record:
                    raise StackkitError(
                        f"{path}: line {number} is not an Optuna journal record; the file is corrupted or not an Optuna "
                        "journal: pass --storage with another file (or move this one away to start the studies afresh)"
                    )
    except OSError as exc:
        raise StackkitError(f"{path}: cannot read the Optuna journal ({exc.strerror or exc}); pass --storage with a readable path") from exc


def _rdb(url: str, scheme: str, heartbeat_interval: int | None, *, shown: str):
    import optuna
    import sqlalchemy.exc

    kwargs: dict = {}
    if scheme.split("+")[0] != "sqlite":
        interval = heartbeat_interval or DEFAULT_HEARTBEAT_S
        kwargs = dict(
            heartbeat_interval=interval,
            grace_period=2 * interval,
            engine_kwargs={"pool_pre_ping": True},
        )
    elif heartbeat_interval:
        kwargs = dict(heartbeat_interval=heartbeat_interval, grace_period=2 * heartbeat_interval)
    if kwargs.get("heartbeat_interval"):
        kwargs.update(_retry_callback_kwarg(optuna))
    if scheme.startswith("sqlite"):
        db_path = url.split(":///", 1)[1] if ":///" in url else ""
        if db_path and db_path != ":memory:":
            try:
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StackkitError(f"storage '{shown}': cannot create its folder ({exc.strerror or exc})") from exc
    try:
        # Workers started at once on a fresh database race to create Optuna's tables; the loser
        # gets a duplicate-key error from the catalog, and on retry finds the tables in place.
        for attempt in range(5):
            try:
                with _quiet_experimental():
                    return optuna.storages.RDBStorage(url, **kwargs)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except sqlalchemy.exc.ArgumentError:
        raise StackkitError(f"storage '{shown}': not a valid database URL; accepted: {ACCEPTED}") from None
    except sqlalchemy.exc.OperationalError as exc:
        raise StackkitError(
            f"storage '{shown}': cannot connect ({_first_line(exc, url)}); check that the database is up, the host, port, user and password"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StackkitError(f"storage '{shown}': database error ({_first_line(exc, url)})") from None
    except (ImportError, ModuleNotFoundError) as exc:
        raise StackkitError(f"storage '{shown}': the database driver is not installed ({exc}); install it or use another URL") from None


def _retry_callback_kwarg(optuna) -> dict:
    """The retry-on-stale-heartbeat callback under its Optuna >= 4.9 name, else the older one."""
    import inspect

    storages = optuna.storages
    with _quiet_experimental(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if "heartbeat_stale_trial_callback" in inspect.signature(storages.RDBStorage.__init__).parameters:
            return {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=DEFAULT_MAX_RETRY)}
        return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=DEFAULT_MAX_RETRY)}


def _first_line(exc: Exception, url: str) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = one_line(str(orig).split("\n")[0], 200)
    # drivers sometimes echo the connection string: never let the password through
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:  # noqa: BLE001
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text or type(orig).__name__


@contextlib.contextmanager
def _quiet_experimental():
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
