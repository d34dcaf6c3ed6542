"""`base train`: one CNN per fold of data/folds.parquet -> preds/<name>/{oof,test,test_fold<k>}.parquet, model.json.

Fold ``k``'s model is trained on the other folds' labeled images, predicts its own fold (the
out-of-fold predictions) and the test set; fold model k's test predictions are written as
``test_fold<k>.parquet`` (contract v3) and ``test.parquet`` is their mean.
Each fold's outcome is kept under ``preds/<name>/_work/`` (state_dict checkpoint with a sha256
sidecar, small OOF/test parquet files, a JSON record), so ``resume=True`` continues at the first
unfinished fold. Every fold is seeded from (seed, fold) alone, so a resumed run gives the same
files as an uninterrupted one (on CPU, bit for bit). The contract files are written only once
every fold is done.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir, folds_hash
from stackkit.contract.io import read_json
from stackkit.contract.records.task import read_task
from stackkit.errors import StackkitError

from base_models.config import NEIGHBOR_LR_SCALE, TrainOptions, TrainRun, resolve_device, resolve_folds, train_config
from base_models.data import SliceDataset, neighbor_table
from base_models.distributed import DistEnv, barrier, init_distributed, shutdown
from base_models.loop import Runner, cpu_threads_for, optimizer_groups, reverse_slices
from base_models.pseudo import read_pseudo_labels
from base_models.targets import TASK_WINDOWS, load_targets
from base_models.workspace import (WORK_DIR, check_model_folder, fold_done, fold_paths, fold_predictions, fold_summary, folds_to_run,
                                   model_info, probability_frame, save_checkpoint, say, write_fold, write_model_set)

# names tests, bench scripts and user code import from here
__all__ = ["NEIGHBOR_LR_SCALE", "TrainOptions", "cpu_threads_for", "optimizer_groups", "reverse_slices", "save_checkpoint", "train_base"]


@dataclass(frozen=True)
class TrainResult:
    """What one `base train` did (stackkit/cli.py renders it). On a torchrun rank other than 0 only
    ``name`` and ``rank`` are set: rank 0 reports the run."""

    name: str
    rank: int = 0
    complete: bool = False  # every fold done and preds/<name>/ written
    arch: str = ""
    context: int = 0
    folds: dict = field(default_factory=dict)  # done fold -> its OOF weighted log loss
    fold_priors: dict = field(default_factory=dict)  # done fold -> the prior's loss on it
    requested: tuple[int, ...] = ()  # the folds this run was asked for
    missing: tuple[int, ...] = ()  # folds still to train before preds/<name>/ can be written
    work: Path | None = None  # preds/<name>/_work/: each fold's outcome, kept for --resume
    directory: Path | None = None  # preds/<name>/
    seconds: float = 0.0
    images_per_second: float = 0.0
    undecodable: dict = field(default_factory=dict)  # image id -> why its slice could not be decoded (blank image used)
    oof_logloss: float | None = None  # over the columns learnt per slice (RSNA 2019: its metric)
    prior_logloss: float | None = None
    per_label: dict | None = None
    unit_metric: float | None = None  # a unit task's metric of the max over each unit's slices (None for RSNA 2019)
    unit_prior: float | None = None  # the task's metric of the training labels' rates
    embedding_dim: int | None = None
    fold_models: int = 0


def train_base(workdir: Workdir, options: TrainOptions | None = None, **fields) -> TrainResult:
    """Train ``arch`` on every requested fold; write preds/<name>/ when all folds are done:
    oof.parquet, test.parquet (the mean over the fold models) and one test_fold<k>.parquet per fold
    model (contract v3), listed in model.json's ``test_folds``.

    With ``embeddings`` (the default; ``--no-embeddings`` turns it off) each fold model also
    writes its pooled features before the head (contract v2): for its own fold's images (the OOF
    embeddings) and for every test image (``embeddings/test_fold<k>.npy``).

    ``arch="timm:<name>"`` trains any timm model: random weights, timm's published ones
    (``pretrained``) or a local .safetensors file (``weights``). ``amp``: mixed precision on CUDA.
    ``pseudo_labels``: one soft-label file per fold model (see base_models.pseudo), added to that
    fold model's training rows only.

    Returns a :class:`TrainResult`: per-fold and overall OOF weighted log loss, prior score, seconds,
    training images/s. ``on_fold_done(fold)`` is called after each fold's
    results are safely on disk (a hook for progress reporting and interruption tests).

    The keywords are :class:`~base_models.config.TrainOptions`' fields: pass them, or ``options``
    (then ``fields`` override it).
    """
    wd = Workdir.of(workdir)
    options = TrainOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    schema = read_task(wd)
    config = train_config(options, TASK_WINDOWS[schema.name])
    check_model_folder(wd, options.name)

    targets = load_targets(wd, schema)
    metadata, labels, fold_frame = targets.metadata, targets.labels, targets.folds
    if targets.core is not None and options.pseudo_labels:
        raise StackkitError(f"--pseudo-labels: soft labels are RSNA 2019's six per image; task {schema.name} has none")
    available = sorted(int(f) for f in np.unique(fold_frame["fold"].to_numpy()))
    requested = resolve_folds(options.folds, available)
    pseudo = read_pseudo_labels(options.pseudo_labels, available, metadata, fold_frame)
    config = dataclasses.replace(config, pseudo_labels=tuple(p.record() for p in pseudo))
    dev = resolve_device(options.device)

    import torch

    env = init_distributed(dev.type)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    try:
        dev = _torch_settings(dev, env, config.img_size, previous_threads)
        return _train(TrainRun(wd, options, config, dev, env, metadata, labels, fold_frame, available, requested, tuple(pseudo),
                               targets))
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)
        shutdown(env)


def _torch_settings(dev, env: DistEnv, img_size: int, threads: int):
    """Threads, determinism and this rank's GPU for the run; returns the device to train on."""
    import torch

    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Small images give each convolution too little work to share: extra OpenMP threads
        # mostly spin, and on a busy machine they slow training down by an order of magnitude.
        torch.set_num_threads(cpu_threads_for(img_size, threads))
    if env.enabled and dev.type == "cuda":
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    return dev


def _shared_cache(wd, metadata, config, env, decode_workers, progress):
    """The pixel cache on every rank: rank 0 decodes, the others wait and map the same file."""
    from base_models.cache import load_or_build_cache

    cache = None
    if env.is_main:
        cache = load_or_build_cache(wd, metadata, size=config.img_size, windows=config.windows, workers=decode_workers,
                                    progress=progress)
    barrier(env)
    if cache is None:
        cache = load_or_build_cache(wd, metadata, size=config.img_size, windows=config.windows, build=False, progress=False)
    return cache


def undecodable_warning(bad: dict) -> str:
    """One line naming the slices the pixel cache could not decode (``bad``: image id -> reason)."""
    listed = "; ".join(f"{i} ({why})" for i, why in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"warning: {len(bad)} slice(s) could not be decoded; they get predictions from a blank "
            f"image (still in oof/test): {listed}{more}")


@dataclass(frozen=True)
class _Samples:
    """The labeled rows by image_id (``train``) and the test ids, their context slices' cache rows,
    the labels, each labeled row's fold and ``extra``: each fold with pseudo-labels -> (cache rows, soft labels)."""

    train: pd.DataFrame
    test_ids: np.ndarray
    train_rows: np.ndarray
    test_rows: np.ndarray
    y: np.ndarray
    fold_of: np.ndarray
    extra: dict


def _samples(cache, run: TrainRun) -> _Samples:
    metadata, config = run.metadata, run.config
    pixel_rows = cache.rows(metadata["image_id"].to_numpy(dtype=object))[neighbor_table(metadata, config.context)]
    row_of = pd.Series(np.arange(len(metadata)), index=metadata["image_id"].to_numpy(dtype=object))
    extra = {p.fold: (pixel_rows[row_of.reindex(p.frame["image_id"]).to_numpy()], p.frame[list(LABELS)].to_numpy(np.float32))
             for p in run.pseudo}
    train = run.fold_frame.merge(run.labels, on="image_id", validate="1:1").sort_values("image_id", kind="stable").reset_index(drop=True)
    test_ids = np.sort(metadata.loc[metadata["split"] == "test", "image_id"].to_numpy(dtype=object))
    train_rows = pixel_rows[row_of.reindex(train["image_id"]).to_numpy()]
    test_rows = pixel_rows[row_of.reindex(test_ids).to_numpy()]
    y = train[list(run.columns)].to_numpy(dtype=np.float32)
    return _Samples(train, test_ids, train_rows, test_rows, y, train["fold"].to_numpy(), extra)


def _train(run: TrainRun) -> TrainResult:
    o, env = run.options, run.env
    cache = _shared_cache(run.wd, run.metadata, run.config, env, o.decode_workers, o.progress)
    if cache.bad and env.is_main:
        print(undecodable_warning(cache.bad), file=sys.stderr)
    samples = _samples(cache, run)
    test_set = SliceDataset(cache.pixels, samples.test_rows)

    fhash = folds_hash(run.fold_frame["image_id"], run.fold_frame["fold"])
    work = run.wd.preds_dir(run.name) / WORK_DIR
    run_key = {**run.config.as_dict(), "folds_hash": fhash, "pixels": cache.path.name if cache.path else None,
               "n_test": int(len(samples.test_ids)), "embeddings": bool(o.embeddings)}
    todo = folds_to_run(work, run_key, run.requested, o.resume, o.embeddings, env, o.progress)

    runner = Runner(run.config, run.dev, env, o.workers, o.progress, run.targets.weights)
    for fold in todo:
        _train_fold(run, runner, samples, (cache.pixels, test_set), work, fold)
        barrier(env)
        if o.on_fold_done is not None:
            o.on_fold_done(fold)

    if not env.is_main:
        return TrainResult(name=run.name, rank=env.rank)
    return _finish(run, samples, work, fhash, cache)


def _train_fold(run: TrainRun, runner: Runner, samples: _Samples, data: tuple, work, fold: int) -> None:
    """Train, predict and (on rank 0) write fold ``fold``; ``data`` = (the cache's pixels, the test set)."""
    s, (pixels, test_set), embeddings = samples, data, bool(run.options.embeddings)
    held = s.fold_of == fold
    prior = s.y[~held].mean(axis=0)
    # pseudo-labelled images join fold k's training rows only: never its validation (OOF) rows
    extra_rows, extra_y = s.extra.get(fold, (s.train_rows[:0], s.y[:0]))
    fold_train = SliceDataset(pixels, np.concatenate([s.train_rows[~held], extra_rows]), np.concatenate([s.y[~held], extra_y]))
    model, seconds, images, last_loss = runner.train_fold(fold, fold_train, prior)
    start = time.perf_counter()
    oof, oof_embeddings = runner.predict(model, SliceDataset(pixels, s.train_rows[held]), f"fold {fold} predict oof", embeddings)
    test, test_embeddings = runner.predict(model, test_set, f"fold {fold} predict test", embeddings)
    predict_seconds = time.perf_counter() - start
    if not run.env.is_main:
        return
    score = run.targets.score(s.y[held], oof)
    record = {
        "fold": fold, "oof_logloss": score.overall, "oof_per_label": score.per_label,
        "fold_prior_logloss": run.targets.prior(s.y[held]).overall, "train_images": int((~held).sum()),
        "pseudo_images": int(len(extra_rows)),
        "train_seconds": seconds, "train_images_per_second": images / max(seconds, 1e-9),
        "predict_seconds": predict_seconds, "last_epoch_loss": last_loss,
    }
    frames = (probability_frame(s.train["image_id"].to_numpy()[held], oof, s.fold_of[held], run.columns),
              probability_frame(s.test_ids, test, columns=run.columns))
    write_fold(fold_paths(work, fold, embeddings), model.state_dict(), frames,
               (oof_embeddings, test_embeddings) if embeddings else None, record)
    say(run.env, run.options.progress, f"fold {fold}: OOF weighted log loss {score.overall:.4f} "
                                       f"(prior {record['fold_prior_logloss']:.4f}), {seconds:.1f} s, "
                                       f"{record['train_images_per_second']:.0f} img/s")


def _finish(run: TrainRun, samples: _Samples, work, fhash: str, cache) -> TrainResult:
    name, available = run.name, run.available
    done = [f for f in available if fold_done(work, f, run.options.embeddings)]
    records = {f: read_json(fold_paths(work, f)["record"]) for f in done}
    summary = fold_summary(name, run.config, records, done)
    result = TrainResult(
        name=name, rank=run.env.rank, complete=False, arch=run.config.arch, context=run.config.context, folds=summary["folds"],
        fold_priors={f: records[f]["fold_prior_logloss"] for f in done}, requested=tuple(run.requested),
        missing=tuple(f for f in available if f not in done), work=work, directory=run.wd.preds_dir(name),
        seconds=summary["seconds"], images_per_second=summary["images_per_second"], undecodable=dict(cache.bad),
    )
    if result.missing:
        return result

    columns = list(run.columns)
    y = samples.train[columns].to_numpy(dtype=np.float64)
    oof_parts, oof, test, test_folds = fold_predictions(run.wd, name, work, available, run.fold_frame, samples.test_ids, columns)
    aligned = oof.set_index("image_id").reindex(samples.train["image_id"])[columns].to_numpy(np.float64)
    score, prior = run.targets.score(y, aligned), run.targets.prior(y)
    recorded, unit = (score.as_dict(), prior.overall), (None, None)
    if run.targets.core is not None:
        from base_models.importer import unit_model_score  # the score `base import` records for a unit task's model

        scored, *unit = unit_model_score(run.targets.core, oof)
        recorded = ({**scored, "slice": score.as_dict()}, unit[1])

    tables = (oof, test, test_folds)
    record = write_model_set(run, work, model_info(run, fhash, records, recorded, summary, cache, work, tables), tables, oof_parts)
    return dataclasses.replace(result, complete=True, oof_logloss=score.overall, prior_logloss=prior.overall, per_label=score.per_label,
                               unit_metric=unit[0], unit_prior=unit[1],
                               embedding_dim=record.embedding_dim if run.options.embeddings else None, fold_models=len(available))
