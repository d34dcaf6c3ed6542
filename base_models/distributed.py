"""Several processes (torchrun) for one ``base train``: DistributedDataParallel helpers.

The same command runs under ``torchrun --nproc_per_node=N cli.py base train ...``: torchrun
sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; each process trains on its DistributedSampler
shard (NCCL on GPUs, gloo on CPU), predicts its shard of the images, and rank 0 gathers the
predictions and alone writes files. Without those variables everything is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when we created the process group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group torchrun describes (if any); NCCL for CUDA, gloo otherwise."""
    world_size = env_world_size()
    if world_size <= 1:
        return DistEnv()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        owns = True
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, owns_group=owns)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(env: DistEnv, obj):
    """Rank 0's ``obj`` on every rank (used to share decisions such as which folds remain)."""
    if not env.enabled:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shard(indices: np.ndarray, env: DistEnv) -> np.ndarray:
    """This rank's share of ``indices`` (strided, so shards differ in size by at most one)."""
    return indices[env.rank :: env.world_size] if env.enabled else indices


def gather_rows(env: DistEnv, positions: np.ndarray, values: np.ndarray, total: int) -> np.ndarray | None:
    """Reassemble per-rank (positions, values) into one (total, ...) array on rank 0 (None elsewhere)."""
    if not env.enabled:
        out = np.empty((total,) + values.shape[1:], dtype=values.dtype)
        out[positions] = values
        return out
    import torch.distributed as dist

    gathered = [None] * env.world_size if env.is_main else None
    dist.gather_object((positions, values), gathered, dst=0)
    if not env.is_main:
        return None
    out = np.empty((total,) + values.shape[1:], dtype=values.dtype)
    seen = np.zeros(total, dtype=bool)
    for pos, val in gathered:
        out[pos] = val
        seen[pos] = True
    if not seen.all():
        raise RuntimeError(f"distributed prediction lost {int((~seen).sum())} rows")
    return out


def shutdown(env: DistEnv) -> None:
    if env.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
