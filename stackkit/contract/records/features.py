"""``features/manifest.json``: what every feature column means and what the features were built from.

In the order written (docs/contract.md, "features/"): ``contract_version``, ``task`` (v5: a unit task's features only), ``folds_hash``,
``lags``, ``feature_set``, ``dicom_meta``, ``models``, ``key_columns``, ``feature_columns``,
``columns`` (their definitions), ``rows``, ``test_folds`` / ``test_fold_files`` /
``models_without_test_folds`` (v3), ``inputs`` (the sha256 of every input file, by path relative
to the work directory) and ``sha256`` (both tables, every per-fold table), last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stackkit.contract import CONTRACT_VERSION, FEATURES_MANIFEST, Workdir
from stackkit.contract.io import write_json, write_set_record
from stackkit.contract.records._common import known_fields, read_object
from stackkit.errors import ContractError

RERUN_FEATURES = "rerun `stack features`"


@dataclass(frozen=True)
class FeaturesManifest:
    folds_hash: str | None
    lags: int | None
    feature_set: str | None
    dicom_meta: bool | None
    models: list | None  # None in a manifest that does not list them: every model under preds/ then
    key_columns: dict | None
    feature_columns: list
    columns: dict | None
    rows: dict | None
    test_folds: int = 0
    test_fold_files: list = field(default_factory=list)
    models_without_test_folds: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    sha256: dict | None = None
    contract_version: int | None = CONTRACT_VERSION
    task: str | None = None  # v5: the task of a unit task's features (absent for RSNA 2019's)

    def to_json(self) -> dict:
        """The record as written (``sha256`` left to the set writer)."""
        task = {} if self.task is None else {"task": self.task}
        return {"contract_version": self.contract_version, **task, "folds_hash": self.folds_hash, "lags": self.lags,
                "feature_set": self.feature_set, "dicom_meta": self.dicom_meta, "models": self.models,
                "key_columns": self.key_columns, "feature_columns": self.feature_columns, "columns": self.columns,
                "rows": self.rows, "test_folds": self.test_folds, "test_fold_files": self.test_fold_files,
                "models_without_test_folds": self.models_without_test_folds, "inputs": self.inputs}


def write_features_manifest(folder: str | os.PathLike, manifest: FeaturesManifest, *, hashes: bool = True) -> FeaturesManifest:
    """The manifest of the features/ set being written in ``folder``, last: with the sha256 of every table
    there; ``hashes=False``: without (a manifest as a hand-made features/ has it, whose tables are not checked)."""
    from dataclasses import replace

    if not hashes:
        write_json(manifest.to_json(), Path(folder) / FEATURES_MANIFEST)
        return manifest
    written = write_set_record(folder, FEATURES_MANIFEST, manifest.to_json())
    return replace(manifest, sha256=written["sha256"])


def read_features_manifest(wd: Workdir) -> FeaturesManifest:
    """features/manifest.json checked field by field: one line naming the field and `stack features` otherwise."""
    path = wd.features_manifest
    shown = wd.relative(path)
    record = read_object(path, missing="run `stack features` first", malformed=f"expected a JSON object; {RERUN_FEATURES}", shown=shown)
    inputs = record.get("inputs", {})
    if not isinstance(inputs, dict):
        raise ContractError(f"{shown}: 'inputs' must map input files to sha256; {RERUN_FEATURES}")
    columns = record.get("feature_columns")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise ContractError(f"{shown}: 'feature_columns' must be a non-empty list of column names; {RERUN_FEATURES}")
    names = record.get("test_fold_files", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ContractError(f"{shown}: 'test_fold_files' must be a list of file names; {RERUN_FEATURES}")
    models = record.get("models")
    fields = known_fields(FeaturesManifest, record)
    for name in ("folds_hash", "lags", "feature_set", "dicom_meta", "key_columns", "columns", "rows"):
        fields.setdefault(name, None)
    fields.update(models=models if isinstance(models, list) else None, inputs=inputs, test_fold_files=names,
                  contract_version=record.get("contract_version"))
    return FeaturesManifest(**fields)


def manifest_test_fold_paths(wd: Workdir, manifest: FeaturesManifest) -> tuple[Path, ...]:
    """features/test_fold<k>.parquet as the manifest lists them (v3), each present; () without per-fold test sets."""
    paths = tuple(wd.features_test_fold(k) for k in range(len(manifest.test_fold_files)))
    for name, path in zip(manifest.test_fold_files, paths):
        if name != path.name or not path.is_file():
            raise ContractError(f"{wd.relative(wd.features_manifest)}: lists {name}, expected {path.name} to exist in "
                                f"{wd.relative(wd.features_dir)}/; {RERUN_FEATURES}")
    return paths
