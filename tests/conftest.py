"""Shared fixtures: a contract-valid work directory assembled by hand (no DICOM involved).

Later steps need nothing but the contract's files, so most tests build exactly those files
here, the way another tool would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS, Workdir
from stackkit.io import write_parquet


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


@pytest.fixture
def contract_workdir(tmp_path) -> Workdir:
    """A work directory with data/metadata, labels and folds, written as another tool would."""
    wd = Workdir(tmp_path / "work")
    metadata, labels, folds = make_contract_frames()
    write_parquet(metadata, wd.metadata)
    write_parquet(labels, wd.labels)
    write_parquet(folds, wd.folds)
    return wd


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: to prove a failed command changed nothing."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL URL: $STACKKIT_TEST_POSTGRES_URL (set by .ci/run), else a throwaway cluster.

    Skips when no server can be had, unless $STACKKIT_REQUIRE_POSTGRES is set (CI), where it fails.
    """
    import os
    import subprocess

    url = os.environ.get("STACKKIT_TEST_POSTGRES_URL")
    started = None
    if not url:
        proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "pg_throwaway.sh")], capture_output=True, text=True)
        if proc.returncode == 0:
            env = dict(
                part.split("=", 1)
                for line in proc.stdout.splitlines()
                for part in line.replace("export ", "").split()
            )
            url = env["STACKKIT_TEST_POSTGRES_URL"]
            started = env
        elif os.environ.get("STACKKIT_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required but could not be started: {proc.stderr.strip()}")
        else:
            pytest.skip(f"no PostgreSQL server available: {proc.stderr.strip()}")
    yield url
    if started:
        owner = started["STACKKIT_PG_OWNER"]
        cmd = [f"{started['STACKKIT_PG_BIN']}/pg_ctl", "-D", f"{started['STACKKIT_PG_DIR']}/data", "-m", "immediate", "stop"]
        if owner != os.environ.get("USER", ""):
            cmd = ["runuser", "-u", owner, "--", *cmd]
        subprocess.run(cmd, capture_output=True)


CLI = [__import__("sys").executable, str(REPO_ROOT / "cli.py")]


def run_cli(*args, check=True):
    """Run cli.py in a real process, as a user would."""
    import subprocess

    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="session")
def pipeline_workdir(tmp_path_factory):
    """A complete work directory: synth -> prepare -> two imported models -> features -> fit -> submit."""
    root = tmp_path_factory.mktemp("pipeline")
    dicom = root / "dicom"
    wd = Workdir(root / "work")
    run_cli("data", "synth", "--out", dicom, "--patients", 14, "--size", 32, "--seed", 3, "--quiet")
    run_cli("data", "prepare", "--workdir", wd.root, "--dicom-dir", dicom / "stage_2_train", "--test-dicom-dir", dicom / "stage_2_test",
            "--labels", dicom / "stage_2_train.csv", "--folds", 3, "--quiet")
    from stackkit.validate import load_core

    metadata, labels, folds = load_core(wd)
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    for seed, name in ((1, "m1"), (2, "m2")):
        write_parquet(noisy_predictions(labels, folds["image_id"], seed=seed), root / f"{name}_oof.parquet")
        write_parquet(noisy_predictions(labels, test_ids, seed=seed + 10), root / f"{name}_test.parquet")
        run_cli("base", "import", name, "--workdir", wd.root, "--oof", root / f"{name}_oof.parquet", "--test", root / f"{name}_test.parquet")
    # a third prediction set, so that a re-import really changes the files
    write_parquet(noisy_predictions(labels, folds["image_id"], seed=7), root / "m1b_oof.parquet")
    write_parquet(noisy_predictions(labels, test_ids, seed=17), root / "m1b_test.parquet")
    run_cli("stack", "features", "--workdir", wd.root, "--quiet")
    run_cli("stack", "fit", "--workdir", wd.root, "--stackers", "lgbm", "--quiet")
    run_cli("submit", "--workdir", wd.root)
    return root, wd


