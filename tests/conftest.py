"""Shared fixtures. Helpers that tests and benchmarks share live in :mod:`stackkit.testing`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stackkit.contract import Workdir
from stackkit.contract.io import write_parquet
from stackkit.testing.cli import run_cli
from stackkit.testing.contract import make_contract_frames, noisy_predictions, with_folds, write_core

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def contract_workdir(tmp_path) -> Workdir:
    """A work directory with data/metadata, labels and folds, written as another tool would."""
    return write_core(Workdir(tmp_path / "work"), *make_contract_frames())


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL URL: $STACKKIT_TEST_POSTGRES_URL (set by .ci/run), else a throwaway cluster.

    Skips when no server can be had, unless $STACKKIT_REQUIRE_POSTGRES is set (CI), where it fails.
    """
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


@pytest.fixture(scope="session")
def pipeline_workdir(tmp_path_factory):
    """A complete work directory: synth -> prepare -> two imported models -> features -> fit -> submit."""
    root = tmp_path_factory.mktemp("pipeline")
    dicom = root / "dicom"
    wd = Workdir(root / "work")
    run_cli("data", "synth", "--out", dicom, "--patients", 14, "--size", 32, "--seed", 3, "--quiet")
    run_cli("data", "prepare", "--workdir", wd.root, "--dicom-dir", dicom / "stage_2_train", "--test-dicom-dir", dicom / "stage_2_test",
            "--labels", dicom / "stage_2_train.csv", "--folds", 3, "--quiet")
    from stackkit.contract.validate import load_core

    metadata, labels, folds = load_core(wd)
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    for seed, name in ((1, "m1"), (2, "m2")):
        write_parquet(with_folds(noisy_predictions(labels, folds["image_id"], seed=seed), folds), root / f"{name}_oof.parquet")
        write_parquet(noisy_predictions(labels, test_ids, seed=seed + 10), root / f"{name}_test.parquet")
        run_cli("base", "import", name, "--workdir", wd.root, "--oof", root / f"{name}_oof.parquet", "--test", root / f"{name}_test.parquet")
    # a third prediction set, so that a re-import really changes the files
    write_parquet(with_folds(noisy_predictions(labels, folds["image_id"], seed=7), folds), root / "m1b_oof.parquet")
    write_parquet(noisy_predictions(labels, test_ids, seed=17), root / "m1b_test.parquet")
    run_cli("stack", "features", "--workdir", wd.root, "--quiet")
    run_cli("stack", "fit", "--workdir", wd.root, "--stackers", "lgbm", "--quiet")
    run_cli("submit", "--workdir", wd.root)
    return root, wd
