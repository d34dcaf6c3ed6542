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
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from stackkit.contract import LABELS, Workdir, slice_order
from stackkit.holdout import read_submission, score_on
from stackkit.metric import weighted_log_loss
from stackkit.testing.exported import SCENARIOS, write_exported_benchmark

CLI = [sys.executable, str(ROOT / "cli.py")]
FULL_PATIENTS = 20_100  # ~870,000 images: 1.08 studies per patient, ~40 slices per study
FULL_MODELS = 10
# Defaults (stack fit's, and the scenarios' dials) are chosen on the tuning seeds only. They are
# never chosen by looking at the reporting seeds: those give the figures a change is judged by,
# and stay honest only while nothing was fitted to them.
TUNING_SEEDS = (0, 1)
REPORT_SEEDS = (101, 102, 103)


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


def _tree_rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` and all its descendants now (Linux /proc; 0 where it cannot be read)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack.extend(int(child) for child in children.read().split())
        except (OSError, ValueError):
            continue
    return total


class _TreePeak(threading.Thread):
    """The largest summed RSS of a process tree, sampled every 0.2 s: a step whose work runs in worker
    processes (seq's folds) holds the sum of them at once, which no single ru_maxrss shows."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak_kib = max(self.peak_kib, _tree_rss_kib(self.pid))


def run_step(name: str, args: list, log_dir: Path, env: dict) -> Step:
    """``python cli.py ARGS`` in a child; wall time and peak RSS: the child's (wait4's ru_maxrss) or,
    when larger, its process tree's summed at one time (sampled)."""
    log = log_dir / f"{name.replace(' ', '_')}.log"
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        sampler = _TreePeak(proc.pid)
        sampler.start()
        # wait4 rather than proc.wait(): its rusage is this child's (and its waited-for descendants')
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        sampler.done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux
    return Step(name, wall, max(usage.ru_maxrss, sampler.peak_kib) / 1024.0, proc.returncode, log, usage.ru_utime + usage.ru_stime)


def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads:
        env["STACKKIT_THREADS"] = str(threads)
    return env


def _import_help(env: dict) -> str:
    return subprocess.run([*CLI, "base", "import", "--help"], capture_output=True, text=True, cwd=ROOT, env=env).stdout


def import_supports_embeddings(env: dict) -> bool:
    return "--oof-embeddings" in _import_help(env)


def import_supports_test_folds(env: dict) -> bool:
    """Whether this checkout's `base import` takes each fold model's test predictions (--test-fold)."""
    return "--test-fold" in _import_help(env)


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


def score(frame: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Weighted log loss of ``frame``'s predictions on the held-out labels (every test image)."""
    return score_on(frame, truth, "bench_stack").as_dict()


# --- one scenario x seed ------------------------------------------------------------------------


def _step_runner(label: str, logs: Path, env: dict, steps: list):
    def step(name, *cli_args):
        result = run_step(name, list(cli_args), logs, env)
        steps.append(result)
        if result.returncode != 0:
            tail = result.log.read_text()[-3000:]
            raise SystemExit(f"{label}: `{name}` failed (exit {result.returncode}); log {result.log}:\n{tail}")
        return result
    return step


def _prepare(args, label: str, bench, logs: Path, env: dict) -> list[Step]:
    """`base import` per model and `stack features`: what every variant shares."""
    wd: Workdir = bench.workdir
    steps: list[Step] = []
    step = _step_runner(label, logs, env, steps)
    for model in bench.models:
        extra = []
        if args.test_folds:  # each fold model's test predictions, fold 0 first
            for path in bench.test_fold_files[model]:
                extra += ["--test-fold", path]
        if args.embeddings:
            extra += ["--oof-embeddings", bench.oof_embedding_files[model]]
            for path in bench.test_embedding_files[model]:
                extra += ["--test-embeddings", path]
        step(f"base import {model}", "base", "import", model, "--workdir", wd.root,
             "--oof", bench.oof_files[model], "--test", bench.test_files[model], *extra)
    step("stack features", "stack", "features", "--workdir", wd.root, "--quiet")
    return steps


def _fit_and_submit(label: str, wd: Workdir, fit_args: str, logs: Path, env: dict) -> list[Step]:
    steps: list[Step] = []
    step = _step_runner(label, logs, env, steps)
    step("stack fit", "stack", "fit", "--workdir", wd.root, "--quiet", *shlex.split(fit_args))
    step("submit", "submit", "--workdir", wd.root)
    return steps


def _variant_scores(wd: Workdir, truth: pd.DataFrame) -> dict:
    """Held-out scores of one variant's submission and of every stacker it fitted."""
    scores = {"submission": score(read_submission(wd.submission), truth)}
    for name in sorted(p.parent.name for p in wd.stack_root.glob("*/test.parquet")):
        scores[f"stacker {name}"] = score(pd.read_parquet(wd.stack_dir(name) / "test.parquet"), truth)
    return scores


def _reference_scores(bench, truth: pd.DataFrame) -> dict:
    """Held-out scores of every base model and of the train-rate prior."""
    scores = {f"base {model}": score(pd.read_parquet(bench.test_files[model]), truth) for model in bench.models}
    scores["prior (train rates)"] = weighted_log_loss(
        truth[list(LABELS)].to_numpy(),
        np.broadcast_to(pd.read_parquet(bench.workdir.labels)[list(LABELS)].to_numpy().mean(axis=0), (len(truth), len(LABELS))),
    ).as_dict()
    return scores


def _step_timings(steps: list[Step]) -> dict:
    """Per step wall time and peak memory, the imports also summed over models."""
    imports = [s for s in steps if s.name.startswith("base import")]
    timings = {s.name: s.as_dict() for s in imports}
    if imports:
        timings["base import (all models)"] = {"wall_s": round(sum(s.wall_s for s in imports), 3), "cpu_s": round(sum(s.cpu_s for s in imports), 3),
                                               "peak_mib": round(max(s.peak_mib for s in imports), 1), "returncode": 0}
    timings.update({s.name: s.as_dict() for s in steps if s not in imports})
    return timings


def _timed_lightgbm(args, bench, seed: int, truth: pd.DataFrame, name: str, **kwargs) -> tuple[dict, dict]:
    started = time.perf_counter()
    with PeakRSS() as peak:
        predictions = lightgbm_baseline(bench, seed, threads=args.baseline_threads, max_rounds=args.baseline_rounds, **kwargs)
    timing = {"wall_s": round(time.perf_counter() - started, 3), "peak_mib": round(peak.peak_mib, 1),
              "threads": args.baseline_threads, "returncode": 0}
    return timing, score(predictions, truth)


def _baseline_results(args, bench, seed: int, truth: pd.DataFrame) -> tuple[dict, dict]:
    """(timings, scores) of the in-process LightGBM baseline, its floor (the same learner on the
    latent evidence) and with --baseline-ablation its no-context variant."""
    timings, scores = {}, {}
    timings["baseline lightgbm"], scores["baseline lightgbm"] = _timed_lightgbm(args, bench, seed, truth, "baseline")
    timings["floor (lightgbm on latent evidence)"], scores["floor"] = _timed_lightgbm(
        args, bench, seed, truth, "floor", inputs=latent_evidence(bench))
    if args.baseline_ablation:
        timings["baseline lightgbm, no context"], scores["baseline lightgbm, no context"] = _timed_lightgbm(
            args, bench, seed, truth, "no context", context=False)
    return timings, scores


def compare(reference: dict, scores: dict) -> dict:
    """Per method (best base model, LightGBM, floor, the variant's submission and stackers): its
    held-out loss, the loss x LightGBM's, and the share of LightGBM's gap to the floor it closed,
    (lgbm - method) / (lgbm - floor): 0 = no better than the plain LightGBM, 1 = at the floor."""
    bases = {k: v["overall"] for k, v in reference.items() if k.startswith("base ")}
    best_base = min(bases, key=bases.get)
    losses = {"best base": bases[best_base]}
    lgbm, floor = reference.get("baseline lightgbm", {}).get("overall"), reference.get("floor", {}).get("overall")
    if lgbm is not None:
        losses["plain lightgbm"], losses["floor"] = lgbm, floor
    losses.update({k: v["overall"] for k, v in scores.items()})
    rows = {}
    for name, loss in losses.items():
        rows[name] = {"loss": loss, **({"model": best_base.removeprefix("base ")} if name == "best base" else {}),
                      "x_lgbm": loss / lgbm if lgbm else float("nan"),
                      "gap_closed": (lgbm - loss) / (lgbm - floor) if lgbm is not None and lgbm > floor else float("nan")}
    return rows


def run_scenario_seed(args, scenario: str, seed: int, root: Path, env: dict) -> dict:
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root}: not empty; --keep needs a new or empty folder")
    label = f"{scenario} seed {seed}"
    started = time.perf_counter()
    bench = write_exported_benchmark(root, n_patients=args.patients, n_models=args.models, seed=seed,
                                     embedding_dim=args.embedding_dim, scenario=scenario)
    generate_s = time.perf_counter() - started
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    shared_steps = _prepare(args, label, bench, logs, env)
    truth = pd.read_parquet(bench.heldout_test_labels)
    reference = _reference_scores(bench, truth)
    timings = _step_timings(shared_steps)
    if not args.no_baseline:
        baseline_timings, baseline_scores = _baseline_results(args, bench, seed, truth)
        timings.update(baseline_timings)
        reference.update(baseline_scores)

    variants = {}
    for name, fit_args in args.variant_list:
        wd = bench.workdir
        if len(args.variant_list) > 1:
            # every variant starts from the same imported predictions and features: a copy each
            wd = Workdir(root / f"work-{name}")
            shutil.copytree(bench.workdir.root, wd.root)
        variant_logs = logs / name
        variant_logs.mkdir(exist_ok=True)
        steps = _fit_and_submit(f"{label} variant {name}", wd, fit_args, variant_logs, env)
        scores = _variant_scores(wd, truth)
        variants[name] = {"fit_args": fit_args, "timings": _step_timings(steps), "scores": scores,
                          "compare": compare(reference, scores)}
        if wd.root != bench.workdir.root and not args.keep:
            shutil.rmtree(wd.root)  # features are copied per variant: free the disk

    return {
        "scenario": scenario,
        "seed": seed,
        "data": {"patients": bench.n_patients, "studies": bench.n_studies, "images": bench.n_images, "train": bench.n_train,
                 "test": bench.n_test, "models": list(bench.models), "embedding_dim": bench.embedding_dim,
                 "test_folds_imported": bool(args.test_folds), "generate_s": round(generate_s, 2)},
        "timings": timings,
        "reference_scores": reference,
        "variants": variants,
    }


# --- printing ----------------------------------------------------------------------------------


def print_scores(scores: dict) -> None:
    short = [label[:8] for label in LABELS]
    print(f"{'held-out test log loss':34s} {'overall':>8s} " + " ".join(f"{s:>8s}" for s in short))
    for name, s in scores.items():
        print(f"{name:34s} {s['overall']:8.5f} " + " ".join(f"{s['per_label'][label]:8.5f}" for label in LABELS))


def print_timings(timings: dict) -> None:
    print(f"{'step':38s} {'wall s':>9s} {'cpu s':>9s} {'peak MiB':>9s}")
    for name, t in timings.items():
        if name.startswith("base import ") and name != "base import (all models)":
            continue
        extra = f"  ({t['threads']} threads)" if "threads" in t else ""
        print(f"{name:38s} {t['wall_s']:9.1f} {t.get('cpu_s', float('nan')):9.1f} {t['peak_mib']:9.0f}{extra}")


def print_compare(rows: dict) -> None:
    print(f"{'method':34s} {'loss':>8s} {'x lgbm':>7s} {'gap closed':>10s}")
    for name, r in rows.items():
        label = f"{name} ({r['model']})" if "model" in r else name
        print(f"{label:34s} {r['loss']:8.5f} {r['x_lgbm']:7.3f} {r['gap_closed']:10.1%}")


def print_result(result: dict) -> None:
    d = result["data"]
    print(f"\n=== {result['scenario']}, seed {result['seed']}: {d['patients']:,} patients, {d['studies']:,} studies, "
          f"{d['images']:,} images ({d['train']:,} train / {d['test']:,} held-out test), {len(d['models'])} models"
          + (f", embeddings D={d['embedding_dim']}" if d["embedding_dim"] else "")
          + (", per-fold test files imported" if d["test_folds_imported"] else "") + f"; generated in {d['generate_s']:.1f}s")
    print_timings(result["timings"])
    print_scores(result["reference_scores"])
    for name, variant in result["variants"].items():
        print(f"--- variant {name}: stack fit {variant['fit_args'] or '(defaults)'}")
        print_timings(variant["timings"])
        print_compare(variant["compare"])


def summarize(results: list[dict]) -> dict:
    """Per scenario and variant, the mean over seeds of every method's loss, ratio and gap closed,
    and of the stack fit and baseline timings."""
    summary = {}
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        of_scenario = [r for r in results if r["scenario"] == scenario]
        per_variant = {}
        for variant in of_scenario[0]["variants"]:
            runs = [r["variants"][variant] for r in of_scenario]
            methods = {}
            for name in runs[0]["compare"]:
                rows = [run["compare"][name] for run in runs if name in run["compare"]]
                methods[name] = {stat: float(np.mean([row[stat] for row in rows])) for stat in ("loss", "x_lgbm", "gap_closed")}
            timings = {step: {stat: float(np.mean([run["timings"][step].get(stat, np.nan) for run in runs])) for stat in ("wall_s", "cpu_s", "peak_mib")}
                       for step in runs[0]["timings"]}
            per_variant[variant] = {"methods": methods, "timings": timings}
        baseline = [r["timings"]["baseline lightgbm"]["wall_s"] for r in of_scenario if "baseline lightgbm" in r["timings"]]
        summary[scenario] = {"seeds": [r["seed"] for r in of_scenario], "variants": per_variant,
                             "baseline_wall_s": float(np.mean(baseline)) if baseline else float("nan")}
    return summary


def print_summary(summary: dict) -> None:
    for scenario, s in summary.items():
        print(f"\n=== {scenario}: mean over seeds {','.join(map(str, s['seeds']))}; plain LightGBM {s['baseline_wall_s']:.1f} s wall")
        for variant, v in s["variants"].items():
            fit = v["timings"]["stack fit"]
            ratio = fit["wall_s"] / s["baseline_wall_s"] if s["baseline_wall_s"] == s["baseline_wall_s"] else float("nan")
            print(f"--- variant {variant}: stack fit {fit['wall_s']:.1f} s wall ({ratio:.2f} x LightGBM's), "
                  f"{fit['cpu_s']:.1f} s cpu, peak {fit['peak_mib']:.0f} MiB")
            print_compare(v["methods"])


# --- main --------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """``tuning`` / ``report`` (the fixed seed sets) or comma-separated integers."""
    named = {"tuning": TUNING_SEEDS, "report": REPORT_SEEDS}
    return list(named[text]) if text in named else [int(s) for s in text.split(",") if s.strip()]


def parse_variants(text: str | None, fit_args: str) -> list[tuple[str, str]]:
    """``NAME=FIT ARGS;NAME2=FIT ARGS`` -> [(name, fit args)]; without it one variant `default`."""
    if not text:
        return [("default", fit_args)]
    variants = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, args = part.partition("=")
        name = name.strip()
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise SystemExit(f"--variants: {part!r} is not NAME=FIT ARGS (NAME: letters, digits, - and _)")
        variants.append((name, args.strip()))
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--variants: names must differ")
    return variants


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
    args.seed_list = parse_seeds(args.seeds)
    args.variant_list = parse_variants(args.variants, args.fit_args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = child_env(args.threads)
    if args.embeddings and not import_supports_embeddings(env):
        raise SystemExit("--embeddings: this checkout's `base import` has no --oof-embeddings option yet")
    args.test_folds = not args.no_test_folds and import_supports_test_folds(env)
    variants = "; ".join(f"{name}: {fit_args or '(defaults)'}" for name, fit_args in args.variant_list)
    print(f"bench_stack: scenarios {','.join(args.scenarios)}, {args.patients:,} patients, seeds {args.seed_list}, "
          f"variants {variants}; "
          f"per-fold test files {'imported (--test-fold)' if args.test_folds else 'not imported'}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for scenario in args.scenarios:
            for seed in args.seed_list:
                result = run_scenario_seed(args, scenario, seed, base / scenario / f"seed{seed}", env)
                print_result(result)
                results.append(result)
                sys.stdout.flush()
    summary = summarize(results)
    print_summary(summary)
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores at the end; wall times include waiting for the CPU")
    report = {"args": {k: v for k, v in vars(args).items()}, "results": results, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
