import numpy as np
import pytest
from sklearn.metrics import log_loss

from stackkit.contract import LABEL_WEIGHTS, LABELS
from stackkit.metric import EPS, prior_score, weighted_log_loss


def test_hand_computed_example():
    y = np.array([[0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    p = np.array([[0.1, 0.8, 0.2, 0.1, 0.1, 0.9], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    # image 1: -log(0.9), -log(0.8), -log(0.8), -log(0.9), -log(0.9), -log(0.9) (any, weight 2)
    img1 = [-np.log(0.9), -np.log(0.8), -np.log(0.8), -np.log(0.9), -np.log(0.9), -np.log(0.9)]
    img2 = [np.log(2)] * 6
    w = [1, 1, 1, 1, 1, 2]
    expected = (np.dot(w, img1) + np.dot(w, img2)) / (2 * 7)
    score = weighted_log_loss(y, p)
    assert score.overall == pytest.approx(expected, rel=1e-12)
    assert score.per_label["intraparenchymal"] == pytest.approx((-np.log(0.8) + np.log(2)) / 2)
    assert list(score.per_label) == list(LABELS)


def test_equals_sklearn_weighted_log_loss():
    rng = np.random.default_rng(3)
    y = (rng.random((200, 6)) < 0.3).astype(int)
    p = rng.random((200, 6))
    sample_weight = np.tile(LABEL_WEIGHTS, 200)
    expected = log_loss(y.ravel(), p.ravel(), sample_weight=sample_weight, labels=[0, 1])
    assert weighted_log_loss(y, p).overall == pytest.approx(expected, rel=1e-9)


def test_clipping_keeps_score_finite():
    y = np.ones((3, 6))
    p = np.zeros((3, 6))
    assert weighted_log_loss(y, p).overall == pytest.approx(-np.log(EPS), rel=1e-6)


def test_perfect_prediction_scores_about_zero_and_prior_is_worse():
    rng = np.random.default_rng(0)
    y = (rng.random((50, 6)) < 0.2).astype(float)
    assert weighted_log_loss(y, y).overall < 1e-6
    assert prior_score(y).overall > 0.1


@pytest.mark.parametrize("shape_true, shape_pred", [((4, 6), (4, 5)), ((4,), (4,)), ((0, 6), (0, 6))])
def test_shape_errors(shape_true, shape_pred):
    with pytest.raises(ValueError):
        weighted_log_loss(np.zeros(shape_true), np.zeros(shape_pred))
