"""`base train --arch timm:NAME`: weights from a local safetensors file, context first layer, resume,
one-line errors; and `--pseudo-labels` (soft labels for unlabeled studies, training rows only).

Nothing is downloaded: weights files are written here from random-init timm models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stackkit.contract import LABELS, file_sha256
from stackkit.contract.validate import read_oof
from stackkit.errors import StackkitError
from stackkit.testing.dicom import fresh_workdir

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(img_size=32, epochs=1, batch_size=16, lr=4e-3, device="cpu", progress=False)


@pytest.fixture(scope="module")
def timm():
    from base_models.archs.timm_models import import_timm

    return import_timm()


@pytest.fixture(scope="module")
def r18_weights(timm, tmp_path_factory) -> Path:
    """A random-init timm resnet18 (3 input channels, 1000 classes) saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "r18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    return path


def _save(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_weights_file_fills_the_backbone_and_the_center_filters_of_a_context_model(r18_weights):
    from safetensors.torch import load_file

    from base_models.archs import create_model

    given = load_file(str(r18_weights))
    model = create_model("timm:resnet18", 9, 6, center_channels=(3, 6), weights=str(r18_weights))
    model.init_weights(prior=torch.full((6,), 0.1))
    first = model.backbone.conv1
    torch.testing.assert_close(first.center.weight, given["conv1.weight"])  # the loaded filters, unchanged
    assert first.neighbors.weight.shape == (64, 6, 7, 7) and not first.neighbors.weight.any()
    assert [p.data_ptr() for p in model.neighbor_parameters()] == [first.neighbors.weight.data_ptr()]
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, given["layer4.1.conv2.weight"])
    assert not any(k.startswith("fc.") for k in model.backbone.state_dict())  # the file's classifier is dropped
    x = torch.randn(2, 9, 32, 32)
    model.eval()
    pooled = model.pool(model.features(x)).flatten(1)
    assert pooled.shape == (2, model.feature_dim) == (2, 512)
    # zero neighbor weights: the context model starts as the center-slice model
    center_only = x.clone()
    center_only[:, :3] = 0
    center_only[:, 6:] = 0
    torch.testing.assert_close(model(x), model(center_only))


@pytest.mark.parametrize("arch", ["timm:efficientnet_b0", "timm:mobilenetv3_small_050", "timm:densenet121"])
def test_any_timm_family_gets_the_context_first_layer_and_its_pooled_features(arch):
    """Stems named differently (conv_stem, features.conv0), and heads wider than num_features (MobileNetV3)."""
    from base_models.archs import create_model

    torch.manual_seed(0)
    model = create_model(arch, 9, 6, center_channels=(3, 6))
    model.init_weights(prior=torch.full((6,), 0.1))
    model.eval()
    x = torch.randn(2, 9, 64, 64)
    center_only = x.clone()
    center_only[:, :3] = 0
    center_only[:, 6:] = 0
    assert len(model.neighbor_parameters()) == 1
    with torch.no_grad():
        assert model.pool(model.features(x)).flatten(1).shape == (2, model.feature_dim)
        torch.testing.assert_close(model(x), model(center_only))


def test_weights_for_one_input_channel_group_are_adapted_without_context(r18_weights):
    from safetensors.torch import load_file

    from base_models.archs import create_model

    given = load_file(str(r18_weights))["conv1.weight"]
    model = create_model("timm:resnet18", 6, 6, weights=str(r18_weights))
    # timm's adapt_input_conv: the RGB filters repeated over the channels, rescaled by 3/6
    torch.testing.assert_close(model.backbone.conv1.weight, given.repeat(1, 2, 1, 1) * 0.5)


def _mismatched(tmp_path: Path, r18_weights: Path, kind: str) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(r18_weights))
    if kind == "shape":
        state["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    elif kind == "missing":
        del state["layer3.1.bn2.running_var"]
    elif kind == "extra":
        state["adapter.weight"] = torch.zeros(3)
    return _save(state, tmp_path / f"{kind}.safetensors")


ERRORS = [
    # (options, message), options may name a weights file by kind (see _mismatched)
    (dict(arch="timm:resnet_18x"), r"--arch 'timm:resnet_18x': timm has no model 'resnet_18x'; similar: .*"),
    (dict(arch="timm:resnet18", weights="shape"), r"shape.safetensors: does not fit timm:resnet18: layer2.0.conv1.weight has shape \(128, 32, 3, 3\), the model \(128, 64, 3, 3\)"),
    (dict(arch="timm:resnet18", weights="missing"), r"missing.safetensors: does not fit timm:resnet18: layer3.1.bn2.running_var missing"),
    (dict(arch="timm:resnet18", weights="extra"), r"extra.safetensors: does not fit timm:resnet18: adapter.weight is not in the model"),
    (dict(arch="timm:resnet18", weights="nofile"), r"--weights .*nofile.safetensors: no such file"),
    (dict(arch="timm:resnet18", weights="pickle"), r"--weights .*w.pt: expected a .safetensors file \(pickled checkpoints are not loaded\)"),
    (dict(arch="timm:resnet18", pretrained=True), r"--pretrained: timm could not fetch the published weights of timm:resnet18 \(\w+\); offline, pass --weights FILE.safetensors"),
    (dict(arch="resnet_tiny", pretrained=True), r"--pretrained: only for --arch timm:<name>"),
    (dict(arch="timm:resnet18", pretrained=True, weights="good"), r"give --pretrained .* or --weights FILE, not both"),
]


@pytest.mark.parametrize("options, match", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_timm_errors_are_one_line(options, match, small_dataset, r18_weights, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from base_models.train import train_base

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # and nothing cached
    options = dict(options)
    kind = options.get("weights")
    if kind in ("shape", "missing", "extra"):
        options["weights"] = str(_mismatched(tmp_path, r18_weights, kind))
    elif kind == "nofile":
        options["weights"] = str(tmp_path / "nofile.safetensors")
    elif kind == "pickle":
        options["weights"] = str(tmp_path / "w.pt")
        torch.save({}, options["weights"])
    elif kind == "good":
        options["weights"] = str(r18_weights)
    wd = fresh_workdir(small_dataset, tmp_path / "w")
    with pytest.raises(StackkitError, match=match) as info:
        train_base(wd, name="m", **{**SMALL, **options})
    assert "\n" not in str(info.value)
    assert not wd.preds_root.exists()


@pytest.mark.parametrize("options, message", [
    (["--arch", "timm:efficentnet_b0"], "timm has no model 'efficentnet_b0'; similar: efficientnet_b0"),
    (["--arch", "timm:resnet18", "--pseudo-labels", "PSEUDO"], "one --pseudo-labels file for all 3 folds"),
    (["--arch", "resnet_tiny", "--weights", "W.safetensors"], "--weights W.safetensors: only for --arch timm:<name>"),
])
def test_timm_and_pseudo_label_options_on_the_command_line_are_one_line_exit_2(options, message, small_dataset, tmp_path):
    wd = fresh_workdir(small_dataset, tmp_path / "w")
    options = [str(_pseudo_files(wd, tmp_path)[0]) if o == "PSEUDO" else o for o in options]
    run = subprocess.run([sys.executable, str(REPO / "cli.py"), "base", "train", "--workdir", str(wd.root), "--name", "m",
                          "--device", "cpu", *options], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert message in run.stderr


def test_timm_model_with_weights_file_trains_resumes_and_writes_the_contract_files(small_dataset, r18_weights, tmp_path):
    from stackkit.contract import Workdir
    from stackkit.contract.validate import load_core, read_test, verify_model_files

    from base_models.train import train_base

    wd = fresh_workdir(small_dataset, tmp_path / "w")
    options = dict(name="r18", arch="timm:resnet18", weights=str(r18_weights), context=1, **SMALL)
    partial = train_base(wd, folds=[0], **options)
    assert partial.complete is False and not wd.oof("r18").exists()
    fold0 = (wd.preds_dir("r18") / "_work" / "fold0.json").read_bytes()
    summary = train_base(wd, resume=True, **options)
    assert summary.complete is True
    assert (wd.preds_dir("r18") / "_work" / "fold0.json").read_bytes() == fold0  # fold 0 kept, not retrained

    metadata, _, folds = load_core(Workdir.of(wd.root))
    verify_model_files(wd, "r18")
    oof = read_oof(wd.oof("r18"), folds)
    assert sorted(oof["image_id"]) == sorted(folds["image_id"])
    read_test(wd.test("r18"), metadata)
    record = json.loads(wd.model_json("r18").read_text())
    assert record["architecture"] == "timm:resnet18" and record["parameters"]["in_channels"] == 9
    assert record["parameters"]["weights"] == {"path": str(r18_weights), "sha256": file_sha256(r18_weights)}
    assert record["embedding_dim"] == 512
    assert record["test_folds"] == ["test_fold0.parquet", "test_fold1.parquet", "test_fold2.parquet"]
    oof_embeddings = np.load(wd.preds_dir("r18") / "embeddings" / "oof.npy")
    assert oof_embeddings.shape == (len(oof), 512) and np.isfinite(oof_embeddings).all()


# --- pseudo-labels ---------------------------------------------------------------------------------


def _pseudo_files(wd, tmp_path: Path, studies_per_file=(1, 2, 3)) -> list[Path]:
    """One soft-label file per fold: fold k's file holds the images of k+1 test studies."""
    metadata = pd.read_parquet(wd.metadata)
    test = metadata.loc[metadata["split"] == "test"]
    studies = sorted(test["study_id"].unique())
    rng = np.random.default_rng(0)
    paths = []
    for k, n in enumerate(studies_per_file):
        ids = test.loc[test["study_id"].isin(studies[:n]), "image_id"].to_numpy()
        frame = pd.DataFrame(rng.random((len(ids), 6)).astype(np.float32), columns=list(LABELS))
        frame.insert(0, "image_id", ids)
        paths.append(tmp_path / f"pseudo_fold{k}.parquet")
        frame.to_parquet(paths[-1])
    return paths


def test_pseudo_labelled_images_train_their_fold_model_only_and_never_reach_the_oof_file(small_dataset, tmp_path):
    from stackkit.contract.validate import load_core

    from base_models.train import train_base

    wd = fresh_workdir(small_dataset, tmp_path / "w")
    paths = _pseudo_files(wd, tmp_path)
    summary = train_base(wd, name="pl", arch="resnet_tiny", pseudo_labels=[str(p) for p in paths], **SMALL)
    assert summary.complete
    _, _, folds = load_core(wd)
    oof = read_oof(wd.oof("pl"), folds)
    pseudo_ids = set().union(*(set(pd.read_parquet(p)["image_id"]) for p in paths))
    assert pseudo_ids and not pseudo_ids & set(oof["image_id"])  # no pseudo-labelled image is validated
    assert sorted(oof["image_id"]) == sorted(folds["image_id"])
    work = wd.preds_dir("pl") / "_work"
    for k, path in enumerate(paths):  # fold k trained on file k's images, besides the other folds' labeled ones
        record = json.loads((work / f"fold{k}.json").read_text())
        assert record["pseudo_images"] == len(pd.read_parquet(path))
        assert record["train_images"] == int((folds["fold"] != k).sum())
    listed = json.loads(wd.model_json("pl").read_text())["parameters"]["pseudo_labels"]
    assert [(r["fold"], r["path"], r["sha256"]) for r in listed] == [(k, str(p), file_sha256(p)) for k, p in enumerate(paths)]


def _bad_pseudo(wd, tmp_path: Path, kind: str) -> list[str]:
    paths = _pseudo_files(wd, tmp_path)
    if kind == "one file":
        return [str(paths[0])]
    if kind == "two files":
        return [str(p) for p in paths[:2]]
    frame = pd.read_parquet(paths[1])
    metadata = pd.read_parquet(wd.metadata)
    labeled = metadata.loc[metadata["split"] == "train", "image_id"].iloc[0]
    replacement = {"labeled study": labeled, "unknown image": "ID_nothere", "duplicate image": frame.loc[0, "image_id"]}
    if kind in replacement:
        frame.loc[len(frame) - 1, "image_id"] = replacement[kind]
    if kind == "not a probability":
        frame.loc[2, "any"] = 1.5
    frame.to_parquet(paths[1])
    return [str(p) for p in paths]


@pytest.mark.parametrize("kind, match", [
    ("one file", r"pseudo_fold0.parquet: one --pseudo-labels file for all 3 folds: labels made from every fold leak fold k's labels into fold k's OOF"),
    ("two files", r"pseudo_fold1.parquet: 2 --pseudo-labels files; expected one per fold model \(3"),
    ("labeled study", r"pseudo_fold1.parquet: image_id '.*' at row \d+ is of study '.*', which has labeled images in data/folds.parquet"),
    ("unknown image", r"pseudo_fold1.parquet: image_id 'ID_nothere' at row \d+ is not in data/metadata.parquet"),
    ("duplicate image", r"pseudo_fold1.parquet: duplicate image_id"),
    ("not a probability", r"pseudo_fold1.parquet: column 'any' has 1.5 at row 3 .*; expected a probability in \[0, 1\]; 1 of \d+ values are outside \[0, 1\]: fix or remove them$"),
])
def test_bad_pseudo_labels_are_one_line(kind, match, small_dataset, tmp_path):
    from base_models.train import train_base

    wd = fresh_workdir(small_dataset, tmp_path / "w")
    with pytest.raises(StackkitError, match=match) as info:
        train_base(wd, name="pl", pseudo_labels=_bad_pseudo(wd, tmp_path, kind), **SMALL)
    assert "\n" not in str(info.value)
    assert not wd.preds_root.exists()
