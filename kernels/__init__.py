"""Triton kernels of molmoe, installed as `molmoe.kernels`.

Each op lives in `<op>.py` beside its plain-PyTorch reference `<op>_ref`. Importing this package
does not import triton; each op module does, so the reference model runs without it.
"""
