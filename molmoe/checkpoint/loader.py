"""`molmoe.load`: official checkpoint -> Molmo in eval mode, without a full extra copy in RAM.

The model is built on the `meta` device, the adapter maps memory-mapped tensors onto it, and
`load_state_dict(assign=True)` adopts them (gpt-fast / torchtitan style).
"""
from __future__ import annotations

import os
import pathlib

import torch

from molmoe.backends import Backend, select_backend
from molmoe.checkpoint.adapter import CheckpointError, NativePlan, plan_native
from molmoe.checkpoint.files import open_checkpoint, read_json, resolve
from molmoe.compat import check_compat
from molmoe.config import ConfigError, MolmoConfig, check_memory, from_hf_config
from molmoe.errors import UsageError
from molmoe.generation.eos import generation_eos_ids
from molmoe.model import Molmo

# Precision modes (spec §7.1): weights dtype and optional autocast.
PRECISIONS = {
    "float32": (torch.float32, None),
    "amp_bf16": (torch.float32, torch.bfloat16),  # Ai2's evaluation setting
    "bfloat16": (torch.bfloat16, None),
    "float16": (torch.float16, None),
}
# Elements per step of the non-finite check: its temporary (one bool per element) stays at 16 MiB
# however large the tensor, instead of a quarter of an fp32 tensor's size.
FINITE_CHECK_CHUNK = 1 << 24
_ALIASES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
            "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "amp": "amp_bf16"}


def parse_precision(dtype) -> str:
    name = _ALIASES.get(dtype, dtype)
    if name not in PRECISIONS:
        raise UsageError(f"unknown dtype {dtype!r}; supported: {', '.join(PRECISIONS)}")
    return name


def load_config_from_dir(directory: pathlib.Path) -> tuple[MolmoConfig, dict]:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    raw = read_json(path)
    try:
        return from_hf_config(raw, source=str(path)), raw
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def stored_dtype(raw: dict, source: str = "config.json") -> torch.dtype | None:
    """The weights dtype config.json declares (`torch_dtype`; MolmoE's config has none)."""
    name = raw.get("torch_dtype")
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{source}: unknown torch_dtype {name!r}")
    return dtype


def refuse_non_finite(name: str, t: torch.Tensor) -> None:
    """CheckpointError naming `name` and how many NaN/Inf values `t` holds, if it holds any.

    One pass over the (memory-mapped) tensor in slices along its first dim of about
    FINITE_CHECK_CHUNK elements (views, so the check copies no weights, contiguous or not); the
    count is only taken for a tensor that fails. Tensors without data (device "meta") pass.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0 or t.is_meta:
        return
    chunks = [t] if t.dim() == 0 else t.split(max(1, FINITE_CHECK_CHUNK * t.shape[0] // t.numel()))
    if all(bool(torch.isfinite(c).all()) for c in chunks):
        return
    bad = sum(int((~torch.isfinite(c)).sum()) for c in chunks)
    why = ("the checkpoint is corrupt, or (when its values are finite) they overflow float16, "
           "whose largest value is 65504: load as bfloat16 or float32 instead"
           if t.dtype == torch.float16 else "the checkpoint is corrupt")
    raise CheckpointError(f"{name}: {bad} non-finite values (NaN/Inf) of {t.numel()}; {why} "
                          "(check_finite=False, or --no-check-finite, loads it anyway)")


def plan_state(directory: pathlib.Path, config: MolmoConfig,
               dtype: torch.dtype | None = None, *, check_finite: bool = True) -> NativePlan:
    """The checkpoint's native tensors, checked against config (names, shapes, and dtypes:
    `dtype`, config.json's torch_dtype, when given) and not yet assembled; with `check_finite`,
    every tensor the plan assembles is checked for NaN/Inf (after any cast, so a float16 overflow
    counts too)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Molmo(config).state_dict().items()}
    check = (lambda name, t: refuse_non_finite(f"{directory}: {name}", t)) if check_finite \
        else None
    return plan_native(open_checkpoint(directory), config, expected, dtype, check=check)


def load_state(directory: pathlib.Path, config: MolmoConfig,
               dtype: torch.dtype | None = None, *, device=None,
               weights_dtype: torch.dtype | None = None,
               check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Native-named tensors on `device` in `weights_dtype` (default: memory-mapped where the
    format allows, as stored). Stacked experts are assembled on `device` one expert at a time."""
    plan = plan_state(directory, config, dtype, check_finite=check_finite)
    return {k: plan.tensor(k, device=device, dtype=weights_dtype) for k in plan}


def load(model_id_or_dir: str | os.PathLike, *, dtype="float32", device="cpu",
         backend: str | Backend = "reference", check_finite: bool = True,
         compat: str = "molmoe") -> Molmo:
    """Load an official Molmo checkpoint (hub id or local directory) in eval mode.

    dtype: "float32", "amp_bf16" (fp32 weights run under bf16 autocast, as Ai2 evaluated),
    "bfloat16" (half the memory; outputs within bf16 tolerance), or "float16".
    check_finite: refuse weights holding NaN/Inf (they answer garbage); False skips the pass.
    compat: "molmoe" (default) or "released" (the released crop-validity rule; molmoe.compat).

    The checkpoint's generation_config.json EOS ids (checked to be rows of the LM head) are
    recorded as `model.generation_eos_token_ids` (a tuple, or None without one) and
    `model.generation_eos_token_id` (the first, or None); `molmoe.generation.engine_eos` reads
    them so an Engine stops where `molmoe generate` does.
    """
    weights_dtype, autocast_dtype = PRECISIONS[parse_precision(dtype)]
    check_compat(compat)
    # refuses what cannot run here; "meta" loads shapes only (no data)
    backend, device = select_backend(backend, device, allow_meta=True)
    directory = resolve(model_id_or_dir)
    config, raw = load_config_from_dir(directory)
    eos_ids = generation_eos_ids(directory, config)  # a bad file fails before the slow part
    stored = stored_dtype(raw, str(directory / "config.json"))
    check_memory(config, directory, dtype=weights_dtype, device=device,  # before any allocation
                 stored_dtype=stored)
    # Each tensor goes to `device` as it is assembled, a no-op (no copy) when the stored dtype and
    # device already match; experts are stacked on the device, with no host copy of them all.
    state = load_state(directory, config, stored, device=device, weights_dtype=weights_dtype,
                       check_finite=check_finite)
    with torch.device("meta"):
        model = Molmo(config)
    model.load_state_dict(state, strict=True, assign=True)
    # the model now holds the tensors; set_backend re-lays MoE gate/up weights out one layer at
    # a time (MoEFFN.interleave_), freeing each old pair as it goes, so no other reference
    del state
    model.set_backend(backend)
    model.set_compat(compat)
    model.autocast_dtype = autocast_dtype
    model.source = str(directory)
    model.generation_eos_token_ids = eos_ids
    model.generation_eos_token_id = eos_ids[0] if eos_ids else None
    return model.eval().requires_grad_(False)
