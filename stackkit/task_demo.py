"""`demo --task rsna2022-cspine|rsna2023-abdominal`: the whole pipeline of a unit task on synthetic data.

synth (the competition's layout) -> prepare --task -> two small CNNs over the task's slice-level
columns (one with neighbor context, both writing embeddings) -> the unit features -> the unit
stack fit -> the competition's submission -> the verdict. Every step is the library call the
command makes.

The verdict: `data synth --task` holds the test split's labels back in ``dicom/test_labels.csv``
(train.csv's format), which no step reads; the demo scores with the task's metric the submission
file as written, every stacker's test predictions, every base model's max over each unit's slices
and the training labels' rates, and closes with what the stack gained over the best base model
(best on CV) there and on CV.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stackkit.contract import Workdir
from stackkit.contract.tasks import TaskSchema, TaskScore, get_task, schema_metric
from stackkit.data.synth_ct import HELD_OUT_CSV, TRAIN_CSV
from stackkit.errors import StackkitError

# the CNNs of the demo: (name, neighbor context)
TASK_DEMO_MODELS = (("cnn_plain", 0), ("cnn_ctx1", 1))


@dataclass(frozen=True)
class HeldOutTaskRow:
    name: str
    kind: str  # submission, stacker, base (its max aggregation), prior
    cv: float | None
    held_out: TaskScore


@dataclass(frozen=True)
class TaskDemoResult:
    """What `demo --task` did (stackkit/cli.py renders it with :func:`task_demo_lines`)."""

    task: str
    fit: object  # stackkit.stack.unit_fit.UnitFitResult
    submission: Path
    submission_rows: int
    timings: dict  # step title -> seconds
    rows: list  # HeldOutTaskRow, the submission first
    units: int  # held-out test units
    labels_file: Path


@dataclass(frozen=True)
class TaskDemoOptions:
    """What `demo --task` is asked for: :func:`run_task_demo`'s keywords. ``size``: the synthetic images'
    pixels and the CNNs' input size."""

    patients: int = 40
    epochs: int = 9
    seed: int = 0
    fresh: bool = True
    size: int = 64


def run_task_demo(wd: Workdir, task: str, options: TaskDemoOptions | None = None, *, progress: bool = True, on_step=None,
                  **fields) -> TaskDemoResult:
    """The pipeline's library calls in order; ``on_step(title)`` is called before each step (the CLI prints it).
    The keywords are :class:`TaskDemoOptions`' fields: pass them, or ``options`` (then ``fields`` override it)."""
    from base_models.train import train_base
    from features.task_features import run_unit_features

    from stackkit.data.prepare_task import prepare_task_data
    from stackkit.data.synth_tasks import SYNTHESIZERS, synthesize_task
    from stackkit.demo import Steps, start_demo_workdir
    from stackkit.stack.unit_fit import run_unit_fit
    from stackkit.unit_submit import write_unit_submission

    o = TaskDemoOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    patients, epochs, seed, size = o.patients, o.epochs, o.seed, o.size
    schema = get_task(task)
    if task not in SYNTHESIZERS:
        raise StackkitError(f"demo --task {task}: no synthetic dataset of it; choose one of {', '.join(SYNTHESIZERS)} "
                            "(RSNA 2019: demo without --task)")
    if o.fresh:
        start_demo_workdir(wd)
    step = Steps(on_step)

    dicom = wd.root / "dicom"
    step("synth", synthesize_task, task, dicom, patients=patients, size=size, seed=seed, progress=progress)
    train_units = len(pd.read_csv(dicom / TRAIN_CSV))
    # a tiny demo has fewer training units than the usual 5 folds: one patient per fold at least
    step("prepare", prepare_task_data, wd, task=task, root=dicom, n_folds=max(2, min(5, train_units)), seed=seed, progress=progress)
    for name, context in TASK_DEMO_MODELS:
        step(f"base train {name}", train_base, wd, name=name, context=context, epochs=epochs, img_size=size, seed=seed,
             progress=progress, embeddings=True)
    step("stack features", run_unit_features, wd, schema, progress=progress)
    fit = step("stack fit", run_unit_fit, wd, schema, seed=seed, progress=progress)
    submitted = step("submit", write_unit_submission, wd, schema=schema)
    held_out = dicom / HELD_OUT_CSV
    rows = step("held-out score", held_out_task_rows, wd, schema, fit, submitted.path, held_out)
    return TaskDemoResult(task, fit, submitted.path, submitted.rows, step.timings, rows, len(read_held_out_labels(schema, held_out)),
                          held_out)


# --- the verdict ------------------------------------------------------------------------------------


def read_held_out_labels(schema: TaskSchema, path) -> pd.DataFrame:
    """``test_labels.csv`` (train.csv's format) as the unit id + ``schema.labels``."""
    frame = pd.read_csv(path, dtype={"StudyInstanceUID": str, "patient_id": str})
    frame = frame.rename(columns={"StudyInstanceUID": "study_id"})
    return frame[[schema.unit_column, *schema.labels]]


def read_unit_submission(schema: TaskSchema, path) -> pd.DataFrame:
    """The competition's submission file back as the unit id + the submitted columns (a long file's row ids
    ``<unit>_<column>`` split on the known column names: ``patient_overall`` holds an underscore)."""
    sub = schema.submission
    frame = pd.read_csv(path, dtype={sub.id_column: str})
    if sub.layout == "wide":
        return frame.rename(columns={sub.id_column: schema.unit_column})
    ids = frame[sub.id_column]
    parts = []
    for column in sub.columns:
        mine = ids.str.endswith(f"_{column}").to_numpy()
        parts.append(pd.Series(frame[sub.value_column].to_numpy()[mine], index=ids[mine].str[: -len(column) - 1].to_numpy(),
                               name=column))
    wide = pd.concat(parts, axis=1)
    return wide.rename_axis(schema.unit_column).reset_index()


def held_out_task_rows(wd: Workdir, schema: TaskSchema, fit, submission: Path, labels_csv: Path) -> list[HeldOutTaskRow]:
    """The submission, every stacker, every base model's max aggregation and the rates prior on the held-out labels."""
    from stackkit.contract.io import read_table
    from stackkit.contract.task_files import load_task_core, unit_max_predictions
    from stackkit.contract.validate import read_test

    truth = read_held_out_labels(schema, labels_csv)
    core = load_task_core(wd, schema)
    rows = [HeldOutTaskRow("submission", "stack", fit.cv.overall, schema_metric(schema, truth, read_unit_submission(schema, submission)))]
    for name, score in fit.stacker_scores.items():
        test = read_table(wd.stacker_folder(name).test, what="test prediction file")
        rows.append(HeldOutTaskRow(f"stack/{name}", "stacker", score.overall, schema_metric(schema, truth, test)))
    for name, score in fit.base_scores.items():
        test = read_test(wd.test(name), core.metadata, wd, schema.prediction_columns)
        rows.append(HeldOutTaskRow(f"preds/{name} (max)", "base", score.overall, schema_metric(schema, truth, unit_max_predictions(core, test))))
    rates = core.labels[list(schema.labels)].mean(axis=0)
    rows.append(HeldOutTaskRow("training rates", "prior", None, schema_metric(schema, truth, truth[[schema.unit_column]].assign(**rates))))
    return rows


def task_demo_lines(result: TaskDemoResult) -> list[str]:
    """The fit's table, each step's time, the files, then the held-out table and the stack's gain over the best base model."""
    from stackkit.render import gain_text, unit_fit_lines

    lines = [*unit_fit_lines(result.fit)]
    lines += [f"{name:>22}: {seconds:7.1f} s" for name, seconds in result.timings.items()]
    lines.append(f"{'total':>22}: {sum(result.timings.values()):7.1f} s")
    lines.append(f"submission: {result.submission} ({result.submission_rows} rows)")
    width = max(len(r.name) for r in result.rows)
    lines += ["", f"{'source':<{width}}  {'kind':<7}  {'CV (OOF)':>9}  {'held-out':>9}", "-" * (width + 31)]
    lines += [f"{r.name:<{width}}  {r.kind:<7}  {'' if r.cv is None else f'{r.cv:.5f}':>9}  {r.held_out.overall:>9.5f}" for r in result.rows]
    stack = result.rows[0]
    bases = [r for r in result.rows if r.kind == "base"]
    best = min(bases, key=lambda r: r.cv)
    lines.append(f"held-out: {result.units} test units whose labels no step saw ({result.labels_file}); task {result.task}'s metric, "
                 "lower is better")
    lines.append(f"the stack vs the best base model ({best.name}, best on CV): {gain_text(stack.held_out.overall, best.held_out.overall)} "
                 f"on the held-out labels ({stack.held_out.overall:.5f} against {best.held_out.overall:.5f}), "
                 f"{gain_text(stack.cv, best.cv)} on CV ({stack.cv:.5f} against {best.cv:.5f})")
    return lines
