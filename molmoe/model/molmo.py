"""Molmo: vision backbone + decoder, image features added at `<im_patch>` positions (spec §3.4).

Called with the tensors the official processor produces:
`model(input_ids, images=None, image_masks=None, image_input_idx=None)` -> logits (B, S, V).
Inputs without a batch dimension (as `process()` returns them) are accepted and batched.
Batch padding follows the official collator: -1 in `input_ids` (and in the image tensors);
`crop_valid` (B, T) bool, from the batcher, says which crops are real (spec §3.1 step 7).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from molmoe.backends import Backend, ops_for
from molmoe.ops import Ops
from molmoe.compat import check_compat
from molmoe.config import MolmoConfig
from molmoe.errors import UsageError
from molmoe.model.decoder import Decoder
from molmoe.model.kv_cache import KVCache
from molmoe.model.layers import rope_tables
from molmoe.model.vision import VisionBackbone


class Molmo(nn.Module):
    def __init__(self, config: MolmoConfig, backend: str | Backend = Backend.REFERENCE, *,
                 compat: str = "molmoe"):
        super().__init__()
        self.config = config
        self.vision = VisionBackbone(config)
        self.decoder = Decoder(config.text)
        # bf16 autocast over fp32 weights is Ai2's evaluation setting (spec §5.3, §7.1)
        self.autocast_dtype: torch.dtype | None = None
        # ops only: a fresh model's MoE weights stay two contiguous tensors, so seeded in-place
        # initialisation (p.normal_()) fills them as it always has; molmoe.load and later
        # set_backend calls interleave them
        self.backend = Backend.parse(backend)
        self.set_ops(ops_for(self.backend))
        self.set_compat(compat)

    def set_compat(self, compat: str) -> "Molmo":
        """"molmoe" (default): the training code's crop-validity rule for every variant.
        "released": the released code's rule, which for MolmoE zeroes a real crop holding any
        exact -1.0 (spec §3.1 step 7; molmoe.compat)."""
        released = check_compat(compat) == "released" and self.config.family == "molmoe"
        self.compat = compat
        self.vision.crop_rule = "released-molmoe" if released else "training"
        return self

    def set_backend(self, backend: str | Backend) -> "Molmo":
        """Point every hot op at the reference or the Triton implementation (same weights).
        Also lays each MoE layer's gate and up weights out interleaved (`MoEFFN.interleave_`,
        no change to their values or to the state dict), the layout the Triton MoE kernel reads
        without a copy; call it again after moving the model with `.to()`."""
        self.backend = Backend.parse(backend)
        for module in self.modules():
            if hasattr(module, "interleave_"):
                module.interleave_()
        return self.set_ops(ops_for(self.backend))

    def set_ops(self, ops: Ops) -> "Molmo":
        """Use an explicit set of ops (tests mix reference and Triton ops one at a time)."""
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        return self

    def new_kv_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        """A KV cache of `batch` rows x `max_len` slots, bound to the layers (each takes its
        view); it replaces any cache bound before."""
        t = self.config.text
        p = self.decoder.lm_head.weight
        dtype = dtype or self.autocast_dtype or p.dtype
        cache = KVCache(n_layers=t.n_layers, batch=batch, n_kv_heads=t.n_kv_heads,
                        max_len=max_len, head_dim=t.head_dim, dtype=dtype,
                        device=device or p.device)
        self.decoder.bind_cache(cache)
        return cache

    def embed(self, input_ids, images=None, image_masks=None, image_input_idx=None,
              crop_valid=None):
        """Token embeddings with the image features added (B, S, D)."""
        h = self.decoder.embed(input_ids.clamp(min=0))  # -1 (batch padding) looks up row 0
        if images is None:
            return h
        if image_input_idx is None:
            raise UsageError("images were given without image_input_idx")
        B = input_ids.shape[0]
        if crop_valid is not None and (crop_valid.dtype != torch.bool
                                       or crop_valid.shape != images.shape[:2]):
            raise UsageError(f"crop_valid must be a bool tensor of shape (batch, crops) = "
                             f"{tuple(images.shape[:2])}, got {crop_valid.dtype} "
                             f"{tuple(crop_valid.shape)}")
        feats = self.vision(images, image_masks, crop_valid)  # (B, T, 144, D)
        feats = feats.reshape(B, -1, feats.shape[-1])
        idx = image_input_idx.reshape(B, -1).long()
        if feats.shape[1] != idx.shape[1]:
            raise UsageError(f"image_input_idx has {idx.shape[1]} entries per sample, images give "
                             f"{feats.shape[1]} pooled features")
        valid = idx >= 0  # -100 (processor) and -1 (batch padding) are dropped
        if (idx >= input_ids.shape[1]).any():
            raise UsageError(f"image_input_idx points past the sequence (length "
                             f"{input_ids.shape[1]})")
        batch_idx = torch.arange(B, device=idx.device)[:, None].expand_as(idx)
        h = h.clone()
        # Added, not replaced: the <im_patch> embedding stays in (spec §3.4).
        h[batch_idx[valid], idx[valid]] += feats[valid].to(h.dtype)
        return h

    def forward(self, input_ids, images=None, image_masks=None, image_input_idx=None, *,
                attention_mask=None, position_ids=None, kv_cache: KVCache | None = None,
                logits_to_keep: int | None = None, original_size=None, crop_valid=None):
        # original_size (W, H) is processor metadata for mapping points back to pixels; it is
        # accepted so that `model(**processor(...))` works, and plays no part in the forward.
        device_type = input_ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return self._forward(input_ids, images, image_masks, image_input_idx, crop_valid,
                                 attention_mask, position_ids, kv_cache, logits_to_keep)

    def _forward(self, input_ids, images, image_masks, image_input_idx, crop_valid,
                 attention_mask, position_ids, kv_cache, logits_to_keep):
        if input_ids.dim() == 1:  # unbatched, as the official process() returns
            input_ids = input_ids[None]
        if images is not None and images.dim() == 3:  # one sample's crops
            images, image_input_idx = images[None], image_input_idx[None]
            image_masks = None if image_masks is None else image_masks[None]
            crop_valid = None if crop_valid is None else crop_valid[None]
        padded = input_ids == -1
        if attention_mask is None and (kv_cache is not None or bool(padded.any())):
            attention_mask = ~padded
        if position_ids is None:
            mask = ~padded if attention_mask is None else attention_mask.bool()
            position_ids = (torch.cumsum(mask.long(), dim=-1) - 1).clamp(min=0)
            if kv_cache is not None and kv_cache.length > 0:
                raise UsageError("position_ids are required when continuing from a KV cache")
        max_pos = self.config.text.max_position_embeddings
        if int(position_ids.max()) >= max_pos:
            raise UsageError(f"position {int(position_ids.max())} is beyond the model's "
                             f"{max_pos} positions (max_position_embeddings)")
        h = self.embed(input_ids, images, image_masks, image_input_idx, crop_valid)
        cos, sin = rope_tables(position_ids, self.config.text.head_dim, self.config.text.rope_theta)
        step = None
        if kv_cache is not None:
            if self.decoder.cache is not kv_cache:
                self.decoder.bind_cache(kv_cache)
            step = kv_cache.shared_step(attention_mask)
        logits = self.decoder(h, cos, sin, attention_mask, step, logits_to_keep)
        if step is not None:
            kv_cache.commit(step)
        return logits
