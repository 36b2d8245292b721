"""Reading the small files a checkpoint directory holds (JSON configs, tokenizer files), safely;
and making written files durable (fsync of a file, of a directory).

Every reader checks first that the path is (a symlink to) a regular file: a FIFO blocks its
reader until a writer comes (forever), and a device such as /dev/zero never ends. Failures are
the caller's error class (`CheckpointError`, `ConfigError`, `TokenizerError`: all `MolmoeError`s)
with one line naming the file, never a raw OSError/UnicodeDecodeError/RecursionError.
"""
from __future__ import annotations

import json
import os
import pathlib
import stat

from molmoe.errors import MolmoeError


def regular_file(path: str | os.PathLike, error: type[MolmoeError] = MolmoeError) -> pathlib.Path:
    """`path` if it is (a symlink to) a regular file, else `error` naming what it is."""
    path = pathlib.Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such file"
                    f"{' (a dangling symlink)' if os.path.islink(path) else ''}") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device" if
                stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
        via = f" {os.path.realpath(path)}" if os.path.islink(path) else ""
        raise error(f"{path}: is {kind}{via}, not a regular file; refusing to read it")
    return path


def read_text(path: str | os.PathLike, error: type[MolmoeError] = MolmoeError) -> str:
    """A UTF-8 text file, checked to be a regular file first."""
    path = regular_file(path, error)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None


def read_json(path: str | os.PathLike, error: type[MolmoeError] = MolmoeError) -> dict:
    """A JSON file that must hold an object (config, index, tokenizer and generation files)."""
    text = read_text(path, error)
    try:
        value = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer beyond Python's digit limit
        raise error(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise error(f"{path}: must be a JSON object, found {json_type(value)}")
    return value


def json_type(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (a file created or renamed in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
