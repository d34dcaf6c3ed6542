"""`base train`'s training loop: one model per fold trained and its predictions made
(:class:`Runner`, on one process or under torchrun), with the augmentations and optimizer groups it uses."""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from stackkit.contract import LABEL_WEIGHTS
from stackkit.metric import weighted_bce

from base_models.config import MIN_SCHEDULE_STEPS, NEIGHBOR_LR_SCALE, WARMUP_FRACTION, WEIGHT_DECAY, TrainConfig
from base_models.data import SliceDataset, batch_identity
from base_models.distributed import DistEnv, gather_rows, shard


class Runner:
    """Everything one process needs to train and predict folds (one instance per train_base call)."""

    def __init__(self, config: TrainConfig, dev, env: DistEnv, workers: int, progress: bool, weights=LABEL_WEIGHTS):
        """``weights``: the loss weight of each predicted column (RSNA 2019: any = 2), one head output each."""
        import torch

        self.torch = torch
        self.config = config
        self.dev = dev
        self.env = env
        self.workers = workers
        self.progress = progress and env.is_main
        self.weights = np.asarray(weights, dtype=np.float32)
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

    def _model(self, prior: np.ndarray):
        """A new model of the configured architecture, its head started at the fold's label ``prior``, on the device."""
        torch = self.torch
        from base_models.archs import create_model

        cfg = self.config
        model = create_model(cfg.arch, cfg.in_channels, len(self.weights), center_channels=cfg.center_channels, **cfg.model_options())
        model.init_weights(prior=torch.as_tensor(prior, dtype=torch.float32))
        return model.to(self.dev, memory_format=torch.channels_last) if self.cuda else model.to(self.dev)

    def _parallel(self, model, dataset: SliceDataset, generator, fold_seed: int):
        """(the module to train, its sampler): DistributedDataParallel and a DistributedSampler under torchrun."""
        from torch.utils.data import DistributedSampler, RandomSampler

        if not self.env.enabled:
            return model, RandomSampler(dataset, generator=generator)
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[self.dev.index] if self.cuda else None)
        return trained, DistributedSampler(dataset, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=True, seed=fold_seed)

    def _optimizer(self, model, steps: int):
        """(AdamW, its one-cycle schedule) over ``steps`` batches per epoch."""
        torch, cfg = self.torch, self.config
        groups = optimizer_groups(model, cfg.lr)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(MIN_SCHEDULE_STEPS, cfg.epochs * steps),
            pct_start=WARMUP_FRACTION
        )
        return optimizer, schedule

    def train_fold(self, fold: int, dataset: SliceDataset, prior: np.ndarray):
        """Train one model on ``dataset``; returns (model, seconds, images seen, mean last-epoch loss)."""
        torch = self.torch
        from torch.utils.data import DistributedSampler
        from tqdm.auto import tqdm

        cfg = self.config
        fold_seed = cfg.seed * 1009 + fold  # depends on (seed, fold) only: resume-safe
        torch.manual_seed(fold_seed)
        generator = torch.Generator().manual_seed(fold_seed)
        flip_generator = torch.Generator().manual_seed(fold_seed + 1)
        zflip_generator = torch.Generator().manual_seed(fold_seed + 2)
        model = self._model(prior)
        trained, sampler = self._parallel(model, dataset, generator, fold_seed)
        per_rank = math.ceil(len(dataset) / self.env.world_size)
        batch_size = min(cfg.batch_size, per_rank)
        drop_last = per_rank > batch_size  # BatchNorm cannot train on a final batch of one
        loader = self._loader(dataset, sampler, batch_size, generator, drop_last=drop_last)
        optimizer, schedule = self._optimizer(model, len(loader))
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        weights = torch.as_tensor(self.weights, dtype=torch.float32, device=self.dev)
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
        """Sigmoid probabilities (n, columns) float32 for every sample and, with ``embeddings``, the pooled
        features before the head (n, feature_dim) float32 (the mean over the flips with ``tta``),
        on rank 0 (None on other ranks); without ``embeddings`` the second item is None."""
        torch = self.torch
        from tqdm.auto import tqdm

        positions = shard(np.arange(len(dataset)), self.env)
        model.eval()
        out = np.empty((len(positions), len(self.weights)), dtype=np.float32)
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


def cpu_threads_for(img_size: int, available: int) -> int:
    """Intra-op threads for CPU training: one per 128x128 tile of the input, at most ``available``.

    Measured on 2 busy cores (bench/bench_base.py): at 128 px one thread trained at 59 img/s and
    two at 17 img/s. Set OMP_NUM_THREADS to choose yourself (it is then left alone)."""
    return max(1, min(int(available), (int(img_size) // 128) ** 2))
