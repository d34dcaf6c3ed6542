"""Contract v3: preds/<model>/test_fold<k>.parquet, read back by read_test_folds (all K or none)
and checked against model.json's sha256 by verify_model_files."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS
from stackkit.contract.io import write_parquet
from stackkit.contract.validate import load_core, read_test_folds, verify_model_files
from stackkit.errors import ContractError
from stackkit.testing.contract import noisy_predictions, with_folds


def _import(wd, tmp_path, name, *, per_fold: bool):
    from base_models.importer import import_predictions

    metadata, labels, folds = load_core(wd)
    n_folds = int(folds["fold"].max()) + 1
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    write_parquet(with_folds(noisy_predictions(labels, folds["image_id"], seed=1), folds), tmp_path / "oof.parquet")
    write_parquet(noisy_predictions(labels, test_ids, seed=2), tmp_path / "test.parquet")
    fold_paths = []
    for k in range(n_folds if per_fold else 0):
        frame = noisy_predictions(labels, test_ids, seed=10 + k).sample(frac=1.0, random_state=k)
        write_parquet(frame, tmp_path / f"fold{k}.parquet")
        fold_paths.append(tmp_path / f"fold{k}.parquet")
    import_predictions(wd, name, oof_path=tmp_path / "oof.parquet", test_path=None if per_fold else tmp_path / "test.parquet",
                       test_folds=fold_paths)
    return metadata, n_folds, fold_paths


def test_a_model_without_per_fold_files_reads_none(contract_workdir, tmp_path):
    wd = contract_workdir
    metadata, n_folds, _ = _import(wd, tmp_path, "plain", per_fold=False)
    assert read_test_folds(wd, "plain", metadata, n_folds) is None
    assert wd.test_fold_files("plain") == []
    verify_model_files(wd, "plain")


def test_per_fold_files_read_back_in_test_order_equal_to_the_inputs(contract_workdir, tmp_path):
    wd = contract_workdir
    metadata, n_folds, fold_paths = _import(wd, tmp_path, "m", per_fold=True)
    verify_model_files(wd, "m")
    frames = read_test_folds(wd, "m", metadata, n_folds)
    order = pd.read_parquet(wd.test("m"))["image_id"].tolist()
    assert len(frames) == n_folds
    for frame, path in zip(frames, fold_paths):
        assert frame["image_id"].tolist() == order
        given = pd.read_parquet(path).set_index("image_id").loc[order, list(LABELS)]
        np.testing.assert_array_equal(frame[list(LABELS)].to_numpy(), given.to_numpy())


def _drop_last(wd, n_folds):
    wd.test_fold("m", n_folds - 1).unlink()


def _drop_first(wd, n_folds):
    wd.test_fold("m", 0).unlink()


def _one_too_many(wd, n_folds):
    shutil.copy(wd.test_fold("m", 0), wd.test_fold("m", n_folds))


@pytest.mark.parametrize("corrupt, message", [
    (_drop_last, r"has per-fold test files test_fold0\.parquet, test_fold1\.parquet, test_fold2\.parquet; expected exactly "
                 r"test_fold0\.\.test_fold3\.parquet .* or none"),
    (_drop_first, r"has per-fold test files test_fold1\.parquet, .*; expected exactly test_fold0\.\.test_fold3"),
    (_one_too_many, r"has per-fold test files .*test_fold4\.parquet; expected exactly test_fold0\.\.test_fold3"),
], ids=["last-missing", "first-missing", "one-too-many"])
def test_a_partial_set_is_a_one_line_error(contract_workdir, tmp_path, corrupt, message):
    wd = contract_workdir
    metadata, n_folds, _ = _import(wd, tmp_path, "m", per_fold=True)
    corrupt(wd, n_folds)
    with pytest.raises(ContractError, match=message) as info:
        read_test_folds(wd, "m", metadata, n_folds)
    assert "\n" not in str(info.value) and "base import --force" in str(info.value)


def test_a_file_edited_after_import_is_refused_by_its_sha256(contract_workdir, tmp_path):
    wd = contract_workdir
    metadata, n_folds, _ = _import(wd, tmp_path, "m", per_fold=True)
    path = wd.test_fold("m", 2)
    frame = pd.read_parquet(path)
    frame.loc[0, "any"] = np.float32(0.5) if frame.loc[0, "any"] != np.float32(0.5) else np.float32(0.25)
    frame.to_parquet(path, index=False)  # still a valid prediction file: only the hash tells
    with pytest.raises(ContractError, match=r"test_fold2\.parquet: sha256 [0-9a-f]{12}\.\.\. differs from .* recorded in "
                                            r"preds/m/model\.json .*base import --force") as info:
        verify_model_files(wd, "m")
    assert "\n" not in str(info.value)


def test_a_per_fold_file_added_after_import_is_refused(contract_workdir, tmp_path):
    """A model imported without per-fold files: a set of them put in by hand is not the model's."""
    wd = contract_workdir
    metadata, n_folds, _ = _import(wd, tmp_path, "plain", per_fold=False)
    for k in range(n_folds):
        shutil.copy(wd.test("plain"), wd.test_fold("plain", k))
    with pytest.raises(ContractError, match=r"test_fold0\.parquet: not listed in preds/plain/model\.json \(added after"):
        verify_model_files(wd, "plain")


def test_a_hand_assembled_folder_without_model_json_reads_its_per_fold_files(contract_workdir, tmp_path):
    wd = contract_workdir
    metadata, n_folds, _ = _import(wd, tmp_path, "m", per_fold=True)
    wd.model_json("m").unlink()
    verify_model_files(wd, "m")  # nothing recorded, nothing to check
    assert len(read_test_folds(wd, "m", metadata, n_folds)) == n_folds
