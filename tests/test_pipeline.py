"""The library path `molmoe generate` runs: `molmoe.load_pipeline`, the EOS id it resolves (the
same from Python as from the command line), `molmoe.Processor` at the top level, and
`python -m molmoe` as the `molmoe` script."""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

import molmoe
from molmoe import app
from molmoe.cli import main
from molmoe.config import ConfigError
from molmoe.errors import UsageError
from molmoe.generation import Engine, GenerationConfig, engine_eos, resolve_eos
from molmoe.processing import Processor
from tests.test_app import _TOKENIZER_FILES, checkpoint, demo_dir  # noqa: F401
from tests.tiny import random_model, scripted_model, write_checkpoint

# ----------------------------------------------------------------------------- top level


def test_processor_at_the_top_level():
    assert molmoe.Processor is Processor
    assert {"Processor", "load_pipeline"} <= set(molmoe.__all__)
    from molmoe import Processor as P
    from molmoe import load_pipeline  # noqa: F401

    assert P is Processor
    with pytest.raises(AttributeError):
        molmoe.no_such_name  # noqa: B018


def test_import_molmoe_stays_light():
    """The processor's dependencies (PIL, tokenizers) load on first use, not with molmoe."""
    code = ("import sys, molmoe; print(sorted(m for m in ('PIL', 'tokenizers', "
            "'molmoe.processing') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- python -m molmoe


def _script() -> pathlib.Path:
    script = pathlib.Path(sys.executable).parent / "molmoe"
    if not script.exists():
        pytest.skip(f"no `molmoe` script beside {sys.executable} (not installed)")
    return script


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["bogus"],
                                  ["generate", "--model", "/nonexistent/molmoe-model",
                                   "--prompt", "hi"],
                                  ["convert", "/nonexistent/src", "/nonexistent/dst"]])
def test_python_m_molmoe_is_the_script(argv):
    as_module = subprocess.run([sys.executable, "-m", "molmoe", *argv], capture_output=True,
                               text=True, timeout=300, check=False)
    as_script = subprocess.run([str(_script()), *argv], capture_output=True, text=True,
                               timeout=300, check=False)
    assert as_module.returncode == as_script.returncode
    assert as_module.stdout == as_script.stdout
    last = [p.rsplit("\r", 1)[-1].strip() for p in as_module.stderr.splitlines()]
    assert last[-1:] == [p.rsplit("\r", 1)[-1].strip() for p in as_script.stderr.splitlines()][-1:]
    if argv[-1] == "--help":
        assert as_module.returncode == 0 and as_module.stdout.startswith("usage: molmoe")
    else:
        assert as_module.returncode == 2 and "Traceback" not in as_module.stderr


# ----------------------------------------------------------------------------- EOS


ANSWER, AFTER = "ab", "c"


@pytest.fixture(scope="module")
def proc(checkpoint):  # noqa: F811
    return Processor.from_pretrained(checkpoint)


def _scripted(proc, directory: pathlib.Path, checkpoint) -> tuple[pathlib.Path, int]:  # noqa: F811
    """tiny-molmoe whose greedy output is ANSWER, then a stop id X, then AFTER, then the
    tokenizer's EOS (blocks zeroed: the next token depends on the last one alone). Returns the
    checkpoint (tokenizer files copied, generation_config.json removed) and X."""
    tok = proc.tokenizer
    ids = tok.encode(ANSWER)
    stop = tok.encode("Z")[0]
    script = ids + [stop] + tok.encode(AFTER)
    model = scripted_model(script, tok.eos_token_id)
    d = write_checkpoint(model, directory, "molmoe-hf")
    for name in _TOKENIZER_FILES:
        shutil.copy(checkpoint / name, d / name)
    (d / "generation_config.json").unlink()
    return d, stop


@pytest.fixture(scope="module")
def scripted(proc, checkpoint, tmp_path_factory):  # noqa: F811
    return _scripted(proc, tmp_path_factory.mktemp("scripted"), checkpoint)


def _cli_answer(directory, capsys) -> dict:
    rc = main(["generate", "--model", str(directory), "--prompt", "hi", "--max-new-tokens",
               "8", "--json", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _python_answer(directory, proc):
    model = molmoe.load(directory)
    inputs = proc("hi")
    inputs.pop("original_size", None)
    eos = engine_eos(model, proc.tokenizer)
    return eos, Engine(model, proc.tokenizer, eos_token_id=eos).generate(
        inputs, GenerationConfig(max_new_tokens=8))


def test_generation_config_eos_is_the_same_from_python_and_the_cli(scripted, proc, capsys):
    directory, stop = scripted
    tok = proc.tokenizer
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    try:
        model = molmoe.load(directory)
        assert model.generation_eos_token_id == stop != tok.eos_token_id
        assert model.generation_eos_token_ids == (stop,)
        assert engine_eos(model, tok) == stop
        assert engine_eos(model, tok, explicit=tok.eos_token_id) == tok.eos_token_id
        assert resolve_eos(directory, tok, model.config) == stop
        assert molmoe.load_pipeline(directory, device="cpu")[2] == stop
        assert app._load(directory, device="cpu")[2] == stop
        doc = _cli_answer(directory, capsys)
        eos, result = _python_answer(directory, proc)
        assert eos == stop
        assert (doc["answer"], doc["finish_reason"]) == (result.text, result.finish_reason) \
            == (ANSWER, "eos")
        # A list: its first id stops.
        (directory / "generation_config.json").write_text(
            json.dumps({"eos_token_id": [stop, tok.eos_token_id]}))
        assert molmoe.load(directory).generation_eos_token_ids == (stop, tok.eos_token_id)
        assert _cli_answer(directory, capsys)["answer"] == ANSWER
        assert _python_answer(directory, proc)[0] == stop
    finally:
        (directory / "generation_config.json").unlink()


def test_without_generation_config_the_tokenizer_eos(scripted, proc, capsys):
    directory, _stop = scripted
    model = molmoe.load(directory)
    assert model.generation_eos_token_id is None and model.generation_eos_token_ids is None
    assert engine_eos(model, proc.tokenizer) == proc.tokenizer.eos_token_id
    doc = _cli_answer(directory, capsys)
    eos, result = _python_answer(directory, proc)
    assert eos == proc.tokenizer.eos_token_id
    assert doc["answer"] == result.text == ANSWER + "Z" + AFTER


@pytest.mark.parametrize("value,words", [(10 ** 6, "outside the model's output ids"),
                                         ("2", "not an integer token id"),
                                         ([], "empty list")])
def test_bad_generation_config_fails_at_load(scripted, capsys, value, words):
    directory, _stop = scripted
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    try:
        with pytest.raises(ConfigError, match=words):
            molmoe.load(directory)
        assert main(["generate", "--model", str(directory), "--prompt", "hi"]) == 2
        assert words in capsys.readouterr().err
    finally:
        (directory / "generation_config.json").unlink()


def test_engine_eos_checks(scripted, proc):
    directory, _stop = scripted
    model = molmoe.load(directory)
    rows = model.config.text.embedding_size
    for bad in (-1, rows, 1.5, True):
        with pytest.raises(UsageError, match="not an id the model can generate"):
            engine_eos(model, proc.tokenizer, explicit=bad)
    # An id recorded on the model that the tokenizer does not know is refused, naming the file.
    unknown = proc.tokenizer.vocab_size
    assert unknown < rows
    model.generation_eos_token_ids, model.generation_eos_token_id = (unknown,), unknown
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id .* not in the "
                                          "tokenizer's vocabulary"):
        engine_eos(model, proc.tokenizer)

    class Bare:  # a tokenizer double with only decode and an EOS id
        eos_token_id = 3

        def decode(self, ids, skip_special_tokens=True):
            return ""

    bare_model = random_model("tiny-molmoe")
    assert engine_eos(bare_model, Bare()) == 3
    assert engine_eos(bare_model, object()) is None


def test_load_pipeline_reports_progress(scripted):
    directory, _stop = scripted
    seen = []
    proc, model, eos = molmoe.load_pipeline(directory, device="cpu",
                                            progress=lambda *a: seen.append(a))
    assert [a[0] for a in seen] == [0, 1, 2, 3] and all(a[1] == 3 for a in seen)
    assert seen[-1][2] == "done" and eos == proc.tokenizer.eos_token_id
    assert isinstance(proc, Processor) and not model.training
