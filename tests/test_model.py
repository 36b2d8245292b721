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


@pytest.mark.parametrize("name, crop_zeroed_if_any_minus_one", [("tiny-7b-d", False),
                                                                ("tiny-molmoe", True)])
def test_crop_validity_rule_per_family(name, crop_zeroed_if_any_minus_one):
    model = random_model(name)
    _, images, _, _ = random_inputs(model.config)
    images[0, 1, 0, 0] = -1.0  # one -1 value in crop 1; crop 0 untouched
    with torch.no_grad():
        feats = model.vision.encode(images)
    assert feats[0, 0].abs().sum() > 0
    assert (feats[0, 1].abs().sum() == 0) == crop_zeroed_if_any_minus_one


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
