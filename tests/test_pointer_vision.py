"""The vision pretraining targets (molmoe.pointer_vision) against the processor's own pixels."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from molmoe import synthetic as S
from molmoe.pointer import ARCHS
from molmoe.pointer_vision import (COLOURS, SHAPES, HEAD_OUT, cell_targets, centre_softmax_loss,
                                   head_loss)
from molmoe.processing.preprocess import ImageSettings, ImageTokenIds, preprocess_image

IDS = ImageTokenIds(start=1, end=2, patch=3, col=4)


def _settings(arch: str) -> ImageSettings:
    return ImageSettings.from_config(ARCHS[arch]["preprocessor"])


def _crop_pixels(images_TPD, t, settings):
    """Crop t back to [crop, crop, 3] uint8-scale RGB (undoing patchify and normalisation)."""
    p, crop = settings.image_patch_size, settings.crop_size
    n = crop // p
    x = images_TPD[t].reshape(n, n, p, p, 3).permute(0, 2, 1, 3, 4).reshape(crop, crop, 3)
    x = x * torch.tensor(settings.image_std) + torch.tensor(settings.image_mean)
    return (x * 255).numpy()


@pytest.mark.parametrize("arch", ["p14-112", "p14-112-t4"])
@pytest.mark.parametrize("size", [(224, 224), (448, 224), (180, 360), (300, 200)])
def test_centre_targets_land_on_the_object_in_every_crop(arch, size):
    """For every object and crop, the centre cell + offset is a crop pixel of that object's
    colour in the processor's output, and the global crop's `where` is the annotated point."""
    settings = _settings(arch)
    cell = settings.crop_size // settings.image_token_length_h
    checked = 0
    for i in range(6):
        rng = random.Random(f"test-pointer-vision:{size}:{i}")
        scene = S.make_sample(rng, "single", sides=(min(size), max(size))).scene
        pixels = np.asarray(S.render(scene).convert("RGB"))
        x = preprocess_image(pixels, settings, IDS, backend="python")
        tg = cell_targets(scene, settings)
        assert tg["colour"].shape == (x.images.shape[0], settings.tokens_per_crop)
        for j, obj in enumerate(scene.objects):
            cls = COLOURS.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)
            cells = np.argwhere(tg["centre"][:, :, cls] > 0)
            assert (cells[:, 0] == 0).any(), "every object's point is in the global crop"
            for t, k in cells:
                r, c = divmod(int(k), settings.image_token_length_h)
                ox, oy = tg["offset"][t, k, cls]
                assert 0 <= ox < 1 and 0 <= oy < 1
                cy, cx = int((r + oy) * cell), int((c + ox) * cell)
                crop = _crop_pixels(x.images, t, settings)
                if obj.size * min(crop.shape[0] / scene.height, 1.0) < 8:
                    continue  # too small to hold its colour after the resize
                got = crop[cy, cx]
                assert np.abs(got - np.array(obj.rgb)).max() < 60, (t, k, got, obj.rgb)
                checked += 1
                if t == 0:  # one of the objects of this class with its point in the cell
                    same = [np.array(o.point) / 100.0 for o in scene.objects
                            if (o.colour, o.shape) == (obj.colour, obj.shape)]
                    assert min(np.abs(tg["where"][0, k, cls] - w).max() for w in same) < 1e-6
                    assert tg["where_mask"][0, k, cls] == 1
    assert checked > 10


def test_covering_labels_name_the_object_under_the_cell():
    """A cell labelled with a colour and shape has that object's pixels under it."""
    settings = _settings("p14-112-t4")
    rng = random.Random("test-pointer-vision-cover")
    for _ in range(5):
        scene = S.make_sample(rng, "count", sides=(200, 400)).scene
        tg = cell_targets(scene, settings)
        g = tg["colour"][0].reshape(4, 4)
        labelled = np.argwhere(g > 0)
        assert len(labelled) > 0
        assert ((tg["colour"] > 0) == (tg["shape"] > 0)).all()
        names = {(o.colour, o.shape) for o in scene.objects}
        for t in range(tg["colour"].shape[0]):
            for k in np.nonzero(tg["colour"][t])[0]:
                pair = (COLOURS[tg["colour"][t, k] - 1], SHAPES[tg["shape"][t, k] - 1])
                assert pair in names


def test_head_loss_is_zero_only_at_the_targets():
    settings = _settings("p14-112-t4")
    scene = S.make_sample(random.Random(3), "count", sides=(224, 224)).scene
    tg = {k: torch.from_numpy(v) for k, v in cell_targets(scene, settings).items()}
    N, K = tg["colour"].shape
    perfect = torch.zeros(N, K, HEAD_OUT)
    perfect[..., :7] = -50.0
    perfect[..., :7].scatter_(-1, tg["colour"][..., None], 50.0)
    perfect[..., 7:12] = -50.0
    perfect[..., 7:12].scatter_(-1, tg["shape"][..., None], 50.0)
    C = tg["centre"].shape[-1]
    perfect[..., 12:12 + C] = tg["centre"] * 100 - 50
    perfect[..., 12 + C:12 + 3 * C] = tg["offset"].reshape(N, K, -1)
    perfect[..., 12 + 3 * C:] = tg["where"].reshape(N, K, -1)
    loss, _ = head_loss(perfect, tg)
    assert float(loss) < 1e-6
    worse = perfect.clone()
    worse[..., 12 + 3 * C:] += 0.01
    assert float(head_loss(worse, tg)[0]) > 1e-3


def test_centre_softmax_picks_the_centre_cell_among_each_pictures_cells():
    C = 3
    centre = torch.zeros(5, 4, C)  # picture 0: crops 0-1, picture 1: crops 2-4
    centre[1, 2, 0] = 1.0  # class 0 in picture 0 at crop 1, cell 2
    centre[3, 0, 0] = centre[4, 1, 0] = 1.0  # class 0 in picture 1, seen by two crops
    centre[2, 3, 2] = 1.0  # class 2 in picture 1; class 1 is absent everywhere
    right = centre * 60 - 30
    assert float(centre_softmax_loss(right, centre, [2, 3])) < 1e-6
    # the loss sums the probability of the centre cells: both of picture 1's may share it
    half = right.clone()
    half[4, 1, 0] = -30.0
    assert float(centre_softmax_loss(half, centre, [2, 3])) < 1e-6
    # a higher logit on another cell costs, one in another picture does not
    wrong = right.clone()
    wrong[0, 0, 0] = 40.0
    assert float(centre_softmax_loss(wrong, centre, [2, 3])) > 2.0
    elsewhere = right.clone()
    elsewhere[1, 2, 2] = 40.0  # class 2 is absent from picture 0: no term there
    assert float(centre_softmax_loss(elsewhere, centre, [2, 3])) < 1e-6
    # an absent class's logits never matter
    absent = right.clone()
    absent[..., 1] = torch.randn(5, 4) * 10
    assert float(centre_softmax_loss(absent, centre, [2, 3])) < 1e-6
    # head_loss adds it only when asked, and needs the crops per picture for it
    settings = _settings("p14-112-t4")
    scene = S.make_sample(random.Random(3), "count", sides=(224, 224)).scene
    tg = {k: torch.from_numpy(v) for k, v in cell_targets(scene, settings).items()}
    out = torch.randn(*tg["colour"].shape, HEAD_OUT)
    base, parts = head_loss(out, tg)
    both, parts2 = head_loss(out, tg, [len(tg["colour"])], 0.5)
    assert "centre_softmax" not in parts and parts2["centre_softmax"] > 0
    assert float(both - base) == pytest.approx(0.5 * parts2["centre_softmax"], rel=1e-5)
    with pytest.raises(ValueError, match="n_crops"):
        head_loss(out, tg, None, 0.5)
    # the point cells' shape term likewise: its weight times the shape cross-entropy there
    at = tg["centre"].amax(-1) > 0
    with_shape, parts3 = head_loss(out, tg, centre_shape=2.0)
    expected = torch.nn.functional.cross_entropy(out[..., 7:12][at], tg["shape"][at])
    assert parts3["centre_shape"] == pytest.approx(float(expected), rel=1e-5)
    assert float(with_shape - base) == pytest.approx(2.0 * float(expected), rel=1e-5)


def _initial_checkpoint(tmp_path):
    """A p14-112-t4 initial checkpoint with a tokenizer trained on 40 generator examples."""
    from molmoe.pointer import content_words, train_tokenizer_json, write_initial_checkpoint

    texts = []
    for i in range(40):
        s = S.make_sample(random.Random(i))
        texts += [s.question, " " + s.answer]
    return write_initial_checkpoint(tmp_path / "init", arch="p14-112-t4", seed=0,
                                    tokenizer_json=train_tokenizer_json(
                                        texts, n_merges=40, split_words=content_words()))


def test_pretrain_vision_rewrites_only_the_vision_weights(tmp_path):
    """A short run on one fixed batch lowers the loss, leaves the decoder bit-identical, keeps
    the official layout (molmoe.load reads it back) and rescales the features to the asked
    RMS."""
    from molmoe.checkpoint.loader import load
    from molmoe.pointer_vision import pretrain_vision
    from molmoe.processing.processor import Processor

    d = _initial_checkpoint(tmp_path)
    before = load(d).state_dict()
    report = pretrain_vision(d, steps=25, batch=4, n_scenes=4, n_held=4, lr=2e-3, seed=1,
                             sides=(160, 224), feature_rms=0.7, log_every=0)
    assert report["loss_last"] < 0.6 * report["loss_first"], report
    after = load(d)
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("vision.") for k in changed), sorted(changed)[:5]
    proc = Processor.from_pretrained(d)
    scene = S.make_sample(random.Random(99), sides=(160, 224)).scene
    x = proc("Point to the red circle.", S.render(scene))
    with torch.no_grad():
        rms = float(after.vision(x["images"][None], x["image_masks"][None]).pow(2).mean().sqrt())
    assert 0.3 < rms < 1.5  # rescaled to 0.7 on the held-out scenes, not this one


def test_pretrain_vision_fresh_scenes_draw_a_new_batch_every_step(tmp_path, monkeypatch):
    """n_scenes=0: every step encodes scenes it has never seen (no pool), only vision changes."""
    from molmoe import pointer_vision as V
    from molmoe.checkpoint.loader import load

    d = _initial_checkpoint(tmp_path)
    seen = []
    encode = V._encode

    def spy(proc, pool, idx, with_counts=False):  # training batches come first
        seen.extend(json.dumps([o.point for o in pool[i][0].objects]) for i in idx)
        return encode(proc, pool, idx, with_counts)

    monkeypatch.setattr(V, "_encode", spy)
    before = load(d).state_dict()
    V.pretrain_vision(d, steps=3, batch=2, n_scenes=0, n_held=2, sides=(160, 224), log_every=0)
    assert len(set(seen[:6])) == 6  # 3 steps x 2: six different scenes (then the rescale's)
    changed = {k for k, v in load(d).state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("vision.") for k in changed)
    with pytest.raises(ValueError, match="n_scenes"):
        V.pretrain_vision(d, steps=1, n_scenes=-1)
    with pytest.raises(ValueError, match="vit_lr"):
        V.pretrain_vision(d, steps=1, vit_lr=-1.0)


def test_batch_objects_weights_cover_each_object_in_the_encoded_batch(tmp_path):
    """The per-object labels the dense pretraining adds (`object_weight`) index the crops as
    `_encode` stacks them: each picture's tiles (every picture has some under this geometry),
    and the patches they weigh fully show the object's colour."""
    from molmoe.pointer_vision import _batch_objects, _encode, _scene_pool
    from molmoe.processing.processor import Processor

    d = _initial_checkpoint(tmp_path)
    proc = Processor.from_pretrained(d)
    st = proc.settings
    mean, std = torch.tensor(st.image_mean), torch.tensor(st.image_std)
    p = st.image_patch_size
    knobs = S.Knobs.parse("objects=1-1,backgrounds=white,size=40-45")
    pool = _scene_pool(5, 3, (112, 400), "objects-test", knobs)
    images, _, _, n_crops = _encode(proc, pool, [4, 0, 2], with_counts=True)
    objects = _batch_objects(proc, pool, [4, 0, 2])
    assert len(objects) == 3
    first = np.cumsum([0] + n_crops[:-1])
    for (a, b, w, shape, colour_index), i, f, n in zip(objects, [4, 0, 2], first, n_crops):
        obj = pool[i][0].objects[0]
        assert (a, b) == ((f, f + 1) if n == 1 else (f + 1, f + n))
        assert (shape, colour_index) == (S.SHAPES.index(obj.shape),
                                         list(S.COLOURS).index(obj.colour))
        centre = images[0, a:b].reshape(-1, p, p, 3)[:, p // 2, p // 2] * std + mean
        full = w == 1.0
        assert full.any()
        colour = torch.tensor(S.COLOURS[obj.colour]) / 255.0
        assert (centre[full] - colour).abs().max() < 0.05


def test_pretrain_vision_joint_terms_train_and_need_a_trainable_vit(tmp_path):
    """The per-object term, the point cells' shape term and the softmax over cells all enter
    the loss (a short run on one fixed batch lowers it, the ViT changes); the per-object term
    refuses a frozen ViT before training."""
    from molmoe.checkpoint.loader import load
    from molmoe.pointer_vision import pretrain_vision

    d = _initial_checkpoint(tmp_path)
    before = load(d).state_dict()
    logs = []
    report = pretrain_vision(d, steps=25, batch=4, n_scenes=4, n_held=4, lr=2e-3, seed=1,
                             sides=(160, 224), log_every=24, log=logs.append,
                             centre_softmax=1.0, object_weight=1.0, centre_shape=1.0)
    assert report["loss_last"] < 0.6 * report["loss_first"], report
    assert all(f" {k} " in logs[1] for k in ("centre_softmax", "centre_shape", "object"))
    after = load(d).state_dict()
    assert not torch.equal(after["vision.image_vit.patch_embedding.weight"],
                           before["vision.image_vit.patch_embedding.weight"])
    with pytest.raises(ValueError, match="object_weight"):
        pretrain_vision(d, steps=1, vit_lr=0.0, object_weight=1.0)


@pytest.mark.parametrize("crops", ["global", "tiles"])
def test_shape_batch_weights_cover_each_object_in_its_crops(tmp_path, crops):
    """The per-object coverage weights of the shape phase, against the crops' own pixels: the
    centre pixel of a patch an object covers fully is that object's colour, of a patch it does
    not touch (on white, one object) white or the crop's padding. "tiles" reads every crop but
    the global view, each picture's in turn."""
    from molmoe.processing.preprocess import preprocess_image
    from molmoe.pointer_vision import _shape_batch
    from molmoe.processing.processor import Processor

    d = _initial_checkpoint(tmp_path)
    proc = Processor.from_pretrained(d)
    st = proc.settings
    mean, std = torch.tensor(st.image_mean), torch.tensor(st.image_std)
    p = st.image_patch_size
    knobs = S.Knobs.parse("objects=1-1,shapes=circle+square,backgrounds=white,size=45-50,"
                          "sides=200-300")
    x, objects = _shape_batch(proc, knobs, "test", 0, 6, crops)
    assert len(objects) == 6
    at = 0
    for n, (a, b, w, shape, colour_index) in enumerate(objects):
        sample = S.make_sample(random.Random(f"molmoe-pointer-shape-test:{n}"), "single",
                               knobs=knobs)
        obj = sample.scene.objects[0]
        assert shape == S.SHAPES.index(obj.shape)
        assert colour_index == list(S.COLOURS).index(obj.colour)
        n_crops = preprocess_image(np.asarray(S.render(sample.scene).convert("RGB")), st,
                                   proc.token_ids).images.shape[0]
        assert (a, b) == (at, at + (1 if crops == "global" else n_crops - 1))
        at = b
        centre = x[a:b].reshape(-1, p, p, 3)[:, p // 2, p // 2] * std + mean  # in [0, 1]
        colour = torch.tensor(S.COLOURS[obj.colour]) / 255.0
        full, empty = w == 1.0, w == 0.0
        assert full.any() and empty.any()
        assert (centre[full] - colour).abs().max() < 0.05
        white = (centre[empty] - 1.0).abs().amax(-1) < 0.05
        padding = centre[empty].abs().amax(-1) < 1e-5  # around a picture of another aspect
        assert bool((white | padding).all()) and bool(white.any())
    assert at == x.shape[0]


def test_pretrain_shape_rewrites_only_the_vit(tmp_path):
    """The shape phase trains the ViT alone (connector and decoder bit-identical), in the
    official layout, and reports a held-out accuracy per stage."""
    from molmoe.checkpoint.loader import load
    from molmoe.pointer_vision import pretrain_shape

    d = _initial_checkpoint(tmp_path)
    before = load(d).state_dict()
    report = pretrain_shape(d, steps=(2, 1, 0, 1), batch=4, n_held=8, log_every=0)
    assert set(report) == {"train_s"} | {f"stage{i}_held_{what}acc" for i in (0, 1, 3)
                                         for what in ("", "colour_")}
    assert all(0.0 <= v <= 1.0 for k, v in report.items() if k != "train_s")
    after = load(d).state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("vision.image_vit.") for k in changed), sorted(changed)
    with pytest.raises(ValueError, match="non-negative"):
        pretrain_shape(d, steps=(1, 1, 1, 1, 1))


@pytest.mark.parametrize("argv, message", [
    (["--vision-steps", "10", "--init", "somewhere"], "give one or the other"),
    (["--vision-steps", "-1"], "--vision-steps must be >= 0"),
    (["--vision-steps", "10", "--vision-batch", "0"], "--vision-batch >= 1"),
    (["--vision-steps", "10", "--vision-scenes", "-1"], "--vision-scenes >= 0"),
    (["--vision-steps", "10", "--vision-vit-lr", "-1"], "--vision-vit-lr >= 0"),
    (["--vision-steps", "10", "--vision-joint", "-1"], "--vision-joint >= 0"),
    (["--shape-steps", "2000,x"], "a comma list of step counts"),
    (["--shape-steps", "1,2,3,4,5"], "one to four counts"),
    (["--shape-steps", "-1"], "one to four counts"),
    (["--shape-steps", "10", "--init", "somewhere"], "give one or the other"),
])
def test_recipe_refuses_bad_vision_flags_before_writing(tmp_path, argv, message):
    from molmoe.pointer import main

    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=message):
        main(["--work", str(work), *argv])
    assert not work.exists()


def test_head_pointing_hits_with_the_targets_and_misses_with_other_classes(tmp_path):
    """`head_pointing` with a head that outputs the exact targets points at every uniquely
    named object (the offset and the crop placement map back to the annotated point); with the
    centre logits of another class it points elsewhere."""
    from molmoe.pointer_vision import N_CLASSES, _scene_pool, head_pointing
    from molmoe.processing.processor import Processor

    proc = Processor.from_pretrained(_initial_checkpoint(tmp_path))
    held = _scene_pool(12, 5, (160, 448), "head-pointing-test")
    C = N_CLASSES

    def perfect(shift):
        outs = []
        for scene, _ in held:
            tg = {k: torch.from_numpy(v) for k, v in cell_targets(scene, proc.settings).items()}
            N, K = tg["colour"].shape
            out = torch.zeros(N, K, HEAD_OUT)
            out[..., 12:12 + C] = (tg["centre"] * 100 - 50).roll(shift, -1)
            out[..., 12 + C:12 + 3 * C] = tg["offset"].roll(shift, -2).reshape(N, K, -1)
            outs.append(out)
        return torch.cat(outs)

    class Vision:  # returns, for the crops of held[...] in order, the prepared head outputs
        def __init__(self, out):
            self.out, self.at = out, 0

        def __call__(self, images, masks):
            n = images.shape[1]
            self.at, lo = self.at + n, self.at
            return (self.out[lo:self.at],)

    right = head_pointing(Vision(perfect(0)), lambda x: x, proc, held)
    wrong = head_pointing(Vision(perfect(7)), lambda x: x, proc, held)
    names = [[(o.colour, o.shape) for o in s.objects] for s, _ in held]
    n = sum(sum(ns.count(x) == 1 for x in ns) for ns in names)
    assert right["head_point_targets"] == wrong["head_point_targets"] == n > 20
    assert right["head_point_acc"] == 1.0, right
    assert wrong["head_point_acc"] < 0.2, wrong
    shared = sum(sum(ns.count(x) == 1 and sum(c == x[0] for c, _ in ns) > 1 for x in ns)
                 for ns in names)
    assert right["head_point_shared_colour"] == shared


@pytest.mark.parametrize("argv, vit_lr, joint", [
    (["--shape-steps", "1", "--vision-steps", "1"], 1e-3, 1.0),  # --vision-pretrain-lr 2e-3 / 2
    (["--shape-steps", "1", "--vision-steps", "1", "--vision-vit-lr", "1e-4"], 1e-4, 1.0),
    (["--shape-steps", "1", "--vision-steps", "1", "--vision-vit-lr", "0"], 0.0, 1.0),
    (["--shape-steps", "1", "--vision-steps", "1", "--vision-joint", "0.5"], 1e-3, 0.5),
    (["--vision-steps", "1"], 2e-3, 0.0),
    (["--vision-steps", "1", "--vision-vit-lr", "0"], 0.0, 0.0),
    (["--vision-steps", "1", "--vision-joint", "2"], 2e-3, 2.0),
])
def test_recipe_slows_the_vit_for_the_dense_targets_after_a_shape_phase(
        tmp_path, monkeypatch, argv, vit_lr, joint):
    """The recipe's wiring: after a shape phase the dense pretraining trains the ViT at half
    its rate unless given one (0 freezes it) with the joint terms on (weight 1), and at the
    full rate without them otherwise; the per-object term only with a trainable ViT.
    The pretraining functions themselves are replaced by recorders here (they have their own
    tests above); training is stopped there."""
    import molmoe.pointer_vision as V
    import molmoe.training.trainer as T
    from molmoe.pointer import main

    calls = {}

    class Stop(Exception):
        pass

    monkeypatch.setattr(V, "pretrain_shape", lambda d, **kw: calls.setdefault("shape", kw) or {})
    monkeypatch.setattr(V, "pretrain_vision", lambda d, **kw: calls.setdefault("vision", kw) or {})
    monkeypatch.setattr(T, "train", lambda opts: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        main(["--work", str(tmp_path / "w"), "--arch", "p14-112-t4", "--no-eval",
              "--curriculum", "objects=1-1,mix=single:1,sides=160@4@1", *argv])
    kw = calls["vision"]
    assert kw["vit_lr"] == pytest.approx(vit_lr)
    assert kw["centre_softmax"] == kw["centre_shape"] == joint
    assert kw["object_weight"] == (joint if vit_lr else 0.0)
    assert ("shape" in calls) == ("--shape-steps" in argv)


def test_pretrain_vision_with_vit_lr_zero_trains_the_connector_only(tmp_path):
    from molmoe.checkpoint.loader import load
    from molmoe.pointer_vision import pretrain_vision

    d = _initial_checkpoint(tmp_path)
    before = load(d).state_dict()
    pretrain_vision(d, steps=2, batch=2, n_scenes=0, n_held=2, sides=(160, 224), vit_lr=0.0,
                    log_every=0)
    changed = {k for k, v in load(d).state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("vision.image_pooling_2d.") for k in changed), sorted(changed)
    assert not any(k.startswith("vision.image_vit.") for k in changed), sorted(changed)
