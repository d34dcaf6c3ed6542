"""A stacker's two records: ``stack/<stacker>/meta.json`` (:class:`StackerRecord`: the fitted
stacker's parameters, scores, feature columns, folds' hash and the sha256 of every file of its
folder) and ``stack/<stacker>/fold<k>/stacker.json`` (:class:`FoldModelRecord`: one fold model's
class, parameters, feature count and small state, with a sha256 sidecar like the model files
beside it)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stackkit.contract import CONTRACT_VERSION, STACKER_RECORD, FoldModelFiles, test_fold_name
from stackkit.contract.io import json_default, read_artifact, verify_set, write_artifact, write_set_record
from stackkit.contract.records._common import known_fields, read_object
from stackkit.errors import ContractError, StackkitError

REFIT = "refit with `stack fit`"


@dataclass(frozen=True)
class StackerRecord:
    """stack/<stacker>/meta.json, in the order written (``sha256`` last, by the set writer)."""

    stacker: str
    params: dict
    score: dict  # {"overall", "per_label"}
    fold_scores: list
    seconds: float
    n_folds: int
    n_test_folds: int  # written as ``test_folds``: the names of its test_fold<k>.parquet files (v3)
    feature_columns: list
    folds_hash: str
    tuning: dict | None = None
    created: str | None = None
    sha256: dict | None = None
    contract_version: int | None = CONTRACT_VERSION

    def to_json(self) -> dict:
        return {"contract_version": self.contract_version, "stacker": self.stacker, "params": self.params, "score": self.score,
                "fold_scores": self.fold_scores, "seconds": self.seconds, "n_folds": self.n_folds,
                "test_folds": [test_fold_name(k) for k in range(self.n_test_folds)], "feature_columns": self.feature_columns,
                "folds_hash": self.folds_hash, "tuning": self.tuning, "created": self.created}


def write_stacker_record(folder: str | os.PathLike, record: StackerRecord) -> StackerRecord:
    """meta.json of the stack/<stacker>/ set being written in ``folder``, last: with the sha256 of every other file."""
    written = write_set_record(folder, STACKER_RECORD, record.to_json())
    return dataclasses.replace(record, sha256=written["sha256"])


def read_stacker_record(folder: str | os.PathLike, name: str) -> StackerRecord:
    """stack/<name>/meta.json, its folder's files checked against its sha256 (when it records them)."""
    path = Path(folder) / STACKER_RECORD
    record = read_object(path, missing=f"run `stack fit --stackers {name}` first", malformed=f"expected a JSON object; {REFIT}")
    if "sha256" in record:
        verify_set(folder, path, record["sha256"], remedy=f"refit with `stack fit --stackers {name}`")
    n_folds = record.get("n_folds")
    if not isinstance(n_folds, int) or isinstance(n_folds, bool) or n_folds < 1:
        raise ContractError(f"{path}: 'n_folds' must be a positive integer; {REFIT}")
    test_folds = record.get("test_folds", [])
    fields = known_fields(StackerRecord, record)
    for key in ("stacker", "params", "score", "fold_scores", "seconds", "feature_columns", "folds_hash"):
        fields.setdefault(key, None)
    fields.update(stacker=record.get("stacker", name), n_test_folds=len(test_folds) if isinstance(test_folds, list) else 0,
                  contract_version=record.get("contract_version"))
    return StackerRecord(**fields)


@dataclass(frozen=True)
class FoldModelRecord:
    """stack/<stacker>/fold<k>/stacker.json: written last in a fold model's folder, it marks it complete."""

    stacker: str
    params: dict
    n_features: int
    state: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"stacker": self.stacker, "params": self.params, "n_features": self.n_features, "state": self.state}


def write_fold_model_record(folder: str | os.PathLike, record: FoldModelRecord) -> Path:
    """stacker.json (with its sha256 sidecar) in the fold model folder ``folder``."""
    data = (json.dumps(record.to_json(), indent=2, default=json_default) + "\n").encode("utf-8")
    return write_artifact(FoldModelFiles(Path(folder)).record, data)


def read_fold_model_record(folder: str | os.PathLike, expected: str) -> FoldModelRecord:
    """stacker.json of ``folder``, checked against its sidecar, holding a model of stacker ``expected``."""
    path = FoldModelFiles(Path(folder)).record
    raw = read_artifact(path)
    try:
        record = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StackkitError(f"{path}: not valid JSON ({exc}); {REFIT}") from exc
    if not isinstance(record, dict) or record.get("stacker") != expected:
        found = record.get("stacker") if isinstance(record, dict) else None
        raise StackkitError(f"{path}: holds a '{found}' model, expected '{expected}'")
    try:
        return FoldModelRecord(expected, dict(record["params"]), int(record["n_features"]), record.get("state") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"{path}: malformed fold model record ({type(exc).__name__}: {exc}); {REFIT}") from None
