"""`molmoe profile train`: what one training step costs, per backend, in one run.

A training step is what a trainer does per batch: `optimizer.zero_grad()`, the training
objective's forward (`molmoe.training.training_loss`: answer-token cross-entropy plus the router
load-balancing and z losses), its backward, and one `torch.optim.AdamW` step (fused where this
torch has a fused kernel for the device). For each backend (`reference`, `triton`, or `both`,
the same weights and the same batch) the report gives:

  * step time p10 / p50 / p90 (host clock, the device synchronised before and after each step;
    warm-up steps excluded), tokens/s = batch * seq_len / p50 step time;
  * model FLOPs per step, achieved TFLOP/s and, on a GPU whose bf16 dense peak is known, MFU;
  * peak memory (CUDA: max_memory_allocated; CPU: the process RSS high-water mark, said so);
  * the loss of the first step, on the initial weights, so that backends can be compared (they
    must agree within a tolerance; the relative difference is reported), and the last step's;
  * how many trainable tensors the optimizer changed (every one should);
  * a torch.profiler top-ops table and a chrome trace of `profile_steps` more steps;
  * one MoE layer alone, forward + backward at the batch's token count, for each backend and,
    where `megablocks` imports and a GPU is there, megablocks' dMoE holding the same weights.

Model FLOPs: `molmoe.training.flops` (the PaLM / Megatron accounting, shared with `molmoe train`).

Only the text decoder is counted: with `with_image`, the ViT and connector run (and are timed)
but their FLOPs are not in the figure, so MFU is then an underestimate (the report says so).

Legend: B batch rows, S sequence length, D model width, E experts, F expert width, L layers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys

import torch

from molmoe.errors import UsageError
from molmoe.training.flops import (BF16_PEAK_TFLOPS, active_matmul_params,  # noqa: F401
                                   bf16_peak_tflops, train_flops)
from molmoe.profiling import (_profile, _reset_peak, _sync, _timed, build_model, environment,
                              peak_memory, summarize)

TRAIN_BACKENDS = ("reference", "triton", "both")
TRAIN_DTYPES = ("float32", "amp_bf16", "bfloat16")

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the device name; the
# first match wins, so the more specific names come first.

# First-step loss agreement between backends (relative): fp32 kernels use IEEE dot products,
# so only summation order differs; bf16 compute rounds every activation.
LOSS_RTOL = {"float32": 1e-4, "amp_bf16": 2e-2, "bfloat16": 3e-2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainProfileOptions:
    model: str  # checkpoint directory / hub id, or a preset name (random weights)
    layers: int | None = None  # keep the first N decoder layers
    d_model: int | None = None  # preset only
    expert_hidden: int | None = None  # preset only
    batch: int = 1
    seq_len: int = 512
    backend: str = "reference"
    dtype: str = "float32"
    device: str | None = None
    steps: int = 5  # timed steps
    warmup: int = 1
    seed: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.1
    out: str | None = None
    top_ops: int = 15
    profile_steps: int = 1
    with_image: bool = False  # the demo image through the processor: ViT + connector backward
    moe_layer: bool = True  # also time one MoE layer alone (and megablocks where importable)
    plot: bool = False
    command: str | None = None

    def validate(self) -> None:
        for name in ("batch", "seq_len", "steps", "top_ops", "profile_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2 (a token and its successor), got "
                             f"{self.seq_len}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be at least 0, got {self.warmup}")
        if self.layers is not None and self.layers < 1:
            raise UsageError(f"--layers must be at least 1, got {self.layers}")
        for name in ("d_model", "expert_hidden"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.backend not in TRAIN_BACKENDS:
            raise UsageError(f"--backend {self.backend!r}: one of {', '.join(TRAIN_BACKENDS)}")
        if self.dtype not in TRAIN_DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: one of {', '.join(TRAIN_DTYPES)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive finite number, got {self.lr}")


# ----------------------------------------------------------------------------- batch


def make_train_batch(model, processor, opts: TrainProfileOptions,
                     device) -> tuple[dict, torch.Tensor, dict]:
    """(inputs, loss_mask_BS, description). Text only: random token ids (the text vocabulary,
    seeded), every position a target. With the image: the demo image and a short prompt through
    the processor, then random answer tokens up to seq_len; only those are targets."""
    t = model.config.text
    gen = torch.Generator(device="cpu").manual_seed(opts.seed + 1)
    B, S = opts.batch, opts.seq_len
    if not opts.with_image:
        ids = torch.randint(0, t.vocab_size, (B, S), generator=gen)
        mask = ids >= 0  # no padding here: all positions
        return ({"input_ids": ids.to(device)}, mask.to(device),
                {"tokens": S, "image_features": 0, "answer_tokens": S - 1, "crops": 0})
    from molmoe.processing import load_image
    from molmoe.profiling import DEMO_IMAGE

    pixels = load_image(DEMO_IMAGE, max_pixels=processor.max_pixels, compat=processor.compat)[0]
    inputs = processor("Describe this image.", images=pixels)
    prompt = inputs["input_ids"]
    if S <= prompt.numel():
        raise UsageError(f"--seq-len {S}: the image prompt alone takes {prompt.numel()} tokens; "
                         f"give a longer --seq-len")
    answer = torch.randint(0, t.vocab_size, (S - prompt.numel(),), generator=gen,
                           dtype=prompt.dtype)
    ids = torch.cat([prompt, answer])
    mask = torch.zeros(S, dtype=torch.bool)
    mask[prompt.numel():] = True
    batch = {"input_ids": ids.expand(B, S).clone()}
    for k in ("images", "image_masks", "image_input_idx"):
        if k in inputs:
            batch[k] = inputs[k][None].expand(B, *inputs[k].shape).clone()
    n_image = int((inputs["image_input_idx"] >= 0).sum())
    return ({k: v.to(device) for k, v in batch.items()}, mask.expand(B, S).clone().to(device),
            {"tokens": S, "image_features": n_image, "answer_tokens": S - prompt.numel(),
             "crops": int(inputs["images"].shape[0])})


# ----------------------------------------------------------------------------- the step


def trainable_parameters(model, with_vision: bool) -> list[torch.nn.Parameter]:
    """Unfreeze (the loader and build_model return frozen weights) and return what trains: the
    whole model with the image, else the decoder (the vision tower may be unallocated)."""
    part = model if with_vision else model.decoder
    model.train()
    part.requires_grad_(True)
    return [p for p in part.parameters() if p.requires_grad]


def make_optimizer(params, opts: TrainProfileOptions, device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, fused where this torch has the fused kernel for the device and dtype."""
    kw = {"lr": opts.lr, "weight_decay": opts.weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kw), "AdamW(fused=True)"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=device.type == "cuda", **kw), \
            "AdamW(fused unavailable here)"


class TrainStep:
    """zero_grad + training_loss forward + backward + optimizer step, on fixed inputs."""

    def __init__(self, model, params, inputs, mask, opts: TrainProfileOptions, device):
        self.model, self.params, self.inputs, self.mask = model, params, inputs, mask
        self.opt, self.optimizer_name = make_optimizer(params, opts, device)

    def __call__(self):
        from molmoe.training import training_loss

        self.opt.zero_grad(set_to_none=True)
        out = training_loss(self.model, self.inputs, self.mask)
        out.total.backward()
        self.opt.step()
        return out


def _loss_dict(out) -> dict:
    """TrainingLoss.as_dict without reading tensors that require grad (no autograd warning)."""
    return {"loss": float(out.total.detach()), "ce": float(out.ce.detach()),
            "lb": float(out.lb.detach()), "z": float(out.z.detach()), "tokens": out.tokens}


def _fingerprint(params) -> list[torch.Tensor]:
    """A strided sample (<= 4096 values) of each tensor, to tell which ones a step changed."""
    return [p.detach().flatten()[::max(1, p.numel() // 4096)].clone() for p in params]


# ----------------------------------------------------------------------------- one MoE layer


def _moe_layer_timing(model, backends: list[str], opts: TrainProfileOptions, device) -> dict:
    """One MoE layer's forward + backward at B*S tokens, ours per backend, megablocks if there."""
    from molmoe.training import moe_layers

    layers = moe_layers(model)
    if not layers:
        return {"skipped": "dense model: no MoE layer"}
    layer = layers[0]
    T, D = opts.batch * opts.seq_len, model.config.text.d_model
    gen = torch.Generator(device="cpu").manual_seed(opts.seed + 2)
    dt = model.autocast_dtype or layer.w_gate.dtype
    x = torch.randn(T, D, generator=gen).to(device, dt).requires_grad_(True)
    gy = torch.randn(T, D, generator=gen).to(device, dt)
    amp = model.autocast_dtype

    def run(fn, params):
        def once():  # as in a step: fresh gradients (set_to_none), none accumulated
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                y = fn(x)
            y.backward(gy)
            x.grad = None
            for p in params:
                p.grad = None
        times = []
        for i in range(opts.steps + 1):
            times.append(_timed(once, device)[1])
        return summarize(times[1:])

    res = {"tokens": T, "layer": 0, "what": "forward + backward of decoder layer 0's MoE FFN "
           "(router, experts, combine; ours also computes the router losses)", "ours": {}}
    for backend in backends:
        model.set_backend(backend)
        res["ours"][backend] = run(lambda x_: layer(x_[None])[0], list(layer.parameters()))
    try:
        import megablocks  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not importable"
        res["megablocks"] = {"skipped": f"megablocks not importable: {type(e).__name__}: {e}"}
        return res
    if device.type != "cuda":
        res["megablocks"] = {"skipped": "megablocks imports, but its dMoE needs CUDA"}
        return res
    try:
        from bench.moe_baselines import megablocks_dmoe

        with torch.no_grad():
            w = [t.detach().to(dt) for t in (layer.router.weight, layer.w_gate, layer.w_up,
                                              layer.w_down)]
        mb_layer, mb_fn = megablocks_dmoe(*w, layer.top_k)
        del w
        res["megablocks"] = {"ms": run(mb_fn, list(mb_layer.parameters())),
                             "what": "megablocks.layers.dmoe.dMoE (GLU, grouped), copies of "
                                     "layer 0's weights, no load-balancing loss"}
        for backend, ours in res["ours"].items():
            res["megablocks"][f"ratio_to_{backend}"] = (res["megablocks"]["ms"]["p50_ms"]
                                                        / ours["p50_ms"])
        del mb_layer
    except Exception as e:  # noqa: BLE001 - a baseline that fails is left out, with the reason
        res["megablocks"] = {"skipped": f"megablocks dMoE failed: {type(e).__name__}: {e}"}
    return res


# ----------------------------------------------------------------------------- the run


def _backends_for(opts: TrainProfileOptions, device) -> tuple[list[str], list[str]]:
    """(backends to run, notes). Triton on a CPU would time the interpreter: refused."""
    from molmoe.backends import select_backend

    if device.type != "cuda":
        if opts.backend == "triton":
            raise UsageError("--backend triton needs a CUDA device: on a CPU the Triton kernels "
                             "run only in the interpreter, which is not a speed; use --backend "
                             "reference (or both, which profiles the reference here)")
        notes = []
        if opts.backend == "both":
            notes.append("backend both on a CPU: only the reference backend is profiled; the "
                         "Triton figures (and the loss comparison) need a GPU")
        return ["reference"], notes
    backends = ["reference", "triton"] if opts.backend == "both" else [opts.backend]
    for b in backends:
        select_backend(b, device)
    notes = []
    if "triton" in backends:
        notes.append("Triton MoE and attention kernels ran their default tiles (no autotune "
                     "here; pin others with MOLMOE_MOE_CONFIG / MOLMOE_ATTENTION_*_CONFIG)")
    return backends, notes


def profile_train(opts: TrainProfileOptions) -> dict:
    """Run everything the module docstring lists; the report (also written to opts.out)."""
    from molmoe.backends import resolve_device

    opts.validate()
    device = resolve_device(opts.device)
    backends, notes = _backends_for(opts, device)
    torch.manual_seed(opts.seed)
    out_dir = None
    if opts.out is not None:
        out_dir = pathlib.Path(opts.out)
        out_dir.mkdir(parents=True, exist_ok=True)
    print("profile train: building the model", file=sys.stderr, flush=True)
    model, processor, what = build_model(opts, device, need_vision=opts.with_image)
    inputs, mask, batch_what = make_train_batch(model, processor, opts, device)
    params = trainable_parameters(model, opts.with_image)
    t = model.config.text
    flops = train_flops(model.config, opts.batch, opts.seq_len)
    env = environment(device)
    peak = bf16_peak_tflops(env["device"]) if device.type == "cuda" else None
    report = {"command": opts.command, "options": dataclasses.asdict(opts), "environment": env,
              "model": what,
              "config": {"name": model.config.name, "n_layers": t.n_layers, "d_model": t.d_model,
                         "n_heads": t.n_heads, "n_kv_heads": t.n_kv_heads,
                         "experts": None if t.moe is None else
                         {"num": t.moe.num_experts, "top_k": t.moe.top_k,
                          "hidden": t.moe.expert_hidden}},
              "dtype": opts.dtype, "batch": opts.batch, "seq_len": opts.seq_len,
              "inputs": batch_what, "trainable_params": sum(p.numel() for p in params),
              "trainable_tensors": len(params), "flops": flops, "peak_bf16_tflops": peak,
              "implementations": [], "notes": notes, "needs_gpu": []}
    if device.type != "cuda":
        report["needs_gpu"] = [
            "the Triton backend's step time (the CPU interpreter is not a speed)",
            "MFU (against a GPU's bf16 dense peak)",
            "megablocks' dMoE (CUDA only)",
            "peak device memory (the CPU reports the process RSS high-water mark)"]
    elif peak is None:
        notes.append(f"MFU omitted: no known bf16 dense peak for {env['device']!r}")
    if opts.with_image:
        notes.append("FLOPs and MFU count the text decoder only; the ViT and connector run and "
                     "are timed, so MFU is an underestimate")
    # backends after the first start from the same weights (a copy kept on the CPU)
    initial = [p.detach().to("cpu", copy=True) for p in params] if len(backends) > 1 else None
    for i, backend in enumerate(backends):
        print(f"profile train: {backend}", file=sys.stderr, flush=True)
        if i and initial is not None:
            with torch.no_grad():
                for p, p0 in zip(params, initial):
                    p.copy_(p0)
        model.set_backend(backend)
        report["implementations"].append(
            _run_backend(model, params, inputs, mask, opts, device, flops, peak, out_dir))
    del initial
    if opts.moe_layer:
        print("profile train: one MoE layer (and megablocks)", file=sys.stderr, flush=True)
        report["moe_layer"] = _moe_layer_timing(model, backends, opts, device)
    report["comparison"] = compare(report["implementations"], opts.dtype)
    report["environment"]["loadavg_end"] = os.getloadavg()
    if out_dir is not None:
        report["files"] = {"json": str(out_dir / "profile_train.json")}
        if opts.plot:
            report["files"]["png"] = str(out_dir / "profile_train.png")
            plot_train(report, out_dir / "profile_train.png")
        (out_dir / "profile_train.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _run_backend(model, params, inputs, mask, opts, device, flops, peak, out_dir) -> dict:
    name = f"molmoe-{model.backend.value}"
    for p in params:
        p.grad = None
    _reset_peak(device)
    step = TrainStep(model, params, inputs, mask, opts, device)
    before = _fingerprint(params)
    res = {"name": name, "backend": model.backend.value, "optimizer": step.optimizer_name}
    samples, first, last = [], None, None
    for i in range(opts.warmup + opts.steps):
        out, ms = _timed(step, device)
        if i == 0:
            first = _loss_dict(out)
        if i >= opts.warmup:
            samples.append(ms)
        last = out
    res["loss_first_step"] = first
    res["loss_last_step"] = _loss_dict(last)
    res["peak_memory"] = peak_memory(device)
    after = _fingerprint(params)
    res["params_changed"] = {"tensors": sum(not torch.equal(a, b) for a, b in zip(before, after)),
                             "of": len(params)}
    res["step_ms"] = summarize(samples)
    res["step_samples_ms"] = samples
    s = res["step_ms"]["p50_ms"] * 1e-3
    res["tokens_per_s"] = flops["tokens"] / s
    res["tflops"] = flops["per_step"] / s / 1e12
    res["mfu"] = None if peak is None else res["tflops"] / peak
    trace = None if out_dir is None else out_dir / f"trace-train-{name}.json"
    res["profile"] = _profile(lambda: [step() for _ in range(opts.profile_steps)], device, trace,
                              opts.top_ops)
    for p in params:  # the optimizer's state goes with `step` when this returns
        p.grad = None
    _sync(device)
    return res


def compare(impls: list[dict], dtype: str) -> dict | None:
    """Triton against the reference: first-step loss agreement and speed ratios (None unless
    both ran)."""
    by = {r["backend"]: r for r in impls}
    if "reference" not in by or "triton" not in by:
        return None
    ref, tri = by["reference"], by["triton"]
    a, b = tri["loss_first_step"]["loss"], ref["loss_first_step"]["loss"]
    rel = abs(a - b) / max(abs(b), 1e-12)
    tol = LOSS_RTOL.get(dtype, 3e-2)
    return {"loss_reference": b, "loss_triton": a, "loss_rel_diff": rel, "loss_rtol": tol,
            "loss_agree": bool(rel <= tol),
            "step_ms_triton_over_reference": tri["step_ms"]["p50_ms"] / ref["step_ms"]["p50_ms"],
            "tokens_per_s_triton_over_reference": tri["tokens_per_s"] / ref["tokens_per_s"]}


# ----------------------------------------------------------------------------- output


def format_train_report(report: dict) -> str:
    env, f = report["environment"], report["flops"]
    lines = [(f"molmoe profile train  {env['date']}  commit {env['commit']}  load average "
              f"{env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}"),
             f"device {env['device']}  torch {env['torch']}",
             f"model  {report['model']}  dtype {report['dtype']}",
             (f"batch {report['batch']} x seq_len {report['seq_len']} = {f['tokens']} "
              f"tokens/step  ({report['inputs']['image_features']} image features, "
              f"{report['inputs']['answer_tokens']} target tokens per row)  trainable "
              f"{report['trainable_params'] / 1e6:.2f}M params"),
             (f"model FLOPs/step {f['per_step'] / 1e9:.2f} G = (6 x "
              f"{f['active_params'] / 1e6:.2f}M active params + "
              f"{f['per_token_attention'] / 1e6:.2f}M attention) per token x {f['tokens']} "
              f"tokens"), ""]
    mfu_col = report["peak_bf16_tflops"] is not None
    lines.append(f"training step (zero_grad + forward + backward + AdamW), p50 over "
                 f"{report['options']['steps']} steps after {report['options']['warmup']} "
                 f"warm-up")
    lines.append(f"  {'':20} {'p10 ms':>9} {'p50 ms':>9} {'p90 ms':>9} {'tok/s':>9} "
                 f"{'TFLOP/s':>8}" + (f" {'MFU':>6}" if mfu_col else "") +
                 f" {'peak MiB':>9} {'loss@1':>9} {'changed':>9}")
    for r in report["implementations"]:
        s = r["step_ms"]
        lines.append(f"  {r['name']:20} {s['p10_ms']:9.1f} {s['p50_ms']:9.1f} {s['p90_ms']:9.1f} "
                     f"{r['tokens_per_s']:9.1f} {r['tflops']:8.3f}"
                     + (f" {r['mfu']:6.1%}" if mfu_col else "")
                     + f" {r['peak_memory']['bytes'] / 2**20:9.0f} "
                     f"{r['loss_first_step']['loss']:9.4f} "
                     f"{r['params_changed']['tensors']:>4}/{r['params_changed']['of']:<4}")
    for r in report["implementations"]:
        lines.append(f"  {r['name']}: peak memory is the {r['peak_memory']['what']}; "
                     f"{r['optimizer']}; loss first {r['loss_first_step']['loss']:.4f} "
                     f"(ce {r['loss_first_step']['ce']:.4f}, lb {r['loss_first_step']['lb']:.4f},"
                     f" z {r['loss_first_step']['z']:.4f}), last "
                     f"{r['loss_last_step']['loss']:.4f}")
    c = report.get("comparison")
    if c:
        lines.append("")
        lines.append(f"triton / reference (same weights, same batch): step time "
                     f"{c['step_ms_triton_over_reference']:.3f}, tokens/s "
                     f"{c['tokens_per_s_triton_over_reference']:.3f}; first-step loss "
                     f"{c['loss_triton']:.6f} vs {c['loss_reference']:.6f}, relative difference "
                     f"{c['loss_rel_diff']:.2e} ({'within' if c['loss_agree'] else 'OUTSIDE'} "
                     f"{c['loss_rtol']:.0e})")
    m = report.get("moe_layer")
    if m:
        lines.append("")
        if "skipped" in m:
            lines.append(f"one MoE layer: skipped ({m['skipped']})")
        else:
            lines.append(f"one MoE layer, forward + backward, {m['tokens']} tokens (p50 ms):")
            for backend, s in m["ours"].items():
                lines.append(f"  molmoe-{backend:13} {s['p50_ms']:9.2f}  (p10 {s['p10_ms']:.2f}, "
                             f"p90 {s['p90_ms']:.2f})")
            mb = m["megablocks"]
            if "skipped" in mb:
                lines.append(f"  megablocks: {mb['skipped']}")
            else:
                ratios = ", ".join(f"{k.replace('ratio_to_', '/ ')} {v:.3f}"
                                   for k, v in mb.items() if k.startswith("ratio_to_"))
                lines.append(f"  megablocks dMoE    {mb['ms']['p50_ms']:9.2f}  ({ratios})")
    for r in report["implementations"]:
        p = r["profile"]
        col = "self_device_ms" if p["sorted_by"] == "self_device_time_total" else "self_cpu_ms"
        lines.append("")
        lines.append(f"top ops: {r['name']}, {report['options']['profile_steps']} step(s) (by "
                     f"{col}, total {p['total_self_ms']:.1f} ms)"
                     + (f"  trace {p['trace']}" if p["trace"] else ""))
        for row in p["rows"]:
            lines.append(f"  {row[col]:9.2f} ms  {row['count']:6d}x  {row['name']}")
    if report["notes"]:
        lines.append("")
        lines += [f"note: {n}" for n in report["notes"]]
    if report["needs_gpu"]:
        lines.append("")
        lines.append("needs a GPU (not reported here; these CPU figures are not the GPU goal):")
        lines += [f"  - {x}" for x in report["needs_gpu"]]
    if report.get("files"):
        lines.append("")
        lines.append("wrote " + ", ".join(report["files"].values()))
    return "\n".join(lines)


def plot_train(report: dict, path: pathlib.Path) -> None:
    """Step-time distributions per backend and tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = report["implementations"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.boxplot([r["step_samples_ms"] for r in impls], whis=(10, 90))
    a1.set_xticks(range(1, len(impls) + 1), [r["name"] for r in impls], fontsize=8)
    a1.set_ylabel("ms per training step (p10-p90 whiskers)")
    a2.bar([r["name"] for r in impls], [r["tokens_per_s"] for r in impls])
    a2.set_ylabel("tokens/s (p50 step)")
    a2.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{report['config']['name']} ({report['config']['n_layers']} layers, "
                 f"{report['dtype']}, {report['batch']}x{report['seq_len']}) on "
                 f"{report['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
