"""The feature-column schema and grammar (contract: docs/contract.md, "features/"): names, prefixes,
definitions and how a study reversed in z maps the columns onto each other.

A column is ``slice__<feature>``, ``meta__<dicom column>``, ``models__<label>__<aggregate>``
(across models) or ``<model>__<label>__<feature>``; :func:`feature_columns` lists them in order
with their definitions (written into features/manifest.json), :func:`split_column` reads a name
back into its parts (`stack features` writes the names, the stackers read them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from stackkit.contract import LABELS, RESERVED_MODEL_NAMES
from stackkit.errors import StackkitError

TOP_K = 3
ROLL_WINDOWS = (3, 5)
FEATURE_SETS = ("basic", "wide")
WIDE_ROLL_WINDOWS = (7, 9)  # besides ROLL_WINDOWS, in the wide set
DICOM_META_COLUMNS = ("slice_thickness", "pixel_spacing", "window_center", "window_width")
TRAIN_KEY_COLUMNS = ("image_id", "study_id", "fold", "slice_index")
TEST_KEY_COLUMNS = ("image_id", "study_id", "slice_index")
# Column-name prefixes of the non-model features; a model of that name would be ambiguous.
SLICE_PREFIX = "slice"
META_PREFIX = "meta"
MODELS_PREFIX = "models"
# the contract's model-name rule (stackkit.contract.check_model_name) refuses exactly these
assert set(RESERVED_MODEL_NAMES) == {SLICE_PREFIX, META_PREFIX, MODELS_PREFIX}

SEPARATOR = "__"


@dataclass(frozen=True)
class FeatureColumn:
    """A feature column's name in parts: ``group`` is ``slice``, ``meta``, ``models`` or a model's name;
    ``label`` the label of a per-label column (None for slice and meta columns)."""

    group: str
    label: str | None
    feature: str

    @property
    def per_model(self) -> bool:
        """One model's column (``<model>__<label>__<feature>``), not an across-model aggregate."""
        return self.label is not None and self.group != MODELS_PREFIX


def split_column(name) -> FeatureColumn | None:
    """The parts of a feature column name; None for a name outside the grammar (e.g. a column added by hand)."""
    parts = str(name).split(SEPARATOR)
    if len(parts) == 2 and parts[0] in (SLICE_PREFIX, META_PREFIX):
        return FeatureColumn(parts[0], None, parts[1])
    if len(parts) == 3 and parts[1] in LABELS and parts[0] not in (SLICE_PREFIX, META_PREFIX):
        return FeatureColumn(*parts)
    return None


def column_name(group: str, label: str | None, feature: str) -> str:
    """The inverse of :func:`split_column`."""
    return SEPARATOR.join([group, feature] if label is None else [group, label, feature])


SLICE_FEATURES = {
    "position": "relative position in the study along z: slice_index / (n - 1), 0 = lowest z, 1 = highest z; 0.5 for a 1-slice study",
    "index": "0-based position in the study ordered by z (ties by image_id)",
    "reverse_index": "0-based position counted from the highest z: n - 1 - slice_index",
    "count": "number of slices (images) in the study",
    "z_gap_prev": "z of this slice minus z of the previous slice in z order (NaN for the first slice)",
    "z_gap_next": "z of the next slice minus z of this slice in z order (NaN for the last slice)",
    "z_duplicates": "number of slices of the study sharing this slice's z (1 when unique)",
}


def roll_windows(feature_set: str = "basic") -> tuple[int, ...]:
    """The centered rolling-mean windows of a feature set."""
    return ROLL_WINDOWS + (WIDE_ROLL_WINDOWS if feature_set == "wide" else ())


def _roll_text(w: int) -> str:
    return f"centered mean over {w} slices in z order, truncated at the study's edges (mean of the available slices)"


def model_feature_names(lags: int, feature_set: str = "basic") -> list[tuple[str, str]]:
    """(feature, definition) pairs computed for every model and label, in column order.

    ``wide`` is ``basic`` followed by its own columns, so a basic column keeps its name and text.
    """
    check_feature_set(feature_set)
    out = [("pred", "the model's predicted probability")]
    out += [(f"lag{k}", f"prediction of the slice {k} below in z order (NaN past the study's first slice)") for k in range(1, lags + 1)]
    out += [(f"lead{k}", f"prediction of the slice {k} above in z order (NaN past the study's last slice)") for k in range(1, lags + 1)]
    out += [(f"diff_lag{k}", f"pred - lag{k}") for k in range(1, lags + 1)]
    out += [(f"diff_lead{k}", f"pred - lead{k}") for k in range(1, lags + 1)]
    out += [
        ("study_max", "maximum prediction over the study's slices"),
        ("study_mean", "mean prediction over the study's slices"),
        ("study_std", "population standard deviation (ddof=0) of the predictions over the study's slices; 0 for a 1-slice study"),
        (f"study_top{TOP_K}_mean", f"mean of the min({TOP_K}, n) largest predictions of the study"),
        ("study_rank", "average 1-based rank of the prediction among the study's slices (ties share the mean of their ranks) divided by n; the maximum gets 1.0"),
    ]
    out += [(f"roll{w}_mean", _roll_text(w)) for w in ROLL_WINDOWS]
    if feature_set == "wide":
        out += [
            ("study_min", "minimum prediction over the study's slices"),
            ("minus_study_mean", "pred - study_mean: the prediction minus the mean prediction over the study's slices"),
            ("minus_study_max", "pred - study_max: the prediction minus the maximum prediction over the study's slices (0 at the maximum)"),
        ]
        out += [(f"roll{w}_mean", _roll_text(w)) for w in WIDE_ROLL_WINDOWS]
    return out


def check_feature_set(feature_set) -> None:
    """A one-line error for a feature set that is not one of :data:`FEATURE_SETS`."""
    if feature_set not in FEATURE_SETS:
        raise StackkitError(f"--feature-set: expected one of {', '.join(FEATURE_SETS)}, got {feature_set!r}")


# Features that depend on the direction of the study along z, and what reversing the study makes of them.
_SWAP_SLICE = {"z_gap_prev": "z_gap_next", "z_gap_next": "z_gap_prev", "index": "reverse_index", "reverse_index": "index"}
_COMPLEMENT_SLICE = ("position",)  # p -> 1 - p
_DIRECTIONAL = re.compile(r"^(?P<prefix>diff_)?(?P<side>lag|lead)(?P<k>\d+)$")


def reversal_map(columns) -> tuple[np.ndarray, np.ndarray]:
    """How features change when a study is reversed in z: (source, complement).

    The reversed study's column j is column ``source[j]`` of the original (``lag<k>`` <->
    ``lead<k>``, ``diff_lag<k>`` <-> ``diff_lead<k>``, ``z_gap_prev`` <-> ``z_gap_next``,
    ``index`` <-> ``reverse_index``), and ``1 -`` that where ``complement[j]`` (``position``).
    Every other column (study aggregates, ranks, centered rolling means, across-model columns,
    DICOM metadata) does not depend on the direction. Rows are reversed by the caller.
    """
    names = list(columns)
    column_of = {name: j for j, name in enumerate(names)}
    source = np.arange(len(names), dtype=np.int64)
    complement = np.zeros(len(names), dtype=bool)
    for j, name in enumerate(names):
        column = split_column(name)
        partner = None
        if column is not None and column.group == SLICE_PREFIX:
            partner = _SWAP_SLICE.get(column.feature)
            complement[j] = column.feature in _COMPLEMENT_SLICE
        elif column is not None and column.per_model:
            match = _DIRECTIONAL.match(column.feature)
            if match:
                partner = f"{match['prefix'] or ''}{'lead' if match['side'] == 'lag' else 'lag'}{match['k']}"
        if partner is not None:
            partner_name = column_name(column.group, column.label, partner)
            if partner_name not in column_of:
                raise StackkitError(f"feature column '{name}' has no '{partner_name}' to swap with when a study is reversed; rebuild features with `stack features`")
            source[j] = column_of[partner_name]
    return source, complement


def reverse_features(X: np.ndarray, source: np.ndarray, complement: np.ndarray) -> np.ndarray:
    """The features of the same slices in a study reversed in z (see :func:`reversal_map`)."""
    out = np.asarray(X)[:, source]
    if complement.any():
        out[:, complement] = 1.0 - out[:, complement]
    return out


def feature_columns(models, lags: int, meta_columns=(), feature_set: str = "basic") -> dict[str, str]:
    """Ordered {column: definition} for the given models: slice, meta, across-model, per-model blocks.

    Adding or removing a model adds or removes only its own block; every other name keeps its
    relative order.
    """
    columns: dict[str, str] = {column_name(SLICE_PREFIX, None, name): text for name, text in SLICE_FEATURES.items()}
    for col in meta_columns:
        columns[column_name(META_PREFIX, None, col)] = f"data/metadata.parquet column '{col}' as a number (NaN where missing or not numeric)"
    for label in LABELS:
        columns[column_name(MODELS_PREFIX, label, "mean")] = f"mean of the '{label}' prediction across models"
        columns[column_name(MODELS_PREFIX, label, "std")] = f"population standard deviation (ddof=0) of the '{label}' prediction across models; 0 with one model"
        if feature_set == "wide":
            columns[column_name(MODELS_PREFIX, label, "max")] = f"maximum of the '{label}' prediction across models"
            columns[column_name(MODELS_PREFIX, label, "min")] = f"minimum of the '{label}' prediction across models"
    per_model = model_feature_names(lags, feature_set)
    for model in sorted(models):
        for label in LABELS:
            for feature, text in per_model:
                columns[column_name(model, label, feature)] = f"{model}, {label}: {text}"
    return columns
