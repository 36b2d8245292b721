"""Small building blocks shared by the vision tower and the decoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back to the input dtype, then scale (spec §3.5, §7.2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (the ViT's pre_ln, spec §3.1 step 4)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos/sin (B, S, Dh) in fp32 for integer positions (B, S): rotate-half layout [phi, phi]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))  # (Dh/2,)
    phi = position_ids.float()[..., None] * inv_freq  # (B, S, Dh/2)
    phi = torch.cat((phi, phi), dim=-1)
    return phi.cos(), phi.sin()


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def run_block(block: nn.Module, *args):
    """`block(*args)`, or under activation checkpointing when the block is marked for it
    (`block.checkpointed = True`, set by the trainer) and a gradient is being recorded: its
    activations are then recomputed in the backward instead of kept (non-reentrant checkpoint,
    which composes with FSDP2's per-block hooks). Inference is never affected."""
    if getattr(block, "checkpointed", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)

