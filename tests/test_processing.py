"""Processor outputs against the worked example (spec §4.7), the tiling examples (§4.3), the closed
forms of the token layout / feature positions / padding masks (§4.4-4.5) over many image shapes,
and pixel values against independent computations."""
import numpy as np
import pytest
import torch
from PIL import Image

from molmoe.processing import (ImageSettings, Processor, PromptTooLongError, Tokenizer,
                               select_tiling)
from molmoe.processing.preprocess import scaled_size

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PAD = (np.float32(0.0) - MEAN) / STD          # normalised value of a padded pixel


@pytest.fixture(scope="module")
def qwen2(shared_data):
    return Processor(Tokenizer.from_dir(shared_data / "molmo-7b-d-0924"), max_positions=4096)


@pytest.fixture(scope="module")
def molmoe(shared_data):
    return Processor.from_pretrained(shared_data / "molmoe-1b-0924")


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def normalise(x_uint8):
    """Independent CLIP normalisation: float32 x/255, subtract mean, divide by std."""
    return (x_uint8.astype(np.float32) / np.float32(255.0) - MEAN) / STD


def unpatchify(crop_PD):
    """[576, 588] -> [336, 336, 3] with patches row-major and (dy, dx, c) inside a patch."""
    return crop_PD.reshape(24, 24, 14, 14, 3).permute(0, 2, 1, 3, 4).reshape(336, 336, 3).numpy()


@pytest.mark.parametrize("wh,tiling", [((640, 480), (2, 3)), ((536, 354), (2, 2)),
                                       ((100, 100), (1, 1)), ((300, 1000), (4, 1)),
                                       ((3000, 2000), (3, 4)), ((800, 112), (1, 4))])
def test_tiling_examples(wh, tiling):
    w, h = wh
    assert select_tiling(h - 112, w - 112, 224, 12) == tiling


def test_scaled_size_uses_float32():
    # float64 would give 252 rows; the released code's float32 product truncates to 251.
    assert scaled_size(480, 640, 336, 336) == (251, 336)
    assert scaled_size(480, 640, 560, 784) == (560, 746)


def test_worked_example_qwen2(qwen2):
    out = qwen2("Describe this image.", random_image(480, 640))
    ids, idx, masks = out["input_ids"], out["image_input_idx"], out["image_masks"]
    assert set(out) == {"input_ids", "images", "image_input_idx", "image_masks", "original_size"}
    assert out["original_size"] == (640, 480)
    assert ids.dtype == torch.int64 and ids.shape == (749,)
    assert out["images"].dtype == torch.float32 and out["images"].shape == (7, 576, 588)
    assert masks.dtype == torch.float32 and masks.shape == (7, 576)
    assert idx.dtype == torch.int32 and idx.shape == (7, 144)

    ids = ids.tolist()
    assert ids[0] == 151643 and ids[1] == 152064 and ids[2:14] == [152066] * 12
    assert ids[14] == 152067 and ids[158] == 152065 and ids[159] == 152064
    assert ids[160:740] == ([152066] * 28 + [152067]) * 20 and ids[740] == 152065
    assert ids[741:] == [2657, 25, 60785, 419, 2168, 13, 21388, 25]
    assert ids.count(152066) == 704 and ids.count(152067) == 32

    idx = idx.numpy()
    assert idx[0, :14].tolist() == list(range(2, 14)) + [15, 16]
    assert idx[1, :12].tolist() == list(range(160, 170)) + [-100, -100]
    assert idx[2, :12].tolist() == [-100, -100] + list(range(170, 178)) + [-100, -100]
    assert idx[2, 24:36].tolist() == [-100, -100] + list(range(228, 236)) + [-100, -100]
    assert idx[6, -12:].tolist() == [-100, -100] + list(range(729, 739))

    # Masks: rows are tiles (0,0)..(1,2) then -1 (legacy off-by-one, §4.5).
    m = masks.numpy().reshape(7, 24, 24)
    nine_14 = np.float32(9) / np.float32(14)
    for k in (0, 3):                                    # x0 = 0: left pad 19 px
        assert (m[k][:, 0] == 0).all() and (m[k][:, 1] == nine_14).all()
        assert (m[k][:, 2:] == 1).all()
    for k in (1, 4):
        assert (m[k] == 1).all()
    for k in (2, 5):                                    # x0 = 448: right pad 19 px
        assert (m[k][:, 23] == 0).all() and (m[k][:, 22] == nine_14).all()
        assert (m[k][:, :22] == 1).all()
    assert (m[6] == -1).all()
    assert np.isclose(nine_14, 0.642857)

    # Global view: 251 x 336 resized, padded 42 on top and 43 below.
    g = unpatchify(out["images"][0])
    assert np.array_equal(g[:42], np.broadcast_to(PAD, (42, 336, 3)))
    assert np.array_equal(g[-43:], np.broadcast_to(PAD, (43, 336, 3)))
    assert not np.isclose(g[42], PAD).all(axis=-1).all() and not np.isclose(g[-44], PAD).all()


def test_worked_example_molmoe(molmoe):
    out = molmoe("Describe this image.", random_image(480, 640))
    ids = out["input_ids"].tolist()
    assert len(ids) == 750
    assert ids[0] == 50279 and ids[1] == 50280 and ids[2] == 50282 and ids[14] == 50283
    assert ids[158] == 50281 and ids[740] == 50281
    assert ids[741:] == [11447, 27, 3666, 19268, 436, 2460, 15, 17762, 27]
    assert molmoe.max_positions == 32768


def expected_padding_fraction(h, w, th, tw):
    """Per-tile, per-patch fraction of valid pixels from the geometry alone: the canvas holds the
    resized image at [top, top+h') x [left, left+w'); a patch's fraction is the product of its
    row and column overlaps with that box."""
    ch, cw = th * 224 + 112, tw * 224 + 112
    nh, nw = scaled_size(h, w, ch, cw)
    top, left = (ch - nh) // 2, (cw - nw) // 2

    def cover(start, lo, hi):                            # per patch along one axis, 24 patches
        a = np.arange(24) * 14 + start
        return np.clip(np.minimum(a + 14, hi) - np.maximum(a, lo), 0, 14)

    rows = []
    for i in range(th):
        for j in range(tw):
            fy = cover(224 * i, top, top + nh)
            fx = cover(224 * j, left, left + nw)
            rows.append((np.outer(fy, fx) / 196.0).reshape(-1))
    return np.stack(rows)


# (H, W): tiny, sub-margin, portrait, landscape, extreme aspect ratios, more than 12 crops' worth.
SHAPES = [(1, 1), (5, 300), (300, 5), (13, 17), (111, 113), (336, 336), (480, 640), (640, 480),
          (1000, 300), (200, 3000), (3000, 200), (2000, 3000), (1, 700), (4096, 128)]


@pytest.mark.parametrize("hw", SHAPES)
def test_closed_forms(qwen2, hw):
    h, w = hw
    out = qwen2("Hi.", random_image(h, w, seed=h * 7 + w))
    th, tw = select_tiling(h - 112, w - 112, 224, 12)
    assert 1 <= th * tw <= 12
    n_rows, n_cols = 8 * th + 4, 8 * tw + 4
    n_img = 158 + 2 + n_rows * (n_cols + 1)
    text = qwen2.tokenizer.encode(" User: Hi. Assistant:")
    ids = out["input_ids"].numpy()
    assert len(ids) == 1 + n_img + len(text) and ids[1 + n_img:].tolist() == text
    assert qwen2.image_token_count(w, h) == n_img
    T = 1 + th * tw
    assert out["images"].shape == (T, 576, 588) and out["image_masks"].shape == (T, 576)
    assert out["original_size"] == (w, h)

    # image_input_idx against the closed form of §4.4 step 8 (+1 for the BOS).
    idx = out["image_input_idx"].numpy().reshape(T, 12, 12)
    r, c = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    assert np.array_equal(idx[0], 2 + 13 * r + c)
    for i in range(th):
        for j in range(tw):
            r_lo, r_hi = (0 if i == 0 else 2), (12 if i == th - 1 else 10)
            c_lo, c_hi = (0 if j == 0 else 2), (12 if j == tw - 1 else 10)
            valid = (r >= r_lo) & (r < r_hi) & (c >= c_lo) & (c < c_hi)
            want = np.where(valid, 160 + (8 * i + r) * (n_cols + 1) + (8 * j + c), -100)
            assert np.array_equal(idx[1 + i * tw + j], want), (i, j)
    # Structural: every <im_patch> receives exactly one feature, nothing else does.
    used = idx[idx >= 0]
    assert len(np.unique(used)) == len(used)
    patch_pos = np.nonzero(ids == qwen2.tokenizer.image_patch_id)[0]
    assert np.array_equal(np.sort(used), patch_pos)

    masks = out["image_masks"].numpy()
    assert (masks[-1] == -1).all()
    np.testing.assert_allclose(masks[:-1], expected_padding_fraction(h, w, th, tw),
                               rtol=0, atol=1e-7)
    assert torch.isfinite(out["images"]).all()


def test_identity_resize_pixels_exact(qwen2):
    """336x336: one tile, no resize anywhere, so every crop is the normalised input exactly,
    in (dy, dx, c) order inside each patch."""
    img = random_image(336, 336, seed=3)
    out = qwen2("x", img)
    assert out["images"].shape == (2, 576, 588)
    want = normalise(img)
    for k in range(2):
        crop = out["images"][k].numpy()
        assert np.array_equal(unpatchify(out["images"][k]), want)
        # Explicit indexing for one patch: patch (py=1, px=2), pixel (dy=3, dx=5), channel c.
        for ch in range(3):
            assert crop[1 * 24 + 2, 3 * 14 * 3 + 5 * 3 + ch] == want[14 + 3, 28 + 5, ch]
    assert (out["image_masks"][0] == 1).all() and (out["image_masks"][1] == -1).all()


def test_identity_resize_with_padding(qwen2):
    """336 wide x 168 tall fits 336x336 at scale 1: centered with 84 rows of padding above and
    below, padding = -mean/std, and the pixel mask marks patch rows 6..17 as valid."""
    img = random_image(168, 336, seed=4)
    out = qwen2("x", img)
    assert out["images"].shape == (2, 576, 588)
    for k in range(2):
        g = unpatchify(out["images"][k])
        assert np.array_equal(g[84:252], normalise(img))
        assert np.array_equal(g[:84], np.broadcast_to(PAD, (84, 336, 3)))
        assert np.array_equal(g[252:], np.broadcast_to(PAD, (84, 336, 3)))
    m = out["image_masks"][0].numpy().reshape(24, 24)
    assert (m[:6] == 0).all() and (m[6:18] == 1).all() and (m[18:] == 0).all()


def test_downscale_matches_pil_antialias(qwen2):
    """Resize checked against PIL's antialiased bilinear on float images (a separate
    implementation of the same filter): 640x480 -> 336x251 global view."""
    img = random_image(480, 640, seed=5)
    g = unpatchify(qwen2("x", img)["images"][0])[42:42 + 251]
    ref = np.stack([np.asarray(Image.fromarray(img[..., ch].astype(np.float32) / 255.0, "F")
                               .resize((336, 251), Image.BILINEAR)) for ch in range(3)], -1)
    ref = (np.clip(ref, 0, 1) - MEAN) / STD
    np.testing.assert_allclose(g, ref, rtol=0, atol=1e-4)


def test_text_only(qwen2):
    out = qwen2("What is 2+2?")
    assert set(out) == {"input_ids"}
    assert out["input_ids"].dtype == torch.int64
    assert out["input_ids"].tolist() == [151643] + qwen2.tokenizer.encode(
        " User: What is 2+2? Assistant:")


def test_prompt_too_long(qwen2):
    img = random_image(480, 640)
    with pytest.raises(PromptTooLongError) as e:
        qwen2("Describe this image.", img, max_length=700)
    assert isinstance(e.value, ValueError)
    assert str(e.value) == "prompt needs 749 tokens (740 image tokens), the model allows 700"
    assert len(qwen2("Describe this image.", img, max_length=749)["input_ids"]) == 749
    p = Processor(qwen2.tokenizer, max_positions=5)
    with pytest.raises(PromptTooLongError, match=r"needs 9 tokens \(0 image tokens\).* allows 5"):
        p("Describe this image.")


def test_one_image_only(qwen2):
    img = random_image(20, 20)
    with pytest.raises(ValueError, match="2 images"):
        qwen2("x", [img, img])
    assert qwen2("x", [img])["images"].shape[0] == 2


def test_settings_from_config_and_validation(shared_data):
    import json
    cfg = json.loads((shared_data / "molmo-7b-d-0924" / "preprocessor_config.json").read_text())
    assert ImageSettings.from_config(cfg) == ImageSettings()
    with pytest.raises(ValueError, match="overlap_margins"):
        ImageSettings(overlap_margins=(3, 4))


def test_demo_checkpoint(tmp_path):
    from molmoe.demo import DEMO_IMAGE, DEMO_PROMPT, demo_checkpoint

    p = Processor.from_pretrained(demo_checkpoint(tmp_path))
    out = p(DEMO_PROMPT, str(DEMO_IMAGE))
    assert out["original_size"] == Image.open(DEMO_IMAGE).size
    ids = out["input_ids"]
    assert ids[0] == p.tokenizer.bos_token_id and ids[1] == p.tokenizer.image_start_id
    assert p.tokenizer.decode(ids) == " User: " + DEMO_PROMPT + " Assistant:"
    assert out["images"].shape[1:] == (576, 588)


@pytest.mark.gpu
def test_cuda_resize_close_to_cpu(qwen2):
    """The CUDA path (the uint8 image uploaded once, crops made on the device); the CPU
    result stays the reference. Images and masks come back on the device."""
    img = random_image(480, 640, seed=6)
    cpu = Processor(qwen2.tokenizer, preprocess="python")("x", img)
    gpu = Processor(qwen2.tokenizer, device="cuda")("x", img)
    assert gpu["images"].device.type == "cuda"
    assert torch.equal(cpu["input_ids"], gpu["input_ids"])
    assert torch.equal(cpu["image_masks"], gpu["image_masks"].cpu())
    torch.testing.assert_close(gpu["images"].cpu(), cpu["images"], rtol=0, atol=1e-5)


QWEN2_IMAGE_IDS = (152064, 152065, 152066, 152067)  # <im_start> <im_end> <im_patch> <im_col>


def test_worked_example_layout_needs_no_tokenizer_files():
    """§4.7's image side (7 crops, 740 image tokens, indices, masks) from the image code alone,
    so it runs even where the released tokenizer files are absent (a fresh clone)."""
    from molmoe.processing.preprocess import ImageTokenIds, preprocess_image

    start, end, patch, col = QWEN2_IMAGE_IDS
    out = preprocess_image(random_image(480, 640), ImageSettings(), ImageTokenIds(*QWEN2_IMAGE_IDS))
    assert out.layout.tiling == (2, 3) and out.layout.grid == (20, 28)
    assert out.images.shape == (7, 576, 588) and out.image_masks.shape == (7, 576)
    tok = out.tokens.tolist()
    assert len(tok) == 740
    # Before the BOS: the global block is tokens 0..157, the high-res block 158..739.
    assert tok[:14] == [start] + [patch] * 12 + [col] and tok[156:158] == [col, end]
    assert tok[158:] == [start] + ([patch] * 28 + [col]) * 20 + [end]
    idx = out.image_input_idx + np.where(out.image_input_idx >= 0, 1, 0)  # the BOS shift
    assert idx[1, :12].tolist() == list(range(160, 170)) + [-100, -100]
    assert idx[2, 24:36].tolist() == [-100, -100] + list(range(228, 236)) + [-100, -100]
    assert idx[6, -12:].tolist() == [-100, -100] + list(range(729, 739))
    assert (out.image_masks[6] == -1).all() and (out.image_masks[1] == 1).all()


def test_tiles_are_exact_canvas_windows():
    """784 x 560 is exactly the (2, 3) canvas, so nothing is resized: tile (i, j) must be the
    normalised image's window at (224 i, 224 j), crops in row-major tile order after the global
    view, each patchified (dy, dx, c)."""
    from molmoe.processing.preprocess import ImageTokenIds, preprocess_image

    img = random_image(560, 784, seed=9)
    out = preprocess_image(img, ImageSettings(), ImageTokenIds(*QWEN2_IMAGE_IDS))
    assert out.layout.tiling == (2, 3) and out.images.shape[0] == 7
    want = normalise(img)
    for i in range(2):
        for j in range(3):
            tile = unpatchify(out.images[1 + 3 * i + j])
            assert np.array_equal(tile, want[224 * i: 224 * i + 336, 224 * j: 224 * j + 336]), (i, j)
    # No padding anywhere on the canvas: every tile mask is 1 (then the legacy -1 row).
    assert (out.image_masks[:6] == 1).all() and (out.image_masks[6] == -1).all()


def test_token_layout_cache_hands_out_copies():
    """Tokens and feature positions are built once per layout and cached; each call gets arrays
    of its own, so a caller that edits them cannot change what the next image of that size gets."""
    from molmoe.processing.preprocess import ImageSettings, ImageTokenIds, preprocess_image
    settings, ids = ImageSettings(), ImageTokenIds(start=1, end=2, patch=3, col=4)
    img = np.zeros((300, 500, 3), dtype=np.uint8)
    a = preprocess_image(img, settings, ids, backend="python")
    want_tokens, want_idx = a.tokens.copy(), a.image_input_idx.copy()
    a.tokens[:] = -7
    a.image_input_idx[:] = -7
    b = preprocess_image(img, settings, ids, backend="python")
    assert np.array_equal(b.tokens, want_tokens)
    assert np.array_equal(b.image_input_idx, want_idx)
    assert b.tokens.flags.writeable and b.image_input_idx.flags.writeable
