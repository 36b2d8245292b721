"""Reading checkpoint files safely (issue 10): non-regular files, shard paths that escape the
checkpoint directory, malformed files and their messages, non-finite weights."""
import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import zipfile

import pytest
import torch

import molmoe
from molmoe.checkpoint import CheckpointError
from molmoe.checkpoint.files import open_checkpoint, read_json, resolve
from tests.tiny import random_model, write_checkpoint

SHARD1 = "model-00001-of-00002.safetensors"
ADVICE = "weights_only=False"
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> pathlib.Path:
    """A tiny dense checkpoint (two safetensors shards + index), written once; copy it to edit."""
    return write_checkpoint(random_model("tiny-7b-d"), tmp_path_factory.mktemp("dense") / "c",
                            "dense")


@pytest.fixture(scope="module")
def moe_bin(tmp_path_factory) -> pathlib.Path:
    """A tiny MolmoE checkpoint (pytorch_model.bin), written once; copy it to edit."""
    return write_checkpoint(random_model("tiny-molmoe"), tmp_path_factory.mktemp("moe") / "c",
                            "molmoe-hf")


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _index(d: pathlib.Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d: pathlib.Path, index) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _message(call) -> str:
    with pytest.raises(CheckpointError) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)  # one line
    return str(e.value)


# --- 1. non-regular files are refused before they are opened --------------------------------

_GUARDED = """
import pathlib, sys
import molmoe
from molmoe.checkpoint import CheckpointError
from molmoe.checkpoint.files import read_json
try:
    {call}(pathlib.Path(sys.argv[1]))
except CheckpointError as e:
    print(e)
else:
    sys.exit("no error")
"""


def _refused_without_hanging(call: str, path: pathlib.Path, named: pathlib.Path,
                             match: str = "not a regular file"):
    """`call(path)` must raise CheckpointError(match) naming `named`, at once. Opening a FIFO for
    reading blocks until a writer comes, and a blocked open may hold the interpreter lock, so the
    call runs in a subprocess that is killed after the time bound: a regression fails, it does
    not hang CI."""
    try:
        run = subprocess.run([sys.executable, "-c", _GUARDED.format(call=call), str(path)],
                             capture_output=True, text=True, timeout=60, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{call}({path}) hung: a FIFO was opened")
    assert run.returncode == 0, run.stderr[-2000:]
    assert match in run.stdout and named.name in run.stdout, run.stdout


@pytest.mark.parametrize("name", [SHARD1, "model.safetensors.index.json", "config.json"])
def test_fifo_in_dense_checkpoint_is_refused(tmp_path, dense, name):
    d = _copy(dense, tmp_path / "c")
    (d / name).unlink()
    os.mkfifo(d / name)
    _refused_without_hanging("molmoe.load", d, d / name)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_fifo_as_single_weights_file_is_refused(tmp_path, dense, name):
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_bytes((dense / "config.json").read_bytes())
    os.mkfifo(d / name)
    _refused_without_hanging("molmoe.load", d, d / name)


def test_fifo_json_through_read_json_is_refused(tmp_path):
    fifo = tmp_path / "tokenizer_config.json"
    os.mkfifo(fifo)
    _refused_without_hanging("read_json", fifo, fifo)


def test_symlink_to_fifo_is_refused(tmp_path, dense):
    d = _copy(dense, tmp_path / "c")
    os.mkfifo(tmp_path / "pipe")
    (d / SHARD1).unlink()
    (d / SHARD1).symlink_to(tmp_path / "pipe")
    _refused_without_hanging("molmoe.load", d, tmp_path / "pipe")


def test_socket_and_device_are_refused(tmp_path, dense):
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_bytes((dense / "config.json").read_bytes())
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "model.safetensors"))
        assert "socket" in _message(lambda: open_checkpoint(d))
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").symlink_to("/dev/zero")
    assert "not a regular file" in _message(lambda: open_checkpoint(d))


def test_directory_named_like_a_weights_file_is_refused(tmp_path, dense):
    d = _copy(dense, tmp_path / "c")
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors.index.json").mkdir()
    msg = _message(lambda: molmoe.load(d))
    assert "model.safetensors.index.json" in msg and "directory" in msg


# --- 2. shard paths stay inside the checkpoint directory -------------------------------------

@pytest.mark.parametrize("how", ["absolute", "dotdot", "sub-dotdot", "symlink"])
def test_shard_outside_the_directory_is_refused(tmp_path, dense, how):
    """Each variant names a real, valid shard outside the directory (so before the fix it
    loaded from there)."""
    d = _copy(dense, tmp_path / "a" / "b" / "c")
    outside = tmp_path / "x.safetensors"
    (d / SHARD1).rename(outside)
    entry = {"absolute": str(outside), "dotdot": "../../../x.safetensors",
             "sub-dotdot": "sub/../../../../x.safetensors", "symlink": SHARD1}[how]
    if how == "sub-dotdot":
        (d / "sub").mkdir()
    if how == "symlink":
        (d / SHARD1).symlink_to(outside)
    index = _index(d)
    index["weight_map"] = {k: (entry if v == SHARD1 else v) for k, v in index["weight_map"].items()}
    _write_index(d, index)
    assert "outside the checkpoint directory" in _message(lambda: molmoe.load(d))


def test_shard_in_a_subdirectory_loads(tmp_path, dense):
    d = _copy(dense, tmp_path / "c")
    (d / "sub").mkdir()
    (d / SHARD1).rename(d / "sub" / SHARD1)
    index = _index(d)
    index["weight_map"] = {k: (f"sub/{v}" if v == SHARD1 else v)
                           for k, v in index["weight_map"].items()}
    _write_index(d, index)
    assert len(open_checkpoint(d)) == len(index["weight_map"])


def test_hub_cache_snapshot_with_symlinked_blobs_loads(tmp_path, dense):
    """The hub cache keeps files in blobs/ and links them from snapshots/<rev>/: that is not an
    escape."""
    repo = tmp_path / "models--acme--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(dense.iterdir())):
        (repo / "blobs" / f"blob{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    assert len(open_checkpoint(snap)) == len(_index(dense)["weight_map"])


@pytest.mark.parametrize("weight_map, match", [
    ([], "'weight_map' in the index is a list"),
    ({}, "empty"),
    ({"model.transformer.ln_f.weight": 7}, "not a file name"),
    ({"model.transformer.ln_f.weight": ""}, "not a file name"),
    ({"model.transformer.ln_f.weight": "model.txt"}, "not a .safetensors file"),
    ({"model.transformer.ln_f.weight": "pytorch_model.bin"}, "not a .safetensors file"),
])
def test_malformed_weight_map_is_refused(tmp_path, dense, weight_map, match):
    d = _copy(dense, tmp_path / "c")
    _write_index(d, {"weight_map": weight_map})
    assert match in _message(lambda: open_checkpoint(d))


# --- 3. malformed files get the right message -----------------------------------------------

@pytest.mark.parametrize("text", ["[]", "null", "3", '"weight_map"'])
def test_index_that_is_not_an_object_is_refused(tmp_path, dense, text):
    d = _copy(dense, tmp_path / "c")
    (d / "model.safetensors.index.json").write_text(text)
    msg = _message(lambda: molmoe.load(d))
    assert "model.safetensors.index.json" in msg and "JSON object" in msg


@pytest.mark.parametrize("data", [b"\xff\xfe not utf-8", b"[" * 100_000, b"1" * 5000])
def test_unparsable_json_is_refused(tmp_path, data):
    """Invalid UTF-8, nesting deeper than the parser's recursion and an integer longer than
    Python's digit limit all end in CheckpointError."""
    path = tmp_path / "config.json"
    path.write_bytes(data)
    assert "config.json" in _message(lambda: read_json(path))


def _bin_dir(tmp_path, moe_bin, data: bytes) -> pathlib.Path:
    d = _copy(moe_bin, tmp_path / "c")
    (d / "pytorch_model.bin").write_bytes(data)
    return d


def _zip_bytes(tmp_path, records: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as z:
        for name, data in records.items():
            z.writestr(name, data)
    return (tmp_path / "z.zip").read_bytes()


@pytest.mark.parametrize("kind", ["text", "empty", "proto-garbage", "zip-not-torch",
                                  "zip-garbage-pkl", "truncated", "legacy-truncated"])
def test_corrupt_bin_gets_no_unpickling_advice(tmp_path, moe_bin, kind):
    """A file that is not a (complete) pickle is reported as corrupt; the "convert it with
    weights_only=False" advice is only for real pickles that name globals beyond tensors."""
    good = (moe_bin / "pytorch_model.bin").read_bytes()
    if kind == "legacy-truncated":
        torch.save({"x": torch.ones(3)}, tmp_path / "l.bin", _use_new_zipfile_serialization=False)
    data = {"text": b"hello world, this is not a checkpoint\n", "empty": b"",
            "proto-garbage": b"\x80\x02garbage\n",
            "zip-not-torch": _zip_bytes(tmp_path, {"readme.txt": b"hi"}),
            "zip-garbage-pkl": _zip_bytes(tmp_path, {"archive/data.pkl": b"\x80\x02garbage\n",
                                                     "archive/version": b"3\n"}),
            "truncated": good[: len(good) // 2],
            "legacy-truncated": (tmp_path / "l.bin").read_bytes()[:40] if kind ==
            "legacy-truncated" else b""}[kind]
    d = _bin_dir(tmp_path, moe_bin, data)
    msg = _message(lambda: molmoe.load(d))
    assert "pytorch_model.bin" in msg and ADVICE not in msg and "refusing to unpickle" not in msg


class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


@pytest.mark.parametrize("zip_format", [False, True])
def test_real_unrestricted_pickle_gets_the_advice(tmp_path, moe_bin, zip_format):
    d = _copy(moe_bin, tmp_path / "c")
    if zip_format:
        torch.save({"x": _Payload()}, d / "pytorch_model.bin")
    else:
        with open(d / "pytorch_model.bin", "wb") as f:
            pickle.dump({"x": _Payload()}, f, protocol=2)
    msg = _message(lambda: molmoe.load(d))
    assert "refusing to unpickle" in msg and ADVICE in msg


def test_corrupt_safetensors_is_refused(tmp_path, dense):
    d = _copy(dense, tmp_path / "c")
    (d / SHARD1).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert SHARD1 in _message(lambda: molmoe.load(d))


@pytest.mark.parametrize("name", ["./no-such-ckpt", "ckpts/typo/model", "~/no-such-ckpt-9f2c",
                                  "/no/such/dir"])
def test_mistyped_local_directory_says_so(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    msg = _message(lambda: resolve(name))
    assert "no such local directory" in msg and "hub" not in msg


def test_mistyped_directory_under_an_existing_one_is_not_tried_as_hub_id(tmp_path, monkeypatch):
    """'ckpts/molmo' where ckpts/ exists is a local path, not the hub repo ckpts/molmo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda *a, **k: pytest.fail("tried the hub"))
    msg = _message(lambda: resolve("ckpts/molmo"))
    assert "no such local directory 'ckpts/molmo'" in msg and "hub" not in msg


def test_ambiguous_name_says_both(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _message(lambda: resolve("foo/bar"))
    assert "no such local directory 'foo/bar', and not found as a hub id" in msg


def test_bare_word_is_neither(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _message(lambda: resolve("molmo"))
    assert "no such local directory 'molmo'" in msg and "hub id like" in msg


# --- 4. non-finite weights --------------------------------------------------------------------

def test_non_finite_weights_are_refused(tmp_path, dense):
    from safetensors.torch import load_file, save_file

    d = _copy(dense, tmp_path / "c")
    tensors = load_file(d / SHARD1)
    nan_key, inf_key = sorted(k for k in tensors if tensors[k].dim() == 2)[:2]
    tensors[nan_key][0, :3] = float("nan")
    tensors[inf_key][1, 1] = float("-inf")
    save_file(tensors, str(d / SHARD1))
    msg = _message(lambda: molmoe.load(d))
    assert (nan_key in msg and "3 non-finite" in msg) or (inf_key in msg and "1 non-finite" in msg)
    model = molmoe.load(d, check_finite=False)  # the opt-out loads it as it is
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_finite_check_counts_across_chunks(monkeypatch):
    """A tensor larger than one chunk is checked chunk by chunk, and the count covers all."""
    import molmoe.checkpoint.loader as loader

    monkeypatch.setattr(loader, "FINITE_CHECK_CHUNK", 7)
    t = torch.zeros(5, 11)
    t.view(-1)[[0, 13, 54]] = torch.tensor([float("nan"), float("inf"), float("nan")])
    with pytest.raises(CheckpointError, match=r"w: 3 non-finite values \(NaN/Inf\) of 55"):
        loader.refuse_non_finite("w", t)
    with pytest.raises(CheckpointError, match=r"w\.T: 3 non-finite values \(NaN/Inf\) of 55"):
        loader.refuse_non_finite("w.T", t.T)  # not contiguous: sliced as it is, not copied
    with pytest.raises(CheckpointError, match=r"s: 1 non-finite"):
        loader.refuse_non_finite("s", torch.tensor(float("inf")))
    loader.refuse_non_finite("w", torch.zeros(5, 11))
    loader.refuse_non_finite("i", torch.arange(3))  # integers are always finite
