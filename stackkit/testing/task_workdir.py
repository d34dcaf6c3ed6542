"""A task work directory (contract v5) from a generated task benchmark (stackkit.testing.task_exported).

    bench = make_task_benchmark("rsna2022-cspine", n_patients=40, seed=0, n_models=2, n_folds=3)
    write_task_workdir(bench, workdir)   # data/: metadata, labels at the unit, folds per slice, slice labels, task.json
    import_task_models(bench, workdir)   # preds/<model>/ for every model, through `base import`'s library function

The test units' labels (``bench.test_labels``) are held out: nothing here writes them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import Workdir
from stackkit.contract.io import write_parquet
from stackkit.contract.task_files import write_task_data
from stackkit.testing.task_exported import TaskBenchmark


def task_metadata(bench: TaskBenchmark) -> pd.DataFrame:
    """data/metadata.parquet of the benchmark: every slice, ``z`` from its position in the series
    (``slice_no``); ``study_id`` the series z orders (for a patient-level task its series, else the study)."""
    slices = bench.slices
    study = slices["study_id"] if "study_id" in slices.columns else slices["series_id"]
    return pd.DataFrame({"image_id": slices["image_id"], "patient_id": slices["patient_id"], "study_id": study.astype(str),
                         "series_id": slices["series_id"].astype(str), "split": slices["split"],
                         "z": slices["slice_no"].to_numpy(dtype=np.float64)})


def task_folds(bench: TaskBenchmark) -> pd.DataFrame:
    """data/folds.parquet: one row per train slice, the fold of its unit (patient-grouped)."""
    fold_of = bench.folds.set_index(bench.unit_column)["fold"]
    train = bench.slices[bench.slices["split"] == "train"]
    return pd.DataFrame({"image_id": train["image_id"].to_numpy(),
                         "fold": fold_of.reindex(train[bench.unit_column]).to_numpy().astype(np.int8)})


def write_task_workdir(bench: TaskBenchmark, workdir) -> Workdir:
    """data/ of a task work directory from ``bench`` (the contract's writer: one set, task.json inside)."""
    train_ids = bench.slices.loc[bench.slices["split"] == "train", "image_id"]
    slice_labels = bench.slice_labels[bench.slice_labels["image_id"].isin(train_ids)].reset_index(drop=True)
    slice_labels[list(bench.columns)] = slice_labels[list(bench.columns)].to_numpy().astype(np.int8)
    labels = bench.labels.copy()
    labels[list(bench.schema.labels)] = labels[list(bench.schema.labels)].to_numpy().astype(np.int8)
    return write_task_data(workdir, bench.schema, task_metadata(bench), labels, task_folds(bench), slice_labels)


def import_task_models(bench: TaskBenchmark, workdir, models=None) -> list[str]:
    """Every model of ``bench`` (or ``models``) into preds/<model>/ through `base import`'s library function:
    its OOF file (with ``fold``), its test file and one test file per fold model."""
    from base_models.importer import import_predictions

    wd = Workdir.of(workdir)
    names = list(bench.models if models is None else models)
    with tempfile.TemporaryDirectory(prefix="task-import-") as tmp:
        for name in names:
            folder = Path(tmp) / name
            oof = write_parquet(bench.oof[name], folder / "oof_predictions.parquet")
            test = write_parquet(bench.test[name], folder / "test_predictions.parquet")
            folds = [write_parquet(frame, folder / f"fold{k}_test_predictions.parquet") for k, frame in enumerate(bench.test_folds[name])]
            import_predictions(wd, name, oof_path=oof, test_path=test, test_folds=tuple(folds))
    return names
