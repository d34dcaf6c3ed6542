"""PostgreSQL-backed tuning with real `stack fit --tune` processes (several machines' setup).

Needs a PostgreSQL server: $STACKKIT_TEST_POSTGRES_URL (.ci/run starts one), else a
throwaway cluster started by the `postgres_url` fixture, else skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from stackkit.contract import Workdir

from stackkit.testing.cli import CLI, run_cli

optuna = pytest.importorskip("optuna")


def _copy(pipeline_workdir, tmp_path, name):
    _, wd = pipeline_workdir
    copy = Workdir(tmp_path / name)
    shutil.copytree(wd.root, copy.root)
    return copy


def _tune_args(wd, url, study, trials, *extra):
    return ["stack", "fit", "--workdir", str(wd.root), "--stackers", "lgbm", "--base-in-blend", "--tune", "--trials", str(trials),
            "--storage", url, "--study-name", study, "-q", *extra]


def test_two_workers_share_one_study(pipeline_workdir, tmp_path, postgres_url):
    study = f"share-{uuid.uuid4().hex[:8]}"
    # two workers on one machine: one thread each (OpenMP threads over the core count spin-wait
    # and run several times slower), and no time budget, so that each really runs its 3 trials
    env = {**os.environ, "STACKKIT_THREADS": "1"}
    workers = [
        subprocess.Popen([*CLI, *_tune_args(_copy(pipeline_workdir, tmp_path, f"w{i}"), postgres_url, study, 3, "--timeout", "3600")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    for proc in workers:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    for suffix in ("lgbm", "blend"):
        trials = optuna.load_study(study_name=f"{study}-{suffix}", storage=postgres_url).get_trials(deepcopy=False)
        numbers = [t.number for t in trials]
        assert len(trials) == 6, f"{suffix}: expected 3 + 3 trials, got {len(trials)}"
        assert sorted(numbers) == list(range(6))  # no duplicate trial numbers
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert complete
        loaded = optuna.load_study(study_name=f"{study}-{suffix}", storage=postgres_url)
        assert loaded.best_value == pytest.approx(min(t.value for t in complete))


def test_killed_worker_trial_is_failed_and_retried(pipeline_workdir, tmp_path, postgres_url):
    study = f"kill-{uuid.uuid4().hex[:8]}"
    victim = subprocess.Popen([*CLI, *_tune_args(_copy(pipeline_workdir, tmp_path, "victim"), postgres_url, study, 50, "--heartbeat", "1")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    running = None
    deadline = time.time() + 180
    while time.time() < deadline and running is None:
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name=f"{study}-lgbm", storage=postgres_url).get_trials(deepcopy=False)
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

    run_cli(*_tune_args(_copy(pipeline_workdir, tmp_path, "survivor"), postgres_url, study, 2, "--heartbeat", "1"))
    trials = optuna.load_study(study_name=f"{study}-lgbm", storage=postgres_url).get_trials(deepcopy=False)
    killed = next(t for t in trials if t.number == running)
    assert killed.state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == running]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE
    # the retry fixes every parameter the killed trial had drawn; the killed worker may have
    # died between two suggest calls, so the retry draws the rest itself
    assert killed.params and killed.params.items() <= retried[0].params.items()


@pytest.mark.parametrize("problem", ["wrong-password", "server-down"])
def test_unreachable_database_is_one_line_exit_2(pipeline_workdir, tmp_path, postgres_url, problem):
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    url = url.set(password="definitely-wrong") if problem == "wrong-password" else url.set(port=1)
    text = url.render_as_string(hide_password=False)
    wd = _copy(pipeline_workdir, tmp_path, "w")
    proc = run_cli(*_tune_args(wd, text, "x", 1), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "cannot connect" in lines[0]
    assert "definitely-wrong" not in proc.stderr  # the password is never echoed
