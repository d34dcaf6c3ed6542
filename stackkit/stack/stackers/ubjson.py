"""Structural check of a UBJSON document before XGBoost parses it.

XGBoost's UBJSON reader trusts declared lengths and counts: a cut or damaged file can crash the
whole process (a segfault, not an exception), even when its sha256 sidecar was regenerated. The
walk below reads only markers, lengths and counts (fixed-size typed arrays are skipped in one
step), so it costs milliseconds for a stacker's booster.
"""

from __future__ import annotations

import struct

# payload size of each fixed-size value marker (UBJSON draft 12, big-endian)
_FIXED_SIZES = {b"Z": 0, b"N": 0, b"T": 0, b"F": 0, b"i": 1, b"U": 1, b"C": 1, b"I": 2, b"l": 4, b"d": 4, b"L": 8, b"D": 8}
_INT_FORMATS = {b"i": ">b", b"U": ">B", b"I": ">h", b"l": ">i", b"L": ">q"}
_MAX_DEPTH = 64


class UBJSONError(ValueError):
    """The bytes are not one complete UBJSON value; the message names the byte offset."""


class _Walker:
    def __init__(self, raw: bytes):
        self.raw = memoryview(raw)
        self.size = len(raw)
        self.pos = 0

    def fail(self, what: str) -> UBJSONError:
        return UBJSONError(f"{what} at byte {self.pos} of {self.size}")

    def marker(self) -> bytes:
        if self.pos >= self.size:
            raise self.fail("ends inside a value")
        marker = bytes(self.raw[self.pos : self.pos + 1])
        self.pos += 1
        return marker

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"declares {n} bytes past the end" if n >= 0 else f"declares a negative length {n}")
        self.pos += n

    def integer(self, marker: bytes) -> int:
        if marker not in _INT_FORMATS:
            raise self.fail(f"expects an integer length or count, found marker {marker!r}")
        width = _FIXED_SIZES[marker]
        start = self.pos
        self.skip(width)
        return struct.unpack(_INT_FORMATS[marker], self.raw[start : start + width])[0]

    def value(self, marker: bytes, depth: int) -> None:
        if marker in _FIXED_SIZES:
            self.skip(_FIXED_SIZES[marker])
        elif marker in (b"S", b"H"):
            self.skip(self.integer(self.marker()))
        elif marker in (b"[", b"{"):
            self.container(marker == b"{", depth + 1)
        else:
            self.pos -= 1
            raise self.fail(f"unknown marker {marker!r}")

    def container(self, is_object: bool, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise self.fail("nests deeper than any XGBoost model")
        close = b"}" if is_object else b"]"
        element_type = count = None
        nxt = self.marker()
        if nxt == b"$":
            element_type = self.marker()
            if element_type not in _FIXED_SIZES and element_type not in (b"S", b"H", b"[", b"{"):
                raise self.fail(f"unknown container type {element_type!r}")
            nxt = self.marker()
            if nxt != b"#":
                raise self.fail("typed container without a count")
        if nxt == b"#":
            count = self.integer(self.marker())
            if count < 0:
                raise self.fail(f"negative count {count}")
        else:
            self.pos -= 1
        if count is not None:
            if not is_object and element_type in _FIXED_SIZES:
                self.skip(count * _FIXED_SIZES[element_type])  # a typed numeric array in one step
                return
            for _ in range(count):
                self.element(is_object, element_type, depth)
            return
        while True:
            nxt = self.marker()
            if nxt == close:
                return
            self.pos -= 1
            self.element(is_object, element_type, depth)

    def element(self, is_object: bool, element_type: bytes | None, depth: int) -> None:
        if is_object:
            self.skip(self.integer(self.marker()))  # keys carry no S marker
        self.value(element_type if element_type is not None else self.marker(), depth)


def check_ubjson(raw: bytes) -> None:
    """Raise :class:`UBJSONError` unless ``raw`` is exactly one complete UBJSON object."""
    walker = _Walker(raw)
    if walker.marker() != b"{":
        walker.pos = 0
        raise walker.fail("does not start with an object")
    walker.container(True, 1)
    if walker.pos != walker.size:
        raise walker.fail("has trailing bytes")
