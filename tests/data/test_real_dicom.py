"""`data prepare`'s DICOM reading on pydicom's real scanner files: read correctly, or refused with one line.

Many of pydicom's files are not patient images (no PatientID or ImagePositionPatient): those are
tested through copies with the required tags added (``real_dicom_copy``), their pixel data and
transfer syntax untouched.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from stackkit.cli import cli
from stackkit.contract import LABELS, Workdir
from stackkit.data.decoding import decode_problem
from stackkit.data.dicom import CorruptDicomError, quiet_rsna_ids, read_header
from stackkit.testing.dicom import real_dicom_copy, truncate

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from base_models.pixels import dicom_to_hu  # noqa: E402

COMPRESSED_MR = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]


def real(name: str) -> str:
    return get_testdata_file(name, download=False)


def hu_of(path) -> np.ndarray:
    with quiet_rsna_ids():
        return dicom_to_hu(pydicom.dcmread(path))


def pixels_of(path) -> np.ndarray:
    with quiet_rsna_ids():
        return pydicom.dcmread(path).pixel_array


def test_compressed_mr_files_read_through_data_prepare_equal_the_native_file(tmp_path):
    """With --modality MR, RLE, lossless JPEG 2000 and JPEG-LS MR_small decode to MR_small's values exactly."""
    train, test = tmp_path / "train", tmp_path / "test"
    names = ["MR_small.dcm", *COMPRESSED_MR]
    for k, name in enumerate(names):
        real_dicom_copy(name, train / name, index=k + 1)
    real_dicom_copy("MR_small_implicit.dcm", test / "implicit.dcm", index=9)
    labels = pd.DataFrame({"image_id": [f"1.2.3.{k + 1}.1" for k in range(len(names))], **{label: [0, 1, 0, 1] for label in LABELS}})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    args = ["data", "prepare", "--workdir", str(tmp_path / "work"), "--dicom-dir", str(train), "--test-dicom-dir", str(test),
            "--labels", str(tmp_path / "labels.csv"), "--folds", "2", "-q"]

    refused = CliRunner().invoke(cli, args)  # default: CT only, every MR file skipped with its reason
    assert refused.exit_code == 2
    for name in names:
        assert f"warning: skipped unreadable DICOM {train / name}: Modality MR, not CT" in refused.output
    assert refused.output.strip().splitlines()[-1].startswith("Error: ")

    result = CliRunner().invoke(cli, [*args, "--modality", "MR"])
    assert result.exit_code == 0, result.output
    metadata = pd.read_parquet(Workdir(tmp_path / "work").metadata)
    assert set(metadata["modality"]) == {"MR"} and len(metadata) == 5
    reference = hu_of(real("MR_small.dcm"))
    assert np.ptp(reference) > 1000  # a real image, not a blank one
    for path in metadata["path"]:
        np.testing.assert_array_equal(hu_of(path), reference, err_msg=path)


def test_lossy_jpeg2000_head_ct_decodes_to_plausible_hounsfield_units():
    """CQ500's 693_J2KI (lossy JPEG 2000 head CT) is read by default and gives CT numbers of a head."""
    header = read_header(real("693_J2KI.dcm"))
    assert header["modality"] == "CT" and (header["rows"], header["columns"]) == (512, 512)
    hu = hu_of(real("693_J2KI.dcm"))
    rows, cols = np.mgrid[: hu.shape[0], : hu.shape[1]]
    field = (rows - 256) ** 2 + (cols - 256) ** 2 < 230**2  # the scanner's field of view (outside: padding)
    low, median, high = np.percentile(hu[field], [1, 50, 99])
    assert -1150 < low < -900  # air
    assert -1000 < median < 100 and 300 < high < 3100  # head: air, soft tissue, bone; nothing beyond dense bone
    assert ((hu[field] > 0) & (hu[field] < 80)).mean() > 0.15  # brain and soft tissue in the 0..80 HU window


@pytest.mark.parametrize("name, reference", [("image_dfl.dcm", "image_dfl.dcm"), ("rtdose_rle_1frame.dcm", "rtdose_1frame.dcm")])
def test_deflated_and_rle_files_are_read(tmp_path, name, reference):
    path = real_dicom_copy(name, tmp_path / name)
    with quiet_rsna_ids():
        modality = pydicom.dcmread(path).Modality
    header = read_header(path, modalities=(modality,))
    assert (header["rows"], header["columns"]) == pixels_of(real(reference)).shape
    np.testing.assert_array_equal(pixels_of(path), pixels_of(real(reference)))


def _edited(name, **tags):
    return lambda tmp_path: str(real_dicom_copy(name, tmp_path / name, **tags))


def _truncated(name, drop):
    def make(tmp_path):
        path = real_dicom_copy(name, tmp_path / name)
        truncate(path, drop)
        return str(path)

    return make


REFUSED = [
    ("rtdose-multi-frame", lambda _: real("rtdose.dcm"), ("CT",), r"multi-frame file \(NumberOfFrames 15\)"),
    ("rtdose-multi-frame-opted-in", lambda _: real("rtdose.dcm"), ("RTDOSE",), r"multi-frame file \(NumberOfFrames 15\)"),
    ("mr-by-default", lambda _: real("MR_small.dcm"), ("CT",), r"Modality MR, not CT: .*pass --modality CT,MR"),
    ("jpeg-ls-mr-by-default", lambda _: real("MR_small_jpeg_ls_lossless.dcm"), ("CT",), r"Modality MR, not CT"),
    ("truncated-native", lambda _: real("MR_truncated.dcm"), ("MR",), r"pixel data has 8130 bytes, expected 8192 .*truncated"),
    ("truncated-jpeg2000", _truncated("MR_small_jp2klossless.dcm", 300), ("MR",), r"truncated: the file ends inside an element of undefined length"),
    ("truncated-rle", _truncated("MR_small_RLE.dcm", 500), ("MR",), r"truncated: the file ends inside"),
    ("rgb-rle", _edited("SC_rgb_rle.dcm"), ("OT",), r"SamplesPerPixel 3 \(a colour image\)"),
    ("rgb-jpeg-baseline", _edited("SC_rgb_jpeg_dcmtk.dcm"), ("OT",), r"SamplesPerPixel 3"),
    ("rgb-native", _edited("SC_rgb_small_odd.dcm"), ("OT",), r"SamplesPerPixel 3"),
    ("no-modality", _edited("CT_small.dcm", Modality=""), ("CT",), r"Modality \(0008,0060\) is missing or empty"),
    ("not-a-patient-image", lambda _: real("image_dfl.dcm"), ("OT",), r"required tag PatientID \(0010,0020\) is missing"),
]


@pytest.mark.parametrize("make, modalities, match", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_real_files_refused_with_one_line_naming_the_file(tmp_path, make, modalities, match):
    path = make(tmp_path)
    with pytest.raises(CorruptDicomError, match=match) as info:
        read_header(path, modalities=modalities)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_jpeg_decoders_not_installed_refuse_the_file_instead_of_a_blank_image(tmp_path):
    """JPEG lossless and 12-bit JPEG extended need python-gdcm (the `gdcm` extra); without it: refused."""
    lossless = real("SC_rgb_jpeg_gdcm.dcm")  # JPEG lossless SV1, RGB 100 x 100
    extended = real_dicom_copy("JPGExtended.dcm", tmp_path / "ext.dcm")  # 12-bit JPEG extended NM
    problem = decode_problem(lossless, {"Rows": 100, "Columns": 100}, "1.2.840.10008.1.2.4.70")
    if importlib.util.find_spec("gdcm") is None:
        assert problem.startswith("no decoder installed for JPEG Lossless") and "gdcm" in problem
        with pytest.raises(CorruptDicomError, match=r"cannot decode the JPEG Extended .*12-bit.*stackkit\[gdcm\]"):
            read_header(extended, modalities=("NM",))
    else:  # decoded: an RGB image is not a (Rows, Columns) slice
        assert problem.startswith("decoded JPEG Lossless") and "(100, 100, 3)" in problem
        assert read_header(extended, modalities=("NM",))["modality"] == "NM"


def test_12bit_repair_only_for_ct_with_the_rsna_signature(tmp_path):
    """examples_overlay is a real 12-bit unsigned MR file without RescaleIntercept: its values are kept."""
    mr = real("examples_overlay.dcm")
    stored = pixels_of(mr).astype(np.float32)
    np.testing.assert_array_equal(hu_of(mr), stored)
    as_ct = real_dicom_copy("examples_overlay.dcm", tmp_path / "ct.dcm", Modality="CT")  # still no intercept
    np.testing.assert_array_equal(hu_of(as_ct), stored)
    rsna = real_dicom_copy("examples_overlay.dcm", tmp_path / "rsna.dcm", Modality="CT", RescaleIntercept=0, RescaleSlope=1)
    repaired = hu_of(rsna)  # the RSNA signature: shifted by 1000 modulo 4096, intercept -1000
    expected = np.where(stored + 1000 >= 4096, stored + 1000 - 4096, stored + 1000) - 1000
    np.testing.assert_array_equal(repaired, expected)


def test_grayscale_jpeg_baseline_is_decoded_by_pillow(tmp_path):
    """pydicom's JPEG baseline files are all colour: a grayscale one is made here from CT_small's pixels
    with Pillow (the declared decoder) and must decode to exactly what Pillow decodes from its bytes."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    path = real_dicom_copy("CT_small.dcm", tmp_path / "jpeg.dcm")
    stored = pixels_of(real("CT_small.dcm")).astype(np.float64)
    gray = np.rint(255 * (stored - stored.min()) / np.ptp(stored)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=90)
    with quiet_rsna_ids():
        ds = pydicom.dcmread(path)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    assert read_header(path)["modality"] == "CT"
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    np.testing.assert_array_equal(pixels_of(path), expected)
    assert np.abs(expected.astype(int) - gray).mean() < 3  # and that is the image, lossy but close
    data = buffer.getvalue()
    with quiet_rsna_ids():
        ds.PixelData = encapsulate([data[: len(data) // 3]])  # the codestream cut short, the file itself whole
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CorruptDicomError, match=r"cannot decode the JPEG Baseline"):
        read_header(path)
