"""Compatibility modes: molmoe's corrected behaviour, or the released Molmo code bit for bit.

"molmoe" (the default) fixes flaws of the released code: user text cannot name special tokens,
images get EXIF rotation and alpha compositing, a real crop holding an exact -1.0 keeps its
features. "released" reproduces the released processor and model exactly, flaws included, for
people reproducing published numbers: `Processor(..., compat="released")` and
`Molmo.set_compat("released")`.
"""
from __future__ import annotations

from molmoe.errors import UsageError

COMPAT_MODES = ("molmoe", "released")


def check_compat(compat) -> str:
    """`compat` if it is one of COMPAT_MODES, else UsageError."""
    if compat not in COMPAT_MODES:
        raise UsageError(f"compat={compat!r}: expected one of {', '.join(map(repr, COMPAT_MODES))}")
    return compat
