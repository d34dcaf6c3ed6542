"""stackkit.contract (work-directory paths, slice order) and stackkit.contract.io (atomic writes, readers, sidecars)."""

import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import Workdir, resolve_workdir, slice_order
from stackkit.contract.io import atomic_path, read_artifact, read_table, write_artifact, write_parquet
from stackkit.errors import ContractError, StackkitError


def test_workdir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("STACKKIT_WORKDIR", raising=False)
    assert str(resolve_workdir(None)) == "artifacts"
    monkeypatch.setenv("STACKKIT_WORKDIR", str(tmp_path))
    assert resolve_workdir(None) == tmp_path
    assert str(resolve_workdir("elsewhere")) == "elsewhere"
    # a plain string is a path too: Workdir("w").data_dir must not fail on str / str
    assert Workdir(str(tmp_path)).metadata == tmp_path / "data" / "metadata.parquet" == Workdir.of(str(tmp_path)).metadata


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "x.parquet"
    write_parquet(pd.DataFrame({"a": [1, 2]}), target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]


def test_atomic_write_survives_sigkill_mid_write(tmp_path):
    target = tmp_path / "big.parquet"
    write_parquet(pd.DataFrame({"a": np.arange(10)}), target)
    before = target.read_bytes()
    script = textwrap.dedent(
        f"""
        import os, signal
        from stackkit.contract.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"x" * 1000)
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    assert pd.read_parquet(target)["a"].tolist() == list(range(10))


def test_read_table_truncated_parquet_is_one_line(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(pd.DataFrame({"a": np.arange(100)}), path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ContractError, match=r"t\.parquet: not a readable Parquet") as info:
        read_table(path)
    assert "\n" not in str(info.value)


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "p.parquet")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_slice_order_is_z_then_image_id_inside_each_study():
    study = np.array([1, 0, 1, 0, 1, 1])
    z = np.array([5.0, 2.0, 5.0, 1.0, -3.0, 5.0])
    ids = np.array(["ID_c", "ID_x", "ID_a", "ID_y", "ID_z", "ID_b"], dtype=object)
    order = slice_order(study, z, ids)
    assert ids[order].tolist() == ["ID_y", "ID_x", "ID_z", "ID_a", "ID_b", "ID_c"]
    leading = np.array([1, 0, 0, 0, 0, 0])  # e.g. the test split sorted after train
    assert ids[slice_order(study, z, ids, leading=leading)].tolist() == ["ID_y", "ID_x", "ID_z", "ID_a", "ID_b", "ID_c"]
    assert ids[slice_order(study, z, ids, leading=1 - leading)][0] == "ID_c"


@pytest.mark.parametrize("damage, message", [
    (lambda path, sidecar: path.write_bytes(path.read_bytes()[:-3]), "sha256 mismatch"),
    (lambda path, sidecar: sidecar.unlink(), "sidecar m.bin.sha256 missing"),
    (lambda path, sidecar: sidecar.write_text(""), "unreadable sha256 sidecar"),
    (lambda path, sidecar: path.unlink(), "model file not found"),
])
def test_read_artifact_refuses_a_file_its_sidecar_does_not_vouch_for(tmp_path, damage, message):
    path = write_artifact(tmp_path / "m.bin", b"model bytes" * 100)
    assert read_artifact(path) == b"model bytes" * 100
    damage(path, path.with_name("m.bin.sha256"))
    with pytest.raises(StackkitError, match=message + r".*retrain it") as info:
        read_artifact(path, "retrain it")
    assert "\n" not in str(info.value)


WRITE_FAILURES = [
    # (exception raised by the write itself, message expected after the destination path)
    (OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"), r"cannot write: no space left on device; free some space"),
    (OSError(122, "Disk quota exceeded"), r"cannot write: disk quota exceeded"),
    (OSError(30, "Read-only file system"), r"cannot write: read-only file system; use --workdir on a writable disk"),
    (PermissionError(13, "Permission denied"), r"cannot write: permission denied"),
    (FileNotFoundError(2, "No such file or directory"), r"cannot write: no such file or folder"),
    (OSError("something else"), r"cannot write \(something else\)"),
]


@pytest.mark.parametrize("error, message", WRITE_FAILURES, ids=[str(e)[:30] for e, _ in WRITE_FAILURES])
def test_a_failed_write_names_the_destination_and_keeps_the_old_file(tmp_path, monkeypatch, error, message):
    from stackkit.contract.io import ArtifactWriteError

    target = tmp_path / "x.parquet"
    write_parquet(pd.DataFrame({"a": [1]}), target)
    before = target.read_bytes()

    def failing_write(self, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PAR1 half")
        raise error

    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing_write)
    with pytest.raises(ArtifactWriteError, match=rf"^{re.escape(str(target))}: {message}") as info:
        write_parquet(pd.DataFrame({"a": [2]}), target)
    assert "\n" not in str(info.value)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]


def test_a_failed_set_write_names_the_file_in_the_destination_and_keeps_the_old_set(tmp_path):
    from stackkit.contract.io import ArtifactWriteError, replace_dir, write_set_record

    folder = tmp_path / "preds" / "m"
    with replace_dir(folder) as new:
        (new / "oof.parquet").write_bytes(b"old oof")
        write_set_record(new, "model.json", {"name": "m"})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ArtifactWriteError, match=r"preds/m/test\.parquet: cannot write: no space left on device"):
        with replace_dir(folder) as new:
            (new / "oof.parquet").write_bytes(b"new oof")
            with atomic_path(new / "test.parquet") as tmp:
                raise OSError(28, "No space left on device")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["m"]


def test_the_cli_turns_any_oserror_into_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import stackkit.submit
    from stackkit.cli import cli

    def fail(*args, **kwargs):
        raise OSError("IOError: Error writing bytes to file. Detail: [errno 28] No space left on device")  # no filename

    monkeypatch.setattr(stackkit.submit, "write_submission", fail)
    result = CliRunner().invoke(cli, ["submit", "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: (a file stackkit was reading or writing): cannot read or write: no space left on device; free some space "
        "(or use --workdir on a larger disk) and rerun"
    ]


def test_a_set_switch_without_atomic_exchange_fails_back_to_the_old_set(tmp_path, monkeypatch):
    """Where renameat2 is missing the switch is two renames; a failure between them restores the old set."""
    import stackkit.contract.io as io

    folder = tmp_path / "m"
    with io.replace_dir(folder) as new:
        (new / "a").write_bytes(b"old")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    with io.replace_dir(folder) as new:
        (new / "a").write_bytes(b"new")
    assert (folder / "a").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(io.os, "rename", rename)
    with pytest.raises(io.ArtifactWriteError, match=r"m: cannot write: no space left"):
        with io.replace_dir(folder) as new:
            (new / "a").write_bytes(b"newer")
    assert (folder / "a").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("when", ["before", "while writing"])
def test_a_file_in_a_sets_place_is_refused_and_kept(tmp_path, when):
    """A plain file where a set's folder goes is the user's: refused in one line, never swapped away."""
    from stackkit.contract.io import replace_dir

    path = tmp_path / "features"
    if when == "before":
        path.write_text("notes")
    with pytest.raises(StackkitError, match=r"features: exists as a file where stackkit writes the folder features/; "
                                            r"the file is left as it is: move or rename it, or use another --workdir$"):
        with replace_dir(path) as folder:
            (folder / "train.parquet").write_bytes(b"new")
            if when == "while writing":
                path.write_text("notes")
    assert path.read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]  # no .features.tmp-* left


def test_a_staged_stack_names_its_files_as_they_will_be(tmp_path):
    wd = Workdir(tmp_path)
    staged = wd.staged_stack(tmp_path / ".stack.tmp-x")
    assert staged.blend == tmp_path / ".stack.tmp-x" / "blend.json" and staged.metadata == wd.metadata
    assert staged.published(staged.stack_dir("lgbm") / "oof.parquet") == wd.stack_dir("lgbm") / "oof.parquet"
    assert staged.published(wd.metadata) == wd.metadata and wd.published(wd.blend) == wd.blend


def test_keep_carries_old_entries_but_never_temporaries(tmp_path):
    from stackkit.contract.io import TMP_PREFIX, replace_dir

    path = tmp_path / "stack"
    (path / "xgb").mkdir(parents=True)
    (path / "xgb" / "meta.json").write_text("old")
    (path / f"{TMP_PREFIX}abc.json").write_text("half")  # left by a killed writer
    (path / "blend.json").write_text("old blend")
    with replace_dir(path, keep=True) as folder:
        (folder / "blend.json").write_text("new blend")
    assert sorted(p.name for p in path.iterdir()) == ["blend.json", "xgb"]
    assert (path / "blend.json").read_text() == "new blend" and (path / "xgb" / "meta.json").read_text() == "old"
