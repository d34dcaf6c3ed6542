"""The contract owns every work-directory file name (issue 22): read from the source with ast, never imported.

A string literal that *is* a path to one of the contract's files (``oof.parquet``,
``stack/blend.json``, ``f"{d}/test_fold{k}.parquet"``, ``name + ".sha256"``...) may appear only
under ``stackkit/contract/``; everything else asks ``Workdir``, ``PredictionFolder``,
``FoldModelFiles`` or ``contract.io.sidecar``. Literals with whitespace are prose (messages and
help texts naming a file) and docstrings are documentation: neither builds a path.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("stackkit", "base_models", "features")
OWNER = "stackkit/contract/"
# the contract's file names (stackkit/contract/__init__.py), written out here on purpose: the test
# must not trust the module it checks
NAMES = (
    "metadata.parquet", "labels.parquet", "folds.parquet", "prepare.json", "task.json", "slice_labels.parquet",
    "oof.parquet", "test.parquet", "model.json",
    "train.parquet", "manifest.json",
    "meta.json", "stacker.json", "blend.json", "report.html", "importance.parquet",
    "projection.npz", "scaler.npz", "model.pt", "oof.npy", "test.npy",
    "submission.csv",
)
SIDECAR_SUFFIX = ".sha256"
_PER_FOLD = re.compile(r"test_fold(\{\}|\d+)\.parquet")

# Known, explained exceptions: each fails the test when it no longer applies, so the list can only shrink.
KNOWN: dict[str, str] = {}


def path_literal(text: str) -> str | None:
    """The contract name ``text`` spells as a path (or the sidecar suffix), else None.

    ``text`` is a string constant, or an f-string with ``{}`` in place of its values."""
    if not text or any(c.isspace() for c in text):
        return None
    if text.endswith(SIDECAR_SUFFIX):
        return SIDECAR_SUFFIX
    last = text.rsplit("/", 1)[-1]
    if last in NAMES:
        return last
    if _PER_FOLD.fullmatch(last):
        return "test_fold<k>.parquet"
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def names_in_source(source: str) -> list[tuple[int, str]]:
    """(line, contract name) of every path literal in ``source``."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            template = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            name = path_literal(template)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            name = path_literal(node.value)
        else:
            continue
        if name is not None:
            found.append((node.lineno, name))
    return found


def _modules() -> list[Path]:
    files = [p for package in SCANNED for p in sorted((ROOT / package).rglob("*.py"))]
    return [p for p in files if not p.relative_to(ROOT).as_posix().startswith(OWNER)] + [ROOT / "cli.py"]


def test_the_scan_reads_the_packages():
    relative = {p.relative_to(ROOT).as_posix() for p in _modules()}
    assert {"stackkit/stack/crossfit.py", "base_models/importer.py", "features/api.py", "stackkit/submit.py"} <= relative
    assert not any(r.startswith(OWNER) for r in relative)


def test_no_contract_file_name_is_spelled_outside_the_contract():
    found = {}
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        for line, name in names_in_source(path.read_text(encoding="utf-8")):
            found.setdefault(f"{rel}:{name}", []).append(line)
    assert {k: v for k, v in found.items() if k not in KNOWN} == {}, "ask Workdir / PredictionFolder / FoldModelFiles / io.sidecar"
    assert sorted(set(KNOWN) - set(found)) == [], "fixed: drop these from KNOWN"


@pytest.mark.parametrize(
    "source, expected",
    [
        ('p = folder / "oof.parquet"\n', [(1, "oof.parquet")]),
        ('p = root / "stack/blend.json"\n', [(1, "blend.json")]),
        ('p = folder / f"test_fold{k}.parquet"\n', [(1, "test_fold<k>.parquet")]),
        ('p = f"{source}/meta.json"\n', [(1, "meta.json")]),
        ('s = path.with_name(path.name + ".sha256")\n', [(1, ".sha256")]),
        ('s = f"{path.name}.sha256"\n', [(1, ".sha256")]),
        ('NAME = "stacker.json"\n', [(1, "stacker.json")]),
        ('def f():\n    """Writes oof.parquet."""\n    return 1\n', []),
        ('raise E(f"{p}: features/manifest.json lists it; rerun")\n', []),
        ('p = folder / "fold0_oof.parquet.tmp"\n', []),
        ('p = folder / "oof.parquet.bak"\n', []),
    ],
)
def test_the_check_catches_a_planted_name(source, expected):
    assert names_in_source(source) == expected
