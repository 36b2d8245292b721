"""Every image a user has -> RGB uint8 [H, W, 3], the input the released processor expects.

Two modes (`compat=`):
  * "released": the released processor's pixels, bit for bit, for reproducing published numbers.
    It does `PIL.Image.convert("RGB")` and nothing else (spec §4.0): EXIF orientation is not
    applied (the size returned is the stored, un-rotated one), alpha is dropped (whatever RGB
    hides under alpha = 0 shows), 16/32-bit gray is clipped to 255 by PIL.
  * "molmoe" (the default): the same for plain RGB/L/P/1/CMYK images, so those stay bit-exact,
    and on purpose different where `convert("RGB")` gives a bad picture:
      - EXIF orientation is applied (spec §7.16, molmoe's decision): points then land on the
        picture the user sees. An image without an orientation tag is untouched.
      - Transparency is composited onto a plain background instead of exposing whatever RGB
        values hide under alpha = 0 (spec §7.15; the model card's recipe is unconfirmed, see
        `_background`).
      - 16-bit and 32-bit grayscale are scaled to 8 bit (PIL's convert clips them to 255).
numpy input is validated the same way in both modes (the released code casts with astype(uint8),
which wraps out-of-range values; molmoe refuses them).

Limits, checked from the file's header before anything is decoded:
  * pixels: `max_pixels` (default DEFAULT_MAX_PIXELS, ~179 Mpx, PIL's own bomb threshold);
  * bytes: `max_decode_bytes` (default DEFAULT_MAX_DECODE_BYTES, ~1.25 GB; the environment
    variable MOLMOE_MAX_DECODE_BYTES overrides the default, 0 = no budget). The figure compared
    is what decoding holds at its peak: PIL's decoded image, the RGB result and the decoder's own
    buffers (`_decode_bytes`). Every other step (conversion, compositing, 16-bit scaling, EXIF
    rotation) works in bands of rows written in place into the result. Measured peak growth per
    pixel: gray PNG 4.0, RGB/RGBA PNG 7.2/8.0, 16-bit PNG 5.2 (before: 11, 10, 60, 26).
Only regular files are opened (a FIFO would block forever, /dev/zero never ends), and no format
that PIL decodes by running an external program (EPS: Ghostscript). PIL's process-wide
`Image.MAX_IMAGE_PIXELS` is never changed, not even briefly (other threads' `Image.open` would
lose their protection): files are identified without PIL's bomb check and molmoe's limits apply
instead. A few PIL plugins (e.g. WebP, TIFF tiles) check sizes themselves; above PIL's limit
those need PIL.Image.MAX_IMAGE_PIXELS raised by the program, and the error says so.

Containers: an ICO or ICNS holds another image file (PNG, or a BMP for ICO) whose size its
directory does not give (an ICO entry cannot say more than 256x256). The limits are checked on
the embedded image's own header before anything is decoded (PIL decodes an ICO while opening it,
so that check runs before PIL's open). Formats whose embedded image's size PIL learns only by
decoding it (BLP: a JPEG; IPTC: any image file) are refused, and so is an ICNS entry in JPEG 2000.
Other multi-frame files (GIF, APNG, TIFF, MPO, WebP, PSD, DDS) decode their first frame only,
at the size of their header. A PIL image passed in is checked the same way, except an ICO, which
PIL has decoded already when it was opened.

PIL's warnings (decompression bomb, corrupt metadata, an ICO entry not of its directory's size)
are silenced while load_image runs: the sizes they warn about are molmoe's limits' business, and
float images with NaN/inf are refused (`_check_finite`). See `_pil_warnings_silenced` for how
that stays thread-safe.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import stat
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import BinaryIO, Literal, NamedTuple, Union

import numpy as np
from PIL import (BmpImagePlugin, IcnsImagePlugin, IcoImagePlugin, Image, ImageFile, ImageMode,
                 PngImagePlugin)

from molmoe.compat import check_compat
from molmoe.errors import MolmoeError, UsageError, is_integral

# PIL refuses at 2x its MAX_IMAGE_PIXELS (89,478,485) by default; molmoe's default is that same
# ~179 Mpx, and callers may raise or lower it.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Decoding holds two full-size buffers at its peak: PIL's decoded image (at most 4 bytes a pixel:
# PIL stores every multi-band 8-bit mode, RGB included, and 32-bit gray in 4 bytes) and the RGB
# result (3 bytes); see `_decode_bytes`. The default is those 7 bytes a pixel at the default pixel
# limit, ~1.25 GB: it admits every PNG/JPEG/TIFF/GIF/BMP the pixel limit admits, and fewer pixels
# of formats whose decoders hold more (WebP, progressive JPEG: `_decoder_bytes_per_pixel`).
# Lower it on machines with less memory to spare (argument or MOLMOE_MAX_DECODE_BYTES).
DEFAULT_MAX_DECODE_BYTES = DEFAULT_MAX_PIXELS * (4 + 3)
DECODE_BYTES_ENV = "MOLMOE_MAX_DECODE_BYTES"
# Conversions run on bands of about this many pixels (1 MB as RGBA; compositing one takes ~15 MB
# of temporaries): small next to a large image, large enough that the per-band cost is noise.
_BAND_PIXELS = 1 << 18
_EXIF_ORIENTATION = 0x0112
# What PIL's format plugins raise on corrupt or hostile data while identifying, decoding or
# reading EXIF (found by tests/test_fuzz_images.py: struct.error for short headers, TypeError for
# a TIFF tag of the wrong type; DecompressionBombError from plugins that check sizes themselves,
# e.g. GIF and TIFF). Caught around those PIL calls only, never around molmoe's own code.
_PIL_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, TypeError,
                    Image.DecompressionBombError)


@contextlib.contextmanager
def _pil_errors(name: str, what: str):
    """PIL's exceptions for bad data -> ImageError("{name}: {what} (...)"); molmoe's own
    ImageErrors (a ValueError too) pass through unchanged."""
    try:
        yield
    except ImageError:
        raise
    except _PIL_DATA_ERRORS as e:
        raise ImageError(f"{name}: {what} ({_describe(e)})", "corrupt") from None


# What PIL's convert raises for a mode it cannot turn into RGB/RGBA (e.g. LAB).
_PIL_CONVERT_ERRORS = (OSError, ValueError)

# Formats PIL decodes by running an external program on the file (EPS: Ghostscript, which has a
# record of exploits on untrusted input). Refused before decoding; convert such files first.
_EXTERNAL_DECODER_FORMATS = frozenset({"EPS"})
# Formats that hold another image file whose size PIL learns only by decoding it (BLP1 textures
# are JPEG files; IPTC can hold any image), so no limit could be checked first. Refused.
_UNSIZED_FORMATS = frozenset({"BLP", "IPTC"})
# An ICO entry stored as a BMP: PIL holds the BMP (4 bytes a pixel), its AND mask (1) and the
# 32-bit alpha bytes it reads (4) besides the RGBA image it makes (counted as the image).
_ICO_BMP_DECODER_BYTES = 4 + 1 + 4
# What the PIL warning filter matches: warnings raised in PIL's own modules.
_PIL_WARNING_MODULES = r"PIL\."

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageError(MolmoeError):
    """An image that cannot be used; the message names the file (or input kind) and the problem.

    `kind` sorts the problem for callers that answer differently (the server's HTTP status):
    "too_large" (over the pixel limit or the decode budget), "unsupported" (not an image, or a
    format molmoe refuses to decode), "corrupt" (the decoder failed on the data), "invalid"
    (anything else: a missing file, a bad array, a bad input type).
    """

    KINDS = ("too_large", "unsupported", "corrupt", "invalid")

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        assert kind in self.KINDS, kind
        self.kind = kind


class LoadedImage(NamedTuple):
    pixels: np.ndarray            # uint8 [H, W, 3], C-contiguous
    size: tuple[int, int]         # (W, H) of the picture (after EXIF rotation in "molmoe" mode):
    #                               what points are relative to. Equal to the pixels' size,
    #                               except after a fast (draft) decode, which returns fewer pixels


# A fast decode: given the picture's displayed (W, H), the smallest (W, H) the caller will resize
# to, or None to decode in full.
DecodeTarget = Callable[[tuple[int, int]], "tuple[int, int] | None"]


def load_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_decode_bytes: int | None | Literal["default"] = "default",
               compat: str = "molmoe", fast_decode: DecodeTarget | None = None) -> LoadedImage:
    """A path, PIL image or numpy array -> (RGB uint8 [H, W, 3], (W, H)).

    numpy input must be [H, W, 3] or [H, W] (gray) with integer values in 0..255.
    `max_pixels=None` disables the pixel limit, `max_decode_bytes=None` the byte budget (only for
    trusted files); "default" is MOLMOE_MAX_DECODE_BYTES when set, else DEFAULT_MAX_DECODE_BYTES.
    compat: "molmoe" (default) or "released" (the released processor's pixels; module docstring).
    fast_decode: opt-in, NOT bit-exact, for files (a PIL image passed in is used as it is). For a
    JPEG whose decode target (this function of the displayed size) is at least 2x smaller in both
    sides, PIL's draft mode decodes at 1/2, 1/4 or
    1/8 scale in the DCT (never below the target). `size` stays the full picture's; the pixels
    are the reduced decode. Its error and effect on answers: docs/preprocessing.md.
    """
    check_compat(compat)
    budget = _decode_budget(max_decode_bytes)
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    if isinstance(image, Image.Image):
        # No fast decode: draft mode would change the caller's own image object.
        name = f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
        return _from_pil(image, name, max_pixels, budget, compat)
    if isinstance(image, (str, os.PathLike)):
        return _from_path(pathlib.Path(image), max_pixels, budget, compat, fast_decode)
    raise ImageError(f"unsupported image input of type {type(image).__name__}; pass a file path, "
                     "a PIL.Image.Image or a numpy uint8 array [H, W, 3]")


def _decode_budget(value) -> int | None:
    """max_decode_bytes -> bytes, or None for no budget."""
    if isinstance(value, str) and value == "default":
        env = os.environ.get(DECODE_BYTES_ENV, "").strip()
        if not env:
            return DEFAULT_MAX_DECODE_BYTES
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 0:
            raise UsageError(f"{DECODE_BYTES_ENV}={env!r}: expected a whole number of bytes "
                             "(0 = no budget)") from None
        return value or None
    if value is None:
        return None
    if not is_integral(value) or value <= 0:
        raise UsageError(f"max_decode_bytes must be a positive number of bytes or None, got "
                         f"{value!r}")
    return int(value)


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of "
                         f"{max_pixels:,} (a decompression bomb or a very large image); raise "
                         "max_pixels if the file is trusted", "too_large")


def _decode_bytes(size: tuple[int, int], mode: str, decoder_bytes_per_pixel: int) -> int:
    """Peak bytes of decoding a `size` image of PIL `mode`: PIL's image, the RGB uint8 result
    (3 bytes a pixel) and what the decoder itself holds (`_decoder_bytes_per_pixel`).

    PIL stores 1/L/P in 1 byte a pixel, 16-bit gray in 2, and everything else (I, F, and every
    multi-band mode: RGB is stored as RGBX) in 4. Everything else (conversion, compositing,
    scaling, rotation) works in bands of _BAND_PIXELS, written into the result in place.
    """
    try:
        m = ImageMode.getmode(mode)
        stored = np.dtype(m.typestr).itemsize if len(m.bands) == 1 else 4
    except KeyError:  # a mode PIL cannot decode into anyway; count the widest
        stored = 4
    w, h = size
    return w * h * (stored + 3 + decoder_bytes_per_pixel)


def _decoder_bytes_per_pixel(img: Image.Image) -> int:
    """Full-size buffers some decoders hold besides the image (measured with Pillow 13): libwebp's
    canvas, its frame buffer and the bytes PIL copies the frame into (~9.3 bytes a pixel
    measured, 10 counted); a progressive JPEG's coefficients (2 bytes a sample; every component
    counted at full size)."""
    if img.format == "WEBP":
        return 10
    if img.format in ("JPEG", "MPO") and img.info.get("progressive"):
        return 2 * len(img.getbands())
    return 0


def _check_size(img: Image.Image, name: str, max_pixels: int | None, budget: int | None) -> None:
    """The header-only checks: run before decoding (and again after: some formats settle their
    size only when loaded)."""
    _check_header(img.size, img.mode, _decoder_bytes_per_pixel(img), name, max_pixels, budget)


def _check_header(size: tuple[int, int], mode: str, decoder_bytes_per_pixel: int, name: str,
                  max_pixels: int | None, budget: int | None) -> None:
    """The pixel limit and the byte budget for a `size` image of PIL `mode`."""
    _check_pixels(size, max_pixels, name)
    need = _decode_bytes(size, mode, decoder_bytes_per_pixel)
    if budget is not None and need > budget:
        w, h = size
        raise ImageError(f"{name}: decoding this {w}x{h} {mode} image needs about {need:,} "
                         f"bytes, over the decode budget of {budget:,} bytes; raise "
                         f"max_decode_bytes or {DECODE_BYTES_ENV} if the file is trusted",
                         "too_large")


def _open_regular(path: pathlib.Path) -> BinaryIO:
    """The file, opened for reading, if it is a regular file (following links).

    Opened non-blocking and checked with fstat (no race between the check and the open): a FIFO
    without a writer would otherwise block the open forever, and /dev/zero never ends.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        kind = _file_kind(path)
        if kind:
            raise ImageError(f"{path}: is a {kind}, not a regular file") from None
        raise ImageError(f"{path}: cannot open ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageError(f"{path}: is a {_KINDS.get(stat.S_IFMT(mode), 'special file')}, "
                         "not a regular file")
    return os.fdopen(fd, "rb")


_KINDS = {stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}


def _file_kind(path: pathlib.Path) -> str | None:
    """'socket', 'FIFO', ... for a non-regular file that exists (sockets cannot be opened)."""
    try:
        return _KINDS.get(stat.S_IFMT(os.stat(path).st_mode))
    except OSError:
        return None


def _identify(f: BinaryIO, before_open) -> ImageFile.ImageFile | None:
    """PIL's `Image.open(f)` (None where that raises UnidentifiedImageError) without its
    decompression-bomb check, which reads the process-wide Image.MAX_IMAGE_PIXELS: molmoe's own
    limits apply right after, from the header.

    The plugin search is Image.open's: each registered format whose prefix test accepts the
    file, the common plugins first, then all of them; a plugin that raises SyntaxError,
    IndexError, TypeError or struct.error means "not this format" (Image.open's rule).
    `before_open(format)` runs before each plugin opens the file (ICO plugins decode there).
    """
    prefix = f.read(16)
    tried: set[str] = set()
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for fmt in [fmt for fmt in Image.ID if fmt not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            verdict = accept(prefix) if accept else True
            if not verdict or isinstance(verdict, str):  # a str: recognised but unsupported
                continue
            f.seek(0)
            try:
                before_open(fmt)
                f.seek(0)
                return factory(f, None)   # no file name: PIL never reopens the path itself
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    return None


def _from_path(path: pathlib.Path, max_pixels: int | None, budget: int | None,
               compat: str, fast_decode: DecodeTarget | None = None) -> LoadedImage:
    def before_open(fmt: str) -> None:
        if fmt == "ICO":
            size, mode, decoder = _ico_frame_header(f)
            _check_header(size, mode, decoder, str(path), max_pixels, budget)

    with _open_regular(path) as f, _pil_warnings_silenced():
        with _pil_errors(str(path), "cannot open image"):
            img = _identify(f, before_open)
        if img is None:
            raise ImageError(f"{path}: not an image file PIL can read", "unsupported")
        with img:
            return _from_pil(img, str(path), max_pixels, budget, compat, fast_decode)


def _ico_frame_header(f: BinaryIO) -> tuple[tuple[int, int], str, int]:
    """(size, mode, decoder bytes a pixel) of the entry PIL's IcoImageFile decodes (its first
    after sorting by directory size, `IcoFile.entry[0]`), from the embedded image's own header:
    a PNG's, or a BMP's (whose height counts the AND mask too, and which PIL makes RGBA)."""
    entry = IcoImagePlugin.IcoFile(f).entry[0]
    f.seek(entry.offset)
    if f.read(8) == PngImagePlugin._MAGIC:
        f.seek(entry.offset)
        png = PngImagePlugin.PngImageFile(f)
        return png.size, png.mode, 0
    f.seek(entry.offset)
    bmp = BmpImagePlugin.DibImageFile(f)
    return (bmp.size[0], bmp.size[1] // 2), "RGBA", _ICO_BMP_DECODER_BYTES


def _icns_frame_header(img: Image.Image, name: str) -> tuple[tuple[int, int], str] | None:
    """(size, mode) of the PNG that an ICNS's chosen entry holds, from the PNG's header; None
    when the entry is raw pixels (whose size the header gives). JPEG 2000 entries are refused:
    molmoe does not read their headers."""
    icns = img.icns
    for code, reader in icns.SIZES[img.best_size]:
        if code not in icns.dct or reader is not IcnsImagePlugin.read_png_or_jpeg2000:
            continue
        start, _ = icns.dct[code]
        icns.fobj.seek(start)
        if icns.fobj.read(8) != PngImagePlugin._MAGIC:
            raise ImageError(f"{name}: ICNS icons stored as JPEG 2000 are not decoded (their "
                             "size is not checked first); convert it to PNG first", "unsupported")
        icns.fobj.seek(start)
        png = PngImagePlugin.PngImageFile(icns.fobj)
        return png.size, png.mode
    return None


_silenced_lock = threading.Lock()
_silenced_users = 0


@contextlib.contextmanager
def _pil_warnings_silenced() -> Iterator[None]:
    """PIL's warnings are ignored while any load_image runs.

    warnings.catch_warnings is not thread-safe (it saves and restores the whole filter list, so
    two threads interleaving can restore each other's filters and leave one in place forever).
    Instead the first load_image to start inserts ONE filter (PIL's modules only) and the last to
    finish removes that same entry, under a lock; no other filter is touched. The cost: while any
    thread is inside load_image, PIL's warnings in other threads are ignored too.
    """
    global _silenced_users
    with _silenced_lock:
        if _silenced_users == 0:
            warnings.filterwarnings("ignore", module=_PIL_WARNING_MODULES)
        _silenced_users += 1
    try:
        yield
    finally:
        with _silenced_lock:
            _silenced_users -= 1
            if _silenced_users == 0:
                entry = next((e for e in warnings.filters if e[0] == "ignore" and e[3] is not None
                              and e[3].pattern == _PIL_WARNING_MODULES), None)
                if entry is not None:   # someone's catch_warnings may have dropped it already
                    warnings.filters.remove(entry)


def _describe(e: BaseException) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return (f"PIL's own size limit refused it; raise PIL.Image.MAX_IMAGE_PIXELS in the "
                f"program if the file is trusted: {e}")
    return f"{type(e).__name__}: {e}"


def _from_pil(img: Image.Image, name: str, max_pixels: int | None, budget: int | None,
              compat: str, fast_decode: DecodeTarget | None = None) -> LoadedImage:
    with _pil_warnings_silenced():
        _check_before_load(img, name, max_pixels, budget)
        stored = img.size
        drafted = fast_decode is not None and _draft(img, fast_decode, compat)
        with _pil_errors(name, "cannot decode image"):  # truncated or corrupt data
            img.load()
        _check_size(img, name, max_pixels, budget)
        _check_finite(img, name)
        loaded = _converted(img, name, compat)
        if not drafted:
            return loaded
        # The picture's size is the full stored size, turned as _converted turned the pixels.
        w, h = stored
        orientation = _orientation(img) if compat == "molmoe" else 1
        return LoadedImage(loaded.pixels, (h, w) if orientation >= 5 else (w, h))


def _draft(img: Image.Image, target: DecodeTarget, compat: str) -> bool:
    """PIL's JPEG draft mode (DCT scaling) when the target is at least 2x smaller; whether it
    was set. A JPEG's EXIF is read when it is opened, so its orientation is known here."""
    # JPEG, or MPO (a JPEG with more pictures after it: phones' HDR and depth photos).
    if img.format not in ("JPEG", "MPO") or getattr(img, "_im", None) is not None:
        return False
    orientation = _orientation(img) if compat == "molmoe" else 1
    w, h = img.size
    need = target((h, w) if orientation >= 5 else (w, h))
    if need is None:
        return False
    need_w, need_h = (need[1], need[0]) if orientation >= 5 else need  # as stored
    if w < 2 * need_w or h < 2 * need_h:
        return False
    img.draft(img.mode, (need_w, need_h))  # PIL keeps the result >= the requested size
    return img.size != (w, h)


def _check_before_load(img: Image.Image, name: str, max_pixels: int | None,
                       budget: int | None) -> None:
    if img.format in _EXTERNAL_DECODER_FORMATS:
        raise ImageError(f"{name}: {img.format} files are not decoded (PIL would run an external "
                         "program on the file); convert it to PNG first", "unsupported")
    if img.format in _UNSIZED_FORMATS:
        raise ImageError(f"{name}: {img.format} files are not decoded (they hold another image "
                         "whose size is known only by decoding it); convert it to PNG first",
                         "unsupported")
    _check_size(img, name, max_pixels, budget)
    if img.format == "ICNS" and getattr(img, "_im", None) is None:
        with _pil_errors(name, "cannot open image"):
            embedded = _icns_frame_header(img, name)
        if embedded is not None:
            _check_header(*embedded, 0, name, max_pixels, budget)


def _check_finite(img: Image.Image, name: str) -> None:
    """Float images (mode F) must hold finite values: NaN and inf have no pixel value (PIL
    would make them black or clip them), and numpy input with them is refused too."""
    if img.mode != "F":
        return
    bad = sum(int(np.count_nonzero(~np.isfinite(np.asarray(band)))) for _, band in _bands(img))
    if bad:
        w, h = img.size
        raise ImageError(f"{name}: {bad:,} of {w * h:,} values are NaN or infinite in this "
                         "float image")


def _converted(img: Image.Image, name: str, compat: str) -> LoadedImage:
    orientation = _orientation(img) if compat == "molmoe" else 1
    try:
        pixels = _to_rgb(img, orientation, compat)
    except _PIL_CONVERT_ERRORS as e:
        raise ImageError(f"{name}: cannot convert PIL mode {img.mode!r} to RGB "
                         f"({_describe(e)})") from None
    h, w = pixels.shape[:2]
    return LoadedImage(pixels, (w, h))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation, 1..8; 1 (as stored) when absent, invalid or unparsable (a broken
    EXIF block is no reason to refuse the picture)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except _PIL_DATA_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(img: Image.Image, orientation: int, compat: str) -> np.ndarray:
    """The RGB result, written band by band into one array, rotated as it is written."""
    w, h = img.size
    out = np.empty((w, h, 3) if orientation >= 5 else (h, w, 3), dtype=np.uint8)
    stored = _stored_view(out, orientation)
    convert = _band_converter(img, compat)
    for y0, band in _bands(img):
        pixels, target = convert(band), stored[y0:y0 + band.size[1]]
        if pixels.ndim == 2:  # gray: the value in every channel, one channel at a time (fast)
            for c in range(3):
                target[..., c] = pixels
        else:
            target[...] = pixels
    return out


def _stored_view(out: np.ndarray, orientation: int) -> np.ndarray:
    """The view of `out` (the picture as displayed) indexed like the stored image: the pixel
    stored at (y, x) lands where EXIF `orientation` shows it (ImageOps.exif_transpose's map:
    2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 CW, 7 transverse, 8 rotate 90 CCW).
    """
    views = {1: lambda o: o, 2: lambda o: o[:, ::-1], 3: lambda o: o[::-1, ::-1],
             4: lambda o: o[::-1], 5: lambda o: o.transpose(1, 0, 2),
             6: lambda o: np.rot90(o, 1), 7: lambda o: o[::-1, ::-1].transpose(1, 0, 2),
             8: lambda o: np.rot90(o, -1)}
    return views[orientation](out)


def _bands(img: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """(first row, band of rows) covering the image; the image itself when it is one band."""
    w, h = img.size
    rows = max(1, _BAND_PIXELS // w)
    if rows >= h:
        yield 0, img
        return
    for y0 in range(0, h, rows):
        yield y0, img.crop((0, y0, w, min(h, y0 + rows)))


def _band_converter(img: Image.Image, compat: str):
    """band (PIL image) -> RGB uint8 [rows, W, 3] or gray [rows, W]; whole-image statistics
    (the background of a transparent image, the range of 32-bit gray) are gathered here in a
    first pass of bands."""
    mode = img.mode
    if compat == "molmoe":
        if mode.startswith("I;16") or mode in ("I", "F"):
            scale = _gray_scale(img)
            return lambda band: _gray_to_8bit(np.asarray(band), scale)
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            background = _background(img)
            return lambda band: _composite(np.asarray(band.convert("RGBA")), background)
    # Everything else, and every mode in "released" compat: PIL's convert("RGB"), exactly as the
    # released processor. It is per pixel, so converting in bands changes nothing. RGB and L skip
    # PIL's copy (L -> RGB repeats the value, which `_to_rgb` does for gray bands).
    if mode in ("RGB", "L"):
        return np.asarray
    return lambda band: np.asarray(band.convert("RGB"))


def _gray_scale(img: Image.Image) -> tuple[str, float, float]:
    """How 16/32-bit integer or float gray becomes uint8: ("u16", ...) 0..65535 -> 0..255,
    ("unit", ...) 0..1 -> 0..255, or ("stretch", lo, hi) lo..hi -> 0..255.

    I;16*: 16-bit. Mode I (32-bit int, how older PIL opens 16-bit PNG/TIFF): values inside
    0..65535 are taken as 16-bit; anything else is stretched from its min..max. Mode F: values
    in [0, 1] are taken as intensities, anything else is stretched from its min..max
    (`_check_finite` refused NaN and inf).
    """
    if img.mode.startswith("I;16"):
        return ("u16", 0.0, 0.0)
    lo, hi = np.inf, -np.inf
    for _, band in _bands(img):
        a = np.asarray(band)
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    if img.mode == "I" and lo >= 0 and hi <= 65535:
        return ("u16", 0.0, 0.0)
    if img.mode == "F" and lo >= 0 and hi <= 1:
        return ("unit", 0.0, 1.0)
    return ("stretch", lo, hi)


def _gray_to_8bit(a: np.ndarray, scale: tuple[str, float, float]) -> np.ndarray:
    """One band of gray [rows, W] -> uint8 by scaling (not clipping), see `_gray_scale`."""
    kind, lo, hi = scale
    if kind == "u16":  # round(v * 255 / 65535) = round(v / 257), exactly (no ties: 257 is odd)
        return ((a.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
    f = a.astype(np.float64)
    if kind == "stretch":
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
    return np.round(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8)


def _background(img: Image.Image) -> int:
    """White (255) or black (0), whichever contrasts with the visible content.

    The model card advises a plain background chosen by the image's brightness; its exact recipe
    is unconfirmed (spec §7.15), so molmoe's rule is: alpha-weighted mean luma (BT.601) of the
    content < 128 (dark content) -> white background, otherwise (light content) -> black.
    A fully transparent image gets white. Integer sums (luma x 1000), so the decision does not
    depend on the order of the bands.
    """
    weighted = weight = 0
    for _, band in _bands(img):
        rgba = np.asarray(band.convert("RGBA"))
        alpha = rgba[..., 3].astype(np.int64)
        luma1000 = rgba[..., :3].astype(np.int64) @ np.array([299, 587, 114])
        weighted += int((luma1000 * alpha).sum())
        weight += int(alpha.sum())
    return 255 if weight == 0 or weighted < 128 * 1000 * weight else 0


def _composite(rgba_HW4: np.ndarray, background: int) -> np.ndarray:
    """Alpha-composite onto `background`; fully opaque pixels keep their RGB exactly.
    Integer blend with rounding: (c*a + bg*(255-a) + 127) // 255."""
    rgb = rgba_HW4[..., :3].astype(np.int32)
    alpha = rgba_HW4[..., 3:].astype(np.int32)
    return ((rgb * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)


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
