"""DICOM slice -> Hounsfield units -> windowed uint8 channels (pure functions over arrays).

HU conversion uses pydicom's ``apply_modality_lut`` (RescaleSlope/RescaleIntercept), after the
known RSNA 2019 repair: some CT scanners wrote signed pixel values into files that claim
``BitsStored = 12`` and ``PixelRepresentation = 0`` (unsigned) with an intercept near 0 instead
of -1024. Only CT files with that signature and a RescaleIntercept are repaired (an MR file
without one is 12-bit unsigned for real). For those files the stored values are shifted by +1000, wrapped modulo 4096 (the
12-bit range) and the intercept is set to -1000, which restores air at about -1000 HU.

Windows are (center, width) pairs in HU; each becomes one uint8 channel:
``clip(hu, c - w/2, c + w/2)`` mapped linearly onto 0..255.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from stackkit.errors import one_line

# The RSNA 2019 repair (see module docstring).
QUIRK_BITS_STORED = 12
QUIRK_SHIFT = 1000
QUIRK_MODULUS = 4096
QUIRK_INTERCEPT = -1000.0
QUIRK_INTERCEPT_ABOVE = -100.0


def needs_12bit_fix(bits_stored, pixel_representation, rescale_intercept, modality) -> bool:
    """True for the RSNA files whose signed pixels were written as 12-bit unsigned: CT only, with a
    RescaleIntercept present (a file without one, e.g. an MR slice, is never repaired)."""
    if str(modality or "").strip().upper() != "CT" or rescale_intercept is None:
        return False
    try:
        return (
            int(bits_stored) == QUIRK_BITS_STORED
            and int(pixel_representation) == 0
            and float(rescale_intercept) > QUIRK_INTERCEPT_ABOVE
        )
    except (TypeError, ValueError):
        return False


def fix_12bit_pixels(stored: np.ndarray) -> np.ndarray:
    """Stored values of a quirk file -> values that the intercept -1000 maps to HU."""
    shifted = stored.astype(np.int32) + QUIRK_SHIFT
    shifted[shifted >= QUIRK_MODULUS] -= QUIRK_MODULUS
    return shifted


def dicom_to_hu(ds) -> np.ndarray:
    """Hounsfield units (float32, rows x columns) of a pydicom Dataset, with the 12-bit repair."""
    from pydicom.pixels import apply_modality_lut

    stored = ds.pixel_array
    if stored.ndim != 2:  # data prepare refuses multi-frame and colour files; one changed since is not guessed at
        raise ValueError(f"expected one 2-D slice, got pixel array of shape {stored.shape}")
    tags = (getattr(ds, "BitsStored", None), getattr(ds, "PixelRepresentation", None), getattr(ds, "RescaleIntercept", None))
    if needs_12bit_fix(*tags, getattr(ds, "Modality", None)):
        stored = fix_12bit_pixels(stored)
        # apply_modality_lut reads the intercept from the dataset; repair it on this in-memory copy only
        ds.RescaleIntercept = QUIRK_INTERCEPT
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def window_uint8(hu: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """(..., H, W) HU -> (..., n_windows, H, W) uint8, one channel per (center, width) window."""
    hu = np.asarray(hu, dtype=np.float32)
    centers = np.asarray([c for c, _ in windows], dtype=np.float32)
    widths = np.asarray([w for _, w in windows], dtype=np.float32)
    shape = (len(windows),) + (1,) * 2
    low = (centers - widths / 2).reshape(shape)
    scaled = (hu[..., None, :, :] - low) / widths.reshape(shape)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, widened when shrinking (anti-aliased, like PIL)."""
    scale = n_in / n_out
    support = max(1.0, scale)
    centers = (np.arange(n_out) + 0.5) * scale - 0.5
    weights = np.clip(1.0 - np.abs(np.arange(n_in)[None, :] - centers[:, None]) / support, 0.0, None)
    # edge rows can lose weight outside the image: renormalize so flat images stay flat
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float image -> (size, size) by separable anti-aliased linear interpolation."""
    rows, cols = image.shape
    if rows == size and cols == size:
        return image.astype(np.float32, copy=False)
    return resize_matrix(rows, size) @ image.astype(np.float32) @ resize_matrix(cols, size).T


def read_windowed(path: str | os.PathLike, windows: Sequence[tuple[float, float]], size: int) -> tuple[np.ndarray, str | None]:
    """One DICOM file -> ((n_windows, size, size) uint8, None), or (zeros, reason) if unreadable.

    Never raises for a bad file: a truncated or corrupt slice is reported by the caller and
    predicted from a blank image.
    """
    import pydicom

    from stackkit.data.decoding import quiet_rsna_ids

    blank = np.zeros((len(windows), size, size), dtype=np.uint8)
    try:
        with quiet_rsna_ids():
            ds = pydicom.dcmread(path)
            hu = dicom_to_hu(ds)
    except Exception as exc:  # noqa: BLE001 - any decode failure is a bad slice, not a crash
        reason = one_line(exc)
        return blank, f"{type(exc).__name__}: {reason}"
    if hu.ndim != 2:
        return blank, f"expected one 2-D slice, got pixel array of shape {hu.shape}"
    return window_uint8(resize_image(hu, size), windows), None
