"""Model FLOPs of a training step, and the GPU peaks MFU is measured against.

The PaLM / Megatron accounting, shared by `molmoe train` (MFU in its log) and `molmoe profile
train`:

    FLOPs per token = 6 * N_active + 12 * L * S * d_attn
    FLOPs per step  = FLOPs per token * tokens

  N_active  the matrix weights one token is multiplied by: per decoder layer q/k/v and the output
            projection, the router (D * E) and only the ACTIVE experts (top_k of E, 3 * F * D
            each) -- or the dense SwiGLU (3 * D * F) -- plus the LM head (D * V rows). The input
            embedding (a lookup), norms and biases are left out. 6 = 2 FLOPs per multiply-add
            times 3 (forward, and a backward that costs twice the forward).
  12*L*S*d_attn  attention's score and value products (2 matmuls * 2 FLOPs * 3 for fwd+bwd,
            per layer, each token against all S keys; d_attn = heads * head_dim). Counted
            without the causal halving, as PaLM does.

Only the text decoder is counted: the ViT and connector, when they run, make MFU an
underestimate. Legend: D model width, E experts, F expert width, L layers, S sequence length.
"""
from __future__ import annotations

BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # also GH200
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)


def active_matmul_params(config) -> dict:
    """The matrix weights one token is multiplied by in the text decoder (see the docstring)."""
    t = config.text
    D, kv, q = t.d_model, t.kv_dim, t.n_heads * t.head_dim
    attn = D * (q + 2 * kv) + q * D
    if t.moe is None:
        ffn = 3 * D * t.ffn_hidden
    else:
        ffn = D * t.moe.num_experts + t.moe.top_k * 3 * t.moe.expert_hidden * D
    lm_head = D * t.embedding_size
    return {"attention_per_layer": attn, "ffn_per_layer": ffn, "lm_head": lm_head,
            "total": t.n_layers * (attn + ffn) + lm_head}


def train_flops(config, batch: int, seq_len: int) -> dict:
    """Model FLOPs of one training step: (6 * N_active + 12 * L * S * d_attn) * B * S."""
    t = config.text
    n_active = active_matmul_params(config)["total"]
    d_attn = t.n_heads * t.head_dim
    dense = 6 * n_active
    attn = 12 * t.n_layers * seq_len * d_attn
    tokens = batch * seq_len
    return {"active_params": n_active, "per_token": dense + attn, "per_token_dense": dense,
            "per_token_attention": attn, "tokens": tokens, "per_step": (dense + attn) * tokens,
            "formula": "(6 * N_active + 12 * n_layers * seq_len * d_attn) * batch * seq_len; "
                       "N_active = matrix weights per token, only top_k experts"}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU by its name (torch.cuda.get_device_name); None
    for one not in BF16_PEAK_TFLOPS (no MFU is then reported)."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None
