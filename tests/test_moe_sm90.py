"""The MoE kernels, compiled for an H100 (sm_90) on a machine without one.

Triton compiles ahead of time for a named target with the ptxas it ships, so the default H100
configs (molmoe.kernels.moe_tuning.default_config at MolmoE-1B's D 2048, F 1024, K 8, bf16) are
checked where no GPU is: each kernel compiles, spills no registers, fits shared memory, and the
GEMMs use Hopper's wgmma with cp.async pipelining. This says nothing about speed; it catches what
the interpreter cannot (compile errors, spills, a pipeliner that gave up).

Integer arguments that are multiples of 16 (D, F, row strides) get the divisibility hint the JIT
gives them at launch for these shapes; without it loads are not vectorised or pipelined.

The compiling and the resource reading are tests/sm90.py's: in a child process, since conftest
turns on Triton's interpreter in this one and interpreted kernels cannot be compiled.
"""
import pytest
import torch

from molmoe.kernels import moe_gemm as G
from molmoe.kernels import moe_routing as R
from molmoe.kernels.moe_tuning import default_config
from tests.sm90 import Case, check, report

D, F_, K, E = 2048, 1024, 8, 64
I32, F32 = "*i32", "*fp32"
DIV16 = frozenset({"D", "F", "s_xt", "s_dyt", "s_yt", "E", "s_lt"})
INT_PTRS = {"tile_expert_ptr", "sorted_assign_ptr", "idx_ptr", "counts_ptr", "expert_start_ptr",
            "chunk_counts_ptr", "chunk_base_ptr", "assign_row_ptr"}
F32_PTRS = {"w_ptr", "dw_ptr", "probs_ptr", "lse_ptr", "dprobs_ptr", "dlse_ptr", "dw_part_ptr",
            "part_ptr"}
# other pointers are bf16, other scalars i32 (tests/sm90.py); route_fwd's idx_ptr is an int32
# output, probs etc. fp32: covered by the sets above.
TYPES = {**{a: I32 for a in INT_PTRS}, **{a: F32 for a in F32_PTRS}}


def case(name, kernel, consts, num_warps, num_stages, tensor_core):
    return Case(name, kernel, consts, num_warps, num_stages, types=TYPES, divisible=DIV16,
                tensor_core=tensor_core)


def gemm_case(kind, kernel, block_m, extra):
    cfg = default_config(kind, torch.bfloat16, D, F_, block_m, on_gpu=True)
    consts = dict(K=K, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                  IEEE=False, **extra)
    if not kind.startswith("dw_"):
        consts["GROUP_M"] = cfg["GROUP_M"]
    # Hopper's wgmma takes 64-row warpgroup tiles; 16/32-row tiles use mma.sync.
    return case(f"{kind}@{consts['BLOCK_M']}", kernel, consts, cfg["num_warps"], cfg["num_stages"],
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
    case("combine", G._combine_kernel, dict(K=K, BLOCK_T=4, BLOCK_D=256), 4, 2, None),
    case("dw_reduce", G._dw_reduce_kernel, dict(NUM_PARTS=16, BLOCK_A=64, BLOCK_P=16), 4, 2, None),
    case("route_fwd", R._route_fwd_kernel, dict(K=K, K_PAD=K, BLOCK_T=64, BLOCK_E=E, RENORM=False),
         4, 2, None),
    case("route_bwd", R._route_bwd_kernel, dict(K=K, BLOCK_T=64, BLOCK_E=E, RENORM=True,
                                                HAS_DPROBS=True, HAS_DLSE=True), 4, 2, None),
    case("histogram", R._histogram_kernel, dict(BLOCK_A=256, BLOCK_E=E), 4, 2, None),
    case("offsets", R._offsets_kernel, dict(BLOCK_M=128, BLOCK_E=E, BLOCK_C=64, BLOCK_TILES=128),
         4, 2, None),
    case("scatter", R._scatter_kernel, dict(BLOCK_A=256, BLOCK_E=E), 4, 2, None),
]


def sm90_cases() -> list[Case]:
    return CASES


@pytest.fixture(scope="module")
def sm90():
    return report("tests.test_moe_sm90", timeout=600)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compiles_for_h100_without_spills(sm90, case):
    # GEMMs: the tensor-core instruction and cp.async pipelining (a pipeliner that gave up)
    check(sm90.get(case.name), case.name, case.tensor_core,
          cp_async=case.tensor_core is not None)
