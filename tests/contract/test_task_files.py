"""Contract v5: a task work directory's data/ (labels at the unit, slice labels, folds per slice) and its readers.

The refusals are one table per file: each names the file, the column and the unit (or image) id."""

import json

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import CONTRACT_VERSION, Workdir
from stackkit.contract.io import write_parquet
from stackkit.contract.records import read_task
from stackkit.contract.task_files import load_task_core, unit_columns_to_labels, validate_unit_predictions, write_task_data
from stackkit.contract.tasks import get_task, schema_metric
from stackkit.contract.validate import load_core
from stackkit.errors import ContractError, LeakageError, StackkitError
from stackkit.testing.task_exported import make_task_benchmark, max_aggregation
from stackkit.testing.task_workdir import import_task_models, task_folds, task_metadata, write_task_workdir

CSPINE, ABDOMINAL = "rsna2022-cspine", "rsna2023-abdominal"


@pytest.fixture(scope="module")
def benches():
    return {task: make_task_benchmark(task, n_patients=18, seed=3, n_models=2, n_folds=3) for task in (CSPINE, ABDOMINAL)}


def _tables(bench):
    labels = bench.labels.copy()
    labels[list(bench.schema.labels)] = labels[list(bench.schema.labels)].astype(np.int8)
    train_ids = bench.slices.loc[bench.slices["split"] == "train", "image_id"]
    slice_labels = bench.slice_labels[bench.slice_labels["image_id"].isin(train_ids)].reset_index(drop=True)
    return {"metadata": task_metadata(bench), "labels": labels, "folds": task_folds(bench), "slice_labels": slice_labels}


def _set(frame, column, row, value):
    frame = frame.copy()
    frame[column] = frame[column].astype(object)
    frame.loc[frame.index[row], column] = value
    return frame


def _two_ones(labels):
    """The first patient with a healthy kidney also gets a low-grade one."""
    row = int(np.argmax(labels["kidney_healthy"].to_numpy() == 1))
    return _set(labels, "kidney_low", row, 1), labels["patient_id"].iloc[row]


def _split_patient(metadata):
    """One train patient's second series moved to the test split."""
    train = metadata[metadata["split"] == "train"]
    series = train.groupby("patient_id")["study_id"].unique()
    patient = series.index[series.map(len).to_numpy() > 1][0]
    moved = metadata.copy()
    moved.loc[moved["study_id"] == series[patient][1], "split"] = "test"
    return moved, patient


# (task, file, corrupt(tables) -> (new frame, the id the message names), message)
BAD_DATA = [
    (CSPINE, "labels", lambda t: (_set(t["labels"], "study_id", 0, "1.2.3.nope"), "1.2.3.nope"),
     r"^labels: study_id '1\.2\.3\.nope' at row 1 is not a train study in data/metadata\.parquet$"),
    (CSPINE, "labels", lambda t: (t["labels"].iloc[1:], t["labels"]["study_id"].iloc[0]),
     r"^labels: 1 train study\(s\) missing, e\.g\. study_id '{id}'; every train study must appear exactly once$"),
    (CSPINE, "labels", lambda t: (t["labels"].rename(columns={"C3": "c3"}), None), r"^labels: missing column\(s\) C3; found \["),
    (CSPINE, "labels", lambda t: (_set(t["labels"], "C1", 1, 2), t["labels"]["study_id"].iloc[1]),
     r"^labels: column 'C1' has 2 at row 2 \(study_id {id}\); labels must be 0 or 1$"),
    (CSPINE, "labels", lambda t: (pd.concat([t["labels"], t["labels"].iloc[[0]]]), t["labels"]["study_id"].iloc[0]),
     r"^labels: duplicate study_id '{id}' at row \d+; each id must appear once$"),
    (ABDOMINAL, "labels", lambda t: _two_ones(t["labels"]),
     r"^labels: 2 of kidney_healthy, kidney_low, kidney_high are 1 at row \d+ \(patient_id {id}\); expected exactly one "
     r"\(softmax group 'kidney'\)$"),
    (ABDOMINAL, "labels", lambda t: (_set(t["labels"], "bowel_healthy", 0, 1 - int(t["labels"]["bowel_healthy"].iloc[0]))
                                     .pipe(lambda f: _set(f, "bowel_injury", 0, int(t["labels"]["bowel_injury"].iloc[0]))),
                                     t["labels"]["patient_id"].iloc[0]),
     r"^labels: [02] of bowel_healthy, bowel_injury are 1 at row 1 \(patient_id {id}\); expected exactly one \(softmax group 'bowel'\)$"),
    (CSPINE, "slice_labels", lambda t: (t["slice_labels"].assign(any=0), None),
     r"^slice labels: column 'any' is not a prediction column of task 'rsna2022-cspine'$"),
    (CSPINE, "folds", lambda t: (t["folds"].iloc[1:], t["folds"]["image_id"].iloc[0]),
     r"^folds: 1 train image\(s\) missing, e\.g\. image_id '{id}'; every train image must appear exactly once$"),
    (ABDOMINAL, "metadata", lambda t: _split_patient(t["metadata"]),
     r"^metadata: patient_id '{id}' is in both train and test splits; a patient belongs to one$"),
]


@pytest.mark.parametrize("task, which, corrupt, message", BAD_DATA, ids=[f"{t}-{w}-{i}" for i, (t, w, _c, _m) in enumerate(BAD_DATA)])
def test_task_data_refusals_name_file_column_and_unit(benches, tmp_path, task, which, corrupt, message):
    bench = benches[task]
    tables = _tables(bench)
    tables[which], named = corrupt(tables)
    with pytest.raises(ContractError, match=message.replace("{id}", str(named).replace(".", r"\."))):
        write_task_data(tmp_path, bench.schema, **tables)
    assert not (tmp_path / "data").exists()  # nothing written


def test_task_workdir_round_trip_and_readers(benches, tmp_path):
    bench = benches[ABDOMINAL]
    wd = write_task_workdir(bench, tmp_path)
    assert json.loads(wd.task_record.read_text()) == {"contract_version": CONTRACT_VERSION, "task": ABDOMINAL}
    assert read_task(wd) is get_task(ABDOMINAL)
    core = load_task_core(wd)
    assert list(core.labels.columns) == ["patient_id", *bench.schema.labels]
    assert core.labels[list(bench.schema.labels)].dtypes.eq(np.int8).all()
    assert (core.labels["patient_id"].to_numpy() == np.sort(bench.labels["patient_id"].to_numpy())).all()
    # a patient's series share its fold; the units' folds are the benchmark's
    expected = bench.folds.set_index("patient_id")["fold"]
    assert (core.unit_folds.set_index("patient_id")["fold"] == expected.reindex(core.unit_folds["patient_id"]).to_numpy()).all()
    assert set(core.slice_labels.columns) == {"image_id", *bench.columns}
    with pytest.raises(StackkitError, match=r"task\.json: task 'rsna2023-abdominal' is scored per patient, and this step reads "
                                            r"per-slice \(RSNA 2019\) work directories only"):
        load_core(wd)


def test_a_labels_file_edited_by_hand_is_refused_naming_it(benches, tmp_path):
    bench = benches[CSPINE]
    wd = write_task_workdir(bench, tmp_path)
    labels = pd.read_parquet(wd.labels)
    write_parquet(labels.drop(columns=["patient_overall"]), wd.labels)
    with pytest.raises(ContractError, match=r"^data/labels\.parquet: missing column\(s\) patient_overall"):
        load_task_core(wd)


def test_import_scores_the_max_aggregation_with_the_task_metric(benches, tmp_path):
    bench = benches[CSPINE]
    wd = write_task_workdir(bench, tmp_path)
    import_task_models(bench, wd)
    for model in bench.models:
        record = json.loads(wd.model_json(model).read_text())
        # the benchmark's own plain aggregation, scored independently of the importer
        expected = schema_metric(bench.schema, bench.labels, max_aggregation(bench, bench.oof[model]))
        assert record["oof_logloss"]["overall"] == pytest.approx(expected.overall, rel=1e-6)
        assert record["oof_logloss"]["parts"] == pytest.approx(expected.parts, rel=1e-6)
        assert record["prior_logloss"] > record["oof_logloss"]["overall"]
        assert record["contract_version"] == CONTRACT_VERSION and record["test_folds"] == [f"test_fold{k}.parquet" for k in range(3)]
        assert list(pd.read_parquet(wd.oof(model)).columns) == ["image_id", "fold", *bench.schema.prediction_columns]


def test_unit_columns_to_labels_hand_computed():
    schema = get_task(ABDOMINAL)
    maxima = pd.DataFrame({"bowel_injury": [0.2], "extravasation_injury": [0.0], "kidney_low": [0.3], "kidney_high": [0.1],
                           "liver_low": [0.0], "liver_high": [0.0], "spleen_low": [0.5], "spleen_high": [0.5]},
                          index=pd.Index(["7"], name="patient_id"))
    out = unit_columns_to_labels(schema, maxima).iloc[0]
    # kidney: healthy = 1 - max(0.3, 0.1) = 0.7, then (0.7, 0.3, 0.1) / 1.1
    assert out[["kidney_healthy", "kidney_low", "kidney_high"]].tolist() == pytest.approx([0.7 / 1.1, 0.3 / 1.1, 0.1 / 1.1])
    # bowel: (0.8, 0.2) already sums to 1; spleen: healthy 0.5, then (0.5, 0.5, 0.5) / 1.5
    assert out[["bowel_healthy", "bowel_injury"]].tolist() == pytest.approx([0.8, 0.2])
    assert out["spleen_high"] == pytest.approx(1 / 3)


def test_unit_predictions_folds_that_disagree_are_leakage(benches, tmp_path):
    bench = benches[CSPINE]
    core = load_task_core(write_task_workdir(bench, tmp_path))
    oof = core.unit_folds.assign(**{c: 0.5 for c in bench.schema.labels})
    assert len(validate_unit_predictions(oof, "oof", bench.schema, expected_units=core.unit_folds["study_id"], folds=core.unit_folds)) == len(oof)
    moved = _set(oof, "fold", 0, (int(oof["fold"].iloc[0]) + 1) % 3)
    with pytest.raises(LeakageError, match=r"^oof: fold \d at row 1 \(study_id .*\) disagrees with data/folds\.parquet"):
        validate_unit_predictions(moved, "oof", bench.schema, expected_units=core.unit_folds["study_id"], folds=core.unit_folds)
    assert Workdir(tmp_path).slice_labels.is_file()


def test_an_rsna2019_task_record_reads_as_before(contract_workdir):
    from stackkit.contract.records import TaskRecord, write_task_record

    before = load_core(contract_workdir)
    write_task_record(contract_workdir.data_dir, TaskRecord("rsna2019"))
    after = load_core(contract_workdir)
    assert read_task(contract_workdir) is get_task("rsna2019")
    for old, new in zip(before, after):
        pd.testing.assert_frame_equal(old, new)
    with pytest.raises(StackkitError, match=r"task 'rsna2019' is scored per slice; read it with stackkit\.contract\.validate\.load_core"):
        load_task_core(contract_workdir)


def test_base_import_takes_the_same_options_in_a_task_work_directory(benches, tmp_path):
    """The long layout (``ID`` = ``<image_id>_<column>``), logits and --folds-from-data, with the task's prediction columns."""
    from click.testing import CliRunner

    from stackkit.cli import cli

    bench = benches[ABDOMINAL]
    wd = write_task_workdir(bench, tmp_path / "wd")
    model, columns = bench.models[0], list(bench.schema.prediction_columns)
    oof = bench.oof[model]
    p = oof[columns].to_numpy(np.float64).clip(1e-6, 1 - 1e-6)
    long = pd.DataFrame({"ID": np.char.add(np.char.add(np.repeat(oof["image_id"].to_numpy().astype(str), len(columns)), "_"),
                                           np.tile(np.array(columns), len(oof))),
                         "Label": np.log(p / (1 - p)).reshape(-1)})
    long.to_csv(tmp_path / "oof_long.csv", index=False)
    bench.test[model].to_parquet(tmp_path / "test.parquet")
    args = ["base", "import", model, "--workdir", str(wd.root), "--oof", str(tmp_path / "oof_long.csv"), "--test", str(tmp_path / "test.parquet")]
    refused = CliRunner().invoke(cli, [*args, "--logits"])
    assert refused.exit_code == 2 and "no 'fold' column" in refused.output
    result = CliRunner().invoke(cli, [*args, "--logits", "--folds-from-data"], catch_exceptions=False)
    assert result.exit_code == 2 and "every value is in [0, 1]" in result.output  # the --test file holds probabilities
    bench.test[model].assign(**{c: np.log(bench.test[model][c].clip(1e-6, 1 - 1e-6) / (1 - bench.test[model][c].clip(1e-6, 1 - 1e-6)))
                                for c in columns}).to_parquet(tmp_path / "test.parquet")
    result = CliRunner().invoke(cli, [*args, "--logits", "--folds-from-data"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    stored = pd.read_parquet(wd.oof(model)).set_index("image_id").loc[oof["image_id"]]
    assert np.allclose(stored[columns].to_numpy(), p, atol=1e-6)
    assert (stored["fold"].to_numpy() == oof["fold"].to_numpy()).all()
    assert json.loads(wd.model_json(model).read_text())["parameters"]["folds_from_data"] is True
