"""`molmoe convert SRC DST`: any supported checkpoint -> sharded safetensors in molmoe's layout.

The output loads memory-mapped with no key remapping or expert stacking. It is written into a
temporary sibling directory and renamed into place, so a crash never leaves a half-written DST.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from molmoe.checkpoint.adapter import CheckpointError
from molmoe.checkpoint.files import resolve
from molmoe.checkpoint.loader import (PRECISIONS, load_config_from_dir, load_state,
                                      parse_precision, stored_dtype)

# Non-weight files carried over so that DST is a complete model directory.
_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py")
_SKIP = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def convert(src, dst, *, dtype="float32", shard_bytes: int = 4 << 30, overwrite: bool = False,
            progress: bool = False) -> pathlib.Path:
    weights_dtype = PRECISIONS[parse_precision(dtype)][0]
    src_dir = resolve(src)
    dst = pathlib.Path(dst).expanduser().resolve()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists (pass overwrite=True / --overwrite)")
    config, raw = load_config_from_dir(src_dir)
    state = load_state(src_dir, config, stored_dtype(raw, str(src_dir / "config.json")))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        _write_shards(state, tmp, weights_dtype, shard_bytes, progress)
        raw = {k: v for k, v in raw.items() if k != "molmoe"}
        raw["molmoe"] = config.to_dict()
        raw["torch_dtype"] = str(weights_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        for pattern in _SIDE_FILES:
            for f in src_dir.glob(pattern):
                if f.name not in _SKIP:
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():  # durable before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_shards(state, out: pathlib.Path, dtype, shard_bytes: int, progress: bool):
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key]
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="writing shards", unit="shard")
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        # One shard at a time is materialised (cast, made contiguous) and written.
        tensors = {k: v.to(dtype).contiguous() for k, v in shard.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in shard})
        del tensors
        if bar:
            bar.update()
    if bar:
        bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
