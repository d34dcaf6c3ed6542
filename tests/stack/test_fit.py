"""`stack fit [--tune]` end to end on a small hand-assembled work directory, and its refusals."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS, Workdir
from stackkit.errors import LeakageError, StackkitError
from stackkit.stack.fit import run_stack_fit
from stackkit.contract.io import read_json, write_json, write_parquet
from stackkit.metric import weighted_log_loss
from stackkit.render import fit_lines, score_table
from stackkit.stack.report import ScoreRow
from stackkit.contract.validate import load_core, read_oof

from stackkit.testing.contract import copy_workdir, move_oof_fold, snapshot
from stackkit.testing.stack import base_model_workdir

# the fastest stacker on two CPU cores; the others share the Stacker interface and their own tests
FAST = "mlp"


@pytest.fixture(scope="module")
def features_template(tmp_path_factory):
    from features.api import run_stack_features

    wd = base_model_workdir(tmp_path_factory.mktemp("fit") / "work", n_patients=20)
    run_stack_features(wd, lags=1, progress=False)
    return wd


@pytest.fixture
def wd(features_template, tmp_path) -> Workdir:
    return copy_workdir(features_template, tmp_path / "work")


def _images_in_report(wd) -> int:
    return len(re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", wd.report_html.read_text()))


def _oof_scores(wd, record) -> list[float]:
    _, labels, folds = load_core(wd)
    ids = folds["image_id"].to_numpy(dtype=object)
    y = labels.set_index("image_id").reindex(ids)[list(LABELS)].to_numpy()
    return [weighted_log_loss(y, pd.read_parquet(wd.root / s["oof"]).set_index("image_id").reindex(ids)[list(LABELS)].to_numpy()).overall
            for s in record["sources"]]


def test_fit_without_tune_writes_stackers_blend_and_report(wd):
    summary = run_stack_fit(wd, stackers=[FAST], progress=False, blend_base_models=True)
    _, labels, folds = load_core(wd)
    oof = read_oof(wd.stack_dir(FAST) / "oof.parquet", folds, wd)  # contract format, folds agree
    assert (wd.stack_dir(FAST) / "test.parquet").is_file() and (wd.stack_dir(FAST) / "meta.json").is_file()

    record = read_json(wd.blend)
    names = [s["name"] for s in record["sources"]]
    assert names == [f"stack/{FAST}", "preds/m1", "preds/m2"]
    weights = np.array([[record["weights"][l][n] for l in LABELS] for n in names])
    assert np.allclose(weights.sum(axis=0), 1.0) and (weights >= 0).all()
    assert record["tuned"] is False and record["optuna"] is None and record["space"] == "logit"
    # the stacker's recorded OOF score is the metric on its OOF file
    merged = labels.merge(oof, on="image_id", suffixes=("", "_p"))
    expected = weighted_log_loss(merged[list(LABELS)].to_numpy(), merged[[f"{l}_p" for l in LABELS]].to_numpy()).overall
    assert np.isclose(record["sources"][0]["oof_score"]["overall"], expected)
    # every source and every recipe is a candidate; the kept one is the lowest on CV, never worse than the best source
    choice = record["choice"]
    candidates = {c["name"]: c for c in choice["candidates"]}
    assert set(names) <= set(candidates) and len(candidates) == len(names) + 8
    from stackkit.stack.blend import MIN_BLEND_GAIN

    lowest = min(candidates.values(), key=lambda c: c["cv"]["overall"])
    best_source = min((c for c in candidates.values() if c["kind"] == "source"), key=lambda c: c["cv"]["overall"])
    eligible = [c for c in candidates.values() if c["kind"] == "blend" and c["cv"]["overall"] <= best_source["cv"]["overall"] * (1 - MIN_BLEND_GAIN)
                and all(f["overall"] < g["overall"] for f, g in zip(c["per_fold"], best_source["per_fold"]))]
    expected = min(eligible, key=lambda c: c["cv"]["overall"]) if eligible else best_source
    assert choice["chosen"] == expected["name"]
    assert lowest["cv"]["overall"] <= expected["cv"]["overall"]
    scores = record["scores"]
    assert np.isclose(scores["cv"]["overall"], candidates[choice["chosen"]]["cv"]["overall"])
    assert scores["cv"]["overall"] <= min(_oof_scores(wd, record)) + 1e-12
    assert len(scores["cv"]["per_fold"]) == int(folds["fold"].max()) + 1 and set(scores["cv"]["per_label"]) == set(LABELS)
    table = score_table(summary.score_rows)
    assert "blend-cv" in table and f"stack/{FAST}" in table
    page = wd.report_html.read_text()
    assert _images_in_report(wd) >= 3 and page.count("<table>") >= 4  # scores, candidates, weights, calibration
    assert choice["chosen"] in page and "ECE" in page


def test_fit_tune_records_studies_and_a_rerun_continues_them(wd):
    run_stack_fit(wd, stackers=[FAST], tune=True, trials=2, study_name="t", progress=False, blend_base_models=True)
    record = read_json(wd.blend)
    studies = record["optuna"]["studies"]
    assert studies[FAST]["name"] == f"t-{FAST}" and studies[FAST]["trials_total"] == 2
    assert studies["blend"]["name"] == "t-blend" and studies["blend"]["trials_total"] == 2
    assert record["optuna"]["storage"].startswith("journal:") and wd.optuna_journal.is_file()
    assert record["tuned"] is True
    scores = record["scores"]
    assert set(scores) == {"in_sample", "cv"} and np.isfinite(scores["cv"]["overall"])
    weights = np.array([[record["weights"][l][s["name"]] for l in LABELS] for s in record["sources"]])
    assert np.allclose(weights.sum(axis=0), 1.0) and (weights >= 0).all()
    assert _images_in_report(wd) >= 5  # + one optimization history per study
    # the tuned stacker's files are one recipe; its honest score is their loss on the outer fold (seed 0 % 4 folds)
    tuned = record["sources"][0]
    assert np.isclose(tuned["oof_score"]["overall"], _oof_scores(wd, record)[0])
    tuning = tuned["tuning"]
    assert tuning["outer_fold"] == 0 and tuning["inner_folds"] == [1, 2, 3]
    _, labels, folds = load_core(wd)
    outer = folds.loc[folds["fold"] == 0, "image_id"]
    oof = pd.read_parquet(wd.root / tuned["oof"]).set_index("image_id").reindex(outer)[list(LABELS)].to_numpy()
    y = labels.set_index("image_id").reindex(outer)[list(LABELS)].to_numpy()
    assert np.isclose(tuning["honest"]["overall"], weighted_log_loss(y, oof).overall)
    assert {"defaults_outer", "selected", "selected_trial", "trials"} <= set(tuning) and tuning["trials"]["run_now"] == 2
    assert read_json(wd.stack_dir(FAST) / "meta.json")["tuning"]["honest"] == tuning["honest"]
    assert scores["cv"]["overall"] <= min(_oof_scores(wd, record)) + 1e-12
    assert any("Optuna" in c["name"] for c in record["choice"]["candidates"])

    run_stack_fit(wd, stackers=[FAST], tune=True, trials=1, study_name="t", progress=False, blend_base_models=True)
    again = read_json(wd.blend)["optuna"]["studies"]
    assert again[FAST]["trials_total"] == 3 and again["blend"]["trials_total"] == 3


def test_fit_tune_records_the_submissions_nested_score_beside_the_defaults(wd):
    """optuna.nested: the tuned and the untuned pipelines (stackers, then the blend chosen and fitted on the
    other folds) scored on the outer fold; recomputed here from the saved OOF files and a defaults fit."""
    from stackkit.stack.crossfit import fit_stacker, load_stack_inputs
    from stackkit.stack.nested import pipeline_outer_predictions, pipeline_outer_score

    summary = run_stack_fit(wd, stackers=[FAST], tune=True, trials=3, study_name="n", progress=False, blend_base_models=True, seed=1)
    record = read_json(wd.blend)
    nested = record["optuna"]["nested"]
    assert nested["outer_fold"] == record["sources"][0]["tuning"]["outer_fold"] == 1  # seed 1 % 4 folds
    _, labels, folds = load_core(wd)
    ids = folds["image_id"].to_numpy(dtype=object)
    y = labels.set_index("image_id").reindex(ids)[list(LABELS)].to_numpy(dtype=np.float64)
    saved = np.stack([pd.read_parquet(wd.root / s["oof"]).set_index("image_id").reindex(ids)[list(LABELS)].to_numpy(dtype=np.float64)
                      for s in record["sources"]])
    names = [s["name"] for s in record["sources"]]
    fold_of_row = folds["fold"].to_numpy()
    tuned, tuned_choice = pipeline_outer_score(saved, y, fold_of_row, names, 1, per_label=True, any_consistency=True)
    assert nested["tuned"]["overall"] == pytest.approx(tuned.overall) and nested["tuned_choice"] == tuned_choice
    defaults = fit_stacker(FAST, None, load_stack_inputs(wd), seed=1, progress=False, predict_test=False)
    saved[0] = defaults.oof.set_index("image_id").reindex(ids)[list(LABELS)].to_numpy(dtype=np.float64)
    plain, _ = pipeline_outer_score(saved, y, fold_of_row, names, 1, per_label=True, any_consistency=True)
    assert nested["defaults"]["overall"] == pytest.approx(plain.overall)
    # the kept blend is chosen and fitted without fold 1's labels: other labels there blend it the same
    y_swapped = y.copy()
    y_swapped[fold_of_row == 1] = 1 - y_swapped[fold_of_row == 1]
    blended, chosen = pipeline_outer_predictions(saved, y, fold_of_row, names, 1, per_label=True, any_consistency=True)
    assert np.array_equal(pipeline_outer_predictions(saved, y_swapped, fold_of_row, names, 1, per_label=True, any_consistency=True)[0], blended)
    assert weighted_log_loss(y[fold_of_row == 1], blended).overall == pytest.approx(plain.overall)
    assert summary.nested == nested and any(line.startswith("submission, nested on outer fold 1: tuned") for line in fit_lines(summary))
    assert "The submission, nested on outer fold 1" in wd.report_html.read_text()


def test_changed_labels_start_a_fresh_tuning_history(wd):
    """A continued study keeps its old trials, but trials scored on other labels never count or show."""
    run_stack_fit(wd, stackers=[FAST], tune=True, trials=2, study_name="k", progress=False)
    labels = pd.read_parquet(wd.labels)
    labels.loc[labels.index[:5], "epidural"] = 1 - labels.loc[labels.index[:5], "epidural"]
    write_parquet(labels, wd.labels)
    summary = run_stack_fit(wd, stackers=[FAST], tune=True, trials=2, study_name="k", progress=False)
    study = summary.studies[FAST]
    assert study.trials_total == 4 and study.best_trial >= 2  # the best is one of this run's trials
    record = read_json(wd.blend)
    assert record["sources"][0]["tuning"]["selected_trial"] in {2, 3}


def _other_folds_hash(wd):
    manifest = read_json(wd.features_manifest)
    manifest["folds_hash"] = "0" * 64
    write_json(manifest, wd.features_manifest)


def _base_fold_disagrees(wd):
    move_oof_fold(wd, "m2", 0, n_folds=4)


def _no_features(wd):
    shutil.rmtree(wd.features_dir)


REFUSALS = [
    ("features from other folds", _other_folds_hash, dict(stackers=[FAST]), LeakageError, "folds_hash .* differs from data/folds.parquet"),
    ("base model on other folds", _base_fold_disagrees, dict(stackers=[], blend_base_models=True), LeakageError, "preds/m2/oof.parquet: fold .* disagrees"),
    ("no features", _no_features, dict(stackers=[FAST]), StackkitError, "run `stack features` first"),
    ("unknown stacker", lambda wd: None, dict(stackers=["catboost"]), StackkitError, "unknown stacker 'catboost'; valid stackers: lgbm"),
    ("zero trials", lambda wd: None, dict(stackers=[], blend_base_models=True, tune=True, trials=0), StackkitError, "--trials: expected a positive integer"),
    ("bad timeout", lambda wd: None, dict(stackers=[], blend_base_models=True, tune=True, timeout=-1.0), StackkitError, "--timeout"),
    ("negative seed", lambda wd: None, dict(stackers=[], blend_base_models=True, seed=-1), StackkitError, "--seed: expected an integer in 0..4294967295"),
    ("unknown device", lambda wd: None, dict(stackers=[], blend_base_models=True, device="tpu"), StackkitError, "--device: expected one of auto, cpu, cuda"),
    ("nothing to blend", lambda wd: None, dict(stackers=[], blend_base_models=False), StackkitError, "nothing to blend"),
    ("unknown storage", lambda wd: None, dict(stackers=[], blend_base_models=True, tune=True, storage="ftp://x"), StackkitError, "unknown scheme 'ftp'"),
]


@pytest.mark.parametrize("case, damage, kwargs, error, match", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_change_nothing(wd, case, damage, kwargs, error, match):
    run_stack_fit(wd, stackers=[], progress=False, blend_base_models=True)  # an existing blend that must survive
    damage(wd)
    before = snapshot(wd.root)
    with pytest.raises(error, match=match) as info:
        run_stack_fit(wd, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert snapshot(wd.root) == before


def test_stackers_left_out_of_a_rerun_are_carried_over_unchanged(wd):
    from stackkit.stack.crossfit import load_stacker_models

    run_stack_fit(wd, stackers=[FAST], progress=False, blend_base_models=True)
    earlier = {k: v for k, v in snapshot(wd.root).items() if k.startswith(f"stack/{FAST}/")}
    summary = run_stack_fit(wd, stackers=[], progress=False, blend_base_models=True)
    record = read_json(wd.blend)
    assert [s["name"] for s in record["sources"]] == ["preds/m1", "preds/m2"]  # not in this blend ...
    assert record["stackers_kept"] == [FAST]  # ... but kept, byte for byte, and still loadable
    assert any(line.startswith("kept unchanged from an earlier run") and f"stack/{FAST}" in line for line in fit_lines(summary))
    assert {k: v for k, v in snapshot(wd.root).items() if k.startswith(f"stack/{FAST}/")} == earlier
    assert len(load_stacker_models(wd, FAST)) == 4


def test_a_crash_mid_fit_leaves_the_previous_stack_as_it_was(wd, monkeypatch):
    import stackkit.stack.fit as fit

    run_stack_fit(wd, stackers=[FAST], progress=False)
    before = snapshot(wd.root)
    staged = []

    def crash(*args, **kwargs):
        staged.extend(wd.root.glob(f".stack.tmp-*/{FAST}/meta.json"))  # the new stacker was written, in the new set
        raise RuntimeError("crash while choosing the blend")

    monkeypatch.setattr(fit, "_choose_blend", crash)
    with pytest.raises(RuntimeError, match="crash while choosing"):
        run_stack_fit(wd, stackers=[FAST], seed=1, progress=False)
    assert len(staged) == 1
    assert snapshot(wd.root) == before
    assert not list(wd.root.rglob(".*"))  # the new set is gone


def test_report_table_marks_the_honest_best_score():
    rows = [
        ScoreRow("preds/m1", "base", 0.2, {l: 0.2 for l in LABELS}),
        ScoreRow("stack/lgbm", "stacker", 0.1, {l: 0.1 for l in LABELS}),
        ScoreRow("blend", "blend", 0.05, {l: 0.05 for l in LABELS}),
        ScoreRow("blend-cv", "blend-cv", 0.08, {l: 0.08 for l in LABELS}),
    ]
    table = score_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["source", "kind", "overall"] and lines[0].split()[-1] == "any"
    # the best-score marker goes to the honest CV number, not the in-sample blend
    assert "0.08000*" in table and "0.05000*" not in table


def test_device_cuda_without_a_gpu_is_one_line(wd):
    from stackkit.stack.fit import _cuda_visible

    if _cuda_visible():
        pytest.skip("a CUDA GPU is visible here")
    before = snapshot(wd.root)
    with pytest.raises(StackkitError, match=r"^--device cuda: no CUDA GPU is visible") as info:
        run_stack_fit(wd, stackers=[FAST], device="cuda", progress=False)
    assert "\n" not in str(info.value) and snapshot(wd.root) == before
