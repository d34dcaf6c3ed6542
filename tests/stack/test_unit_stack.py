"""stackkit.stack.units: unit stackers and their blend on a small generated benchmark of each task."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from bench.bench_tasks import unit_inputs
from stackkit.contract.tasks import schema_metric
from stackkit.errors import ContractError, StackkitError
from stackkit.stack.unit_models import targets
from stackkit.stack.units import apply_unit_blend, fit_unit_stack, load_fold_model
from stackkit.testing.task_exported import TASK_DIALS, make_task_benchmark

TASKS = ("rsna2022-cspine", "rsna2023-abdominal")


@pytest.fixture(scope="module", params=TASKS)
def case(request):
    bench = make_task_benchmark(request.param, 75, 4, n_models=2, n_folds=3, dials=replace(TASK_DIALS[request.param], slices=(30, 50)))
    train, tests = unit_inputs(bench)
    return bench, train, tests, fit_unit_stack(bench.schema, train, bench.labels, tests, seed=1, threads=1)


def _flip_fold(bench, train, fold: int) -> pd.DataFrame:
    """The labels with every label of the units of ``fold`` changed (a softmax group's class moved on by one)."""
    labels = bench.labels.copy()
    held = labels[bench.unit_column].astype(str).isin(train.loc[train["fold"] == fold, bench.unit_column])
    for group in bench.schema.groups:
        columns = list(group.columns)
        if group.kind == "binary":
            labels.loc[held, columns] = 1 - labels.loc[held, columns]
        else:
            labels.loc[held, columns] = np.roll(labels.loc[held, columns].to_numpy(), 1, axis=1)
    for derived in (d for d in bench.schema.derived if d.predicted):
        labels.loc[held, derived.name] = 1 - labels.loc[held, derived.name]
    return labels


def test_oof_rows_of_a_fold_come_from_models_that_never_saw_it(case):
    bench, train, tests, result = case
    flipped = fit_unit_stack(bench.schema, train, _flip_fold(bench, train, 0), tests, seed=1, threads=1)
    labels = list(bench.schema.labels)
    for name, stacker in result.stackers.items():
        fold0 = stacker.oof["fold"] == 0
        again = flipped.stackers[name].oof
        # fold 0's labels changed completely: fold 0's rows are the same, the other folds' models learnt them
        np.testing.assert_array_equal(stacker.oof.loc[fold0, labels].to_numpy(), again.loc[fold0, labels].to_numpy())
        assert not np.allclose(stacker.oof.loc[~fold0, labels].to_numpy(), again.loc[~fold0, labels].to_numpy())


def _sums(frame, group):
    return frame[list(group.classes)].sum(axis=1).to_numpy()


def test_softmax_groups_sum_to_one_and_frames_have_the_labels(case):
    bench, train, tests, result = case
    schema, unit = bench.schema, bench.unit_column
    frames = [result.oof, result.test, *result.test_sets]
    for stacker in result.stackers.values():
        frames += [stacker.oof, *stacker.test_sets]
    for frame in frames:
        assert [c for c in frame.columns if c not in (unit, "fold")] == list(schema.labels)
        values = frame[list(schema.labels)].to_numpy()
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
        for group in (g for g in schema.groups if g.kind == "softmax"):
            np.testing.assert_allclose(_sums(frame, group), 1.0, rtol=1e-9)
    assert len(result.test_sets) == len(tests) and set(result.test[unit]) == set(bench.test_labels[unit])
    assert result.oof[unit].tolist() == train[unit].tolist() and (result.oof["fold"].to_numpy() == train["fold"].to_numpy()).all()


def test_the_same_seed_gives_the_same_stack(case):
    bench, train, tests, result = case
    again = fit_unit_stack(bench.schema, train.iloc[::-1].reset_index(drop=True).iloc[::-1], bench.labels, tests, seed=1, threads=1)
    pd.testing.assert_frame_equal(again.oof, result.oof)
    pd.testing.assert_frame_equal(again.test, result.test)
    assert again.blend == result.blend


def test_fold_models_reload_and_predict_the_same(case):
    bench, train, tests, result = case
    unit = bench.unit_column
    for name, stacker in result.stackers.items():
        for target in targets(bench.schema):
            features = stacker.params["features"][target.name]
            columns = list(target.columns)
            mean = 0.0
            for k, files in enumerate(stacker.fold_models):
                raw = files[next(f for f in files if f.rsplit(".", 1)[0] == target.name)]
                model, loaded = load_fold_model(name, features, raw, f"{name} fold {k}")
                held = (train["fold"] == k).to_numpy()
                p = model.predict(loaded, train.loc[held, features].to_numpy(np.float64))
                expected = stacker.oof.loc[held, columns].to_numpy()
                np.testing.assert_allclose(p[:, 1:] if len(columns) == 1 else p, expected, rtol=1e-9, atol=1e-12)
                mean = mean + model.predict(loaded, tests[0][features].to_numpy(np.float64))
            mean = mean / len(stacker.fold_models)
            got = stacker.test_sets[0].set_index(unit).loc[tests[0][unit], columns].to_numpy()
            np.testing.assert_allclose(mean[:, 1:] if len(columns) == 1 else mean / mean.sum(axis=1, keepdims=True), got, rtol=1e-9)


def test_a_cut_model_is_refused(case):
    _, _, _, result = case
    files = result.stackers["lgbm"].fold_models[0]
    name = next(iter(files))
    with pytest.raises(StackkitError, match="incomplete LightGBM model text"):
        load_fold_model("lgbm", [], files[name][: files[name].index(b"end of trees") + 13], "lgbm fold 0")
    json_name = next(iter(result.stackers["logreg"].fold_models[0]))
    with pytest.raises(StackkitError, match="not a readable logistic-regression model"):
        load_fold_model("logreg", [], b'{"mean": [1.0]}', json_name)


def test_the_blend_is_not_worse_in_cv_than_its_best_stacker(case):
    bench, _, _, result = case
    best = min(s.score.overall for s in result.stackers.values())
    # chosen per target on that target's share of the metric; 1 % covers any_injury, derived across targets
    assert result.score.overall <= best * 1.01
    assert result.blend["cv"]["overall"] == result.score.overall
    assert result.score.overall == pytest.approx(schema_metric(bench.schema, bench.labels, result.oof).overall, rel=1e-12)
    for part in result.blend["parts"].values():
        chosen = next(c for c in part["candidates"] if c["name"] == part["chosen"])
        assert all(chosen["cv"] <= c["cv"] for c in part["candidates"] if c["kind"] == "stacker")
        assert sum(part["weights"].values()) == pytest.approx(1.0)


def test_apply_unit_blend_reproduces_the_blended_test_sets(case):
    bench, _, _, result = case
    record = json.loads(json.dumps(result.blend))  # what blend.json holds
    for i, expected in enumerate(result.test_sets):
        got = apply_unit_blend(bench.schema, record, {n: s.test_sets[i] for n, s in result.stackers.items()})
        pd.testing.assert_frame_equal(got, expected)
    with pytest.raises(StackkitError, match="stacker 'logreg' has no predictions"):
        apply_unit_blend(bench.schema, result.blend, {"lgbm": result.stackers["lgbm"].test_sets[0]})


def _nan_label(bench, train, labels):
    return train, labels.assign(**{bench.schema.labels[0]: [np.nan] + [0] * (len(labels) - 1)})


ERRORS = [
    ("nan label", _nan_label, r"^labels: '\S+' is nan for \w+ '[^']+'; expected 0 or 1$"),
    ("label column missing", lambda b, t, l: (t, l.drop(columns=b.schema.labels[-1])), r"^labels: no column '\S+'; task"),
    ("unit without labels", lambda b, t, l: (t, l.iloc[1:]), r"^labels: no row for \w+ '[^']+' of the unit features$"),
    ("no fold", lambda b, t, l: (t.drop(columns="fold"), l), r"^unit features: no column 'fold'"),
    ("one fold", lambda b, t, l: (t.assign(fold=0), l), r"fewer than 2 folds"),
    ("nan feature", lambda b, t, l: (t.assign(unit__n_slices=[np.inf] + [1.0] * (len(t) - 1)), l),
     r"^unit features: feature 'unit__n_slices' is inf for \w+ '[^']+'$"),
    ("repeated unit", lambda b, t, l: (pd.concat([t, t.iloc[:1]]), l), r"appears twice"),
]


@pytest.mark.parametrize("error", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_is_one_line(case, error):
    bench, train, tests, _ = case
    _, change, message = error
    bad_train, bad_labels = change(bench, train, bench.labels)
    with pytest.raises(ContractError, match=message):
        fit_unit_stack(bench.schema, bad_train, bad_labels, tests, threads=1)


def test_bad_stackers_and_test_sets_are_refused(case):
    bench, train, tests, _ = case
    with pytest.raises(ContractError, match=r"unit stackers \['xgb'\]: expected distinct names of lgbm, logreg"):
        fit_unit_stack(bench.schema, train, bench.labels, tests, stackers=["xgb"])
    with pytest.raises(ContractError, match=r"^test features \[1\]: no feature column 'unit__n_series'"):
        fit_unit_stack(bench.schema, train, bench.labels, [tests[0], tests[1].drop(columns="unit__n_series")])
    with pytest.raises(ContractError, match="no test feature sets"):
        fit_unit_stack(bench.schema, train, bench.labels, [])
