"""Every image a user has -> RGB uint8 [H, W, 3], the input the released processor expects.

The released processor does `PIL.Image.convert("RGB")` and nothing else (spec §4.0). molmoe does
the same for plain RGB/L/P/1/CMYK images, so those stay bit-exact, and differs on purpose where
`convert("RGB")` gives a bad picture:
  * EXIF orientation is applied (spec §7.16, molmoe's decision): points then land on the picture
    the user sees. An image without an orientation tag is untouched.
  * Transparency is composited onto a plain background instead of exposing whatever RGB values
    hide under alpha = 0 (spec §7.15; the model card's recipe is unconfirmed, see `_composite`).
  * 16-bit and 32-bit grayscale are scaled to 8 bit (PIL's convert clips them to 255).
Huge images are refused before decoding (decompression bombs): the pixel limit is configurable.
"""
from __future__ import annotations

import os
import pathlib
import threading
import warnings
from typing import NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from molmoe.errors import MolmoeError

# PIL refuses at 2x its MAX_IMAGE_PIXELS (89,478,485) by default; molmoe's default is that same
# ~179 Mpx, and callers may raise or lower it.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
_EXIF_ORIENTATION = 0x0112
_PIL_LIMIT_LOCK = threading.Lock()

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(MolmoeError):
    """An image that cannot be used; the message names the file (or input kind) and the problem."""


class LoadedImage(NamedTuple):
    pixels: np.ndarray            # uint8 [H, W, 3]
    size: tuple[int, int]         # (W, H) after EXIF rotation: what points are relative to


def load_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """A path, PIL image or numpy array -> (RGB uint8 [H, W, 3], (W, H)).

    numpy input must be [H, W, 3] or [H, W] (gray) with integer values in 0..255.
    `max_pixels=None` disables the size limit (only for trusted files).
    """
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    if isinstance(image, Image.Image):
        name = f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
        _check_pixels(image.size, max_pixels, name)
        return _from_pil(image, name)
    if isinstance(image, (str, os.PathLike)):
        return _from_path(pathlib.Path(image), max_pixels)
    raise ImageError(f"unsupported image input of type {type(image).__name__}; pass a file path, "
                     "a PIL.Image.Image or a numpy uint8 array [H, W, 3]")


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of "
                         f"{max_pixels:,} (a decompression bomb or a very large image); raise "
                         "max_pixels if the file is trusted")


def _from_path(path: pathlib.Path, max_pixels: int | None) -> LoadedImage:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    try:
        # Image.open reads only the header, so the size check below runs before any decoding.
        # PIL's own bomb check is lifted for the open so that molmoe's limit (which the caller
        # sets) is the one that applies, with one clear message.
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open image ({e})") from None
    with img:
        _check_pixels(img.size, max_pixels, str(path))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
            raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
        return _from_pil(img, str(path))


def _from_pil(img: Image.Image, name: str) -> LoadedImage:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # unparsable EXIF: treat as untagged rather than refuse the picture
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
    try:
        pixels = _to_rgb(img)
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot convert PIL mode {img.mode!r} to RGB ({e})") from None
    h, w = pixels.shape[:2]
    return LoadedImage(np.ascontiguousarray(pixels), (w, h))


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return np.repeat(_gray_to_8bit(img)[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        return _composite(rgba)
    # L, P, 1, CMYK, YCbCr, RGBX, ...: PIL's conversion, exactly as the released processor.
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _gray_to_8bit(img: Image.Image) -> np.ndarray:
    """16/32-bit integer or float gray -> uint8 by scaling (not clipping) to the full range.

    I;16*: 0..65535 -> 0..255. Mode I (32-bit int, how older PIL opens 16-bit PNG/TIFF): values
    inside 0..65535 are taken as 16-bit; anything else is stretched from its min..max. Mode F:
    values in [0, 1] are taken as intensities, anything else is stretched from its min..max.
    """
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a = a.astype(np.float64) / 65535.0
    elif img.mode == "I" and a.min() >= 0 and a.max() <= 65535:
        a = a.astype(np.float64) / 65535.0
    elif img.mode == "F" and a.min() >= 0 and a.max() <= 1:
        a = a.astype(np.float64)
    else:
        lo, hi = float(a.min()), float(a.max())
        a = (a.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(a.shape)
    return np.round(a * 255.0).astype(np.uint8)


def _composite(rgba_HW4: np.ndarray) -> np.ndarray:
    """Alpha-composite onto white or black, whichever contrasts with the visible content.

    The model card advises a plain background chosen by the image's brightness; its exact recipe
    is unconfirmed (spec §7.15), so molmoe's rule is: alpha-weighted mean luma (BT.601) of the
    content < 128 (dark content) -> white background, otherwise (light content) -> black.
    A fully transparent image gets white. Fully opaque pixels keep their RGB exactly.
    """
    rgb = rgba_HW4[..., :3].astype(np.int32)
    alpha = rgba_HW4[..., 3:].astype(np.int32)
    weight = float(alpha.sum())
    if weight == 0:
        background = 255
    else:
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        brightness = float((luma * alpha[..., 0]).sum() / weight)
        background = 255 if brightness < 128 else 0
    # Integer blend with rounding: (c*a + bg*(255-a) + 127) // 255.
    out = (rgb * alpha + background * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _from_array(a: np.ndarray, max_pixels: int | None) -> LoadedImage:
    name = f"<numpy array {a.dtype} {list(a.shape)}>"
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        hint = " (RGBA: pass a PIL image so transparency is handled)" if \
            a.ndim == 3 and a.shape[2] == 4 else ""
        raise ImageError(f"{name}: numpy images must be [H, W, 3] RGB or [H, W] gray{hint}")
    # The size limit first: expanding a huge gray array to RGB would triple it before the check.
    _check_pixels((a.shape[1], a.shape[0]), max_pixels, name)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.dtype != np.uint8:
        if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer)
                                       or np.issubdtype(a.dtype, np.floating)):
            raise ImageError(f"{name}: unsupported dtype; pass uint8 values 0..255")
        lo, hi = a.min(), a.max()
        if not (np.all(np.isfinite(a)) and lo >= 0 and hi <= 255 and np.all(a == np.round(a))):
            raise ImageError(f"{name}: numpy images must hold integer values 0..255 (got range "
                             f"{lo}..{hi}); scale to uint8 first")
        a = a.astype(np.uint8)
    h, w = a.shape[:2]
    return LoadedImage(np.ascontiguousarray(a), (w, h))
