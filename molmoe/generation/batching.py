"""Stacking processed prompts into one batch for cached generation (spec §3.5, §4.6).

The official collator right-pads with -1. A static KV cache that shares one slot index across the
batch needs every prompt to END at the same slot, so prompts are LEFT-padded here instead; the
meaning of -1 is unchanged (attention mask = ids != -1, positions = cumsum(mask) - 1), so each
sample sees exactly the positions it would see alone. Image tensors are padded with -1 along the
crop axis as the collator does; a sample without an image gets only -1 crops, which the vision
backbone zeroes and whose -1 indices place nothing. `pad_crops` does that part, and the training
collator (molmoe.training.data, right padding) uses it too.

Legend: B batch, S padded prompt length, T crops (max over the batch), P patches per crop (576),
Q pooled tokens per crop (144), F patch features (588).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from molmoe.errors import UsageError

PAD = -1


@dataclass
class Batch:
    input_ids_BS: torch.Tensor  # int64, -1 = left padding
    attention_mask_BS: torch.Tensor  # bool, True = real token
    position_ids_BS: torch.Tensor  # int64
    lengths_B: list[int]  # real prompt lengths
    images_BTPF: torch.Tensor | None = None
    image_masks_BTP: torch.Tensor | None = None
    image_input_idx_BTQ: torch.Tensor | None = None
    crop_valid_BT: torch.Tensor | None = None  # bool, True = a real crop, False = padding


def _tensor(x, dtype=None) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t if dtype is None else t.to(dtype)


def left_pad_batch(samples: list[dict]) -> Batch:
    """Processor outputs (unbatched: `input_ids` [S], optional `images` [T,P,F], `image_masks`
    [T,P], `image_input_idx` [T,Q]) -> one left-padded batch."""
    if not samples:
        raise UsageError("no prompts to generate from")
    ids = []
    for i, s in enumerate(samples):
        if "input_ids" not in s:
            raise UsageError(f"prompt {i}: no 'input_ids' (expected a processor output dict)")
        t = _tensor(s["input_ids"], torch.int64)
        if t.dim() != 1 or t.numel() == 0:
            raise UsageError(f"prompt {i}: input_ids must be a non-empty 1-D sequence, got shape "
                             f"{tuple(t.shape)}")
        ids.append(t)
    lengths = [len(t) for t in ids]
    B, S = len(ids), max(lengths)
    input_ids = torch.full((B, S), PAD, dtype=torch.int64)
    for b, t in enumerate(ids):
        input_ids[b, S - len(t):] = t
    mask = input_ids != PAD
    positions = (torch.cumsum(mask.long(), dim=-1) - 1).clamp(min=0)
    batch = Batch(input_ids, mask, positions, lengths)

    crops = pad_crops(samples, [S - n for n in lengths])
    if crops is None:
        return batch
    (batch.images_BTPF, batch.image_masks_BTP, batch.image_input_idx_BTQ,
     batch.crop_valid_BT) = crops
    return batch


def pad_crops(samples: list[dict], shifts: list[int]):
    """The samples' image tensors stacked and padded with -1 along the crop axis, or None when no
    sample has an image: (images (B,T,P,F), image_masks (B,T,P), image_input_idx (B,T,Q),
    crop_valid (B,T) bool). `shifts[b]`: how far sample b's tokens moved in the padded
    input_ids (left padding; 0 for right padding), added to its non-negative indices."""
    with_image = [s.get("images") is not None for s in samples]
    if not any(with_image):
        return None
    B = len(samples)
    first = next(s for s in samples if s.get("images") is not None)
    _, P, F = _tensor(first["images"]).shape
    Q = _tensor(first["image_input_idx"]).shape[-1]
    T = max(_tensor(s["images"]).shape[0] for s in samples if s.get("images") is not None)
    images = torch.full((B, T, P, F), PAD, dtype=torch.float32)
    masks = torch.full((B, T, P), PAD, dtype=torch.float32)
    idx = torch.full((B, T, Q), PAD, dtype=torch.int32)
    crop_valid = torch.zeros((B, T), dtype=torch.bool)
    for b, s in enumerate(samples):
        if s.get("images") is None:
            continue
        im = _tensor(s["images"], torch.float32)
        if im.dim() != 3 or im.shape[1:] != (P, F):
            raise UsageError(f"prompt {b}: images has shape {tuple(im.shape)}, expected "
                             f"(crops, {P}, {F})")
        if s.get("image_input_idx") is None:
            raise UsageError(f"prompt {b}: images given without image_input_idx")
        ix = _tensor(s["image_input_idx"], torch.int32)
        if ix.shape != (im.shape[0], Q):
            raise UsageError(f"prompt {b}: image_input_idx has shape {tuple(ix.shape)}, expected "
                             f"({im.shape[0]}, {Q})")
        n = im.shape[0]
        images[b, :n] = im
        crop_valid[b, :n] = True
        if s.get("image_masks") is not None:
            masks[b, :n] = _tensor(s["image_masks"], torch.float32)
        else:  # no mask given: the crop is all image (what a 1.0 mask says)
            masks[b, :n] = 1.0
        # Indices point into input_ids: move them with the padding; -100 stays -100.
        idx[b, :n] = torch.where(ix >= 0, ix + shifts[b], ix)
    return images, masks, idx, crop_valid
