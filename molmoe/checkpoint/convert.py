"""`molmoe convert SRC DST`: any supported checkpoint -> sharded safetensors in molmoe's layout.

The output loads memory-mapped with no key remapping or expert stacking.

Streaming. The whole source is checked first (names, shapes, dtypes; `plan_native`), then ONE
native tensor at a time is assembled (at most one layer's stacked w_gate, w_up or w_down), cast,
and written into its shard by `_write_safetensors`, a writer of the safetensors format that takes
tensors one by one (safetensors' own `save_file` needs a whole shard in memory at once). Peak
anonymous memory is about one stacked expert tensor, whatever the model's depth or shard size.

Paths. DST may not be SRC, lie inside SRC or contain it (compared after resolving symlinks), and
no file of SRC's top level nor any file convert reads (config, index, every shard the index
names, side files: at any depth, resolved) may lie in DST; an empty DST (""), a file and a
symbolic link are refused, and so is a DST whose parent is missing, not a directory or not
writable (checked, and the temporary directory made, before the long read). An existing DST is
replaced only with `overwrite`, and only when it is empty or is an unchanged molmoe convert output
holding nothing else: every output carries MARKER (`molmoe-convert.json`, naming molmoe's
version, the source directory, the dtype, and every other file convert wrote with its size, mtime
and sha256, hashed as it was written). A file that is extra, or changed (`_unchanged_output`), is
named and the run refused. DST is checked before the conversion and again, under its lock, right
before the swap; the old copy once more right after it.

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
So DST is at every instant the complete old or the complete new copy; only in the fallback,
between its two renames, is the old copy complete under `.DST.old-*` instead. A run holds an
exclusive flock on its temporary directory and on the DST it replaces; the next run into the same
DST cleans up after runs that died (`_recover`): it restores an orphaned old copy when DST is
missing and removes the others, touching only directories molmoe provably made (the exact name
it makes, nobody holding the lock, and empty or carrying its marker: see `_debris_names`); a
user's `.DST.old-backup` is never touched. The output's modes honour the umask (mkdtemp makes
0700): directory 0o777 & ~umask, files 0o666 & ~umask.

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
import numbers
import os
import pathlib
import re
import secrets
import shutil
import signal
import stat
import struct
import tempfile

import torch

from molmoe.checkpoint.adapter import CheckpointError, NativePlan
from molmoe.checkpoint.files import CHECKPOINT_FILES, read_json, regular_file, resolve
from molmoe.checkpoint.loader import (PRECISIONS, load_config_from_dir, parse_precision,
                                      plan_state, stored_dtype)
from molmoe.errors import UsageError
from molmoe.fileio import json_type

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
    tmp, lock = _make_tmp(dst)  # before the long read: DST's parent really takes a directory
    try:
        _step("tmp_created")
        config, raw = load_config_from_dir(src_dir)
        plan = plan_state(src_dir, config, stored_dtype(raw, str(src_dir / "config.json")),
                          check_finite=check_finite)
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
        _replace(tmp, dst, overwrite)
    except BaseException:
        _remove_debris(tmp)  # our copy; after a swap undone or cut short, the old copy's rest
        raise
    finally:
        os.close(lock)
    return dst


# ------------------------------------------------------------------------------------ paths


def _check_paths(src_dir: pathlib.Path, dst) -> pathlib.Path:
    """DST, resolved, when converting into it cannot touch SRC and its parent directory takes a
    new directory; else a CheckpointError."""
    if os.fspath(dst) == "":
        raise CheckpointError("DST is empty; name the output directory")
    given = pathlib.Path(dst).expanduser()
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
    """SRC's non-weight files carried over: regular files (or links to them) only."""
    return [f for pattern in _SIDE_FILES for f in sorted(src_dir.glob(pattern))
            if f.name not in _SKIP and f.is_file()]


def _make_tmp(dst: pathlib.Path) -> tuple[pathlib.Path, int]:
    """A new locked `.DST.tmp-<pid>-<random>` carrying molmoe's marker from its first moment on
    (so that recovery can tell it from a user's directory of a similar name)."""
    try:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-",
                                            dir=dst.parent))
    except OSError as e:
        raise CheckpointError(f"{dst.parent}: cannot create a directory there "
                              f"({e.strerror or e})") from None
    lock = _lock(tmp)  # a fresh directory: only a run cleaning up this very instant holds it
    if lock is None:
        raise CheckpointError(f"{tmp}: taken by another molmoe convert into {dst}; run again")
    try:
        _write_json(tmp / MARKER, {"written_by": WRITTEN_BY, "state": "writing"})
    except BaseException:
        os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)  # holds nothing but what we just wrote
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
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
    _fsync_dir(out)


# ------------------------------------------------------------------------ replacing, debris


def _replace(tmp: pathlib.Path, dst: pathlib.Path, overwrite: bool) -> None:
    """Put the complete `tmp` at `dst` (see the module docstring). An existing DST is checked
    again under its lock right before the swap (a file saved into it while converting is not
    lost), and its old copy again right after: holding anything new, the swap is undone."""
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
    try:
        old_lock = _lock(dst)
    except OSError as e:
        raise CheckpointError(f"{dst} changed while converting ({e.strerror}); left as it is") \
            from None
    if old_lock is None:
        raise CheckpointError(f"{dst} is being replaced by another molmoe convert")
    try:
        _check_replaceable(dst, overwrite)  # under the lock, the last thing before the swap
        if _renameat2(tmp, dst, _RENAME_EXCHANGE):
            _step("exchanged")
            _remove_old(tmp, dst, undo=lambda: _renameat2(tmp, dst, _RENAME_EXCHANGE))
            return
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(dst, old)
        _step("old_moved_aside")
        _check_old(old, dst, undo=lambda: os.rename(old, dst) is None)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        _step("renamed_in")
        _remove_old(old, dst, undo=lambda: False)
    finally:
        os.close(old_lock)


def _check_old(old: pathlib.Path, dst: pathlib.Path, undo) -> set[str]:
    """The names the old copy, just moved away from DST, holds when it is still an unchanged
    molmoe output (`_unchanged_output`); else the move is undone (`undo()`, True when done) or
    the old copy kept aside, and CheckpointError."""
    try:
        return _unchanged_output(old, shown=dst)
    except CheckpointError as e:
        problem = str(e)
    try:
        undone = undo()
    except OSError:
        undone = False
    where = "left as it was" if undone else f"its old copy is kept in {_keep(old, dst)}"
    raise CheckpointError(f"{problem} (at the very end of the conversion); {where}")


def _remove_old(old: pathlib.Path, dst: pathlib.Path, undo) -> None:
    """Remove the replaced copy file by file, exactly the files its marker lists, checked
    unchanged; never a file that appeared in it (kept aside under a name that says so)."""
    names = _check_old(old, dst, undo)
    _fsync_dir(dst.parent)
    if not _unlink_all(old, names):
        kept = _keep(old, dst)
        raise CheckpointError(f"{dst} was replaced, but files appeared in its old copy while it "
                              f"was being removed; they are kept in {kept}")
    _step("old_removed")


def _unlink_all(directory: pathlib.Path, names) -> bool:
    """Unlink `names` (MARKER last: what is left is still recognisably ours), then the directory;
    False when it holds anything else."""
    for name in sorted(set(names) - {MARKER}) + [MARKER] * (MARKER in names):
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(directory)
    except OSError:
        return False
    return True


def _keep(old: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """Rename an old copy holding a user's files to a visible sibling no run will touch."""
    kept = dst.with_name(f"{dst.name}.kept-by-molmoe-convert-{secrets.token_hex(4)}")
    try:
        os.rename(old, kept)
    except OSError:
        return old
    return kept


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


def _remove_debris(p: pathlib.Path) -> None:
    names = _debris_names(p, writing=True)
    if names is not None:
        _unlink_all(p, names)


def _recover(dst: pathlib.Path) -> None:
    """Clean up after runs into `dst` that were killed: restore an old copy the fallback had moved
    aside when DST is missing, and remove the temporary and old directories nobody holds. Only
    directories molmoe provably made are touched: named exactly as it names them (mkdtemp's
    8-character suffix, token_hex(4)) and carrying its marker (or empty); see _debris_names."""
    if not dst.parent.is_dir():
        return
    name = re.escape(dst.name)
    debris = re.compile(rf"\.{name}\.(?:(tmp)-\d+-[a-z0-9_]{{8}}|(old)-\d+-[0-9a-f]{{8}})")
    locks = []
    try:
        found = []
        for p in dst.parent.iterdir():
            m = debris.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink() and (fd := _lock(p)) is not None:
                locks.append(fd)
                names = _debris_names(p, writing=bool(m[1]))
                if names is not None:
                    found.append((p, bool(m[2]), names))
        olds = sorted((x for x in found if x[1]), key=lambda x: x[0].stat().st_mtime)
        if olds and not os.path.lexists(dst):
            os.rename(olds[-1][0], dst)
            _fsync_dir(dst.parent)
            found.remove(olds[-1])
        for p, _, names in found:
            _unlink_all(p, names)
    finally:
        for fd in locks:
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
