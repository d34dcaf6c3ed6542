"""The benchmarks' step timer (stackkit.testing.bench_steps): what it counts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stackkit.testing.bench_steps import _TreePeak

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

# a parent that starts a busy child and exits without waiting for it, as `stack fit` leaves seq's fold
# workers to the fork server: their CPU is in no rusage that wait4 returns
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time\\nstart = time.process_time()\\nwhile time.process_time() - start < 1.0: pass"])
time.sleep(2.0)
"""


def test_a_steps_cpu_counts_the_processes_its_process_never_waits_for():
    proc = subprocess.Popen([sys.executable, "-c", PARENT])
    sampler = _TreePeak(proc.pid)
    sampler.start()
    _, _, usage = os.wait4(proc.pid, 0)
    sampler.done.set()
    sampler.join()
    assert usage.ru_utime + usage.ru_stime < 0.6  # the busy child is not in it
    assert sampler.cpu_s >= 0.8
    assert sampler.peak_kib > 0
