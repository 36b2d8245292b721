"""Finding and reading checkpoint files: hub ids, local dirs, safetensors shards, `.bin` pickles.

Everything is read lazily and memory-mapped where the format allows: each key maps to a zero-arg
function that returns the tensor, so the adapter pulls one tensor at a time.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import pathlib
import pickle
import re
import zipfile
from typing import Callable

import torch

from molmoe import fileio
from molmoe.checkpoint.adapter import CheckpointError

CHECKPOINT_FILES = ("model.safetensors.index.json", "model.safetensors",
                    "pytorch_model.bin.index.json", "pytorch_model.bin")
# What a load needs from a hub repo: weights, configs, tokenizer and processor files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.tiktoken"]
# Errors snapshot_download raises for a repo it cannot find or fetch: the hub's HTTP errors,
# LocalEntryNotFoundError and network errors are OSErrors, an invalid repo id is a ValueError.
_HUB_ERRORS = (OSError, ValueError)
# A name that may be a hub repo id: "org/name", one separator, no other path syntax.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def resolve(model_id_or_dir: str | os.PathLike) -> pathlib.Path:
    """A local directory as is; otherwise a hub id through huggingface_hub's cache.

    The cache is tried first without network, so a cached model loads offline. A name that
    cannot be a hub id ("./x", "/x", "~/x", "a/b/c", "ckpts/x" where ckpts/ exists) is only a
    local path, and a missing one says "no such local directory" without trying the hub.
    """
    name = os.fspath(model_id_or_dir)
    try:
        path = pathlib.Path(name).expanduser()
    except RuntimeError:  # "~user/..." for an unknown user
        path = pathlib.Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is not a directory; pass the checkpoint directory or a "
                              "hub id")
    if not _could_be_hub_id(name):
        hint = "" if _looks_local(name) else ", and it is not a hub id like 'allenai/MolmoE-1B-0924'"
        raise CheckpointError(f"no such local directory {name!r}{hint}")
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(name, allow_patterns=HUB_PATTERNS,
                                              local_files_only=True))
    except _HUB_ERRORS:
        pass
    try:
        return pathlib.Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except _HUB_ERRORS as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"no such local directory {name!r}, and not found as a hub id: "
                              f"could not fetch it from the Hugging Face hub and it is not in "
                              f"the local cache ({reason})") from None


def _looks_local(name: str) -> bool:
    return any(sep in name for sep in (os.sep, os.altsep) if sep) or name.startswith((".", "~"))


def _could_be_hub_id(name: str) -> bool:
    """'org/name' whose 'org' is not an existing local path (then it is a mistyped local one)."""
    return _HUB_ID.fullmatch(name) is not None and not os.path.lexists(name.split("/")[0])


def regular_file(path: pathlib.Path) -> pathlib.Path:
    """`path` if it is (a symlink to) a regular file, else CheckpointError (molmoe.fileio)."""
    return fileio.regular_file(path, CheckpointError)


def read_json(path: pathlib.Path) -> dict:
    """A JSON object file (config, index, tokenizer and generation files), else CheckpointError."""
    return fileio.read_json(path, CheckpointError)


def open_checkpoint(directory: pathlib.Path) -> dict[str, Callable[[], torch.Tensor]]:
    """key -> lazy tensor loader, over whichever official weight format the directory holds."""
    for name in CHECKPOINT_FILES:
        path = directory / name
        if not (path.exists() or path.is_symlink()):
            continue
        if name.endswith(".index.json"):
            return _open_index(directory, path)
        return _open_file(_weight_file(directory, name, path))
    present = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory}: no checkpoint weights found (looked for "
                          f"{', '.join(CHECKPOINT_FILES)}); the directory has {present}")


def _open_index(directory: pathlib.Path, path: pathlib.Path):
    suffix = ".safetensors" if path.name.startswith("model.safetensors") else ".bin"
    weight_map = _weight_map(read_json(path), path, suffix)
    loaders = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = _weight_file(directory, shard, path)
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


def _weight_map(index: dict, path: pathlib.Path, suffix: str) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name, every shard a `suffix` file."""
    weight_map = index.get("weight_map")
    if weight_map is None:
        raise CheckpointError(f"{path}: no 'weight_map' in the index")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: 'weight_map' in the index is "
                              f"{fileio.json_type(weight_map)}, not an object")
    if not weight_map:
        raise CheckpointError(f"{path}: 'weight_map' in the index is empty")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.strip():
            raise CheckpointError(f"{path}: weight_map[{key!r}] = {shard!r} is not a file name")
        if not shard.endswith(suffix):
            raise CheckpointError(f"{path}: weight_map[{key!r}] = {shard!r} is not a {suffix} "
                                  f"file, as the index {path.name} requires")
    return weight_map


def _weight_file(directory: pathlib.Path, name: str, named_by: pathlib.Path) -> pathlib.Path:
    """directory/name, a regular file that lies inside the checkpoint directory.

    A weight_map entry is a path relative to the directory; an absolute path, a `..` that climbs
    out, or a symlink whose target lies outside would read weights from elsewhere on the machine.
    The one exception is the hub cache, whose snapshots/<rev>/ files are symlinks into the repo's
    blobs/: there the repo folder is the boundary.
    """
    path = directory / name
    if not (path.exists() or path.is_symlink()):
        raise CheckpointError(f"{named_by}: shard {name!r} is listed but missing")
    regular_file(path)
    if pathlib.PurePath(name).is_absolute() or not path.resolve().is_relative_to(
            _confinement_root(directory)):
        raise CheckpointError(f"{named_by}: weights file {name!r} lies outside the checkpoint "
                              f"directory {directory}; refusing to read it")
    return path


def _confinement_root(directory: pathlib.Path) -> pathlib.Path:
    root = directory.resolve()
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent  # hub cache: models--org--name/{snapshots/<rev>,blobs}/
    return root


def _open_file(path: pathlib.Path) -> dict[str, Callable[[], torch.Tensor]]:
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    return _open_pickle(path)


# Byte-aligned safetensors dtypes and their sizes; the sub-byte ones (F4, F6_*) are refused.
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                        "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                        "F64": 8, "I64": 8, "U64": 8, "C64": 8}
# safetensors' own limit on the JSON header (100 MB); real headers are well under 1 MB. The header
# is read into memory, so this bounds what a corrupt length field can cost.
SAFETENSORS_MAX_HEADER = 100_000_000


class _HeaderError(Exception):
    """A malformed safetensors header (internal; reported as CheckpointError)."""


def check_safetensors_header(path: pathlib.Path) -> None:
    """Validate a safetensors file's header against its size before safetensors maps it.

    safetensors checks most of this itself, but a header check here gives every malformed file
    one error type and guarantees that no tensor is larger than the bytes the file holds (so a
    header declaring a 10^12-element tensor cannot cost memory). Also refused here, unlike
    safetensors: duplicate JSON keys (which copy of the entry counts is the parser's choice).
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _HeaderError(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(SAFETENSORS_MAX_HEADER, size - 8):
                raise _HeaderError(f"header length {n} exceeds the file ({size} bytes) or the "
                                   f"{SAFETENSORS_MAX_HEADER}-byte limit")
            header = _parse_header(f.read(n))
        _check_entries(header, size - 8 - n)
    except _HeaderError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})"
                              ) from None


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _HeaderError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _no_constant(name):
    raise _HeaderError(f"{name} is not JSON")


def _parse_header(raw: bytes) -> dict:
    if not raw.startswith(b"{"):
        raise _HeaderError("the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # invalid UTF-8 / JSON, too deep, too many digits
        raise _HeaderError(f"invalid JSON header: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(header, dict):
        raise _HeaderError("the header is not a JSON object")
    return header


def _is_count(x) -> bool:
    return type(x) is int and 0 <= x < 2 ** 63


def _check_entries(header: dict, data_size: int) -> None:
    """Every entry: known dtype, a shape of counts, offsets whose span is exactly the tensor's
    size; the spans tile the data section without gaps or overlaps."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _HeaderError("__metadata__ is not a map of strings")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _HeaderError(f"entry {key!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise _HeaderError(f"tensor {key!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(map(_is_count, shape)):
            raise _HeaderError(f"tensor {key!r}: shape {shape!r} is not a list of counts")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
                or offsets[0] > offsets[1]):
            raise _HeaderError(f"tensor {key!r}: data_offsets {offsets!r} are not [begin, end]")
        # torch computes strides as products of the dims (a 0 counted as 1): they must fit in
        # int64 even for a tensor with no elements ([0, 2**62, 4] is valid JSON, not a tensor).
        if math.prod(max(d, 1) for d in shape) * SAFETENSORS_ITEMSIZE[dtype] >= 2 ** 63:
            raise _HeaderError(f"tensor {key!r}: shape {shape} is too large for a tensor")
        nbytes = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _HeaderError(f"tensor {key!r}: {dtype} {shape} needs {nbytes} bytes, its "
                               f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise _HeaderError(f"tensor {key!r}: data starts at {begin}, expected {end} "
                               "(overlapping or gapped offsets)")
        end = stop
    if end != data_size:
        raise _HeaderError(f"the tensors cover {end} data bytes, the file holds {data_size}")


def _open_safetensors(path: pathlib.Path):
    from safetensors import SafetensorError, safe_open

    check_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from None
    # get_tensor maps the bytes without copying.
    def loader(key):
        def load():
            try:
                return handle.get_tensor(key)
            except (SafetensorError, OSError) as e:
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
    """Reads a pickle with every global replaced by an inert placeholder, so nothing in it is
    executed: it tells a well-formed pickle from a corrupt file, and collects the storage records
    a torch archive's data.pkl declares."""

    class _Inert(dict):
        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

    def __init__(self, file):
        super().__init__(file)
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


# What unpickling malformed bytes raises, even with inert globals (a bad opcode or memo index,
# a truncated stream, an opcode applied to the wrong kind of object, nesting too deep).
_MALFORMED_PICKLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError,
                     AttributeError, OverflowError, RecursionError)
# torch.save's legacy (non-zip) format: this magic number, then the protocol version, system
# info, the object and its storage keys, five pickles in a row, then the raw storage bytes.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _scan_pickle(file, path: pathlib.Path, what: str) -> _StorageScan:
    scan = _StorageScan(file)
    try:
        scan.value = scan.load()
    except _MALFORMED_PICKLE as e:
        raise CheckpointError(f"{path}: {what} is not a valid pickle, the file is truncated or "
                              f"corrupt ({type(e).__name__}: {' '.join(str(e).split())})") from None
    return scan


def _scan_legacy(path: pathlib.Path) -> None:
    """A non-zip .bin must be a well-formed pickle (torch's legacy format is five of them)."""
    with open(path, "rb") as f:
        head = f.read(2)
        # Every pickle of protocol 2 or later opens with the PROTO opcode; torch writes 2.
        if head == b"PK":  # a zip's local header, but zipfile found no directory at the end
            raise CheckpointError(f"{path}: zip archive without its directory; the file is "
                                  "truncated or corrupt")
        if len(head) < 2 or head[0] != pickle.PROTO[0] or not 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip "
                                  f"archive nor a pickle{'; the file is empty' if not head else ''})")
        # Read through a map: a length field in a corrupt pickle then costs no allocation.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if _scan_pickle(m, path, "the pickle").value == _TORCH_LEGACY_MAGIC:
                for _ in range(4):
                    _scan_pickle(m, path, "a pickle of the legacy torch format")


def _scan_zip(path: pathlib.Path) -> tuple[str, dict[str, zipfile.ZipInfo], dict[str, int]]:
    """A torch zip archive's data.pkl, read inertly: (record prefix, records, storage sizes)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: a zip archive, but not a torch archive (no "
                                      "single data.pkl record)")
            if infos[pkl[0]].compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: {pkl[0]} is compressed; torch.save never "
                                      "compresses, so this is not a torch archive")
            with z.open(pkl[0]) as f:
                scan = _scan_pickle(f, path, pkl[0])
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable zip archive, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from None
    return pkl[0][: -len("data.pkl")], infos, scan.storages


def check_storage_records(path: pathlib.Path, prefix: str, infos: dict[str, zipfile.ZipInfo],
                          storages: dict[str, int]) -> None:
    """Every storage a zip-format torch archive declares must lie inside its own record.

    `torch.load(mmap=True)` maps a storage at its record's offset with the size the pickle
    declares and does not compare it with the record: a record cut short silently reads the
    bytes that follow it (other tensors, the zip directory) as weights, with the right shape
    and dtype. Without mmap torch checks this; with mmap it is checked here.
    """
    for key, need in sorted(storages.items()):
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
    """`torch.load(weights_only=True)`, memory-mapped; an unrestricted pickle is refused.

    The file is first read as an inert pickle (nothing executed): a file that is not a
    well-formed pickle is reported as corrupt, so only a real pickle that names Python objects
    beyond tensors gets the advice to convert it with weights_only=False.
    """
    regular_file(path)
    archive = _scan_zip(path) if zipfile.is_zipfile(path) else None
    if archive is None:
        _scan_legacy(path)
    try:
        # The legacy format cannot be memory-mapped; torch checks its sizes itself.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=archive is not None)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to unpickle: the file holds Python objects beyond tensors, and "
            "loading it would run arbitrary code. If you trust its origin, convert it once in a "
            "separate process: python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{path}', weights_only=False); "
            "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')\" "
            f"and put model.safetensors beside config.json. ({e})".replace("\n", " ")) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, LookupError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    if archive is not None:
        check_storage_records(path, *archive)  # what mmap does not check (see there)
    return state
