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

from stackkit.contract import Workdir
from stackkit.errors import StackkitError

DEMO_MARKER = ".stackkit-demo"
# stackers the demo fits besides the default set: the ones that read the CNNs' embeddings
DEMO_EMBEDDING_STACKERS = ("seq_emb",)


def _fresh_workdir(wd: Workdir) -> None:
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


def run_demo(wd: Workdir, *, patients: int = 40, trials: int = 8, seed: int = 0, fresh: bool = True,
             progress: bool = True, epochs: int = 9, on_step=None) -> dict:
    """The pipeline's library calls in order; ``on_step(title)`` is called before each step (the CLI prints it)."""
    from base_models.train import train_base
    from features.api import run_stack_features

    from stackkit.stack.fit import run_stack_fit
    from stackkit.data.prepare import prepare_data
    from stackkit.submit import write_submission
    from stackkit.data.synth import synthesize

    if fresh:
        _fresh_workdir(wd)
    timings: dict[str, float] = {}

    def step(title, func, *args, **kwargs):
        if on_step is not None:
            on_step(title)
        start = time.perf_counter()
        result = func(*args, **kwargs)
        timings[title] = time.perf_counter() - start
        return result

    dicom_root = wd.root / "dicom"
    synth_summary = step("synth", synthesize, dicom_root, patients=patients, seed=seed, progress=progress)
    # a tiny demo has fewer training patients than the usual 5 folds: one patient per fold at least
    n_folds = max(2, min(5, synth_summary["train_patients"]))
    step("prepare", prepare_data, wd, dicom_dir=dicom_root / "stage_2_train", test_dicom_dir=dicom_root / "stage_2_test",
         labels_csv=dicom_root / "stage_2_train.csv", n_folds=n_folds, seed=seed, progress=progress)
    trained = {}
    for name, context in (("cnn_plain", 0), ("cnn_ctx1", 1)):
        trained[name] = step(f"base train {name}", train_base, wd, name=name, context=context, epochs=epochs,
                             seed=seed, progress=progress, embeddings=True)
    step("stack features", run_stack_features, wd, progress=progress)
    from stackkit.stack.stackers import DEFAULT_STACKERS

    stackers = list(dict.fromkeys([*DEFAULT_STACKERS, *DEMO_EMBEDDING_STACKERS]))
    fit_summary = step("stack fit --tune", run_stack_fit, wd, stackers=stackers, tune=True, trials=trials, seed=seed,
                       progress=progress)
    submit_summary = step("submit", write_submission, wd)
    from stackkit.holdout import held_out_verdict

    verdict = step("held-out score", held_out_verdict, wd, synth_summary["held_out_labels_csv"])

    lines = [line for line in fit_summary.get("lines", []) if line.startswith(("blend", "the tuned blend"))]
    lines += [f"{name:>18}: {seconds:7.1f} s" for name, seconds in timings.items()]
    lines.append(f"{'total':>18}: {sum(timings.values()):7.1f} s")
    lines.append(f"submission: {submit_summary.get('path', wd.submission)}")
    lines.append(f"report: {wd.report_html}")
    lines += ["", *verdict["table"].splitlines(), *verdict["lines"]]
    return {"table": fit_summary.get("table", ""), "lines": lines, "timings": timings, "held_out": verdict["rows"]}
