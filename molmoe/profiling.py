"""`molmoe profile decode`: where the time of one answer goes, against Hugging Face transformers.

One run measures, for each implementation side by side (the reference backend; the Triton backend
where a GPU is there; with `compare="transformers"` the text decoder in transformers'
`OlmoeForCausalLM` / `Qwen2ForCausalLM` / `Olmo2ForCausalLM` holding the SAME weight tensors):

  * time to first token, split into preprocessing (the processor on image + prompt), vision (the
    ViT), connector (pad embeddings, 2x2 attention pooling, projector) and prefill (the decoder);
  * per-token decode latency (p10/p50/p90, spread), tokens/s, peak memory;
  * the aten ops one decoded token dispatches and how many of them synchronise with the host
  (`count_ops`, `SYNC_OPS`), for our step and for transformers' cached forward;
  * on a GPU, the bytes a decode step must read (weights actually read: for a MoE only the
    experts the batch routed to, from the routing of the real run; plus the K/V the attention
    reads) and their fraction of the device's copy bandwidth, measured in the same run;
  * a torch.profiler top-ops table per implementation and a chrome trace.

Weights are a checkpoint's, or a preset's with random values (`--model molmoe-1b --layers 2`): the
speed of a decoder does not depend on its weight values, and the comparison holds the same tensors
on both sides. Timing: the host clock around each call, the device synchronised before reading it;
ours and transformers' per-token latency both include the greedy argmax of the logits.

Legend: B batch rows, S prompt tokens, D model width, V vocabulary rows.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import inspect
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from molmoe.errors import UsageError

# ----------------------------------------------------------------------------- op counting

# aten ops that read a device tensor on the host (a sync on CUDA) or whose output shape depends
# on tensor values (which needs such a read).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique",
    "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "repeat_interleave",
    "is_nonzero", "equal", "_assert_async", "allclose", "tolist"})


class OpCounter(TorchDispatchMode):
    """Every aten op dispatched inside the block. A custom op whose body is plain PyTorch
    (`molmoe.ops.TRANSPARENT_OPS`: the reference MoE's grouped experts) is counted by the
    ops its body dispatches, not as one; a Triton kernel's custom op counts as one (a launch)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from molmoe.ops import TRANSPARENT_OPS

        body = TRANSPARENT_OPS.get(f"{func.namespace}::{func._opname}")
        if body is not None:
            with self:  # the mode is off inside its own dispatch: count the body's ops too
                return body(*args, **(kwargs or {}))
        self.ops.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def syncs(self) -> list[str]:
        return [op for op in self.ops if op in SYNC_OPS]


def count_ops(fn: Callable, *args, **kwargs) -> collections.Counter:
    """aten op name -> how many times `fn(*args, **kwargs)` dispatched it."""
    with OpCounter() as counter:
        fn(*args, **kwargs)
    return collections.Counter(counter.ops)


def sync_count(ops: collections.Counter) -> int:
    return sum(n for op, n in ops.items() if op in SYNC_OPS)


# ----------------------------------------------------------------------------- options

BACKENDS = ("reference", "triton", "both")
MODES = ("eager", "compile", "graph")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    model: str  # checkpoint directory / hub id, or a preset name (random weights)
    layers: int | None = None  # keep the first N decoder layers
    d_model: int | None = None  # preset only: another width (heads kept; op counts at shape)
    expert_hidden: int | None = None  # preset only: another expert / FFN width
    image: str | None = "demo"  # "demo" (molmoe/assets/demo.png), a file, or None
    prompt: str = "Describe this image."
    batch: int = 1
    prompt_tokens: int | None = None  # pad the prompt with filler text to this many tokens
    new_tokens: int = 32
    backend: str = "reference"
    compare: str | None = None  # "transformers"
    dtype: str = "float32"
    device: str | None = None
    mode: str = "eager"
    out: str | None = None
    repeats: int = 3
    seed: int = 0
    top_ops: int = 15
    profile_steps: int = 4
    check_tokens: int = 8
    command: str | None = None

    def validate(self) -> None:
        for name in ("batch", "new_tokens", "repeats", "top_ops", "profile_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if self.layers is not None and self.layers < 1:
            raise UsageError(f"--layers must be at least 1, got {self.layers}")
        if self.new_tokens < 2:
            raise UsageError("--new-tokens must be at least 2 (the first comes from the prefill)")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r}: one of {', '.join(BACKENDS)}")
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.compare not in (None, "transformers"):
            raise UsageError(f"--compare {self.compare!r}: only 'transformers' is supported")


# ----------------------------------------------------------------------------- small helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device: torch.device):
    """(result, milliseconds) of fn(), the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def summarize(samples_ms: list[float]) -> dict:
    """p10/p50/p90, mean, min/max and spread (p90 - p10) of a list of times in ms."""
    s = sorted(samples_ms)
    if len(s) == 1:
        q = [s[0]] * 9
    else:
        q = statistics.quantiles(s, n=10, method="inclusive")
    return {"n": len(s), "p10_ms": q[0], "p50_ms": statistics.median(s), "p90_ms": q[8],
            "mean_ms": statistics.fmean(s), "min_ms": s[0], "max_ms": s[-1],
            "spread_ms": q[8] - q[0]}


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL,
                                       cwd=pathlib.Path(__file__).resolve().parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
               f"{torch.get_num_threads()} torch threads)"
    env = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
           "device": name, "device_type": device.type, "torch": torch.__version__,
           "python": platform.python_version(), "loadavg_start": os.getloadavg()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device),
                "what": "torch.cuda.max_memory_allocated since this implementation started"}
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"bytes": kb * 1024,
            "what": "process RSS high-water mark (getrusage ru_maxrss): the whole process so "
                    "far, every implementation before this one included, not this one alone"}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


# ----------------------------------------------------------------------------- the model


def _demo_processor(config, compat="molmoe"):
    """A processor for preset models with random weights: the demo checkpoint's byte-level
    tokenizer (MolmoE's special tokens, ids < 263) and the released image settings."""
    from tokenizers import Tokenizer as HFTokenizer

    from molmoe.demo import build_tokenizer_json
    from molmoe.processing import Processor
    from molmoe.processing.tokenizer import Tokenizer

    tok = Tokenizer(HFTokenizer.from_str(build_tokenizer_json()), eos_token="<|endoftext|>",
                    pad_token="<|padding|>", source="<demo tokenizer>")
    return Processor(tok, max_positions=config.text.max_position_embeddings, compat=compat)


def _cut_layers(model, n: int) -> None:
    t = model.config.text
    if n > t.n_layers:
        raise UsageError(f"--layers {n}: the model has {t.n_layers} decoder layers")
    model.decoder.blocks = model.decoder.blocks[:n]
    text = dataclasses.replace(t, n_layers=n)
    model.config = model.config.replace(text=text)
    model.decoder.cfg = text
    for block in model.decoder.blocks:
        block.attn.cfg = text


def _init_random(module, seed: int, std: float = 0.02) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_ln.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias") or name.endswith("_ln.bias"):
                p.zero_()
            else:
                # normal_ with a CPU generator on CPU, chunked so that no large temporary exists
                flat = p.view(-1)
                for i in range(0, flat.numel(), 1 << 24):
                    part = flat[i:i + (1 << 24)]
                    part.copy_(torch.randn(part.shape, generator=gen) * std)


def build_model(opts: ProfileOptions, device: torch.device, need_vision: bool):
    """(model, processor, description) on `device`: a checkpoint's, or a preset's with random
    weights (the vision tower is left unallocated on `meta` when no image is used). Frozen, in
    eval mode. Reads opts.model, layers, d_model, expert_hidden, dtype and seed only, so
    `molmoe.profiling_train.TrainProfileOptions` serves too."""
    from molmoe.checkpoint.loader import PRECISIONS, parse_precision
    from molmoe.config import PRESETS, preset

    weights_dtype, autocast_dtype = PRECISIONS[parse_precision(opts.dtype)]
    if opts.model in PRESETS:
        from molmoe.model import Molmo

        config = preset(opts.model)
        t = config.text
        changes = {}
        if opts.layers is not None:
            if opts.layers > t.n_layers:
                raise UsageError(f"--layers {opts.layers}: the preset {opts.model} has "
                                 f"{t.n_layers} decoder layers")
            changes["n_layers"] = opts.layers
        if opts.d_model is not None:
            changes["d_model"] = opts.d_model
        if opts.expert_hidden is not None:
            if t.moe is not None:
                changes["moe"] = dataclasses.replace(t.moe, expert_hidden=opts.expert_hidden)
            changes["ffn_hidden"] = opts.expert_hidden
        if changes:
            config = config.replace(text=dataclasses.replace(t, **changes))
            if opts.d_model is not None:
                config = config.replace(projector_hidden=config.text.ffn_hidden)
        with torch.device("meta"):
            model = Molmo(config)
        parts = [model] if need_vision else [model.decoder]
        for part in parts:
            part.to_empty(device=device)
            _init_random(part, opts.seed)
            part.to(weights_dtype)
        model.autocast_dtype = autocast_dtype
        model.eval().requires_grad_(False)
        processor = _demo_processor(config)
        what = (f"preset {opts.model} with RANDOM weights (std 0.02), "
                f"{config.text.n_layers} decoder layers, d_model {config.text.d_model}")
        if not need_vision:
            what += "; vision tower not allocated (no image)"
        return model, processor, what
    if opts.d_model is not None or opts.expert_hidden is not None:
        raise UsageError("--d-model / --expert-hidden change a preset's shape; a checkpoint's "
                         "weights have theirs")
    import molmoe
    from molmoe.processing import Processor

    model = molmoe.load(opts.model, dtype=opts.dtype, device=device)
    processor = Processor.from_pretrained(opts.model)
    if opts.layers is not None:
        _cut_layers(model, opts.layers)
    return model, processor, f"checkpoint {model.source}, {model.config.text.n_layers} layers"


# ----------------------------------------------------------------------------- inputs

DEMO_IMAGE = pathlib.Path(__file__).resolve().parent / "assets" / "demo.png"
FILLER = " The quick brown fox jumps over the lazy dog, and then it runs away."


def make_inputs(processor, opts: ProfileOptions, device: torch.device):
    """(inputs on device, {"decode", "preprocessing"} ms samples, prompt description): decode is
    the image file to RGB pixels (`processor.load`), preprocessing the processor on those pixels
    and the prompt (the native op when built). With prompt_tokens, filler text tokens are
    inserted before the prompt text up to that many tokens."""
    from molmoe.processing.processor import prompt_text

    image = None if opts.image is None else (DEMO_IMAGE if opts.image == "demo" else opts.image)
    samples, inputs = {"decode": [], "preprocessing": []}, None
    for i in range(max(opts.repeats, 1) + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        loaded = None if image is None else processor.load(image)
        t1 = time.perf_counter()
        inputs = processor(opts.prompt, images=loaded)
        if i:
            samples["decode"].append((t1 - t0) * 1e3)
            samples["preprocessing"].append((time.perf_counter() - t1) * 1e3)
    inputs = {k: v for k, v in inputs.items() if k != "original_size"}
    ids = inputs["input_ids"]
    n_image = int((inputs["image_input_idx"] >= 0).sum()) if "images" in inputs else 0
    if opts.prompt_tokens is not None:
        if opts.prompt_tokens < ids.numel():
            raise UsageError(f"--prompt-tokens {opts.prompt_tokens}: the prompt already takes "
                             f"{ids.numel()} tokens ({n_image} image features)")
        text_len = len(processor.tokenizer.encode_text(prompt_text(opts.prompt)))
        filler = processor.tokenizer.encode_text(FILLER)
        need = opts.prompt_tokens - ids.numel()
        fill = torch.tensor((filler * (need // len(filler) + 1))[:need], dtype=ids.dtype)
        cut = ids.numel() - text_len  # after BOS and image tokens: image indices stay valid
        inputs["input_ids"] = torch.cat([ids[:cut], fill, ids[cut:]])
    inputs = {k: v.to(device) for k, v in inputs.items()}
    what = {"tokens": int(inputs["input_ids"].numel()), "image_features": n_image,
            "image": None if image is None else str(image),
            "crops": int(inputs["images"].shape[0]) if "images" in inputs else 0}
    return inputs, samples, what


# ----------------------------------------------------------------------------- ours


class _VisionClock:
    """Forward hooks that split `model.vision(...)` into the ViT and the connector (pad
    embeddings, pooling, projector; the concatenation of the two ViT layers is counted there)."""

    def __init__(self, model, device):
        self.device, self.marks = device, {}
        vision = model.vision

        def mark(name):
            def hook(*_):
                _sync(device)
                self.marks[name] = time.perf_counter()
            return hook

        self.handles = [vision.register_forward_pre_hook(mark("start")),
                        vision.image_vit.register_forward_hook(mark("vit")),
                        vision.register_forward_hook(mark("end"))]

    def split(self) -> tuple[float, float]:
        m = self.marks
        if "start" not in m:
            return 0.0, 0.0
        return (m["vit"] - m["start"]) * 1e3, (m["end"] - m["vit"]) * 1e3

    def close(self):
        for h in self.handles:
            h.remove()
        self.marks = {}


def _embed(model, inputs):
    """The prompt's input embeddings (1, S, D), image features added, as `prefill` makes them."""
    from molmoe.generation.step import _autocast

    ids_S, images = inputs["input_ids"], inputs.get("images")
    masks = inputs.get("image_masks")
    with _autocast(model, ids_S.device):
        return model.embed(ids_S[None], None if images is None else images[None],
                           None if masks is None else masks[None],
                           None if images is None else inputs["image_input_idx"][None],
                           None if images is None else torch.ones(
                               1, images.shape[0], dtype=torch.bool, device=images.device))


def time_ttft(model, inputs, repeats: int, device) -> dict:
    """Vision, connector and decoder-prefill times of `prefill` (ms samples, first run a warm-up)."""
    from molmoe.generation.step import prefill

    S = inputs["input_ids"].shape[0]
    model.new_kv_cache(1, S + 1)
    clock = _VisionClock(model, device)
    out = {"vision": [], "connector": [], "prefill": [], "total": []}
    try:
        for i in range(repeats + 1):
            clock.marks = {}
            _, total = _timed(lambda: prefill(model, inputs, 0).argmax(), device)
            vit, conn = clock.split()
            if i == 0:
                continue
            out["vision"].append(vit)
            out["connector"].append(conn)
            out["prefill"].append(total - vit - conn)  # decoder: embedding, layers, last logits
            out["total"].append(total)
    finally:
        clock.close()
    return out


def _decode_steps(step, first_B, S: int, n: int, device):
    """Greedy decode n-1 more tokens from `first_B` at positions S..: yields (token_B, ms) per
    step, so that implementations can be stepped in lockstep."""
    tok, pos = first_B, torch.full_like(first_B, S)
    for _ in range(n - 1):
        _sync(device)
        t0 = time.perf_counter()
        tok = step(tok, pos).argmax(-1)
        _sync(device)
        yield tok, (time.perf_counter() - t0) * 1e3
        pos = pos + 1


def _decode_loop(step, first_B, S: int, n: int, device) -> tuple[list[list[int]], list[float]]:
    """(tokens per row, per-step ms) of `_decode_steps` run to the end."""
    toks, lat = [first_B], []
    for tok, ms in _decode_steps(step, first_B, S, n, device):
        toks.append(tok)
        lat.append(ms)
    return torch.stack(toks, 1).tolist(), lat


def _profile(fn: Callable, device, trace: pathlib.Path | None, top: int) -> dict:
    """torch.profiler around fn(): top ops by self time (device time on CUDA) and the trace."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    on_device = device.type == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    rows = []
    for e in events:
        rows.append({"name": e.key, "count": e.count,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3,
                     "cpu_total_ms": e.cpu_time_total / 1e3,
                     "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3})
    rows.sort(key=lambda r: -r["self_device_ms" if on_device else "self_cpu_ms"])
    total = sum(r["self_device_ms" if on_device else "self_cpu_ms"] for r in rows)
    return {"sorted_by": key, "total_self_ms": total, "rows": rows[:top],
            "trace": None if trace is None else str(trace)}


class _RoutingCounter:
    """Forward hooks on the MoE layers: how many distinct experts each decode step reads."""

    def __init__(self, model):
        self.experts: list[int] = []  # per layer call: distinct experts routed to
        self.handles = []
        for block in model.decoder.blocks:
            ffn = block.ffn
            if hasattr(ffn, "router"):
                self.handles.append(ffn.register_forward_hook(self._hook))

    def _hook(self, module, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1])
        logits = torch.nn.functional.linear(x.to(module.router.weight.dtype), module.router.weight)
        idx = torch.topk(torch.softmax(logits.float(), -1), module.top_k, dim=-1).indices
        self.experts.append(int(torch.unique(idx).numel()))

    def close(self):
        for h in self.handles:
            h.remove()


def decode_step_bytes(model, batch: int, positions: list[int], experts_per_layer: list[int],
                      ) -> dict:
    """Bytes one decode step (B rows) must read: the weights it uses (for a MoE layer only the
    experts the batch routed to, `experts_per_layer`) plus the cached K/V attention reads."""
    t = model.config.text
    dec = model.decoder
    isz = dec.lm_head.weight.element_size()
    cache = dec.cache
    kv_isz = cache.k.element_size()
    D = t.d_model
    dense = 0
    expert = 0
    for i, block in enumerate(dec.blocks):
        for name, p in block.named_parameters():
            if name.startswith("ffn.w_"):
                continue
            dense += p.numel() * p.element_size()
        if hasattr(block.ffn, "w_gate"):
            per_expert = sum(getattr(block.ffn, w)[0].numel() for w in ("w_gate", "w_up", "w_down"))
            expert += experts_per_layer[i] * per_expert * isz
    dense += (dec.norm.weight.numel() + dec.lm_head.weight.numel()) * isz
    dense += batch * D * isz  # embedding rows
    kv = sum(2 * t.n_layers * t.n_kv_heads * (p + 1) * t.head_dim * kv_isz for p in positions)
    return {"weights_dense": dense, "weights_experts": expert, "kv": kv,
            "total": dense + expert + kv}


class _Ours:
    """Our runtime with one backend: prefill into its own caches, decode passes, accounting.
    Implementations alternate pass by pass (`profile_decode`), so load changes on a shared
    machine fall on all of them alike."""

    def __init__(self, model, backend: str, inputs, opts: ProfileOptions, device):
        from molmoe.generation.step import DecodeRunner, prefill

        self.model, self.backend, self.inputs, self.opts, self.device = (model, backend, inputs,
                                                                         opts, device)
        self.name = f"molmoe-{backend}"
        self.S = S = inputs["input_ids"].shape[0]
        B, n = opts.batch, opts.new_tokens
        model.set_backend(backend)
        with torch.no_grad():
            self.h_1SD = _embed(model, inputs)
            self.cache_1 = model.new_kv_cache(1, S + 1)
            # the timed decode runs n steps, the profiled one profile_steps + 1
            self.cache_B = model.new_kv_cache(B, S + max(n, opts.profile_steps + 1) + 1)
            first = prefill(model, inputs, 0).argmax()
            for row in range(1, B):
                prefill(model, inputs, row)
            self.first_B = first.expand(B).clone()
            self.runner = DecodeRunner(model, opts.mode)
            _decode_loop(self.runner, self.first_B, S, min(n, 4), device)  # compiles/captures
        self.prefill_ms, self.decode_ms, self.tokens = [], [], None

    def _use(self, cache):
        self.model.set_backend(self.backend)
        self.model.decoder.bind_cache(cache)

    def prefill_once(self) -> float:
        from molmoe.generation.step import prefill_embeds

        self._use(self.cache_1)
        return _timed(lambda: prefill_embeds(self.model, self.h_1SD, 0).argmax(), self.device)[1]

    def decode_pass(self):
        self._use(self.cache_B)
        return _decode_loop(self.runner, self.first_B, self.S, self.opts.new_tokens, self.device)

    def decode_steps(self):
        """One pass as a generator of (token_B, ms); binds this backend before every step."""
        for out in _decode_steps(self._bound_step, self.first_B, self.S, self.opts.new_tokens,
                                 self.device):
            yield out

    def _bound_step(self, tok, pos):
        self._use(self.cache_B)
        return self.runner(tok, pos)

    def finish(self, out_dir) -> dict:
        from molmoe.generation.step import decode_step, prefill_embeds

        model, opts, device, S = self.model, self.opts, self.device, self.S
        B, n = opts.batch, opts.new_tokens
        res = {"name": self.name, "backend": self.backend, "mode": opts.mode}
        with torch.no_grad():
            self._use(self.cache_1)
            res["ttft_ms"] = {k: summarize(v) for k, v in
                              time_ttft(model, self.inputs, opts.repeats, device).items()}
            _reset_peak(device)
            self.prefill_once()
            self.decode_pass()
            res["peak_memory"] = peak_memory(device)
            self._use(self.cache_B)
            # ops per decoded token at two cache lengths (the count must not depend on it)
            pos_B = torch.full((B,), S, device=device, dtype=torch.long)
            ops = count_ops(decode_step, model, self.first_B, pos_B)
            ops_later = count_ops(decode_step, model, self.first_B, pos_B + n // 2)
            res.update(_op_summary(ops, ops_later))
            # the routing of a real pass -> the bytes each step reads
            counter = _RoutingCounter(model)
            try:
                tok, pos, steps = self.first_B, pos_B.clone(), []
                for _ in range(n - 1):
                    counter.experts = []
                    tok = decode_step(model, tok, pos).argmax(-1)
                    steps.append(decode_step_bytes(model, B, pos.tolist(), counter.experts))
                    pos = pos + 1
            finally:
                counter.close()
            res["bytes_per_step"] = {k: statistics.fmean(s[k] for s in steps) for k in steps[0]}
            trace = None if out_dir is None else out_dir / f"trace-{self.name}-decode.json"
            res["profile_decode"] = _profile(
                lambda: _decode_loop(self.runner, self.first_B, S, opts.profile_steps + 1,
                                     device), device, trace, opts.top_ops)
            self._use(self.cache_1)
            trace = None if out_dir is None else out_dir / f"trace-{self.name}-prefill.json"
            res["profile_prefill"] = _profile(lambda: prefill_embeds(model, self.h_1SD, 0),
                                              device, trace, opts.top_ops)
        model.decoder.bind_cache(None)
        return res


def _op_summary(ops: collections.Counter, ops_later: collections.Counter) -> dict:
    return {"ops_per_step": sum(ops.values()), "ops_per_step_later": sum(ops_later.values()),
            "sync_ops_per_step": sync_count(ops),
            "sync_ops": {k: v for k, v in ops.items() if k in SYNC_OPS},
            "ops_top": ops.most_common(12), "ops": dict(ops)}


# ----------------------------------------------------------------------------- transformers


def hf_family(config) -> str | None:
    """Which transformers class holds this text decoder: OLMoE (MolmoE), Qwen2 (7B-D, 72B),
    OLMo-2 (7B-O: norms after the sublayers, full-width q/k norms); None if none does."""
    t = config.text
    if t.moe is not None:
        return "olmoe" if (t.qk_norm and not t.qkv_bias and not t.norm_after
                           and not t.moe.renormalize) else None
    if t.qkv_bias and not t.qk_norm and not t.norm_after:
        return "qwen2"
    if t.norm_after and t.qk_norm and not t.qkv_bias:
        return "olmo2"
    return None


def hf_config(config):
    """The transformers config of our text decoder."""
    import transformers

    t = config.text
    rope = {"rope_theta": t.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta}}
    common = dict(vocab_size=t.embedding_size, hidden_size=t.d_model,
                  num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
                  num_key_value_heads=t.n_kv_heads, rms_norm_eps=t.norm_eps,
                  max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None, **rope)
    family = hf_family(config)
    if family == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=t.moe.expert_hidden,
                                        num_experts=t.moe.num_experts,
                                        num_experts_per_tok=t.moe.top_k, norm_topk_prob=False,
                                        **common)
    if family == "qwen2":
        return transformers.Qwen2Config(intermediate_size=t.ffn_hidden, use_sliding_window=False,
                                        **common)
    if family == "olmo2":
        return transformers.Olmo2Config(intermediate_size=t.ffn_hidden, **common)
    raise UsageError(f"{config.name}: no transformers decoder class holds this text decoder")


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our decoder's weights under transformers' names: views of our tensors (no copy), except
    OLMoE's fused experts gate_up_proj (E, 2F, D) = [w_gate; w_up], which is a concatenation."""
    t = model.config.text
    dec = model.decoder
    family = hf_family(model.config)
    D, kv = t.d_model, t.kv_dim
    sd = {"model.embed_tokens.weight": dec.embed.embedding, "model.norm.weight": dec.norm.weight,
          "lm_head.weight": dec.lm_head.weight}
    for n, block in enumerate(dec.blocks):
        hp = f"model.layers.{n}."
        a = block.attn
        q, k, v = a.qkv.weight.split([D, kv, kv])
        sd.update({hp + "self_attn.q_proj.weight": q, hp + "self_attn.k_proj.weight": k,
                   hp + "self_attn.v_proj.weight": v, hp + "self_attn.o_proj.weight": a.out.weight})
        if t.qkv_bias:
            qb, kb, vb = a.qkv.bias.split([D, kv, kv])
            sd.update({hp + "self_attn.q_proj.bias": qb, hp + "self_attn.k_proj.bias": kb,
                       hp + "self_attn.v_proj.bias": vb})
        if t.qk_norm:
            sd[hp + "self_attn.q_norm.weight"] = a.q_norm.weight
            sd[hp + "self_attn.k_norm.weight"] = a.k_norm.weight
        if family == "olmo2":  # norms after the sublayers
            sd[hp + "post_attention_layernorm.weight"] = block.attn_norm.weight
            sd[hp + "post_feedforward_layernorm.weight"] = block.ffn_norm.weight
        else:
            sd[hp + "input_layernorm.weight"] = block.attn_norm.weight
            sd[hp + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        f = block.ffn
        if family == "olmoe":
            sd[hp + "mlp.gate.weight"] = f.router.weight
            sd[hp + "mlp.experts.gate_up_proj"] = torch.cat([f.w_gate, f.w_up], dim=1)
            sd[hp + "mlp.experts.down_proj"] = f.w_down
        else:
            up, gate = f.up_gate.weight.chunk(2)  # rows [0, F) up, [F, 2F) gate (spec §2.2)
            sd.update({hp + "mlp.up_proj.weight": up, hp + "mlp.gate_proj.weight": gate,
                       hp + "mlp.down_proj.weight": f.down.weight})
    return sd


def hf_decoder(model):
    """transformers' causal LM holding our decoder's weights (shared tensors where the layouts
    agree), built on `meta` and filled with `assign=True`; rotary tables rebuilt on the device."""
    import transformers

    config = hf_config(model.config)
    cls = {"olmoe": transformers.OlmoeForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "olmo2": transformers.Olmo2ForCausalLM}[hf_family(model.config)]
    device = model.decoder.lm_head.weight.device
    with torch.device("meta"):
        hf = cls(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"transformers mapping: missing {missing}, unexpected {unexpected}")
    for name, module in list(hf.named_modules()):
        if name.endswith("rotary_emb"):
            parent = hf.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], type(module)(config).to(device))
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model: tensors left on meta: {left[:5]}")
    return hf.eval().requires_grad_(False)


def _hf_reset(cache, S: int) -> None:
    """Drop the cached tokens after the first S (transformers' crop takes a negative count)."""
    extra = cache.get_seq_length() - S
    if extra > 0:
        cache.crop(-extra)


def _hf_cache_kwarg(hf) -> str:
    params = inspect.signature(hf.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Transformers:
    """The text decoder in transformers, same weight tensors, same prompt embeddings; greedy
    decode with its own cache (DynamicCache), one token per forward."""

    def __init__(self, model, inputs, opts: ProfileOptions, device):
        from transformers import DynamicCache

        from molmoe.generation.step import _autocast

        self.model, self.opts, self.device = model, opts, device
        self.name = "transformers"
        self.hf = hf = hf_decoder(model)
        self.kw = _hf_cache_kwarg(hf)
        self.amp = lambda: _autocast(model, device)  # noqa: E731
        self.S = inputs["input_ids"].shape[0]
        self.new_cache = lambda: DynamicCache(config=hf.config)  # noqa: E731
        with torch.no_grad():
            self.h_1SD = _embed(model, inputs)
            logits, self.cache = self._prefill(self.h_1SD.expand(opts.batch, -1, -1))
            self.first_B = logits.argmax(-1)
            _decode_loop(self._step, self.first_B, self.S, min(opts.new_tokens, 4), device)
            _hf_reset(self.cache, self.S)
        self.prefill_ms, self.decode_ms, self.tokens = [], [], None

    def _prefill(self, h):
        cache = self.new_cache()
        with self.amp():
            out = self.hf(inputs_embeds=h, use_cache=True, logits_to_keep=1, **{self.kw: cache})
        return out.logits[:, -1], cache

    def _step(self, tok_B, _pos_B):
        with self.amp():
            return self.hf(input_ids=tok_B[:, None], use_cache=True,
                           **{self.kw: self.cache}).logits[:, -1]

    def prefill_once(self) -> float:
        return _timed(lambda: self._prefill(self.h_1SD)[0].argmax(-1), self.device)[1]

    def decode_pass(self):
        try:
            return _decode_loop(self._step, self.first_B, self.S, self.opts.new_tokens,
                                self.device)
        finally:
            _hf_reset(self.cache, self.S)

    def finish(self, out_dir) -> dict:
        opts, device, S, hf = self.opts, self.device, self.S, self.hf
        res = {"name": self.name, "class": type(hf).__name__,
               "attn_implementation": hf.config._attn_implementation,
               "experts_implementation": getattr(hf.config, "_experts_implementation", None)}
        with torch.no_grad():
            _reset_peak(device)
            self.prefill_once()
            self.decode_pass()
            res["peak_memory"] = peak_memory(device)

            def one_token(extra: int):
                if extra:
                    _decode_loop(self._step, self.first_B, S, extra + 1, device)
                ops = count_ops(self._step, self.first_B, None)
                _hf_reset(self.cache, S)
                return ops

            res.update(_op_summary(one_token(0), one_token(opts.new_tokens // 2)))
            trace = None if out_dir is None else out_dir / "trace-transformers-decode.json"
            res["profile_decode"] = _profile(lambda: self.decode_pass_n(opts.profile_steps + 1),
                                             device, trace, opts.top_ops)
            trace = None if out_dir is None else out_dir / "trace-transformers-prefill.json"
            res["profile_prefill"] = _profile(lambda: self._prefill(self.h_1SD), device, trace,
                                              opts.top_ops)
        return res

    def decode_steps(self):
        try:
            yield from _decode_steps(self._step, self.first_B, self.S, self.opts.new_tokens,
                                     self.device)
        finally:
            _hf_reset(self.cache, self.S)

    def decode_pass_n(self, n):
        try:
            return _decode_loop(self._step, self.first_B, self.S, n, self.device)
        finally:
            _hf_reset(self.cache, self.S)


# ----------------------------------------------------------------------------- the run


def profile_decode(opts: ProfileOptions) -> dict:
    """Run everything the module docstring lists; the report (also written to opts.out)."""
    from molmoe.backends import resolve_device, select_backend

    opts.validate()
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    out_dir = None
    if opts.out is not None:
        out_dir = pathlib.Path(opts.out)
        out_dir.mkdir(parents=True, exist_ok=True)
    model, processor, what = build_model(opts, device, need_vision=opts.image is not None)
    inputs, pre_ms, prompt = make_inputs(processor, opts, device)
    t = model.config.text
    report = {"command": opts.command, "options": dataclasses.asdict(opts),
              "environment": environment(device), "model": what,
              "config": {"name": model.config.name, "n_layers": t.n_layers, "d_model": t.d_model,
                         "n_heads": t.n_heads, "n_kv_heads": t.n_kv_heads,
                         "experts": None if t.moe is None else
                         {"num": t.moe.num_experts, "top_k": t.moe.top_k,
                          "hidden": t.moe.expert_hidden}},
              "dtype": opts.dtype, "prompt": prompt, "batch": opts.batch,
              "new_tokens": opts.new_tokens,
              "image_decode_ms": summarize(pre_ms["decode"]),
              "preprocessing_ms": summarize(pre_ms["preprocessing"]),
              "implementations": [], "skipped": [], "needs_gpu": []}
    if device.type == "cuda":
        report["copy_bandwidth_gbps"] = copy_bandwidth_gbps(device)
    else:
        report["needs_gpu"] = [
            "bytes read per step as a fraction of the device's measured copy bandwidth "
            "(the bytes themselves are computed and reported)",
            "the Triton backend's timings (unless TRITON_INTERPRET=1, which times the "
            "interpreter, not the kernels)",
            "CUDA-graph decode (--mode graph)",
            "peak device memory per implementation (the CPU reports the process RSS high-water)"]
    impls = []
    backends = ["reference", "triton"] if opts.backend == "both" else [opts.backend]
    for backend in backends:
        try:
            select_backend(backend, device)
        except UsageError as e:
            report["skipped"].append({"name": f"molmoe-{backend}", "why": str(e)})
            continue
        print(f"profile: setting up molmoe {backend}", file=sys.stderr, flush=True)
        impls.append(_Ours(model, backend, inputs, opts, device))
    if opts.compare == "transformers":
        if hf_family(model.config) is None:
            report["skipped"].append({"name": "transformers", "why": "no transformers class "
                                      f"holds {model.config.name}'s text decoder"})
        else:
            print("profile: setting up transformers", file=sys.stderr, flush=True)
            impls.append(_Transformers(model, inputs, opts, device))
    with torch.no_grad():
        for r in range(opts.repeats):  # alternate: each repeat runs every implementation
            print(f"profile: repeat {r + 1}/{opts.repeats}", file=sys.stderr, flush=True)
            order = impls if r % 2 == 0 else impls[::-1]  # alternate who goes first
            for impl in order:
                impl.prefill_ms.append(impl.prefill_once())
            # decode in lockstep: one step of each implementation in turn, so that the load of
            # a shared machine falls on all alike; pairs of adjacent steps give paired ratios
            gens = [impl.decode_steps() for impl in impls]
            toks = {id(impl): [impl.first_B] for impl in impls}
            for i in range(opts.new_tokens - 1):
                turn = list(zip(impls, gens))
                for impl, gen in (turn if (i + r) % 2 == 0 else turn[::-1]):
                    tok, ms = next(gen)
                    toks[id(impl)].append(tok)
                    impl.decode_ms.append(ms)
            for gen in gens:
                gen.close()
            for impl in impls:
                impl.tokens = impl.tokens or torch.stack(toks[id(impl)], 1).tolist()
    for impl in impls:
        print(f"profile: op counts and torch.profiler, {impl.name}", file=sys.stderr, flush=True)
        res = impl.finish(out_dir)
        res["prefill_decoder_ms"] = summarize(impl.prefill_ms)
        res["prefill_samples_ms"] = impl.prefill_ms
        res["decode_ms"] = summarize(impl.decode_ms)
        res["decode_samples_ms"] = impl.decode_ms
        res["tokens_per_s"] = 1e3 * opts.batch / res["decode_ms"]["p50_ms"]
        res["tokens"] = impl.tokens[0]
        report["implementations"].append(res)
    report["environment"]["loadavg_end"] = os.getloadavg()
    _derive(report, device)
    if out_dir is not None:
        report["files"] = {"json": str(out_dir / "profile.json"),
                           "png": str(out_dir / "profile.png")}
        (out_dir / "profile.json").write_text(json.dumps(report, indent=2, default=str))
        plot(report, out_dir / "profile.png")
    return report


def _derive(report: dict, device) -> None:
    """Ratios ours / transformers, the greedy-token check, bandwidth figures."""
    impls = {r["name"]: r for r in report["implementations"]}
    hf = impls.get("transformers")
    for r in report["implementations"]:
        r.setdefault("ttft_ms", None)
        b = r.get("bytes_per_step")
        if b and device.type == "cuda":
            s = r["decode_ms"]["p50_ms"] * 1e-3
            r["decode_gbps"] = b["total"] / s / 1e9
            r["decode_bw_fraction"] = r["decode_gbps"] / report["copy_bandwidth_gbps"]
    if hf is None:
        return
    report["ratios"] = {}
    report["greedy_check"] = {}
    for name, r in impls.items():
        if name == "transformers":
            continue
        report["ratios"][name] = {
            "prefill_decoder": r["prefill_decoder_ms"]["p50_ms"] / hf["prefill_decoder_ms"]["p50_ms"],
            f"decode_batch{report['batch']}": r["decode_ms"]["p50_ms"] / hf["decode_ms"]["p50_ms"],
            "ops_per_step": r["ops_per_step"] / hf["ops_per_step"]}
        paired = [a / b for a, b in zip(r["decode_samples_ms"], hf["decode_samples_ms"])]
        pre = [a / b for a, b in zip(r["prefill_samples_ms"], hf["prefill_samples_ms"])]
        report["ratios"][name]["decode_paired_median"] = statistics.median(paired)
        report["ratios"][name]["prefill_paired_median"] = statistics.median(pre)
        diff = collections.Counter(r["ops"])
        diff.subtract(hf["ops"])
        report.setdefault("ops_diff", {})[name] = {k: v for k, v in sorted(
            diff.items(), key=lambda kv: -abs(kv[1])) if v}
        k = min(report["options"]["check_tokens"], len(r["tokens"]), len(hf["tokens"]))
        a, b = r["tokens"][:k], hf["tokens"][:k]
        agree = next((i for i in range(k) if a[i] != b[i]), k)
        report["greedy_check"][name] = {"checked": k, "agree_first": agree, "ours": a,
                                        "transformers": b, "equal": agree == k,
                                        "dtype": report["dtype"]}


# ----------------------------------------------------------------------------- output


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [f"molmoe profile decode  {env['date']}  commit {env['commit']}  load average "
             f"{env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}",
             f"device {env['device']}  torch {env['torch']}  transformers {env['transformers']}",
             f"model  {report['model']}  dtype {report['dtype']}",
             f"prompt {report['prompt']['tokens']} tokens ({report['prompt']['image_features']} "
             f"image features, {report['prompt']['crops']} crops)  batch {report['batch']}  "
             f"new tokens {report['new_tokens']}", ""]
    pre = report["preprocessing_ms"]["p50_ms"]
    dec = (report.get("image_decode_ms") or {}).get("p50_ms", 0.0)
    lines.append("time to first token (p50, ms), batch 1 (decode: image file to pixels; "
                 "preproc: the processor)")
    lines.append(f"  {'':26} {'decode':>8} {'preproc':>8} {'vision':>8} {'connect':>8} "
                 f"{'prefill':>9} {'TTFT':>9}")
    for r in report["implementations"]:
        t = r.get("ttft_ms")
        if t:
            total = dec + pre + t["total"]["p50_ms"]
            lines.append(f"  {r['name']:26} {dec:8.2f} {pre:8.2f} {t['vision']['p50_ms']:8.2f} "
                         f"{t['connector']['p50_ms']:8.2f} {t['prefill']['p50_ms']:9.2f} "
                         f"{total:9.2f}")
    lines.append("")
    lines.append("decoder prefill from the same embeddings (p50 ms) and decode per step "
                 f"(batch {report['batch']})")
    lines.append(f"  {'':26} {'prefill':>9} {'p50':>8} {'p90':>8} {'spread':>7} {'tok/s':>8} "
                 f"{'ops/step':>8} {'syncs':>6} {'peak MiB':>9}")
    for r in report["implementations"]:
        d = r["decode_ms"]
        lines.append(f"  {r['name']:26} {r['prefill_decoder_ms']['p50_ms']:9.2f} "
                     f"{d['p50_ms']:8.2f} {d['p90_ms']:8.2f} {d['spread_ms']:7.2f} "
                     f"{r['tokens_per_s']:8.1f} {r['ops_per_step']:8d} "
                     f"{r['sync_ops_per_step']:6d} {r['peak_memory']['bytes'] / 2**20:9.0f}")
    for r in report["implementations"]:
        if r["ops_per_step_later"] != r["ops_per_step"]:
            lines.append(f"  note: {r['name']}'s op count changes with the cache length "
                         f"({r['ops_per_step']} -> {r['ops_per_step_later']})")
        if r["sync_ops"]:
            lines.append(f"  {r['name']} host-sync ops per step: {r['sync_ops']}")
    for r in report["implementations"]:
        b = r.get("bytes_per_step")
        if b:
            line = (f"  {r['name']}: a step reads {b['total'] / 1e9:.3f} GB (weights "
                    f"{(b['weights_dense'] + b['weights_experts']) / 1e9:.3f}, of which experts "
                    f"{b['weights_experts'] / 1e9:.3f}; K/V {b['kv'] / 1e6:.2f} MB)")
            if "decode_gbps" in r:
                line += (f": {r['decode_gbps']:.0f} GB/s, {r['decode_bw_fraction']:.0%} of the "
                         f"measured copy bandwidth {report['copy_bandwidth_gbps']:.0f} GB/s")
            lines.append(line)
    if "ratios" in report:
        lines.append("")
        lines.append("ours / transformers (same run; < 1 means ours is faster / dispatches fewer)")
        for name, ratio in report["ratios"].items():
            lines.append("  " + name + ": " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
        for name, d in report.get("ops_diff", {}).items():
            lines.append(f"  aten ops per step, {name} minus transformers: " + ", ".join(
                f"{k} {v:+d}" for k, v in list(d.items())[:14]))
        for name, g in report["greedy_check"].items():
            lines.append(f"  greedy tokens {name} vs transformers ({g['dtype']}): first "
                         f"{g['agree_first']} of {g['checked']} agree"
                         + ("" if g["equal"] else f"  ours {g['ours']}  hf {g['transformers']}"))
    for r in report["implementations"]:
        for phase in ("decode", "prefill"):
            p = r.get(f"profile_{phase}")
            if not p:
                continue
            col = "self_device_ms" if p["sorted_by"] == "self_device_time_total" else "self_cpu_ms"
            lines.append("")
            lines.append(f"top ops: {r['name']} {phase} (by {col}, total {p['total_self_ms']:.1f} "
                         f"ms)" + (f"  trace {p['trace']}" if p["trace"] else ""))
            for row in p["rows"]:
                lines.append(f"  {row[col]:9.2f} ms  {row['count']:6d}x  {row['name']}")
    if report["skipped"]:
        lines.append("")
        for s in report["skipped"]:
            lines.append(f"skipped {s['name']}: {s['why']}")
    if report["needs_gpu"]:
        lines.append("")
        lines.append("needs a GPU (not reported here):")
        lines += [f"  - {x}" for x in report["needs_gpu"]]
    if "copy_bandwidth_gbps" in report:
        lines.append(f"measured copy bandwidth: {report['copy_bandwidth_gbps']:.0f} GB/s")
    if report.get("files"):
        lines.append("")
        lines.append(f"wrote {report['files']['json']}, {report['files']['png']}")
    return "\n".join(lines)


def plot(report: dict, path: pathlib.Path) -> None:
    """Per-token decode latency distributions and the prefill times, one colour per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = report["implementations"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    if impls:
        a1.boxplot([r["decode_samples_ms"] for r in impls], whis=(10, 90), showfliers=True)
        a1.set_xticks(range(1, len(impls) + 1), [r["name"] for r in impls], fontsize=8)
        a2.bar([r["name"] for r in impls], [r["prefill_decoder_ms"]["p50_ms"] for r in impls],
               yerr=[[r["prefill_decoder_ms"]["p50_ms"] - r["prefill_decoder_ms"]["p10_ms"]
                      for r in impls],
                     [r["prefill_decoder_ms"]["p90_ms"] - r["prefill_decoder_ms"]["p50_ms"]
                      for r in impls]], capsize=4)
        a2.tick_params(axis="x", labelsize=8)
    a1.set_ylabel("ms per decode step (p10-p90 whiskers)")
    a1.set_title(f"decode, batch {report['batch']}")
    a2.set_ylabel("ms (p50, p10-p90)")
    a2.set_title(f"decoder prefill, {report['prompt']['tokens']} tokens")
    env = report["environment"]
    fig.suptitle(f"{report['config']['name']} ({report['config']['n_layers']} layers, "
                 f"{report['dtype']}) on {env['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
