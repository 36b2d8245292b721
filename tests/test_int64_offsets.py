"""Offsets past 2^31 elements: the kernels index with 64-bit arithmetic where a product of batch /
head / sequence strides can pass 2^31 (issue 15: a MolmoE cache of 16 kv heads x 128 x 32k at
batch 32 is 2^31 elements).

How, without a GPU and without 4 GiB of RAM: each big input is a strided view into a sparse
file mapped into memory (`np.memmap` of a truncated file), with a batch stride of 2^30 + 64
elements, so batch 2 starts past element 2^31. Only the pages the
test writes and the kernel reads are ever backed by memory. The stride fits int32 (the
interpreter, like the GPU JIT, passes it as i32), so only the product b * stride passes 2^31:
with int32 offsets batch 2 reads from a wrapped, negative address (a crash or garbage). (Terms
added to a pointer one by one are each widened, so it is the products that must be int64.) Each case
runs in a child process so that a crash is a failed test, not a dead test run. The reference
runs on a small contiguous copy of the same view.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = textwrap.dedent("""
    import os, sys, numpy as np, torch
    BIG = 2**30 + 64  # a stride that fits int32; batch 2 starts past element 2^31

    def sparse_view(name, shape, dtype, batch_stride=BIG):
        # (B, ...) contiguous per batch, batch b at element b * batch_stride of a sparse file
        inner = 1
        for s in shape[1:]:
            inner *= s
        numel = (shape[0] - 1) * batch_stride + inner
        path = os.path.join(sys.argv[1], name)
        with open(path, "wb") as f:
            f.truncate(numel * torch.empty((), dtype=dtype).element_size())
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
        base = torch.from_numpy(np.memmap(path, dtype=np_dtype, mode="r+", shape=(numel,)))
        strides = (batch_stride,) + torch.empty(shape[1:], device="meta").stride()
        view = base.as_strided(shape, strides)
        view.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(len(name))))
        return view

    def close(out, ref, tol):
        err = (out.float() - ref.float()).abs().max().item()
        assert err < tol, f"max error {err}"
        print("ok", err)
""")

CASES = {
    # q, k, v (3, 2, 32, 16): batch 2 of each starts at element 2^31 + 128; forward + backward
    "attention": """
        from molmoe.kernels.attention import attention, attention_ref
        q, k, v = (sparse_view(n, (3, 2, 32, 16), torch.float32) for n in ("q", "kk", "vvv"))
        assert q[2].data_ptr() - q.data_ptr() == 2 * BIG * 4 > 2**31 * 4
        qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
        out = attention(qs, ks, vs, causal=True)
        qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
        ref = attention_ref(qc, kc, vc, causal=True)
        close(out, ref, 1e-4)
        do = torch.randn_like(ref)
        got = torch.autograd.grad(out, (qs, ks, vs), do)
        want = torch.autograd.grad(ref, (qc, kc, vc), do)
        for g, w in zip(got, want):
            close(g, w, 1e-3)
    """,
    # a (3, 2, 64, 16) cache whose batch 2 starts at element 2^31 + 128, 1 and 2 splits
    "decode_attention": """
        from molmoe.kernels.decode_attention import decode_attention, decode_attention_ref
        k, v = (sparse_view(n, (3, 2, 64, 16), torch.float16) for n in ("k", "vv"))
        q = torch.randn(3, 4, 1, 16, dtype=torch.float16)
        for splits in (1, 2):
            out = decode_attention(q, k, v, num_splits=splits)
            ref = decode_attention_ref(q.float(), k.float(), v.float())
            close(out, ref, 2e-3)
    """,
    # x (3, 32) with a row stride of 2^30 + 64: token 2's row starts past element 2^31
    "moe": """
        from molmoe.kernels.moe import moe_ffn, moe_ffn_ref
        x = sparse_view("x", (3, 32), torch.float32)
        g = torch.Generator().manual_seed(0)
        E, F_ = 4, 16
        rw = torch.randn(E, 32, generator=g)
        wg, wu = torch.randn(E, F_, 32, generator=g), torch.randn(E, F_, 32, generator=g)
        wd = torch.randn(E, 32, F_, generator=g)
        for path in ("grouped", "decode"):
            y = moe_ffn(x, rw, wg, wu, wd, 2, path=path)[0]
            close(y, moe_ffn_ref(x.clone(), rw, wg, wu, wd, 2)[0], 1e-3)
        xs = x.detach().requires_grad_()
        xc = x.detach().clone().requires_grad_()
        y = moe_ffn(xs, rw, wg, wu, wd, 2)[0]
        ref = moe_ffn_ref(xc, rw, wg, wu, wd, 2)[0]
        dy = torch.randn_like(ref)
        close(torch.autograd.grad(y, xs, dy)[0], torch.autograd.grad(ref, xc, dy)[0], 1e-3)
    """,
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_offsets_past_2_31_elements(op, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = PRELUDE + textwrap.dedent(CASES[op])
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{op}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert proc.stdout.count("ok") >= 1
