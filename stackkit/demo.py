"""`demo`: the whole pipeline on synthetic data, in a fresh work directory.

synth -> prepare -> two small CNNs (one with neighbor context), each also writing its
embeddings (the pooled features before the head) -> features -> fit --tune (the default stackers
plus ``seq_emb``, the sequence stacker that reads the embeddings) -> submit -> the verdict. Every
step is the same library call the individual commands make.

With ``pseudo_labels`` (``demo --pseudo-labels``) a pseudo-label round follows: one soft-label file
per fold k for the test images, the mean of the two CNNs' fold model k test predictions
(``preds/<cnn>/test_fold<k>.parquet``). Base fold model k trained on the other folds' rows only
(fixed epochs, no checkpoint chosen on fold k), so file k holds nothing of fold k's labels. The
stacker's predictions would not do: its test inputs are the base models' test predictions, which
average every base fold model, fold k's included. Then ``cnn_plain`` is trained again with the
files (same arch, context, epochs and seed; ``cnn_plain_pl``), after the stack was fitted and
the submission written, so neither changes; the closing table gives both CNNs' OOF and
held-out loss.

The verdict: `data synth` writes the test split's labels to a file of their own
(``dicom/stage_2_test_labels.csv``) that no step reads; the demo scores the submission, every
stacker and every base model on them (stackkit.holdout) and closes with what the stack gained
over the best base model there, beside the same figure on CV.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stackkit.contract import Workdir
from stackkit.errors import StackkitError

if TYPE_CHECKING:
    from stackkit.holdout import HeldOutRow, HeldOutVerdict
    from stackkit.stack.fit import StackFitResult

DEMO_MARKER = ".stackkit-demo"
# stackers the demo fits besides the default set: the ones that read the CNNs' embeddings
DEMO_EMBEDDING_STACKERS = ("seq_emb",)
DEMO_CNNS = (("cnn_plain", 0), ("cnn_ctx1", 1))  # name, --context
PSEUDO_DIR = "pseudo"  # the pseudo-label round's files: fold<k>.parquet and pseudo.json (where each came from)
PSEUDO_BASELINE, PSEUDO_STUDENT = "cnn_plain", "cnn_plain_pl"


def start_demo_workdir(wd: Workdir) -> None:
    root = wd.root
    if root.exists() and any(root.iterdir()):
        if not (root / DEMO_MARKER).is_file():
            raise StackkitError(
                f"{root}: work directory is not empty and was not made by `demo`; "
                "pass --workdir to an empty folder (or use --reuse to keep its contents)"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("made by `demo`; the demo may delete this folder\n")


class Steps:
    """Runs the demo's steps in order, timing each: ``step(title, func, *args, **kwargs)`` calls
    ``on_step(title)`` first (the CLI prints it) and records the seconds in ``timings``."""

    def __init__(self, on_step=None):
        self.on_step = on_step
        self.timings: dict[str, float] = {}

    def __call__(self, title: str, func, *args, **kwargs):
        if self.on_step is not None:
            self.on_step(title)
        start = time.perf_counter()
        result = func(*args, **kwargs)
        self.timings[title] = time.perf_counter() - start
        return result


@dataclass(frozen=True)
class DemoResult:
    """What the demo did (stackkit/cli.py renders it): the fit, the files, each step's seconds and the held-out verdict."""

    fit: StackFitResult
    submission: Path
    report: Path
    timings: dict  # step title -> seconds
    verdict: HeldOutVerdict
    pseudo: PseudoRound | None = None  # with --pseudo-labels


@dataclass(frozen=True)
class PseudoRound:
    """The pseudo-label round: the files (fold 0 first), the CNNs that made them, and the CNN without and with
    them (``rows``: the baseline, then the student), each on CV (its OOF) and on the held-out labels."""

    files: tuple[Path, ...]
    teachers: tuple[str, ...]
    rows: tuple[HeldOutRow, HeldOutRow]


@dataclass(frozen=True)
class DemoOptions:
    """`demo`'s settings (the CLI's options of the same names)."""

    patients: int = 40
    trials: int = 8
    seed: int = 0
    fresh: bool = True
    progress: bool = True
    epochs: int = 9
    pseudo_labels: bool = False  # the pseudo-label round after the stack (module docstring)


def run_demo(wd: Workdir, options: DemoOptions | None = None, *, on_step=None, **fields) -> DemoResult:
    """The pipeline's library calls in order; ``on_step(title)`` is called before each step (the CLI prints it).
    The keywords are :class:`DemoOptions`' fields: pass them, or ``options`` (then ``fields`` override it)."""
    from base_models.train import train_base
    from features.api import run_stack_features

    from stackkit.stack.fit import run_stack_fit
    from stackkit.data.prepare import prepare_data
    from stackkit.submit import write_submission
    from stackkit.data.synth import synthesize

    o = DemoOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    patients, trials, seed, progress, epochs = o.patients, o.trials, o.seed, o.progress, o.epochs
    if o.fresh:
        start_demo_workdir(wd)
    step = Steps(on_step)

    dicom_root = wd.root / "dicom"
    synthesized = step("synth", synthesize, dicom_root, patients=patients, seed=seed, progress=progress)
    # a tiny demo has fewer training patients than the usual 5 folds: one patient per fold at least
    n_folds = max(2, min(5, synthesized.train_patients))
    step("prepare", prepare_data, wd, dicom_dir=dicom_root / "stage_2_train", test_dicom_dir=dicom_root / "stage_2_test",
         labels_csv=dicom_root / "stage_2_train.csv", n_folds=n_folds, seed=seed, progress=progress)
    trained = {name: step(f"base train {name}", train_base, wd, name=name, context=context, epochs=epochs, seed=seed,
                          progress=progress, embeddings=True) for name, context in DEMO_CNNS}
    step("stack features", run_stack_features, wd, progress=progress)
    from stackkit.stack.stackers import DEFAULT_STACKERS

    stackers = list(dict.fromkeys([*DEFAULT_STACKERS, *DEMO_EMBEDDING_STACKERS]))
    fit = step("stack fit --tune", run_stack_fit, wd, stackers=stackers, tune=True, trials=trials, seed=seed, progress=progress)
    submitted = step("submit", write_submission, wd)
    from stackkit.holdout import held_out_verdict

    verdict = step("held-out score", held_out_verdict, wd, synthesized.held_out_labels_csv)
    pseudo = pseudo_round(wd, step, trained, synthesized.held_out_labels_csv, o) if o.pseudo_labels else None
    return DemoResult(fit=fit, submission=submitted.path, report=wd.report_html, timings=step.timings, verdict=verdict,
                      pseudo=pseudo)


def write_pseudo_labels(wd: Workdir, teachers) -> list[Path]:
    """``pseudo/fold<k>.parquet`` per fold k of data/folds.parquet: the mean of the ``teachers``' fold model k test
    predictions; ``pseudo/pseudo.json`` names each file's sources."""
    import numpy as np
    import pandas as pd

    from stackkit.contract import LABELS
    from stackkit.contract.io import write_json, write_parquet

    folds = sorted(int(f) for f in np.unique(pd.read_parquet(wd.folds, columns=["fold"])["fold"]))
    out, paths, record = wd.root / PSEUDO_DIR, [], []
    out.mkdir(exist_ok=True)
    for fold in folds:
        sources = [wd.test_fold(t, fold) for t in teachers]
        frames = [pd.read_parquet(p).sort_values("image_id", kind="stable").reset_index(drop=True) for p in sources]
        soft = np.mean([f[list(LABELS)].to_numpy(np.float64) for f in frames], axis=0)
        paths.append(write_parquet(pd.DataFrame(soft, columns=list(LABELS)).assign(image_id=frames[0]["image_id"])
                                   [["image_id", *LABELS]], out / f"fold{fold}.parquet"))
        record.append({"fold": fold, "path": wd.relative(paths[-1]),
                       "sources": [{"model": t, "fold_model": fold, "path": wd.relative(p)} for t, p in zip(teachers, sources)]})
    write_json({"files": record}, out / "pseudo.json")
    return paths


def pseudo_round(wd: Workdir, step: Steps, trained: dict, labels_csv, o: DemoOptions) -> PseudoRound:
    """Write the pseudo-label files, train the student, score it and its baseline on CV and the held-out labels."""
    import pandas as pd

    from base_models.train import train_base
    from stackkit.data.prepare import parse_label_csv
    from stackkit.holdout import HeldOutRow, score_on

    teachers = tuple(name for name, _ in DEMO_CNNS)
    files = step("pseudo-labels", write_pseudo_labels, wd, teachers)
    context = dict(DEMO_CNNS)[PSEUDO_BASELINE]
    trained = {**trained, PSEUDO_STUDENT: step(
        f"base train {PSEUDO_STUDENT}", train_base, wd, name=PSEUDO_STUDENT, context=context, epochs=o.epochs, seed=o.seed,
        progress=o.progress, embeddings=True, pseudo_labels=[str(p) for p in files])}
    truth = parse_label_csv(Path(labels_csv))
    rows = tuple(HeldOutRow(f"preds/{name}", "base", float(trained[name].oof_logloss),
                            score_on(pd.read_parquet(wd.test(name)), truth, str(wd.test(name))).overall)
                 for name in (PSEUDO_BASELINE, PSEUDO_STUDENT))
    return PseudoRound(tuple(files), teachers, rows)
