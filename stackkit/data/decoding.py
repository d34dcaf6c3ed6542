"""What `data prepare` accepts of a DICOM file beyond its header: the kind of image and its pixel data.

Pure checks over the header values that ``stackkit.data.dicom`` reads; each returns the reason a
file is refused (one line) or None.

* One CT slice per file: a Modality outside the allowed list (``CT`` by default; `data prepare
  --modality CT,MR` to add others), a multi-frame file (NumberOfFrames > 1) or a colour file
  (SamplesPerPixel != 1) is refused. Windows in Hounsfield units and the RSNA 12-bit repair
  assume CT numbers; a multi-frame file has one z per frame, not one per file.
* Native (uncompressed) transfer syntaxes, deflated included once inflated: the pixel data must
  hold Rows x Columns x BitsAllocated/8 bytes (pydicom reads a truncated file without complaint).
* Encapsulated (compressed) syntaxes: a decoder must be installed (pydicom's pixel decoders:
  pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS, pylibjpeg-rle or pydicom for RLE,
  Pillow for JPEG baseline/extended, python-gdcm for JPEG lossless), and the pixels are decoded
  once, here, so that a file no decoder can read is refused now rather than read as a blank
  image later. The compressed length says nothing about the image size, so it is not checked.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from stackkit.errors import one_line

DEFAULT_MODALITIES = ("CT",)
MODALITY_OPTION = "--modality"


@contextlib.contextmanager
def quiet_rsna_ids():
    """Silence the one pydicom warning RSNA ids cause: ``ID_63eb1e259`` is not a valid UI value, and
    pydicom warns on every one it reads or assigns. Every other warning stays."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Invalid value for VR UI", category=UserWarning)
        yield


def check_image_kind(values: dict, modalities) -> str | None:
    """The reason a file is not one single-channel slice of an allowed modality, or None."""
    frames = values.get("NumberOfFrames") or 1
    if frames > 1:
        return f"multi-frame file (NumberOfFrames {frames}): stackkit reads one slice per file at one z; split it into single-frame files"
    samples = values.get("SamplesPerPixel") or 1
    if samples != 1:
        return f"SamplesPerPixel {samples} (a colour image): CT slices have one sample per pixel"
    modality = values.get("Modality")
    allowed = ",".join(modalities)
    if not modality:
        return f"Modality (0008,0060) is missing or empty; data prepare reads {allowed} slices only"
    if modality.upper() not in modalities:
        return (f"Modality {modality}, not {allowed}: windows and the 12-bit repair assume CT numbers; "
                f"pass {MODALITY_OPTION} {','.join((*modalities, modality.upper()))} to read it anyway")
    return None


def parse_modalities(text: str | None) -> tuple[str, ...]:
    """``--modality CT,MR`` -> ("CT", "MR"); None -> the default (CT only)."""
    if text is None:
        return DEFAULT_MODALITIES
    names = tuple(dict.fromkeys(part.strip().upper() for part in str(text).split(",") if part.strip()))
    if not names or not all(name.replace("_", "").isalnum() for name in names):
        from stackkit.errors import StackkitError

        raise StackkitError(f"{MODALITY_OPTION} {text!r}: expected DICOM Modality codes separated by commas, such as CT or CT,MR")
    return names


def is_encapsulated(syntax: str | None) -> bool:
    """True for a compressed (encapsulated) transfer syntax; False for native and deflated ones."""
    if not syntax:
        return False
    from pydicom.uid import UID

    return UID(syntax).is_encapsulated


def native_length_problem(values: dict, available: int) -> str | None:
    """The reason native pixel data is too short for the header's image size, or None."""
    expected = (values["Rows"] * values["Columns"] * values["BitsAllocated"] // 8
                * (values.get("SamplesPerPixel") or 1) * (values.get("NumberOfFrames") or 1))
    if available >= expected:
        return None
    return (f"pixel data has {available} bytes, expected {expected} (Rows {values['Rows']} x Columns {values['Columns']} "
            f"x BitsAllocated {values['BitsAllocated']}/8); the file is truncated")


def decode_problem(path: str, values: dict, syntax: str) -> str | None:
    """Decode a compressed file's pixels once: the reason it cannot be read as a (Rows, Columns) image, or None."""
    import pydicom
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"no pixel decoder exists for transfer syntax {uid.name} ({uid})"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        return f"no decoder installed for {uid.name} ({uid}): {missing}; install one, or convert the file to an uncompressed syntax"
    try:
        with quiet_rsna_ids():
            pixels = pydicom.dcmread(path).pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure refuses the file with its reason
        return (f"cannot decode the {uid.name} pixel data ({type(exc).__name__}: {one_line(exc, 240)}); "
                "convert it to an uncompressed syntax, or install python-gdcm (pip install 'stackkit[gdcm]'), which decodes more")
    shape = (values["Rows"], values["Columns"])
    if np.shape(pixels) != shape:
        return f"decoded {uid.name} pixel data has shape {np.shape(pixels)}, expected {shape} (Rows x Columns)"
    return None
