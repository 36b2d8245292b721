"""Independent check of what the trainer feeds the pointing model (bench/RESULTS.md, Issue 13,
session 3): for N generated examples of a stage (generator KNOBS) it loads them through the
trainer's own `TrainingData` and checks, per example,

  1. the answer's points, in the saved image file, have the RGB of the named colour (single) /
     lie on an object of the named shape (multi, count);
  2. the same through the processor: the global crop and the tile canvas, rebuilt from the
     patches the model gets, have that colour at the point mapped into them;
  3. the <im_patch> cell of the global crop that holds the point is the one whose pixels are
     closest to the named colour (the token order is the picture's row-major order);
  4. image_input_idx points at <im_patch> tokens, and the loss mask covers exactly the answer
     tokens + EOS, which decode to the answer text;
  5. the question's colour and shape words are their own tokens in the prompt;
  6. the decoder-side feature of a cell depends most on that cell's pixels (gradient of the
     feature at image_input_idx[0, k] w.r.t. the global crop's pixels, summed per cell).

    python scripts/pointer_verify_data.py MODEL_DIR DATA_DIR [N]
(DATA_DIR: a `molmoe.synthetic.write_dataset` directory: train.jsonl + scenes.jsonl.)
Exit status 1 when any check fails.
"""
import json
import pathlib
import sys

import numpy as np
import torch
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
from molmoe import synthetic as S
from molmoe.checkpoint.loader import load
from molmoe.points import parse_points
from pointer_geometry import placements
from molmoe.processing.processor import Processor
from molmoe.training.data import TrainingData

model_dir, data_dir = sys.argv[1], pathlib.Path(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 300
proc = Processor.from_pretrained(model_dir)
st = proc.settings
tok = proc.tokenizer
ds = TrainingData(data_dir / "train.jsonl", proc)
metas = [json.loads(line) for line in (data_dir / "scenes.jsonl").read_text().splitlines()]
mean, std = torch.tensor(st.image_mean), torch.tensor(st.image_std)
p, crop = st.image_patch_size, st.crop_size
fails = {}
counts = {}


def fail(key, msg):
    fails.setdefault(key, []).append(msg)


def unpatch(patches, side):  # [P, p*p*3] -> [side, side, 3] in 0..255
    g = side // p
    x = patches.reshape(g, g, p, p, 3).permute(0, 2, 1, 3, 4).reshape(side, side, 3)
    return ((x * std + mean) * 255).clamp(0, 255)


def near(rgb, name, tol):
    return float(np.abs(np.asarray(rgb, float) - np.asarray(S.COLOURS[name], float)).max()) <= tol


def closest_colour(rgb):
    return min(S.COLOURS, key=lambda c: np.abs(np.asarray(rgb, float) - S.COLOURS[c]).sum())


model = load(model_dir, dtype="float32")
n_grad = 0
for i in range(min(n, len(ds))):
    rec, meta = ds.records[i], metas[i]
    q, a = rec.turns[0]
    assert meta["question"] == q and meta["answer"] == a, "scenes.jsonl / train.jsonl out of step"
    scene = S.load_scene(meta)
    pts = parse_points(a).points
    img = np.asarray(Image.open(rec.image).convert("RGB"))
    H, W = img.shape[:2]
    colour = next((c for c in S.COLOURS if f" {c} " in f" {q} "), None)
    shape = next((s for s in S.SHAPES if s in q), None)
    counts["examples"] = counts.get("examples", 0) + 1
    # 1. the saved file
    for (x, y) in pts:
        px, py = min(int(x / 100 * W), W - 1), min(int(y / 100 * H), H - 1)
        o = S.object_at(scene, x, y)
        if o is None or scene.objects[o].shape != shape or (colour and scene.objects[o].colour != colour):
            fail("1 point on named object (geometry)", f"{rec.source} {q} {a}")
        if colour is not None:
            counts["points checked"] = counts.get("points checked", 0) + 1
            tol = 4 if meta["format"] == "png" else 60
            if not near(img[py, px], colour, tol):
                fail("1 file pixel = named colour", f"{rec.source} {q} pix {img[py, px]} at {px},{py}")
    ex = ds[i]
    # 4. loss mask and image index
    ids = ex.input_ids
    ans_ids = ids[ex.loss_mask].tolist()
    if ans_ids[-1] != tok.eos_token_id or tok.decode(ans_ids[:-1]) != " " + a:
        fail("4 loss mask = answer + EOS", f"{rec.source}: {tok.decode(ans_ids)!r}")
    idx = ex.image_input_idx
    v = idx[idx >= 0]
    if not bool((ids[v.long()] == tok.image_patch_id).all()) or len(set(v.tolist())) != len(v):
        fail("4 image_input_idx on <im_patch>", rec.source)
    # 5. colour/shape words are own tokens in the prompt
    prompt_pieces = [tok.decode([t]) for t in ids[~ex.loss_mask].tolist()
                     if t < 256 or t > 262]
    for w in (colour, shape):  # plural questions: "circles" may be "circle" + "s"
        if w is not None and not {w, w + "s", S.PLURALS.get(w, "")} & set(prompt_pieces):
            fail("5 word is its own token", f"{q} -> {prompt_pieces}")
    # 2. through the processor: global crop
    gl = unpatch(ex.images[0], crop).numpy()
    (nh, nw, top, left), lay, (CH, CW), (ch, cw, ctop, cleft) = placements(H, W, st)
    th, tw = lay.tiling
    canvas = np.zeros((CH, CW, 3))
    for ti in range(th):
        for tj in range(tw):
            y0, x0 = ti * st.window_size, tj * st.window_size
            canvas[y0:y0 + crop, x0:x0 + crop] = unpatch(ex.images[1 + ti * tw + tj], crop).numpy()
    g = crop // p // 2  # pooled cells per side
    cellpx = 2 * p
    for (x, y) in pts:
        if colour is None:
            continue
        gx, gy = left + x / 100 * nw, top + y / 100 * nh
        if not near(gl[int(gy), int(gx)], colour, 80):
            fail("2 global-crop pixel = named colour", f"{rec.source} {q} {gl[int(gy), int(gx)]}")
        cx, cy = cleft + x / 100 * cw, ctop + y / 100 * ch
        if not near(canvas[int(cy), int(cx)], colour, 80):
            fail("2 tile-canvas pixel = named colour", f"{rec.source} {q} {canvas[int(cy), int(cx)]}")
        # 3. the cell holding the point is the cell closest to the named colour
        r, c = int(gy) // cellpx, int(gx) // cellpx
        cells = gl.reshape(g, cellpx, g, cellpx, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1, 3)
        dist = np.abs(cells - np.asarray(S.COLOURS[colour], float)).sum(-1).min(1)  # best pixel
        if dist[r * g + c] > dist.min() + 1e-6 and dist[r * g + c] > 60:
            fail("3 point's cell holds the named colour", f"{rec.source} cell {r},{c}")
        counts["cells checked"] = counts.get("cells checked", 0) + 1
    # 6. gradient locality on a few examples
    if n_grad < 20:
        n_grad += 1
        images = ex.images.clone()[None].requires_grad_(True)
        feats = model.vision(images, ex.image_masks[None])[0, 0]  # global crop (K, D)
        K = feats.shape[0]
        hits = 0
        for k in range(K):
            gr, = torch.autograd.grad(feats[k].pow(2).sum(), images, retain_graph=True)
            per = gr[0, 0].abs().reshape(crop // p, crop // p, -1).sum(-1)  # per patch
            per = per.reshape(g, 2, g, 2).sum((1, 3)).flatten()
            hits += int(per.argmax()) == k
        counts["grad: own cell dominates (of 16 per crop)"] = counts.get(
            "grad: own cell dominates (of 16 per crop)", 0) + hits
        counts["grad cells"] = counts.get("grad cells", 0) + K

print(json.dumps(counts))
for k, v in sorted(fails.items()):
    print(f"FAIL {k}: {len(v)} e.g. {v[:3]}")
print("OK" if not fails else "FAILURES")
sys.exit(1 if fails else 0)
