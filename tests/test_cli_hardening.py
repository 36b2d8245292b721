"""Issue 10, the command line and the generation loop: bad arguments exit 2 with one line,
--points-out never destroys the input and writes what its extension names, non-finite logits stop
generation, and a terminal never receives the model's control characters raw."""
import io
import math
import os
import shutil
import stat
import sys

import pytest
import torch
from PIL import Image

from molmoe.backends import resolve_device, select_backend
from molmoe.cli import main
from molmoe.errors import MolmoeError, UsageError
from molmoe.generation import (MIN_TEMPERATURE, Engine, GenerationConfig, GenerationError,
                               sample_next)
from molmoe.points import check_image_output, save_image
from molmoe.processing import Processor
from tests.test_app import _TOKENIZER_FILES, checkpoint, demo_dir, image_path  # noqa: F401
from tests.tiny import random_model, scripted_model, write_checkpoint

NO_MODEL = "/nonexistent/molmoe-model"  # errors must come before the model is even looked for


def one_line_error(capsys, rc, *words):
    """Exit 2 and one line on stderr (after the loading bar's carriage-return frames, if any)."""
    raw = capsys.readouterr().err
    lines = [part.rsplit("\r", 1)[-1].strip() for part in raw.split("\n")]
    lines = [line for line in lines if line]
    assert rc == 2, raw
    assert "Traceback" not in raw and len(lines) == 1, raw
    err = lines[0]
    for w in words:
        assert w in err, (w, err)
    return err


# ----------------------------------------------------------------------------- --points-out


@pytest.fixture
def photo(tmp_path, image_path):  # noqa: F811
    """A JPEG input in its own directory (the probe's `--image photo.jpg`)."""
    path = tmp_path / "photo.jpg"
    with Image.open(image_path) as im:
        im.save(path, format="JPEG")
    return path


def _generate(model, image, out, *extra):
    return main(["generate", "--model", str(model), "--image", str(image), "--prompt",
                 "Point to the cat.", "--max-new-tokens", "3", "--json", "--points-out",
                 str(out), *extra])


@pytest.mark.parametrize("how", ["same path", "relative path", "symlink", "hard link"])
def test_points_out_never_overwrites_the_input(photo, tmp_path, monkeypatch, capsys, how):
    before = photo.read_bytes()
    out = photo
    if how == "relative path":
        monkeypatch.chdir(tmp_path)
        out = "./sub/../photo.jpg"
        (tmp_path / "sub").mkdir()
    elif how == "symlink":
        out = tmp_path / "link.jpg"
        out.symlink_to(photo)
    elif how == "hard link":
        out = tmp_path / "hard.jpg"
        os.link(photo, out)
    # Refused before the model is located: the (missing) model is never reached.
    one_line_error(capsys, _generate(NO_MODEL, photo, out), "--points-out", "input image")
    assert photo.read_bytes() == before


@pytest.mark.parametrize("ext,fmt", [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".png", "PNG"),
                                     (".webp", "WEBP"), (".bmp", "BMP")])
def test_points_out_format_follows_the_extension(checkpoint, photo, tmp_path, capsys,  # noqa: F811
                                                  ext, fmt):
    out = tmp_path / f"annotated{ext}"
    assert _generate(checkpoint, photo, out) == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (130, 90)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("name", ["annotated.xyz", "annotated", "annotated.txt",
                                  # PIL registers writers for these that cannot write an RGB
                                  # picture: refused before the model loads, not after
                                  "annotated.blp", "annotated.xbm", "annotated.msp",
                                  "annotated.h5", "annotated.wmf", "annotated.grib",
                                  # icon writers shrink the picture to 256 x 256 without a word
                                  "annotated.ico", "annotated.icns"])
def test_points_out_unknown_extension(photo, tmp_path, capsys, name):
    rc = _generate(NO_MODEL, photo, tmp_path / name)
    one_line_error(capsys, rc, "--points-out", "extension", ".png", ".jpg")


def test_points_out_unwritable_places_fail_before_loading(photo, tmp_path, capsys):
    (tmp_path / "a_dir.png").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {tmp_path / "missing" / "out.png": "does not exist",
             tmp_path / "file" / "out.png": "not a directory",
             tmp_path / "a_dir.png": "is a directory",
             "": "empty path"}
    if os.path.isdir("/proc/self"):  # no file can be created there, not even by root
        cases["/proc/self/out.png"] = "cannot write in"
    for out, why in cases.items():
        one_line_error(capsys, _generate(NO_MODEL, photo, out), "--points-out", why)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_points_out_read_only_directory(photo, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        one_line_error(capsys, _generate(NO_MODEL, photo, ro / "out.png"), "cannot write in")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_save_image_is_atomic(tmp_path, monkeypatch):
    """A save that fails half way (disk full) leaves the old file whole and no temporary file."""
    out = tmp_path / "out.png"
    out.write_bytes(b"old image")
    image = Image.new("RGB", (8, 8))
    fmt = check_image_output(out)

    def half_then_disk_full(self, fp, format=None, **params):  # a stand-in for PIL's writer
        fp.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_disk_full)
    with pytest.raises(UsageError, match="No space left"):
        save_image(image, out, fmt)
    assert out.read_bytes() == b"old image"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_image_honours_the_umask_and_keeps_symlinks(tmp_path):
    old = os.umask(0o027)
    try:
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.png", "PNG")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o640
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "target.jpg")
    save_image(Image.new("RGBA", (8, 8)), link, check_image_output(link))  # RGBA -> RGB
    assert link.is_symlink()
    with Image.open(tmp_path / "target.jpg") as im:
        assert im.format == "JPEG"


# ----------------------------------------------------------------------------- bad arguments

BAD_ARGS = [
    (["--do-sample", "--temperature", "nan"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--do-sample", "--temperature", "inf"], "temperature"),
    (["--do-sample", "--temperature", "1e-45"], "temperature"),
    (["--temperature", "1e-45"], "temperature"),
    (["--do-sample", "--temperature", "-1"], "temperature"),
    (["--do-sample", "--temperature", "0"], "temperature"),
    (["--do-sample", "--top-p", "nan"], "top_p"),
    (["--do-sample", "--top-p", "0"], "top_p"),
    (["--top-k", "0"], "top_k"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-new-tokens", "-5"], "max_new_tokens"),
    (["--do-sample", "--seed", "-1"], "seed"),
    (["--do-sample", "--seed", str(2 ** 70)], "seed"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--device", ""], "device ''"),
    (["--device", "meta"], "device 'meta'"),
    (["--prompt", "caf\udcc3 au lait"], "byte 0xc3, not UTF-8, at byte offset 3"),
    (["--prompt", "\u00e9\ud800"], "lone surrogate U+D800, at byte offset 2"),
]
if not torch.cuda.is_available():
    BAD_ARGS += [(["--device", "cuda"], "CUDA is not available"),
                 (["--device", "cuda:7"], "CUDA is not available")]


@pytest.mark.parametrize("extra,words", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_argument_exits_2_before_loading(capsys, extra, words):
    argv = ["generate", "--model", NO_MODEL, "--prompt", "hi", *extra]
    one_line_error(capsys, main(argv), words)


def test_huge_max_new_tokens_is_bounded_by_the_model(checkpoint, capsys):  # noqa: F811
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--max-new-tokens",
               str(10 ** 30)])
    one_line_error(capsys, rc, "max_new_tokens", "max_position_embeddings=4096")


def test_triton_backend_on_the_cpu_needs_the_interpreter(monkeypatch, capsys,
                                                       checkpoint):  # noqa: F811
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1"):
        select_backend("triton", "cpu")
    import molmoe

    with pytest.raises(UsageError, match="needs a CUDA device"):  # the library's load refuses too
        molmoe.load(checkpoint, backend="triton", device="cpu")
    rc = main(["generate", "--model", NO_MODEL, "--prompt", "hi", "--backend", "triton",
               "--device", "cpu"])
    one_line_error(capsys, rc, "backend 'triton'", "TRITON_INTERPRET=1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_device_count():
    n = torch.cuda.device_count()
    with pytest.raises(UsageError, match=f"has {n} CUDA device"):
        resolve_device(f"cuda:{n}")
    assert resolve_device(f"cuda:{n - 1}") == torch.device("cuda", n - 1)


@pytest.mark.parametrize("t", [MIN_TEMPERATURE, 1e-3, 1.0, 1e4])
def test_sampler_is_finite_at_any_allowed_temperature(t):
    """Large logit gaps at the smallest temperature: no overflow, the argmax wins."""
    logits = torch.tensor([[3e4, -3e4, 0.0, 2.9e4], [-1e30, 1e30, 0.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, do_sample=True, temperature=t, generator=g)
    if t <= 1e-3:
        assert ids.tolist() == [0, 1]
    with pytest.raises(UsageError, match="temperature"):
        sample_next(logits, do_sample=True, temperature=MIN_TEMPERATURE / 2)


@pytest.mark.parametrize("field,value", [("temperature", math.nan), ("temperature", math.inf),
                                         ("temperature", "1"), ("top_p", math.nan),
                                         ("top_k", 1.5), ("max_new_tokens", True),
                                         ("seed", 2 ** 64), ("seed", -1)])
def test_generation_config_refuses(field, value):
    with pytest.raises(UsageError, match=field):
        GenerationConfig(**{field: value, "do_sample": True})


# ----------------------------------------------------------------------------- NaN logits


@pytest.fixture(scope="module")
def proc(checkpoint):  # noqa: F811
    return Processor.from_pretrained(checkpoint)


def _text(proc, prompt):
    inputs = proc(prompt)
    inputs.pop("original_size", None)
    return inputs


@pytest.mark.parametrize("do_sample", [False, True])
def test_nan_in_lm_head_stops_generation(proc, do_sample):
    model = random_model("tiny-molmoe", seed=2)
    with torch.no_grad():
        model.decoder.lm_head.weight[5, 0] = math.nan
    engine = Engine(model, proc.tokenizer)
    with pytest.raises(GenerationError, match=r"sequence 0: the logits for new token 1 are NaN"):
        engine.generate(_text(proc, "hi"), GenerationConfig(max_new_tokens=4,
                                                            do_sample=do_sample, seed=0))


def test_nan_names_the_sequence_and_the_step(proc):
    """A NaN embedding row that only the second sequence's first new token feeds back: the error
    names sequence 1 and new token 2, and the first sequence alone still answers."""
    model = random_model("tiny-molmoe", seed=2)
    prompts = [_text(proc, "hello"), _text(proc, "Z")]
    cfg = GenerationConfig(max_new_tokens=3)
    engine = Engine(model, proc.tokenizer)
    first = [r.token_ids[0] for r in engine.generate(prompts, cfg)]
    seen = {int(t) for p in prompts for t in p["input_ids"]} | {first[0]}
    assert first[1] not in seen  # the seed's answer makes the NaN row reachable by seq 1 only
    with torch.no_grad():
        model.decoder.embed.embedding[first[1]] = math.nan
    with pytest.raises(GenerationError, match="sequence 1: the logits for new token 2 are NaN"):
        engine.generate(prompts, cfg)
    assert engine.generate(prompts[0], cfg).token_ids[0] == first[0]


# ----------------------------------------------------------------------------- terminal output


class FakeTTY(io.StringIO):
    """A terminal double: a StringIO that says it is a TTY."""

    def isatty(self):
        return True


ESCAPE_ANSWER = "\x1b[2J"  # "clear the screen"


@pytest.fixture(scope="module")
def scripted_checkpoint(checkpoint, proc, tmp_path_factory):  # noqa: F811
    """tiny-molmoe whose greedy answer is exactly ESCAPE_ANSWER: every block's output is zeroed,
    so the last position's logits depend on the last token alone, and the embeddings and LM head
    form a transition table t_0 -> t_1 -> ... -> EOS (t_0: any token outside the answer)."""
    ids = proc.tokenizer.encode(ESCAPE_ANSWER)
    assert len(ids) == len(ESCAPE_ANSWER)
    model = scripted_model(ids, proc.tokenizer.eos_token_id)
    d = write_checkpoint(model, tmp_path_factory.mktemp("scripted"), "molmoe-hf")
    for name in _TOKENIZER_FILES:
        shutil.copy(checkpoint / name, d / name)
    return d


def _answer(scripted_checkpoint, monkeypatch, stdout):
    monkeypatch.setattr(sys, "stdout", stdout)
    rc = main(["generate", "--model", str(scripted_checkpoint), "--prompt", "hi",
               "--max-new-tokens", "8"])
    assert rc == 0
    return stdout.getvalue()


def test_terminal_gets_escapes_pipe_gets_the_exact_answer(scripted_checkpoint, monkeypatch):
    piped = _answer(scripted_checkpoint, monkeypatch, io.StringIO())
    assert piped == ESCAPE_ANSWER + "\n"
    shown = _answer(scripted_checkpoint, monkeypatch, FakeTTY())
    assert shown == "\\x1b[2J\n" and "\x1b" not in shown


def test_point_labels_are_escaped_on_stderr(capsys):
    from molmoe.app import _report
    from molmoe.generation import GenerationResult, Timings
    from molmoe.points import parse_points

    text = '<point x="10.0" y="20.0" alt="\x1b[2Jcat">cat</point>'
    result = GenerationResult(text, [], "eos", Timings(0.1, 0.1, 3))
    err = FakeTTY()
    _report(result, parse_points(text), (100, 50), as_json=False, err=err)
    assert "\x1b" not in err.getvalue() and "\\x1b[2Jcat" in err.getvalue()


def test_errors_are_molmoe_errors():
    assert issubclass(GenerationError, MolmoeError)


def test_demo_cache_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(["demo", "--out", str(tmp_path / "d.png"), "--cache-dir", str(tmp_path / "file"),
               "--max-new-tokens", "2"])
    out = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out.err
    assert "demo cache directory" in out.err and len(out.err.strip().splitlines()) == 1


def test_closed_stdout_ends_quietly(checkpoint):  # noqa: F811
    """`molmoe generate ... | head -c1`: the reader is gone before the answer streams."""
    import subprocess

    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "molmoe.cli", "generate", "--model",
                               str(checkpoint), "--prompt", "hi", "--max-new-tokens", "2"],
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(w)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "BrokenPipe" not in proc.stderr


@pytest.mark.parametrize("prompt_ids,eos,match", [
    ([5, 10 ** 6], None, "prompt 0: token id 1000000 is not in the model's vocabulary"),
    ([5, -7], None, "prompt 0: token id -7"),
    ([5, 6], 10 ** 9, "eos_token_id 1000000000 is not an id the model can generate"),
])
def test_engine_refuses_ids_outside_the_model(proc, prompt_ids, eos, match):
    model = random_model("tiny-molmoe", seed=2)
    with pytest.raises(UsageError, match=match):  # a bad EOS id already at construction
        engine = Engine(model, proc.tokenizer, eos_token_id=eos)
        engine.generate({"input_ids": torch.tensor(prompt_ids)}, GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize("field,value", [("eos_token_id", -1), ("eos_token_id", "abc"),
                                         ("stop_strings", 5), ("stop_strings", ["a", 3])])
def test_generation_config_refuses_stops(field, value):
    with pytest.raises(UsageError, match=field):
        GenerationConfig(**{field: value})


# ----------------------------------------------------------------------------- NaN weights, compat


@pytest.fixture(scope="module")
def nan_checkpoint(checkpoint, tmp_path_factory):  # noqa: F811
    """tiny-molmoe with one NaN in its LM head, in the released layout, with tokenizer files."""
    model = random_model("tiny-molmoe", seed=2)
    with torch.no_grad():
        model.decoder.lm_head.weight[5, 0] = math.nan
    d = write_checkpoint(model, tmp_path_factory.mktemp("nan"), "molmoe-hf")
    for name in _TOKENIZER_FILES:
        shutil.copy(checkpoint / name, d / name)
    return d


def test_generate_refuses_nan_weights_and_the_opt_out_reaches_the_nan_logits(nan_checkpoint,
                                                                              capsys):
    """Checked at load, naming the key; --no-check-finite loads them and the answer's NaN logits
    stop generation instead of answering noise with exit 0."""
    args = ["generate", "--model", str(nan_checkpoint), "--prompt", "hi", "--max-new-tokens", "3"]
    one_line_error(capsys, main(args), "lm_head.weight", "1 non-finite", "check_finite")
    one_line_error(capsys, main(args + ["--no-check-finite"]), "NaN")


def test_convert_refuses_nan_weights_unless_told(nan_checkpoint, tmp_path, capsys):
    one_line_error(capsys, main(["convert", str(nan_checkpoint), str(tmp_path / "out")]),
                   "lm_head.weight", "non-finite")
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(nan_checkpoint), str(tmp_path / "out"),
                 "--no-check-finite"]) == 0


def test_convert_to_float16_refuses_an_overflow(checkpoint, tmp_path, capsys):  # noqa: F811
    """A finite float32 weight beyond float16's range would become Inf in the output: the check
    runs after the cast."""
    model = random_model("tiny-molmoe", seed=2)
    with torch.no_grad():
        model.decoder.lm_head.weight[3, 1] = 1e6  # float16 max is 65504
    d = write_checkpoint(model, tmp_path / "big", "molmoe-hf")
    shutil.copy(checkpoint / "tokenizer.json", d / "tokenizer.json")
    one_line_error(capsys, main(["convert", str(d), str(tmp_path / "f16"), "--dtype",
                                 "float16"]), "lm_head.weight", "1 non-finite",
                   "overflow float16", "bfloat16 or float32")
    assert main(["convert", str(d), str(tmp_path / "f32")]) == 0


def test_generate_compat_reaches_processor_and_model(checkpoint, monkeypatch):  # noqa: F811
    from molmoe import app

    proc_r, model_r, _ = app._load(checkpoint, device="cpu", compat="released")
    assert proc_r.compat == "released" and model_r.compat == "released"
    assert model_r.vision.crop_rule == "released-molmoe"
    ids = proc_r("<|endoftext|>")["input_ids"].tolist()
    assert ids.count(proc_r.tokenizer.eos_token_id) == 2  # BOS + the typed string, as released
    proc_m, model_m, _ = app._load(checkpoint, device="cpu")
    assert model_m.vision.crop_rule == "training"
    assert proc_m("<|endoftext|>")["input_ids"].tolist().count(proc_m.tokenizer.eos_token_id) == 1


def test_kv_cache_that_cannot_fit_is_refused_before_allocating(checkpoint, monkeypatch):  # noqa: F811
    """The engine's cache is checked against free memory before it is allocated (here the
    free memory is reported as 1 MiB; tiny-molmoe's K and V take 1 KiB per position and row).
    A request whose one row cannot fit is refused alone, with the figures; requests that fit
    only a few at a time run in fewer rows instead of being refused."""
    import molmoe
    import molmoe.config as config_module
    from molmoe.config import InsufficientMemoryError

    monkeypatch.setattr(config_module, "available_memory",
                        lambda device: (2**20, "free (reported by the test)"))
    proc = Processor.from_pretrained(checkpoint)
    model = molmoe.load(checkpoint)
    engine = Engine(model, proc.tokenizer)
    with pytest.raises(InsufficientMemoryError,
                       match=r"sequence 0: a KV cache of 1 x \d+ positions \(2 layers\) need "
                             r"\d+\.\d MiB at float32 on cpu, but there are only 1\.0 MiB"):
        engine.generate(_text(proc, "hi"), GenerationConfig(max_new_tokens=2000))
    # 8 prompts of 200 new tokens: 8 rows x 256 slots (2 MiB) do not fit; fewer rows do.
    cfg = GenerationConfig(max_new_tokens=200, stop_strings=())
    prompts = [_text(proc, w) for w in ("a", "b", "c", "d", "e", "f", "g", "h")]
    results = engine.generate(prompts, cfg)
    assert engine._runner.cache.batch < 8
    alone = [Engine(model, proc.tokenizer).generate(p, cfg).token_ids for p in prompts[:2]]
    assert [r.token_ids for r in results[:2]] == alone


@pytest.mark.parametrize("do_sample", [False, True])
def test_all_equal_logits_stop_generation(proc, do_sample):
    """Finite but degenerate weights (here: a zero LM head; in the adversarial probe, 3e38 in
    attn_out) give the same logit for every token: greedy would answer token 0 forever, exit 0.
    Refused instead, naming the sequence and the step."""
    model = random_model("tiny-molmoe", seed=2)
    with torch.no_grad():
        model.decoder.lm_head.weight.zero_()
    engine = Engine(model, proc.tokenizer)
    with pytest.raises(GenerationError, match=r"sequence 0: the logits for new token 1 are all "
                                              r"equal across the vocabulary"):
        engine.generate(_text(proc, "hi"), GenerationConfig(max_new_tokens=3,
                                                            do_sample=do_sample, seed=0))


def test_points_out_side_beyond_the_format_is_refused_before_loading(tmp_path, capsys):
    """WebP stores at most 16383 pixels per side: a wider input is refused before the model is
    even looked for, not after generating (PIL fails only when saving)."""
    wide = tmp_path / "wide.png"
    Image.new("RGB", (20000, 2), "white").save(wide)
    rc = _generate(NO_MODEL, wide, tmp_path / "out.webp")
    one_line_error(capsys, rc, "--points-out", "WEBP stores at most 16383", "20000x2")
    assert check_image_output(tmp_path / "out.png", size=(20000, 2)) == "PNG"


def test_generate_compat_released_sees_the_unrotated_picture(checkpoint, tmp_path,  # noqa: F811
                                                             capsys):
    """An EXIF-rotated JPEG (orientation 6: stored 130x90, shown 90x130): the default rotates it,
    --compat released feeds the stored pixels as the released processor does, and the reported
    image size (what points refer to) follows."""
    import json

    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (130, 90), (90, 140, 200)).save(path, exif=exif)
    sizes = {}
    for compat in ("molmoe", "released"):
        assert main(["generate", "--model", str(checkpoint), "--image", str(path), "--prompt",
                     "hi", "--max-new-tokens", "2", "--json", "--compat", compat]) == 0
        sizes[compat] = json.loads(capsys.readouterr().out)["image_size"]
    assert sizes == {"molmoe": [90, 130], "released": [130, 90]}
