"""`base train --pseudo-labels F0 --pseudo-labels F1 ...`: soft labels for unlabeled studies' images,
added to the training rows of one fold model each.

File k (fold 0 first, one per fold of data/folds.parquet) trains fold model k only, so it must be
made without fold k's labels (e.g. a trained base model's fold model k test predictions,
preds/<model>/test_fold<k>.parquet, as `demo --pseudo-labels` does; not a stacker's: its inputs
come from base fold models trained on fold k): one file made from every fold's labels would leak
fold k's labels into fold k's OOF predictions, and is refused.
Pseudo-labelled images must be prepared images (in data/metadata.parquet, for the pixel cache)
of studies without any label: the test split's, or external studies prepared as test images.
They never enter a fold's validation rows or the OOF file (those hold labeled images only).
Layout: any ``base import`` prediction layout (wide ``image_id`` + six columns, or RSNA long
``ID,Label``), values are probabilities in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, file_sha256
from stackkit.contract.validate import check_ids, check_probabilities, ids_in
from stackkit.errors import ContractError, StackkitError


@dataclass(frozen=True)
class PseudoLabels:
    """One fold model's pseudo-labels: the file, its sha256, and image_id + six soft labels."""

    fold: int
    path: str
    sha256: str
    frame: pd.DataFrame

    def record(self) -> dict:
        return {"fold": self.fold, "path": self.path, "sha256": self.sha256, "images": int(len(self.frame))}


def check_pseudo_count(paths: list, folds: list[int]) -> None:
    """One file per fold model, before any file is read; a single file for several folds is refused."""
    if paths and len(paths) == 1 and len(folds) > 1:
        raise StackkitError(
            f"{paths[0]}: one --pseudo-labels file for all {len(folds)} folds: labels made from every fold leak fold k's "
            f"labels into fold k's OOF predictions; give one file per fold model ({len(folds)}, fold 0 first), file k "
            "made without fold k's labels"
        )
    if paths and len(paths) != len(folds):
        raise StackkitError(
            f"{paths[-1]}: {len(paths)} --pseudo-labels files; expected one per fold model ({len(folds)}: the folds of "
            "data/folds.parquet, fold 0 first)"
        )


def _check_unlabeled(frame: pd.DataFrame, source: str, metadata: pd.DataFrame, fold_frame: pd.DataFrame) -> None:
    """Every image prepared, and of a study with no labeled image."""
    known = ids_in(frame["image_id"], metadata["image_id"])
    if not known.all():
        pos = int(np.argmax(~known))
        raise ContractError(
            f"{source}: image_id '{frame['image_id'].iloc[pos]}' at row {pos + 1} is not in data/metadata.parquet; "
            "pseudo-labelled images must be prepared (e.g. the test split's)"
        )
    study_of = metadata.set_index("image_id")["study_id"]
    labeled_studies = study_of.reindex(fold_frame["image_id"].to_numpy(dtype=object)).unique()
    studies = study_of.reindex(frame["image_id"].to_numpy(dtype=object))
    labeled = ids_in(studies, labeled_studies)
    if labeled.any():
        pos = int(np.argmax(labeled))
        raise ContractError(
            f"{source}: image_id '{frame['image_id'].iloc[pos]}' at row {pos + 1} is of study '{studies.iloc[pos]}', "
            "which has labeled images in data/folds.parquet; pseudo-labels are for unlabeled studies only"
        )


def read_pseudo_labels(paths, folds: list[int], metadata: pd.DataFrame, fold_frame: pd.DataFrame) -> list[PseudoLabels]:
    """The validated pseudo-label files, one per fold in ``folds`` order (empty without files)."""
    from base_models.importer import read_prediction_file

    paths = [str(p) for p in (paths or ())]
    check_pseudo_count(paths, folds)
    out = []
    for fold, path in zip(folds, paths):
        frame = read_prediction_file(Path(path), logits=False, what="pseudo-label")
        frame = check_probabilities(check_ids(frame, path), path, logits_hint=False)
        if frame.empty:
            raise ContractError(f"{path}: no rows; a pseudo-label file needs at least one image")
        _check_unlabeled(frame, path, metadata, fold_frame)
        frame = frame[["image_id", *LABELS]].reset_index(drop=True)
        out.append(PseudoLabels(fold, path, file_sha256(path), frame))
    return out
