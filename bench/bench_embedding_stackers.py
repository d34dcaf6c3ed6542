"""Do the base models' embeddings help the stackers? OOF weighted log loss with and without them.

On a work directory whose models exported embeddings (the demo's: ``python cli.py demo``; or
``--synthetic``: the test suite's features plus two models whose embeddings hold the labels seen
through per-fold rotations, stackkit.testing.embeddings), over the contract's folds:

* the sequence stackers that read embeddings (``seq_emb``, ``transformer``) with
  ``use_embeddings`` on and off, beside ``seq`` (features only);
* the GBDT stackers (``lgbm``, ``xgb``) on the features alone and on the features plus a PCA
  projection of each model's embeddings to ``--components`` columns, fitted per fold on that
  fold's training rows only (stackkit.stack.embeddings.fit_projection); the GBDT modules are
  used as they are, the projected columns are appended to X.

    python bench/bench_embedding_stackers.py --workdir artifacts
    python bench/bench_embedding_stackers.py --synthetic
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def with_projection(inputs, k: int, components: int, seed: int):
    """(train, valid, held) of fold k with the PCA columns appended (fitted on fold k's training rows)."""
    from stackkit.stack.crossfit import early_stopping_split
    from stackkit.stack.embeddings import fit_projection, project

    fit_rows, valid_rows = early_stopping_split(inputs.folds, inputs.groups, k, seed)
    held_rows = np.flatnonzero(inputs.folds == k)
    emb = inputs.train.embeddings[0]
    projection = fit_projection(emb, np.concatenate([fit_rows, valid_rows]), components, seed=seed)
    out = []
    for rows in (fit_rows, valid_rows, held_rows):
        part = inputs.train.take(rows)
        X = np.concatenate([part.X, project(emb, projection, rows)], axis=1)
        out.append(replace(part, X=X, feature_names=None, embeddings=()))
    return out, held_rows


def gbdt_oof(inputs, name: str, params: dict, *, components: int | None, seed: int = 0) -> float:
    from stackkit.contract import LABELS
    from stackkit.metric import weighted_log_loss
    from stackkit.stack.crossfit import early_stopping_split
    from stackkit.stack.stackers import get_stacker

    oof = np.zeros((len(inputs.train), len(LABELS)), dtype=np.float32)
    for k in range(inputs.n_folds):
        if components:
            (train, valid, held), held_rows = with_projection(inputs, k, components, seed)
        else:
            fit_rows, valid_rows = early_stopping_split(inputs.folds, inputs.groups, k, seed)
            held_rows = np.flatnonzero(inputs.folds == k)
            train, valid, held = (inputs.train.take(r) for r in (fit_rows, valid_rows, held_rows))
        stacker = get_stacker(name).fit(train, valid, params, seed=seed + k)
        oof[held_rows] = stacker.predict(held)
    return weighted_log_loss(inputs.train.Y, oof).overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--seeds", default="0", help="comma-separated stacker seeds")
    parser.add_argument("--skip-neural", action="store_true")
    args = parser.parse_args()

    from stackkit.contract import Workdir
    from stackkit.metric import prior_score
    from stackkit.stack.crossfit import fit_stacker, load_stack_inputs
    from stackkit.stack.stackers import get_stacker

    if args.synthetic:
        from stackkit.testing.embeddings import import_models_with_embeddings
        from stackkit.testing.stack import write_stack_workdir

        root = Path(tempfile.mkdtemp(prefix="stackkit-emb-bench-"))
        wd = import_models_with_embeddings(write_stack_workdir(root / "work"), ("model0", "model1"), tmp=root / "exported")
    else:
        wd = Workdir.resolve(args.workdir)
    inputs = load_stack_inputs(wd)
    if not inputs.embedding_models:
        raise SystemExit(f"{wd.root}: no model under preds/ has embeddings")
    dims = inputs.train.embeddings[0].dims
    print(f"{wd.root}: {len(inputs.train)} train rows, {inputs.n_folds} folds, {len(inputs.feature_columns)} features; embeddings "
          + ", ".join(f"{m} ({d}-d)" for m, d in zip(inputs.embedding_models, dims))
          + f"; test embedding sets: {len(inputs.test.embeddings)}; prior {prior_score(inputs.train.Y).overall:.5f}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []

    def report(label, values, seconds):
        rows.append((label, float(np.mean(values))))
        print(f"  {label:<44} OOF {np.mean(values):.5f}" + (f" (seeds {', '.join(f'{v:.5f}' for v in values)})" if len(values) > 1 else "")
              + f"  [{seconds:.0f} s]", flush=True)

    if not args.skip_neural:
        for name, variants in (("seq", [None]), ("seq_emb", [True, False]), ("transformer", [True, False])):
            for use in variants:
                params = get_stacker(name).default_params()
                if use is not None:
                    params["use_embeddings"] = use
                started = time.perf_counter()
                scores = [fit_stacker(name, params, inputs, seed=s, progress=False).score.overall for s in seeds]
                label = name if use is None else f"{name} ({'with' if use else 'without'} embeddings)"
                report(label, scores, time.perf_counter() - started)
    for name in ("lgbm", "xgb"):
        for components in (None, args.components):
            params = get_stacker(name).default_params()
            started = time.perf_counter()
            scores = [gbdt_oof(inputs, name, params, components=components, seed=s) for s in seeds]
            label = f"{name} (features only)" if not components else f"{name} (+ PCA-{components} per model, train rows only)"
            report(label, scores, time.perf_counter() - started)


if __name__ == "__main__":
    main()
