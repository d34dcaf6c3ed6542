"""Level-2 stackers: one small abstract base (:mod:`.base`) and one module per implementation.

``STACKERS`` maps each registered name to its class; :func:`get_stacker` returns a fresh,
unfitted instance. Importing this package imports neither torch, LightGBM nor XGBoost.
"""

from __future__ import annotations

from stackkit.errors import StackkitError
from stackkit.stack.inputs import EmbeddingSet, StackData
from stackkit.stack.stackers.base import Stacker
from stackkit.stack.stackers.gbdt import PerLabelStacker
from stackkit.stack.stackers.neural import NeuralStacker
from stackkit.stack.stackers.lgbm import LGBMStacker
from stackkit.stack.stackers.mlp import MLPStacker
from stackkit.stack.stackers.seq import SeqStacker
from stackkit.stack.stackers.seqemb import SeqEmbStacker, TransformerStacker
from stackkit.stack.stackers.xgb import XGBStacker

STACKERS: dict[str, type[Stacker]] = {
    cls.name: cls for cls in (LGBMStacker, XGBStacker, MLPStacker, SeqStacker, SeqEmbStacker, TransformerStacker)
}
# The default of `stack fit`, chosen with bench/bench_defaults.py on held-out test labels of the
# tuning seeds (0, 1) of the `persistent` and `realistic` scenarios (1,200 patients, 6 models,
# per-fold test files), blended without the base models, mean x the plain study LightGBM: lgbm +
# seq 0.870 (gap to the floor closed: 0.23), lgbm + mlp + seq 0.870, lgbm + mlp 0.879, lgbm alone
# 0.894 (0.18). A GBDT on neighbor features and a sequence model over the study, as RSNA 2019's
# second stages; `stack fit` with both takes 2.3-3.6x the plain LightGBM's time at 48k slices (2.9x on
# the mean of 10 runs on 2 idle cores; seq's folds fitted side by side in processes, stackkit.stack.folds).
DEFAULT_STACKERS: tuple[str, ...] = ("lgbm", "seq")


def get_stacker(name: str) -> Stacker:
    """A new, unfitted stacker by registry name."""
    try:
        return STACKERS[name]()
    except KeyError:
        raise StackkitError(f"unknown stacker '{name}'; valid stackers: {', '.join(STACKERS)}") from None


__all__ = [
    "DEFAULT_STACKERS",
    "EmbeddingSet",
    "STACKERS",
    "LGBMStacker",
    "MLPStacker",
    "NeuralStacker",
    "PerLabelStacker",
    "SeqEmbStacker",
    "SeqStacker",
    "StackData",
    "Stacker",
    "TransformerStacker",
    "XGBStacker",
    "get_stacker",
]
