"""Which crops the vision backbone zeroes as padding (spec §3.1 step 7, issue 10).

A real crop can hold an exact -1.0 after resize + normalisation; HF MolmoE's released rule (zero
a crop if ANY value is -1) drops all of its features. molmoe uses the training rule (padding only
if ALL values are -1), or the batcher's explicit crop-valid mask, for every variant; the released
MolmoE rule is only `Molmo.set_compat("released")`.
"""
import numpy as np
import pytest
import torch

from molmoe.errors import UsageError
from molmoe.generation import left_pad_batch
from molmoe.processing.preprocess import ImageSettings, ImageTokenIds, preprocess_image
from tests.tiny import random_model

NAMES = ["tiny-molmoe", "tiny-7b-d"]


def crops_with_exact_minus_one() -> torch.Tensor:
    """A real image whose processed crops each hold an exact -1.0: a 14x13 random image with
    values 40..70 (red 54/255 normalises to about -1), upscaled by the released resize."""
    img = np.random.default_rng(0).integers(40, 70, (14, 13, 3)).astype(np.uint8)
    images = preprocess_image(img, ImageSettings(), ImageTokenIds(1, 2, 3, 4)).images
    assert images.shape[0] == 2 and all((c == -1).any() for c in images)  # the premise
    assert not any((c == -1).all() for c in images)
    return images


def vit_alone(model, crop_PF: torch.Tensor) -> torch.Tensor:
    """Features of one crop from the ViT run on that crop by itself (spec §3.1 step 6)."""
    hidden = model.vision.image_vit(crop_PF[None])
    return torch.cat([hidden[i] for i in model.config.vision.vit_layers], dim=-1)[0, 1:]


@pytest.mark.parametrize("name", NAMES)
def test_real_crop_with_minus_one_keeps_its_features(name):
    model = random_model(name)
    images = crops_with_exact_minus_one()
    with torch.no_grad():
        feats = model.vision.encode(images[None])[0]
        for t in range(images.shape[0]):
            want = vit_alone(model, images[t])
            assert want.abs().sum() > 0
            torch.testing.assert_close(feats[t], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_batch_padding_crops_are_still_zeroed(name):
    """Through the batcher: the 2-crop image padded to 3 crops by a 3-crop neighbour; with the
    batcher's mask, and without it (the all(-1) fallback)."""
    model = random_model(name)
    real = crops_with_exact_minus_one()
    three = torch.cat([real, real[:1].flip(-1)])
    samples = [{"input_ids": torch.arange(5), "images": real, "image_input_idx":
                torch.full((2, 144), -100, dtype=torch.int32)},
               {"input_ids": torch.arange(5), "images": three, "image_input_idx":
                torch.full((3, 144), -100, dtype=torch.int32)},
               {"input_ids": torch.arange(5)}]
    batch = left_pad_batch(samples)
    assert batch.crop_valid_BT.tolist() == [[True, True, False], [True, True, True],
                                            [False, False, False]]
    with torch.no_grad():
        for valid in (batch.crop_valid_BT, None):
            feats = model.vision.encode(batch.images_BTPF, valid)
            assert (feats[0, 2] == 0).all() and (feats[2] == 0).all()
            assert (feats[0, :2] != 0).any(-1).all() and (feats[1] != 0).any(-1).all()
            torch.testing.assert_close(feats[0, :2], feats[1, :2])


def test_explicit_mask_decides_over_pixel_values():
    """The batcher's mask, not the pixels, says what is padding: a crop of all -1 marked valid
    is encoded, a crop of ordinary pixels marked invalid is zeroed."""
    model = random_model("tiny-7b-d")
    images = crops_with_exact_minus_one()[None].clone()
    images[0, 0] = -1.0
    with torch.no_grad():
        feats = model.vision.encode(images, torch.tensor([[True, False]]))
        assert (feats[0, 1] == 0).all()
        torch.testing.assert_close(feats[0, 0], vit_alone(model, images[0, 0]))
        assert (model.vision.encode(images)[0, 0] == 0).all()  # fallback: all -1 is padding


@pytest.mark.parametrize("name, zeroed", [("tiny-molmoe", True), ("tiny-7b-d", False)])
def test_released_compat_reproduces_the_released_rule(name, zeroed):
    """compat="released": MolmoE's released code zeroes a crop holding any -1; the dense
    released code already used the all(-1) rule."""
    model = random_model(name).set_compat("released")
    images = crops_with_exact_minus_one()[None]
    valid = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        for mask in (None, valid):
            feats = model.vision.encode(images, mask)[0]
            assert bool((feats == 0).all()) == zeroed
        model.set_compat("molmoe")
        assert (model.vision.encode(images)[0] != 0).any(-1).all()


def test_model_forward_threads_crop_valid():
    """Molmo.forward(crop_valid=...) reaches the backbone, batched and unbatched."""
    model = random_model("tiny-molmoe")
    images = crops_with_exact_minus_one()
    images[1] = -1.0  # the tile is all -1: padding by the fallback rule, real by the mask
    ids = torch.arange(1, 2 + 2 * 144)
    idx = torch.arange(1, 1 + 2 * 144, dtype=torch.int32).view(2, 144)
    with torch.no_grad():
        fallback = model(ids, images, None, idx)
        masked = model(ids, images, None, idx, crop_valid=torch.tensor([True, True]))
        batched = model(ids[None], images[None], None, idx[None],
                        crop_valid=torch.tensor([[True, True]]))
        torch.testing.assert_close(masked, batched)
        assert not torch.allclose(masked, fallback)
        same = model(ids, images, None, idx, crop_valid=torch.tensor([True, False]))
        torch.testing.assert_close(same, fallback)
        with pytest.raises(UsageError, match="crop_valid"):
            model(ids, images, None, idx, crop_valid=torch.tensor([True]))
        with pytest.raises(UsageError, match="crop_valid"):
            model(ids, images, None, idx, crop_valid=torch.tensor([1.0, 1.0]))


def test_invalid_model_compat_is_a_usage_error():
    with pytest.raises(UsageError, match="compat"):
        random_model("tiny-molmoe").set_compat("hf")
