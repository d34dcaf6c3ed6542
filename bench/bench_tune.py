#!/usr/bin/env python
"""What `stack fit --tune` buys per stacker: its nested (outer-fold) score, its CV and the held-out labels.

    python bench/bench_tune.py --stackers lgbm --scenarios realistic,persistent --seeds tuning --trials 20
    python bench/bench_tune.py --stackers seq --scenarios realistic --seeds 0 --trials 20

Per scenario x seed, the benchmark of bench/bench_defaults.py (`base import` + `stack features`
through the CLI, cached under ``--out``); per stacker, in this process:

* the defaults fitted over all K folds (``fit_stacker``, seed ``--seed``);
* ``tune_stacker`` with ``--trials`` trials (no time limit) in an in-memory Optuna storage: the study
  never sees the outer fold ``seed % K``, and the trial best on the inner folds is refitted as one
  recipe over all K folds, as `stack fit --tune` does.

Printed per run: the outer fold's loss of the tuned recipe ("nested", the honest estimate) and of
the defaults on the same rows; both CV losses over all folds (the tuned one is optimistic: its
parameters were chosen on K-1 of those folds); and both held-out test losses (each stacker's test
predictions: every fold model on every base fold model's test set, averaged, as `submit` uses
them). Then the means. No asserts: figures only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.holdout import score_on
from stackkit.testing import stack_bench as bench_stack

ROOT = Path(__file__).resolve().parents[1]


def tune_run(name: str, bench, trials: int, seed: int) -> dict:
    import optuna

    from stackkit.stack.crossfit import fit_stacker, load_stack_inputs
    from stackkit.stack.tune import tune_stacker

    truth = pd.read_parquet(bench.heldout_test_labels)
    inputs = load_stack_inputs(bench.workdir)
    started = time.perf_counter()
    defaults = fit_stacker(name, None, inputs, seed=seed, progress=False)
    default_seconds = time.perf_counter() - started
    started = time.perf_counter()
    tuned = tune_stacker(name, inputs, storage=optuna.storages.InMemoryStorage(), study_name=f"bench-{name}", trials=trials,
                         timeout=None, seed=seed, inputs_key="bench_tune", progress=False)
    tune_seconds = time.perf_counter() - started
    result = tuned.result
    return {
        "stacker": name, "outer_fold": tuned.outer_fold, "selected_is_defaults": bool(result.tuning["selected_is_defaults"]),
        "nested_tuned": tuned.honest.overall, "nested_defaults": tuned.defaults_outer.overall,
        "cv_tuned": result.score.overall, "cv_defaults": defaults.score.overall,
        "heldout_tuned": score_on(result.test, truth, f"tuned {name}").overall,
        "heldout_defaults": score_on(defaults.test, truth, f"default {name}").overall,
        "defaults_s": default_seconds, "tune_s": tune_seconds,
        "params": json.loads(json.dumps(result.params, default=str)),
    }


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stackers", default="lgbm", help="comma-separated (default lgbm)")
    parser.add_argument("--scenarios", default="realistic,persistent")
    parser.add_argument("--seeds", default="tuning", help="'tuning', 'report' or a comma-separated list")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the fits' and the study's seed (picks the outer fold: seed %% K)")
    parser.add_argument("--patients", type=int, default=1200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "defaults", help="bench_defaults' cache of prepared benchmarks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import os

    os.environ["STACKKIT_THREADS"] = str(args.threads)
    env = bench_stack.child_env(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scenario in args.scenarios.split(","):
        for data_seed in bench_stack.parse_seeds(args.seeds):
            bench = bench_stack.prepared_bench(scenario, data_seed, args.out, args.patients, env)
            for name in args.stackers.split(","):
                row = {"scenario": scenario, "seed": data_seed, **tune_run(name, bench, args.trials, args.seed)}
                rows.append(row)
                print(f"  {scenario}-{data_seed} {name}: nested {row['nested_tuned']:.5f} (defaults {row['nested_defaults']:.5f}), "
                      f"held-out {row['heldout_tuned']:.5f} (defaults {row['heldout_defaults']:.5f}), tuning {row['tune_s']:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    shown = table.drop(columns=["params"]).copy()
    for what in ("nested", "cv", "heldout"):
        shown[f"{what} x"] = shown[f"{what}_tuned"] / shown[f"{what}_defaults"]
    pd.set_option("display.width", 220)
    print("\ntuned against the defaults (x = tuned / defaults; below 1: tuning helped):")
    print(shown[["scenario", "seed", "stacker", "outer_fold", "selected_is_defaults", "nested x", "cv x", "heldout x", "tune_s"]]
          .round(4).to_string(index=False))
    print("\nmean per stacker:")
    print(shown.groupby("stacker")[["nested x", "cv x", "heldout x", "tune_s"]].mean().round(4).to_string())
    return table


if __name__ == "__main__":
    main()
