"""Blend math, blend fitting (in-sample vs cross-validated) and the Optuna blend search (storages: test_storages.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stackkit.stack.blend import (
    BlendParams,
    apply_blend,
    cross_validated_blend,
    fit_blend,
    logit,
    normalize_weights,
    sigmoid,
)
from stackkit.contract import LABELS
from stackkit.metric import weighted_log_loss
from stackkit.stack.blend_search import search_blend

from stackkit.testing.stack import synthetic_sources

ANY = LABELS.index("any")


# --- apply_blend ------------------------------------------------------------------------------------


def test_weights_are_normalized_per_label_and_scale_free():
    preds, _, _ = synthetic_sources(200, [2.0, 1.0, 0.5], seed=1)
    raw = np.random.default_rng(0).random((3, 6)) + 0.1
    w = normalize_weights(raw)
    assert np.allclose(w.sum(axis=0), 1.0) and (w >= 0).all()
    assert np.allclose(apply_blend(preds, raw), apply_blend(preds, 7.5 * raw))
    # a weight column of zeros means "no preference": equal weights
    assert np.allclose(normalize_weights(np.zeros((4, 6))), 0.25)
    # shared (n_sources,) weights broadcast to every label
    assert np.allclose(normalize_weights(np.array([1.0, 3.0])), np.array([[0.25] * 6, [0.75] * 6]))


def test_blend_is_a_weighted_logit_average_with_temperature():
    preds, _, _ = synthetic_sources(50, [2.0, 0.5], seed=2)
    w = np.array([[0.8] * 6, [0.2] * 6])
    t = np.array([1.0, 2.0, 0.5, 1.0, 1.5, 1.0])
    expected = sigmoid((0.8 * logit(preds[0]) + 0.2 * logit(preds[1])) / t)
    got = apply_blend(preds, w, t, clip=0.0, any_consistency=False)
    assert np.allclose(got, expected, atol=1e-12)
    # one source with weight 1, temperature 1, no clip: the source itself
    assert np.allclose(apply_blend(preds[:1], np.ones((1, 6)), 1.0, clip=0.0, any_consistency=False), preds[0], atol=1e-9)


def test_probability_space_is_a_linear_pool_never_worse_than_its_sources_on_average():
    preds, y, _ = synthetic_sources(300, [2.0, 0.3, 1.0], seed=4)
    w = np.array([[0.5] * 6, [0.3] * 6, [0.2] * 6])
    pooled = apply_blend(preds, w, clip=0.0, any_consistency=False, space="probability")
    assert np.allclose(pooled, np.einsum("snl,s->nl", preds, w[:, 0]), atol=1e-9)
    equal = BlendParams.equal(3, clip=0.0, any_consistency=False)
    assert equal.space == "probability"
    # log loss is convex in p: the equal pool scores at most the mean of the sources' scores
    assert equal.score(preds, y).overall <= np.mean([weighted_log_loss(y, p).overall for p in preds]) + 1e-12
    # the two spaces really differ when sources disagree
    assert not np.allclose(pooled, apply_blend(preds, w, clip=0.0, any_consistency=False, space="logit"))


def test_any_consistency_and_clip():
    p = np.full((1, 4, 6), 0.1)
    p[0, 0, 2] = 0.9  # a subtype above `any`
    p[0, 1, :] = 1.0  # certain everywhere
    p[0, 2, :] = 0.0
    kept = apply_blend(p, np.ones((1, 6)), clip=1e-3, any_consistency=False)
    fixed = apply_blend(p, np.ones((1, 6)), clip=1e-3, any_consistency=True)
    assert kept[0, ANY] < kept[0, 2]
    assert np.all(fixed[:, ANY] >= fixed[:, [i for i in range(6) if i != ANY]].max(axis=1))
    assert np.isclose(fixed[0, ANY], fixed[0, 2])
    assert fixed.max() <= 1 - 1e-3 + 1e-15 and fixed.min() >= 1e-3 - 1e-15


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights=-np.ones((2, 6))), "non-negative"),
        (dict(weights=np.full((2, 6), np.nan)), "finite"),
        (dict(weights=np.ones((3, 6))), r"shape \(2, 6\)"),
        (dict(weights=np.ones((2, 5))), "shape"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=np.array([1, 1, 1, 1, 1, -1.0])), "temperature"),
        (dict(clip=0.5), "clip"),
        (dict(clip=-0.1), "clip"),
        (dict(space="geometric"), "space"),
    ],
)
def test_apply_blend_refuses_bad_parameters(kwargs, match):
    preds, _, _ = synthetic_sources(10, [1.0, 1.0])
    args = dict(weights=np.ones((2, 6)), temperature=1.0, clip=1e-6, any_consistency=True) | kwargs
    with pytest.raises(ValueError, match=match):
        apply_blend(preds, **args)


def test_blend_params_json_round_trip():
    params = BlendParams(np.random.default_rng(3).random((2, 6)), np.linspace(0.5, 2, 6), 1e-4, False)
    names = ["stack/lgbm", "preds/m1"]
    back = BlendParams.from_json(json.loads(json.dumps(params.to_json(names))), names)
    assert np.allclose(back.weights, params.weights) and np.allclose(back.temperature, params.temperature)
    assert back.clip == params.clip and back.any_consistency is False and back.space == "logit"
    pool = BlendParams.equal(2)
    assert BlendParams.from_json(json.loads(json.dumps(pool.to_json(names))), names).space == "probability"
    # blend.json files written before the space was recorded averaged logits
    old_record = {k: v for k, v in params.to_json(names).items() if k != "space"}
    assert BlendParams.from_json(old_record, names).space == "logit"
    with pytest.raises(ValueError, match="space"):
        BlendParams.from_json({**params.to_json(names), "space": "odds"}, names)


# --- fitting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_label", [True, False])
def test_fit_puts_more_weight_on_the_good_source(per_label):
    preds, y, _ = synthetic_sources(3000, [0.3, 3.0], seed=4)  # source 0 bad, source 1 good
    params = fit_blend(preds, y, per_label=per_label)
    assert np.all(params.weights[1] > params.weights[0])
    assert np.allclose(params.weights.sum(axis=0), 1.0)
    fitted = params.score(preds, y).overall
    assert fitted < BlendParams.equal(2).score(preds, y).overall
    assert fitted <= weighted_log_loss(y, preds[1]).overall + 1e-9


def test_cross_validated_blend_is_worse_than_in_sample_when_it_can_overfit():
    """Many pure-noise sources and few rows: fitted per-label weights chase noise in-sample.

    The cross-validated score refits on the other folds, so it cannot see that noise.
    """
    gaps = []
    for seed in range(3):
        preds, y, folds = synthetic_sources(240, [1.5] + [0.0] * 12, seed=seed)
        in_sample = fit_blend(preds, y, per_label=True).score(preds, y).overall
        pooled, per_fold = cross_validated_blend(preds, y, folds, lambda p, yy: fit_blend(p, yy, per_label=True))
        assert len(per_fold) == 4 and sum(f["n"] for f in per_fold) == len(y)
        gaps.append(weighted_log_loss(y, pooled).overall - in_sample)
    assert np.mean(gaps) > 0
    assert min(gaps) > 0


def test_search_blend_never_worse_than_its_start_points():
    preds, y, _ = synthetic_sources(600, [2.0, 1.0, 0.2], seed=5)
    names = ["a", "b", "c"]
    best, info = search_blend(preds, y, names, per_label=True, any_consistency=True, trials=8, seed=0)
    fitted = fit_blend(preds, y, per_label=True)
    assert best.score(preds, y).overall <= fitted.score(preds, y).overall + 1e-12
    assert best.score(preds, y).overall <= BlendParams.equal(3).score(preds, y).overall
    assert info.trials_run == 8


def test_blend_output_properties_hold_for_any_parameters():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    probabilities = arrays(np.float64, (3, 5, 6), elements=st.floats(0.0, 1.0))
    weights = arrays(np.float64, (3, 6), elements=st.floats(0.0, 10.0))
    temperatures = arrays(np.float64, (6,), elements=st.floats(0.1, 10.0))

    @settings(max_examples=60, deadline=None)
    @given(probabilities, weights, temperatures, st.floats(0.0, 0.1), st.booleans())
    def check(preds, w, t, clip, consistent):
        out = apply_blend(preds, w, t, clip, consistent)
        assert out.shape == (5, 6) and np.isfinite(out).all()
        assert (out >= clip).all() and (out <= 1 - clip).all()
        if consistent:
            assert (out[:, ANY] >= out[:, [i for i in range(6) if i != ANY]].max(axis=1)).all()
        # the blend is monotone in each source: raising every input never lowers the output
        raised = apply_blend(np.minimum(preds + 0.05, 1.0), w, t, clip, consistent)
        assert (raised >= out - 1e-12).all()

    check()


# --- the default blend: chosen on honest CV among recipes and single sources ------------------------


def test_chosen_blend_is_never_worse_on_cv_than_its_best_source():
    from stackkit.stack.blend import MIN_BLEND_GAIN, choose_blend

    def clearly_better(blend, source):
        return (all(b["overall"] < s["overall"] for b, s in zip(blend.per_fold, source.per_fold))
                and blend.cv.overall <= source.cv.overall * (1 - MIN_BLEND_GAIN))

    rng = np.random.default_rng(11)
    for trial in range(12):
        n_sources = int(rng.integers(1, 5))
        preds, y, folds = synthetic_sources(int(rng.integers(150, 600)), list(rng.uniform(0, 3, n_sources)), seed=trial)
        preds = np.clip(preds ** rng.uniform(0.3, 3, size=(n_sources, 1, 1)), 1e-6, 1 - 1e-6)  # miscalibrated in random ways
        choice = choose_blend(preds, y, folds, [f"s{i}" for i in range(n_sources)])
        best_source = min(weighted_log_loss(y, p).overall for p in preds)
        assert choice.cv.overall <= best_source + 1e-12
        best_source_candidate = min((c for c in choice.candidates if c.kind == "source"), key=lambda c: c.cv.overall)
        eligible = [c for c in choice.candidates if c.kind == "blend" and clearly_better(c, best_source_candidate)]
        # the lowest blend below the best source on every fold and by MIN_BLEND_GAIN overall, else the best source
        assert choice.chosen is (min(eligible, key=lambda c: c.cv.overall) if eligible else best_source_candidate)
        assert np.allclose(choice.params.weights.sum(axis=0), 1.0)


def test_a_blend_that_cannot_help_falls_back_to_the_single_source():
    """Two copies of one calibrated source: every refitted recipe can only add fitting noise."""
    from stackkit.stack.blend import choose_blend

    rng = np.random.default_rng(5)
    truth = rng.uniform(0.02, 0.6, size=(800, 6))
    y = (rng.random(truth.shape) < truth).astype(float)
    preds = np.stack([truth, truth])
    folds = np.arange(800) % 4
    choice = choose_blend(preds, y, folds, ["a", "b"])
    assert choice.chosen.kind == "source" and choice.chosen.name == "a"
    assert np.allclose(choice.params.apply(preds), truth, atol=1e-9)  # the source as it is
    assert "lowest cross-validated loss" in choice.reason


def _two_noisy_sources(corrupt_fold: int | None, seed: int = 3):
    """Two independent noisy views of one truth (blending them helps); with ``corrupt_fold``, the
    second is pure noise on that fold's rows only, so a blend fitted on the other folds hurts there."""
    rng = np.random.default_rng(seed)
    n = 2000
    truth_logits = rng.normal(-1.5, 1.5, size=(n, 6))
    y = (rng.random((n, 6)) < 1 / (1 + np.exp(-truth_logits))).astype(float)
    folds = np.arange(n) % 4
    a, b = (1 / (1 + np.exp(-(truth_logits + rng.normal(0, 1.0, (n, 6))))) for _ in range(2))
    if corrupt_fold is not None:
        b[folds == corrupt_fold] = rng.uniform(0.01, 0.99, ((folds == corrupt_fold).sum(), 6))
    return np.stack([a, b]), y, folds


@pytest.mark.parametrize("corrupt_fold", [None, 3])
def test_a_blend_is_kept_only_when_it_beats_the_best_source_on_every_fold(corrupt_fold):
    from stackkit.stack.blend import MIN_BLEND_GAIN, choose_blend

    preds, y, folds = _two_noisy_sources(corrupt_fold)
    choice = choose_blend(preds, y, folds, ["a", "b"])
    lowest = min(choice.candidates, key=lambda c: c.cv.overall)
    source = next(c for c in choice.candidates if c.name == "a")
    assert lowest.kind == "blend" and lowest.cv.overall < source.cv.overall * (1 - 4 * MIN_BLEND_GAIN)  # a large gain overall
    worse = [k for k, (f, g) in enumerate(zip(lowest.per_fold, source.per_fold)) if f["overall"] >= g["overall"]]
    if corrupt_fold is None:
        assert worse == [] and choice.chosen is lowest
    else:
        assert worse == [corrupt_fold] and choice.chosen is source
        assert "not below it on 1 of 4 folds" in choice.reason


def test_any_consistency_is_kept_only_where_it_helps():
    """The issue's case: epidural 0.9, any 0.1, all labels 0; forcing any >= epidural would triple the loss."""
    from stackkit.stack.blend import choose_blend

    preds = np.tile(np.array([0.9, 0.01, 0.01, 0.01, 0.01, 0.1]), (2, 400, 1))
    y = np.zeros((400, 6))
    choice = choose_blend(preds, y, np.arange(400) % 4, ["a", "b"])
    single = weighted_log_loss(y, preds[0]).overall
    assert choice.cv.overall <= single + 1e-12
    assert not choice.params.any_consistency
    forced = [c for c in choice.candidates if c.recipe is not None and c.recipe.any_consistency and not c.recipe.calibrate]
    assert all(c.cv.overall > single for c in forced)


def test_fit_weights_is_a_non_negative_logistic_fit():
    from stackkit.stack.blend import fit_weights, logit

    preds, y, _ = synthetic_sources(3000, [0.0, 1.0, 2.5], seed=2)
    weights, temperature, bias = fit_weights(logit(preds), y, calibrate=True)
    assert (weights >= 0).all() and np.allclose(weights.sum(axis=0), 1.0)
    assert (weights[2] > weights[1]).all() and (weights[0] < 0.1).all()  # the noise source gets (almost) nothing
    plain, t1, b1 = fit_weights(logit(preds), y, calibrate=False)
    assert np.allclose(t1, 1.0) and np.allclose(b1, 0.0)
    calibrated = BlendParams(weights, temperature, 1e-7, False, "logit", bias).score(preds, y).overall
    assert calibrated < BlendParams(plain, 1.0, 1e-7, False, "logit").score(preds, y).overall
