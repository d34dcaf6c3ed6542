"""The held-out benchmark of the whole stacking pipeline through the real command line
(bench/bench_stack.py is its command line; see its docstring for what it runs and prints).

Per scenario and seed: ``write_exported_benchmark`` writes the data and the exported predictions,
``prepare_imports`` runs `base import` per model and `stack features`, and per variant
``fit_and_submit`` runs `stack fit` and `submit` on its own copy; everything is scored on the
held-out labels beside the best base model, a plain LightGBM (``lightgbm_baseline``) and the floor.

Seeds: ``TUNING_SEEDS`` (0, 1) are where defaults and the scenarios' dials are chosen;
``REPORT_SEEDS`` (101, 102, 103) give the figures a change is judged by, and are never used to
choose anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir, slice_order
from stackkit.holdout import read_submission, score_on
from stackkit.metric import weighted_log_loss
from stackkit.testing.bench_steps import (
    PeakRSS,
    Step,
    child_env,
    import_supports_embeddings,
    import_supports_test_folds,
    step_runner,
    step_timings,
)
from stackkit.testing.exported import write_exported_benchmark

# Defaults (stack fit's, and the scenarios' dials) are chosen on the tuning seeds only. They are
# never chosen by looking at the reporting seeds: those give the figures a change is judged by,
# and stay honest only while nothing was fitted to them.
TUNING_SEEDS = (0, 1)
REPORT_SEEDS = (101, 102, 103)


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

    meta, X = _baseline_features(bench, exported_predictions(bench) if inputs is None else inputs, context)
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


def _baseline_features(bench, inputs: dict[str, pd.DataFrame], context: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """(metadata in slice order, float32 features): the position in the study, then per input and label
    the prediction and with ``context`` its lags/leads 1-2 and the study's max and mean."""
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
    return meta, X


# --- scoring -----------------------------------------------------------------------------------


def score(frame: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Weighted log loss of ``frame``'s predictions on the held-out labels (every test image)."""
    return score_on(frame, truth, "bench_stack").as_dict()


# --- one scenario x seed ------------------------------------------------------------------------


def prepare_imports(args, label: str, bench, logs: Path, env: dict) -> list[Step]:
    """`base import` per model and `stack features`: what every variant shares."""
    wd: Workdir = bench.workdir
    steps: list[Step] = []
    step = step_runner(label, logs, env, steps)
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
    step = step_runner(label, logs, env, steps)
    _fit_step(step, wd, fit_args)
    step("submit", "submit", "--workdir", wd.root)
    return steps


def _fit_step(step, wd: Workdir, fit_args: str):
    return step("stack fit", "stack", "fit", "--workdir", wd.root, "--quiet", *shlex.split(fit_args))


def _variant_scores(wd: Workdir, truth: pd.DataFrame) -> dict:
    """Held-out scores of one variant's submission and of every stacker it fitted."""
    scores = {"submission": score(read_submission(wd.submission), truth)}
    fitted = sorted(p.name for p in wd.stack_root.iterdir() if p.is_dir() and wd.stacker_folder(p.name).test.is_file())
    for name in fitted:
        scores[f"stacker {name}"] = score(pd.read_parquet(wd.stacker_folder(name).test), truth)
    return scores


def _nested(wd: Workdir) -> dict | None:
    """With --tune: blend.json's nested scores of the submission (tuned and defaults, on the outer fold)."""
    from stackkit.contract.io import read_json

    return (read_json(wd.blend).get("optuna") or {}).get("nested")


def _reference_scores(bench, truth: pd.DataFrame) -> dict:
    """Held-out scores of every base model and of the train-rate prior."""
    scores = {f"base {model}": score(pd.read_parquet(bench.test_files[model]), truth) for model in bench.models}
    scores["prior (train rates)"] = weighted_log_loss(
        truth[list(LABELS)].to_numpy(),
        np.broadcast_to(pd.read_parquet(bench.workdir.labels)[list(LABELS)].to_numpy().mean(axis=0), (len(truth), len(LABELS))),
    ).as_dict()
    return scores


def _timed_lightgbm(args, bench, seed: int, truth: pd.DataFrame, name: str, **kwargs) -> tuple[dict, dict]:
    timing, predictions = _time_lightgbm(args, bench, seed, **kwargs)
    return timing, score(predictions, truth)


def _time_lightgbm(args, bench, seed: int, **kwargs) -> tuple[dict, pd.DataFrame]:
    started = time.perf_counter()
    with PeakRSS() as peak:
        predictions = lightgbm_baseline(bench, seed, threads=args.baseline_threads, max_rounds=args.baseline_rounds, **kwargs)
    timing = {"wall_s": round(time.perf_counter() - started, 3), "peak_mib": round(peak.peak_mib, 1),
              "threads": args.baseline_threads, "returncode": 0}
    return timing, predictions


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
    shared_steps = prepare_imports(args, label, bench, logs, env)
    truth = pd.read_parquet(bench.heldout_test_labels)
    reference = _reference_scores(bench, truth)
    timings = step_timings(shared_steps)
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
        variants[name] = {"fit_args": fit_args, "timings": step_timings(steps), "scores": scores,
                          "compare": compare(reference, scores), "nested": _nested(wd)}
        if wd.root != bench.workdir.root and not args.keep:
            shutil.rmtree(wd.root)  # features are copied per variant: free the disk

    for repeat in range(1, args.timing_repeats):
        _time_again(args, bench, seed, root / f"retime{repeat}", env, timings, variants)
    _take_medians([timings.get("baseline lightgbm", {}), *(v["timings"]["stack fit"] for v in variants.values())])
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


def _time_again(args, bench, seed: int, out: Path, env: dict, timings: dict, variants: dict) -> None:
    """One more timing of the plain LightGBM and of every variant's `stack fit` (each alone, on a fresh copy
    of the imported work dir), appended to ``wall_s_runs``: wall times drift by minutes on a shared
    machine, so repeated, interleaved runs and their medians compare like with like."""
    if "baseline lightgbm" in timings:
        _runs(timings["baseline lightgbm"]).append(_time_lightgbm(args, bench, seed)[0]["wall_s"])
    for name, fit_args in args.variant_list:
        wd = Workdir(out / name)
        source = bench.workdir
        # a fresh fit: none of the first run's outputs (stack/, its Optuna journal, the submission)
        outputs = [source.stack_root, source.optuna_journal.parent, source.submission]
        shutil.copytree(source.root, wd.root, ignore=shutil.ignore_patterns(*(p.relative_to(source.root).parts[0] for p in outputs)))
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fit = _fit_step(step_runner(f"{name} again", logs, env, []), wd, fit_args)
        _runs(variants[name]["timings"]["stack fit"]).append(round(fit.wall_s, 3))
        shutil.rmtree(wd.root)


def _runs(timing: dict) -> list:
    return timing.setdefault("wall_s_runs", [timing["wall_s"]])


def _take_medians(timings: list[dict]) -> None:
    for timing in timings:
        if len(timing.get("wall_s_runs", [])) > 1:
            timing["wall_s"] = round(float(np.median(timing["wall_s_runs"])), 3)


def time_ratio(result: dict, variant: str) -> float:
    """The variant's `stack fit` wall time over the plain LightGBM's, same run (medians when repeated)."""
    baseline = result["timings"].get("baseline lightgbm")
    return result["variants"][variant]["timings"]["stack fit"]["wall_s"] / baseline["wall_s"] if baseline else float("nan")


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
        print(f"stack fit / plain LightGBM wall time: {time_ratio(result, name):.2f}x" + _runs_text(result, name))
        print_compare(variant["compare"])
        if variant.get("nested"):
            from stackkit.stack.nested import describe_nested

            print(f"submission (blend.json): {describe_nested(variant['nested'])}")


def _runs_text(result: dict, variant: str) -> str:
    fit, baseline = result["variants"][variant]["timings"]["stack fit"], result["timings"].get("baseline lightgbm", {})
    if len(fit.get("wall_s_runs", [])) < 2:
        return ""
    show = lambda runs: "/".join(f"{w:.1f}" for w in runs)
    return f" (medians of stack fit {show(fit['wall_s_runs'])} s, LightGBM {show(baseline.get('wall_s_runs', []))} s)"


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


# --- the whole run -------------------------------------------------------------------------------


def run_benchmark(args) -> dict:
    """Every scenario x seed of ``args`` (bench/bench_stack.py's parsed options), printed as it goes; returns
    the report (``args``, ``results``, ``summary``) and with ``args.json`` writes it there."""
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


def prepared_bench(scenario: str, seed: int, out: Path, n_patients: int, env: dict):
    """The generated benchmark with `base import` + `stack features` done (reused when already there)."""
    root = out / f"{scenario}-{seed}"
    done = root / "prepared.json"
    if done.is_file():
        return reopen(root)
    bench = write_exported_benchmark(root, n_patients=n_patients, seed=seed, scenario=scenario)
    args = argparse.Namespace(test_folds=import_supports_test_folds(env), embeddings=False)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    prepare_imports(args, f"{scenario}-{seed}", bench, logs, env)
    done.write_text(json.dumps({"models": list(bench.models)}))
    return bench


def reopen(root: Path):
    """Handles of an already written benchmark (paths only; nothing is regenerated)."""
    models = json.loads((root / "prepared.json").read_text())["models"]
    exports = root / "exports"
    wd = Workdir(root / "work")
    return argparse.Namespace(
        root=root, workdir=wd, heldout_test_labels=root / "heldout_test_labels.parquet", models=tuple(models),
        oof_files={m: exports / f"{m}_oof.parquet" for m in models}, test_files={m: exports / f"{m}_test.parquet" for m in models},
        latent_evidence=root / "latent_evidence.parquet",
    )
