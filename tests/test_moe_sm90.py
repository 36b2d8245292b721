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
import inspect

import pytest
import torch

from molmoe.kernels import moe_gemm as G
from molmoe.kernels import moe_routing as R
from molmoe.kernels.moe_tuning import POLICY, default_config
from tests.sm90 import Case, check, report

D, F_, K, E = 2048, 1024, 8, 64
I32, F32 = "*i32", "*fp32"
DIV16 = frozenset({"D", "F", "s_xt", "s_dyt", "s_yt", "E", "s_lt"})
INT_PTRS = {"tile_expert_ptr", "sorted_assign_ptr", "idx_ptr", "counts_ptr", "expert_start_ptr",
            "chunk_counts_ptr", "chunk_base_ptr", "assign_row_ptr", "seg_ptr", "nseg_ptr",
            "first_slot_ptr"}
F32_PTRS = {"w_ptr", "dw_ptr", "probs_ptr", "lse_ptr", "dprobs_ptr", "dlse_ptr", "dw_part_ptr",
            "part_ptr", "ws_ptr", "wsg_ptr", "wsu_ptr"}
# other pointers are bf16, other scalars i32 (tests/sm90.py); route_fwd's idx_ptr is an int32
# output, probs etc. fp32: covered by the sets above.
TYPES = {**{a: I32 for a in INT_PTRS}, **{a: F32 for a in F32_PTRS}}


def case(name, kernel, consts, num_warps, num_stages, tensor_core):
    return Case(name, kernel, consts, num_warps, num_stages, types=TYPES, divisible=DIV16,
                tensor_core=tensor_core)


DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
TMA_KINDS = ("gate_up", "down", "gate_up_decode", "down_decode")


def _arg_names(kernel):
    fn = kernel
    while hasattr(fn, "fn"):  # the JIT (or interpreter) wrapper of the Python function
        fn = fn.fn
    return list(inspect.signature(fn).parameters)


def gemm_case(kind, kernel, block_m, extra, dtype=torch.bfloat16, cfg=None, tag=""):
    """`kind`'s kernel at `cfg` (default: its default config for `dtype`), activations and
    weights in `dtype` (the integer and fp32 pointers as TYPES says)."""
    cfg = cfg or default_config(kind, dtype, D, F_, block_m, on_gpu=True)
    bm = cfg["BLOCK_M"] or block_m
    consts = dict(K=K, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                  IEEE=dtype == torch.float32, **extra)
    if kind in TMA_KINDS:  # as launched on aligned 16-bit weights (fp32: pointer loads)
        consts["TMA"] = dtype != torch.float32
    if not kind.startswith("dw_"):
        consts["GROUP_M"] = cfg["GROUP_M"]
    name = DTYPES[dtype]
    types = {**{a: f"*{name}" for a in _arg_names(kernel) if a.endswith("_ptr")}, **TYPES}
    # Hopper's wgmma takes 64-row warpgroup tiles; 16/32-row tiles use mma.sync.
    return Case(f"{kind}@{bm}{'' if dtype == torch.bfloat16 else '-' + name}{tag}", kernel,
                consts, cfg["num_warps"], cfg["num_stages"], types=types, divisible=DIV16,
                # fp32 runs IEEE dots: FMAs, no tensor cores
                tensor_core=None if dtype == torch.float32 else "wgmma" if bm >= 64 else "mma")


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
    case("dw_split_reduce", G._dw_split_reduce_kernel, dict(BLOCK=1024), 4, 2, None),
    case("route_fwd", R._route_fwd_kernel, dict(K=K, K_PAD=K, BLOCK_T=64, BLOCK_E=E, RENORM=False),
         4, 2, None),
    case("route_bwd", R._route_bwd_kernel, dict(K=K, BLOCK_T=64, BLOCK_E=E, RENORM=True,
                                                HAS_DPROBS=True, HAS_DLSE=True), 4, 2, None),
    case("histogram", R._histogram_kernel, dict(BLOCK_A=256, BLOCK_E=E), 4, 2, None),
    case("offsets", R._offsets_kernel, dict(BLOCK_M=128, BLOCK_E=E, BLOCK_C=64, BLOCK_TILES=128),
         4, 2, None),
    case("scatter", R._scatter_kernel, dict(BLOCK_A=256, BLOCK_E=E), 4, 2, None),
]


# The defaults in every dtype: fp32 tiles take twice the shared memory of bf16 ones (the fp32 dx
# default once needed 262,144 B against the 232,448 B limit and spilled).
KERNELS = {"gate_up": (G._gate_up_kernel, dict(GROUPED, SAVE_PRE=True)),
           "down": (G._down_kernel, GROUPED), "down_bwd": (G._down_bwd_kernel, dict(NEED_DH=True)),
           "dx": (G._gate_up_bwd_dx_kernel, {}), "dw_gate_up": (G._dw_gate_up_kernel, {}),
           "dw_down": (G._dw_down_kernel, {}),
           "gate_up_decode": (G._gate_up_kernel, dict(DECODE, SAVE_PRE=False)),
           "down_decode": (G._down_kernel, DECODE)}
for _dtype in (torch.float16, torch.float32):
    for _kind, (_kernel, _extra) in KERNELS.items():
        CASES.append(gemm_case(_kind, _kernel, 0 if _kind.endswith("_decode") else 128, _extra,
                               _dtype))
# Every candidate the fp32 prune keeps, each kind at 128-row tiles: fp32 is where shared
# memory (twice bf16's) and registers (IEEE dots run as FMAs) run out first.
_FP32 = {kind: POLICY.pruned(dict(kind=kind, dtype=torch.float32, D=D, F=F_,
                                  block_m=0 if kind.endswith("_decode") else 128))
         for kind in KERNELS}
CASES += [gemm_case(kind, KERNELS[kind][0], 0 if kind.endswith("_decode") else 128,
                    KERNELS[kind][1], torch.float32, c, f"-cand{i}")
          for kind, kept in _FP32.items() for i, c in enumerate(kept)]
_FP32_DX = _FP32["dx"]
# dx reading an interleaved gate|up weight (rows 2D apart; MoEFFN.interleave_'s layout, which
# models loaded by molmoe.load have) at the bf16 / fp16 defaults and every kept bf16 candidate.
# fp32 copies the two weights instead (an fp32 candidate spilled 8 B reading rows 2D apart).
CASES += [gemm_case("dx", G._gate_up_bwd_dx_kernel, 128, dict(INTERLEAVED=True), dt,
                    tag="-interleaved") for dt in (torch.bfloat16, torch.float16)]
CASES += [gemm_case("dx", G._gate_up_bwd_dx_kernel, 128, dict(INTERLEAVED=True), torch.bfloat16,
                    c, f"-cand{i}-interleaved")
          for i, c in enumerate(POLICY.pruned(dict(kind="dx", dtype=torch.bfloat16, D=D, F=F_,
                                                   block_m=128)))]
# Every bf16 candidate the prune keeps for the backward kinds at 128-row tiles: their shared
# memory estimate once counted num_stages - 1 buffers where the compiled pipeline keeps
# num_stages (five dx candidates were over the limit).
for _kind in ("down_bwd", "dx", "dw_gate_up", "dw_down"):
    CASES += [gemm_case(_kind, KERNELS[_kind][0], 128, KERNELS[_kind][1], torch.bfloat16, c,
                        f"-cand{i}")
              for i, c in enumerate(POLICY.pruned(dict(kind=_kind, dtype=torch.bfloat16, D=D,
                                                       F=F_, block_m=128)))]
# Every bf16 candidate kept for the TMA kernels at 128-row tiles: their shared memory counts
# num_stages buffers (the estimate must hold for what autotune may pick).
for _kind in ("gate_up", "down"):
    CASES += [gemm_case(_kind, KERNELS[_kind][0], 128, KERNELS[_kind][1], torch.bfloat16, c,
                        f"-cand{i}")
              for i, c in enumerate(POLICY.pruned(dict(kind=_kind, dtype=torch.bfloat16, D=D,
                                                       F=F_, block_m=128)))]

# Every bf16 candidate kept for the decode path (T <= 8: one program per selected expert and
# column tile, tokens as rows; autotune may pick any of them).
for _kind in ("gate_up_decode", "down_decode"):
    CASES += [gemm_case(_kind, KERNELS[_kind][0], 0, KERNELS[_kind][1], torch.bfloat16, c,
                        f"-cand{i}")
              for i, c in enumerate(POLICY.pruned(dict(kind=_kind, dtype=torch.bfloat16, D=D,
                                                       F=F_, block_m=0)))]


# The grouped forward GEMMs as launched by default in fp16/bf16: persistent kernels (a fixed
# grid striding over the real tiles; fp32 keeps one program per tile). The default of each
# 16-bit dtype at 128-, 64- and 16-row tiles and every bf16 candidate the policy keeps at 128
# rows, each as `<case>-persistent`; the one-program-per-tile kernels are the cases above.
PERSISTENT_KERNELS = {"gate_up": (G._gate_up_persistent_kernel, dict(SAVE_PRE=True)),
                      "down": (G._down_persistent_kernel, {})}
PERSISTENT = []
for _kind, (_kernel, _extra) in PERSISTENT_KERNELS.items():
    for _dtype in (torch.bfloat16, torch.float16):
        for _bm in (128, 64, 16):
            PERSISTENT.append(gemm_case(_kind, _kernel, _bm, _extra, _dtype, tag="-persistent"))
    for i, c in enumerate(POLICY.pruned(dict(kind=_kind, dtype=torch.bfloat16, D=D, F=F_,
                                             block_m=128))):
        PERSISTENT.append(gemm_case(_kind, _kernel, 128, _extra, torch.bfloat16, c,
                                    f"-cand{i}-persistent"))
CASES += PERSISTENT


def test_forward_gemms_have_a_persistent_form(sm90):
    # Issue 15: the persistent grouped forward (the 16-bit default) compiles for bf16 / fp16 and
    # every kept bf16 candidate without spills (test_compiles_for_h100_without_spills), with
    # TMA and gate_up's one 2 BLOCK_N wide dot (the tests above), and its tile loop is there.
    assert len(PERSISTENT) >= 2 * 2 * 3 + 8
    for c in PERSISTENT:
        r = sm90[c.name]
        assert "error" not in r and r["tma"] and r["dots"] == 1, (c.name, r)
    for name in ("gate_up@128-persistent", "down@128-persistent"):
        assert sm90[name]["wgmma"] and sm90[name]["wgmma_n"] >= 128, (name, sm90[name])


def sm90_cases() -> list[Case]:
    return CASES


def test_gate_up_is_one_wide_dot(sm90):
    # Issue 15: gate_up reads the interleaved (E, 2F, D) gate|up weight and runs ONE dot per K
    # step (not one per projection), 2 BLOCK_N wide: wgmma n = 256 at the 128-row default
    # (bf16 and fp16), n >= 128 for every 16-bit gate_up case on wgmma (64+ rows: defaults and
    # every kept bf16 candidate), with TMA still feeding it (test below).
    for name in ("gate_up@128", "gate_up@128-fp16"):
        assert sm90[name]["wgmma_n"] == 256, (name, sm90[name])
    gate_up = [c for c in CASES if c.name.startswith("gate_up")]
    assert len(gate_up) >= 8
    for c in gate_up:
        r = sm90[c.name]
        assert r["dots"] == 1, (c.name, r)
        if c.tensor_core == "wgmma":
            assert r["wgmma_n"] >= 128 and r["wgmma_n"] == 2 * c.consts["BLOCK_N"], (c.name, r)


def test_forward_gemms_load_weights_by_tma(sm90):
    # Issue 15: cp.async.bulk.tensor in MoE gate_up and down (every dtype, default and kept
    # fp32 candidates): the weight tiles (and down's sorted h rows) come by TMA.
    cases = [c for c in CASES if c.consts.get("TMA")]
    assert {c.name.split("@")[0] for c in cases} == set(TMA_KINDS)
    assert {c.name for c in cases if "fp16" in c.name}  # bf16 and fp16
    for c in cases:
        assert sm90[c.name]["tma"], f"{c.name}: no cp.async.bulk.tensor"


def test_fp32_dx_has_fitting_candidates():
    assert _FP32_DX, "no fp32 dx candidate fits sm_90"


@pytest.fixture(scope="module")
def sm90():
    return report("tests.test_moe_sm90", timeout=600)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compiles_for_h100_without_spills(sm90, case):
    # GEMMs: the tensor-core instruction and cp.async pipelining (a pipeliner that gave up)
    check(sm90.get(case.name), case.name, case.tensor_core,
          cp_async="BLOCK_K" in case.consts)
