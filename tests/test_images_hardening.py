"""load_image under hostile input (issue 10): decode memory bounded in bytes, PIL's process-wide
bomb limit never touched, non-regular files refused without hanging, and the compat="released"
mode that reproduces the released processor's pixels bit for bit."""
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import types
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from molmoe.errors import UsageError
from molmoe.processing import ImageError, load_image
from molmoe.processing import images as images_mod


def _chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_only(width, height, color_type=2):
    """A PNG that claims width x height (8-bit, color_type 0 = gray, 2 = RGB) but holds no real
    pixel data: a decompression bomb's header, written in microseconds."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# 1. Decode memory is bounded in bytes

# The most a pixel may cost while decoding a gray PNG: PIL's decoded L image (1 byte) + the RGB
# result (3 bytes) + slack for PIL's PNG decoder buffers and interpreter noise. The code before
# issue 10 needed about 11 bytes per pixel (L image, an RGB PIL copy, two numpy copies).
GRAY_PNG_BYTES_PER_PIXEL = 5.5

_MEASURE = textwrap.dedent("""
    import sys
    from molmoe.processing import load_image

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    base = status("VmRSS")
    try:  # reset the peak to the current size (Linux >= 4.0), so imports do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    pixels, size = load_image(sys.argv[1])
    assert pixels.shape == (size[1], size[0], 3)
    if sys.argv[2:] == ["preprocess"]:  # the whole image path: crops, masks, tokens
        from molmoe.processing.preprocess import ImageSettings, ImageTokenIds, preprocess_image
        preprocess_image(pixels, ImageSettings(), ImageTokenIds(1, 2, 3, 4))
    print(status("VmHWM") - base)
""")

# The same for the whole image path, decode + preprocess (resize to the tiling canvas and the
# global view, crops): the uint8 RGB image (3 bytes) + one channel in float32 (4) + slack. The
# code before issue 10 resized all three channels at once in float32, plus the division's
# temporary and a uint8 copy: about 30 bytes per pixel, 2 GB for an 8000x8000 gray PNG.
PREPROCESS_BYTES_PER_PIXEL = 9.0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_gray_png_decode_peak_memory_is_bounded(tmp_path):
    """A 6000x6000 gray PNG (36 Mpx, ~1 MB on disk) decodes in a fresh process whose peak RSS
    grows by at most GRAY_PNG_BYTES_PER_PIXEL bytes per pixel (PIL's C allocations included,
    which tracemalloc would not see)."""
    per_pixel = _gray_png_peak_per_pixel(tmp_path)
    assert per_pixel <= GRAY_PNG_BYTES_PER_PIXEL, f"{per_pixel:.2f} bytes per pixel"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_gray_png_preprocess_peak_memory_is_bounded(tmp_path):
    """Decode + preprocessing of the same 6000x6000 gray PNG: the resize is the peak."""
    per_pixel = _gray_png_peak_per_pixel(tmp_path, "preprocess")
    assert per_pixel <= PREPROCESS_BYTES_PER_PIXEL, f"{per_pixel:.2f} bytes per pixel"


def _gray_png_peak_per_pixel(tmp_path, *what: str) -> float:
    n = 6000
    ramp = np.arange(n).astype(np.uint8)                       # (x + 3y) mod 256: compresses well
    Image.fromarray(ramp[None, :] + 3 * ramp[:, None], "L").save(tmp_path / "g.png",
                                                                 compress_level=1)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "g.png"), *what],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return int(out.stdout) / (n * n)


def test_header_over_byte_budget_is_refused_before_decoding(tmp_path):
    """The fake file holds no pixel data, so reaching the budget message (not 'cannot decode')
    shows the refusal came from the header, before any decoding."""
    path = tmp_path / "wide.png"
    path.write_bytes(png_header_only(20_000, 15_000))          # 300 Mpx RGB
    with pytest.raises(ImageError) as e:
        load_image(path, max_pixels=None)
    msg = str(e.value)
    assert str(path) in msg and "20000x15000" in msg
    need = 20_000 * 15_000 * (4 + 3)                           # PIL's RGB storage + the result
    assert f"{need:,} bytes" in msg and f"{images_mod.DEFAULT_MAX_DECODE_BYTES:,}" in msg
    with pytest.raises(ImageError, match=r"wide\.png: cannot decode"):
        load_image(path, max_pixels=None, max_decode_bytes=None)   # no budget: decoding is tried


def test_byte_budget_counts_bytes_per_mode(tmp_path, monkeypatch):
    """Same pixel count, different bytes: gray needs 1 + 3 bytes per pixel, RGB 4 + 3."""
    Image.fromarray(rgb(100, 100)).save(tmp_path / "c.png")
    Image.fromarray(rgb(100, 100)[..., 0], "L").save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png", max_decode_bytes=40_000).size == (100, 100)
    with pytest.raises(ImageError, match=r"c\.png: .*70,000 bytes.*budget of 40,000 bytes"):
        load_image(tmp_path / "c.png", max_decode_bytes=40_000)
    with pytest.raises(ImageError, match="70,000 bytes"):       # PIL input: the same budget
        load_image(Image.open(tmp_path / "c.png"), max_decode_bytes=40_000)
    assert load_image(tmp_path / "c.png", max_decode_bytes=70_000).size == (100, 100)

    monkeypatch.setenv("MOLMOE_MAX_DECODE_BYTES", "40000")
    with pytest.raises(ImageError, match="MOLMOE_MAX_DECODE_BYTES"):
        load_image(tmp_path / "c.png")
    assert load_image(tmp_path / "c.png", max_decode_bytes=None).size == (100, 100)
    monkeypatch.setenv("MOLMOE_MAX_DECODE_BYTES", "0")          # 0 = no budget
    assert load_image(tmp_path / "c.png").size == (100, 100)
    for bad in ("lots", "-5", "1.5e9"):
        monkeypatch.setenv("MOLMOE_MAX_DECODE_BYTES", bad)
        with pytest.raises(UsageError, match="MOLMOE_MAX_DECODE_BYTES"):
            load_image(tmp_path / "c.png")
    monkeypatch.delenv("MOLMOE_MAX_DECODE_BYTES")
    for bad in (0, -1, 1.5, "10", True):
        with pytest.raises(UsageError, match="max_decode_bytes"):
            load_image(tmp_path / "c.png", max_decode_bytes=bad)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("band_pixels", [None, 53 * 5])        # one band; bands of 5 rows
def test_every_exif_orientation_matches_pil(tmp_path, monkeypatch, orientation, band_pixels):
    """molmoe writes the rotated picture straight into its output (no rotated copy); the result
    is what ImageOps.exif_transpose shows, for all eight orientations."""
    if band_pixels:
        monkeypatch.setattr(images_mod, "_BAND_PIXELS", band_pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb(37, 53)).save(tmp_path / "o.png", exif=exif)
    want = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB"))
    pixels, size = load_image(tmp_path / "o.png")
    assert np.array_equal(pixels, want) and size == (want.shape[1], want.shape[0])
    assert pixels.flags.c_contiguous and pixels.flags.writeable


# ---------------------------------------------------------------------------------------------
# 2. PIL's process-wide MAX_IMAGE_PIXELS is never changed

def test_pil_pixel_limit_is_never_written(tmp_path):
    """Every write to the PIL.Image module's MAX_IMAGE_PIXELS is recorded while load_image runs
    on a normal image and on one above PIL's own limit (allowed by max_pixels=None)."""
    Image.fromarray(rgb(20, 30)).save(tmp_path / "a.png")
    (tmp_path / "big.png").write_bytes(png_header_only(20_000, 10_000))   # > PIL's 179 Mpx
    writes = []

    class Watched(types.ModuleType):
        def __setattr__(self, key, value):
            if key == "MAX_IMAGE_PIXELS":
                writes.append(value)
            super().__setattr__(key, value)

    before = Image.MAX_IMAGE_PIXELS
    Image.__class__ = Watched
    try:
        load_image(tmp_path / "a.png")
        with pytest.raises(ImageError, match=r"big\.png: .*20000x10000"):  # header was read
            load_image(tmp_path / "big.png", max_pixels=None, max_decode_bytes=10**6)
    finally:
        Image.__class__ = types.ModuleType
    assert writes == [] and Image.MAX_IMAGE_PIXELS == before


def test_other_threads_keep_pils_bomb_check(tmp_path):
    """While one thread loads an image above PIL's limit with max_pixels=None, another thread's
    plain Image.open of a bomb is refused by PIL every time."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30_000, 30_000))          # 900 Mpx
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(20_000, 10_000))           # 200 Mpx: above PIL's limit
    stop = threading.Event()
    leaks = []

    def hammer():
        while not stop.is_set():
            try:
                Image.open(bomb).close()
                leaks.append(1)
            except Image.DecompressionBombError:
                pass

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                                # switch threads very often
    t = threading.Thread(target=hammer)
    t.start()
    try:
        for _ in range(300):
            with pytest.raises(ImageError, match="20000x10000"):
                load_image(big, max_pixels=None, max_decode_bytes=10**6)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old_interval)
    assert leaks == []


# ---------------------------------------------------------------------------------------------
# 3. Non-regular files are refused before opening

def _fail_after(seconds):
    def on_alarm(signum, frame):
        raise TimeoutError(f"load_image still running after {seconds} s")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    old = signal.getsignal(signal.SIGALRM)
    _fail_after(5)                 # opening a FIFO without a writer blocks forever
    try:
        with pytest.raises(ImageError, match=r"photo\.jpg: is a FIFO, not a regular file"):
            load_image(fifo)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_devices_sockets_and_directories_are_refused(tmp_path):
    with pytest.raises(ImageError, match=r"/dev/zero: is a character device, not a regular"):
        load_image("/dev/zero")
    with pytest.raises(ImageError, match="is a directory, not"):
        load_image(tmp_path)
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(ImageError, match=r"s\.png: is a socket, not a regular file"):
            load_image(sock_path)
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")        # dangling link
    with pytest.raises(ImageError, match=r"link\.png: no such file"):
        load_image(tmp_path / "link.png")
    Image.fromarray(rgb(4, 5)).save(tmp_path / "a.png")          # now it resolves
    assert load_image(tmp_path / "link.png").size == (5, 4)


# ---------------------------------------------------------------------------------------------
# 4. compat="released": the released processor's pixels, bit for bit

def _released(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_compat_released_on_exif_rotated_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6                                           # display rotated 90 degrees CW
    Image.fromarray(rgb(24, 40)).save(tmp_path / "r.jpg", exif=exif, quality=90)
    pixels, size = load_image(tmp_path / "r.jpg", compat="released")
    assert np.array_equal(pixels, _released(tmp_path / "r.jpg")) and size == (40, 24)
    pixels, size = load_image(tmp_path / "r.jpg")               # molmoe: rotated
    assert np.array_equal(pixels, np.rot90(_released(tmp_path / "r.jpg"), -1))
    assert size == (24, 40)


def test_compat_released_on_hidden_rgb_under_alpha(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., :3] = rgb(8, 8)                                     # colours that alpha 0 hides
    a[2:6, 2:6, 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    pixels, size = load_image(tmp_path / "t.png", compat="released")
    assert np.array_equal(pixels, _released(tmp_path / "t.png")) and size == (8, 8)
    assert np.array_equal(pixels, a[..., :3])                   # alpha dropped, hidden RGB shown
    pixels, _ = load_image(tmp_path / "t.png")                  # molmoe: composited
    assert np.array_equal(pixels[2:6, 2:6], a[2:6, 2:6, :3])
    assert not np.array_equal(pixels, a[..., :3])


def test_compat_released_on_16bit_gray(tmp_path):
    g = np.array([[0, 200, 300, 65535]], np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    pixels, _ = load_image(tmp_path / "g16.png", compat="released")
    assert np.array_equal(pixels, _released(tmp_path / "g16.png"))
    assert pixels[..., 0].tolist() == [[0, 200, 255, 255]]      # PIL clips
    pixels, _ = load_image(tmp_path / "g16.png")
    assert pixels[..., 0].tolist() == [[0, 1, 1, 255]]          # molmoe scales


def test_compat_must_be_known(tmp_path):
    Image.fromarray(rgb(4, 4)).save(tmp_path / "a.png")
    for bad in ("hf", "", None, "Released"):
        with pytest.raises(UsageError, match=r"compat.*'molmoe', 'released'"):
            load_image(tmp_path / "a.png", compat=bad)


def test_eps_is_refused_before_ghostscript_runs(tmp_path):
    """PIL decodes EPS by running Ghostscript on the file; molmoe refuses it from the header
    (whether or not Ghostscript is installed)."""
    eps = tmp_path / "figure.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    assert Image.open(eps).format == "EPS"
    with pytest.raises(ImageError, match=r"figure\.eps: EPS files are not decoded"):
        load_image(eps)


@pytest.mark.parametrize("h, w, new_h, new_w", [(100, 130, 336, 336), (37, 500, 336, 120),
                                                (2000, 1500, 336, 252), (7, 9, 3, 4),
                                                (336, 336, 336, 336), (1000, 700, 1008, 705)])
def test_channel_at_a_time_resize_is_bit_identical(h, w, new_h, new_w):
    """The memory-saving resize (one channel at a time) equals torchvision's float resize of all
    three channels at once, bit for bit, on read-only (PIL) arrays too."""
    import torch
    import torch.nn.functional as F

    from molmoe.processing.preprocess import _resize_channels

    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    want = torch.tensor(img).permute(2, 0, 1).float() / 255.0
    if (new_h, new_w) != (h, w):
        want = F.interpolate(want[None], size=(new_h, new_w), mode="bilinear",
                             align_corners=False, antialias=True)[0]
    want = want.clamp(0.0, 1.0)
    assert torch.equal(_resize_channels(img, new_h, new_w, None), want)
    img.flags.writeable = False
    assert torch.equal(_resize_channels(img, new_h, new_w, None), want)


# ---------------------------------------------------------------------------------------------
# 5. Containers: the size decoded is the embedded image's, not the container header's

def _png_1bit(side):
    """A real 1-bit PNG side x side (all black), compressed to ~1.2 KB per 1000 rows."""
    co = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(co.compress(row) for _ in range(side)) + co.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0,
                                                                0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def ico_holding(png):
    """An ICO whose one directory entry says 256x256 (the most it can say) around `png`."""
    return (struct.pack("<HHH", 0, 1, 1)
            + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png)


def icns_holding(png):
    """An ICNS whose 128x128 entry (ic07) holds `png`."""
    block = b"ic07" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(block)) + block


_MEASURE_REFUSAL = textwrap.dedent("""
    import sys
    from molmoe.processing import ImageError, load_image

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    try:
        load_image(sys.argv[1], max_pixels=1_000_000, max_decode_bytes=10_000_000)
        print("decoded")
    except ImageError as e:
        print(e)
    print(status("VmHWM") - base)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("container", [ico_holding, icns_holding])
def test_container_holding_a_huge_png_is_refused_before_decoding(tmp_path, container):
    """The adversarial tester's ICO: the directory says 256x256, the embedded PNG is 13000x13000
    (169 Mpx of 1-bit gray, 20 KB on disk). Decoding it took 0.4 GB (and printed PIL's warnings)
    before the pixel limit saw the true size; it is now refused from the PNG's header, with
    the true size in the message, in a few MB and without a word on stderr."""
    path = tmp_path / "bomb.icon"
    path.write_bytes(container(_png_1bit(13_000)))
    out = subprocess.run([sys.executable, "-c", _MEASURE_REFUSAL, str(path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    message, grown = out.stdout.splitlines()
    assert str(path) in message and "13000x13000" in message and "over the limit" in message
    assert int(grown) < 30_000_000, f"{int(grown):,} bytes"


def test_container_embedded_size_is_the_size_and_pil_warnings_stay_inside(tmp_path):
    """An ICO whose directory says 16x16 around a 40x30 PNG is a 40x30 picture; PIL's
    'not the expected size' warning does not escape load_image, which leaves the process's
    warning filters as it found them, also when threads' calls overlap."""
    import warnings

    buf = io.BytesIO()
    Image.fromarray(rgb(30, 40)).save(buf, "PNG")
    png = buf.getvalue()
    ico = bytearray(ico_holding(png))
    ico[6:8] = bytes([16, 16])
    (tmp_path / "a.ico").write_bytes(bytes(ico))
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels, size = load_image(tmp_path / "a.ico")
        assert load_image(tmp_path / "a.ico", max_decode_bytes=30 * 40 * 7).size == (40, 30)
        with pytest.raises(ImageError, match=r"a\.ico: .*40x30 .*budget of 8,399 bytes"):
            load_image(tmp_path / "a.ico", max_decode_bytes=30 * 40 * 7 - 1)
    assert [str(w.message) for w in caught] == []
    assert warnings.filters == filters
    assert size == (40, 30) and np.array_equal(pixels, rgb(30, 40))
    threads = [threading.Thread(target=lambda: [load_image(tmp_path / "a.ico") for _ in range(30)])
               for _ in range(4)]                       # overlapping calls: filters restored too
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == filters


def test_formats_that_embed_an_unsized_image_are_refused(tmp_path):
    """BLP (JPEG textures) and IPTC hold another image file whose size PIL learns only by
    decoding it: refused from the header."""
    Image.new("P", (4, 4)).save(tmp_path / "t.blp")
    with pytest.raises(ImageError, match=r"t\.blp: BLP files are not decoded"):
        load_image(tmp_path / "t.blp")


# ---------------------------------------------------------------------------------------------
# 6. Float images: non-finite values are refused, as they are in numpy input

@pytest.mark.parametrize("compat", ["molmoe", "released"])
def test_float_tiff_with_nan_or_inf_is_refused(tmp_path, compat):
    nan = np.full((20, 30), np.nan, np.float32)
    Image.fromarray(nan).save(tmp_path / "nan.tiff")
    with pytest.raises(ImageError, match=r"nan\.tiff: .*600 of 600 values are NaN or infinite"):
        load_image(tmp_path / "nan.tiff", compat=compat)
    inf = np.array([[np.inf, -np.inf], [1e38, -1e38]], np.float32)
    Image.fromarray(inf).save(tmp_path / "inf.tiff")
    with pytest.raises(ImageError, match=r"inf\.tiff: .*2 of 4 values are NaN or infinite"):
        load_image(tmp_path / "inf.tiff", compat=compat)
    finite = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    Image.fromarray(finite).save(tmp_path / "ok.tiff")
    assert load_image(tmp_path / "ok.tiff", compat=compat).size == (2, 2)


def test_image_errors_carry_a_kind(tmp_path):
    """Callers sort refusals by ImageError.kind (the server's 413 / 415 / 400), not by text."""
    import io

    from PIL import Image

    from molmoe.processing import ImageError, load_image

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, "PNG")
    broken = tmp_path / "broken.png"
    broken.write_bytes(buf.getvalue()[:60])
    cases = [(big, {"max_pixels": 1000}, "too_large"), (text, {}, "unsupported"),
             (broken, {}, "corrupt"), (tmp_path / "missing.png", {}, "invalid")]
    for path, kw, kind in cases:
        with pytest.raises(ImageError) as e:
            load_image(path, **kw)
        assert e.value.kind == kind, (path, e.value)
