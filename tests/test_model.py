"""Model-level behaviour of the reference: precision modes, image merge, padding, KV cache."""
import pytest
import torch

import molmoe
from tests.tiny import random_inputs, random_model, write_checkpoint

NAMES = ["tiny-molmoe", "tiny-7b-d", "tiny-7b-o"]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "amp_bf16"])
def test_low_precision_within_bf16_tolerance(tmp_path, name, dtype):
    # Top-k routing is discontinuous: bf16 noise flips near-tied experts and the outputs then
    # legitimately differ. With k = E every expert is used, so what is measured is arithmetic error.
    model = random_model(name, top_k=8 if name == "tiny-molmoe" else None)
    layout = "molmoe-hf" if name == "tiny-molmoe" else "dense"
    write_checkpoint(model, tmp_path / "c", layout)
    ref = molmoe.load(tmp_path / "c")
    low = molmoe.load(tmp_path / "c", dtype=dtype)
    inputs = random_inputs(model.config)
    with torch.no_grad():
        a, b = ref(*inputs), low(*inputs)
    assert b.dtype == torch.bfloat16
    err = rel_err(b, a)
    # bf16 keeps 8 mantissa bits (eps 2^-8 = 0.0039); a few layers compound it a few-fold.
    assert 0 < err < 0.03, err


@pytest.mark.parametrize("name", NAMES)
def test_unbatched_inputs_equal_batched(name):
    model = random_model(name)
    ids, images, masks, idx = random_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids[0], images[0], masks[0], idx[0]), model(ids, images, masks, idx))


def test_image_features_are_added_at_patch_positions():
    model = random_model("tiny-7b-d")
    ids, images, masks, idx = random_inputs(model.config)
    with torch.no_grad():
        h_text = model.embed(ids)
        h = model.embed(ids, images, masks, idx)
    changed = (h != h_text).any(-1)[0]
    valid = idx[0][idx[0] >= 0].long()
    assert changed[valid].all() and changed.sum() == valid.numel()
    feats = model.vision(images, masks)[0].reshape(-1, h.shape[-1])
    flat_idx = idx[0].reshape(-1)
    assert torch.allclose(h[0, flat_idx[0]] - h_text[0, flat_idx[0]], feats[0], atol=1e-6)


# The crop-validity rule (spec §3.1 step 7) is tested in tests/test_crop_validity.py.


def test_right_padding_does_not_change_valid_logits():
    model = random_model("tiny-molmoe")
    ids, images, masks, idx = random_inputs(model.config, batch=2)
    padded = ids.clone()
    padded[1, -5:] = -1
    with torch.no_grad():
        full = model(ids, images, masks, idx)
        part = model(padded, images, masks, idx)
        alone = model(ids[1:, :-5], images[1:], masks[1:], idx[1:])
    assert torch.allclose(part[1, :-5], alone[0], atol=1e-5)
    assert torch.equal(part[0], full[0])


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_equals_full_recompute(name):
    model = random_model(name)
    ids, images, masks, idx = random_inputs(model.config, batch=2)
    S = ids.shape[1]
    with torch.no_grad():
        full = model(ids, images, masks, idx)
        cache = model.new_kv_cache(2, S + 4)
        prefix = model(ids[:, :-3], images, masks, idx, kv_cache=cache)
        steps = [prefix]
        for s in range(S - 3, S):
            pos = torch.full((2, 1), s)
            steps.append(model(ids[:, s:s + 1], kv_cache=cache, position_ids=pos))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_position_limit_is_enforced():
    model = random_model("tiny-7b-d")
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="beyond the model's 4096 positions"):
        model(ids, position_ids=torch.tensor([[4094, 4095, 4096]]))


def test_unknown_backend_lists_supported():
    with pytest.raises(ValueError, match="supported: 'reference', 'triton'"):
        random_model("tiny-7b-d").set_backend("cuda-magic")


def test_pad_embeddings_follow_the_mask_rule():
    """Spec §3.2 written out here: mask 0 -> + pad_embed[0]; 0 < m < 1 and the legacy -1 ->
    + pad_embed[1]; m == 1 -> nothing. Pooling the hand-padded features without masks must give
    what the backbone gives with the masks."""
    model = random_model("tiny-7b-d")
    v = model.vision
    _, images, _, _ = random_inputs(model.config, crops=2)
    P = model.config.vision.num_patches
    masks = torch.ones(1, 2, P)
    masks[0, 0, :5] = 0.0
    masks[0, 0, 5:9] = 0.5
    masks[0, 1] = -1.0
    with torch.no_grad():
        feats = v.encode(images)[0]  # (2, P, C)
        pe = v.pad_embed
        padded = feats.clone()
        padded[0, :5] += pe[0]
        padded[0, 5:9] += pe[1]
        padded[1] += pe[1]
        want = v.image_projector(v.image_pooling_2d(padded, None, pe, cast_back=False))[None]
        got = v(images, masks)
        assert not torch.allclose(got, v(images, torch.ones_like(masks)), atol=1e-3)
    assert torch.allclose(got, want, atol=1e-6)


def test_pooling_cell_by_hand():
    """One pooled cell computed from spec §3.3 by hand: members (2i,2j), (2i,2j+1), (2i+1,2j),
    (2i+1,2j+1) of the 24x24 grid, query = their mean, per-head softmax over the 4 keys scaled
    by 1/sqrt(head_dim), heads concatenated, output projection."""
    model = random_model("tiny-molmoe")
    pool, vc = model.vision.image_pooling_2d, model.config.vision
    g, C = vc.grid, vc.feature_dim
    feats = torch.randn(1, g * g, C, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = pool(feats, None, model.vision.pad_embed, cast_back=False)  # (1, 144, E)
        i, j = 3, 5
        grid = feats[0].view(g, g, C)
        X = torch.stack([grid[2 * i, 2 * j], grid[2 * i, 2 * j + 1], grid[2 * i + 1, 2 * j],
                         grid[2 * i + 1, 2 * j + 1]])  # (4, C)
        q = pool.wq(X.mean(0))
        k, v = pool.wk(X), pool.wv(X)
        H, hd = vc.num_heads, vc.emb_dim // vc.num_heads
        heads = []
        for h in range(H):
            s = slice(h * hd, (h + 1) * hd)
            w = torch.softmax(k[:, s] @ q[s] / hd ** 0.5, dim=0)  # (4,)
            heads.append(w @ v[:, s])
        want = pool.wo(torch.cat(heads))
    assert torch.allclose(out[0, (g // 2) * i + j], want, atol=1e-5)



def test_vit_pre_ln_per_family():
    """Spec §3.1 step 4: the dense ViT's pre_ln computes in fp32 and casts back; MolmoE's eval-mode
    pre_ln is a plain layer_norm, so autocast decides its dtype (fp32 on CUDA, see the GPU test)."""
    from molmoe.model.layers import LayerNormFp32

    assert isinstance(random_model("tiny-7b-d").vision.image_vit.pre_ln, LayerNormFp32)
    assert not isinstance(random_model("tiny-molmoe").vision.image_vit.pre_ln, LayerNormFp32)


@pytest.mark.gpu
@pytest.mark.parametrize("name, stream_dtype", [("tiny-7b-d", torch.bfloat16),
                                                ("tiny-molmoe", torch.float32)])
def test_vit_stream_dtype_under_cuda_autocast_per_family(name, stream_dtype):
    """Spec §7.1 (b): under CUDA bf16 autocast the dense ViT's residual stream is bf16, MolmoE's
    stays fp32 (CUDA autocast runs layer_norm in fp32 and MolmoE does not cast back)."""
    model = random_model(name).cuda()
    _, images, _, _ = random_inputs(model.config)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model.vision.image_vit(images[0].cuda())
    assert all(h.dtype == stream_dtype for h in hidden)
