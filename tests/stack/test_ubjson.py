"""The UBJSON walk that stands between a damaged XGBoost file and XGBoost's (crashing) reader."""

import numpy as np
import pytest

from stackkit.stack.stackers.ubjson import UBJSONError, check_ubjson

xgb = pytest.importorskip("xgboost")


@pytest.fixture(scope="module")
def booster_bytes():
    rng = np.random.default_rng(0)
    X = rng.random((600, 8))
    y = (X[:, 0] + 0.3 * rng.random(600) > 0.6).astype(np.float64)
    booster = xgb.train({"max_depth": 2, "nthread": 1}, xgb.DMatrix(X, y), num_boost_round=4)
    return bytes(booster.save_raw("ubj"))


def test_a_complete_model_passes(booster_bytes):
    check_ubjson(booster_bytes)


def test_every_cut_of_a_real_model_is_refused(booster_bytes):
    accepted = []
    for cut in range(len(booster_bytes)):
        try:
            check_ubjson(booster_bytes[:cut])
        except UBJSONError:
            continue
        accepted.append(cut)
    assert accepted == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw + b"\x00", r"trailing bytes at byte \d+"),
        (lambda raw: b"[" + raw[1:], r"does not start with an object at byte 0"),
        # the first key's int64 length made huge: the walk refuses to read past the end
        (lambda raw: raw[:2] + b"\x7f" + raw[3:], r"declares \d+ bytes past the end"),
        (lambda raw: raw[:1] + b"Q" + raw[2:], r"expects an integer length or count, found marker b'Q'"),
        (lambda raw: b"{i\x01a" + b"[" * 80 + b"]" * 80 + b"}", r"nests deeper"),
    ],
)
def test_damaged_structure_is_refused_with_its_offset(booster_bytes, damage, message):
    with pytest.raises(UBJSONError, match=message):
        check_ubjson(damage(booster_bytes))


def test_the_bytes_it_passes_load_in_xgboost(booster_bytes):
    booster = xgb.Booster()
    booster.load_model(bytearray(booster_bytes))
    assert booster.num_boosted_rounds() == 4
