"""`molmoe train`: fine-tune a Molmo checkpoint on a JSONL file, on FSDP2, resumable, exported.

One process per device, launched by `torchrun` (NCCL on GPUs, gloo on the CPU); run without
torchrun it is a one-rank job of the same code. The steps of a run:

  1. The data file is scanned and validated whole (`TrainingData`), before any weight is loaded.
  2. The model is loaded from the checkpoint, its weights copied into trainable fp32 tensors
     (the loader returns frozen, possibly memory-mapped ones), the ViT and/or connector frozen on
     request, every decoder block (and ViT block) marked for activation checkpointing, then
     sharded with `fully_shard`: one FSDP unit per decoder block, per ViT block, the rest of the
     ViT, the connector, and the root (embeddings, final norm, LM head). bf16 precision is
     FSDP2's mixed precision: fp32 master weights and optimizer state, bf16 compute, fp32
     gradient reduction.
  3. AdamW (fused on CUDA, foreach on the CPU), weight decay on matrices only, linear warmup then
     cosine decay to `min_lr_ratio * lr` (`learning_rate`, a pure function of the step), global
     gradient-norm clipping. A step whose gradient norm is not finite is not applied (logged);
     three in a row stop the run with an error.
  4. Each step takes one global batch (`BucketSampler`: a pure function of seed and step); rank r
     takes its contiguous slice and runs it as `accum` micro-batches. The loss of a micro-batch is
     its summed answer-token cross-entropy divided by the GLOBAL batch's answer-token count, plus
     its router losses (lb, z; OLMoE's coefficients) divided by the number of micro-batches in
     the global batch. Gradients are summed over micro-batches and ranks (FSDP's divide factor is
     1), so any split of the same global batch over ranks and micro-batches takes the same step:
     the logged losses are the global batch's cross-entropy and the mean router losses.
  5. Every `save_every` steps and at the end, a DCP checkpoint (molmoe.training.checkpoint:
     atomic, exact resume). A run started on an output directory that holds checkpoints resumes
     from the newest complete one, after checking that it was written by the same run settings.
  6. Every step appends one line to `log.jsonl` (losses, lr, gradient norm, tokens, tokens/s,
     MFU on a GPU, and each MoE layer's expert-load histogram: the tokens routed to each expert
     in that step, summed over ranks). At the end: `model/` (a checkpoint `molmoe.load` reads
     directly, written atomically by `molmoe convert`'s writer, with the source's config and
     tokenizer files) and `training.png` (loss curves and expert load).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import shutil
import time

import torch
import torch.distributed as dist

from molmoe.errors import MolmoeError, UsageError, is_integral
from molmoe.training import checkpoint as ckpt
from molmoe.training.flops import bf16_peak_tflops, train_flops
from molmoe.training.loss import LB_COEF, Z_COEF, moe_layers, training_loss

PRECISIONS = ("fp32", "bf16")
FREEZABLE = ("vit", "connector")
LOG = "log.jsonl"
EXPORT = "model"
PLOT = "training.png"
# Settings a resumed run must share with the run that wrote the checkpoint: they decide the
# trajectory. `steps` may grow (the cosine schedule then stretches from the resumed step on).
RESUME_KEYS = ("model", "data_sha256", "batch", "seed", "lr", "vision_lr", "connector_lr",
               "min_lr_ratio", "warmup", "weight_decay", "betas", "eps", "grad_clip",
               "precision", "freeze", "lb_coef", "z_coef", "max_length", "skip_bad")


@dataclasses.dataclass
class TrainOptions:
    model: str
    data: str
    out: str
    steps: int = 100
    batch: int = 8  # global batch, in examples
    micro_batch: int | None = None  # per rank; default: batch // world (no accumulation)
    lr: float = 1e-5
    vision_lr: float | None = None  # the ViT's peak rate (default: lr); Molmo trained its parts
    connector_lr: float | None = None  # ... and the connector's at their own rates
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str | None = None  # fp32 | bf16; default bf16 on CUDA, fp32 on the CPU
    backend: str = "reference"
    freeze: tuple[str, ...] = ()
    activation_checkpointing: bool = True
    seed: int = 0
    save_every: int = 100
    keep: int = 2
    workers: int = 2
    skip_bad: bool = False
    max_length: int | None = None
    lb_coef: float = LB_COEF
    z_coef: float = Z_COEF
    device: str | None = None
    resume: bool = True
    stop_at: int | None = None  # end this invocation after this step (checkpointed), to go on later
    export: bool = True
    plot: bool = True
    progress: bool = True

    def check(self) -> None:
        for name in ("steps", "batch", "save_every", "keep"):
            v = getattr(self, name)
            if not is_integral(v) or v < 1:
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        if is_integral(self.warmup) and is_integral(self.steps) and self.warmup > self.steps:
            raise UsageError(f"warmup {self.warmup} is longer than steps {self.steps}: the rate "
                             "would never reach lr; pass a smaller --warmup")
        for name in ("warmup", "workers"):
            v = getattr(self, name)
            if not is_integral(v) or v < 0:
                raise UsageError(f"{name} must be a non-negative integer, got {v!r}")
        if self.stop_at is not None and (not is_integral(self.stop_at) or self.stop_at < 1):
            raise UsageError(f"stop_at must be a positive integer, got {self.stop_at!r}")
        if self.micro_batch is not None and (not is_integral(self.micro_batch)
                                             or self.micro_batch < 1):
            raise UsageError(f"micro_batch must be a positive integer, got {self.micro_batch!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("vision_lr", "connector_lr"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, got {v!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "grad_clip", "lb_coef", "z_coef"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"{name} must be a finite number >= 0, got {v!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UsageError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise UsageError(f"eps must be a positive number, got {self.eps!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r}: expected one of "
                             f"{', '.join(PRECISIONS)}")
        bad = [f for f in self.freeze if f not in FREEZABLE]
        if bad:
            raise UsageError(f"cannot freeze {bad[0]!r}: expected any of {', '.join(FREEZABLE)}")


@dataclasses.dataclass
class TrainResult:
    steps: int  # the step the run ended at
    resumed_from: int  # 0 for a fresh run
    last: dict  # the last step's log record (empty if no step ran)
    out: pathlib.Path
    export: pathlib.Path | None
    plot: pathlib.Path | None


def learning_rate(step: int, opts: TrainOptions) -> float:
    """The rate of 0-based `step`: linear warmup over `warmup` steps to `lr`, then cosine decay
    to `min_lr_ratio * lr` at the last step."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    span = max(1, opts.steps - opts.warmup - 1)
    progress = min(1.0, (step - opts.warmup) / span)
    floor = opts.lr * opts.min_lr_ratio
    return floor + (opts.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- distributed


@dataclasses.dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    created: bool  # we initialised the process group (and destroy it at the end)


def _setup_distributed(device: str | None) -> _Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a one-rank group of our own."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device 'cuda' requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise UsageError(f"device {device!r}: training runs on 'cpu' or 'cuda'")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    created = False
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    return _Dist(dist.get_rank(), dist.get_world_size(), dev, created)


# ----------------------------------------------------------------------------- the model


def _trainable_copy(model) -> None:
    """Replace every parameter by a trainable copy in its own memory (the loader's may be
    memory-mapped file pages, and are frozen)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:  # tied weights stay tied
                seen[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=True)
            module._parameters[name] = seen[id(p)]


def _connector_modules(model) -> list:
    v = model.vision
    return [v.image_pooling_2d, v.image_projector]


def freeze(model, parts) -> None:
    for part in parts:
        if part == "vit":
            model.vision.image_vit.requires_grad_(False)
        elif part == "connector":
            model.vision.pad_embed.requires_grad_(False)
            for m in _connector_modules(model):
                m.requires_grad_(False)


def prepare_model(model_dir, opts: TrainOptions, env: _Dist, precision: str):
    """Load, copy to trainable memory, freeze, mark for activation checkpointing, shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from molmoe.checkpoint.loader import load

    model = load(model_dir, dtype="float32", device="cpu", backend=opts.backend)
    model.autocast_dtype = None  # FSDP2's mixed precision casts instead
    _trainable_copy(model)
    model.train()
    freeze(model, opts.freeze)
    blocks = list(model.decoder.blocks) + list(model.vision.image_vit.transformer.resblocks)
    for block in blocks:
        block.checkpointed = opts.activation_checkpointing
    mesh = init_device_mesh(env.device.type, (env.world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16" else MixedPrecisionPolicy())
    for unit in blocks + [model.vision.image_vit, model.vision]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Summed, not averaged: the loss is normalised by the global batch already. As a
            # plain SUM reduction (gloo has no pre-scaled sum).
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def part_of(name: str) -> str:
    """Which part a parameter belongs to: "vit", "connector" or "decoder" (by its FQN)."""
    if name.startswith("vision.image_vit."):
        return "vit"
    if name.startswith("vision."):  # pad_embed, image_pooling_2d, image_projector
        return "connector"
    return "decoder"


def make_optimizer(model, opts: TrainOptions, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, one group per (part, decays): matrices (and stacked
    experts) decay; norms, biases, embeddings and the ViT's class/positional embeddings do not.
    Each group carries `lr_scale`, its part's peak rate over `lr` (`vision_lr`,
    `connector_lr`), which every step multiplies into the schedule."""
    peak = {"decoder": opts.lr, "vit": opts.vision_lr if opts.vision_lr is not None else opts.lr,
            "connector": opts.connector_lr if opts.connector_lr is not None else opts.lr}
    params: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = p.dim() >= 2 and "embed" not in name
            params.setdefault((part_of(name), decays), []).append(p)
    if not params:
        raise UsageError("nothing to train: every parameter is frozen")
    groups = [{"params": ps, "weight_decay": opts.weight_decay if decays else 0.0,
               "lr_scale": peak[part] / opts.lr}
              for (part, decays), ps in sorted(params.items())]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=learning_rate(0, opts), betas=tuple(opts.betas),
                             eps=opts.eps, fused=fused, foreach=None if fused else True)


def _pad_crop(inputs: dict, config) -> dict:
    """A micro-batch without images gets one all-padding crop, so that every rank runs the vision
    tower in every micro-batch when the data has images (FSDP's collectives must match across
    ranks). The crop is zeroed and places nothing: the result is unchanged."""
    ids = inputs["input_ids"]
    B, v = ids.shape[0], config.vision
    return {**inputs,
            "images": torch.full((B, 1, v.num_patches, v.patch_dim), -1.0),
            "image_masks": torch.full((B, 1, v.num_patches), -1.0),
            "image_input_idx": torch.full((B, 1, v.tokens_per_crop), -1, dtype=torch.int32),
            "crop_valid": torch.zeros((B, 1), dtype=torch.bool)}


def _check_out(out: pathlib.Path) -> None:
    """OUT is missing, or a directory holding only what `molmoe train` writes there: a run
    writes, replaces and deletes files in it (log.jsonl of a fresh run, checkpoints/, model/),
    so a directory of the user's (the model's, the data's) is refused before anything is."""
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    if not out.is_dir():
        return
    ours = {LOG, LOG + ".part", ckpt.CHECKPOINTS, EXPORT, PLOT, ".part-" + PLOT}
    for p in sorted(out.iterdir()):
        if p.name not in ours and not p.name.startswith(f".{EXPORT}."):  # convert's debris
            raise UsageError(f"--out {out} holds {p.name!r}, which molmoe train did not write; "
                             "name a new or empty directory, or the directory of a run")


def _check_export(model_dir: pathlib.Path, dst: pathlib.Path) -> None:
    """Refuse now, not after the whole run, an OUT/model that the export could not replace
    (one molmoe convert did not write, or a place convert refuses, e.g. inside the model)."""
    from molmoe.checkpoint.convert import _check_paths, _check_replaceable

    _check_replaceable(_check_paths(model_dir, dst), overwrite=True)


def _to(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _settings(opts: TrainOptions, model_dir, data_path, precision: str) -> dict:
    d = dataclasses.asdict(opts)
    d.update(model=str(model_dir.resolve()), data_sha256=_sha256(data_path), precision=precision,
             betas=list(opts.betas), freeze=sorted(opts.freeze))
    return {k: d[k] for k in RESUME_KEYS + ("steps", "backend", "data")}


def _check_resumable(meta: dict, settings: dict, where: pathlib.Path) -> None:
    for k in RESUME_KEYS:
        if meta.get("settings", {}).get(k) != settings[k]:
            raise ckpt.CheckpointResumeError(
                f"{where}: written with {k}={meta.get('settings', {}).get(k)!r}, this run has "
                f"{k}={settings[k]!r}; resuming would not continue that run (use another --out, "
                "or --no-resume to start over there)")


# ----------------------------------------------------------------------------- logging


def _truncate_log(path: pathlib.Path, after_step: int) -> None:
    """Drop records of steps past the resumed checkpoint (a killed run logged them, then lost
    them): the log then describes exactly the steps the model has taken."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= after_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    part = path.with_name(path.name + ".part")
    part.write_text("".join(line + "\n" for line in keep))
    os.replace(part, path)


def _json_safe(record: dict) -> dict:
    """NaN/Inf (a diverged step's loss or gradient norm) become null: strict JSON readers (jq,
    browsers) refuse bare NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def _num(v) -> float:
    return float("nan") if v is None else v


def read_log(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def plot_log(records: list[dict], path: pathlib.Path) -> pathlib.Path | None:
    """Loss curves and the expert load of the run, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    loads = [r["expert_load"] for r in records if r.get("expert_load")]
    fig, axes = plt.subplots(1, 3 if loads else 2, figsize=(15 if loads else 10, 4))
    ax = axes[0]
    ax.plot(steps, [_num(r["loss"]) for r in records], label="total")
    ax.plot(steps, [_num(r["ce"]) for r in records], label="answer cross-entropy")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.set_title("loss")
    ax = axes[1]
    ax.plot(steps, [_num(r["lb"]) for r in records], label="load balancing (sum over layers)")
    ax.plot(steps, [_num(r["z"]) for r in records], label="router z (sum over layers)")
    ax.set_xlabel("step"), ax.legend(), ax.set_title("router losses")
    if loads:
        total = torch.tensor(loads, dtype=torch.float64).sum(0)  # (layers, experts)
        share = total / total.sum(-1, keepdim=True).clamp(min=1)
        ax = axes[2]
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("expert"), ax.set_ylabel("layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("share of routed tokens over the run")
        fig.colorbar(im, ax=ax)
    for ax in axes:  # steps, layers and experts are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    part = path.with_name(".part-" + path.name)
    fig.savefig(part, format="png", dpi=90)
    plt.close(fig)
    os.replace(part, path)
    return path


# ----------------------------------------------------------------------------- the loop


def train(opts: TrainOptions) -> TrainResult:
    """Run (or resume) a training job; see the module docstring. Call on every rank."""
    from molmoe.checkpoint.files import resolve
    from molmoe.processing.processor import Processor
    from molmoe.training.data import BucketSampler, TrainingData, answer_tokens, loader

    opts.check()
    env = _setup_distributed(opts.device)
    try:
        precision = opts.precision or ("bf16" if env.device.type == "cuda" else "fp32")
        out = pathlib.Path(opts.out)
        model_dir = resolve(opts.model)
        data_path = pathlib.Path(opts.data)
        if not data_path.is_file():
            raise UsageError(f"--data {opts.data}: no such file")
        if opts.batch % env.world:
            raise UsageError(f"batch {opts.batch} is not divisible by the {env.world} ranks")
        micro = opts.micro_batch or opts.batch // env.world
        if (opts.batch // env.world) % micro:
            raise UsageError(f"each rank's share of the batch ({opts.batch // env.world}) is not "
                             f"a multiple of micro_batch {micro}")
        accum = opts.batch // env.world // micro
        n_micro = env.world * accum
        rank0 = env.rank == 0
        _check_out(out)  # every rank: the same answer on the shared filesystem

        torch.manual_seed(opts.seed)
        processor = Processor.from_pretrained(model_dir)
        # The data is scanned before OUT is made: bad data leaves no empty directory behind.
        data = TrainingData(data_path, processor, max_length=opts.max_length,
                            skip_bad=opts.skip_bad, workers=opts.workers)
        made = rank0 and not os.path.lexists(out)
        if rank0:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if opts.export:
            try:
                _check_export(model_dir, out / EXPORT)
            except MolmoeError:
                if made:
                    out.rmdir()  # still empty: nothing was written yet
                raise
        if rank0 and opts.progress:
            print(data.report(), flush=True)
        sampler = BucketSampler(data.lengths, opts.batch, seed=opts.seed)
        with_images = any(r.image is not None for r in data.records)

        model = prepare_model(model_dir, opts, env, precision)
        config = model.config
        optimizer = make_optimizer(model, opts, env.device)
        settings = _settings(opts, model_dir, data_path, precision)

        start = 0
        ckpt.remove_partial(out)
        found = ckpt.complete_checkpoints(out) if opts.resume else []
        if found:
            step, where = found[-1]
            _check_resumable(ckpt.read_meta(where), settings, where)
            if step > opts.steps:
                raise ckpt.CheckpointResumeError(
                    f"{where}: the run is at step {step}, past --steps {opts.steps}; pass "
                    f"--steps {step} or more to resume it (or --no-resume to start over)")
            start = ckpt.load(where, model, optimizer)["step"]
            if rank0 and opts.progress:
                print(f"resumed from {where} (step {start})", flush=True)
        log_path = out / LOG
        if rank0:
            if start:
                _truncate_log(log_path, start)
            else:  # a fresh run (--no-resume) starts a fresh log, and drops the old run's
                # checkpoints: they would outrank (and, pruned by --keep, delete) its own
                log_path.unlink(missing_ok=True)
                for _, old in ckpt.complete_checkpoints(out):
                    shutil.rmtree(old)
        dist.barrier()

        layers = moe_layers(model)
        n_experts = config.text.moe.num_experts if config.text.moe is not None else 0
        peak = (bf16_peak_tflops(torch.cuda.get_device_name(env.device))
                if env.device.type == "cuda" else None)

        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        record: dict = {}
        bad_steps = 0
        bar = None
        if rank0 and opts.progress:
            from tqdm import tqdm

            bar = tqdm(total=opts.steps, initial=start, desc="training", unit="step",
                       dynamic_ncols=True)
        # --stop-at at or before the resumed step: nothing to do, the run stays where it is
        end = max(start, min(opts.steps, opts.stop_at or opts.steps))
        batches = loader(data, sampler, rank=env.rank, world=env.world, micro_batch=micro,
                         start_step=start, steps=max(0, end - start), num_workers=opts.workers)
        t0 = time.perf_counter()
        stats = None
        for step, micro_index, inputs, loss_mask in batches:
            if micro_index == 0:
                global_tokens = answer_tokens(data, sampler.batch(step))
                # ce, lb, z, input tokens, model FLOPs, then every MoE layer's expert counts;
                # kept on the device (no host sync per micro-batch), summed over ranks per step
                stats = torch.zeros(5 + len(layers) * n_experts, dtype=torch.float64,
                                    device=env.device)
            tokens_in = int((inputs["input_ids"] != -1).sum())  # host tensor: no sync
            seq = inputs["input_ids"].shape[1]
            if with_images and "images" not in inputs:
                inputs = _pad_crop(inputs, config)
            inputs = _to(inputs, env.device)
            loss_mask = loss_mask.to(env.device, non_blocking=True)
            parts = training_loss(model, inputs, loss_mask, lb_coef=opts.lb_coef,
                                  z_coef=opts.z_coef, ce_tokens=global_tokens)
            loss = parts.ce + (opts.lb_coef * parts.lb + opts.z_coef * parts.z) / n_micro
            loss.backward()
            with torch.no_grad():
                stats[0] += parts.ce.detach().double()
                stats[1] += parts.lb.detach().double() / n_micro
                stats[2] += parts.z.detach().double() / n_micro
                stats[3] += tokens_in
                stats[4] += tokens_in * train_flops(config, 1, seq)["per_token"]
                for i, layer in enumerate(layers):
                    stats[5 + i * n_experts: 5 + (i + 1) * n_experts] += layer.aux["counts"]
                    layer.aux = None
            if micro_index < accum - 1:
                continue

            dist.all_reduce(stats)
            norm = torch.nn.utils.clip_grad_norm_(trainable, opts.grad_clip or float("inf"))
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            lr = learning_rate(step, opts)
            applied = math.isfinite(norm)
            if applied:
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                optimizer.step()
                bad_steps = 0
            else:
                bad_steps += 1
            optimizer.zero_grad(set_to_none=True)
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            now = time.perf_counter()
            step_s, t0 = now - t0, now
            stats = stats.cpu()
            tokens = int(stats[3])
            ce, lb, z = float(stats[0]), float(stats[1]), float(stats[2])
            record = {"step": step + 1, "loss": ce + opts.lb_coef * lb + opts.z_coef * z,
                      "ce": ce, "lb": lb, "z": z, "lr": lr, "grad_norm": norm,
                      "applied": applied, "tokens": tokens, "answer_tokens": global_tokens,
                      "step_s": step_s, "tokens_per_s": tokens / step_s}
            if peak:  # model FLOPs of the real (unpadded) tokens, all ranks, against all GPUs
                record["mfu"] = float(stats[4]) / step_s / (peak * 1e12 * env.world)
            if layers:
                record["expert_load"] = stats[5:].view(len(layers), n_experts).long().tolist()
            if rank0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
                if bar is not None:
                    post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{tokens / step_s:,.0f}"}
                    if "mfu" in record:
                        post["mfu"] = f"{record['mfu']:.1%}"
                    bar.set_postfix(post)
                    bar.update()
            if bad_steps >= 3:
                raise UsageError(f"step {step + 1}: the gradient norm was not finite for 3 steps "
                                 "in a row (the loss diverged): lower --lr, or use fp32")
            done = step + 1
            if done % opts.save_every == 0 or done == end:
                ckpt.save(out, done, model, optimizer, {"settings": settings},
                          keep=opts.keep)
        if bar is not None:
            bar.close()

        export = plot = None
        finished = end == opts.steps
        if opts.export and finished:
            export = _export(model, model_dir, out / EXPORT, rank0)
        if rank0 and opts.plot and log_path.exists():
            plot = plot_log(read_log(log_path), out / PLOT)
        dist.barrier()
        return TrainResult(end, start, record, out, export, plot)
    finally:
        if env.created:
            dist.destroy_process_group()


def _export(model, model_dir, dst: pathlib.Path, rank0: bool) -> pathlib.Path:
    """The trained weights, gathered on rank 0, as a checkpoint `molmoe.load` reads (fp32
    safetensors with the source's config and tokenizer files; replaced atomically)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from molmoe.checkpoint.convert import convert

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if rank0:
        convert(model_dir, dst, dtype="float32", overwrite=True, state=full)
    dist.barrier()
    return dst
