"""Memory of stacking with embeddings at RSNA scale: peak RSS of one fold of ``seq_emb``.

Writes ``--models`` embedding files of ``--dim`` float16 columns for ``--images`` slices
(memory-mapped .npy, rows in image-id order as `base train` writes them, i.e. scattered with
respect to the studies) and a float32 feature matrix of ``--features`` columns, then runs the
real code path of one fold of `stack fit`: ``take`` of the fit / early-stopping / held-out rows,
``SeqEmbStacker.fit`` for ``--epochs`` epoch(s) (statistics, training batches streamed from the
memory-mapped files, the early-stopping pass forward + reversed) and ``predict`` of the held-out
rows. Prints the sizes, the seconds of each step and the peak RSS (``ru_maxrss``, which counts
the mapped file pages the process holds as well as its own memory).

    python bench/bench_embeddings.py                      # 870,000 images x 10 models x 2048-d (35 GB on disk)
    python bench/bench_embeddings.py --fraction 0.125     # an eighth of the images, same shapes otherwise

The default ``--features 1100`` is what `stack features` makes for 10 models with lags 2.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def current_rss_gb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


class RssSampler:
    """Peaks of RssAnon (the process's own memory) and RssFile (mapped file pages), sampled every 0.1 s."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            with open("/proc/self/status") as handle:
                for line in handle:
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) / 1024**2)

    def text(self) -> str:
        return f"sampled peaks: RssAnon {self.peak['RssAnon']:.2f} GiB, RssFile {self.peak['RssFile']:.2f} GiB"


def write_embedding_files(directory: Path, n_images: int, n_models: int, dim: int, seed: int) -> list[Path]:
    """float16 (n_images, dim) .npy files, filled from a random block (the contents do not matter here)."""
    from numpy.lib.format import open_memmap

    rng = np.random.default_rng(seed)
    block = rng.standard_normal((8192, dim), dtype=np.float32).astype(np.float16)
    paths = []
    for m in range(n_models):
        path = directory / f"model{m}_oof.npy"
        out = open_memmap(path, mode="w+", dtype=np.float16, shape=(n_images, dim))
        rolled = np.roll(block, m, axis=1)
        for start in range(0, n_images, len(block)):
            stop = min(n_images, start + len(block))
            out[start:stop] = rolled[: stop - start]
        out.flush()
        del out
        paths.append(path)
    return paths


def study_structure(n_images: int, seed: int):
    """Study codes and slice indices of ~n_images slices in studies of 20-60 slices (RSNA: ~34 on average)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 61, size=n_images // 20 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_images) + 1]
    lengths[-1] -= lengths.sum() - n_images
    lengths = lengths[lengths > 0]
    codes = np.repeat(np.arange(len(lengths)), lengths)
    index = np.arange(n_images) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return codes, index, len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=870_000)
    parser.add_argument("--fraction", type=float, default=1.0, help="run on this share of --images (memory is extrapolated by the reader)")
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--features", type=int, default=1100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to write the embedding files (default: a temporary folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the files (reused by a later run with the same --dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from stackkit.stack.stackers import EmbeddingSet, StackData, get_stacker

    n = int(round(args.images * args.fraction))
    directory = Path(args.dir or f"/tmp/stackkit-bench-embeddings-{os.getpid()}")
    directory.mkdir(parents=True, exist_ok=True)
    gib = n * args.dim * 2 * args.models / 1024**3
    print(f"{n:,} images ({args.fraction:g} of {args.images:,}), {args.models} models x {args.dim}-d float16 = {gib:.1f} GiB of "
          f"embeddings in {directory}; {args.features} float32 features = {n * args.features * 4 / 1024**3:.1f} GiB", flush=True)
    try:
        started = time.perf_counter()
        existing = sorted(directory.glob("model*_oof.npy"))
        if len(existing) == args.models and all(np.load(p, mmap_mode="r").shape == (n, args.dim) for p in existing):
            paths = existing
            print("reusing the embedding files", flush=True)
        else:
            paths = write_embedding_files(directory, n, args.models, args.dim, args.seed)
        print(f"write: {time.perf_counter() - started:.1f} s, peak RSS {peak_rss_gb():.2f} GiB", flush=True)

        rng = np.random.default_rng(args.seed)
        codes, index, n_studies = study_structure(n, args.seed)
        # file rows follow image ids, which are random with respect to the studies
        file_row = rng.permutation(n)
        arrays = tuple(np.load(p, mmap_mode="r") for p in paths)
        X = rng.standard_normal((n, args.features), dtype=np.float32)
        study_label = rng.random(n_studies) < 0.15
        Y = np.zeros((n, 6), dtype=np.float32)
        Y[:, 5] = study_label[codes] & (rng.random(n) < 0.5)
        Y[:, 0] = Y[:, 5] * (rng.random(n) < 0.3)
        emb = EmbeddingSet(tuple(f"model{m}" for m in range(args.models)), arrays, np.repeat(file_row[:, None], args.models, axis=1))
        data = StackData(X, codes, index, Y, embeddings=(emb,))
        print(f"inputs: {n_studies:,} studies, current RSS {current_rss_gb():.2f} GiB, peak {peak_rss_gb():.2f} GiB", flush=True)

        # one fold of `stack fit`: 5 folds by study; 15% of the training studies for early stopping
        fold = codes % 5
        held = np.flatnonzero(fold == 0)
        training = np.flatnonzero(fold != 0)
        valid_mask = (codes[training] % 20) < 3
        started = time.perf_counter()
        train, valid, held_data = data.take(training[~valid_mask]), data.take(training[valid_mask]), data.take(held)
        print(f"take: {time.perf_counter() - started:.1f} s; current RSS {current_rss_gb():.2f} GiB", flush=True)
        params = {"max_epochs": args.epochs, "patience": 1, "num_threads": args.threads}
        sampler = RssSampler()
        started = time.perf_counter()
        stacker = get_stacker("seq_emb").fit(train, valid, params, seed=0)
        fit_seconds = time.perf_counter() - started
        print(f"fit ({args.epochs} epoch(s) over {len(train):,} rows + early-stopping pass over {len(valid):,}): {fit_seconds:.1f} s, "
              f"peak RSS {peak_rss_gb():.2f} GiB", flush=True)
        started = time.perf_counter()
        probabilities = stacker.predict(held_data)
        print(f"predict ({len(held_data):,} held-out rows, forward + reversed): {time.perf_counter() - started:.1f} s", flush=True)
        assert probabilities.shape == (len(held), 6) and np.isfinite(probabilities).all()
        print(f"PEAK RSS {peak_rss_gb():.2f} GiB (target < 16 GB at 870,000 images); {sampler.text()}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
