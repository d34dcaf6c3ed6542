"""The Optuna storages of `stack fit --tune` (stackkit.stack.storage): one shared test class, one
subclass per storage stackkit supports (the pattern of Optuna's own ``storages/`` tests and of
tests/stack/test_stackers.py's ``TestStacker``).

``StorageTests`` holds what every storage must do: a rerun continues the study, and a URL that
cannot be opened is one line without the password. ``SeveralWorkersTests`` adds what only the
storages meant for several workers at once must do (two processes share one study); SQLite is
not one of them (concurrent writers hit "database is locked", see stackkit/stack/storage.py), so
``TestSQLite`` does not inherit it. PostgreSQL tests need a server: $STACKKIT_TEST_POSTGRES_URL
(.ci/run starts one), else a throwaway cluster started by the ``postgres_url`` fixture, else
they skip; its refusals that need no server run either way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from stackkit.contract import Workdir
from stackkit.errors import StackkitError
from stackkit.stack.storage import make_storage, redact_url
from stackkit.stack.blend_search import search_blend
from stackkit.testing.cli import CLI, run_cli
from stackkit.testing.stack import base_model_workdir, synthetic_sources

optuna = pytest.importorskip("optuna")

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tiny_blend_problem():
    preds, y, _ = synthetic_sources(300, [2.0, 0.5], seed=6)
    return preds, y, ["s1", "s2"]


def _copy(pipeline_workdir, tmp_path, name) -> Workdir:
    _, wd = pipeline_workdir
    copy = Workdir(tmp_path / name)
    shutil.copytree(wd.root, copy.root)
    return copy


def _tune_args(wd, url, study, trials, *extra):
    return ["stack", "fit", "--workdir", str(wd.root), "--stackers", "lgbm", "--base-in-blend", "--tune", "--trials", str(trials),
            "--storage", url, "--study-name", study, "-q", *extra]


class StorageTests:
    """What every storage does. A subclass gives the ``url`` fixture (the --storage value; None is
    the default journal), ``written`` (the file the storage keeps, or None for a server) and the
    ``bad`` fixture: (url, message) pairs refused in one line without needing a server."""

    @pytest.fixture
    def url(self, tmp_path):
        raise NotImplementedError

    @pytest.fixture
    def bad(self, request):
        raise NotImplementedError

    def written(self, url, wd: Workdir) -> Path | None:
        raise NotImplementedError

    def test_rerun_continues_the_same_study(self, url, tmp_path):
        wd = Workdir(tmp_path / "work")
        preds, y, names = _tiny_blend_problem()
        kwargs = dict(per_label=False, any_consistency=True, trials=4, seed=0, study_name=f"cont-{uuid.uuid4().hex[:8]}")
        _, first = search_blend(preds, y, names, storage=make_storage(url, wd), **kwargs)
        _, second = search_blend(preds, y, names, storage=make_storage(url, wd), **kwargs)
        kept = self.written(url, wd)
        assert kept is None or (kept.is_file() and kept.stat().st_size > 0)
        assert (first.trials_total, second.trials_total) == (4, 8)
        assert second.trials_run == 4
        assert second.best_value <= first.best_value

    def test_refusals_are_one_line_without_password(self, bad, tmp_path):
        url, match = bad
        (tmp_path / "afile").write_text("a file, not a folder")
        url = url.replace("{tmp}", str(tmp_path))
        with pytest.raises(StackkitError, match=match) as info:
            make_storage(url, Workdir(tmp_path / "work"))
        message = str(info.value)
        assert "\n" not in message and "s3cr3tpw" not in message


# The worker of SeveralWorkersTests: `stack fit --tune` through the library, so that the default
# journal (url "") needs no --storage; prints how many blend trials this process ran.
WORKER = textwrap.dedent(
    """
    import sys
    from stackkit.contract import Workdir
    from stackkit.stack.fit import run_stack_fit
    root, url, study, trials, seed, stackers = sys.argv[1:7]
    summary = run_stack_fit(Workdir.resolve(root), stackers=[s for s in stackers.split(",") if s], blend_base_models=True, tune=True,
                            trials=int(trials), seed=int(seed), timeout=3600, storage=url or None, study_name=study, progress=False)
    print(summary.studies["blend"].trials_run)
    """
)


class SeveralWorkersTests(StorageTests):
    """What storages shared by several workers at once do. A subclass gives ``stackers`` (fitted
    by each worker besides the blend) and ``worker_workdirs`` (one work directory per worker:
    the same one on one machine, copies for several machines)."""

    stackers: tuple[str, ...] = ()
    trials = 3  # per worker and study

    @pytest.fixture
    def worker_workdirs(self, tmp_path):
        raise NotImplementedError

    def test_two_workers_share_one_study(self, url, worker_workdirs):
        """Two `stack fit --tune` processes at once: no errors, one study per stacker and one for the
        blend, holding both processes' trials without duplicate numbers or failed trials."""
        study, trials = f"share-{uuid.uuid4().hex[:8]}", self.trials
        # one thread per worker: OpenMP threads over the core count spin-wait and run several times slower
        env = {**os.environ, "STACKKIT_THREADS": "1"}
        procs = [
            subprocess.Popen([sys.executable, "-c", WORKER, str(wd.root), url or "", study, str(trials), str(seed), ",".join(self.stackers)],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for seed, wd in enumerate(worker_workdirs)
        ]
        outputs = [p.communicate(timeout=600) for p in procs]
        for proc, (out, err) in zip(procs, outputs):
            assert proc.returncode == 0, err[-2000:]
            assert out.strip().splitlines()[-1] == str(trials)
        storage = make_storage(url, worker_workdirs[0])
        for suffix in (*self.stackers, "blend"):
            loaded = optuna.load_study(study_name=f"{study}-{suffix}", storage=storage)
            found = loaded.get_trials(deepcopy=False)
            assert len(found) == 2 * trials, f"{suffix}: expected {trials} + {trials} trials, got {len(found)}"
            assert sorted(t.number for t in found) == list(range(2 * trials))  # no duplicate trial numbers
            assert not [t for t in found if t.state == optuna.trial.TrialState.FAIL]
            complete = [t for t in found if t.state == optuna.trial.TrialState.COMPLETE]
            assert complete and loaded.best_value == pytest.approx(min(t.value for t in complete))
            if suffix == "blend":
                assert len(complete) == 2 * trials  # the blend's study prunes nothing
        for wd in worker_workdirs:
            assert json.loads(wd.blend.read_text())["optuna"]["studies"]["blend"]["name"] == f"{study}-blend"


class TestJournal(SeveralWorkersTests):
    """The default: ``WORKDIR/optuna/journal.log`` (JournalFileBackend), appends under a file lock."""

    trials = 6  # the blend alone is quick: more trials, more appends racing for the lock

    @pytest.fixture
    def url(self):
        return None

    @pytest.fixture
    def worker_workdirs(self, tmp_path):
        wd = base_model_workdir(tmp_path / "work", n_patients=16)
        return [wd, wd]  # two processes on one machine, one work directory: the default journal is shared

    @pytest.fixture(params=[("journal:", "needs a file path")], ids=["journal-without-path"])
    def bad(self, request):
        return request.param

    def written(self, url, wd):
        return wd.optuna_journal

    def test_journal_path_forms(self, tmp_path):
        wd = Workdir(tmp_path / "work")
        for url in (f"journal:{tmp_path / 'a.log'}", str(tmp_path / "b" / "c.log")):
            storage = make_storage(url, wd)
            optuna.create_study(study_name="x", storage=storage, load_if_exists=True).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        assert (tmp_path / "a.log").stat().st_size > 0 and (tmp_path / "b" / "c.log").stat().st_size > 0


class TestSQLite(StorageTests):
    """``sqlite:///PATH``: one worker at a time (not a SeveralWorkersTests: concurrent writers hit "database is locked")."""

    @pytest.fixture
    def url(self, tmp_path):
        return f"sqlite:///{tmp_path / 'db' / 'optuna.db'}"

    @pytest.fixture(params=[("sqlite:///{tmp}/afile/x.db", "cannot create its folder")], ids=["folder-is-a-file"])
    def bad(self, request):
        return request.param

    def written(self, url, wd):
        return Path(url.removeprefix("sqlite:///"))


class TestPostgres(SeveralWorkersTests):
    """``postgresql://`` and ``postgresql+psycopg2://``: workers on several machines, each with its own
    work directory; a killed worker's trial is failed after the heartbeat's grace period and retried."""

    stackers = ("lgbm",)

    @pytest.fixture
    def url(self, postgres_url):
        return postgres_url

    @pytest.fixture
    def worker_workdirs(self, pipeline_workdir, tmp_path):
        return [_copy(pipeline_workdir, tmp_path, f"w{i}") for i in range(2)]

    @pytest.fixture(
        params=[
            ("postgresql://stack:s3cr3tpw@127.0.0.1:1/optuna", r"storage .postgresql://stack:\*\*\*@127.0.0.1:1/optuna.: cannot connect"),
            ("postgresql+psycopg2://stack:s3cr3tpw@127.0.0.1:1/optuna", "cannot connect.*database is up"),
        ],
        ids=["server-down", "server-down-psycopg2"],
    )
    def bad(self, request):
        return request.param

    def written(self, url, wd):
        return None

    def test_wrong_password_is_one_line_without_it(self, url, tmp_path):
        from sqlalchemy.engine import make_url

        wrong = make_url(url).set(password="definitely-wrong-pw").render_as_string(hide_password=False)
        with pytest.raises(StackkitError, match="cannot connect") as err:
            make_storage(wrong, Workdir(tmp_path / "work"))
        assert "definitely-wrong-pw" not in str(err.value)

    def test_killed_worker_trial_is_failed_and_retried(self, url, pipeline_workdir, tmp_path):
        study = f"kill-{uuid.uuid4().hex[:8]}"
        victim = subprocess.Popen([*CLI, *_tune_args(_copy(pipeline_workdir, tmp_path, "victim"), url, study, 50, "--heartbeat", "1")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        running = None
        deadline = time.time() + 180
        while time.time() < deadline and running is None:
            time.sleep(0.3)
            try:
                trials = optuna.load_study(study_name=f"{study}-lgbm", storage=url).get_trials(deepcopy=False)
            except KeyError:  # the study does not exist yet
                continue
            # a trial is RUNNING before its parameters are drawn: kill it only once it has them
            started = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.params]
            if started:
                running = started[0].number
        assert running is not None, "the worker never started a trial"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        time.sleep(3)  # past the grace period (2 x heartbeat)

        run_cli(*_tune_args(_copy(pipeline_workdir, tmp_path, "survivor"), url, study, 2, "--heartbeat", "1"))
        trials = optuna.load_study(study_name=f"{study}-lgbm", storage=url).get_trials(deepcopy=False)
        killed = next(t for t in trials if t.number == running)
        assert killed.state == optuna.trial.TrialState.FAIL
        retried = [t for t in trials if t.system_attrs.get("failed_trial") == running]
        assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE
        # the retry fixes every parameter the killed trial had drawn; the killed worker may have
        # died between two suggest calls, so the retry draws the rest itself
        assert killed.params and killed.params.items() <= retried[0].params.items()

    @pytest.mark.parametrize("problem", ["wrong-password", "server-down"])
    def test_unreachable_database_is_one_line_exit_2(self, url, pipeline_workdir, tmp_path, problem):
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        parsed = parsed.set(password="definitely-wrong") if problem == "wrong-password" else parsed.set(port=1)
        text = parsed.render_as_string(hide_password=False)
        wd = _copy(pipeline_workdir, tmp_path, "w")
        proc = run_cli(*_tune_args(wd, text, "x", 1), check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert "cannot connect" in lines[0]
        assert "definitely-wrong" not in proc.stderr  # the password is never echoed


# --- no storage at all ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, match",
    [
        ("foo://host/db", r"unknown scheme 'foo'; accepted: .*sqlite.*postgresql"),
        ("redis://localhost:6379", "unknown scheme 'redis'"),
    ],
)
def test_unknown_schemes_are_one_line(url, match, tmp_path):
    with pytest.raises(StackkitError, match=match) as info:
        make_storage(url, Workdir(tmp_path / "work"))
    assert "\n" not in str(info.value)


def test_redact_url_hides_password():
    assert redact_url("postgresql+psycopg2://u:pass@db:5432/x") == "postgresql+psycopg2://u:***@db:5432/x"
    assert "pw" not in redact_url("mysql://root:pw@h/db")
