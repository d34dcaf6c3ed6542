"""What every record reader shares: the JSON object of a record file, and the one-line error
naming the file and the field."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from stackkit.contract.io import read_json
from stackkit.errors import ContractError, StackkitError, one_line


def field_error(path, field: str, value, expected: str, remedy: str) -> ContractError:
    """``<file>: '<field>' is <value>; expected <what>; <remedy>``."""
    return ContractError(f"{path}: '{field}' is {one_line(repr(value), 60)}; expected {expected}; {remedy}")


def read_object(path: str | os.PathLike, *, missing: str, malformed: str, shown=None) -> dict:
    """The JSON object of a record file: ``{path}: not found; {missing}`` (StackkitError) when absent,
    ``{shown}: {malformed}`` (ContractError) when it is not an object; ``shown`` names the file (``path``)."""
    path = Path(path)
    if not path.is_file():
        raise StackkitError(f"{path}: not found; {missing}")
    record = read_json(path)
    if not isinstance(record, dict):
        raise ContractError(f"{path if shown is None else shown}: {malformed}")
    return record


def known_fields(cls, record: dict) -> dict:
    """The entries of ``record`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in record.items() if k in names}
