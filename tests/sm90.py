"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU, and read what ptxas made
of them. Shared by the sm_90 compile checks (tests/test_moe_sm90.py, tests/test_kernels_sm90.py,
tests/test_attention.py).

Triton compiles ahead of time for a named target with the ptxas it ships
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`), and its bundled cuobjdump
reads the cubin's register, stack and local-memory use. That catches what the interpreter cannot:
compile errors (loop-carried types, scalar ifs), register spills, shared memory past the limit,
and a GEMM that does not reach the tensor cores. It says nothing about speed.

A test module lists its kernels as `Case`s from a function `sm90_cases()` and calls
`report(module)`: the compiling runs in a child process (`python -m tests.sm90 <module>`) because conftest turns on
Triton's interpreter in the test process, and interpreted kernels cannot be compiled. The child
also drops the MOLMOE_*_CONFIG / *_SPLITS pins so the shipped default and autotune configs are the
ones checked.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton

SMEM_LIMIT = 232_448  # bytes of shared memory per block on H100 (227 KiB)


@dataclasses.dataclass
class Case:
    """One kernel compile: `consts` are the constexpr arguments; `types` the Triton type of other
    arguments ("*fp32", "fp32", ...) where the default (pointers "*bf16", scalars "i32") is wrong;
    `divisible` the arguments that get the 16-divisibility hint the JIT gives at launch (pointers
    always get it; add integers that are multiples of 16 at the shapes checked); `tensor_core`
    the instruction a GEMM must use ("wgmma" or "mma", "mma_any" for either), None if no tl.dot."""
    name: str
    kernel: object  # a @triton.jit function, or an @triton.autotune wrapper of one
    consts: dict
    num_warps: int
    num_stages: int = 2
    types: dict = dataclasses.field(default_factory=dict)
    divisible: frozenset = frozenset()
    tensor_core: str | None = None


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # unwrap @triton.autotune / @triton.heuristics
        kernel = kernel.fn
    return kernel


def compile_sm90(case: Case):
    """The compiled kernel (cubin and all) of `case` for sm_90. Needs TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(case.kernel)
    names = fn.arg_names
    unknown = set(case.consts) - set(names)
    if unknown:
        raise ValueError(f"{case.name}: {sorted(unknown)} are not arguments of {fn.__name__}")
    # A constexpr the case leaves out takes its default, as at a launch that omits it (left
    # out of the constexprs it would compile as a runtime integer: both sides of every
    # `if FLAG:` at once); one without a default is an error.
    consts = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    consts.update(case.consts)
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
    if missing:
        raise ValueError(f"{case.name}: constexpr {missing} of {fn.__name__} not given")
    sig = {a: "constexpr" if a in consts else case.types.get(a) or
           ("*bf16" if a.endswith("_ptr") else "i32") for a in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
             if a not in consts and (sig[a].startswith("*") or a in case.divisible)}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(c),): v for c, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=case.num_warps, num_stages=case.num_stages))


def resources(compiled) -> dict:
    """{"REG", "STACK", "LOCAL", ...} of the cubin, as cuobjdump --dump-resource-usage prints."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in (kv.split(":") for kv in line.split() if kv[-1].isdigit()
                                   and kv.split(":")[0] in ("REG", "STACK", "LOCAL", "SHARED"))}


def summarize(compiled) -> dict:
    """Resources and the instructions that matter on Hopper: wgmma (and its widest n), mma.sync,
    cp.async (pipelined loads), cp.async.bulk.tensor (TMA), local memory (spills); from the
    Triton IR, the explicit multiply-adds (`tl.fma`: "fma"), float equality compares
    ("cmpf_oeq", e.g. a guard `m == -inf`) and the tl.dot ops ("dots")."""
    res, ptx, ttir = resources(compiled), compiled.asm["ptx"], compiled.asm["ttir"]
    wgmma_n = [int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx)]
    return {"regs": res["REG"], "stack": res["STACK"], "local": res.get("LOCAL", 0),
            "shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]),
            "wgmma": "wgmma.mma_async" in ptx, "wgmma_n": max(wgmma_n, default=0),
            "mma": "mma.sync" in ptx, "cp_async": "cp.async" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx,
            "ld_local": "ld.local" in ptx or "st.local" in ptx,
            "fma": ttir.count("math.fma"), "cmpf_oeq": ttir.count("arith.cmpf oeq"),
            "dots": len(re.findall(r"= tt\.dot ", ttir))}


_CASES: list = []  # the cases of this child, read by forked workers by index


def _compile_one(i: int) -> dict:
    t0 = time.perf_counter()
    try:
        out = summarize(compile_sm90(_CASES[i]))
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out
    except Exception as exc:  # reported, and the test names it
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}


def _compile_all(cases) -> dict:
    """Every case compiled, on MOLMOE_SM90_JOBS processes (default: every CPU; the cases are
    independent, and a fresh Triton cache makes a few hundred of them minutes of ptxas)."""
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"two cases named {sorted(n for n in names if names.count(n) > 1)[0]}")
    _CASES[:] = cases
    jobs = min(len(cases), int(os.environ.get("MOLMOE_SM90_JOBS", 0)) or os.cpu_count() or 1)
    if jobs <= 1:
        results = [_compile_one(i) for i in range(len(cases))]
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_one, range(len(cases)), chunksize=1)
    return dict(zip(names, results))


def child_env() -> dict:
    """This environment without the interpreter and without pinned kernel configs."""
    return {k: v for k, v in os.environ.items()
            if k != "TRITON_INTERPRET"
            and not (k.startswith("MOLMOE_") and k.endswith(("_CONFIG", "_SPLITS")))}


def report(module: str, timeout: float = 1200) -> dict:
    """Compile `module.sm90_cases()` for sm_90 in a child process: name -> `summarize` dict (or
    {"error": ...}). Skips the calling test where this Triton cannot compile ahead of time."""
    import pytest

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget (ahead-of-time compile)")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton built without its CUDA backend")
    env = child_env()
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tests.sm90", module], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(r: dict | None, name: str, tensor_core: str | None = None, cp_async: bool = False):
    """The assertions every case gets: compiled, no spills, shared memory within the limit, and
    for a GEMM the tensor-core instruction (and cp.async pipelining where asked)."""
    assert r is not None, f"{name}: missing from the sm_90 report (case lists differ?)"
    assert "error" not in r, f"{name} does not compile for sm_90: {r.get('error')}"
    assert r["stack"] == 0 and r["local"] == 0 and not r["ld_local"], \
        f"{name} spills registers: {r}"
    assert r["shared"] <= SMEM_LIMIT, f"{name}: {r['shared']} B of shared memory"
    if tensor_core == "mma_any":
        assert r["wgmma"] or r["mma"], f"{name}: no wgmma / mma.sync (tensor cores unused): {r}"
    elif tensor_core is not None:
        assert r[tensor_core], f"{name}: no {tensor_core} (tensor cores unused): {r}"
    if cp_async:
        assert r["cp_async"], f"{name}: loads not pipelined (no cp.async)"


if __name__ == "__main__":
    print(json.dumps(_compile_all(importlib.import_module(sys.argv[1]).sm90_cases())))
