"""`molmoe train` (molmoe.training.trainer): FSDP2 over gloo on the CPU, exact resume, atomic
checkpoints under SIGKILL, export loadable by molmoe.load, and a whole loop that learns."""
from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

from molmoe.training import checkpoint as ckpt
from molmoe.training.trainer import TrainOptions, learning_rate, read_log, train
from tests.train_fixtures import PROMPT, pointing_set, tiny_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _opts(train_setup, out, **kw) -> TrainOptions:
    model, data, _ = train_setup
    base = dict(model=str(model), data=str(data), out=str(out), steps=3, batch=4, lr=1e-3,
                warmup=1, workers=0, progress=False, plot=False, export=False, save_every=100)
    base.update(kw)
    return TrainOptions(**base)


def _cli(*args, env_extra=None, torchrun: int | None = None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                "--master_port", str(_free_port()), "-m", "molmoe"]
    else:
        cmd += ["-m", "molmoe"]
    r = subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(train_setup, out, *more):
    model, data, _ = train_setup
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--quiet", "--no-plot", *more]


def _checkpoint_tensors(directory: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model and optimizer state), read back as one dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = directory.parent / (directory.name + ".pt")
    dcp_to_torch_save(directory, flat)
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    out = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif torch.is_tensor(x):
            out[prefix] = x
        else:
            out[prefix] = torch.tensor(x) if isinstance(x, (int, float)) else x

    walk("", state)
    return out


# ----------------------------------------------------------------------------- schedule, options


def test_learning_rate_schedule():
    o = TrainOptions(model="m", data="d", out="o", steps=10, warmup=2, lr=1.0, min_lr_ratio=0.1)
    lrs = [learning_rate(s, o) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]  # linear warmup reaches the peak at its last step
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)  # cosine ends at min_lr_ratio * lr
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


@pytest.mark.parametrize("kw, words", [
    ({"batch": 0}, "batch must be a positive"),
    ({"lr": float("nan")}, "lr must be"),
    ({"freeze": ("decoder",)}, "cannot freeze 'decoder'"),
    ({"precision": "fp8"}, "precision 'fp8'"),
    ({"steps": 5, "warmup": 10}, "warmup 10 is longer than steps 5"),
    ({"batch": 4, "micro_batch": 3}, "not a multiple of micro_batch 3"),
])
def test_bad_options_are_refused(train_setup, tmp_path, kw, words):
    from molmoe.errors import MolmoeError

    with pytest.raises(MolmoeError, match=words):
        train(_opts(train_setup, tmp_path / "out", **kw))


def test_cli_error_is_one_line(train_setup, tmp_path):
    r = _cli(*_train_args(train_setup, tmp_path / "o", "--batch", "4", "--micro-batch", "3"),
             check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "molmoe train: error: each rank's share of the batch (4) is not a multiple of "
        "micro_batch 3"]


# ----------------------------------------------------------------------------- distributed


def test_two_gloo_ranks_equal_one_process(train_setup, tmp_path):
    """torchrun --nproc_per_node 2 (each rank 2 examples) against one process accumulating two
    micro-batches of 2: the same global batch, the same per-step losses and weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--steps", "3", "--batch", "4", "--no-export"]
    _cli(*_train_args(train_setup, one, *common, "--micro-batch", "2"))
    _cli(*_train_args(train_setup, two, *common), torchrun=2)
    a, b = read_log(one / "log.jsonl"), read_log(two / "log.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "lb", "z", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)
        assert ra["tokens"] == rb["tokens"] and ra["expert_load"] == rb["expert_load"]
    assert a[-1]["loss"] < a[0]["loss"]  # it trains
    ta = _checkpoint_tensors(ckpt.complete_checkpoints(one)[-1][1])
    tb = _checkpoint_tensors(ckpt.complete_checkpoints(two)[-1][1])
    assert ta.keys() == tb.keys()
    for k in ta:
        if torch.is_tensor(ta[k]) and ta[k].is_floating_point():
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- resume


def test_resume_is_bit_exact(train_setup, tmp_path):
    """3 steps + checkpoint + a new run resuming + 3 steps == 6 uninterrupted steps: every
    parameter and every optimizer state tensor, bit for bit (fp32, CPU)."""
    train(_opts(train_setup, tmp_path / "straight", steps=6))
    r1 = train(_opts(train_setup, tmp_path / "split", steps=6, stop_at=3))
    assert r1.steps == 3 and [s for s, _ in ckpt.complete_checkpoints(tmp_path / "split")] == [3]
    r2 = train(_opts(train_setup, tmp_path / "split", steps=6))
    assert r2.resumed_from == 3 and r2.steps == 6
    a = _checkpoint_tensors(ckpt.complete_checkpoints(tmp_path / "straight")[-1][1])
    b = _checkpoint_tensors(ckpt.complete_checkpoints(tmp_path / "split")[-1][1])
    assert a.keys() == b.keys() and any(".optim.state." in k for k in a)
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    la, lb = read_log(tmp_path / "straight" / "log.jsonl"), read_log(tmp_path / "split" /
                                                                    "log.jsonl")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_refuses_other_settings(train_setup, tmp_path):
    train(_opts(train_setup, tmp_path / "o", steps=2))
    with pytest.raises(ckpt.CheckpointResumeError, match="written with lr=0.001"):
        train(_opts(train_setup, tmp_path / "o", steps=4, lr=2e-3))
    train(_opts(train_setup, tmp_path / "o", steps=2, lr=2e-3, resume=False))  # explicit fresh start
    assert [r["step"] for r in read_log(tmp_path / "o" / "log.jsonl")] == [1, 2]


_KILL_DRIVER = """
import os, signal, sys
import molmoe.training.checkpoint as ckpt
where, at = sys.argv[1], int(sys.argv[2])
if where == "dcp":  # die in the middle of torch.distributed.checkpoint writing the shards
    real = ckpt.dcp.save
    def save(state, checkpoint_id):
        if checkpoint_id.endswith(f"step-{at:08d}"):
            real({"model": state["model"]}, checkpoint_id=checkpoint_id)  # half of it
            os.kill(os.getpid(), signal.SIGKILL)
        return real(state, checkpoint_id=checkpoint_id)
    ckpt.dcp.save = save
else:  # die after everything is written and synced, right before the committing rename
    real_rename = ckpt.os.rename
    def rename(src, dst):
        if str(dst).endswith(f"step-{at:08d}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst)
    ckpt.os.rename = rename
from molmoe.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["dcp", "rename"])
def test_sigkill_during_checkpoint_keeps_the_previous_one(train_setup, tmp_path, where):
    out = tmp_path / "o"
    args = _train_args(train_setup, out, "--steps", "6", "--batch", "4", "--save-every", "2",
                       "--no-export")
    # one thread in every run: CPU reductions round differently with another thread count
    r = subprocess.run([sys.executable, "-c", _KILL_DRIVER, where, "4", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    root = out / "checkpoints"
    assert (root / ".tmp-step-00000004").is_dir()  # the write it was killed in
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]
    assert len(read_log(out / "log.jsonl")) == 4  # steps 3-4 were logged, then lost
    _cli(*args)  # resumes from step 2, cleans up, finishes
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4, 6]
    assert not (root / ".tmp-step-00000004").exists()
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    # ... and equals a run never killed
    _cli(*_train_args(train_setup, tmp_path / "clean", "--steps", "6", "--batch", "4",
                      "--save-every", "2", "--no-export"))
    a = read_log(tmp_path / "clean" / "log.jsonl")
    b = read_log(out / "log.jsonl")
    assert [x["loss"] for x in a] == [x["loss"] for x in b]


# ----------------------------------------------------------------------------- parts of the model


def test_freeze_keeps_those_weights(train_setup, tmp_path):
    import molmoe

    train(_opts(train_setup, tmp_path / "o", steps=2, freeze=("vit", "connector"), export=True))
    before = molmoe.load(train_setup[0]).state_dict()
    after = molmoe.load(tmp_path / "o" / "model").state_dict()
    connector = ("vision.image_pooling_2d.", "vision.image_projector.", "vision.pad_embed")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert not any(k.startswith(("vision.image_vit.",) + connector) for k in changed)


def test_activation_checkpointing_changes_no_number(train_setup, tmp_path):
    train(_opts(train_setup, tmp_path / "ac", steps=2))
    train(_opts(train_setup, tmp_path / "noac", steps=2, activation_checkpointing=False))
    a = read_log(tmp_path / "ac" / "log.jsonl")
    b = read_log(tmp_path / "noac" / "log.jsonl")
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)


def test_bf16_mixed_precision_trains(train_setup, tmp_path):
    r = train(_opts(train_setup, tmp_path / "o", steps=3, precision="bf16"))
    log = read_log(tmp_path / "o" / "log.jsonl")
    assert all(math.isfinite(x["loss"]) for x in log) and r.steps == 3
    # master weights stay fp32 in the checkpoint
    t = _checkpoint_tensors(ckpt.complete_checkpoints(tmp_path / "o")[-1][1])
    assert all(v.dtype == torch.float32 for k, v in t.items()
               if k.startswith(".model.") and torch.is_tensor(v))


def test_log_records_and_plot(train_setup, tmp_path):
    train(_opts(train_setup, tmp_path / "o", steps=2, plot=True))
    log = read_log(tmp_path / "o" / "log.jsonl")
    rec = log[-1]
    for k in ("step", "loss", "ce", "lb", "z", "lr", "grad_norm", "tokens", "answer_tokens",
              "step_s", "tokens_per_s", "expert_load"):
        assert k in rec
    # per layer, per expert: every token of every example is routed to top_k experts
    layers, experts = len(rec["expert_load"]), len(rec["expert_load"][0])
    assert (layers, experts) == (2, 8)
    padded_tokens = sum(rec["expert_load"][0]) // 2  # top-2
    assert padded_tokens >= rec["tokens"]
    assert rec["loss"] == pytest.approx(rec["ce"] + 0.01 * rec["lb"] + 0.001 * rec["z"])
    png = tmp_path / "o" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the whole loop


def test_overfits_pointing_and_generate_answers(tmp_path):
    """16 pointing examples, one prompt for all (so the answer must come from the image): the
    loss goes to near zero, and the export answers each with its point: `molmoe generate` on two
    of them, the library's engine (the same greedy decode) on all 16."""
    import molmoe
    from molmoe.generation import Engine, GenerationConfig
    from molmoe.points import parse_points
    from molmoe.processing import Processor

    model = tiny_checkpoint(tmp_path / "ckpt", seed=3)
    data, examples = pointing_set(tmp_path / "data", 16, seed=7)
    out = tmp_path / "out"
    _cli("train", "--model", str(model), "--data", str(data), "--out", str(out),
         "--steps", "200", "--batch", "16", "--lr", "3e-3", "--warmup", "20",
         "--weight-decay", "0", "--workers", "0", "--save-every", "1000", "--quiet",
         "--no-activation-checkpointing")
    log = read_log(out / "log.jsonl")
    assert log[0]["ce"] > 3 and log[-1]["ce"] < 0.02, [round(r["ce"], 3) for r in log[::20]]
    for e in examples[:2]:
        r = _cli("generate", "--model", str(out / "model"), "--image",
                 str(data.parent / e["image"]), "--prompt", PROMPT, "--json",
                 "--max-new-tokens", "80")
        got = json.loads(r.stdout)
        assert got["answer"].strip() == e["answer"]
        assert (got["points"][0]["x_pct"], got["points"][0]["y_pct"]) == (e["x"], e["y"])
    proc = Processor.from_pretrained(out / "model")
    engine = Engine(molmoe.load(out / "model"), proc.tokenizer)
    prompts = []
    for e in examples:
        inputs = proc(PROMPT, images=str(data.parent / e["image"]))
        inputs.pop("original_size")
        prompts.append(inputs)
    results = engine.generate(prompts, GenerationConfig(max_new_tokens=80))
    points = [parse_points(r.text).points for r in results]
    right = sum(p == [(e["x"], e["y"])] for p, e in zip(points, examples))
    assert right == 16, [(p, (e["x"], e["y"])) for p, e in zip(points, examples)]


def test_cli_bad_data_is_named_or_skipped(train_setup, tmp_path):
    model, data, _ = train_setup
    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["image"] = str(data.parent / rec["image"])
    missing = dict(rec, image=str(tmp_path / "nowhere.png"))
    wrong = json.loads(json.dumps(rec))
    wrong["messages"][1]["content"] = '<point x="61" y="40.6" alt="c">c</point>'
    bad.write_text("\n".join([json.dumps(rec)] * 4 + [json.dumps(missing), json.dumps(wrong)])
                   + "\n")
    args = ["train", "--model", str(model), "--data", str(bad), "--out", str(tmp_path / "o"),
            "--steps", "1", "--warmup", "0", "--batch", "2", "--workers", "0", "--no-export",
            "--no-plot"]
    r = _cli(*args, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"molmoe train: error: {bad}:5: missing image {tmp_path / 'nowhere.png'}"]
    assert not (tmp_path / "o" / "checkpoints").exists()  # nothing was trained or written
    r = _cli(*args, "--skip-bad")
    assert "4 examples, 2 skipped (1 missing image, 1 malformed points)" in r.stdout
    assert len(read_log(tmp_path / "o" / "log.jsonl")) == 1
    r = _cli(*args[:4], str(tmp_path / "none.jsonl"), *args[5:], check=False)
    assert r.returncode == 2 and "none.jsonl" in r.stderr and "no such file" in r.stderr


def test_a_diverged_step_logs_null_not_nan(tmp_path):
    from molmoe.training.trainer import _json_safe, plot_log

    rec = {"step": 1, "loss": float("nan"), "ce": float("inf"), "lb": 0.5, "z": 1.0,
           "grad_norm": float("nan"), "tokens": 3}
    line = json.dumps(_json_safe(rec), allow_nan=False)
    assert json.loads(line) == {"step": 1, "loss": None, "ce": None, "lb": 0.5, "z": 1.0,
                                "grad_norm": None, "tokens": 3}
    ok = dict(rec, step=2, loss=1.0, ce=1.0, grad_norm=1.0)
    assert plot_log([json.loads(line), ok], tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_per_part_learning_rates(train_setup, tmp_path):
    """--vision-lr / --connector-lr: each part's groups follow the schedule at their own peak. At
    rate 0 a part keeps its weights exactly (AdamW's decay is lr x wd) while the decoder trains."""
    import molmoe
    from molmoe.training.trainer import make_optimizer, part_of

    o = _opts(train_setup, tmp_path / "o", steps=2, vision_lr=0.0, connector_lr=0.0,
              export=True)
    train(o)
    before = molmoe.load(train_setup[0]).state_dict()
    after = molmoe.load(tmp_path / "o" / "model").state_dict()
    changed = {part_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"decoder"}
    model = molmoe.load(train_setup[0])
    model.requires_grad_(True)
    opt = make_optimizer(model, _opts(train_setup, tmp_path / "x", vision_lr=2e-4,
                                      connector_lr=5e-4), torch.device("cpu"))
    scale = {part_of(n): g["lr_scale"] for g in opt.param_groups
             for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert scale == {"decoder": 1.0, "vit": pytest.approx(0.2), "connector": pytest.approx(0.5)}
    with pytest.raises(Exception, match="vision_lr must be"):
        train(_opts(train_setup, tmp_path / "y", vision_lr=-1.0))
