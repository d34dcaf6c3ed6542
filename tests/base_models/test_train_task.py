"""`base train` on a task work directory (`data prepare --task`): per-slice heads over the task's
prediction columns, learnt from the slice labels where a slice has them, else from its unit's
label; preds/<model>/ written with those columns (oof, test, test_fold<k>, embeddings) and read
back by the contract's readers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import Workdir
from stackkit.contract.records import read_model_record
from stackkit.contract.task_files import load_task_core
from stackkit.contract.tasks import get_task
from stackkit.contract.validate import read_oof, read_test, read_test_folds
from stackkit.data.prepare_task import prepare_task_data
from stackkit.data.synth_tasks import synthesize_task
from stackkit.errors import StackkitError
from stackkit.testing.cli import one_line_error

torch = pytest.importorskip("torch")
pytest.importorskip("pydicom")

CSPINE, ABDOMINAL = "rsna2022-cspine", "rsna2023-abdominal"
TINY = dict(arch="resnet_tiny", img_size=16, epochs=1, batch_size=16, device="cpu", progress=False, decode_workers=1)


@pytest.fixture(scope="module")
def task_workdirs(tmp_path_factory) -> dict:
    """A prepared task work directory per task: 8 patients, 16 px, the fewest slices, 2 folds."""
    out = {}
    for task, slices, seed in ((CSPINE, (21, 21), 4), (ABDOMINAL, (16, 16), 0)):
        base = tmp_path_factory.mktemp(task)
        synthesize_task(task, base / "dicom", patients=8, size=16, slices=slices, seed=seed, progress=False)
        prepare_task_data(Workdir(base / "work"), task=task, root=base / "dicom", n_folds=2, progress=False, workers=1)
        out[task] = Workdir(base / "work")
    return out


# --- targets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", [CSPINE, ABDOMINAL])
def test_slice_targets_take_slice_labels_else_the_units_label(task_workdirs, task):
    from base_models.targets import slice_targets

    core = load_task_core(task_workdirs[task])
    schema = core.schema
    targets = slice_targets(core)
    assert list(targets.columns) == ["image_id", *schema.prediction_columns]
    assert list(targets["image_id"]) == list(core.folds["image_id"])
    given = core.slice_labels.set_index("image_id").reindex(targets["image_id"])
    unit = core.metadata.set_index("image_id")[schema.unit_column].reindex(targets["image_id"])
    from_unit = core.labels.set_index(schema.unit_column).reindex(unit)
    for column in schema.prediction_columns:
        expected = given[column] if column in given.columns else from_unit[column]
        np.testing.assert_array_equal(targets[column].to_numpy(), expected.to_numpy(np.float32), err_msg=column)
    # the slice labels are not the unit's: most slices of an injured unit show nothing
    sliced = [c for c in schema.prediction_columns if c in given.columns]
    assert (targets[sliced].to_numpy() < from_unit[sliced].to_numpy()).any()


def test_a_slice_without_a_slice_label_learns_its_units_label(task_workdirs):
    from base_models.targets import slice_targets

    core = load_task_core(task_workdirs[CSPINE])
    fractured = core.labels.loc[core.labels["patient_overall"] == 1, "study_id"].iloc[0]
    of_study = core.metadata.loc[core.metadata["study_id"] == fractured, "image_id"]
    partial = dataclasses.replace(core, slice_labels=core.slice_labels[~core.slice_labels["image_id"].isin(of_study)])
    targets = slice_targets(partial).set_index("image_id")
    unit = core.labels.set_index("study_id").loc[fractured]
    for column in ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall"):
        assert (targets.loc[of_study, column] == unit[column]).all(), column


# --- base train ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", [CSPINE, ABDOMINAL])
def test_base_train_writes_the_tasks_prediction_columns(task_workdirs, task, tmp_path):
    from base_models.train import train_base

    wd = _copy(task_workdirs[task], tmp_path)
    schema = get_task(task)
    columns = list(schema.prediction_columns)
    result = train_base(wd, name="cnn", **TINY)
    assert result.complete and result.fold_models == 2
    core = load_task_core(wd)
    oof = read_oof(wd.oof("cnn"), core.folds, wd, columns=columns)
    assert list(oof.columns) == ["image_id", "fold", *columns] and len(oof) == len(core.folds)
    test = read_test(wd.test("cnn"), core.metadata, wd, columns=columns)
    assert len(test) == int((core.metadata["split"] == "test").sum())
    per_fold = read_test_folds(wd, "cnn", core.metadata, 2, test, columns=columns)
    np.testing.assert_allclose(np.mean([f[columns].to_numpy(np.float64) for f in per_fold], axis=0),
                               test[columns].to_numpy(np.float64), atol=1e-6)
    record = read_model_record(wd.model_json("cnn"))
    assert record.embedding_dim and np.load(wd.oof_embeddings("cnn")).shape == (len(oof), record.embedding_dim)
    assert set(record.oof_logloss) >= {"overall", "parts", "slice"} and record.oof_logloss["overall"] == result.unit_metric
    assert list(record.oof_logloss["slice"]["per_label"]) == columns
    assert np.isfinite([result.oof_logloss, result.prior_logloss, result.unit_metric, result.unit_prior]).all()
    assert record.parameters["windows"] != [[40.0, 80.0], [80.0, 200.0], [40.0, 380.0]]  # the task's, not the brain windows


def test_base_train_cli_on_a_task_prints_the_task_metric(task_workdirs, tmp_path):
    wd = _copy(task_workdirs[ABDOMINAL], tmp_path)
    args = ["base", "train", "--workdir", str(wd.root), "--name", "cli", "--epochs", "1", "--img-size", "16", "--device", "cpu",
            "--no-embeddings", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "cli: task metric " in result.output and "of the max over each unit's slices" in result.output
    assert sorted(p.name for p in wd.preds_dir("cli").glob("*.parquet")) == ["oof.parquet", "test.parquet", "test_fold0.parquet",
                                                                             "test_fold1.parquet"]
    refused = CliRunner().invoke(cli, [*args, "--name", "other", "--pseudo-labels", str(wd.labels)])
    assert refused.exit_code == 2
    assert "--pseudo-labels: soft labels are RSNA 2019's" in one_line_error(refused)


def test_pseudo_labels_are_refused_on_a_task_before_training(task_workdirs, tmp_path):
    from base_models.train import train_base

    wd = _copy(task_workdirs[CSPINE], tmp_path)
    with pytest.raises(StackkitError, match=r"--pseudo-labels: .* task rsna2022-cspine has none"):
        train_base(wd, name="cnn", pseudo_labels=[str(wd.labels)], **TINY)
    assert not wd.preds_root.exists()


def _copy(source: Workdir, tmp_path) -> Workdir:
    import shutil

    shutil.copytree(source.data_dir, tmp_path / "work" / "data")
    if source.cache_dir.exists():  # the pixel cache, shared by the tests of one task
        shutil.copytree(source.cache_dir, tmp_path / "work" / "cache")
    return Workdir(tmp_path / "work")
