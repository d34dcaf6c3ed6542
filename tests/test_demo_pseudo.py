"""`demo --pseudo-labels`: one soft-label file per fold, fold k's from fold models never trained on fold k's
rows, a CNN trained again with them, and its CV and held-out loss beside the same CNN without them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import LABELS, Workdir, file_sha256
from stackkit.data.prepare import parse_label_csv
from stackkit.data.synth import HELD_OUT_CSV
from stackkit.demo import PSEUDO_BASELINE, PSEUDO_STUDENT, run_demo
from stackkit.metric import weighted_log_loss
from stackkit.render import demo_lines
from stackkit.testing.cli import one_line_error

pytest.importorskip("torch")
pytest.importorskip("pydicom")


def test_demo_pseudo_labels_come_from_fold_models_blind_to_their_fold_and_both_cnns_are_scored(tmp_path):
    wd = Workdir(tmp_path / "demo")
    result = run_demo(wd, patients=8, epochs=1, trials=1, progress=False, pseudo_labels=True)

    folds = pd.read_parquet(wd.folds)
    labeled_ids = set(folds["image_id"])
    metadata = pd.read_parquet(wd.metadata)
    test_ids = set(metadata.loc[metadata["split"] == "test", "image_id"])
    fold_numbers = sorted(int(f) for f in folds["fold"].unique())
    assert len(fold_numbers) >= 2 and len(result.pseudo.files) == len(fold_numbers)

    # the student's record says which file joined which fold model
    student = json.loads(wd.model_json(PSEUDO_STUDENT).read_text())
    joined = {r["fold"]: r for r in student["parameters"]["pseudo_labels"]}
    assert sorted(joined) == fold_numbers
    record = json.loads((wd.root / "pseudo" / "pseudo.json").read_text())
    for entry in record["files"]:
        fold, path = entry["fold"], wd.root / entry["path"]
        assert joined[fold]["path"] == str(path) and joined[fold]["sha256"] == file_sha256(path)
        soft = pd.read_parquet(path).sort_values("image_id").reset_index(drop=True)
        assert set(soft["image_id"]) == test_ids  # unlabeled images only
        sources = []
        for source in entry["sources"]:
            teacher, fold_model = source["model"], source["fold_model"]
            assert wd.root / source["path"] == wd.test_fold(teacher, fold_model)
            # the fold model that made it predicted fold `fold`'s rows out of fold: they were its validation rows,
            # and it trained on every other labeled row and on nothing else
            oof = pd.read_parquet(wd.oof(teacher))
            validated = set(oof.loc[oof["fold"] == fold_model, "image_id"])
            assert validated == set(folds.loc[folds["fold"] == fold, "image_id"])
            trained_on = json.loads((wd.preds_dir(teacher) / "_work" / f"fold{fold_model}.json").read_text())["train_images"]
            assert trained_on == len(labeled_ids - validated)
            sources.append(pd.read_parquet(wd.root / source["path"]).sort_values("image_id")[list(LABELS)].to_numpy())
        assert {s["model"] for s in entry["sources"]} == set(result.pseudo.teachers)
        np.testing.assert_allclose(soft[list(LABELS)].to_numpy(), np.mean(sources, axis=0), rtol=1e-6)

    # no pseudo-labelled image reaches the student's OOF file
    assert set(pd.read_parquet(wd.oof(PSEUDO_STUDENT))["image_id"]) == labeled_ids

    # both CNNs' figures: CV from their records, held-out from their test files on the held-back labels
    truth = parse_label_csv(wd.root / "dicom" / HELD_OUT_CSV).sort_values("image_id")
    rows = {r.name: r for r in result.pseudo.rows}
    assert list(rows) == [f"preds/{PSEUDO_BASELINE}", f"preds/{PSEUDO_STUDENT}"]
    for name in (PSEUDO_BASELINE, PSEUDO_STUDENT):
        row = rows[f"preds/{name}"]
        assert row.cv == pytest.approx(json.loads(wd.model_json(name).read_text())["oof_logloss"]["overall"], rel=1e-6)
        test = pd.read_parquet(wd.test(name)).set_index("image_id").loc[truth["image_id"], list(LABELS)].to_numpy()
        assert row.held_out == pytest.approx(weighted_log_loss(truth[list(LABELS)].to_numpy(), test).overall, rel=1e-9)
    baseline_in_verdict = next(r for r in result.verdict.rows if r.name == f"preds/{PSEUDO_BASELINE}")
    assert rows[f"preds/{PSEUDO_BASELINE}"].held_out == pytest.approx(baseline_in_verdict.held_out, rel=1e-9)
    assert list(result.timings)[-2:] == ["pseudo-labels", f"base train {PSEUDO_STUDENT}"]

    closing = demo_lines(result)[-1]
    student_row, baseline_row = rows[f"preds/{PSEUDO_STUDENT}"], rows[f"preds/{PSEUDO_BASELINE}"]
    assert closing.startswith(f"pseudo-labels (preds/{PSEUDO_STUDENT} vs preds/{PSEUDO_BASELINE}): ")
    assert f"({student_row.held_out:.5f} against {baseline_row.held_out:.5f})" in closing
    assert f"({student_row.cv:.5f} against {baseline_row.cv:.5f})" in closing


def test_demo_pseudo_labels_refused_with_a_task_before_writing(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--task", "rsna2022-cspine", "--pseudo-labels", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert "--pseudo-labels: soft labels are RSNA 2019's six per image; task rsna2022-cspine has none" in one_line_error(result)
    assert not (tmp_path / "w").exists()
