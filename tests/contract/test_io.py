"""stackkit.contract (work-directory paths, slice order) and stackkit.contract.io (atomic writes, readers, sidecars)."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import resolve_workdir, slice_order
from stackkit.contract.io import atomic_path, read_artifact, read_table, write_artifact, write_parquet
from stackkit.errors import ContractError, StackkitError


def test_workdir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("STACKKIT_WORKDIR", raising=False)
    assert str(resolve_workdir(None)) == "artifacts"
    monkeypatch.setenv("STACKKIT_WORKDIR", str(tmp_path))
    assert resolve_workdir(None) == tmp_path
    assert str(resolve_workdir("elsewhere")) == "elsewhere"


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
