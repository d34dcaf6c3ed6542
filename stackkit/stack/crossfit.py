"""Fitting one level-2 stacker over the contract's folds: the plain library layer.

``load_stack_inputs`` reads features/ + data/ and refuses features built on other folds;
``fit_stacker`` fits one model per fold on the other folds (early stopping on an inner split of
those training folds, grouped by patient, never on the held-out fold) and collects OOF and test
predictions; ``save_stacker_result`` / ``load_stacker_models`` write and read stack/<name>/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from stackkit.contract import LABELS, RELATIVE, PredictionFolder, Workdir, file_sha256, folds_hash
from stackkit.contract.columns import TEST_KEY_COLUMNS, TRAIN_KEY_COLUMNS
from stackkit.errors import ContractError, LeakageError, StackkitError
from stackkit.contract.io import read_table, recover_set, replace_dir, verify_set, write_parquet
from stackkit.contract.records import (FeaturesManifest, StackerRecord, manifest_test_fold_paths, read_features_manifest,
                                       read_stacker_record, write_stacker_record)
from stackkit.contract.records.features import RERUN_FEATURES
from stackkit.metric import Score, weighted_log_loss
from stackkit.stack.folds import EARLY_STOPPING_FRACTION, FoldJobs, early_stopping_split, fold_models
from stackkit.stack.stackers import STACKERS, StackData, Stacker, get_stacker
from stackkit.stack.stackers.base import default_threads
from stackkit.contract.validate import check_id_coverage, check_ids, load_core, require_columns, validate_predictions

# Share of the training folds' patients held out for early stopping.


def check_feature_inputs(wd: Workdir, manifest: FeaturesManifest) -> None:
    """Refuse features built from inputs that changed since: every file the manifest hashed must be unchanged.

    Also refuses a model folder that lost its test (or oof) file (``Workdir.model_names``) or whose
    files are not the ones its model.json lists (the blend reads them too)."""
    from stackkit.contract.validate import verify_model_files

    for model in wd.model_names():
        verify_model_files(wd, model)
    for rel, recorded in manifest.inputs.items():
        path = wd.root / rel
        parts = Path(rel).parts
        what = f"model '{parts[1]}'" if len(parts) == 3 and parts[0] == wd.preds_root.name else rel
        if not path.is_file():
            raise ContractError(f"features/manifest.json: input {rel} ({what}) no longer exists; {RERUN_FEATURES}")
        if file_sha256(path) != recorded:
            raise ContractError(
                f"features/manifest.json: {rel} ({what}) changed after the features were built (sha256 differs); {RERUN_FEATURES}"
            )


@dataclass
class StackInputs:
    """Everything a stacker fit needs, aligned row by row with features/train.parquet."""

    train_keys: pd.DataFrame  # image_id, study_id, patient_id, fold, slice_index
    test_keys: pd.DataFrame  # image_id, study_id, slice_index
    train: StackData  # features + labels (joined from data/labels.parquet on image_id)
    test: StackData
    feature_columns: list[str]
    manifest: FeaturesManifest
    folds_hash: str
    embedding_models: tuple[str, ...] = ()  # base models whose embeddings train/test carry (contract v2)
    # v3: features/test_fold<k>.parquet, the test features once per base fold model (empty: only test.parquet)
    test_fold_paths: tuple[Path, ...] = ()
    _early_stopping: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def folds(self) -> np.ndarray:
        return self.train_keys["fold"].to_numpy()

    @functools.cached_property
    def groups(self) -> np.ndarray:
        """Patient per train row, the unit no split may cut, as an integer code in sorted id order:
        a group split over the codes is the split over the ids (both sort alike), without turning
        the ids into Python strings and hashing them again at every fold."""
        codes, _ = pd.factorize(self.train_keys["patient_id"], sort=True)
        return codes

    @property
    def n_folds(self) -> int:
        return int(self.folds.max()) + 1

    def early_stopping_rows(self, held_out_fold: int, seed: int, exclude_fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`early_stopping_split` of these rows, made once per (fold, seed, excluded fold): every
        stacker and trial of a `stack fit` splits alike, and a split is not redrawn for each."""
        key = (int(held_out_fold), int(seed), None if exclude_fold is None else int(exclude_fold))
        if key not in self._early_stopping:
            self._early_stopping[key] = early_stopping_split(self.folds, self.groups, *key[:2], exclude_fold=key[2])
        return self._early_stopping[key]

    @property
    def n_test_sets(self) -> int:
        return max(1, len(self.test_fold_paths))

    def test_sets(self):
        """The test rows once per base fold model's predictions (features/test_fold<k>.parquet, each
        with fold model k's embeddings), so every test row is built like an OOF row; else ``test`` once.

        Read one at a time (at RSNA size each is ~0.7 GB), in ``test``'s row order (checked)."""
        from dataclasses import replace

        if not self.test_fold_paths:
            yield self.test
            return
        expected_ids = self.test_keys["image_id"].to_numpy(dtype=object)
        for k, path in enumerate(self.test_fold_paths):
            source = str(RELATIVE.features_test_fold(k))
            frame = read_table(path, what="features file", columns=["image_id", *self.feature_columns])
            require_columns(frame, self.feature_columns, source, f"features/manifest.json lists them; {RERUN_FEATURES}")
            ids = frame["image_id"].to_numpy(dtype=object)
            if len(ids) != len(expected_ids) or not np.array_equal(ids, expected_ids):
                raise ContractError(f"{source}: its rows are not the images of features/test.parquet in the same order; {RERUN_FEATURES}")
            embeddings = self.test.embeddings
            if len(embeddings) == len(self.test_fold_paths):  # base fold model k's features with its own embeddings
                embeddings = (embeddings[k],)
            yield replace(self.test, X=frame[self.feature_columns].to_numpy(dtype=np.float32), embeddings=embeddings)
            del frame


@dataclass
class StackerResult:
    name: str
    oof: pd.DataFrame  # image_id, fold, six float32 labels (contract prediction format)
    test: pd.DataFrame  # image_id, six float32 labels: mean over the fold models
    score: Score
    fold_scores: list[float]
    models: list[Stacker]
    importance: pd.DataFrame | None  # feature + six labels: mean gain over folds (GBDTs only)
    params: dict
    seconds: float
    feature_columns: list[str]
    folds_hash: str
    tuning: dict | None = None  # with --tune: outer fold, its honest and the defaults' scores, the selected trial's inner CV
    # v3: per base fold model's test set, the mean over the fold models (empty: one averaged test set)
    test_folds: list = field(default_factory=list)
    # a tuned stacker bagged with its defaults (tune.tune_stacker): the defaults' fold models, whose predictions
    # are averaged with those of ``models`` (saved in stack/<name>/defaults/fold<k>/); empty otherwise
    defaults_models: list = field(default_factory=list)


def features_frame(path: Path, key_columns, feature_columns, wd: Workdir, id_column: str = "image_id") -> pd.DataFrame:
    """A features table: its key columns, each ``id_column`` once (a unit task's: the unit's), the manifest's numeric features."""
    source = wd.relative(path)
    frame = read_table(path, what="features file")
    require_columns(frame, key_columns, source, RERUN_FEATURES)
    require_columns(frame, feature_columns, source, f"features/manifest.json lists them; {RERUN_FEATURES}")
    frame = check_ids(frame, source, column=id_column)
    for column in feature_columns:
        if not (pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column])):
            raise ContractError(f"{source}: feature column '{column}' has dtype {frame[column].dtype}; expected float32: {RERUN_FEATURES}")
    return frame


def checked_features_manifest(wd: Workdir, folds: pd.DataFrame) -> tuple[FeaturesManifest, str, list]:
    """The features manifest, the current folds hash and its feature columns, once the set is checked against data/."""
    recover_set(wd.features_dir, clean=False)
    for path in (wd.features_manifest, wd.features_train, wd.features_test):
        if not path.is_file():
            raise StackkitError(f"{path}: not found; run `stack features` first")
    manifest = read_features_manifest(wd)
    current_hash = folds_hash(folds["image_id"].to_numpy(dtype=object), folds["fold"].to_numpy())
    if manifest.folds_hash != current_hash:
        raise LeakageError(
            f"{wd.relative(wd.features_manifest)}: folds_hash {str(manifest.folds_hash)[:12]}... differs from {wd.relative(wd.folds)} "
            f"({current_hash[:12]}...): features were built from a different folds file: {RERUN_FEATURES}"
        )
    check_feature_inputs(wd, manifest)
    return manifest, current_hash, manifest.feature_columns


def _expected_folds(train: pd.DataFrame, folds: pd.DataFrame) -> np.ndarray:
    """data/folds.parquet's fold per features/train.parquet row, once the table's own fold column agrees with it."""
    fold_of = folds.set_index("image_id")["fold"]
    expected_fold = fold_of.reindex(train["image_id"]).to_numpy()
    given_fold = pd.to_numeric(train["fold"], errors="coerce").to_numpy()
    disagree = given_fold != expected_fold
    if disagree.any():
        pos = int(np.argmax(disagree))
        raise LeakageError(
            f"features/train.parquet: fold {given_fold[pos]:g} at row {pos + 1} (image_id {train['image_id'].iloc[pos]}) disagrees "
            f"with data/folds.parquet (fold {expected_fold[pos]}): features were built from a different folds file: {RERUN_FEATURES}"
        )
    return expected_fold


def _key_frames(
    train: pd.DataFrame, test: pd.DataFrame, metadata: pd.DataFrame, expected_fold: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (train, test) key frames: ids, study, slice position, and for train the patient and fold."""
    patient_of = metadata.set_index("image_id")["patient_id"]
    train_keys = pd.DataFrame(
        {
            "image_id": train["image_id"].to_numpy(dtype=object),
            "study_id": train["study_id"].astype(str).to_numpy(dtype=object),
            "patient_id": patient_of.reindex(train["image_id"]).to_numpy(dtype=object),
            "fold": expected_fold.astype(np.int8),
            "slice_index": train["slice_index"].to_numpy(dtype=np.int64),
        }
    )
    test_keys = pd.DataFrame(
        {
            "image_id": test["image_id"].to_numpy(dtype=object),
            "study_id": test["study_id"].astype(str).to_numpy(dtype=object),
            "slice_index": test["slice_index"].to_numpy(dtype=np.int64),
        }
    )
    return train_keys, test_keys


def _stack_data(
    train: pd.DataFrame, test: pd.DataFrame, train_keys: pd.DataFrame, test_keys: pd.DataFrame, labels: pd.DataFrame, feature_columns: list
) -> tuple[StackData, StackData]:
    """The (train, test) :class:`StackData`, with study codes shared across both and labels joined on image_id."""
    Y = labels.set_index("image_id").reindex(train["image_id"])[list(LABELS)].to_numpy(dtype=np.float32)
    study_codes, _ = pd.factorize(pd.concat([train_keys["study_id"], test_keys["study_id"]], ignore_index=True))
    train_data = StackData(
        X=train[feature_columns].to_numpy(dtype=np.float32),
        study_codes=study_codes[: len(train)],
        slice_index=train_keys["slice_index"].to_numpy(),
        Y=Y,
        image_ids=train_keys["image_id"].to_numpy(),
        feature_names=tuple(feature_columns),
    )
    test_data = StackData(
        X=test[feature_columns].to_numpy(dtype=np.float32),
        study_codes=study_codes[len(train) :],
        slice_index=test_keys["slice_index"].to_numpy(),
        image_ids=test_keys["image_id"].to_numpy(),
        feature_names=tuple(feature_columns),
    )
    return train_data, test_data


def _with_embeddings(
    wd: Workdir, manifest: FeaturesManifest, folds: pd.DataFrame, train_keys: pd.DataFrame, test_keys: pd.DataFrame, train_data: StackData, test_data: StackData
) -> tuple[StackData, StackData, tuple[str, ...]]:
    """(train, test, embedding models): the data with the features' models' embeddings attached, unchanged where none were exported."""
    from dataclasses import replace

    from stackkit.stack.embeddings import load_embedding_sets

    embedding_models: tuple[str, ...] = ()
    models = manifest.models if manifest.models is not None else wd.model_names()
    n_folds = int(folds["fold"].max()) + 1
    train_sets, test_sets = load_embedding_sets(wd, models, train_keys["image_id"].to_numpy(), test_keys["image_id"].to_numpy(), n_folds)
    if train_sets:
        train_data = replace(train_data, embeddings=train_sets)
        test_data = replace(test_data, embeddings=test_sets)
        embedding_models = tuple(train_sets[0].names)
    return train_data, test_data, embedding_models


def load_stack_inputs(workdir, *, use_embeddings: bool = True, core=None) -> StackInputs:
    """features/*.parquet + manifest + data/ -> :class:`StackInputs`, checked for fold leakage.

    With ``use_embeddings`` (``stack fit --no-embeddings`` turns it off), the embeddings of every
    model of the features that exported them are attached to ``train``/``test`` (hash-checked,
    memory-mapped; see :mod:`stackkit.stack.embeddings`); stackers that cannot use them ignore them.
    ``core``: (metadata, labels, folds) from ``load_core`` when the caller has read them already.
    """
    wd = Workdir.of(workdir)
    metadata, labels, folds = load_core(wd) if core is None else core
    manifest, current_hash, feature_columns = checked_features_manifest(wd, folds)

    train = features_frame(wd.features_train, TRAIN_KEY_COLUMNS, feature_columns, wd)
    test = features_frame(wd.features_test, TEST_KEY_COLUMNS, feature_columns, wd)
    if manifest.sha256 is not None:  # written by `stack features` as a set: the tables must be the ones this manifest lists
        verify_set(wd.features_dir, wd.relative(wd.features_manifest), manifest.sha256, remedy=RERUN_FEATURES)
    check_id_coverage(train["image_id"], folds["image_id"], wd.relative(wd.features_train), "labeled")
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    check_id_coverage(test["image_id"], test_ids, wd.relative(wd.features_test), "test")

    expected_fold = _expected_folds(train, folds)
    train_keys, test_keys = _key_frames(train, test, metadata, expected_fold)
    train_data, test_data = _stack_data(train, test, train_keys, test_keys, labels, feature_columns)
    from stackkit.stack.inputs import check_labels

    check_labels(train_data, "training")  # labels.parquet is validated already; this guards the join
    embedding_models: tuple[str, ...] = ()
    if use_embeddings:
        train_data, test_data, embedding_models = _with_embeddings(wd, manifest, folds, train_keys, test_keys, train_data, test_data)
    test_fold_paths = manifest_test_fold_paths(wd, manifest)
    return StackInputs(train_keys, test_keys, train_data, test_data, list(feature_columns), manifest, current_hash, embedding_models,
                       test_fold_paths)




class FoldPruned(Exception):
    """Raised by an ``on_fold`` callback to stop a K-fold fit early (an Optuna trial that is pruned)."""


@dataclass(frozen=True)
class CrossFitOptions:
    """:func:`fit_stacker`'s keywords: what to fit (``folds``, ``exclude_fold``) and how (seed, caches, callback)."""

    seed: int = 0
    progress: bool = True
    folds: list[int] | None = None
    on_fold: Callable[[int, float], None] | None = None
    caches: dict | None = None
    predict_test: bool = True
    exclude_fold: int | None = None


def fit_stacker(name: str, params: dict | None, inputs: StackInputs, options: CrossFitOptions | None = None,
                **fields) -> StackerResult:
    """K-fold fit of stacker ``name``: OOF for every train image, test = mean of the fold models.

    The keywords are :class:`CrossFitOptions`' fields (or pass ``options``; ``fields`` then override it).
    ``folds``: fit only these held-out folds (the other rows' OOF stay NaN). ``exclude_fold``:
    its rows are never trained, early-stopped on or predicted (tuning's outer fold: a trial is
    cross-validated over the other folds only); ``folds`` must leave it out. ``on_fold(k, fold_loss)``
    after each fold may raise :class:`FoldPruned`. ``caches``: {fold: dict} kept across calls
    with the same ``exclude_fold`` (see ``Stacker.fit``).
    """
    options = CrossFitOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    seed, progress, folds, on_fold = options.seed, options.progress, options.folds, options.on_fold
    caches, predict_test, exclude_fold = options.caches, options.predict_test, options.exclude_fold
    started = time.perf_counter()
    resolved = get_stacker(name).resolve_params(params)
    fold_of_row = inputs.folds
    wanted = list(range(inputs.n_folds)) if folds is None else [int(k) for k in folds]
    if exclude_fold is not None and int(exclude_fold) in wanted:
        raise StackkitError(f"fit_stacker: fold {exclude_fold} is excluded from training and cannot be held out too")
    oof = np.full((len(inputs.train), len(LABELS)), np.nan, dtype=np.float32)
    models, fold_scores, gains = [], [], []
    fitted = fold_models(name, resolved, wanted, FoldJobs(inputs, seed, exclude_fold), caches, sequential=on_fold is not None, progress=progress)
    for k, stacker in fitted:
        held_rows = np.flatnonzero(fold_of_row == k)
        oof[held_rows] = stacker.predict(inputs.train.take(held_rows))
        fold_scores.append(weighted_log_loss(inputs.train.Y[held_rows], oof[held_rows]).overall)
        models.append(stacker)
        gain = stacker.feature_importance()
        if gain is not None:
            gains.append(gain)
        if on_fold is not None:
            on_fold(k, fold_scores[-1])

    oof_frame = _prediction_frame(inputs.train_keys["image_id"].to_numpy(), oof, fold_of_row)
    test_ids = inputs.test_keys["image_id"].to_numpy()
    set_predictions = predict_test_sets(models, inputs) if predict_test else [np.zeros((len(inputs.test), len(LABELS)))]
    test_frame = _prediction_frame(test_ids, np.mean(set_predictions, axis=0))
    test_folds = [_prediction_frame(test_ids, p) for p in set_predictions] if len(set_predictions) > 1 else []
    importance = None
    if gains:
        importance = pd.DataFrame(np.mean(gains, axis=0), columns=list(LABELS))
        importance.insert(0, "feature", inputs.feature_columns)
    scored = np.isin(fold_of_row, wanted)
    return StackerResult(
        name=name,
        oof=oof_frame,
        test=test_frame,
        test_folds=test_folds,
        score=weighted_log_loss(inputs.train.Y[scored], oof[scored]),
        fold_scores=fold_scores,
        models=models,
        importance=importance,
        params=resolved,
        seconds=time.perf_counter() - started,
        feature_columns=list(inputs.feature_columns),
        folds_hash=inputs.folds_hash,
    )


def bag_results(selected: StackerResult, defaults: StackerResult, inputs: StackInputs) -> StackerResult:
    """``selected`` bagged with ``defaults`` (both fitted over every fold of ``inputs``, test sets predicted):
    every prediction the mean of the two recipes', its scores recomputed; ``selected``'s parameters and
    fold models, ``defaults``' fold models kept beside them (``defaults_models``)."""
    labels = list(LABELS)

    def mean_of(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
        if not np.array_equal(a["image_id"].to_numpy(), b["image_id"].to_numpy()):
            raise StackkitError(f"stacker '{selected.name}': the two recipes predicted other rows; they cannot be bagged")
        mean = a.copy()
        mean[labels] = ((a[labels].to_numpy(np.float64) + b[labels].to_numpy(np.float64)) / 2.0).astype(np.float32)
        return mean

    if len(selected.test_folds) != len(defaults.test_folds) or len(selected.models) != len(defaults.models):
        raise StackkitError(f"stacker '{selected.name}': the two recipes have other fold models or test sets; they cannot be bagged")
    oof = mean_of(selected.oof, defaults.oof)
    probabilities, fold_of_row = oof[labels].to_numpy(), inputs.folds
    fold_scores = [weighted_log_loss(inputs.train.Y[fold_of_row == k], probabilities[fold_of_row == k]).overall
                   for k in range(inputs.n_folds) if np.any(fold_of_row == k)]
    importance = selected.importance
    if importance is not None and defaults.importance is not None:
        importance = importance.copy()
        importance[labels] = (selected.importance[labels].to_numpy() + defaults.importance[labels].to_numpy()) / 2.0
    return dataclasses.replace(
        selected, oof=oof, test=mean_of(selected.test, defaults.test),
        test_folds=[mean_of(a, b) for a, b in zip(selected.test_folds, defaults.test_folds)],
        score=weighted_log_loss(inputs.train.Y, probabilities), fold_scores=fold_scores, importance=importance,
        seconds=selected.seconds + defaults.seconds, defaults_models=list(defaults.models))


def predict_test_sets(models: list[Stacker], inputs: StackInputs) -> list[np.ndarray]:
    """Per test set (one per base fold model, or the averaged one), the mean of the stacker's fold models' predictions."""
    from concurrent.futures import ThreadPoolExecutor

    # a single-threaded stacker (seq) predicts with several fold models at once, on threads: torch
    # releases the GIL in its operations, and each model's predictions are the same as alone
    threads = min(len(models), default_threads()) if models and models[0].fits_folds_apart(models[0].params) else 1
    out = []
    with ThreadPoolExecutor(max(1, threads)) as pool, (models[0].prediction_scope() if models else contextlib.nullcontext()):
        for data in inputs.test_sets():
            total = np.zeros((len(data), len(LABELS)), dtype=np.float64)
            for predictions in pool.map(lambda model: model.predict(data), models):  # fold order: the same sum, the same bits
                total += predictions
            out.append(total / max(1, len(models)))
    return out


def _prediction_frame(image_ids: np.ndarray, probabilities: np.ndarray, fold: np.ndarray | None = None) -> pd.DataFrame:
    """image_id [, fold as int8], the six float32 probabilities."""
    frame = pd.DataFrame(np.asarray(probabilities, dtype=np.float32), columns=list(LABELS))
    if fold is not None:
        frame.insert(0, "fold", fold.astype(np.int8))
    frame.insert(0, "image_id", image_ids)
    return frame


def save_stacker_result(workdir, result: StackerResult, core=None) -> None:
    """stack/<name>/: oof.parquet, test.parquet, fold<k>/ models (+ sha256 sidecars), meta.json (last).

    ``core``: (metadata, labels, folds) from ``load_core`` when the caller has read them already."""
    wd = Workdir.of(workdir)
    metadata, _labels, folds = load_core(wd) if core is None else core
    if result.folds_hash != folds_hash(folds["image_id"].to_numpy(dtype=object), folds["fold"].to_numpy()):
        raise LeakageError(f"stacker '{result.name}' was fitted on other folds than data/folds.parquet; refit with `stack fit`")
    published = wd.published(wd.stack_dir(result.name))  # stack/<name>, also while stack/ is being built
    named = PredictionFolder(Path(wd.relative(published)))  # how messages name its files
    oof = validate_predictions(result.oof, str(named.oof), expected_ids=folds["image_id"], what="labeled", folds=folds)
    test_ids = metadata.loc[metadata["split"] == "test", "image_id"]
    test = validate_predictions(result.test, str(named.test), expected_ids=test_ids, what="test")
    record = StackerRecord(stacker=result.name, params=result.params, score=result.score.as_dict(), fold_scores=result.fold_scores,
                           seconds=result.seconds, n_folds=len(result.models), n_test_folds=len(result.test_folds),
                           feature_columns=result.feature_columns, folds_hash=result.folds_hash, tuning=result.tuning,
                           created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    # stack/<name>/ is replaced as a set: fold models, predictions and meta.json (last, with the
    # sha256 of every other file) go into a sibling folder switched in at once, so a fold never
    # holds models of two runs and the predictions always belong to the models beside them.
    with replace_dir(wd.stack_dir(result.name)) as folder:
        files = PredictionFolder(folder)
        for k, model in enumerate(result.models):
            model.save(files.fold_model(k).path)
        for k, model in enumerate(result.defaults_models):
            model.save(files.defaults_fold_model(k).path)
        write_parquet(oof, files.oof)
        write_parquet(test, files.test)
        for k, fold_test in enumerate(result.test_folds):
            fold_test = validate_predictions(fold_test, str(named.test_fold(k)), expected_ids=test_ids, what="test")
            write_parquet(fold_test, files.test_fold(k))
        if result.importance is not None:
            write_parquet(result.importance, files.importance)
        write_stacker_record(folder, record)


def load_stacker_models(workdir, name: str, *, defaults: bool = False) -> list[Stacker]:
    """The fold models of stack/<name>/, each verified against its sha256 sidecars; ``defaults``: those of the
    defaults bagged with a tuned recipe (stack/<name>/defaults/fold<k>/), whose predictions are averaged with them."""
    wd = Workdir.of(workdir)
    if name not in STACKERS:
        get_stacker(name)  # raises the one-line "unknown stacker" error
    files = wd.stacker_folder(name)
    recover_set(files.path, clean=False)
    record = read_stacker_record(files.path, name)
    if not defaults:
        return [STACKERS[name].load(files.fold_model(k).path) for k in range(record.n_folds)]
    if not (record.tuning or {}).get("bagged"):
        raise StackkitError(f"{wd.relative(files.record)}: stacker '{name}' holds no bagged defaults (a `stack fit --tune` bags "
                            "them only when a trial other than the defaults was selected); load its fold models without defaults")
    return [STACKERS[name].load(files.defaults_fold_model(k).path) for k in range(record.n_folds)]
