"""Held-out benchmark of second stages for the study- and patient-level tasks (issue 19).

    python bench/bench_tasks.py --task rsna2022-cspine --seeds tuning         # seeds 0,1: choose dials and defaults here
    python bench/bench_tasks.py --task rsna2023-abdominal --seeds report      # seeds 101,102,103: judge a change
    python bench/bench_tasks.py --task rsna2022-cspine --seeds 5,6 --patients 800 --json out.json

Per seed, stackkit.testing.task_exported generates per-slice base-model predictions (OOF from the
fold model that held each patient out; on test the mean of the K fold models), labels at the
target unit (study or patient) and the latent evidence; the test units' labels are held out and
only scored here, with the task's metric (``schema_metric``). Compared, in this process:

(a) best base model: each model's plain aggregation (per unit the max over its slices, per target;
    a softmax group's healthy class 1 - the max of its injury classes, then normalised; a
    predicted derived label the max over its groups), the best on the held-out labels;
(b) plain LightGBM: a booster per target (binary, or multiclass for a k-class group) on per-unit
    aggregates of every model's slice predictions of the columns the target reads (max, mean,
    mean of the top TOP_K; a group its own columns, patient_overall its own and C1..C7), trained on
    the OOF rows' aggregates on the same patient-grouped folds (fold k's booster stops early on
    fold k; the test prediction is the mean of the K boosters on the test aggregates), weighted by
    the metric's class weights;
(c) floor: the same LightGBM on the latent evidence instead of the predictions;
(d) the default unit stack (``stack_fit_scores``): stackkit.stack.units.fit_unit_stack on
    features.units.unit_feature_table features of every model's OOF slice predictions (test: one
    feature set per base fold model), the blend's test predictions; beside it each of its stackers
    alone (the mean of its fold models). What `stack fit` + `submit` run for a task work directory.

Printed per seed and as the mean over seeds: each method's held-out loss and loss x plain
LightGBM's. Calibration target of the generator's dials (TASK_DIALS), on the tuning seeds at the
default size (1,000 patients, half held out): the plain LightGBM about 5-10 % below the best base
model (what published second stages gained), the floor clearly lower. Reached: best base / plain
LightGBM 1.09 (spine) and 1.07 (abdomen), floor / plain LightGBM ~0.26 and ~0.45. The ratio
depends on the number of train units (the LightGBM learns from them, the base heads need few):
with 360 train units it was 1.06 and 0.97. On the reporting seeds (run once, after the dials were
fixed): 1.115 and 1.058, floor ~0.30 and ~0.42. No asserts: it prints figures (and --json writes them).

The default unit stack (lgbm + logreg per target, blended per target; issue 19), its defaults
chosen on the tuning seeds at 400 patients (200 train units): held-out loss x plain LightGBM 0.911
(spine) and 0.758 (abdomen), best base 1.062 and 0.930. On the reporting seeds (run once, after
the defaults were fixed; 400 patients, half held out), mean over 101-103: spine 0.31631 (x 0.904;
best base 0.36536, plain LightGBM 0.34942, floor 0.12521), abdomen 0.26981 (x 0.779; best base
0.32077, plain LightGBM 0.34667, floor 0.17151); below both the best base model and the plain
LightGBM on every reporting seed of both tasks. Most of the gain is the logistic regression on the
logits of the aggregates (the blend keeps it for most targets), trees on 200 units gain little.

Seeds: TUNING_SEEDS are where the dials and defaults are chosen; REPORT_SEEDS give the figures a
change is judged by, and are never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from features.units import unit_feature_table
from stackkit.contract.tasks import TaskSchema, schema_metric
from stackkit.stack.units import DEFAULT_UNIT_STACKERS, fit_unit_stack, mean_predictions
from stackkit.testing.stack_bench import REPORT_SEEDS, TUNING_SEEDS, parse_seeds
from stackkit.testing.task_exported import TaskBenchmark, make_task_benchmark, max_aggregation, prior_predictions, unit_aggregates

GENERATED_TASKS = ("rsna2022-cspine", "rsna2023-abdominal")
TOP_K = 5
# few units (hundreds), many features (3 per model and column), rare positives: small, regularised trees
LGBM_PARAMS = {"learning_rate": 0.05, "num_leaves": 4, "min_data_in_leaf": 5, "feature_fraction": 0.5,
               "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 2.0, "verbosity": -1}


# --- per-unit features -------------------------------------------------------------------------


def feature_tables(bench: TaskBenchmark, inputs: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) per-unit features, indexed by unit id: ``inputs`` maps a name to its (train
    rows, test rows) frames (image_id + the slice columns)."""
    unit_of = bench.slices.set_index("image_id")[bench.unit_column]
    tables = []
    for part in (0, 1):
        blocks = []
        for name, frames in inputs.items():
            frame = frames[part]
            units, values = unit_aggregates(unit_of.reindex(frame["image_id"]).to_numpy(), frame[list(bench.columns)].to_numpy(), TOP_K)
            names = [f"{name}:{c}:{stat}" for c in bench.columns for stat in ("max", "mean", f"top{TOP_K}")]
            blocks.append(pd.DataFrame(values, index=pd.Index(units, name=bench.unit_column), columns=names))
        tables.append(pd.concat(blocks, axis=1))
    return tables[0], tables[1]


# --- the plain LightGBM -------------------------------------------------------------------------


def _targets(schema: TaskSchema) -> list[tuple[tuple[str, ...], tuple[float, ...], tuple[str, ...]]]:
    """(label columns, class weights, slice columns it reads) per booster: a binary group or
    predicted derived label one column (weights negative, positive); a softmax group its classes.
    A group reads its own slice columns (a softmax group's injury classes), a derived label its
    own (where the slice models predict it) and its groups'."""
    out = [(g.columns, tuple(g.weights), (g.name,) if g.kind == "binary" else g.classes[1:]) for g in schema.groups]
    reads = {g.name: (g.name,) if g.kind == "binary" else g.classes[1:] for g in schema.groups}
    out += [((d.name,), tuple(d.weights), (d.name,) + sum((reads[m] for m in d.of), ())) for d in schema.derived if d.predicted]
    return out


def _fit_target(train: np.ndarray, test: np.ndarray, y: np.ndarray, weights: np.ndarray, fold: np.ndarray,
                n_classes: int, seed: int) -> np.ndarray:
    """Test probabilities (n_test, n_classes), the mean of one booster per fold (early stopping on
    its held-out fold); a binary target's two columns are (1 - p, p)."""
    import lightgbm as lgb

    objective = {"objective": "binary"} if n_classes == 2 else {"objective": "multiclass", "num_class": n_classes}
    params = {**LGBM_PARAMS, **objective, "num_threads": 1, "seed": seed}
    total = np.zeros((len(test), n_classes))
    n_folds = int(fold.max()) + 1
    for k in range(n_folds):
        fit, held = fold != k, fold == k
        data = lgb.Dataset(train[fit], y[fit], weight=weights[fit])
        stop = lgb.Dataset(train[held], y[held], weight=weights[held], reference=data)
        booster = lgb.train(params, data, num_boost_round=1000, valid_sets=[stop], callbacks=[lgb.early_stopping(50, verbose=False)])
        p = booster.predict(test, num_iteration=booster.best_iteration)
        total += np.column_stack([1.0 - p, p]) if n_classes == 2 else p
    return total / n_folds


def lightgbm_predictions(bench: TaskBenchmark, train: pd.DataFrame, test: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The test units' predictions (unit id + the schema's labels) of the plain LightGBM on the
    per-unit features ``train`` / ``test`` (indexed by unit id, columns ``source:column:stat``),
    on the benchmark's folds; each booster on the features of the slice columns its target reads."""
    labels = bench.labels.set_index(bench.unit_column).loc[train.index]
    fold = bench.folds.set_index(bench.unit_column)["fold"].loc[train.index].to_numpy()
    out = {}
    column_of = np.array([name.split(":")[-2] for name in train.columns])
    for columns, class_weights, reads in _targets(bench.schema):
        features = np.isin(column_of, reads)
        if len(columns) == 1:
            y = labels[columns[0]].to_numpy().astype(np.int64)
            n_classes, names = 2, (None, columns[0])
        else:
            y = labels[list(columns)].to_numpy().argmax(axis=1)
            n_classes, names = len(columns), columns
        weights = np.asarray(class_weights, dtype=np.float64)[y]
        p = _fit_target(train.to_numpy()[:, features], test.to_numpy()[:, features], y, weights, fold, n_classes, seed)
        out.update({c: p[:, i] for i, c in enumerate(names) if c is not None})
    frame = pd.DataFrame({c: out[c] for c in bench.schema.labels})
    frame.insert(0, bench.unit_column, test.index.to_numpy())
    return frame


def _split_rows(bench: TaskBenchmark, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A table of every slice split into (train rows, test rows) by the benchmark's split."""
    test_ids = bench.slices.loc[bench.slices["split"] == "test", "image_id"]
    is_test = frame["image_id"].isin(test_ids).to_numpy()
    return frame[~is_test], frame[is_test]


# --- (d) the default stack fit ------------------------------------------------------------------


def unit_slices(bench: TaskBenchmark) -> pd.DataFrame:
    """The benchmark's slices as unit_feature_table reads them: study_id the series, z its slice number."""
    slices = bench.slices.assign(z=bench.slices["slice_no"])
    if bench.unit_column != "study_id":  # the abdomen: a patient's series are its studies
        slices["study_id"] = slices["series_id"]
    return slices


def unit_inputs(bench: TaskBenchmark) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """(train unit features with the fold, one test feature set per fold model) from every model's
    OOF and per-fold test slice predictions."""
    slices = unit_slices(bench)
    train_slices, test_slices = slices[slices["split"] == "train"], slices[slices["split"] == "test"]
    train = unit_feature_table(train_slices, bench.oof, bench.schema)
    folds = bench.folds[[bench.unit_column, "fold"]].astype({bench.unit_column: str})
    train = train.merge(folds, on=bench.unit_column, how="left", validate="one_to_one")
    tests = [unit_feature_table(test_slices, {m: bench.test_folds[m][k] for m in bench.models}, bench.schema)
             for k in range(bench.n_folds)]
    return train, tests


def stack_fit_scores(bench: TaskBenchmark, seed: int, stackers=None) -> dict:
    """The default unit stack (``fit_unit_stack`` on ``unit_feature_table`` features of every model's
    OOF slice predictions; on test, one feature set per base fold model) scored on the held-out
    labels: {"default": the blend's score, <stacker>: each stacker's (mean of its fold models), each
    as TaskScore.as_dict(); "cv": the blend's cross-validated score on the train units}."""
    train, tests = unit_inputs(bench)
    result = fit_unit_stack(bench.schema, train, bench.labels, tests, stackers=stackers, seed=seed, threads=1)
    scores = {"default": schema_metric(bench.schema, bench.test_labels, result.test).as_dict()}
    for name, stacker in result.stackers.items():
        scores[name] = schema_metric(bench.schema, bench.test_labels, mean_predictions(bench.schema, stacker.test_sets)).as_dict()
    scores["cv (train units)"] = result.score.as_dict()
    return scores


# --- one seed -----------------------------------------------------------------------------------


def run_seed(task: str, seed: int, args) -> dict:
    started = time.perf_counter()
    bench = make_task_benchmark(task, args.patients, seed, n_models=args.models, n_folds=args.folds, test_fraction=args.test_fraction)
    generate_s = time.perf_counter() - started
    schema, truth = bench.schema, bench.test_labels
    losses = {f"base {m}": schema_metric(schema, truth, max_aggregation(bench, bench.test[m])).overall for m in bench.models}
    losses["prior (train rates)"] = schema_metric(schema, truth, prior_predictions(bench, truth)).overall
    timings = {"generate_s": generate_s}
    started = time.perf_counter()
    train, test = feature_tables(bench, {m: (bench.oof[m], bench.test[m]) for m in bench.models})
    losses["plain lightgbm"] = schema_metric(schema, truth, lightgbm_predictions(bench, train, test, seed)).overall
    timings["lightgbm_s"] = time.perf_counter() - started
    train, test = feature_tables(bench, {"latent": _split_rows(bench, bench.latent)})
    losses["floor"] = schema_metric(schema, truth, lightgbm_predictions(bench, train, test, seed)).overall
    started = time.perf_counter()
    stack = stack_fit_scores(bench, seed, args.stackers)
    timings["stack_fit_s"] = time.perf_counter() - started
    stack_cv = stack.pop("cv (train units)")
    losses.update({f"stack fit {k}": v["overall"] for k, v in stack.items()})
    return {"task": task, "seed": seed, "losses": losses, "timings": timings, "stack_fit": stack, "stack_fit_cv": stack_cv,
            "data": {"patients": args.patients, "units": len(bench.labels) + len(truth), "train_units": len(bench.labels),
                     "test_units": len(truth), "slices": len(bench.slices), "models": list(bench.models)}}


def compare(losses: dict) -> dict:
    """Method -> (loss, loss x plain LightGBM's), the best base model first."""
    bases = {k: v for k, v in losses.items() if k.startswith("base ")}
    best = min(bases, key=bases.get)
    lgbm = losses["plain lightgbm"]
    rows = {f"best base ({best.removeprefix('base ')})": losses[best]}
    rows.update({k: v for k, v in losses.items() if not k.startswith("base ")})
    return {name: {"loss": loss, "x_lgbm": loss / lgbm} for name, loss in rows.items()}


def print_compare(rows: dict) -> None:
    print(f"{'method':36s} {'loss':>8s} {'x lgbm':>7s}")
    for name, row in rows.items():
        print(f"{name:36s} {row['loss']:8.5f} {row['x_lgbm']:7.3f}")


def summarize(results: list[dict]) -> dict:
    """Mean over seeds of each method's loss and ratio (the best base model as one row)."""
    tables = [compare(r["losses"]) for r in results]
    rename = [{("best base" if k.startswith("best base") else k): v for k, v in t.items()} for t in tables]
    return {name: {stat: float(np.mean([t[name][stat] for t in rename])) for stat in ("loss", "x_lgbm")} for name in rename[0]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=GENERATED_TASKS)
    parser.add_argument("--seeds", default="tuning", help=f"'tuning' {TUNING_SEEDS} (default), 'report' {REPORT_SEEDS} or comma-separated seeds")
    parser.add_argument("--patients", type=int, default=1000, help="patients per seed (default 1000: ~20 s a seed on one core)")
    parser.add_argument("--test-fraction", type=float, default=0.5,
                        help="share of the patients held out (default 0.5: 500 test units keep the loss steady)")
    parser.add_argument("--models", type=int, default=None, help="base models (default: the task's dials)")
    parser.add_argument("--folds", type=int, default=5, help="patient-grouped folds (default 5)")
    parser.add_argument("--stackers", default=None, type=lambda text: text.split(","),
                        help=f"unit stackers of the stack fit, comma-separated (default: {','.join(DEFAULT_UNIT_STACKERS)})")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    args.seed_list = parse_seeds(args.seeds)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    print(f"bench_tasks: {args.task}, {args.patients:,} patients, seeds {args.seed_list}; {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    results = []
    for seed in args.seed_list:
        result = run_seed(args.task, seed, args)
        d, t = result["data"], result["timings"]
        print(f"\n=== {args.task}, seed {seed}: {d['units']:,} units ({d['train_units']:,} train / {d['test_units']:,} held-out), "
              f"{d['slices']:,} slices, {len(d['models'])} models; generated in {t['generate_s']:.1f}s, "
              f"plain LightGBM {t['lightgbm_s']:.1f}s, stack fit {t['stack_fit_s']:.1f}s")
        for name, loss in result["losses"].items():
            if name.startswith("base "):
                print(f"  {name:34s} {loss:8.5f}")
        print_compare(compare(result["losses"]))
        results.append(result)
    summary = summarize(results)
    print(f"\n=== {args.task}: mean over seeds {','.join(map(str, args.seed_list))}")
    print_compare(summary)
    report = {"args": {k: v for k, v in vars(args).items()}, "results": results, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
