"""Benchmark `stack features` at RSNA scale against a pandas groupby implementation.

    python bench/bench_features.py                 # 870,000 images, 10 models, lags=2
    python bench/bench_features.py --scale 0.1     # a tenth of that

Generates contract-valid metadata, labels, folds and predictions (studies of 20-60 slices,
~25 % test) into a temporary work directory (not timed), then runs `run_stack_features` in a
child process and reports its wall time, peak resident memory (the child's ru_maxrss) and
rows/s. The baseline is the same feature set written the usual pandas way (sort_values,
groupby().shift / transform / rank / rolling), run on a 10 % sample of the studies and
extrapolated x10. Targets: < 60 s, < 12 GB, >= 30x faster than pandas.

The per-model feature kernels run one thread per core (STACKKIT_THREADS overrides); the
pandas baseline is single-threaded, so both wall and CPU speedups are printed.
On the 2-core dev machine, idle (2026-11-23): 39.3 s wall, 5.0 GiB peak, feature computation
31.5x faster than pandas by wall time (19.4x by CPU time); the pandas baseline itself varied
between 239 s and 291 s across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import write_parquet

FULL_IMAGES = 870_000


def generate(wd: Workdir, n_images: int, n_models: int, seed: int = 0, n_folds: int = 5) -> dict:
    """Contract files for ~n_images images, vectorized (no per-study Python)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, 61, size=n_images // 40 + 10)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n_images) + 1]
    n_studies, n = len(sizes), int(sizes.sum())
    study_of_row = np.repeat(np.arange(n_studies), sizes)
    start_of_study = np.cumsum(sizes) - sizes
    slice_no = np.arange(n) - start_of_study[study_of_row]
    direction = np.where(rng.random(n_studies) < 0.3, -1.0, 1.0)  # some head-to-foot series
    spacing = rng.choice([2.5, 5.0], n_studies)
    z = rng.normal(0, 40, n_studies)[study_of_row] + direction[study_of_row] * spacing[study_of_row] * slice_no
    dup = rng.random(n) < 0.002  # duplicate z positions, as in the real data
    dup &= slice_no > 0
    z[dup] = z[np.flatnonzero(dup) - 1]
    image_ids = pd.Series(rng.choice(1 << 36, n, replace=False)).map(lambda v: f"ID_{v:09x}")
    study_ids = pd.Series(np.arange(n_studies)).map(lambda v: f"ID_{v * 7919 % (1 << 32):08x}").to_numpy()[study_of_row]
    is_test_study = rng.random(n_studies) < 0.25
    split = np.where(is_test_study[study_of_row], "test", "train")
    metadata = pd.DataFrame(
        {
            "image_id": image_ids.to_numpy(),
            "patient_id": study_ids,
            "study_id": study_ids,
            "split": split,
            "z": z,
            "slice_thickness": np.float64(5.0),
            "pixel_spacing": rng.choice([0.43, 0.49], n),
            "window_center": np.float64(40.0),
            "window_width": np.float64(80.0),
        }
    )
    order = rng.permutation(n)  # file order carries nothing
    metadata = metadata.iloc[order].reset_index(drop=True)
    train = metadata[metadata["split"] == "train"]
    labels = pd.DataFrame({"image_id": train["image_id"].to_numpy()})
    for label in LABELS:
        labels[label] = (rng.random(len(train)) < 0.07).astype(np.int8)
    study_fold = rng.integers(0, n_folds, n_studies)
    train_study = pd.factorize(train["study_id"])[0]
    folds = pd.DataFrame({"image_id": train["image_id"].to_numpy(), "fold": study_fold[train_study].astype(np.int8)})
    write_parquet(metadata, wd.metadata)
    write_parquet(labels, wd.labels)
    write_parquet(folds, wd.folds)
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"].to_numpy()
    for m in range(n_models):
        name = f"cnn{m:02d}"
        oof = pd.DataFrame(rng.random((len(folds), len(LABELS)), dtype=np.float32), columns=list(LABELS))
        oof.insert(0, "fold", folds["fold"].to_numpy())
        oof.insert(0, "image_id", folds["image_id"].to_numpy())
        test = pd.DataFrame(rng.random((len(test_ids), len(LABELS)), dtype=np.float32), columns=list(LABELS))
        test.insert(0, "image_id", test_ids)
        write_parquet(oof, wd.oof(name))
        write_parquet(test, wd.test(name))
    return {"images": n, "studies": n_studies, "train": len(train), "test": len(test_ids)}


def child(workdir: str, lags: int) -> None:
    """Run the feature step alone in this process and print its summary plus peak RSS."""
    from features.api import run_stack_features
    from stackkit.render import features_lines

    started = time.perf_counter()
    summary = run_stack_features(Workdir(Path(workdir)), lags=lags, dicom_meta=True, progress=False)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_kb": usage.ru_maxrss, "lines": features_lines(summary), "columns": summary.columns,
                      "timing": dataclasses.asdict(summary.timing)}))


# --- the pandas way ---------------------------------------------------------------------------


def pandas_features(metadata: pd.DataFrame, preds: dict[str, pd.DataFrame], lags: int) -> pd.DataFrame:
    """The same features with pandas groupby/shift/transform/rank/rolling (idiomatic, no Python loop over studies)."""
    frame = metadata[["image_id", "study_id", "z"]].sort_values(["study_id", "z", "image_id"], kind="mergesort").reset_index(drop=True)
    g = frame.groupby("study_id", sort=False)
    out = {}
    out["slice__index"] = g.cumcount()
    out["slice__count"] = g["z"].transform("size")
    out["slice__reverse_index"] = out["slice__count"] - 1 - out["slice__index"]
    out["slice__position"] = (out["slice__index"] / (out["slice__count"] - 1)).where(out["slice__count"] > 1, 0.5)
    out["slice__z_gap_prev"] = g["z"].diff()
    out["slice__z_gap_next"] = g["z"].shift(-1) - frame["z"]
    out["slice__z_duplicates"] = frame.groupby(["study_id", "z"])["z"].transform("size")
    across = {label: [] for label in LABELS}
    for model, table in sorted(preds.items()):
        values = frame[["image_id", "study_id"]].merge(table, on="image_id", how="left")
        gv = values.groupby("study_id", sort=False)
        for label in LABELS:
            s = values[label].astype(np.float64)
            pre = f"{model}__{label}__"
            out[pre + "pred"] = s
            across[label].append(s)
            for k in range(1, lags + 1):
                out[pre + f"lag{k}"] = gv[label].shift(k)
                out[pre + f"lead{k}"] = gv[label].shift(-k)
                out[pre + f"diff_lag{k}"] = s - out[pre + f"lag{k}"]
                out[pre + f"diff_lead{k}"] = s - out[pre + f"lead{k}"]
            out[pre + "study_max"] = gv[label].transform("max")
            out[pre + "study_mean"] = gv[label].transform("mean")
            out[pre + "study_std"] = gv[label].transform(lambda x: x.std(ddof=0))
            ranked = values[["study_id", label]].sort_values(["study_id", label], ascending=[True, False])
            top = ranked[ranked.groupby("study_id", sort=False).cumcount() < 3].groupby("study_id")[label].mean()
            out[pre + "study_top3_mean"] = values["study_id"].map(top)
            out[pre + "study_rank"] = gv[label].rank(method="average") / out["slice__count"]
            for w in (3, 5):
                rolled = gv[label].rolling(w, center=True, min_periods=1).mean()
                out[pre + f"roll{w}_mean"] = rolled.reset_index(level=0, drop=True).sort_index()
    for label in LABELS:
        stacked = pd.concat(across[label], axis=1)
        out[f"models__{label}__mean"] = stacked.mean(axis=1)
        out[f"models__{label}__std"] = stacked.std(axis=1, ddof=0)
    result = pd.concat(out, axis=1).astype(np.float32)
    return pd.concat([frame[["image_id", "study_id"]], result], axis=1)


def pandas_baseline(wd: Workdir, lags: int, fraction: float, seed: int = 0) -> tuple[float, int]:
    metadata = pd.read_parquet(wd.metadata)
    studies = metadata["study_id"].unique()
    keep = np.random.default_rng(seed).choice(studies, max(1, int(len(studies) * fraction)), replace=False)
    sample = metadata[metadata["study_id"].isin(keep)]
    preds = {}
    for model in wd.model_names():
        both = pd.concat([pd.read_parquet(wd.oof(model)).drop(columns="fold"), pd.read_parquet(wd.test(model))], ignore_index=True)
        preds[model] = both[both["image_id"].isin(sample["image_id"])]
    started, cpu = time.perf_counter(), time.process_time()
    pandas_features(sample, preds, lags)
    return time.perf_counter() - started, time.process_time() - cpu, len(sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the RSNA size (870,000 images)")
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--lags", type=int, default=2)
    parser.add_argument("--sample", type=float, default=0.1, help="fraction of studies the pandas baseline runs on")
    parser.add_argument("--workdir", help="reuse/keep this work directory instead of a temporary one")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.lags)
        return

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        wd = Workdir(Path(args.workdir or tmp))
        n_images = int(FULL_IMAGES * args.scale)
        if not (args.workdir and wd.metadata.is_file()):
            t = time.perf_counter()
            info = generate(wd, n_images, args.models)
            print(f"generated {info['images']:,} images in {info['studies']:,} studies ({info['train']:,} train, {info['test']:,} test), "
                  f"{args.models} models in {time.perf_counter() - t:.0f}s (not timed)")
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(wd.root), "--lags", str(args.lags)],
            capture_output=True, text=True, cwd=ROOT,
        )
        if proc.returncode != 0:
            sys.exit(f"feature step failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        child_peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rows = pd.read_parquet(wd.metadata, columns=["image_id"]).shape[0]
        build_seconds, build_cpu = result["timing"]["build_seconds"], result["timing"]["build_cpu"]
        print("\n".join(result["lines"]))
        peak_gib = max(result["peak_kb"], child_peak_kb) / 2**20
        print(f"run_stack_features: {result['wall']:.1f}s wall ({result['cpu']:.1f}s CPU) for {rows:,} rows x {result['columns']} features, "
              f"peak RSS {peak_gib:.2f} GiB, {rows / result['wall']:,.0f} rows/s")

        pandas_wall, pandas_cpu, sample_rows = pandas_baseline(wd, args.lags, args.sample)
        scale = rows / sample_rows
        print(f"pandas groupby baseline: {pandas_wall:.1f}s wall ({pandas_cpu:.1f}s CPU) on {sample_rows:,} rows ({args.sample:.0%} of studies) "
              f"-> {pandas_wall * scale:.0f}s extrapolated, {sample_rows / pandas_wall:,.0f} rows/s (feature computation only, no I/O)")
        print(f"speedup, feature computation: {pandas_wall * scale / build_seconds:.1f}x wall (build {build_seconds:.1f}s vs pandas {pandas_wall * scale:.0f}s), "
              f"{pandas_cpu * scale / build_cpu:.1f}x CPU (build {build_cpu:.1f}s vs pandas {pandas_cpu * scale:.0f}s)")
        print(f"speedup, whole step incl. reading/validation and Parquet write: {pandas_wall * scale / result['wall']:.1f}x wall, "
              f"{pandas_cpu * scale / result['cpu']:.1f}x CPU")
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1) + 0.5:
            print(f"note: load average {load:.1f} on {os.cpu_count()} cores during the run; wall times include waiting for the CPU")
        ok = result["wall"] < 60 and peak_gib < 12 and pandas_wall * scale / build_seconds >= 30
        print(f"targets (< 60 s, < 12 GB, >= 30x): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
