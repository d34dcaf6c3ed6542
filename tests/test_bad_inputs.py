"""One table of bad inputs across every command.

Each case: exit code 2, one line naming the file and the column/row/id at fault, and every
artifact byte-identical afterwards. Beside it, unusual but legal inputs must succeed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import write_parquet
from stackkit.contract.validate import load_core

from stackkit.testing.contract import noisy_predictions, rewrite_data_file, snapshot, with_folds


class Case:
    """A bad input: ``setup(ctx)`` corrupts files and returns the CLI arguments to run."""

    def __init__(self, name, setup, message):
        self.name, self.setup, self.message = name, setup, message


class Ctx:
    def __init__(self, root: Path, wd: Workdir, scratch: Path):
        self.root, self.wd, self.scratch = root, wd, scratch
        self.dicom = scratch / "dicom"

    @property
    def w(self):
        return ["--workdir", str(self.wd.root)]

    # --- data prepare helpers
    def copy_dicom(self):
        if not self.dicom.exists():
            shutil.copytree(self.root / "dicom", self.dicom)
        return self.dicom

    def first_dcm(self):
        return sorted((self.copy_dicom() / "stage_2_train").glob("*.dcm"))[0]

    def prepare_args(self, labels=None, strict=True, dicom_dir=None):
        d = self.copy_dicom()
        args = ["data", "prepare", *self.w, "--dicom-dir", str(dicom_dir or d / "stage_2_train"),
                "--test-dicom-dir", str(d / "stage_2_test"), "--labels", str(labels or d / "stage_2_train.csv"), "--folds", "3", "-q"]
        return args + (["--strict"] if strict else [])

    # --- import helpers
    def frames(self):
        metadata, labels, folds = load_core(self.wd)
        test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
        return labels, folds, with_folds(noisy_predictions(labels, folds["image_id"], seed=4), folds), noisy_predictions(labels, test_ids, seed=5)

    def import_args(self, oof, test, fmt="parquet", name="m1"):
        paths = []
        for key, frame in (("oof", oof), ("test", test)):
            path = self.scratch / f"{key}.{fmt}"
            if isinstance(frame, bytes):
                path.write_bytes(frame)
            elif fmt == "csv":
                frame.to_csv(path, index=False)
            else:
                write_parquet(frame, path)
            paths.append(str(path))
        return ["base", "import", name, "--force", *self.w, "--oof", paths[0], "--test", paths[1]]


def _set(frame, row, column, value):
    frame = frame.copy()
    if isinstance(value, str):
        frame[column] = frame[column].astype(object)
    frame.loc[frame.index[row], column] = value
    return frame


def _truncate(path: Path, n=1):
    path.write_bytes(path.read_bytes()[:-n])


def _strip_preamble(c):
    path = c.first_dcm()
    path.write_bytes(path.read_bytes()[132:])  # 128-byte preamble + "DICM"
    return c.prepare_args()


def _short_pixels(c):
    _truncate(c.first_dcm(), 100)
    return c.prepare_args()


def _no_position(c):
    path = c.first_dcm()
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient
    ds.save_as(path)
    return c.prepare_args()


def _label_csv(c, transform):
    d = c.copy_dicom()
    frame = pd.read_csv(d / "stage_2_train.csv")
    out = c.scratch / "labels.csv"
    transform(frame).to_csv(out, index=False)
    return c.prepare_args(labels=out)


def _import(transform_oof=None, transform_test=None, fmt="parquet"):
    def setup(c):
        labels, folds, oof, test = c.frames()
        if transform_oof:
            oof = transform_oof(oof, folds)
        if transform_test:
            test = transform_test(test, folds)
        return c.import_args(oof, test, fmt=fmt)

    return setup


def _with_fold(oof, folds, shift_row=None):
    oof = oof.assign(fold=folds.set_index("image_id").loc[oof["image_id"], "fold"].to_numpy())
    if shift_row is not None:
        oof.loc[oof.index[shift_row], "fold"] = (oof["fold"].iloc[shift_row] + 1) % 3
    return oof


def _parquet_bytes(frame, scratch, truncate=0):
    path = scratch / "tmp.parquet"
    write_parquet(frame, path)
    data = path.read_bytes()
    return data[: len(data) - truncate] if truncate else data


def _rewrite(path_of, transform, then):
    """Rewrite a work-directory artifact with transform(frame), then run the command ``then``."""

    def setup(c):
        path = path_of(c.wd)
        frame = transform(pd.read_parquet(path))
        if path.parent == c.wd.data_dir:  # recorded like a rerun of `data prepare`, to reach the checks behind the hash
            rewrite_data_file(c.wd, path, frame)
        else:
            write_parquet(frame, path)
        return then(c)

    return setup


def _flip_label_after(then):
    """The command's arguments, then one label of data/labels.parquet flipped by hand (not recorded)."""

    def setup(c):
        args = then(c)
        labels = pd.read_parquet(c.wd.labels)
        write_parquet(_set(labels, 0, "any", 1 - int(labels["any"].iloc[0])), c.wd.labels)
        return args

    return setup


def _spread_study(folds_frame, c):
    metadata = pd.read_parquet(c.wd.metadata)
    merged = folds_frame.merge(metadata[["image_id", "study_id"]], on="image_id")
    study = merged["study_id"].iloc[0]
    row = merged.index[merged["study_id"] == study][1]
    folds_frame = folds_frame.copy()
    folds_frame.loc[row, "fold"] = (folds_frame.loc[row, "fold"] + 1) % 3
    return folds_frame


def _features(c):
    return ["stack", "features", *c.w, "-q"]


def _fit(*extra):
    return lambda c: ["stack", "fit", *c.w, "--stackers", "lgbm", "-q", *extra]


def _submit(*extra):
    return lambda c: ["submit", *c.w, *extra]


def _swap_folds(frame):
    frame = frame.copy()
    frame["fold"] = frame["fold"].replace({0: 1, 1: 0}).astype(np.int8)
    return frame


def _file_as_parent(c):
    blocker = c.scratch / "not_a_dir"
    blocker.write_text("x")
    return ["submit", *c.w, "--out", str(blocker / "submission.csv")]


def _truncate_then(path_of, then, n=1):
    def setup(c):
        _truncate(path_of(c.wd), n)
        return then(c)

    return setup


def _write_text_then(path_of, text, then):
    def setup(c):
        path_of(c.wd).write_text(text)
        return then(c)

    return setup


def _remove_then(path_of, then):
    def setup(c):
        path_of(c.wd).unlink()
        return then(c)

    return setup


def _journal_with_bad_line(c):
    journal = c.scratch / "journal.log"
    journal.write_text('{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\nnot json\n')
    return _fit("--tune", "--trials", "1", "--storage", str(journal))(c)


def _reimport_m1(c):
    from base_models.importer import import_predictions

    import_predictions(c.wd, "m1", oof_path=c.root / "m1b_oof.parquet", test_path=c.root / "m1b_test.parquet", force=True)
    return _fit()(c)


def _mix_model_set(c):
    # preds/m1/test.parquet from another import: valid on its own, not the one model.json lists
    write_parquet(pd.read_parquet(c.root / "m1b_test.parquet"), c.wd.test("m1"))
    return _features(c)


def _mix_model_set_then_fit(c):
    _mix_model_set(c)
    return _fit()(c)


def _edit_features_table(c):
    # a readable features table that is not the one features/manifest.json lists (e.g. copied from another run)
    frame = pd.read_parquet(c.wd.features_test)
    column = [name for name in frame.columns if name.startswith("m1__")][0]
    frame[column] = (frame[column] * 0.5).astype(np.float32)
    write_parquet(frame, c.wd.features_test)
    return _fit()(c)


def _edit_blend_clip(c):
    import json

    record = json.loads(c.wd.blend.read_text())
    record["clip"] = 0.7
    c.wd.blend.write_text(json.dumps(record))
    return _submit()(c)


CASES = [
    # data prepare (the DICOM cases fail with --strict)
    Case("dicom-without-preamble", _strip_preamble, r"\.dcm.*(preamble|not a DICOM)"),
    Case("dicom-short-pixel-data", _short_pixels, r"\.dcm.*(pixel|PixelData)"),
    Case("dicom-missing-position", _no_position, r"\.dcm.*ImagePositionPatient"),
    Case("label-csv-unknown-label", lambda c: _label_csv(c, lambda f: _set(f, 0, "ID", f["ID"].iloc[0].rsplit("_", 1)[0] + "_chronic")), r"labels\.csv.*chronic"),
    Case("label-csv-wrong-header", lambda c: _label_csv(c, lambda f: f.rename(columns={"Label": "Target"})), r"labels\.csv.*(Label|header|column)"),
    Case("label-csv-empty", lambda c: (c.scratch.joinpath("labels.csv").write_text(""), c.prepare_args(labels=c.scratch / "labels.csv"))[1], r"labels\.csv.*empty"),
    Case("dicom-dir-missing", lambda c: c.prepare_args(dicom_dir=c.scratch / "nowhere"), r"nowhere"),
    # base import
    Case("import-missing-column", _import(lambda o, f: o.drop(columns=["subdural"])), r"oof\.parquet: missing column\(s\) subdural"),
    Case("import-misnamed-column", _import(lambda o, f: o.rename(columns={"image_id": "ImageID"})), r"oof\.parquet: missing column\(s\) image_id"),
    Case("import-duplicate-id", _import(lambda o, f: pd.concat([o, o.iloc[[2]]])), r"oof\.parquet: duplicate image_id 'ID_\w+'"),
    Case("import-nan", _import(lambda o, f: _set(o, 3, "epidural", np.nan)), r"oof\.parquet: column 'epidural' has nan at row 4 \(image_id ID_\w+\)"),
    Case("import-inf", _import(None, lambda t, f: _set(t, 0, "any", np.inf)), r"test\.parquet: column 'any' has inf at row 1"),
    Case("import-out-of-range", _import(lambda o, f: _set(o, 1, "subdural", 1.5)), r"oof\.parquet: column 'subdural' has 1\.5 at row 2 .*1 of \d+ values are outside \[0, 1\]: fix or remove them$"),
    Case("import-without-fold-column", _import(lambda o, f: o.drop(columns="fold")), r"oof\.parquet: no 'fold' column; .*leak labels into the stackers.*--folds-from-data"),
    Case("import-logits-as-probabilities", _import(lambda o, f: o.assign(**{l: np.log(o[l] / (1 - o[l])) for l in LABELS})), r"oof\.parquet: column 'epidural' .*pass --logits"),
    Case("import-unknown-id", _import(lambda o, f: _set(o, 0, "image_id", "ID_000unknown")), r"oof\.parquet: image_id 'ID_000unknown' at row 1"),
    Case("import-missing-test-rows", _import(None, lambda t, f: t.iloc[3:]), r"test\.parquet: 3 test image\(s\) missing, e\.g\. image_id 'ID_\w+'"),
    Case("import-fold-disagrees", _import(lambda o, f: _with_fold(o, f, shift_row=2)), r"oof\.parquet: fold \d at row 3 \(image_id ID_\w+\) disagrees with data/folds\.parquet"),
    Case("import-truncated-parquet", lambda c: c.import_args(_parquet_bytes(c.frames()[2], c.scratch, truncate=1), c.frames()[3]), r"oof\.parquet: not a readable Parquet"),
    Case("import-empty-file", lambda c: c.import_args(c.frames()[2], b""), r"test\.parquet: empty file"),
    Case("import-reserved-name", lambda c: c.import_args(c.frames()[2], c.frames()[3], name="slice"), r"model name 'slice' is reserved for feature columns"),
    Case("import-name-with-double-underscore", lambda c: c.import_args(c.frames()[2], c.frames()[3], name="a__b"), r"model name 'a__b' is not allowed.*no '__'"),
    Case("import-csv-wrong-header", _import(lambda o, f: o.rename(columns={"any": "ANY"}), fmt="csv"), r"oof\.csv: missing column\(s\) any"),
    # stack features
    Case("features-truncated-preds", _truncate_then(lambda wd: wd.oof("m2"), _features), r"preds/m2/oof\.parquet: not a readable Parquet"),
    Case("features-study-over-two-folds", lambda c: (rewrite_data_file(c.wd, c.wd.folds, _spread_study(pd.read_parquet(c.wd.folds), c)), _features(c))[1],
         r"folds\.parquet: (study|patient) '\w+' is spread over several folds"),
    Case("features-label-flipped-by-hand", _flip_label_after(_features), r"data/labels\.parquet: sha256 \w+\.\.\. differs from \w+\.\.\. "
         r"recorded in data/prepare\.json .*rerun `data prepare`"),
    Case("import-label-flipped-by-hand", _flip_label_after(_import()), r"data/labels\.parquet: sha256 .*rerun `data prepare`"),
    Case("features-missing-test-row", _rewrite(lambda wd: wd.test("m1"), lambda f: f.iloc[1:], _features), r"preds/m1/test\.parquet: 1 test image\(s\) missing"),
    Case("features-metadata-missing-z", _rewrite(lambda wd: wd.metadata, lambda f: f.drop(columns=["z"]), _features), r"data/metadata\.parquet: missing column\(s\) z"),
    Case("features-duplicate-id-in-preds", _rewrite(lambda wd: wd.oof("m1"), lambda f: pd.concat([f, f.iloc[[0]]]), _features), r"preds/m1/oof\.parquet: duplicate image_id"),
    Case("features-model-without-test-file", _remove_then(lambda wd: wd.test("m2"), _features), r"preds/m2: model 'm2' has no test\.parquet"),
    Case("features-model-set-mixed", _mix_model_set, r"preds/m1/test\.parquet: sha256 \w+\.\.\. differs from \w+\.\.\. recorded in preds/m1/model\.json"),
    Case("features-dicom-meta-without-columns", _rewrite(lambda wd: wd.metadata, lambda f: f[["image_id", "patient_id", "study_id", "split", "z"]],
         lambda c: [*_features(c), "--dicom-meta"]), r"metadata\.parquet: --dicom-meta needs DICOM header columns"),
    # stack fit
    Case("fit-stale-features-after-reimport", _reimport_m1, r"features/manifest\.json: preds/m1/oof\.parquet \(model 'm1'\) changed after the features were built.*rerun `stack features`"),
    Case("fit-features-table-not-the-manifest's", _edit_features_table, r"features/test\.parquet: sha256 \w+\.\.\. differs from \w+\.\.\. recorded in features/manifest\.json"),
    Case("fit-model-set-mixed", _mix_model_set_then_fit, r"preds/m1/test\.parquet: sha256 \w+\.\.\. differs from \w+\.\.\. recorded in preds/m1/model\.json"),
    Case("fit-model-without-test-file", _remove_then(lambda wd: wd.test("m2"), _fit()), r"preds/m2: model 'm2' has no test\.parquet"),
    Case("fit-storage-journal-bad-line", _journal_with_bad_line, r"journal\.log: line 2 is not an Optuna journal record"),
    Case("fit-storage-is-a-parquet-file", lambda c: _fit("--tune", "--trials", "1", "--storage", str(c.wd.metadata))(c), r"metadata\.parquet: line 1 is not an Optuna journal record"),
    Case("fit-features-from-other-folds", _rewrite(lambda wd: wd.folds, _swap_folds, _fit()), r"features/manifest\.json: folds_hash \w+\.\.\. differs from data/folds\.parquet"),
    Case("fit-unknown-stacker", lambda c: ["stack", "fit", *c.w, "--stackers", "catboost", "-q"], r"catboost"),
    Case("fit-storage-unknown-scheme", _fit("--tune", "--trials", "1", "--storage", "redis://localhost/0"), r"redis"),
    Case("fit-truncated-features", _truncate_then(lambda wd: wd.features_train, _fit()), r"features/train\.parquet: not a readable Parquet"),
    Case("fit-nan-label", _rewrite(lambda wd: wd.labels, lambda f: _set(f.astype({"any": float}), 0, "any", np.nan), _fit()), r"labels\.parquet: column 'any' has nan at row 1"),
    # submit
    Case("submit-target-not-writable", _file_as_parent, r"not_a_dir"),
    Case("submit-blend-missing", _remove_then(lambda wd: wd.blend, _submit()), r"blend\.json"),
    Case("submit-blend-corrupt", _write_text_then(lambda wd: wd.blend, "{not json", _submit()), r"blend\.json: not valid JSON"),
    Case("submit-stacker-test-edited-after-fit", _rewrite(lambda wd: wd.stack_dir("lgbm") / "test.parquet", lambda f: _set(f, 2, "any", np.nan), _submit()), r"stack/lgbm/test\.parquet: changed since stack/blend\.json was fitted"),
    Case("submit-blend-clip-out-of-range", _edit_blend_clip, r"blend\.json: 'clip' is 0\.7; expected a number in \[0, 0\.5\)"),
    # base train
    Case("train-reserved-name", lambda c: ["base", "train", *c.w, "--name", "meta", "-q"], r"--name 'meta' is reserved for feature columns"),
    Case("train-unknown-arch", lambda c: ["base", "train", *c.w, "--name", "x", "--arch", "vgg_huge", "-q"], r"vgg_huge"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_one_line_exit_2_nothing_changed(pipeline_workdir, tmp_path, case):
    root, base_wd = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    shutil.copytree(base_wd.root, wd.root)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ctx = Ctx(root, wd, scratch)
    args = case.setup(ctx)
    before = snapshot(wd.root)
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("==")]
    assert result.exit_code == 2, result.output[-3000:]
    assert len(lines) == 1, result.output[-3000:]
    assert lines[0].startswith("Error: ")
    assert re.search(case.message, lines[0]), lines[0]
    assert snapshot(wd.root) == before


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_prepare_without_strict_skips_bad_dicom_files_naming_each_on_one_line(pipeline_workdir, tmp_path):
    root, _ = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    ctx = Ctx(root, wd, tmp_path)
    train_files = sorted((ctx.copy_dicom() / "stage_2_train").glob("*.dcm"))
    no_preamble, short = train_files[0], train_files[1]
    no_preamble.write_bytes(no_preamble.read_bytes()[132:])
    _truncate(short, 100)
    result = CliRunner().invoke(cli, ctx.prepare_args(strict=False), catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    warning_lines = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any(no_preamble.name in line for line in warning_lines), result.stderr
    assert any(short.name in line for line in warning_lines), result.stderr
    assert "warnings.warn" not in result.stderr and "Traceback" not in result.output
    metadata, labels, folds = load_core(wd)
    assert not {no_preamble.stem, short.stem} & set(metadata["image_id"])
    assert len(folds) == len(train_files) - 2


SEEDED = [
    ["data", "synth"],
    ["data", "prepare", "--dicom-dir", "d", "--test-dicom-dir", "t", "--labels", "l.csv"],
    ["base", "train", "--name", "m"],
    ["stack", "fit"],
    ["demo"],
]


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1.5"])
@pytest.mark.parametrize("command", SEEDED, ids=[" ".join(c[:2]) for c in SEEDED])
def test_every_seed_option_takes_0_to_2_32_minus_1(tmp_path, command, seed):
    result = CliRunner().invoke(cli, [*command, "--workdir", str(tmp_path / "w"), "--seed", seed])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--seed'" in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "w").exists()
