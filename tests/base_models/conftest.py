"""Fixtures for the base-model tests: one small synthetic DICOM dataset, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackkit.contract import Workdir
from stackkit.testing.dicom import SMALL_FOLDS, SMALL_PATIENTS, SMALL_SIZE, prepared_workdir


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Workdir:
    """A prepared work directory (24 patients, 32 px, 3 folds) with ONE train slice truncated after
    `data prepare` (so metadata lists it but its pixels cannot be decoded).

    Tests copy ``data/`` into their own work directory (see ``fresh_workdir``) so they never
    share outputs; the DICOM files themselves are shared read-only.
    """
    import pandas as pd

    wd = prepared_workdir(tmp_path_factory.mktemp("base_small"), patients=SMALL_PATIENTS, size=SMALL_SIZE, folds=SMALL_FOLDS)
    metadata = pd.read_parquet(wd.metadata)
    victim = metadata.loc[metadata["split"] == "train"].sort_values("image_id").iloc[3]
    data = Path(victim["path"]).read_bytes()
    Path(victim["path"]).write_bytes(data[: len(data) - 200])  # pixel data cut short
    (wd.root / "truncated.txt").write_text(str(victim["image_id"]))
    return wd
