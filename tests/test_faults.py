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
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stackkit.contract import Workdir, file_sha256
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


def _sigint_as_in_a_terminal() -> None:
    """The child's Ctrl-C: a shell running a job in the background (CI scripts, nohup) sets SIGINT to
    ignored, which children inherit and Python then keeps; a terminal's foreground job has it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_mid_write(cmd: list, point: str, mark: Path, wd: Workdir, before: dict, *, unchanged: bool = True,
                    sig: int = signal.SIGKILL) -> Path:
    env = dict(os.environ, **{HOLD_ENV: point, HOLD_MARK_ENV: str(mark)})
    proc = subprocess.Popen([*CLI, *map(str, cmd)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            preexec_fn=_sigint_as_in_a_terminal)
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
        proc.send_signal(sig)
        proc.wait(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # Ctrl-C: the command stops by itself, with no traceback
        stderr = proc.stderr.read().decode(errors="replace")
        assert proc.returncode not in (0, -signal.SIGKILL) and "Traceback" not in stderr, stderr[-2000:]
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


def _assert_stack_usable(wd: Workdir, tmp_path: Path) -> None:
    """Every stacker folder and blend.json source verifies, and `submit` writes the submission it wrote before."""
    for folder in sorted(p for p in wd.stack_root.iterdir() if p.is_dir()):
        verify_set(folder, folder / "meta.json", read_json(folder / "meta.json")["sha256"], remedy="-")
    for source in read_json(wd.blend)["sources"]:
        assert file_sha256(wd.root / source["test"]) == source["test_sha256"], source["name"]
    out = tmp_path / "again.csv"
    run_cli("submit", "--workdir", wd.root, "--out", out)
    assert out.read_bytes() == wd.submission.read_bytes()


# stack/ is one set: while `stack fit` runs, its new stacker folders, blend.json and report.html are
# built in .stack.tmp-*. Interrupted with the first stacker's folder written (the second not fitted yet),
# with blend.json's temporary written, or with the whole new stack/ ready but not switched in.
INTERRUPT_POINTS = ["set=lgbm:1", "file=blend.json:1", "set=stack:1"]


@pytest.mark.parametrize("point", INTERRUPT_POINTS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_stack_fit_leaves_the_previous_stack_usable_by_submit(pipeline_workdir, tmp_path, point, sig):
    root, source = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    shutil.copytree(source.root, wd.root)
    before = digests(wd.root)
    cmd = ["stack", "fit", "--workdir", wd.root, "--stackers", "lgbm,mlp", "--seed", 1, "--quiet"]
    in_flight = _kill_mid_write(cmd, point, tmp_path / "mark", wd, before, sig=sig)
    assert any(part.startswith(f".stack{SET_TMP}") for part in in_flight.relative_to(wd.root).parts), in_flight
    visible = {k: v for k, v in digests(wd.root).items() if not any(part.startswith(".") for part in Path(k).parts)}
    assert visible == before  # blend.json, every stacker's files and fold models: the previous run's
    if sig == signal.SIGINT:
        assert not leftovers(wd.root)  # Ctrl-C cleans up; after SIGKILL the next writer does
    _assert_stack_usable(wd, tmp_path)


def test_ctrl_c_while_stackers_train_leaves_the_previous_stack_usable_by_submit(pipeline_workdir, tmp_path):
    """No hook: SIGINT as soon as the new stack/ set exists (fitting starts right after), as Ctrl-C would."""
    root, source = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    shutil.copytree(source.root, wd.root)
    before = digests(wd.root)
    cmd = ["stack", "fit", "--workdir", wd.root, "--stackers", "lgbm,mlp", "--seed", 1, "--quiet"]
    proc = subprocess.Popen([*CLI, *map(str, cmd)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_sigint_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while not list(wd.root.glob(f".stack{SET_TMP}*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "stack fit ended before it could be interrupted"
        time.sleep(0.5)
        assert wd.blend.read_bytes() == source.blend.read_bytes()  # still fitting: nothing switched in
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err.decode(errors="replace"), err[-2000:]
    assert digests(wd.root) == before and not leftovers(wd.root)
    _assert_stack_usable(wd, tmp_path)


def _file_in_place(path_of, args_of):
    """A plain file of the user's where the step writes a folder: (the file, the command)."""

    def setup(root: Path, wd: Workdir):
        path = path_of(wd)
        if path.is_dir():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the user's own file\n")
        return path, args_of(root, wd)

    return setup


def _set_message(path_of):
    return lambda wd: (rf"^Error: {re.escape(str(path_of(wd)))}: exists as a file where stackkit writes the folder "
                       rf"{re.escape(path_of(wd).name)}/; the file is left as it is")


def _step(command):
    return lambda root, wd: _commands(root, wd)[command]


def _train(root, wd):
    return ["base", "train", "--workdir", wd.root, "--name", "cnn", "--epochs", 1, "--img-size", 32, "--quiet"]


def _submit_to(out_of):
    return lambda root, wd: ["submit", "--workdir", wd.root, "--out", out_of(wd)]


# (case, setup, expected line): every step that writes, with a file where it writes a set (or where the
# submission goes). data/ is the data step's set: it is refused by the same shared set writer.
FILE_IN_PLACE = [
    ("data prepare: data/", _file_in_place(lambda wd: wd.data_dir, _step("data prepare")), _set_message(lambda wd: wd.data_dir)),
    ("base import: preds/m1/", _file_in_place(lambda wd: wd.preds_dir("m1"), _step("base import")),
     _set_message(lambda wd: wd.preds_dir("m1"))),
    ("base import: preds/", _file_in_place(lambda wd: wd.preds_root, _step("base import")),
     lambda wd: rf"^Error: {re.escape(str(wd.preds_dir('m1')))}: cannot write: a part of the path is a file, not a folder"),
    ("base train: preds/cnn/", _file_in_place(lambda wd: wd.preds_dir("cnn"), _train), _set_message(lambda wd: wd.preds_dir("cnn"))),
    ("stack features: features/", _file_in_place(lambda wd: wd.features_dir, _step("stack features")),
     _set_message(lambda wd: wd.features_dir)),
    ("stack fit: stack/", _file_in_place(lambda wd: wd.stack_root, _step("stack fit")), _set_message(lambda wd: wd.stack_root)),
    ("submit: --out under a file", _file_in_place(lambda wd: wd.root / "notes", _submit_to(lambda wd: wd.root / "notes" / "s.csv")),
     lambda wd: rf"^Error: {re.escape(str(wd.root / 'notes' / 's.csv'))}: cannot write: a part of the path is a file"),
]


@pytest.mark.parametrize("case, setup, message", FILE_IN_PLACE, ids=[c[0] for c in FILE_IN_PLACE])
def test_a_file_where_a_step_writes_is_refused_and_left_untouched(pipeline_workdir, tmp_path, case, setup, message):
    root, source = pipeline_workdir
    wd = Workdir(tmp_path / "work")
    shutil.copytree(source.root, wd.root)
    blocker, args = setup(root, wd)
    before = digests(wd.root)
    proc = run_cli(*args, check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and re.search(message(wd), lines[0]), lines
    assert blocker.read_bytes() == b"the user's own file\n"
    assert digests(wd.root) == before
    assert not leftovers(wd.root) and not [p for p in wd.root.rglob(".*")], list(wd.root.rglob(".*"))


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



def test_ctrl_c_inside_a_c_extension_import_is_an_interrupt_not_a_traceback():
    """Ctrl-C while a compiled module initializes reaches the command as ImportError("initialization
    failed") with the KeyboardInterrupt as its context: the user still gets click's "Aborted!"."""
    import click
    from click.testing import CliRunner

    from stackkit.cli import StackkitGroup

    group = StackkitGroup()

    @group.command()
    def importing():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")

    @group.command()
    def failing():
        raise ImportError("no module named nothing")

    result = CliRunner().invoke(group, ["importing"])
    assert result.exit_code == 1 and "Aborted!" in result.output and isinstance(result.exception, SystemExit)
    result = CliRunner().invoke(group, ["failing"])  # a real import error stays one
    assert isinstance(result.exception, ImportError) and not isinstance(result.exception, click.Abort)
