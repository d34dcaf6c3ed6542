"""Held-out benchmark of the whole stacking pipeline, through the real command line.

    python bench/bench_stack.py                                  # 1,200 patients (~50k images), 6 models, seed 0
    python bench/bench_stack.py --fit-args "--stackers lgbm"     # options passed on to `stack fit`
    python bench/bench_stack.py --seeds 0,1,2 --json out.json
    python bench/bench_stack.py --embeddings                     # also export and import 64-dim embeddings
    python bench/bench_stack.py --scale full --no-baseline       # ~870,000 images x 10 models

Per seed, stackkit.testing.exported writes a work directory's data/ (metadata, labels, folds),
base-model predictions exported outside it (study-structured errors, miscalibrated, one or two
weak models) and the test labels, held out in a file the pipeline never sees. Then, each in its
own process, as a user would: `base import` per model, `stack features`, `stack fit [FIT ARGS]`,
`submit`; each step's wall time and peak resident memory (the child's ru_maxrss from wait4).
The submission, every stacker's stack/<name>/test.parquet and every base model's test
predictions are scored on the held-out labels with the RSNA weighted log loss, next to a plain
LightGBM baseline run in this process (a booster per label on lags/leads/study max/mean of the
exported predictions and the slice position). No asserts: it prints figures.

Measured on an idle 2-core machine, 2026-12-01 (README, "stack fit on held-out labels"):
1,200 patients (~51k images), 6 models, seeds 0/1/2: default `stack fit` 43-48 s, submission
0.02337 / 0.02174 / 0.01714 = the lgbm stacker's, 0.75 / 0.87 / 0.82 x the baseline.
`--scale full` (870,033 images, 10 models): `stack fit` 1,253 s, peak 11.2 GiB, submission 0.01439.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stackkit.contract import LABELS, Workdir, slice_order  # noqa: E402
from stackkit.metric import prior_score, weighted_log_loss  # noqa: E402
from stackkit.testing.exported import write_exported_benchmark  # noqa: E402

CLI = [sys.executable, str(ROOT / "cli.py")]
FULL_PATIENTS = 20_100  # ~870,000 images: 1.08 studies per patient, ~40 slices per study
FULL_MODELS = 10


# --- one CLI step in a child process -----------------------------------------------------------


@dataclass
class Step:
    name: str
    wall_s: float
    peak_mib: float
    returncode: int
    log: Path
    cpu_s: float = float("nan")  # user + system CPU: on a busy machine, closer than wall to what an idle one takes

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3), "peak_mib": round(self.peak_mib, 1),
                "returncode": self.returncode}


def run_step(name: str, args: list, log_dir: Path, env: dict) -> Step:
    """``python cli.py ARGS`` in a child; wall time and the child's peak RSS (wait4's ru_maxrss)."""
    log = log_dir / f"{name.replace(' ', '_')}.log"
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        # wait4 rather than proc.wait(): its rusage is this child's (and its waited-for descendants')
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux
    return Step(name, wall, usage.ru_maxrss / 1024.0, proc.returncode, log, usage.ru_utime + usage.ru_stime)


def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["STACKKIT_THREADS"] = str(threads)
    return env


def import_supports_embeddings(env: dict) -> bool:
    proc = subprocess.run([*CLI, "base", "import", "--help"], capture_output=True, text=True, cwd=ROOT, env=env)
    return "--oof-embeddings" in proc.stdout


# --- peak memory of a step in this process -----------------------------------------------------


class PeakRSS:
    """Peak RSS while the block runs: the kernel's high-water mark, reset on entry (Linux clear_refs)."""

    def __enter__(self):
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
            self.reset = True
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        self.peak_mib = float("nan")
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        self.peak_mib = int(line.split()[1]) / 1024.0
        except OSError:
            import resource

            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return False


# --- the plain LightGBM baseline ---------------------------------------------------------------


def exported_predictions(bench) -> dict[str, pd.DataFrame]:
    """Each model's predictions of every image (its OOF rows and its test file): image_id + six labels."""
    return {model: pd.concat([pd.read_parquet(bench.oof_files[model]).drop(columns="fold"), pd.read_parquet(bench.test_files[model])])
            for model in bench.models}


def latent_evidence(bench) -> dict[str, pd.DataFrame]:
    """The generator's latent evidence of every image (before any model error), as one "model": the floor's input."""
    return {"latent": pd.read_parquet(bench.latent_evidence)}


def lightgbm_baseline(bench, seed: int, threads: int = 2, max_rounds: int = 2000, context: bool = True,
                      inputs: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """A booster per label on the exported predictions' lags/leads 1-2, study max/mean and position.

    Trained on every labeled row, early stopping on 10 % of the patients; returns the test images'
    probabilities (image_id + six labels). ``context=False`` keeps only each slice's own
    predictions and its position: what study-awareness adds is the difference. ``inputs``
    (name -> image_id + six columns, every image) replaces the exported predictions: with
    ``latent_evidence(bench)`` the same learner gives the scenario's floor.
    """
    import lightgbm as lgb

    inputs = exported_predictions(bench) if inputs is None else inputs

    meta = pd.read_parquet(bench.workdir.metadata, columns=["image_id", "patient_id", "study_id", "split", "z"])
    study_code = pd.factorize(meta["study_id"])[0]
    meta = meta.iloc[slice_order(study_code, meta["z"].to_numpy(), meta["image_id"].to_numpy())].reset_index(drop=True)
    study = pd.factorize(meta["study_id"])[0]
    starts = np.flatnonzero(np.r_[True, study[1:] != study[:-1]])
    size = np.diff(np.r_[starts, len(meta)])
    index = np.arange(len(meta)) - np.repeat(starts, size)
    in_study = np.repeat(size, size)
    per_label = 1 + (6 if context else 0)  # the prediction, lag1/2, lead1/2, study max/mean
    X = np.empty((len(meta), 1 + len(inputs) * len(LABELS) * per_label), dtype=np.float32)
    X[:, 0] = index / np.maximum(in_study - 1, 1)  # position in the study
    col = 1
    for both in inputs.values():
        pred = both.set_index("image_id").reindex(meta["image_id"])[list(LABELS)].to_numpy(np.float32)
        for j in range(len(LABELS)):
            p = pred[:, j]
            X[:, col] = p
            col += 1
            if not context:
                continue
            for k in (1, 2):  # neighbors k slices away, NaN past the study's ends
                X[:, col] = np.where(index >= k, np.roll(p, k), np.nan)
                X[:, col + 1] = np.where(in_study - index > k, np.roll(p, -k), np.nan)
                col += 2
            X[:, col] = np.repeat(np.maximum.reduceat(p, starts), size)
            X[:, col + 1] = np.repeat(np.add.reduceat(p.astype(np.float64), starts) / size, size)
            col += 2
    train = (meta["split"] == "train").to_numpy()
    y = pd.read_parquet(bench.workdir.labels).set_index("image_id").reindex(meta["image_id"][train])[list(LABELS)].to_numpy()
    patients = meta["patient_id"][train].to_numpy()
    rng = np.random.default_rng(seed)
    unique_patients = np.unique(patients)
    valid = np.isin(patients, rng.choice(unique_patients, max(1, len(unique_patients) // 10), replace=False))
    X_train, X_test = X[train], X[~train]
    del X
    X_fit, X_stop = X_train[~valid], X_train[valid]
    del X_train
    params = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "num_threads": threads, "verbosity": -1, "seed": seed}
    test_pred = np.empty((len(X_test), len(LABELS)))
    for j in range(len(LABELS)):
        fit = lgb.Dataset(X_fit, y[~valid, j])
        stop = lgb.Dataset(X_stop, y[valid, j], reference=fit)
        booster = lgb.train(params, fit, num_boost_round=max_rounds, valid_sets=[stop],
                            callbacks=[lgb.early_stopping(50, verbose=False)])
        test_pred[:, j] = booster.predict(X_test, num_iteration=booster.best_iteration)
    out = pd.DataFrame(test_pred, columns=list(LABELS))
    out.insert(0, "image_id", meta["image_id"][~train].to_numpy())
    return out


# --- scoring -----------------------------------------------------------------------------------


def read_submission(path: Path) -> pd.DataFrame:
    """``ID,Label`` rows (``ID_<image>_<label>``) -> image_id + six labels."""
    sub = pd.read_csv(path, dtype={"ID": str})
    parts = sub["ID"].str.rsplit("_", n=1, expand=True)  # labels have no '_', image ids do
    wide = pd.DataFrame({"image_id": parts[0], "label": parts[1], "value": sub["Label"].to_numpy()})
    return wide.pivot(index="image_id", columns="label", values="value")[list(LABELS)].reset_index()


def score(frame: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Weighted log loss of ``frame``'s predictions on the held-out labels (every test image)."""
    pred = frame.set_index("image_id").reindex(truth["image_id"])[list(LABELS)].to_numpy(np.float64)
    if np.isnan(pred).any():
        missing = int(np.isnan(pred).any(axis=1).sum())
        raise SystemExit(f"{missing} held-out test image(s) have no prediction")
    return weighted_log_loss(truth[list(LABELS)].to_numpy(), pred).as_dict()


# --- one seed ----------------------------------------------------------------------------------


def _run_pipeline(args, seed: int, bench, logs: Path, env: dict) -> list[Step]:
    """The CLI steps run (base import per model, stack features, stack fit, submit); exits on the first that fails."""
    wd: Workdir = bench.workdir
    steps: list[Step] = []

    def step(name, *cli_args):
        result = run_step(name, list(cli_args), logs, env)
        steps.append(result)
        if result.returncode != 0:
            tail = result.log.read_text()[-3000:]
            raise SystemExit(f"seed {seed}: `{name}` failed (exit {result.returncode}); log {result.log}:\n{tail}")
        return result

    for model in bench.models:
        extra = []
        if args.embeddings:
            extra = ["--oof-embeddings", bench.oof_embedding_files[model]]
            for path in bench.test_embedding_files[model]:
                extra += ["--test-embeddings", path]
        step(f"base import {model}", "base", "import", model, "--workdir", wd.root,
             "--oof", bench.oof_files[model], "--test", bench.test_files[model], *extra)
    step("stack features", "stack", "features", "--workdir", wd.root, "--quiet")
    step("stack fit", "stack", "fit", "--workdir", wd.root, "--quiet", *shlex.split(args.fit_args))
    step("submit", "submit", "--workdir", wd.root)
    return steps


def _pipeline_scores(bench, truth: pd.DataFrame) -> dict:
    """Held-out scores of the submission, every stacker, every base model and the train-rate prior."""
    wd: Workdir = bench.workdir
    scores = {"submission": score(read_submission(wd.submission), truth)}
    stacker_names = sorted(p.parent.name for p in wd.stack_root.glob("*/test.parquet"))
    for name in stacker_names:
        scores[f"stacker {name}"] = score(pd.read_parquet(wd.stack_dir(name) / "test.parquet"), truth)
    for model in bench.models:
        scores[f"base {model}"] = score(pd.read_parquet(bench.test_files[model]), truth)
    scores["prior (train rates)"] = weighted_log_loss(
        truth[list(LABELS)].to_numpy(),
        np.broadcast_to(pd.read_parquet(wd.labels)[list(LABELS)].to_numpy().mean(axis=0), (len(truth), len(LABELS))),
    ).as_dict()
    return scores


def _step_timings(steps: list[Step]) -> dict:
    """Per step wall time and peak memory, the imports also summed over models, and the pipeline total."""
    imports = [s for s in steps if s.name.startswith("base import")]
    timings = {s.name: s.as_dict() for s in imports}
    timings["base import (all models)"] = {"wall_s": round(sum(s.wall_s for s in imports), 3), "cpu_s": round(sum(s.cpu_s for s in imports), 3),
                                           "peak_mib": round(max(s.peak_mib for s in imports), 1), "returncode": 0}
    timings.update({s.name: s.as_dict() for s in steps if s not in imports})
    timings["pipeline total"] = {"wall_s": round(sum(s.wall_s for s in steps), 3), "cpu_s": round(sum(s.cpu_s for s in steps), 3),
                                 "peak_mib": round(max(s.peak_mib for s in steps), 1), "returncode": 0}
    return timings


def _baseline_results(args, bench, seed: int, truth: pd.DataFrame) -> tuple[dict, dict]:
    """(timings, scores) of the in-process LightGBM baseline, and with --baseline-ablation of its no-context variant."""
    timings, scores = {}, {}
    started = time.perf_counter()
    with PeakRSS() as peak:
        baseline = lightgbm_baseline(bench, seed, threads=args.baseline_threads, max_rounds=args.baseline_rounds)
    timings["baseline lightgbm (in process)"] = {"wall_s": round(time.perf_counter() - started, 3),
                                                 "peak_mib": round(peak.peak_mib, 1), "returncode": 0}
    scores["baseline lightgbm"] = score(baseline, truth)
    if args.baseline_ablation:
        started = time.perf_counter()
        with PeakRSS() as peak:
            baseline = lightgbm_baseline(bench, seed, threads=args.baseline_threads, max_rounds=args.baseline_rounds, context=False)
        timings["baseline lightgbm, no context"] = {"wall_s": round(time.perf_counter() - started, 3),
                                                    "peak_mib": round(peak.peak_mib, 1), "returncode": 0}
        scores["baseline lightgbm, no context"] = score(baseline, truth)
    return timings, scores


def _ratios(scores: dict) -> dict:
    """The submission's loss relative to the best stacker, the baseline (when run) and the best base model."""
    ratios = {}
    stacker_scores = {k: v["overall"] for k, v in scores.items() if k.startswith("stacker ")}
    if stacker_scores:
        best = min(stacker_scores, key=stacker_scores.get)
        ratios["best stacker"] = best.removeprefix("stacker ")
        ratios["submission / best stacker"] = scores["submission"]["overall"] / stacker_scores[best]
    if "baseline lightgbm" in scores:
        ratios["submission / baseline"] = scores["submission"]["overall"] / scores["baseline lightgbm"]["overall"]
    best_base = min((k for k in scores if k.startswith("base ")), key=lambda k: scores[k]["overall"])
    ratios["best base model"] = best_base.removeprefix("base ")
    ratios["submission / best base model"] = scores["submission"]["overall"] / scores[best_base]["overall"]
    return ratios


def run_seed(args, seed: int, root: Path, env: dict) -> dict:
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root}: not empty; --keep needs a new or empty folder")
    started = time.perf_counter()
    bench = write_exported_benchmark(root, n_patients=args.patients, n_models=args.models, seed=seed,
                                     embedding_dim=args.embedding_dim)
    generate_s = time.perf_counter() - started
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    steps = _run_pipeline(args, seed, bench, logs, env)

    truth = pd.read_parquet(bench.heldout_test_labels)
    scores = _pipeline_scores(bench, truth)
    timings = _step_timings(steps)
    if not args.no_baseline:
        baseline_timings, baseline_scores = _baseline_results(args, bench, seed, truth)
        timings.update(baseline_timings)
        scores.update(baseline_scores)

    return {
        "seed": seed,
        "data": {"patients": bench.n_patients, "studies": bench.n_studies, "images": bench.n_images, "train": bench.n_train,
                 "test": bench.n_test, "models": list(bench.models), "embedding_dim": bench.embedding_dim,
                 "generate_s": round(generate_s, 2)},
        "timings": timings,
        "scores": scores,
        "ratios": _ratios(scores),
    }


# --- printing ----------------------------------------------------------------------------------


def print_tables(figures: dict) -> None:
    """The timing table, the score table and the ratios of one seed's (or the mean's) figures."""
    print(f"{'step':34s} {'wall s':>9s} {'cpu s':>9s} {'peak MiB':>9s}")
    for name, t in figures["timings"].items():
        if name.startswith("base import ") and name != "base import (all models)":
            continue
        print(f"{name:34s} {t['wall_s']:9.1f} {t.get('cpu_s', float('nan')):9.1f} {t['peak_mib']:9.0f}")
    print_scores(figures["scores"], figures["scores"].get("baseline lightgbm", {}).get("overall"))
    print("  ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in figures["ratios"].items()))


def print_seed(result: dict) -> None:
    d = result["data"]
    print(f"\n=== seed {result['seed']}: {d['patients']:,} patients, {d['studies']:,} studies, {d['images']:,} images "
          f"({d['train']:,} train / {d['test']:,} held-out test), {len(d['models'])} models"
          + (f", embeddings D={d['embedding_dim']}" if d["embedding_dim"] else "") + f"; generated in {d['generate_s']:.1f}s")
    print_tables(result)


def print_scores(scores: dict, baseline: float | None) -> None:
    short = [label[:8] for label in LABELS]
    print(f"{'held-out test log loss':34s} {'overall':>8s} {'/ base':>7s} " + " ".join(f"{s:>8s}" for s in short))
    for name, s in scores.items():
        vs = f"{s['overall'] / baseline:7.3f}" if baseline else f"{'':7s}"
        print(f"{name:34s} {s['overall']:8.5f} {vs} " + " ".join(f"{s['per_label'][label]:8.5f}" for label in LABELS))


def summarize(results: list[dict]) -> dict:
    """Means across seeds of every step's figures, every score and the ratios."""
    summary = {"seeds": [r["seed"] for r in results], "timings": {}, "scores": {}, "ratios": {}}
    for name in results[0]["timings"]:
        summary["timings"][name] = {key: float(np.mean([r["timings"][name].get(key, np.nan) for r in results])) for key in ("wall_s", "cpu_s", "peak_mib")}
    for name in results[0]["scores"]:
        have = [r["scores"][name] for r in results if name in r["scores"]]
        summary["scores"][name] = {
            "overall": float(np.mean([s["overall"] for s in have])),
            "overall_std": float(np.std([s["overall"] for s in have])),
            "per_label": {label: float(np.mean([s["per_label"][label] for s in have])) for label in LABELS},
        }
    for key in results[0]["ratios"]:
        values = [r["ratios"][key] for r in results if key in r["ratios"]]
        if all(isinstance(v, float) for v in values):
            summary["ratios"][key] = float(np.mean(values))
        else:
            summary["ratios"][key] = ",".join(map(str, values))
    return summary


def print_summary(summary: dict) -> None:
    print(f"\n=== mean over seeds {','.join(map(str, summary['seeds']))}")
    print_tables(summary)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1200, help="patients per seed (default 1200: ~48k images)")
    parser.add_argument("--models", type=int, default=6, help="exported base models (default 6)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one full run each (default 0)")
    parser.add_argument("--scale", choices=["default", "full"], default="default",
                        help=f"full: RSNA size, {FULL_PATIENTS:,} patients (~870,000 images) x {FULL_MODELS} models")
    parser.add_argument("--fit-args", default="", help='extra options for `stack fit`, e.g. "--stackers lgbm" (default: none)')
    parser.add_argument("--embeddings", action="store_true", help="export embeddings and pass them to `base import`")
    parser.add_argument("--embedding-dim", type=int, default=0, help="embedding size D (default 64 with --embeddings, else none)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process LightGBM baseline")
    parser.add_argument("--baseline-ablation", action="store_true",
                        help="also run the baseline on each slice's own predictions only (no neighbors, no study aggregates)")
    parser.add_argument("--baseline-threads", type=int, default=2, help="LightGBM threads of the baseline (default 2)")
    parser.add_argument("--baseline-rounds", type=int, default=2000, help="most boosting rounds per label of the baseline (default 2000)")
    parser.add_argument("--threads", type=int, default=None, help="$STACKKIT_THREADS for the CLI steps (default: unset)")
    parser.add_argument("--keep", default=None, help="write everything under this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.scale == "full":
        args.patients, args.models = FULL_PATIENTS, FULL_MODELS
    if args.embeddings and not args.embedding_dim:
        args.embedding_dim = 64
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    env = child_env(args.threads)
    if args.embeddings and not import_supports_embeddings(env):
        raise SystemExit("--embeddings: this checkout's `base import` has no --oof-embeddings option yet")
    print(f"bench_stack: {args.patients:,} patients x {args.models} models, seeds {seeds}, "
          f"stack fit {args.fit_args or '(defaults)'}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for seed in seeds:
            result = run_seed(args, seed, base / f"seed{seed}", env)
            print_seed(result)
            results.append(result)
            sys.stdout.flush()
    summary = summarize(results)
    if len(results) > 1:
        print_summary(summary)
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores at the end; wall times include waiting for the CPU")
    report = {"args": {k: v for k, v in vars(args).items()}, "per_seed": results, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
