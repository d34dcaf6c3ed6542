"""``data/task.json`` (contract v5): the task a work directory is for, recorded once.

Written with the ``data/`` set (``data prepare --task``, or whoever assembles ``data/``), read by
every command through :func:`read_task`. A work directory without it is an RSNA 2019 one
(``rsna2019``): every v4 work directory keeps working as it did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stackkit.contract import TASK_RECORD, Workdir
from stackkit.contract.io import write_json
from stackkit.contract.records._common import field_error, read_object
from stackkit.contract.tasks import DEFAULT_TASK, TASKS, TaskSchema, get_task

TASK_CONTRACT_VERSION = 5  # the contract version that introduced data/task.json


@dataclass(frozen=True)
class TaskRecord:
    task: str  # a built-in schema's name (stackkit.contract.tasks.TASKS)
    contract_version: int = TASK_CONTRACT_VERSION

    def __post_init__(self):
        get_task(self.task)  # an unknown name is refused before anything is written

    @property
    def schema(self) -> TaskSchema:
        return get_task(self.task)

    def to_json(self) -> dict:
        return {"contract_version": self.contract_version, "task": self.task}


def write_task_record(path: str | os.PathLike, record: TaskRecord) -> Path:
    """The one writer of ``task.json`` (atomic), into ``path`` (``data/`` or the set being built)."""
    return write_json(record.to_json(), Path(path) / TASK_RECORD)


def read_task_record(path: str | os.PathLike) -> TaskRecord | None:
    """The record in the ``data/`` folder ``path``; None where there is none (an RSNA 2019 work directory)."""
    path = Path(path) / TASK_RECORD
    if not path.exists():
        return None
    remedy = "rerun `data prepare --task NAME`"
    record = read_object(path, missing=remedy, malformed=f"not a JSON object; {remedy}")
    task = record.get("task")
    if task not in TASKS:
        raise field_error(path, "task", task, f"one of {', '.join(TASKS)}", remedy)
    version = record.get("contract_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < TASK_CONTRACT_VERSION:
        raise field_error(path, "contract_version", version, f"an integer >= {TASK_CONTRACT_VERSION}", remedy)
    return TaskRecord(task, version)


def read_task(workdir: "Workdir | str | os.PathLike") -> TaskSchema:
    """The task schema of a work directory: ``data/task.json``'s, else ``rsna2019``."""
    record = read_task_record(Workdir.of(workdir).data_dir)
    return get_task(DEFAULT_TASK if record is None else record.task)
