"""The one place where official checkpoint key names meet molmoe's module tree.

Three official layouts map onto the same model (spec §2):
  * "dense":       7B-D / 7B-O / 72B safetensors (`model.transformer.blocks.N.att_proj.weight`, ...)
  * "molmoe-hf":   MolmoE's HF module tree (`...blocks.N.attn.att_proj`, per-expert
                   `mlp.experts.E.{gate,up,down}_proj`, top-level `lm_head`)
  * "molmoe-megablocks": the training layout (`...blocks.N.ffn.experts.mlp.{w1,v1,w2}` fused over
                   experts, `ffn.router.layer`, `transformer.ff_out`)
plus "native", molmoe's own names, which `molmoe convert` writes. The leading `model.` prefix is
optional everywhere (spec §2.1).

`plan_native` maps a lazily read source onto native names and checks all of it; its
`tensor(name)` then assembles ONE native tensor (stacking experts where needed, straight onto the
target device), so `molmoe convert` streams; `to_native` assembles them all. `to_official` is
the inverse (tests write official-layout checkpoints with it; the adapter's own
round trip is tested, and parity against transformers checks that the mapping is right).
"""
from __future__ import annotations

import dataclasses
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
    dtype `dtype` (when given) and one of STORED_DTYPES (all checked by `plan_native`).
    """
    plan = plan_native(source, config, expected, dtype)
    return {name: plan.tensor(name) for name in plan}


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How one native tensor is read: `keys` holds one source key, or one per expert (HF MolmoE,
    stacked); `fused` names the megablocks target (w_gate/w_up/w_down) of a fused key."""
    keys: tuple[str, ...]
    stacked: bool = False
    fused: str | None = None


class NativePlan(Mapping[str, torch.Size]):
    """native name -> shape, checked against the source before any tensor is assembled.

    `tensor(name)` reads ONE native tensor, so a caller can hold a single layer's experts at a time
    (`molmoe convert` streams this way), and stacks experts straight into a tensor preallocated on
    the target device (so loading onto CUDA makes no host copy of every expert).
    """

    def __init__(self, source, config: MolmoConfig, recipes: dict[str, _Recipe],
                 expected: Mapping[str, torch.Size],
                 check: Callable[[str, torch.Tensor], None] | None = None):
        self._source, self._config, self._recipes = source, config, recipes
        self._shapes = {name: torch.Size(expected[name]) for name in recipes}
        self._check = check  # called on every assembled tensor (loader: the NaN/Inf check)

    def __getitem__(self, name: str) -> torch.Size:
        return self._shapes[name]

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def tensor(self, name: str, *, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The native tensor `name` on `device` in `dtype` (default: as stored, on the CPU); a
        memory-mapped tensor stays mapped (no copy) when it is already what was asked for."""
        t = self._assembled(name, device, dtype)
        if self._check is not None:
            keys = self._recipes[name].keys
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            self._check(f"key {keys[0]!r}{more} (native {name!r})", t)
        return t

    def _assembled(self, name: str, device, dtype: torch.dtype | None) -> torch.Tensor:
        recipe = self._recipes[name]
        if recipe.stacked:
            return _assemble([self._source[k]() for k in recipe.keys], self._shapes[name],
                             device, dtype)
        t = self._source[recipe.keys[0]]()
        if recipe.fused is None:
            return t.to(device=device or t.device, dtype=dtype or t.dtype)
        moe, D = self._config.text.moe, self._config.text.d_model
        t = t.view(moe.num_experts, moe.expert_hidden, D)
        # w2 rows of expert e are its down_proj weight transposed (spec §2.3); made contiguous,
        # so the math reads the same memory order as every other layout
        parts = t.transpose(1, 2) if recipe.fused == "w_down" else t
        if recipe.fused != "w_down" and (device is None or torch.device(device) == t.device) and (
                dtype in (None, t.dtype)):
            return t  # a view of the mapped file
        return _assemble(parts, self._shapes[name], device, dtype)


def _assemble(parts, shape: torch.Size, device, dtype) -> torch.Tensor:
    """Stack per-expert matrices into one tensor allocated where it will live, one expert's copy
    (and dtype conversion) at a time: no host-side stack of every expert (torch.stack would make
    one, then `.to(device)` a second)."""
    out = torch.empty(shape, device=device or "cpu", dtype=dtype or parts[0].dtype)
    for e, part in enumerate(parts):
        out[e].copy_(part)
    return out


def plan_native(source: Mapping[str, Callable[[], torch.Tensor]], config: MolmoConfig,
                expected: Mapping[str, torch.Size], dtype: torch.dtype | None = None, *,
                check: Callable[[str, torch.Tensor], None] | None = None) -> NativePlan:
    """Map source keys onto native names and check everything before assembling any tensor: every
    key used, once; every expected key filled; every source tensor's shape and dtype. `check`
    (native name, tensor) runs on each tensor the plan assembles."""
    layout = detect_layout(source.keys())
    recipes: dict[str, _Recipe] = {}
    experts: dict[str, dict[int, str]] = defaultdict(dict)
    unexpected = []
    E = config.text.moe.num_experts if config.text.moe else 0

    def put(native: str, src_key: str, fused: str | None = None):
        if native in recipes:
            raise CheckpointError(f"keys {recipes[native].keys[0]!r} and {src_key!r} both map to "
                                  f"{native!r}")
        recipes[native] = _Recipe((src_key,), fused=fused)

    for key in source:
        k = strip_prefix(key)
        if layout == "native":
            put(k, key)
            continue
        if k.startswith("vision_backbone."):
            put("vision." + k[len("vision_backbone."):], key)
            continue
        if k in _TOP_NAMES:
            put(_TOP_NAMES[k], key)
            continue
        if k == _HEAD[layout]:
            put("decoder.lm_head.weight", key)
            continue
        m = _BLOCK.fullmatch(k)
        if m is None:
            unexpected.append(key)
            continue
        n, rest = int(m.group(1)), m.group(2)
        if rest in _BLOCK_NAMES[layout]:
            put(f"decoder.blocks.{n}.{_BLOCK_NAMES[layout][rest]}", key)
        elif layout == "molmoe-hf" and (em := _HF_EXPERT.fullmatch(rest)):
            e = int(em.group(1))
            if e >= E:
                raise CheckpointError(f"key {key!r}: expert {e} but the config has {E} experts")
            native = f"decoder.blocks.{n}.ffn.{_HF_EXPERT_TARGET[em.group(2)]}"
            if e in experts[native]:
                raise CheckpointError(f"keys {experts[native][e]!r} and {key!r} both map to "
                                      f"{native!r} (expert {e})")
            experts[native][e] = key
        elif layout == "molmoe-megablocks" and rest in _MB_EXPERTS:
            put(f"decoder.blocks.{n}.ffn.{_MB_EXPERTS[rest]}", key, fused=_MB_EXPERTS[rest])
        else:
            unexpected.append(key)

    for native, per_expert in experts.items():
        missing = sorted(set(range(E)) - set(per_expert))
        if missing:
            raise CheckpointError(f"missing expert weights for {native}: experts {missing}")
        if native in recipes:
            raise CheckpointError(f"keys {recipes[native].keys[0]!r} and {per_expert[0]!r} both "
                                  f"map to {native!r}")
        recipes[native] = _Recipe(tuple(per_expert[e] for e in range(E)), stacked=True)

    if unexpected:
        raise CheckpointError(f"unexpected keys for layout {layout!r}: {unexpected[:10]}"
                              + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = [k for k in expected if k not in recipes]
    if missing:
        raise CheckpointError(f"missing keys (native names; layout {layout!r}): {missing[:10]}"
                              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    for native, recipe in recipes.items():
        if native not in expected:
            raise CheckpointError(f"unexpected key {recipe.keys[0]!r} (maps to {native!r}, which "
                                  "this config does not have)")
        _check_source(source, recipe, tuple(expected[native]), config, dtype)
    return NativePlan(source, config, recipes, expected, check)


def _check_source(source, recipe: _Recipe, want: tuple, config: MolmoConfig,
                  dtype: torch.dtype | None) -> None:
    """Shape and dtype of each source tensor of one native tensor (reading the tensor's header:
    loaders are memory-mapped, so no data is read)."""
    if recipe.stacked:
        want = want[1:]
    elif recipe.fused:
        moe, D = config.text.moe, config.text.d_model
        want = (moe.num_experts * moe.expert_hidden, D)
    for key in recipe.keys:
        t = source[key]()
        if tuple(t.shape) != want:
            raise CheckpointError(f"key {key!r}: expected shape {list(want)}, found "
                                  f"{list(t.shape)}")
        check_dtype(key, t, dtype)


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
