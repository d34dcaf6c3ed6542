"""The contract's file hash: below both the contract package and its writers (``contract.io``).

``stackkit.contract`` re-exports :func:`file_sha256`; ``contract.io`` imports it from here, so
the contract's lazy use of ``io`` (interrupted set switches, ``Workdir.model_names``) closes no
import circle.
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
