"""stackkit.contract.validate: the contract files' validators, one table of refusals."""

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS, folds_hash
from stackkit.contract.io import write_parquet
from stackkit.contract.validate import (
    check_id_coverage,
    ids_in,
    load_core,
    read_oof,
    validate_folds,
    validate_labels,
    validate_metadata,
    validate_predictions,
)
from stackkit.errors import ContractError, LeakageError
from stackkit.testing.contract import make_contract_frames, noisy_predictions


def test_contract_frames_round_trip(contract_workdir):
    metadata, labels, folds = load_core(contract_workdir)
    assert labels[list(LABELS)].dtypes.eq(np.int8).all()
    assert folds["fold"].dtype == np.int8
    assert set(folds["image_id"]) == set(labels["image_id"])
    assert len(folds_hash(folds["image_id"], folds["fold"])) == 64


def _frames():
    return make_contract_frames(n_patients=12, n_folds=3, seed=1)


def _mutate(frame, **changes):
    frame = frame.copy()
    for column, (row, value) in changes.items():
        frame[column] = frame[column].astype(object)
        frame.loc[frame.index[row], column] = value
    return frame


BAD_CORE = [
    ("metadata", lambda m, l, f: m.drop(columns=["z"]), r"missing column\(s\) z"),
    ("metadata", lambda m, l, f: _mutate(m, split=(3, "valid")), r"column 'split' has 'valid' at row 4"),
    ("metadata", lambda m, l, f: _mutate(m, z=(0, np.nan)), r"column 'z' has nan at row 1"),
    ("metadata", lambda m, l, f: pd.concat([m, m.iloc[[0]]]), r"duplicate image_id"),
    ("labels", lambda m, l, f: _mutate(l, subdural=(2, 3)), r"column 'subdural' has 3 at row 3.*0 or 1"),
    ("labels", lambda m, l, f: l.iloc[1:], r"1 train image\(s\) missing"),
    ("folds", lambda m, l, f: _mutate(f, fold=(0, -1)), r"column 'fold' has -1"),
]


@pytest.mark.parametrize("which, corrupt, message", BAD_CORE)
def test_core_validators_refuse(which, corrupt, message):
    metadata, labels, folds = _frames()
    frames = {"metadata": metadata, "labels": labels, "folds": folds}
    frames[which] = corrupt(metadata, labels, folds)
    with pytest.raises(ContractError, match=message) as info:
        m = validate_metadata(frames["metadata"], "data/metadata.parquet")
        lab = validate_labels(frames["labels"], "data/labels.parquet", m)
        validate_folds(frames["folds"], "data/folds.parquet", m, lab)
    assert "\n" not in str(info.value)


def test_patient_spread_over_two_folds_is_leakage():
    metadata, labels, folds = _frames()
    merged = folds.merge(metadata, on="image_id")
    study = merged.groupby("study_id").size().loc[lambda s: s > 1].index[0]
    first = merged.index[merged["study_id"] == study][0]
    folds.loc[first, "fold"] = (folds.loc[first, "fold"] + 1) % 3
    with pytest.raises(LeakageError, match="spread over several folds"):
        validate_folds(folds, "data/folds.parquet", metadata, labels)


def test_oof_fold_disagreement_is_leakage(contract_workdir):
    metadata, labels, folds = load_core(contract_workdir)
    oof = noisy_predictions(labels, folds["image_id"])
    oof["fold"] = folds["fold"].to_numpy()
    oof.loc[5, "fold"] = (oof.loc[5, "fold"] + 1) % 4
    path = contract_workdir.root / "oof.parquet"
    write_parquet(oof, path)
    with pytest.raises(LeakageError, match=r"fold .* at row 6 .* disagrees with data/folds.parquet"):
        read_oof(path, folds, contract_workdir)


def test_predictions_fill_missing_fold_and_keep_order(contract_workdir):
    metadata, labels, folds = load_core(contract_workdir)
    shuffled = folds.sample(frac=1.0, random_state=2)
    oof = noisy_predictions(labels, shuffled["image_id"])
    checked = validate_predictions(oof, "oof", expected_ids=folds["image_id"], what="labeled", folds=folds)
    assert checked["image_id"].tolist() == shuffled["image_id"].tolist()
    assert checked["fold"].tolist() == shuffled["fold"].tolist()
    assert checked[list(LABELS)].dtypes.eq(np.float32).all()


def test_ids_in_matches_python_membership():
    values = pd.Series(["ID_a", "ID_b", None, "ID_d"], dtype=object)
    assert ids_in(values, {"ID_b", "ID_d", "ID_x"}).tolist() == [False, True, False, True]
    assert ids_in([], ["ID_a"]).tolist() == []


@pytest.mark.parametrize("ids, message", [
    (["ID_a", "ID_b", "ID_q"], r"image_id 'ID_q' at row 3 is not a test image"),
    (["ID_a"], r"1 test image\(s\) missing, e.g. image_id 'ID_b'"),
])
def test_check_id_coverage_names_the_first_offender(ids, message):
    with pytest.raises(ContractError, match=message):
        check_id_coverage(pd.Series(ids, dtype=object), np.array(["ID_a", "ID_b"], dtype=object), "preds/m/test.parquet", "test")
