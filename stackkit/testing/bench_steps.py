"""Benchmark steps: one CLI command in a child process, timed (wall, CPU, peak memory), as a user runs it.

Used by bench/bench_stack.py and bench/bench_defaults.py (through :mod:`stackkit.testing.stack_bench`)
and by the tests that run them small.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import stackkit
from stackkit.testing.cli import CLI

# The checkout (or site-packages folder) this stackkit was imported from: children import the same code.
SOURCE_ROOT = Path(stackkit.__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    wall_s: float
    peak_mib: float
    returncode: int
    log: Path
    cpu_s: float = float("nan")  # user + system CPU: on a busy machine, closer than wall to what an idle one takes

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3), "peak_mib": round(self.peak_mib, 1),
                "returncode": self.returncode}


def _tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants now (Linux /proc; those that cannot be read are left out)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack.extend(int(child) for child in children.read().split())
        except (OSError, ValueError):
            continue
        found.append(current)
    return found


def _rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
    except (OSError, ValueError):
        return 0


def _own_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` itself (not its children), from /proc (0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class _TreePeak(threading.Thread):
    """The largest summed RSS of a process tree, sampled every 0.2 s: a step whose work runs in worker
    processes (seq's folds) holds the sum of them at once, which no single ru_maxrss shows. And the CPU
    of every process seen in the tree: seq's fold workers are children of a fork server, which the
    step's process never waits for, so wait4's rusage leaves them out."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.done = pid, 0, threading.Event()
        self.cpu_by_pid: dict[int, float] = {}

    def run(self) -> None:
        while not self.done.wait(0.2):
            tree = _tree_pids(self.pid)  # one walk per sample serves both figures
            self.peak_kib = max(self.peak_kib, sum(_rss_kib(pid) for pid in tree))
            for pid in tree:
                self.cpu_by_pid[pid] = max(self.cpu_by_pid.get(pid, 0.0), _own_cpu_s(pid))

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_by_pid.values())


def run_step(name: str, args: list, log_dir: Path, env: dict) -> Step:
    """``python -m stackkit ARGS`` in a child; wall time and peak RSS: the child's (wait4's ru_maxrss)
    or, when larger, its process tree's summed at one time (sampled)."""
    log = log_dir / f"{name.replace(' ', '_')}.log"
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, cwd=SOURCE_ROOT, env=env)
        sampler = _TreePeak(proc.pid)
        sampler.start()
        # wait4 rather than proc.wait(): its rusage is this child's (and its waited-for descendants')
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux
    # the tree's CPU as sampled misses at most a sample's worth of each process; wait4's misses the fork server's workers
    cpu = max(usage.ru_utime + usage.ru_stime, sampler.cpu_s)
    return Step(name, wall, max(usage.ru_maxrss, sampler.peak_kib) / 1024.0, proc.returncode, log, cpu)


def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["STACKKIT_THREADS"] = str(threads)
    return env


def step_runner(label: str, logs: Path, env: dict, steps: list):
    """``step(name, *cli_args)``: runs one step, appends it to ``steps``; a failed step ends the benchmark with its log's tail."""
    def step(name, *cli_args):
        result = run_step(name, list(cli_args), logs, env)
        steps.append(result)
        if result.returncode != 0:
            tail = result.log.read_text()[-3000:]
            raise SystemExit(f"{label}: `{name}` failed (exit {result.returncode}); log {result.log}:\n{tail}")
        return result
    return step


def step_timings(steps: list[Step]) -> dict:
    """Per step wall time and peak memory, the imports also summed over models."""
    imports = [s for s in steps if s.name.startswith("base import")]
    timings = {s.name: s.as_dict() for s in imports}
    if imports:
        timings["base import (all models)"] = {"wall_s": round(sum(s.wall_s for s in imports), 3), "cpu_s": round(sum(s.cpu_s for s in imports), 3),
                                               "peak_mib": round(max(s.peak_mib for s in imports), 1), "returncode": 0}
    timings.update({s.name: s.as_dict() for s in steps if s not in imports})
    return timings


def _import_help(env: dict) -> str:
    return subprocess.run([*CLI, "base", "import", "--help"], capture_output=True, text=True, cwd=SOURCE_ROOT, env=env).stdout


def import_supports_embeddings(env: dict) -> bool:
    return "--oof-embeddings" in _import_help(env)


def import_supports_test_folds(env: dict) -> bool:
    """Whether this checkout's `base import` takes each fold model's test predictions (--test-fold)."""
    return "--test-fold" in _import_help(env)


class PeakRSS:
    """Peak RSS while the block runs: the kernel's high-water mark, reset on entry (Linux clear_refs)."""

    def __enter__(self):
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
            self.reset = True
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        self.peak_mib = float("nan")
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        self.peak_mib = int(line.split()[1]) / 1024.0
        except OSError:
            import resource

            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return False
