"""``stack/blend.json``: the blend `submit` applies, and how `stack fit` chose it.

In the order written (docs/contract.md, "stack/"): ``contract_version``, ``created``,
``formula``, ``sources``, ``per_label_weights``, the blend's parameters (``weights``,
``temperature``, ``bias``, ``clip``, ``any_consistency``, ``space``), ``scores``, ``choice``,
``cv_method``, ``test_sets``, ``test_sets_method``, ``models_without_test_folds``, ``tuned``,
``device``, ``seed``, ``folds_hash``, ``optuna``, ``base_oof_scores``, ``stackers_kept``. The reader
checks every field `submit` uses with the range `stack fit` writes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from stackkit.contract import CONTRACT_VERSION, LABELS
from stackkit.contract.io import write_json
from stackkit.contract.records._common import field_error, read_object
from stackkit.errors import ContractError

SPACES = ("logit", "probability")
PARAMS = ("weights", "temperature", "bias", "clip", "any_consistency", "space")
RERUN = "rerun `stack fit` (or restore the record)"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BlendRecord:
    sources: list  # per source: name, kind, oof, test, test_sha256, test_folds [{path, sha256}], oof_score[, tuning]
    params: dict  # PARAMS as the blend writes them (``BlendParams.to_json``); older records lack bias and space
    test_sets: int = 1
    created: str | None = None
    formula: str | None = None
    per_label_weights: bool | None = None
    scores: dict = field(default_factory=dict)
    choice: dict = field(default_factory=dict)
    cv_method: str | None = None
    test_sets_method: str | None = None
    models_without_test_folds: list = field(default_factory=list)
    tuned: bool | None = None
    device: str | None = None
    seed: int | None = None
    folds_hash: str | None = None
    optuna: dict | None = None
    base_oof_scores: dict = field(default_factory=dict)
    stackers_kept: list = field(default_factory=list)
    contract_version: int | None = CONTRACT_VERSION

    def to_json(self) -> dict:
        return {"contract_version": self.contract_version, "created": self.created, "formula": self.formula,
                "sources": self.sources, "per_label_weights": self.per_label_weights, **self.params, "scores": self.scores,
                "choice": self.choice, "cv_method": self.cv_method, "test_sets": self.test_sets,
                "test_sets_method": self.test_sets_method, "models_without_test_folds": self.models_without_test_folds,
                "tuned": self.tuned, "device": self.device, "seed": self.seed, "folds_hash": self.folds_hash,
                "optuna": self.optuna, "base_oof_scores": self.base_oof_scores, "stackers_kept": self.stackers_kept}

    @property
    def source_names(self) -> list[str]:
        return [s["name"] for s in self.sources]


def write_blend_record(record: BlendRecord, path: str | os.PathLike) -> Path:
    """stack/blend.json (the staged stack/'s while `stack fit` builds it), atomically."""
    return write_json(record.to_json(), path)


def read_blend_record(path: str | os.PathLike) -> BlendRecord:
    """stack/blend.json, every field `submit` uses checked: one line naming the file and the first bad field."""
    record = read_object(path, missing="run `stack fit` first",
                         malformed="malformed blend record (expected an object with a 'sources' list); rerun `stack fit`")
    if not isinstance(record.get("sources"), list):
        raise ContractError(f"{path}: malformed blend record (expected an object with a 'sources' list); rerun `stack fit`")
    if not record["sources"]:
        raise ContractError(f"{path}: lists no sources; rerun `stack fit`")
    check_blend_record(record, path)
    fields = {name: record[name] for name in BlendRecord.__dataclass_fields__ if name in record and name != "params"}
    return BlendRecord(**fields, params={name: record[name] for name in PARAMS if name in record})


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sources(record: dict, path) -> set[str]:
    """Every source of a blend record (name, test file, its sha256 and per-fold test files, test_sets): their names."""
    names = set()
    for i, source in enumerate(record["sources"]):
        if not isinstance(source, dict) or not isinstance(source.get("name"), str) or not source["name"]:
            raise field_error(path, f"sources[{i}].name", source.get("name") if isinstance(source, dict) else source, "a source name", RERUN)
        if source["name"] in names:
            raise field_error(path, f"sources[{i}].name", source["name"], "each source once", RERUN)
        names.add(source["name"])
        if not isinstance(source.get("test"), str) or not source["test"]:
            raise field_error(path, f"sources[{i}].test", source.get("test"), "the path of its test file under the work directory", RERUN)
        sha = source.get("test_sha256")
        if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise field_error(path, f"sources[{i}].test_sha256", sha, "a sha256 hex digest", RERUN)
        folds = source.get("test_folds", [])
        if not isinstance(folds, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                                   and isinstance(f.get("sha256"), str) and _SHA256.fullmatch(f["sha256"])
                                                   for f in folds):
            raise field_error(path, f"sources[{i}].test_folds", folds, "a list of {path, sha256} per base fold model's test set", RERUN)
    n_sets = record.get("test_sets", 1)
    if isinstance(n_sets, bool) or not isinstance(n_sets, int) or n_sets < 1:
        raise field_error(path, "test_sets", n_sets, "a positive integer", RERUN)
    for i, source in enumerate(record["sources"]):
        if source.get("test_folds") and len(source["test_folds"]) != n_sets:
            raise field_error(path, f"sources[{i}].test_folds", f"{len(source['test_folds'])} files", f"{n_sets} (test_sets) or none", RERUN)
    return names


def check_blend_record(record: dict, path) -> None:
    """Every field `submit` uses, checked with the range `stack fit` writes: one line naming the first bad field."""
    names = check_sources(record, path)
    clip = record.get("clip")
    if not _number(clip) or not 0.0 <= clip < 0.5:
        raise field_error(path, "clip", clip, "a number in [0, 0.5)", RERUN)
    if not isinstance(record.get("any_consistency"), bool):
        raise field_error(path, "any_consistency", record.get("any_consistency"), "true or false", RERUN)
    if record.get("space", "logit") not in SPACES:
        raise field_error(path, "space", record.get("space"), " or ".join(SPACES), RERUN)
    for label in LABELS:
        t = record["temperature"].get(label) if isinstance(record.get("temperature"), dict) else None
        if not _number(t) or t <= 0:
            raise field_error(path, f"temperature.{label}", t, "a positive number", RERUN)
        if "bias" in record:  # records of older versions have none (no bias)
            b = record["bias"].get(label) if isinstance(record["bias"], dict) else None
            if not _number(b):
                raise field_error(path, f"bias.{label}", b, "a finite number", RERUN)
        weights = record["weights"].get(label) if isinstance(record.get("weights"), dict) else None
        if not isinstance(weights, dict):
            raise field_error(path, f"weights.{label}", weights, "a weight per source", RERUN)
        for name in names:
            w = weights.get(name)
            if not _number(w) or w < 0:
                raise field_error(path, f"weights.{label}.{name}", w, "a non-negative number", RERUN)
        unknown = sorted(set(weights) - names)
        if unknown:
            raise field_error(path, f"weights.{label}.{unknown[0]}", weights[unknown[0]], "weights for the listed sources only", RERUN)
