"""``preds/<model>/model.json``: a base model's provenance record, and :func:`publish_model`, the one
writer of a model folder (``base train`` and ``base import`` alike).

The record, in the order written (docs/contract.md, "preds/<model>/"): ``contract_version``,
``name``, ``source`` (``trained`` or ``imported``), ``architecture``, ``parameters``,
``folds_hash``, ``created``, ``oof_logloss`` (``{"overall", "per_label"}``), ``prior_logloss``,
``n_oof``, ``n_test``, ``embedding_dim``, ``test_folds``, ``embeddings`` (v2, with embeddings),
then what only a trained model records (``training``: folds, timings, torch version, device,
world size, checkpoints) and ``sha256`` (every other file of the folder), last.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stackkit.contract import CONTRACT_VERSION, MODEL_RECORD, PredictionFolder, Workdir, test_fold_name
from stackkit.contract.io import read_json, replace_dir, write_parquet, write_set_record
from stackkit.contract.records._common import field_error, known_fields
from stackkit.errors import ContractError

SOURCES = ("trained", "imported")


@dataclass(frozen=True)
class ModelRecord:
    name: str
    source: str | None  # "trained" or "imported"; None in a hand-made record that does not say
    architecture: str | None
    parameters: dict
    folds_hash: str | None
    created: str | None
    oof_logloss: dict | None  # {"overall": float, "per_label": {label: float}}
    prior_logloss: float | None
    n_oof: int | None = None
    n_test: int | None = None
    embedding_dim: int | None = None
    test_folds: list = field(default_factory=list)  # ["test_fold0.parquet", ...] (v3), [] without
    embeddings: dict | None = None  # {"oof": "embeddings/oof.npy", "test": [...]} (v2), None without
    training: dict = field(default_factory=dict)  # base train's own entries, written at the top level
    sha256: dict | None = None  # file -> digest, filled in by the writer
    contract_version: int | None = CONTRACT_VERSION

    def to_json(self) -> dict:
        """The record as written (``sha256`` left to the set writer)."""
        out = {"contract_version": self.contract_version, "name": self.name, "source": self.source,
               "architecture": self.architecture, "parameters": self.parameters, "folds_hash": self.folds_hash,
               "created": self.created, "oof_logloss": self.oof_logloss, "prior_logloss": self.prior_logloss,
               "n_oof": self.n_oof, "n_test": self.n_test, "embedding_dim": self.embedding_dim, "test_folds": list(self.test_folds)}
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings
        out.update(self.training)
        return out

    @property
    def overall(self) -> float | None:
        """The overall OOF weighted log loss."""
        return None if self.oof_logloss is None else self.oof_logloss.get("overall")


def read_model_record(path: str | os.PathLike) -> ModelRecord | None:
    """preds/<model>/model.json checked field by field; None without one (a folder assembled by hand).

    Records of `base train` before the importer's form (contract v1-v4 work directories: a float
    ``oof_logloss`` beside ``oof_per_label``, no ``contract_version``) are read into the same form."""
    path = Path(path)
    if not path.is_file():
        return None
    record = read_json(path)
    remedy = "rerun `base train` or `base import --force` for the model"
    if not isinstance(record, dict):
        raise ContractError(f"{path}: expected a JSON object; {remedy}")
    source = record.get("source")
    if source is not None and source not in SOURCES:
        raise field_error(path, "source", source, " or ".join(SOURCES), remedy)
    score = record.get("oof_logloss")
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        score = {"overall": float(score), "per_label": dict(record.get("oof_per_label") or {})}
    elif score is not None and not (isinstance(score, dict) and "overall" in score):
        raise field_error(path, "oof_logloss", score, "an object with 'overall' and 'per_label'", remedy)
    test_folds = record.get("test_folds", [])
    if not isinstance(test_folds, list) or not all(isinstance(n, str) for n in test_folds):
        raise field_error(path, "test_folds", test_folds, "a list of file names", remedy)
    fields = known_fields(ModelRecord, record)
    training = {k: v for k, v in record.items() if k not in fields and k != "oof_per_label"}
    fields.update(name=record.get("name", path.parent.name), source=source, architecture=record.get("architecture"),
                  parameters=record.get("parameters") or {}, folds_hash=record.get("folds_hash"), created=record.get("created"),
                  oof_logloss=score, prior_logloss=record.get("prior_logloss"), test_folds=test_folds, training=training,
                  contract_version=record.get("contract_version"))
    return ModelRecord(**fields)


def publish_model(wd: Workdir, record: ModelRecord, tables: tuple, *, embeddings: Callable[[Path], dict] | None = None,
                  keep: tuple[str, ...] = ()) -> ModelRecord:
    """Write preds/<record.name>/ as one set: ``tables`` = (oof, test, per-fold test frames), the
    embeddings (``embeddings(folder)`` writes them into the new folder and returns the record's
    ``embedding_dim`` and ``embeddings``), and model.json last with the sha256 of every other file.

    The set is built in a sibling folder and switched in at once (``io.replace_dir``); ``keep``:
    top-level entries of the old folder carried over and left out of the hashes (`base train`'s
    ``_work/``). Returns the record as written."""
    oof, test, test_folds = tables
    record = dataclasses.replace(record, test_folds=[test_fold_name(k) for k in range(len(test_folds))])
    with replace_dir(wd.preds_dir(record.name), keep=keep) as folder:
        files = PredictionFolder(folder)
        write_parquet(oof, files.oof)
        write_parquet(test, files.test)
        for k, frame in enumerate(test_folds):
            write_parquet(frame, files.test_fold(k))
        if embeddings is not None:
            record = dataclasses.replace(record, **embeddings(folder))
        written = write_set_record(folder, MODEL_RECORD, record.to_json(), exclude=keep)
    return dataclasses.replace(record, sha256=written["sha256"])
