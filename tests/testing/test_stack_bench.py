"""stackkit.testing.stack_bench: the held-out benchmark bench/bench_stack.py runs, and the bench
scripts importing it like any user code."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from stackkit.testing import stack_bench as bench

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_SCRIPTS = sorted((REPO_ROOT / "bench").glob("*.py"))


def _options(tmp_path, **changes) -> argparse.Namespace:
    """bench/bench_stack.py's parsed options for a small run (its parse_args fills every field)."""
    fields = dict(scenarios=["persistent"], seed_list=bench.parse_seeds("3"), patients=30, models=2,
                  variant_list=bench.parse_variants("lgbm=--stackers lgbm;again=--stackers lgbm", ""), embeddings=False,
                  embedding_dim=0, no_test_folds=False, no_baseline=False, baseline_ablation=False, baseline_threads=2,
                  baseline_rounds=40, threads=None, timing_repeats=2, keep=str(tmp_path / "runs"), json=str(tmp_path / "out.json"))
    return argparse.Namespace(**{**fields, **changes})


def test_seed_sets_and_variants_parse():
    assert bench.parse_seeds("report") == list(bench.REPORT_SEEDS) and bench.parse_seeds("tuning") == list(bench.TUNING_SEEDS)
    assert not set(bench.REPORT_SEEDS) & set(bench.TUNING_SEEDS)
    assert bench.parse_seeds("4, 5,") == [4, 5]
    assert bench.parse_variants(None, "--stackers lgbm") == [("default", "--stackers lgbm")]
    assert bench.parse_variants("a=--tune; b-2=", "") == [("a", "--tune"), ("b-2", "")]
    with pytest.raises(SystemExit, match="names must differ"):
        bench.parse_variants("a=x;a=y", "")
    with pytest.raises(SystemExit, match="is not NAME=FIT ARGS"):
        bench.parse_variants("no equals sign", "")


@pytest.mark.timeout(300)
def test_bench_stack_runs_end_to_end_and_prints_a_loss(tmp_path, capsys):
    """The benchmark on ~30 patients: real CLI steps, two variants, a short baseline, every timing twice (~90 s on 2 cores)."""
    report = bench.run_benchmark(_options(tmp_path))
    printed = capsys.readouterr().out
    assert "submission" in printed and "plain lightgbm" in printed and "gap closed" in printed
    result = report["results"][0]
    assert result["scenario"] == "persistent" and set(result["variants"]) == {"lgbm", "again"}
    for variant in result["variants"].values():
        assert 0 < variant["scores"]["submission"]["overall"] < 1
        assert "stacker lgbm" in variant["scores"] and variant["timings"]["stack fit"]["peak_mib"] > 0
        rows = variant["compare"]
        lgbm, floor = rows["plain lightgbm"]["loss"], rows["floor"]["loss"]
        assert rows["plain lightgbm"]["x_lgbm"] == pytest.approx(1.0) and rows["plain lightgbm"]["gap_closed"] == pytest.approx(0.0)
        sub = rows["submission"]
        assert sub["gap_closed"] == pytest.approx((lgbm - sub["loss"]) / (lgbm - floor))
    # the same fit args on the same inputs: the same submission (variants start from identical copies)
    assert result["variants"]["lgbm"]["scores"]["submission"]["overall"] == pytest.approx(
        result["variants"]["again"]["scores"]["submission"]["overall"], rel=1e-9)
    # --timing-repeats 2: the baseline and each `stack fit` timed twice, interleaved; the medians are reported
    baseline = result["timings"]["baseline lightgbm"]
    for timing in [baseline] + [v["timings"]["stack fit"] for v in result["variants"].values()]:
        assert len(timing["wall_s_runs"]) == 2 and all(w > 0 for w in timing["wall_s_runs"])
        assert timing["wall_s"] == pytest.approx(sum(timing["wall_s_runs"]) / 2, abs=1e-3)
    assert bench.time_ratio(result, "lgbm") == pytest.approx(result["variants"]["lgbm"]["timings"]["stack fit"]["wall_s"] / baseline["wall_s"])
    assert "stack fit / plain LightGBM wall time" in printed and "medians of stack fit" in printed
    assert not (tmp_path / "runs" / "persistent" / "seed3" / "retime1" / "lgbm").exists()  # each re-timed copy is removed
    assert report["summary"]["persistent"]["baseline_wall_s"] > 0
    assert (tmp_path / "out.json").is_file()


def test_bench_scripts_import_stackkit_like_user_code():
    """No bench script puts a folder on sys.path, and no test loads one by its file path."""
    assert BENCH_SCRIPTS
    assert [p.name for p in BENCH_SCRIPTS if "sys.path" in p.read_text(encoding="utf-8")] == []
    tests = sorted((REPO_ROOT / "tests").rglob("*.py"))
    assert [p.name for p in tests if p != Path(__file__).resolve() and "spec_from_file_location" in p.read_text(encoding="utf-8")] == []


@pytest.mark.parametrize("script", [p.name for p in BENCH_SCRIPTS if p.name != "dicom_classes.py"])
def test_every_bench_script_runs_as_a_script(script):
    """``python bench/SCRIPT --help`` from another folder: its imports resolve through the installed stackkit."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
