"""`stack fit [--tune]`: stackers on the contract's folds, the blend, stack/blend.json and the report.

Order of work (each artifact written atomically):

1. every stacker is fitted over data/folds.parquet (default parameters, or tuned by an Optuna
   study ``<study>-<stacker>`` whose objective is the OOF weighted log loss) and saved to
   stack/<stacker>/;
2. the blend sources are read back through the validating readers: stack/<s>/oof.parquet and,
   unless disabled, every preds/<m>/oof.parquet (a fold that disagrees with data/folds.parquet
   is refused: it would leak);
3. the blend: equal weights, or (``--tune``) ``tune.search_blend`` (L-BFGS weights and
   temperature + an Optuna study ``<study>-blend``);
4. the blend is scored in-sample and cross-validated: for each fold k the same procedure is
   refitted on the other folds' OOF rows and scored on fold k (the in-memory Optuna part uses as
   many trials as the in-sample study ran in this call); tuned weights flatter themselves
   in-sample, the CV number is the honest one;
5. with ``--tune``, if the tuned blend's CV score is worse than equal weights (which fit nothing,
   so their in-sample score is honest), blend.json keeps equal weights and records the tuned
   blend and its scores under ``fallback_to_equal_weights``: on small data a fitted blend can
   overfit that badly;
6. stack/blend.json, then stack/report.html.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from stackkit.stack.blend import BlendParams, cross_validated_blend
from stackkit.contract import CONTRACT_VERSION, LABELS, Workdir, file_sha256, folds_hash
from stackkit.errors import StackkitError
from stackkit.contract.io import write_json
from stackkit.metric import weighted_log_loss

DEFAULT_STUDY = "stackkit"
CV_METHOD_TUNED = (
    "per fold k: L-BFGS weights/temperature + grid clip + an in-memory Optuna study with the same number of trials "
    "as the in-sample blend study ran, fitted on the other folds' OOF rows, scored on fold k; pooled over folds"
)
CV_METHOD_EQUAL = "equal weights: nothing is fitted, so the cross-validated score equals the in-sample score"


def run_stack_fit(
    workdir: Workdir,
    *,
    stackers: list[str] | None = None,
    tune: bool = False,
    trials: int = 20,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    blend_base_models: bool = True,
    per_label_weights: bool = True,
    any_consistency: bool = True,
    seed: int = 0,
    progress: bool = True,
    heartbeat_interval: int | None = None,
) -> dict:
    """Fit the stackers, blend them (and the base models), write stack/ + blend.json + report.html.

    Returns a summary: ``table`` (printable), ``lines``, the paths written, scores and studies.
    """
    from stackkit.stack.stackers import DEFAULT_STACKERS, get_stacker
    from stackkit.stack.storage import describe_storage, make_storage
    from stackkit.contract.validate import load_core

    started = time.perf_counter()
    wd = Workdir.of(workdir)
    names = list(dict.fromkeys(DEFAULT_STACKERS if stackers is None else stackers))  # order kept, duplicates dropped
    for name in names:
        get_stacker(name)  # one-line error for an unknown name, before any work
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise StackkitError(f"--trials: expected a positive integer, got {trials!r}")
    if timeout is not None and not timeout > 0:
        raise StackkitError(f"--timeout: expected a positive number of seconds, got {timeout!r}")

    metadata, labels, folds = load_core(wd)
    current_folds_hash = folds_hash(folds["image_id"].to_numpy(dtype=object), folds["fold"].to_numpy())
    base_models = wd.model_names() if blend_base_models else []
    if not names and not base_models:
        raise StackkitError("nothing to blend: no stackers given and no models under preds/; pass --stackers lgbm (or run base train/import)")

    prefix = study_name or DEFAULT_STUDY
    storage_obj = make_storage(storage, wd, heartbeat_interval=heartbeat_interval) if tune else None
    studies: dict = {}
    results: dict = {}
    if names:
        results, studies = _fit_stackers(wd, names, tune=tune, trials=trials, timeout=timeout, storage=storage_obj,
                                         prefix=prefix, seed=seed, progress=progress)

    # -- sources, read back through the validating readers (what submit will read)
    source_names, source_kinds, oof_paths, test_paths = [], [], [], []
    for name in names:
        source_names.append(f"stack/{name}")
        source_kinds.append("stacker")
        oof_paths.append(wd.stack_dir(name) / "oof.parquet")
        test_paths.append(wd.stack_dir(name) / "test.parquet")
    for model in base_models:
        source_names.append(f"preds/{model}")
        source_kinds.append("base")
        oof_paths.append(wd.oof(model))
        test_paths.append(wd.test(model))
    image_ids = folds["image_id"].to_numpy(dtype=object)
    fold_of_row = folds["fold"].to_numpy()
    y = labels.set_index("image_id").reindex(image_ids)[list(LABELS)].to_numpy(dtype=np.float64)
    preds = _read_sources(wd, oof_paths, test_paths, folds, metadata, image_ids)

    # -- blend
    blend_info = None
    if tune:
        from stackkit.stack.tune import search_blend

        blend_study = f"{prefix}-blend"
        params, blend_info = search_blend(preds, y, source_names, per_label=per_label_weights, any_consistency=any_consistency,
                                          trials=trials, timeout=timeout, seed=seed, storage=storage_obj, study_name=blend_study,
                                          progress=progress)
        cv_trials = blend_info.trials_run if blend_info else 0

        def refit(p, yy):
            return search_blend(p, yy, source_names, per_label=per_label_weights, any_consistency=any_consistency,
                                trials=cv_trials, seed=seed, storage=None)[0]

        cv_method = CV_METHOD_TUNED
    else:
        params = BlendParams.equal(len(source_names), any_consistency=any_consistency)

        def refit(p, yy):
            return params

        cv_method = CV_METHOD_EQUAL
    in_sample = params.score(preds, y)
    pooled, per_fold = cross_validated_blend(preds, y, fold_of_row, _with_progress(refit, fold_of_row, progress))
    cv_score = weighted_log_loss(y, pooled)
    fallback = None
    if tune:
        # On small data a fitted blend can overfit so badly that its honest (CV) score is worse than
        # plain equal weights, which fit nothing. Keep the tuned weights only when CV says they help.
        equal = BlendParams.equal(len(source_names), any_consistency=any_consistency)
        equal_score = equal.score(preds, y)
        if equal_score.overall < cv_score.overall:
            fallback = {"reason": "the tuned blend's cross-validated score was worse than equal weights",
                        "tuned_params": params.to_json(source_names),
                        "tuned_scores": {"in_sample": in_sample.as_dict(), "cv": cv_score.as_dict()}}
            params, in_sample, cv_score = equal, equal_score, equal_score
            per_fold = [{**f, "score": weighted_log_loss(y[fold_of_row == f["fold"]], equal.apply(preds[:, fold_of_row == f["fold"]])).overall}
                        for f in per_fold]
    source_scores = [weighted_log_loss(y, preds[s]) for s in range(len(source_names))]

    record = {
        "contract_version": CONTRACT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "formula": params.formula,
        "sources": [
            {"name": n, "kind": k, "oof": _relative(o, wd), "test": _relative(t, wd), "test_sha256": file_sha256(t),
             "oof_score": sc.as_dict()}
            for n, k, o, t, sc in zip(source_names, source_kinds, oof_paths, test_paths, source_scores)
        ],
        "per_label_weights": bool(per_label_weights),
        **params.to_json(source_names),
        "scores": {
            "in_sample": in_sample.as_dict(),
            "cv": {**cv_score.as_dict(), "per_fold": [{"fold": f["fold"], "n": f["n"], "overall": f["score"]} for f in per_fold]},
        },
        "cv_method": cv_method,
        "tuned": bool(tune),
        "fallback_to_equal_weights": fallback,
        "seed": int(seed),
        "folds_hash": current_folds_hash,
        "optuna": None if not tune else {
            "storage": describe_storage(storage, wd),
            "studies": {**{n: info.as_dict() for n, info in studies.items()}, "blend": blend_info.as_dict() if blend_info else None},
        },
    }
    write_json(record, wd.blend)

    from stackkit.stack.report import ScoreRow, render_table, write_report_html

    rows = [ScoreRow.from_score(n, k, sc) for n, k, sc in zip(source_names, source_kinds, source_scores)]
    rows.sort(key=lambda r: (r.kind != "base", 0))  # base models first, then stackers, in given order
    base_rows = [s for s, kind in enumerate(source_kinds) if kind == "base"]
    if len(base_rows) >= 2:
        # the baseline a blend must beat: the plain average of the base models' probabilities
        rows.insert(len(base_rows), ScoreRow.from_score("mean of base models", "mean", weighted_log_loss(y, preds[base_rows].mean(axis=0))))
    if fallback:
        tuned = fallback["tuned_scores"]
        rows += [ScoreRow.from_score("tuned blend", "blend", tuned["in_sample"]), ScoreRow.from_score("tuned blend-cv", "blend-cv", tuned["cv"])]
    rows += [ScoreRow.from_score("blend", "blend", in_sample), ScoreRow.from_score("blend-cv", "blend-cv", cv_score)]
    table = render_table(rows)
    histories = {info.name: info.history for info in studies.values()}
    if blend_info is not None:
        histories[blend_info.name] = blend_info.history
    write_report_html(
        wd, rows=rows,
        importances={f"stack/{n}": r.importance for n, r in results.items() if r.importance is not None},
        histories=histories,
        blend_weights=record["weights"],
        notes=[f"blend in {params.space} space; temperature {', '.join(f'{l}={t:.3g}' for l, t in record['temperature'].items())}; "
               f"clip {params.clip:.3g}; any >= max(subtypes): {any_consistency}", f"cross-validation: {cv_method}"],
    )
    seconds = time.perf_counter() - started
    lines = [
        f"blend: in-sample {in_sample.overall:.5f}, cross-validated {cv_score.overall:.5f} ({len(source_names)} sources)",
        f"wrote {wd.blend} and {wd.report_html} in {seconds:.1f} s",
    ]
    if base_rows:
        best_base = min(base_rows, key=lambda s: source_scores[s].overall)
        gain = 1.0 - cv_score.overall / source_scores[best_base].overall
        lines.insert(1, f"blend-cv is {gain:.1%} below the best base model ({source_names[best_base]}: {source_scores[best_base].overall:.5f})")
    if fallback:
        lines.insert(1, "the tuned blend overfits (its cross-validated score is worse than equal weights): blend.json keeps equal weights")
    if tune:
        lines.insert(1, f"optuna storage: {describe_storage(storage, wd)}; studies: "
                        + ", ".join(f"{i['name']} ({i['trials_total']} trials)" for i in record["optuna"]["studies"].values() if i))
    return {
        "table": table,
        "lines": lines,
        "blend": str(wd.blend),
        "report": str(wd.report_html),
        "stack_dirs": {n: str(wd.stack_dir(n)) for n in names},
        "sources": source_names,
        "scores": {"in_sample": in_sample.as_dict(), "cv": cv_score.as_dict(),
                   "sources": {n: sc.as_dict() for n, sc in zip(source_names, source_scores)}},
        "studies": record["optuna"]["studies"] if tune else {},
        "seconds": seconds,
    }


def _fit_stackers(wd, names, *, tune, trials, timeout, storage, prefix, seed, progress):
    from stackkit.stack.crossfit import fit_stacker, load_stack_inputs, save_stacker_result
    from stackkit.stack.stackers import get_stacker

    inputs = load_stack_inputs(wd)
    results, studies = {}, {}
    for name in names:
        if tune:
            from stackkit.stack.tune import digest, tune_stacker

            inputs_key = digest(file_sha256(wd.features_manifest), inputs.folds_hash)
            result, info = tune_stacker(name, inputs, storage=storage, study_name=f"{prefix}-{name}", trials=trials,
                                        timeout=timeout, seed=seed, inputs_key=inputs_key, progress=progress)
            studies[name] = info
        else:
            result = fit_stacker(name, get_stacker(name).default_params(), inputs, seed=seed, progress=progress)
        save_stacker_result(wd, result)
        results[name] = result
    return results, studies


def _read_sources(wd, oof_paths, test_paths, folds, metadata, image_ids) -> np.ndarray:
    """(n_sources, n_labeled, 6) OOF probabilities in ``image_ids`` order; test files validated too (submit needs them)."""
    from stackkit.contract.validate import read_oof, read_test

    preds = np.empty((len(oof_paths), len(image_ids), len(LABELS)), dtype=np.float64)
    for s, (oof_path, test_path) in enumerate(zip(oof_paths, test_paths)):
        oof = read_oof(oof_path, folds, wd)  # LeakageError when its folds disagree with data/folds.parquet
        read_test(test_path, metadata, wd)
        preds[s] = oof.set_index("image_id").reindex(image_ids)[list(LABELS)].to_numpy(dtype=np.float64)
    return preds


def _with_progress(refit, folds, progress: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=len(np.unique(folds)), desc="blend CV", unit="fold", disable=not progress, leave=False)

    def wrapped(p, yy):
        params = refit(p, yy)
        bar.update(1)
        if bar.n == bar.total:
            bar.close()
        return params

    return wrapped


def _relative(path: Path, wd: Workdir) -> str:
    try:
        return Path(path).relative_to(wd.root).as_posix()
    except ValueError:
        return str(path)
