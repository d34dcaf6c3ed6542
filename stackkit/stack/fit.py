"""`stack fit [--tune]`: stackers on the contract's folds, the blend, stack/blend.json and the report.

Order of work (each artifact written atomically):

1. every stacker is fitted over data/folds.parquet, with its default parameters or (``--tune``)
   by an Optuna study ``<study>-<stacker>`` (trial 0 = the defaults, per-fold pruning, one time
   budget for the whole call) that never sees one outer fold (``seed % K``): trials are
   cross-validated on the other folds, the selected trial (``tune.SELECTION_RULE``) is refitted
   over all folds and bagged with the defaults as one recipe (its OOF, test predictions and fold
   models are saved) and its loss on the outer fold is the honest score, shown beside the
   defaults' (``tune.tune_stacker``);
2. the blend sources: every stacker's OOF and, unless disabled, every base model's
   preds/<m>/oof.parquet (a fold that disagrees with data/folds.parquet is refused: it would leak);
3. the blend is *chosen* on honest numbers (``blend.choose_blend``): every recipe (non-negative
   per-label weights by a convex solver, with or without temperature + bias, any-consistency and a
   fitted clip; with ``--tune`` also an Optuna search over the weights) is refitted on the other
   folds and scored on fold k, and every single source is a candidate with its OOF score. The
   lowest blend that is below the best single source on *every* fold and at least
   ``blend.MIN_BLEND_GAIN`` below it overall is refitted on all rows; when no blend is, the best
   single source is kept (bench/bench_defaults.py: the plain lowest-CV rule picked blends with the
   base models that were worse on held-out labels). Base models enter only through fitted weights;
4. stack/blend.json (the chosen blend, every candidate's CV score, the reason, how the test set is
   met; with ``--tune`` the submission's nested score, ``stack.nested``), then stack/report.html.

Test predictions (contract v3): where base models have per-fold test files, every stacker predicts
each base fold model's test feature set (features/test_fold<k>.parquet) and writes the per-set
means (stack/<stacker>/test_fold<k>.parquet) beside their average; `submit` applies the blend to
each set and averages, so neither level meets test rows smoother than the OOF rows it was fitted on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stackkit.contract import LABELS, SEED_RANGE, Workdir, file_sha256, folds_hash
from stackkit.contract.io import check_set_target, replace_dir
from stackkit.contract.records import BlendRecord, write_blend_record
from stackkit.errors import StackkitError
from stackkit.metric import Score, weighted_log_loss
from stackkit.stack.inputs import label_array

if TYPE_CHECKING:
    from stackkit.stack.report import ScoreRow
    from stackkit.stack.tune import StudyInfo

DEFAULT_STUDY = "stackkit"
DEVICES = ("auto", "cpu", "cuda")
CV_METHOD = ("per fold k: each candidate blend refitted on the other folds' OOF rows (weights, temperature/bias and clip), "
             "scored on fold k, pooled over folds; single sources scored on their OOF files")
OPTUNA_BLEND = "Optuna search over weights, temperature and clip"
# --tune without --timeout: 20 trials of a GBDT stacker at ~50k images take longer than a user waits
# for one command; the budget stops the studies in time (each keeps its best complete trial).
DEFAULT_TUNE_BUDGET_S = 420.0


@dataclass(frozen=True)
class BlendRun:
    """How `stack fit` ran, as blend.json records it."""

    tune: bool
    seed: int
    storage: str | None
    per_label: bool
    device: str
    budget: float | None


@dataclass
class Sources:
    """The blend's inputs, row-aligned with data/folds.parquet."""

    names: list[str]
    kinds: list[str]  # "stacker" or "base"
    oof_paths: list[Path]
    test_paths: list[Path]
    test_fold_paths: list[list[Path]]  # v3: per base fold model's test set, [] for a source with only test.parquet
    preds: np.ndarray  # (S, n, 6) OOF probabilities
    y: np.ndarray  # (n, 6)
    folds: np.ndarray  # (n,)
    image_ids: np.ndarray  # (n,) data/folds.parquet order


@dataclass(frozen=True)
class StackFitOptions:
    """`stack fit`'s options (the CLI's flags); ``stackers=None`` is the registry's default set."""

    stackers: list[str] | None = None
    tune: bool = False
    trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    blend_base_models: bool = False
    per_label_weights: bool = True
    any_consistency: bool = True
    seed: int = 0
    progress: bool = True
    heartbeat_interval: int | None = None
    device: str = "auto"
    use_embeddings: bool = True


@dataclass(frozen=True)
class TunedScores:
    """A tuned stacker's numbers: its refitted recipe on the outer fold (honest) beside the defaults
    there, and the selected trial's inner CV (optimistic when it was chosen on it, not when no trial
    was clearly better and the defaults stayed)."""

    name: str
    honest: float
    outer_fold: int
    defaults_outer: float
    selected_trial: int | None
    selected: float
    trials_run: int
    trials_total: int
    selected_is_defaults: bool = False


@dataclass(frozen=True)
class StackFitResult:
    """What one `stack fit` did (stackkit/cli.py renders it): the blend kept and its scores beside
    every source's, the table's rows, tuning, and the files written."""

    chosen: str
    cv: Score
    in_sample: Score
    best_source: str  # the single source (stacker or base model) lowest on CV
    best_source_cv: float
    sources: tuple[str, ...]
    source_scores: dict[str, Score]  # each source's OOF score
    base_oof_scores: dict[str, Score]  # every base model's OOF score, blended or not
    weights: tuple[tuple[str, float], ...]  # (source, mean weight over labels), largest first
    score_rows: tuple[ScoreRow, ...]  # the terminal table: base models, stackers, the blend in-sample and on CV
    tuned: tuple[TunedScores, ...]
    nested: dict | None  # --tune: the submission's pipeline, tuned and defaults, on the outer fold (stack.nested)
    studies: dict[str, StudyInfo]  # per stacker and "blend": the Optuna study (with --tune)
    storage: str | None  # the Optuna storage, password hidden; None without --tune
    budget_s: float | None
    test_sets: int  # how submit meets the test set: 1, or one per base fold model
    models_without_test_folds: tuple[str, ...]
    stackers_kept: tuple[str, ...]  # stack/<name>/ of an earlier run carried over, not in this blend
    blend: Path
    report: Path
    stack_dirs: dict[str, Path]
    seconds: float


def run_stack_fit(workdir: Workdir, options: StackFitOptions | None = None, **fields) -> StackFitResult:
    """Fit the stackers, choose the blend, write stack/ + blend.json + report.html.

    The keywords are :class:`StackFitOptions`' fields: pass them, or ``options`` (then ``fields`` override it)."""
    from stackkit.contract.validate import load_core
    from stackkit.stack.storage import make_storage

    started = time.perf_counter()
    wd = Workdir.of(workdir)
    o = StackFitOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    stackers, tune, trials, timeout, storage, seed, progress = o.stackers, o.tune, o.trials, o.timeout, o.storage, o.seed, o.progress
    per_label_weights, device = o.per_label_weights, o.device
    names = _check_options(stackers, trials=trials, timeout=timeout, seed=seed, device=device)
    core = load_core(wd)
    base_models = wd.model_names() if o.blend_base_models else []
    if not names and not base_models:
        raise StackkitError("nothing to blend: no stackers given and no base models in the blend; pass --stackers lgbm,mlp (or --base-in-blend with models under preds/)")
    resolved_device = resolve_device(device, names)
    storage_obj = make_storage(storage, wd, heartbeat_interval=o.heartbeat_interval) if tune else None
    budget = timeout if timeout is not None else (DEFAULT_TUNE_BUDGET_S if tune else None)
    deadline = None if budget is None else time.monotonic() + float(budget)
    search = _Search(tune, trials, deadline, storage_obj, o.study_name or DEFAULT_STUDY, seed, progress)
    kept = kept_stackers(wd, names)
    # stack/ is one set: every stacker's folder, blend.json and report.html are built in a sibling folder
    # and switched in together, so an interrupted fit (Ctrl-C, a crash) leaves the previous stack/ as it
    # was. Stackers of an earlier run that this one does not fit are carried over unchanged (``kept``).
    with replace_dir(wd.stack_root, keep=True) as staged:
        swd = wd.staged_stack(staged)
        fitted, studies = {}, {}
        if names:
            fitted, studies = _fit_stackers(swd, core, names, search, device=resolved_device, use_embeddings=o.use_embeddings)
        sources = _collect_sources(swd, core, fitted, base_models)
        choice, blend_info = _choose_blend(sources, search, per_label=per_label_weights, any_consistency=o.any_consistency)
        if blend_info is not None:
            studies["blend"] = blend_info
        blend = _blend_record(swd, sources, choice, fitted, studies,
                              BlendRun(tune, seed, storage, per_label_weights, resolved_device, budget))
        if tune:
            from stackkit.stack.nested import nested_submission

            nested = nested_submission(sources, fitted, per_label=per_label_weights, any_consistency=o.any_consistency)
            blend = replace(blend, optuna={**blend.optuna, "nested": nested})
        blend = replace(blend, base_oof_scores=base_oof_scores(wd, core, sources), stackers_kept=kept)
        write_blend_record(blend, swd.blend)
        record = blend.to_json()  # the report and the summary read the record as written
        from stackkit.stack.report import stack_fit_report

        rows = stack_fit_report(swd, record, sources, choice, fitted, studies)
    return _result(wd, record, rows, sources, choice, fitted, studies, time.perf_counter() - started)


def kept_stackers(wd: Workdir, names: list[str]) -> list[str]:
    """stack/<stacker>/ folders of an earlier run that this run does not fit: carried over unchanged
    into the new stack/ set (not in its blend), so a partial rerun loses no fitted stacker."""
    check_set_target(wd.stack_root)  # a file in stack/'s place: refused before any fitting
    if not wd.stack_root.is_dir():
        return []
    return sorted(p.name for p in wd.stack_root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in names)


def _check_options(stackers, *, trials, timeout, seed, device) -> list[str]:
    """Stacker names (order kept, duplicates dropped), every option checked before any work."""
    from stackkit.stack.stackers import DEFAULT_STACKERS, get_stacker

    names = list(dict.fromkeys(DEFAULT_STACKERS if stackers is None else stackers))
    for name in names:
        get_stacker(name)  # one-line error for an unknown name
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise StackkitError(f"--trials: expected a positive integer, got {trials!r}")
    if timeout is not None and not timeout > 0:
        raise StackkitError(f"--timeout: expected a positive number of seconds, got {timeout!r}")
    check_seed(seed)
    if device not in DEVICES:
        raise StackkitError(f"--device: expected one of {', '.join(DEVICES)}, got {device!r}")
    return names


def check_seed(seed) -> int:
    """``--seed``: an integer in SEED_RANGE, else one line."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise StackkitError(f"--seed: expected an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {seed!r}")
    return int(seed)


def _cuda_visible() -> bool:
    import os

    # no NVIDIA driver: no need to import torch to know there is no GPU
    if not os.path.exists("/proc/driver/nvidia") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(requested: str, stacker_names) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``; ``cuda`` without one is a one-line error."""
    if requested == "cpu":
        return "cpu"
    visible = _cuda_visible()
    if requested == "cuda" and not visible:
        raise StackkitError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu or auto")
    return "cuda" if visible else "cpu"


def device_overrides(name: str, device: str) -> dict:
    """Parameters that put stacker ``name`` on ``device`` (LightGBM stays on the CPU: its GPU build needs OpenCL)."""
    from stackkit.stack.stackers import get_stacker

    if device == "cpu" or "device" not in get_stacker(name).default_params():
        return {}
    if name == "xgb":
        import xgboost

        if not xgboost.build_info().get("USE_CUDA"):
            return {}  # xgboost-cpu: the CPU path; pip install 'stackkit[gpu]' for the CUDA build
    return {"device": device}


@dataclass(frozen=True)
class _Search:
    """How one `stack fit` call fits: plainly or tuned (trials, the shared deadline, the Optuna storage
    and study-name prefix), with its seed and progress bars; shared by the stackers and the blend."""

    tune: bool
    trials: int | None
    deadline: float | None
    storage: object
    prefix: str
    seed: int
    progress: bool


def _fit_stackers(wd, core, names, search: _Search, *, device, use_embeddings=True):
    """{name: (StackerResult, TunedStacker | None)} saved to stack/<name>/, and {name: StudyInfo}."""
    from stackkit.stack.crossfit import fit_stacker, load_stack_inputs, save_stacker_result
    from stackkit.stack.folds import start_fold_workers

    tune, trials, deadline, seed, progress = search.tune, search.trials, search.deadline, search.seed, search.progress

    if not tune:  # a tuning trial fits its folds one after the other
        start_fold_workers({name: device_overrides(name, device) for name in names})
    inputs = load_stack_inputs(wd, use_embeddings=use_embeddings, core=core)  # data/ read and checked once per call
    fitted, studies = {}, {}
    for position, name in enumerate(names):
        overrides = device_overrides(name, device)
        tuned = None
        if tune:
            from stackkit.stack.tune import digest, tune_stacker

            # everything a trial's score depends on: a continued study never mixes in other data
            inputs_key = digest(file_sha256(wd.features_manifest), inputs.folds_hash, inputs.train.Y.astype(np.int8), int(seed), name, overrides,
                                [(m, file_sha256(wd.model_json(m))) for m in inputs.embedding_models])
            # one budget for the whole call: each remaining study gets an equal share of what is left (the blend costs little)
            share = None if deadline is None else max(1.0, (deadline - time.monotonic()) / (len(names) - position))
            tuned = tune_stacker(name, inputs, storage=search.storage, study_name=f"{search.prefix}-{name}", trials=trials, timeout=share,
                                 seed=seed, inputs_key=inputs_key, overrides=overrides, progress=progress)
            result = tuned.result
            studies[name] = tuned.info
        else:
            result = fit_stacker(name, overrides, inputs, seed=seed, progress=progress)
        save_stacker_result(wd, result, core)
        fitted[name] = (result, tuned)
    return fitted, studies


def base_oof_scores(wd, core, sources: Sources) -> dict:
    """Every base model's OOF score (blended or not): what the stack is compared with."""
    from stackkit.contract.validate import read_oof

    _metadata, _labels, folds = core
    scores = {}
    for model in wd.model_names():
        name = f"preds/{model}"
        if name in sources.names:
            preds = sources.preds[sources.names.index(name)]
        else:
            oof = read_oof(wd.oof(model), folds, wd)  # LeakageError when its folds disagree with data/folds.parquet
            preds = label_array(oof, sources.image_ids)
        scores[model] = weighted_log_loss(sources.y, preds).as_dict()
    return scores


def _collect_sources(wd, core, fitted: dict, base_models: list[str]) -> Sources:
    """Stackers' OOF from memory (validated when saved), base models' through the validating readers."""
    from stackkit.contract.validate import read_oof, read_test, read_test_folds

    metadata, labels, folds = core
    image_ids = folds["image_id"].to_numpy(dtype=object)
    names, kinds, oof_paths, test_paths, fold_paths, arrays = [], [], [], [], [], []
    n_folds = int(folds["fold"].max()) + 1
    for name, (result, _tuned) in fitted.items():
        names.append(f"stack/{name}")
        kinds.append("stacker")
        files = wd.stacker_folder(name)
        oof_paths.append(files.oof)
        test_paths.append(files.test)
        fold_paths.append([files.test_fold(k) for k in range(len(result.test_folds))])
        arrays.append(label_array(result.oof, image_ids))
    for model in base_models:
        oof = read_oof(wd.oof(model), folds, wd)  # LeakageError when its folds disagree with data/folds.parquet
        test = read_test(wd.test(model), metadata, wd)  # submit needs it: refuse a bad one now
        per_fold = read_test_folds(wd, model, metadata, n_folds, test=test)
        names.append(f"preds/{model}")
        kinds.append("base")
        oof_paths.append(wd.oof(model))
        test_paths.append(wd.test(model))
        fold_paths.append(wd.test_fold_files(model) if per_fold is not None else [])
        arrays.append(label_array(oof, image_ids))
    y = label_array(labels, image_ids)
    return Sources(names, kinds, oof_paths, test_paths, fold_paths, np.stack(arrays), y, folds["fold"].to_numpy(), image_ids)


def _choose_blend(sources: Sources, search: _Search, *, per_label, any_consistency):
    """(BlendChoice, StudyInfo of the Optuna blend study or None)."""
    from tqdm.auto import tqdm

    from stackkit.stack.blend import choose_blend

    tune, trials, deadline, seed, progress = search.tune, search.trials, search.deadline, search.seed, search.progress
    extra, blend_info = {}, None
    if tune and len(sources.names) > 1:
        from stackkit.stack.blend_search import search_blend

        timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
        kwargs = dict(per_label=per_label, any_consistency=any_consistency, seed=seed)
        tuned_params, blend_info = search_blend(sources.preds, sources.y, sources.names, trials=trials, timeout=timeout, storage=search.storage,
                                                study_name=f"{search.prefix}-blend", progress=progress, **kwargs)
        cv_trials = blend_info.trials_run if blend_info else 0
        extra[OPTUNA_BLEND] = (lambda p, yy: search_blend(p, yy, sources.names, trials=cv_trials, **kwargs)[0],
                               lambda p, yy: tuned_params)
    n_folds = len(np.unique(sources.folds))
    with tqdm(total=2 * n_folds if len(sources.names) > 1 else 0, desc="blend CV", unit="fit", disable=not progress, leave=False) as bar:
        choice = choose_blend(sources.preds, sources.y, sources.folds, sources.names, per_label=per_label,
                              allow_any_consistency=any_consistency, extra_fits=extra, on_fold=lambda: bar.update(1))
    return choice, blend_info


def _source_record(wd, sources: Sources, s: int, fitted: dict) -> dict:
    entry = {"name": sources.names[s], "kind": sources.kinds[s], "oof": _relative(sources.oof_paths[s], wd),
             "test": _relative(sources.test_paths[s], wd), "test_sha256": file_sha256(sources.test_paths[s]),
             "test_folds": [{"path": _relative(p, wd), "sha256": file_sha256(p)} for p in sources.test_fold_paths[s]],
             "oof_score": weighted_log_loss(sources.y, sources.preds[s]).as_dict()}
    tuned = fitted.get(sources.names[s].removeprefix("stack/"), (None, None))[1] if sources.kinds[s] == "stacker" else None
    if tuned is not None:
        entry["tuning"] = tuned.as_dict()  # tuning.honest: the outer fold's loss; tuning.selected: inner CV (optimistic)
    return entry


def weight_summary(weights: np.ndarray, names: list[str]) -> list[dict]:
    """Per source: mean weight over labels and the labels it carries, largest first (for the table and the page)."""
    rows = []
    for s, name in enumerate(names):
        carried = [label for l, label in enumerate(LABELS) if weights[s, l] >= 0.005]
        rows.append({"name": name, "mean_weight": float(weights[s].mean()), "labels": carried})
    return sorted(rows, key=lambda r: -r["mean_weight"])


def _blend_record(wd, sources: Sources, choice, fitted: dict, studies: dict, run: BlendRun) -> BlendRecord:
    from stackkit.stack.storage import describe_storage

    params = choice.params
    in_sample, cv = choice.in_sample, choice.cv
    return BlendRecord(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        formula=params.formula,
        sources=[_source_record(wd, sources, s, fitted) for s in range(len(sources.names))],
        per_label_weights=bool(run.per_label),
        params=params.to_json(sources.names),
        scores={"in_sample": in_sample.as_dict(), "cv": {**cv.as_dict(), "per_fold": choice.chosen.per_fold}},
        choice={"chosen": choice.chosen.name, "kind": choice.chosen.kind, "reason": choice.reason,
                "candidates": [c.as_dict() for c in choice.candidates],
                "weights_summary": weight_summary(params.weights, sources.names)},
        cv_method=CV_METHOD,
        **test_sets_record(wd, sources),
        tuned=bool(run.tune),
        device=run.device,
        seed=int(run.seed),
        folds_hash=folds_hash(sources.image_ids, sources.folds),
        optuna=None if not run.tune else {"storage": describe_storage(run.storage, wd), "budget_s": run.budget,
                                          "studies": {n: info.as_dict() for n, info in studies.items()}},
    )


def test_sets_record(wd: Workdir, sources: Sources) -> dict:
    """How `submit` meets the test set (v3): with per-fold test files, the blend is applied to each base
    fold model's set (a source without them enters every set with its averaged test.parquet) and the
    results averaged, so it sees single-model predictions as in its OOF fit; else once, to the averages.
    ``models_without_test_folds``: every model under preds/ with only an averaged test.parquet (its
    test features, and the stackers' predictions of them, are built from that average)."""
    n_sets = max((len(p) for p in sources.test_fold_paths), default=0)
    return {"test_sets": max(n_sets, 1),
            "test_sets_method": ("blend applied per base fold model's test set, then averaged" if n_sets > 1
                                 else "blend applied to the averaged test predictions"),
            "models_without_test_folds": [m for m in wd.model_names() if not wd.test_fold_files(m)]}


def _result(wd, record, rows, sources: Sources, choice, fitted, studies, seconds) -> StackFitResult:
    best = min((c for c in choice.candidates if c.kind == "source"), key=lambda c: c.cv.overall)
    tuned = tuple(TunedScores(name, t.honest.overall, t.outer_fold, t.defaults_outer.overall, t.result.tuning["selected_trial"], t.selected_score.overall,
                              t.info.trials_run, t.info.trials_total, bool(t.result.tuning["selected_is_defaults"]))
                  for name, (_result, t) in fitted.items() if t is not None)
    optuna = record["optuna"] or {}
    return StackFitResult(
        chosen=choice.chosen.name, cv=choice.cv, in_sample=choice.in_sample, best_source=best.name, best_source_cv=best.cv.overall,
        sources=tuple(sources.names),
        source_scores={n: weighted_log_loss(sources.y, sources.preds[s]) for s, n in enumerate(sources.names)},
        base_oof_scores={m: Score(**score) for m, score in record["base_oof_scores"].items()},
        weights=tuple((w["name"], w["mean_weight"]) for w in record["choice"]["weights_summary"]),
        score_rows=tuple(rows), tuned=tuned, nested=optuna.get("nested"), studies=dict(studies), storage=optuna.get("storage"),
        budget_s=optuna.get("budget_s"),
        test_sets=record["test_sets"], models_without_test_folds=tuple(record["models_without_test_folds"]),
        stackers_kept=tuple(record["stackers_kept"]), blend=wd.blend, report=wd.report_html,
        stack_dirs={n: wd.stack_dir(n) for n in fitted}, seconds=seconds,
    )


def _relative(path: Path, wd: Workdir) -> str:
    return wd.relative(wd.published(path))
