"""The contract's records (stackkit.contract.records): each written by its one writer, read back by its
one reader, and a bad field refused in one line naming the file and the field."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import CONTRACT_VERSION, LABELS, Workdir, file_sha256
from stackkit.contract.io import write_json
from stackkit.contract.records import (BlendRecord, FeaturesManifest, FoldModelRecord, ModelRecord, TaskRecord, publish_model,
                                       read_blend_record, read_features_manifest, read_fold_model_record, read_model_record,
                                       read_stacker_record, read_task, read_task_record, write_blend_record, write_features_manifest,
                                       write_fold_model_record, write_task_record)
from stackkit.errors import ContractError, StackkitError


def _frame(ids, fold=None) -> pd.DataFrame:
    frame = pd.DataFrame(np.full((len(ids), len(LABELS)), 0.25, dtype=np.float32), columns=list(LABELS))
    if fold is not None:
        frame.insert(0, "fold", np.asarray(fold, dtype=np.int8))
    frame.insert(0, "image_id", ids)
    return frame


def _model(name="m1", **changes) -> ModelRecord:
    fields = dict(name=name, source="imported", architecture=None, parameters={"logits": False}, folds_hash="ab" * 32,
                  created="2026-01-01T00:00:00+00:00", oof_logloss={"overall": 0.3, "per_label": {label: 0.3 for label in LABELS}},
                  prior_logloss=0.4, n_oof=2, n_test=1)
    return ModelRecord(**{**fields, **changes})


def test_publish_model_writes_the_set_and_the_reader_reads_the_record_back(tmp_path):
    wd = Workdir(tmp_path)
    tables = (_frame(["ID_a", "ID_b"], [0, 1]), _frame(["ID_t"]), [_frame(["ID_t"]), _frame(["ID_t"])])
    written = publish_model(wd, _model(), tables)
    assert written.test_folds == ["test_fold0.parquet", "test_fold1.parquet"]
    assert sorted(written.sha256) == ["oof.parquet", "test.parquet", "test_fold0.parquet", "test_fold1.parquet"]
    raw = json.loads(wd.model_json("m1").read_text())
    assert list(raw)[:3] == ["contract_version", "name", "source"] and list(raw)[-1] == "sha256"
    assert raw["contract_version"] == CONTRACT_VERSION and raw["oof_logloss"]["overall"] == 0.3
    assert read_model_record(wd.model_json("m1")) == written


def test_a_trained_record_keeps_its_own_entries_at_the_top_level(tmp_path):
    wd = Workdir(tmp_path)
    record = _model("t1", source="trained", architecture="resnet_tiny", training={"world_size": 1, "device": "cpu"})
    publish_model(wd, record, (_frame(["ID_a"], [0]), _frame(["ID_t"]), []))
    raw = json.loads(wd.model_json("t1").read_text())
    assert raw["world_size"] == 1 and raw["device"] == "cpu" and "training" not in raw
    assert read_model_record(wd.model_json("t1")).training == {"world_size": 1, "device": "cpu"}


def test_an_older_trained_record_is_read_in_the_importers_form(tmp_path):
    path = tmp_path / "model.json"
    write_json({"source": "trained", "oof_logloss": 0.2, "oof_per_label": {"any": 0.1}, "device": "cpu"}, path)
    record = read_model_record(path)
    assert record.oof_logloss == {"overall": 0.2, "per_label": {"any": 0.1}} and record.overall == 0.2
    assert record.name == tmp_path.name and record.contract_version is None and record.training == {"device": "cpu"}


@pytest.mark.parametrize(
    "content, match",
    [
        ([1, 2], r"model\.json: expected a JSON object"),
        ({"source": "bought"}, r"model\.json: 'source' is 'bought'; expected trained or imported"),
        ({"oof_logloss": "low"}, r"model\.json: 'oof_logloss' is 'low'; expected an object with 'overall'"),
        ({"test_folds": "test_fold0.parquet"}, r"model\.json: 'test_folds' is .*; expected a list of file names"),
    ],
)
def test_a_bad_model_record_is_one_line_naming_the_field(tmp_path, content, match):
    path = tmp_path / "model.json"
    write_json(content, path)
    with pytest.raises(ContractError, match=match):
        read_model_record(path)


def test_no_model_record_is_none(tmp_path):
    assert read_model_record(tmp_path / "model.json") is None


def _manifest(**changes) -> FeaturesManifest:
    fields = dict(folds_hash="ab" * 32, lags=1, feature_set="basic", dicom_meta=False, models=["m1"], key_columns=None,
                  feature_columns=["slice__index"], columns={"slice__index": "index"}, rows={"train": 2, "test": 1})
    return FeaturesManifest(**{**fields, **changes})


def test_the_features_manifest_round_trips_with_the_tables_hashes(tmp_path):
    wd = Workdir(tmp_path)
    wd.features_dir.mkdir()
    wd.features_train.write_bytes(b"train")
    written = write_features_manifest(wd.features_dir, _manifest())
    assert written.sha256 == {"train.parquet": file_sha256(wd.features_train)}
    assert read_features_manifest(wd) == written


@pytest.mark.parametrize(
    "change, match",
    [
        ({"inputs": ["a"]}, r"features/manifest\.json: 'inputs' must map input files to sha256"),
        ({"feature_columns": []}, r"features/manifest\.json: 'feature_columns' must be a non-empty list"),
        ({"test_fold_files": "x"}, r"features/manifest\.json: 'test_fold_files' must be a list of file names"),
    ],
)
def test_a_bad_manifest_field_is_refused_naming_it(tmp_path, change, match):
    wd = Workdir(tmp_path)
    write_json({**_manifest().to_json(), **change}, wd.features_manifest)
    with pytest.raises(ContractError, match=match):
        read_features_manifest(wd)


def _blend(**changes) -> BlendRecord:
    params = {"weights": {label: {"stack/lgbm": 1.0} for label in LABELS}, "temperature": {label: 1.0 for label in LABELS},
              "bias": {label: 0.0 for label in LABELS}, "clip": 1e-6, "any_consistency": False, "space": "logit"}
    fields = dict(sources=[{"name": "stack/lgbm", "test": "stack/lgbm/test.parquet", "test_folds": []}], params=params)
    return BlendRecord(**{**fields, **changes})


def test_the_blend_record_round_trips(tmp_path):
    path = write_blend_record(_blend(seed=3, stackers_kept=["xgb"]), tmp_path / "blend.json")
    record = read_blend_record(path)
    assert record.seed == 3 and record.stackers_kept == ["xgb"] and record.source_names == ["stack/lgbm"]
    assert record.params["clip"] == 1e-6 and record.to_json() == json.loads(path.read_text())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"sources": []}, r"blend\.json: lists no sources"),
        ({"clip": 0.7}, r"blend\.json: 'clip' is 0\.7; expected a number in \[0, 0\.5\)"),
        ({"space": "odds"}, r"blend\.json: 'space' is 'odds'; expected logit or probability"),
        ({"test_sets": 0}, r"blend\.json: 'test_sets' is 0; expected a positive integer"),
    ],
)
def test_a_bad_blend_field_is_refused_naming_it(tmp_path, change, match):
    path = tmp_path / "blend.json"
    write_json({**_blend().to_json(), **change}, path)
    with pytest.raises(ContractError, match=match):
        read_blend_record(path)


def test_a_missing_blend_record_names_stack_fit(tmp_path):
    with pytest.raises(StackkitError, match=r"blend\.json: not found; run `stack fit` first"):
        read_blend_record(tmp_path / "blend.json")


def test_a_stacker_record_needs_a_positive_fold_count(tmp_path):
    write_json({"stacker": "lgbm", "n_folds": 0}, tmp_path / "meta.json")
    with pytest.raises(ContractError, match=r"meta\.json: 'n_folds' must be a positive integer"):
        read_stacker_record(tmp_path, "lgbm")
    write_json({"stacker": "lgbm", "n_folds": 3, "test_folds": ["test_fold0.parquet"]}, tmp_path / "meta.json")
    assert read_stacker_record(tmp_path, "lgbm").n_test_folds == 1


def test_a_fold_model_record_round_trips_and_refuses_another_stacker(tmp_path):
    record = FoldModelRecord("lgbm", {"num_leaves": 15}, 12, {"priors": [0.1]})
    write_fold_model_record(tmp_path, record)
    assert read_fold_model_record(tmp_path, "lgbm") == record
    with pytest.raises(StackkitError, match=r"stacker\.json: holds a 'lgbm' model, expected 'xgb'"):
        read_fold_model_record(tmp_path, "xgb")


def test_the_task_record_round_trips_and_its_absence_is_rsna2019(tmp_path):
    workdir = Workdir(tmp_path)
    workdir.data_dir.mkdir()
    assert read_task(workdir).name == "rsna2019" and read_task_record(workdir.data_dir) is None
    write_task_record(workdir.data_dir, TaskRecord("rsna2023-abdominal"))
    assert json.loads(workdir.task_record.read_text()) == {"contract_version": 5, "task": "rsna2023-abdominal"}
    assert read_task(workdir).unit == "patient"


@pytest.mark.parametrize(
    "content, match",
    [
        ({"contract_version": 5, "task": "rsna2024-lumbar"}, r"task\.json: 'task' is 'rsna2024-lumbar'; expected one of rsna2019, "),
        ({"contract_version": 4, "task": "rsna2019"}, r"task\.json: 'contract_version' is 4; expected an integer >= 5"),
        ({"task": "rsna2019"}, r"task\.json: 'contract_version' is None"),
        (["rsna2019"], r"task\.json: not a JSON object; rerun `data prepare --task NAME`"),
    ],
)
def test_a_bad_task_record_is_one_line_naming_the_field(tmp_path, content, match):
    write_json(content, tmp_path / "task.json")
    with pytest.raises(ContractError, match=match) as info:
        read_task_record(tmp_path)
    assert "\n" not in str(info.value)


def test_an_unknown_task_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ContractError, match=r"unknown task 'cspine'; known tasks: rsna2019, rsna2022-cspine"):
        write_task_record(tmp_path, TaskRecord("cspine"))
    assert not (tmp_path / "task.json").exists()
