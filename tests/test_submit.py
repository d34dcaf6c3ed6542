"""`submit`: the Kaggle RSNA 2019 CSV from stack/blend.json, and its refusals."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from stackkit.stack.blend import apply_blend
from stackkit.contract import LABELS, Workdir, file_sha256
from stackkit.errors import ContractError, StackkitError
from stackkit.stack.fit import run_stack_fit
from stackkit.contract.io import read_json, write_json, write_parquet
from stackkit.submit import validate_submission, write_submission
from stackkit.contract.validate import read_metadata

from stackkit.testing.contract import copy_workdir, snapshot
from stackkit.testing.stack import base_model_workdir, read_submission


@pytest.fixture(scope="module")
def blended_template(tmp_path_factory):
    """A work directory with two base models and a (tuned, tiny) blend.json: built once, copied per test."""
    wd = base_model_workdir(tmp_path_factory.mktemp("submit") / "work", n_patients=16)
    run_stack_fit(wd, stackers=[], tune=True, trials=3, progress=False, blend_base_models=True)
    return wd


@pytest.fixture
def wd(blended_template, tmp_path) -> Workdir:
    return copy_workdir(blended_template, tmp_path / "work")


def _test_ids(wd):
    metadata = read_metadata(wd)
    return metadata.loc[metadata["split"] == "test", "image_id"].to_numpy(dtype=object)


def test_submission_matches_the_kaggle_format_and_the_blend(wd):
    summary = write_submission(wd)
    test_ids = _test_ids(wd)
    validate_submission(wd.submission, test_ids)
    sub = read_submission(wd.submission)
    assert list(sub.columns) == ["ID", "Label"]
    assert len(sub) == 6 * len(test_ids) == summary.rows
    # ID_<image>_<label>, six consecutive rows per image, labels in contract order
    image = sub["ID"].str.rsplit("_", n=1).str[0]
    label = sub["ID"].str.rsplit("_", n=1).str[1]
    assert sub["ID"].str.fullmatch(r"ID_[0-9a-f]+_(epidural|intraparenchymal|intraventricular|subarachnoid|subdural|any)").all()
    assert (image.value_counts() == 6).all() and set(image) == set(test_ids)
    assert label.to_numpy().reshape(-1, 6).tolist() == [list(LABELS)] * len(test_ids)
    assert (image.to_numpy().reshape(-1, 6) == image.to_numpy().reshape(-1, 6)[:, :1]).all()
    # the values are the recorded blend applied to the recorded test files (computed here independently)
    record = read_json(wd.blend)
    names = [s["name"] for s in record["sources"]]
    order = np.sort(test_ids)
    preds = np.stack([pd.read_parquet(wd.root / s["test"]).set_index("image_id").reindex(order)[list(LABELS)].to_numpy()
                      for s in record["sources"]])
    weights = np.array([[record["weights"][l][n] for l in LABELS] for n in names])
    temperature = np.array([record["temperature"][l] for l in LABELS])
    bias = np.array([record["bias"][l] for l in LABELS])
    expected = apply_blend(preds, weights, temperature, record["clip"], record["any_consistency"], record["space"], bias)
    got = sub["Label"].to_numpy().reshape(-1, 6)
    assert (image.to_numpy()[::6] == order).all()  # images sorted by id
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-7)
    if record["any_consistency"]:
        assert (got[:, 5] >= got[:, :5].max(axis=1)).all()


def test_csv_gz_is_gzip_with_the_same_rows(wd, tmp_path):
    plain = write_submission(wd, str(tmp_path / "sub.csv"))
    packed = write_submission(wd, str(tmp_path / "sub.csv.gz"))
    raw = (tmp_path / "sub.csv.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw) == (tmp_path / "sub.csv").read_bytes()
    validate_submission(packed.path, _test_ids(wd))
    assert plain.rows == packed.rows
    # deterministic bytes (no timestamp in the gzip header)
    write_submission(wd, str(tmp_path / "again.csv.gz"))
    assert (tmp_path / "again.csv.gz").read_bytes() == raw


def _first_source_test(wd):
    record = read_json(wd.blend)
    return wd.root / record["sources"][0]["test"]


def _rewrite_source(wd, change):
    """Edit the first source's test file and record its new sha256 in blend.json (a consistent but bad source)."""
    path = _first_source_test(wd)
    frame = change(pd.read_parquet(path))
    write_parquet(frame, path)
    record = read_json(wd.blend)
    record["sources"][0]["test_sha256"] = file_sha256(path)
    write_json(record, wd.blend)


def _set_nan(frame):
    frame.loc[3, "subdural"] = np.nan
    return frame


def _missing_label(frame):
    return frame.drop(columns=["epidural"])


def _drop_blend(wd):
    wd.blend.unlink()


def _blend_points_nowhere(wd):
    record = read_json(wd.blend)
    record["sources"][1]["test"] = "preds/gone/test.parquet"
    write_json(record, wd.blend)


def _stale_source(wd):
    path = _first_source_test(wd)
    frame = pd.read_parquet(path)
    frame["any"] = np.float32(0.5)
    write_parquet(frame, path)


def _malformed_blend(wd):
    record = read_json(wd.blend)
    del record["weights"]["any"]
    write_json(record, wd.blend)


def _edit_blend(wd, **changes):
    record = read_json(wd.blend)
    for key, value in changes.items():
        record[key] = value(record[key]) if callable(value) else value
    write_json(record, wd.blend)


REFUSALS = [
    ("missing test image", lambda wd: _rewrite_source(wd, lambda f: f.iloc[1:]), {}, "1 test image.* missing"),
    ("duplicate test image", lambda wd: _rewrite_source(wd, lambda f: pd.concat([f, f.iloc[:1]])), {}, "duplicate image_id"),
    ("NaN probability", lambda wd: _rewrite_source(wd, _set_nan), {}, "'subdural' has nan"),
    ("missing label column", lambda wd: _rewrite_source(wd, _missing_label), {}, "missing column.*epidural"),
    ("no blend.json", _drop_blend, {}, r"blend.json: not found; run .*stack fit"),
    ("blend.json refers to a missing file", _blend_points_nowhere, {}, "preds/gone/test.parquet, which does not exist"),
    ("test file changed after the blend", _stale_source, {}, "changed since stack/blend.json"),
    ("malformed blend.json", _malformed_blend, {}, r"blend\.json: 'weights\.any' is None; expected a weight per source"),
    ("blend clip out of range", lambda wd: _edit_blend(wd, clip=0.7), {}, r"blend\.json: 'clip' is 0\.7; expected a number in \[0, 0\.5\)"),
    ("blend clip not a number", lambda wd: _edit_blend(wd, clip="small"), {}, r"blend\.json: 'clip' is 'small'"),
    ("blend temperature negative", lambda wd: _edit_blend(wd, temperature={l: -1.0 for l in LABELS}), {}, r"'temperature\.epidural' is -1\.0"),
    ("blend bias not finite", lambda wd: _edit_blend(wd, bias={l: float("nan") for l in LABELS}), {}, r"'bias\.epidural' is nan; expected a finite number"),
    ("blend any_consistency not a bool", lambda wd: _edit_blend(wd, any_consistency="yes"), {}, r"'any_consistency' is 'yes'; expected true or false"),
    ("blend space unknown", lambda wd: _edit_blend(wd, space="rank"), {}, r"'space' is 'rank'; expected logit or probability"),
    ("blend source listed twice", lambda wd: _edit_blend(wd, sources=lambda s: s + s[:1]), {}, r"'sources\[\d\]\.name' .*each source once"),
    ("blend weight negative", lambda wd: _edit_blend(wd, weights=lambda w: {l: {n: -0.5 for n in v} for l, v in w.items()}), {}, r"'weights\.epidural\.\S+' is -0\.5"),
    ("target folder not writable", lambda wd: None, {"out": "{root}/submission.csv/inside.csv"}, r"submission\.csv/inside\.csv: cannot write: a part of the path is a file"),
    ("target is a directory", lambda wd: None, {"out": "{root}/stack"}, "is a directory"),
    ("target not a csv", lambda wd: None, {"out": "{root}/sub.parquet"}, r"expected a \.csv or \.csv\.gz"),
]


@pytest.mark.parametrize("case, damage, kwargs, match", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_leave_the_existing_submission_byte_identical(wd, case, damage, kwargs, match):
    write_submission(wd)
    damage(wd)
    before = snapshot(wd.root)
    out = kwargs.get("out", "").replace("{root}", str(wd.root)) or None
    with pytest.raises(StackkitError, match=match) as info:
        write_submission(wd, out)
    assert "\n" not in str(info.value)
    assert snapshot(wd.root) == before
    assert not list(wd.root.rglob(".stackkit-tmp-*"))


def _long(ids, values=None):
    rows = [(f"{i}_{label}", 0.1) for i in ids for label in LABELS]
    frame = pd.DataFrame(rows, columns=["ID", "Label"])
    if values is not None:
        frame["Label"] = values
    return frame


BAD_SUBMISSIONS = [
    ("wrong header", lambda f: f.rename(columns={"Label": "label"}), "expected exactly ID,Label"),
    ("bad id", lambda f: f.assign(ID=f["ID"].str.replace("_any", "_anything")), "not ID_<image>_<label>"),
    ("duplicate id", lambda f: pd.concat([f, f.iloc[:1]]), "appears twice"),
    ("probability above 1", lambda f: f.assign(Label=np.where(np.arange(len(f)) == 4, 1.5, f["Label"])), "not a probability"),
    ("NaN probability", lambda f: f.assign(Label=np.where(np.arange(len(f)) == 2, np.nan, f["Label"])), "not a probability"),
    ("missing label row", lambda f: f.iloc[1:], "has 5 rows; expected 6"),
    ("unknown image", lambda f: pd.concat([f, _long(["ID_ffffffff9"])]), "not a test image"),
    ("missing image", lambda f: f.iloc[6:], "has 0 rows"),
]


@pytest.mark.parametrize("case, change, match", BAD_SUBMISSIONS, ids=[b[0] for b in BAD_SUBMISSIONS])
def test_validate_submission_refuses(tmp_path, case, change, match):
    ids = ["ID_000aaa111", "ID_000bbb222"]
    path = tmp_path / "sub.csv"
    _long(ids).to_csv(path, index=False)
    validate_submission(path, ids)  # the unchanged file is valid
    change(_long(ids)).to_csv(path, index=False)
    with pytest.raises(ContractError, match=match):
        validate_submission(path, ids)


def _test_ids(wd):
    metadata = read_metadata(wd)
    return sorted(metadata.loc[metadata["split"] == "test", "image_id"])


def _dicom_dir(wd, tmp_path, ids):
    folder = tmp_path / "stage_2_test"
    folder.mkdir(parents=True)
    for image_id in ids:
        (folder / f"{image_id}.dcm").write_bytes(b"")
    return {"test_dicom_dir": folder}


def _sample(wd, tmp_path, ids):
    tmp_path.mkdir(parents=True)
    path = tmp_path / "sample.csv"
    _long(ids).to_csv(path, index=False)
    return {"sample_submission": path}


def _skipped_in_prepare(wd, tmp_path, ids):
    write_json({"skipped": [], "skipped_test_ids": ["ID_0000dead1"]}, wd.prepare_record)
    return {}


COVERAGE = [
    ("test dicom dir has an image the metadata lacks", _dicom_dir, lambda ids: ids + ["ID_0000dead1"],
     r"stage_2_test: 1 test image\(s\) have no prediction, e\.g\. ID_0000dead1 \(the submission would lack 6 rows\)"),
    ("sample submission has an image the metadata lacks", _sample, lambda ids: ids + ["ID_0000dead1"],
     r"sample\.csv: 1 test image\(s\) have no prediction, e\.g\. ID_0000dead1"),
    ("sample submission of another test set", _sample, lambda ids: ids[1:], r"sample\.csv: has no test image ID_\w+"),
    ("data prepare skipped a test file", _skipped_in_prepare, lambda ids: ids,
     r"prepare\.json: `data prepare` skipped 1 unreadable test file\(s\), e\.g\. ID_0000dead1, so the submission would lack 6 rows"),
]


@pytest.mark.parametrize("case, make, ids_of, match", COVERAGE, ids=[c[0] for c in COVERAGE])
def test_a_submission_short_of_the_real_test_set_is_refused(wd, tmp_path, case, make, ids_of, match):
    ids = _test_ids(wd)
    if make is not _skipped_in_prepare:
        write_submission(wd, **make(wd, tmp_path / "complete", ids))  # the complete test set passes
    kwargs = make(wd, tmp_path / "short", ids_of(list(ids)))
    before = snapshot(wd.root)
    with pytest.raises(ContractError, match=match) as info:
        write_submission(wd, **kwargs)
    assert "\n" not in str(info.value)
    assert snapshot(wd.root) == before
    if "another test set" not in case:
        write_submission(wd, allow_incomplete=True, **kwargs)  # a known-short submission, on request
