"""base_models: pixels (HU, windows, resize), slice context, architectures, and `base train` end to end
on a small synthetic DICOM dataset (prepared once per session, see tests/base_models/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import CONTRACT_VERSION, LABELS, Workdir, folds_hash
from stackkit.errors import StackkitError
from stackkit.render import train_lines
from stackkit.contract.validate import load_core, read_oof, read_test

from stackkit.testing.contract import rewrite_data_file
from stackkit.testing.dicom import SMALL_FOLDS, dicom_bytes, fresh_workdir

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
# Settings every end-to-end test shares, so the pixel cache is built once and reused.
SMALL = dict(img_size=32, epochs=6, batch_size=16, lr=4e-3, device="cpu", progress=False)


# --- pixels ---------------------------------------------------------------------------------


def _read(data: bytes):
    import io

    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


HU = np.array([[-1000, -1000, 0, 40], [80, 1500, 2047, -500]], dtype=np.int32)


@pytest.mark.parametrize(
    "encoding, stored, tags",
    [
        ("signed 16-bit", HU + 1024, dict(pixel_representation=1, bits_stored=16, intercept=-1024)),
        ("unsigned 12-bit", HU + 1024, dict(pixel_representation=0, bits_stored=12, intercept=-1024)),
        ("RSNA quirk: 12-bit two's complement declared unsigned", np.mod(HU, 4096), dict(pixel_representation=0, bits_stored=12, intercept=0)),
        ("slope 2", (HU + 1024) // 2, dict(pixel_representation=0, bits_stored=16, intercept=-1024, slope=2.0)),
    ],
)
def test_dicom_to_hu_recovers_hounsfield_units(encoding, stored, tags):
    from base_models.pixels import dicom_to_hu

    hu = dicom_to_hu(_read(dicom_bytes(stored, **tags)))
    expected = HU if "slope" not in tags else ((HU + 1024) // 2) * 2 - 1024
    np.testing.assert_array_equal(hu, expected.astype(np.float32))


def test_quirk_rule_matches_rsna_fix():
    from base_models.pixels import needs_12bit_fix

    assert needs_12bit_fix(12, 0, 0.0, "CT") and needs_12bit_fix("12", "0", "-99", "ct")
    assert not needs_12bit_fix(12, 0, -1024.0, "CT")  # healthy unsigned 12-bit file
    assert not needs_12bit_fix(12, 1, 0.0, "CT")  # signed: no repair
    assert not needs_12bit_fix(16, 0, 0.0, "CT")
    assert not needs_12bit_fix(None, 0, 0.0, "CT")
    assert not needs_12bit_fix(12, 0, None, "CT")  # no RescaleIntercept: nothing to repair
    assert not needs_12bit_fix(12, 0, 0.0, "MR") and not needs_12bit_fix(12, 0, 0.0, None)  # CT only


def test_hu_on_pydicom_ct_small():
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    from base_models.pixels import dicom_to_hu

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom test data not installed")
    ds = pydicom.dcmread(path)
    hu = dicom_to_hu(ds)
    reference = apply_modality_lut(pydicom.dcmread(path).pixel_array, pydicom.dcmread(path))
    assert hu.shape == (128, 128) and hu.dtype == np.float32
    np.testing.assert_allclose(hu, reference)
    assert hu.min() == pytest.approx(-896.0) and hu.max() == pytest.approx(1167.0)


def test_synth_quirk_files_decode_like_healthy_ones(small_dataset):
    """Air in the corner of every synthetic slice is about -1000 HU, whatever the encoding."""
    import pydicom

    from base_models.pixels import dicom_to_hu, needs_12bit_fix

    metadata = pd.read_parquet(small_dataset.metadata)
    kinds = {"quirk": [], "healthy": []}
    for path in metadata["path"].iloc[:120]:
        ds = pydicom.dcmread(path)
        quirk = needs_12bit_fix(ds.BitsStored, ds.PixelRepresentation, ds.RescaleIntercept, ds.Modality)
        try:
            hu = dicom_to_hu(ds)
        except ValueError:  # the one truncated file
            continue
        kinds["quirk" if quirk else "healthy"].append(hu[:3, :3].mean())
    assert kinds["quirk"] and kinds["healthy"], "the synthetic set should hold both kinds of file"
    for corner in kinds["quirk"] + kinds["healthy"]:
        assert -1100 < corner < -900


def test_window_values():
    from base_models.pixels import window_uint8

    hu = np.array([[-1000.0, 0.0, 40.0, 80.0, 1000.0]])
    out = window_uint8(hu, [(40, 80), (40, 380)])
    assert out.shape == (2, 1, 5) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [0, 0, 128, 255, 255])  # brain window 0..80 HU
    np.testing.assert_array_equal(out[1, 0], [0, 101, 128, 154, 255])  # soft tissue -150..230 HU: 150/380*255 = 100.7


def test_resize_keeps_flat_images_flat_and_averages_when_shrinking():
    from base_models.pixels import resize_image

    flat = np.full((8, 8), 7.0)
    np.testing.assert_allclose(resize_image(flat, 4), 7.0, rtol=1e-6)
    np.testing.assert_allclose(resize_image(flat, 13), 7.0, rtol=1e-6)
    stripes = np.tile([0.0, 10.0], (8, 4))
    assert np.ptp(resize_image(stripes, 4)) < 3.0  # anti-aliased: no stripes survive


def test_unreadable_file_gives_blank_image_and_reason(tmp_path):
    from base_models.pixels import read_windowed

    bad = tmp_path / "bad.dcm"
    bad.write_bytes(dicom_bytes(HU + 1024, pixel_representation=1, bits_stored=16, intercept=-1024)[:-5])
    image, reason = read_windowed(bad, [(40, 80)], 16)
    assert image.shape == (1, 16, 16) and not image.any() and reason
    image, reason = read_windowed(tmp_path / "missing.dcm", [(40, 80)], 16)
    assert reason and "No such file" in reason


# --- slice context --------------------------------------------------------------------------


def _study_frame():
    # study a: four slices stored head-to-foot (z falls with file order), one duplicate z;
    # study b: a single slice; rows shuffled so that nothing can rely on row order.
    rows = [
        ("ID_a3", "a", 10.0), ("ID_a0", "a", 25.0), ("ID_a2", "a", 15.0), ("ID_a1", "a", 15.0),
        ("ID_a4", "a", 5.0), ("ID_b0", "b", 0.0),
    ]
    return pd.DataFrame(rows, columns=["image_id", "study_id", "z"])


def test_context_order_by_z_then_id_with_center_repeated_at_edges():
    from base_models.data import neighbor_table

    frame = _study_frame()
    ids = frame["image_id"].to_numpy()
    # z order inside study a: a4 (5), a3 (10), a1 (15), a2 (15, tie broken by id), a0 (25)
    table = ids[neighbor_table(frame, 1)]
    got = {row[1]: (row[0], row[2]) for row in table}
    assert got["ID_a4"] == ("ID_a4", "ID_a3")  # bottom edge: center repeated below
    assert got["ID_a3"] == ("ID_a4", "ID_a1")
    assert got["ID_a1"] == ("ID_a3", "ID_a2")  # duplicate z: ordered by image_id
    assert got["ID_a2"] == ("ID_a1", "ID_a0")
    assert got["ID_a0"] == ("ID_a2", "ID_a0")  # top edge
    assert got["ID_b0"] == ("ID_b0", "ID_b0")  # single-slice study: never borrows from another study
    table2 = ids[neighbor_table(frame, 2)]
    got2 = {row[1]: (row[0], row[2]) for row in table2}
    assert got2["ID_a1"] == ("ID_a4", "ID_a0")
    assert got2["ID_a3"] == ("ID_a3", "ID_a2")  # st-2 outside the study -> center
    assert list(ids[neighbor_table(frame, 0)][:, 0]) == list(ids)


def test_dataset_stacks_neighbors_neighbor_major():
    from base_models.data import SliceDataset

    pixels = np.arange(4 * 2 * 3 * 3, dtype=np.uint8).reshape(4, 2, 3, 3)  # 4 slices, 2 windows
    rows = np.array([[0, 1, 2], [1, 1, 3]])
    x, y = SliceDataset(pixels, rows, np.ones((2, 6))).__getitems__([1, 0])
    assert x.shape == (2, 6, 3, 3) and x.dtype == torch.uint8
    np.testing.assert_array_equal(x[0].numpy(), np.concatenate([pixels[1], pixels[1], pixels[3]]))
    np.testing.assert_array_equal(x[1].numpy(), np.concatenate([pixels[0], pixels[1], pixels[2]]))
    assert y.shape == (2, 6)


# --- architectures: one shared test class over the registry ------------------------------------


def _arch_names():
    from base_models.archs import ARCHITECTURES

    return sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", _arch_names())
class TestArchitecture:
    def test_output_shape_for_several_sizes(self, arch):
        from base_models.archs import create_model

        model = create_model(arch, in_channels=9).eval()
        for size in (32, 48):
            with torch.no_grad():
                assert model(torch.randn(2, 9, size, size)).shape == (2, len(LABELS))

    def test_backward_reaches_every_parameter(self, arch):
        from base_models.archs import create_model
        from stackkit.metric import weighted_bce

        model = create_model(arch, in_channels=3)
        logits = model(torch.randn(3, 3, 32, 32))
        loss = weighted_bce(logits, torch.ones(3, 6), torch.tensor([1.0, 1, 1, 1, 1, 2]))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())

    def test_context_model_starts_as_the_center_slice_model(self, arch):
        """Neighbor weights start at zero: the output ignores the neighbors until they are trained,
        and gradients still reach them."""
        from base_models.archs import create_model
        from stackkit.metric import weighted_bce

        model = create_model(arch, in_channels=9, center_channels=(3, 6))
        model.init_weights()
        x = torch.randn(2, 9, 32, 32)
        other = x.clone()
        other[:, :3], other[:, 6:] = 0.0, 3.0
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), model(other))
        neighbor = model.neighbor_parameters()
        assert [tuple(p.shape[:2]) for p in neighbor] == [(neighbor[0].shape[0], 6)]
        loss = weighted_bce(model.train()(x), torch.ones(2, 6), torch.tensor([1.0, 1, 1, 1, 1, 2]))
        loss.backward()
        assert neighbor[0].grad is not None and neighbor[0].grad.abs().sum() > 0
        assert create_model(arch, in_channels=3).neighbor_parameters() == []

    def test_state_dict_round_trip_weights_only(self, arch, tmp_path):
        from base_models.archs import create_model
        import io

        from base_models.train import save_checkpoint
        from stackkit.contract.io import read_artifact

        def load_checkpoint(path):
            return torch.load(io.BytesIO(read_artifact(path, "retrain this fold")), weights_only=True)

        model = create_model(arch, in_channels=3).eval()
        path = save_checkpoint(model.state_dict(), tmp_path / "m.pt")
        clone = create_model(arch, in_channels=3).eval()
        clone.load_state_dict(load_checkpoint(path))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), clone(x))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte
        path.write_bytes(bytes(data))
        with pytest.raises(StackkitError, match="sha256 mismatch"):
            load_checkpoint(path)


@pytest.mark.parametrize("center", [(0, 9), (3, 3), (-1, 2), (6, 10)])
def test_context_conv_rejects_a_center_that_is_not_a_proper_part_of_the_input(center):
    from base_models.archs.base import ContextConv

    with pytest.raises(ValueError, match="proper sub-range"):
        ContextConv(9, 8, 3, 1, center)


def test_neighbor_weights_get_their_own_learning_rate():
    from base_models.archs import create_model
    from base_models.train import NEIGHBOR_LR_SCALE, optimizer_groups

    model = create_model("resnet_tiny", in_channels=9, center_channels=(3, 6))
    groups = optimizer_groups(model, 0.01)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.01 * NEIGHBOR_LR_SCALE)] and NEIGHBOR_LR_SCALE < 1
    assert groups[1]["params"] == model.neighbor_parameters()
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = optimizer_groups(create_model("resnet_tiny", in_channels=3), 0.01)
    assert len(plain) == 1 and len(plain[0]["params"]) == len(list(create_model("resnet_tiny", in_channels=3).parameters()))


def test_reverse_slices_swaps_neighbors_of_the_masked_samples_only():
    from base_models.train import reverse_slices

    # 2 samples, 3 slices x 2 windows; channel c of sample b holds 10 * b + c
    x = (torch.arange(2)[:, None] * 10 + torch.arange(6)[None, :]).reshape(2, 6, 1, 1).expand(2, 6, 2, 2)
    out = reverse_slices(x, 3, torch.tensor([True, False]))
    assert out[0, :, 0, 0].tolist() == [4, 5, 2, 3, 0, 1]  # st+k, st, st-k; windows keep their order
    assert out[1, :, 0, 0].tolist() == [10, 11, 12, 13, 14, 15]
    assert torch.equal(reverse_slices(x[:, :2], 1, torch.tensor([True, True])), x[:, :2])


def test_weighted_bce_is_the_competition_metric():
    from stackkit.metric import weighted_log_loss

    from stackkit.metric import weighted_bce

    rng = np.random.default_rng(0)
    y = (rng.random((50, 6)) < 0.3).astype(np.float32)
    logits = rng.normal(size=(50, 6)).astype(np.float32)
    loss = weighted_bce(torch.from_numpy(logits), torch.from_numpy(y), torch.tensor([1.0, 1, 1, 1, 1, 2]))
    assert float(loss) == pytest.approx(weighted_log_loss(y, 1 / (1 + np.exp(-logits))).overall, rel=1e-5)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="../x"), "--name"),
        (dict(arch="vgg99"), "unknown architecture"),
        (dict(context=3), "--context 3"),
        (dict(epochs=0), "--epochs 0"),
        (dict(batch_size=1), "--batch-size 1"),
        (dict(lr=-1.0), "--lr -1.0"),
        (dict(img_size=8), "--img-size 8"),
        (dict(workers=-1), "--workers -1"),
        (dict(windows=[(40, 0)]), "width > 0"),
        (dict(windows=["x"]), "center, width"),
        (dict(folds=[7]), "--folds 7"),
        (dict(device="tpu"), "--device 'tpu'"),
        (dict(device="cuda:0") if not torch.cuda.is_available() else dict(device="cuda:99"), "--device 'cuda"),
    ],
)
def test_bad_options_are_one_line_errors(small_dataset, tmp_path, kwargs, match):
    from base_models.train import train_base

    wd = fresh_workdir(small_dataset, tmp_path / "w")
    options = {"name": "m", **SMALL, **kwargs}
    with pytest.raises(StackkitError, match=match) as info:
        train_base(wd, **options)
    assert "\n" not in str(info.value)
    assert not wd.preds_root.exists()


def test_missing_core_files_and_path_column(tmp_path, small_dataset):
    from base_models.train import train_base

    with pytest.raises(StackkitError, match="data prepare"):
        train_base(Workdir(tmp_path / "empty"), name="m", **SMALL)
    wd = fresh_workdir(small_dataset, tmp_path / "w")
    rewrite_data_file(wd, wd.metadata, pd.read_parquet(wd.metadata).drop(columns="path"))
    with pytest.raises(StackkitError, match="no 'path' column"):
        train_base(wd, name="m", **SMALL)


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(small_dataset, tmp_path_factory):
    """Uninterrupted run, context 0 (the reference for the resume test); builds the pixel cache."""
    from base_models.train import train_base

    wd = fresh_workdir(small_dataset, tmp_path_factory.mktemp("trained"))
    summary = train_base(wd, name="plain", context=0, **SMALL)
    # later tests reuse the decoded pixels instead of decoding again
    import shutil

    if not small_dataset.cache_dir.exists():
        shutil.copytree(wd.cache_dir, small_dataset.cache_dir)
    return wd, summary


def test_oof_and_test_cover_every_image_once_with_its_fold(trained):
    wd, summary = trained
    metadata, labels, folds = load_core(wd)
    oof = read_oof(wd.oof("plain"), folds, wd)  # the contract validators
    test = read_test(wd.test("plain"), metadata, wd)
    raw_oof, raw_test = pd.read_parquet(wd.oof("plain")), pd.read_parquet(wd.test("plain"))
    assert list(raw_oof.columns) == ["image_id", "fold", *LABELS] and list(raw_test.columns) == ["image_id", *LABELS]
    assert all(raw_oof[c].dtype == np.float32 for c in LABELS) and raw_oof["fold"].dtype == np.int8
    assert sorted(oof["image_id"]) == sorted(folds["image_id"]) and oof["image_id"].is_unique
    merged = oof.merge(folds, on="image_id", suffixes=("", "_expected"))
    assert (merged["fold"] == merged["fold_expected"]).all()
    assert sorted(test["image_id"]) == sorted(metadata.loc[metadata["split"] == "test", "image_id"])
    assert summary.complete and set(summary.folds) == set(range(SMALL_FOLDS))


def test_model_json_records_provenance(trained):
    wd, summary = trained
    info = json.loads(wd.model_json("plain").read_text())
    _, _, folds = load_core(wd)
    assert info["source"] == "trained" and info["architecture"] == "resnet_tiny"
    assert info["folds_hash"] == folds_hash(folds["image_id"], folds["fold"])
    assert info["parameters"]["context"] == 0 and info["parameters"]["in_channels"] == 3
    assert info["contract_version"] == CONTRACT_VERSION and info["name"] == "plain"
    assert set(info["oof_logloss"]["per_label"]) == set(LABELS)  # the importer's form (issue 22): one model.json writer
    assert info["oof_logloss"]["overall"] == pytest.approx(summary.oof_logloss)
    for key in ("prior_logloss", "train_seconds", "train_images_per_second", "created", "torch_version", "device"):
        assert key in info
    for rel in info["checkpoints"].values():
        assert (wd.root / rel).is_file() and (wd.root / (rel + ".sha256")).is_file()


def test_embeddings_come_from_the_fold_model_that_did_not_train_on_the_image(trained):
    """oof.npy row i is fold model fold(i)'s pooled features of oof.parquet's row i: its head on them
    gives the OOF probability; each test_fold<k>.npy through fold model k's head averages to test.parquet."""
    import io

    from stackkit.contract.embeddings import read_model_embeddings
    from stackkit.contract.io import read_artifact

    wd, summary = trained
    info = json.loads(wd.model_json("plain").read_text())
    oof, test = pd.read_parquet(wd.oof("plain")), pd.read_parquet(wd.test("plain"))
    assert info["embedding_dim"] == 96  # resnet_tiny's last width
    assert info["embeddings"]["test"] == [f"embeddings/test_fold{k}.npy" for k in range(SMALL_FOLDS)]
    emb = read_model_embeddings(wd, "plain", info, n_oof=len(oof), n_test=len(test), n_folds=SMALL_FOLDS)
    assert emb.oof.dtype == np.float16 and emb.oof.shape == (len(oof), 96) and len(emb.test) == SMALL_FOLDS
    test_probs = []
    for k in range(SMALL_FOLDS):
        state = torch.load(io.BytesIO(read_artifact(wd.root / info["checkpoints"][str(k)])), weights_only=True)
        head = lambda e: torch.sigmoid(torch.from_numpy(np.asarray(e, dtype=np.float32)) @ state["head.weight"].T + state["head.bias"]).numpy()  # noqa: E731
        rows = np.flatnonzero(oof["fold"].to_numpy() == k)
        np.testing.assert_allclose(head(emb.oof[rows]), oof[list(LABELS)].to_numpy()[rows], atol=2e-3)
        test_probs.append(head(emb.test[k]))
    np.testing.assert_allclose(np.mean(test_probs, axis=0), test[list(LABELS)].to_numpy(), atol=2e-3)
    assert any("embeddings: dimension 96" in line for line in train_lines(summary, folds=True))


def test_test_fold_files_are_the_fold_models_test_predictions_and_average_to_test(trained):
    """Contract v3: one test_fold<k>.parquet per fold model, in test.parquet's row order, listed and
    hashed in model.json; their mean (probability space, float32) is test.parquet."""
    from stackkit.contract.validate import read_test_folds, verify_model_files

    wd, _ = trained
    metadata, _, _ = load_core(wd)
    info = json.loads(wd.model_json("plain").read_text())
    names = [f"test_fold{k}.parquet" for k in range(SMALL_FOLDS)]
    assert info["test_folds"] == names and set(info["sha256"]) >= set(names)
    assert [p.name for p in wd.test_fold_files("plain")] == names
    verify_model_files(wd, "plain")
    test = pd.read_parquet(wd.test("plain"))
    per_fold = read_test_folds(wd, "plain", metadata, SMALL_FOLDS)
    for k, frame in enumerate(per_fold):
        raw = pd.read_parquet(wd.test_fold("plain", k))
        assert list(raw.columns) == ["image_id", *LABELS] and all(raw[c].dtype == np.float32 for c in LABELS)
        assert raw["image_id"].tolist() == test["image_id"].tolist()
        pd.testing.assert_frame_equal(frame, raw)
        work = pd.read_parquet(wd.preds_dir("plain") / "_work" / f"fold{k}_test.parquet").set_index("image_id")
        np.testing.assert_array_equal(raw[list(LABELS)].to_numpy(), work.loc[raw["image_id"], list(LABELS)].to_numpy())
    mean = np.mean([f[list(LABELS)].to_numpy(np.float64) for f in per_fold], axis=0).astype(np.float32)
    np.testing.assert_array_equal(test[list(LABELS)].to_numpy(), mean)
    assert not np.allclose(per_fold[0][list(LABELS)].to_numpy(), per_fold[1][list(LABELS)].to_numpy())  # distinct fold models


def test_truncated_slice_is_reported_and_still_predicted(trained, small_dataset):
    wd, summary = trained
    victim = (small_dataset.root / "truncated.txt").read_text()
    info = json.loads(wd.model_json("plain").read_text())
    assert list(info["undecodable_images"]) == [victim]
    assert any(victim in line and "blank image" in line for line in train_lines(summary, folds=True))
    assert victim in set(pd.read_parquet(wd.oof("plain"))["image_id"])


def test_trained_model_beats_the_prior(trained):
    _, summary = trained
    assert summary.oof_logloss <= 0.85 * summary.prior_logloss, train_lines(summary, folds=True)


def test_context_model_is_at_least_as_good_as_no_context(trained, small_dataset, tmp_path):
    """Neighbor slices must not cost accuracy. (They do not beat context 0 on synthetic data,
    whose labels are decided by each slice's own pixels; see the README.)"""
    from base_models.train import train_base

    _, plain = trained
    wd = fresh_workdir(small_dataset, tmp_path / "w")
    with_context = train_base(wd, name="ctx1", context=1, embeddings=False, **SMALL)
    info = json.loads(wd.model_json("ctx1").read_text())
    assert info["embedding_dim"] is None and not wd.embeddings_dir("ctx1").exists()  # --no-embeddings
    assert info["parameters"]["in_channels"] == 9 and info["parameters"]["augment"] == "hflip+zflip"
    assert with_context.oof_logloss <= 0.85 * with_context.prior_logloss
    assert with_context.oof_logloss < 1.05 * plain.oof_logloss, (train_lines(with_context, folds=True), train_lines(plain, folds=True))


class _Interrupt(Exception):
    pass


def test_kill_and_resume_gives_the_uninterrupted_files(trained, small_dataset, tmp_path):
    from base_models.train import train_base

    reference, _ = trained
    wd = fresh_workdir(small_dataset, tmp_path / "w")

    def stop_after_first_fold(fold):
        raise _Interrupt(fold)

    with pytest.raises(_Interrupt):
        train_base(wd, name="plain", context=0, on_fold_done=stop_after_first_fold, **SMALL)
    assert not wd.oof("plain").exists() and (wd.preds_dir("plain") / "_work" / "fold0.json").is_file()

    # a partial run (one fold) writes only its work and says so
    partial = train_base(wd, name="plain", context=0, folds=[1], resume=True, **SMALL)
    assert not partial.complete and not wd.oof("plain").exists()
    assert wd.test_fold_files("plain") == []  # no per-fold test file before the set of K is complete
    assert any("partial" in line for line in train_lines(partial, folds=True))

    # resuming with different settings is refused rather than mixing two models
    with pytest.raises(StackkitError, match="different settings"):
        train_base(wd, name="plain", context=0, resume=True, **{**SMALL, "epochs": 1})

    trained_folds = []
    summary = train_base(wd, name="plain", context=0, resume=True, on_fold_done=trained_folds.append, **SMALL)
    assert trained_folds == [2] and summary.complete
    assert json.loads(wd.model_json("plain").read_text())["test_folds"] == [f"test_fold{k}.parquet" for k in range(SMALL_FOLDS)]
    for path in (reference.oof("plain"), reference.test("plain"), *[reference.test_fold("plain", k) for k in range(SMALL_FOLDS)]):
        target = wd.root / path.relative_to(reference.root)
        pd.testing.assert_frame_equal(pd.read_parquet(target), pd.read_parquet(path), rtol=0, atol=1e-6)
    for path in [reference.oof_embeddings("plain")] + [reference.test_embeddings("plain", k) for k in range(SMALL_FOLDS)]:
        target = wd.root / path.relative_to(reference.root)
        np.testing.assert_allclose(np.load(target).astype(np.float32), np.load(path).astype(np.float32), rtol=1e-2, atol=1e-3)
    assert len(list(wd.cache_dir.glob("*.npy"))) == 1  # the copied cache was reused, not rebuilt


def test_torchrun_two_cpu_processes(small_dataset, tmp_path):
    """The CLI under torchrun with 2 gloo processes: only rank 0 writes, outputs valid and complete."""
    wd = fresh_workdir(small_dataset, tmp_path / "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(REPO / "cli.py"), "base", "train", "--workdir", str(wd.root), "--name", "ddp", "--epochs", "2",
           "--img-size", "32", "--batch-size", "16", "--device", "cpu", "-q"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metadata, _, folds = load_core(wd)
    oof = read_oof(wd.oof("ddp"), folds, wd)
    test = read_test(wd.test("ddp"), metadata, wd)
    assert len(oof) == len(folds) and len(test) == int((metadata["split"] == "test").sum())
    info = json.loads(wd.model_json("ddp").read_text())
    assert info["world_size"] == 2 and info["oof_logloss"]["overall"] < info["prior_logloss"] * 1.2
    assert not list(wd.preds_dir("ddp").glob(".stackkit-tmp-*"))


def test_light_modules_do_not_import_torch_or_pydicom():
    code = ("import sys, base_models, base_models.pixels, base_models.cache, base_models.data, base_models.train; "
            "heavy = [m for m in ('torch', 'pydicom') if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
