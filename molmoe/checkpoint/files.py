"""Finding and reading checkpoint files: hub ids, local dirs, safetensors shards, `.bin` pickles.

Everything is read lazily and memory-mapped where the format allows: each key maps to a zero-arg
function that returns the tensor, so the adapter pulls one tensor at a time.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import zipfile
from typing import Callable

import torch

from molmoe.checkpoint.adapter import CheckpointError

CHECKPOINT_FILES = ("model.safetensors.index.json", "model.safetensors",
                    "pytorch_model.bin.index.json", "pytorch_model.bin")
# What a load needs from a hub repo: weights, configs, tokenizer and processor files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.tiktoken"]


def resolve(model_id_or_dir: str | os.PathLike) -> pathlib.Path:
    """A local directory as is; otherwise a hub id through huggingface_hub's cache.

    The cache is tried first without network, so a cached model loads offline.
    """
    path = pathlib.Path(model_id_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory or a hub id")
    name = str(model_id_or_dir)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"{name!r} is neither a local directory nor a hub id like "
                              "'allenai/MolmoE-1B-0924'")
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(name, allow_patterns=HUB_PATTERNS,
                                              local_files_only=True))
    except Exception:
        pass
    try:
        return pathlib.Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise CheckpointError(f"could not fetch {name!r} from the Hugging Face hub and it is not "
                              f"in the local cache ({type(e).__name__}: {e})") from None


def read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def open_checkpoint(directory: pathlib.Path) -> dict[str, Callable[[], torch.Tensor]]:
    """key -> lazy tensor loader, over whichever official weight format the directory holds."""
    for name in CHECKPOINT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            weight_map = read_json(path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{path}: no 'weight_map' in the index")
            loaders = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = directory / shard
                if not shard_path.exists():
                    raise CheckpointError(f"{path}: shard {shard!r} is listed but missing")
                shard_keys = _open_file(shard_path)
                listed = {key for key, file in weight_map.items() if file == shard}
                for key in sorted(listed):
                    if key not in shard_keys:
                        raise CheckpointError(f"{shard_path}: key {key!r} listed in the "
                                              "index is not in the shard")
                    loaders[key] = shard_keys[key]
                # A tensor the index does not list would otherwise be dropped without a word.
                unlisted = sorted(set(shard_keys) - listed)
                if unlisted:
                    raise CheckpointError(f"{shard_path}: holds keys the index {path.name} does "
                                          f"not list for this shard: {unlisted[:10]}")
            return loaders
        return _open_file(path)
    present = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory}: no checkpoint weights found (looked for "
                          f"{', '.join(CHECKPOINT_FILES)}); the directory has {present}")


def _open_file(path: pathlib.Path) -> dict[str, Callable[[], torch.Tensor]]:
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    return _open_pickle(path)


def _open_safetensors(path: pathlib.Path):
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from None
    # safetensors validates the header offsets against the file size when it opens it, so a
    # truncated file fails above; get_tensor maps the bytes without copying.
    def loader(key):
        def load():
            try:
                return handle.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {key!r} "
                                      f"({type(e).__name__}: {e})") from None
        return load

    return {k: loader(k) for k in keys}


def _open_pickle(path: pathlib.Path):
    state = load_pickle_weights_only(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return {k: (lambda t=v: t) for k, v in state.items()}


# Bytes per element of the storage classes a torch zip archive names; anything else is counted
# as 1 byte per element, a lower bound that still catches a record cut short.
_STORAGE_ITEMSIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                     "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
                     "ByteStorage": 1, "BoolStorage": 1, "ComplexFloatStorage": 8,
                     "ComplexDoubleStorage": 16, "UntypedStorage": 1}


class _StorageScan(pickle.Unpickler):
    """Reads only the storage records a torch archive's data.pkl declares: every global becomes
    an inert placeholder, so nothing in the pickle is executed."""

    class _Inert(dict):
        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, int] = {}  # record key -> bytes the storage needs

    def find_class(self, module, name):
        if name.endswith("Storage"):
            return type(name, (), {"itemsize": _STORAGE_ITEMSIZE.get(name, 1)})
        return self._Inert

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, storage_type, key, _location, numel = pid
            need = int(numel) * getattr(storage_type, "itemsize", 1)
            self.storages[str(key)] = max(need, self.storages.get(str(key), 0))
        return None


def check_storage_records(path: pathlib.Path) -> None:
    """Every storage a zip-format torch archive declares must lie inside its own record.

    `torch.load(mmap=True)` maps a storage at its record's offset with the size the pickle
    declares and does not compare it with the record: a record cut short silently reads the
    bytes that follow it (other tensors, the zip directory) as weights, with the right shape
    and dtype. Without mmap torch checks this; with mmap it is checked here.
    """
    if not zipfile.is_zipfile(path):
        return  # legacy format: read without mmap, where torch itself checks the sizes
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        pkl = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: not a torch archive (no single data.pkl record)")
        prefix = pkl[0][: -len("data.pkl")]
        scan = _StorageScan(z.read(pkl[0]))
        try:
            scan.load()
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from None
    for key, need in sorted(scan.storages.items()):
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"{path}: storage record data/{key} is missing; the archive is "
                                  "truncated or corrupt")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size < need:
            raise CheckpointError(
                f"{path}: storage record data/{key} holds {info.file_size} bytes"
                f"{'' if info.compress_type == zipfile.ZIP_STORED else ' (compressed)'}, its "
                f"tensors need {need}; the archive is truncated or corrupt")


def load_pickle_weights_only(path: pathlib.Path):
    """`torch.load(weights_only=True)`, memory-mapped; an unrestricted pickle is refused."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) format cannot be mmapped; others re-raise
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to unpickle: the file holds Python objects beyond tensors, and "
            "loading it would run arbitrary code. If you trust its origin, convert it once in a "
            "separate process: python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{path}', weights_only=False); "
            "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\" "
            f"and put model.safetensors beside config.json. ({e})".replace("\n", " ")) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from None
    check_storage_records(path)  # what mmap does not check (see there)
    return state
