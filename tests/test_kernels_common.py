"""The helpers the kernel launchers share (kernels/_common.py): no kernel runs here."""
import pytest
import torch

from molmoe.kernels._common import (check_launch_device, check_qkv, on_interpreter,
                                    parse_tile_config)

ENV = "MOLMOE_X_CONFIG"


def test_parse_tile_config():
    assert parse_tile_config(ENV, " BLOCK_M = 64, num_warps=4 ", "BLOCK_M=64") == \
        dict(BLOCK_M=64, num_warps=4)
    # the message names the variable, the bad value and an example
    for bad in ("BLOCK_M", "BLOCK_M=big", "BLOCK_M=1=2", "", "BLOCK_M=64,,num_warps=4"):
        with pytest.raises(ValueError, match=f"{ENV}='{bad}': expected 'BLOCK_M=64,num_warps=4'"):
            parse_tile_config(ENV, bad, "BLOCK_M=64,num_warps=4")
    with pytest.raises(ValueError, match=r"missing \['BLOCK_N', 'num_warps'\]"):
        parse_tile_config(ENV, "BLOCK_M=64", "x", required=("BLOCK_M", "BLOCK_N", "num_warps"))
    # `entry`: one part of a larger value is parsed, the whole value is reported
    assert parse_tile_config(ENV, "a;b:BLOCK_N=32", "x", entry="BLOCK_N=32") == dict(BLOCK_N=32)
    with pytest.raises(ValueError, match=f"{ENV}='a;b:BLOCK_N=z'"):
        parse_tile_config(ENV, "a;b:BLOCK_N=z", "x", entry="BLOCK_N=z")


def test_on_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert on_interpreter(torch.device("cpu"))
    assert not on_interpreter(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert on_interpreter(torch.device("cuda"))


def test_check_qkv_sizes_and_messages():
    q, k = torch.empty(2, 6, 3, 32), torch.empty(2, 3, 5, 32)
    assert check_qkv("op", q, k, k) == (2, 6, 3, 32, 3, 5)
    cases = [
        ((q, k, k[:, :, :4]), "op: expected q .* kc == vc .* vc \\(2, 3, 4, 32\\)"),
        ((q, k[:1], k[:1]), "op: batch/head dim mismatch: q \\(2, 6, 3, 32\\), kc"),
        ((q[:, :4], k, k), "op: 4 query heads not a multiple of 3 kv heads"),
        ((q[..., :24], k[..., :24], k[..., :24]), "op: head dim 24 unsupported"),
        ((q.int(), k.int(), k.int()), "op: dtype torch.int32 unsupported"),
        ((q, k, k.half()), "op: dtypes differ: q torch.float32, kc torch.float32, "
                           "vc torch.float16"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_qkv("op", *args, k_name="kc", v_name="vc")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    # Before kernels/_common.py this check read `not on_interpreter(d) and d.type != "cuda"`,
    # which is never true: CPU tensors without TRITON_INTERPRET reached the launch.
    from molmoe.kernels.attention import attention
    from molmoe.kernels.decode_attention import decode_attention
    from molmoe.kernels.moe import moe_ffn

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_launch_device("op", torch.device("cpu"))  # the interpreter takes CPU tensors
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_launch_device("op", torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match="op: Triton needs CUDA tensors"):
        check_launch_device("op", torch.device("cpu"))
    with pytest.raises(ValueError, match="^attention: Triton needs CUDA tensors"):
        attention(q, q, q)
    with pytest.raises(ValueError, match="^decode_attention: Triton needs CUDA tensors"):
        decode_attention(q, q, q)
    x, w = torch.randn(3, 16), torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="^moe_ffn: Triton needs CUDA tensors"):
        moe_ffn(x, torch.randn(2, 16), w, w, torch.randn(2, 16, 8), 1)


def _policy(**kw):
    from molmoe.kernels._common import TilePolicy, element_size

    def fits(c, ctx):  # a shared-memory rule scaled by the element size, as the kernels' are
        return c["BLOCK_N"] * 1024 * element_size(ctx["dtype"]) <= 200_000

    return TilePolicy("x", ENV, ("BLOCK_N", "num_warps"), example="BLOCK_N=64,num_warps=4",
                      candidates=lambda ctx: [dict(BLOCK_N=n, num_warps=4) for n in (32, 64, 128)],
                      fits=fits, default=lambda ctx: dict(BLOCK_N=128, num_warps=8),
                      interpreter=lambda ctx: dict(BLOCK_N=16, num_warps=1), **kw)


def test_tile_policy_prunes_by_dtype_and_fixes_the_default(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    p = _policy()
    bf16, fp32 = dict(dtype=torch.bfloat16), dict(dtype=torch.float32)
    assert [c["BLOCK_N"] for c in p.pruned(bf16)] == [32, 64]
    assert [c["BLOCK_N"] for c in p.pruned(fp32)] == [32]  # twice the bytes per element
    # the default (128) fits neither: the closest fitting candidate replaces it
    assert p.config(bf16, on_gpu=True) == dict(BLOCK_N=32, num_warps=4)
    assert p.config(bf16, on_gpu=False) == dict(BLOCK_N=16, num_warps=1)  # interpreter: fixed
    # a pin overrides the names it gives, over whatever would be used
    monkeypatch.setenv(ENV, "num_warps = 2")
    assert p.config(bf16, on_gpu=True) == dict(BLOCK_N=32, num_warps=2)
    assert p.config(bf16, on_gpu=False) == dict(BLOCK_N=16, num_warps=2)


def test_tile_policy_warns_once_when_nothing_fits(monkeypatch):
    import warnings

    monkeypatch.delenv(ENV, raising=False)
    p = _policy()
    fp64 = dict(dtype=torch.float64)  # 8-byte elements: no candidate fits the rule
    assert p.pruned(fp64) == []
    with pytest.warns(RuntimeWarning,
                      match=r"x: no tile config fits .*\(pin one with MOLMOE_X_CONFIG\)"):
        assert p.config(fp64, on_gpu=True) == dict(BLOCK_N=128, num_warps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.config(fp64, on_gpu=True)  # said once
        p.config(dict(dtype=torch.bfloat16), on_gpu=True)  # something fits: no warning


def test_tile_policy_pin_errors_name_the_valid_keys(monkeypatch):
    p = _policy()
    monkeypatch.setenv(ENV, "BLOK_N=64")
    with pytest.raises(ValueError, match=rf"{ENV}='BLOK_N=64': unknown name\(s\) \['BLOK_N'\]; "
                                         r"valid names: \['BLOCK_N', 'num_warps'\]"):
        p.config(dict(dtype=torch.float16), on_gpu=True)
    monkeypatch.setenv(ENV, "BLOCK_N=48")
    with pytest.raises(ValueError, match="BLOCK_N=48 must be a power of two"):
        p.pinned()
    monkeypatch.setenv(ENV, "BLOCK_N")
    with pytest.raises(ValueError, match="expected 'BLOCK_N=64,num_warps=4'"):
        p.pinned()


def test_tile_policy_autotune_skips_failures_and_remembers(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    p = _policy()
    ctx = dict(dtype=torch.bfloat16)
    seen = []

    def bench(run):  # 32 "runs out of resources"; 64 is the fastest that runs
        cfg = p.config(ctx, on_gpu=True)
        seen.append(cfg["BLOCK_N"])
        if cfg["BLOCK_N"] == 32:
            raise RuntimeError("OutOfResources: shared memory")
        return 1.0

    assert p.autotune(ctx, lambda: None, bench=bench) == dict(BLOCK_N=64, num_warps=4)
    assert seen == [32, 64]  # only pruned candidates are timed
    assert p.config(ctx, on_gpu=True) == dict(BLOCK_N=64, num_warps=4)  # no tuning here

    def fail(run):
        raise RuntimeError("nothing compiles")

    assert p.autotune(ctx, lambda: None, bench=fail) is None
    assert p.config(ctx, on_gpu=True) == dict(BLOCK_N=32, num_warps=4)  # back to the default
