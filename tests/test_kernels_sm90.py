"""Decode attention, RoPE and patch pooling, compiled for an H100 (sm_90) on a machine without one
(tests/sm90.py says how). Each case compiles to a cubin, spills no registers, fits shared memory,
and decode attention's tl.dot GEMMs run on tensor cores (mma.sync or wgmma). Speed is not checked.

Which configs: decode attention at the tile config its own `default_config` picks on a GPU for
each row count M = G*Sq; RoPE and patch pooling at every config of their candidate list that
their tile policy keeps at Molmo shapes (`autotune` may pick any of those), and the default
each launches untuned; for RoPE every
surviving (BLOCK_S, num_warps) with its HEADS rotated through the surviving values (see
`_rope_cases`). One config the RoPE prune drops is compiled as well, to show that the check
sees a spill.

Shapes, each with its reason:
  decode    MolmoE-1B Hq = Hkv = 16 (G 1) and Molmo-7B-D Hq 28 / Hkv 4 (G 7), Dh 128, bf16;
            Sq 1 (a decode step: M 16) and for 7B-D 8 (draft tokens / a short chunk: M 56 -> a
            64-row tile, the only one on wgmma); one split (the output written directly) and P
            splits (partials + combine), with and without cache_seqlens + key_padding_mask. The
            combine at P 16 (what `num_splits_heuristic` gives 7B-D at 4096 keys on 132 SMs) and
            at its cap, 128 (a 128 x 128 fp32 tile of partials in registers).
  rope      Dh 128, Hq/Hkv 16/16 and 28/4, S 1 (decode) and S 4096 (prefill), bf16, forward and
            backward. Hq and Hkv are runtime integers: they only prune (head groups), so the
            compiled configs are the union of what survives for both models.
  pool      C 2048 -> E 1024, 16 heads (D 64), one crop (M 144 cells) and 13 crops, bf16,
            with and without pad embeddings, forward and backward (C only enters the GEMMs
            around the kernel).
"""
from __future__ import annotations

import pytest
import torch
import triton

from molmoe.kernels import decode_attention as DA
from molmoe.kernels import patch_pool as PP
from molmoe.kernels import rope as RO
from tests.sm90 import Case, check, report

DH = 128
SMS = 132  # H100 SXM
DECODE_MODELS = {"molmoe": (16, 16), "7b-d": (28, 4)}  # name -> (Hq, Hkv)
ROPE_HEADS = ((16, 16), (28, 4))
ROPE_S = (1, 4096)
POOL_E, POOL_HEADS, POOL_M = 1024, 16, (144, 13 * 144)


def _decode_cases() -> list[Case]:
    cases = []
    for model, (hq, hkv) in DECODE_MODELS.items():
        g = hq // hkv
        # Sq 8 gives 7B-D a 64-row tile (wgmma); MolmoE's G*8 = 8 rows stay in the 16-row tile
        for sq in (1, 8) if g > 1 else (1,):
            block_m = max(16, triton.next_power_of_2(g * sq))
            cfg = DA.default_config(DH, block_m, on_gpu=True)
            for splits in (1, DA.num_splits_heuristic(hkv, 4096, SMS, cfg["BLOCK_N"])):
                for masks in (False, True):
                    consts = dict(G=g, SQ=sq, HEAD_DIM=DH, BLOCK_M=block_m,
                                  BLOCK_N=cfg["BLOCK_N"], NUM_SPLITS=splits, HAS_SEQLENS=masks,
                                  HAS_KPM=masks, IEEE=False)
                    if masks:
                        consts["skpm_n"] = 1  # a bool mask's unit stride: the JIT makes it 1
                    parts = "*fp32" if splits > 1 else "*bf16"  # unused `out` when P == 1
                    cases.append(Case(
                        f"decode_split-{model}-sq{sq}-P{splits}-{'masks' if masks else 'nomask'}",
                        DA._decode_split_kernel, consts, cfg["num_warps"], cfg["num_stages"],
                        types=dict(seqlens_ptr="*i32", kpm_ptr="*u8" if masks else "*bf16",
                                   part_o_ptr=parts, part_lse_ptr=parts, scale="fp32"),
                        # Dh 128 and the cache length make every stride a multiple of 16
                        divisible=frozenset({"sq_b", "sq_h", "sq_s", "sk_b", "sk_h", "sk_n",
                                             "sv_b", "sv_h", "sv_n", "skpm_b", "so_b", "so_h",
                                             "so_s", "split_len"}),
                        tensor_core="mma_any"))
    # Every candidate the policy keeps, for 16-bit and fp32 caches (fp32 runs IEEE dots as
    # FMAs with its tiles in registers: its 16-bit-sized tiles spilled up to 7.5 KB), at 16 and
    # 64 query rows (fp32 also 32): 7B-D (G 7), 16 splits, masks.
    for dtype, name, ieee, rows in ((torch.bfloat16, "bf16", False, ((1, 16), (8, 64))),
                                    (torch.float32, "fp32", True, ((1, 16), (4, 32), (8, 64)))):
        for sq, block_m in rows:
            ctx = dict(dtype=dtype, head_dim=DH, block_m=block_m)
            for i, cfg in enumerate(DA.POLICY.pruned(ctx)):
                consts = dict(G=7, SQ=sq, HEAD_DIM=DH, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
                              NUM_SPLITS=16, HAS_SEQLENS=True, HAS_KPM=True, IEEE=ieee,
                              skpm_n=1)
                cases.append(Case(
                    f"decode_split-cand{i}-{name}-m{block_m}", DA._decode_split_kernel, consts,
                    cfg["num_warps"], cfg["num_stages"],
                    types=dict(q_ptr=f"*{name}", k_ptr=f"*{name}", v_ptr=f"*{name}",
                               out_ptr=f"*{name}", seqlens_ptr="*i32", kpm_ptr="*u8",
                               part_o_ptr="*fp32", part_lse_ptr="*fp32", scale="fp32"),
                    divisible=frozenset({"sq_b", "sq_h", "sq_s", "sk_b", "sk_h", "sk_n",
                                         "sv_b", "sv_h", "sv_n", "skpm_b", "so_b", "so_h",
                                         "so_s", "split_len"}),
                    tensor_core=None if ieee else "mma_any"))
    # 7B-D at 4096 keys gets 16 splits; 128 is the cap (long caches, or the env pin).
    for sq, splits in ((1, DA.num_splits_heuristic(4, 4096, SMS, 64)), (1, DA._MAX_SPLITS),
                       (8, 16)):
        cases.append(Case(f"decode_combine-sq{sq}-P{splits}", DA._decode_combine_kernel,
                          dict(SQ=sq, HEAD_DIM=DH, NUM_SPLITS=splits,
                               BLOCK_P=triton.next_power_of_2(splits)),
                          num_warps=4, types=dict(part_o_ptr="*fp32", part_lse_ptr="*fp32"),
                          divisible=frozenset({"so_b", "so_h", "so_s"})))
    return cases


def _surviving(policy, ctxs) -> list[dict]:
    """Union, in list order, of the configs `policy` keeps for each of `ctxs`, and the config
    it would launch for each (the default, pruned)."""
    kept = [c for ctx in ctxs for c in policy.pruned(ctx)]
    kept += [policy.config(ctx, on_gpu=True) for ctx in ctxs]
    return [c for c in policy.candidates(ctxs[0]) if c in kept]


def _rope_cases() -> list[Case]:
    ctxs = [dict(Dh=DH, Hq=hq, Hkv=hkv, S_BUCKET=RO._s_bucket(s)) for s in ROPE_S
            for hq, hkv in ROPE_HEADS]
    # HEADS only scales program_id into a head range (a runtime bound of the head loop), so it
    # does not change the code's shape: each surviving (BLOCK_S, num_warps) compiles once per
    # direction, at a HEADS that rotates through the surviving values so every value is
    # compiled too (all 5 HEADS per tile compiled to identical register counts, 2x the time).
    tiles: dict[tuple, list[dict]] = {}
    for c in _surviving(RO.POLICY, ctxs):
        tiles.setdefault((c["BLOCK_S"], c["num_warps"]), []).append(c)
    cases = []
    for i, group in enumerate(tiles.values()):
        c = group[i % len(group)]
        for backward in (False, True):
            consts = dict(HALF=DH // 2, BLOCK_H=triton.next_power_of_2(DH // 2),
                          BACKWARD=backward, BLOCK_S=c["BLOCK_S"], HEADS=c["HEADS"])
            name = (f"rope_{'bwd' if backward else 'fwd'}-S{c['BLOCK_S']}"
                    f"-H{c['HEADS']}-w{c['num_warps']}")
            cases.append(Case(name, RO._rope_kernel, consts, c["num_warps"], 2,
                              types=dict(cos_ptr="*fp32", sin_ptr="*fp32"),
                              divisible=frozenset({"Dh", "sq_b", "sq_h", "sq_s", "sk_b", "sk_h",
                                                   "sk_s", "sqo_b", "sqo_h", "sqo_s", "sko_b",
                                                   "sko_h", "sko_s", "sc_b", "sc_s"})))
    return cases


def _pool_cases() -> list[Case]:
    block_d = triton.next_power_of_2(POOL_E // POOL_HEADS)
    ctxs = [dict(E=POOL_E, D=POOL_E // POOL_HEADS, M_BUCKET=PP._m_bucket(m), BLOCK_D=block_d)
            for m in POOL_M]
    cases = []
    for c in _surviving(PP.POLICY, ctxs):
        for kernel, kind in ((PP._pool_fwd_kernel, "fwd"), (PP._pool_bwd_kernel, "bwd")):
            for has_pad in (False, True):
                consts = dict(HAS_PAD=has_pad, BLOCK_D=block_d, BLOCK_M=c["BLOCK_M"])
                cases.append(Case(
                    f"pool_{kind}-M{c['BLOCK_M']}-w{c['num_warps']}-"
                    f"{'pad' if has_pad else 'nopad'}", kernel, consts, c["num_warps"],
                    2, types=dict(coef_ptr="*fp32", u_ptr="*fp32", scale="fp32"),
                    divisible=frozenset({"Gc", "G", "P", "E", "D"})))
    return cases


# A config the RoPE prune now drops: 32 positions on one warp hold 256 cos/sin values per thread
# and spilled. Compiled too, to show the spill check sees a spill (it is not a check that
# cannot fail) and that the prune's register budget is needed.
SPILLER = Case("rope_fwd-pruned-S32-H2-w1", RO._rope_kernel,
               dict(HALF=DH // 2, BLOCK_H=DH // 2, BACKWARD=False, BLOCK_S=32, HEADS=2),
               num_warps=1, types=dict(cos_ptr="*fp32", sin_ptr="*fp32"))


def sm90_cases() -> list[Case]:
    return _decode_cases() + _rope_cases() + _pool_cases() + [SPILLER]


CASES = sm90_cases()[:-1]


@pytest.fixture(scope="module")
def sm90():
    return report("tests.test_kernels_sm90")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compiles_for_h100_without_spills(sm90, case):
    check(sm90.get(case.name), case.name, case.tensor_core)


def test_cases_cover_the_configs():
    # The lists above are what the kernels would run: decode's default tile for both row counts,
    # and for RoPE / pooling more than one surviving config, forward and backward.
    names = [c.name for c in CASES]
    defaults = [n for n in names if n.startswith("decode_split-") and "-cand" not in n]
    assert len(defaults) == 12
    kept = sum(len(DA.POLICY.pruned(dict(dtype=dt, head_dim=DH, block_m=bm)))
               for dt, bms in ((torch.bfloat16, (16, 64)), (torch.float32, (16, 32, 64)))
               for bm in bms)
    assert sum(n.startswith("decode_split-cand") for n in names) == kept > 30
    assert {c.consts["BLOCK_M"] for c in CASES if c.name.startswith("decode_split")} == {
        16, 32, 64}
    for prefix in ("rope_fwd", "rope_bwd", "pool_fwd", "pool_bwd"):
        assert sum(n.startswith(prefix) for n in names) > 2, prefix
    gpu = RO.kernel_configs(on_gpu=True)
    heads = {c["HEADS"] for c in gpu}
    assert {c.consts["HEADS"] for c in CASES if c.name.startswith("rope_fwd")} == heads


def test_the_spill_check_sees_a_spill(sm90):
    r = sm90[SPILLER.name]
    assert r["stack"] > 0, f"expected {SPILLER.name} to spill: {r}"
    with pytest.raises(AssertionError, match="spills registers"):
        check(r, SPILLER.name)
    # and the prune drops it at prefill, where the same tile on 4 warps stays
    assert not RO.fits(dict(BLOCK_S=32, HEADS=2, num_warps=1), 4096, 32, DH // 2)
    assert RO.fits(dict(BLOCK_S=32, HEADS=2, num_warps=4), 4096, 32, DH // 2)
