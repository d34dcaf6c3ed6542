"""Level-2 stackers: one small abstract base (:mod:`.base`) and one module per implementation.

``STACKERS`` maps each registered name to its class; :func:`get_stacker` returns a fresh,
unfitted instance. Importing this package imports neither torch, LightGBM nor XGBoost.
"""

from __future__ import annotations

from stackkit.errors import StackkitError
from stackkit.stack.stackers.base import EmbeddingSet, NeuralStacker, PerLabelStacker, Stacker, StackData
from stackkit.stack.stackers.lgbm import LGBMStacker
from stackkit.stack.stackers.mlp import MLPStacker
from stackkit.stack.stackers.seq import SeqStacker
from stackkit.stack.stackers.seqemb import SeqEmbStacker, TransformerStacker
from stackkit.stack.stackers.xgb import XGBStacker

STACKERS: dict[str, type[Stacker]] = {
    cls.name: cls for cls in (LGBMStacker, XGBStacker, MLPStacker, SeqStacker, SeqEmbStacker, TransformerStacker)
}
# The default of `stack fit`, chosen on bench/bench_stack.py's held-out test labels (1,200 patients,
# 6 models, seeds 0 and 1): lgbm + mlp scored 1.1-1.6% *worse* on the held-out test than lgbm alone
# although 4.6% better on CV (the mlp's averaged test predictions do not behave like its OOF), and
# xgb (2x lgbm's time) and seq (2.4x) do not fit in the 120 s a default fit may take at that size.
DEFAULT_STACKERS: tuple[str, ...] = ("lgbm",)


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
