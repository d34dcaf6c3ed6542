"""Fixtures of the `data prepare` tests: each module's ``source`` fixture is its DICOM dataset (its own size and seed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackkit.testing import dicom as h


@pytest.fixture
def data(source, tmp_path) -> Path:
    """A private copy of the module's ``source`` dataset that a test may break."""
    return h.copy_dataset(source, tmp_path / "data")
