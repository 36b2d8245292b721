"""Vision pretraining for the built-in pointing model (issue 13): the tiny Molmo's ViT and
connector learn, before `molmoe train` ever runs, to say in each pooled image token what lies
there: which colour and shape cover the cell, and where the centre of each object whose
centre falls in the cell is. This is the toy's stand-in for the CLIP pretraining a real Molmo's
vision tower has: a frozen random ViT keeps an object's colour (a mean) but hardly its shape
(bench/RESULTS.md, session 4: a linear read-out of the shape from the image tokens scored
37-43%, chance 25%), and the decoder cannot bind a question to what the tokens do not carry.

Targets, per pooled cell (2x2 patches) of every crop the processor makes of a scene, computed
from the scene's geometry and the processor's own resize-and-pad arithmetic
(`molmoe.processing.preprocess`), never from the pixels:
  * `colour`, `shape`: which object covers most of the cell (8x8 samples per cell over the
    scene's visible-object label map; an object whose annotated point lies in the cell wins),
    7 and 5 classes with "none";
  * `centre[c]` for each of the 24 colour x shape classes: 1 in the cell holding the annotated
    point of an object of class c (binary cross-entropy, every cell);
  * `offset[c]`: where in that cell the point lies, (x, y) in [0, 1] (squared error, centre
    cells only);
  * `where[c]`: the point in percent of the picture / 100, global crop only (the one crop whose
    placement in the picture a crop can see: the padding around it gives the aspect ratio).

The head is one linear layer on the projected tokens (the exact vectors `Molmo.embed` adds to
the `<im_patch>` embeddings), so what it reads is linearly in what the decoder gets. After
training, the projector's output is rescaled to the features' initial RMS (a linear map: the
read-outs stay) and the head is dropped: the checkpoint keeps the official layout.
"""
from __future__ import annotations

import math
import pathlib
import random
import time

import numpy as np

from molmoe.synthetic import COLOURS as _RGB, SHAPES

COLOURS = tuple(_RGB)
N_CLASSES = len(COLOURS) * len(SHAPES)
SAMPLES = 8  # per cell side, for the covering object
MIN_COVER = 8  # samples of SAMPLES**2 an object must cover to name the cell (1/8 of it)
# loss weights of the centre, offset and where terms (colour and shape weigh 1); a covered
# cell's colour/shape loss counts COVERED_WEIGHT times an empty cell's (~14% are covered).
# `where` is asked of the point cells only: asking every other global cell for (0, 0) as well
# (weight 0.05, session 5) cost the read-out (11% error against 2.5%).
LOSS_WEIGHTS = (1.0, 4.0, 40.0)
COVERED_WEIGHT = 4.0


def _class(obj) -> int:
    return COLOURS.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def crop_maps(height: int, width: int, settings):
    """For every crop of an H x W picture, (sy, sx, oy, ox): picture pixel = crop pixel * s + o
    along each axis, and the crop pixels the picture covers (y0, y1, x0, x1). Crop 0 is the
    global view, then the tiles row-major (molmoe.processing.preprocess._crops_python)."""
    from molmoe.processing.preprocess import canvas_size, image_layout, scaled_size

    crop = settings.crop_size
    out = []
    nh, nw = scaled_size(height, width, crop, crop)
    top, left = (crop - nh) // 2, (crop - nw) // 2
    out.append((height / nh, width / nw, -top * height / nh, -left * width / nw,
                (top, top + nh, left, left + nw)))
    lay = image_layout(height, width, settings)
    CH, CW = canvas_size(lay, settings)
    ch, cw = scaled_size(height, width, CH, CW)
    ctop, cleft = (CH - ch) // 2, (CW - cw) // 2
    stride = settings.window_size
    for i in range(lay.tiling[0]):
        for j in range(lay.tiling[1]):
            y0, x0 = i * stride, j * stride
            out.append((height / ch, width / cw, (y0 - ctop) * height / ch,
                        (x0 - cleft) * width / cw,
                        (ctop - y0, ctop + ch - y0, cleft - x0, cleft + cw - x0)))
    return out, lay


def sample_labels(scene, crop_map, n: int, step: float) -> np.ndarray:
    """scene.labels (1 + visible object, 0: none) at n x n sample points of one crop, at crop
    pixels (i + 0.5) * step along each axis; `crop_map` is one entry of `crop_maps`. Points on
    the crop's padding are 0."""
    sy, sx, oy, ox, (y0, y1, x0, x1) = crop_map
    s = (np.arange(n) + 0.5) * step
    iy = np.clip(np.floor(s * sy + oy).astype(np.int64), 0, scene.height - 1)
    ix = np.clip(np.floor(s * sx + ox).astype(np.int64), 0, scene.width - 1)
    inside = ((s >= y0) & (s < y1))[:, None] & ((s >= x0) & (s < x1))[None, :]
    return np.where(inside, scene.labels[iy[:, None], ix[None, :]], 0)


def cell_targets(scene, settings) -> dict[str, np.ndarray]:
    """The targets above for one scene: arrays with a leading (crops, cells) shape."""
    H, W = scene.height, scene.width
    maps, _ = crop_maps(H, W, settings)
    kh = settings.image_token_length_h
    cell = settings.crop_size // kh  # pixels per pooled cell side (2 patches)
    T, K = len(maps), kh * kh
    colour = np.zeros((T, K), np.int64)
    shape = np.zeros((T, K), np.int64)
    centre = np.zeros((T, K, N_CLASSES), np.float32)
    offset = np.zeros((T, K, N_CLASSES, 2), np.float32)
    offset_mask = np.zeros((T, K, N_CLASSES), np.float32)
    where = np.zeros((T, K, N_CLASSES, 2), np.float32)
    where_mask = np.zeros((T, K, N_CLASSES), np.float32)
    # sample points of every cell, in crop pixels
    for t, (sy, sx, oy, ox, _) in enumerate(maps):
        lab = sample_labels(scene, maps[t], kh * SAMPLES, cell / SAMPLES)
        lab = lab.reshape(kh, SAMPLES, kh, SAMPLES).transpose(0, 2, 1, 3).reshape(K, -1)
        n_obj = len(scene.objects)
        counts = np.stack([(lab == j + 1).sum(1) for j in range(n_obj)], 1)  # (K, n_obj)
        owner = np.where(counts.max(1) >= MIN_COVER, counts.argmax(1), -1)
        for j, obj in enumerate(scene.objects):
            # the annotated point in this crop's pixels
            cy = (obj.point[1] / 100.0 * H - oy) / sy
            cx = (obj.point[0] / 100.0 * W - ox) / sx
            if not (0 <= cy < settings.crop_size and 0 <= cx < settings.crop_size):
                continue
            r, c = int(cy // cell), int(cx // cell)
            k, cls = r * kh + c, _class(obj)
            if owner[k] < 0 or counts[k, j] * 2 >= counts[k, owner[k]]:
                owner[k] = j
            centre[t, k, cls] = 1.0
            offset[t, k, cls] = (cx / cell - c, cy / cell - r)
            offset_mask[t, k, cls] = 1.0
            if t == 0:
                where[t, k, cls] = (obj.point[0] / 100.0, obj.point[1] / 100.0)
                where_mask[t, k, cls] = 1.0
        for k in np.nonzero(owner >= 0)[0]:
            obj = scene.objects[owner[k]]
            colour[t, k] = 1 + COLOURS.index(obj.colour)
            shape[t, k] = 1 + SHAPES.index(obj.shape)
    return {"colour": colour, "shape": shape, "centre": centre, "offset": offset,
            "offset_mask": offset_mask, "where": where, "where_mask": where_mask}


HEAD_OUT = 7 + 5 + N_CLASSES * 5  # colour, shape, centre, offset (x, y), where (x, y)


def centre_softmax_loss(cen, centre, n_crops):
    """Pointing as a choice among cells: for every class present in a picture, the
    cross-entropy of a softmax of that class's centre logits over all the picture's cells
    (every crop), the centre cells being the right answers (their probabilities summed).
    cen, centre: (N, K, C) stacked over the pictures' crops; n_crops: crops per picture.
    The per-cell binary loss weighs a same-coloured neighbour like any empty cell; this one
    spends its gradient on the cells that compete for the point."""
    import torch

    C = cen.shape[-1]
    losses, first = [], 0
    for n in n_crops:
        z = cen[first:first + n].reshape(-1, C)
        t = centre[first:first + n].reshape(-1, C) > 0
        first += n
        present = t.any(0)
        if present.any():
            z, t = z[:, present], t[:, present]
            pos = torch.logsumexp(z.masked_fill(~t, float("-inf")), 0)
            losses.append(torch.logsumexp(z, 0) - pos)
    if not losses:
        return cen.sum() * 0.0
    return torch.cat(losses).mean()


def head_loss(out, tg, n_crops=None, centre_softmax: float = 0.0,
              centre_shape: float = 0.0) -> tuple:
    """out (N, K, HEAD_OUT), targets stacked over N crops -> (loss, parts). With
    `centre_softmax` > 0 (and the crops per picture, `n_crops`) the loss adds that weight
    times `centre_softmax_loss`; with `centre_shape` > 0, that weight times a second shape
    cross-entropy over the cells holding an object's point (the cells a pointer picks)."""
    import torch
    import torch.nn.functional as F

    C = N_CLASSES
    w = 1.0 + (COVERED_WEIGHT - 1.0) * (tg["colour"] > 0).float().reshape(-1)
    lc = (F.cross_entropy(out[..., :7].reshape(-1, 7), tg["colour"].reshape(-1),
                          reduction="none") * w).sum() / w.sum()
    ls = (F.cross_entropy(out[..., 7:12].reshape(-1, 5), tg["shape"].reshape(-1),
                          reduction="none") * w).sum() / w.sum()
    cen = out[..., 12:12 + C]
    # centre cells are rare: weight the positives up
    lz = F.binary_cross_entropy_with_logits(cen, tg["centre"], pos_weight=torch.tensor(8.0))
    off = out[..., 12 + C:12 + 3 * C].reshape(*out.shape[:2], C, 2)
    m = tg["offset_mask"]
    lo = ((off - tg["offset"]).pow(2).sum(-1) * m).sum() / m.sum().clamp(min=1)
    wh = out[..., 12 + 3 * C:12 + 5 * C].reshape(*out.shape[:2], C, 2)
    m = tg["where_mask"]
    lw = ((wh - tg["where"]).pow(2).sum(-1) * m).sum() / m.sum().clamp(min=1)
    wz, wo, ww = LOSS_WEIGHTS
    loss = lc + ls + wz * lz + wo * lo + ww * lw
    parts = [float(v.detach()) for v in (lc, ls, lz, lo, lw)]
    loss_parts = dict(zip(("colour", "shape", "centre", "offset", "where"), parts))
    if centre_softmax:
        if n_crops is None:
            raise ValueError("centre_softmax needs n_crops (crops per picture)")
        lsm = centre_softmax_loss(cen, tg["centre"], n_crops)
        loss = loss + centre_softmax * lsm
        loss_parts["centre_softmax"] = float(lsm.detach())
    if centre_shape:
        at = tg["centre"].amax(-1) > 0
        lcs = F.cross_entropy(out[..., 7:12][at], tg["shape"][at])
        loss = loss + centre_shape * lcs
        loss_parts["centre_shape"] = float(lcs.detach())
    return loss, loss_parts


def _scene_pool(n: int, seed: int, sides: tuple[int, int], tag: str = "train", knobs=None):
    """n (scene, rendered uint8 array) pairs in the issue's domain (the generator's default
    question mix, so 1-6 objects with its distractors) or `knobs`'s, from their own RNG
    strings: never a scene of the training data or of the evaluator."""
    from molmoe import synthetic as S

    out = []
    for i in range(n):
        rng = random.Random(f"molmoe-pointer-vision-{tag}:{seed}:{i}")
        sample = S.make_sample(rng, sides=sides, knobs=knobs)
        out.append((sample.scene, np.asarray(S.render(sample.scene).convert("RGB"))))
    return out


def _encode(proc, pool, idx, with_counts: bool = False):
    """Crops, masks and stacked targets of pool[idx] (crops of all pictures concatenated)."""
    import torch

    from molmoe.processing.preprocess import preprocess_image

    images, masks, tgs = [], [], []
    for i in idx:
        scene, pixels = pool[i]
        x = preprocess_image(pixels, proc.settings, proc.token_ids)
        images.append(x.images)
        masks.append(x.image_masks)
        tgs.append(cell_targets(scene, proc.settings))
    tg = {k: torch.from_numpy(np.concatenate([t[k] for t in tgs])) for k in tgs[0]}
    out = torch.cat(images)[None], torch.cat(masks)[None], tg
    return (*out, [len(t["colour"]) for t in tgs]) if with_counts else out


# The shape phase (bench/RESULTS.md, issue 13, session 7). The tiny ViT learns an object's shape
# from a per-object label: the last block's features of the patches the object covers in the
# processor's global crop, averaged with its coverage as weights, then a linear head for its
# shape and its colour (so both have to be in the object's own tokens, where the decoder
# looks). From scratch it
# learns this only on white: one object of 20-30% of a 224-px square reaches 95% held out
# after 2,000 steps at lr 5e-4, while on the coloured backgrounds the same steps reach
# 55-62%. Each step towards the domain then goes quickly from the previous tower
# (1-4 objects of 12-30% on white: 47% -> 80% in 1,000 steps), and all at once does not.
SHAPE_STAGES = (
    # (generator knobs, the crops read: "global" = the processor's global view, "tiles" = the
    # other crops, where the domain's objects are 2-4x larger than in the global view)
    ("objects=1-1,backgrounds=white,size=20-30,sides=224", "global"),
    ("objects=1-4,backgrounds=white,size=12-30,sides=224", "global"),
    ("backgrounds=plain+gradient+noisy,sides=160-448", "global"),  # the domain
    ("backgrounds=plain+gradient+noisy,sides=160-448", "tiles"),
)
_COVER_SAMPLES = 4  # per patch side, for an object's coverage of each patch


def _shape_batch(proc, knobs, tag: str, start: int, n: int, crops: str = "global"):
    """n pictures: (the patches of their `crops` ("global" or "tiles"), (N, P, patch*patch*3)
    with every picture's crops in turn, and [(first crop, end crop, coverage weights over
    those crops' patches (crops * P,), shape index, colour index)] for every object visible
    in them)."""
    import torch

    from molmoe import synthetic as S
    from molmoe.processing.preprocess import preprocess_image

    if crops not in ("global", "tiles"):
        raise ValueError(f"crops: 'global' or 'tiles', got {crops!r}")
    settings = proc.settings
    patches, objects, at = [], [], 0
    for i in range(start, start + n):
        scene = S.make_sample(random.Random(f"molmoe-pointer-shape-{tag}:{i}"), "single",
                              knobs=knobs).scene
        pixels = np.asarray(S.render(scene).convert("RGB"))
        images = preprocess_image(pixels, settings, proc.token_ids).images
        maps = crop_maps(scene.height, scene.width, settings)[0]
        picked = [0] if crops == "global" else list(range(1, len(maps)))
        patches.extend(images[t] for t in picked)
        objects.extend((at, at + len(picked), w, sh, co)
                       for w, sh, co in _object_coverage(scene, maps, picked, settings))
        at += len(picked)
    return torch.stack(patches), objects


def _object_coverage(scene, maps, picked, settings) -> list:
    """[(coverage weights (len(picked) * patches,), shape index, colour index)] of every
    object of `scene` visible in its crops `picked` (indices into `maps`, `crop_maps`'s)."""
    import torch

    g = settings.crop_size // settings.image_patch_size
    k = _COVER_SAMPLES
    labs = np.stack([sample_labels(scene, maps[t], g * k, settings.image_patch_size / k)
                     for t in picked])  # (crops, g*k, g*k)
    out = []
    for j, obj in enumerate(scene.objects):
        w = (labs == j + 1).reshape(len(picked), g, k, g, k).mean((2, 4)).reshape(-1)
        if w.any():
            out.append((torch.from_numpy(w.astype(np.float32)), SHAPES.index(obj.shape),
                        COLOURS.index(obj.colour)))
    return out


def _batch_objects(proc, pool, idx) -> list:
    """The shape phase's per-object labels for pool[idx] as `_encode` stacks them: [(first
    crop, end crop, weights, shape, colour)] over each picture's tiles (its global view when it
    has no tiles), crop indices into the batch's concatenated crops."""
    out, at = [], 0
    for i in idx:
        scene = pool[i][0]
        maps = crop_maps(scene.height, scene.width, proc.settings)[0]
        picked = list(range(1, len(maps))) or [0]
        out.extend((at + picked[0], at + picked[-1] + 1, w, sh, co)
                   for w, sh, co in _object_coverage(scene, maps, picked, proc.settings))
        at += len(maps)
    return out


def object_logits(feats, objects, head) -> tuple:
    """The shape phase's read-out: each object's features (from feats (N, P, D), patches of
    N crops) averaged over its patches with its coverage as weights, then the linear `head`:
    (shape logits, shape labels, colour logits, colour labels) of every object."""
    import torch

    out = head(torch.stack([(feats[a:b].reshape(-1, feats.shape[-1]) * w[:, None]).sum(0)
                            / w.sum() for a, b, w, _, _ in objects]))
    return (out[:, :len(SHAPES)], torch.tensor([o[3] for o in objects]),
            out[:, len(SHAPES):], torch.tensor([o[4] for o in objects]))


def object_loss(feats, objects, head):
    """The shape phase's loss: `object_logits`'s shape and colour cross-entropies, summed."""
    import torch.nn.functional as F

    s_out, s_y, c_out, c_y = object_logits(feats, objects, head)
    return F.cross_entropy(s_out, s_y) + F.cross_entropy(c_out, c_y)


def pretrain_shape(directory, *, steps: tuple[int, ...] = (2000, 1000, 1000), batch: int = 32,
                   lr: float = 5e-4, warmup: int = 100, seed: int = 0, n_held: int = 200,
                   log_every: int = 250, log=print) -> dict:
    """Train the ViT of the checkpoint in `directory` on the shape phase's stages in turn
    (`steps[i]` steps of SHAPE_STAGES[i], a fresh batch every step, AdamW at `lr` after a linear
    warm-up, constant after; a new optimizer per stage, one head throughout) and write it back.
    The head also reads each object's colour (a second cross-entropy): trained on the shape
    alone, the tower lost the colour (a connector trained on it read 29% of the cells' colours,
    against 90%+ from the initial tower). Only the ViT changes (the connector and decoder are
    bit-identical). Returns the held-out per-object shape and colour accuracy after each
    stage, on that stage's pictures."""
    import torch
    import torch.nn.functional as F

    from molmoe import synthetic as S
    from molmoe.checkpoint.loader import load
    from molmoe.processing.processor import Processor

    if len(steps) > len(SHAPE_STAGES) or any(n < 0 for n in steps):
        raise ValueError(f"steps: up to {len(SHAPE_STAGES)} non-negative counts, got {steps}")
    directory = pathlib.Path(directory)
    torch.manual_seed(seed)
    model = load(directory, dtype="float32")
    proc = Processor.from_pretrained(directory)
    vit = model.vision.image_vit
    vit.train().requires_grad_(True)
    head = torch.nn.Linear(vit.cfg.emb_dim, len(SHAPES) + len(COLOURS))

    def logits(x, objects):
        return object_logits(vit(x)[-1][:, 1:], objects, head)  # the class token dropped

    t0 = time.perf_counter()
    report = {}
    for stage, n_steps in enumerate(steps):
        if not n_steps:
            continue
        knobs, crops = S.Knobs.parse(SHAPE_STAGES[stage][0]), SHAPE_STAGES[stage][1]
        opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
        for step in range(n_steps):
            s_out, s_y, c_out, c_y = logits(*_shape_batch(proc, knobs, f"{seed}:{stage}",
                                                          step * batch, batch, crops))
            loss = F.cross_entropy(s_out, s_y) + F.cross_entropy(c_out, c_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and (step % log_every == 0 or step == n_steps - 1):
                log(f"  shape stage {stage} step {step} loss {float(loss.detach()):.3f} "
                    f"({time.perf_counter() - t0:.0f}s)")
        vit.eval()
        hits, colour_hits, total = 0, 0, 0
        with torch.no_grad():
            for lo in range(0, n_held, 50):
                s_out, s_y, c_out, c_y = logits(*_shape_batch(
                    proc, knobs, f"{seed}:{stage}:held", lo, min(50, n_held - lo), crops))
                hits += int((s_out.argmax(-1) == s_y).sum())
                colour_hits += int((c_out.argmax(-1) == c_y).sum())
                total += len(s_y)
        vit.train()
        report[f"stage{stage}_held_acc"] = hits / max(total, 1)
        report[f"stage{stage}_held_colour_acc"] = colour_hits / max(total, 1)
        log(f"  shape stage {stage}: held-out shape {report[f'stage{stage}_held_acc']:.3f}, "
            f"colour {report[f'stage{stage}_held_colour_acc']:.3f} ({total} objects)")
    _write_back(model, directory)
    report["train_s"] = time.perf_counter() - t0
    return report


def _write_back(model, directory: pathlib.Path) -> None:
    """The model's weights into directory/pytorch_model.bin (official layout). load() maps the
    file into memory: write a new file and rename it over the old one (overwriting in place
    truncates the mapped pages under the live tensors: SIGBUS)."""
    import torch

    from molmoe.checkpoint.adapter import to_official

    path = directory / "pytorch_model.bin"
    tmp = path.with_suffix(".bin.tmp")
    torch.save({k: v.clone() for k, v in to_official(model.state_dict(), "molmoe-hf").items()},
               tmp)
    tmp.replace(path)


def pretrain_vision(directory, *, steps: int = 2500, batch: int = 16, lr: float = 2e-3,
                    n_scenes: int = 4000, n_held: int = 200, seed: int = 0, sides=(160, 448),
                    feature_rms: float = 1.0, log_every: int = 50, log=print,
                    head_out=None, vit_lr: float | None = None,
                    centre_softmax: float = 0.0, knobs: str | None = None,
                    head_in=None, object_weight: float = 0.0,
                    centre_shape: float = 0.0) -> dict:
    """Train the ViT and connector of the checkpoint in `directory` on the targets above and
    write them back (pytorch_model.bin, official layout). Returns held-out read-out figures.
    n_scenes: the size of the fixed pool batches are drawn from; 0 draws a fresh batch of
    scenes every step (session 7: the shape then creeps up, 26% -> 35% over 3,000 steps, where
    fixed pools of 3,000 stayed at 29-35% throughout; bench/RESULTS.md).
    vit_lr: the ViT's own peak rate (None: `lr`); 0 keeps the ViT as it is and trains the
    connector (and head) only. After the shape phase the ViT trained at `lr` lost its shape
    (session 7, E8 against E9) and frozen kept the shape but not the place (session 8: where
    error 11% against 4%).
    centre_softmax: weight of `centre_softmax_loss` (0: the per-cell binary loss alone).
    knobs: `molmoe.synthetic.Knobs` spec of the training scenes (None: the issue's domain);
    the held-out scenes are always the issue's domain.
    object_weight: weight of the shape phase's per-object loss (`object_loss`, on the ViT's
    last block over each object's tiles, its own linear head) trained along, so the dense
    targets cannot wash out the shape the tower has; needs a trainable ViT.
    centre_shape: weight of an extra shape cross-entropy of the dense head at the cells that
    hold an object's point (the cells a pointer picks)."""
    import torch

    from molmoe.checkpoint.loader import load
    from molmoe.processing.processor import Processor
    from molmoe.synthetic import Knobs

    if n_scenes < 0:
        raise ValueError(f"n_scenes must be >= 0, got {n_scenes}")
    vit_lr = lr if vit_lr is None else vit_lr
    if vit_lr < 0:
        raise ValueError(f"vit_lr must be >= 0, got {vit_lr}")
    if object_weight and not vit_lr:
        raise ValueError("object_weight needs a trainable ViT (vit_lr > 0)")
    directory = pathlib.Path(directory)
    torch.manual_seed(seed)
    model = load(directory, dtype="float32")
    proc = Processor.from_pretrained(directory)
    vision = model.vision
    vision.train().requires_grad_(True)  # load() returns an inference model
    head = torch.nn.Linear(model.config.text.d_model, HEAD_OUT)
    if head_in is not None:  # a head from an earlier call (`head_out`), to go on training
        head.load_state_dict(torch.load(head_in))
    vit = vision.image_vit
    if not vit_lr:
        vit.eval().requires_grad_(False)
    vit_params = {id(p) for p in vit.parameters()}
    groups = [{"params": [p for p in vision.parameters() if id(p) not in vit_params]
               + list(head.parameters()), "lr": lr}]
    if vit_lr:
        groups.append({"params": list(vit.parameters()), "lr": vit_lr})
    last_block = {}
    if object_weight:
        obj_head = torch.nn.Linear(vit.cfg.emb_dim, len(SHAPES) + len(COLOURS))
        groups[0]["params"] += list(obj_head.parameters())
        hook = vit.register_forward_hook(lambda m, i, o: last_block.__setitem__("x", o[-1]))
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(
            math.pi * min(s, steps) / steps))))
    t0 = time.perf_counter()
    train_knobs = Knobs.parse(knobs) if knobs else None
    tag = f":{knobs}" if knobs else ""
    pool = _scene_pool(n_scenes, seed, sides, knobs=train_knobs)
    held = _scene_pool(n_held, seed, sides, "held-out")
    log(f"vision pretraining: {n_scenes or 'fresh'} scenes in {time.perf_counter() - t0:.0f}s")
    order = random.Random(seed)
    t1 = time.perf_counter()
    losses = []
    for step in range(steps):
        if n_scenes:
            src, idx = pool, order.sample(range(len(pool)), batch)
        else:
            src = _scene_pool(batch, seed, sides, f"fresh{step}{tag}", train_knobs)
            idx = range(batch)
        images, masks, tg, n_crops = _encode(proc, src, idx, with_counts=True)
        feats = vision(images, masks)[0]  # (N, K, D)
        loss, parts = head_loss(head(feats), tg, n_crops, centre_softmax, centre_shape)
        if object_weight:
            lob = object_loss(last_block["x"][:, 1:], _batch_objects(proc, src, idx), obj_head)
            loss = loss + object_weight * lob
            parts["object"] = float(lob.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"  step {step} loss {float(loss.detach()):.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f" ({(time.perf_counter() - t1) / (step + 1):.2f} s/step)")
    if object_weight:
        hook.remove()
    vision.eval()
    outputs = _held_outputs(vision, head, proc, held)
    report = {**evaluate_readout(vision, head, proc, held, outputs),
              **head_pointing(vision, head, proc, held, outputs)}
    log("  held-out: " + " ".join(f"{k} {v:.3f}" for k, v in report.items()))
    # rescale the projector so the features keep their RMS, and write the weights back
    with torch.no_grad():
        images, masks, _ = _encode(proc, held, range(min(32, len(held))))
        rms = float(vision(images, masks).pow(2).mean().sqrt())
        vision.image_projector.w2.weight.mul_(feature_rms / rms)
    _write_back(model, directory)
    if head_out is not None:  # for diagnostics: the read-out head itself
        torch.save(head.state_dict(), head_out)
    report["train_s"] = time.perf_counter() - t0
    report["loss_first"], report["loss_last"] = losses[0], losses[-1]
    report["feature_rms_before_rescale"] = rms
    return report


def _held_outputs(vision, head, proc, held) -> list:
    """The head's outputs on the held-out scenes, 16 at a time: [(scene indices, outputs
    (crops, K, HEAD_OUT), stacked targets, crops per scene)]."""
    import torch

    out = []
    with torch.no_grad():
        for lo in range(0, len(held), 16):
            idx = range(lo, min(lo + 16, len(held)))
            images, masks, tg, n_crops = _encode(proc, held, idx, with_counts=True)
            out.append((idx, head(vision(images, masks)[0]), tg, n_crops))
    return out


def evaluate_readout(vision, head, proc, held, outputs=None) -> dict:
    """Held-out accuracy of the head: colour / shape of covered cells (and the shape of the
    cells holding an object's point), centre-class hits (the
    cell with the highest logit for each present class is a centre cell of that class), mean
    |where| error in percent on the global crop."""
    import torch

    C = N_CLASSES
    hit_c = hit_s = n_cov = hit_z = n_z = hit_sc = n_at = hit_st = n_st = 0
    err_w, n_w = 0.0, 0
    for _, out, tg, n_crops in outputs or _held_outputs(vision, head, proc, held):
        cov = tg["colour"] > 0
        hit_c += int((out[..., :7].argmax(-1) == tg["colour"])[cov].sum())
        hit_s += int((out[..., 7:12].argmax(-1) == tg["shape"])[cov].sum())
        n_cov += int(cov.sum())
        at = tg["centre"].amax(-1) > 0  # cells holding an object's point
        hit_sc += int((out[..., 7:12].argmax(-1) == tg["shape"])[at].sum())
        n_at += int(at.sum())
        tile = torch.ones_like(cov)  # crop 0 of each picture is its global view
        tile[torch.from_numpy(np.cumsum([0] + n_crops[:-1]))] = False
        hit_st += int((out[..., 7:12].argmax(-1) == tg["shape"])[cov & tile].sum())
        n_st += int((cov & tile).sum())
        cen = out[..., 12:12 + C]
        present = tg["centre"].amax(1) > 0  # (N, C)
        best = cen.argmax(1)  # (N, C)
        got = torch.gather(tg["centre"], 1, best[:, None, :])[:, 0]
        hit_z += int(got[present].sum())
        n_z += int(present.sum())
        wh = out[..., 12 + 3 * C:].reshape(*out.shape[:2], C, 2)
        m = tg["where_mask"] > 0
        err_w += float((wh - tg["where"]).abs()[m].sum()) * 100
        n_w += 2 * int(m.sum())
    return {"colour_acc": hit_c / max(n_cov, 1), "shape_acc": hit_s / max(n_cov, 1),
            "shape_acc_at_points": hit_sc / max(n_at, 1),
            "shape_acc_tiles": hit_st / max(n_st, 1),
            "centre_acc": hit_z / max(n_z, 1), "where_err_pct": err_w / max(n_w, 1)}


def head_pointing(vision, head, proc, held, outputs=None) -> dict:
    """Point with the read-out head alone, as the decoder would have to from the same tokens:
    for every object whose colour x shape class no other object of its scene has, the cell of
    the highest centre logit of that class over all the picture's crops, moved by the offset
    head, mapped back to the picture through the crop's placement; a hit lands on the object's
    visible pixels. Split by whether another object shares the target's colour (then only the
    shape tells them apart) or not. A gauge of what one linear look at the tokens finds (a
    decoder may do better), and cheap: no decoder is trained. `outputs`: `_held_outputs`'s,
    when the caller has them."""
    C = N_CLASSES
    kh = proc.settings.image_token_length_h
    cell = proc.settings.crop_size / kh
    hits = {"shared": [0, 0], "unique": [0, 0]}
    for idx, out, _, n_crops in outputs or _held_outputs(vision, head, proc, held):
        first = 0
        for i, n in zip(idx, n_crops):
            scene = held[i][0]
            maps, _ = crop_maps(scene.height, scene.width, proc.settings)
            o = out[first:first + n]  # (crops, K, HEAD_OUT)
            first += n
            classes = [_class(obj) for obj in scene.objects]
            for j, obj in enumerate(scene.objects):
                cls = classes[j]
                if classes.count(cls) > 1:
                    continue
                t, k = divmod(int(o[..., 12 + cls].argmax()), o.shape[1])
                off = o[t, k, 12 + C:12 + 3 * C].reshape(C, 2)[cls].clamp(0, 1)
                r, c = divmod(k, kh)
                sy, sx, oy, ox, _ = maps[t]
                y = int((r + float(off[1])) * cell * sy + oy)
                x = int((c + float(off[0])) * cell * sx + ox)
                inside = 0 <= y < scene.height and 0 <= x < scene.width
                hit = inside and scene.labels[y, x] == j + 1
                shared = any(o2.colour == obj.colour for o2 in scene.objects if o2 is not obj)
                h = hits["shared" if shared else "unique"]
                h[0] += int(hit)
                h[1] += 1
    n_all = hits["shared"][1] + hits["unique"][1]
    return {"head_point_acc": (hits["shared"][0] + hits["unique"][0]) / max(n_all, 1),
            "head_point_acc_shared_colour": hits["shared"][0] / max(hits["shared"][1], 1),
            "head_point_acc_unique_colour": hits["unique"][0] / max(hits["unique"][1], 1),
            "head_point_targets": n_all, "head_point_shared_colour": hits["shared"][1]}
