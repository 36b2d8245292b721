"""`molmoe serve` throughput: 32 concurrent requests against the same 32 one after another.

A real server (uvicorn on a free loopback port, in this process) over the demo checkpoint (tiny
MolmoE, RANDOM weights: the answers are noise, the work is real), and the official `openai`
client streaming each answer. Prompts and answer lengths are mixed (16..64 new tokens; every
eighth request carries an image). Each request is timed from send to its first content (TTFT)
and to its end (latency); throughput is completion tokens over the wall time of the whole set.

    python -m bench.bench_serve [--requests 32] [--max-batch 32] [--max-len 1024] [--threads 1]

Prints both runs, the throughput ratio concurrent / sequential, p50/p90 latency and TTFT, and
writes bench/out/serve.json. CPU figures only say what batching buys on this machine.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import numpy as np
import torch
from PIL import Image

from bench.common import bench_parser, environment


def _png() -> str:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _jobs(n: int) -> list[dict]:
    image = _png()
    jobs = []
    for i in range(n):
        text = f"Request {i}: describe " + "the scene " * (i % 9)
        content = text if i % 8 != 7 else [{"type": "text", "text": text},
                                           {"type": "image_url", "image_url": {"url": image}}]
        jobs.append({"messages": [{"role": "user", "content": content}],
                     "max_tokens": 16 + (i * 13) % 49})
    return jobs


async def _one(client, job) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(model="demo", stream=True,
                                                  stream_options={"include_usage": True}, **job)
    async for chunk in stream:
        if ttft is None and chunk.choices and (chunk.choices[0].delta.content
                                               or chunk.choices[0].finish_reason):
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "tokens": tokens}


def _summary(name: str, results: list[dict], wall_s: float) -> dict:
    def q(key, p):
        return float(np.percentile([r[key] for r in results], p))

    tokens = sum(r["tokens"] for r in results)
    return {"name": name, "requests": len(results), "wall_s": wall_s, "tokens": tokens,
            "tokens_per_s": tokens / wall_s, "latency_p50_s": q("latency_s", 50),
            "latency_p90_s": q("latency_s", 90), "ttft_p50_s": q("ttft_s", 50),
            "ttft_p90_s": q("ttft_s", 90)}


async def _run(url: str, jobs: list[dict]) -> tuple[dict, dict]:
    import openai

    client = openai.AsyncOpenAI(api_key="none", base_url=url + "/v1", max_retries=0, timeout=600)
    try:
        await _one(client, jobs[-1])  # warm-up: the cache allocation, the first image
        t0 = time.perf_counter()
        seq = [await _one(client, job) for job in jobs]
        sequential = _summary("sequential", seq, time.perf_counter() - t0)
        t0 = time.perf_counter()
        con = await asyncio.gather(*(_one(client, job) for job in jobs))
        concurrent = _summary("concurrent", list(con), time.perf_counter() - t0)
    finally:
        await client.close()
    return sequential, concurrent


def main(argv=None) -> int:
    p = bench_parser(__doc__, quick_help="8 requests")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo model is "
                                                          "too small to split)")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    n = 8 if args.quick else args.requests
    torch.set_num_threads(args.threads)

    from molmoe.demo import demo_checkpoint
    from molmoe.pipeline import load_pipeline
    from molmoe.serve import ServeOptions, create_app
    from molmoe.serve.server import BackgroundServer

    proc, model, eos = load_pipeline(demo_checkpoint(args.cache_dir), device="cpu")
    options = ServeOptions(max_batch=args.max_batch, max_queue=max(64, n), max_len=args.max_len)
    with BackgroundServer(create_app(proc, model, eos, model_id="demo", options=options)) as s:
        sequential, concurrent = asyncio.run(_run(s.url, _jobs(n)))
    ratio = concurrent["tokens_per_s"] / sequential["tokens_per_s"]
    for r in (sequential, concurrent):
        print(f"{r['name']:>10}: {r['requests']} requests, {r['tokens']} tokens in "
              f"{r['wall_s']:.2f} s = {r['tokens_per_s']:.1f} tokens/s; latency p50 "
              f"{r['latency_p50_s']:.3f} s p90 {r['latency_p90_s']:.3f} s; TTFT p50 "
              f"{r['ttft_p50_s']:.3f} s p90 {r['ttft_p90_s']:.3f} s")
    print(f"throughput concurrent / sequential: {ratio:.2f}x")
    doc = {"environment": environment(), "threads": args.threads, "max_batch": args.max_batch,
           "max_len": args.max_len, "sequential": sequential, "concurrent": concurrent,
           "ratio": ratio}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out / 'serve.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
