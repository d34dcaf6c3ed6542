"""What `data prepare` does with each class of real DICOM file that ships with pydicom (the README table).

    python bench/dicom_classes.py            # prints a Markdown table

A class is (transfer syntax, CT or not, multi-frame or not, samples per pixel); the first of
pydicom's test files (the top folder, by name) of each class stands for it. Every file is read with stackkit's own header reader
(``stackkit.data.dicom.read_header``, what `data prepare` runs on every file) twice: by default
(CT only) and with ``--modality`` set to the file's own modality. A file that lacks the tags every
slice needs (PatientID, StudyInstanceUID, SOPInstanceUID, ImagePositionPatient: many of pydicom's
files are not patient images) is read as a copy with those tags added, its pixel data and transfer
syntax unchanged, and the table says so.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

REQUIRED = ("PatientID", "StudyInstanceUID", "SOPInstanceUID", "ImagePositionPatient")


def _classes() -> list[tuple[tuple, str, object]]:
    """(class key, file path, header data set) of the first pydicom test file of each class with pixel data."""
    import pydicom
    from pydicom.data import get_testdata_files

    seen, rows = set(), []
    files = get_testdata_files()
    top = min(len(Path(p).parts) for p in files)
    for path in sorted((p for p in files if len(Path(p).parts) == top), key=lambda p: os.path.basename(p).lower()):
        if os.path.isdir(path):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=False, defer_size=1024)
        except Exception:  # noqa: BLE001 - not a DICOM Part 10 file: not an image class
            continue
        if "PixelData" not in ds or not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
            continue
        frames = int(ds.get("NumberOfFrames") or 1) if str(ds.get("NumberOfFrames") or "1").isdigit() else 1
        modality = str(ds.get("Modality") or "-")
        key = (ds.file_meta.TransferSyntaxUID.name, modality == "CT", frames > 1, int(ds.get("SamplesPerPixel") or 1))
        if key not in seen:
            seen.add(key)
            rows.append(((key[0], modality, frames, key[3]), path, ds))
    return rows


def _outcome(path: str, modalities) -> str:
    from stackkit.data.dicom import CorruptDicomError, read_header

    try:
        header = read_header(path, modalities=modalities)
    except CorruptDicomError as exc:
        return f"refused: {_short(exc.reason)}".replace("|", "/")
    return f"read ({header['rows']} x {header['columns']})"


def _short(reason: str) -> str:
    """The reason up to its explanation: e.g. "Modality MR, not CT"; a decoder's own words are kept."""
    if reason.startswith("cannot decode"):
        return reason.split("; convert")[0].replace("Unable to decode as exceptions were raised by all available plugins: ", "")
    return reason.split(": ")[0].split("; ")[0]


def table() -> str:
    from stackkit.testing.dicom import real_dicom_copy

    lines = ["| transfer syntax | modality | frames | samples | pydicom file | default (CT) | `--modality` its own |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for (syntax, modality, frames, samples), path, ds in _classes():
            name = os.path.basename(path)
            if not all(ds.get(k) for k in REQUIRED):
                path = str(real_dicom_copy(name, Path(tmp) / name))
                name += " (tags added)"
            own = (modality,) if modality != "-" else ("CT",)
            lines.append(f"| {syntax} | {modality} | {frames} | {samples} | `{name}` | {_outcome(path, ('CT',))} | "
                         f"{_outcome(path, own) if own != ('CT',) else 'same'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
