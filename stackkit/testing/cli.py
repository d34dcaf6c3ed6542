"""Run the command line in a real process, as a user would."""

from __future__ import annotations

import subprocess
import sys

# `python -m stackkit` runs the same CLI as `python cli.py` and the `stackkit` script
CLI = [sys.executable, "-m", "stackkit"]


def run_cli(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``python -m stackkit ARGS``; raises AssertionError with stderr's tail when ``check`` and it fails."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def one_line_error(result) -> str:
    """The one line a refused command printed (click's ``Error: ...``), asserted to be all it printed."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]
