"""Header reading: fast path == pydicom, real CT test files, corrupt files, the parallel scan."""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pytest

from stackkit.data import dicom
from stackkit.data.dicom import HEADER_COLUMNS, CorruptDicomError, read_header, scan_headers
from stackkit.testing import dicom as h

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from stackkit.data.dicom import quiet_rsna_ids


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom") / "data"
    h.small_dicom_dataset(out, patients=6, seed=1)
    return out


def _paths(root):
    return sorted(root.glob("stage_2_*/*.dcm"))


def _pydicom_truth(path) -> dict:
    with quiet_rsna_ids():
        ds = pydicom.dcmread(path, stop_before_pixels=True)

        def first(keyword):
            value = ds.get(keyword)
            if value is None or value == "":
                return math.nan
            return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)

        return dict(
            image_id=str(ds.SOPInstanceUID), patient_id=str(ds.PatientID), study_id=str(ds.StudyInstanceUID),
            series_id=str(ds.SeriesInstanceUID), z=float(ds.ImagePositionPatient[2]),
            slice_thickness=first("SliceThickness"), pixel_spacing=first("PixelSpacing"),
            window_center=first("WindowCenter"), window_width=first("WindowWidth"),
            rescale_slope=first("RescaleSlope"), rescale_intercept=first("RescaleIntercept"),
            rows=int(ds.Rows), columns=int(ds.Columns), path=str(path), modality=str(ds.Modality),
        )


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def test_header_matches_pydicom_for_every_synthetic_file(dataset):
    paths = _paths(dataset)
    assert len(paths) > 20
    for path in paths:
        header = read_header(path)
        assert list(header) == list(HEADER_COLUMNS)
        assert _same(header, _pydicom_truth(path)), path
        # and the pydicom fallback gives exactly the fast path's row
        assert dicom._validated_row(str(path), *dicom._parse_pydicom(str(path)), ("CT",)) == tuple(header.values())


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm"])
def test_real_files_from_pydicom(name):
    path = get_testdata_file(name, download=False)
    assert _same(read_header(path, modalities=("CT", "MR")), _pydicom_truth(path))


def test_real_ct_values():
    header = read_header(get_testdata_file("CT_small.dcm", download=False))
    assert header["z"] == pytest.approx(-75.699997)
    assert header["rows"] == header["columns"] == 128
    assert header["rescale_intercept"] == -1024.0 and header["pixel_spacing"] == pytest.approx(0.661468)


def test_multi_valued_window_gives_first_value(dataset, tmp_path):
    path = tmp_path / "multi.dcm"
    shutil.copy(h.first_train_file(dataset), path)

    def edit(ds):
        ds.WindowCenter, ds.WindowWidth = [50, 40], [120, 80]

    h._rewrite(path, edit)
    header = read_header(path)
    assert (header["window_center"], header["window_width"]) == (50.0, 120.0)


def test_fallback_path_is_silent_about_rsna_ids(dataset, tmp_path):
    path = tmp_path / "seq.dcm"
    shutil.copy(h.first_train_file(dataset), path)
    h.add_undefined_length_sequence(path)
    with pytest.raises(dicom._UseFallback):
        dicom._parse_fast(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the RSNA-id warning must be silenced locally
        header = read_header(path)
    assert _same(header, _pydicom_truth(path))


CORRUPTIONS = [
    (h.not_dicom, r"not a DICOM Part 10 file \(no 'DICM' preamble"),
    (h.empty_file, r"not a DICOM Part 10 file"),
    (h.strip_preamble, r"no 'DICM' preamble"),
    (h.truncate, r"pixel data has \d+ bytes, expected 512 .*truncated"),
    (lambda p: h.truncate(p, drop=400), r"pixel data has \d+ bytes, expected 512"),
    (lambda p: p.write_bytes(p.read_bytes()[:300]), r"truncated: the file ends at byte 300, inside the header"),
    (lambda p: p.write_bytes(p.read_bytes()[:140]), r"truncated: the file ends at byte 140, inside the header"),
    (h.delete_tag("ImagePositionPatient"), r"required tag ImagePositionPatient \(0020,0032\) is missing"),
    (h.delete_tag("SOPInstanceUID"), r"required tag SOPInstanceUID \(0008,0018\) is missing"),
    (h.delete_tag("StudyInstanceUID"), r"required tag StudyInstanceUID"),
    (h.delete_tag("PatientID"), r"required tag PatientID"),
    (h.delete_tag("Rows"), r"required tag Rows"),
    (h.delete_tag("PixelData"), r"no PixelData"),
    (h.non_numeric_position, r"ImagePositionPatient is not readable"),
]


@pytest.mark.parametrize("corrupt, match", CORRUPTIONS, ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_corrupt_files_raise_one_line_naming_the_file(dataset, tmp_path, corrupt, match):
    path = tmp_path / "broken.dcm"
    shutil.copy(h.first_train_file(dataset), path)
    corrupt(path)
    with pytest.raises(CorruptDicomError, match=match) as info:
        read_header(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert info.value.path == str(path)


def test_corrupt_truncated_file_also_caught_by_fallback(dataset, tmp_path):
    path = tmp_path / "t.dcm"
    shutil.copy(h.first_train_file(dataset), path)
    h.add_undefined_length_sequence(path)
    h.truncate(path)
    with pytest.raises(CorruptDicomError, match=r"pixel data has \d+ bytes, expected 512"):
        read_header(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_headers_keeps_order_and_reports_skipped(dataset, tmp_path, workers):
    root = h.copy_dataset(dataset, tmp_path / "copy")
    paths = _paths(root)
    h.truncate(paths[3])
    h.not_dicom(paths[-1])
    frame, skipped = scan_headers(paths, workers=workers, progress=False, chunk_size=16)
    assert list(frame.columns) == list(HEADER_COLUMNS)
    good = [str(p) for i, p in enumerate(paths) if i not in (3, len(paths) - 1)]
    assert frame["path"].tolist() == good
    assert [p for p, _ in skipped] == [str(paths[3]), str(paths[-1])]
    assert "truncated" in skipped[0][1] and "DICM" in skipped[1][1]
    assert frame["z"].dtype == np.float64 and frame["rows"].dtype == np.int32
    assert frame["image_id"].tolist() == [p.stem for p in map(__import__("pathlib").Path, good)]


def test_scan_headers_reads_no_pixel_data(dataset, monkeypatch):
    # pixel decoding goes through pydicom's pixel_array; the scan must never touch it
    import pydicom.dataset

    def forbidden(self):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(forbidden))
    frame, skipped = scan_headers(_paths(dataset), workers=1, progress=False)
    assert len(frame) == len(_paths(dataset)) and not skipped


def test_scan_headers_rejects_bad_workers(dataset):
    with pytest.raises(dicom.StackkitError, match="workers must be >= 1"):
        scan_headers(_paths(dataset), workers=0, progress=False)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(128, 900), st.integers(0, 255)), min_size=1, max_size=4),
    keep=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
def test_damaged_bytes_give_a_header_or_corrupt_dicom_error_never_a_crash(dataset, tmp_path, edits, keep):
    data = bytearray(h.first_train_file(dataset).read_bytes())
    for position, value in edits:
        data[position % len(data)] = value
    if keep is not None:
        data = data[: int(len(data) * keep)]
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the garbage it tolerates
        try:
            header = read_header(path)
        except CorruptDicomError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        else:
            assert set(header) == set(HEADER_COLUMNS) and math.isfinite(header["z"])
