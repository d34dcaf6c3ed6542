"""`demo`: the whole pipeline on synthetic data, in a fresh work directory.

synth -> prepare -> two small CNNs (one with neighbor context), each also writing its
embeddings (the pooled features before the head) -> features -> fit --tune (the default stackers
plus ``seq_emb``, the sequence stacker that reads the embeddings) -> submit -> the verdict. Every
step is the same library call the individual commands make.

The verdict: `data synth` writes the test split's labels to a file of their own
(``dicom/stage_2_test_labels.csv``) that no step reads; the demo scores the submission, every
stacker and every base model on them (stackkit.holdout) and closes with what the stack gained
over the best base model there, beside the same figure on CV.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stackkit.contract import Workdir
from stackkit.errors import StackkitError

if TYPE_CHECKING:
    from stackkit.holdout import HeldOutVerdict
    from stackkit.stack.fit import StackFitResult

DEMO_MARKER = ".stackkit-demo"
# stackers the demo fits besides the default set: the ones that read the CNNs' embeddings
DEMO_EMBEDDING_STACKERS = ("seq_emb",)


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


def run_demo(wd: Workdir, *, patients: int = 40, trials: int = 8, seed: int = 0, fresh: bool = True,
             progress: bool = True, epochs: int = 9, on_step=None) -> DemoResult:
    """The pipeline's library calls in order; ``on_step(title)`` is called before each step (the CLI prints it)."""
    from base_models.train import train_base
    from features.api import run_stack_features

    from stackkit.stack.fit import run_stack_fit
    from stackkit.data.prepare import prepare_data
    from stackkit.submit import write_submission
    from stackkit.data.synth import synthesize

    if fresh:
        start_demo_workdir(wd)
    step = Steps(on_step)

    dicom_root = wd.root / "dicom"
    synthesized = step("synth", synthesize, dicom_root, patients=patients, seed=seed, progress=progress)
    # a tiny demo has fewer training patients than the usual 5 folds: one patient per fold at least
    n_folds = max(2, min(5, synthesized.train_patients))
    step("prepare", prepare_data, wd, dicom_dir=dicom_root / "stage_2_train", test_dicom_dir=dicom_root / "stage_2_test",
         labels_csv=dicom_root / "stage_2_train.csv", n_folds=n_folds, seed=seed, progress=progress)
    for name, context in (("cnn_plain", 0), ("cnn_ctx1", 1)):
        step(f"base train {name}", train_base, wd, name=name, context=context, epochs=epochs, seed=seed, progress=progress, embeddings=True)
    step("stack features", run_stack_features, wd, progress=progress)
    from stackkit.stack.stackers import DEFAULT_STACKERS

    stackers = list(dict.fromkeys([*DEFAULT_STACKERS, *DEMO_EMBEDDING_STACKERS]))
    fit = step("stack fit --tune", run_stack_fit, wd, stackers=stackers, tune=True, trials=trials, seed=seed, progress=progress)
    submitted = step("submit", write_submission, wd)
    from stackkit.holdout import held_out_verdict

    verdict = step("held-out score", held_out_verdict, wd, synthesized.held_out_labels_csv)
    return DemoResult(fit=fit, submission=submitted.path, report=wd.report_html, timings=step.timings, verdict=verdict)
