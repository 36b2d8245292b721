"""`molmoe.load`: official checkpoint -> Molmo in eval mode, without a full extra copy in RAM.

The model is built on the `meta` device, the adapter maps memory-mapped tensors onto it, and
`load_state_dict(assign=True)` adopts them (gpt-fast / torchtitan style).
"""
from __future__ import annotations

import os
import pathlib

import torch

from molmoe.errors import UsageError
from molmoe.backends import Backend
from molmoe.checkpoint.adapter import CheckpointError, to_native
from molmoe.checkpoint.files import open_checkpoint, read_json, resolve
from molmoe.config import ConfigError, MolmoConfig, from_hf_config
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


def refuse_non_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` as is, or CheckpointError naming `name` and how many NaN/Inf values it holds.

    One pass over the (memory-mapped) tensor in slices along its first dim of about
    FINITE_CHECK_CHUNK elements (views, so the check copies no weights, contiguous or not); the
    count is only taken for a tensor that fails.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return t
    chunks = [t] if t.dim() == 0 else t.split(max(1, FINITE_CHECK_CHUNK * t.shape[0] // t.numel()))
    if all(bool(torch.isfinite(c).all()) for c in chunks):
        return t
    bad = sum(int((~torch.isfinite(c)).sum()) for c in chunks)
    raise CheckpointError(f"{name}: {bad} non-finite values (NaN/Inf) of {t.numel()}; the "
                          "checkpoint is corrupt (check_finite=False loads it anyway)")


def load_state(directory: pathlib.Path, config: MolmoConfig, dtype: torch.dtype | None = None,
               check_finite_weights: bool = True) -> dict[str, torch.Tensor]:
    """Native-named tensors (memory-mapped where the format allows), checked against config:
    names, shapes, and dtypes (`dtype`, config.json's torch_dtype, when given), and, with
    `check_finite_weights`, for NaN/Inf values as each tensor is read."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Molmo(config).state_dict().items()}
    source = open_checkpoint(directory)
    if check_finite_weights:
        source = {key: (lambda key=key, read=read: refuse_non_finite(f"{directory}: {key}", read()))
                  for key, read in source.items()}
    return to_native(source, config, expected, dtype)


def load(model_id_or_dir: str | os.PathLike, *, dtype="float32", device="cpu",
         backend: str | Backend = "reference", check_finite: bool = True) -> Molmo:
    """Load an official Molmo checkpoint (hub id or local directory) in eval mode.

    dtype: "float32", "amp_bf16" (fp32 weights run under bf16 autocast, as Ai2 evaluated),
    "bfloat16" (half the memory; outputs within bf16 tolerance), or "float16".
    check_finite: refuse weights holding NaN/Inf (they answer garbage); False skips the pass.
    """
    weights_dtype, autocast_dtype = PRECISIONS[parse_precision(dtype)]
    backend = Backend.parse(backend)
    directory = resolve(model_id_or_dir)
    config, raw = load_config_from_dir(directory)
    state = load_state(directory, config, stored_dtype(raw, str(directory / "config.json")),
                       check_finite)
    # .to() is a no-op (no copy) when the stored dtype and device already match.
    state = {k: v.to(device=device, dtype=weights_dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = Molmo(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.set_backend(backend)
    model.autocast_dtype = autocast_dtype
    model.source = str(directory)
    return model.eval().requires_grad_(False)
