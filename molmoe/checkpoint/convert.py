"""`molmoe convert SRC DST`: any supported checkpoint -> sharded safetensors in molmoe's layout.

The output loads memory-mapped with no key remapping or expert stacking.

Streaming. The whole source is checked first (names, shapes, dtypes; `plan_native`), then ONE
native tensor at a time is assembled (at most one layer's stacked w_gate, w_up or w_down), cast,
and written into its shard by `_write_safetensors`, a writer of the safetensors format that takes
tensors one by one (safetensors' own `save_file` needs a whole shard in memory at once). Peak
anonymous memory is about one stacked expert tensor, whatever the model's depth or shard size.

Paths. DST may not be SRC, lie inside SRC or contain it (compared after resolving symlinks), and
no file of SRC may link into DST; an empty DST (""), a file and a symbolic link are refused. An
existing DST is replaced only with `overwrite`, and only when it is empty or was written by molmoe
convert and holds nothing else: every output carries MARKER (`molmoe-convert.json`, naming
molmoe's version, the source directory, the dtype and every file convert wrote).

Atomicity. Everything is written into a temporary sibling `.DST.tmp-<pid>-<random>` and made
durable (fsync) before it is put in place:
  * no DST: renamed to DST (renameat2 RENAME_NOREPLACE where available);
  * an existing DST, on Linux: renameat2(RENAME_EXCHANGE) swaps the two directories in one atomic
    step, then the old copy, now under the temporary name, is removed;
  * where the exchange is unavailable (another OS, a filesystem without it): DST is renamed aside
    to `.DST.old-<pid>-<random>`, the new copy renamed in, the old one removed.
So DST is at every instant the complete old or the complete new copy; only in the fallback,
between its two renames, is the old copy complete under `.DST.old-*` instead. A run holds an
exclusive flock on its temporary directory and on the DST it replaces; the next run into the same
DST removes every `.DST.tmp-*` / `.DST.old-*` that nobody holds (its run died), after renaming an
orphaned old copy back to DST when DST is missing. The output's modes honour the umask (mkdtemp
makes 0700): directory 0o777 & ~umask, files 0o666 & ~umask.

Test hooks (environment variables, for the kill test; not for use): MOLMOE_CONVERT_KILL_AT=<step>
makes convert SIGKILL itself right after that step (WRITE_STEPS, then "renamed_in" for a new DST,
EXCHANGE_STEPS or FALLBACK_STEPS for a replaced one; "shard_written" fires after the first
shard); MOLMOE_CONVERT_NO_EXCHANGE=1 takes the fallback path as if renameat2 were missing.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import importlib.metadata
import json
import numbers
import os
import pathlib
import re
import secrets
import shutil
import signal
import struct
import tempfile

import torch

from molmoe.checkpoint.adapter import CheckpointError, NativePlan
from molmoe.checkpoint.files import resolve
from molmoe.checkpoint.loader import (PRECISIONS, load_config_from_dir, parse_precision,
                                      plan_state, stored_dtype)
from molmoe.errors import UsageError

MARKER = "molmoe-convert.json"
KILL_ENV = "MOLMOE_CONVERT_KILL_AT"
NO_EXCHANGE_ENV = "MOLMOE_CONVERT_NO_EXCHANGE"
WRITE_STEPS = ("tmp_created", "shard_written", "index_written", "config_written",
               "side_files_copied", "marker_written", "synced")
EXCHANGE_STEPS = ("exchanged", "old_removed")
FALLBACK_STEPS = ("old_moved_aside", "renamed_in", "old_removed")

# Non-weight files carried over so that DST is a complete model directory.
_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py")
_SKIP = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", MARKER}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_MARKER_MAX_BYTES = 1 << 20  # a marker lists a few hundred file names; anything bigger is not ours


def convert(src, dst, *, dtype="float32", shard_bytes: int = 4 << 30, overwrite: bool = False,
            progress: bool = False, check_finite: bool = True) -> pathlib.Path:
    """Write SRC (hub id or directory, any supported layout) to DST as sharded safetensors in
    `dtype`, shards of at most `shard_bytes` (a tensor bigger than that gets a shard of its own).
    `check_finite`: refuse NaN/Inf in the weights (after the cast to `dtype`), as `molmoe.load`.
    See the module docstring for what is refused, and how DST is replaced atomically."""
    weights_dtype = PRECISIONS[parse_precision(dtype)][0]
    if (isinstance(shard_bytes, bool) or not isinstance(shard_bytes, numbers.Integral)
            or shard_bytes <= 0):
        raise UsageError(f"shard_bytes must be a positive integer number of bytes, "
                         f"got {shard_bytes!r}")
    src_dir = resolve(src)
    dst = _check_paths(src_dir, dst)
    _recover(dst)
    _check_replaceable(dst, overwrite)
    config, raw = load_config_from_dir(src_dir)
    plan = plan_state(src_dir, config, stored_dtype(raw, str(src_dir / "config.json")),
                      check_finite=check_finite)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    lock = _lock(tmp)  # a fresh directory: only a run cleaning up this very instant holds it
    if lock is None:
        raise CheckpointError(f"{tmp}: taken by another molmoe convert into {dst}; run again")
    try:
        _step("tmp_created")
        _write_shards(plan, tmp, weights_dtype, int(shard_bytes), progress)
        raw = {k: v for k, v in raw.items() if k != "molmoe"}
        raw["molmoe"] = config.to_dict()
        raw["torch_dtype"] = str(weights_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        _step("config_written")
        for pattern in _SIDE_FILES:
            for f in src_dir.glob(pattern):
                if f.name not in _SKIP and f.is_file():  # regular files (or links to them) only
                    shutil.copyfile(f, tmp / f.name)
        _step("side_files_copied")
        _write_marker(tmp, src_dir, weights_dtype)
        _step("marker_written")
        _make_durable(tmp)
        _step("synced")
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return dst


# ------------------------------------------------------------------------------------ paths


def _check_paths(src_dir: pathlib.Path, dst) -> pathlib.Path:
    """DST, resolved, when converting into it cannot touch SRC; else a CheckpointError."""
    if os.fspath(dst) == "":
        raise CheckpointError("DST is empty; name the output directory")
    given = pathlib.Path(dst).expanduser()
    if given.is_symlink():
        raise CheckpointError(f"{given} is a symbolic link; refusing to replace it (name a "
                              "directory instead)")
    out, source = given.resolve(), src_dir.resolve()
    if out == source:
        raise CheckpointError(f"DST {out} is the source directory")
    if out.is_relative_to(source):
        raise CheckpointError(f"DST {out} is inside the source directory {source}")
    if source.is_relative_to(out):
        raise CheckpointError(f"DST {out} contains the source directory {source}")
    for f in src_dir.iterdir():
        if f.resolve().is_relative_to(out):
            raise CheckpointError(f"source file {f} links into DST {out}; replacing DST would "
                                  "lose it")
    return out


def _check_replaceable(dst: pathlib.Path, overwrite: bool) -> None:
    if not os.path.lexists(dst):
        return
    if not dst.is_dir():
        raise CheckpointError(f"{dst} is a file, not a directory; refusing to replace it")
    if not overwrite:
        raise CheckpointError(f"{dst} already exists (pass overwrite=True / --overwrite)")
    names = {p.name for p in dst.iterdir()}
    if not names:
        return
    written = _files_written_by_molmoe(dst)
    if written is None:
        raise CheckpointError(f"{dst} is a non-empty directory that molmoe convert did not write "
                              f"(no valid {MARKER}); refusing to replace it")
    extra = sorted(names - written)
    if extra:
        raise CheckpointError(f"{dst} holds files molmoe convert did not write: {extra[:10]}; "
                              "refusing to replace it")


def _write_marker(out: pathlib.Path, src_dir: pathlib.Path, dtype: torch.dtype) -> None:
    try:
        version = importlib.metadata.version("molmoe")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    files = sorted({p.name for p in out.iterdir()} | {MARKER})
    (out / MARKER).write_text(json.dumps({
        "written_by": "molmoe convert", "molmoe_version": version,
        "source": str(src_dir.resolve()), "dtype": str(dtype).removeprefix("torch."),
        "files": files}, indent=2))


def _files_written_by_molmoe(directory: pathlib.Path) -> set[str] | None:
    """The file names MARKER lists, or None when there is no valid marker."""
    path = directory / MARKER
    if path.is_symlink() or not path.is_file() or path.stat().st_size > _MARKER_MAX_BYTES:
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if marker.get("written_by") != "molmoe convert" or not isinstance(files, list) or not all(
            isinstance(f, str) for f in files):
        return None
    return set(files)


# --------------------------------------------------------------------------------- writing


def _write_shards(plan: NativePlan, out: pathlib.Path, dtype: torch.dtype, shard_bytes: int,
                  progress: bool) -> None:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(plan):
        nbytes = plan[name].numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    from tqdm import tqdm

    # leave=False: the bar is erased when it closes, also when a tensor is refused midway, so an
    # error stays the one line the CLI prints
    with tqdm(total=n, desc="writing shards", unit="shard", disable=not progress,
              leave=False) as bar:
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{n:05d}.safetensors"
            total += _write_safetensors(out / file, plan, names, dtype)
            weight_map.update(dict.fromkeys(names, file))
            _step("shard_written")
            bar.update()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _step("index_written")


def _write_safetensors(path: pathlib.Path, plan: NativePlan, names: list[str],
                       dtype: torch.dtype) -> int:
    """Write one safetensors file a tensor at a time; returns its data bytes. The format: an
    8-byte little-endian header length, a JSON header (dtype, shape and byte range of each
    tensor), padded with spaces to 8 bytes as safetensors pads it, then the raw little-endian
    bytes (every machine molmoe runs on is little-endian)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = plan[name].numel() * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(plan[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            t = plan.tensor(name, device="cpu", dtype=dtype).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # no copy: the buffer itself
            del t  # before the next one is assembled
    return offset


def _umask() -> int:
    """The process umask, read from /proc/self/status without changing it; elsewhere set and
    restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_durable(out: pathlib.Path) -> None:
    """Modes from the umask, then every file and the directory on disk."""
    mask = _umask()
    for f in out.iterdir():
        os.chmod(f, 0o666 & ~mask)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.chmod(out, 0o777 & ~mask)
    _fsync_dir(out)


# ------------------------------------------------------------------------ replacing, debris


def _replace(tmp: pathlib.Path, dst: pathlib.Path) -> None:
    """Put the complete `tmp` at `dst` (see the module docstring)."""
    if not os.path.lexists(dst):
        try:
            if not _renameat2(tmp, dst, _RENAME_NOREPLACE):
                os.rename(tmp, dst)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
            raise CheckpointError(f"{dst} appeared while converting ({e.strerror}); "
                                  "left as it is") from None
        _step("renamed_in")
        _fsync_dir(dst.parent)
        return
    old_lock = _lock(dst)
    if old_lock is None:
        raise CheckpointError(f"{dst} is being replaced by another molmoe convert")
    try:
        if _renameat2(tmp, dst, _RENAME_EXCHANGE):
            _step("exchanged")
            _fsync_dir(dst.parent)
            shutil.rmtree(tmp)  # the old copy, under the temporary name
            _step("old_removed")
            return
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(dst, old)
        _step("old_moved_aside")
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        _step("renamed_in")
        _fsync_dir(dst.parent)
        shutil.rmtree(old)
        _step("old_removed")
    finally:
        os.close(old_lock)


def _recover(dst: pathlib.Path) -> None:
    """Clean up after runs into `dst` that were killed: restore an old copy the fallback had moved
    aside when DST is missing, and remove every other temporary or old directory nobody holds."""
    if not dst.parent.is_dir():
        return
    debris = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-\d+-[a-z0-9_]+")
    found: dict[str, list[tuple[pathlib.Path, int]]] = {"tmp": [], "old": []}
    try:
        for p in dst.parent.iterdir():
            m = debris.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink() and (fd := _lock(p)) is not None:
                found[m.group(1)].append((p, fd))
        olds = sorted((p for p, _ in found["old"]), key=lambda p: p.stat().st_mtime)
        if olds and not os.path.lexists(dst):
            os.rename(olds.pop(), dst)
            _fsync_dir(dst.parent)
        for p in [p for p, _ in found["tmp"]] + olds:
            shutil.rmtree(p)
    finally:
        for _, fd in found["tmp"] + found["old"]:
            os.close(fd)


def _lock(directory: pathlib.Path) -> int | None:
    """An exclusive flock on `directory`, held by the returned descriptor until it is closed (or
    its process dies); None when another live run holds it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no such C library function (glibc < 2.28, not Linux)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: pathlib.Path, dst: pathlib.Path, flags: int) -> bool:
    """renameat2(2) with `flags`: True when done, False where the C library, the kernel or the
    filesystem lacks it (the caller then falls back); other failures raise OSError."""
    fn = None if os.environ.get(NO_EXCHANGE_ENV) else _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _step(name: str) -> None:
    """Test hook (see the module docstring): die here, as a crash would, when asked to."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
