"""features.units: per-unit aggregates of slice predictions, checked against hand-computed values."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from features.units import DEFAULT_STATS, STATS, unit_feature_table
from stackkit.contract.tasks import RSNA2023_ABDOMINAL
from stackkit.errors import ContractError

SCHEMA = RSNA2023_ABDOMINAL  # unit: patient, series_rollup: mean
COLUMNS = SCHEMA.prediction_columns
# patient A: series s1 (z 3, 1, 2 given out of order) and s2; patient B: one series of 6 slices
SLICES = pd.DataFrame({
    "image_id": ["a3", "a1", "a2", "a4", "a5", "b0", "b1", "b2", "b3", "b4", "b5"],
    "patient_id": ["A"] * 5 + ["B"] * 6,
    "study_id": ["s1", "s1", "s1", "s2", "s2"] + ["s3"] * 6,
    "z": [3.0, 1.0, 2.0, 10.0, 20.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
    "split": "train",  # extra columns are ignored
})
# bowel_injury along z: s1 0.1, 0.9, 0.3; s2 0.6, 0.2; s3 0, 0.2, 0.4, 0.8, 0.6, 0
BOWEL = {"a1": 0.1, "a2": 0.9, "a3": 0.3, "a4": 0.6, "a5": 0.2, "b0": 0.0, "b1": 0.2, "b2": 0.4, "b3": 0.8, "b4": 0.6, "b5": 0.0}


def _predictions(scale: float = 1.0) -> pd.DataFrame:
    frame = pd.DataFrame({"image_id": list(BOWEL)})
    for c in COLUMNS:
        frame[c] = 0.05
    frame["bowel_injury"] = [scale * v for v in BOWEL.values()]
    return frame


def _table(schema=SCHEMA, slices=SLICES, predictions=None, stats=STATS):
    predictions = {"m1": _predictions(), "m2": _predictions(0.5)} if predictions is None else predictions
    return unit_feature_table(slices, predictions, schema, stats=stats).set_index("patient_id")


S1_STD = np.sqrt(np.mean((np.array([0.1, 0.9, 0.3]) - 1.3 / 3) ** 2))
# stat -> (patient A = mean of s1's and s2's, patient B), hand-computed from BOWEL
EXPECTED = {
    "max": ((0.9 + 0.6) / 2, 0.8),
    "mean": ((1.3 / 3 + 0.4) / 2, 2.0 / 6),
    "top3": ((1.3 / 3 + 0.4) / 2, (0.8 + 0.6 + 0.4) / 3),  # a series shorter than k: all of it
    "top5": ((1.3 / 3 + 0.4) / 2, (0.8 + 0.6 + 0.4 + 0.2 + 0.0) / 5),
    "top10pct": ((0.9 + 0.6) / 2, 0.8),  # 10 % of 3, 2 and 6 slices rounds to 1 slice
    "std": ((S1_STD + 0.2) / 2, np.std([0.0, 0.2, 0.4, 0.8, 0.6, 0.0])),
    "above50": ((1 / 3 + 1 / 2) / 2, 2 / 6),
    "argmax_pos": ((1 / 2 + 0 / 1) / 2, 3 / 5),  # the max at slice 1 of 0..2, 0 of 0..1, 3 of 0..5
    "peak_mean": ((1.3 / 3 + 0.4) / 2, (0.2 + 0.4 + 0.8 + 0.6 + 0.0) / 5),  # 2 slices either side, inside the series
    "roll3": ((1.3 / 3 + 0.4) / 2, (0.4 + 0.8 + 0.6) / 3),  # s2 is shorter than 3: its mean
    "roll5": ((1.3 / 3 + 0.4) / 2, (0.2 + 0.4 + 0.8 + 0.6 + 0.0) / 5),
}


@pytest.mark.parametrize("stat", list(EXPECTED))
def test_each_stat_matches_the_hand_computed_value(stat):
    table = _table()
    a, b = EXPECTED[stat]
    np.testing.assert_allclose(table.loc[["A", "B"], f"m1__bowel_injury__{stat}"], [a, b], rtol=1e-6, atol=1e-7)


def test_cross_model_and_unit_features():
    table = _table()
    assert list(table.index) == ["A", "B"]
    # m2 is m1 x 0.5 on bowel_injury: the cross-model mean is 0.75 x m1's max, the max over models m1's
    np.testing.assert_allclose(table["models__bowel_injury__max"], [0.75 * 0.75, 0.75 * 0.8], rtol=1e-6)
    np.testing.assert_allclose(table["models__bowel_injury__maxmax"], [0.75, 0.8], rtol=1e-6)
    np.testing.assert_allclose(table["models__liver_low__mean"], [0.05, 0.05], rtol=1e-6)
    assert table["unit__n_series"].tolist() == [2, 1] and table["unit__n_slices"].tolist() == [5, 6]
    assert (table.dtypes == np.float32).all()


def test_the_default_stats_are_a_subset():
    table = unit_feature_table(SLICES, {"m1": _predictions()}, SCHEMA)
    assert set(DEFAULT_STATS) < set(STATS)
    assert [c.rsplit("__", 1)[-1] for c in table.columns if c.startswith("m1__bowel_injury__")] == list(DEFAULT_STATS)
    pd.testing.assert_frame_equal(table.set_index("patient_id")[["m1__liver_high__roll3"]], _table()[["m1__liver_high__roll3"]])
    with pytest.raises(ContractError, match=r"^unit features: unknown stat 'median'; expected some of max, mean"):
        unit_feature_table(SLICES, {"m1": _predictions()}, SCHEMA, stats=("max", "median"))


def test_max_rollup_takes_the_larger_series():
    table = _table(replace(SCHEMA, series_rollup="max"))
    assert table.loc["A", "m1__bowel_injury__max"] == pytest.approx(0.9)
    assert table.loc["A", "m1__bowel_injury__argmax_pos"] == pytest.approx(0.5)


def test_row_order_does_not_matter():
    rng = np.random.default_rng(3)
    shuffled = SLICES.iloc[rng.permutation(len(SLICES))]
    predictions = {m: p.iloc[rng.permutation(len(p))] for m, p in (("m1", _predictions()), ("m2", _predictions(0.5)))}
    pd.testing.assert_frame_equal(_table(slices=shuffled, predictions=predictions), _table())


def test_rows_of_other_slices_are_ignored():
    extra = pd.concat([_predictions(), _predictions().assign(image_id="zz", bowel_injury=1.0).iloc[:1]])
    pd.testing.assert_frame_equal(_table(predictions={"m1": extra, "m2": _predictions(0.5)}), _table())


ERRORS = [
    ("missing prediction", lambda s, p: (s, {**p, "m2": p["m2"][p["m2"]["image_id"] != "b3"]}),
     r"^predictions\['m2'\]: no prediction for image_id 'b3'$"),
    ("missing column", lambda s, p: (s, {**p, "m1": p["m1"].drop(columns="spleen_high")}), r"predictions\['m1'\]: no column 'spleen_high'"),
    ("nan prediction", lambda s, p: (s, {**p, "m1": p["m1"].assign(kidney_low=[np.nan] + [0.1] * 10)}),
     r"predictions\['m1'\]: 'kidney_low' is nan for image_id 'a1'"),
    ("duplicated prediction", lambda s, p: (s, {**p, "m1": pd.concat([p["m1"], p["m1"].iloc[:1]])}), r"predictions\['m1'\]: image_id 'a1' appears twice"),
    ("no z", lambda s, p: (s.drop(columns="z"), p), r"slices: no column 'z'"),
    ("no unit", lambda s, p: (s.drop(columns="patient_id"), p), r"slices: no column 'patient_id'"),
    ("bad z", lambda s, p: (s.assign(z=["x"] + [1.0] * 10), p), r"slices: z is not a number for image_id 'a3'"),
    ("no models", lambda s, p: (s, {}), r"no model predictions"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_is_one_line(case):
    _, change, message = case
    slices, predictions = change(SLICES, {"m1": _predictions(), "m2": _predictions(0.5)})
    with pytest.raises(ContractError, match=message) as info:
        unit_feature_table(slices, predictions, SCHEMA)
    assert "\n" not in str(info.value)
