"""Property-based fuzzing of load_image (issue 10): random sizes, modes, formats (containers:
ICO with PNG or BMP entries, ICNS; multi-frame GIF, APNG, TIFF, WebP) and EXIF tags, truncated,
bit-flipped and size-inflated files (an embedded PNG's header too) give either an RGB uint8
[H, W, 3] picture or ImageError, never another exception, within a time bound. Where the file is intact the pixels are
checked against PIL: compat="released" is exactly `convert("RGB")`, and in the default mode the
size is the EXIF-rotated one (and, for modes molmoe does not treat specially, so are the pixels).
No warning escapes load_image.
"""
import io
import signal
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st
from PIL import Image, ImageOps

from molmoe.processing import ImageError, load_image
from tests.fuzz import FUZZ, seeded

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]
FORMATS = ["PNG", "JPEG", "TIFF", "WEBP", "GIF", "BMP", "ICO", "ICNS"]
# Formats PIL writes with several frames (save_all): load_image decodes the first.
MULTI_FRAME = {"PNG", "TIFF", "WEBP", "GIF"}
# Small enough that a header inflated past it is refused cheaply, large enough for every real
# image drawn here (300 x 300 x 15 bytes).
DECODE_BUDGET = 64 << 20
SECONDS_PER_CALL = 20            # generous: 2 busy cores; a real example takes milliseconds
# Modes where molmoe's default conversion is PIL's convert("RGB") (no alpha, no 16/32-bit gray).
PLAIN_MODES = {"1", "L", "P", "RGB", "CMYK", "YCbCr"}


class Hang(BaseException):
    """Not an OSError (TimeoutError is one, which load_image would report as a bad file)."""


def _pixels(mode, w, h, rng):
    n = w * h
    if mode == "1":
        return Image.frombytes("L", (w, h), rng.integers(0, 2, n, np.uint8).tobytes() * 255
                               ).convert("1")
    if mode == "I;16":
        return Image.frombytes("I;16", (w, h), rng.integers(0, 65536, n, np.uint16).tobytes())
    if mode == "I":
        top = int(rng.choice([65536, 2**31 - 1]))
        return Image.frombytes("I", (w, h), rng.integers(-top // 2 if top > 65536 else 0, top,
                                                         n, np.int32).tobytes())
    if mode == "F":
        a = rng.choice([1.0, 1e6], 1)[0] * rng.random(n, np.float32)
        if rng.random() < 0.5:               # NaN/inf: refused (half the examples are finite)
            a[rng.random(n) < 0.01] = rng.choice([np.nan, np.inf, -np.inf])
        return Image.frombytes("F", (w, h), a.astype(np.float32).tobytes())
    bands = Image.getmodebands(mode)
    img = Image.frombytes(mode, (w, h), rng.integers(0, 256, n * bands, np.uint8).tobytes())
    if mode in ("P", "PA"):
        img.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
    return img


def _exif(kind, orientation, garbage):
    if kind == "orientation":
        exif = Image.Exif()
        exif[0x0112] = orientation
        return exif.tobytes()
    if kind == "garbage":
        return garbage
    return None


def _save(img, fmt, exif, more=None):
    """File bytes in `fmt`, else PNG, else TIFF (PIL cannot write every mode in every format).
    `more`: save options (the other frames, an ICO's entry format)."""
    for f in (fmt, "PNG", "TIFF"):
        buf = io.BytesIO()
        opts = dict(more or {}) if f == fmt else {}
        if exif is not None:
            opts["exif"] = exif
        try:
            img.save(buf, f, **opts)
            return buf.getvalue()
        except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
            if exif is not None:           # garbage EXIF a writer refuses: drop it, same format
                return _save(img, fmt, None, more)
    raise AssertionError(f"cannot write mode {img.mode}")


def _save_options(img, fmt, frames, rng):
    """More frames (random pixels, random sizes) for multi-frame formats; PNG or BMP entries and
    every size up to the image's for ICO."""
    if fmt == "ICO":
        side = max(1, min(img.size))
        return {"bitmap_format": str(rng.choice(["png", "bmp"])),
                "sizes": [(side, side), (max(1, side // 2),) * 2]}
    if fmt in MULTI_FRAME and frames > 1:       # TIFF pages may differ in size, WebP's may not
        sizes = [(int(rng.integers(1, 64)), int(rng.integers(1, 64))) if fmt == "TIFF"
                 else img.size for _ in range(frames - 1)]
        return {"save_all": True, "append_images": [_pixels(img.mode, *wh, rng) for wh in sizes]}
    return None


def _inflate(data, w, h):
    """Rewrite the header's size fields to w x h (the decompression-bomb shape), where the format
    has one we know: PNG IHDR (CRC fixed; the first PNG inside an ICO or ICNS too), JPEG SOF,
    BMP, GIF logical screen."""
    b = bytearray(data)
    png = b.find(b"\x89PNG\r\n\x1a\n")
    if png >= 0 and b[png + 12:png + 16] == b"IHDR":
        b[png + 16:png + 24] = struct.pack(">II", w, h)
        crc = zlib.crc32(bytes(b[png + 12:png + 29])) & 0xFFFFFFFF
        b[png + 29:png + 33] = struct.pack(">I", crc)
    elif b[:2] == b"\xff\xd8":
        for sof in (b"\xff\xc0", b"\xff\xc2"):
            i = b.find(sof)
            if i > 0:
                b[i + 5:i + 9] = struct.pack(">HH", min(h, 65535), min(w, 65535))
    elif b[:2] == b"BM":
        b[18:26] = struct.pack("<ii", w, h)
    elif b[:3] == b"GIF":
        b[6:10] = struct.pack("<HH", min(w, 65535), min(h, 65535))
    return bytes(b)


def _mutate(data, how, where, bits, big):
    if how == "truncate":
        return data[: int(len(data) * where)]
    if how == "flip":
        b = bytearray(data)
        for k in range(bits):
            i = int((where * (k + 1) * 7919) % 1 * len(b))
            b[i] ^= 1 << (k % 8)
        return bytes(b)
    if how == "inflate":
        return _inflate(data, *big)
    return data


def _call(src, **kw):
    def on_alarm(signum, frame):
        raise Hang(f"load_image ran over {SECONDS_PER_CALL} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_CALL)
    start = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return load_image(src, max_decode_bytes=DECODE_BUDGET, **kw)
            except ImageError:
                return None
            finally:
                assert [str(w.message) for w in caught] == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        assert time.monotonic() - start < SECONDS_PER_CALL


def _check_shape(result):
    if result is None:
        return
    pixels, (w, h) = result
    assert pixels.dtype == np.uint8 and pixels.shape == (h, w, 3)
    assert pixels.flags.c_contiguous


def _oracle(data, exif_transpose):
    """What PIL gives for the intact file, or None if PIL itself cannot (garbage EXIF)."""
    try:
        im = Image.open(io.BytesIO(data))
        if exif_transpose:
            im = ImageOps.exif_transpose(im)
        return im, np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, struct.error, TypeError, KeyError, IndexError):
        return None


@seeded
@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(FORMATS),
       w=st.integers(1, 300), h=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       transparency=st.sampled_from([None, "index", "bytes"]),
       exif_kind=st.sampled_from([None, "orientation", "orientation", "garbage"]),
       orientation=st.integers(0, 10), garbage=st.binary(max_size=64),
       how=st.sampled_from(["none", "none", "truncate", "flip", "inflate"]),
       where=st.floats(0, 1), bits=st.integers(1, 16),
       big=st.tuples(st.integers(1, 100_000), st.integers(1, 100_000)),
       as_pil=st.booleans(), frames=st.integers(1, 3))
# Failures the fuzzing found once (with more examples or other seeds), kept as fixed examples.
@example(mode="L", fmt="TIFF", w=1, h=264, seed=0, transparency=None, exif_kind="orientation",
         orientation=0, garbage=b"", how="flip", where=0.11039033213165153, bits=1, big=(1, 1),
         as_pil=False, frames=1)           # TIFF tag of the wrong type: TypeError in PIL's load
def test_load_image_gives_rgb_or_image_error(tmp_path_factory, mode, fmt, w, h, seed,
                                             transparency, exif_kind, orientation, garbage,
                                             how, where, bits, big, as_pil, frames):
    rng = np.random.default_rng(seed)
    img = _pixels(mode, w, h, rng)
    if mode == "P" and transparency == "index":
        img.info["transparency"] = int(rng.integers(0, 256))
    elif mode == "P" and transparency == "bytes":
        img.info["transparency"] = rng.integers(0, 256, 256, np.uint8).tobytes()
    if exif_kind == "garbage" and rng.random() < 0.5:
        garbage = b"Exif\x00\x00" + garbage
    more = _save_options(img, fmt, frames, rng)
    data = _mutate(_save(img, fmt, _exif(exif_kind, orientation, garbage), more),
                   how, where, bits, big)
    path = tmp_path_factory.mktemp("fuzz") / f"x.{fmt.lower()}"
    path.write_bytes(data)

    results = {compat: _call(path, compat=compat) for compat in ("molmoe", "released")}
    for result in results.values():
        _check_shape(result)
    event(f"{how}: {'ImageError' if results['molmoe'] is None else 'decoded'}")
    if as_pil and results["released"] is not None:
        _check_shape(_call(Image.open(path)))
    if how != "none" or results["released"] is None:
        return
    # An intact file PIL can read: compare with PIL.
    plain = _oracle(data, exif_transpose=False)
    if plain is not None:
        im, want = plain
        assert results["released"].size == im.size
        assert np.array_equal(results["released"].pixels, want)
    rotated = _oracle(data, exif_transpose=True)
    if rotated is not None and results["molmoe"] is not None:
        im, want = rotated
        assert results["molmoe"].size == im.size
        if im.mode in PLAIN_MODES and "transparency" not in im.info:
            assert np.array_equal(results["molmoe"].pixels, want)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF"])
@pytest.mark.parametrize("size", [(100_000, 100_000), (65_535, 1), (3_000, 3_000)])
def test_inflated_headers_are_refused_or_fail_cleanly(tmp_path, fmt, size):
    """A tiny real file whose header claims a huge (or merely larger) size: refused from the
    header (pixel limit or byte budget) or failing to decode, as ImageError, quickly."""
    buf = io.BytesIO()
    Image.new("RGB" if fmt != "GIF" else "P", (8, 8)).save(buf, fmt)
    (tmp_path / "big").write_bytes(_inflate(buf.getvalue(), *size))
    for compat in ("molmoe", "released"):
        result = _call(tmp_path / "big", compat=compat)
        _check_shape(result)
