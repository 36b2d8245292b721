"""Opt-in fast JPEG decode (PIL draft mode): fewer pixels, the full picture's size and layout,
close to the exact path; never used where it would not halve the decode, or on other formats."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from molmoe.processing import Processor, Tokenizer, load_image
from molmoe.processing.processor import decode_target
from molmoe.processing.preprocess import ImageSettings
from molmoe.serve.images import ImagePolicy, read_image

SETTINGS = ImageSettings()


def target(size):
    return decode_target(SETTINGS, size)


def photo(w, h, seed=0) -> Image.Image:
    """A smooth picture with some detail (JPEG of noise would be all error)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([127 + 100 * np.sin(x / (37 + 10 * c) + y / (53 + 7 * c) + rng.uniform(0, 6))
                    for c in range(3)], -1)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("fd") / "big.jpg"
    photo(4032, 3024).save(path, quality=90)
    return path


def test_reduced_decode_keeps_the_full_size(big_jpeg):
    exact = load_image(big_jpeg)
    fast = load_image(big_jpeg, fast_decode=target)
    assert exact.size == fast.size == (4032, 3024)
    need_w, need_h = target((4032, 3024))
    h, w = fast.pixels.shape[:2]
    assert need_w <= w <= exact.size[0] // 2 and need_h <= h <= exact.size[1] // 2


def test_exif_rotation_with_draft(tmp_path):
    """Orientation 6 (rotate 90): the stored JPEG is 3024 x 4032 wide; the picture is tall."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(4032, 3024, seed=1).save(path, quality=90, exif=exif.tobytes())
    exact = load_image(path)
    fast = load_image(path, fast_decode=target)
    assert exact.size == fast.size == (3024, 4032)
    h, w = fast.pixels.shape[:2]
    assert h > w  # rotated like the exact decode
    small = np.asarray(Image.fromarray(exact.pixels).resize((w, h), Image.BOX), np.float32)
    assert np.abs(small - fast.pixels).mean() < 3.0


@pytest.mark.parametrize("kind", ["png", "small_jpeg"])
def test_not_used_when_it_would_not_help(tmp_path, kind):
    if kind == "png":
        path = tmp_path / "big.png"
        photo(3000, 2000).save(path)
    else:  # 1000 x 700 tiles into a canvas larger than half of it: decoded in full
        path = tmp_path / "small.jpg"
        photo(1000, 700).save(path, quality=90)
    exact, fast = load_image(path), load_image(path, fast_decode=target)
    assert np.array_equal(exact.pixels, fast.pixels) and exact.size == fast.size


def test_processor_layout_identical_pixels_close(big_jpeg, shared_data):
    tok = Tokenizer.from_dir(shared_data / "molmoe-1b-0924")
    exact = Processor(tok)("Point to the cat.", str(big_jpeg))
    fast = Processor(tok, fast_decode=True)("Point to the cat.", str(big_jpeg))
    assert torch.equal(exact["input_ids"], fast["input_ids"])
    assert torch.equal(exact["image_input_idx"], fast["image_input_idx"])
    assert torch.equal(exact["image_masks"], fast["image_masks"])
    assert exact["original_size"] == fast["original_size"] == (4032, 3024)
    diff = (exact["images"] - fast["images"]).abs()
    assert 0 < diff.mean().item() < 0.02


def test_serve_reads_with_fast_decode(big_jpeg):
    data = big_jpeg.read_bytes()
    loaded = read_image(data, ImagePolicy(), "upload", target)
    assert loaded.size == (4032, 3024) and loaded.pixels.shape[1] <= 2016


def test_cli_generate_fast_decode(big_jpeg, tmp_path):
    from molmoe.demo import write_tiny_checkpoint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_tiny_checkpoint(ckpt)
    r = subprocess.run([sys.executable, "-m", "molmoe", "generate", "--model", str(ckpt),
                        "--image", str(big_jpeg), "--prompt", "Point to it.", "--fast-decode",
                        "--max-new-tokens", "3", "--json", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["image_size"] == [4032, 3024]


def test_a_pil_image_passed_in_is_not_changed(big_jpeg):
    img = Image.open(big_jpeg)
    loaded = load_image(img, fast_decode=target)
    assert img.size == (4032, 3024) and loaded.pixels.shape[:2] == (3024, 4032)


def test_mpo_files_decode_fast(tmp_path):
    """A JPEG with a second picture after it (MPO, as phones write) is still a JPEG to decode."""
    path = tmp_path / "photo.mpo"
    photo(2600, 1500).save(path, "MPO", save_all=True, append_images=[photo(2600, 1500, 1)],
                           quality=90)
    assert Image.open(path).format == "MPO"
    fast = load_image(path, fast_decode=target)
    assert fast.size == (2600, 1500) and fast.pixels.shape[0] < 1500
