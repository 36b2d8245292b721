"""`molmoe convert` and the memory of loading (issue 10): paths it must never touch, a replace that
leaves the old or the new copy at DST when killed at any step, the umask, streaming memory, and
per-expert weights stacked straight onto the target device."""
import dataclasses
import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import molmoe
import molmoe.checkpoint.convert as conv
from molmoe.checkpoint import CheckpointError
from molmoe.checkpoint.convert import convert
from molmoe.cli import main
from molmoe.config import preset
from molmoe.errors import MolmoeError
from molmoe.model import Molmo
from tests.tiny import random_model, write_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _snapshot(root: pathlib.Path) -> dict:
    """Every entry under root (not following links): file bytes, link targets, directories."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = pathlib.Path(dirpath, name)
            rel = str(p.relative_to(root))
            out[rel] = (("link", os.readlink(p)) if p.is_symlink() else
                        ("dir",) if p.is_dir() else ("file", p.read_bytes()))
    return out


def _output(root: pathlib.Path) -> dict:
    """`_snapshot` of a convert output, its marker without the mtimes (they differ per run)."""
    snap = _snapshot(root)
    if conv.MARKER in snap:
        marker = json.loads(snap[conv.MARKER][1])
        for rec in marker["files"].values():
            del rec["mtime_ns"]
        snap[conv.MARKER] = ("marker", marker)
    return snap


def _src(tmp_path, name="src", seed=0) -> pathlib.Path:
    return write_checkpoint(random_model("tiny-7b-d", seed=seed), tmp_path / name, "dense")


def _state(directory) -> dict:
    return molmoe.load(directory).state_dict()


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name, layout", [("tiny-7b-d", "dense"), ("tiny-molmoe", "molmoe-hf"),
                                          ("tiny-molmoe", "molmoe-megablocks")])
def test_convert_round_trip(tmp_path, name, layout):
    """Same keys and tensors, in shards that safetensors itself reads (format "pt")."""
    from safetensors import safe_open

    model = random_model(name)
    write_checkpoint(model, tmp_path / "src", layout)
    out = convert(tmp_path / "src", tmp_path / "dst", shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # really sharded
    read = {}
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            read.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (not a dict)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in read.values())
    assert _same_state(read, model.state_dict())
    assert _same_state(_state(out), model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_convert_to_bfloat16_loads_as_bfloat16(tmp_path):
    model = random_model("tiny-molmoe")
    write_checkpoint(model, tmp_path / "src", "molmoe-hf")
    out = convert(tmp_path / "src", tmp_path / "dst", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = molmoe.load(out, dtype="bfloat16")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.bfloat16()), key


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    src = _src(tmp_path)
    calls = []
    real_write = conv._write_safetensors

    def failing_write(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(*args)

    monkeypatch.setattr(conv, "_write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "dst", shard_bytes=200_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------------------------------ paths that must not be touched


def test_convert_onto_its_source_is_refused(tmp_path):
    src = _src(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="is the source directory"):
        convert(src, src, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_convert_into_the_directory_holding_the_source_is_refused(tmp_path):
    """`convert P/model P --overwrite` would delete P's other files."""
    parent = tmp_path / "P"
    src = write_checkpoint(random_model("tiny-7b-d"), parent / "model", "dense")
    (parent / "notes.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="contains the source directory"):
        convert(src, parent, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_convert_inside_the_source_is_refused(tmp_path):
    src = _src(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="inside the source directory"):
        convert(src, src / "out", overwrite=True)
    assert _snapshot(tmp_path) == before


def test_symlinks_are_resolved_before_comparing_paths(tmp_path):
    src = _src(tmp_path)
    (tmp_path / "alias").symlink_to(src)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="is the source directory"):
        convert(tmp_path / "alias", src, overwrite=True)
    with pytest.raises(CheckpointError, match="inside the source directory"):
        convert(src, tmp_path / "alias" / "out", overwrite=True)
    assert _snapshot(tmp_path) == before


def test_source_files_linking_into_dst_are_refused(tmp_path):
    """A source whose files are links into DST (as a hub snapshot links into blobs/) would lose
    them when DST is replaced."""
    src = _src(tmp_path)
    convert(src, tmp_path / "dst")
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in (tmp_path / "dst").iterdir():
        (linked / f.name).symlink_to(f)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="links into DST"):
        convert(linked, tmp_path / "dst", overwrite=True)
    assert _snapshot(tmp_path) == before


def test_empty_dst_is_refused_and_the_working_directory_survives(tmp_path, monkeypatch, capsys):
    src = _src(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "thesis.tex").write_text("years of work")
    (cwd / "sub").mkdir()
    monkeypatch.chdir(cwd)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="DST is empty"):
        convert(src, "", overwrite=True)
    assert main(["convert", str(src), "", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "DST is empty" in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind, match", [
    ("file", "is a file"),
    ("symlink", "is a symbolic link"),
    ("foreign", "molmoe convert did not write"),
    ("extra", r"holds files molmoe convert did not write: \['mine.txt'\]"),
])
def test_overwrite_replaces_only_a_directory_molmoe_wrote(tmp_path, kind, match):
    src = _src(tmp_path)
    dst = tmp_path / "dst"
    if kind == "file":
        dst.write_text("precious")
    elif kind == "symlink":
        (tmp_path / "target").mkdir()
        (tmp_path / "target" / "f").write_text("precious")
        dst.symlink_to(tmp_path / "target")
    elif kind == "foreign":
        dst.mkdir()
        (dst / "f").write_text("precious")
    else:  # molmoe's output, to which the user added a file of their own
        convert(src, dst)
        (dst / "mine.txt").write_text("precious")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        convert(src, dst, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_molmoe_output_and_an_empty_directory(tmp_path):
    src_a, src_b = _src(tmp_path, "a", seed=0), _src(tmp_path, "b", seed=1)
    dst = convert(src_a, tmp_path / "dst")
    marker = json.loads((dst / conv.MARKER).read_text())
    assert marker["source"] == str(src_a.resolve())
    assert set(marker["files"]) == {p.name for p in dst.iterdir()} - {conv.MARKER}
    with pytest.raises(CheckpointError, match="already exists"):
        convert(src_b, dst)
    convert(src_b, dst, overwrite=True)
    assert _same_state(_state(dst), _state(src_b))
    (tmp_path / "empty").mkdir()
    convert(src_a, tmp_path / "empty", overwrite=True)
    assert _same_state(_state(tmp_path / "empty"), _state(src_a))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "dst", "empty"]  # no debris


# --------------------------------------------------------------------------- debris, atomicity


def test_stale_temp_dirs_are_removed_and_a_live_runs_are_kept(tmp_path):
    src = _src(tmp_path)
    stale = tmp_path / ".dst.tmp-999999-abcd_123"  # its run was killed: nobody holds its lock
    stale.mkdir()
    (stale / conv.MARKER).write_text(json.dumps({"written_by": "molmoe convert",
                                                  "state": "writing"}))
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    live = tmp_path / ".dst.tmp-1-xyz_0123"  # a run in progress holds its lock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        convert(src, tmp_path / "dst")
        assert live.is_dir() and not stale.exists()
    finally:
        os.close(fd)
    unrelated = tmp_path / ".dst.tmp-notours"  # not a name convert makes: left alone
    unrelated.mkdir()
    convert(src, tmp_path / "dst", overwrite=True)
    # the live run's directory, empty and no longer held, goes too (an rmdir loses nothing)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dst.tmp-notours", "dst", "src"]


# The converter dies (SIGKILL, nothing runs after) right after one named step. The cases run in
# children forked from one process that imported molmoe once (an import costs seconds).
_KILL_SERVER = r"""
import json, os, sys, traceback
import molmoe.checkpoint.convert as conv
for case in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.environ.update(case["env"])
        try:
            conv.convert(case["src"], case["dst"], shard_bytes=100_000, overwrite=True)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    print(json.dumps([case["dst"], os.waitpid(pid, 0)[1]]), flush=True)
"""


def _kill_cases(tmp_path, old_template, src_new):
    cases = []
    for scenario, env, steps in [
            ("fresh", {}, conv.WRITE_STEPS + ("renamed_in",)),
            ("exchange", {}, conv.WRITE_STEPS + conv.EXCHANGE_STEPS
             if conv._libc_renameat2() else ()),  # no renameat2 here: the fallback is the path
            ("fallback", {conv.NO_EXCHANGE_ENV: "1"}, conv.FALLBACK_STEPS)]:
        for step in steps:
            case = tmp_path / f"{scenario}-{step}"
            case.mkdir()
            if scenario != "fresh":
                shutil.copytree(old_template, case / "dst", symlinks=True)
            cases.append({"scenario": scenario, "step": step, "dst": str(case / "dst"),
                          "src": str(src_new), "env": {**env, conv.KILL_ENV: step}})
    return cases


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_convert_killed_at_every_step_leaves_old_or_new(tmp_path):
    """SIGKILL right after each step of writing and replacing DST: DST is then exactly the old or
    exactly the new conversion (the fallback without renameat2 may leave it aside, restored by the
    next run), and the next run removes every piece of debris."""
    src_old, src_new = _src(tmp_path, "a", seed=0), _src(tmp_path, "b", seed=1)
    old = convert(src_old, tmp_path / "old", shard_bytes=100_000)
    new = convert(src_new, tmp_path / "new", shard_bytes=100_000)
    assert len(list(new.glob("*.safetensors"))) > 2  # the kill at the first shard is midway
    snap_old, snap_new = _output(old), _output(new)
    assert _same_state(_state(old), _state(src_old)) and _same_state(_state(new), _state(src_new))
    work = tmp_path / "cases"
    work.mkdir()
    cases = _kill_cases(work, old, src_new)
    proc = subprocess.run([sys.executable, "-c", _KILL_SERVER, json.dumps(cases)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = dict(json.loads(line) for line in proc.stdout.splitlines())
    for case in cases:
        what = (case["scenario"], case["step"])
        code = status[case["dst"]]
        assert os.WIFSIGNALED(code) and os.WTERMSIG(code) == signal.SIGKILL, (what, code)
        dst = pathlib.Path(case["dst"])
        if dst.exists():
            assert _output(dst) in (snap_old, snap_new), what
        else:
            aside = [p for p in dst.parent.iterdir() if p.name.startswith(".dst.old-")]
            assert (case["scenario"] == "fresh" or aside and _output(aside[0]) == snap_old), what
        # The next run (no --overwrite) cleans up, restoring an old copy left aside.
        try:
            convert(src_new, dst, shard_bytes=100_000)
        except CheckpointError as e:
            assert "already exists" in str(e), what
        assert sorted(os.listdir(dst.parent)) == ["dst"], what
        assert _output(dst) in (snap_old, snap_new), what
        if case["scenario"] == "fallback" and case["step"] == "old_moved_aside":
            assert _output(dst) == snap_old, what


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_honours_the_umask(tmp_path, umask):
    src = _src(tmp_path)
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer.json").chmod(0o600)  # a side file carried over gets the umask's mode too
    previous = os.umask(umask)
    try:
        out = convert(src, tmp_path / "dst")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert "tokenizer.json" in {f.name for f in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


# ------------------------------------------------------------------------------ --shard-gb


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), 1.5, True, "4"])
def test_shard_bytes_must_be_a_positive_integer(tmp_path, bad):
    src = _src(tmp_path)
    with pytest.raises(MolmoeError, match="shard_bytes"):
        convert(src, tmp_path / "dst", shard_bytes=bad)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("gb", ["inf", "nan", "0", "-1", "1e-12"])
def test_cli_refuses_a_bad_shard_gb(tmp_path, capsys, gb):
    src = _src(tmp_path)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--shard-gb", gb]) == 2
    err = capsys.readouterr().err
    assert "--shard-gb" in err and err.count("\n") == 1
    assert not (tmp_path / "dst").exists()


# ------------------------------------------------------------------------- streaming memory

_LAYERS, _WIDTH = 6, 2048  # experts: 6 layers x 3 x 8 x 2048 x 64 x 4 bytes = 6 x 12.6 MB


def _wide_moe() -> Molmo:
    """A MolmoE whose experts are nearly all of its size (everything else is tiny)."""
    c = preset("tiny-molmoe")
    text = dataclasses.replace(c.text, n_layers=_LAYERS, ffn_hidden=_WIDTH,
                               moe=dataclasses.replace(c.text.moe, expert_hidden=_WIDTH))
    torch.manual_seed(0)
    model = Molmo(c.replace(text=text, projector_hidden=_WIDTH))  # MolmoE ties the two widths
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def _layer_experts_bytes(model: Molmo) -> int:
    ffn = model.decoder.blocks[0].ffn
    return sum(t.numel() * t.element_size() for t in (ffn.w_gate, ffn.w_up, ffn.w_down))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The wide MolmoE written as per-expert HF `.bin` and as fused megablocks `.bin`."""
    root = tmp_path_factory.mktemp("wide")
    model = _wide_moe()
    for layout in ("molmoe-hf", "molmoe-megablocks"):
        write_checkpoint(model, root / layout, layout)
    return model, root


def _rss_anon_kb(pid) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None  # a zombie has no memory lines


# The child reports its anonymous memory once imported, then does only the measured work.
_MEASURED = r"""
import sys
import torch, molmoe
from molmoe.checkpoint.convert import convert
{setup}
status = open("/proc/self/status").read()
print("start", status.split("RssAnon:")[1].split()[0], flush=True)
{work}
print("done", flush=True)
"""


def _peak_anon_growth(work: str, *args, setup: str = "") -> int:
    """Peak RssAnon growth, in bytes, of a child doing `work` (sampled every ~0.5 ms; anonymous
    memory is what counts: mapped checkpoint pages are file-backed and reclaimable)."""
    script = _MEASURED.format(setup=setup, work=work)
    # glibc serves blocks under its dynamic mmap threshold (up to 32 MiB) from the heap, where
    # freed ones stay resident a while: with this test's 4 MiB tensors that retention, not the
    # code, would decide the peak. A fixed threshold maps and unmaps every block of 1 MiB or more,
    # as happens anyway to the real model's 256 MiB+ stacked experts.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().split()
    assert first[:1] == ["start"], proc.communicate()[1][-3000:]
    base = peak = int(first[1])
    while proc.poll() is None:
        now = _rss_anon_kb(proc.pid)
        if now is not None:
            peak = max(peak, now)
        time.sleep(0.0005)
    out, err = proc.communicate()
    assert proc.returncode == 0 and "done" in out, err[-3000:]
    return (peak - base) * 1024


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("layout", ["molmoe-hf", "molmoe-megablocks"])
def test_convert_streams_one_tensor_at_a_time(tmp_path, wide, layout):
    """Peak anonymous memory stays under one layer's experts (one stacked tensor, a third of a
    layer's, is held at a time; measured about 5 MB against 12.6 MB a layer), where the old
    converter held all six layers' stacked experts (77 MB; megablocks: every w_down, 27 MB).
    The output holds exactly the model's tensors."""
    model, root = wide
    layer = _layer_experts_bytes(model)
    growth = _peak_anon_growth("convert(sys.argv[1], sys.argv[2])", root / layout, tmp_path / "out")
    assert growth < layer, (growth, layer)
    assert _same_state(_state(tmp_path / "out"), model.state_dict())


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_load_stacks_experts_on_the_target_device(wide):
    """`load(device=...)` preallocates the stacked experts on the device and copies one expert at
    a time into it: on `meta` (the CUDA code path, runnable here) no host copy of the experts is
    made at all; the old loader stacked every expert on the host first."""
    model, root = wide
    layer = _layer_experts_bytes(model)
    growth = _peak_anon_growth(
        "m = molmoe.load(sys.argv[1], device='meta', dtype='bfloat16')\n"
        "w = m.decoder.blocks[0].ffn.w_down\n"
        "assert w.device.type == 'meta' and w.dtype == torch.bfloat16, w", root / "molmoe-hf")
    assert growth < layer, (growth, layer)


@pytest.mark.parametrize("layout", ["molmoe-hf", "molmoe-megablocks"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_bin_on_cpu_in_each_dtype(tmp_path, layout, dtype):
    """The preallocate-and-copy stacking gives the same tensors as before on the CPU."""
    model = random_model("tiny-molmoe")
    d = write_checkpoint(model, tmp_path / "c", layout)
    loaded = molmoe.load(d, dtype=dtype).state_dict()
    want = torch.float32 if dtype == "float32" else torch.bfloat16
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == want and torch.equal(loaded[key], value.to(want)), key


@pytest.mark.gpu
def test_load_bin_onto_cuda_makes_no_host_copy_of_the_experts(wide):
    """On CUDA the stacked experts are assembled on the device: host anonymous memory grows by
    less than one layer's experts (one expert's conversion at a time), not by all of them."""
    model, root = wide
    layer = _layer_experts_bytes(model)
    warm_up = ("x = torch.ones(64)\n"  # CUDA context and the copy/cast kernels before measuring
               "torch.empty(64, device='cuda', dtype=torch.bfloat16).copy_(x)\n"
               "torch.empty(64, device='cuda').copy_(x)\ntorch.cuda.synchronize()")
    growth = _peak_anon_growth(
        "m = molmoe.load(sys.argv[1], device='cuda', dtype='bfloat16')\n"
        "w = m.decoder.blocks[0].ffn.w_down\n"
        "assert w.is_cuda and w.dtype == torch.bfloat16, w", root / "molmoe-hf", setup=warm_up)
    assert growth < layer, (growth, layer)


# -------------------------------------------------- what DST holds is checked, again, at the swap


def _add_file_while_writing(monkeypatch, path: pathlib.Path):
    """The user saves `path` while the shards are being written (long after the first check)."""
    real = conv._write_shards

    def writing(*args):
        path.write_text("saved while converting")
        return real(*args)

    monkeypatch.setattr(conv, "_write_shards", writing)


def test_a_file_saved_into_dst_while_converting_is_kept(tmp_path, monkeypatch):
    src = _src(tmp_path)
    dst = convert(src, tmp_path / "dst")
    before = _snapshot(dst)
    _add_file_while_writing(monkeypatch, dst / "my_notes.txt")
    with pytest.raises(CheckpointError, match=r"my_notes\.txt"):
        convert(src, dst, overwrite=True)
    assert _snapshot(dst) == {**before, "my_notes.txt": ("file", b"saved while converting")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_file_appearing_at_the_swap_itself_is_kept(tmp_path, monkeypatch, exchange):
    """A file that lands in DST after the last check, just before the swap, is found in the old
    copy: the swap is undone (or the old copy renamed back) and DST is left as it was."""
    if exchange and not conv._libc_renameat2():
        pytest.skip("no renameat2 here")
    if not exchange:
        monkeypatch.setenv(conv.NO_EXCHANGE_ENV, "1")
    src = _src(tmp_path)
    dst = convert(src, tmp_path / "dst")
    before = _snapshot(dst)
    real, calls = conv._renameat2, []

    def late_write(a, b, flags):
        if b == dst and not calls:  # the swap, not its undoing
            (dst / "late.txt").write_text("late")
        calls.append(flags)
        return real(a, b, flags)

    monkeypatch.setattr(conv, "_renameat2", late_write)
    with pytest.raises(CheckpointError, match=r"late\.txt"):
        convert(src, dst, overwrite=True)
    assert _snapshot(dst) == {**before, "late.txt": ("file", b"late")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_a_file_appearing_in_the_old_copy_while_it_is_removed_is_kept_aside(tmp_path,
                                                                             monkeypatch):
    """The old copy is removed file by file (what its marker lists), never with rmtree: a file
    written into it meanwhile (through a handle on the old directory) survives, in a visible
    sibling the error names."""
    if not conv._libc_renameat2():
        pytest.skip("no renameat2 here")
    src = _src(tmp_path)
    dst = convert(src, tmp_path / "dst")
    real = conv.fsync_dir

    def late_write(directory):  # called between the check of the old copy and its removal
        for old in tmp_path.glob(".dst.tmp-*"):
            (old / "late.txt").write_text("late")
        return real(directory)

    monkeypatch.setattr(conv, "fsync_dir", late_write)
    with pytest.raises(CheckpointError, match="kept in .*dst.kept-by-molmoe-convert-"):
        convert(src, dst, overwrite=True)
    (kept,) = tmp_path.glob("dst.kept-by-molmoe-convert-*")
    assert _snapshot(kept) == {"late.txt": ("file", b"late")}
    assert _same_state(_state(dst), _state(src))


@pytest.mark.parametrize("edit", ["side file", "config", "shard, same size and mtime"])
def test_overwrite_refuses_an_edited_output(tmp_path, edit):
    """The marker records each file's size and sha256: an edit is named, never silently lost."""
    src = _src(tmp_path)
    (src / "generation_config.json").write_text('{"max_new_tokens": 10}')
    dst = convert(src, tmp_path / "dst")
    name = {"side file": "generation_config.json", "config": "config.json",
            "shard, same size and mtime": "model-00001-of-00001.safetensors"}[edit]
    path = dst / name
    data = bytearray(path.read_bytes())
    st = path.stat()
    data[-1] ^= 1  # same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*changed"):
        convert(src, dst, overwrite=True)
    assert _snapshot(tmp_path) == before
    # the CLI keeps its promise too: "an unchanged molmoe convert output"
    assert main(["convert", str(src), str(dst), "--overwrite"]) == 2
    assert _snapshot(tmp_path) == before


def test_a_big_file_is_hashed_only_when_its_mtime_changed(tmp_path, monkeypatch):
    """Above HASH_ALWAYS_BYTES a file with its recorded size and mtime is taken as unchanged (no
    read of gigabytes of shards); a copied one (new mtime) is hashed, and passes when equal."""
    monkeypatch.setattr(conv, "HASH_ALWAYS_BYTES", 0)
    src = _src(tmp_path)
    dst = convert(src, tmp_path / "dst")
    shard = dst / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime
    convert(src, dst, overwrite=True)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors.*changed"):
        convert(src, dst, overwrite=True)


# ------------------------------------------------------- only molmoe's own debris is touched


def test_user_directories_named_like_debris_are_left_alone(tmp_path, monkeypatch):
    src = _src(tmp_path)
    rb = tmp_path / "rb"
    mine = {".out.old-2024-backup": "thesis.tex", ".out.tmp-1-mine": "notes.txt",
            # exactly the names molmoe makes, but without molmoe's marker inside
            ".out.tmp-999999-abcd_123": "a.txt", ".out.old-999999-0123abcd": "b.txt"}
    for d, f in mine.items():
        (rb / d).mkdir(parents=True)
        (rb / d / f).write_text("years of work")
    before = _snapshot(rb)
    monkeypatch.chdir(rb)
    convert(src, "out")  # no DST: an "old copy" would have been renamed to it
    convert(src, "out", overwrite=True)
    after = _snapshot(rb)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before


def test_molmoe_debris_is_recognised_by_its_marker(tmp_path):
    """A temporary directory of a killed run carries molmoe's marker from its creation on."""
    src = _src(tmp_path)
    script = "import sys, molmoe.checkpoint.convert as c; c.convert(sys.argv[1], sys.argv[2])"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(tmp_path / "dst")],
        cwd=ROOT, env={**os.environ, conv.KILL_ENV: "tmp_created"}, capture_output=True,
        check=False, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (debris,) = [p for p in tmp_path.iterdir() if p.name.startswith(".dst.tmp-")]
    assert json.loads((debris / conv.MARKER).read_text())["written_by"] == "molmoe convert"
    convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


# --------------------------------------------------------- every file read is checked, not DST's


def test_a_nested_source_link_into_dst_is_refused(tmp_path):
    """A hub-cache snapshot whose index names `shards/w.safetensors`, a link into DST (which lies
    in the same repo folder, where files.py allows links): replacing DST would destroy SRC."""
    repo = tmp_path / "models--org--name"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    dst = convert(_src(tmp_path), blobs / "dst")
    snap = repo / "snapshots" / "rev"
    (snap / "shards").mkdir(parents=True)
    for f in ("config.json", "model.safetensors.index.json"):
        shutil.copyfile(dst / f, snap / f)
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], "shards/w.safetensors")
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    (snap / "shards" / "w.safetensors").symlink_to(dst / "model-00001-of-00001.safetensors")
    assert _same_state(_state(snap), _state(dst))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"shards/w\.safetensors.*into DST"):
        convert(snap, dst, overwrite=True, shard_bytes=100_000)
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------ the config.json convert writes, edited


@pytest.mark.parametrize("key, value", [("rope_theta", 500000.0), ("n_layers", 1),
                                        ("layer_norm_eps", 1e-3), ("layer_norm_eps", -1.0)])
def test_converted_config_refuses_a_top_level_field_the_block_contradicts(tmp_path, key, value):
    """convert writes the original fields and the `molmoe` block; an edit of a top-level field
    used to be ignored (the block won) and never validated."""
    model = random_model("tiny-molmoe")
    write_checkpoint(model, tmp_path / "src", "molmoe-hf")
    out = convert(tmp_path / "src", tmp_path / "dst")
    raw = json.loads((out / "config.json").read_text())
    assert key in raw
    raw[key] = value
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MolmoeError, match=key):
        molmoe.load(out)


# ------------------------------------------------------------- user errors, one line each


def _one_line(capsys, rc, *words, code=2):
    err = capsys.readouterr().err
    assert rc == code and "Traceback" not in err and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("marker", ["[]", '"x"', "{", '{"written_by": "molmoe convert"}'])
def test_a_malformed_marker_is_a_one_line_error(tmp_path, capsys, marker):
    src = _src(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / conv.MARKER).write_text(marker)
    before = _snapshot(tmp_path)
    _one_line(capsys, main(["convert", str(src), str(dst), "--overwrite"]), conv.MARKER)
    assert _snapshot(tmp_path) == before


def test_unusable_dst_parents_are_one_line_errors(tmp_path, capsys):
    src = _src(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loopdir").symlink_to("loopdir")
    before = _snapshot(tmp_path)
    cases = [(tmp_path / "afile" / "sub", "not a directory"),
             (tmp_path / "missing" / "sub", "no such directory"),
             (tmp_path / "loopdir" / "sub", "loopdir")]
    if pathlib.Path("/proc/self").is_dir():
        cases.append((pathlib.Path("/proc/molmoe-test"), "/proc"))
    for dst, words in cases:
        _one_line(capsys, main(["convert", str(src), str(dst)]), words)
    assert _snapshot(tmp_path) == before


def test_a_symlink_loop_in_the_source_does_not_matter(tmp_path, capsys):
    src = _src(tmp_path)
    (src / "loop").symlink_to("loop")
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 0
    assert _same_state(_state(tmp_path / "dst"), _state(src))


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    src = _src(tmp_path)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_write_safetensors", interrupted)
    rc = main(["convert", str(src), str(tmp_path / "dst")])
    err = capsys.readouterr().err  # after the progress bar's frames, erased by "\r"
    assert rc == 130 and "Traceback" not in err
    assert err.rsplit("\r", 1)[-1].strip() == "molmoe convert: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------- races and interruptions around the swap (issue 10)


def _link_dst_to(dst: pathlib.Path, target: pathlib.Path) -> None:
    shutil.rmtree(dst)
    dst.symlink_to(target)


@pytest.mark.parametrize("when", ["while converting", "at the swap (exchange)",
                                  "at the swap (fallback)"])
def test_a_dst_replaced_by_a_link_is_refused_and_its_target_untouched(tmp_path, monkeypatch,
                                                                        when):
    """DST, a molmoe output, is replaced by a link to another molmoe output while converting, or
    right after its last check: nothing is ever removed through the link."""
    if when == "at the swap (exchange)" and not conv._libc_renameat2():
        pytest.skip("no renameat2 here")
    if when == "at the swap (fallback)":
        monkeypatch.setenv(conv.NO_EXCHANGE_ENV, "1")
    src = _src(tmp_path)
    victim, dst = convert(src, tmp_path / "victim"), convert(src, tmp_path / "dst")
    before = _snapshot(victim)
    if when == "while converting":
        real_write = conv._write_shards

        def writing(*args):
            _link_dst_to(dst, victim)
            return real_write(*args)

        monkeypatch.setattr(conv, "_write_shards", writing)
    else:
        real, calls = conv._renameat2, []

        def relink(a, b, flags):  # after the check under the lock, before the swap
            if b == dst and not calls:
                _link_dst_to(dst, victim)
            calls.append(flags)
            return real(a, b, flags)

        monkeypatch.setattr(conv, "_renameat2", relink)
    with pytest.raises(CheckpointError, match="dst"):
        convert(src, dst, overwrite=True)
    assert _snapshot(victim) == before
    assert dst.is_symlink() and os.readlink(dst) == str(victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src", "victim"]


def test_an_old_copy_replaced_by_a_link_while_it_is_removed_is_not_followed(tmp_path,
                                                                            monkeypatch):
    """The old copy's files are unlinked through a descriptor of the directory itself (opened
    with O_NOFOLLOW), never through a path: a link put in its place is kept, its target intact."""
    if not conv._libc_renameat2():
        pytest.skip("no renameat2 here")
    src = _src(tmp_path)
    victim, dst = convert(src, tmp_path / "victim"), convert(src, tmp_path / "dst")
    before = _snapshot(victim)
    real = conv.fsync_dir

    def relink(directory):  # called between the check of the old copy and its removal
        for old in tmp_path.glob(".dst.tmp-*"):
            _link_dst_to(old, victim)
        return real(directory)

    monkeypatch.setattr(conv, "fsync_dir", relink)
    with pytest.raises(CheckpointError, match="kept in .*dst.kept-by-molmoe-convert-"):
        convert(src, dst, overwrite=True)
    assert _snapshot(victim) == before
    (kept,) = tmp_path.glob("dst.kept-by-molmoe-convert-*")
    assert os.readlink(kept) == str(victim)
    assert _same_state(_state(dst), _state(src))


def test_a_dst_name_over_name_max_is_a_one_line_error(tmp_path, capsys):
    src = _src(tmp_path)
    _one_line(capsys, main(["convert", str(src), str(tmp_path / ("d" * 256))]), "256 bytes",
              str(conv.NAME_MAX))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("times", [1, 100])
def test_a_temp_dir_removed_before_it_is_locked(tmp_path, monkeypatch, capsys, times):
    """Another run's recovery removes our fresh, still empty and unlocked temporary directory
    before we lock it: one retry with a fresh one, then a one-line error (never an OSError)."""
    src = _src(tmp_path)
    real, made = tempfile.mkdtemp, []

    def mkdtemp(*args, **kwargs):
        path = real(*args, **kwargs)
        made.append(path)
        if len(made) <= times:
            os.rmdir(path)  # what _recover of the other run does to an empty one nobody holds
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    rc = main(["convert", str(src), str(tmp_path / "dst")])
    if times == 1:
        assert rc == 0 and _same_state(_state(tmp_path / "dst"), _state(src))
    else:
        _one_line(capsys, rc, str(tmp_path), "run again")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_debris_removed_by_another_run_before_it_is_locked(tmp_path, monkeypatch):
    src = _src(tmp_path)
    stale = tmp_path / ".dst.tmp-999999-abcd_123"
    stale.mkdir()
    real = conv._lock

    def lock(directory, *args):
        if directory == stale and stale.exists():
            stale.rmdir()  # the other run, an instant before us
        return real(directory, *args)

    monkeypatch.setattr(conv, "_lock", lock)
    convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


@pytest.mark.parametrize("kind", ["fifo", "dangling link", "directory"])
def test_a_side_file_that_is_not_a_regular_file_is_refused(tmp_path, capsys, kind):
    """A side file convert would silently have left out: the output would lack it."""
    src = _src(tmp_path)
    side = src / "tokenizer.json"
    if kind == "fifo":
        os.mkfifo(side)
    elif kind == "dangling link":
        side.symlink_to(src / "missing.json")
    else:
        side.mkdir()
    _one_line(capsys, main(["convert", str(src), str(tmp_path / "dst")]), str(side))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


_REPLACE_STEPS = [("exchange", s) for s in conv.EXCHANGE_STEPS] + [
    ("fallback", s) for s in conv.FALLBACK_STEPS]


@pytest.mark.parametrize("path, step", _REPLACE_STEPS)
def test_ctrl_c_while_replacing_leaves_old_or_new_and_no_debris(tmp_path, monkeypatch, path,
                                                                 step):
    """KeyboardInterrupt right after each step of the swap: DST is the complete old copy (when the
    new one was not in place yet) or the new one, and nothing is left beside it."""
    if path == "exchange" and not conv._libc_renameat2():
        pytest.skip("no renameat2 here")
    if path == "fallback":
        monkeypatch.setenv(conv.NO_EXCHANGE_ENV, "1")
    src_old, src_new = _src(tmp_path, "a", seed=0), _src(tmp_path, "b", seed=1)
    dst = convert(src_old, tmp_path / "dst")
    snap_old = _output(dst)

    def interrupt(name):
        if name == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(src_new, dst, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "dst"]
    state = _state(dst)
    if step == "old_moved_aside":
        assert _output(dst) == snap_old
    else:
        assert _same_state(state, _state(src_new))


@pytest.mark.parametrize("name", ["d" * 240, "é" * 120])  # 240 bytes: fits NAME_MAX (255)
@pytest.mark.parametrize("exchange", [True, False])
def test_a_long_dst_name_is_converted_replaced_and_recovered(tmp_path, monkeypatch, name,
                                                             exchange):
    """The temporary and old-copy names, DST's name plus a suffix, stay within NAME_MAX; debris
    under those names is still recognised."""
    if not exchange:
        monkeypatch.setenv(conv.NO_EXCHANGE_ENV, "1")
    src = _src(tmp_path)
    dst = convert(src, tmp_path / name)
    convert(src, dst, overwrite=True)
    # a run that died after writing its copy (its cleanup never ran) leaves a temporary directory
    def die(step):
        if step == "synced":
            raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_step", die)
    monkeypatch.setattr(conv, "_remove_debris", lambda *args: None)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, overwrite=True)
    assert len(list(tmp_path.iterdir())) == 3
    monkeypatch.undo()
    if not exchange:
        monkeypatch.setenv(conv.NO_EXCHANGE_ENV, "1")
    convert(src, dst, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "src"])
    assert _same_state(_state(dst), _state(src))
