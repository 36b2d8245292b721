"""`molmoe generate` and `molmoe demo` end to end on tiny checkpoints (random weights)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from molmoe.cli import main
from molmoe.demo import DEMO_IMAGE, demo_checkpoint
from molmoe.generation import Engine, GenerationConfig
from molmoe.processing import Processor
from tests.tiny import random_model, write_checkpoint

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                    "generation_config.json")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_dir):
    """tiny-molmoe in the released HF layout, with the demo's byte-level tokenizer files."""
    d = write_checkpoint(random_model("tiny-molmoe", seed=2), tmp_path_factory.mktemp("ckpt"),
                         "molmoe-hf")
    for name in _TOKENIZER_FILES:
        shutil.copy(demo_dir / name, d / name)
    return d


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_json_and_points_out(checkpoint, image_path, tmp_path, capsys):
    out_png = tmp_path / "annotated.png"
    rc = main(["generate", "--model", str(checkpoint), "--image", str(image_path), "--prompt",
               "Point to the cat.", "--max-new-tokens", "6", "--json", "--points-out",
               str(out_png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    assert set(doc) >= {"answer", "points", "count", "timings", "image_size", "finish_reason"}
    assert doc["image_size"] == [130, 90]
    assert doc["timings"]["new_tokens"] <= 6 and doc["timings"]["prefill_s"] > 0
    assert doc["points_image"] == str(out_png)
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.size == (130, 90)
    # The command's answer is what the processor + engine give in-process (greedy).
    import molmoe

    proc = Processor.from_pretrained(checkpoint)
    inputs = proc("Point to the cat.", images=str(image_path))
    inputs.pop("original_size")
    ref = Engine(molmoe.load(checkpoint), proc.tokenizer).generate(
        inputs, GenerationConfig(max_new_tokens=6))
    assert doc["answer"] == ref.text and doc["finish_reason"] == ref.finish_reason


def test_generate_streams_the_answer(checkpoint, image_path, capsys):
    rc = main(["generate", "--model", str(checkpoint), "--image", str(image_path), "--prompt",
               "What is this?", "--max-new-tokens", "5"])
    streamed = capsys.readouterr()
    assert rc == 0
    assert main(["generate", "--model", str(checkpoint), "--image", str(image_path), "--prompt",
                 "What is this?", "--max-new-tokens", "5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert streamed.out == doc["answer"] + "\n"
    assert "tokens/s" in streamed.err


def test_missing_image_exits_2_naming_the_file(checkpoint, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    rc = main(["generate", "--model", str(checkpoint), "--image", str(missing), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_image_exits_2(checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    rc = main(["generate", "--model", str(checkpoint), "--image", str(bad), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "Traceback" not in err


def test_too_long_prompt_exits_2(checkpoint, image_path, capsys):
    rc = main(["generate", "--model", str(checkpoint), "--image", str(image_path), "--prompt",
               "hi", "--max-new-tokens", "4000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "prompt needs" in err[-1] and "tokens" in err[-1]
    # 4096 positions - 4000 kept for the answer = 96 allowed, and the message says so.
    assert "the model allows 96 (4096 positions minus 4000 kept for the answer" in err[-1]


def test_demo_runs_end_to_end(demo_dir, tmp_path, capsys):
    out_png = tmp_path / "demo.png"
    rc = main(["demo", "--out", str(out_png), "--cache-dir", str(demo_dir.parent),
               "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM weights" in out and "NOISE" in out and str(out_png.resolve()) in out
    assert "tokens/s" in out and "NOT model output" in out
    with Image.open(out_png) as drawn, Image.open(DEMO_IMAGE) as original:
        assert drawn.size == original.size
        diff = np.abs(np.asarray(drawn.convert("RGB"), dtype=int)
                      - np.asarray(original.convert("RGB"), dtype=int)).sum(-1)
    ys, xs = np.nonzero(diff)
    assert len(xs) > 0
    # The example marker sits on the red circle (centre about (120, 180) in the 536x354 image).
    assert diff[175:186, 115:126].any()


def test_demo_json(demo_dir, tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "d.png"), "--cache-dir", str(demo_dir.parent),
               "--max-new-tokens", "4", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    doc = json.loads(captured.out)
    assert doc["weights"] == "random" and doc["timings"]["new_tokens"] <= 4
    assert "RANDOM" in captured.err


def test_batch_of_processed_prompts_equals_one_by_one(checkpoint, image_path, tmp_path):
    """Real processor outputs: two image sizes (different crop counts) and a text-only prompt."""
    import molmoe

    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 900, 3), dtype=np.uint8)
                    ).save(wide)
    proc = Processor.from_pretrained(checkpoint)
    prompts = [proc("Point to the cat.", images=str(image_path)),
               proc("Describe this image in detail, please.", images=str(wide)),
               proc("No image here.")]
    for p in prompts:
        p.pop("original_size", None)
    assert prompts[0]["images"].shape[0] != prompts[1]["images"].shape[0]  # crop counts differ
    engine = Engine(molmoe.load(checkpoint), proc.tokenizer)
    cfg = GenerationConfig(max_new_tokens=6)
    batched = engine.generate(prompts, cfg)
    for p, r in zip(prompts, batched):
        assert r.token_ids == engine.generate(p, cfg).token_ids


def test_max_pixels_flag(checkpoint, image_path, capsys):
    """The pixel limit is configurable from the command line (130 x 90 = 11,700 pixels)."""
    args = ["generate", "--model", str(checkpoint), "--image", str(image_path), "--prompt", "hi",
            "--max-new-tokens", "2", "--json"]
    assert main(args + ["--max-pixels", "10000"]) == 2
    err = capsys.readouterr().err
    assert "11,700 pixels, over the limit of 10,000" in err and str(image_path) in err
    assert main(args + ["--max-pixels", "11700"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == [130, 90]
    assert main(args + ["--max-pixels", "0"]) == 0


def test_model_takes_the_processor_output_as_is(checkpoint, image_path):
    """`model(**processor(...))`: the processor's metadata key (original_size) does not break it."""
    import molmoe

    proc = Processor.from_pretrained(checkpoint)
    inputs = proc("Point to the cat.", images=str(image_path))
    assert "original_size" in inputs
    model = molmoe.load(checkpoint)
    tensors = {k: v for k, v in inputs.items() if k != "original_size"}
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**tensors))


def test_generate_decode_mode_compile_gives_the_eager_answer(checkpoint, image_path, capsys):
    args = ["generate", "--model", str(checkpoint), "--image", str(image_path), "--prompt",
            "What is this?", "--max-new-tokens", "5", "--json"]
    assert main(args) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main(args + ["--decode-mode", "compile"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["answer"] == eager["answer"]


def test_generate_decode_mode_graph_needs_cuda(checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--device", "cpu",
               "--decode-mode", "graph"])
    assert rc == 2 and "--decode-mode graph" in capsys.readouterr().err
