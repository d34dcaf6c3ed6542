"""`base import`: register predictions made anywhere else as preds/<name>/.

Accepts Parquet or CSV, wide (``image_id`` + six label columns, optional ``fold``) or the
RSNA long format (``ID,Label`` with ``ID = <image_id>_<label>``), probabilities or logits.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import CONTRACT_VERSION, LABELS, MODEL_RECORD, Workdir, check_model_name, folds_hash
from stackkit.errors import ContractError, StackkitError
from stackkit.contract.io import read_table, replace_dir, write_parquet, write_set_record
from stackkit.metric import prior_score, weighted_log_loss
from stackkit.contract.validate import check_numeric, load_core, validate_predictions

_LONG_ID = re.compile(r"^(?P<image>.+)_(?P<label>" + "|".join(LABELS) + r")$")


def long_to_wide(frame: pd.DataFrame, source) -> pd.DataFrame:
    """RSNA long format (ID, Label) -> image_id + six label columns."""
    ids = frame["ID"].astype(str)
    parts = ids.str.extract(_LONG_ID)
    bad = parts["label"].isna().to_numpy()
    if bad.any():
        pos = int(np.argmax(bad))
        raise ContractError(
            f"{source}: ID {ids.iloc[pos]!r} at row {pos + 1} does not end in one of the six labels "
            f"({', '.join(LABELS)}); expected IDs such as ID_63eb1e259_epidural"
        )
    values = check_numeric(frame[["Label"]].assign(image_id=ids), ["Label"], source)["Label"]
    long = pd.DataFrame({"image_id": parts["image"], "label": parts["label"], "value": values.to_numpy()})
    dup = long.duplicated(["image_id", "label"]).to_numpy()
    if dup.any():
        pos = int(np.argmax(dup))
        raise ContractError(f"{source}: ID {ids.iloc[pos]!r} appears more than once (row {pos + 1})")
    wide = long.pivot(index="image_id", columns="label", values="value")
    wide = wide.reindex(columns=list(LABELS))
    missing = wide.isna().to_numpy()
    if missing.any():
        row, col = np.argwhere(missing)[0]
        raise ContractError(
            f"{source}: image {wide.index[row]!r} has no row for label '{LABELS[col]}'; the long format needs six rows per image"
        )
    # keep the file's first-appearance order of images
    order = pd.unique(long["image_id"])
    return wide.loc[order].reset_index().rename_axis(columns=None)


def read_prediction_file(path, *, logits: bool, what: str) -> pd.DataFrame:
    """Any accepted layout -> image_id (+ fold) + six probability columns (not yet id-checked)."""
    path = Path(path)
    frame = read_table(path, what=f"{what} prediction file")
    source = str(path)
    if {"ID", "Label"}.issubset(frame.columns) and "image_id" not in frame.columns:
        frame = long_to_wide(frame, source)
    elif "image_id" not in frame.columns or not set(LABELS).issubset(frame.columns):
        got = ", ".join(map(str, list(frame.columns)[:12]))
        missing = [c for c in ("image_id", *LABELS) if c not in frame.columns]
        raise ContractError(
            f"{source}: missing column(s) {', '.join(missing)}; found [{got}]; expected image_id + "
            f"{', '.join(LABELS)} (wide) or ID,Label (RSNA long)"
        )
    if logits:
        frame = check_numeric(frame, LABELS, source)
        for col in LABELS:
            frame[col] = 1.0 / (1.0 + np.exp(-frame[col].to_numpy(dtype=np.float64)))
    return frame


def import_predictions(wd: Workdir, name: str, *, oof_path, test_path, logits: bool = False, force: bool = False) -> dict:
    check_model_name(name)
    metadata, labels, folds = load_core(wd)
    target = wd.preds_dir(name)
    if target.exists() and not force:
        raise StackkitError(f"{target}: model '{name}' already exists; pass --force to replace it or choose another name")

    oof = read_prediction_file(oof_path, logits=logits, what="OOF")
    oof = validate_predictions(oof, str(oof_path), expected_ids=folds["image_id"], what="labeled", folds=folds)
    test = read_prediction_file(test_path, logits=logits, what="test")
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    test = validate_predictions(test, str(test_path), expected_ids=test_ids, what="test")

    y_true = labels.set_index("image_id").loc[oof["image_id"], list(LABELS)].to_numpy()
    score = weighted_log_loss(y_true, oof[list(LABELS)].to_numpy())
    prior = prior_score(y_true)

    record = {
        "contract_version": CONTRACT_VERSION,
        "name": name,
        "source": "imported",
        "architecture": None,
        "parameters": {"oof_file": str(oof_path), "test_file": str(test_path), "logits": logits},
        "folds_hash": folds_hash(folds["image_id"], folds["fold"]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "oof_logloss": score.as_dict(),
        "prior_logloss": prior.overall,
        "n_oof": int(len(oof)),
        "n_test": int(len(test)),
    }
    # preds/<name>/ is replaced as a set: every file is written into a fresh sibling folder, the record
    # (model.json, with the sha256 of every other file) last, then the folder is switched in at once.
    with replace_dir(target) as folder:
        write_parquet(oof, folder / "oof.parquet")
        write_parquet(test, folder / "test.parquet")
        write_set_record(folder, MODEL_RECORD, record)
    return {
        "lines": [
            f"imported '{name}': {len(oof)} OOF and {len(test)} test images -> {target}",
            f"OOF weighted log loss {score.overall:.5f} (prior {prior.overall:.5f})",
        ],
        "name": name,
        "oof_logloss": score.overall,
    }
