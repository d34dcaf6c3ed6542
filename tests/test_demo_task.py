"""`demo --task`: synth -> prepare --task -> two CNNs -> unit features -> unit stack fit -> the competition's
submission -> the held-out verdict, for both tasks on a tiny dataset (1 epoch, 32 px)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import Workdir
from stackkit.contract.tasks import get_task, schema_metric
from stackkit.task_demo import read_held_out_labels, read_unit_submission, run_task_demo
from stackkit.testing.cli import one_line_error

pytest.importorskip("torch")
pytest.importorskip("pydicom")


@pytest.mark.parametrize("task", ["rsna2022-cspine", "rsna2023-abdominal"])
def test_task_demo_runs_end_to_end_and_scores_the_submission_it_wrote(task, tmp_path):
    schema = get_task(task)
    result = run_task_demo(Workdir(tmp_path / "demo"), task, patients=10, epochs=1, size=32, progress=False)
    truth = read_held_out_labels(schema, result.labels_file)
    sub = pd.read_csv(result.submission, dtype=str)
    if task == "rsna2022-cspine":
        assert list(sub.columns) == ["row_id", "fractured"] and len(sub) == 8 * len(truth) == result.submission_rows
    else:
        assert list(sub.columns) == ["patient_id", *schema.submission.columns] and len(sub) == len(truth)
    assert set(read_unit_submission(schema, result.submission)[schema.unit_column]) == set(truth[schema.unit_column])
    stack = result.rows[0]
    assert stack.kind == "stack" and stack.held_out == schema_metric(schema, truth, read_unit_submission(schema, result.submission))
    assert [r.kind for r in result.rows].count("base") == 2 and result.rows[-1].kind == "prior"
    assert np.isfinite([r.held_out.overall for r in result.rows]).all()
    assert list(result.timings) == ["synth", "prepare", "base train cnn_plain", "base train cnn_ctx1", "stack features", "stack fit",
                                    "submit", "held-out score"]


def test_demo_task_refuses_an_unknown_task_before_writing(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--task", "rsna2024-lumbar", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert "unknown task 'rsna2024-lumbar'; known tasks: rsna2019, rsna2022-cspine, rsna2023-abdominal" in one_line_error(result)
    assert not (tmp_path / "w").exists()
