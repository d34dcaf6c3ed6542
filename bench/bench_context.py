#!/usr/bin/env python
"""Does `base train --context 1` beat `--context 0` on the synthetic data? OOF weighted log loss.

Per seed: `data synth` (the demo's size by default: 40 patients, 64 px), `data prepare` (5
patient-grouped folds), then the demo's CNN (`resnet_tiny`) trained at the same epochs with
``--context 0`` and with ``--context 1`` on the same folds; prints the OOF loss of both, and
their loss on the slices at the ends of each positive ``any`` run along z ("run ends": mostly a
bleed's faint edge slices, labeled from their neighbours, stackkit.data.synth.EDGE_WEIGHT) and
on the other slices.

``--variants 0,1,1@1.0``: ``C@S`` trains context C with the neighbor weights at S times the
learning rate (base_models.train.NEIGHBOR_LR_SCALE, default 0.1) instead.

    python bench/bench_context.py --seeds 0,1,2 [--patients 40] [--epochs 9] [--variants 0,1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path


def run_seed(root: Path, seed: int, args) -> dict:
    from base_models.train import train_base
    from stackkit.contract import Workdir
    from stackkit.data.prepare import prepare_data
    from stackkit.data.synth import synthesize

    wd = Workdir(root / f"seed{seed}")
    dicom = wd.root / "dicom"
    synth = synthesize(dicom, patients=args.patients, seed=seed, progress=False)
    prepare_data(wd, dicom_dir=dicom / "stage_2_train", test_dicom_dir=dicom / "stage_2_test",
                 labels_csv=dicom / "stage_2_train.csv", n_folds=5, seed=seed, progress=False)
    row = {"seed": seed, "any prevalence": synth.prevalence["any"]}
    for variant in args.variants:
        context, _, scale = variant.partition("@")
        start = time.perf_counter()
        with neighbor_lr_scale(float(scale) if scale else None):
            summary = train_base(wd, name=f"cnn_ctx{context}" + (f"_lr{scale.replace('.', 'p')}" if scale else ""), context=int(context),
                                 epochs=args.epochs, seed=seed, progress=False, embeddings=False)
        row[variant] = summary.oof_logloss
        row[f"{variant} s"] = time.perf_counter() - start
        row.update({f"{variant} {part}": loss for part, loss in split_scores(wd, summary.name).items()})
    return row


@contextlib.contextmanager
def neighbor_lr_scale(scale):
    import base_models.train as train

    previous = train.NEIGHBOR_LR_SCALE
    train.NEIGHBOR_LR_SCALE = previous if scale is None else scale
    try:
        yield
    finally:
        train.NEIGHBOR_LR_SCALE = previous


def split_scores(wd, model: str) -> dict:
    """OOF loss of ``model`` on the run-end slices (first and last positive slice of each positive ``any``
    run along z within a study) and on the other slices."""
    import numpy as np
    import pandas as pd

    from stackkit.contract import LABELS, slice_order
    from stackkit.metric import weighted_log_loss

    meta = pd.read_parquet(wd.root / "data" / "metadata.parquet")
    rows = meta[meta["split"] == "train"].merge(pd.read_parquet(wd.root / "data" / "labels.parquet"), on="image_id")
    rows = rows.iloc[slice_order(pd.factorize(rows["study_id"])[0], rows["z"].to_numpy(), rows["image_id"].to_numpy())]
    same_prev = np.r_[False, rows["study_id"].to_numpy()[1:] == rows["study_id"].to_numpy()[:-1]]
    same_next = np.r_[same_prev[1:], False]
    pos = rows["any"].to_numpy() == 1
    prev_pos, next_pos = np.r_[False, pos[:-1]] & same_prev, np.r_[pos[1:], False] & same_next
    run_end = pos & ~(prev_pos & next_pos)
    oof = pd.read_parquet(wd.oof(model)).set_index("image_id").loc[rows["image_id"], list(LABELS)].to_numpy()
    y = rows[list(LABELS)].to_numpy()
    return {"run ends": weighted_log_loss(y[run_end], oof[run_end]).overall,
            "others": weighted_log_loss(y[~run_end], oof[~run_end]).overall}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--variants", default="0,1")
    parser.add_argument("--keep", default=None, help="Keep the work directories under this folder.")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_context_") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run_seed(Path(args.keep or tmp), seed, args))
            print(" | ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                  flush=True)
    first = args.variants[0]
    for other in args.variants[1:]:
        gains = [1.0 - r[other] / r[first] for r in rows]
        print(f"{other} vs {first}: OOF {sum(gains) / len(gains):+.1%} lower on the mean over {len(rows)} seeds "
              f"(per seed: {', '.join(f'{g:+.1%}' for g in gains)})")


if __name__ == "__main__":
    main()
