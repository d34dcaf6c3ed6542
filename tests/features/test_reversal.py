"""A study reversed in z: its features, rebuilt by the real `stack features` code, are exactly the
original features with the direction columns swapped (features.build.reversal_map)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.build import build_features, feature_columns, reversal_map, reverse_features
from stackkit.contract import LABELS
from stackkit.errors import StackkitError


def _data(seed: int, n_studies: int = 24, models=("cnn_a", "cnn_b")):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        n = 1 if s % 9 == 0 else int(rng.integers(2, 12))
        # distinct z (ties are broken by image_id, which does not reverse), irregular gaps, either stored direction
        z = rng.normal(0, 30) + np.sort(rng.choice(np.arange(60), n, replace=False)) * rng.choice([2.5, 5.0])
        if s % 3 == 1:
            z = z[::-1]
        split = "test" if s % 4 == 3 else "train"
        for i in range(n):
            rows.append((f"ID_{rng.integers(1 << 36):09x}", f"ID_p{s:04d}", f"ID_s{s:04d}", split, float(z[i]), float(rng.choice([1.0, 5.0]))))
    metadata = pd.DataFrame(rows, columns=["image_id", "patient_id", "study_id", "split", "z", "slice_thickness"])
    metadata = metadata.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    train = metadata[metadata["split"] == "train"]
    study_fold = {sid: k % 3 for k, sid in enumerate(train["study_id"].unique())}
    folds = pd.DataFrame({"image_id": train["image_id"].to_numpy(), "fold": train["study_id"].map(study_fold).to_numpy().astype(np.int8)})
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"].to_numpy()

    def preds(ids, fold=None):
        frame = pd.DataFrame(np.round(rng.random((len(ids), len(LABELS))), 2).astype(np.float32), columns=list(LABELS))
        if fold is not None:
            frame.insert(0, "fold", np.asarray(fold, dtype=np.int8))
        frame.insert(0, "image_id", np.asarray(ids))
        return frame

    oof = {m: preds(folds["image_id"], folds["fold"]) for m in models}
    test = {m: preds(test_ids) for m in models}
    return metadata, folds, oof, test


@pytest.mark.parametrize("seed, lags, feature_set", [(0, 2, "basic"), (1, 3, "basic"), (2, 1, "basic"), (3, 2, "wide"), (4, 9, "wide")])
def test_a_study_reversed_in_z_gives_the_reversed_features(seed, lags, feature_set):
    metadata, folds, oof, test = _data(seed)
    forward = build_features(metadata, oof, test, folds, lags=lags, dicom_meta=True, progress=False, feature_set=feature_set)
    flipped_meta = metadata.assign(z=-metadata["z"])
    backward = build_features(flipped_meta, oof, test, folds, lags=lags, dicom_meta=True, progress=False, feature_set=feature_set)
    names = list(forward[2])
    source, complement = reversal_map(names)
    for part in (0, 1):  # train, test
        f = forward[part].set_index("image_id")
        b = backward[part].set_index("image_id").loc[f.index]
        expected = reverse_features(f[names].to_numpy(), source, complement)
        np.testing.assert_allclose(b[names].to_numpy(), expected, rtol=0, atol=1e-6, equal_nan=True)
        # the row order reverses too: slice k of n becomes slice n-1-k
        n = f.groupby("study_id")["slice_index"].transform("size")
        np.testing.assert_array_equal(b["slice_index"].to_numpy(), (n - 1 - f["slice_index"]).to_numpy())
    # the map is not vacuous: a plain row flip (direction columns kept) is wrong on the data
    plain = forward[0].set_index("image_id")[names].to_numpy()
    rebuilt = backward[0].set_index("image_id").loc[forward[0]["image_id"], names].to_numpy()
    assert not np.allclose(np.nan_to_num(plain, nan=-9), np.nan_to_num(rebuilt, nan=-9))


def test_reversal_map_swaps_every_direction_column_and_nothing_else():
    names = list(feature_columns(["m1", "m2"], lags=2, meta_columns=["slice_thickness"]))
    source, complement = reversal_map(names)
    mapped = {names[j]: names[source[j]] for j in range(len(names)) if source[j] != j}
    directional = [n for n in names if n.rsplit("__", 1)[1] in ("lag1", "lag2", "lead1", "lead2", "diff_lag1", "diff_lag2",
                                                                   "diff_lead1", "diff_lead2", "z_gap_prev", "z_gap_next",
                                                                   "index", "reverse_index")]
    assert sorted(mapped) == sorted(directional)
    assert mapped["m1__any__lag2"] == "m1__any__lead2" and mapped["m2__epidural__diff_lead1"] == "m2__epidural__diff_lag1"
    assert mapped["slice__index"] == "slice__reverse_index" and mapped["slice__z_gap_next"] == "slice__z_gap_prev"
    assert [names[j] for j in np.flatnonzero(complement)] == ["slice__position"]
    np.testing.assert_array_equal(source[source], np.arange(len(names)))  # an involution


def test_reversal_map_refuses_a_lag_without_its_lead():
    with pytest.raises(StackkitError, match=r"'m1__any__lag1' has no 'm1__any__lead1' to swap with"):
        reversal_map(["m1__any__pred", "m1__any__lag1"])


def test_the_wide_columns_do_not_depend_on_the_direction():
    basic = list(feature_columns(["m1", "m2"], lags=2, meta_columns=["slice_thickness"]))
    wide = list(feature_columns(["m1", "m2"], lags=2, meta_columns=["slice_thickness"], feature_set="wide"))
    added = [n for n in wide if n not in basic]
    assert {n.rsplit("__", 1)[1] for n in added} == {"study_min", "minus_study_mean", "minus_study_max", "roll7_mean", "roll9_mean", "max", "min"}
    source, complement = reversal_map(wide)
    kept = {wide[j] for j in range(len(wide)) if source[j] == j and not complement[j]}
    assert set(added) <= kept
    # the basic columns map as they do without the wide set
    basic_source, basic_complement = reversal_map(basic)
    position = {name: j for j, name in enumerate(wide)}
    assert [wide[source[position[n]]] for n in basic] == [basic[s] for s in basic_source]
    np.testing.assert_array_equal(complement[[position[n] for n in basic]], basic_complement)
