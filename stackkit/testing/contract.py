"""Contract files made by hand, the way another tool would write them: for tests and benchmarks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import write_parquet


def make_contract_frames(n_patients: int = 24, n_folds: int = 4, seed: int = 0, test_fraction: float = 0.25):
    """metadata, labels, folds for random studies with contiguous lesions along z."""
    rng = np.random.default_rng(seed)
    rows, label_rows = [], []
    image_counter = 0
    patient_ids = [f"ID_p{p:05x}" for p in range(n_patients)]
    test_patients = set(patient_ids[: max(1, int(round(n_patients * test_fraction)))])
    for patient in patient_ids:
        for s in range(1 + int(rng.random() < 0.2)):
            study = f"ID_s{image_counter:07x}"
            n_slices = int(rng.integers(1, 9)) if rng.random() < 0.1 else int(rng.integers(8, 20))
            z0 = float(rng.normal(0, 20))
            step = 5.0 * (-1 if rng.random() < 0.3 else 1)
            z = z0 + step * np.arange(n_slices)
            if n_slices > 3 and rng.random() < 0.2:
                z[2] = z[1]  # duplicate z position, as in the real data
            y = np.zeros((n_slices, len(LABELS)), dtype=np.int8)
            for sub in range(5):
                if rng.random() < 0.3:
                    start = int(rng.integers(0, n_slices))
                    length = int(rng.integers(1, max(2, n_slices // 2)))
                    y[start : start + length, sub] = 1
            y[:, 5] = y[:, :5].max(axis=1)
            split = "test" if patient in test_patients else "train"
            for i in range(n_slices):
                image_id = "ID_" + hashlib.sha1(f"{seed}-{image_counter}".encode()).hexdigest()[:9]
                image_counter += 1
                rows.append((image_id, patient, study, split, float(z[i])))
                if split == "train":
                    label_rows.append((image_id, *y[i]))
    metadata = pd.DataFrame(rows, columns=["image_id", "patient_id", "study_id", "split", "z"])
    metadata = metadata.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # file order carries nothing
    labels = pd.DataFrame(label_rows, columns=["image_id", *LABELS])
    for col in LABELS:
        labels[col] = labels[col].astype(np.int8)
    from sklearn.model_selection import StratifiedGroupKFold

    train = metadata[metadata["split"] == "train"].merge(labels, on="image_id")
    study_any = train.groupby("study_id")["any"].transform("max")
    folds = pd.DataFrame({"image_id": train["image_id"], "fold": np.zeros(len(train), np.int8)})
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(train, study_any, groups=train["patient_id"])):
        folds.loc[folds.index[held], "fold"] = k
    folds["fold"] = folds["fold"].astype(np.int8)
    return metadata, labels, folds


def noisy_predictions(labels: pd.DataFrame, ids, *, strength: float = 2.0, seed: int = 0) -> pd.DataFrame:
    """Probabilities that carry signal about the labels (for ids with labels) plus noise."""
    rng = np.random.default_rng(seed)
    ids = pd.Index(ids)
    y = labels.set_index("image_id").reindex(ids)[list(LABELS)].to_numpy(dtype=float)
    y = np.nan_to_num(y, nan=0.0)
    logit = strength * (2 * y - 1) - 1.0 + rng.normal(0, 1.5, size=y.shape)
    frame = pd.DataFrame(1 / (1 + np.exp(-logit)), columns=list(LABELS)).astype(np.float32)
    frame.insert(0, "image_id", ids.to_numpy())
    return frame


def with_folds(frame: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each row's ``fold`` from ``folds`` after ``image_id``: an OOF export made on those
    folds, as `base import` takes it without --folds-from-data."""
    frame = frame.copy()
    frame.insert(1, "fold", folds.set_index("image_id")["fold"].reindex(frame["image_id"]).to_numpy())
    return frame


def write_core(wd: Workdir, metadata: pd.DataFrame, labels: pd.DataFrame, folds: pd.DataFrame) -> Workdir:
    """data/metadata, labels and folds of ``wd``, written through the contract's atomic writer."""
    write_parquet(metadata, wd.metadata)
    write_parquet(labels, wd.labels)
    write_parquet(folds, wd.folds)
    return wd


def rewrite_data_file(wd: Workdir, path: Path, frame: pd.DataFrame) -> None:
    """Replace one data/ file and record its new sha256 in data/prepare.json, as a rerun of `data prepare`
    would: for tests of what the readers check behind the hash (a hand edit alone is refused by the hash)."""
    from stackkit.contract.io import read_json, write_set_record

    write_parquet(frame, path)
    if wd.prepare_record.is_file():
        record = {k: v for k, v in read_json(wd.prepare_record).items() if k != "sha256"}
        write_set_record(wd.data_dir, wd.prepare_record.name, record)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: to prove a failed command changed nothing."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_workdir(template: Workdir, folder: Path) -> Workdir:
    """A private copy of a module-scoped template work directory at ``folder``, which a test may change."""
    import shutil

    shutil.copytree(template.root, folder)
    return Workdir(folder)


def move_oof_fold(wd: Workdir, model: str, row: int, n_folds: int) -> None:
    """preds/<model>/oof.parquet with row ``row``'s fold moved to the next one: predictions made on other folds."""
    oof = pd.read_parquet(wd.oof(model))
    oof.loc[row, "fold"] = (oof.loc[row, "fold"] + 1) % n_folds
    write_parquet(oof, wd.oof(model))
