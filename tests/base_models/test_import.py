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
from stackkit.contract import CONTRACT_VERSION, LABELS
from stackkit.contract.io import read_json, read_table, write_parquet
from stackkit.contract.validate import load_core, read_oof, read_test

from stackkit.testing.contract import noisy_predictions, snapshot, with_folds
from stackkit.testing.cli import one_line_error


def _wide(contract_workdir):
    metadata, labels, folds = load_core(contract_workdir)
    oof = with_folds(noisy_predictions(labels, folds["image_id"], seed=1), folds)  # exported with its folds
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    test = noisy_predictions(labels, test_ids, seed=2)
    return metadata, labels, folds, oof, test


def _to_long(frame):
    long = frame.melt(id_vars="image_id", value_vars=list(LABELS), var_name="label", value_name="Label")
    long["ID"] = long["image_id"] + "_" + long["label"]
    return long[["ID", "Label"]]


def _invoke(wd, *args):
    return CliRunner().invoke(cli, ["base", "import", *args, "--workdir", str(wd.root)], catch_exceptions=False)


def test_import_wide_parquet_with_folds_from_data_fills_fold_and_scores(contract_workdir, tmp_path):
    metadata, labels, folds, oof, test = _wide(contract_workdir)
    write_parquet(oof.drop(columns="fold"), tmp_path / "oof.parquet")
    write_parquet(test.iloc[::-1], tmp_path / "test.parquet")  # another order is legal
    result = _invoke(contract_workdir, "m1", "--oof", str(tmp_path / "oof.parquet"), "--test", str(tmp_path / "test.parquet"),
                     "--folds-from-data")
    assert result.exit_code == 0, result.output
    written = read_oof(contract_workdir.oof("m1"), folds, contract_workdir)
    assert written["fold"].tolist() == folds.set_index("image_id").loc[written["image_id"], "fold"].tolist()
    assert len(read_test(contract_workdir.test("m1"), metadata, contract_workdir)) == len(test)
    record = read_json(contract_workdir.model_json("m1"))
    assert record["source"] == "imported" and record["contract_version"] == CONTRACT_VERSION
    assert record["parameters"]["folds_from_data"] is True  # the record says the folds were taken on trust
    assert record["oof_logloss"]["overall"] < record["prior_logloss"]
    assert set(record["oof_logloss"]["per_label"]) == set(LABELS)


def test_import_long_csv_and_logits(contract_workdir, tmp_path):
    metadata, labels, folds, oof, test = _wide(contract_workdir)
    _to_long(_logit(oof)).to_csv(tmp_path / "oof.csv", index=False)
    _to_long(_logit(test)).to_csv(tmp_path / "test.csv", index=False)
    result = _invoke(contract_workdir, "m2", "--oof", str(tmp_path / "oof.csv"), "--test", str(tmp_path / "test.csv"), "--logits",
                     "--folds-from-data")  # the long format has no fold column
    assert result.exit_code == 0, result.output
    written = read_oof(contract_workdir.oof("m2"), folds).set_index("image_id")
    expected = oof.set_index("image_id").loc[written.index, list(LABELS)]
    np.testing.assert_allclose(written[list(LABELS)].to_numpy(), expected.to_numpy(), rtol=1e-5)


def _logit(frame):
    return frame.assign(**{c: np.log(frame[c] / (1 - frame[c])) for c in LABELS})


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
    # the --logits rule: the hint only for files that look like logits (>= half the values outside [0, 1], some negative)
    ("stray-value-is-not-logits", "oof", lambda f: _set(f, 0, "any", 1.7), "parquet",
     r"oof\.parquet: column 'any' has 1\.7 at row 1 \(image_id ID_\w+\); expected a probability in \[0, 1\]; 1 of \d+ values are outside \[0, 1\]: fix or remove them$"),
    ("negative", "test", lambda f: _set(f, 2, "any", -0.1), "parquet", r"test\.parquet: column 'any' has -0\.1 at row 3 .*1 of \d+ values are outside \[0, 1\]: fix or remove them$"),
    ("logits-without-flag", "oof", lambda f: _logit(f), "parquet", r"oof\.parquet: column '\w+' has \S+ at row 1 .*\d+% of the values are outside \[0, 1\], some negative: these look like logits: pass --logits$"),
    ("positive-scores-are-not-logits", "test", lambda f: f.assign(**{c: f[c] * 100 for c in LABELS}), "parquet", r"test\.parquet: column '\w+' .* of \d+ values are outside \[0, 1\]: fix or remove them$"),
    ("logits-flag-on-probabilities", "oof", "logits-flag", "parquet", r"oof\.parquet: --logits given, but every value is in \[0, 1\]: these look like probabilities; leave out --logits"),
    # a missing fold column needs --folds-from-data (contract v4)
    ("no-fold-column", "oof", lambda f: f.drop(columns="fold"), "parquet", r"oof\.parquet: no 'fold' column; OOF predictions made on other folds than data/folds\.parquet leak labels into the stackers: .*--folds-from-data"),
    ("long-oof-has-no-fold", "oof", "long-no-flag", "csv", r"oof\.csv: no 'fold' column; .*--folds-from-data"),
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
    # long format: errors name the Label column and the row of the file (not the wide table's)
    ("long-stray-value", "oof", "long-stray", "csv", r"oof\.csv: column 'Label' has 1\.7 at row 8 \(ID ID_\w+_epidural\); expected a probability in \[0, 1\]; 1 of \d+ values are outside"),
    ("long-nan", "test", "long-nan", "csv", r"test\.csv: column 'Label' has nan at row 5 \(ID ID_\w+_epidural\)"),
    ("long-logits-without-flag", "test", "long-logits", "csv", r"test\.csv: column 'Label' has \S+ at row \d+ \(ID ID_\w+\); .*these look like logits: pass --logits$"),
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
    elif corrupt.startswith("long-") if isinstance(corrupt, str) else False:
        frame = _to_long(_logit(frame) if corrupt == "long-logits" else frame)
        if corrupt == "long-bad-label":
            frame.loc[frame.index[0], "ID"] = frame["ID"].iloc[0].rsplit("_", 1)[0] + "_chronic"
        elif corrupt == "long-missing":
            frame = frame.drop(frame.index[frame["ID"].str.endswith("_any")][:1])
        elif corrupt in ("long-stray", "long-nan"):
            frame.loc[frame.index[7 if corrupt == "long-stray" else 4], "Label"] = 1.7 if corrupt == "long-stray" else np.nan
    elif callable(corrupt):
        frame = corrupt(frame)
    frames[which] = frame
    long_format = isinstance(corrupt, str) and corrupt.startswith("long-")
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

    extra = ["--logits"] if corrupt == "logits-flag" else []
    extra += ["--folds-from-data"] if long_format and corrupt != "long-no-flag" else []
    result = _invoke(contract_workdir, "kept", "--force", "--oof", str(paths["oof"]), "--test", str(paths["test"]), *extra)
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


# --- per-fold test predictions (contract v3): --test-fold -----------------------------------------


def _tree_digest(root) -> str:
    """sha256 over every path under root (folders too: a leftover set folder counts) and every file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _fold_inputs(wd, tmp_path):
    """OOF, a --test file and one file per fold model, each test file in its own row order; fold 1 in the RSNA long CSV format."""
    metadata, labels, folds, oof, test = _wide(wd)
    n_folds = int(folds["fold"].max()) + 1
    write_parquet(oof, tmp_path / "oof.parquet")
    write_parquet(test.sample(frac=1.0, random_state=9), tmp_path / "test.parquet")
    fold_frames, fold_paths = [], []
    for k in range(n_folds):
        frame = noisy_predictions(labels, test["image_id"], seed=10 + k).sample(frac=1.0, random_state=k).reset_index(drop=True)
        fold_frames.append(frame)
        if k == 1:
            path = tmp_path / f"test_fold{k}.csv"
            _to_long(frame).to_csv(path, index=False)
        else:
            path = tmp_path / f"test_fold{k}.parquet"
            write_parquet(frame, path)
        fold_paths.append(path)
    return metadata, folds, oof, test, fold_frames, fold_paths, n_folds


def _fold_args(paths):
    return [arg for path in paths for arg in ("--test-fold", str(path))]


def test_import_test_folds_writes_them_and_their_mean(contract_workdir, tmp_path):
    from stackkit.contract.validate import read_test_folds, verify_model_files

    wd = contract_workdir
    metadata, folds, oof, test, fold_frames, fold_paths, n_folds = _fold_inputs(wd, tmp_path)
    result = _invoke(wd, "m1", "--oof", str(tmp_path / "oof.parquet"), *_fold_args(fold_paths))
    assert result.exit_code == 0, result.output
    assert f"one file per fold model ({n_folds}), test.parquet their mean" in result.output

    written = pd.read_parquet(wd.test("m1"))
    assert list(written.columns) == ["image_id", *LABELS] and all(written[c].dtype == np.float32 for c in LABELS)
    assert written["image_id"].tolist() == fold_frames[0]["image_id"].tolist()  # fold 0's file as given sets the order
    per_fold = [pd.read_parquet(wd.test_fold("m1", k)) for k in range(n_folds)]
    for k, frame in enumerate(per_fold):
        assert list(frame.columns) == ["image_id", *LABELS]
        assert frame["image_id"].tolist() == written["image_id"].tolist()  # test.parquet's row order
        given = fold_frames[k].set_index("image_id").loc[frame["image_id"], list(LABELS)].to_numpy()
        np.testing.assert_allclose(frame[list(LABELS)].to_numpy(), given, rtol=1e-6)  # fold 1 went through CSV
    mean = np.mean([f[list(LABELS)].to_numpy(np.float64) for f in per_fold], axis=0).astype(np.float32)
    np.testing.assert_array_equal(written[list(LABELS)].to_numpy(), mean)

    record = read_json(wd.model_json("m1"))
    names = [f"test_fold{k}.parquet" for k in range(n_folds)]
    assert record["test_folds"] == names
    assert set(record["sha256"]) >= {"oof.parquet", "test.parquet", *names}
    assert record["parameters"]["test_file"] is None and len(record["parameters"]["test_fold_files"]) == n_folds
    verify_model_files(wd, "m1")
    read_back = read_test_folds(wd, "m1", metadata, n_folds)
    assert len(read_back) == n_folds
    for frame, back in zip(per_fold, read_back):
        pd.testing.assert_frame_equal(back, frame)


def test_import_test_and_test_folds_keeps_test_as_given(contract_workdir, tmp_path):
    wd = contract_workdir
    metadata, folds, oof, test, fold_frames, fold_paths, n_folds = _fold_inputs(wd, tmp_path)
    result = _invoke(wd, "m1", "--oof", str(tmp_path / "oof.parquet"), "--test", str(tmp_path / "test.parquet"), *_fold_args(fold_paths))
    assert result.exit_code == 0, result.output
    given = pd.read_parquet(tmp_path / "test.parquet").reset_index(drop=True)
    written = pd.read_parquet(wd.test("m1"))
    pd.testing.assert_frame_equal(written, given)  # not replaced by the mean
    for k in range(n_folds):
        assert pd.read_parquet(wd.test_fold("m1", k))["image_id"].tolist() == given["image_id"].tolist()
    assert read_json(wd.model_json("m1"))["test_folds"] == [f"test_fold{k}.parquet" for k in range(n_folds)]


def test_import_without_test_folds_records_none_and_reimport_drops_them(contract_workdir, tmp_path):
    wd = contract_workdir
    metadata, folds, oof, test, fold_frames, fold_paths, n_folds = _fold_inputs(wd, tmp_path)
    assert _invoke(wd, "m1", "--oof", str(tmp_path / "oof.parquet"), *_fold_args(fold_paths)).exit_code == 0
    assert _invoke(wd, "m1", "--force", "--oof", str(tmp_path / "oof.parquet"), "--test", str(tmp_path / "test.parquet")).exit_code == 0
    assert read_json(wd.model_json("m1"))["test_folds"] == []
    assert wd.test_fold_files("m1") == []


def test_test_embeddings_without_test_follow_the_first_fold_file(contract_workdir, tmp_path):
    from stackkit.contract.embeddings import read_model_embeddings

    wd = contract_workdir
    metadata, folds, oof, test, fold_frames, fold_paths, n_folds = _fold_inputs(wd, tmp_path)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "oof_emb.npy", rng.normal(size=(len(oof), 4)).astype(np.float32))
    code = np.arange(len(fold_frames[0]), dtype=np.float32)  # row i of fold 0's file as given
    np.save(tmp_path / "test_emb.npy", np.stack([code] * 4, axis=1))
    result = _invoke(wd, "m1", "--oof", str(tmp_path / "oof.parquet"), *_fold_args(fold_paths),
                     "--oof-embeddings", str(tmp_path / "oof_emb.npy"), "--test-embeddings", str(tmp_path / "test_emb.npy"))
    assert result.exit_code == 0, result.output
    record = read_json(wd.model_json("m1"))
    written = pd.read_parquet(wd.test("m1"))
    emb = read_model_embeddings(wd, "m1", record, n_oof=len(oof), n_test=len(written), n_folds=n_folds)
    position = {image: i for i, image in enumerate(fold_frames[0]["image_id"])}
    np.testing.assert_array_equal(emb.test[0][:, 0], np.array([position[i] for i in written["image_id"]], dtype=np.float16))


def _drop_last_fold(paths, tmp_path):
    return paths[:-1]


def _rewrite(k, change):
    """A corruption that rewrites fold file k (as wide Parquet) with change(frame)."""

    def corrupt(paths, tmp_path):
        frame = read_table(paths[k])
        if "ID" in frame.columns:
            raise AssertionError("rewrite a wide file")
        path = tmp_path / f"bad_fold{k}.parquet"
        write_parquet(change(frame), path)
        return [*paths[:k], path, *paths[k + 1:]]

    return corrupt


def _other_format(paths, tmp_path):
    path = tmp_path / "bad_fold2.csv"
    path.write_text("image,probability\nID_1,0.5\n")
    return [*paths[:2], path, *paths[3:]]


def _absent(paths, tmp_path):
    return [*paths[:3], tmp_path / "nowhere.parquet"]


def _extra_id(frame):
    extra = frame.iloc[[0]].assign(image_id="ID_extra")
    return pd.concat([frame, extra], ignore_index=True)


# (case, corruption of the list of --test-fold paths, keep --test, expected one-line message)
BAD_TEST_FOLDS = [
    ("wrong-count", _drop_last_fold, False, r"test_fold2\.parquet: 3 --test-fold files; expected one per fold model \(4"),
    ("wrong-count-with-test", _drop_last_fold, True, r"test_fold2\.parquet: 3 --test-fold files; expected one per fold model \(4"),
    ("neither-test-nor-folds", lambda paths, tmp_path: [], False, r"no test predictions: give --test FILE, or one --test-fold FILE per fold model \(4"),
    ("missing-test-id", _rewrite(2, lambda f: f.iloc[1:]), False, r"bad_fold2\.parquet: 1 test image\(s\) missing, e\.g\. image_id 'ID_"),
    ("extra-id", _rewrite(3, _extra_id), True, r"bad_fold3\.parquet: image_id 'ID_extra' at row \d+ is not a test image"),
    ("train-id", _rewrite(0, lambda f: f.assign(image_id=f["image_id"].where(f.index != 4, "ID_train"))), False, r"bad_fold0\.parquet: image_id 'ID_train' at row 5 is not a test image"),
    ("duplicate-id", _rewrite(0, lambda f: pd.concat([f, f.iloc[[2]]], ignore_index=True)), False, r"bad_fold0\.parquet: duplicate image_id '.*' at row"),
    ("above-one", _rewrite(2, lambda f: _set(f, 3, "any", 1.5)), False, r"bad_fold2\.parquet: column 'any' has 1\.5 at row 4 .*1 of \d+ values are outside \[0, 1\]"),
    ("negative", _rewrite(3, lambda f: _set(f, 0, "epidural", -0.2)), True, r"bad_fold3\.parquet: column 'epidural' has -0\.2 at row 1"),
    ("nan", _rewrite(0, lambda f: _set(f, 1, "subdural", np.nan)), False, r"bad_fold0\.parquet: column 'subdural' has nan at row 2"),
    ("other-format", _other_format, False, r"bad_fold2\.csv: missing column\(s\) image_id, .*expected image_id \+ .* or ID,Label"),
    ("missing-file", _absent, False, r"nowhere\.parquet: fold 3 test prediction file not found"),
]


@pytest.mark.parametrize("case, corrupt, with_test, message", BAD_TEST_FOLDS, ids=[c[0] for c in BAD_TEST_FOLDS])
def test_bad_test_folds_are_one_line_exit_2_and_change_nothing(contract_workdir, tmp_path, case, corrupt, with_test, message):
    from base_models.importer import import_predictions
    from stackkit.errors import StackkitError

    wd = contract_workdir
    metadata, folds, oof, test, fold_frames, fold_paths, n_folds = _fold_inputs(wd, tmp_path)
    # an existing model with per-fold files must survive the failed --force import byte for byte
    assert _invoke(wd, "kept", "--oof", str(tmp_path / "oof.parquet"), *_fold_args(fold_paths)).exit_code == 0
    before = _tree_digest(wd.root)
    bad = corrupt(list(fold_paths), tmp_path)
    test_path = tmp_path / "test.parquet" if with_test else None

    with pytest.raises(StackkitError, match=message) as info:
        import_predictions(wd, "kept", oof_path=tmp_path / "oof.parquet", test_path=test_path, force=True, test_folds=bad)
    assert "\n" not in str(info.value)
    assert _tree_digest(wd.root) == before

    args = ["--oof", str(tmp_path / "oof.parquet"), *_fold_args(bad)] + (["--test", str(test_path)] if with_test else [])
    result = _invoke(wd, "kept", "--force", *args)
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert re.search(message, line), line
    assert _tree_digest(wd.root) == before
