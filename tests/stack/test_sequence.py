"""Sequence stackers (seq, seq_emb, transformer): a study and the same study reversed in z get
the same predictions, row order carries nothing, test rows average the base fold models'
embedding spaces, embeddings are streamed and checked against the fitted model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from features.build import build_features
from stackkit.contract import LABELS
from stackkit.errors import ContractError, StackkitError
from stackkit.stack.crossfit import early_stopping_split, fit_stacker, load_stack_inputs
from stackkit.stack.stackers import EmbeddingSet, StackData, get_stacker
from stackkit.testing.embeddings import import_models_with_embeddings
from stackkit.testing.stack import FAST_PARAMS, write_stack_workdir

SEQUENCE_STACKERS = ["seq", "seq_emb", "transformer"]


@pytest.fixture(scope="module")
def seq_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    wd = write_stack_workdir(root / "work", n_patients=30, n_folds=3)
    return import_models_with_embeddings(wd, ("model0", "model1"), dim=12, tmp=root / "exported")


@pytest.fixture(scope="module")
def inputs(seq_workdir):
    return load_stack_inputs(seq_workdir)


def _split(inputs, k=0):
    fit_rows, valid_rows = early_stopping_split(inputs.folds, inputs.groups, k, seed=0)
    return inputs.train.take(fit_rows), inputs.train.take(valid_rows), inputs.train.take(np.flatnonzero(inputs.folds == k))


@pytest.fixture(scope="module")
def fold0(inputs):
    cache = {}

    def get(name):
        if name not in cache:
            train, valid, held = _split(inputs)
            cache[name] = get_stacker(name).fit(train, valid, FAST_PARAMS[name], seed=0)
        return cache[name]

    return get


# --- row order carries nothing -----------------------------------------------------------------


@pytest.mark.parametrize("name", SEQUENCE_STACKERS)
def test_predictions_do_not_change_when_input_rows_are_permuted(name, inputs, fold0):
    stacker = fold0(name)
    _, _, held = _split(inputs)
    rng = np.random.default_rng(5)
    perm = rng.permutation(len(held))
    # equal up to the last bit of float32 (BLAS kernels may round differently with another buffer alignment)
    np.testing.assert_allclose(stacker.predict(held.take(perm)), stacker.predict(held)[perm], rtol=1e-6, atol=1e-8)
    test_perm = rng.permutation(len(inputs.test))
    np.testing.assert_allclose(stacker.predict(inputs.test.take(test_perm)), stacker.predict(inputs.test)[test_perm], rtol=1e-6, atol=1e-8)
    # fitting on the same rows in another order gives the same model (up to float summation order)
    train, valid, _ = _split(inputs)
    again = get_stacker(name).fit(train.take(rng.permutation(len(train))), valid.take(rng.permutation(len(valid))), FAST_PARAMS[name], seed=0)
    np.testing.assert_allclose(again.predict(held), stacker.predict(held), atol=2e-4)


# --- a study reversed in z -----------------------------------------------------------------------


def _real_feature_data(seed=0, n_studies=36):
    """metadata/folds/predictions -> features by the real `stack features` code, forward and reversed in z."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for s in range(n_studies):
        n = int(rng.integers(3, 14))
        z = rng.normal(0, 30) + np.sort(rng.choice(np.arange(50), n, replace=False)) * 5.0
        lesion = np.zeros((n, len(LABELS)))
        if rng.random() < 0.5:
            start = int(rng.integers(0, n))
            lesion[start : start + int(rng.integers(1, 4)), [int(rng.integers(0, 5)), 5]] = 1
        split = "test" if s % 4 == 3 else "train"
        for i in range(n):
            image = f"ID_{s:03d}{i:03d}{rng.integers(1 << 20):05x}"
            rows.append((image, f"ID_p{s:03d}", f"ID_s{s:03d}", split, float(z[i])))
            truth[image] = lesion[i]
    metadata = pd.DataFrame(rows, columns=["image_id", "patient_id", "study_id", "split", "z"])
    train_meta = metadata[metadata["split"] == "train"]
    study_fold = {sid: k % 3 for k, sid in enumerate(train_meta["study_id"].unique())}
    folds = pd.DataFrame({"image_id": train_meta["image_id"].to_numpy(), "fold": train_meta["study_id"].map(study_fold).to_numpy().astype(np.int8)})

    def preds(ids, fold=None):
        y = np.stack([truth[i] for i in ids])
        p = 1 / (1 + np.exp(-(2.0 * (2 * y - 1) - 1 + rng.normal(0, 1.2, y.shape))))
        frame = pd.DataFrame(p.astype(np.float32), columns=list(LABELS))
        if fold is not None:
            frame.insert(0, "fold", np.asarray(fold, dtype=np.int8))
        frame.insert(0, "image_id", np.asarray(ids))
        return frame

    test_ids = metadata.loc[metadata["split"] == "test", "image_id"].to_numpy()
    oof = {"cnn": preds(folds["image_id"], folds["fold"])}
    test = {"cnn": preds(test_ids)}
    forward = build_features(metadata, oof, test, folds, lags=2, progress=False)
    backward = build_features(metadata.assign(z=-metadata["z"]), oof, test, folds, lags=2, progress=False)
    return forward, backward, truth


def _stack_data(frame, names, truth, codes):
    return StackData(
        X=frame[names].to_numpy(dtype=np.float32),
        study_codes=codes.get_indexer(frame["study_id"].astype(str)),
        slice_index=frame["slice_index"].to_numpy(),
        Y=np.stack([truth[i] for i in frame["image_id"]]).astype(np.float32),
        image_ids=frame["image_id"].to_numpy(),
        feature_names=tuple(names),
    )


@pytest.mark.parametrize("name", SEQUENCE_STACKERS)
def test_a_study_and_the_same_study_reversed_in_z_get_the_same_predictions(name):
    (train, test, definitions), (_, test_reversed, _), truth = _real_feature_data()
    names = list(definitions)
    codes = pd.Index(sorted(set(train["study_id"].astype(str)) | set(test["study_id"].astype(str))))
    data = _stack_data(train, names, truth, codes)
    valid_rows = train["fold"].to_numpy() == 0
    params = {**FAST_PARAMS[name], "max_epochs": 4}
    stacker = get_stacker(name).fit(data.take(~valid_rows), data.take(valid_rows), params, seed=0)
    forward = pd.DataFrame(stacker.predict(_stack_data(test, names, truth, codes)), index=test["image_id"])
    backward = pd.DataFrame(stacker.predict(_stack_data(test_reversed, names, truth, codes)), index=test_reversed["image_id"])
    # predictions average the forward and the reversed pass; the reversed study's forward pass is the
    # original's reversed pass only if the direction columns are swapped as the real features are
    np.testing.assert_allclose(backward.loc[forward.index].to_numpy(), forward.to_numpy(), atol=2e-5)


# --- embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seq_emb", "transformer"])
def test_test_rows_average_the_predictions_of_every_fold_models_embeddings(name, inputs, fold0):
    stacker = fold0(name)
    assert stacker.embedding_names == ("model0", "model1")
    assert len(inputs.test.embeddings) == inputs.n_folds
    averaged = stacker.predict(inputs.test)
    each = [stacker.predict(replace(inputs.test, embeddings=(emb,))) for emb in inputs.test.embeddings]
    np.testing.assert_allclose(averaged, np.mean(each, axis=0), atol=1e-5)
    assert not np.allclose(each[0], each[1], atol=1e-4), "fold models' embedding spaces should differ"


def test_embeddings_help_when_they_hold_more_than_the_probabilities(inputs):
    with_emb = fit_stacker("seq_emb", FAST_PARAMS["seq_emb"], inputs, progress=False)
    without = fit_stacker("seq_emb", {**FAST_PARAMS["seq_emb"], "use_embeddings": False}, inputs, progress=False)
    assert without.models[0].embedding_names == ()
    assert with_emb.score.overall < 0.9 * without.score.overall, (with_emb.score.overall, without.score.overall)


class _RecordingArray:
    """Stands in for a memory-mapped embedding file; records how many rows each read takes."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, rows):
        self.reads.append(len(np.atleast_1d(np.arange(self.shape[0])[rows])))
        return self.array[rows]


def test_embeddings_are_read_a_batch_at_a_time(inputs):
    train, valid, held = _split(inputs)
    arrays = [_RecordingArray(np.asarray(a)) for a in train.embeddings[0].arrays]

    def wrap(data):
        emb = data.embeddings[0]
        return replace(data, embeddings=(EmbeddingSet(emb.names, tuple(arrays), emb.rows),))

    params = {**FAST_PARAMS["seq_emb"], "max_epochs": 2, "batch_size": 4}
    stacker = get_stacker("seq_emb").fit(wrap(train), wrap(valid), params)
    stacker.predict(wrap(held))
    longest = int(pd.Series(train.study_codes).value_counts().max())
    for recording in arrays:
        # the statistics sample, then batches: never a whole file's rows in one read but for the sample
        reads = recording.reads[1:]
        assert reads and max(reads) <= 4 * params["batch_size"] * longest < recording.shape[0]


def test_predicting_with_other_embeddings_is_refused(inputs, fold0):
    stacker = fold0("seq_emb")
    with pytest.raises(StackkitError, match=r"fitted with the embeddings of model0, model1 but the data has none") as info:
        stacker.predict(inputs.test.without_embeddings())
    assert "\n" not in str(info.value)
    emb = inputs.test.embeddings[0]
    other = EmbeddingSet(("model0", "modelX"), emb.arrays, emb.rows)
    with pytest.raises(StackkitError, match=r"fitted on embeddings .*model1.* but the data has .*modelX.*; refit"):
        stacker.predict(replace(inputs.test, embeddings=(other,)))


def test_load_stack_inputs_without_embeddings_and_with_a_changed_file(seq_workdir, tmp_path):
    import shutil

    from stackkit.contract import Workdir

    wd = Workdir(tmp_path / "work")
    shutil.copytree(seq_workdir.root, wd.root)
    plain = load_stack_inputs(wd, use_embeddings=False)
    assert plain.train.embeddings == () and plain.test.embeddings == () and plain.embedding_models == ()
    path = wd.oof_embeddings("model1")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ContractError, match=r"preds/model1/embeddings/oof\.npy: sha256 mismatch .*re-import or retrain"):
        load_stack_inputs(wd)



def test_pca_projection_is_fitted_on_the_given_rows_only(inputs):
    from stackkit.stack.embeddings import fit_projection, project, projection_names

    emb = inputs.train.embeddings[0]
    training = np.flatnonzero(inputs.folds != 0)
    projection = fit_projection(emb, training, n_components=3)
    # the held-out fold's rows changed beyond recognition: the projection does not move
    held_file_rows = emb.rows[inputs.folds == 0]
    changed = []
    for m, array in enumerate(emb.arrays):
        values = np.asarray(array, dtype=np.float16).copy()
        values[held_file_rows[:, m]] = 100.0
        changed.append(values)
    again = fit_projection(EmbeddingSet(emb.names, tuple(changed), emb.rows), training, n_components=3)
    for (mean, components), (mean2, components2) in zip(projection, again):
        np.testing.assert_array_equal(mean, mean2)
        np.testing.assert_allclose(components, components2, atol=1e-6)
    columns = project(emb, projection)
    assert columns.shape == (len(inputs.train), 6) and np.isfinite(columns).all()
    assert projection_names(emb, projection)[:2] == ["model0__emb__pc1", "model0__emb__pc2"]
    # the leading component is centered on the training rows
    assert abs(float(columns[training, 0].mean())) < 1e-3


def test_which_stackers_read_embeddings():
    from stackkit.stack.stackers import DEFAULT_STACKERS, STACKERS

    assert {n for n, cls in STACKERS.items() if cls.uses_embeddings} == {"seq_emb", "transformer"}
    assert set(DEFAULT_STACKERS) <= set(STACKERS)


# --- folds fitted side by side in processes ----------------------------------------------------


@pytest.mark.parametrize("name", ["seq", "seq_emb"])
def test_folds_fitted_in_processes_are_the_models_fitted_one_after_another(name, inputs, monkeypatch):
    from stackkit.stack.folds import fold_processes

    params = FAST_PARAMS[name]
    monkeypatch.setenv("STACKKIT_THREADS", "1")
    assert fold_processes(get_stacker(name), get_stacker(name).resolve_params(params), inputs.n_folds) == 1
    one_after_another = fit_stacker(name, params, inputs, progress=False)
    monkeypatch.setenv("STACKKIT_THREADS", "2")
    assert fold_processes(get_stacker(name), get_stacker(name).resolve_params(params), inputs.n_folds) == 3  # 3 folds, 2 cores
    side_by_side = fit_stacker(name, params, inputs, progress=False)
    pd.testing.assert_frame_equal(side_by_side.oof, one_after_another.oof, check_exact=True)
    pd.testing.assert_frame_equal(side_by_side.test, one_after_another.test, check_exact=True)
    assert side_by_side.fold_scores == one_after_another.fold_scores


def test_fold_workers_have_this_process_environment_of_now_not_the_fork_servers(monkeypatch):
    import os
    import signal
    from multiprocessing import forkserver

    from stackkit.stack import folds

    monkeypatch.setenv("STACKKIT_THREADS", "2")
    monkeypatch.delenv("STACKKIT_PROBE", raising=False)
    folds.start_fold_workers({"lgbm": None})  # no stacker of this set fits folds apart: nothing is started for it
    folds.start_fold_workers({"lgbm": None, "seq": None})
    if folds._worker_context().get_start_method() == "forkserver":
        forkserver.ensure_running()  # started before the variable below is set: its environment lacks it
    monkeypatch.setenv("STACKKIT_PROBE", "set after the fork server started")
    with folds.fold_worker_pool(1) as pool:
        assert pool.submit(os.getenv, "STACKKIT_PROBE").result() == "set after the fork server started"
        # the server ignores Ctrl-C (it shares the terminal's process group); a worker stops on it
        assert pool.submit(signal.getsignal, signal.SIGINT).result() is signal.default_int_handler


def test_threaded_or_gpu_stackers_fit_their_folds_in_this_process():
    from stackkit.stack.folds import fold_processes

    assert fold_processes(get_stacker("lgbm"), get_stacker("lgbm").resolve_params({"num_threads": 1}), 5) == 1
    assert fold_processes(get_stacker("mlp"), get_stacker("mlp").resolve_params({"num_threads": 2}), 5) == 1
    seq = get_stacker("seq")
    assert fold_processes(seq, seq.resolve_params({"device": "cuda"}), 5) == 1
    assert fold_processes(seq, seq.resolve_params({}), 1) == 1


@pytest.mark.parametrize("cores, n_folds, processes", [(2, 5, 3), (2, 4, 2), (2, 3, 3), (2, 2, 2), (4, 5, 5), (4, 8, 4), (1, 5, 1)])
def test_fold_processes_share_the_cores_evenly(cores, n_folds, processes, monkeypatch):
    from stackkit.stack.folds import fold_processes

    monkeypatch.setenv("STACKKIT_THREADS", str(cores))
    seq = get_stacker("seq")
    assert fold_processes(seq, seq.resolve_params({}), n_folds, fold_bytes=1 << 20) == processes


def test_fold_processes_are_as_many_as_the_memory_holds(monkeypatch):
    from stackkit.stack import folds

    monkeypatch.setenv("STACKKIT_THREADS", "2")
    seq = get_stacker("seq")
    per_worker = folds.WORKER_ROW_COPIES * (1 << 30) + folds.WORKER_BASE_BYTES  # a fold's rows: 1 GiB
    for workers in (1, 2, 3):
        monkeypatch.setattr(folds, "available_memory_bytes", lambda: int((workers + 0.5) * per_worker / 0.8))
        assert folds.fold_processes(seq, seq.resolve_params({}), 5, fold_bytes=1 << 30) == workers
    monkeypatch.setattr(folds, "available_memory_bytes", lambda: 16 << 30)  # RSNA size: a fold's rows ~2.8 GB
    assert folds.fold_processes(seq, seq.resolve_params({}), 5, fold_bytes=int(2.8e9)) == 1
    monkeypatch.setattr(folds, "available_memory_bytes", lambda: None)  # not Linux: no cap
    assert folds.fold_processes(seq, seq.resolve_params({}), 5, fold_bytes=int(2.8e9)) == 3


def test_early_stopping_splits_over_the_patient_codes_are_those_over_the_patient_ids(inputs):
    ids = inputs.train_keys["patient_id"].to_numpy(dtype=object)
    assert inputs.groups.dtype.kind == "i" and len(np.unique(inputs.groups)) == len(np.unique(ids))
    for k in range(inputs.n_folds):
        for seed in (0, 7):
            by_codes = early_stopping_split(inputs.folds, inputs.groups, k, seed)
            by_ids = early_stopping_split(inputs.folds, ids, k, seed)
            assert all(np.array_equal(a, b) for a, b in zip(by_codes, by_ids))
            # every stacker of a `stack fit` gets this split, drawn once
            kept = inputs.early_stopping_rows(k, seed)
            assert all(np.array_equal(a, b) for a, b in zip(kept, by_codes)) and inputs.early_stopping_rows(k, seed) is kept
    assert not np.array_equal(inputs.early_stopping_rows(1, 0, exclude_fold=0)[0], inputs.early_stopping_rows(1, 0)[0])


def test_seq_network_is_a_packed_bidirectional_gru_and_loads_its_weights():
    """`seq` runs its bidirectional GRU as two one-way GRUs over dense padded batches, the reverse one on
    each study reversed: the same outputs as torch's packed bidirectional GRU, and a state_dict saved
    with one bidirectional GRU (before the split) loads into it."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from stackkit.stack.stackers.seq import _seq_module, reversed_slots

    params = {**get_stacker("seq").default_params(), "hidden": 8}
    torch.manual_seed(0)
    net = _seq_module(5, params).eval()
    torch.manual_seed(0)
    legacy_gru = torch.nn.GRU(8, 8, batch_first=True, bidirectional=True)
    legacy_state = {k: v for k, v in net.state_dict().items() if not k.startswith(("gru.", "gru_reverse."))}
    legacy_state.update({f"gru.{k}": v for k, v in legacy_gru.state_dict().items()})
    net.load_state_dict(legacy_state)

    lengths = torch.tensor([4, 1, 3])
    mask = torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)
    slots = torch.nonzero(mask.flatten()).squeeze(1)
    rows = torch.randn(len(slots), 5)
    with torch.no_grad():
        logits = net(rows, slots, lengths, mask)
        flat = torch.zeros((mask.numel(), 8)).index_copy(0, slots, torch.relu(net.project(rows))).view(3, 4, 8)
        local = torch.relu(net.conv(flat.transpose(1, 2))).transpose(1, 2) * mask.unsqueeze(-1)
        packed, _ = legacy_gru(pack_padded_sequence(local, lengths, batch_first=True, enforce_sorted=False))
        context, _ = pad_packed_sequence(packed, batch_first=True, total_length=4)
        expected = net.head(torch.cat([local, context], dim=-1))
    assert torch.allclose(logits[mask], expected[mask], atol=1e-6)
    assert reversed_slots(lengths, 4).tolist() == [[3, 2, 1, 0], [0, 1, 2, 3], [2, 1, 0, 3]]

