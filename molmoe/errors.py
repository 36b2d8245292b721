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


class MolmoeError(ValueError):
    """Bad input the user can fix; the message names the input and the problem."""


class UsageError(MolmoeError):
    """An argument value the library cannot honour (a NaN temperature, an unknown device, ...)."""
