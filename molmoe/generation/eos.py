"""The EOS id generation stops at, and the tokenizer-vs-model vocabulary check.

`generation_eos_ids` reads `generation_config.json` (MolmoE's names its EOS id, spec §5.3; the
dense models' has none); `molmoe.load` records its ids on the model
(`model.generation_eos_token_id`), so an `Engine` built from Python stops where `molmoe generate`
does. `engine_eos` picks the id generation stops at: an explicit one, else the checkpoint's, else
the tokenizer's EOS; `resolve_eos` does the same from a directory. An id the model cannot produce
or the tokenizer does not know would make generation silently run to the token limit, so it is
refused.

`check_vocabulary` refuses a tokenizer with ids the model has no embedding row for (an
`IndexError` in the middle of generation otherwise). The model's rows are `embedding_size` base
rows plus `additional_vocab_size` rows of `new_embedding`, which ids >= embedding_size index
(spec §2.4, §3.4).
"""
from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING

from molmoe.config import ConfigError, MolmoConfig
from molmoe.errors import UsageError, is_int, is_integral
from molmoe.fileio import read_json

if TYPE_CHECKING:
    from molmoe.processing.tokenizer import Tokenizer

GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(directory: str | os.PathLike,
                       config: MolmoConfig) -> tuple[int, ...] | None:
    """generation_config.json's `eos_token_id` as a tuple of ids (a single id or a list), or None
    when the file or the field is absent. Every id must be an int in 0..embedding_size-1 (a row
    of the LM head); otherwise ConfigError naming the file and the value."""
    path = pathlib.Path(directory) / GENERATION_CONFIG
    if not path.exists():
        return None
    raw = read_json(path, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    value = raw.get("eos_token_id")
    if value is None:
        return None
    ids = value if isinstance(value, list) else [value]
    if not ids:
        raise ConfigError(f"{path}: eos_token_id is an empty list")
    for token_id in ids:
        _checked_row(token_id, config, str(path))
    return tuple(ids)


def resolve_eos(directory: str | os.PathLike, tokenizer: Tokenizer, config: MolmoConfig) -> int:
    """The EOS id: generation_config.json's `eos_token_id` (a list: its first id), else the
    tokenizer's. Every listed id must be an int in 0..embedding_size-1 (a row of the LM head)
    that the tokenizer knows; otherwise ConfigError naming the file and the value."""
    ids = generation_eos_ids(directory, config)
    if ids is None:
        return _checked_eos(tokenizer.eos_token_id, tokenizer, config, tokenizer.source)
    path = str(pathlib.Path(directory) / GENERATION_CONFIG)
    for token_id in ids:
        _checked_eos(token_id, tokenizer, config, path)
    return ids[0]


def engine_eos(model, tokenizer, explicit: int | None = None) -> int | None:
    """The EOS id an Engine stops at, the same one `molmoe generate` uses: `explicit` when given,
    else the checkpoint's generation_config.json id that `molmoe.load` recorded on the model
    (`model.generation_eos_token_id`; it and the other listed ids are checked against the
    tokenizer as `resolve_eos` does), else `tokenizer.eos_token_id` (None if it has none:
    generation then stops at stop strings or the token limit only). An id the model cannot generate is refused (UsageError for
    `explicit`, ConfigError for the files')."""
    config = getattr(model, "config", None)
    rows = config.text.embedding_size if config is not None else None
    if explicit is not None:
        if not is_integral(explicit) or explicit < 0 or (rows is not None and explicit >= rows):
            upto = f"0..{rows - 1}" if rows is not None else "an integer >= 0"
            raise UsageError(f"eos_token_id {explicit!r} is not an id the model can generate "
                             f"({upto}); generation would never stop at it")
        return int(explicit)
    eos = getattr(model, "generation_eos_token_id", None)
    if eos is not None:
        where = getattr(model, "source", None)
        source = str(pathlib.Path(where) / GENERATION_CONFIG) if where else GENERATION_CONFIG
        ids = getattr(model, "generation_eos_token_ids", None) or (eos,)
        for token_id in ids if ids[0] == eos else (eos,):  # every listed id, as resolve_eos
            _checked_eos(token_id, tokenizer, config, source)
        return eos
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or config is None:
        return eos
    return _checked_eos(eos, tokenizer, config, getattr(tokenizer, "source", "the tokenizer"))


def _checked_row(token_id, config: MolmoConfig, source: str) -> int:
    """`token_id` is an int and a row of the LM head (an id the model can generate)."""
    rows = config.text.embedding_size
    if not is_int(token_id):
        raise ConfigError(f"{source}: eos_token_id {token_id!r} is not an integer token id")
    if not 0 <= token_id < rows:
        raise ConfigError(f"{source}: eos_token_id {token_id} is outside the model's output ids "
                          f"0..{rows - 1} (embedding_size {rows}): generation would never stop")
    return token_id


def _checked_eos(token_id, tokenizer: Tokenizer, config: MolmoConfig | None, source: str) -> int:
    """`token_id` is a row of the LM head (when the config is known) the tokenizer knows."""
    if config is not None:
        _checked_row(token_id, config, source)
    if _id_to_token(tokenizer, token_id) is None:
        raise ConfigError(f"{source}: eos_token_id {token_id} is not in the tokenizer's "
                          f"vocabulary ({getattr(tokenizer, 'source', type(tokenizer).__name__)})")
    return token_id


def check_vocabulary(tokenizer: Tokenizer, config: MolmoConfig) -> None:
    """Refuse a tokenizer with ids beyond the model's embedding rows (base + new_embedding)."""
    rows = config.text.embedding_size + config.text.additional_vocab_size
    vocab = _vocabulary(tokenizer)
    top = max(vocab.values(), default=-1)
    if top >= rows:
        token = next(t for t, i in vocab.items() if i == top)
        raise ConfigError(
            f"{tokenizer.source}: the tokenizer has id {top} ({token!r}), but the model has "
            f"{rows} embedding rows (embedding_size {config.text.embedding_size} + "
            f"additional_vocab_size {config.text.additional_vocab_size}): tokenizer and model "
            "do not belong together")


# The wrapped `tokenizers.Tokenizer` answers what molmoe's Tokenizer does not expose.
def _id_to_token(tokenizer: Tokenizer, token_id: int) -> str | None:
    """The id's token string, None when the tokenizer does not know the id. A tokenizer that
    cannot say (not molmoe's, e.g. a test double with only `decode`) is trusted: ""."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is not None and hasattr(inner, "id_to_token"):
        return inner.id_to_token(token_id)
    return ""


def _vocabulary(tokenizer: Tokenizer) -> dict[str, int]:
    return tokenizer._tok.get_vocab(with_added_tokens=True)
