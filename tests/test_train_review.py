"""Review of `molmoe train`: the output directory, starting over, resuming past the end, FLOPs of
dense models, mixed image/text batches over 2 gloo ranks, dense text-only runs, divergence."""
from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from molmoe.errors import MolmoeError
from molmoe.training import checkpoint as ckpt
from molmoe.training.trainer import TrainOptions, read_log, train
from tests.test_train_loop import _cli, _opts, _train_args


def _text_records(n: int) -> list[str]:
    return [json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                     {"role": "assistant", "content": f"It is {2 * i}."}]})
            for i in range(n)]


# ----------------------------------------------------------------------------- --out


def test_out_that_is_a_file_is_refused(train_setup, tmp_path):
    f = tmp_path / "o"
    f.write_text("mine")
    with pytest.raises(MolmoeError, match="is a file"):
        train(_opts(train_setup, f))
    assert f.read_text() == "mine"


def test_out_with_files_train_did_not_write_is_refused_before_training(train_setup, tmp_path):
    """A directory of the user's (or the model's, or the data's) is not a run directory: the run
    stops before writing anything there, naming a file it did not write; no log.jsonl of the
    user's is deleted, and no export fails after hours of training."""
    model, data, _ = train_setup
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "log.jsonl").write_text("my own log\n")
    with pytest.raises(MolmoeError, match="notes.txt"):
        train(_opts(train_setup, out))
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "notes.txt"]
    assert (out / "log.jsonl").read_text() == "my own log\n"
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(MolmoeError, match="molmoe train did not write"):
        train(_opts(train_setup, model))
    assert sorted(p.name for p in model.iterdir()) == before
    with pytest.raises(MolmoeError, match="molmoe train did not write"):
        train(_opts(train_setup, data.parent))
    assert not (data.parent / "checkpoints").exists() and not (data.parent / "log.jsonl").exists()
    r = _cli(*_train_args(train_setup, out, "--steps", "1"), check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "notes.txt" in r.stderr


def test_export_that_cannot_be_written_is_refused_before_training(train_setup, tmp_path):
    out = tmp_path / "o"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_text("mine")
    with pytest.raises(MolmoeError, match="model"):
        train(_opts(train_setup, out, export=True))
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()
    assert (out / "model" / "weights.bin").read_text() == "mine"
    # inside the source checkpoint: convert would refuse the export at the very end
    inside = train_setup[0] / "run"
    try:
        with pytest.raises(MolmoeError):
            train(_opts(train_setup, inside, export=True))
        assert not inside.exists()  # made for the check, removed again (still empty)
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def test_bad_data_leaves_no_out_directory(train_setup, tmp_path):
    """The data is scanned before OUT is made: a refused run leaves nothing behind."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    out = tmp_path / "runs" / "new"
    with pytest.raises(MolmoeError, match="bad.jsonl"):
        train(_opts(train_setup, out, data=str(bad)))
    assert not out.exists() and not out.parent.exists()


def test_a_finished_run_directory_is_accepted_again(train_setup, tmp_path):
    out = tmp_path / "o"
    train(_opts(train_setup, out, steps=2, export=True, plot=True))
    r = train(_opts(train_setup, out, steps=2, export=True, plot=True))  # nothing left to do
    assert (r.resumed_from, r.steps, r.last) == (2, 2, {})
    assert [x["step"] for x in read_log(out / "log.jsonl")] == [1, 2]


# ----------------------------------------------------------------------------- starting over, resuming


def test_no_resume_discards_the_old_runs_checkpoints(train_setup, tmp_path):
    """--no-resume on a directory whose old run got further: the old checkpoints must neither
    outrank (and prune, with --keep 1) the new run's, nor be resumed by its next invocation."""
    out = tmp_path / "o"
    train(_opts(train_setup, out, steps=4))
    train(_opts(train_setup, out, steps=2, keep=1, resume=False))
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]
    r = train(_opts(train_setup, out, steps=3))
    assert (r.resumed_from, r.steps) == (2, 3)
    assert [x["step"] for x in read_log(out / "log.jsonl")] == [1, 2, 3]


def test_resume_past_the_end_is_refused_or_a_no_op(train_setup, tmp_path):
    out = tmp_path / "o"
    train(_opts(train_setup, out, steps=4))
    # the checkpoint is at step 4: --steps 2 cannot be honoured (and must not export step 4
    # as the model of a 2-step run)
    with pytest.raises(ckpt.CheckpointResumeError, match="step 4.*--steps 2"):
        train(_opts(train_setup, out, steps=2, export=True))
    assert not (out / "model").exists()
    # --stop-at before the checkpoint: nothing to do, and the result says where the run is
    r = train(_opts(train_setup, out, steps=6, stop_at=1))
    assert (r.resumed_from, r.steps) == (4, 4)
    assert [x["step"] for x in read_log(out / "log.jsonl")] == [1, 2, 3, 4]
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4]


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("name", ["tiny-7b-d", "tiny-molmoe"])
def test_train_flops_count_the_ffn(name):
    """6 x (the decoder blocks' matrices, with top_k of the experts, + the LM head)."""
    from molmoe.training.flops import train_flops
    from tests.tiny import random_model

    model = random_model(name)
    t = model.config.text
    active = 0
    for n, p in model.decoder.blocks.named_parameters():
        if p.dim() < 2:
            continue
        if t.moe is not None and p.dim() == 3:  # stacked experts (E, ., .)
            active += p.numel() // t.moe.num_experts * t.moe.top_k
        else:
            active += p.numel()
    active += t.d_model * t.embedding_size
    assert train_flops(model.config, 1, 1)["per_token_dense"] == 6 * active


# ----------------------------------------------------------------------------- data through the loop


def test_two_ranks_one_with_only_text_match_one_process(train_setup, tmp_path):
    """4 image and 4 text examples in one global batch of 8 over 2 ranks: the batch is sorted by
    length, so rank 0 holds only text. It must still run the vision tower (a padding crop), or
    FSDP's collectives would not match (a hang); the steps equal one process's."""
    from molmoe.processing.processor import Processor
    from molmoe.training.data import BucketSampler, TrainingData

    model, data, _ = train_setup
    mixed = data.parent / "mixed.jsonl"
    mixed.write_text("\n".join(data.read_text().splitlines()[:4] + _text_records(4)) + "\n")
    ds = TrainingData(mixed, Processor.from_pretrained(model))
    sampler = BucketSampler(ds.lengths, 8, seed=0)
    for step in range(2):
        batch = sampler.batch(step)
        assert all(ds.records[i].image is None for i in batch[:4])  # rank 0: text only
        assert all(ds.records[i].image is not None for i in batch[4:])
    common = ["--steps", "2", "--batch", "8", "--no-export"]
    one, two = tmp_path / "one", tmp_path / "two"
    _cli("train", "--model", str(model), "--data", str(mixed), "--out", str(one), "--lr", "1e-3",
         "--warmup", "1", "--workers", "0", "--quiet", "--no-plot", *common, "--micro-batch", "4")
    _cli("train", "--model", str(model), "--data", str(mixed), "--out", str(two), "--lr", "1e-3",
         "--warmup", "1", "--workers", "0", "--quiet", "--no-plot", *common, torchrun=2)  # _cli's timeout: 600 s
    a, b = read_log(one / "log.jsonl"), read_log(two / "log.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "lb", "z", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def _dense_checkpoint(directory: pathlib.Path, like: pathlib.Path) -> pathlib.Path:
    """tiny-7b-d (no MoE layer) with the tiny checkpoint's tokenizer and a processor for its
    ViT (336-px crops)."""
    from molmoe.demo import _PREPROCESSOR
    from tests.tiny import random_model, write_checkpoint

    write_checkpoint(random_model("tiny-7b-d", std=0.05), directory, "dense")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(like / f, directory / f)
    (directory / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR))
    return directory


def test_dense_model_on_text_only_data(train_setup, tmp_path):
    """No MoE layer (no router losses, no expert load) and no image at all: the loop, the log,
    the plot and the export still work, and the export loads."""
    import molmoe

    model = _dense_checkpoint(tmp_path / "dense", train_setup[0])
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(_text_records(4)) + "\n")
    out = tmp_path / "o"
    r = train(TrainOptions(model=str(model), data=str(data), out=str(out), steps=3, batch=4,
                           lr=1e-3, warmup=1, workers=0, progress=False))
    log = read_log(out / "log.jsonl")
    assert [x["step"] for x in log] == [1, 2, 3]
    assert all(x["lb"] == 0 and x["z"] == 0 and "expert_load" not in x for x in log)
    assert log[-1]["ce"] < log[0]["ce"]
    assert r.plot is not None and r.plot.read_bytes()[:4] == b"\x89PNG"
    after = molmoe.load(out / "model").state_dict()
    before = molmoe.load(model).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)  # no image: ViT untouched


def test_diverging_run_stops_after_three_non_finite_steps(train_setup, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(MolmoeError, match="not finite for 3 steps in a row"):
        train(_opts(train_setup, out, steps=8, lr=1e6, grad_clip=0.0))
    log = read_log(out / "log.jsonl")
    assert [x["applied"] for x in log] == [True, False, False, False]
    assert ckpt.complete_checkpoints(out) == []  # nothing diverged was saved


def test_resume_names_the_model_by_its_absolute_path(train_setup, tmp_path, monkeypatch):
    """A run started with --model ckpt (relative) resumes when named /abs/.../ckpt, e.g. by a job
    scheduler started in another directory: the same model, the same run."""
    model = train_setup[0]
    monkeypatch.chdir(model.parent)
    train(_opts(train_setup, tmp_path / "o", model=model.name, steps=2, stop_at=1))
    monkeypatch.chdir(tmp_path)
    r = train(_opts(train_setup, tmp_path / "o", model=str(model), steps=2))
    assert (r.resumed_from, r.steps) == (1, 2)
