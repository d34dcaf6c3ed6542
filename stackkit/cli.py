#!/usr/bin/env python
"""stackkit command line: one command per pipeline step.

The CLI only turns options into one library call, the call's typed result into lines
(stackkit/render.py) and library errors into a one-line message with exit code 2 (datasette
style); all work lives in the packages. Heavy libraries
(torch, pydicom, lightgbm) are imported inside the commands that need them.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from stackkit import render
from stackkit.contract import DEFAULT_WORKDIR, SEED_RANGE, WORKDIR_ENV, Workdir

EXIT_BAD_INPUT = 2
# Every --seed: the range NumPy, scikit-learn, LightGBM and torch all accept.
SEED = click.IntRange(*SEED_RANGE)


class StackkitGroup(click.Group):
    """Runs subcommands with known errors turned into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except click.Abort:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped below, re-raised otherwise
            from stackkit.errors import StackkitError, raised_by_interrupt

            debug = (ctx.find_root().obj or {}).get("debug")
            if debug:
                raise
            if raised_by_interrupt(exc):
                # Ctrl-C while a C extension module initializes surfaces as ImportError("initialization
                # failed") with the KeyboardInterrupt as its context: still the user's Ctrl-C
                raise click.Abort() from exc
            if isinstance(exc, StackkitError):
                raise StackkitCliError(str(exc)) from exc
            if isinstance(exc, OSError):
                # disk full, quota, read-only, permissions, a path that vanished: the user's to fix, not a bug.
                # The atomic writers name the destination (ArtifactWriteError); this catches the rest.
                from stackkit.contract.io import os_error_reason

                where = exc.filename or "(a file stackkit was reading or writing)"
                raise StackkitCliError(f"{where}: {os_error_reason(exc, 'read or write')}") from exc
            raise


class StackkitCliError(click.ClickException):
    exit_code = EXIT_BAD_INPUT

    def show(self, file=None):
        click.echo(f"Error: {self.format_message()}", err=True)


def workdir_option(func):
    """``--workdir`` shared by every command."""

    @click.option(
        "--workdir",
        type=click.Path(file_okay=False),
        default=None,
        help=f"Work directory (default: ${WORKDIR_ENV}, else {DEFAULT_WORKDIR}/).",
    )
    @functools.wraps(func)
    def wrapper(*args, workdir=None, **kwargs):
        return func(*args, wd=Workdir.resolve(workdir), **kwargs)

    return wrapper


def progress_option(func):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(func)


def _int_list(value: str | None) -> list[int] | None:
    if value is None or value == "":
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 0,1,2, got {value!r}")


def _str_list(value: str | None) -> list[str] | None:
    if value is None or value == "":
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


@click.group(cls=StackkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, debug):
    """stackkit: leakage-free stacking of CNN predictions over CT studies.

    \b
    Pipeline (RSNA 2019 intracranial hemorrhage layout):
      data synth      synthetic DICOM dataset in the RSNA layout
      data prepare    DICOM folders + label CSV -> metadata, labels, folds
      base train      CNN base models -> out-of-fold and test predictions
      base import     predictions made elsewhere -> preds/NAME/
      stack features  study-aware features from every model's predictions
      stack fit       level-2 stackers + Optuna-tuned blend
      submit          Kaggle submission CSV
      demo            everything above on synthetic data
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# --- data ------------------------------------------------------------------------------------


@cli.group(cls=StackkitGroup)
def data():
    """Create or ingest DICOM data: `synth`, `prepare`."""


@data.command("synth")
@workdir_option
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder to write the dataset into (default: WORKDIR/dicom).")
@click.option("--patients", default=40, show_default=True, type=click.IntRange(2, None), help="Number of patients.")
@click.option("--size", default=64, show_default=True, type=click.IntRange(16, 1024), help="Image size in pixels.")
@click.option("--slices", default=None, help="Range of slices per study (per series): MIN,MAX [default: 16,32 for rsna2019; the task's own otherwise].")
@click.option("--test-fraction", default=0.25, show_default=True, type=click.FloatRange(0.0, 0.9), help="Share of patients in stage_2_test.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--task", default="rsna2019", show_default=True, type=click.Choice(["rsna2019", "rsna2022-cspine", "rsna2023-abdominal"]),
              help="The competition whose layout and labels are written.")
@progress_option
def data_synth(wd, out_dir, patients, size, slices, test_fraction, seed, task, quiet):
    """Write a synthetic dataset in a competition's layout (default RSNA 2019).

    rsna2019: OUT/stage_2_train/*.dcm, OUT/stage_2_test/*.dcm and OUT/stage_2_train.csv (long
    ID,Label format): real CT DICOM files with head-like anatomy and 3D hemorrhages of the five
    subtypes (a bleed's faint edge slices labeled from their neighbours). The test split's labels
    are held back in OUT/stage_2_test_labels.csv, which no step reads (the demo scores on it).
    rsna2022-cspine and rsna2023-abdominal: the layouts of docs/synthetic_tasks.md (read by
    `data prepare --task`; `demo --task` runs their pipeline).
    """
    bounds = None if slices is None else _int_list(slices)
    if bounds is not None and (not bounds or len(bounds) != 2 or bounds[0] < 1 or bounds[0] > bounds[1]):
        raise click.BadParameter(f"expected MIN,MAX with 1 <= MIN <= MAX, got {slices!r}", param_hint="--slices")
    out = out_dir or wd.root / "dicom"
    if task != "rsna2019":
        from stackkit.data.synth_tasks import synthesize_task

        summary = synthesize_task(task, out, patients=patients, size=size, slices=None if bounds is None else tuple(bounds),
                                  test_fraction=test_fraction, seed=seed, progress=not quiet)
        _echo(["data synth: " + ", ".join(f"{key}={value}" for key, value in summary.items())])
        return
    from stackkit.data.synth import synthesize

    result = synthesize(out, patients=patients, size=size, slices=(16, 32) if bounds is None else (bounds[0], bounds[1]),
                        test_fraction=test_fraction, seed=seed, progress=not quiet)
    _echo(render.key_values("data synth", result))


@data.command("prepare")
@workdir_option
@click.option("--dicom-dir", default=None, type=click.Path(), help="Folder of training DICOM files (stage_2_train).")
@click.option("--test-dicom-dir", default=None, type=click.Path(), help="Folder of test DICOM files (stage_2_test).")
@click.option("--labels", "labels_csv", default=None, type=click.Path(), help="Label CSV: RSNA long ID,Label or wide image_id + six labels.")
@click.option("--task", default=None, help="rsna2022-cspine or rsna2023-abdominal: read the competition's layout under --root "
                                          "instead of --dicom-dir, --test-dicom-dir and --labels (RSNA 2019).")
@click.option("--root", default=None, type=click.Path(), help="With --task: the dataset's folder (train.csv, train_images/, ...).")
@click.option("--folds", "n_folds", default=5, show_default=True, type=click.IntRange(2, 100), help="Number of patient-grouped folds.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the fold assignment.")
@click.option("--strict", is_flag=True, help="Fail on the first unreadable or refused DICOM instead of skipping it.")
@click.option("--image-id", "image_id", default="sop", show_default=True, type=click.Choice(["sop", "filename"]),
              help="Where image ids come from: sop = the file's SOPInstanceUID, filename = its name without .dcm "
                   "(RSNA names files by image id). The label CSV is matched by this id.")
@click.option("--modality", "modalities", default="CT", show_default=True,
              help="Modalities to read, comma-separated (e.g. CT,MR); files of other modalities are skipped with a reason.")
@click.option("--workers", default=None, type=click.IntRange(1, None), help="Header-reading processes (default: all cores).")
@progress_option
def data_prepare(wd, dicom_dir, test_dicom_dir, labels_csv, task, root, n_folds, seed, strict, image_id, modalities, workers,
                 quiet):
    """Scan DICOM headers and write data/metadata, data/labels and data/folds (one verified set).

    \b
    Every file is one single-frame, single-channel slice of an allowed --modality; compressed
    files (JPEG 2000, JPEG-LS, RLE, JPEG) are decoded once here, so a file that cannot be
    decoded is skipped now, never read as a blank image later. Skipped files are listed on
    stderr whether the run succeeds or fails.
    --task NAME --root DIR: a competition's layout -> a task work directory (docs/synthetic_tasks.md).
    """
    import warnings

    from stackkit.data.prepare import SkippedDicomWarning
    from stackkit.data.prepare_task import prepare_any

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedDicomWarning)
        try:
            result = prepare_any(wd, task=task, root=root, dicom_dir=dicom_dir, test_dicom_dir=test_dicom_dir, labels_csv=labels_csv,
                                 n_folds=n_folds, seed=seed, strict=strict, workers=workers, progress=not quiet,
                                 modalities=modalities, image_id=image_id)
        finally:  # the skipped files are often why a run fails: show them either way
            _show_warnings(caught, SkippedDicomWarning)
    _echo(render.key_values("data prepare", result))


def _show_warnings(caught, plain_category) -> None:
    import warnings

    for warning in caught:
        if issubclass(warning.category, plain_category):
            # one plain line per skipped file, not Python's two-line warning format
            click.echo(f"warning: {warning.message}", err=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


# --- base ------------------------------------------------------------------------------------


@cli.group(cls=StackkitGroup)
def base():
    """Level-1 models: `train` a CNN or `import` predictions made elsewhere."""


@base.command("train")
@workdir_option
@click.option("--name", required=True, help="Model name: predictions go to preds/NAME/.")
@click.option("--arch", default="resnet_tiny", show_default=True,
              help="resnet_tiny, resnet_small, resnet18, or timm:NAME for any timm model (e.g. timm:efficientnet_b0).")
@click.option("--context", default=0, show_default=True, type=click.IntRange(0, 2), help="Neighbor slices as channels: 0 none, 1 st-1/st/st+1, 2 st-2/st/st+2.")
@click.option("--epochs", default=9, show_default=True, type=click.IntRange(1, None))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, None))
@click.option("--lr", default=5e-3, show_default=True, type=click.FloatRange(0, None, min_open=True))
@click.option("--img-size", default=64, show_default=True, type=click.IntRange(16, 1024))
@click.option("--folds", "folds", default=None, help="Folds to train, e.g. 0,1,2 (default: all).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--resume", is_flag=True, help="Continue at the first unfinished fold.")
@click.option("--tta", is_flag=True, help="Average predictions with horizontally flipped images.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0, None), help="DataLoader worker processes. On CPU, training uses one thread per 128x128 pixels of input; set OMP_NUM_THREADS to override.")
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              help="Also write each fold model's pooled features before the head (preds/NAME/embeddings/, float16).")
@click.option("--pretrained", is_flag=True, help="timm:NAME only: start from timm's published weights (needs their hub; offline use --weights).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="timm:NAME only: start from a local .safetensors file of the timm model's state_dict.")
@click.option("--pseudo-labels", "pseudo_labels", multiple=True, type=click.Path(dir_okay=False),
              help="Soft labels for unlabeled studies' images, one file per fold model (fold 0 first), file k made without fold k's labels.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA (bf16, else fp16 with loss scaling); the CPU trains in float32.")
@progress_option
def base_train(wd, name, arch, context, epochs, batch_size, lr, img_size, folds, device, seed, resume, tta, workers, embeddings,
               pretrained, weights, pseudo_labels, amp, quiet):
    """Train a CNN over the folds of data/folds.parquet and write preds/NAME/.

    One model per fold, trained on the other folds: it predicts its own fold (out-of-fold)
    and the test set (test_fold<k>.parquet per fold model, test.parquet their mean). Runs
    under torchrun for several GPUs.
    On a task work directory: the task's slice-level columns (docs/synthetic_tasks.md).
    """
    from base_models.train import train_base

    result = train_base(wd, name=name, arch=arch, context=context, epochs=epochs, batch_size=batch_size, lr=lr,
                        img_size=img_size, folds=_int_list(folds), device=device, seed=seed, resume=resume,
                        tta=tta, workers=workers, progress=not quiet, embeddings=embeddings, amp=amp,
                        pretrained=pretrained, weights=weights, pseudo_labels=list(pseudo_labels))
    _echo(render.train_lines(result, folds=quiet))
    if result.unit_metric is not None:
        click.echo(f"{result.name}: task metric {result.unit_metric:.4f} of the max over each unit's slices (rates {result.unit_prior:.4f})")


@base.command("import")
@workdir_option
@click.argument("name")
@click.option("--oof", "oof_path", required=True, type=click.Path(), help="Out-of-fold predictions (Parquet or CSV, wide or RSNA long).")
@click.option("--test", "test_path", default=None, type=click.Path(),
              help="Test predictions (same formats); may be left out with --test-fold (then the mean of those).")
@click.option("--test-fold", "test_folds", multiple=True, type=click.Path(),
              help="Test predictions of one fold model (same formats); repeat once per fold of data/folds.parquet, fold 0 first.")
@click.option("--logits", is_flag=True, help="The files hold logits: apply a sigmoid (refused when every value is in [0, 1]).")
@click.option("--folds-from-data", is_flag=True,
              help="Accept an --oof file without a `fold` column (the RSNA long format has none), taking each image's fold "
                   "from data/folds.parquet: only for predictions made on those folds (other folds leak labels into the stackers).")
@click.option("--force", is_flag=True, help="Replace an existing preds/NAME/.")
@click.option("--oof-embeddings", default=None, type=click.Path(dir_okay=False),
              help="NumPy .npy (rows, D) float16/float32: row i embeds the --oof file's row i (by the fold model that did not train on it).")
@click.option("--test-embeddings", multiple=True, type=click.Path(dir_okay=False),
              help="NumPy .npy (test rows, D) aligned with the --test file's rows (without --test: the first --test-fold file's); "
                   "repeat once per fold model (fold 0 first), or give one.")
def base_import(wd, name, oof_path, test_path, test_folds, logits, folds_from_data, force, oof_embeddings, test_embeddings):
    """Register predictions made anywhere else as preds/NAME/.

    The --oof file's `fold` column is checked against data/folds.parquet: a fold that disagrees is
    refused, because stacking on it would leak labels. A file without the column is refused unless
    --folds-from-data says it was made on those folds. Optional per-fold test predictions
    (--test-fold, one per fold model) are stored as preds/NAME/test_fold<k>.parquet, so stackers
    meet test rows made like their OOF rows. Optional embeddings (the CNN's pooled features) are
    validated and stored as float16 under preds/NAME/embeddings/.
    """
    from base_models.importer import import_predictions

    result = import_predictions(wd, name, oof_path=oof_path, test_path=test_path, logits=logits, force=force,
                                oof_embeddings=oof_embeddings, test_embeddings=list(test_embeddings),
                                test_folds=list(test_folds), folds_from_data=folds_from_data)
    _echo(render.import_lines(result))


# --- stack -----------------------------------------------------------------------------------


@cli.group(cls=StackkitGroup)
def stack():
    """Level 2: `features` from all models, `fit` stackers and the blend."""


@stack.command("features")
@workdir_option
@click.option("--lags", default=None, type=click.IntRange(0, 64), help="Neighbor distances 1..L along z [default: 2; per-slice tasks only].")
@click.option("--dicom-meta", is_flag=True, help="Add DICOM metadata columns (slice thickness, spacing, window; per-slice tasks only).")
@click.option("--feature-set", type=click.Choice(["basic", "wide"]), default=None,
              help="'wide' adds per model and label study_min, minus_study_mean (pred - study mean), minus_study_max "
                   "(pred - study max), roll7_mean and roll9_mean, and per label models__<label>__max/min across models "
                   "[default: basic; per-slice tasks only].")
@progress_option
def stack_features(wd, lags, dicom_meta, feature_set, quiet):
    """Build study-aware features from every model under preds/.

    A study- or patient-level task (data/task.json) gets one row per unit: every model's slice
    predictions aggregated along each series and rolled up to the unit (--lags, --dicom-meta and
    --feature-set are refused there).
    """
    schema = _task(wd)
    if schema.unit != "slice":
        from features.task_features import run_unit_features

        result = run_unit_features(wd, schema, lags=lags, dicom_meta=dicom_meta, feature_set=feature_set, progress=not quiet)
        _echo(render.unit_features_lines(result))
        return
    from features.api import run_stack_features

    result = run_stack_features(wd, lags=2 if lags is None else lags, dicom_meta=dicom_meta, progress=not quiet,
                                feature_set=feature_set or "basic")
    _echo(render.features_lines(result))


@stack.command("fit")
@workdir_option
@click.option("--stackers", default=None, help="Comma-separated stackers (default: the registry's default set, see stackkit/stack/stackers).")
@click.option("--tune", is_flag=True, help="Tune stacker parameters (a clearly better trial is bagged with the defaults) and blend weights with Optuna.")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(1, None), help="Optuna trials per study.")
@click.option("--timeout", default=None, type=click.FloatRange(0, None, min_open=True),
              help="One time budget in seconds for the whole --tune (shared by the stackers' studies and the blend; default 420).")
@click.option("--storage", default=None, help="Optuna storage URL (default: a journal file under the work directory; postgresql://... for many machines).")
@click.option("--study-name", default=None, help="Study name prefix; reruns and other workers continue it.")
@click.option("--heartbeat", default=None, type=click.IntRange(1, None),
              help="Seconds between worker heartbeats (database storages; default 60): a killed worker's trial is retried after 2x this.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto: CUDA when a GPU is visible. On CUDA: XGBoost (gpu extra), mlp, seq, seq_emb, transformer; LightGBM stays on the CPU.")
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              help="Stackers that can use the base models' embeddings (seq_emb, transformer; a PCA of them in lgbm/xgb) use every model's that has them.")
@click.option("--base-in-blend/--no-base-in-blend", default=False, show_default=True,
              help="Also blend the base models' predictions with the stackers' (off: on held-out labels they made the blend worse, bench/bench_defaults.py).")
@click.option("--shared-weights", is_flag=True, help="One blend weight per source instead of one per label.")
@click.option("--no-any-consistency", is_flag=True, help="Never enforce any >= max(subtypes) (by default it is used where CV says it helps).")
@click.option("--seed", default=0, show_default=True, type=SEED)
@progress_option
def stack_fit(wd, stackers, tune, trials, timeout, storage, study_name, heartbeat, device, embeddings, base_in_blend, shared_weights,
              no_any_consistency, seed, quiet):
    """Fit stackers on the base models' folds, choose the blend on cross-validated scores, print the report table.

    Candidates: every single source (stacker or base model, scored on its OOF file) and fitted
    blends (per-label non-negative weights, with or without recalibration, any-consistency and
    clip, each refitted per fold). The lowest blend below the best single source on every fold
    and by 0.5% overall is kept, else that source: never worse on CV than the best stacker or
    base model.

    stack/ is replaced as one set: interrupted (Ctrl-C), the previous stack/ stays as it was.
    Stackers of an earlier run that --stackers leaves out are kept unchanged (not in the new blend).

    A study- or patient-level task (data/task.json) fits the unit stackers on one row per unit and
    blends them per target; options without meaning there (--tune, sequence stackers, --base-in-blend,
    --shared-weights, --no-any-consistency, --device cuda) are refused.
    """
    from stackkit.stack.fit import StackFitOptions

    options = StackFitOptions(stackers=_str_list(stackers), tune=tune, trials=trials, timeout=timeout, storage=storage,
                              study_name=study_name, blend_base_models=base_in_blend, per_label_weights=not shared_weights,
                              any_consistency=not no_any_consistency, seed=seed, progress=not quiet, heartbeat_interval=heartbeat,
                              device=device, use_embeddings=embeddings)
    schema = _task(wd)
    if schema.unit != "slice":
        from stackkit.stack.unit_fit import run_unit_fit

        _echo(render.unit_fit_lines(run_unit_fit(wd, schema, options)))
        return
    from stackkit.stack.fit import run_stack_fit

    _echo(render.fit_lines(run_stack_fit(wd, options)))


# --- submit, demo ----------------------------------------------------------------------------


@cli.command("submit")
@workdir_option
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Output CSV (.csv or .csv.gz); default WORKDIR/submission.csv.")
@click.option("--test-dicom-dir", default=None, type=click.Path(), help="Check that every test DICOM file (<image_id>.dcm) of this folder has its rows.")
@click.option("--sample-submission", default=None, type=click.Path(), help="Check that every image of this Kaggle sample submission has its rows.")
@click.option("--allow-incomplete", is_flag=True, help="Write a submission that lacks test images (skipped by data prepare or absent).")
def submit(wd, out, test_dicom_dir, sample_submission, allow_incomplete):
    """Write the blended test predictions as a Kaggle submission (RSNA 2019: ID,Label).

    A submission short of the real test set is refused: checked against --test-dicom-dir or
    --sample-submission when given, else against the test files data prepare skipped. A study- or
    patient-level task (data/task.json) writes its competition's format (RSNA 2022: row_id,fractured;
    RSNA 2023: patient_id + 13 columns), checked against --sample-submission when given.
    """
    if test_dicom_dir and sample_submission:
        raise click.UsageError("pass --test-dicom-dir or --sample-submission, not both")
    schema = _task(wd)
    if schema.unit != "slice":
        from stackkit.unit_submit import write_unit_submission

        result = write_unit_submission(wd, out, schema=schema, test_dicom_dir=test_dicom_dir, sample_submission=sample_submission,
                                       allow_incomplete=allow_incomplete)
        _echo(render.unit_submit_lines(result))
        return
    from stackkit.submit import write_submission

    result = write_submission(wd, out, test_dicom_dir=test_dicom_dir, sample_submission=sample_submission,
                              allow_incomplete=allow_incomplete)
    _echo(render.submit_lines(result))


@cli.command("demo")
@workdir_option
@click.option("--patients", default=40, show_default=True, type=click.IntRange(6, None))
@click.option("--trials", default=8, show_default=True, type=click.IntRange(1, None))
@click.option("--epochs", default=9, show_default=True, type=click.IntRange(1, None), help="Epochs per base CNN.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--fresh/--reuse", default=True, show_default=True, help="Start from an empty work directory.")
@click.option("--task", default=None, help="rsna2022-cspine or rsna2023-abdominal: that competition's pipeline (no --tune: --trials unused).")
@click.option("--pseudo-labels", "pseudo_labels", is_flag=True,
              help="Then train cnn_plain again with pseudo-labels for the test images (fold k's from the CNNs' fold model k) and compare.")
@progress_option
def demo(wd, patients, trials, epochs, seed, fresh, task, pseudo_labels, quiet):
    """The whole pipeline on synthetic data: synth, prepare, two CNNs, features, fit --tune, submit.

    Closes with the submission, every stacker and every base model scored on the test split's
    held-back labels, and what the stack gained over the best base model there and on CV.
    --pseudo-labels adds a round after it: cnn_plain trained again with soft labels for the test
    images, file k made by the two CNNs' fold model k (never trained on fold k's rows), and its
    CV and held-out loss beside cnn_plain's.
    """
    on_step = None if quiet else lambda title: click.echo(f"== demo: {title}")
    if pseudo_labels and task not in (None, "rsna2019"):
        raise StackkitCliError(f"--pseudo-labels: soft labels are RSNA 2019's six per image; task {task} has none")
    if task not in (None, "rsna2019"):
        from stackkit.task_demo import run_task_demo, task_demo_lines

        _echo(task_demo_lines(run_task_demo(wd, task, patients=patients, epochs=epochs, seed=seed, fresh=fresh, progress=not quiet,
                                            on_step=on_step)))
        return
    from stackkit.demo import run_demo

    result = run_demo(wd, patients=patients, trials=trials, epochs=epochs, seed=seed, fresh=fresh, progress=not quiet, on_step=on_step,
                      pseudo_labels=pseudo_labels)
    _echo(render.demo_lines(result))


def _task(wd):
    """The work directory's task (data/task.json; rsna2019 without one), read once per command."""
    from stackkit.contract.records import read_task

    return read_task(wd)


def _echo(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


def main() -> None:
    # usage lines and hints name the command the way the user typed it
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "python -m stackkit" if invoked == "__main__.py" else ("python cli.py" if invoked == "cli.py" else "stackkit")
    cli(prog_name=prog)


if __name__ == "__main__":
    main()
