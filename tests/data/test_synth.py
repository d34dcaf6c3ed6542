"""The synthetic RSNA dataset: real DICOM files, RSNA long CSV, determinism, label structure."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS
from stackkit.errors import StackkitError
from stackkit.data.synth import HELD_OUT_CSV, TEST_DIR, TRAIN_CSV, TRAIN_DIR, _annotate, _draw_study, synthesize
from stackkit.data.dicom import quiet_rsna_ids

pydicom = pytest.importorskip("pydicom")
# RSNA ids (ID_xxx) are not valid UIDs; pydicom warns whenever it converts one.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

REQUIRED_TAGS = (
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "WindowCenter", "WindowWidth", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PhotometricInterpretation", "SamplesPerPixel",
    "RescaleIntercept", "RescaleSlope", "InstanceNumber",
)


def _read(path):
    with quiet_rsna_ids():
        return pydicom.dcmread(path)


def hounsfield(ds) -> np.ndarray:
    """HU with the documented fix for the RSNA 12-bit quirk (see stackkit.data.synth docstring)."""
    x = ds.pixel_array.astype(np.int32)
    if ds.PixelRepresentation == 0 and ds.BitsStored == 12 and float(ds.RescaleIntercept) > -100:
        x[x >= 2048] -= 4096
    return x * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synthesize(out, patients=10, size=32, slices=(10, 16), seed=3, progress=False)
    records = []
    for split, folder in (("train", TRAIN_DIR), ("test", TEST_DIR)):
        for path in sorted((out / folder).glob("*.dcm")):
            ds = _read(path)
            records.append(
                dict(path=path, split=split, ds=ds, image_id=ds.SOPInstanceUID, study=ds.StudyInstanceUID,
                     patient=ds.PatientID, z=float(ds.ImagePositionPatient[2]))
            )
    return out, summary, pd.DataFrame(records)


def _wide_labels(out, name=TRAIN_CSV) -> pd.DataFrame:
    long = pd.read_csv(out / name)
    parts = long["ID"].str.extract(r"^(ID_[0-9a-f]+)_(\w+)$")
    long["image_id"], long["label"] = parts[0], parts[1]
    return long.pivot(index="image_id", columns="label", values="Label")[list(LABELS)]


def test_every_file_is_a_readable_ct_with_the_rsna_tags(dataset):
    out, summary, files = dataset
    assert len(files) == summary.train_images + summary.test_images
    assert (files["split"] == "train").sum() == summary.train_images
    for record in files.itertuples():
        ds = record.ds
        assert ds.preamble is not None and ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
        missing = [tag for tag in REQUIRED_TAGS if tag not in ds]
        assert not missing, (record.path, missing)
        assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert record.path.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.SOPInstanceUID.startswith("ID_") and len(ds.SOPInstanceUID) == 12
        assert ds.StudyInstanceUID.startswith("ID_") and ds.PatientID.startswith("ID_")
        assert ds.pixel_array.shape == (32, 32) == (ds.Rows, ds.Columns)
    # both transfer syntaxes, several studies per patient sometimes, multi-valued windows sometimes
    syntaxes = {r.ds.file_meta.TransferSyntaxUID for r in files.itertuples()}
    assert syntaxes == {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
    assert any(isinstance(r.ds.WindowCenter, pydicom.multival.MultiValue) for r in files.itertuples())
    # train/test split by patient
    assert not set(files.loc[files.split == "train", "patient"]) & set(files.loc[files.split == "test", "patient"])


def test_csv_is_rsna_long_format_six_rows_per_train_image_in_label_order(dataset):
    out, _, files = dataset
    long = pd.read_csv(out / TRAIN_CSV)
    assert list(long.columns) == ["ID", "Label"]
    train_ids = sorted(files.loc[files.split == "train", "image_id"])
    assert len(long) == 6 * len(train_ids)
    suffixes = long["ID"].str.rsplit("_", n=1).str[1].to_numpy().reshape(-1, 6)
    assert (suffixes == np.array(LABELS)).all()
    assert sorted(long["ID"].str.rsplit("_", n=1).str[0].unique()) == train_ids
    assert set(long["Label"].unique()) <= {0, 1}
    wide = _wide_labels(out)
    assert (wide["any"] == wide[list(LABELS[:5])].max(axis=1)).all()


def test_labels_contiguous_along_z_and_prevalence_plausible(dataset):
    out, summary, files = dataset
    wide = _wide_labels(out)
    train = files[files.split == "train"].join(wide, on="image_id").sort_values(["study", "z", "image_id"])
    for _, study in train.groupby("study"):
        for label in LABELS[:5]:
            positive = np.flatnonzero(study[label].to_numpy())
            if len(positive):
                assert positive[-1] - positive[0] + 1 == len(positive), (study["study"].iloc[0], label)
    assert 0.1 < summary.prevalence["any"] < 0.6


def test_test_split_labels_are_held_back_in_their_own_file(dataset):
    out, summary, files = dataset
    held = _wide_labels(out, HELD_OUT_CSV)
    assert summary.held_out_labels_csv == out / HELD_OUT_CSV
    assert sorted(held.index) == sorted(files.loc[files.split == "test", "image_id"])
    assert not set(held.index) & set(_wide_labels(out).index)
    assert (held["any"] == held[list(LABELS[:5])].max(axis=1)).all()


def test_annotation_rule_edge_slice_positive_only_next_to_a_visible_one():
    # one lesion's peak blood fraction per slice (z order), broadcast to 2x2 pixels
    profile = np.array([0.0, 0.01, 0.03, 0.1, 0.5, 0.8, 0.5, 0.1, 0.03, 0.0], dtype=np.float32)
    labels = _annotate(np.broadcast_to(profile[:, None, None], (len(profile), 2, 2)))
    # 0.1 next to 0.5: read from the neighbour; 0.03 next to 0.1 only: nobody saw it; 0.01: below EDGE_WEIGHT
    assert labels.astype(int).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    assert _annotate(np.full((1, 2, 2), 0.1, np.float32)).tolist() == [False]  # a faint lesion nobody saw


def test_faint_edge_slices_are_positive_though_their_own_pixels_show_little():
    """Partial volume: the same study drawn with and without its bleeds (same seed, so the same
    anatomy and noise) gives each slice's blood excess in HU. Some positive slices gain less than
    the 5 HU noise, and each lies next to a positive slice where the bleed is plain."""
    u = np.linspace(-0.9, 0.9, 24)
    faint, positives = 0, 0
    for seed in range(30):
        bleed, labels = _draw_study(u, 32, np.random.default_rng(seed), True)
        healthy, no_labels = _draw_study(u, 32, np.random.default_rng(seed), False)
        assert not no_labels.any()
        excess = np.abs(bleed - healthy).max(axis=(1, 2))
        positive = labels[:, -1] == 1
        positives += int(positive.sum())
        for k in np.flatnonzero(positive & (excess < 5.0)):
            faint += 1
            neighbours = [excess[j] for j in (k - 1, k + 1) if 0 <= j < len(u) and positive[j]]
            assert neighbours and max(neighbours) > 3 * 5.0, (seed, k, excess[max(k - 2, 0):k + 3])
    assert faint >= 5 and positives > 200


def test_hemorrhage_is_blood_density_and_quirk_files_decode_to_hu(dataset):
    out, _, files = dataset
    wide = _wide_labels(out)
    quirks = 0
    for record in files.itertuples():
        ds = record.ds
        hu = hounsfield(ds)
        # air, brain and skull where they belong, whatever the storage
        assert hu[0, 0] <= -990 and -1024 <= hu.min() and hu.max() <= 1400
        assert -20 < np.median(hu[14:18, 14:18]) < 100  # soft tissue at the centre
        if ds.RescaleIntercept == 0:
            quirks += 1
            # the quirk: without the fix, air reads as +3096
            assert ds.PixelRepresentation == 0 and ds.BitsStored == 12
            naive = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
            assert naive[0, 0] == 3096
            # the Kaggle variant of the fix agrees
            kaggle = ds.pixel_array.astype(np.int32) + 1000
            kaggle[kaggle >= 4096] -= 4096
            np.testing.assert_array_equal(kaggle - 1000, hu)
        else:
            np.testing.assert_array_equal(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), hu)
    assert 0 < quirks < 0.3 * len(files)
    # positives have more blood-density pixels (50..95 HU) than negatives
    train = files[files.split == "train"].join(wide, on="image_id")
    blood = train["ds"].map(lambda ds: int(((hounsfield(ds) > 52) & (hounsfield(ds) < 95)).sum()))
    assert blood[train["any"] == 1].mean() > 2 * blood[train["any"] == 0].mean()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = synthesize(tmp_path / "a", patients=3, size=16, slices=(3, 5), seed=7, progress=False)
    b = synthesize(tmp_path / "b", patients=3, size=16, slices=(3, 5), seed=7, progress=False)
    c = synthesize(tmp_path / "c", patients=3, size=16, slices=(3, 5), seed=8, progress=False)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert a.digest == b.digest != c.digest
    assert files(tmp_path / "a").keys() != files(tmp_path / "c").keys()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patients=1), "at least 2"),
        (dict(size=8), "out of range"),
        (dict(slices=(5, 2)), "MIN <= MAX"),
        (dict(slices=("a", 2)), "two integers"),
        (dict(test_fraction=1.0), r"\[0, 1\)"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(StackkitError, match=match):
        synthesize(tmp_path / "x", **{**dict(patients=3, size=16, slices=(2, 3), progress=False), **kwargs})


def test_refuses_to_mix_with_an_existing_dataset(tmp_path):
    synthesize(tmp_path, patients=2, size=16, slices=(2, 2), progress=False)
    before = sorted(p.name for p in (tmp_path / TRAIN_DIR).iterdir())
    with pytest.raises(StackkitError, match="already contains .dcm files"):
        synthesize(tmp_path, patients=2, size=16, slices=(2, 2), seed=1, progress=False)
    assert sorted(p.name for p in (tmp_path / TRAIN_DIR).iterdir()) == before


def test_cli_writes_into_the_work_directory_by_default(tmp_path):
    from click.testing import CliRunner

    from stackkit.cli import cli

    result = CliRunner().invoke(cli, ["data", "synth", "--workdir", str(tmp_path / "w"), "--patients", "3", "--size", "16",
                                      "--slices", "3,4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "w" / "dicom").iterdir()) == sorted([TEST_DIR, TRAIN_CSV, TRAIN_DIR, HELD_OUT_CSV])
