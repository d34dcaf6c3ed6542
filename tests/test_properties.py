"""Property tests (hypothesis) for the metric and the feature builder."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import log_loss

from stackkit.contract import LABEL_WEIGHTS
from stackkit.metric import EPS, weighted_log_loss

n_rows = st.integers(min_value=1, max_value=40)


@st.composite
def labels_and_probs(draw):
    n = draw(n_rows)
    y = draw(arrays(np.int8, (n, 6), elements=st.integers(0, 1)))
    p = draw(arrays(np.float64, (n, 6), elements=st.floats(0.0, 1.0, allow_nan=False)))
    return y, p


@settings(max_examples=60, deadline=None)
@given(labels_and_probs())
def test_metric_equals_sklearn_weighted_log_loss(data):
    y, p = data
    clipped = np.clip(p, EPS, 1 - EPS)
    expected = log_loss(y.ravel(), clipped.ravel(), sample_weight=np.tile(LABEL_WEIGHTS, len(y)), labels=[0, 1])
    assert np.isclose(weighted_log_loss(y, p).overall, expected, rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(labels_and_probs(), st.randoms(use_true_random=False))
def test_metric_ignores_row_order(data, rnd):
    y, p = data
    order = list(range(len(y)))
    rnd.shuffle(order)
    assert np.isclose(weighted_log_loss(y, p).overall, weighted_log_loss(y[order], p[order]).overall, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(arrays(np.int8, st.tuples(n_rows, st.just(6)), elements=st.integers(0, 1)))
def test_perfect_prediction_scores_about_zero(y):
    assert weighted_log_loss(y, y.astype(float)).overall < 1e-6


# --- the feature builder ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n_studies=st.integers(1, 12), lags=st.integers(0, 3), rnd=st.randoms(use_true_random=False))
def test_permuting_input_rows_never_changes_any_features(seed, n_studies, lags, rnd):
    import pandas as pd

    from features.build import build_features
    from test_features import make_data

    metadata, _labels, folds, preds = make_data(seed, n_studies=n_studies, models=("m_a", "m_b"), n_folds=2)

    def shuffled(frame):
        order = list(range(len(frame)))
        rnd.shuffle(order)
        return frame.iloc[order].reset_index(drop=True)

    def build(meta, fold_frame, oof, test):
        return build_features(meta, oof, test, fold_frame, lags=lags, progress=False)

    oof = {m: p[0] for m, p in preds.items()}
    test = {m: p[1] for m, p in preds.items()}
    expected = build(metadata, folds, oof, test)
    permuted = build(shuffled(metadata), shuffled(folds), {m: shuffled(f) for m, f in oof.items()}, {m: shuffled(f) for m, f in test.items()})
    for want, got in zip(expected[:2], permuted[:2]):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert permuted[2] == expected[2]
