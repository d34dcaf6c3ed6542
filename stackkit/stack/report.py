"""The `stack fit` report: a text table for the terminal and stack/report.html with inline plots.

``render_table`` prints one row per base model, stacker and blend (in-sample and
cross-validated), the overall weighted log loss and each label's log loss. The HTML report
embeds its PNG plots as base64 (one self-contained file); matplotlib is imported only when the
report is written, and draws on the Agg canvas directly (no pyplot, no global backend switch).
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


def render_table(rows) -> str:
    """Fixed-width table of weighted log loss (lower is better): overall and per label; best overall marked with *."""
    rows = [r if isinstance(r, ScoreRow) else ScoreRow.from_score(r["name"], r["kind"], r) for r in rows]
    if not rows:
        return ""
    short = {"epidural": "epidural", "intraparenchymal": "intraparench", "intraventricular": "intraventric",
             "subarachnoid": "subarachnoid", "subdural": "subdural", "any": "any"}
    name_width = max(12, *(len(r.name) for r in rows))
    header = f"{'source':<{name_width}}  {'kind':<8}  {'overall':>8}  " + "  ".join(f"{short[l]:>12}" for l in LABELS)
    lines = [header, "-" * len(header)]
    # the marker goes to the best honest number: in-sample blend scores flatter themselves
    honest = [r for r in rows if r.kind != "blend"]
    best = min(honest or rows, key=lambda r: r.overall)
    for r in rows:
        mark = "*" if r is best else " "
        lines.append(
            f"{r.name:<{name_width}}  {r.kind:<8}  {r.overall:>8.5f}{mark} "
            + "  ".join(f"{r.per_label.get(l, float('nan')):>12.5f}" for l in LABELS)
        )
    lines.append("weighted log loss (any counts twice); * = best out-of-fold score; 'blend' is in-sample, 'blend-cv' is refitted per fold")
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------------


def _figure(figsize):
    """A figure on the Agg canvas, without pyplot: no global backend switch, nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_label_losses(rows: list[ScoreRow]) -> str:
    fig, ax = _figure((10, 4))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(LABELS) + 1)
    for i, r in enumerate(rows):
        values = [r.per_label.get(l, np.nan) for l in LABELS] + [r.overall]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{r.name} ({r.kind})")
    ax.set_xticks(x, [*LABELS, "overall"], rotation=20)
    ax.set_ylabel("log loss")
    ax.set_title("Out-of-fold log loss per label")
    ax.legend(fontsize=7, ncol=2)
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
    fig, ax = _figure((8, max(2.5, 0.28 * len(top) + 1)))
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
    fig, ax = _figure((8, 3.5))
    bottom = np.zeros(len(LABELS))
    for source in sources:
        values = np.array([weights[l][source] for l in LABELS])
        ax.bar(LABELS, values, bottom=bottom, label=source)
        bottom += values
    ax.set_ylim(0, 1)
    ax.set_title("Blend weights per label (normalized)")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=7, ncol=3)
    return _figure_png(fig)


def write_report_html(workdir: Workdir, *, rows, importances: dict | None = None, histories: dict | None = None,
                      blend_weights: dict | None = None, notes: list[str] | None = None) -> Path:
    """stack/report.html: the table plus per-label loss bars, feature importance (top 20 per GBDT
    stacker), Optuna history per study and the blend weights. Written atomically."""
    rows = [r if isinstance(r, ScoreRow) else ScoreRow.from_score(r["name"], r["kind"], r) for r in rows]
    sections = [
        "<h2>Scores</h2>",
        f"<pre>{html.escape(render_table(rows))}</pre>",
        _img(plot_label_losses(rows), "per-label log loss"),
    ]
    if blend_weights:
        sections += ["<h2>Blend weights</h2>", _img(plot_weights(blend_weights), "blend weights")]
    for name, importance in (importances or {}).items():
        if importance is not None and len(importance):
            sections += [f"<h2>Feature importance: {html.escape(name)}</h2>", _img(plot_importance(name, importance), f"{name} importance")]
    for study_name, history in (histories or {}).items():
        if history:
            sections += [f"<h2>Optuna: {html.escape(study_name)}</h2>", _img(plot_history(study_name, history), f"{study_name} history")]
    if notes:
        sections += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>stackkit report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{font-size:12px}img{max-width:100%}</style>"
        "</head><body><h1>stackkit: stack fit report</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    return write_text(page, workdir.report_html)


def _img(png_base64: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{png_base64}'>"
