"""Vision side: CLIP ViT-L/14 (23 blocks), pad embeddings, 2x2 attention pooling, projector.

Module and parameter names mirror the official `model.vision_backbone.*` keys, so the checkpoint
adapter only swaps the prefix. Spec §3.1-§3.3.

Legend: N crops (batch x crops), P patches per crop (576), C feature dim (2048 = two ViT layers),
E ViT width (1024), D decoder width.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from molmoe.ops import REFERENCE_OPS, Ops
from molmoe.config import MolmoConfig, VisionConfig
from molmoe.model.layers import LayerNormFp32, run_block, swiglu


class ViTAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        E = cfg.emb_dim
        self.num_heads = cfg.num_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(E, E) for _ in range(4))
        self.ops: Ops = REFERENCE_OPS

    def forward(self, x):  # x: (N, L, E)
        N, L, E = x.shape
        # (N, H, L, hd); float32_attention: q, k, v in fp32 (spec §7.7)
        q, k, v = (w(x).view(N, L, self.num_heads, -1).transpose(1, 2).float()
                   for w in (self.wq, self.wk, self.wv))
        o = self.ops.attention(q, k, v, causal=False)
        return self.wo(o.to(x.dtype).transpose(1, 2).reshape(N, L, E))


class ViTMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.emb_dim, cfg.mlp_dim)
        self.w2 = nn.Linear(cfg.mlp_dim, cfg.emb_dim)

    def forward(self, x):
        h = self.w1(x)
        return self.w2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.attention = ViTAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.feed_forward = ViTMLP(cfg)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class _Blocks(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, fp32_pre_ln: bool = True):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.zeros(cfg.emb_dim))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.num_patches + 1, cfg.emb_dim))
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.emb_dim, bias=False)
        # The dense models' pre_ln computes in fp32 and casts back; MolmoE's does so only in
        # training and is a plain layer_norm in eval, which bf16 autocast runs in fp32 *without*
        # the cast back, so MolmoE's ViT residual stream stays fp32 in the eval setting (§3.1.4).
        norm = LayerNormFp32 if fp32_pre_ln else nn.LayerNorm
        self.pre_ln = norm(cfg.emb_dim, eps=cfg.norm_eps)
        self.transformer = _Blocks(cfg)

    def forward(self, patches):  # patches: (N, P, 588) -> list of (N, 1+P, E), one per block
        x = self.patch_embedding(patches)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.pre_ln(x)
        hidden = []
        for block in self.transformer.resblocks:
            x = run_block(block, x)
            hidden.append(x)
        return hidden


class AttentionPool2x2(nn.Module):
    """Each 2x2 cell attends from the mean of its 4 patches to the 4 patches (spec §3.3)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C, E = cfg.feature_dim, cfg.emb_dim
        self.num_heads = cfg.num_heads
        self.wq, self.wk, self.wv = (nn.Linear(C, E) for _ in range(3))
        self.wo = nn.Linear(E, E)
        self.ops: Ops = REFERENCE_OPS

    def forward(self, feats, image_masks, pad_embed, cast_back):
        """feats (N, P, C), image_masks (N, P) or None -> (N, P/4, E); the pad-embedding add
        happens inside the op so a fused kernel can do it while gathering (spec §3.2, §3.3)."""
        return self.ops.patch_pool(feats, image_masks, pad_embed, self.wq.weight, self.wq.bias,
                                   self.wk.weight, self.wk.bias, self.wv.weight, self.wv.bias,
                                   self.wo.weight, self.wo.bias, self.num_heads, cast_back)


class ImageProjector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(in_dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, out_dim, bias=False)  # down

    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


# Which crops count as padding (spec §3.1 step 7). "training": the batcher's crop-valid mask when
# given, else a crop is padding only if ALL its values are -1 (the training code's rule, the dense
# released code's too). "released-molmoe": HF MolmoE's released rule, a crop holding ANY -1 is
# padding; a real crop with one exact -1.0 after normalisation (about 0.5% of crops of smooth
# images) loses all its features, so it is only a compatibility option (Molmo.set_compat).
CROP_RULES = ("training", "released-molmoe")


def crop_validity(flat_NPF: torch.Tensor, crop_valid_N: torch.Tensor | None,
                  rule: str) -> torch.Tensor:
    """(N,) bool: which of the N crops are real, by `rule` (CROP_RULES)."""
    if rule == "released-molmoe":
        valid = torch.all(flat_NPF != -1, dim=(1, 2))
        return valid if crop_valid_N is None else valid & crop_valid_N
    if crop_valid_N is not None:
        return crop_valid_N
    return ~torch.all(flat_NPF == -1, dim=(1, 2))


class VisionBackbone(nn.Module):
    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        v = cfg.vision
        self.cfg = cfg
        self.crop_rule = "training"  # CROP_RULES; Molmo.set_compat picks it
        self.image_vit = VisionTransformer(v, fp32_pre_ln=cfg.family != "molmoe")
        self.pad_embed = nn.Parameter(torch.zeros(2, v.feature_dim))
        self.image_pooling_2d = AttentionPool2x2(v)
        self.image_projector = ImageProjector(v.emb_dim, cfg.projector_hidden, cfg.text.d_model)

    def encode(self, images, crop_valid=None):
        """images (B, T, P, 588), crop_valid (B, T) bool or None -> features (B, T, P, C), CLS
        dropped, padding crops zeroed (spec §3.1)."""
        B, T, P, _ = images.shape
        flat = images.reshape(B * T, P, -1)
        valid = crop_validity(flat, None if crop_valid is None else crop_valid.reshape(B * T),
                              self.crop_rule)
        # Pure bf16 mode feeds bf16 pixels (spec §7.1 c); under autocast the cast is a no-op.
        hidden = self.image_vit(flat.to(self.image_vit.patch_embedding.weight.dtype))
        feats = torch.cat([hidden[i] for i in self.cfg.vision.vit_layers], dim=-1)
        feats = feats * valid[:, None, None].to(feats.dtype)
        return feats[:, 1:].reshape(B, T, P, -1)

    def forward(self, images, image_masks, crop_valid=None):
        """-> (B, T, 144, D): one vector per pooled cell, in the processor's cell order."""
        feats = self.encode(images, crop_valid)  # (B, T, P, C)
        B, T, P, C = feats.shape
        masks = None if image_masks is None else image_masks.reshape(B * T, P)
        # MolmoE casts the features back to their pre-add dtype after the pad add (§7.1)
        pooled = self.image_pooling_2d(feats.reshape(B * T, P, C), masks, self.pad_embed,
                                       cast_back=self.cfg.family == "molmoe")  # (B*T, 144, E)
        return self.image_projector(pooled.reshape(B, T, pooled.shape[1], -1))
