"""Held-out benchmark of the whole stacking pipeline, through the real command line.

    python bench/bench_stack.py --scenario persistent --seeds tuning            # seeds 0,1: choose defaults here
    python bench/bench_stack.py --seeds report --json out.json                  # every scenario, seeds 101,102,103
    python bench/bench_stack.py --scenario persistent --variants 'lgbm=--stackers lgbm;blend=--stackers lgbm,mlp'
    python bench/bench_stack.py --fit-args "--stackers lgbm"                    # one variant `default`
    python bench/bench_stack.py --embeddings                     # also export and import 64-dim embeddings
    python bench/bench_stack.py --scale full --no-baseline       # ~870,000 images x 10 models

Per scenario (stackkit.testing.exported.SCENARIOS: independent, persistent, many_models) and seed,
the generator writes a work directory's data/ (metadata, labels, folds), base-model predictions
exported outside it (OOF, the fold models' mean on test and each fold model's test file), the
latent evidence and the test labels, the last two held out in files the pipeline never sees.
Then, each in its own process, as a user would: `base import` per model (with `--test-fold` per
fold model where this checkout's `base import` lists that option), `stack features`, and per
variant (`--variants 'NAME=FIT ARGS;...'`, each on its own copy of the work directory, so all
see identical inputs) `stack fit [FIT ARGS]` and `submit`; each step's wall/cpu time and peak
resident memory (the child's ru_maxrss from wait4).

Scored on the held-out labels (RSNA weighted log loss): the best base model, a plain LightGBM run
in this process (a booster per label on lags/leads 1-2, study max/mean of the exported predictions
and the slice position; its wall time is printed: the default `stack fit` should stay within 3x
of it), the floor (the same LightGBM on the latent evidence instead of the predictions: what no
model error would leave), and per variant the submission and every stacker's
stack/<name>/test.parquet, each as a ratio to the plain LightGBM and as the share of the gap it
closed, (lgbm - method) / (lgbm - floor). Then the mean over seeds per scenario and variant. No
asserts: it prints figures (and --json writes them all).

Seeds: TUNING_SEEDS (0, 1) are where defaults and the scenarios' dials are chosen; REPORT_SEEDS
(101, 102, 103) give the figures a change is judged by, and are never used to choose anything.
"""

from __future__ import annotations

import argparse

from stackkit.testing.exported import SCENARIOS
from stackkit.testing.stack_bench import REPORT_SEEDS, TUNING_SEEDS, parse_seeds, parse_variants, run_benchmark

FULL_PATIENTS = 20_100  # ~870,000 images: 1.08 studies per patient, ~40 slices per study
FULL_MODELS = 10


# --- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=",".join(SCENARIOS),
                        help=f"comma-separated generator scenarios (default: all: {','.join(SCENARIOS)})")
    parser.add_argument("--patients", type=int, default=1200, help="patients per seed (default 1200: ~48k images)")
    parser.add_argument("--models", type=int, default=None, help="exported base models (default: the scenario's)")
    parser.add_argument("--seeds", default="tuning",
                        help=f"'tuning' {TUNING_SEEDS} (default), 'report' {REPORT_SEEDS} or comma-separated seeds")
    parser.add_argument("--scale", choices=["default", "full"], default="default",
                        help=f"full: RSNA size, {FULL_PATIENTS:,} patients (~870,000 images) x {FULL_MODELS} models")
    parser.add_argument("--fit-args", default="", help='extra options for `stack fit`, e.g. "--stackers lgbm" (default: none)')
    parser.add_argument("--variants", default=None,
                        help="'NAME=FIT ARGS;NAME2=FIT ARGS': one `stack fit` + `submit` per variant on the same imports and "
                             "features (default: one variant `default` with --fit-args)")
    parser.add_argument("--embeddings", action="store_true", help="export embeddings and pass them to `base import`")
    parser.add_argument("--embedding-dim", type=int, default=0, help="embedding size D (default 64 with --embeddings, else none)")
    parser.add_argument("--no-test-folds", action="store_true",
                        help="do not pass the per-fold-model test files to `base import` even where it takes --test-fold")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process LightGBM baseline and the floor")
    parser.add_argument("--baseline-ablation", action="store_true",
                        help="also run the baseline on each slice's own predictions only (no neighbors, no study aggregates)")
    parser.add_argument("--baseline-threads", type=int, default=2, help="LightGBM threads of the baseline (default 2)")
    parser.add_argument("--baseline-rounds", type=int, default=2000, help="most boosting rounds per label of the baseline (default 2000)")
    parser.add_argument("--threads", type=int, default=None, help="$STACKKIT_THREADS for the CLI steps (default: unset)")
    parser.add_argument("--timing-repeats", type=int, default=1,
                        help="time the plain LightGBM and each variant's `stack fit` N times, interleaved, and report the "
                             "medians (default 1)")
    parser.add_argument("--keep", default=None, help="write everything under this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.scale == "full":
        args.patients, args.models = FULL_PATIENTS, FULL_MODELS
    if args.embeddings and not args.embedding_dim:
        args.embedding_dim = 64
    args.scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"--scenario: unknown {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    if args.timing_repeats < 1:
        parser.error(f"--timing-repeats: expected at least 1, got {args.timing_repeats}")
    args.seed_list = parse_seeds(args.seeds)
    args.variant_list = parse_variants(args.variants, args.fit_args)
    return args


def main(argv=None) -> dict:
    return run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
