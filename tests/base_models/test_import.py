"""`base import`: every accepted layout works, every bad input is one line + exit 2 + nothing changed."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import LABELS
from stackkit.contract.io import read_json, write_parquet
from stackkit.contract.validate import load_core, read_oof, read_test

from stackkit.testing.contract import noisy_predictions, snapshot


def _wide(contract_workdir):
    metadata, labels, folds = load_core(contract_workdir)
    oof = noisy_predictions(labels, folds["image_id"], seed=1)
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    test = noisy_predictions(labels, test_ids, seed=2)
    return metadata, labels, folds, oof, test


def _to_long(frame):
    long = frame.melt(id_vars="image_id", value_vars=list(LABELS), var_name="label", value_name="Label")
    long["ID"] = long["image_id"] + "_" + long["label"]
    return long[["ID", "Label"]]


def _invoke(wd, *args):
    return CliRunner().invoke(cli, ["base", "import", *args, "--workdir", str(wd.root)], catch_exceptions=False)


def test_import_wide_parquet_fills_fold_and_scores(contract_workdir, tmp_path):
    metadata, labels, folds, oof, test = _wide(contract_workdir)
    write_parquet(oof, tmp_path / "oof.parquet")
    write_parquet(test.iloc[::-1], tmp_path / "test.parquet")  # another order is legal
    result = _invoke(contract_workdir, "m1", "--oof", str(tmp_path / "oof.parquet"), "--test", str(tmp_path / "test.parquet"))
    assert result.exit_code == 0, result.output
    written = read_oof(contract_workdir.oof("m1"), folds, contract_workdir)
    assert written["fold"].tolist() == folds.set_index("image_id").loc[written["image_id"], "fold"].tolist()
    assert len(read_test(contract_workdir.test("m1"), metadata, contract_workdir)) == len(test)
    record = read_json(contract_workdir.model_json("m1"))
    assert record["source"] == "imported"
    assert record["oof_logloss"]["overall"] < record["prior_logloss"]
    assert set(record["oof_logloss"]["per_label"]) == set(LABELS)


def test_import_long_csv_and_logits(contract_workdir, tmp_path):
    metadata, labels, folds, oof, test = _wide(contract_workdir)
    logit = lambda f: f.assign(**{c: np.log(f[c] / (1 - f[c])) for c in LABELS})  # noqa: E731
    _to_long(logit(oof)).to_csv(tmp_path / "oof.csv", index=False)
    _to_long(logit(test)).to_csv(tmp_path / "test.csv", index=False)
    result = _invoke(contract_workdir, "m2", "--oof", str(tmp_path / "oof.csv"), "--test", str(tmp_path / "test.csv"), "--logits")
    assert result.exit_code == 0, result.output
    written = read_oof(contract_workdir.oof("m2"), folds).set_index("image_id")
    expected = oof.set_index("image_id").loc[written.index, list(LABELS)]
    np.testing.assert_allclose(written[list(LABELS)].to_numpy(), expected.to_numpy(), rtol=1e-5)


def _set(frame, row, column, value):
    frame = frame.copy()
    frame[column] = frame[column].astype(object) if isinstance(value, str) else frame[column]
    frame.loc[frame.index[row], column] = value
    return frame


# (case id, which file is bad, how to corrupt it, writer, expected message)
BAD_IMPORTS = [
    ("missing-column", "oof", lambda f: f.drop(columns=["any"]), "parquet", r"oof\.parquet: missing column\(s\) any"),
    ("misnamed-id-column", "oof", lambda f: f.rename(columns={"image_id": "image"}), "parquet", r"missing column\(s\) image_id"),
    ("duplicate-id", "oof", lambda f: pd.concat([f, f.iloc[[3]]]), "parquet", r"duplicate image_id '.*' at row"),
    ("nan", "oof", lambda f: _set(f, 4, "subdural", np.nan), "parquet", r"column 'subdural' has nan at row 5"),
    ("inf", "test", lambda f: _set(f, 1, "epidural", np.inf), "parquet", r"test\.parquet: column 'epidural' has inf at row 2"),
    ("logits-as-probabilities", "oof", lambda f: _set(f, 0, "any", 3.2), "parquet", r"'any' has 3\.2 at row 1 .*pass --logits"),
    ("negative", "test", lambda f: _set(f, 2, "any", -0.1), "parquet", r"has -0\.1 at row 3"),
    ("unknown-id", "oof", lambda f: _set(f, 0, "image_id", "ID_nothere"), "parquet", r"image_id 'ID_nothere' at row 1 is not a labeled image"),
    ("missing-oof-row", "oof", lambda f: f.iloc[1:], "parquet", r"1 labeled image\(s\) missing"),
    ("missing-test-row", "test", lambda f: f.iloc[:-2], "parquet", r"2 test image\(s\) missing"),
    ("test-id-in-oof", "test", lambda f: f.assign(image_id=f["image_id"].str.replace("ID_", "ID_x", regex=False)), "parquet", r"is not a test image"),
    ("fold-disagrees", "oof", "fold", "parquet", r"disagrees with data/folds\.parquet .*leak"),
    ("truncated-parquet", "oof", "truncate", "parquet", r"oof\.parquet: not a readable Parquet"),
    ("empty-file", "test", "empty", "parquet", r"test\.parquet: empty file"),
    ("wrong-csv-header", "oof", lambda f: f.rename(columns={"any": "Any"}), "csv", r"oof\.csv: missing column\(s\) any"),
    ("non-numeric", "oof", lambda f: _set(f, 6, "epidural", "high"), "csv", r"column 'epidural' has non-numeric value 'high' at row 7"),
    ("long-unknown-label", "oof", "long-bad-label", "csv", r"does not end in one of the six labels"),
    ("long-missing-label", "test", "long-missing", "csv", r"has no row for label 'any'"),
    ("missing-file", "oof", "absent", "parquet", r"oof\.parquet: OOF prediction file not found"),
]


@pytest.mark.parametrize("case, which, corrupt, fmt, message", BAD_IMPORTS, ids=[c[0] for c in BAD_IMPORTS])
def test_bad_import_is_one_line_exit_2_and_changes_nothing(contract_workdir, tmp_path, case, which, corrupt, fmt, message):
    metadata, labels, folds, oof, test = _wide(contract_workdir)
    # an existing model and its files must survive the failed import byte for byte
    write_parquet(oof, tmp_path / "good_oof.parquet")
    write_parquet(test, tmp_path / "good_test.parquet")
    assert _invoke(contract_workdir, "kept", "--oof", str(tmp_path / "good_oof.parquet"), "--test", str(tmp_path / "good_test.parquet")).exit_code == 0
    before = snapshot(contract_workdir.root)

    frames = {"oof": oof, "test": test}
    paths = {k: tmp_path / f"{k}.{fmt}" for k in frames}
    frame = frames[which]
    if corrupt == "fold":
        frame = frame.assign(fold=folds.set_index("image_id").loc[frame["image_id"], "fold"].to_numpy())
        frame.loc[frame.index[0], "fold"] = (frame["fold"].iloc[0] + 1) % 4
    elif corrupt in ("long-bad-label", "long-missing"):
        frame = _to_long(frame)
        if corrupt == "long-bad-label":
            frame.loc[frame.index[0], "ID"] = frame["ID"].iloc[0].rsplit("_", 1)[0] + "_chronic"
        else:
            frame = frame.drop(frame.index[frame["ID"].str.endswith("_any")][:1])
    elif callable(corrupt):
        frame = corrupt(frame)
    frames[which] = frame
    long_format = corrupt in ("long-bad-label", "long-missing")
    for key, data in frames.items():
        if key == which and corrupt == "absent":
            continue
        if long_format and key != which:
            data = _to_long(data)
        if fmt == "csv":
            data.to_csv(paths[key], index=False)
        else:
            write_parquet(data, paths[key])
    if corrupt == "truncate":
        paths[which].write_bytes(paths[which].read_bytes()[:-1])
    if corrupt == "empty":
        paths[which].write_bytes(b"")

    result = _invoke(contract_workdir, "kept", "--force", "--oof", str(paths["oof"]), "--test", str(paths["test"]))
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(contract_workdir.root) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["bad/name"], r"model name 'bad/name' is not allowed"),
        (["kept"], r"model 'kept' already exists; pass --force"),
    ],
)
def test_import_name_errors(contract_workdir, tmp_path, args, message):
    metadata, labels, folds, oof, test = _wide(contract_workdir)
    write_parquet(oof, tmp_path / "o.parquet")
    write_parquet(test, tmp_path / "t.parquet")
    assert _invoke(contract_workdir, "kept", "--oof", str(tmp_path / "o.parquet"), "--test", str(tmp_path / "t.parquet")).exit_code == 0
    result = _invoke(contract_workdir, *args, "--oof", str(tmp_path / "o.parquet"), "--test", str(tmp_path / "t.parquet"))
    assert result.exit_code == 2
    assert re.search(message, result.output)


def test_real_process_prints_no_traceback(contract_workdir, tmp_path):
    """The installed entry point, not only CliRunner: one line on stderr, exit 2."""
    (tmp_path / "o.csv").write_text("image,any\nID_1,0.5\n")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[2] / "cli.py"), "base", "import", "m", "--workdir", str(contract_workdir.root),
         "--oof", str(tmp_path / "o.csv"), "--test", str(tmp_path / "o.csv")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "o.csv: missing column(s) image_id" in proc.stderr
