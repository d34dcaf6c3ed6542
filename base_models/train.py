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
import datetime as _dt
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import EMBEDDINGS_DIR, LABEL_WEIGHTS, LABELS, MODEL_RECORD, Workdir, check_model_name, folds_hash
from stackkit.errors import StackkitError
from stackkit.contract.io import check_set_target, read_json, read_table, replace_dir, write_artifact, write_json, write_parquet, write_set_record
from stackkit.metric import prior_score, weighted_bce, weighted_log_loss
from stackkit.contract.validate import load_core, validate_predictions

from base_models import DEFAULT_WINDOWS
from base_models.data import MAX_CONTEXT, SliceDataset, batch_identity, center_channels, context_offsets, neighbor_table
from base_models.pseudo import read_pseudo_labels
from base_models.distributed import DistEnv, barrier, broadcast_object, gather_rows, init_distributed, shard, shutdown

WORK_DIR = "_work"
WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.25
# OneCycleLR divides by the warm-up length: a tiny run (a few batches) gets a schedule long enough to
# have one, and stops early in it
MIN_SCHEDULE_STEPS = int(math.ceil(2 / WARMUP_FRACTION)) + 1
# A context model starts as the center-slice model (its neighbor weights are zero) and learns
# what the neighbors add at this fraction of the learning rate. On the demo data (seed 0, 9
# epochs, OOF weighted log loss, all with the z-order flip below): one learning rate for all
# weights 0.187, x0.3 0.199, x0.1 0.182; the center-slice model 0.183.
NEIGHBOR_LR_SCALE = 0.1


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    context: int
    epochs: int
    batch_size: int
    lr: float
    img_size: int
    seed: int
    tta: bool
    windows: tuple[tuple[float, float], ...]
    amp: bool = True  # mixed precision on CUDA (never on the CPU)
    pretrained: bool = False  # timm's published weights (timm: architectures)
    weights: tuple[str, str] | None = None  # (path, sha256) of a .safetensors file (timm: architectures)
    pseudo_labels: tuple[dict, ...] = ()  # PseudoLabels.record() per fold model

    @property
    def n_slices(self) -> int:
        return len(context_offsets(self.context))

    @property
    def in_channels(self) -> int:
        return self.n_slices * len(self.windows)

    @property
    def center_channels(self) -> tuple[int, int] | None:
        return center_channels(self.context, len(self.windows))

    def as_dict(self) -> dict:
        return {
            "arch": self.arch, "context": self.context, "epochs": self.epochs, "batch_size": self.batch_size,
            "lr": self.lr, "img_size": self.img_size, "seed": self.seed, "tta": self.tta,
            "windows": [list(w) for w in self.windows], "in_channels": self.in_channels,
            "optimizer": "AdamW", "weight_decay": WEIGHT_DECAY, "schedule": "onecycle",
            "augment": "hflip+zflip" if self.context else "hflip",
            "neighbor_lr_scale": NEIGHBOR_LR_SCALE if self.context else None,
            "amp": self.amp, "pretrained": self.pretrained,
            "weights": None if self.weights is None else {"path": self.weights[0], "sha256": self.weights[1]},
            "pseudo_labels": [dict(r) for r in self.pseudo_labels] or None,
        }

    def model_options(self) -> dict:
        """create_model's keywords beyond the channels: weights for timm architectures."""
        if not self.arch.startswith("timm:"):
            return {}
        return {"pretrained": self.pretrained, "weights": None if self.weights is None else self.weights[0]}


# --- checkpoints ------------------------------------------------------------------------------


def save_checkpoint(state_dict: dict, path: Path) -> Path:
    """state_dict -> ``path`` atomically with a sha256 sidecar; read back with
    ``torch.load(io.BytesIO(read_artifact(path)), weights_only=True)``."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    return write_artifact(path, buffer.getvalue())


# --- validation at the boundary ------------------------------------------------------------------


def _check_params(name, arch, context, epochs, batch_size, lr, img_size, windows, workers) -> None:
    from base_models.archs import ARCHITECTURES

    check_model_name(name, "--name")
    if isinstance(arch, str) and arch.startswith("timm:"):
        from base_models.archs.timm_models import check_timm_arch

        check_timm_arch(arch)
    elif arch not in ARCHITECTURES:
        raise StackkitError(f"--arch {arch!r}: unknown architecture; choose one of {', '.join(ARCHITECTURES)}")
    if context not in range(MAX_CONTEXT + 1):
        raise StackkitError(f"--context {context!r}: expected 0, 1 or 2 (neighbor slices on each side)")
    checks = (("--epochs", epochs, 1), ("--batch-size", batch_size, 2), ("--img-size", img_size, 16))
    for option, value, low in checks:
        if not isinstance(value, (int, np.integer)) or value < low:
            raise StackkitError(f"{option} {value!r}: expected an integer >= {low}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise StackkitError(f"--lr {lr!r}: expected a positive number")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise StackkitError(f"--workers {workers!r}: expected an integer >= 0")
    if not windows:
        raise StackkitError("windows: expected at least one (center, width) pair")
    for window in windows:
        if not all(math.isfinite(v) for v in window) or window[1] <= 0:
            raise StackkitError(f"window {window!r}: expected (center, width) in HU with width > 0")


def _probe_model(config: TrainConfig) -> None:
    """Build the model once before any data is read: a name, weights file or hub that fails is one line now."""
    if config.arch.startswith("timm:"):
        from base_models.archs import create_model

        create_model(config.arch, config.in_channels, len(LABELS), center_channels=config.center_channels,
                     **config.model_options())


def _resolve_device(device: str):
    import torch

    text = str(device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise StackkitError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise StackkitError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StackkitError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise StackkitError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def _resolve_folds(folds, available: list[int]) -> list[int]:
    if folds is None:
        return list(available)
    requested = sorted({int(f) for f in folds})
    unknown = [f for f in requested if f not in available]
    if not requested or unknown:
        raise StackkitError(
            f"--folds {','.join(map(str, folds)) or '(empty)'}: data/folds.parquet has folds "
            f"{','.join(map(str, available))}; pick among them"
        )
    return requested


# --- the training loop ------------------------------------------------------------------------------


class _Runner:
    """Everything one process needs to train and predict folds (one instance per train_base call)."""

    def __init__(self, config: TrainConfig, dev, env: DistEnv, workers: int, progress: bool):
        import torch

        self.torch = torch
        self.config = config
        self.dev = dev
        self.env = env
        self.workers = workers
        self.progress = progress and env.is_main
        self.cuda = dev.type == "cuda"
        self.amp_dtype = None
        if self.cuda and config.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _loader(self, dataset, sampler, batch_size, generator, drop_last=False):
        from torch.utils.data import DataLoader

        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers, collate_fn=batch_identity,
            pin_memory=self.cuda, drop_last=drop_last, generator=generator, worker_init_fn=_seed_worker,
            persistent_workers=False,
        )

    def _inputs(self, x):
        torch = self.torch
        x = x.to(self.dev, non_blocking=True).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    def _autocast(self):
        import contextlib

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast("cuda", dtype=self.amp_dtype)

    def train_fold(self, fold: int, dataset: SliceDataset, prior: np.ndarray):
        """Train one model on ``dataset``; returns (model, seconds, images seen, mean last-epoch loss)."""
        torch = self.torch
        from torch.utils.data import DistributedSampler, RandomSampler
        from tqdm.auto import tqdm

        from base_models.archs import create_model

        cfg = self.config
        fold_seed = cfg.seed * 1009 + fold  # depends on (seed, fold) only: resume-safe
        torch.manual_seed(fold_seed)
        generator = torch.Generator().manual_seed(fold_seed)
        flip_generator = torch.Generator().manual_seed(fold_seed + 1)
        zflip_generator = torch.Generator().manual_seed(fold_seed + 2)
        model = create_model(cfg.arch, cfg.in_channels, len(LABELS), center_channels=cfg.center_channels, **cfg.model_options())
        model.init_weights(prior=torch.as_tensor(prior, dtype=torch.float32))
        model = model.to(self.dev, memory_format=torch.channels_last) if self.cuda else model.to(self.dev)
        trained = model
        if self.env.enabled:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(model, device_ids=[self.dev.index] if self.cuda else None)
            sampler = DistributedSampler(dataset, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=True, seed=fold_seed)
        else:
            sampler = RandomSampler(dataset, generator=generator)
        per_rank = math.ceil(len(dataset) / self.env.world_size)
        batch_size = min(cfg.batch_size, per_rank)
        drop_last = per_rank > batch_size  # BatchNorm cannot train on a final batch of one
        loader = self._loader(dataset, sampler, batch_size, generator, drop_last=drop_last)
        steps = len(loader)
        groups = optimizer_groups(model, cfg.lr)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(MIN_SCHEDULE_STEPS, cfg.epochs * steps),
            pct_start=WARMUP_FRACTION
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        weights = torch.as_tensor(LABEL_WEIGHTS, dtype=torch.float32, device=self.dev)
        images = 0
        epoch_loss = float("nan")
        start = time.perf_counter()
        for epoch in range(cfg.epochs):
            trained.train()
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            total, count = 0.0, 0
            bar = tqdm(loader, desc=f"fold {fold} epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                       disable=not self.progress, file=sys.stderr)
            for x, y in bar:
                flip = torch.rand(len(x), generator=flip_generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                if cfg.context:
                    zflip = torch.rand(len(x), generator=zflip_generator) < 0.5
                    x = reverse_slices(x, cfg.n_slices, zflip)
                inputs = self._inputs(x)
                targets = y.to(self.dev, non_blocking=True)
                with self._autocast():
                    logits = trained(inputs)
                loss = weighted_bce(logits.float(), targets, weights)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                total += float(loss.detach()) * len(x)
                count += len(x)
                images += len(x)
                bar.set_postfix(loss=f"{total / count:.4f}")
            bar.close()
            epoch_loss = total / max(count, 1)
        if self.cuda:
            torch.cuda.synchronize(self.dev)
        seconds = time.perf_counter() - start
        return model, seconds, images * self.env.world_size, epoch_loss

    def predict(self, model, dataset: SliceDataset, desc: str, embeddings: bool = False):
        """Sigmoid probabilities (n, 6) float32 for every sample and, with ``embeddings``, the pooled
        features before the head (n, feature_dim) float32 (the mean over the flips with ``tta``),
        on rank 0 (None on other ranks); without ``embeddings`` the second item is None."""
        torch = self.torch
        from tqdm.auto import tqdm

        positions = shard(np.arange(len(dataset)), self.env)
        model.eval()
        out = np.empty((len(positions), len(LABELS)), dtype=np.float32)
        pooled_out = np.empty((len(positions), model.feature_dim), dtype=np.float32) if embeddings else None
        loader = self._loader(dataset, positions.tolist(), self.config.batch_size * 2, None)
        done = 0

        def forward(inputs):
            pooled = model.pool(model.features(inputs)).flatten(1)  # what BaseArch.forward feeds the head
            return torch.sigmoid(model.head(model.dropout(pooled)).float()), pooled.float()

        with torch.inference_mode():
            for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not self.progress, file=sys.stderr):
                inputs = self._inputs(x)
                with self._autocast():
                    prob, pooled = forward(inputs)
                    if self.config.tta:
                        flipped_prob, flipped_pooled = forward(inputs.flip(-1))
                        prob, pooled = 0.5 * (prob + flipped_prob), 0.5 * (pooled + flipped_pooled)
                out[done : done + len(x)] = prob.cpu().numpy()
                if embeddings:
                    pooled_out[done : done + len(x)] = pooled.cpu().numpy()
                done += len(x)
        probs = gather_rows(self.env, positions, out, len(dataset))
        pooled_all = gather_rows(self.env, positions, pooled_out, len(dataset)) if embeddings else None
        return probs, pooled_all


def optimizer_groups(model, lr: float) -> list[dict]:
    """AdamW parameter groups: the neighbor-slice weights (if any) at ``NEIGHBOR_LR_SCALE * lr``."""
    neighbor = model.neighbor_parameters()
    neighbor_ids = {id(p) for p in neighbor}
    groups = [{"params": [p for p in model.parameters() if id(p) not in neighbor_ids], "lr": lr}]
    if neighbor:
        groups.append({"params": neighbor, "lr": lr * NEIGHBOR_LR_SCALE})
    return groups


def reverse_slices(x, n_slices: int, mask):
    """Reverse the slice order (st-k <-> st+k) of the samples where ``mask`` is true.

    (B, n_slices * windows, H, W) in the neighbor-major layout. Labels do not depend on the
    direction of the z axis (series come stored both ways), so this doubles the context
    patterns a model sees; on the demo data it cut the context model's OOF loss from 0.208 to 0.187.
    """
    import torch

    b, channels, h, w = x.shape
    reversed_ = x.reshape(b, n_slices, channels // n_slices, h, w).flip(1).reshape(b, channels, h, w)
    return torch.where(mask.reshape(-1, 1, 1, 1), reversed_, x)


def _seed_worker(worker_id: int) -> None:
    import torch

    # each worker's numpy seed follows torch's per-worker seed (itself from the loader's generator)
    np.random.seed(torch.initial_seed() % 2**32)


# --- work folder -----------------------------------------------------------------------------


def _fold_paths(work: Path, fold: int, embeddings: bool = False) -> dict[str, Path]:
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


def _fold_done(work: Path, fold: int, embeddings: bool = False) -> bool:
    paths = _fold_paths(work, fold, embeddings)
    return all(p.is_file() for p in paths.values()) and paths["checkpoint"].with_name(paths["checkpoint"].name + ".sha256").is_file()


def _prepare_work(work: Path, run_key: dict, resume: bool) -> None:
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


def _probability_frame(ids, probs: np.ndarray, fold=None) -> pd.DataFrame:
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float32), columns=list(LABELS))
    if fold is not None:
        frame.insert(0, "fold", np.asarray(fold, dtype=np.int8))
    frame.insert(0, "image_id", np.asarray(ids, dtype=object))
    return frame


# --- the entry point ------------------------------------------------------------------------------


def train_base(
    workdir: Workdir,
    *,
    name: str,
    arch: str = "resnet_tiny",
    context: int = 0,
    epochs: int = 9,
    batch_size: int = 16,
    lr: float = 5e-3,
    img_size: int = 64,
    folds: list[int] | None = None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    tta: bool = False,
    workers: int = 0,
    windows: list[tuple[float, float]] | None = None,
    progress: bool = True,
    decode_workers: int | None = None,
    on_fold_done=None,
    embeddings: bool = True,
    amp: bool = True,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    pseudo_labels: list | None = None,
) -> dict:
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

    Returns a summary: per-fold and overall OOF weighted log loss, prior score, seconds,
    training images/s, and ``lines`` to print. ``on_fold_done(fold)`` is called after each fold's
    results are safely on disk (a hook for progress reporting and interruption tests).
    """
    wd = Workdir.of(workdir)
    try:
        windows = tuple((float(c), float(w)) for c, w in (DEFAULT_WINDOWS if windows is None else windows))
    except (TypeError, ValueError):
        raise StackkitError(f"windows {windows!r}: expected a list of (center, width) pairs in HU") from None
    _check_params(name, arch, context, epochs, batch_size, lr, img_size, windows, workers)
    from base_models.archs.timm_models import weights_option

    config = TrainConfig(arch, int(context), int(epochs), int(batch_size), float(lr), int(img_size), int(seed), bool(tta), windows,
                         amp=bool(amp), pretrained=bool(pretrained), weights=weights_option(arch, pretrained, weights))
    _probe_model(config)

    check_set_target(wd.preds_dir(name))  # a file in the model folder's place: refused before any training
    existing = wd.model_json(name)
    if existing.is_file():
        try:
            source = read_json(existing).get("source")
        except StackkitError:
            source = None
        if source not in (None, "trained"):
            raise StackkitError(f"{existing}: preds/{name} holds {source} predictions; choose another --name to keep them")

    metadata, labels, fold_frame = load_core(wd)
    available = sorted(int(f) for f in np.unique(fold_frame["fold"].to_numpy()))
    requested = _resolve_folds(folds, available)
    pseudo = read_pseudo_labels(pseudo_labels, available, metadata, fold_frame)
    config = dataclasses.replace(config, pseudo_labels=tuple(p.record() for p in pseudo))
    dev = _resolve_device(device)

    import torch

    env = init_distributed(dev.type)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    try:
        if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Small images give each convolution too little work to share: extra OpenMP threads
            # mostly spin, and on a busy machine they slow training down by an order of magnitude.
            torch.set_num_threads(cpu_threads_for(config.img_size, previous_threads))
        if env.enabled and dev.type == "cuda":
            dev = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(dev)
        if dev.type == "cpu":
            torch.use_deterministic_algorithms(True)
        else:
            torch.backends.cudnn.benchmark = True
        return _train(wd, name, config, metadata, labels, fold_frame, available, requested, dev, env,
                      resume, workers, progress, decode_workers, on_fold_done, bool(embeddings), pseudo)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)
        shutdown(env)


def cpu_threads_for(img_size: int, available: int) -> int:
    """Intra-op threads for CPU training: one per 128x128 tile of the input, at most ``available``.

    Measured on 2 busy cores (bench/bench_base.py): at 128 px one thread trained at 59 img/s and
    two at 17 img/s. Set OMP_NUM_THREADS to choose yourself (it is then left alone)."""
    return max(1, min(int(available), (int(img_size) // 128) ** 2))


def _say(env: DistEnv, progress: bool, text: str) -> None:
    if env.is_main and progress:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)


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


def _undecodable_lines(cache, env) -> list[str]:
    """The summary's opening lines: a warning naming the slices the cache could not decode (none if all decoded)."""
    lines: list[str] = []
    if cache.bad:
        listed = "; ".join(f"{i} ({why})" for i, why in list(cache.bad.items())[:5])
        more = f" and {len(cache.bad) - 5} more" if len(cache.bad) > 5 else ""
        message = (f"warning: {len(cache.bad)} slice(s) could not be decoded; they get predictions from a blank "
                   f"image (still in oof/test): {listed}{more}")
        lines.append(message)
        if env.is_main:
            print(message, file=sys.stderr)
    return lines


def _samples(cache, metadata, labels, fold_frame, config, pseudo=()) -> tuple:
    """(train, test_ids, train_rows, test_rows, y, fold_of, extra): labeled rows by image_id, their context
    slices' cache rows; ``extra`` maps each fold with pseudo-labels to its (cache rows, soft labels)."""
    pixel_rows = cache.rows(metadata["image_id"].to_numpy(dtype=object))[neighbor_table(metadata, config.context)]
    row_of = pd.Series(np.arange(len(metadata)), index=metadata["image_id"].to_numpy(dtype=object))
    extra = {p.fold: (pixel_rows[row_of.reindex(p.frame["image_id"]).to_numpy()], p.frame[list(LABELS)].to_numpy(np.float32))
             for p in pseudo}
    train = fold_frame.merge(labels, on="image_id", validate="1:1").sort_values("image_id", kind="stable").reset_index(drop=True)
    test_ids = np.sort(metadata.loc[metadata["split"] == "test", "image_id"].to_numpy(dtype=object))
    train_rows = pixel_rows[row_of.reindex(train["image_id"]).to_numpy()]
    test_rows = pixel_rows[row_of.reindex(test_ids).to_numpy()]
    y = train[list(LABELS)].to_numpy(dtype=np.float32)
    fold_of = train["fold"].to_numpy()
    return train, test_ids, train_rows, test_rows, y, fold_of, extra


def _folds_to_run(work, run_key, requested, resume, embeddings, env, progress) -> list:
    """The requested folds still to train, the same on every rank, once the work folder matches ``run_key``."""
    if env.is_main:
        _prepare_work(work, run_key, resume)
    barrier(env)
    todo = [f for f in requested if not (resume and _fold_done(work, f, embeddings))]
    todo = broadcast_object(env, todo)
    skipped = [f for f in requested if f not in todo]
    if skipped:
        _say(env, progress, f"resume: folds {','.join(map(str, skipped))} already done, continuing with "
                            f"{','.join(map(str, todo)) or 'none'}")
    return todo


def _train(wd, name, config, metadata, labels, fold_frame, available, requested, dev, env, resume, workers, progress,
           decode_workers, on_fold_done, embeddings: bool = True, pseudo=()) -> dict:
    cache = _shared_cache(wd, metadata, config, env, decode_workers, progress)
    lines = _undecodable_lines(cache, env)

    train, test_ids, train_rows, test_rows, y, fold_of, extra = _samples(cache, metadata, labels, fold_frame, config, pseudo)
    test_set = SliceDataset(cache.pixels, test_rows)

    fhash = folds_hash(fold_frame["image_id"], fold_frame["fold"])
    work = wd.preds_dir(name) / WORK_DIR
    run_key = {**config.as_dict(), "folds_hash": fhash, "pixels": cache.path.name if cache.path else None,
               "n_test": int(len(test_ids)), "embeddings": embeddings}
    todo = _folds_to_run(work, run_key, requested, resume, embeddings, env, progress)

    runner = _Runner(config, dev, env, workers, progress)
    for fold in todo:
        held = fold_of == fold
        prior = y[~held].mean(axis=0)
        # pseudo-labelled images join fold k's training rows only: never its validation (OOF) rows
        extra_rows, extra_y = extra.get(fold, (train_rows[:0], y[:0]))
        fold_train = SliceDataset(cache.pixels, np.concatenate([train_rows[~held], extra_rows]), np.concatenate([y[~held], extra_y]))
        model, seconds, images, last_loss = runner.train_fold(fold, fold_train, prior)
        start = time.perf_counter()
        oof, oof_embeddings = runner.predict(model, SliceDataset(cache.pixels, train_rows[held]), f"fold {fold} predict oof", embeddings)
        test, test_embeddings = runner.predict(model, test_set, f"fold {fold} predict test", embeddings)
        predict_seconds = time.perf_counter() - start
        if env.is_main:
            score = weighted_log_loss(y[held], oof)
            paths = _fold_paths(work, fold, embeddings)
            save_checkpoint(model.state_dict(), paths["checkpoint"])
            write_parquet(_probability_frame(train["image_id"].to_numpy()[held], oof, fold_of[held]), paths["oof"])
            write_parquet(_probability_frame(test_ids, test), paths["test"])
            if embeddings:
                from stackkit.contract.embeddings import write_embeddings

                # rows follow the fold's oof / test parquet files
                write_embeddings(oof_embeddings, paths["oof_embeddings"])
                write_embeddings(test_embeddings, paths["test_embeddings"])
            record = {
                "fold": fold, "oof_logloss": score.overall, "oof_per_label": score.per_label,
                "fold_prior_logloss": prior_score(y[held]).overall, "train_images": int((~held).sum()),
                "pseudo_images": int(len(extra_rows)),
                "train_seconds": seconds, "train_images_per_second": images / max(seconds, 1e-9),
                "predict_seconds": predict_seconds, "last_epoch_loss": last_loss,
            }
            write_json(record, paths["record"])
            _say(env, progress, f"fold {fold}: OOF weighted log loss {score.overall:.4f} "
                                f"(prior {record['fold_prior_logloss']:.4f}), {seconds:.1f} s, "
                                f"{record['train_images_per_second']:.0f} img/s")
        barrier(env)
        if on_fold_done is not None:
            on_fold_done(fold)

    if not env.is_main:
        return {"name": name, "rank": env.rank}
    return _finish(wd, name, config, train, test_ids, fold_frame, available, requested, work, fhash, dev, env, lines, cache,
                   progress, embeddings)


def _write_model_embeddings(folder, work, available, oof_parts, oof) -> dict:
    """``folder``/embeddings/ (the new preds/<name>/ set): oof.npy in the final oof.parquet's row order
    (each fold's rows from its own fold model) and test_fold<k>.npy per fold model; returns the model.json entries."""
    from stackkit.contract.embeddings import embedding_record, open_npy, test_file_names, write_embedding_parts

    parts, position = [], pd.Index(oof["image_id"].to_numpy(dtype=object))
    for f, part in zip(available, oof_parts):
        array = open_npy(_fold_paths(work, f, True)["oof_embeddings"], "fold OOF embedding file")
        parts.append((array, position.get_indexer(pd.Index(part["image_id"].astype(str).to_numpy(dtype=object)))))
    dim = int(parts[0][0].shape[1])
    write_embedding_parts(folder / EMBEDDINGS_DIR / "oof.npy", len(oof), dim, parts)
    for f, file_name in zip(available, test_file_names(len(available))):
        array = open_npy(_fold_paths(work, f, True)["test_embeddings"], "fold test embedding file")
        write_embedding_parts(folder / EMBEDDINGS_DIR / file_name, len(array), dim, [(array, np.arange(len(array)))])
    return embedding_record(dim, len(available))


def _fold_summary(name, config, records: dict, done: list) -> dict:
    """The run summary's timing and per-fold scores, from the done folds' records."""
    return {
        "name": name, "arch": config.arch, "context": config.context,
        "folds": {f: records[f]["oof_logloss"] for f in done},
        "seconds": float(sum(r["train_seconds"] + r["predict_seconds"] for r in records.values())),
        "images_per_second": float(
            sum(r["train_images"] + r.get("pseudo_images", 0) for r in records.values()) * config.epochs / max(sum(r["train_seconds"] for r in records.values()), 1e-9)
        ),
    }


def _fold_predictions(wd, name, work, available, fold_frame, test_ids) -> tuple:
    """(oof_parts, oof, test, test_folds): the folds' OOF files, their validated union, the validated
    mean over the fold models' test files, and each fold model's test file validated (contract v3's
    test_fold<k>.parquet), all test tables in ``test_ids`` order."""
    oof_parts = [read_table(_fold_paths(work, f)["oof"], what="fold OOF file") for f in available]
    oof = pd.concat(oof_parts, ignore_index=True).sort_values("image_id", kind="stable").reset_index(drop=True)
    oof = validate_predictions(oof, str(wd.oof(name)), expected_ids=fold_frame["image_id"], what="labeled", folds=fold_frame)
    test_folds = []
    for f in available:
        frame = read_table(_fold_paths(work, f)["test"], what="fold test file").set_index("image_id").reindex(test_ids).reset_index()
        test_folds.append(validate_predictions(frame, str(wd.test_fold(name, f)), expected_ids=test_ids, what="test"))
    test_stack = np.stack([frame[list(LABELS)].to_numpy(np.float64) for frame in test_folds])
    test = validate_predictions(_probability_frame(test_ids, test_stack.mean(axis=0)), str(wd.test(name)),
                                expected_ids=test_ids, what="test")
    return oof_parts, oof, test, test_folds


def _model_info(wd, config, fhash, available, records, score, prior, summary, cache, dev, env, work, torch_version) -> dict:
    """model.json's contents for a complete trained model (embedding_dim filled in once embeddings are written)."""
    return {
        "source": "trained",
        "architecture": config.arch,
        "parameters": config.as_dict(),
        "folds_hash": fhash,
        "folds": available,
        "oof_logloss": score.overall,
        "oof_per_label": score.per_label,
        "oof_logloss_per_fold": {str(f): records[f]["oof_logloss"] for f in available},
        "prior_logloss": prior.overall,
        "train_seconds": float(sum(r["train_seconds"] for r in records.values())),
        "seconds": summary["seconds"],
        "train_images_per_second": summary["images_per_second"],
        "undecodable_images": dict(cache.bad),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch_version,
        "device": str(dev),
        "world_size": env.world_size,
        "checkpoints": {str(f): str(_fold_paths(work, f)["checkpoint"].relative_to(wd.root)) for f in available},
        "embedding_dim": None,
    }


def _finish(wd, name, config, train, test_ids, fold_frame, available, requested, work, fhash, dev, env, lines, cache,
            progress, embeddings: bool = True) -> dict:
    import torch

    done = [f for f in available if _fold_done(work, f, embeddings)]
    records = {f: read_json(_fold_paths(work, f)["record"]) for f in done}
    for f in requested if not progress else []:  # with progress on, each line was shown as its fold ended
        r = records[f]
        lines.append(f"fold {f}: OOF weighted log loss {r['oof_logloss']:.4f} (fold prior {r['fold_prior_logloss']:.4f})")
    summary = _fold_summary(name, config, records, done)
    missing = [f for f in available if f not in done]
    if missing:
        summary["complete"] = False
        lines.append(
            f"partial: {len(done)} of {len(available)} folds done (folds {','.join(map(str, done))}), kept in {work}; "
            f"preds/{name}/oof.parquet needs every fold: run again with --folds {','.join(map(str, missing))} "
            "(same options) or --resume"
        )
        summary["lines"] = lines
        return summary

    y = train[list(LABELS)].to_numpy(dtype=np.float64)
    oof_parts, oof, test, test_folds = _fold_predictions(wd, name, work, available, fold_frame, test_ids)
    aligned = oof.set_index("image_id").reindex(train["image_id"])[list(LABELS)].to_numpy(np.float64)
    score = weighted_log_loss(y, aligned)
    prior = prior_score(y)

    seconds = summary["seconds"]
    model_info = _model_info(wd, config, fhash, available, records, score, prior, summary, cache, dev, env, work, torch.__version__)
    model_info["test_folds"] = [wd.test_fold(name, f).name for f in available]
    # preds/<name>/ replaced as a set (as `base import` does), the fold work carried along by hard links
    with replace_dir(wd.preds_dir(name), keep=(WORK_DIR,)) as folder:
        write_parquet(oof, folder / "oof.parquet")
        write_parquet(test, folder / "test.parquet")
        for file_name, frame in zip(model_info["test_folds"], test_folds):
            write_parquet(frame, folder / file_name)  # fold model k's test predictions (contract v3)
        if embeddings:
            model_info.update(_write_model_embeddings(folder, work, available, oof_parts, oof))
            lines.append(f"embeddings: dimension {model_info['embedding_dim']} (pooled features before the head), "
                         f"OOF from each image's fold model, test from each of the {len(available)} fold models")
        write_set_record(folder, MODEL_RECORD, model_info, exclude=(WORK_DIR,))
    summary.update(complete=True, oof_logloss=score.overall, prior_logloss=prior.overall, per_label=score.per_label)
    lines.append(
        f"{name}: OOF weighted log loss {score.overall:.4f} vs prior {prior.overall:.4f} "
        f"({score.overall / prior.overall:.2f} x prior); {seconds:.1f} s, {summary['images_per_second']:.0f} train img/s "
        f"-> {wd.preds_dir(name)}"
    )
    summary["lines"] = lines
    return summary
