"""One base class for every error caused by the user's input.

`MolmoeError` (a `ValueError`, so existing `except ValueError` keeps working) is what the library
raises for anything the caller can fix: a bad checkpoint, config, image, prompt, argument. The CLI
catches exactly this class and prints one line, exit status 2; anything else is a bug in molmoe
and keeps its traceback.

Subclasses, each defined beside the code that raises it: `CheckpointError` (checkpoint.adapter),
`ConfigError` (config), `ImageError` (processing.images), `TokenizerError`
(processing.tokenizer), `PromptTooLongError` (processing.processor), `GenerationLengthError` and
`GenerationError` (generation.engine), and `UsageError` here for bad arguments.
"""
from __future__ import annotations

import numbers


class MolmoeError(ValueError):
    """Bad input the user can fix; the message names the input and the problem."""


class UsageError(MolmoeError):
    """An argument value the library cannot honour (a NaN temperature, an unknown device, ...)."""


# The integer tests the input checks share: `True` is an int in Python, never a count here.
def is_int(x) -> bool:
    """A Python int, not a bool: what a JSON integer parses to (config and checkpoint files)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_integral(x) -> bool:
    """Any integer type (numpy's too), not a bool: for arguments passed from Python."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
