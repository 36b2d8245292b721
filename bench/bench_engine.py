"""Engine host time per token against the answer's length: 50 vs 2,000 generated tokens.

The decode step has static shapes and TextStream decodes a bounded window per token, so the time
per token should not grow with the number of tokens before it. The exception is attention's
reads, which grow with the cache slots. Measured with a tiny model, so that host work (Python,
op dispatch, detokenization) dominates what is timed. The model has random weights and an
explicit EOS that it never samples, so every run produces exactly its token limit. The text is
decoded with the real Qwen2 tokenizer when `../shared/data` has it, else with the demo's
byte-level one.

    python -m bench.bench_engine [--quick] [--mode eager|compile] [--lengths 50 2000]

Prints p50 per-token time for each length over `--repeats` runs (after one warm-up run on the
same engine, which allocates the cache and, in mode compile, compiles the step) and the ratio
long / short; the JSON goes to bench/out/engine.json.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time

import torch

from bench.common import OUT_DIR, bench_parser, environment


def _tokenizer():
    from molmoe.processing.tokenizer import Tokenizer

    shared = pathlib.Path(os.environ.get("MOLMOE_SHARED_DATA", pathlib.Path(__file__).resolve()
                                         .parents[2] / "shared" / "data"))
    qwen = shared / "molmo-7b-d-0924"
    if (qwen / "vocab.json").exists():
        return Tokenizer.from_dir(qwen), "qwen2 (molmo-7b-d-0924)"
    from tokenizers import Tokenizer as Raw

    from molmoe.demo import build_tokenizer_json

    return Raw.from_str(build_tokenizer_json()), "demo byte-level"


def main(argv=None) -> int:
    parser = bench_parser(__doc__, quick_help="lengths 50 and 400, one repeat")
    parser.add_argument("--mode", default="eager", choices=["eager", "compile"])
    parser.add_argument("--lengths", type=int, nargs=2, default=[50, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [50, 400], 1
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from tiny import random_model

    from molmoe.generation import Engine, GenerationConfig

    model = random_model("tiny-molmoe")
    tok, tok_name = _tokenizer()
    vocab = model.config.text.vocab_size
    prompt = {"input_ids": torch.arange(20) % vocab + 5}
    short, long = args.lengths
    results = {}
    for n in (short, long):
        per_token = []
        # An EOS id the model never samples here (checked below), so every run is n tokens.
        engine = Engine(model, tok, eos_token_id=vocab - 1, mode=args.mode)
        cfg = GenerationConfig(max_new_tokens=n, stop_strings=())
        engine.generate(prompt, cfg)  # warm-up: allocates the cache, compiles (mode compile)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = engine.generate(prompt, cfg)
            total = time.perf_counter() - t0
            if r.finish_reason != "length":
                raise SystemExit(f"the run stopped early ({r.finish_reason}); pick another EOS")
            per_token.append(r.timings.decode_s / (n - 1))
        results[n] = {"p50_ms_per_token": 1e3 * statistics.median(per_token),
                      "samples_ms": [1e3 * t for t in per_token], "last_total_s": total}
    ratio = results[long]["p50_ms_per_token"] / results[short]["p50_ms_per_token"]
    print(f"engine host time per token, tiny-molmoe, mode {args.mode}, tokenizer {tok_name}")
    for n in (short, long):
        print(f"  {n:5d} tokens: p50 {results[n]['p50_ms_per_token']:.3f} ms/token "
              f"(samples {', '.join(f'{s:.3f}' for s in results[n]['samples_ms'])})")
    print(f"  ratio {long} / {short}: {ratio:.3f} (goal <= 1.5)")
    out = pathlib.Path(args.out or OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": environment(), "mode": args.mode, "tokenizer": tok_name,
           "results": {str(k): v for k, v in results.items()}, "ratio_long_short": ratio,
           "command": " ".join(["python -m bench.bench_engine"] + (argv or sys.argv[1:]))}
    (out / "engine.json").write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
