"""`base train`'s files: the fold work under ``preds/<name>/_work/`` (checkpoints with sha256
sidecars, per-fold OOF/test parquet files and a JSON record written last, so a resumed run
continues at the first unfinished fold) and the contract files of ``preds/<name>/`` written as one
set once every fold is done."""

from __future__ import annotations

import datetime as _dt
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, PredictionFolder, Workdir
from stackkit.contract.io import check_set_target, has_sidecar, read_json, read_table, write_artifact, write_json, write_parquet
from stackkit.contract.records import ModelRecord, publish_model, read_model_record
from stackkit.contract.validate import validate_predictions
from stackkit.errors import StackkitError

from base_models.config import TrainRun
from base_models.distributed import DistEnv, barrier, broadcast_object

WORK_DIR = "_work"


def save_checkpoint(state_dict: dict, path: Path) -> Path:
    """state_dict -> ``path`` atomically with a sha256 sidecar; read back with
    ``torch.load(io.BytesIO(read_artifact(path)), weights_only=True)``."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    return write_artifact(path, buffer.getvalue())


def check_model_folder(wd: Workdir, name: str) -> None:
    """Refuse, before any training, a file in preds/<name>'s place and a folder holding imported predictions."""
    check_set_target(wd.preds_dir(name))  # a file in the model folder's place: refused before any training
    existing = wd.model_json(name)
    if existing.is_file():
        try:
            source = read_model_record(existing).source
        except StackkitError:
            source = None
        if source not in (None, "trained"):
            raise StackkitError(f"{existing}: preds/{name} holds {source} predictions; choose another --name to keep them")


def say(env: DistEnv, progress: bool, text: str) -> None:
    if env.is_main and progress:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)


def fold_paths(work: Path, fold: int, embeddings: bool = False) -> dict[str, Path]:
    paths = {
        "checkpoint": work / f"fold{fold}.pt",
        "oof": work / f"fold{fold}_oof.parquet",
        "test": work / f"fold{fold}_test.parquet",
    }
    if embeddings:
        paths["oof_embeddings"] = work / f"fold{fold}_oof_embeddings.npy"
        paths["test_embeddings"] = work / f"fold{fold}_test_embeddings.npy"
    paths["record"] = work / f"fold{fold}.json"  # written last: its presence means the fold is done
    return paths


def fold_done(work: Path, fold: int, embeddings: bool = False) -> bool:
    paths = fold_paths(work, fold, embeddings)
    return all(p.is_file() for p in paths.values()) and has_sidecar(paths["checkpoint"])


def prepare_work(work: Path, run_key: dict, resume: bool) -> None:
    """Keep fold results made with the same settings and data; anything else is stale."""
    config_path = work / "config.json"
    previous = None
    if config_path.is_file():
        try:
            previous = read_json(config_path)
        except StackkitError:
            previous = None
    if previous != run_key:
        if resume and previous is not None:
            changed = sorted(k for k in run_key if previous.get(k) != run_key.get(k))
            raise StackkitError(
                f"{config_path}: --resume with different settings or data ({', '.join(changed)} changed); "
                "rerun with the original options, or without --resume to start over"
            )
        if work.exists():
            shutil.rmtree(work)
        write_json(run_key, config_path)


def folds_to_run(work, run_key, requested, resume, embeddings, env, progress) -> list:
    """The requested folds still to train, the same on every rank, once the work folder matches ``run_key``."""
    if env.is_main:
        prepare_work(work, run_key, resume)
    barrier(env)
    todo = [f for f in requested if not (resume and fold_done(work, f, embeddings))]
    todo = broadcast_object(env, todo)
    skipped = [f for f in requested if f not in todo]
    if skipped:
        say(env, progress, f"resume: folds {','.join(map(str, skipped))} already done, continuing with "
                            f"{','.join(map(str, todo)) or 'none'}")
    return todo


def write_fold(paths: dict[str, Path], state_dict: dict, frames: tuple[pd.DataFrame, pd.DataFrame], embeddings, record: dict) -> None:
    """One fold's work files: checkpoint, OOF and test parquet files, the (OOF, test) embeddings or None, the record last."""
    save_checkpoint(state_dict, paths["checkpoint"])
    write_parquet(frames[0], paths["oof"])
    write_parquet(frames[1], paths["test"])
    if embeddings is not None:
        from stackkit.contract.embeddings import write_embeddings

        # rows follow the fold's oof / test parquet files
        write_embeddings(embeddings[0], paths["oof_embeddings"])
        write_embeddings(embeddings[1], paths["test_embeddings"])
    write_json(record, paths["record"])


def probability_frame(ids, probs: np.ndarray, fold=None, columns=LABELS) -> pd.DataFrame:
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float32), columns=list(columns))
    if fold is not None:
        frame.insert(0, "fold", np.asarray(fold, dtype=np.int8))
    frame.insert(0, "image_id", np.asarray(ids, dtype=object))
    return frame


def fold_summary(name, config, records: dict, done: list) -> dict:
    """The run summary's timing and per-fold scores, from the done folds' records."""
    return {
        "name": name, "arch": config.arch, "context": config.context,
        "folds": {f: records[f]["oof_logloss"] for f in done},
        "seconds": float(sum(r["train_seconds"] + r["predict_seconds"] for r in records.values())),
        "images_per_second": float(
            sum(r["train_images"] + r.get("pseudo_images", 0) for r in records.values()) * config.epochs / max(sum(r["train_seconds"] for r in records.values()), 1e-9)
        ),
    }


def fold_predictions(wd, name, work, available, fold_frame, test_ids, columns=LABELS) -> tuple:
    """(oof_parts, oof, test, test_folds): the folds' OOF files, their validated union, the validated
    mean over the fold models' test files, and each fold model's test file validated (contract v3's
    test_fold<k>.parquet), all test tables in ``test_ids`` order; ``columns``: what the model predicts."""
    oof_parts = [read_table(fold_paths(work, f)["oof"], what="fold OOF file") for f in available]
    oof = pd.concat(oof_parts, ignore_index=True).sort_values("image_id", kind="stable").reset_index(drop=True)
    oof = validate_predictions(oof, str(wd.oof(name)), expected_ids=fold_frame["image_id"], what="labeled", folds=fold_frame,
                               columns=columns)
    test_folds = []
    for f in available:
        frame = read_table(fold_paths(work, f)["test"], what="fold test file").set_index("image_id").reindex(test_ids).reset_index()
        test_folds.append(validate_predictions(frame, str(wd.test_fold(name, f)), expected_ids=test_ids, what="test", columns=columns))
    test_stack = np.stack([frame[list(columns)].to_numpy(np.float64) for frame in test_folds])
    test = validate_predictions(probability_frame(test_ids, test_stack.mean(axis=0), columns=columns), str(wd.test(name)),
                                expected_ids=test_ids, what="test", columns=columns)
    return oof_parts, oof, test, test_folds


def model_info(run: TrainRun, fhash: str, records: dict, scores: tuple, summary: dict, cache, work: Path, tables: tuple) -> ModelRecord:
    """model.json's record of a complete trained model (the embeddings' entries filled in as they are written);
    ``scores`` = (its oof_logloss entry, the prior's overall score), ``tables`` = (oof, test, test_folds) as published."""
    import torch

    wd, config, available = run.wd, run.config, run.available
    score, prior = scores
    training = {
        "folds": available,
        "oof_logloss_per_fold": {str(f): records[f]["oof_logloss"] for f in available},
        "train_seconds": float(sum(r["train_seconds"] for r in records.values())),
        "seconds": summary["seconds"],
        "train_images_per_second": summary["images_per_second"],
        "undecodable_images": dict(cache.bad),
        "torch_version": torch.__version__,
        "device": str(run.dev),
        "world_size": run.env.world_size,
        "checkpoints": {str(f): wd.relative(fold_paths(work, f)["checkpoint"]) for f in available},
    }
    return ModelRecord(name=run.name, source="trained", architecture=config.arch, parameters=config.as_dict(), folds_hash=fhash,
                       created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), oof_logloss=score,
                       prior_logloss=prior, n_oof=len(tables[0]), n_test=len(tables[1]), training=training)


def write_model_embeddings(folder, work, available, oof_parts, oof) -> dict:
    """``folder``/embeddings/ (the new preds/<name>/ set): oof.npy in the final oof.parquet's row order
    (each fold's rows from its own fold model) and test_fold<k>.npy per fold model; returns the model.json entries."""
    from stackkit.contract.embeddings import embedding_record, open_npy, write_embedding_parts

    parts, position = [], pd.Index(oof["image_id"].to_numpy(dtype=object))
    for f, part in zip(available, oof_parts):
        array = open_npy(fold_paths(work, f, True)["oof_embeddings"], "fold OOF embedding file")
        parts.append((array, position.get_indexer(pd.Index(part["image_id"].astype(str).to_numpy(dtype=object)))))
    dim = int(parts[0][0].shape[1])
    files = PredictionFolder(folder)
    write_embedding_parts(files.oof_embeddings, len(oof), dim, parts)
    for k, f in enumerate(available):
        array = open_npy(fold_paths(work, f, True)["test_embeddings"], "fold test embedding file")
        write_embedding_parts(files.test_embeddings(k if len(available) > 1 else None), len(array), dim, [(array, np.arange(len(array)))])
    return embedding_record(dim, len(available))


def write_model_set(run: TrainRun, work: Path, record: ModelRecord, tables: tuple, oof_parts: list) -> ModelRecord:
    """preds/<name>/ published as a set (as `base import` does), the fold work carried along by hard links:
    ``tables`` = (oof, test, test_folds); the embeddings too when the run has them; model.json last."""
    embeddings = None
    if run.options.embeddings:
        def embeddings(folder: Path) -> dict:
            return write_model_embeddings(folder, work, run.available, oof_parts, tables[0])
    return publish_model(run.wd, record, tables, embeddings=embeddings, keep=(WORK_DIR,))
