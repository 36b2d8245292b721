"""The one place where official checkpoint key names meet molmoe's module tree.

Three official layouts map onto the same model (spec §2):
  * "dense":       7B-D / 7B-O / 72B safetensors (`model.transformer.blocks.N.att_proj.weight`, ...)
  * "molmoe-hf":   MolmoE's HF module tree (`...blocks.N.attn.att_proj`, per-expert
                   `mlp.experts.E.{gate,up,down}_proj`, top-level `lm_head`)
  * "molmoe-megablocks": the training layout (`...blocks.N.ffn.experts.mlp.{w1,v1,w2}` fused over
                   experts, `ffn.router.layer`, `transformer.ff_out`)
plus "native", molmoe's own names, which `molmoe convert` writes. The leading `model.` prefix is
optional everywhere (spec §2.1).

`to_native` maps a lazily read source onto native names, stacking experts where needed;
`to_official` is its inverse (tests write official-layout checkpoints with it; the adapter's own
round trip is tested, and parity against transformers checks that the mapping is right).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Mapping

import torch

from molmoe.config import MolmoConfig
from molmoe.errors import MolmoeError

LAYOUTS = ("dense", "molmoe-hf", "molmoe-megablocks", "native")
# Dtypes a checkpoint tensor may be stored in; the official files are float32.
STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointError(MolmoeError):
    """A checkpoint that cannot be loaded; the message names the file, key and shapes."""


# Per-block names shared by every layout after the block prefix, by layout: (official, native).
_ATTN_DENSE = {
    "attn_norm.weight": "attn_norm.weight",
    "att_proj.weight": "attn.qkv.weight",
    "att_proj.bias": "attn.qkv.bias",
    "q_norm.weight": "attn.q_norm.weight",
    "k_norm.weight": "attn.k_norm.weight",
    "attn_out.weight": "attn.out.weight",
    "ff_norm.weight": "ffn_norm.weight",
}
_BLOCK_NAMES = {
    "dense": {**_ATTN_DENSE, "ff_proj.weight": "ffn.up_gate.weight",
              "ff_out.weight": "ffn.down.weight"},
    "molmoe-hf": {"attn.attn_norm.weight": "attn_norm.weight",
                  "attn.att_proj.weight": "attn.qkv.weight",
                  "attn.q_norm.weight": "attn.q_norm.weight",
                  "attn.k_norm.weight": "attn.k_norm.weight",
                  "attn.attn_out.weight": "attn.out.weight",
                  "mlp.ff_norm.weight": "ffn_norm.weight",
                  "mlp.gate.weight": "ffn.router.weight"},
    "molmoe-megablocks": {**_ATTN_DENSE, "ffn.router.layer.weight": "ffn.router.weight"},
}
_TOP_NAMES = {
    "transformer.wte.embedding": "decoder.embed.embedding",
    "transformer.wte.new_embedding": "decoder.embed.new_embedding",
    "transformer.ln_f.weight": "decoder.norm.weight",
}
_HEAD = {"dense": "transformer.ff_out.weight", "molmoe-hf": "lm_head.weight",
         "molmoe-megablocks": "transformer.ff_out.weight"}
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_HF_EXPERT_TARGET = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
_MB_EXPERTS = {"ffn.experts.mlp.w1": "w_gate", "ffn.experts.mlp.v1": "w_up",
               "ffn.experts.mlp.w2": "w_down"}
_BLOCK = re.compile(r"transformer\.blocks\.(\d+)\.(.+)")


def strip_prefix(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def detect_layout(keys) -> str:
    keys = [strip_prefix(k) for k in keys]
    if any(k.startswith(("decoder.", "vision.")) for k in keys):
        return "native"
    if any(".mlp.experts." in k or k == "lm_head.weight" for k in keys):
        return "molmoe-hf"
    if any(".ffn.experts.mlp." in k for k in keys):
        return "molmoe-megablocks"
    if any(".ff_proj.weight" in k for k in keys):
        return "dense"
    raise CheckpointError("cannot tell the checkpoint layout: no decoder feed-forward keys "
                          "(ff_proj, mlp.experts, ffn.experts) found; first keys: "
                          f"{sorted(keys)[:5]}")


def check_dtype(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> None:
    """`dtype` (config.json's torch_dtype) when the config names one, else a float dtype that
    checkpoints are stored in. Checked on every tensor even after `weights_only` accepted the file:
    a safe unpickler admits any tensor, integer or float64 alike."""
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"key {key!r}: expected dtype {dtype} (config.json torch_dtype), "
                              f"found {t.dtype}")
    if t.dtype not in STORED_DTYPES:
        kind = "floating-point" if not t.dtype.is_floating_point else "float32/bfloat16/float16"
        raise CheckpointError(f"key {key!r}: expected a {kind} tensor "
                              f"({', '.join(str(d) for d in STORED_DTYPES)}), found {t.dtype}")


def to_native(source: Mapping[str, Callable[[], torch.Tensor]], config: MolmoConfig,
              expected: Mapping[str, torch.Size],
              dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read every source tensor (a zero-arg loader per key) and return native-named tensors.

    Every key must be used, every expected key filled, every shape equal to `expected`, every
    dtype `dtype` (when given) and one of STORED_DTYPES.
    """
    layout = detect_layout(source.keys())
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    experts: dict[tuple[int, str], dict[int, tuple[str, torch.Tensor]]] = defaultdict(dict)
    unexpected = []
    E = config.text.moe.num_experts if config.text.moe else 0

    def put(native: str, src_key: str, tensor: torch.Tensor):
        if native in out:
            raise CheckpointError(f"keys {origin[native]!r} and {src_key!r} both map to {native!r}")
        out[native], origin[native] = tensor, src_key

    for key, load in source.items():
        k = strip_prefix(key)
        if layout == "native":
            put(k, key, load())
            continue
        if k.startswith("vision_backbone."):
            put("vision." + k[len("vision_backbone."):], key, load())
            continue
        if k in _TOP_NAMES:
            put(_TOP_NAMES[k], key, load())
            continue
        if k == _HEAD[layout]:
            put("decoder.lm_head.weight", key, load())
            continue
        m = _BLOCK.fullmatch(k)
        if m is None:
            unexpected.append(key)
            continue
        n, rest = int(m.group(1)), m.group(2)
        if rest in _BLOCK_NAMES[layout]:
            put(f"decoder.blocks.{n}.{_BLOCK_NAMES[layout][rest]}", key, load())
        elif layout == "molmoe-hf" and (em := _HF_EXPERT.fullmatch(rest)):
            e = int(em.group(1))
            if e >= E:
                raise CheckpointError(f"key {key!r}: expert {e} but the config has {E} experts")
            experts[(n, _HF_EXPERT_TARGET[em.group(2)])][e] = (key, load())
        elif layout == "molmoe-megablocks" and rest in _MB_EXPERTS:
            put(f"decoder.blocks.{n}.ffn.{_MB_EXPERTS[rest]}", key,
                _unfuse_megablocks(key, load(), _MB_EXPERTS[rest], config))
        else:
            unexpected.append(key)

    for (n, target), per_expert in experts.items():
        native = f"decoder.blocks.{n}.ffn.{target}"
        missing = sorted(set(range(E)) - set(per_expert))
        if missing:
            raise CheckpointError(f"missing expert weights for {native}: experts {missing}")
        want = tuple(expected.get(native, (E, 0, 0)))[1:]
        for e, (key, t) in per_expert.items():
            if tuple(t.shape) != want:
                raise CheckpointError(f"key {key!r}: expected shape {list(want)}, found "
                                      f"{list(t.shape)}")
            check_dtype(key, t, dtype)  # before stacking, which would promote a stray dtype
        put(native, per_expert[0][0], torch.stack([per_expert[e][1] for e in range(E)]))

    if unexpected:
        raise CheckpointError(f"unexpected keys for layout {layout!r}: {unexpected[:10]}"
                              + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = [k for k in expected if k not in out]
    if missing:
        raise CheckpointError(f"missing keys (native names; layout {layout!r}): {missing[:10]}"
                              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    for native, tensor in out.items():
        if native not in expected:
            raise CheckpointError(f"unexpected key {origin[native]!r} (maps to {native!r}, which "
                                  "this config does not have)")
        if tuple(tensor.shape) != tuple(expected[native]):
            raise CheckpointError(f"key {origin[native]!r}: expected shape "
                                  f"{list(expected[native])}, found {list(tensor.shape)}")
        check_dtype(origin[native], tensor, dtype)
    return out


def _unfuse_megablocks(key: str, t: torch.Tensor, target: str, config: MolmoConfig):
    moe, D = config.text.moe, config.text.d_model
    E, F_ = moe.num_experts, moe.expert_hidden
    if tuple(t.shape) != (E * F_, D):
        raise CheckpointError(f"key {key!r}: expected shape {[E * F_, D]}, found {list(t.shape)}")
    t = t.view(E, F_, D)
    # w2 rows of expert e are its down_proj weight transposed (spec §2.3)
    # (contiguous, so the math reads the same memory order as every other layout)
    return t.transpose(1, 2).contiguous() if target == "w_down" else t


def to_official(native: Mapping[str, torch.Tensor], layout: str, *,
                prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Inverse of `to_native`: native-named tensors -> an official layout's keys."""
    if layout == "native":
        return dict(native)
    if layout not in _BLOCK_NAMES:
        raise ValueError(f"unknown layout {layout!r}; supported: {', '.join(LAYOUTS)}")
    inv_block = {v: k for k, v in _BLOCK_NAMES[layout].items()}
    inv_top = {v: k for k, v in _TOP_NAMES.items()}
    out = {}
    for name, t in native.items():
        if name.startswith("vision."):
            out[prefix + "vision_backbone." + name[len("vision."):]] = t
        elif name in inv_top:
            out[prefix + inv_top[name]] = t
        elif name == "decoder.lm_head.weight":
            head = _HEAD[layout]
            out[head if head == "lm_head.weight" else prefix + head] = t
        else:
            m = re.fullmatch(r"decoder\.blocks\.(\d+)\.(.+)", name)
            n, rest = m.group(1), m.group(2)
            base = f"{prefix}transformer.blocks.{n}."
            if rest in inv_block:
                out[base + inv_block[rest]] = t
            elif layout == "molmoe-hf" and rest.startswith("ffn.w_"):
                proj = {v: k for k, v in _HF_EXPERT_TARGET.items()}[rest[len("ffn."):]]
                for e in range(t.shape[0]):
                    out[f"{base}mlp.experts.{e}.{proj}.weight"] = t[e].clone()
            elif layout == "molmoe-megablocks" and rest.startswith("ffn.w_"):
                target = rest[len("ffn."):]
                fused = t.transpose(1, 2) if target == "w_down" else t  # (E, F, D)
                src = {v: k for k, v in _MB_EXPERTS.items()}[target]
                out[base + src] = fused.reshape(-1, fused.shape[-1]).contiguous()
            else:
                raise ValueError(f"{name!r} has no place in layout {layout!r}")
    return out
