"""`stack features`: every feature family against a slow per-study pandas reference.

The reference below loops over studies and computes each feature the obvious way (sort the
study by z then image_id, shift, rolling, rank, nlargest); the library computes the same
numbers over whole columns. Random data covers 1-slice studies, duplicate z, head-to-foot
series (z decreasing in file order), shuffled rows and tied predictions.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from features.api import run_stack_features
from stackkit.render import features_lines
from features.build import DICOM_META_COLUMNS, TOP_K, build_features, build_test_features, feature_columns, roll_windows
from stackkit.contract import CONTRACT_VERSION, LABELS, Workdir, file_sha256, folds_hash
from stackkit.errors import ContractError, LeakageError, StackkitError
from stackkit.contract.io import write_parquet
from stackkit.testing.contract import move_oof_fold

# --- synthetic contract data ---------------------------------------------------------------


def make_data(seed: int = 0, n_studies: int = 40, models=("cnn_a", "cnn_b"), n_folds: int = 3):
    """metadata, labels, folds and {model: (oof, test)} with awkward studies, rows shuffled."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        n = 1 if s % 7 == 0 else int(rng.integers(2, 14))
        z = rng.normal(0, 30) + np.sort(rng.choice(np.arange(40), n, replace=False)) * rng.choice([2.5, 5.0])
        if s % 3 == 1:
            z = z[::-1]  # head-to-foot series: z decreasing in file order
        if n >= 3 and s % 4 == 0:
            z[rng.integers(0, n, 2)] = z[rng.integers(0, n)]  # duplicate z positions
        split = "test" if s % 4 == 3 else "train"
        study_id = f"ID_s{rng.integers(1 << 24):06x}{s}"
        for i in range(n):
            rows.append((f"ID_{rng.integers(1 << 36):09x}", f"ID_p{s:04d}", study_id, split, float(z[i])))
    metadata = pd.DataFrame(rows, columns=["image_id", "patient_id", "study_id", "split", "z"])
    metadata["slice_thickness"] = rng.choice([1.0, 5.0, np.nan], len(metadata))
    metadata["window_center"] = rng.normal(40, 5, len(metadata))
    metadata = metadata.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    train = metadata[metadata["split"] == "train"]
    labels = pd.DataFrame({"image_id": train["image_id"].to_numpy()})
    for label in LABELS:
        labels[label] = (rng.random(len(train)) < 0.2).astype(np.int8)
    study_fold = {sid: k % n_folds for k, sid in enumerate(train["study_id"].unique())}
    folds = pd.DataFrame({"image_id": train["image_id"].to_numpy(), "fold": train["study_id"].map(study_fold).to_numpy().astype(np.int8)})
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"].to_numpy()
    preds = {m: (random_predictions(rng, folds["image_id"], folds["fold"]), random_predictions(rng, test_ids)) for m in models}
    return metadata, labels, folds, preds


def random_predictions(rng, ids, fold=None) -> pd.DataFrame:
    ids = np.asarray(ids)
    values = rng.random((len(ids), len(LABELS))).astype(np.float32)
    values[:, 1] = np.round(values[:, 1], 1)  # many ties for the rank and top-k features
    values[: len(ids) // 5, 2] = 0.0
    frame = pd.DataFrame(values, columns=list(LABELS))
    if fold is not None:
        frame.insert(0, "fold", np.asarray(fold, dtype=np.int8))
    frame.insert(0, "image_id", ids)
    return frame.sample(frac=1.0, random_state=1).reset_index(drop=True)


def build(metadata, folds, preds, **kwargs):
    return build_features(metadata, {m: p[0] for m, p in preds.items()}, {m: p[1] for m, p in preds.items()}, folds, progress=False, **kwargs)


# --- the slow reference: one study at a time --------------------------------------------------


def reference_features(metadata, folds, preds, lags, dicom_meta=False, feature_set="basic") -> pd.DataFrame:
    out = []
    fold_of = folds.set_index("image_id")["fold"]
    for study_id, study in metadata.groupby("study_id"):
        study = study.sort_values(["z", "image_id"], kind="mergesort").reset_index(drop=True)
        n = len(study)
        f = {"image_id": study["image_id"], "study_id": study_id, "slice_index": np.arange(n), "split": study["split"]}
        f["slice__position"] = np.arange(n) / (n - 1) if n > 1 else 0.5
        f["slice__index"] = np.arange(n)
        f["slice__reverse_index"] = n - 1 - np.arange(n)
        f["slice__count"] = n
        f["slice__z_gap_prev"] = study["z"].diff()
        f["slice__z_gap_next"] = study["z"].shift(-1) - study["z"]
        f["slice__z_duplicates"] = study.groupby("z")["z"].transform("size")
        if dicom_meta:
            for col in DICOM_META_COLUMNS:
                if col in study.columns:
                    f[f"meta__{col}"] = study[col].astype(float)
        per_label = {label: [] for label in LABELS}
        for model, (oof, test) in sorted(preds.items()):
            table = oof if study["split"].iloc[0] == "train" else test
            p_all = table.set_index("image_id").reindex(study["image_id"])
            for label in LABELS:
                s = p_all[label].astype(np.float64).reset_index(drop=True)
                per_label[label].append(s.to_numpy())
                pre = f"{model}__{label}__"
                f[pre + "pred"] = s
                for k in range(1, lags + 1):
                    f[pre + f"lag{k}"] = s.shift(k)
                    f[pre + f"lead{k}"] = s.shift(-k)
                    f[pre + f"diff_lag{k}"] = s - s.shift(k)
                    f[pre + f"diff_lead{k}"] = s - s.shift(-k)
                f[pre + "study_max"] = s.max()
                f[pre + "study_mean"] = s.mean()
                f[pre + "study_std"] = s.std(ddof=0)
                f[pre + f"study_top{TOP_K}_mean"] = s.nlargest(TOP_K).mean()
                f[pre + "study_rank"] = s.rank(method="average") / n
                if feature_set == "wide":
                    f[pre + "study_min"] = s.min()
                    f[pre + "minus_study_mean"] = s - s.mean()
                    f[pre + "minus_study_max"] = s - s.max()
                for w in (3, 5, 7, 9) if feature_set == "wide" else (3, 5):
                    f[pre + f"roll{w}_mean"] = s.rolling(w, center=True, min_periods=1).mean()
        for label in LABELS:
            stacked = np.vstack(per_label[label])
            f[f"models__{label}__mean"] = stacked.mean(axis=0)
            f[f"models__{label}__std"] = stacked.std(axis=0)
            if feature_set == "wide":
                f[f"models__{label}__max"] = stacked.max(axis=0)
                f[f"models__{label}__min"] = stacked.min(axis=0)
        if study["split"].iloc[0] == "train":
            f["fold"] = fold_of.reindex(study["image_id"]).to_numpy()
        out.append(pd.DataFrame(f))
    return pd.concat(out, ignore_index=True)


# --- the families against the reference ------------------------------------------------------


@pytest.mark.parametrize(
    "seed, lags, dicom_meta, feature_set",
    [(0, 2, False, "basic"), (1, 1, True, "basic"), (2, 3, False, "basic"), (3, 0, True, "basic"),
     (4, 2, False, "wide"), (5, 0, True, "wide"), (6, 9, False, "wide")],
)
def test_every_feature_matches_the_per_study_reference(seed, lags, dicom_meta, feature_set):
    models = ("m_b", "m_a", "m_c") if seed != 5 else ("m_a",)  # one model: the across-model max = min = pred
    metadata, _labels, folds, preds = make_data(seed, models=models)
    kwargs = {} if feature_set == "basic" else {"feature_set": feature_set}  # basic: the default
    train, test, definitions = build(metadata, folds, preds, lags=lags, dicom_meta=dicom_meta, **kwargs)
    reference = reference_features(metadata, folds, preds, lags, dicom_meta, feature_set).set_index("image_id")

    feature_names = list(definitions)
    assert list(train.columns) == ["image_id", "study_id", "fold", "slice_index", *feature_names]
    assert list(test.columns) == ["image_id", "study_id", "slice_index", *feature_names]
    assert set(feature_names) == set(reference.columns) - {"study_id", "slice_index", "split", "fold"}
    assert {c for c in feature_names if c.startswith("meta__")} == ({"meta__slice_thickness", "meta__window_center"} if dicom_meta else set())
    for frame, split in ((train, "train"), (test, "test")):
        expected_ids = reference.index[reference["split"] == split]
        assert sorted(frame["image_id"]) == sorted(expected_ids)
        ref = reference.loc[frame["image_id"]]
        # rows sorted by (study_id, slice_index), slice_index = z order with image_id ties
        keys = list(zip(frame["study_id"], frame["slice_index"]))
        assert keys == sorted(keys)
        np.testing.assert_array_equal(frame["study_id"].to_numpy(dtype=object), ref["study_id"].to_numpy(dtype=object))
        np.testing.assert_array_equal(frame["slice_index"].to_numpy(), ref["slice_index"].to_numpy())
        assert frame["slice_index"].dtype == np.int32
        if split == "train":
            assert frame["fold"].dtype == np.int8
            np.testing.assert_array_equal(frame["fold"].to_numpy(), ref["fold"].to_numpy())
        for name in feature_names:
            assert frame[name].dtype == np.float32, name
            np.testing.assert_allclose(
                frame[name].to_numpy(dtype=np.float64), ref[name].to_numpy(dtype=np.float64), rtol=2e-6, atol=1e-6, equal_nan=True, err_msg=name
            )


def test_the_data_has_the_awkward_cases():
    metadata, *_ = make_data(0)
    sizes = metadata.groupby("study_id").size()
    assert (sizes == 1).any()
    assert metadata.duplicated(["study_id", "z"]).any()


def test_adding_a_model_changes_only_its_columns_and_order_is_stable():
    metadata, _labels, folds, preds = make_data(5, models=("alpha", "beta", "gamma"))
    full_train, full_test, full_defs = build(metadata, folds, preds)
    without = {m: p for m, p in preds.items() if m != "beta"}
    part_train, part_test, part_defs = build(metadata, folds, without)

    beta_columns = [c for c in full_defs if c.startswith("beta__")]
    assert len(beta_columns) == len([c for c in full_defs if c.startswith("alpha__")]) == len(LABELS) * 16  # lags=2
    assert list(part_defs) == [c for c in full_defs if c not in beta_columns]
    assert list(part_defs) == list(feature_columns(["gamma", "alpha"], 2))  # models sorted by name
    for full, part in ((full_train, part_train), (full_test, part_test)):
        assert list(part.columns) == [c for c in full.columns if c not in beta_columns]
        for col in part.columns:
            if col.startswith("models__"):
                continue  # across-model aggregates keep their names, their values change
            pd.testing.assert_series_equal(part[col], full[col], check_exact=True)
        assert not np.allclose(part["models__any__mean"], full["models__any__mean"])
    # the same inputs in another row order give the same frames
    shuffled = metadata.sample(frac=1.0, random_state=99).reset_index(drop=True)
    again_train, _, _ = build(shuffled, folds.iloc[::-1].reset_index(drop=True), preds)
    pd.testing.assert_frame_equal(again_train, full_train)


# --- leakage and bad input in the pure layer -------------------------------------------------


def _spread_study(metadata, folds, preds):
    study = metadata.loc[metadata["split"] == "train"].groupby("study_id").size().loc[lambda s: s > 2].index[0]
    ids = set(metadata.loc[metadata["study_id"] == study, "image_id"])
    first = folds.index[folds["image_id"].isin(ids)][0]
    folds = folds.copy()
    folds.loc[first, "fold"] = (folds.loc[first, "fold"] + 1) % 3
    return folds, study


def test_a_study_spread_over_two_folds_is_refused_naming_it():
    metadata, _labels, folds, preds = make_data(7)
    bad_folds, study = _spread_study(metadata, folds, preds)
    with pytest.raises(LeakageError, match=rf"study '{study}' has images in folds \d and \d"):
        build(metadata, bad_folds, preds)


def _oof_fold_disagrees(metadata, folds, preds):
    oof, test = preds["cnn_a"]
    oof = oof.copy()
    oof.loc[0, "fold"] = (oof.loc[0, "fold"] + 1) % 3
    return metadata, folds, {**preds, "cnn_a": (oof, test)}


def _oof_missing_image(metadata, folds, preds):
    oof, test = preds["cnn_b"]
    return metadata, folds, {**preds, "cnn_b": (oof.iloc[1:], test)}


def _test_pred_on_train_image(metadata, folds, preds):
    oof, test = preds["cnn_b"]
    stray = oof.iloc[:1].drop(columns="fold")
    return metadata, folds, {**preds, "cnn_b": (oof, pd.concat([test, stray], ignore_index=True))}


def _reserved_model_name(metadata, folds, preds):
    return metadata, folds, {**preds, "slice": preds["cnn_a"]}


def _duplicate_metadata_image(metadata, folds, preds):
    return pd.concat([metadata, metadata.iloc[[5]]], ignore_index=True), folds, preds


def _fold_for_a_test_image(metadata, folds, preds):
    test_id = metadata.loc[metadata["split"] == "test", "image_id"].iloc[0]
    extra = pd.DataFrame({"image_id": [test_id], "fold": np.array([0], dtype=np.int8)})
    return metadata, pd.concat([folds, extra], ignore_index=True), preds


@pytest.mark.parametrize(
    "breaker, error, match",
    [
        (_oof_fold_disagrees, LeakageError, r"preds/cnn_a/oof.parquet: fold \d for image_id 'ID_\w+' disagrees with data/folds.parquet"),
        (_oof_missing_image, ContractError, r"preds/cnn_b/oof.parquet: expected every train \(labeled\) image exactly once; 1 missing"),
        (_test_pred_on_train_image, ContractError, r"preds/cnn_b/test.parquet: image_id 'ID_\w+' at row \d+ is not a test image"),
        (_reserved_model_name, StackkitError, r"preds/slice: the model name 'slice' is reserved"),
        (_duplicate_metadata_image, ContractError, r"data/metadata.parquet: duplicate image_id 'ID_\w+'"),
        (_fold_for_a_test_image, ContractError, r"data/folds.parquet: image_id 'ID_\w+' at row \d+ is a test image"),
    ],
)
def test_bad_predictions_are_refused_in_one_line(breaker, error, match):
    metadata, _labels, folds, preds = make_data(8)
    with pytest.raises(error, match=match) as info:
        build(*breaker(metadata, folds, preds))
    assert "\n" not in str(info.value)


# --- the work-directory entry point ----------------------------------------------------------


def write_workdir(root, seed=11, models=("cnn_a", "cnn_b")) -> Workdir:
    wd = Workdir(root / "work")
    metadata, labels, folds, preds = make_data(seed, models=models)
    write_parquet(metadata, wd.metadata)
    write_parquet(labels, wd.labels)
    write_parquet(folds, wd.folds)
    for model, (oof, test) in preds.items():
        write_parquet(oof, wd.oof(model))
        write_parquet(test, wd.test(model))
    return wd


def test_run_stack_features_writes_tables_and_a_manifest_of_every_column(tmp_path):
    wd = write_workdir(tmp_path)
    summary = run_stack_features(wd, lags=1, dicom_meta=True, progress=False)
    manifest = json.loads(wd.features_manifest.read_text())
    train = pd.read_parquet(wd.features_train)
    test = pd.read_parquet(wd.features_test)

    assert manifest["contract_version"] == CONTRACT_VERSION and manifest["lags"] == 1
    assert manifest["models"] == ["cnn_a", "cnn_b"]
    assert list(train.columns) == ["image_id", "study_id", "fold", "slice_index", *manifest["feature_columns"]]
    assert list(test.columns) == ["image_id", "study_id", "slice_index", *manifest["feature_columns"]]
    assert list(manifest["columns"]) == manifest["feature_columns"]
    assert all(isinstance(text, str) and text for text in manifest["columns"].values())
    assert "cnn_b__any__lead1" in manifest["columns"] and "cnn_b__any__lag2" not in manifest["columns"]
    assert "meta__slice_thickness" in manifest["columns"]
    assert set(train.dtypes[manifest["feature_columns"]].astype(str)) == {"float32"}
    folds = pd.read_parquet(wd.folds)
    assert manifest["folds_hash"] == folds_hash(folds["image_id"], folds["fold"])
    assert manifest["inputs"] == {
        rel: file_sha256(wd.root / rel)
        for rel in ["data/metadata.parquet", "data/folds.parquet", "preds/cnn_a/oof.parquet", "preds/cnn_a/test.parquet", "preds/cnn_b/oof.parquet", "preds/cnn_b/test.parquet"]
    }
    assert summary.rows_train == len(train) == len(folds) and summary.columns == len(manifest["feature_columns"])
    assert list(zip(train["study_id"], train["slice_index"])) == sorted(zip(train["study_id"], train["slice_index"]))
    # the written table equals the pure layer's frame
    metadata = pd.read_parquet(wd.metadata)
    preds = {m: (pd.read_parquet(wd.oof(m)), pd.read_parquet(wd.test(m))) for m in ("cnn_a", "cnn_b")}
    expected, _, _ = build(metadata, folds, preds, lags=1, dicom_meta=True)
    pd.testing.assert_frame_equal(train, expected, check_dtype=False, check_index_type=False)
    assert not list(wd.features_dir.glob(".stackkit-tmp-*"))


def _no_predictions(wd):
    import shutil

    for model in ("cnn_a", "cnn_b"):
        shutil.rmtree(wd.preds_dir(model))


def _no_dicom_columns(wd):
    metadata = pd.read_parquet(wd.metadata)
    write_parquet(metadata[["image_id", "patient_id", "study_id", "split", "z"]], wd.metadata)


def _test_file_missing(wd):
    wd.test("cnn_b").unlink()


def _study_over_two_folds(wd):
    metadata = pd.read_parquet(wd.metadata)
    folds = pd.read_parquet(wd.folds)
    sizes = metadata[metadata["split"] == "train"].groupby("study_id").size()
    study = sizes[sizes > 2].index[0]
    row = folds.index[folds["image_id"].isin(metadata.loc[metadata["study_id"] == study, "image_id"])][0]
    folds.loc[row, "fold"] = (folds.loc[row, "fold"] + 1) % 3
    write_parquet(folds, wd.folds)


def _oof_with_foreign_fold(wd):
    move_oof_fold(wd, "cnn_b", 3, n_folds=3)


def _test_preds_missing_an_image(wd):
    write_parquet(pd.read_parquet(wd.test("cnn_a")).iloc[1:], wd.test("cnn_a"))


@pytest.mark.parametrize(
    "breaker, kwargs, error, match",
    [
        (_no_predictions, {}, StackkitError, r"^no predictions under preds/: run base train or base import$"),
        (_test_file_missing, {}, ContractError, r"preds/cnn_b: model 'cnn_b' has no test\.parquet; a model needs both"),
        (_no_dicom_columns, {"dicom_meta": True}, ContractError, r"metadata\.parquet: --dicom-meta needs DICOM header columns .* found none"),
        (_study_over_two_folds, {}, LeakageError, r"data/folds.parquet: (patient|study) 'ID_\w+' is spread over several folds"),
        (_oof_with_foreign_fold, {}, LeakageError, r"preds/cnn_b/oof.parquet: fold \d at row 4 .* disagrees with data/folds.parquet"),
        (_test_preds_missing_an_image, {}, ContractError, r"preds/cnn_a/test.parquet: 1 test image\(s\) missing"),
        (None, {"lags": -1}, StackkitError, r"--lags: expected a non-negative integer, got -1"),
    ],
)
def test_bad_workdirs_fail_in_one_line_and_keep_previous_features(tmp_path, breaker, kwargs, error, match):
    wd = write_workdir(tmp_path)
    run_stack_features(wd, progress=False)
    before = {p.name: p.read_bytes() for p in wd.features_dir.iterdir()}
    if breaker is not None:
        breaker(wd)
    with pytest.raises(error, match=match) as info:
        run_stack_features(wd, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in wd.features_dir.iterdir()} == before


def test_threads_do_not_change_a_single_bit(monkeypatch):
    metadata, _labels, folds, preds = make_data(5, models=("m_a", "m_b", "m_c"))
    built = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("STACKKIT_THREADS", threads)
        built[threads] = build(metadata, folds, preds, lags=2)
    for one, many in zip(built["1"][:2], built["3"][:2]):
        pd.testing.assert_frame_equal(one, many, check_exact=True)


# --- the feature sets ----------------------------------------------------------------------------

WIDE_MODEL_FEATURES = ("study_min", "minus_study_mean", "minus_study_max", "roll7_mean", "roll9_mean")


def test_wide_is_the_basic_columns_unchanged_plus_its_own():
    metadata, _labels, folds, preds = make_data(12, models=("m_b", "m_a"))
    basic = build(metadata, folds, preds, lags=2, dicom_meta=True)
    explicit = build(metadata, folds, preds, lags=2, dicom_meta=True, feature_set="basic")
    wide = build(metadata, folds, preds, lags=2, dicom_meta=True, feature_set="wide")
    for one, other in zip(basic[:2], explicit[:2]):
        pd.testing.assert_frame_equal(one, other, check_exact=True)
    assert basic[2] == explicit[2] == feature_columns(["m_a", "m_b"], 2, ["slice_thickness", "window_center"])
    assert roll_windows("basic") == (3, 5) and roll_windows("wide") == (3, 5, 7, 9)

    basic_names, wide_names = list(basic[2]), list(wide[2])
    added = [c for c in wide_names if c not in basic[2]]
    assert [c for c in wide_names if c in basic[2]] == basic_names  # same relative order
    assert {c: wide[2][c] for c in basic_names} == basic[2]  # same definitions
    assert sorted(added) == sorted(
        [f"models__{label}__{agg}" for label in LABELS for agg in ("max", "min")]
        + [f"{m}__{label}__{f}" for m in ("m_a", "m_b") for label in LABELS for f in WIDE_MODEL_FEATURES]
    )
    assert len(wide_names) == len(basic_names) + len(LABELS) * (2 + 2 * len(WIDE_MODEL_FEATURES))
    assert all(isinstance(wide[2][c], str) and wide[2][c] for c in added)
    for b, w in zip(basic[:2], wide[:2]):
        pd.testing.assert_frame_equal(w[list(b.columns)], b, check_exact=True)
        # the new columns mean what they say, in the table's own float32 columns
        np.testing.assert_allclose(w["m_a__any__minus_study_max"], w["m_a__any__pred"] - w["m_a__any__study_max"], atol=1e-7)
        np.testing.assert_allclose(w["m_b__epidural__minus_study_mean"], w["m_b__epidural__pred"] - w["m_b__epidural__study_mean"], atol=1e-6)
        assert (w["m_a__any__study_min"] <= w["m_a__any__pred"]).all()
        assert (w["models__any__min"] <= w["models__any__mean"] + 1e-6).all() and (w["models__any__mean"] <= w["models__any__max"] + 1e-6).all()


def test_wide_threads_do_not_change_a_single_bit(monkeypatch):
    metadata, _labels, folds, preds = make_data(13, models=("m_a", "m_b", "m_c"))
    built = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("STACKKIT_THREADS", threads)
        built[threads] = build(metadata, folds, preds, lags=1, feature_set="wide")
    for one, many in zip(built["1"][:2], built["3"][:2]):
        pd.testing.assert_frame_equal(one, many, check_exact=True)


def test_build_test_features_passes_the_feature_set_on():
    metadata, _labels, folds, preds = make_data(14)
    _, wide_test, _ = build(metadata, folds, preds, lags=1, feature_set="wide")
    alone = build_test_features(metadata, {m: p[1] for m, p in preds.items()}, lags=1, feature_set="wide")
    assert "cnn_a__any__roll9_mean" in alone.columns and "models__any__max" in alone.columns
    pd.testing.assert_frame_equal(alone, wide_test)


def test_an_unknown_feature_set_is_refused_in_one_line(tmp_path):
    metadata, _labels, folds, preds = make_data(15)
    with pytest.raises(StackkitError, match=r"^--feature-set: expected one of basic, wide, got 'huge'$"):
        build(metadata, folds, preds, feature_set="huge")
    with pytest.raises(StackkitError, match=r"^--feature-set: expected one of basic, wide, got 'huge'$"):
        feature_columns(["m"], 2, feature_set="huge")
    with pytest.raises(StackkitError, match=r"^--feature-set: expected one of basic, wide, got 'huge'$"):
        run_stack_features(write_workdir(tmp_path), feature_set="huge", progress=False)


def test_run_stack_features_wide_records_the_set_and_passes_it_to_the_per_fold_test_features(tmp_path):
    wd = write_workdir(tmp_path)
    n_folds = int(pd.read_parquet(wd.folds)["fold"].max()) + 1
    test = pd.read_parquet(wd.test("cnn_a"))
    rng = np.random.default_rng(3)
    for k in range(n_folds):  # cnn_a: one test file per fold model
        write_parquet(random_predictions(rng, test["image_id"]), wd.test_fold("cnn_a", k))

    summary = run_stack_features(wd, lags=1, progress=False)
    assert json.loads(wd.features_manifest.read_text())["feature_set"] == "basic"
    assert features_lines(summary)[0].endswith("lags=1, feature set basic")
    basic_columns = summary.columns

    summary = run_stack_features(wd, lags=1, progress=False, feature_set="wide")
    manifest = json.loads(wd.features_manifest.read_text())
    assert manifest["feature_set"] == "wide" and summary.feature_set == "wide"
    assert features_lines(summary)[0] == f"stack features: {summary.columns} feature columns from 2 model(s) (cnn_a, cnn_b), lags=1, feature set wide"
    assert summary.columns == basic_columns + len(LABELS) * (2 + 2 * len(WIDE_MODEL_FEATURES))
    assert manifest["columns"]["cnn_b__any__minus_study_max"].startswith("cnn_b, any: pred - study_max")
    assert manifest["columns"]["models__epidural__min"] == "minimum of the 'epidural' prediction across models"
    assert manifest["test_folds"] == n_folds
    metadata = pd.read_parquet(wd.metadata)
    for k in range(n_folds):
        fold_test = pd.read_parquet(wd.features_test_fold(k))
        assert list(fold_test.columns) == ["image_id", "study_id", "slice_index", *manifest["feature_columns"]]
        sets = {"cnn_a": pd.read_parquet(wd.test_fold("cnn_a", k)), "cnn_b": pd.read_parquet(wd.test("cnn_b"))}
        expected = build_test_features(metadata, sets, lags=1, feature_set="wide")
        pd.testing.assert_frame_equal(fold_test, expected, check_dtype=False, check_index_type=False)


def test_cli_feature_set_is_a_choice(tmp_path):
    from click.testing import CliRunner

    from stackkit.cli import cli

    result = CliRunner().invoke(cli, ["stack", "features", "--help"])
    assert result.exit_code == 0 and "--feature-set [basic|wide]" in result.output and "minus_study_mean" in result.output
    wd = write_workdir(tmp_path)
    result = CliRunner().invoke(cli, ["stack", "features", "--workdir", str(wd.root), "--feature-set", "huge"])
    assert result.exit_code == 2 and "Invalid value for '--feature-set'" in result.output
    assert not wd.features_dir.exists()
    result = CliRunner().invoke(cli, ["stack", "features", "--workdir", str(wd.root), "--feature-set", "wide", "--lags", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "feature set wide" in result.output
    assert json.loads(wd.features_manifest.read_text())["feature_set"] == "wide"
