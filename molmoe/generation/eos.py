"""The EOS id generation stops at, and the tokenizer-vs-model vocabulary check.

`resolve_eos` reads `generation_config.json` (MolmoE's names its EOS id, spec §5.3; the dense
models' has none) and falls back to the tokenizer's EOS. An id the model cannot produce or the
tokenizer does not know would make generation silently run to the token limit, so it is refused.

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
from molmoe.errors import is_int
from molmoe.fileio import read_json

if TYPE_CHECKING:
    from molmoe.processing.tokenizer import Tokenizer

GENERATION_CONFIG = "generation_config.json"


def resolve_eos(directory: str | os.PathLike, tokenizer: Tokenizer, config: MolmoConfig) -> int:
    """The EOS id: generation_config.json's `eos_token_id` (a list: its first id), else the
    tokenizer's. Every listed id must be an int in 0..embedding_size-1 (a row of the LM head)
    that the tokenizer knows; otherwise ConfigError naming the file and the value."""
    path = pathlib.Path(directory) / GENERATION_CONFIG
    if not path.exists():
        return _checked_eos(tokenizer.eos_token_id, tokenizer, config, tokenizer.source)
    raw = read_json(path, ConfigError)
    value = raw.get("eos_token_id")
    if value is None:
        return _checked_eos(tokenizer.eos_token_id, tokenizer, config, tokenizer.source)
    ids = value if isinstance(value, list) else [value]
    if not ids:
        raise ConfigError(f"{path}: eos_token_id is an empty list")
    for token_id in ids:
        _checked_eos(token_id, tokenizer, config, str(path))
    return ids[0]


def _checked_eos(token_id, tokenizer: Tokenizer, config: MolmoConfig, source: str) -> int:
    rows = config.text.embedding_size
    if not is_int(token_id):
        raise ConfigError(f"{source}: eos_token_id {token_id!r} is not an integer token id")
    if not 0 <= token_id < rows:
        raise ConfigError(f"{source}: eos_token_id {token_id} is outside the model's output ids "
                          f"0..{rows - 1} (embedding_size {rows}): generation would never stop")
    if _id_to_token(tokenizer, token_id) is None:
        raise ConfigError(f"{source}: eos_token_id {token_id} is not in the tokenizer's "
                          f"vocabulary ({tokenizer.source})")
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
    return tokenizer._tok.id_to_token(token_id)


def _vocabulary(tokenizer: Tokenizer) -> dict[str, int]:
    return tokenizer._tok.get_vocab(with_added_tokens=True)
