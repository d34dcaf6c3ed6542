"""The nested score of a tuned submission (`stack fit --tune`): the whole pipeline (tuned stackers,
then the blend choice) scored on the outer fold that no study saw, beside the untuned defaults'
pipeline on the same rows.

Each tuned stacker's OOF rows of the outer fold o come from a recipe chosen without fold o and a
fold model trained on the other folds (``tune.tune_stacker``). The blend is chosen and fitted here
again on the other folds' rows only (``blend.choose_blend``, the every-fold rule over K-1 folds) and
applied to fold o. The defaults' pipeline is the same with each stacker's defaults fitted over all
folds (``TunedStacker.defaults_result``): what `stack fit` without ``--tune`` would have blended.
So both numbers are held out alike and are what the issue's "held-out (nested) score" compares.
The Optuna weight search of the blend study is left out of both (it is one more candidate of the
blend choice and needs a study of its own per fold).
"""

from __future__ import annotations

import numpy as np

from stackkit.errors import StackkitError
from stackkit.metric import weighted_log_loss

NESTED_METHOD = ("outer fold o held out of every stacker study; per pipeline (tuned recipes / defaults), the blend is chosen and "
                 "fitted on the other folds' OOF rows (every-fold rule over K-1 folds, without the Optuna weight search) and "
                 "applied to fold o; base models enter as in the run")


def outer_fold_of_run(tuned: dict) -> int:
    """The outer fold every tuned stacker of one `stack fit --tune` held out (one per run: ``seed % K``)."""
    folds = {t.outer_fold for t in tuned.values()}
    if len(folds) != 1:
        raise StackkitError(f"tuned stackers held out different outer folds ({sorted(folds)}); the nested score needs one")
    return folds.pop()


def pipeline_outer_predictions(preds: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str], outer: int, *,
                               per_label: bool, any_consistency: bool) -> tuple[np.ndarray, str]:
    """(fold ``outer``'s rows blended, the kept blend's name): the blend of ``preds`` (S, n, 6) chosen and
    fitted on the rows of the other folds only, then applied to fold ``outer``."""
    from stackkit.stack.blend import choose_blend

    inner = folds != outer
    if not inner.any() or inner.all():
        raise StackkitError(f"outer fold {outer}: it must hold some rows and leave others to fit the blend on")
    choice = choose_blend(preds[:, inner], y[inner], folds[inner], names, per_label=per_label, allow_any_consistency=any_consistency)
    return choice.params.apply(preds[:, ~inner]), choice.chosen.name


def pipeline_outer_score(preds: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str], outer: int, *,
                         per_label: bool, any_consistency: bool):
    """(loss on fold ``outer``, the kept blend's name) of :func:`pipeline_outer_predictions`."""
    blended, chosen = pipeline_outer_predictions(preds, y, folds, names, outer, per_label=per_label, any_consistency=any_consistency)
    return weighted_log_loss(y[folds == outer], blended), chosen


def nested_submission(sources, fitted: dict, *, per_label: bool, any_consistency: bool) -> dict | None:
    """blend.json's ``optuna.nested``: the tuned and the defaults' pipelines on the outer fold, or None
    when nothing was tuned. ``sources``: the run's blend inputs (``fit.Sources``); ``fitted``: {stacker:
    (StackerResult, TunedStacker | None)}."""
    tuned = {name: t for name, (_result, t) in fitted.items() if t is not None}
    if not tuned:
        return None
    from stackkit.stack.inputs import label_array

    outer = outer_fold_of_run(tuned)
    defaults = np.array(sources.preds, copy=True)
    for s, name in enumerate(sources.names):
        stacker = name.removeprefix("stack/") if sources.kinds[s] == "stacker" else None
        if stacker in tuned:
            defaults[s] = label_array(tuned[stacker].defaults_result.oof, sources.image_ids)
    options = dict(per_label=per_label, any_consistency=any_consistency)
    tuned_score, tuned_choice = pipeline_outer_score(sources.preds, sources.y, sources.folds, sources.names, outer, **options)
    defaults_score, defaults_choice = pipeline_outer_score(defaults, sources.y, sources.folds, sources.names, outer, **options)
    return {"outer_fold": int(outer), "tuned": tuned_score.as_dict(), "defaults": defaults_score.as_dict(),
            "tuned_choice": tuned_choice, "defaults_choice": defaults_choice, "method": NESTED_METHOD}


def describe_nested(nested: dict) -> str:
    """One line of blend.json's ``optuna.nested`` (the summary, the report and bench_stack print it)."""
    tuned, defaults = nested["tuned"]["overall"], nested["defaults"]["overall"]
    return (f"nested on outer fold {nested['outer_fold']}: tuned {tuned:.5f} ({nested['tuned_choice']}), "
            f"defaults {defaults:.5f} ({nested['defaults_choice']}): {(tuned / defaults - 1) * 100:+.1f}%")
