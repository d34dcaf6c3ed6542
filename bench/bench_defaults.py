"""How `stack fit`'s defaults are chosen: every candidate stacker fitted once per scenario and seed,
then every stacker set x blend rule scored on held-out test labels.

    python bench/bench_defaults.py                                   # tuning seeds, every scenario
    python bench/bench_defaults.py --seeds report                    # the reporting seeds (after choosing)
    python bench/bench_defaults.py --stackers lgbm,xgb,mlp,seq --scenarios persistent --seeds 0

Per scenario x seed, bench_stack's generator writes the work directory, the exported predictions
(with each base fold model's test file) and the held-out test labels; `base import` and `stack
features` run through the CLI as a user's would. Each stacker is then fitted once with
``stackkit.stack.crossfit.fit_stacker`` (its default parameters, seed 0) and its OOF and per-test-set
predictions are cached under ``--out`` with its wall and CPU seconds (fits are timed one at a
time: two OpenMP jobs on 2 cores would slow each other ~10x). Everything after that is cheap and
in this process: for every non-empty subset of the stackers, the blend of ``stack fit``
(``blend.choose_blend`` over the stackers' and base models' OOF, with each blend rule) applied per
test set and averaged, exactly as `submit` does, scored on the held-out labels against the plain
study LightGBM (bench_stack.lightgbm_baseline) and the floor (the same LightGBM on the generator's
latent evidence). The table: each method as x LightGBM and as the share of the LightGBM's gap to
the floor it closes, per scenario x seed, then the mean.

Defaults are chosen on bench_stack.TUNING_SEEDS only; bench_stack.REPORT_SEEDS are run once, after.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir
from stackkit.holdout import score_on
from stackkit.metric import weighted_log_loss
from stackkit.testing import stack_bench as bench_stack

ROOT = Path(__file__).resolve().parents[1]

RULES = {
    # name: (min_gain, every_fold) for blend.choose_blend
    "strict": (0.005, True),
    "lowest": (0.0, False),
}


def _truth(bench) -> pd.DataFrame:
    return pd.read_parquet(bench.heldout_test_labels)


def references(bench, seed: int, cache: Path) -> dict:
    """Held-out scores of the best base model, the plain study LightGBM (timed) and the floor."""
    if cache.is_file():
        return json.loads(cache.read_text())
    truth = _truth(bench)
    started, cpu = time.perf_counter(), time.process_time()
    baseline = bench_stack.lightgbm_baseline(bench, seed)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    floor = bench_stack.lightgbm_baseline(bench, seed, inputs=bench_stack.latent_evidence(bench))
    base = {m: _score(pd.read_parquet(bench.test_files[m]), truth) for m in bench.models}
    out = {"lightgbm": _score(baseline, truth), "floor": _score(floor, truth), "best_base": min(base.values()),
           "lightgbm_seconds": seconds, "lightgbm_cpu": cpu_seconds}
    cache.write_text(json.dumps(out))
    return out


def _score(frame: pd.DataFrame, truth: pd.DataFrame) -> float:
    return score_on(frame, truth, "bench_defaults").overall


def fitted_stacker(name: str, wd: Workdir, cache_dir: Path, params: dict | None = None, tag: str | None = None) -> dict:
    """{oof (n, 6) in features order, sets (S, n_test, 6), seconds, cpu}: fitted once, then read from the cache."""
    from stackkit.stack.crossfit import fit_stacker, load_stack_inputs, predict_test_sets

    path = cache_dir / f"{tag or name}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    inputs = load_stack_inputs(wd)
    started, cpu = time.perf_counter(), time.process_time()
    result = fit_stacker(name, params, inputs, seed=0, progress=False, predict_test=False)
    sets = np.stack(predict_test_sets(result.models, inputs))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    oof = result.oof[list(LABELS)].to_numpy(dtype=np.float64)
    np.savez(path, oof=oof, sets=sets, seconds=seconds, cpu=cpu_seconds, image_ids=result.oof["image_id"].to_numpy(dtype=str),
             test_ids=inputs.test_keys["image_id"].to_numpy(dtype=str))
    return {"oof": oof, "sets": sets, "seconds": np.float64(seconds), "cpu": np.float64(cpu_seconds),
            "image_ids": result.oof["image_id"].to_numpy(dtype=str), "test_ids": inputs.test_keys["image_id"].to_numpy(dtype=str)}


def base_sources(wd: Workdir, image_ids: np.ndarray, test_ids: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Base models' (names, OOF (M, n, 6), test sets (M, S, n_test, 6)) aligned with the stackers' rows."""
    names, oofs, sets = [], [], []
    for model in wd.model_names():
        oof = pd.read_parquet(wd.oof(model)).set_index("image_id").reindex(image_ids)[list(LABELS)].to_numpy(dtype=np.float64)
        files = wd.test_fold_files(model) or [wd.test(model)]
        per_set = [pd.read_parquet(f).set_index("image_id").reindex(test_ids)[list(LABELS)].to_numpy(dtype=np.float64) for f in files]
        names.append(f"preds/{model}")
        oofs.append(oof)
        sets.append(np.stack(per_set))
    return names, np.stack(oofs), np.stack(sets)


def blended_test(preds: np.ndarray, sets: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str], rule: str) -> tuple[np.ndarray, str]:
    """`stack fit`'s blend choice under ``rule``, applied per test set and averaged (as `submit` does)."""
    from stackkit.stack.blend import choose_blend

    min_gain, every_fold = RULES[rule]
    choice = choose_blend(preds, y, folds, names, min_gain=min_gain, every_fold=every_fold)
    n_sets = max(s.shape[0] for s in sets)
    out = np.zeros(sets[0].shape[1:], dtype=np.float64)
    for k in range(n_sets):
        out += choice.params.apply(np.stack([s[k if s.shape[0] > 1 else 0] for s in sets]))
    return out / n_sets, choice.chosen.name


def feature_variant(bench, name: str, features_args: str, env: dict) -> Workdir:
    """The benchmark's work directory with `stack features FEATURES_ARGS` (a copy per variant; '' is the prepared one)."""
    import shlex
    import shutil

    if not features_args:
        return bench.workdir
    target = Workdir(bench.workdir.root.parent / f"work-{name}")
    if not (target.features_manifest).is_file():
        shutil.rmtree(target.root, ignore_errors=True)
        shutil.copytree(bench.workdir.root, target.root, ignore=shutil.ignore_patterns("stack", "features"))
        step = bench_stack.step_runner(name, bench.workdir.root.parent / "logs", env, [])
        step(f"stack features {name}", "stack", "features", "--workdir", target.root, "--quiet", *shlex.split(features_args))
    return target


def variant_params(stacker: str, overrides: dict | None) -> dict | None:
    """The stacker's default parameters with ``overrides`` (None: the defaults, as `stack fit` uses them)."""
    if not overrides:
        return None
    from stackkit.stack.stackers import get_stacker

    return {**get_stacker(stacker).default_params(), **overrides}


def evaluate(scenario: str, seed: int, bench, stackers: list[str], out: Path, with_base: bool, features: str = "basic",
             wd: Workdir | None = None, variants: dict | None = None) -> list[dict]:
    wd = wd or bench.workdir
    cache_dir = out / f"{scenario}-{seed}" / (f"fits-{features}" if features != "basic" else "fits")
    cache_dir.mkdir(parents=True, exist_ok=True)
    ref = references(bench, seed, out / f"{scenario}-{seed}" / "references.json")
    fits = {}
    for name in stackers:
        print(f"  {scenario}-{seed}: fitting {name} ...", flush=True)
        stacker, _, tag = name.partition("@")
        fits[name] = fitted_stacker(stacker, wd, cache_dir, params=variant_params(stacker, (variants or {}).get(tag)), tag=name)
    first = fits[stackers[0]]
    image_ids, test_ids = first["image_ids"].astype(object), first["test_ids"].astype(object)
    labels = pd.read_parquet(wd.labels).set_index("image_id").reindex(image_ids)[list(LABELS)].to_numpy(dtype=np.float64)
    folds = pd.read_parquet(wd.folds).set_index("image_id").reindex(image_ids)["fold"].to_numpy()
    truth = _truth(bench).set_index("image_id").reindex(test_ids)[list(LABELS)].to_numpy(dtype=np.float64)
    base_names, base_oof, base_sets = base_sources(wd, image_ids, test_ids) if with_base else ([], None, None)
    rows = []
    gap = ref["lightgbm"] - ref["floor"]
    for size in range(1, len(stackers) + 1):
        for subset in itertools.combinations(stackers, size):
            names = [f"stack/{s}" for s in subset] + base_names
            preds = np.stack([fits[s]["oof"] for s in subset] + ([*base_oof] if with_base else []))
            sets = [fits[s]["sets"] for s in subset] + ([*base_sets] if with_base else [])
            seconds = float(sum(fits[s]["seconds"] for s in subset))
            for rule in RULES:
                test, chosen = blended_test(preds, sets, labels, folds, names, rule)
                loss = weighted_log_loss(truth, test).overall
                rows.append({"scenario": scenario, "seed": seed, "features": features, "stackers": "+".join(subset), "rule": rule, "chosen": chosen,
                             "heldout": loss, "x_lightgbm": loss / ref["lightgbm"], "gap_closed": (ref["lightgbm"] - loss) / gap,
                             "fit_seconds": seconds, "x_lightgbm_time": seconds / ref["lightgbm_seconds"]})
    for name in stackers:  # each stacker alone, as its own test.parquet (mean over sets)
        loss = weighted_log_loss(truth, fits[name]["sets"].mean(axis=0)).overall
        rows.append({"scenario": scenario, "seed": seed, "features": features, "stackers": name, "rule": "alone", "chosen": name, "heldout": loss,
                     "x_lightgbm": loss / ref["lightgbm"], "gap_closed": (ref["lightgbm"] - loss) / gap,
                     "fit_seconds": float(fits[name]["seconds"]), "x_lightgbm_time": float(fits[name]["seconds"]) / ref["lightgbm_seconds"]})
    print(f"  {scenario}-{seed}: best base {ref['best_base']:.5f}, LightGBM {ref['lightgbm']:.5f} ({ref['lightgbm_seconds']:.0f} s), "
          f"floor {ref['floor']:.5f}")
    return rows


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=None, help="comma-separated (default: every scenario)")
    parser.add_argument("--seeds", default="tuning", help="'tuning', 'report' or a comma-separated list")
    parser.add_argument("--stackers", default="lgbm,xgb,mlp,seq",
                        help="comma-separated; NAME@TAG is NAME with the parameters of --variant TAG")
    parser.add_argument("--variant", action="append", default=[], metavar="TAG=JSON",
                        help='parameter overrides, e.g. fast=\'{"patience": 3}\' (fits cached as NAME@TAG: change the tag with the JSON)')
    parser.add_argument("--patients", type=int, default=1200)
    parser.add_argument("--no-base", action="store_true", help="blend the stackers only")
    parser.add_argument("--features", default="basic=", help="'NAME=STACK FEATURES ARGS;...' (default: the prepared basic features)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "defaults")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from stackkit.testing.exported import SCENARIOS

    scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    seeds = bench_stack.parse_seeds(args.seeds)
    stackers = args.stackers.split(",")
    variants = {tag: json.loads(text) for tag, _, text in (v.partition("=") for v in args.variant)}
    unknown = {s.partition("@")[2] for s in stackers} - set(variants) - {""}
    if unknown:
        parser.error(f"--stackers names variants without a --variant: {sorted(unknown)}")
    env = bench_stack.child_env(args.threads)
    import os

    os.environ["STACKKIT_THREADS"] = str(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scenario in scenarios:
        for seed in seeds:
            bench = bench_stack.prepared_bench(scenario, seed, args.out, args.patients, env)
            for variant in filter(None, args.features.split(";")):
                name, _, features_args = variant.partition("=")
                wd = feature_variant(bench, name, features_args, env)
                rows += evaluate(scenario, seed, bench, stackers, args.out, with_base=not args.no_base, features=name, wd=wd,
                                 variants=variants)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 500)
    per_seed = table.pivot_table(index=["features", "stackers", "rule"], columns=["scenario", "seed"], values="x_lightgbm")
    print("\nx plain study LightGBM (held-out), per scenario and seed:")
    print(per_seed.round(4).to_string())
    summary = table.groupby(["features", "stackers", "rule"]).agg(x_lightgbm=("x_lightgbm", "mean"), worst=("x_lightgbm", "max"),
                                                     gap_closed=("gap_closed", "mean"), x_time=("x_lightgbm_time", "mean"))
    print("\nmean over scenarios and seeds (worst = the highest x LightGBM of any scenario and seed):")
    print(summary.sort_values("x_lightgbm").round(4).to_string())
    return table


if __name__ == "__main__":
    main()
