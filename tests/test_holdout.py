"""Scoring on held-back labels (stackkit.holdout): the submission's long format, and refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS
from stackkit.errors import StackkitError
from stackkit.holdout import read_submission, score_on
from stackkit.metric import weighted_log_loss


def _frames():
    rng = np.random.default_rng(0)
    ids = [f"ID_{i:09x}" for i in range(7)]
    truth = pd.DataFrame((rng.random((7, 6)) < 0.3).astype(np.int8), columns=list(LABELS))
    truth.insert(0, "image_id", ids)
    pred = pd.DataFrame(rng.uniform(0.05, 0.95, (7, 6)), columns=list(LABELS))
    pred.insert(0, "image_id", ids)
    return truth, pred


def test_a_submission_scores_like_its_wide_predictions(tmp_path):
    truth, pred = _frames()
    long = pred.melt(id_vars="image_id", var_name="label", value_name="Label")
    long.insert(0, "ID", long.pop("image_id") + "_" + long.pop("label"))
    long.sample(frac=1.0, random_state=1).to_csv(tmp_path / "submission.csv", index=False)  # row order is free
    expected = weighted_log_loss(truth[list(LABELS)].to_numpy(), pred[list(LABELS)].to_numpy()).overall
    assert score_on(read_submission(tmp_path / "submission.csv"), truth, "sub").overall == pytest.approx(expected, rel=1e-12)
    # rows are matched by image id, not by position
    assert score_on(pred.iloc[::-1], truth, "reversed").overall == pytest.approx(expected, rel=1e-12)


def test_a_held_out_image_without_a_prediction_is_one_line():
    truth, pred = _frames()
    with pytest.raises(StackkitError, match=r"^preds/x/test.parquet: 1 held-out image\(s\) have no prediction, e.g. ID_000000003$"):
        score_on(pred.drop(index=3), truth, "preds/x/test.parquet")
