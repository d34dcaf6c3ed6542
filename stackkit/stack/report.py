"""The `stack fit` report: stack/report.html with inline plots, and the score rows of the terminal table.

``score_rows`` gives one row per base model, stacker and blend (in-sample and cross-validated):
the overall weighted log loss and each label's log loss (stackkit/render.py prints them as the
terminal table). The HTML report embeds its PNG plots as base64 (one self-contained file);
matplotlib is imported only when the report is written, and draws on the Agg canvas directly
(no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir
from stackkit.contract.io import write_text
from stackkit.stack.blend import MIN_BLEND_GAIN
from stackkit.stack.tune import BAG_RULE, SELECTION_RULE

TOP_FEATURES = 20


@dataclass(frozen=True)
class ScoreRow:
    """One line of the table: ``kind`` is base, mean (of the base models), stacker, blend or blend-cv."""

    name: str
    kind: str
    overall: float
    per_label: dict

    @classmethod
    def from_score(cls, name: str, kind: str, score) -> "ScoreRow":
        if hasattr(score, "overall"):
            return cls(name, kind, float(score.overall), dict(score.per_label))
        return cls(name, kind, float(score["overall"]), dict(score["per_label"]))


# --- plots ------------------------------------------------------------------------------------------


def _figure(figsize, nrows: int = 1, ncols: int = 1):
    """A figure on the Agg canvas, without pyplot: no global backend switch, nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols)


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _colours(n: int) -> list:
    """``n`` distinct colours (tab20 has 20; beyond that a continuous map)."""
    from matplotlib import colormaps

    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / max(1, n - 1)) for i in range(n)]


def plot_label_losses(rows: list[ScoreRow]) -> str:
    """Bars of honest scores only (OOF and cross-validated): in-sample rows flatter themselves and are left out."""
    rows = [r for r in rows if r.kind != "blend"]
    fig, ax = _figure((11, 4.5))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(LABELS) + 1)
    for i, (r, colour) in enumerate(zip(rows, _colours(len(rows)))):
        values = [r.per_label.get(l, np.nan) for l in LABELS] + [r.overall]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{r.name} ({r.kind})", color=colour)
    ax.set_xticks(x, [*LABELS, "overall"], rotation=20)
    ax.set_ylabel("log loss")
    ax.set_title("Out-of-fold / cross-validated log loss per label (lower is better)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _figure_png(fig)


def importance_by_feature(importance) -> pd.Series:
    """Total importance per feature, largest first, from a DataFrame (``feature`` + numeric columns, or indexed by feature) or a Series."""
    if isinstance(importance, pd.Series):
        series = importance
    else:
        frame = pd.DataFrame(importance)
        if "feature" in frame.columns:
            frame = frame.set_index("feature")
        series = frame.select_dtypes("number").sum(axis=1)
    return series.groupby(level=0).sum().sort_values(ascending=False)


def plot_importance(name: str, importance) -> str:
    top = importance_by_feature(importance).head(TOP_FEATURES)[::-1]
    # wide enough for full feature names (tight_layout makes room on the left)
    fig, ax = _figure((11, max(2.5, 0.3 * len(top) + 1)))
    ax.barh([str(i) for i in top.index], top.to_numpy())
    ax.set_title(f"{name}: top {len(top)} features (gain, all labels)")
    ax.tick_params(axis="y", labelsize=7)
    return _figure_png(fig)


def plot_history(study_name: str, history: list) -> str:
    values = np.array([np.nan if v is None else v for v in history], dtype=np.float64)
    fig, ax = _figure((7, 3))
    trials = np.arange(len(values))
    ax.plot(trials, values, "o", ms=3, label="trial")
    best = np.fmin.accumulate(np.where(np.isnan(values), np.inf, values))
    ax.plot(trials, np.where(np.isinf(best), np.nan, best), "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (log loss)")
    ax.set_title(f"Optuna history: {study_name}")
    ax.legend(fontsize=7)
    return _figure_png(fig)


def plot_weights(weights: dict) -> str:
    """``weights``: {label: {source: weight}} as in blend.json; one stacked bar per label."""
    sources = list(next(iter(weights.values())).keys())
    fig, ax = _figure((10, 4))
    bottom = np.zeros(len(LABELS))
    for source, colour in zip(sources, _colours(len(sources))):
        values = np.array([weights[l][source] for l in LABELS])
        ax.bar(LABELS, values, bottom=bottom, label=source, color=colour)
        bottom += values
    ax.set_ylim(0, 1)
    ax.set_title("Blend weights per label (normalized)")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return _figure_png(fig)


CALIBRATION_BINS = 10


def _calibration_bins(p: np.ndarray, label: int, bins: int) -> list[np.ndarray]:
    """Row positions of ``bins`` equal-count bins of one label's predictions (empty bins dropped)."""
    order = np.argsort(p[:, label], kind="stable")
    return [g for g in np.array_split(order, bins) if len(g)]


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Per label: mean prediction, observed rate and the expected calibration error over equal-count bins."""
    rows = []
    for l, label in enumerate(LABELS):
        gaps = [abs(p[g, l].mean() - y[g, l].mean()) * len(g) for g in _calibration_bins(p, l, bins)]
        rows.append({"label": label, "mean predicted": float(p[:, l].mean()), "observed rate": float(y[:, l].mean()),
                     "ECE": float(np.sum(gaps) / len(y))})
    return pd.DataFrame(rows)


def plot_calibration(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> str:
    """Reliability diagram per label: observed rate against mean prediction in equal-count bins."""
    fig, axes = _figure((12, 7), 2, 3)
    for l, (label, ax) in enumerate(zip(LABELS, axes.ravel())):
        groups = _calibration_bins(p, l, bins)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.plot([p[g, l].mean() for g in groups], [y[g, l].mean() for g in groups], "o-", ms=4)
        ax.set_title(label)
        ax.set_xlabel("mean prediction")
        ax.set_ylabel("observed rate")
    return _figure_png(fig)


def html_table(frame: pd.DataFrame, *, highlight: int | None = None, digits: int = 5) -> str:
    """A real HTML table (full names, numbers right-aligned); row ``highlight`` in bold."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cells = "".join(f"<td class='num'>{v:.{digits}f}</td>" if isinstance(v, (float, np.floating)) else f"<td>{html.escape(str(v))}</td>"
                        for v in row)
        body.append(f"<tr{' class=best' if i == highlight else ''}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _score_frame(rows: list[ScoreRow]) -> pd.DataFrame:
    return pd.DataFrame([{"source": r.name, "kind": r.kind, "overall": r.overall, **{l: r.per_label.get(l, np.nan) for l in LABELS}}
                         for r in rows])


def score_rows(record: dict, fitted: dict) -> list[ScoreRow]:
    """Base models, stackers (a tuned one also with its selected, optimistic score), the blend in-sample and cross-validated."""
    rows = [ScoreRow.from_score(s["name"], s["kind"], s["oof_score"]) for s in record["sources"] if s["kind"] == "base"]
    for s in record["sources"]:
        if s["kind"] == "stacker":
            rows.append(ScoreRow.from_score(s["name"], "stacker", s["oof_score"]))
            if "tuning" in s:
                rows.append(ScoreRow.from_score(f"{s['name']} (selected trial)", "selected", s["tuning"]["selected"]))
    rows.append(ScoreRow.from_score(f"blend ({record['choice']['chosen']})", "blend", record["scores"]["in_sample"]))
    rows.append(ScoreRow.from_score(f"blend-cv ({record['choice']['chosen']})", "blend-cv", record["scores"]["cv"]))
    return rows


def stack_fit_report(workdir: Workdir, record: dict, sources, choice, fitted: dict, studies: dict) -> list[ScoreRow]:
    """stack/report.html for one `stack fit` (tables, weights, per-fold scores, calibration, tuning); returns the terminal table's rows."""
    rows = score_rows(record, fitted)
    chosen = choice.chosen
    candidates = pd.DataFrame([{"candidate": c.name, "kind": c.kind, "cross-validated": c.cv.overall,
                                **{f"fold {f['fold']}": f["overall"] for f in c.per_fold}} for c in choice.candidates])
    weights = pd.DataFrame([{"source": n, **{l: record["weights"][l][n] for l in LABELS}} for n in sources.names])
    for key in ("temperature", "bias"):
        weights.loc[len(weights)] = {"source": f"({key})", **record[key]}
    calibration = calibration_table(sources.y, chosen.pooled)
    sections = [
        "<h2>Result</h2>",
        f"<p>Kept for submission: <b>{html.escape(chosen.name)}</b>: {html.escape(choice.reason)}. "
        f"Cross-validated {choice.cv.overall:.5f}, in-sample {choice.in_sample.overall:.5f} (in-sample flatters a fitted blend). "
        f"Clip {record['clip']:.3g}; any &ge; max(subtypes): {record['any_consistency']}.</p>",
        f"<p>{html.escape(test_sets_note(record['test_sets'], record['models_without_test_folds']))}</p>",
        "<h2>Scores (weighted log loss, lower is better)</h2>",
        html_table(_score_frame(rows)),
        "<p>base and stacker rows are out-of-fold; a tuned stacker's row is the OOF of its one refitted recipe (all folds but the outer "
        "one took part in choosing it), 'selected trial' is that trial's cross-validated score on the folds it was chosen on (optimistic); "
        "the honest estimate of a tuned stacker is its outer-fold score under Tuning. 'blend' is in-sample, 'blend-cv' refitted per fold.</p>",
        *_tuning_section(record),
        _img(plot_label_losses(rows), "per-label log loss"),
        "<h2>Candidates and per-fold scores</h2>",
        html_table(candidates, highlight=choice.candidates.index(chosen)),
        f"<p>{html.escape(CANDIDATE_NOTE)}</p>",
        "<h2>Blend weights</h2>",
        html_table(weights, digits=3),
        _img(plot_weights(record["weights"]), "blend weights"),
        "<h2>Calibration of the kept blend (cross-validated predictions)</h2>",
        html_table(calibration),
        _img(plot_calibration(sources.y, chosen.pooled), "calibration per label"),
    ]
    for name, (result, _tuned) in fitted.items():
        if result.importance is not None and len(result.importance):
            sections += [f"<h2>Feature importance: stack/{html.escape(name)}</h2>", _img(plot_importance(f"stack/{name}", result.importance), name)]
    for key, info in studies.items():
        if info.history:
            sections += [f"<h2>Optuna: {html.escape(info.name)} (trials of the current inputs)</h2>", _img(plot_history(info.name, info.history), info.name)]
    _write_page(workdir, sections)
    return rows


def test_sets_note(test_sets: int, without) -> str:
    """How submit meets the test set (contract v3): ``test_sets`` (blend.json's), and ``without``: the base
    models with no per-fold test files."""
    if test_sets > 1:
        note = (f"Test set: the blend is applied to each of the {test_sets} base fold models' test sets, then averaged, "
                "so it meets single-model predictions as in its out-of-fold fit.")
        return note + (f" Without per-fold test files (their averaged test.parquet enters every set): {', '.join(without)}." if without else "")
    return ("Test set: no base model has per-fold test files (preds/<model>/test_fold<k>.parquet), so the test features and the blend "
            "use the fold-averaged test predictions, smoother than the single fold models' OOF rows the stackers and the blend were fitted on"
            + (f" ({', '.join(without)})." if without else "."))


def _tuning_section(record: dict) -> list[str]:
    """Per tuned stacker: the outer fold's scores (selected recipe, defaults) beside the selected trial's inner CV."""
    rows = [{"stacker": s["name"], "outer fold": str(t["outer_fold"]), "honest (outer fold)": t["honest"]["overall"],
             "defaults (outer fold)": t["defaults_outer"]["overall"],
             "selected alone (outer fold)": t.get("selected_outer", t["honest"])["overall"],
             "selected trial": str(t["selected_trial"]) + (" (the defaults)" if t.get("selected_is_defaults") else
                                                            " (bagged with the defaults)" if t.get("bagged") else ""),
             "its inner CV": t["selected"]["overall"], "lowest inner CV (trial)": _lowest(t),
             "trials now / complete / pruned": f"{t['trials']['run_now']} / {t['trials']['complete']} / {t['trials']['pruned']}"}
            for s in record["sources"] if s["kind"] == "stacker" and (t := s.get("tuning"))]
    if not rows:
        return []
    section = ["<h2>Tuning</h2>", html_table(pd.DataFrame(rows)),
               "<p>The study never saw the outer fold: trials were cross-validated on the other folds, and the selected parameters were "
               f"refitted over all folds. The selected trial is {html.escape(SELECTION_RULE)}; {html.escape(BAG_RULE)}. The inner CV of a selected trial "
               "is optimistic (it was chosen on it); the outer fold's score is honest (no label of it took part in the choice); the "
               "defaults are scored on the same rows.</p>"]
    nested = (record.get("optuna") or {}).get("nested")
    if nested:
        from stackkit.stack.nested import describe_nested

        section.append(f"<p>The submission, {html.escape(describe_nested(nested))} (its blend chosen and fitted on the other folds).</p>")
    return section


def _lowest(tuning: dict) -> str:
    return f"{tuning['best']:.5f} ({tuning['best_trial']})" if "best" in tuning else ""


CANDIDATE_NOTE = ("Every candidate is scored on predictions it was not fitted on: a source on its OOF file, a blend refitted on the other "
                  "folds for each fold. The lowest cross-validated blend that is below the best single source on every fold and at least "
                  f"{MIN_BLEND_GAIN:.1%} below it overall is kept (ties go to the simpler one); else the best source is kept. So the kept blend is never worse on CV than its best "
                  "source, and a post-processing step is used only where it lowered the cross-validated loss.")
PAGE_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}img{max-width:100%}"
              "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
              "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.best{font-weight:bold;background:#eef6ee}")


def _write_page(workdir: Workdir, sections: list[str]) -> Path:
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>stackkit report</title><style>{PAGE_STYLE}</style>"
            "</head><body><h1>stackkit: stack fit report</h1>\n" + "\n".join(sections) + "\n</body></html>\n")
    return write_text(page, workdir.report_html)


def _img(png_base64: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{png_base64}'>"


def unit_score_rows(record: dict) -> list[dict]:
    """A unit task's blend.json as score rows: base models' plain aggregation, the stackers' OOF, the blend's CV."""
    def row(name: str, kind: str, score: dict) -> dict:
        return {"source": name, "kind": kind, "overall": float(score["overall"]), **{p: float(v) for p, v in score["parts"].items()}}

    rows = [row(f"preds/{m} (max)", "base", s) for m, s in record["base_oof_scores"].items()]
    rows += [row(s["name"], "stacker", s["oof_score"]) for s in record["sources"]]
    return rows + [row("blend-cv", "blend-cv", record["scores"]["cv"])]


def unit_fit_report(workdir: Workdir, record: dict) -> Path:
    """stack/report.html of a unit task's `stack fit` (record: its blend.json): scores, the blend's weights per target, per-fold scores."""
    rows = unit_score_rows(record)
    best = min(range(len(rows)), key=lambda i: rows[i]["overall"])
    weights = pd.DataFrame([{"target": target, **{n: float(w) for n, w in (part.get("weights") or {}).items()}}
                            for target, part in record["blend"]["parts"].items()])
    per_fold = pd.DataFrame([{"fold": str(f["fold"]), "overall": f["overall"], **f["parts"]} for f in record["scores"]["cv"]["per_fold"]])
    sections = [
        f"<h2>Task {html.escape(record['task'])}: one row per {html.escape(record['unit'])}</h2>",
        "<h2>Scores (the task's metric, lower is better)</h2>",
        html_table(pd.DataFrame(rows), highlight=best),
        "<p>base rows: each model's plain aggregation (the max over the unit's slices), out-of-fold; stacker rows: out-of-fold; "
        "blend-cv: the blend refitted per fold and scored on the fold it was not fitted on.</p>",
        "<h2>Blend weights per target</h2>", html_table(weights, digits=3),
        "<h2>The blend's cross-validated score per fold</h2>", html_table(per_fold),
        f"<p>{html.escape(record.get('test_sets_method') or '')} ({record['test_sets']} test set(s)).</p>",
    ]
    return _write_page(workdir, sections)
