"""Task schemas (stackkit.contract.tasks): each built-in metric against hand-computed cases, the
construction checks, and the exact submission formats."""

import dataclasses
from math import log

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from stackkit.contract import LABELS
from stackkit.contract.tasks import (
    RSNA2019, RSNA2022_CSPINE, RSNA2023_ABDOMINAL, TASKS, Derived, Group, Submission, TaskSchema,
    get_task, schema_metric, write_submission,
)
from stackkit.errors import ContractError
from stackkit.metric import EPS, weighted_log_loss
from stackkit.submit import to_long

VERTEBRAE = [f"C{i}" for i in range(1, 8)]
CLASSES_2023 = list(RSNA2023_ABDOMINAL.submission.columns)


def frame(unit_column, ids, columns, rows):
    out = pd.DataFrame(np.asarray(rows, dtype=np.float64), columns=columns)
    out.insert(0, unit_column, ids)
    return out


# --- rsna2019 -------------------------------------------------------------------------------

def test_rsna2019_hand_computed():
    labels = frame("image_id", ["ID_a", "ID_b"], list(LABELS), [[0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    preds = frame("image_id", ["ID_b", "ID_a"], list(LABELS),  # another order: rows are matched by id
                  [[0.5] * 6, [0.1, 0.8, 0.2, 0.1, 0.1, 0.9]])
    # image a: -log 0.9, -log 0.8, -log 0.8, -log 0.9, -log 0.9 and any -log 0.9 with weight 2: sum 2 log 1.25 + 5 log(10/9)
    # image b: every label log 2, weights 1+1+1+1+1+2 = 7: 7 log 2; pooled over 2 images: / (2 * 7)
    expected = (2 * log(1.25) + 5 * log(10 / 9) + 7 * log(2)) / 14
    score = schema_metric(RSNA2019, labels, preds)
    assert score.overall == pytest.approx(expected, rel=1e-12)
    assert score.parts["intraparenchymal"] == pytest.approx((log(1.25) + log(2)) / 2, rel=1e-12)
    assert list(score.parts) == list(LABELS)


def test_rsna2019_equals_stackkit_metric_on_random_data():
    rng = np.random.default_rng(7)
    n = 500
    y = (rng.random((n, 6)) < 0.3).astype(np.int8)  # `any` independent of the subtypes: its column is what is scored
    p = rng.random((n, 6))
    p[:5] = 0.0  # past the clip
    p[5:10] = 1.0
    ids = [f"ID_{i:05x}" for i in range(n)]
    score = schema_metric(RSNA2019, frame("image_id", ids, list(LABELS), y), frame("image_id", ids, list(LABELS), p))
    reference = weighted_log_loss(y, p)
    assert score.overall == reference.overall  # the same arithmetic, bit for bit
    assert score.parts == reference.per_label
    assert RSNA2019.clip == EPS


def test_rsna2019_any_is_derived_when_the_labels_lack_it():
    labels = frame("image_id", ["ID_a"], list(LABELS[:-1]), [[0, 1, 0, 0, 0]])
    preds = frame("image_id", ["ID_a"], list(LABELS), [[0.5, 0.5, 0.5, 0.5, 0.5, 0.25]])
    # any = max of the subtypes = 1: -log 0.25 = log 4 with weight 2; five subtypes log 2 each: (5 log 2 + 2 log 4) / 7
    assert schema_metric(RSNA2019, labels, preds).overall == pytest.approx((5 * log(2) + 2 * log(4)) / 7, rel=1e-12)


# --- rsna2022-cspine ------------------------------------------------------------------------

def test_rsna2022_hand_computed_row_normalised():
    columns = VERTEBRAE + ["patient_overall"]
    labels = frame("study_id", ["1.2.3", "1.2.4"], columns, [[1, 0, 0, 0, 0, 0, 0, 1], [0] * 8])
    preds = frame("study_id", ["1.2.3", "1.2.4"], columns, [[0.8] + [0.1] * 6 + [0.9], [0.5] * 8])
    # study 1.2.3: C1 positive (w 2): -log 0.8 = log 1.25; C2..C7 negative (w 1 each): -log 0.9 = log(10/9);
    #   patient_overall positive (w 14): log(10/9). Weights sum 2 + 6 + 14 = 22:
    loss_1 = (2 * log(1.25) + 6 * log(10 / 9) + 14 * log(10 / 9)) / 22
    # study 1.2.4: all negative, every loss log 2, weights 7 * 1 + 7 = 14: loss log 2
    loss_2 = 14 * log(2) / 14
    score = schema_metric(RSNA2022_CSPINE, labels, preds)
    assert score.overall == pytest.approx((loss_1 + loss_2) / 2, rel=1e-12)  # each study counts once
    pooled = (2 * log(1.25) + 20 * log(10 / 9) + 14 * log(2)) / 36  # one weighted mean over all 16 rows: not the metric
    assert abs(score.overall - pooled) > 0.05
    # parts: per target over studies; patient_overall: (14 log(10/9) + 7 log 2) / 21
    assert score.parts["patient_overall"] == pytest.approx((14 * log(10 / 9) + 7 * log(2)) / 21, rel=1e-12)


def test_rsna2022_equals_the_row_normalised_reference_on_random_data():
    rng = np.random.default_rng(11)
    y = (rng.random((300, 8)) < 0.2).astype(float)
    p = rng.uniform(0.01, 0.99, (300, 8))
    columns = VERTEBRAE + ["patient_overall"]
    ids = [f"s{i}" for i in range(300)]
    w = y * np.array([2] * 7 + [14]) + (1 - y) * np.array([1] * 7 + [7])
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    reference = np.mean((w * bce).sum(axis=1) / w.sum(axis=1))
    assert schema_metric(RSNA2022_CSPINE, frame("study_id", ids, columns, y),
                         frame("study_id", ids, columns, p)).overall == pytest.approx(reference, rel=1e-12)


# --- rsna2023-abdominal ---------------------------------------------------------------------

LABELS_2023 = frame("patient_id", ["10004", "10005"], CLASSES_2023, [
    [1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0],  # all healthy
    [0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0],  # bowel injury, kidney low, liver high
])
PREDS_2023 = frame("patient_id", ["10004", "10005"], CLASSES_2023, [
    [0.9, 0.1, 0.6, 0.2, 0.8, 0.1, 0.1, 0.5, 0.25, 0.25, 2.0, 1.0, 1.0],  # extravasation and spleen not normalised
    [0.3, 0.7, 0.9, 0.1, 0.2, 0.6, 0.2, 0.2, 0.2, 0.6, 0.7, 0.2, 0.1],
])


def test_rsna2023_hand_computed():
    # per group: normalised, -log p(true class), weighted mean over the 2 patients with the true class's weight
    bowel = (log(1 / 0.9) + 2 * log(1 / 0.7)) / (1 + 2)  # healthy w1 p .9; injury w2 p .7
    extravasation = (log(4 / 3) + log(1 / 0.9)) / 2  # (.6, .2) -> (.75, .25); both healthy, w1
    kidney = (log(1 / 0.8) + 2 * log(1 / 0.6)) / (1 + 2)  # healthy p .8; low w2 p .6
    liver = (log(2) + 4 * log(1 / 0.6)) / (1 + 4)  # healthy p .5; high w4 p .6
    spleen = (log(2) + log(1 / 0.7)) / 2  # (2, 1, 1) -> (.5, .25, .25); both healthy
    # any_injury = max over groups of 1 - p(healthy): 10004 max(.1, .25, .2, .5, .5) = .5, truth 0 (w1): -log(1 - .5);
    # 10005: max(.7, .1, .8, .8, .3) = .8, truth 1 (w6): -log .8
    any_injury = (log(2) + 6 * log(1.25)) / (1 + 6)
    score = schema_metric(RSNA2023_ABDOMINAL, LABELS_2023, PREDS_2023)
    expected = [bowel, extravasation, kidney, liver, spleen, any_injury]
    assert list(score.parts.values()) == pytest.approx(expected, rel=1e-12)
    assert list(score.parts) == ["bowel", "extravasation", "kidney", "liver", "spleen", "any_injury"]
    assert score.overall == pytest.approx(sum(expected) / 6, rel=1e-12)


def test_rsna2023_equals_sklearn_log_loss_per_group_on_random_data():
    rng = np.random.default_rng(5)
    n = 400
    truth = pd.DataFrame({"patient_id": [str(10000 + i) for i in range(n)]})
    pred = truth.copy()
    losses, healthy_true, healthy_pred = [], [], []
    for group in RSNA2023_ABDOMINAL.groups:
        k = len(group.classes)
        true_class = rng.choice(k, n, p=[0.7] + [0.3 / (k - 1)] * (k - 1))
        onehot = np.eye(k)[true_class]
        raw = rng.uniform(0.05, 1.0, (n, k))
        truth[list(group.classes)], pred[list(group.classes)] = onehot, raw
        normalised = raw / raw.sum(axis=1, keepdims=True)
        losses.append(log_loss(onehot, normalised, sample_weight=np.asarray(group.weights)[true_class]))
        healthy_true.append(onehot[:, 0])
        healthy_pred.append(normalised[:, 0])
    any_true = (1 - np.array(healthy_true)).max(axis=0)
    any_pred = (1 - np.array(healthy_pred)).max(axis=0)
    losses.append(log_loss(any_true, any_pred, sample_weight=np.where(any_true == 1, 6.0, 1.0)))
    score = schema_metric(RSNA2023_ABDOMINAL, truth, pred)
    assert list(score.parts.values()) == pytest.approx(losses, rel=1e-10)
    assert score.overall == pytest.approx(np.mean(losses), rel=1e-10)


# --- submissions ----------------------------------------------------------------------------

def test_rsna2019_submission_is_todays_format():
    preds = frame("image_id", ["ID_63eb1e259", "ID_2669954a7"], list(LABELS), np.linspace(0, 1, 12).reshape(2, 6))
    out = write_submission(RSNA2019, preds)
    pd.testing.assert_frame_equal(out, to_long(preds))
    assert list(out.columns) == ["ID", "Label"] and out["ID"].iloc[5] == "ID_63eb1e259_any"


def test_rsna2022_submission_format():
    preds = frame("study_id", ["1.2.826.1", "1.2.826.2"], VERTEBRAE + ["patient_overall"], np.full((2, 8), 0.25))
    out = write_submission(RSNA2022_CSPINE, preds)
    assert list(out.columns) == ["row_id", "fractured"]
    assert len(out) == 16
    assert list(out["row_id"][:8]) == [f"1.2.826.1_C{i}" for i in range(1, 8)] + ["1.2.826.1_patient_overall"]
    assert out["row_id"].iloc[8] == "1.2.826.2_C1"
    assert (out["fractured"] == 0.25).all()


def test_rsna2023_submission_format_normalises_each_group():
    out = write_submission(RSNA2023_ABDOMINAL, PREDS_2023)
    assert list(out.columns) == ["patient_id", "bowel_healthy", "bowel_injury", "extravasation_healthy",
                                 "extravasation_injury", "kidney_healthy", "kidney_low", "kidney_high", "liver_healthy",
                                 "liver_low", "liver_high", "spleen_healthy", "spleen_low", "spleen_high"]
    assert list(out["patient_id"]) == ["10004", "10005"]
    assert out.loc[0, ["extravasation_healthy", "extravasation_injury"]].tolist() == pytest.approx([0.75, 0.25])
    assert out.loc[0, ["spleen_healthy", "spleen_low", "spleen_high"]].tolist() == pytest.approx([0.5, 0.25, 0.25])
    for group in RSNA2023_ABDOMINAL.groups:
        assert out[list(group.classes)].sum(axis=1).to_numpy() == pytest.approx([1.0, 1.0])


# --- input errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("edit, match", [
    (lambda p: p.drop(columns="C3"), r"preds\.csv: no column 'C3'; task 'rsna2022-cspine' needs"),
    (lambda p: p.drop(columns="study_id"), r"preds\.csv: no 'study_id' column"),
    (lambda p: p.assign(C2=[0.5, 1.5]), r"preds\.csv: 'C2' is 1\.5 for study_id s2; expected a probability in \[0, 1\]"),
    (lambda p: p.assign(C2=["x", 0.5]), r"'C2' is 'x' for study_id s1"),
    (lambda p: p.iloc[:1], r"preds\.csv: 1 labelled study\(s\) have no prediction, e\.g\. study_id s2"),
    (lambda p: pd.concat([p, p.iloc[:1]]), r"preds\.csv: study_id 's1' at row 3 appears twice"),
])
def test_prediction_errors(edit, match):
    columns = VERTEBRAE + ["patient_overall"]
    labels = frame("study_id", ["s1", "s2"], columns, np.zeros((2, 8)))
    preds = frame("study_id", ["s1", "s2"], columns, np.full((2, 8), 0.5))
    with pytest.raises(ContractError, match=match):
        schema_metric(RSNA2022_CSPINE, labels, edit(preds), predictions_source="preds.csv")


def test_label_and_softmax_errors():
    not_one_hot = LABELS_2023.assign(kidney_low=[1, 1])
    with pytest.raises(ContractError, match=r"labels: 2 of kidney_healthy, kidney_low, kidney_high are 1 for patient_id 10004"):
        schema_metric(RSNA2023_ABDOMINAL, not_one_hot, PREDS_2023)
    with pytest.raises(ContractError, match=r"labels: 'C1' is 0\.5 for study_id s1; expected 0 or 1"):
        schema_metric(RSNA2022_CSPINE, frame("study_id", ["s1"], VERTEBRAE + ["patient_overall"], [[0.5] + [0] * 7]),
                      frame("study_id", ["s1"], VERTEBRAE + ["patient_overall"], [[0.5] * 8]))
    all_zero = PREDS_2023.assign(liver_healthy=[0.0, 0.2], liver_low=[0.0, 0.2], liver_high=[0.0, 0.6])
    with pytest.raises(ContractError, match=r"liver_healthy, liver_low, liver_high are all 0 for patient_id 10004"):
        write_submission(RSNA2023_ABDOMINAL, all_zero)
    with pytest.raises(ContractError, match=r"'bowel_injury' is -0\.1 for patient_id 10005; expected a non-negative"):
        write_submission(RSNA2023_ABDOMINAL, PREDS_2023.assign(bowel_injury=[0.1, -0.1]))


# --- schema construction --------------------------------------------------------------------

def _binary(name="C1", weights=(1.0, 2.0)):
    return Group(name, "binary", weights)


def _schema(**changes):
    fields = dict(name="t", unit="study", groups=(_binary("C1"), _binary("C2")),
                  derived=(Derived("overall", ("C1", "C2"), (7.0, 14.0)),), reduction="row",
                  submission=Submission("long", "row_id", ("C1", "C2", "overall"), "fractured"))
    fields.update(changes)
    return TaskSchema(**fields)


@pytest.mark.parametrize("changes, match", [
    ({"groups": (_binary("C1", (1.0, 0.0)), _binary("C2"))}, r"'t': groups\[0\]\.weights is \(1\.0, 0\.0\); expected 2 positive"),
    ({"groups": (_binary("C1", (1.0, -2.0)), _binary("C2"))}, r"groups\[0\]\.weights is \(1\.0, -2\.0\)"),
    ({"groups": (_binary("C1", (1.0, 2.0, 4.0)), _binary("C2"))}, r"groups\[0\]\.weights .*expected 2 positive numbers \(negative, positive\)"),
    ({"groups": (_binary("C1", (1.0, float("nan"))), _binary("C2"))}, r"groups\[0\]\.weights"),
    ({"groups": (_binary("C1", (True, 2.0)), _binary("C2"))}, r"groups\[0\]\.weights"),
    ({"groups": (_binary("C1"), Group("kidney", "softmax", (1.0, 2.0), ("kidney_healthy", "kidney_low", "kidney_high")))},
     r"groups\[1\]\.weights is \(1\.0, 2\.0\); expected 3 positive numbers \(one per class\)"),
    ({"groups": (_binary("C1"), Group("C2", "ordinal", (1.0, 2.0)))}, r"groups\[1\]\.kind is 'ordinal'; expected binary or softmax"),
    ({"groups": (_binary("C1"), Group("C2", "softmax", (1.0,), ("C2_healthy",)))}, r"groups\[1\]\.classes .*2 or more class"),
    ({"groups": ()}, r"groups is \(\); expected at least one Group"),
    ({"derived": (Derived("overall", ("C1", "C8"), (7.0, 14.0)),)}, r"derived\[0\]\.of is 'C8'; expected a group of the schema \(C1, C2\)"),
    ({"derived": (Derived("overall", ("C1",), (7.0, 0.0)),)}, r"derived\[0\]\.weights"),
    ({"groups": (_binary("C1"), _binary("C1")), "derived": ()}, r"groups\[1\]\.name is 'C1'; expected a label not used already \(it is groups\[0\]\.name\)"),
    ({"derived": (Derived("C2", ("C1",), (7.0, 14.0)),)}, r"derived\[0\]\.name is 'C2'; expected a label not used already"),
    ({"groups": (_binary("study_id"), _binary("C2")), "derived": ()}, r"groups\[0\]\.name is 'study_id'; .*the unit's id column"),
    ({"unit": "series"}, r"unit is 'series'; expected slice or study or patient"),
    ({"unit": "patient"}, r"series_rollup is None; expected mean or max for unit 'patient'"),
    ({"unit": "slice", "series_rollup": "mean"}, r"series_rollup is 'mean'; expected None for unit 'slice'"),
    ({"reduction": "median"}, r"reduction is 'median'; expected pooled or row or group"),
    ({"clip": 0.0}, r"clip is 0\.0; expected a number in \(0, 0\.5\)"),
    ({"submission": Submission("long", "row_id", ("C1", "C2", "C3", "overall"), "fractured")}, r"submission\.columns is 'C3'; expected a predicted label"),
    ({"submission": Submission("long", "row_id", ("C1", "C2"), "fractured")}, r"submission\.columns .*missing 'overall'"),
    ({"submission": Submission("long", "row_id", ("C1", "C2", "overall"))}, r"submission\.value_column is None"),
    ({"submission": Submission("tall", "row_id", ("C1", "C2", "overall"))}, r"submission\.layout is 'tall'"),
    ({"slice_columns": ("C1", "C1")}, r"slice_columns is \('C1', 'C1'\); expected distinct column names"),
    ({"unit": "slice", "slice_columns": ("C1",)}, r"slice_columns is \('C1',\); expected \(\) or the predicted labels for a slice-level task"),
])
def test_schema_errors(changes, match):
    with pytest.raises(ContractError, match=match) as info:
        _schema(**changes)
    assert "\n" not in str(info.value)


def test_a_valid_declaration_is_accepted_frozen_and_lists_become_tuples():
    schema = _schema(groups=[_binary("C1"), _binary("C2")])
    assert schema.groups == (_binary("C1"), _binary("C2"))
    assert schema.labels == ("C1", "C2", "overall") and schema.unit_column == "study_id"
    with pytest.raises(dataclasses.FrozenInstanceError):
        schema.unit = "patient"
    assert hash(schema) == hash(_schema())


def test_get_task():
    assert get_task("rsna2022-cspine") is RSNA2022_CSPINE
    assert set(TASKS) == {"rsna2019", "rsna2022-cspine", "rsna2023-abdominal"}
    with pytest.raises(ContractError, match=r"^unknown task 'rsna2024'; known tasks: rsna2019, rsna2022-cspine, rsna2023-abdominal$"):
        get_task("rsna2024")


def test_builtin_declarations():
    assert RSNA2019.labels == LABELS and RSNA2019.unit_column == "image_id"
    assert [d.weights for d in RSNA2022_CSPINE.derived] == [(7.0, 14.0)]
    assert {g.weights for g in RSNA2022_CSPINE.groups} == {(1.0, 2.0)}
    assert RSNA2023_ABDOMINAL.labels == tuple(CLASSES_2023) and len(CLASSES_2023) == 13
    assert [g.weights for g in RSNA2023_ABDOMINAL.groups] == [(1.0, 2.0), (1.0, 6.0)] + [(1.0, 2.0, 4.0)] * 3
    assert RSNA2023_ABDOMINAL.derived == (Derived("any_injury", ("bowel", "extravasation", "kidney", "liver", "spleen"),
                                                  (1.0, 6.0), predicted=False),)
    assert (RSNA2023_ABDOMINAL.unit, RSNA2023_ABDOMINAL.series_rollup) == ("patient", "mean")


def test_prediction_columns_are_the_slice_columns_or_the_labels():
    assert _schema(slice_columns=("C1", "C2", "overall", "vertebra_visible")).prediction_columns[-1] == "vertebra_visible"
    assert _schema().prediction_columns == ("C1", "C2", "overall")
    assert get_task("rsna2019").prediction_columns == LABELS
