"""A stacker's K folds: the early-stopping split inside each, and the K fold models fitted in this
process or side by side, one process per core.

A single-threaded stacker (``seq``: a GRU over small study batches, which a second thread does
not speed up but makes spin-wait) leaves every other core idle for its whole fit. Its folds are
independent, so they are fitted in a pool of processes, one per core, forked from a fork server
(a fresh interpreter that imported torch once and never ran an OpenMP thread pool, which a
``fork`` of this process, after LightGBM, would copy in a broken state). Each worker gets one
fold's rows and this process's environment, fits with the fold's own seed, and saves the model in
the stacker's own safe format (never a pickle) to a temporary folder; the parent loads it from
there. A fold model is then the same, bit for bit, as a fit of that fold in the parent process:
same rows, same seed, one thread.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stackkit.errors import StackkitError
from stackkit.stack.inputs import StackData
from stackkit.stack.stackers import STACKERS, get_stacker
from stackkit.stack.stackers.base import Stacker, default_threads

EARLY_STOPPING_FRACTION = 0.15


def early_stopping_split(
    folds: np.ndarray, groups: np.ndarray, held_out_fold: int, seed: int = 0, valid_fraction: float = EARLY_STOPPING_FRACTION,
    exclude_fold: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (fit, early-stopping) inside the training folds of ``held_out_fold``.

    Patients (``groups``) are never split between the two parts, and no row of the held-out
    fold appears in either: early stopping on it would leak that fold's labels into its OOF.
    No row of ``exclude_fold`` either (tuning's outer fold, see ``fit_stacker``).
    """
    from sklearn.model_selection import GroupShuffleSplit

    folds = np.asarray(folds)
    training = folds != held_out_fold
    if exclude_fold is not None:
        training &= folds != exclude_fold
    training_rows = np.flatnonzero(training)
    if len(training_rows) == 0:
        raise StackkitError(f"fold {held_out_fold}: no training rows in the other folds; data/folds.parquet needs at least 2 folds")
    training_groups = np.asarray(groups)[training_rows]
    if len(np.unique(training_groups)) < 2:
        raise StackkitError(f"fold {held_out_fold}: the other folds hold one patient only; need several for an early-stopping split")
    splitter = GroupShuffleSplit(n_splits=1, test_size=valid_fraction, random_state=int(seed) * 1000 + int(held_out_fold))
    fit_part, valid_part = next(splitter.split(training_rows, groups=training_groups))
    return training_rows[np.sort(fit_part)], training_rows[np.sort(valid_part)]


# What one worker holds, in copies of its training rows' features: the rows and its unpickling
# buffer, and seq's standardized rows forward and reversed, each wider than the features by the
# missing-value indicators; plus the interpreter with torch imported. Measured at 48k slices
# (595 features, a fold's rows 63 MiB): 792 MiB at most, 290 MiB of it the interpreter.
WORKER_ROW_COPIES = 8
WORKER_BASE_BYTES = 300 << 20


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none: not Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fold_processes(stacker: Stacker, params: dict, n_folds: int, fold_bytes: int = 0) -> int:
    """How many processes fit the folds: one (in this process) unless the stacker runs single-threaded
    on the CPU. Else one per core ($STACKKIT_THREADS caps the cores), plus one when the folds do not
    divide evenly over the cores: 5 folds on 2 cores in 3 processes take the time of 2.5 folds (the
    system shares the cores), in 2 processes that of 3. Never more than the folds, nor than the
    memory available holds (``fold_bytes``: one fold's training features)."""
    if n_folds < 2 or not fits_apart(stacker, params):
        return 1
    cores = default_threads()
    wanted = min(n_folds, cores if n_folds % cores == 0 else cores + 1)
    available = available_memory_bytes()
    if available is not None:
        per_worker = WORKER_ROW_COPIES * int(fold_bytes) + WORKER_BASE_BYTES
        wanted = min(wanted, int(0.8 * available) // per_worker)
    return max(1, wanted)


# what every fold worker imports: once, in the fork server, instead of once per worker (~3 s of CPU
# each, and 1.5 s more for torch._dynamo, which torch.optim's optimizers import when first built)
WORKER_PRELOAD = ("torch", "torch._dynamo", "stackkit.stack.folds")


def _worker_context():
    """Workers forked from a fork server: a fresh interpreter that imported torch and the stackers and
    never ran a thread pool. (``fork`` from this process would copy the OpenMP pool LightGBM left
    here, broken; ``spawn`` imports everything again in every worker.)"""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    return context


def fits_apart(stacker: Stacker, params: dict) -> bool:
    """Whether ``stacker`` fits its folds in processes on this machine (single-threaded, several cores)."""
    return stacker.fits_folds_apart(params) and default_threads() >= 2


def start_fold_workers(stackers: dict[str, dict | None]) -> None:
    """Start the fork server now if one of ``stackers`` (name -> parameters) fits its folds in
    processes: it imports torch while this process reads its inputs and fits the others."""
    for name, params in stackers.items():
        stacker = get_stacker(name)
        if fits_apart(stacker, stacker.resolve_params(params)):
            _ensure_fork_server(_worker_context())
            return


def _ensure_fork_server(context) -> None:
    """Start the fork server (if ``context`` is one) with Ctrl-C ignored: it shares the terminal's
    process group, and a Ctrl-C during its imports would print their traceback under the user's
    command. (It ignores Ctrl-C by itself once they are done; its workers take it back.)"""
    import signal
    import threading
    from multiprocessing import forkserver

    if context.get_start_method() != "forkserver":
        return
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    # the server inherits the ignored signal through exec; a Ctrl-C in this instant is not lost, only late
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def fold_worker_pool(processes: int) -> ProcessPoolExecutor:
    """``processes`` workers from the fork server, each with this process's environment of now."""
    context = _worker_context()
    _ensure_fork_server(context)
    return ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_start_worker, initargs=(dict(os.environ),))


def _start_worker(environment: dict) -> None:
    import signal

    # a forked worker has the fork server's environment, from when it started: use the parent's now, as a spawned one would
    os.environ.clear()
    os.environ.update(environment)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores Ctrl-C; a fold being fitted stops on it


def _fit_and_save(name: str, params: dict, train: StackData, valid: StackData, seed: int, folder: str) -> None:
    get_stacker(name).fit(train, valid, params, seed=seed).save(folder)


def fit_folds_in_processes(name: str, params: dict, folds: list[int], job, processes: int, on_done=None) -> dict[int, Stacker]:
    """``job(k)`` -> (training rows, early-stopping rows, seed) of fold ``k``. Returns fold -> the fitted stacker.

    At most ``processes`` folds are in flight, and a fold's rows are taken only when it is
    submitted, so this process holds no more row copies than there are workers.
    ``on_done(k)`` is called in this process as each fold's model arrives (a progress bar).
    An error in a worker is raised here, as a fit in this process would raise it.
    """
    stacker_class = STACKERS[name]
    models: dict[int, Stacker] = {}
    waiting = list(folds)
    with tempfile.TemporaryDirectory(prefix=f"stackkit-{name}-folds-") as scratch:
        with fold_worker_pool(processes) as pool:
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


@dataclass(frozen=True)
class FoldJobs:
    """fold k -> (its training rows, its early-stopping rows, its seed)."""

    inputs: "StackInputs"  # stackkit.stack.crossfit's
    seed: int
    exclude_fold: int | None

    def __call__(self, k: int):
        fit_rows, valid_rows = self.inputs.early_stopping_rows(k, self.seed, self.exclude_fold)
        return self.inputs.train.take(fit_rows), self.inputs.train.take(valid_rows), self.seed + k

    @property
    def fold_bytes(self) -> int:
        """About one fold's training features (all rows but one fold's)."""
        n_folds = max(2, self.inputs.n_folds)
        return int(self.inputs.train.X.nbytes * (n_folds - 1) / n_folds)


def fold_models(name: str, resolved: dict, wanted: list[int], job: FoldJobs, caches: dict | None, *, sequential: bool, progress: bool):
    """Yield (k, the stacker fitted with fold k held out) in fold order.

    A stacker that fits on one thread gets its folds fitted side by side in processes
    (:func:`fit_folds_in_processes`; the same models), unless the caller needs each fold before
    the next is fitted (``sequential``: tuning prunes a trial on its first folds) or keeps
    per-fold caches, which live in this process.
    """
    from tqdm.auto import tqdm

    processes = 1 if sequential or caches is not None else fold_processes(get_stacker(name), resolved, len(wanted), job.fold_bytes)
    with tqdm(total=len(wanted), desc=f"stack fit {name}", unit="fold", disable=not progress) as bar:
        if processes > 1:
            bar.set_postfix_str(f"{processes} processes")
            models = fit_folds_in_processes(name, resolved, wanted, job, processes, on_done=lambda _k: bar.update())
            yield from ((k, models[k]) for k in wanted)
            return
        for k in wanted:
            train, valid, fold_seed = job(k)
            cache = None if caches is None else caches.setdefault(k, {})
            yield k, get_stacker(name).fit(train, valid, resolved, seed=fold_seed, cache=cache)
            bar.update()
