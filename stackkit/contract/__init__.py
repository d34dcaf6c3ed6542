"""The stackkit contract (v5): label order, metric weights and the work-directory layout.

See ``docs/contract.md`` for the formats themselves; this package
is the single place in the code that names files and columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stackkit.contract.hashing import file_sha256  # noqa: F401 - re-exported: the contract's file hash

CONTRACT_VERSION = 5  # v2: v1 plus optional embeddings; v3: optional per-fold test predictions; v4: `base import` needs `fold` or --folds-from-data; v5: task work directories (data/task.json, labels at the unit; docs/contract.md)
# Every --seed: what numpy's and the libraries' seeds accept.
SEED_RANGE = (0, 2**32 - 1)

LABELS: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
# Metric weight per label, in LABELS order: `any` counts twice.
LABEL_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])

SPLITS = ("train", "test")
METADATA_REQUIRED = ("image_id", "patient_id", "study_id", "split", "z")
METADATA_OPTIONAL = (
    "series_id",
    "slice_thickness",
    "pixel_spacing",
    "window_center",
    "window_width",
    "rescale_slope",
    "rescale_intercept",
    "rows",
    "columns",
    "path",
    "modality",
)

# Model names: they become folder names and the first part of feature column names
# (``<model>__<label>__<feature>``), beside the reserved prefixes of the other feature groups.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
RESERVED_MODEL_NAMES = ("slice", "meta", "models")

# The file names of a work directory. Only stackkit/contract/ spells them: everything else asks
# Workdir, PredictionFolder or FoldModelFiles (tests/contract/test_names_owned.py checks it).
OOF_FILE = "oof.parquet"
TEST_FILE = "test.parquet"
MODEL_RECORD = "model.json"  # preds/<model>/model.json
FEATURES_MANIFEST = "manifest.json"  # features/manifest.json
STACKER_RECORD = "meta.json"  # stack/<stacker>/meta.json
DEFAULTS_DIR = "defaults"  # stack/<stacker>/defaults/fold<k>/: a tuned stacker's bagged defaults
FOLD_MODEL_RECORD = "stacker.json"  # stack/<stacker>/fold<k>/stacker.json
BLEND_RECORD = "blend.json"  # stack/blend.json
TASK_RECORD = "task.json"  # data/task.json (v5): the work directory's task
SLICE_LABELS_FILE = "slice_labels.parquet"  # data/slice_labels.parquet (v5, optional): slice-level labels of a task
IMPORTANCE_FILE = "importance.parquet"  # stack/<stacker>/importance.parquet (GBDT stackers)
PROJECTION_FILE = "projection.npz"  # a GBDT fold model's PCA of the base models' embeddings
SCALER_FILE = "scaler.npz"  # a neural fold model's feature scaler
TORCH_MODEL_FILE = "model.pt"  # a neural fold model's state_dict
# a GBDT fold model's booster per label: <label><suffix>
BOOSTER_SUFFIXES = {"lgbm": ".lgb.txt", "xgb": ".xgb.ubj"}


def test_fold_name(fold: int) -> str:
    """``test_fold<k>.parquet`` (v3): fold model k's test predictions, or the features of base fold model k's."""
    return f"test_fold{int(fold)}.parquet"


def check_model_name(name, what: str = "model name") -> str:
    """The one model-name rule of `base train --name` and `base import NAME`; a one-line StackkitError otherwise.

    ``what`` names the option in the message (``--name`` for `base train`)."""
    from stackkit.errors import StackkitError

    text = name if isinstance(name, str) else ""
    if not MODEL_NAME_PATTERN.match(text) or "__" in text:
        raise StackkitError(
            f"{what} {name!r} is not allowed; use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, no '__', at most 100 characters)"
        )
    if text in RESERVED_MODEL_NAMES:
        raise StackkitError(
            f"{what} {name!r} is reserved for feature columns ({', '.join(RESERVED_MODEL_NAMES)}); choose another name"
        )
    return text

EMBEDDINGS_DIR = "embeddings"

DEFAULT_WORKDIR = "artifacts"
WORKDIR_ENV = "STACKKIT_WORKDIR"
THREADS_ENV = "STACKKIT_THREADS"


def env_threads(default: int) -> int:
    """Threads from $STACKKIT_THREADS, else ``default``; a value that is not a positive integer is an error."""
    value = os.environ.get(THREADS_ENV)
    if value is None:
        return int(default)
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        from stackkit.errors import StackkitError

        raise StackkitError(f"${THREADS_ENV}={value!r}: expected a positive integer number of threads")
    return threads


def resolve_workdir(option: str | os.PathLike | None) -> Path:
    """``--workdir`` if given, else ``$STACKKIT_WORKDIR``, else ``artifacts/``."""
    if option:
        return Path(option)
    env = os.environ.get(WORKDIR_ENV)
    return Path(env) if env else Path(DEFAULT_WORKDIR)


@dataclass(frozen=True)
class Workdir:
    """Paths of every contract file under one work directory.

    ``stack_at``: where ``stack/`` is being built (see :meth:`staged_stack`); None for the real one."""

    root: Path
    stack_at: Path | None = None

    def __post_init__(self):
        # Workdir("artifacts") is the natural call from a notebook: accept any path-like
        if not isinstance(self.root, Path):
            object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def resolve(cls, option: str | os.PathLike | None = None) -> "Workdir":
        return cls(resolve_workdir(option))

    @classmethod
    def of(cls, workdir: "Workdir | str | os.PathLike") -> "Workdir":
        """``workdir`` itself, or a path turned into one: what every library entry point accepts."""
        return workdir if isinstance(workdir, cls) else cls(Path(workdir))

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` relative to the work directory (as messages and records name its files); ``path`` itself outside it."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def metadata(self) -> Path:
        return self.data_dir / "metadata.parquet"

    @property
    def labels(self) -> Path:
        return self.data_dir / "labels.parquet"

    @property
    def folds(self) -> Path:
        return self.data_dir / "folds.parquet"

    @property
    def slice_labels(self) -> Path:
        """A task work directory's optional slice-level labels (v5): image_id + some of the task's prediction columns."""
        return self.data_dir / SLICE_LABELS_FILE

    @property
    def task_record(self) -> Path:
        """The work directory's task (v5, optional: none means rsna2019)."""
        return self.data_dir / TASK_RECORD

    @property
    def prepare_record(self) -> Path:
        """What `data prepare` scanned and skipped (optional: a hand-made work directory has none)."""
        return self.data_dir / "prepare.json"

    @property
    def preds_root(self) -> Path:
        return self.root / "preds"

    def preds_dir(self, model: str) -> Path:
        return self.preds_root / model

    def model_folder(self, model: str) -> "PredictionFolder":
        """The files of preds/<model>/."""
        return PredictionFolder(self.preds_dir(model), MODEL_RECORD)

    def oof(self, model: str) -> Path:
        return self.model_folder(model).oof

    def test(self, model: str) -> Path:
        return self.model_folder(model).test

    def test_fold(self, model: str, fold: int) -> Path:
        """preds/<model>/test_fold<k>.parquet (v3, optional): fold model k's test predictions."""
        return self.model_folder(model).test_fold(fold)

    def test_fold_files(self, model: str) -> list[Path]:
        """The model's per-fold test files that exist, fold 0, 1, ... (empty for a model with only test.parquet)."""
        return self.model_folder(model).test_fold_files()

    def model_json(self, model: str) -> Path:
        return self.model_folder(model).record

    def embeddings_dir(self, model: str) -> Path:
        """preds/<model>/embeddings/: optional (v2) pooled CNN features, see stackkit.contract.embeddings."""
        return self.model_folder(model).embeddings_dir

    def oof_embeddings(self, model: str) -> Path:
        return self.model_folder(model).oof_embeddings

    def test_embeddings(self, model: str, fold: int | None = None) -> Path:
        """``test_fold<k>.npy`` of fold model ``fold``, or ``test.npy`` (one embedding per test image) for None."""
        return self.model_folder(model).test_embeddings(fold)

    def model_names(self) -> list[str]:
        """Models under preds/, sorted by name; a model folder without its oof or test file is an error.

        Skipped: names starting with '.' (sets being written; an old set an interrupted switch left
        in place of a missing folder is moved back first) and folders holding nothing but an
        unfinished `base train` (its ``_work/``)."""
        if not self.preds_root.is_dir():
            return []
        from stackkit.contract.io import SET_OLD, recover_set
        from stackkit.errors import ContractError

        for p in list(self.preds_root.iterdir()):
            if p.name.startswith(".") and SET_OLD in p.name:
                recover_set(self.preds_root / p.name[1:].split(SET_OLD)[0], clean=False)
        names = []
        for p in sorted(self.preds_root.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            present = {name: (p / name).is_file() for name in (OOF_FILE, TEST_FILE, MODEL_RECORD)}
            if present[OOF_FILE] and present[TEST_FILE]:
                names.append(p.name)
            elif any(present.values()):
                missing = " and ".join(name for name in (OOF_FILE, TEST_FILE) if not present[name])
                raise ContractError(
                    f"{p}: model '{p.name}' has no {missing}; a model needs both: rerun `base train` or "
                    "`base import --force` for it, or remove the folder"
                )
        return names

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def features_train(self) -> Path:
        return self.features_dir / "train.parquet"

    @property
    def features_test(self) -> Path:
        return self.features_dir / "test.parquet"

    def features_test_fold(self, fold: int) -> Path:
        """features/test_fold<k>.parquet (v3): the test features built from base fold model k's predictions."""
        return self.features_dir / test_fold_name(fold)

    @property
    def features_manifest(self) -> Path:
        return self.features_dir / FEATURES_MANIFEST

    @property
    def stack_root(self) -> Path:
        return self.root / "stack" if self.stack_at is None else self.stack_at

    def staged_stack(self, folder: str | os.PathLike) -> "Workdir":
        """This work directory with its stack/ paths under ``folder``: the sibling set folder in which
        `stack fit` builds the new stack/ before switching it in (everything else unchanged)."""
        return dataclasses.replace(self, stack_at=Path(folder))

    def published(self, path: str | os.PathLike) -> Path:
        """``path`` as it will be named once a staged stack/ is switched in (``path`` itself otherwise)."""
        path = Path(path)
        if self.stack_at is not None and path.is_relative_to(self.stack_at):
            return self.root / "stack" / path.relative_to(self.stack_at)
        return path

    def stack_dir(self, stacker: str) -> Path:
        return self.stack_root / stacker

    def stacker_folder(self, stacker: str) -> "PredictionFolder":
        """The files of stack/<stacker>/: its predictions, meta.json and fold models."""
        return PredictionFolder(self.stack_dir(stacker), STACKER_RECORD)

    @property
    def blend(self) -> Path:
        return self.stack_root / BLEND_RECORD

    @property
    def report_html(self) -> Path:
        return self.stack_root / "report.html"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def optuna_journal(self) -> Path:
        return self.root / "optuna" / "journal.log"


@dataclass(frozen=True)
class PredictionFolder:
    """The files of one prediction folder: preds/<model>/ (record ``model.json``), stack/<stacker>/
    (record ``meta.json``), or the sibling folder such a set is being written into."""

    path: Path
    record_name: str = MODEL_RECORD

    def __post_init__(self):
        if not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))

    @property
    def oof(self) -> Path:
        return self.path / OOF_FILE

    @property
    def test(self) -> Path:
        return self.path / TEST_FILE

    def test_fold(self, fold: int) -> Path:
        return self.path / test_fold_name(fold)

    def test_fold_files(self) -> list[Path]:
        """The per-fold test files that exist, fold 0, 1, ... (empty for a folder with only test.parquet)."""
        found = []
        while self.test_fold(len(found)).is_file():
            found.append(self.test_fold(len(found)))
        return found

    def present_test_folds(self) -> list[str]:
        """Names of every ``test_fold*.parquet`` present, sorted (a partial or overlong set included)."""
        return sorted(p.name for p in self.path.glob("test_fold*.parquet"))

    @property
    def record(self) -> Path:
        return self.path / self.record_name

    @property
    def embeddings_dir(self) -> Path:
        """A base model's embeddings/ (v2, optional)."""
        return self.path / EMBEDDINGS_DIR

    @property
    def oof_embeddings(self) -> Path:
        return self.embeddings_dir / "oof.npy"

    def test_embeddings(self, fold: int | None = None) -> Path:
        """``test_fold<k>.npy`` of fold model ``fold``, or ``test.npy`` (one embedding per test image) for None."""
        return self.embeddings_dir / ("test.npy" if fold is None else f"test_fold{int(fold)}.npy")

    @property
    def importance(self) -> Path:
        return self.path / IMPORTANCE_FILE

    def fold_model(self, fold: int) -> "FoldModelFiles":
        """A stacker's fold model k: stack/<stacker>/fold<k>/."""
        return FoldModelFiles(self.path / f"fold{int(fold)}")

    def defaults_fold_model(self, fold: int) -> "FoldModelFiles":
        """A tuned stacker's bagged defaults, fold model k: stack/<stacker>/defaults/fold<k>/."""
        return FoldModelFiles(self.path / DEFAULTS_DIR / f"fold{int(fold)}")


@dataclass(frozen=True)
class FoldModelFiles:
    """The files of one stacker fold model's folder (``stack/<stacker>/fold<k>/``, or any folder
    ``Stacker.save`` is given): each with a sha256 sidecar (``contract.io.sidecar``)."""

    path: Path

    def __post_init__(self):
        if not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))

    @property
    def record(self) -> Path:
        return self.path / FOLD_MODEL_RECORD

    @property
    def projection(self) -> Path:
        return self.path / PROJECTION_FILE

    @property
    def scaler(self) -> Path:
        return self.path / SCALER_FILE

    @property
    def torch_model(self) -> Path:
        return self.path / TORCH_MODEL_FILE

    def booster(self, stacker: str, label: str) -> Path:
        """A GBDT stacker's booster of ``label`` (``<label>.lgb.txt``, ``<label>.xgb.ubj``)."""
        return self.path / f"{label}{BOOSTER_SUFFIXES[stacker]}"


def folds_hash(image_ids, folds) -> str:
    """sha256 of the (image_id, fold) pairs sorted by image_id: identifies one fold assignment."""
    ids = np.asarray(image_ids, dtype=object)
    fold_values = np.asarray(folds, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    digest = hashlib.sha256()
    digest.update("\n".join(f"{i},{f}" for i, f in zip(ids[order], fold_values[order])).encode())
    return digest.hexdigest()


def slice_order(study_codes: np.ndarray, z: np.ndarray, image_ids, leading: np.ndarray | None = None) -> np.ndarray:
    """Row order of the contract's slice order: by (``leading``, study, z), ties on z by image_id.

    ``study_codes`` are integer codes of the study ids (any consistent coding). Ties on z are rare,
    so only the tied rows are ordered by image_id (sorting every string id would dominate the cost).
    """
    import pandas as pd

    keys = (z, study_codes) if leading is None else (z, study_codes, leading)
    order = np.lexsort(keys)
    s_sorted = study_codes[order]
    tied = (s_sorted[1:] == s_sorted[:-1]) & (z[order][1:] == z[order][:-1])
    if leading is not None:
        tied &= leading[order][1:] == leading[order][:-1]
    if tied.any():
        in_tie = np.zeros(len(order), dtype=bool)
        in_tie[1:] |= tied
        in_tie[:-1] |= tied
        tie_pos = np.flatnonzero(in_tie)
        # a run of equal (study, z) starts where the previous row is not its tie
        run_start = np.ones(len(tie_pos), dtype=bool)
        run_start[1:] = ~tied[tie_pos[1:] - 1]
        run_id = np.cumsum(run_start)
        id_rank = np.asarray(pd.Index(np.asarray(image_ids, dtype=object)[order[tie_pos]], dtype=object).argsort())
        rank_of = np.empty_like(id_rank)
        rank_of[id_rank] = np.arange(len(id_rank))
        order[tie_pos] = order[tie_pos][np.lexsort((rank_of, run_id))]
    return order


# The layout relative to any work directory's root: how code without a Workdir at hand (kernels
# over frames) names a contract file in a message, e.g. ``str(RELATIVE.folds)``.
RELATIVE = Workdir(Path())
