"""SIGKILL each writing command at random moments while it overwrites existing artifacts.

Afterwards every artifact must be the old complete version or a new complete version, and the
next, uninterrupted run must succeed.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from stackkit.contract import LABELS, Workdir

from stackkit.testing.cli import CLI, run_cli
from stackkit.testing.contract import snapshot


def _commands(root: Path, wd: Workdir):
    dicom = root / "dicom"
    return {
        "data prepare": ["data", "prepare", "--workdir", wd.root, "--dicom-dir", dicom / "stage_2_train", "--test-dicom-dir",
                         dicom / "stage_2_test", "--labels", dicom / "stage_2_train.csv", "--folds", 3, "--seed", 5, "--quiet"],
        "base import": ["base", "import", "m1", "--force", "--workdir", wd.root, "--oof", root / "m1b_oof.parquet", "--test", root / "m1b_test.parquet"],
        "stack features": ["stack", "features", "--workdir", wd.root, "--lags", 3, "--quiet"],
        "stack fit": ["stack", "fit", "--workdir", wd.root, "--stackers", "lgbm", "--seed", 1, "--quiet"],
        "submit": ["submit", "--workdir", wd.root],
    }


def assert_complete(path: Path) -> None:
    name = path.name
    if name.endswith(".parquet"):
        frame = pd.read_parquet(path)
        assert len(frame) > 0
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".csv"):
        frame = pd.read_csv(path)
        assert list(frame.columns) == ["ID", "Label"]
        assert len(frame) % len(LABELS) == 0 and frame["Label"].notna().all()
    elif name.endswith(".sha256"):
        assert len(path.read_text().split()[0]) == 64


@pytest.mark.parametrize("command", ["data prepare", "base import", "stack features", "stack fit", "submit"])
def test_sigkill_leaves_old_or_new_complete_artifacts(pipeline_workdir, tmp_path, command):
    root, wd = pipeline_workdir
    rng = random.Random(f"crash-{command}")
    # how long an uninterrupted run takes, on a copy
    probe = Workdir(tmp_path / "probe")
    shutil.copytree(wd.root, probe.root)
    start = time.perf_counter()
    run_cli(*_commands(root, probe)[command])
    duration = time.perf_counter() - start

    for attempt in range(2):
        work = Workdir(tmp_path / f"kill{attempt}")
        shutil.copytree(wd.root, work.root)
        before = snapshot(work.root)
        proc = subprocess.Popen([*CLI, *map(str, _commands(root, work)[command])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in sorted(work.root.rglob("*")):
            if not path.is_file() or path.name.startswith(".stackkit-tmp-") or "_work" in path.parts:
                continue
            rel = str(path.relative_to(work.root))
            if rel in before and before[rel] == path.read_bytes():
                continue  # the old complete version
            assert_complete(path)  # else it must be a complete new version
        # the next, uninterrupted run succeeds
        run_cli(*_commands(root, work)[command])
