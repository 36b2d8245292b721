"""The decoder shared by all Molmo variants: Qwen2 (7B-D, 72B), OLMo-1024 (7B-O), OLMoE (MolmoE).

One block, switched by config: qkv bias (Qwen2), full-width q/k RMSNorm (OLMo, OLMoE), norms after
the sublayers (7B-O), dense SwiGLU or the 64-expert top-8 MoE (spec §3.5, §3.6).

Legend: B batch, S new tokens, Sk keys (cache + new), D model width, H query heads, Hkv key/value
heads, Dh head dim, F SwiGLU width, E experts, V vocabulary rows.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from molmoe.ops import REFERENCE_OPS, Ops
from molmoe.ops.moe import interleaved_view
from molmoe.config import TextConfig
from molmoe.model.kv_cache import CacheStep, KVCache, LayerKV
from molmoe.model.layers import RMSNorm, run_block, swiglu

# With a KV cache, up to this many new tokens per step use the decode kernel (split along the
# cache); longer chunks (prefill) use the prefill attention.
DECODE_MAX_NEW_TOKENS = 8


class Embedding(nn.Module):
    """Base rows [0, V) plus 128 extra rows for ids >= V (spec §2.4), kept as two tensors so that
    loading never concatenates (and copies) the large base table."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(cfg.embedding_size, cfg.d_model))
        self.new_embedding = nn.Parameter(torch.zeros(cfg.additional_vocab_size, cfg.d_model))

    def forward(self, ids):  # (B, S) -> (B, S, D)
        V = self.embedding.shape[0]
        h = F.embedding(ids.clamp(max=V - 1), self.embedding)
        extra = ids >= V
        extra_rows = F.embedding((ids - V).clamp(min=0), self.new_embedding)
        return torch.where(extra[..., None], extra_rows, h)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * cfg.kv_dim, bias=cfg.qkv_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.kv_dim, cfg.norm_eps)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ops: Ops = REFERENCE_OPS
        self.kv: LayerKV | None = None  # this layer's view of the bound KV cache

    def forward(self, x, cos, sin, key_padding_mask, step: CacheStep | None):
        cfg = self.cfg
        B, S, _ = x.shape
        q, k, v = self.qkv(x).split([cfg.d_model, cfg.kv_dim, cfg.kv_dim], dim=-1)
        if cfg.qk_norm:  # over the full q / k vectors, before the head split (spec §7.4)
            q = self.q_norm(q).to(k.dtype)
            k = self.k_norm(k).to(k.dtype)
        if S == 1:  # (B, 1, H*Dh) is already laid out as (B, H, 1, Dh): no transposes
            q = q.view(B, cfg.n_heads, 1, cfg.head_dim)
            k = k.view(B, cfg.n_kv_heads, 1, cfg.head_dim)
            v = v.view(B, cfg.n_kv_heads, 1, cfg.head_dim)
        else:
            q = q.view(B, S, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, S, Dh)
            k = k.view(B, S, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, S, Dh)
            v = v.view(B, S, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = self.ops.apply_rope(q, k, cos, sin)
        if step is not None:
            k_cache, v_cache = self.kv.write(step, k, v)  # this forward's rows (B, Hkv, Smax, Dh)
        if step is None or step.attend == "local":  # no cache, or a prompt from slot 0
            o = self.ops.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        elif S <= DECODE_MAX_NEW_TOKENS:  # the whole cache, masked by lengths: static shapes
            o = self.ops.decode_attention(q, k_cache, v_cache, cache_seqlens=step.seqlens_B,
                                          key_padding_mask=step.key_mask_BSk)
        else:  # a long chunk continuing a shared-index cache (eager only: slices to `end`)
            end = step.end
            o = self.ops.attention(q, k_cache[:, :, :end], v_cache[:, :, :end], causal=True,
                                   key_padding_mask=step.key_mask_BSk[:, :end])
        if S == 1:  # (B, H, 1, Dh) -> (B, 1, H*Dh) is a reshape of the same layout
            return self.out(o.reshape(B, 1, cfg.d_model))
        return self.out(o.transpose(1, 2).reshape(B, S, cfg.d_model))


class DenseFFN(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        # Fused as in the checkpoints: rows [0, F) = up, rows [F, 2F) = gate (spec §2.2).
        self.up_gate = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        up, gate = self.up_gate(x).chunk(2, dim=-1)
        return self.down(swiglu(gate, up))


class MoEFFN(nn.Module):
    """Softmax router over E experts, top-k, no renormalisation for MolmoE (spec §3.5 12'-16').

    Expert weights are stacked: w_gate, w_up (E, F, D) and w_down (E, D, F). `interleave_`
    puts w_gate and w_up in one (E, 2F, D) buffer (row 2f gate, 2f+1 up) without changing
    what they are: the Triton op reads that buffer as its gate|up weight with no copy
    (kernels/moe.py); the state dict still has the two tensors.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        moe = cfg.moe
        D, F_, E = cfg.d_model, moe.expert_hidden, moe.num_experts
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.zeros(E, F_, D))
        self.w_up = nn.Parameter(torch.zeros(E, F_, D))
        self.w_down = nn.Parameter(torch.zeros(E, D, F_))
        self.ops: Ops = REFERENCE_OPS
        # The router's aux of the last forward that needed gradients (training): lb_loss,
        # z_loss, counts... `molmoe.training` clears it, runs the forward, sums the losses.
        self.aux: dict | None = None

    @torch.no_grad()
    def interleave_(self) -> bool:
        """Store w_gate and w_up as the even and odd rows of one (E, 2F, D) buffer, in place:
        the Parameter objects stay (an optimizer holding them is unaffected), their data
        become strided views. Peak memory: one more gate+up pair of this layer while it runs.
        Skipped (False) for meta tensors and for distributed (FSDP) parameters, whose storage
        belongs to torch.distributed; True when the weights are interleaved afterwards.
        `module.to(...)` gives the two weights separate storage again; `Molmo.set_backend`
        calls this."""
        g, u = self.w_gate, self.w_up
        if type(g.data) is not torch.Tensor or type(u.data) is not torch.Tensor or g.is_meta:
            return False
        if interleaved_view(g.data, u.data) is not None:
            return True
        if u.shape != g.shape or u.dtype != g.dtype or u.device != g.device:
            return False
        E, F_, D = g.shape
        both = torch.empty(E, F_, 2, D, dtype=g.dtype, device=g.device)
        both[:, :, 0].copy_(g.data)
        both[:, :, 1].copy_(u.data)
        g.data, u.data = both[:, :, 0], both[:, :, 1]
        return True

    def forward(self, x):  # (B, S, D)
        y, aux = self.ops.moe_ffn(x.reshape(-1, x.shape[-1]), self.router.weight, self.w_gate,
                                  self.w_up, self.w_down, self.top_k, self.renormalize)
        if aux.get("lb_loss") is not None:  # no state is touched at inference (compiled step)
            self.aux = aux
        return y.view(x.shape)


class Block(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.norm_after = cfg.norm_after
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFFN(cfg) if cfg.moe is not None else DenseFFN(cfg)

    def forward(self, h, cos, sin, key_padding_mask, step):
        if self.norm_after:  # 7B-O: normalise the sublayer outputs instead of their inputs
            h = h + self.attn_norm(self.attn(h, cos, sin, key_padding_mask, step))
            return h + self.ffn_norm(self.ffn(h))
        h = h + self.attn(self.attn_norm(h), cos, sin, key_padding_mask, step)
        return h + self.ffn(self.ffn_norm(h))


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.cache: KVCache | None = None

    def bind_cache(self, cache: KVCache | None) -> None:
        """Give every layer its view of `cache` (None: unbind)."""
        self.cache = cache
        for i, block in enumerate(self.blocks):
            block.attn.kv = None if cache is None else cache.layer(i)

    def forward(self, h, cos, sin, attention_mask, step: CacheStep | None = None,
                logits_to_keep: int | None = None):
        """h (B, S, D) input embeddings -> logits (B, S or logits_to_keep, V). With `step`, the
        new keys/values go into the bound cache as it says (molmoe.model.kv_cache)."""
        for block in self.blocks:
            h = run_block(block, h, cos, sin, attention_mask, step)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return self.lm_head(self.norm(h))
