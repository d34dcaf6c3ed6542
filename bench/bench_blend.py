#!/usr/bin/env python
"""Blend and submission cost at RSNA 2019 scale: prints seconds per step and peak memory.

Synthetic sources of the real sizes (752,803 labeled slices, 121,232 test slices, default 6
sources: 4 stackers + 2 base models), 5 folds:

* ``fit_blend`` (L-BFGS weights + temperature per label, clip grid) on all rows;
* ``search_blend`` with N Optuna trials (in memory) on all rows;
* the cross-validated blend (the same procedure refitted on 4 folds, applied to the 5th);
* ``to_long`` + CSV (and .csv.gz) of the test blend: the submission file.

    python bench/bench_blend.py [--train 752803] [--test 121232] [--sources 6] [--trials 20]
"""

from __future__ import annotations

import argparse
import gzip
import resource
import time

import numpy as np
import pandas as pd


def sources(n: int, n_sources: int, rng, y=None):
    if y is None:
        y = (rng.random((n, 6)) < np.array([0.004, 0.05, 0.035, 0.047, 0.063, 0.0])).astype(np.float64)
        y[:, 5] = y[:, :5].max(axis=1)
    strengths = np.linspace(1.0, 2.5, n_sources)
    preds = np.empty((n_sources, n, 6), dtype=np.float64)
    for s, strength in enumerate(strengths):
        preds[s] = 1 / (1 + np.exp(-(strength * (2 * y - 1) - 2.0 + rng.normal(0, 1.5, y.shape))))
    return preds.astype(np.float32).astype(np.float64), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=752_803)
    parser.add_argument("--test", type=int, default=121_232)
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    from stackkit.stack.blend import cross_validated_blend, fit_blend
    from stackkit.metric import weighted_log_loss
    from stackkit.submit import to_long
    from stackkit.stack.blend_search import search_blend
    from stackkit.contract import LABELS

    rng = np.random.default_rng(0)
    preds, y = sources(args.train, args.sources, rng)
    folds = rng.permutation(np.arange(args.train) % args.folds)
    names = [f"s{i}" for i in range(args.sources)]
    print(f"rows {args.train:,} x {args.sources} sources x 6 labels; test rows {args.test:,}; {args.folds} folds")

    def timed(label, func):
        start = time.perf_counter()
        result = func()
        print(f"{label:<44} {time.perf_counter() - start:8.2f} s")
        return result

    fitted = timed("fit_blend (L-BFGS, per label)", lambda: fit_blend(preds, y, per_label=True))
    timed("fit_blend (L-BFGS, shared)", lambda: fit_blend(preds, y, per_label=False))
    best, _ = timed(f"search_blend ({args.trials} Optuna trials, per label)",
                    lambda: search_blend(preds, y, names, per_label=True, any_consistency=True, trials=args.trials))
    pooled, _ = timed(f"cross-validated blend ({args.folds} folds x {args.trials} trials)",
                      lambda: cross_validated_blend(preds, y, folds, lambda p, yy: search_blend(
                          p, yy, names, per_label=True, any_consistency=True, trials=args.trials)[0]))
    print(f"{'scores: best source / in-sample / CV':<44} {min(weighted_log_loss(y, p).overall for p in preds):.5f} / "
          f"{best.score(preds, y).overall:.5f} / {weighted_log_loss(y, pooled).overall:.5f}")

    test_preds, _ = sources(args.test, args.sources, rng)
    ids = np.array([f"ID_{i:09x}" for i in range(args.test)], dtype=object)

    def submission():
        wide = pd.DataFrame(best.apply(test_preds), columns=list(LABELS))
        wide.insert(0, "image_id", ids)
        return to_long(wide).to_csv(index=False, float_format="%.7g", lineterminator="\n").encode("ascii")

    data = timed("submission CSV text (blend + to_long + to_csv)", submission)
    packed = timed("gzip (level 6)", lambda: gzip.compress(data, compresslevel=6, mtime=0))
    print(f"{'submission size csv / csv.gz':<44} {len(data) / 1e6:8.1f} MB / {len(packed) / 1e6:.1f} MB")
    print(f"{'peak resident memory':<44} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MB")


if __name__ == "__main__":
    main()
