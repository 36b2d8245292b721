"""`molmoe convert SRC DST`: any supported checkpoint -> sharded safetensors in molmoe's layout.

The output loads memory-mapped with no key remapping or expert stacking.

Streaming. The whole source is checked first (names, shapes, dtypes; `plan_native`), then ONE
native tensor at a time is assembled (at most one layer's stacked w_gate, w_up or w_down), cast,
and written into its shard by `_write_safetensors`, a writer of the safetensors format that takes
tensors one by one (safetensors' own `save_file` needs a whole shard in memory at once). Peak
anonymous memory is about one stacked expert tensor, whatever the model's depth or shard size.

Paths. DST may not be SRC, lie inside SRC or contain it (compared after resolving symlinks), and no
file of SRC's top level nor any file convert reads (config, index, every shard the index names,
side files: at any depth, resolved) may lie in DST; a side file that is not a regular file (a FIFO,
a dangling link) is refused, not left out; an empty DST (""), a name over NAME_MAX bytes, a file
and a symbolic link are refused, and so is a DST whose parent is missing, not a directory or not
writable (checked, and the temporary directory made, before the long read). An existing DST is
replaced only with `overwrite`, and only when it is empty or is an unchanged molmoe convert output
holding nothing else: every output carries MARKER (`molmoe-convert.json`, naming molmoe's version,
the source directory, the dtype, and every other file convert wrote with its size, mtime and
sha256, hashed as it was written). A file that is extra, or changed (`_unchanged_output`), is
named and the run refused. DST is checked before the conversion and again, under its lock, right
before the swap (a symbolic link or another directory in its place is refused); the old copy once
more right after it (still the very directory locked, not a link). Nothing is ever deleted
through a path: the old copy's files are unlinked through a descriptor of the directory opened
with O_NOFOLLOW and checked to be the locked one (`_unlink_all`), and locks are taken likewise.

Atomicity. Everything is written into a temporary sibling `.DST.tmp-<pid>-<random>` (made by
mkdtemp, holding a "writing" MARKER from its first moment) and made durable (fsync) before it is
put in place:
  * no DST: renamed to DST (renameat2 RENAME_NOREPLACE where available);
  * an existing DST, on Linux: renameat2(RENAME_EXCHANGE) swaps the two directories in one atomic
    step, then the old copy, now under the temporary name, is removed file by file: exactly the
    files its marker lists, then the directory with rmdir. Anything else found in it undoes the
    swap (or, failing that, leaves the old copy in a visible `DST.kept-by-molmoe-convert-*`);
  * where the exchange is unavailable (another OS, a filesystem without it): DST is renamed aside
    to `.DST.old-<pid>-<random>`, checked, the new copy renamed in, the old one removed as above.
So DST is at every instant the complete old or the complete new copy; only in the fallback, between
its two renames, is the old copy complete under `.DST.old-*` instead. Interrupted there (Ctrl-C,
any exception), the old copy is put back, or removed once the new one is in place (`_settle`); a
SIGKILL leaves that to the next run. For a DST name so long that these names would pass NAME_MAX,
DST's name in them is shortened (`_stem`). A run holds an exclusive flock on its temporary
directory and on the DST it replaces; the next run into the same DST cleans up after runs that died
(`_recover`): it restores an orphaned old copy when DST is missing and removes the others, touching
only directories molmoe provably made (the exact name it makes, nobody holding the lock, and empty
or carrying its marker: see `_debris_names`); a user's `.DST.old-backup` is never touched. The
output's modes honour the umask (mkdtemp makes 0700): directory 0o777 & ~umask, files 0o666 &
~umask.

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
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import secrets
import signal
import stat
import struct
import tempfile
from collections.abc import Mapping

import torch

from molmoe.checkpoint.adapter import CheckpointError, NativePlan
from molmoe.checkpoint.files import CHECKPOINT_FILES, read_json, regular_file, resolve
from molmoe.checkpoint.loader import (PRECISIONS, load_config_from_dir, parse_precision,
                                      plan_state, refuse_non_finite, stored_dtype)
from molmoe.errors import UsageError, is_int, is_integral
from molmoe.fileio import fsync_dir, json_type

MARKER = "molmoe-convert.json"
WRITTEN_BY = "molmoe convert"
INDEX = "model.safetensors.index.json"
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
# Checking that an output is unchanged hashes every file up to this size (config, index, tokenizer
# files: milliseconds); a bigger one (a shard: gigabytes, as long to read again as to convert) is
# hashed only when its mtime differs from the recorded one, e.g. after a plain `cp -r`.
HASH_ALWAYS_BYTES = 64 << 20


def convert(src, dst, *, dtype="float32", shard_bytes: int = 4 << 30, overwrite: bool = False,
            progress: bool = False, check_finite: bool = True,
            state: Mapping[str, torch.Tensor] | None = None) -> pathlib.Path:
    """Write SRC (hub id or directory, any supported layout) to DST as sharded safetensors in
    `dtype`, shards of at most `shard_bytes` (a tensor bigger than that gets a shard of its own).
    `check_finite`: refuse NaN/Inf in the weights (after the cast to `dtype`), as `molmoe.load`.
    `state`: native-named weights to write INSTEAD of SRC's (the trainer's export: a fine-tuned
    model with SRC's config and side files); every name and shape must be SRC's.
    See the module docstring for what is refused, and how DST is replaced atomically."""
    weights_dtype = PRECISIONS[parse_precision(dtype)][0]
    if not is_integral(shard_bytes) or shard_bytes <= 0:
        raise UsageError(f"shard_bytes must be a positive integer number of bytes, "
                         f"got {shard_bytes!r}")
    src_dir = resolve(src)
    dst = _check_paths(src_dir, dst)
    _recover(dst)
    _check_replaceable(dst, overwrite)
    tmp, lock = _make_tmp(dst)  # before the long read: DST's parent really takes a directory
    try:
        _step("tmp_created")
        config, raw = load_config_from_dir(src_dir)
        plan = plan_state(src_dir, config, stored_dtype(raw, str(src_dir / "config.json")),
                          check_finite=check_finite)
        if state is not None:
            plan = _StatePlan(state, plan, check_finite)
        _check_reads(src_dir, dst)
        digests = _write_shards(plan, tmp, weights_dtype, int(shard_bytes), progress)
        raw = {k: v for k, v in raw.items() if k != "molmoe"}
        raw["molmoe"] = config.to_dict()
        raw["torch_dtype"] = str(weights_dtype).removeprefix("torch.")
        digests["config.json"] = _write_file(tmp / "config.json",
                                             [json.dumps(raw, indent=2).encode()])
        _step("config_written")
        for f in _side_files(src_dir):
            digests[f.name] = _write_file(tmp / f.name, _chunks(f))
        _step("side_files_copied")
        _write_marker(tmp, src_dir, weights_dtype, digests)
        _step("marker_written")
        _make_durable(tmp)
        _step("synced")
        _replace(tmp, dst, overwrite, lock)
    except BaseException:
        _remove_debris(tmp, lock)  # our copy; never an old copy swapped in there (_settle's)
        raise
    finally:
        os.close(lock)
    return dst


class _StatePlan(Mapping[str, torch.Size]):
    """In-memory native weights in the shape of a source's plan (the names and shapes it expects),
    read the way `_write_shards` reads a NativePlan."""

    def __init__(self, state: Mapping[str, torch.Tensor], like: NativePlan, check_finite: bool):
        missing, extra = set(like) - set(state), set(state) - set(like)
        if missing or extra:
            raise CheckpointError(f"weights to export do not match the source's names: missing "
                                  f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        for name in like:
            if tuple(state[name].shape) != tuple(like[name]):
                raise CheckpointError(f"weight {name!r} has shape {tuple(state[name].shape)}, "
                                      f"the source's config expects {tuple(like[name])}")
        self._state, self._shapes, self._check_finite = state, like, check_finite

    def __getitem__(self, name: str) -> torch.Size:
        return self._shapes[name]

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def tensor(self, name: str, *, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._state[name].detach()
        t = t.to(device=device or "cpu", dtype=dtype or t.dtype)
        if self._check_finite:
            refuse_non_finite(f"weight {name!r}", t)
        return t


# ------------------------------------------------------------------------------------ paths


def _check_paths(src_dir: pathlib.Path, dst) -> pathlib.Path:
    """DST, resolved, when converting into it cannot touch SRC and its parent directory takes a
    new directory; else a CheckpointError."""
    if os.fspath(dst) == "":
        raise CheckpointError("DST is empty; name the output directory")
    given = pathlib.Path(dst).expanduser()
    for part in given.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise CheckpointError(f"DST {part[:40]}...: a name of {len(os.fsencode(part))} "
                                  f"bytes; a file name has at most {NAME_MAX}")
    if given.is_symlink():
        raise CheckpointError(f"{given} is a symbolic link; refusing to replace it (name a "
                              "directory instead)")
    try:
        out = given.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop on the way (RuntimeError before 3.13)
        raise CheckpointError(f"{given}: cannot resolve the path ({e})") from None
    source = src_dir.resolve()
    if out == source:
        raise CheckpointError(f"DST {out} is the source directory")
    if out.is_relative_to(source):
        raise CheckpointError(f"DST {out} is inside the source directory {source}")
    if source.is_relative_to(out):
        raise CheckpointError(f"DST {out} contains the source directory {source}")
    _refuse_links_into(src_dir.iterdir(), out)  # the files convert reads: _check_reads
    parent = out.parent
    if not parent.is_dir():
        raise CheckpointError(f"{parent}: " + ("is not a directory" if parent.exists() else
                                               "no such directory; create it first"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{parent}: not writable; cannot create {out.name} there")
    return out


def _check_reads(src_dir: pathlib.Path, dst: pathlib.Path) -> None:
    """Refuse when a file convert reads from SRC (config, index, every shard the index names,
    side files) resolves inside DST, at any depth: replacing DST would destroy the source. Called
    once the plan has checked the index."""
    files = [src_dir / "config.json", *_side_files(src_dir)]
    for name in CHECKPOINT_FILES:  # the one open_checkpoint reads
        path = src_dir / name
        if os.path.lexists(path):
            files.append(path)
            if name.endswith(".index.json"):
                files += [src_dir / shard for shard in
                          sorted(set(read_json(path)["weight_map"].values()))]
            break
    _refuse_links_into(files, dst)


def _refuse_links_into(files, dst: pathlib.Path) -> None:
    for f in files:
        if pathlib.Path(os.path.realpath(f)).is_relative_to(dst):  # realpath: no error on loops
            raise CheckpointError(f"source file {f} links into DST {dst}; replacing DST would "
                                  "lose it")


def _side_files(src_dir: pathlib.Path) -> list[pathlib.Path]:
    """SRC's non-weight files carried over, each checked to be a regular file (or a link to one):
    a FIFO, a directory or a dangling link is refused, not left out of the output unsaid."""
    return [regular_file(f) for pattern in _SIDE_FILES for f in sorted(src_dir.glob(pattern))
            if f.name not in _SKIP]


def _make_tmp(dst: pathlib.Path) -> tuple[pathlib.Path, int]:
    """A new locked `.DST.tmp-<pid>-<random>` carrying molmoe's marker from its first moment on
    (so that recovery can tell it from a user's directory of a similar name). Until it is locked,
    another run's recovery may take it for debris (empty, nobody holding it) and remove it: then
    once more with a fresh one."""
    stem, sep = _stem(dst.name)
    for _ in range(2):
        try:
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{stem}.tmp{sep}{os.getpid()}-",
                                                dir=dst.parent))
        except OSError as e:
            raise CheckpointError(f"{dst.parent}: cannot create a directory there "
                                  f"({e.strerror or e})") from None
        try:
            lock = _lock(tmp)
        except OSError:  # removed (or replaced) by another run cleaning up this very instant
            continue
        if lock is not None and _is_locked_dir(tmp, lock):
            break
        if lock is not None:
            os.close(lock)
    else:
        raise CheckpointError(f"{dst.parent}: another molmoe convert into {dst.name} removed "
                              "this run's temporary directories as soon as they were made; "
                              "run again")
    try:
        _write_json(tmp / MARKER, {"written_by": WRITTEN_BY, "state": "writing"})
    except BaseException:
        _unlink_all(tmp, {MARKER, MARKER + ".part"}, lock)  # all we wrote there
        os.close(lock)
        raise
    return tmp, lock


def _check_replaceable(dst: pathlib.Path, overwrite: bool) -> None:
    """A CheckpointError unless DST is missing, or may be replaced: empty, or an unchanged
    molmoe output (`_unchanged_output`)."""
    if not os.path.lexists(dst):
        return
    if not dst.is_dir():
        raise CheckpointError(f"{dst} is a file, not a directory; refusing to replace it")
    if not overwrite:
        raise CheckpointError(f"{dst} already exists (pass overwrite=True / --overwrite)")
    _unchanged_output(dst)


# ------------------------------------------------------------------------------- the marker


def _write_marker(out: pathlib.Path, src_dir: pathlib.Path, dtype: torch.dtype,
                  digests: dict[str, str]) -> None:
    """MARKER, replacing the "writing" one: every other file with its size, mtime and sha256."""
    try:
        version = importlib.metadata.version("molmoe")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    written = {p.name for p in out.iterdir()} - {MARKER}
    assert written == set(digests), (written, set(digests))  # every file hashed as written
    files = {}
    for name in sorted(digests):
        st = os.stat(out / name)
        files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digests[name]}
    _write_json(out / MARKER, {
        "written_by": WRITTEN_BY, "molmoe_version": version, "source": str(src_dir.resolve()),
        "dtype": str(dtype).removeprefix("torch."), "files": files})


def _write_json(path: pathlib.Path, value: dict) -> None:
    """Written aside and renamed over `path`: a crash leaves the old or the new marker."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(value, indent=2))
    os.replace(part, path)


def _marker(directory: pathlib.Path) -> dict:
    """MARKER in `directory`, checked to be molmoe's; else CheckpointError naming the problem."""
    path = directory / MARKER
    if path.is_symlink():
        raise CheckpointError(f"{path}: is a symbolic link, not a marker molmoe convert wrote")
    if regular_file(path).stat().st_size > _MARKER_MAX_BYTES:
        raise CheckpointError(f"{path}: over {_MARKER_MAX_BYTES} bytes, not a marker molmoe "
                              "convert wrote")
    marker = read_json(path)
    if marker.get("written_by") != WRITTEN_BY:
        raise CheckpointError(f"{path}: not written by molmoe convert ('written_by' is "
                              f"{marker.get('written_by')!r})")
    return marker


def _listed(directory: pathlib.Path, marker: dict) -> dict[str, dict]:
    """The marker's `files` (name -> size, mtime_ns, sha256), each entry checked."""
    path, files = directory / MARKER, marker.get("files")
    if isinstance(files, list):
        raise CheckpointError(f"{path}: written by an older molmoe convert, which did not record "
                              f"the files' contents; check {directory} and remove it by hand")
    if not isinstance(files, dict):
        state = " (a conversion that did not finish)" if files is None else ""
        raise CheckpointError(f"{path}: 'files' is {json_type(files)}, not an object{state}")
    for name, rec in files.items():
        if name in ("", ".", "..", MARKER) or "/" in name or "\0" in name or (
                os.altsep and os.altsep in name):
            raise CheckpointError(f"{path}: {name!r} is not a file name in {directory}")
        if not (isinstance(rec, dict) and _is_count(rec.get("size"))
                and _is_count(rec.get("mtime_ns")) and isinstance(rec.get("sha256"), str)
                and re.fullmatch("[0-9a-f]{64}", rec["sha256"])):
            raise CheckpointError(f"{path}: files[{name!r}] must hold 'size', 'mtime_ns' and "
                                  "'sha256'")
    return files


def _is_count(x) -> bool:
    return is_int(x) and x >= 0


def _unchanged_output(directory: pathlib.Path, shown: pathlib.Path | None = None) -> set[str]:
    """The names `directory` holds when it is empty or exactly what molmoe convert wrote there,
    unchanged (files it wrote may be missing: a deleted file is not lost by replacing); else a
    CheckpointError naming the first file that is not (`shown`: the path to name instead).

    Changed: another size, or another sha256. A file of up to HASH_ALWAYS_BYTES is always hashed;
    a bigger one (a shard) only when its mtime is not the one recorded."""
    shown = shown or directory
    names = {p.name for p in directory.iterdir()}
    if not names:
        return names
    if not os.path.lexists(directory / MARKER):
        raise CheckpointError(f"{shown} is a non-empty directory that molmoe convert did not "
                              f"write (no {MARKER}); refusing to replace it")
    files = _listed(directory, _marker(directory))
    extra = sorted(names - set(files) - {MARKER})
    if extra:
        raise CheckpointError(f"{shown} holds files molmoe convert did not write: {extra[:10]}; "
                              "refusing to replace it")
    for name in sorted(names - {MARKER}):
        how = _changed(directory / name, files[name])
        if how:
            raise CheckpointError(f"{shown / name} changed since molmoe convert wrote it ({how}); "
                                  "refusing to replace it")
    return names


def _changed(path: pathlib.Path, rec: dict) -> str | None:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return "no longer a regular file"
    if st.st_size != rec["size"]:
        return f"{st.st_size} bytes, written {rec['size']}"
    if st.st_size > HASH_ALWAYS_BYTES and st.st_mtime_ns == rec["mtime_ns"]:
        return None
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return None if digest.hexdigest() == rec["sha256"] else "its sha256 differs"


# --------------------------------------------------------------------------------- writing


def _write_shards(plan: NativePlan, out: pathlib.Path, dtype: torch.dtype, shard_bytes: int,
                  progress: bool) -> dict[str, str]:
    """The shards and their index; returns each file's sha256, computed as it was written."""
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
    weight_map, total, digests = {}, 0, {}
    from tqdm import tqdm

    # leave=False: the bar is erased when it closes, also when a tensor is refused midway, so an
    # error stays the one line the CLI prints
    with tqdm(total=n, desc="writing shards", unit="shard", disable=not progress,
              leave=False) as bar:
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{n:05d}.safetensors"
            nbytes, digests[file] = _write_safetensors(out / file, plan, names, dtype)
            total += nbytes
            weight_map.update(dict.fromkeys(names, file))
            _step("shard_written")
            bar.update()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    digests[INDEX] = _write_file(out / INDEX, [json.dumps(index, indent=2).encode()])
    _step("index_written")
    return digests


def _write_safetensors(path: pathlib.Path, plan: NativePlan, names: list[str],
                       dtype: torch.dtype) -> tuple[int, str]:
    """Write one safetensors file a tensor at a time; returns its data bytes and the file's
    sha256. The format: an 8-byte little-endian header length, a JSON header (dtype, shape and
    byte range of each tensor), padded with spaces to 8 bytes as safetensors pads it, then the raw
    little-endian bytes (every machine molmoe runs on is little-endian)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = plan[name].numel() * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(plan[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def chunks():
        yield struct.pack("<Q", len(blob)) + blob
        for name in names:
            t = plan.tensor(name, device="cpu", dtype=dtype).contiguous()
            yield t.reshape(-1).view(torch.uint8).numpy()  # no copy: the buffer itself
            del t  # before the next one is assembled

    return offset, _write_file(path, chunks())


def _write_file(path: pathlib.Path, chunks) -> str:
    """A new file from byte chunks; returns its sha256 (hashed on the way: no second read)."""
    digest = hashlib.sha256()
    with open(path, "xb") as f:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
            del chunk  # a tensor's buffer: gone before the next one is assembled
    return digest.hexdigest()


def _chunks(path: pathlib.Path, size: int = 1 << 20):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


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
    fsync_dir(out)


# ------------------------------------------------------------------------ replacing, debris


def _replace(tmp: pathlib.Path, dst: pathlib.Path, overwrite: bool, lock: int) -> None:
    """Put the complete `tmp` (the directory `lock` holds) at `dst` (see the module docstring).
    An existing DST is checked again under its lock right before the swap (a file saved into it
    while converting is not lost; a link or another directory put in its place is refused), and
    its old copy again right after: holding anything new, or not the directory checked, the swap
    is undone. Interrupted (Ctrl-C, any exception) in between, the old copy is put back while
    the new one is not in place, else removed (`_settle`)."""
    if not os.path.lexists(dst):
        try:
            if not _renameat2(tmp, dst, _RENAME_NOREPLACE):
                os.rename(tmp, dst)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
            raise CheckpointError(f"{dst} appeared while converting ({e.strerror}); "
                                  "left as it is") from None
        _step("renamed_in")
        fsync_dir(dst.parent)
        return
    old_lock = _lock_dst(dst)
    old = tmp  # where the old copy goes by the exchange; _settle tells by the inode where it is
    try:
        _check_replaceable(dst, overwrite)  # under the lock, the last thing before the swap
        if not _is_locked_dir(dst, old_lock):
            raise CheckpointError(f"{dst} was replaced by a symbolic link or another directory "
                                  "while converting; left as it is")
        if _renameat2(tmp, dst, _RENAME_EXCHANGE):
            _step("exchanged")
            _remove_old(tmp, dst, old_lock, undo=lambda: _renameat2(tmp, dst, _RENAME_EXCHANGE))
            return
        stem, sep = _stem(dst.name)
        old = dst.with_name(f".{stem}.old{sep}{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(dst, old)
        _step("old_moved_aside")
        _check_old(old, dst, old_lock, undo=lambda: os.rename(old, dst) is None)
        os.rename(tmp, dst)
        _step("renamed_in")
        _remove_old(old, dst, old_lock, undo=lambda: False)
    except BaseException:
        _settle(old, dst, old_lock, lock)
        raise
    finally:
        os.close(old_lock)


def _lock_dst(dst: pathlib.Path) -> int:
    """The lock on the existing DST (its own directory, never one a link points to)."""
    try:
        fd = _lock(dst)
    except OSError as e:
        now = "now a symbolic link" if os.path.islink(dst) else e.strerror
        raise CheckpointError(f"{dst} changed while converting ({now}); left as it is") from None
    if fd is None:
        raise CheckpointError(f"{dst} is being replaced by another molmoe convert")
    return fd


def _is_locked_dir(path: pathlib.Path, lock: int) -> bool:
    """Whether `path` itself (not a link's target) is the directory `lock` holds."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and os.path.samestat(st, os.fstat(lock))


def _check_old(old: pathlib.Path, dst: pathlib.Path, old_lock: int, undo) -> set[str]:
    """The names the old copy, just moved away from DST, holds when it is still the directory
    checked and locked (`old_lock`) and an unchanged molmoe output (`_unchanged_output`); else
    the move is undone (`undo()`, True when done) or the old copy kept aside, and
    CheckpointError."""
    if not _is_locked_dir(old, old_lock):
        problem = (f"{dst} was replaced by a symbolic link or another directory at the very "
                   "moment of the swap")
    else:
        try:
            return _unchanged_output(old, shown=dst)
        except CheckpointError as e:
            problem = f"{e} (at the very end of the conversion)"
    try:
        undone = undo()
    except OSError:
        undone = False
    where = "left as it was" if undone else f"what was there is kept in {_keep(old, dst)}"
    raise CheckpointError(f"{problem}; {where}")


def _remove_old(old: pathlib.Path, dst: pathlib.Path, old_lock: int, undo) -> None:
    """Remove the replaced copy file by file, exactly the files its marker lists, checked
    unchanged; never a file that appeared in it (kept aside under a name that says so)."""
    names = _check_old(old, dst, old_lock, undo)
    fsync_dir(dst.parent)
    if not _unlink_all(old, names, old_lock):
        kept = _keep(old, dst)
        raise CheckpointError(f"{dst} was replaced, but its old copy changed while it was being "
                              f"removed (files appeared, or a link took its place); what is left "
                              f"is kept in {kept}")
    _step("old_removed")


def _settle(old: pathlib.Path, dst: pathlib.Path, old_lock: int, new_lock: int) -> None:
    """After an interruption while replacing DST, when the old copy (`old_lock`'s directory) is
    still at `old`: put it back if DST is missing, remove it if the new copy (`new_lock`'s) is in
    place, else (or when it changed) keep it in sight. A SIGKILL leaves this to the next run."""
    if not _is_locked_dir(old, old_lock):
        return  # never moved, back at DST, or kept aside already
    if _is_locked_dir(dst, new_lock):
        names = _debris_names(old, writing=False)
        if names is not None and _unlink_all(old, names, old_lock):
            return
    elif not os.path.lexists(dst):
        try:
            os.rename(old, dst)
            return
        except OSError:
            pass
    _keep(old, dst)


def _unlink_all(directory: pathlib.Path, names, lock: int) -> bool:
    """Unlink `names` (MARKER last: what is left is still recognisably ours), then the directory;
    False when it holds anything else. Everything goes through descriptors: `directory` opened
    with O_NOFOLLOW and checked to be the one `lock` holds, so nothing is ever removed through a
    link, nor from a directory put in its place."""
    parent = os.open(directory.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fd = os.open(directory.name, _DIR_NOFOLLOW, dir_fd=parent)
        except OSError:  # gone, or a link now (ELOOP, ENOTDIR)
            return False
        try:
            if not os.path.samestat(os.fstat(fd), os.fstat(lock)):
                return False
            for name in sorted(set(names) - {MARKER}) + [MARKER] * (MARKER in names):
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
        try:
            os.rmdir(directory.name, dir_fd=parent)  # an empty directory: nothing lost
        except OSError:
            return False
        return True
    finally:
        os.close(parent)


def _keep(old: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """Rename an old copy holding a user's files to a visible sibling no run will touch."""
    kept = dst.with_name(f"{_stem(dst.name)[0]}.kept-by-molmoe-convert-{secrets.token_hex(4)}")
    try:
        os.rename(old, kept)
    except OSError:
        return old
    return kept


# A file name has at most NAME_MAX bytes (255 on Linux's and macOS's filesystems). The longest
# name convert derives from DST's adds _SUFFIX_MAX bytes: ".kept-by-molmoe-convert-<8 hex>" (a
# temporary or old copy adds at most 22: ".", ".tmp-", a pid of at most 7 digits, "-", 8).
NAME_MAX = 255
_SUFFIX_MAX = len(".kept-by-molmoe-convert-") + 8
_STEM_HEAD = 100  # bytes of a long DST name kept in its siblings' names, for the eye


def _stem(name: str) -> tuple[str, str]:
    """How DST's name appears in its siblings' names (`.<stem>.tmp<sep><pid>-<random>`,
    `.<stem>.old<sep>...`, `<stem>.kept-by-molmoe-convert-...`), and `sep`: the name itself and
    "-" while those fit in NAME_MAX; else its first _STEM_HEAD bytes, a hash of all of it, and
    "~". The separator keeps recognition exact: a stem is itself a valid name, but no sibling of
    a DST whose name fits ends like one of a DST whose name was shortened."""
    raw = os.fsencode(name)
    if len(raw) + _SUFFIX_MAX <= NAME_MAX:
        return name, "-"
    head = name
    while len(os.fsencode(head)) > _STEM_HEAD:
        head = head[:-1]
    return f"{head}-{hashlib.sha256(raw).hexdigest()[:16]}", "~"


def _debris_names(p: pathlib.Path, *, writing: bool) -> set[str] | None:
    """What molmoe may remove from `p` (a directory named like its debris): all of it when it
    is empty, an unchanged output (`_unchanged_output`), or (`writing`: a temporary directory)
    one whose marker says it was being written; None when it is not provably molmoe's."""
    try:
        names = {e.name for e in p.iterdir()}
        if not names:
            return names
        marker = _marker(p)
        if writing and marker.get("state") == "writing" and "files" not in marker:
            return {e.name for e in p.iterdir() if e.is_symlink() or not e.is_dir()}
        return _unchanged_output(p)
    except (CheckpointError, OSError):
        return None


def _remove_debris(p: pathlib.Path, lock: int) -> None:
    names = _debris_names(p, writing=True)
    if names is not None:
        _unlink_all(p, names, lock)


def _recover(dst: pathlib.Path) -> None:
    """Clean up after runs into `dst` that were killed: restore an old copy the fallback had moved
    aside when DST is missing, and remove the temporary and old directories nobody holds. Only
    directories molmoe provably made are touched: named exactly as it names them (`_stem`,
    mkdtemp's 8-character suffix, token_hex(4)) and carrying its marker (or empty); see
    _debris_names. One removed by another run meanwhile is skipped."""
    if not dst.parent.is_dir():
        return
    stem, sep = (re.escape(part) for part in _stem(dst.name))
    debris = re.compile(rf"\.{stem}\.(?:(tmp){sep}\d+-[a-z0-9_]{{8}}|(old){sep}\d+-[0-9a-f]{{8}})")
    locks = []
    try:
        found = []
        for p in dst.parent.iterdir():
            m = debris.fullmatch(p.name)
            if not (m and p.is_dir() and not p.is_symlink()):
                continue
            try:
                fd = _lock(p)
            except OSError:  # removed, or replaced by a link, an instant ago
                continue
            if fd is None:
                continue
            locks.append(fd)
            names = _debris_names(p, writing=bool(m[1]))
            if names is not None:
                found.append((p, bool(m[2]), names, fd))
        olds = sorted((x for x in found if x[1]), key=lambda x: os.fstat(x[3]).st_mtime)
        if olds and not os.path.lexists(dst):
            old, _, _, fd = olds[-1]
            found.remove(olds[-1])
            if _is_locked_dir(old, fd):
                try:
                    os.rename(old, dst)
                    fsync_dir(dst.parent)
                except OSError:  # DST appeared meanwhile: left for a later run
                    pass
        for p, _, names, fd in found:
            _unlink_all(p, names, fd)
    finally:
        for fd in locks:
            os.close(fd)


_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _lock(directory: pathlib.Path) -> int | None:
    """An exclusive flock on `directory` itself (O_NOFOLLOW: never a link's target), held by the
    returned descriptor until it is closed (or its process dies); None when another live run
    holds it. OSError when it is gone or not a directory."""
    fd = os.open(directory, _DIR_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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
