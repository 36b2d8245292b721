"""Is the colour in the image tokens the decoder's attention reads (the keys' side of the
colour lookup)? On N held-out scenes of a stage (KNOBS), for every object, the mean residual
stream over the image tokens it owns (its cells: scripts/pointer_attention.py's rule) at the
decoder's input and after each layer, then a ridge read-out of the object's colour fitted on
half the scenes and scored on the other half (chance 1/6).

    python scripts/pointer_key_probe.py MODEL_DIR KNOBS [N] [colour|shape]

With "shape" it reads the object's shape instead (chance 1/4).
"""
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
argv = sys.argv  # pointer_attention loads MODEL_DIR KNOBS from sys.argv; its main() does not run
import pointer_attention as PA

from molmoe import synthetic as S

n = int(argv[3]) if len(argv) > 3 else 200
model, proc = PA.model, PA.proc
what = argv[4] if len(argv) > 4 else "colour"
cols = list(S.COLOURS) if what == "colour" else list(S.SHAPES)
feats = {}  # layer -> list of vectors
labels, scene_of = [], []
for i in range(n):
    s = S.make_sample(S._sample_rng(1_000_000 + 23, i), sides=(160, 320), knobs=PA.knobs)
    x = proc(s.question, S.render(s.scene))
    owners = PA.token_owner(s.scene, x)
    inputs = {k: v[None] for k, v in x.items() if k not in ("original_size",)}
    PA.hidden.clear()
    PA.captured.clear()
    with torch.no_grad():
        h0 = model.embed(**inputs)[0]
        model(**inputs)
    layers = [h0] + [h[0] for h in PA.hidden]
    for j, o in enumerate(s.scene.objects):
        pos = [p for p, w in owners.items() if w == j]
        if not pos:
            continue
        for li, h in enumerate(layers):
            feats.setdefault(li, []).append(h[pos].mean(0).numpy())
        labels.append(cols.index(o.colour if what == "colour" else o.shape))
        scene_of.append(i)
Y = np.array(labels)
train = np.array(scene_of) < n // 2
for li in sorted(feats):
    X = np.array(feats[li])
    X = np.c_[X, np.ones(len(X))]
    mu, sd = X[train].mean(0), X[train].std(0) + 1e-6
    mu[-1], sd[-1] = 0, 1
    X = (X - mu) / sd
    T = np.eye(len(cols))[Y]
    W = np.linalg.solve(X[train].T @ X[train] + 10 * np.eye(X.shape[1]), X[train].T @ T[train])
    acc = (np.argmax(X[~train] @ W, 1) == Y[~train]).mean()
    name = "decoder input" if li == 0 else f"after layer {li - 1}"
    print(f"{name}: {what} read-out from the object's image tokens {acc:.2f} "
          f"({(~train).sum()} test objects)")
