"""Errors a user can act on.

Library code raises :class:`StackkitError` (or a subclass) for every problem caused by the
input or the environment rather than by a bug. The CLI turns it into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""


def one_line(detail, limit: int = 160) -> str:
    """``detail`` (an exception or text) as one line of at most ``limit`` characters, for an error message."""
    text = " ".join(str(detail).split())[:limit]
    return text or type(detail).__name__


class StackkitError(Exception):
    """A known, user-facing error. ``str(exc)`` is a single line that says what is wrong and how to fix it."""

    def __init__(self, message: str):
        # One line, always: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))


class ContractError(StackkitError):
    """An input file does not follow the stackkit contract (columns, dtypes, ids, folds)."""


class LeakageError(ContractError):
    """Inputs whose folds disagree with data/folds.parquet; using them would leak labels."""


def raised_by_interrupt(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is a KeyboardInterrupt
    (Ctrl-C while a compiled module initializes arrives as ImportError("initialization failed"))."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
