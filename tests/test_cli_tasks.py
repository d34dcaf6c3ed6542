"""Issue 19 end to end through the command line: a generated task work directory per task (labels at the unit,
models imported with `base import`'s library function), then `stack features` -> `stack fit` -> `submit`, the
submission in the competition's exact format; the refusals of options and inputs a unit task cannot take."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import Workdir
from stackkit.contract.io import read_artifact, write_parquet
from stackkit.contract.records import read_features_manifest, read_stacker_record, read_unit_blend_record
from stackkit.contract.tasks import schema_metric
from stackkit.testing.cli import one_line_error
from stackkit.testing.contract import snapshot
from stackkit.testing.task_exported import make_task_benchmark, prior_predictions
from stackkit.testing.task_workdir import import_task_models, write_task_workdir

pytest.importorskip("stackkit.stack.units")  # the unit stack (issue 19's other half) is what `stack fit` calls

CSPINE, ABDOMINAL = "rsna2022-cspine", "rsna2023-abdominal"
# the spine's logreg takes ~5x lgbm's time on 2 busy cores: the spine runs lgbm alone, the abdomen the default set
FIT_ARGS = {CSPINE: ["--stackers", "lgbm"], ABDOMINAL: []}


def _run(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Per task: (benchmark, work directory after submit, the three commands' output)."""
    out = {}
    for task in (CSPINE, ABDOMINAL):
        bench = make_task_benchmark(task, n_patients=24, seed=5, n_models=2, n_folds=3)
        wd = write_task_workdir(bench, tmp_path_factory.mktemp(task))
        import_task_models(bench, wd)
        outputs = [_run("stack", "features", "--workdir", wd.root, "-q"),
                   _run("stack", "fit", "--workdir", wd.root, "-q", *FIT_ARGS[task]),
                   _run("submit", "--workdir", wd.root)]
        out[task] = (bench, wd, outputs)
    return out


def test_cspine_submission_is_row_id_fractured_8_rows_per_study(pipelines):
    bench, wd, outputs = pipelines[CSPINE]
    text = wd.submission.read_text()
    assert text.splitlines()[0] == "row_id,fractured"
    sub = pd.read_csv(wd.submission, dtype={"row_id": str})
    studies = bench.test_labels["study_id"].astype(str).to_numpy()
    targets = [f"C{i}" for i in range(1, 8)] + ["patient_overall"]
    assert len(sub) == 8 * len(studies) and sub["row_id"].is_unique
    assert set(sub["row_id"]) == {f"{s}_{t}" for s in studies for t in targets}
    assert sub["fractured"].between(0, 1).all()
    # the stack learned something real: on the held-out labels it beats the train labels' rates
    wide = pd.concat([sub, sub["row_id"].str.extract(r"^(?P<study_id>.+)_(?P<target>C[1-7]|patient_overall)$")], axis=1)
    wide = wide.pivot(index="study_id", columns="target", values="fractured").reset_index()
    held_out = schema_metric(bench.schema, bench.test_labels, wide).overall
    assert held_out < schema_metric(bench.schema, bench.test_labels, prior_predictions(bench, bench.test_labels)).overall
    assert "submission (rsna2022-cspine)" in outputs[2] and f"{len(studies)} test studies, {8 * len(studies)} rows" in outputs[2]


def test_abdominal_submission_is_patient_id_and_13_columns(pipelines):
    bench, wd, _outputs = pipelines[ABDOMINAL]
    sub = pd.read_csv(wd.submission, dtype={"patient_id": str})
    assert list(sub.columns) == ["patient_id", *bench.schema.submission.columns] and len(sub.columns) == 14
    assert sorted(sub["patient_id"]) == sorted(bench.test_labels["patient_id"].astype(str))
    for group in bench.schema.groups:
        assert np.allclose(sub[list(group.classes)].sum(axis=1), 1.0, atol=1e-5), group.name
    held_out = schema_metric(bench.schema, bench.test_labels, sub).overall
    assert held_out < schema_metric(bench.schema, bench.test_labels, prior_predictions(bench, bench.test_labels)).overall


@pytest.mark.parametrize("task", [CSPINE, ABDOMINAL])
def test_features_and_stack_are_written_as_sets(pipelines, task):
    bench, wd, outputs = pipelines[task]
    unit, labels = bench.schema.unit_column, list(bench.schema.labels)
    manifest = read_features_manifest(wd)
    assert manifest.task == task and manifest.test_folds == 3 and manifest.key_columns == {"train": [unit, "fold"], "test": [unit]}
    assert {f"preds/{m}/{f}" for m in bench.models for f in ("oof.parquet", "test_fold0.parquet")} <= set(manifest.inputs)
    train = pd.read_parquet(wd.features_train)
    assert list(train.columns[:2]) == [unit, "fold"] and len(train) == len(bench.labels)
    assert all(train[c].dtype == np.float32 for c in manifest.feature_columns)
    blend = read_unit_blend_record(wd.blend, bench.schema)
    for name in blend.blend["stackers"]:
        folder = wd.stacker_folder(name)
        record = read_stacker_record(folder.path, name)  # every file checked against meta.json's sha256
        assert record.n_folds == 3 and record.n_test_folds == 3 and record.score["overall"] > 0
        oof = pd.read_parquet(folder.oof)
        assert list(oof.columns) == [unit, "fold", *labels] and len(oof) == len(bench.labels)
        for k in range(3):
            fold_record = json.loads(read_artifact(folder.fold_model(k).record))  # the sidecar checked first
            assert fold_record["state"]["files"] and all(read_artifact(folder.fold_model(k).path / f) for f in fold_record["state"]["files"])
            assert pd.read_parquet(folder.test_fold(k))[unit].nunique() == len(bench.test_labels)
    assert (wd.stack_root / "report.html").is_file()
    table = [line for line in outputs[1].splitlines() if line.startswith(("preds/", "stack/", "blend-cv "))]
    assert len(table) == len(bench.models) + len(blend.blend["stackers"]) + 1
    assert len([line for line in table if re.search(r"\d\* ", line)]) == 1  # the best row marked


def _copy(pipelines, task, tmp_path) -> Workdir:
    shutil.copytree(pipelines[task][1].root, tmp_path / "wd")
    return Workdir(tmp_path / "wd")


REFUSED_OPTIONS = [
    (["stack", "features", "--lags", "3"], r"--lags: task 'rsna2022-cspine' stacks per study: its features aggregate each study's slices"),
    (["stack", "features", "--feature-set", "wide"], r"--feature-set wide: task 'rsna2022-cspine' stacks per study"),
    (["stack", "features", "--dicom-meta"], r"--dicom-meta: task 'rsna2022-cspine' stacks per study"),
    (["stack", "fit", "--stackers", "lgbm,seq"], r"--stackers seq: a sequence stacker reads each study's slices in order"),
    (["stack", "fit", "--tune"], r"--tune: task 'rsna2022-cspine' stacks one row per study; its stackers have no Optuna search"),
    (["stack", "fit", "--base-in-blend"], r"--base-in-blend: task 'rsna2022-cspine' stacks one row per study; its blend mixes the stackers only"),
    (["stack", "fit", "--device", "cuda"], r"--device cuda: task 'rsna2022-cspine' stacks one row per study; its stackers run on the CPU"),
    (["submit", "--test-dicom-dir", "."], r"--test-dicom-dir: task 'rsna2022-cspine' submits one entry per study"),
]


@pytest.mark.parametrize("args, message", REFUSED_OPTIONS, ids=[" ".join(a) for a, _m in REFUSED_OPTIONS])
def test_options_a_unit_task_cannot_take_are_refused_in_one_line(pipelines, tmp_path, args, message):
    wd = _copy(pipelines, CSPINE, tmp_path)
    before = snapshot(wd.root)
    result = CliRunner().invoke(cli, [*args, "--workdir", str(wd.root)])
    assert result.exit_code == 2
    assert message in one_line_error(result)
    assert snapshot(wd.root) == before


def _labels_with_unknown_unit(wd, bench):
    labels = pd.read_parquet(wd.labels)
    labels.loc[0, bench.schema.unit_column] = "999999"
    write_parquet(labels, wd.labels)
    return r"data/labels\.parquet: patient_id '999999' at row 1 is not a train patient in data/metadata\.parquet"


def _softmax_two_ones(wd, bench):
    labels = pd.read_parquet(wd.labels)
    row = int(np.argmax(labels["liver_healthy"].to_numpy() == 1))
    labels.loc[row, "liver_high"] = 1
    write_parquet(labels, wd.labels)
    return (rf"data/labels\.parquet: 2 of liver_healthy, liver_low, liver_high are 1 at row {row + 1} "
            rf"\(patient_id {labels['patient_id'].iloc[row]}\); expected exactly one \(softmax group 'liver'\)")


def _changed_stacker_test(wd, bench):
    path = wd.stacker_folder("lgbm").test_fold(1)
    frame = pd.read_parquet(path)
    write_parquet(frame.iloc[::-1], path)
    return r"stack/lgbm/test_fold1\.parquet: changed since stack/blend\.json was fitted \(sha256 differs\); rerun `stack fit`"


BAD_INPUTS = [(["stack", "features"], _labels_with_unknown_unit), (["stack", "fit"], _softmax_two_ones), (["submit"], _changed_stacker_test)]


@pytest.mark.parametrize("command, corrupt", BAD_INPUTS, ids=[c.__name__ for _a, c in BAD_INPUTS])
def test_bad_task_inputs_are_one_line_naming_file_column_and_unit(pipelines, tmp_path, command, corrupt):
    wd = _copy(pipelines, ABDOMINAL, tmp_path)
    message = corrupt(wd, pipelines[ABDOMINAL][0])
    result = CliRunner().invoke(cli, [*command, "--workdir", str(wd.root)])
    assert result.exit_code == 2
    assert re.search(message, one_line_error(result)), one_line_error(result)


def test_import_of_predictions_missing_a_prediction_column_is_refused(pipelines, tmp_path):
    bench, _wd, _outputs = pipelines[CSPINE]
    wd = _copy(pipelines, CSPINE, tmp_path)
    oof = tmp_path / "oof.csv"
    bench.oof[bench.models[0]].drop(columns=["C3"]).to_csv(oof, index=False)
    test = tmp_path / "test.csv"
    bench.test[bench.models[0]].to_csv(test, index=False)
    before = snapshot(wd.root)
    result = CliRunner().invoke(cli, ["base", "import", "again", "--workdir", str(wd.root), "--oof", str(oof), "--test", str(test)])
    assert result.exit_code == 2
    assert (f"{oof}: missing column(s) C3; found [image_id, fold, C1, C2, C4, C5, C6, C7, patient_overall]; expected image_id + "
            "C1, C2, C3, C4, C5, C6, C7, patient_overall (wide) or ID,Label (RSNA long)") in one_line_error(result)
    assert snapshot(wd.root) == before


def test_sample_submission_checks_the_units(pipelines, tmp_path):
    bench, _wd, _outputs = pipelines[ABDOMINAL]
    wd = _copy(pipelines, ABDOMINAL, tmp_path)
    sample = tmp_path / "sample_submission.csv"
    patients = sorted(bench.test_labels["patient_id"].astype(str))
    pd.DataFrame({"patient_id": patients, **{c: 0.5 for c in bench.schema.submission.columns}}).to_csv(sample, index=False)
    _run("submit", "--workdir", wd.root, "--sample-submission", sample)
    pd.DataFrame({"patient_id": patients[1:], **{c: 0.5 for c in bench.schema.submission.columns}}).to_csv(sample, index=False)
    result = CliRunner().invoke(cli, ["submit", "--workdir", str(wd.root), "--sample-submission", str(sample)])
    assert result.exit_code == 2 and f"has no patient {patients[0]} (1 of the submission's patients are not in it)" in one_line_error(result)


def test_a_rerun_with_fewer_stackers_keeps_the_others_unchanged(pipelines, tmp_path):
    wd = _copy(pipelines, ABDOMINAL, tmp_path)
    lgbm = snapshot(wd.stack_dir("lgbm"))
    output = _run("stack", "fit", "--workdir", wd.root, "-q", "--stackers", "logreg")
    blend = read_unit_blend_record(wd.blend, pipelines[ABDOMINAL][0].schema)
    assert blend.blend["stackers"] == ["logreg"] and blend.stackers_kept == ["lgbm"] and [s["name"] for s in blend.sources] == ["stack/logreg"]
    assert snapshot(wd.stack_dir("lgbm")) == lgbm and "kept unchanged from an earlier run (not in this blend): stack/lgbm" in output
    assert "blend of stack/logreg" in _run("submit", "--workdir", wd.root)


def test_an_interrupted_fit_leaves_the_previous_stack(pipelines, tmp_path, monkeypatch):
    import stackkit.stack.unit_fit as unit_fit

    wd = _copy(pipelines, ABDOMINAL, tmp_path)
    before = snapshot(wd.root)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(unit_fit, "write_unit_blend_record", interrupted)  # every stacker's folder written, the record not
    with pytest.raises(KeyboardInterrupt):
        unit_fit.run_unit_fit(wd, stackers=["logreg"])
    assert snapshot(wd.root) == before and not [p for p in wd.root.iterdir() if p.name.startswith(".stack")]


def _features_of_another_task(wd, _bench):
    record = json.loads(wd.features_manifest.read_text())
    wd.features_manifest.write_text(json.dumps({**record, "task": ABDOMINAL}))
    return r"features/manifest\.json: built for task 'rsna2023-abdominal', data/task\.json says 'rsna2022-cspine'; rerun `stack features`"


def _predictions_changed_after_the_features(wd, bench):
    model = bench.models[0]
    frame = pd.read_parquet(wd.oof(model))
    write_parquet(frame.assign(C1=frame["C1"] * 0.5), wd.oof(model))
    return rf"preds/{model}/oof\.parquet: sha256 .* differs from .* recorded in preds/{model}/model\.json"


@pytest.mark.parametrize("corrupt", [_features_of_another_task, _predictions_changed_after_the_features])
def test_stack_fit_refuses_stale_features_before_fitting(pipelines, tmp_path, corrupt):
    bench, _wd, _outputs = pipelines[CSPINE]
    wd = _copy(pipelines, CSPINE, tmp_path)
    message = corrupt(wd, bench)
    before = snapshot(wd.stack_root)
    result = CliRunner().invoke(cli, ["stack", "fit", "--workdir", str(wd.root), "--stackers", "lgbm"])
    assert result.exit_code == 2 and re.search(message, one_line_error(result)), one_line_error(result)
    assert snapshot(wd.stack_root) == before
