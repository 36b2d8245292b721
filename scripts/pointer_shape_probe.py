"""Can the tiny ViT learn an object's shape at all? The simplest shape task, trained from the
checkpoint's vision tower and, beside it on the same pictures, from a small CNN: one object
(any shape, colour, rotation; 20-30% of the side unless SIZE says) on white 224-px squares, the processor's
global 112-px crop, a fresh batch of 32 pictures every step, 4-way shape classification with a
linear head (ViT: mean of the last block's patch features; CNN: 3 strided convolutions, global
max). Prints held-out accuracy (300 pictures) every 100 steps. bench/RESULTS.md, Issue 13,
session 6.

    python scripts/pointer_shape_probe.py MODEL_DIR [vit|cnn] [STEPS] [LR] [SIZE, e.g. 0.4-0.5] [WARMUP]

WARMUP: steps of linear learning-rate warm-up (default 0: none). Session 7's run that learned
the shape (98.7% at 3,000 steps): `MODEL_DIR vit 3000 5e-4 0.2-0.3 100`.
"""
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, ".")
from molmoe import synthetic as S  # noqa: E402
from molmoe.checkpoint.loader import load  # noqa: E402
from molmoe.processing.preprocess import preprocess_image  # noqa: E402
from molmoe.processing.processor import Processor  # noqa: E402

model_dir, which = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "vit"
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 400
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
size = tuple(float(v) for v in (sys.argv[5] if len(sys.argv) > 5 else "0.2-0.3").split("-"))
warmup = int(sys.argv[6]) if len(sys.argv) > 6 else 0
torch.manual_seed(0)
proc = Processor.from_pretrained(model_dir)
knobs = S.Knobs(objects=(1, 1), backgrounds=("white",), size=size, sides=(224, 224))
crop, patch = proc.settings.crop_size, proc.settings.image_patch_size
g = crop // patch


def picture(tag: str, i: int):
    """(patches of the global crop (P, patch*patch*3), the same as a 3 x crop x crop image, shape)"""
    sample = S.make_sample(random.Random(f"shape-probe-{tag}:{i}"), "single", knobs=knobs)
    pixels = np.asarray(S.render(sample.scene).convert("RGB"))
    p = preprocess_image(pixels, proc.settings, proc.token_ids).images[0]
    img = p.reshape(g, g, patch, patch, 3).permute(4, 0, 2, 1, 3).reshape(3, crop, crop)
    return p, img, S.SHAPES.index(sample.scene.objects[0].shape)


if which == "vit":
    vit = load(model_dir, dtype="float32").vision.image_vit
    vit.train().requires_grad_(True)
    head = nn.Linear(vit.cfg.emb_dim, 4)
    params = list(vit.parameters()) + list(head.parameters())

    def logits(batch):
        return head(vit(torch.stack([b[0] for b in batch]))[-1][:, 1:].mean(1))
else:
    net = nn.Sequential(nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1),
                        nn.ReLU(), nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 4))
    params = list(net.parameters())

    def logits(batch):
        return net(torch.stack([b[1] for b in batch]))

held = [picture("held", i) for i in range(300)]
y_held = torch.tensor([b[2] for b in held])
opt = torch.optim.AdamW(params, lr=lr)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
t0 = time.perf_counter()
for step in range(steps):
    batch = [picture("train", step * 32 + j) for j in range(32)]
    loss = F.cross_entropy(logits(batch), torch.tensor([b[2] for b in batch]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 100 == 99 or step == steps - 1:
        with torch.no_grad():
            acc = float((logits(held).argmax(-1) == y_held).float().mean())
        print(f"{which} step {step + 1}: loss {loss.item():.3f}, held-out accuracy {acc:.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
