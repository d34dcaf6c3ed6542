"""`demo`: the README's first command, end to end on a small synthetic set, in a real process."""

from __future__ import annotations

import json

import pandas as pd

from stackkit.testing.cli import run_cli
from stackkit.testing.contract import snapshot
from stackkit.contract import LABELS, Workdir
from stackkit.data.prepare import parse_label_csv
from stackkit.data.synth import HELD_OUT_CSV
from stackkit.holdout import read_submission
from stackkit.metric import weighted_log_loss


def test_demo_runs_every_step_and_writes_a_valid_submission(tmp_path):
    wd = Workdir(tmp_path / "demo")
    # 6 patients is the documented minimum: fewer training patients than the usual 5 folds
    proc = run_cli("demo", "--workdir", wd.root, "--patients", 6, "--epochs", 1, "--trials", 2, "--quiet")

    metadata = pd.read_parquet(wd.root / "data" / "metadata.parquet")
    test_ids = set(metadata.loc[metadata["split"] == "test", "image_id"])
    submission = pd.read_csv(wd.submission)
    assert list(submission.columns) == ["ID", "Label"]
    assert len(submission) == len(LABELS) * len(test_ids)
    image_ids = submission["ID"].str.rsplit("_", n=1).str[0]
    assert set(image_ids) == test_ids
    assert submission["Label"].between(0, 1).all()

    for name in ("cnn_plain", "cnn_ctx1"):
        assert (wd.root / "preds" / name / "oof.parquet").is_file()
        # the CNNs export their embeddings, and the demo stacks with them
        assert json.loads((wd.root / "preds" / name / "model.json").read_text())["embedding_dim"] == 96
    assert json.loads((wd.stack_dir("seq_emb") / "meta.json").read_text())["score"]["overall"] > 0
    blend = json.loads(wd.blend.read_text())
    for label in LABELS:
        assert abs(sum(blend["weights"][label].values()) - 1) < 1e-6
    assert wd.report_html.is_file()
    assert "total" in proc.stdout and str(wd.submission) in proc.stdout
    assert "below the best base model" in proc.stdout
    _assert_held_out_labels_scored_but_never_used(wd, proc.stdout, test_ids)


def _assert_held_out_labels_scored_but_never_used(wd, stdout, test_ids):
    """The test split's labels sit in their own file: not in data/, features/ or any stacker's rows; the
    closing table scores the submission and the best base model (chosen on CV) on them."""
    held = parse_label_csv(wd.root / "dicom" / HELD_OUT_CSV)
    assert set(held["image_id"]) == test_ids
    labels = pd.read_parquet(wd.root / "data" / "labels.parquet")
    assert not set(labels["image_id"]) & test_ids
    assert not set(pd.read_parquet(wd.features_train, columns=["image_id"])["image_id"]) & test_ids
    for oof in wd.stack_root.glob("*/oof.parquet"):
        assert not set(pd.read_parquet(oof, columns=["image_id"])["image_id"]) & test_ids, oof
    recorded = [p for p in wd.root.rglob("*.json") if HELD_OUT_CSV in p.read_text()]
    assert not recorded  # no step's record names the held-out file: none read it

    truth = held.sort_values("image_id")
    y = truth[list(LABELS)].to_numpy()
    sub = read_submission(wd.submission).set_index("image_id").loc[truth["image_id"], list(LABELS)].to_numpy()
    blend = json.loads(wd.blend.read_text())
    best = min(blend["base_oof_scores"], key=lambda m: blend["base_oof_scores"][m]["overall"])
    base = pd.read_parquet(wd.test(best)).set_index("image_id").loc[truth["image_id"], list(LABELS)].to_numpy()
    stack_loss, base_loss = weighted_log_loss(y, sub).overall, weighted_log_loss(y, base).overall
    verdict = next(line for line in stdout.splitlines() if line.startswith("the stack vs the best base model"))
    assert f"(preds/{best}, best on CV)" in verdict
    assert f"({stack_loss:.5f} against {base_loss:.5f})" in verdict
    change = 1 - stack_loss / base_loss
    assert (f"{change:.1%} lower" if change >= 0 else f"{-change:.1%} higher (worse)") in verdict
    assert f"held-out: {len(test_ids)} test images" in stdout
    assert "prior (train label rates)  prior" in stdout


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("precious\n")
    before = snapshot(tmp_path)
    proc = run_cli("demo", "--workdir", tmp_path, "--patients", 8, "--epochs", 1, "--trials", 1, check=False)
    assert proc.returncode == 2
    assert "not empty and was not made by `demo`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
