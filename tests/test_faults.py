"""Fault injection on every writing command: a disk that fills up mid-write, SIGKILL mid-write,
a read-only disk, foreign storages.

Each case asserts the exit code, one short error line without a traceback, and that every earlier
artifact is byte-identical afterwards (sha256 of every file under the work directory). The
full-disk and read-only cases mount a small tmpfs and need root (CI runs as root: `.ci/run`);
elsewhere they skip. The SIGKILL cases stop the process inside the atomic writer with
``STACKKIT_TEST_HOLD_WRITE`` (see stackkit.contract.io), check that the temporary file or set
folder really holds new bytes while the destination is still the old one, and only then kill.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stackkit.contract import Workdir
from stackkit.contract.io import HOLD_ENV, HOLD_MARK_ENV, SET_OLD, SET_TMP, TMP_PREFIX, read_json, verify_set
from stackkit.testing.cli import CLI, run_cli


def _commands(root: Path, wd: Workdir) -> dict[str, list]:
    dicom = root / "dicom"
    return {
        "data prepare": ["data", "prepare", "--workdir", wd.root, "--dicom-dir", dicom / "stage_2_train", "--test-dicom-dir",
                         dicom / "stage_2_test", "--labels", dicom / "stage_2_train.csv", "--folds", 3, "--seed", 5, "--quiet"],
        "base import": ["base", "import", "m1", "--force", "--workdir", wd.root, "--oof", root / "m1b_oof.parquet",
                        "--test", root / "m1b_test.parquet"],
        "stack features": ["stack", "features", "--workdir", wd.root, "--lags", 3, "--quiet"],
        "stack fit": ["stack", "fit", "--workdir", wd.root, "--stackers", "lgbm", "--seed", 1, "--quiet"],
        "submit": ["submit", "--workdir", wd.root],
    }


# what each command replaces: the free space left on the full disk is half of its size
REPLACES = {
    "data prepare": lambda wd: wd.data_dir,
    "base import": lambda wd: wd.preds_dir("m1"),
    "stack features": lambda wd: wd.features_dir,
    "stack fit": lambda wd: wd.stack_dir("lgbm"),
    "submit": lambda wd: wd.submission,
}


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (temporaries included: a leftover is a change)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith(".") and (SET_TMP in p.name or SET_OLD in p.name))]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory):
    """A 64 MiB tmpfs (root only): filled up by each full-disk case."""
    # .ci/run sets STACKKIT_REQUIRE_TMPFS: there these cases fail instead of skipping
    skip = pytest.fail if os.environ.get("STACKKIT_REQUIRE_TMPFS") else pytest.skip
    if os.geteuid() != 0:
        skip("mounting a tmpfs needs root (CI runs these: .ci/run)")
    point = tmp_path_factory.mktemp("tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)], capture_output=True, text=True)
    if proc.returncode != 0:
        skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(point)], capture_output=True)
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _fresh(tmpfs: Path, source: Workdir) -> Workdir:
    for child in tmpfs.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    wd = Workdir(tmpfs / "work")
    shutil.copytree(source.root, wd.root)
    return wd


def _fill(tmpfs: Path, leave: int) -> None:
    """Fill the tmpfs with a balloon file so that about ``leave`` bytes stay free."""
    stat = os.statvfs(tmpfs)
    free = stat.f_bavail * stat.f_frsize
    page = stat.f_frsize
    balloon = max(0, free - max(page, leave // page * page))
    with open(tmpfs / "balloon", "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, balloon)


@pytest.mark.parametrize("command", list(REPLACES))
def test_disk_full_mid_write_is_one_line_and_keeps_every_artifact(pipeline_workdir, tmpfs, command):
    root, source = pipeline_workdir
    wd = _fresh(tmpfs, source)
    _fill(tmpfs, _size(REPLACES[command](wd)) // 2)
    before = digests(wd.root)
    proc = run_cli(*_commands(root, wd)[command], check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and len(lines[0]) < 400, proc.stderr[-3000:]
    assert "no space left on device" in lines[0] and str(wd.root) in lines[0], lines[0]
    assert digests(wd.root) == before
    assert not leftovers(wd.root)


def test_read_only_disk_is_one_line(pipeline_workdir, tmpfs):
    root, source = pipeline_workdir
    wd = _fresh(tmpfs, source)
    before = digests(wd.root)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        proc = run_cli(*_commands(root, wd)["submit"], check=False)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "read-only file system" in lines[0] and str(wd.root) in lines[0], lines[0]
    assert digests(wd.root) == before


# (command, write point): file:N is the N-th temporary file written in full but not yet renamed,
# set:1 the first set folder complete but not yet switched in.
KILL_POINTS = [
    ("data prepare", "file:2"),
    ("data prepare", "set:1"),
    ("base import", "file:1"),
    ("base import", "set:1"),
    ("stack features", "file:2"),
    ("stack features", "set:1"),
    ("stack fit", "file:7"),
    ("stack fit", "set:1"),
    ("submit", "file:1"),
]


def _kill_mid_write(cmd: list, point: str, mark: Path, wd: Workdir, before: dict, *, unchanged: bool = True) -> Path:
    env = dict(os.environ, **{HOLD_ENV: point, HOLD_MARK_ENV: str(mark)})
    proc = subprocess.Popen([*CLI, *map(str, cmd)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mark.exists(), f"the command never reached write point {point}: rc={proc.poll()} {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}"
        time.sleep(0.05)  # the mark is written just before the writer sleeps
        in_flight = Path(mark.read_text())
        # the kill lands mid-write: new bytes are on disk in the temporary, the destination is still the old one
        assert in_flight.exists() and in_flight.name.startswith((TMP_PREFIX, ".")), in_flight
        assert _size(in_flight) > 0, in_flight
        if unchanged:
            visible = {k: v for k, v in digests(wd.root).items() if not any(part.startswith(".") for part in Path(k).parts)}
            assert visible == {k: v for k, v in before.items() if not any(part.startswith(".") for part in Path(k).parts)}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return in_flight


@pytest.mark.parametrize("command, point", KILL_POINTS, ids=[f"{c}-{p}" for c, p in KILL_POINTS])
def test_sigkill_mid_write_keeps_every_earlier_artifact(pipeline_workdir, tmp_path, command, point):
    root, source = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    shutil.copytree(source.root, wd.root)
    before = digests(wd.root)
    cmd = _commands(root, wd)[command]
    _kill_mid_write(cmd, point, tmp_path / "mark", wd, before)
    after = digests(wd.root)
    # every file is the earlier version; only temporaries are left over, and the next run cleans the set ones
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(any(part.startswith(".") for part in Path(k).parts) for k in set(after) - set(before))
    if point == "set:1" and command in ("base import", "stack features"):  # the cheap ones: the next run succeeds and cleans up
        run_cli(*cmd)
        assert not [p for p in leftovers(wd.root) if SET_TMP in p or SET_OLD in p]


def test_sigkill_between_stacker_set_and_blend_is_detected_by_submit(pipeline_workdir, tmp_path):
    """stack fit replaces stack/<stacker>/ as a set, then writes blend.json: a kill between the two
    leaves a new, complete stacker set beside the old blend, which submit refuses in one line."""
    root, source = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    shutil.copytree(source.root, wd.root)
    before = digests(wd.root)
    cmd = _commands(root, wd)["stack fit"]
    in_flight = _kill_mid_write(cmd, "file=blend.json:1", tmp_path / "mark", wd, before, unchanged=False)
    assert in_flight.parent == wd.stack_root and in_flight.suffix == ".json"  # blend.json's temporary
    meta = read_json(wd.stack_dir("lgbm") / "meta.json")
    verify_set(wd.stack_dir("lgbm"), "meta.json", meta["sha256"], remedy="-")  # a complete new set
    assert digests(wd.root)["stack/blend.json"] == before["stack/blend.json"]
    proc = run_cli("submit", "--workdir", wd.root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "changed since stack/blend.json was fitted" in proc.stderr


def test_a_set_left_half_switched_is_recovered(tmp_path):
    """On a file system without an atomic exchange the switch is two renames; a kill between them
    leaves the old set under .<name>.old-*, which the next reader or writer moves back."""
    from stackkit.contract.io import recover_set

    folder = tmp_path / "preds" / "m"
    folder.mkdir(parents=True)
    (folder / "oof.parquet").write_bytes(b"old")
    (folder / "test.parquet").write_bytes(b"old")
    os.rename(folder, tmp_path / "preds" / f".m{SET_OLD}abc")
    (tmp_path / "preds" / f".m{SET_TMP}def").mkdir()
    assert Workdir(tmp_path).model_names() == ["m"]  # a reader moves the old set back ...
    assert (folder / "oof.parquet").read_bytes() == b"old"
    assert (tmp_path / "preds" / f".m{SET_TMP}def").is_dir()  # ... and leaves sets being written alone
    recover_set(folder)  # a writer cleans them
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["m"]


def test_sqlite_storage_on_a_foreign_file_is_one_line(pipeline_workdir, tmp_path):
    root, source = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    shutil.copytree(source.root, wd.root)
    before = digests(wd.root)
    proc = run_cli("stack", "fit", "--workdir", wd.root, "--stackers", "lgbm", "--tune", "--trials", 1, "--quiet",
                   "--storage", f"sqlite:///{wd.metadata}", check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "metadata.parquet" in lines[0] and "database" in lines[0], lines
    assert digests(wd.root) == before


def test_a_stacker_fold_mixed_from_two_runs_is_refused(pipeline_workdir, tmp_path):
    """Each fold model file has a valid sidecar, but stack/<name>/meta.json lists the set's hashes:
    a file taken from another fold (or run) is refused before any library reads it."""
    from stackkit.errors import ContractError
    from stackkit.stack.crossfit import load_stacker_models

    root, source = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    shutil.copytree(source.root, wd.root)
    assert len(load_stacker_models(wd, "lgbm")) == 3
    fold0, fold1 = wd.stack_dir("lgbm") / "fold0", wd.stack_dir("lgbm") / "fold1"
    name = sorted(p.name for p in fold0.iterdir() if not p.name.endswith(".sha256") and p.name != "stacker.json")[0]
    for file in (name, name + ".sha256"):
        shutil.copyfile(fold1 / file, fold0 / file)
    with pytest.raises(ContractError, match=rf"lgbm/fold0/{name}: sha256 \w+\.\.\. differs .*/meta\.json .*refit with `stack fit --stackers lgbm`"):
        load_stacker_models(wd, "lgbm")
