"""A stacker's K fold models fitted side by side, one process per core.

A single-threaded stacker (``seq``: a GRU over small study batches, which a second thread does
not speed up but makes spin-wait) leaves every other core idle for its whole fit. Its folds are
independent, so they are fitted in a pool of ``spawn``-ed processes, one per core: a fresh
interpreter each (no OpenMP thread pool inherited from a parent that ran LightGBM, which a
``fork`` would copy in a broken state). Each worker gets one fold's rows, fits with the fold's
own seed, and saves the model in the stacker's own safe format (never a pickle) to a temporary
folder; the parent loads it from there. A fold model is then the same, bit for bit, as a fit of
that fold in the parent process: same rows, same seed, one thread.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from stackkit.stack.inputs import StackData
from stackkit.stack.stackers import get_stacker
from stackkit.stack.stackers.base import Stacker, default_threads


def fold_processes(stacker: Stacker, params: dict, n_folds: int) -> int:
    """How many processes fit the folds: one (in this process) unless the stacker runs single-threaded
    on the CPU, else one per core this process may use ($STACKKIT_THREADS caps it), at most one per fold."""
    if n_folds < 2 or not stacker.fits_folds_apart(params):
        return 1
    return max(1, min(n_folds, default_threads()))


def _fit_and_save(name: str, params: dict, train: StackData, valid: StackData, seed: int, folder: str) -> None:
    get_stacker(name).fit(train, valid, params, seed=seed).save(folder)


def fit_folds_in_processes(name: str, params: dict, folds: list[int], job, processes: int, on_done=None) -> dict[int, Stacker]:
    """``job(k)`` -> (training rows, early-stopping rows, seed) of fold ``k``. Returns fold -> the fitted stacker.

    At most ``processes`` folds are in flight, and a fold's rows are taken only when it is
    submitted, so this process holds no more row copies than there are workers.
    ``on_done(k)`` is called in this process as each fold's model arrives (a progress bar).
    An error in a worker is raised here, as a fit in this process would raise it.
    """
    stacker_class = type(get_stacker(name))
    models: dict[int, Stacker] = {}
    waiting = list(folds)
    with tempfile.TemporaryDirectory(prefix=f"stackkit-{name}-folds-") as scratch:
        with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {}

            def submit_next() -> None:
                k = waiting.pop(0)
                train, valid, seed = job(k)
                pending[pool.submit(_fit_and_save, name, params, train, valid, seed, str(Path(scratch) / f"fold{k}"))] = k

            try:
                while waiting and len(pending) < processes:
                    submit_next()
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        k = pending.pop(future)
                        future.result()
                        models[k] = stacker_class.load(Path(scratch) / f"fold{k}")
                        if on_done is not None:
                            on_done(k)
                        if waiting:
                            submit_next()
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    return models
