"""Synthetic DICOM datasets of the newer tasks, in each competition's layout (issue 20).

``synthesize_task(task, out_dir)`` writes an RSNA 2022 Cervical Spine
(:mod:`stackkit.data.synth_cspine`) or RSNA 2023 Abdominal Trauma
(:mod:`stackkit.data.synth_abdominal`) dataset; ``stackkit.data.task_labels.read_task_labels``
reads its label files back. RSNA 2019 stays with :func:`stackkit.data.synth.synthesize`.
"""

from __future__ import annotations

from stackkit.data.synth_abdominal import DEFAULT_SLICES as ABDOMINAL_SLICES
from stackkit.data.synth_abdominal import TASK as ABDOMINAL
from stackkit.data.synth_abdominal import synthesize_abdominal
from stackkit.data.synth_cspine import DEFAULT_SLICES as CSPINE_SLICES
from stackkit.data.synth_cspine import TASK as CSPINE
from stackkit.data.synth_cspine import synthesize_cspine
from stackkit.errors import StackkitError

SYNTHESIZERS = {CSPINE: synthesize_cspine, ABDOMINAL: synthesize_abdominal}
# Slices per series when the caller gives none: enough for the anatomy, few enough for a quick demo.
DEFAULT_SLICES = {CSPINE: CSPINE_SLICES, ABDOMINAL: ABDOMINAL_SLICES}


def synthesize_task(task: str, out_dir, *, patients: int = 40, size: int = 64, slices=None, test_fraction: float = 0.25,
                    seed: int = 0, progress: bool = True) -> dict:
    """Write a synthetic ``task`` dataset under ``out_dir``; return its summary dict. ``slices``:
    (MIN, MAX) per series, default ``DEFAULT_SLICES[task]``. Deterministic for a seed."""
    if task not in SYNTHESIZERS:
        raise StackkitError(f"data synth: --task {task!r} has no synthetic dataset here; choose one of "
                            f"{', '.join(SYNTHESIZERS)} (rsna2019: data synth without --task)")
    return SYNTHESIZERS[task](out_dir, patients=patients, size=size, slices=DEFAULT_SLICES[task] if slices is None else slices,
                              test_fraction=test_fraction, seed=seed, progress=progress)
