"""Time every registered stacker's full K-fold fit at demo scale and print the figures.

Synthetic studies (default ~3,000 train slices, 200 features, 5 folds) built in the features/
layout by stackkit.testing.stack, default stacker parameters. Usage:

    python bench/bench_stackers.py [--patients 300] [--extra-features 160] [--stackers lgbm,xgb,mlp,seq]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.testing.stack import write_stack_workdir

from stackkit.contract.io import read_json, write_json, write_parquet
from stackkit.metric import prior_score
from stackkit.stack.crossfit import fit_stacker, load_stack_inputs


def _widen(wd, extra: int, seed: int = 0) -> None:
    """Add ``extra`` noise columns so the feature count matches a realistic features/ table."""
    rng = np.random.default_rng(seed)
    manifest = read_json(wd.features_manifest)
    for path in (wd.features_train, wd.features_test):
        frame = pd.read_parquet(path)
        noise = pd.DataFrame(rng.normal(size=(len(frame), extra)).astype(np.float32), columns=[f"noise__{i}" for i in range(extra)])
        write_parquet(pd.concat([frame, noise], axis=1), path)
    manifest["feature_columns"] += [f"noise__{i}" for i in range(extra)]
    write_json(manifest, wd.features_manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--extra-features", type=int, default=160)
    parser.add_argument("--stackers", default="lgbm,xgb,mlp,seq")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wd = write_stack_workdir(Path(tmp) / "work", n_patients=args.patients, n_folds=args.folds)
        _widen(wd, args.extra_features)
        inputs = load_stack_inputs(wd)
        prior = prior_score(inputs.train.Y).overall
        print(f"train slices {len(inputs.train)}, test slices {len(inputs.test)}, features {len(inputs.feature_columns)}, "
              f"folds {inputs.n_folds}, prior log loss {prior:.4f}")
        for name in args.stackers.split(","):
            started = time.perf_counter()
            result = fit_stacker(name, None, inputs, seed=0, progress=False)
            print(f"{name:5s} {time.perf_counter() - started:7.1f} s  OOF weighted log loss {result.score.overall:.4f}  "
                  f"({result.score.overall / prior:.0%} of prior)")


if __name__ == "__main__":
    main()
