"""`base import --oof-embeddings --test-embeddings`: rows follow the prediction files as given,
float32 is stored as float16, hashes are recorded and checked; every bad input is one line,
exit 2 and nothing written (the contract's validation table for embeddings)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract.embeddings import read_model_embeddings
from stackkit.contract.io import read_json, write_parquet
from stackkit.contract.validate import load_core
from stackkit.errors import ContractError
from stackkit.testing.contract import noisy_predictions, snapshot, with_folds
from stackkit.testing.cli import one_line_error

DIM = 12


def _invoke(wd, *args):
    return CliRunner().invoke(cli, ["base", "import", *args, "--workdir", str(wd.root)], catch_exceptions=False)


def _inputs(wd, tmp_path, *, n_test_files=None, dtype=np.float32):
    """Prediction files in a shuffled order and embeddings aligned with them as given; each
    embedding row starts with a code of its image so alignment can be checked after import."""
    metadata, labels, folds = load_core(wd)
    n_folds = int(folds["fold"].max()) + 1
    rng = np.random.default_rng(0)
    oof = with_folds(noisy_predictions(labels, folds["image_id"], seed=1), folds).sample(frac=1.0, random_state=3).reset_index(drop=True)
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    test = noisy_predictions(labels, test_ids, seed=2).sample(frac=1.0, random_state=4).reset_index(drop=True)
    write_parquet(oof, tmp_path / "oof.parquet")
    write_parquet(test, tmp_path / "test.parquet")

    def embed(ids, k):
        out = rng.normal(size=(len(ids), DIM)).astype(dtype)
        out[:, 0] = np.array([int(i[3:], 16) % 1000 for i in ids], dtype=np.float64) / 10.0 + k
        return out

    np.save(tmp_path / "oof_emb.npy", embed(oof["image_id"], 0))
    n_test_files = n_folds if n_test_files is None else n_test_files
    test_files = []
    for k in range(n_test_files):
        np.save(tmp_path / f"test_emb{k}.npy", embed(test["image_id"], 100 * (k + 1)))
        test_files.append(tmp_path / f"test_emb{k}.npy")
    args = ["--oof", str(tmp_path / "oof.parquet"), "--test", str(tmp_path / "test.parquet"),
            "--oof-embeddings", str(tmp_path / "oof_emb.npy")]
    for path in test_files:
        args += ["--test-embeddings", str(path)]
    return args, oof, test, test_files, n_folds


@pytest.mark.parametrize("n_test_files", [None, 1], ids=["per-fold", "single"])
def test_import_with_embeddings_aligns_rows_stores_float16_and_records_hashes(contract_workdir, tmp_path, n_test_files):
    wd = contract_workdir
    args, oof, test, test_files, n_folds = _inputs(wd, tmp_path, n_test_files=n_test_files)
    result = _invoke(wd, "m1", *args)
    assert result.exit_code == 0, result.output
    assert "embeddings: dimension 12" in result.output
    record = read_json(wd.model_json("m1"))
    assert record["embedding_dim"] == DIM
    expected_tests = ["embeddings/test.npy"] if n_test_files == 1 else [f"embeddings/test_fold{k}.npy" for k in range(n_folds)]
    assert record["embeddings"] == {"oof": "embeddings/oof.npy", "test": expected_tests}
    assert set(record["sha256"]) >= {"embeddings/oof.npy", *expected_tests}
    written_oof = wd.oof("m1")
    import pandas as pd

    oof_ids = pd.read_parquet(written_oof)["image_id"].to_numpy()
    test_ids = pd.read_parquet(wd.test("m1"))["image_id"].to_numpy()
    emb = read_model_embeddings(wd, "m1", record, n_oof=len(oof_ids), n_test=len(test_ids), n_folds=n_folds)
    assert emb.oof.dtype == np.float16 and emb.oof.shape == (len(oof_ids), DIM)
    given = np.load(tmp_path / "oof_emb.npy")
    position = {image: i for i, image in enumerate(oof["image_id"])}
    rows = np.array([position[i] for i in oof_ids])
    np.testing.assert_array_equal(emb.oof, given[rows].astype(np.float16))
    test_position = {image: i for i, image in enumerate(test["image_id"])}
    test_rows = np.array([test_position[i] for i in test_ids])
    assert len(emb.test) == len(test_files)
    for array, path in zip(emb.test, test_files):
        np.testing.assert_array_equal(array, np.load(path)[test_rows].astype(np.float16))


def test_reimport_without_embeddings_drops_them(contract_workdir, tmp_path):
    wd = contract_workdir
    args, *_ = _inputs(wd, tmp_path)
    assert _invoke(wd, "m1", *args).exit_code == 0
    assert _invoke(wd, "m1", "--force", *args[:4]).exit_code == 0
    assert read_json(wd.model_json("m1"))["embedding_dim"] is None
    assert not wd.embeddings_dir("m1").exists()


def test_reader_refuses_a_changed_embedding_file(contract_workdir, tmp_path):
    wd = contract_workdir
    args, oof, test, _files, n_folds = _inputs(wd, tmp_path)
    assert _invoke(wd, "m1", *args).exit_code == 0
    record = read_json(wd.model_json("m1"))
    path = wd.test_embeddings("m1", 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ContractError, match=r"test_fold1\.npy: sha256 mismatch") as info:
        read_model_embeddings(wd, "m1", record, n_oof=len(oof), n_test=len(test), n_folds=n_folds)
    assert "\n" not in str(info.value)


def _replace(name, array_fn):
    """A corruption that rewrites file ``name`` (oof_emb or test_emb<k>) with array_fn(original)."""

    def corrupt(tmp_path, args):
        path = tmp_path / f"{name}.npy"
        np.save(path, array_fn(np.load(path)))
        return args

    return corrupt


def _with_nan(a):
    a = a.copy()
    a[5, 3] = np.nan
    return a


def _with_inf(a):
    a = a.copy()
    a[2, 1] = np.inf
    return a


def _too_big(a):
    a = a.copy()
    a[4, 2] = 1e6
    return a


def _raw_bytes(tmp_path, args):
    (tmp_path / "oof_emb.npy").write_bytes(b"not an npy file at all")
    return args


def _pickled(tmp_path, args):
    np.save(tmp_path / "oof_emb.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    return args


def _empty(tmp_path, args):
    (tmp_path / "test_emb0.npy").write_bytes(b"")
    return args


def _absent(tmp_path, args):
    (tmp_path / "test_emb1.npy").unlink()
    return args


def _drop_test_files(tmp_path, args):
    # keep only the first two --test-embeddings: neither 1 nor one per fold
    out, seen = [], 0
    for i, a in enumerate(args):
        if a == "--test-embeddings" or (i > 0 and args[i - 1] == "--test-embeddings"):
            if a == "--test-embeddings":
                seen += 1
            if seen > 2:
                continue
        out.append(a)
    return out


def _only_oof(tmp_path, args):
    return [a for i, a in enumerate(args) if a != "--test-embeddings" and (i == 0 or args[i - 1] != "--test-embeddings")]


def _only_test(tmp_path, args):
    i = args.index("--oof-embeddings")
    return args[:i] + args[i + 2 :]


# (case, corruption, expected one-line message)
BAD_EMBEDDINGS = [
    ("oof-1d", _replace("oof_emb", lambda a: a[:, 0]), r"oof_emb\.npy: OOF embeddings have shape \(\d+,\); expected a 2-D"),
    ("oof-3d", _replace("oof_emb", lambda a: a[:, :, None]), r"oof_emb\.npy: OOF embeddings have shape .*expected a 2-D"),
    ("oof-float64", _replace("oof_emb", lambda a: a.astype(np.float64)), r"oof_emb\.npy: OOF embeddings have dtype float64; expected float16 or float32"),
    ("oof-int", _replace("oof_emb", lambda a: a.astype(np.int32)), r"have dtype int32; expected float16 or float32"),
    ("oof-row-missing", _replace("oof_emb", lambda a: a[:-1]), r"oof_emb\.npy: OOF embeddings have \d+ rows but the prediction file has \d+"),
    ("test-row-extra", _replace("test_emb2", lambda a: np.concatenate([a, a[:1]])), r"test_emb2\.npy: fold 2 test embeddings have \d+ rows but"),
    ("oof-nan", _replace("oof_emb", _with_nan), r"oof_emb\.npy: OOF embeddings have nan at row 6, column 4; expected finite"),
    ("test-inf", _replace("test_emb0", _with_inf), r"test_emb0\.npy: fold 0 test embeddings have inf at row 3, column 2"),
    ("beyond-float16", _replace("oof_emb", _too_big), r"oof_emb\.npy: .* 1e\+06 at row 5, column 3, beyond float16's range"),
    ("dimension-differs", _replace("test_emb1", lambda a: a[:, :-2]), r"test_emb1\.npy: fold 1 test embeddings have dimension 10 but .* have 12"),
    ("zero-dimension", _replace("oof_emb", lambda a: a[:, :0]), r"oof_emb\.npy: OOF embeddings have dimension 0"),
    ("not-npy", _raw_bytes, r"oof_emb\.npy: not a readable NumPy \.npy OOF embedding file"),
    ("pickled-object-array", _pickled, r"oof_emb\.npy: not a readable NumPy \.npy"),
    ("empty-file", _empty, r"test_emb0\.npy: empty file"),
    ("missing-file", _absent, r"test_emb1\.npy: test embedding file not found"),
    ("wrong-number-of-test-files", _drop_test_files, r"test_emb1\.npy: 2 --test-embeddings files; expected 1 .* or one per fold model \(4"),
    ("oof-without-test", _only_oof, r"oof_emb\.npy: --oof-embeddings given without --test-embeddings"),
    ("test-without-oof", _only_test, r"test_emb0\.npy: --test-embeddings given without --oof-embeddings"),
]


@pytest.mark.parametrize("case, corrupt, message", BAD_EMBEDDINGS, ids=[c[0] for c in BAD_EMBEDDINGS])
def test_bad_embeddings_are_one_line_exit_2_and_nothing_written(contract_workdir, tmp_path, case, corrupt, message):
    wd = contract_workdir
    args, *_ = _inputs(wd, tmp_path)
    # an existing model with embeddings must survive the failed --force import byte for byte
    assert _invoke(wd, "kept", *args).exit_code == 0
    before = snapshot(wd.root)
    bad_args = corrupt(tmp_path, list(args))
    result = _invoke(wd, "kept", "--force", *bad_args)
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert re.search(message, line), line
    assert snapshot(wd.root) == before
