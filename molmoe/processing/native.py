"""The `molmoe::preprocess_crops` op: crops and masks of one image, on the CPU or a GPU.

Three implementations of one contract (docs/preprocessing.md):
  * CPU, native: `csrc/preprocess.cpp`, built by setup.py into `molmoe/_native*.so` and loaded
    here with `torch.ops.load_library`. Reads the uint8 image directly, multi-threaded.
  * CUDA: `crops_torch` below, torch ops on the device (the uint8 image is uploaded once).
  * The Python path (`preprocess.resize_and_pad` + `patchify`), the reference both are tested
    against. It is what runs on the CPU when the extension is missing: `native_available()`
    says so, and the first use warns once, with how to build it.

`MOLMOE_PREPROCESS=python` forces the Python path on the CPU (to compare, or to rule the op out);
a CUDA device always takes the CUDA path.
"""
from __future__ import annotations

import functools
import importlib.machinery
import os
import pathlib
import threading
import warnings

import torch
import torch.nn.functional as F

from molmoe.errors import UsageError

SCHEMA = ("preprocess_crops(Tensor image, int[] canvas, int[] canvas_resized, "
          "int[] global_resized, int[] tiling, int crop, int stride, int patch, float[] mean, "
          "float[] std, bool normalize) -> (Tensor, Tensor)")
BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the molmoe checkout "
              "(needs a C++ compiler; scripts/bootstrap.sh does this)")
BACKENDS = ("auto", "native", "python")


class NativeUnavailableError(UsageError):
    """preprocess="native" was asked for, but the extension is not built."""


def _library_path() -> pathlib.Path | None:
    here = pathlib.Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_native{suffix}"
        if path.exists():
            return path
    return None


_LOCK = threading.Lock()  # first uses race in thread pools (serving, generate_many)


def _load() -> str | None:
    """Load the extension and register the CUDA path, once; the reason it is missing, else None."""
    with _LOCK:
        return _load_locked()


@functools.cache
def _load_locked() -> str | None:
    if os.environ.get("MOLMOE_NO_NATIVE") == "1":
        why = "MOLMOE_NO_NATIVE=1"
    elif (path := _library_path()) is None:
        why = "the extension molmoe/_native*.so is not built"
    else:
        try:
            torch.ops.load_library(str(path))
            why = None
        except (OSError, RuntimeError) as e:  # built for another torch, or a broken file
            why = f"loading {path.name} failed: {str(e).splitlines()[0]}"
    if why is not None:
        # Define the op ourselves so the CUDA path exists without the extension.
        _LIBS.append(torch.library.Library("molmoe", "DEF"))
        _LIBS[-1].define(SCHEMA)
    impl = torch.library.Library("molmoe", "IMPL")
    impl.impl("preprocess_crops", crops_torch, "CUDA")
    _LIBS.append(impl)
    return why


_LIBS: list = []  # keeps the torch.library registrations alive


def native_available() -> bool:
    return _load() is None


def _warn_fallback(why: str) -> None:
    with _LOCK:
        _warn_fallback_locked(why)


@functools.cache
def _warn_fallback_locked(why: str) -> None:
    # warn_explicit with a file that has no source line: one line on stderr, still a warning
    # (filterable, and pytest.warns sees it).
    warnings.warn_explicit(f"native image preprocessing unavailable ({why}); using the Python "
                           f"path, about 10x slower; {BUILD_HINT}", RuntimeWarning,
                           filename="molmoe", lineno=0, module="molmoe.processing.native")


def choose(backend: str | None, device) -> str:
    """"native", "python" or "cuda" for this call; warns once when native falls back."""
    source = "preprocess backend"
    if not backend and os.environ.get("MOLMOE_PREPROCESS"):
        backend, source = os.environ["MOLMOE_PREPROCESS"], "MOLMOE_PREPROCESS"
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise UsageError(f"{source} {backend!r} is not one of {', '.join(BACKENDS)}")
    if device is not None and torch.device(device).type == "cuda":
        _load()
        return "cuda"
    if backend == "python":
        return "python"
    why = _load()
    if why is None:
        return "native"
    if backend == "native":
        raise NativeUnavailableError(f"native image preprocessing was asked for, but {why}; "
                                     f"{BUILD_HINT}")
    _warn_fallback(why)
    return "python"


def preprocess_crops(image_HWC: torch.Tensor, *, canvas, canvas_resized, global_resized, tiling,
                     crop: int, stride: int, patch: int, mean, std,
                     normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [T, P, p*p*3] float32, masks [T, P] float32) through the op (CPU or CUDA)."""
    return torch.ops.molmoe.preprocess_crops(
        image_HWC, list(canvas), list(canvas_resized), list(global_resized), list(tiling),
        crop, stride, patch, [float(m) for m in mean], [float(s) for s in std], normalize)


_streams = threading.local()


def crops_on_device(image_HWC: torch.Tensor, device: torch.device,
                    **args) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on a CUDA device, on a side stream of this thread, so it overlaps the model's work
    on the default stream (serving preprocesses in a pool of threads while the engine runs).

    The uint8 image is uploaded once, from pinned memory. This returns when the outputs are
    ready; they are marked as used by the device's default stream, where the model reads them,
    so the caching allocator does not reuse their memory early.
    """
    streams = getattr(_streams, "by_device", None)
    if streams is None:
        streams = _streams.by_device = {}
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
    pinned = image_HWC.contiguous().pin_memory()
    with torch.cuda.stream(stream):
        src = pinned.to(device, non_blocking=True)
        images, masks = preprocess_crops(src, **args)
    stream.synchronize()  # also keeps `pinned` alive until the upload is done
    consumer = torch.cuda.default_stream(device)
    images.record_stream(consumer)
    masks.record_stream(consumer)
    return images, masks


def crops_torch(image: torch.Tensor, canvas, canvas_resized, global_resized, tiling, crop: int,
                stride: int, patch: int, mean, std,
                normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op in torch ops, on the image's device (the CUDA implementation).

    Same steps as the Python path; on a CUDA device torch's antialiased resize is a different
    kernel (one 2-D pass), so results agree within about 1e-6, not bit for bit.
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise UsageError(f"preprocess_crops: expected a uint8 [H, W, 3] image, got {image.dtype} "
                         f"{list(image.shape)}")
    device = image.device
    x_13HW = image.permute(2, 0, 1)[None].float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)

    def view(out_hw, new_hw):
        out_h, out_w = out_hw
        new_h, new_w = new_hw
        y = x_13HW
        if (new_h, new_w) != tuple(y.shape[-2:]):
            y = F.interpolate(y, size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=True)
            if new_w == 1 and new_h != x_13HW.shape[-2]:
                # ATen's CPU kernel repeats output row 0 down a 1-px-wide resized column (see
                # csrc/preprocess.cpp, torch_width1_rows); the reference inherits it, and so
                # does every device here.
                y = y[:, :, :1].expand(-1, -1, new_h, -1)
        y_HWC = y[0].clamp(0.0, 1.0).permute(1, 2, 0)
        top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
        canvas_HWC = torch.zeros(out_h, out_w, 3, dtype=torch.float32, device=device)
        canvas_HWC[top:top + new_h, left:left + new_w] = y_HWC
        if normalize:
            canvas_HWC = (canvas_HWC - mean_t) / std_t
        return canvas_HWC, (top, left, new_h, new_w)

    th, tw = tiling
    p, pps = patch, crop // patch
    glob, _ = view((crop, crop), global_resized)
    tiles, (top, left, nh, nw) = view(canvas, canvas_resized)
    # Crops of the canvas as a strided view, then patches (dy, dx, c): [th, tw, crop, crop, 3].
    s0, s1, s2 = tiles.stride()
    crops = tiles.as_strided((th, tw, crop, crop, 3), (stride * s0, stride * s1, s0, s1, s2))
    crops = crops.reshape(th * tw, crop, crop, 3)
    all_crops = torch.cat([glob[None], crops])
    images = (all_crops.reshape(-1, pps, p, pps, p, 3).permute(0, 1, 3, 2, 4, 5)
              .reshape(-1, pps * pps, p * p * 3))
    # Masks: valid rows x valid columns per tile patch, / p*p (exact counts, one division).
    ar = torch.arange(pps, device=device) * p
    def count(origins, lo, hi):  # noqa: E306
        start = origins[:, None] + ar[None]
        return (torch.minimum(start + p, torch.tensor(hi, device=device))
                - torch.maximum(start, torch.tensor(lo, device=device))).clamp_(min=0)
    rows = count(torch.arange(th, device=device) * stride, top, top + nh)   # [th, pps]
    cols = count(torch.arange(tw, device=device) * stride, left, left + nw)  # [tw, pps]
    valid = rows[:, None, :, None] * cols[None, :, None, :]                  # [th, tw, pps, pps]
    masks = valid.reshape(th * tw, pps * pps).float() / float(p * p)
    masks = torch.cat([masks, torch.full((1, pps * pps), -1.0, device=device)])
    return images.contiguous(), masks
