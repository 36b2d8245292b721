"""The MoE kernels, compiled for an H100 (sm_90) on a machine without one.

Triton compiles ahead of time for a named target with the ptxas it ships, so the default H100
configs (molmoe.kernels.moe_tuning.default_config at MolmoE-1B's D 2048, F 1024, K 8, bf16) are
checked where no GPU is: each kernel compiles, spills no registers, fits shared memory, and the
GEMMs use Hopper's wgmma with cp.async pipelining. This says nothing about speed; it catches what
the interpreter cannot (compile errors, spills, a pipeliner that gave up).

Integer arguments that are multiples of 16 (D, F, row strides) get the divisibility hint the JIT
gives them at launch for these shapes; without it loads are not vectorised or pipelined.

The compiling runs in a child process (`python -m tests.test_moe_sm90`): conftest turns on
Triton's interpreter in this one, and interpreted kernels cannot be compiled.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import triton

from molmoe.kernels import moe_gemm as G
from molmoe.kernels import moe_routing as R
from molmoe.kernels.moe_tuning import default_config

D, F_, K, E = 2048, 1024, 8, 64
SMEM_LIMIT = 232_448  # bytes of shared memory per block on H100 (227 KiB)
I32, F32 = "*i32", "*fp32"
DIV16 = {"D", "F", "s_xt", "s_dyt", "s_yt", "E", "s_lt"}
INT_PTRS = {"tile_expert_ptr", "sorted_assign_ptr", "idx_ptr", "counts_ptr", "expert_start_ptr",
            "chunk_counts_ptr", "chunk_base_ptr", "assign_row_ptr"}
F32_PTRS = {"w_ptr", "dw_ptr", "probs_ptr", "lse_ptr", "dprobs_ptr", "dlse_ptr", "dw_part_ptr",
            "part_ptr"}


def compile_sm90(kernel, consts, num_warps, num_stages):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = {a: "constexpr" if a in consts else
           I32 if a in INT_PTRS else F32 if a in F32_PTRS else
           "*bf16" if a.endswith("_ptr") else "i32" for a in names}
    # route_fwd's idx_ptr is an output of int32 too; probs etc. fp32: covered by the sets above.
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
             if a not in consts and (a.endswith("_ptr") or a in DIV16)}
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(names.index(c),): v for c, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(compiled) -> dict:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in (kv.split(":") for kv in line.split() if kv[-1].isdigit()
                                   and kv.split(":")[0] in ("REG", "STACK", "LOCAL"))}


def gemm_case(kind, kernel, block_m, extra):
    cfg = default_config(kind, torch.bfloat16, D, F_, block_m, on_gpu=True)
    consts = dict(K=K, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                  IEEE=False, **extra)
    if not kind.startswith("dw_"):
        consts["GROUP_M"] = cfg["GROUP_M"]
    # Hopper's wgmma takes 64-row warpgroup tiles; 16/32-row tiles use mma.sync.
    return (f"{kind}@{consts['BLOCK_M']}", kernel, consts, cfg["num_warps"], cfg["num_stages"],
            "wgmma" if consts["BLOCK_M"] >= 64 else "mma")


GROUPED = dict(K_PAD=1, N_PAD=1, DECODE=False)
DECODE = dict(K_PAD=K, N_PAD=K, DECODE=True)  # T = 1
CASES = [
    gemm_case("gate_up", G._gate_up_kernel, 128, dict(GROUPED, SAVE_PRE=True)),
    gemm_case("down", G._down_kernel, 128, GROUPED),
    gemm_case("down_bwd", G._down_bwd_kernel, 128, dict(NEED_DH=True)),
    gemm_case("dx", G._gate_up_bwd_dx_kernel, 128, {}),
    gemm_case("dw_gate_up", G._dw_gate_up_kernel, 128, {}),
    gemm_case("dw_down", G._dw_down_kernel, 128, {}),
    gemm_case("gate_up", G._gate_up_kernel, 16, dict(GROUPED, SAVE_PRE=False)),  # T*K/E <= 16
    gemm_case("down", G._down_kernel, 64, GROUPED),
    gemm_case("gate_up_decode", G._gate_up_kernel, 0, dict(DECODE, SAVE_PRE=False)),
    gemm_case("down_decode", G._down_kernel, 0, DECODE),
    ("combine", G._combine_kernel, dict(K=K, BLOCK_T=4, BLOCK_D=256), 4, 2, None),
    ("dw_reduce", G._dw_reduce_kernel, dict(NUM_PARTS=16, BLOCK_A=64, BLOCK_P=16), 4, 2, None),
    ("route_fwd", R._route_fwd_kernel, dict(K=K, K_PAD=K, BLOCK_T=64, BLOCK_E=E, RENORM=False),
     4, 2, None),
    ("route_bwd", R._route_bwd_kernel, dict(K=K, BLOCK_T=64, BLOCK_E=E, RENORM=True,
                                            HAS_DPROBS=True, HAS_DLSE=True), 4, 2, None),
    ("histogram", R._histogram_kernel, dict(BLOCK_A=256, BLOCK_E=E), 4, 2, None),
    ("offsets", R._offsets_kernel, dict(BLOCK_M=128, BLOCK_E=E, BLOCK_C=64, BLOCK_TILES=128),
     4, 2, None),
    ("scatter", R._scatter_kernel, dict(BLOCK_A=256, BLOCK_E=E), 4, 2, None),
]


def report() -> dict:
    """name -> {stack, local, shared, wgmma, mma, cp_async} for every case (child process)."""
    out = {}
    for name, kernel, consts, warps, stages, _ in CASES:
        try:
            compiled = compile_sm90(kernel, consts, warps, stages)
        except Exception as exc:  # reported, and the test names it
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            continue
        res, ptx = resources(compiled), compiled.asm["ptx"]
        out[name] = {"stack": res["STACK"], "local": res.get("LOCAL", 0), "regs": res["REG"],
                     "shared": compiled.metadata.shared, "wgmma": "wgmma.mma_async" in ptx,
                     "mma": "mma.sync" in ptx, "cp_async": "cp.async" in ptx}
    return out


@pytest.fixture(scope="module")
def sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget (ahead-of-time compile)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tests.test_moe_sm90"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,tensor_core", [(c[0], c[-1]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_compiles_for_h100_without_spills(sm90, name, tensor_core):
    r = sm90[name]
    assert "error" not in r, f"{name} does not compile for sm_90: {r.get('error')}"
    assert r["stack"] == 0 and r["local"] == 0, f"{name} spills registers: {r}"
    assert r["shared"] <= SMEM_LIMIT, f"{name}: {r['shared']} B of shared memory"
    if tensor_core is not None:  # a GEMM
        assert r[tensor_core], f"{name}: no {tensor_core} (tensor cores unused): {r}"
        assert r["cp_async"], f"{name}: loads not pipelined (no cp.async)"


if __name__ == "__main__":
    print(json.dumps(report()))
