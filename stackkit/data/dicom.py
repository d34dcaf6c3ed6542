"""DICOM header reading: the thin front door between DICOM folders and ``data/metadata.parquet``.

``read_header(path)`` returns the contract's metadata columns of one file without decoding
pixels; ``scan_headers(paths)`` does it for many files over all cores.

Speed: a folder of the RSNA 2019 data holds 100,000s of small files and ``pydicom.dcmread``
costs about a millisecond each even with ``stop_before_pixels``. The fast path below parses
the few tags it needs with ``struct`` straight from the first few kilobytes of the file, for
the two uncompressed little-endian transfer syntaxes the data uses (Implicit VR, as RSNA, and
Explicit VR). Anything it does not handle (big endian, deflated, sequences of undefined
length, a malformed element) falls back to ``pydicom.dcmread`` so both paths give the same
answer; the tests compare them file by file.

Every problem with a file raises :class:`CorruptDicomError` naming the file and the reason:
not a DICOM Part 10 file (no ``DICM`` preamble; we never ``force`` a read), a required tag
missing or not numeric, a file cut short, or what ``stackkit.data.decoding`` refuses (another
modality, multi-frame, colour, native pixel data shorter than Rows x Columns x BitsAllocated/8,
compressed pixel data that no installed decoder reads).
"""

from __future__ import annotations

import functools
import math
import os
import struct
import warnings

from stackkit.contract import METADATA_OPTIONAL
from stackkit.data.decoding import (  # quiet_rsna_ids: also this module's name for it (tests import it from here)
    DEFAULT_MODALITIES, check_image_kind, decode_problem, is_encapsulated, native_length_problem, quiet_rsna_ids,
)
from stackkit.errors import StackkitError, one_line


class CorruptDicomError(StackkitError):
    """A DICOM file that cannot be used: ``str(exc)`` names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


# Metadata columns read from each file's header, in this order: the contract's metadata columns
# (its `split` comes from the folder, not the header), series_id right after the study.
HEADER_COLUMNS = ("image_id", "patient_id", "study_id", "series_id", "z") + tuple(
    c for c in METADATA_OPTIONAL if c != "series_id"
)

# tag -> (keyword, kind); kind says how to decode the value.
_TAGS = {
    0x00080018: ("SOPInstanceUID", "str"),
    0x00100020: ("PatientID", "str"),
    0x0020000D: ("StudyInstanceUID", "str"),
    0x0020000E: ("SeriesInstanceUID", "str"),
    0x00200032: ("ImagePositionPatient", "ds_all"),
    0x00180050: ("SliceThickness", "ds"),
    0x00280030: ("PixelSpacing", "ds"),
    0x00281050: ("WindowCenter", "ds"),
    0x00281051: ("WindowWidth", "ds"),
    0x00281052: ("RescaleIntercept", "ds"),
    0x00281053: ("RescaleSlope", "ds"),
    0x00280010: ("Rows", "us"),
    0x00280011: ("Columns", "us"),
    0x00280100: ("BitsAllocated", "us"),
    0x00280002: ("SamplesPerPixel", "us"),
    0x00280008: ("NumberOfFrames", "is"),
    0x00080060: ("Modality", "str"),
    0x00280101: ("BitsStored", "us"),
    0x00280103: ("PixelRepresentation", "us"),
}
_KEYWORDS = [keyword for keyword, _ in _TAGS.values()]
_PIXEL_DATA = 0x7FE00010
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Explicit VR elements whose length field is 4 bytes (after 2 reserved bytes).
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_BLOCK = 8192


class _UseFallback(Exception):
    """The fast parser does not handle this file; pydicom will."""


# --- fast path -------------------------------------------------------------------------------


# struct readers of the fast path, bound once (the loop below calls them per element)
_UNPACK_TAG_LEN = struct.Struct("<HHI").unpack_from
_UNPACK_EXPLICIT = struct.Struct("<HH2sH").unpack_from
_UNPACK_U32 = struct.Struct("<I").unpack_from


def _file_meta(window) -> tuple[int, bool, str]:
    """(offset of the data set, explicit VR?, transfer syntax UID) from the file meta group (0002), which
    is always explicit VR little endian; a syntax the fast path does not read falls back to pydicom."""
    pos, syntax = 132, None
    while True:
        group, element, vr, short_len = _UNPACK_EXPLICIT(window(pos, 8))
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            length = _UNPACK_U32(window(pos + 8, 4))[0]
            pos += 12
        else:
            length, pos = short_len, pos + 8
        if length == _UNDEFINED:
            raise _UseFallback("undefined length in file meta")
        if element == 0x0010:
            syntax = window(pos, length).rstrip(b"\x00 ").decode("ascii", "replace")
        pos += length
    if syntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
        raise _UseFallback(f"transfer syntax {syntax}")
    return pos, syntax == _EXPLICIT_LE, syntax


def _parse_fast(path: str) -> tuple[dict, str, int | None]:
    """(raw values by keyword, transfer syntax UID, bytes of pixel data in the file or None without PixelData)."""
    # local names: the element loop is the hot path of `data prepare`
    unpack_tag_len, unpack_explicit, unpack_u32 = _UNPACK_TAG_LEN, _UNPACK_EXPLICIT, _UNPACK_U32
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        buf = handle.read(_BLOCK)
        base = 0  # file offset of buf[0]

        def window(offset: int, length: int) -> bytes:
            nonlocal buf, base
            start = offset - base
            if start < 0 or start + length > len(buf):
                handle.seek(offset)
                buf = handle.read(max(length, _BLOCK))
                base = offset
                start = 0
                if len(buf) < length:
                    raise CorruptDicomError(path, f"truncated: the file ends at byte {size}, inside the header")
            return buf[start : start + length]

        if len(buf) < 132 or buf[128:132] != b"DICM":
            raise CorruptDicomError(path, "not a DICOM Part 10 file (no 'DICM' preamble at byte 128)")
        pos, explicit, syntax = _file_meta(window)
        raw: dict = {}
        while pos + 8 <= size:
            head = window(pos, 8)
            if explicit:
                group, element, vr, short_len = unpack_explicit(head)
                if vr in _LONG_VRS:
                    length = unpack_u32(window(pos + 8, 4))[0]
                    pos += 12
                elif vr.isalpha() and vr.isupper():
                    length, pos = short_len, pos + 8
                else:
                    raise _UseFallback("bad explicit VR")
            else:
                group, element, length = unpack_tag_len(head)
                pos += 8
            tag = (group << 16) | element
            if tag == _PIXEL_DATA:
                if length == _UNDEFINED:
                    raise _UseFallback("encapsulated pixel data in a native transfer syntax")
                return raw, syntax, max(min(length, size - pos), 0)
            if length == _UNDEFINED:
                raise _UseFallback("sequence or item of undefined length")
            if tag in _TAGS:
                keyword, kind = _TAGS[tag]
                raw[keyword] = (kind, window(pos, length))
            elif tag > _PIXEL_DATA:
                break
            pos += length
        else:
            if pos != size:
                raise CorruptDicomError(path, f"truncated: the file ends at byte {size}, inside the header")
        return raw, syntax, None


def _decode_fast(kind: str, value: bytes):
    if kind == "us":
        return struct.unpack_from("<H", value)[0] if len(value) >= 2 else None
    text = value.decode("latin-1").strip(" \x00")
    if kind == "str":
        return text
    if not text:
        return None
    if kind == "ds_all":
        return [float(part) for part in text.split("\\")]
    if kind == "is":
        return int(float(text.split("\\")[0]))
    return float(text.split("\\")[0])


# --- pydicom fallback ------------------------------------------------------------------------


def _first(value):
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


_STRINGS = ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
_INTEGERS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames", "BitsStored", "PixelRepresentation")


def _pydicom_values(ds) -> dict:
    values = {}
    for keyword in _KEYWORDS:
        elem = ds.get(keyword)
        if elem is None or elem == "":
            continue
        if keyword == "ImagePositionPatient":
            values[keyword] = [float(v) for v in elem]
        elif keyword in _STRINGS:
            values[keyword] = str(elem).strip(" \x00")
        elif keyword in _INTEGERS:
            values[keyword] = int(_first(elem))
        else:
            first = _first(elem)
            values[keyword] = None if first in (None, "") else float(first)
    return values


def _pixel_bytes(ds, syntax, size: int) -> int | None:
    """Bytes of pixel data the file holds (after inflating a deflated data set); None without PixelData."""
    if "PixelData" not in ds:
        return None
    raw = ds.get_item("PixelData")
    offset = getattr(raw, "value_tell", None)
    length = getattr(raw, "length", None)
    if (syntax is not None and syntax.is_deflated) or offset is None or length is None:
        return len(ds.PixelData)  # deflated (offsets are in the inflated stream) or already in memory
    return max(min(length, size - offset), 0)


_CUT_SHORT = "End of file reached before delimiter"


def _read_whole(path: str, **kwargs):
    """``pydicom.dcmread(path, **kwargs)``, refusing a file cut inside an item of undefined length
    (compressed pixel data, a sequence): pydicom then warns and returns an empty data set instead of raising."""
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, **kwargs)
    for warning in caught:
        if _CUT_SHORT in str(warning.message):
            raise CorruptDicomError(path, "truncated: the file ends inside an element of undefined length (e.g. compressed pixel data)")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return ds


def _parse_pydicom(path: str) -> tuple[dict, str | None, int | None]:
    from pydicom.errors import InvalidDicomError

    size = os.path.getsize(path)
    try:
        with quiet_rsna_ids():
            # defer_size: large values (pixel data) stay on disk; we only need their position.
            ds = _read_whole(path, defer_size=1024, force=False)
            syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            return _pydicom_values(ds), (str(syntax) if syntax else None), _pixel_bytes(ds, syntax, size)
    except CorruptDicomError:
        raise
    except InvalidDicomError as exc:
        raise CorruptDicomError(path, f"not a DICOM Part 10 file ({_short(exc)})") from None
    except (ValueError, TypeError) as exc:
        raise CorruptDicomError(path, f"unreadable tag value ({_short(exc)})") from None
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside pydicom's parser means a damaged file
        raise CorruptDicomError(path, f"unreadable DICOM ({type(exc).__name__}: {_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return one_line(exc)


# --- one file --------------------------------------------------------------------------------


def _header_row(path: str, modalities=DEFAULT_MODALITIES) -> tuple:
    try:
        try:
            raw, syntax, available = _parse_fast(path)
        except _UseFallback:
            values, syntax, available = _parse_pydicom(path)
        else:
            try:
                values = {keyword: _decode_fast(kind, value) for keyword, (kind, value) in raw.items()}
            except (ValueError, struct.error) as exc:
                bad = next((k for k, (kind, v) in raw.items() if not _decodes(kind, v)), "a tag")
                raise CorruptDicomError(path, f"{bad} is not readable ({_short(exc)})") from None
    except OSError as exc:
        raise CorruptDicomError(path, f"cannot read the file ({exc.strerror or exc})") from None
    return _validated_row(path, values, syntax, available, modalities)


def _decodes(kind, value) -> bool:
    try:
        _decode_fast(kind, value)
        return True
    except (ValueError, struct.error):
        return False


_REQUIRED = (
    ("SOPInstanceUID", "(0008,0018)"),
    ("PatientID", "(0010,0020)"),
    ("StudyInstanceUID", "(0020,000D)"),
    ("ImagePositionPatient", "(0020,0032)"),
    ("Rows", "(0028,0010)"),
    ("Columns", "(0028,0011)"),
    ("BitsAllocated", "(0028,0100)"),
)


def _validated_row(path: str, values: dict, syntax: str | None, available: int | None, modalities) -> tuple:
    for keyword, tag in _REQUIRED:
        if values.get(keyword) in (None, ""):
            raise CorruptDicomError(path, f"required tag {keyword} {tag} is missing or empty")
    position = values["ImagePositionPatient"]
    if len(position) != 3 or not all(math.isfinite(v) for v in position):
        raise CorruptDicomError(path, f"ImagePositionPatient (0020,0032) must hold 3 finite numbers, found {position}")
    if available is None:
        raise CorruptDicomError(path, "no PixelData (7FE0,0010) element")
    problem = check_image_kind(values, modalities)
    if problem is None:
        # a compressed length says nothing about the image size: decode it instead
        problem = decode_problem(path, values, syntax) if is_encapsulated(syntax) else native_length_problem(values, available)
    if problem is not None:
        raise CorruptDicomError(path, problem)
    return (
        values["SOPInstanceUID"],
        values["PatientID"],
        values["StudyInstanceUID"],
        values.get("SeriesInstanceUID") or None,
        float(position[2]),
        _float(values.get("SliceThickness")),
        _float(values.get("PixelSpacing")),
        _float(values.get("WindowCenter")),
        _float(values.get("WindowWidth")),
        _float(values.get("RescaleSlope")),
        _float(values.get("RescaleIntercept")),
        int(values["Rows"]),
        int(values["Columns"]),
        path,
        values["Modality"].upper(),
    )


def _float(value) -> float:
    return math.nan if value is None else float(value)


def read_header(path, modalities=DEFAULT_MODALITIES) -> dict:
    """The contract's metadata columns of one DICOM file (pixels decoded only for a compressed syntax).

    ``image_id`` is the SOPInstanceUID, ``study_id`` the StudyInstanceUID, ``z`` =
    ImagePositionPatient[2]; ``pixel_spacing`` is the row spacing; multi-valued
    WindowCenter/WindowWidth give their first value; absent optional tags give NaN/None;
    ``modality`` is the Modality in upper case. Raises :class:`CorruptDicomError` for a file that
    cannot be used (see ``stackkit.data.decoding``), e.g. a Modality not in ``modalities``.
    """
    return dict(zip(HEADER_COLUMNS, _header_row(os.fspath(path), tuple(modalities))))


# --- many files ------------------------------------------------------------------------------


def _scan_chunk(paths: list[str], modalities=DEFAULT_MODALITIES) -> tuple[list[tuple], list[tuple[str, str]]]:
    rows, skipped = [], []
    for path in paths:
        try:
            rows.append(_header_row(path, modalities))
        except CorruptDicomError as exc:
            skipped.append((exc.path, exc.reason))
    return rows, skipped


def scan_headers(paths, *, workers: int | None = None, progress: bool = True, chunk_size: int = 512,
                 modalities=DEFAULT_MODALITIES):
    """Read the headers of many files in parallel (processes, chunked); pixel data is decoded only
    for compressed syntaxes (``read_header``), never for the native ones of the RSNA data.

    Returns ``(frame, skipped)``: one row per readable file in the order of ``paths``
    (columns ``HEADER_COLUMNS``) and ``(path, reason)`` for every file that was skipped.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    paths = [os.fspath(p) for p in paths]
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise StackkitError(f"workers must be >= 1, got {workers}")
    # Small chunks when there are few files so every worker gets some.
    chunk_size = max(16, min(chunk_size, math.ceil(len(paths) / (4 * workers)) if paths else 16))
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    scan = functools.partial(_scan_chunk, modalities=tuple(modalities))
    rows: list[tuple] = []
    skipped: list[tuple[str, str]] = []
    with tqdm(total=len(paths), desc="DICOM headers", unit="file", disable=not progress) as bar:
        if workers == 1 or len(chunks) <= 1:
            results = map(scan, chunks)
            executor = None
        else:
            from concurrent.futures import ProcessPoolExecutor

            executor = ProcessPoolExecutor(max_workers=min(workers, len(chunks)))
            results = executor.map(scan, chunks)
        try:
            for chunk, (chunk_rows, chunk_skipped) in zip(chunks, results):
                rows.extend(chunk_rows)
                skipped.extend(chunk_skipped)
                bar.update(len(chunk))
        finally:
            if executor is not None:
                executor.shutdown(cancel_futures=True)
    frame = pd.DataFrame.from_records(rows, columns=list(HEADER_COLUMNS))
    for col in ("rows", "columns"):
        frame[col] = frame[col].astype("int32")
    for col in ("image_id", "patient_id", "study_id", "series_id", "path", "modality"):
        frame[col] = frame[col].astype(object)
    return frame, skipped
