"""Scores on held-back labels: what the stack gained over the best base model where nothing was fitted.

The labels come from a file no pipeline step reads (``data synth``'s
``stage_2_test_labels.csv``, the test split's labels; or any RSNA long / wide label file for the
test images). ``held_out_verdict`` scores the submission, every stacker's and every base model's
test predictions on them, beside their cross-validated (OOF) scores from ``stack/blend.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, Workdir
from stackkit.contract.records import read_blend_record
from stackkit.errors import StackkitError
from stackkit.metric import Score, prior_score, weighted_log_loss


def read_submission(path) -> pd.DataFrame:
    """``ID,Label`` rows (``ID_<image>_<label>``) -> image_id + six label columns."""
    sub = pd.read_csv(path, dtype={"ID": str})
    parts = sub["ID"].str.rsplit("_", n=1, expand=True)  # labels have no '_', image ids do
    wide = pd.DataFrame({"image_id": parts[0], "label": parts[1], "value": sub["Label"].to_numpy()})
    return wide.pivot(index="image_id", columns="label", values="value")[list(LABELS)].reset_index()


def score_on(frame: pd.DataFrame, truth: pd.DataFrame, what: str) -> Score:
    """Weighted log loss of ``frame``'s predictions (image_id + six labels) on every image of ``truth``."""
    pred = frame.set_index("image_id").reindex(truth["image_id"])[list(LABELS)].to_numpy(np.float64)
    missing = np.isnan(pred).any(axis=1)
    if missing.any():
        raise StackkitError(f"{what}: {int(missing.sum())} held-out image(s) have no prediction, "
                            f"e.g. {truth['image_id'].iloc[int(np.argmax(missing))]}")
    return weighted_log_loss(truth[list(LABELS)].to_numpy(), pred)


@dataclass(frozen=True)
class HeldOutRow:
    """One source's weighted log loss on CV (its OOF rows) and on the held-out labels; ``kind`` is
    submit, stacker, base or prior."""

    name: str
    kind: str
    cv: float
    held_out: float


@dataclass(frozen=True)
class HeldOutVerdict:
    """The held-out scores (stackkit/cli.py renders them): the submission first, the stackers, every
    base model and the prior; ``best_base`` is the base model best on CV, as a team without the
    held-out labels would choose it."""

    rows: tuple[HeldOutRow, ...]
    images: int  # held-out test images scored
    labels_file: str  # the held-out label file's name

    @property
    def submission(self) -> HeldOutRow:
        return self.rows[0]

    @property
    def best_base(self) -> HeldOutRow:
        return min((r for r in self.rows if r.kind == "base"), key=lambda r: r.cv)


def held_out_rows(wd: Workdir, truth: pd.DataFrame) -> list[HeldOutRow]:
    """Per source: the submission, the blend's sources (stackers), every base model, and the prior."""
    record = read_blend_record(wd.blend)
    rows = [HeldOutRow(f"submission ({record.choice['chosen']})", "submit", record.scores["cv"]["overall"],
                       score_on(read_submission(wd.submission), truth, str(wd.submission)).overall)]
    base = {f"preds/{m}": (score["overall"], wd.test(m)) for m, score in record.base_oof_scores.items()}
    sources = {s["name"]: (s["oof_score"]["overall"], wd.root / s["test"]) for s in record.sources
               if s["name"] not in base}
    for kind, entries in (("stacker", sources), ("base", base)):
        for name, (cv, test_path) in entries.items():
            held = score_on(pd.read_parquet(test_path), truth, str(test_path)).overall
            rows.append(HeldOutRow(name, kind, float(cv), held))
    return rows + [_prior_row(wd, truth)]


def _prior_row(wd: Workdir, truth: pd.DataFrame) -> HeldOutRow:
    """The floor: every image predicted at the training labels' rates (on CV: their own rates)."""
    y_train = pd.read_parquet(wd.labels)[list(LABELS)].to_numpy(np.float64)
    rates = np.broadcast_to(y_train.mean(axis=0), (len(truth), len(LABELS)))
    return HeldOutRow("prior (train label rates)", "prior", prior_score(y_train).overall,
                      weighted_log_loss(truth[list(LABELS)].to_numpy(), rates).overall)


def held_out_verdict(wd: Workdir, labels_csv) -> HeldOutVerdict:
    """Every source scored on the held-out labels beside its CV score: what the stack gained over the
    best base model there and on CV."""
    from stackkit.data.prepare import parse_label_csv

    truth = parse_label_csv(Path(labels_csv))
    if truth.empty:
        raise StackkitError(f"{labels_csv}: no held-out labels to score on")
    return HeldOutVerdict(tuple(held_out_rows(wd, truth)), len(truth), Path(labels_csv).name)
