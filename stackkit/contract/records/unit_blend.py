"""``stack/blend.json`` of a study- or patient-level task (contract v5): the unit stackers' blend `submit` applies.

In the order written: ``contract_version``, ``task``, ``unit``, ``created``, ``sources`` (per stacker, as in
RSNA 2019's record: ``name`` ``stack/<stacker>``, ``kind``, ``oof``, ``test``, ``test_sha256``, ``test_folds``
and ``oof_score``: the task's metric ``{"overall", "parts"}``), ``blend`` (the record of
``stackkit.stack.units.fit_unit_stack``: ``stackers``, per target its weights, temperature, bias, candidates
and choice, ``cv``), ``scores`` (the blend's cross-validated score, overall, per part and per fold),
``test_sets``, ``test_sets_method``, ``models_without_test_folds``, ``seed``, ``folds_hash``,
``base_oof_scores`` (every base model's plain aggregation, scored) and ``stackers_kept``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stackkit.contract import CONTRACT_VERSION
from stackkit.contract.io import write_json
from stackkit.contract.records._common import field_error, known_fields, read_object
from stackkit.contract.records.blend import RERUN, check_sources
from stackkit.contract.tasks import TaskSchema
from stackkit.errors import ContractError

STACKER_PREFIX = "stack/"  # a source's name: stack/<stacker>


@dataclass(frozen=True)
class UnitBlendRecord:
    task: str
    unit: str
    sources: list
    blend: dict
    test_sets: int = 1
    created: str | None = None
    scores: dict = field(default_factory=dict)
    test_sets_method: str | None = None
    models_without_test_folds: list = field(default_factory=list)
    seed: int | None = None
    folds_hash: str | None = None
    base_oof_scores: dict = field(default_factory=dict)
    stackers_kept: list = field(default_factory=list)
    contract_version: int | None = CONTRACT_VERSION

    def to_json(self) -> dict:
        return {"contract_version": self.contract_version, "task": self.task, "unit": self.unit, "created": self.created,
                "sources": self.sources, "blend": self.blend, "scores": self.scores, "test_sets": self.test_sets,
                "test_sets_method": self.test_sets_method, "models_without_test_folds": self.models_without_test_folds,
                "seed": self.seed, "folds_hash": self.folds_hash, "base_oof_scores": self.base_oof_scores,
                "stackers_kept": self.stackers_kept}

    @property
    def stacker_sources(self) -> dict[str, dict]:
        """The blend's stacker name (``lgbm``) -> its source entry."""
        return {s["name"].removeprefix(STACKER_PREFIX): s for s in self.sources}


def write_unit_blend_record(record: UnitBlendRecord, path: str | os.PathLike) -> Path:
    """stack/blend.json of a unit task (the staged stack/'s while `stack fit` builds it), atomically."""
    return write_json(record.to_json(), path)


def read_unit_blend_record(path: str | os.PathLike, schema: TaskSchema) -> UnitBlendRecord:
    """stack/blend.json of the unit task ``schema``: every field `submit` uses checked, one line naming the first bad one."""
    record = read_object(path, missing="run `stack fit` first", malformed=f"expected a JSON object; {RERUN}")
    if record.get("task") != schema.name:
        raise field_error(path, "task", record.get("task"), f"{schema.name!r}, the task of data/task.json", RERUN)
    if not isinstance(record.get("sources"), list) or not record["sources"]:
        raise field_error(path, "sources", record.get("sources"), "a non-empty list of the stackers", RERUN)
    names = check_sources(record, path)
    blend = record.get("blend")
    stackers = blend.get("stackers") if isinstance(blend, dict) else None
    if not isinstance(stackers, list) or not stackers or not isinstance(blend.get("parts"), dict):
        raise field_error(path, "blend", blend, "the unit blend of `stack fit` (its 'stackers' and 'parts')", RERUN)
    absent = [n for n in stackers if f"{STACKER_PREFIX}{n}" not in names]
    if absent:
        raise ContractError(f"{path}: blend.stackers lists {absent[0]!r}, which is not among the sources; {RERUN}")
    return UnitBlendRecord(**known_fields(UnitBlendRecord, record))
