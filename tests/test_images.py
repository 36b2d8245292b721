"""load_image on every kind of image a user has: modes, EXIF rotation, transparency, 16-bit, tiny
and huge sizes, broken files. All images are small and made here."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from molmoe.processing import ImageError, load_image


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_file_is_bit_exact(tmp_path):
    a = rgb(30, 40)
    Image.fromarray(a).save(tmp_path / "a.png")
    pixels, size = load_image(tmp_path / "a.png")
    assert pixels.dtype == np.uint8 and pixels.shape == (30, 40, 3)
    assert np.array_equal(pixels, a) and size == (40, 30)


def test_untagged_jpeg_matches_released_conversion(tmp_path):
    """No EXIF orientation: exactly what the released processor's convert('RGB') gives."""
    Image.fromarray(rgb(33, 47)).save(tmp_path / "a.jpg", quality=90)
    pixels, size = load_image(str(tmp_path / "a.jpg"))
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")))
    assert size == (47, 33)


@pytest.mark.parametrize("orientation,turn", [(3, 2), (6, -1), (8, 1)])
@pytest.mark.parametrize("as_path", [True, False])
def test_exif_orientation_applied(tmp_path, orientation, turn, as_path):
    """Orientation 6 = 'rotate 90 CW to display', 8 = 90 CCW, 3 = 180 (EXIF spec); the result
    is the picture a viewer shows, and original_size is that picture's (W, H)."""
    a = rgb(20, 40)                      # stored 40 wide x 20 tall
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    src = tmp_path / "r.png" if as_path else Image.open(tmp_path / "r.png")
    pixels, size = load_image(src)
    want = np.rot90(a, k=turn)
    assert np.array_equal(pixels, want)
    assert size == (want.shape[1], want.shape[0])


def test_rgba_dark_content_goes_on_white(tmp_path):
    a = np.zeros((10, 10, 4), dtype=np.uint8)
    a[2:8, 2:8] = (20, 30, 40, 255)      # dark opaque square on a fully transparent field
    a[0, 0] = (200, 100, 50, 128)        # one half-transparent pixel
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    pixels, _ = load_image(tmp_path / "t.png")
    assert (pixels[2:8, 2:8] == (20, 30, 40)).all()          # opaque pixels unchanged
    assert (pixels[9, 9] == 255).all()                        # transparent -> white
    blend = (np.array([200, 100, 50]) * 128 + 255 * 127 + 127) // 255
    assert pixels[0, 0].tolist() == blend.tolist()


def test_rgba_light_content_goes_on_black():
    a = np.zeros((10, 10, 4), dtype=np.uint8)
    a[..., :3] = 255                     # white everywhere, visible only in the middle
    a[3:7, 3:7, 3] = 255
    pixels, _ = load_image(Image.fromarray(a, "RGBA"))
    assert (pixels[3:7, 3:7] == 255).all() and (pixels[0, 0] == 0).all()


def test_fully_opaque_rgba_equals_rgb():
    a = rgb(8, 9)
    rgba = np.concatenate([a, np.full((8, 9, 1), 255, np.uint8)], -1)
    assert np.array_equal(load_image(Image.fromarray(rgba, "RGBA")).pixels, a)


def test_la():
    a = np.zeros((6, 6, 2), dtype=np.uint8)
    a[:3, :, 0], a[:3, :, 1] = 10, 255   # dark gray visible on top, transparent below
    pixels, _ = load_image(Image.fromarray(a, "LA"))
    assert (pixels[:3] == 10).all() and (pixels[3:] == 255).all()


def test_palette_without_and_with_transparency(tmp_path):
    p = Image.fromarray(rgb(12, 12)).quantize(colors=8)
    assert p.mode == "P"
    assert np.array_equal(load_image(p).pixels, np.asarray(p.convert("RGB")))

    idx = np.zeros((4, 4), dtype=np.uint8)
    idx[1:3, 1:3] = 1
    q = Image.fromarray(idx, "P")
    q.putpalette([0, 0, 0, 30, 30, 30] + [0] * 762)
    q.info["transparency"] = 0           # palette entry 0 is transparent
    q.save(tmp_path / "p.png")
    pixels, _ = load_image(tmp_path / "p.png")
    assert (pixels[1:3, 1:3] == 30).all()     # dark visible content
    assert (pixels[0, 0] == 255).all()         # transparent -> white, not the stored black


def test_grayscale_and_1bit():
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    pixels, _ = load_image(Image.fromarray(g, "L"))
    assert np.array_equal(pixels, np.repeat(g[..., None], 3, -1))
    b = Image.fromarray(g > 100).convert("1")
    assert b.mode == "1"
    pixels, _ = load_image(b)
    assert set(np.unique(pixels).tolist()) == {0, 255}
    assert np.array_equal(pixels[..., 0] == 255, g > 100)


@pytest.mark.parametrize("via_file", [False, True])
def test_16bit_is_scaled_not_clipped(tmp_path, via_file):
    a = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    img = Image.fromarray(a)
    if via_file:
        img.save(tmp_path / "g16.png")
        img = tmp_path / "g16.png"
    pixels, _ = load_image(img)
    assert pixels[..., 0].tolist() == [[0, 255], [128, 4]]   # round(v * 255 / 65535)
    assert (pixels == pixels[..., :1]).all()


def test_32bit_int_and_float_gray():
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    assert load_image(i32).pixels[..., 0].tolist() == [[0, 255]]
    wide = Image.fromarray(np.array([[-100, 100]], dtype=np.int32))
    assert load_image(wide).pixels[..., 0].tolist() == [[0, 255]]  # stretched min..max
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert load_image(f).pixels[..., 0].tolist() == [[0, 128, 255]]


def test_cmyk_follows_pil_conversion(tmp_path):
    c = Image.new("CMYK", (5, 4), (0, 0, 0, 0))
    c.putpixel((1, 1), (255, 0, 0, 0))
    c.save(tmp_path / "c.jpg")
    for src in (c, tmp_path / "c.jpg"):
        pixels, size = load_image(src)
        assert size == (5, 4)
        ref = src if isinstance(src, Image.Image) else Image.open(src)
        assert np.array_equal(pixels, np.asarray(ref.convert("RGB")))
    assert load_image(c).pixels[0, 0].tolist() == [255, 255, 255]
    assert load_image(c).pixels[1, 1].tolist() == [0, 255, 255]


@pytest.mark.parametrize("hw", [(1, 1), (300, 5), (5, 300)])
def test_tiny_images(hw):
    a = rgb(*hw)
    pixels, size = load_image(Image.fromarray(a))
    assert np.array_equal(pixels, a) and size == (hw[1], hw[0])


def test_numpy_inputs():
    a = rgb(4, 5)
    assert np.array_equal(load_image(a).pixels, a)
    assert np.array_equal(load_image(a.astype(np.int64)).pixels, a)
    g = a[..., 0]
    assert np.array_equal(load_image(g).pixels, np.repeat(g[..., None], 3, -1))
    with pytest.raises(ImageError, match=r"\[H, W, 3\].*RGBA"):
        load_image(np.zeros((4, 5, 4), np.uint8))
    with pytest.raises(ImageError, match=r"\[H, W, 3\]"):
        load_image(np.zeros((4,), np.uint8))
    with pytest.raises(ImageError, match="integer values 0..255"):
        load_image(np.full((4, 5, 3), 0.5, np.float32))
    with pytest.raises(ImageError, match="no pixels"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="unsupported image input"):
        load_image(12345)


def _png_header_only(width, height):
    """A PNG that claims width x height but carries no real data: a decompression bomb's header."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert str(path) in str(e.value) and "10,000,000,000 pixels" in str(e.value)


def test_pixel_limit_is_configurable(tmp_path):
    Image.fromarray(rgb(100, 100)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match=r"a\.png.*10,000 pixels.*limit of 5,000"):
        load_image(tmp_path / "a.png", max_pixels=5000)
    with pytest.raises(ImageError, match="10,000 pixels"):
        load_image(rgb(100, 100), max_pixels=5000)
    assert load_image(tmp_path / "a.png", max_pixels=10_000).size == (100, 100)
    # Above PIL's own bomb threshold when the caller allows it: the header passes, and the fake
    # data then fails to decode with an error naming the file (not PIL's bomb error).
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(20_000, 10_000))
    with pytest.raises(ImageError, match=r"big\.png: cannot decode"):
        load_image(path, max_pixels=None, max_decode_bytes=None)


def test_unreadable_files(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(tmp_path / "notes.png")
    Image.fromarray(rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: cannot decode"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match=r"missing\.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_16bit_rgb_png_is_scaled_not_clipped(tmp_path):
    """A 48-bit RGB PNG (written by hand; PIL cannot write one): the 8-bit result is each
    16-bit value scaled down (its high byte), not clipped to 255."""
    a = np.random.default_rng(3).integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    a[0, 0] = (0, 300, 65535)            # clipping would give 255 for 300
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(a.shape[0]))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, 2, 0, 0, 0)
    (tmp_path / "rgb48.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    pixels, size = load_image(tmp_path / "rgb48.png")
    assert size == (7, 5) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, (a >> 8).astype(np.uint8))
    assert pixels[0, 0].tolist() == [0, 1, 255]
