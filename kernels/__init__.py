"""Triton kernels of molmoe, installed as `molmoe.kernels`.

Each op lives in `<op>.py`, which re-exports its plain-PyTorch reference `<op>_ref`: the very
function `molmoe.ops` defines with the op's contract (no copy, no alias of an alias).
Importing this package does not import triton; each op module does, so the reference model
runs without it.
"""
