"""`demo`: the README's first command, end to end on a small synthetic set, in a real process."""

from __future__ import annotations

import json

import pandas as pd

from stackkit.testing.cli import run_cli
from stackkit.testing.contract import snapshot
from stackkit.contract import LABELS, Workdir


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


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("precious\n")
    before = snapshot(tmp_path)
    proc = run_cli("demo", "--workdir", tmp_path, "--patients", 8, "--epochs", 1, "--trials", 1, check=False)
    assert proc.returncode == 2
    assert "not empty and was not made by `demo`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
