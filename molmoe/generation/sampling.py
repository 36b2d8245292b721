"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

Legend: B batch, V vocabulary rows. Filters return logits with the removed entries set to -inf,
so they compose (top-k first, then top-p, as transformers' warpers apply them).
"""
from __future__ import annotations

import math
import numbers

import torch

from molmoe.errors import UsageError

# The smallest sampling temperature. At 1e-4 a logit gap of 0.01 is already a factor e^-100
# between the two tokens: sampling is greedy decoding to float32 precision, so anything lower
# only invites overflow; temperature 0 means greedy (do_sample=False).
MIN_TEMPERATURE = 1e-4


def check_temperature(temperature, do_sample: bool) -> None:
    """A finite temperature >= MIN_TEMPERATURE; 0 is accepted only without sampling (greedy
    ignores the temperature, and 0 is the usual way of asking for greedy)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise UsageError(f"temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g}, "
                         f"got {temperature}")
    if temperature < MIN_TEMPERATURE and (do_sample or temperature != 0):
        raise UsageError(f"temperature must be >= {MIN_TEMPERATURE:g} (got {temperature:g}); "
                         f"for temperature 0 use greedy decoding (no sampling)")


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are all kept)."""
    if k <= 0:
        raise UsageError(f"top_k must be >= 1, got {k}")
    if k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = torch.topk(logits_BV, k, dim=-1).values[..., -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p
    (nucleus sampling); the most likely token always survives."""
    if not 0.0 < p <= 1.0:  # also refuses NaN
        raise UsageError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = torch.softmax(sorted_BV.float(), dim=-1)
    # Mass strictly before each token: a token is kept while that mass is still below p.
    before_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV
    drop_sorted_BV = before_BV >= p
    drop_sorted_BV[..., 0] = False
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def sample_next(logits_BV: torch.Tensor, *, do_sample: bool, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) int64 from the last position's logits (B, V)."""
    if not do_sample:
        return torch.argmax(logits_BV, dim=-1)
    check_temperature(temperature, do_sample=True)
    # Sampling in fp32: bf16 probabilities are too coarse for the tail the filters keep. The
    # row maximum is subtracted before dividing, so every scaled logit is <= 0 and no small
    # temperature can overflow it to inf (inf - inf would make the probabilities NaN).
    logits_BV = logits_BV.float()
    logits_BV = (logits_BV - logits_BV.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        logits_BV = top_k_filter(logits_BV, top_k)
    if top_p is not None:
        logits_BV = top_p_filter(logits_BV, top_p)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
