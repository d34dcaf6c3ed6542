"""The command line's text: each command's typed result rendered as the lines it prints.

Commands return typed results (frozen dataclasses: ``SynthResult``, ``PrepareResult``,
``TrainResult``, ``ImportResult``, ``FeaturesResult``, ``StackFitResult``, ``SubmitResult``,
``DemoResult``); stackkit/cli.py prints them with the functions here, which are the only place
their numbers become text. Each returns the lines to print, in order (a table as one string).
Nothing heavy is imported: the results are read by their fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stackkit.contract import LABELS

# The fit summary's share of weight below which a source is left out of the weights line
MIN_SHOWN_WEIGHT = 0.005


def key_values(step: str, result) -> list[str]:
    """``step: key=value, ...`` of a result's scalar fields (numbers, strings, paths), in field order."""
    shown = [(f.name, getattr(result, f.name)) for f in dataclasses.fields(result)]
    shown = [(k, v) for k, v in shown if isinstance(v, (int, float, str, Path))]
    return [f"{step}: " + ", ".join(f"{k}={v}" for k, v in shown)] if shown else []


def train_lines(result, *, folds: bool) -> list[str]:
    """`base train`; ``folds``: also each requested fold's score (a run with progress bars showed them as they ended)."""
    if result.rank != 0:  # torchrun: rank 0 reports the run
        return [f"base train: name={result.name}, rank={result.rank}"]
    lines = []
    if result.undecodable:
        from base_models.train import undecodable_warning

        lines.append(undecodable_warning(result.undecodable))
    for f in result.requested if folds else []:
        lines.append(f"fold {f}: OOF weighted log loss {result.folds[f]:.4f} (fold prior {result.fold_priors[f]:.4f})")
    if not result.complete:
        done = sorted(result.folds)
        lines.append(
            f"partial: {len(done)} of {len(done) + len(result.missing)} folds done (folds {','.join(map(str, done))}), kept in "
            f"{result.work}; preds/{result.name}/oof.parquet needs every fold: run again with --folds "
            f"{','.join(map(str, result.missing))} (same options) or --resume"
        )
        return lines
    if result.embedding_dim is not None:
        lines.append(f"embeddings: dimension {result.embedding_dim} (pooled features before the head), "
                     f"OOF from each image's fold model, test from each of the {result.fold_models} fold models")
    lines.append(
        f"{result.name}: OOF weighted log loss {result.oof_logloss:.4f} vs prior {result.prior_logloss:.4f} "
        f"({result.oof_logloss / result.prior_logloss:.2f} x prior); {result.seconds:.1f} s, {result.images_per_second:.0f} train img/s "
        f"-> {result.directory}"
    )
    return lines


def import_lines(result) -> list[str]:
    """`base import`."""
    lines = [
        f"imported '{result.name}': {result.n_oof} OOF and {result.n_test} test images -> {result.directory}",
        f"OOF weighted log loss {result.oof_logloss:.5f} (prior {result.prior_logloss:.5f})",
    ]
    if result.test_fold_files:
        lines.append(f"test: one file per fold model ({result.test_fold_files}), test.parquet "
                     + ("as given" if result.test_given else "their mean"))
    if result.embedding_dim:
        lines.append(f"embeddings: dimension {result.embedding_dim}, "
                     + ("one test file per fold model" if result.embedding_test_files > 1 else "one test file") + " (float16)")
    return lines


def features_lines(result) -> list[str]:
    """`stack features`."""
    t = result.timing
    lines = [
        f"stack features: {result.columns} feature columns from {len(result.models)} model(s) ({', '.join(result.models)}), "
        f"lags={result.lags}, feature set {result.feature_set}",
        f"  train {result.rows_train:,} rows -> {result.train}",
        f"  test  {result.rows_test:,} rows -> {result.test}",
        f"  manifest -> {result.manifest}",
        f"  {result.seconds:.1f}s (read {t.read_seconds:.1f}s, build {t.build_seconds:.1f}s, write {t.write_seconds:.1f}s); "
        f"CPU {result.cpu_seconds:.1f}s (read {t.read_cpu:.1f}s, build {t.build_cpu:.1f}s, write {t.write_cpu:.1f}s)",
    ]
    if result.test_fold_sets:
        without = result.models_without_test_folds
        lines.insert(3, f"  test_fold0..{result.test_fold_sets - 1}: the test features once per base fold model"
                        + (f" (averaged test.parquet for {', '.join(without)})" if without else ""))
    return lines


def blend_lines(result) -> list[str]:
    """The blend kept by `stack fit` against the best single source and the best base model (the demo shows these too)."""
    lines = [f"blend: {result.chosen}: cross-validated {result.cv.overall:.5f} (in-sample {result.in_sample.overall:.5f}); "
             f"best single source {result.best_source} {result.best_source_cv:.5f}"]
    if result.base_oof_scores:
        best_model, best_score = min(result.base_oof_scores.items(), key=lambda item: item[1].overall)
        lines.append(f"blend-cv is {1.0 - result.cv.overall / best_score.overall:.1%} below the best base model "
                     f"(preds/{best_model}: {best_score.overall:.5f})")
    return lines


def fit_lines(result) -> list[str]:
    """`stack fit`: the score table, then the blend, its weights, tuning, the storage and the files written."""
    from stackkit.stack.report import test_sets_note

    lines = [score_table(result.score_rows), *blend_lines(result)]
    weights = ", ".join(f"{name} {weight:.2f}" for name, weight in result.weights if weight >= MIN_SHOWN_WEIGHT)
    lines.append(f"weights (mean over labels): {weights}")
    for t in result.tuned:
        lines.append(f"tuned {t.name}: honest {t.honest:.5f} on outer fold {t.outer_fold} (defaults {t.defaults_outer:.5f}); "
                     f"selected trial {t.selected_trial}: inner CV {t.selected:.5f} "
                     f"{'(the defaults: no trial clearly better)' if t.selected_is_defaults else '(optimistic), bagged with the defaults'}; "
                     f"{t.trials_run} trials now, {t.trials_total} in study")
    if result.nested:
        from stackkit.stack.nested import describe_nested

        lines.append(f"submission, {describe_nested(result.nested)} (held out of every study)")
    if result.storage is not None:
        lines.append(f"optuna storage: {result.storage}; time budget {result.budget_s:.0f} s (--timeout)")
    return lines + _closing_lines(result)


def _closing_lines(result) -> list[str]:
    """How a fit's blend meets the test set, the stackers kept from an earlier run and the files written."""
    from stackkit.stack.report import test_sets_note

    lines = [test_sets_note(result.test_sets, result.models_without_test_folds)]
    if result.stackers_kept:
        lines.append("kept unchanged from an earlier run (not in this blend): " + ", ".join(f"stack/{n}" for n in result.stackers_kept))
    lines.append(f"wrote {result.blend} and {result.report} in {result.seconds:.1f} s")
    return lines


def submit_lines(result) -> list[str]:
    """`submit`."""
    return [f"submission: {result.path} ({result.images} test images, {result.rows} rows; blend of {', '.join(result.sources)})"]


def unit_features_lines(result) -> list[str]:
    """`stack features` on a study- or patient-level task."""
    lines = [f"stack features ({result.task}): {result.columns} feature columns per {result.unit} from {len(result.models)} model(s) "
             f"({', '.join(result.models)})",
             f"  train {result.rows_train:,} {_plural(result.unit)} -> {result.train}",
             f"  test  {result.rows_test:,} {_plural(result.unit)} -> {result.test}",
             f"  manifest -> {result.manifest}",
             f"  {result.seconds:.1f}s"]
    if result.test_fold_sets:
        without = result.models_without_test_folds
        lines.insert(3, f"  test_fold0..{result.test_fold_sets - 1}: the test features once per base fold model"
                        + (f" (averaged test.parquet for {', '.join(without)})" if without else ""))
    return lines


def _plural(unit: str) -> str:
    return "studies" if unit == "study" else f"{unit}s"


def unit_fit_lines(result) -> list[str]:
    """`stack fit` on a study- or patient-level task: the score table (the task's metric), the blend's weights, the files."""
    parts = list(result.cv.parts)
    rows = ([(f"preds/{m} (max)", "base", s) for m, s in result.base_scores.items()]
            + [(f"stack/{n}", "stacker", s) for n, s in result.stacker_scores.items()] + [("blend-cv", "blend-cv", result.cv)])
    width = max(12, *(len(name) for name, _kind, _score in rows))
    widths = {p: max(8, len(p)) for p in parts}
    header = f"{'source':<{width}}  {'kind':<8}  {'overall':>8}  " + "  ".join(f"{p:>{widths[p]}}" for p in parts)
    best = min(rows, key=lambda r: r[2].overall)
    lines = [header, "-" * len(header)]
    for row in rows:
        name, kind, score = row
        lines.append(f"{name:<{width}}  {kind:<8}  {score.overall:>8.5f}{'*' if row is best else ' '} "
                     + "  ".join(f"{score.parts.get(p, float('nan')):>{widths[p]}.5f}" for p in parts))
    lines.append(f"task {result.task}'s metric per {result.unit} (lower is better); base: the max over the {result.unit}'s slices, "
                 "out-of-fold; * = best")
    for target, weights in result.weights.items():
        shown = ", ".join(f"{n} {w:.2f}" for n, w in weights.items() if w >= MIN_SHOWN_WEIGHT)
        lines.append(f"blend weights {target}: {shown or 'none'}")
    return lines + _closing_lines(result)


def unit_submit_lines(result) -> list[str]:
    """`submit` on a study- or patient-level task."""
    return [f"submission ({result.task}): {result.path} ({result.units} test {_plural(result.unit)}, {result.rows} rows; blend of {', '.join(result.sources)})"]


def demo_lines(result) -> list[str]:
    """`demo`: the fit's table and blend, each step's time, the files, and the verdict on the held-out labels."""
    lines = [score_table(result.fit.score_rows), *blend_lines(result.fit)]
    lines += [f"{name:>18}: {seconds:7.1f} s" for name, seconds in result.timings.items()]
    lines.append(f"{'total':>18}: {sum(result.timings.values()):7.1f} s")
    lines.append(f"submission: {result.submission}")
    lines.append(f"report: {result.report}")
    lines = [*lines, "", *verdict_lines(result.verdict)]
    return lines if result.pseudo is None else [*lines, "", *pseudo_lines(result.pseudo)]


def held_out_table(rows) -> list[str]:
    """:class:`stackkit.holdout.HeldOutRow` rows: name, kind, CV (OOF) and held-out loss."""
    width = max(len(r.name) for r in rows)
    lines = [f"{'source':<{width}}  {'kind':<7}  {'CV (OOF)':>9}  {'held-out':>9}", "-" * (width + 31)]
    return lines + [f"{r.name:<{width}}  {r.kind:<7}  {r.cv:>9.5f}  {r.held_out:>9.5f}" for r in rows]


def pseudo_lines(pseudo) -> list[str]:
    """`demo --pseudo-labels`: the CNN without and with the pseudo-labels, and what they changed, on CV and held out."""
    without, with_ = pseudo.rows
    return [
        f"pseudo-labels: {len(pseudo.files)} files (fold k: the mean of {' and '.join(pseudo.teachers)}'s fold model k "
        f"test predictions, made without fold k's labels), e.g. {pseudo.files[0]}",
        *held_out_table(pseudo.rows),
        f"pseudo-labels ({with_.name} vs {without.name}): {gain_text(with_.held_out, without.held_out)} on the held-out "
        f"labels ({with_.held_out:.5f} against {without.held_out:.5f}), {gain_text(with_.cv, without.cv)} on CV "
        f"({with_.cv:.5f} against {without.cv:.5f}); the held-out images were its pseudo-labelled training images "
        "(their pixels, never their labels)",
    ]


def verdict_lines(verdict) -> list[str]:
    """The held-out scores table, then what the stack gained over the best base model (chosen on CV) there and on CV."""
    stack, best = verdict.submission, verdict.best_base
    return [
        *held_out_table(verdict.rows),
        f"held-out: {verdict.images} test images whose labels no step saw ({verdict.labels_file}); weighted log loss, lower is better",
        f"the stack vs the best base model ({best.name}, best on CV): {gain_text(stack.held_out, best.held_out)} "
        f"on the held-out labels ({stack.held_out:.5f} against {best.held_out:.5f}), "
        f"{gain_text(stack.cv, best.cv)} on CV ({stack.cv:.5f} against {best.cv:.5f})",
    ]


def gain_text(stack: float, base: float) -> str:
    change = 1.0 - stack / base
    return f"{change:.1%} lower" if change >= 0 else f"{-change:.1%} higher (worse)"


def score_table(rows) -> str:
    """Fixed-width table of weighted log loss (lower is better): overall and per label; best overall marked with *.

    ``rows``: :class:`stackkit.stack.report.ScoreRow` (name, kind, overall, per_label)."""
    if not rows:
        return ""
    short = {"epidural": "epidural", "intraparenchymal": "intraparench", "intraventricular": "intraventric",
             "subarachnoid": "subarachnoid", "subdural": "subdural", "any": "any"}
    name_width = max(12, *(len(r.name) for r in rows))
    header = f"{'source':<{name_width}}  {'kind':<8}  {'overall':>8}  " + "  ".join(f"{short[l]:>12}" for l in LABELS)
    lines = [header, "-" * len(header)]
    # the marker goes to the best honest number: in-sample blend scores and a tuned trial's own score flatter themselves
    honest = [r for r in rows if r.kind not in ("blend", "selected")]
    best = min(honest or rows, key=lambda r: r.overall)
    for r in rows:
        mark = "*" if r is best else " "
        lines.append(
            f"{r.name:<{name_width}}  {r.kind:<8}  {r.overall:>8.5f}{mark} "
            + "  ".join(f"{r.per_label.get(l, float('nan')):>12.5f}" for l in LABELS)
        )
    lines.append("weighted log loss (any counts twice); * = best out-of-fold score; 'blend' is in-sample, 'blend-cv' is refitted per fold")
    return "\n".join(lines)

