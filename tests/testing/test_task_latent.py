"""stackkit.testing.task_exported / task_latent: the generated benchmark of the study- and patient-level tasks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from stackkit.contract.tasks import RSNA2022_CSPINE, RSNA2023_ABDOMINAL, schema_metric
from stackkit.errors import ContractError
from stackkit.testing.task_exported import TASK_DIALS, make_task_benchmark, max_aggregation, prior_predictions, to_schema_columns

TASKS = ("rsna2022-cspine", "rsna2023-abdominal")


def _small(task: str, n_patients: int, seed: int, **kwargs):
    dials = replace(TASK_DIALS[task], slices=(30, 50))
    return make_task_benchmark(task, n_patients, seed, dials=dials, **kwargs)


@pytest.fixture(scope="module", params=TASKS)
def bench(request):
    return _small(request.param, 60, 5, n_models=3, n_folds=3, keep_fold_predictions=True)


def test_tables_have_the_task_columns_and_units(bench):
    schema, unit = bench.schema, bench.unit_column
    slices = bench.slices
    assert slices["image_id"].is_unique and len(slices) == len(bench.latent) == len(bench.slice_labels)
    assert list(bench.labels.columns) == list(bench.test_labels.columns) == [unit, *schema.labels]
    assert bench.labels[unit].is_unique and bench.test_labels[unit].is_unique
    assert set(bench.labels[unit]) | set(bench.test_labels[unit]) == set(slices[unit])
    train_ids = slices.loc[slices["split"] == "train", "image_id"].to_numpy()
    test_ids = slices.loc[slices["split"] == "test", "image_id"].to_numpy()
    for model in bench.models:
        assert list(bench.oof[model].columns) == ["image_id", "fold", *bench.columns]
        assert (bench.oof[model]["image_id"].to_numpy() == train_ids).all()
        for frame in (bench.test[model], *bench.test_folds[model]):
            assert list(frame.columns) == ["image_id", *bench.columns] and (frame["image_id"].to_numpy() == test_ids).all()
            assert frame[list(bench.columns)].to_numpy().min() > 0 and frame[list(bench.columns)].to_numpy().max() < 1
        assert len(bench.test_folds[model]) == bench.n_folds == 3
    one_hot = bench.labels[[c for g in schema.groups if g.kind == "softmax" for c in g.classes]]
    assert one_hot.isin([0, 1]).all().all()
    for group in (g for g in schema.groups if g.kind == "softmax"):
        assert (pd.concat([bench.labels, bench.test_labels])[list(group.classes)].sum(axis=1) == 1).all()


def test_cspine_covers_c1_to_c7_in_order_and_fractures_stay_in_their_vertebra():
    bench = _small("rsna2022-cspine", 40, 2, n_models=1, n_folds=2)
    slices = bench.slices
    assert list(bench.columns) == [f"C{i}" for i in range(1, 8)] + ["patient_overall"]
    spine = slices[slices["vertebra"] > 0]
    steps = spine.groupby("series_id")["vertebra"].diff().dropna()
    assert steps.isin([0, 1]).all()  # C1..C7 in order along z, none skipped
    assert (spine.groupby("series_id")["vertebra"].agg(["min", "max", "nunique"]) == [1, 7, 7]).all().all()
    shown = bench.slice_labels.set_index("image_id").loc[slices["image_id"]]
    for v in range(1, 8):
        assert (slices["vertebra"].to_numpy()[shown[f"C{v}"].to_numpy() == 1] == v).all()
    labels = pd.concat([bench.labels, bench.test_labels]).set_index("study_id")
    per_study = shown.groupby(slices["study_id"].to_numpy()).max()
    assert (per_study.loc[labels.index, list(bench.columns)].to_numpy() == labels[list(bench.columns)].to_numpy()).all()
    assert (labels["patient_overall"] == labels[[f"C{i}" for i in range(1, 8)]].max(axis=1)).all()


def test_abdominal_patients_have_one_or_two_series_and_grades_follow_extent():
    bench = _small("rsna2023-abdominal", 600, 4, n_models=1, n_folds=2)
    series = bench.slices.groupby("patient_id")["series_id"].nunique()
    assert set(series) == {1, 2}
    labels = pd.concat([bench.labels, bench.test_labels]).set_index("patient_id")
    shown = bench.slice_labels.set_index("image_id").loc[bench.slices["image_id"]]
    per_series = shown.groupby(bench.slices["series_id"].to_numpy()).sum()
    patient_of_series = bench.slices.drop_duplicates("series_id").set_index("series_id")["patient_id"]
    for organ in ("kidney", "liver", "spleen"):
        count = per_series[f"{organ}_low"] + per_series[f"{organ}_high"]
        grade = labels.loc[patient_of_series.loc[count.index], [f"{organ}_low", f"{organ}_high"]].to_numpy()
        low, high = count.to_numpy()[grade[:, 0] == 1], count.to_numpy()[grade[:, 1] == 1]
        assert len(low) and len(high) and high.mean() > 1.5 * low.mean()  # high: more of the organ's slices
        assert (count.to_numpy()[grade.sum(axis=1) == 0] == 0).all()


def test_folds_are_patient_grouped_and_test_patients_held_out(bench):
    folds, slices = bench.folds, bench.slices
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    test_patients = set(slices.loc[slices["split"] == "test", "patient_id"])
    assert test_patients and not test_patients & set(slices.loc[slices["split"] == "train", "patient_id"])
    assert not test_patients & set(folds["patient_id"])
    fold_of = folds.set_index(bench.unit_column)["fold"]
    unit_of = slices.set_index("image_id")[bench.unit_column]
    for model in bench.models:
        oof = bench.oof[model]
        assert (oof["fold"].to_numpy() == fold_of.loc[unit_of.loc[oof["image_id"]]].to_numpy()).all()


def test_oof_rows_come_from_the_fold_model_that_held_their_patient_out(bench):
    train = np.flatnonzero((bench.slices["split"] == "train").to_numpy())
    test = np.flatnonzero((bench.slices["split"] == "test").to_numpy())
    columns = list(bench.columns)
    for model in bench.models:
        every = bench.fold_predictions[model]  # (K, n_slices, C): every fold model on every slice
        oof = bench.oof[model]
        fold = oof["fold"].to_numpy()
        assert np.array_equal(oof[columns].to_numpy(), every[fold, train])
        other = every[(fold + 1) % bench.n_folds, train]
        assert np.mean(~np.isclose(other, every[fold, train], rtol=1e-3, atol=0)) > 0.99  # the fold models differ
        for k in range(bench.n_folds):
            assert np.array_equal(bench.test_folds[model][k][columns].to_numpy(), every[k, test])
        mean = np.mean([f[columns].to_numpy(np.float64) for f in bench.test_folds[model]], axis=0)
        assert np.allclose(bench.test[model][columns].to_numpy(), mean, atol=1e-6)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_for_a_seed(task):
    first, again, other = (_small(task, 20, seed, n_models=2, n_folds=2) for seed in (3, 3, 4))
    for name in ("slices", "labels", "test_labels", "folds", "latent", "slice_labels"):
        pd.testing.assert_frame_equal(getattr(first, name), getattr(again, name))
    for model in first.models:
        pd.testing.assert_frame_equal(first.oof[model], again.oof[model])
        pd.testing.assert_frame_equal(first.test[model], again.test[model])
    assert not first.slices["image_id"].equals(other.slices["image_id"])
    assert not np.array_equal(first.oof[first.models[0]][list(first.columns)].to_numpy()[:50],
                              other.oof[other.models[0]][list(other.columns)].to_numpy()[:50])


def _unit_rates(task: str) -> pd.Series:
    bench = make_task_benchmark(task, 2000, 0, n_models=1, n_folds=2, dials=replace(TASK_DIALS[task], slices=(20, 24)))
    return pd.concat([bench.labels, bench.test_labels]).drop(columns=bench.unit_column).mean()


def test_cspine_prevalences_are_the_competitions():
    rates = _unit_rates("rsna2022-cspine")
    assert 0.43 <= rates["patient_overall"] <= 0.53
    vertebrae = rates[[f"C{i}" for i in range(1, 8)]]
    assert vertebrae.between(0.02, 0.25).all()
    assert vertebrae.idxmax() == "C7" and set(vertebrae.nlargest(3).index) >= {"C2", "C7"}


def test_abdominal_prevalences_are_the_competitions():
    rates = _unit_rates("rsna2023-abdominal")
    assert 0.008 <= rates["bowel_injury"] <= 0.035
    assert 0.04 <= rates["extravasation_injury"] <= 0.09
    for organ, (lo, hi) in {"kidney": (0.035, 0.085), "liver": (0.075, 0.13), "spleen": (0.08, 0.14)}.items():
        assert lo <= 1 - rates[f"{organ}_healthy"] <= hi
        assert rates[f"{organ}_low"] > 0.01 and rates[f"{organ}_high"] > 0.01


@pytest.mark.parametrize("task", TASKS)
def test_perfect_prediction_scores_zero_and_the_prior_worse_than_the_best_base_model(task):
    bench = _small(task, 300, 7, n_models=2, n_folds=3)
    truth = bench.test_labels
    perfect = truth.astype({c: np.float64 for c in bench.schema.labels})
    assert schema_metric(bench.schema, truth, perfect).overall < 1e-9
    prior = schema_metric(bench.schema, truth, prior_predictions(bench, truth)).overall
    best = min(schema_metric(bench.schema, truth, max_aggregation(bench, bench.test[m])).overall for m in bench.models)
    assert best < 0.85 * prior
    # the OOF rows aggregate to every train unit and score as well as the test mean does, roughly
    oof = min(schema_metric(bench.schema, bench.labels, max_aggregation(bench, bench.oof[m])).overall for m in bench.models)
    assert oof < 0.85 * prior


def test_plain_aggregation_of_a_softmax_group_and_a_fracture_head():
    maxima = pd.DataFrame({"bowel_injury": [0.2], "extravasation_injury": [0.1], "kidney_low": [0.2], "kidney_high": [0.5],
                           "liver_low": [0.0], "liver_high": [0.0], "spleen_low": [0.9], "spleen_high": [0.3]}, index=["7"])
    out = to_schema_columns(RSNA2023_ABDOMINAL, maxima).iloc[0]
    # healthy = 1 - max(0.2, 0.5) = 0.5, then (0.5, 0.2, 0.5) / 1.2
    assert out[["kidney_healthy", "kidney_low", "kidney_high"]].tolist() == pytest.approx([0.5 / 1.2, 0.2 / 1.2, 0.5 / 1.2])
    assert out[["bowel_healthy", "bowel_injury"]].tolist() == pytest.approx([0.8, 0.2])
    assert out[["liver_healthy", "liver_low", "liver_high"]].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert out["patient_id"] == "7" and "any_injury" not in out.index
    vertebrae = pd.DataFrame({f"C{i}": [0.1 * i] for i in range(1, 8)}, index=["s"])
    assert to_schema_columns(RSNA2022_CSPINE, vertebrae).iloc[0]["patient_overall"] == pytest.approx(0.7)
    head = vertebrae.assign(patient_overall=0.95)  # a fracture head's own column wins over the vertebrae's max
    assert to_schema_columns(RSNA2022_CSPINE, head).iloc[0]["patient_overall"] == pytest.approx(0.95)


@pytest.mark.parametrize("task, n_patients, error, match", [
    ("rsna2019", 40, ValueError, "the generator makes rsna2022-cspine and rsna2023-abdominal only"),
    ("rsna2024-lumbar", 40, ContractError, "unknown task 'rsna2024-lumbar'"),
    ("rsna2022-cspine", 5, ValueError, r"n_patients >= 2 x n_folds \(got 5, 5, 5\)"),
])
def test_refuses_bad_arguments(task, n_patients, error, match):
    with pytest.raises(error, match=match):
        make_task_benchmark(task, n_patients)


def test_bench_unit_aggregates_are_max_mean_and_top_k_mean():
    from stackkit.testing import stack_bench
    from stackkit.testing.task_exported import unit_aggregates

    unit = np.array(["b", "a", "b", "b", "a", "c"])
    values = np.array([[0.1], [0.5], [0.9], [0.4], [0.3], [0.2]])
    units, out = unit_aggregates(unit, values, top_k=2)
    assert list(units) == ["b", "a", "c"]
    expected = [[0.9, (0.1 + 0.9 + 0.4) / 3, (0.9 + 0.4) / 2], [0.5, 0.4, 0.4], [0.2, 0.2, 0.2]]
    assert out == pytest.approx(np.array(expected, dtype=np.float32))
    assert stack_bench.parse_seeds("tuning") == list(stack_bench.TUNING_SEEDS)
    assert not set(stack_bench.TUNING_SEEDS) & set(stack_bench.REPORT_SEEDS)


def test_heads_fitted_on_the_metrics_weights_shift_by_their_log():
    from stackkit.testing.task_latent import _platt

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 1))
    y = (rng.random((20_000, 1)) < 1 / (1 + np.exp(-(2 * x - 1)))).astype(np.float64)
    a, b = _platt(x, y, np.ones(1), ridge=0.0)
    assert a[0] == pytest.approx(2.0, abs=0.1) and b[0] == pytest.approx(-1.0, abs=0.1)
    # positives weighted 4: the same slope, the intercept log 4 higher (odds x 4, as the weighted loss wants)
    a4, b4 = _platt(x, y, np.full(1, 4.0), ridge=0.0)
    assert a4[0] == pytest.approx(a[0], abs=0.1) and b4[0] - b[0] == pytest.approx(np.log(4.0), abs=0.1)
