"""Is the objects' colour in the image features the decoder sees? On N one-object scenes of a
stage (KNOBS), take the image token that deviates most from the picture's median token (the
object), fit a ridge read-out of the object's colour on half and score the other half
(chance 1/6). bench/RESULTS.md, Issue 13, finding 6.

    python scripts/pointer_colour_probe.py MODEL_DIR "objects=1-1,backgrounds=white,size=15-30,sides=224,mix=single:1" 600
"""
import sys, torch, numpy as np
sys.path.insert(0, '.')
torch.set_num_threads(1); torch.set_grad_enabled(False)
from molmoe import synthetic as S
from molmoe.pipeline import load_pipeline
proc, model, eos = load_pipeline(sys.argv[1], device='cpu')
k = S.Knobs.parse(sys.argv[2])
X, Y = [], []
blank = None
cols = list(S.COLOURS)
for i in range(int(sys.argv[3])):
    s = S.make_sample(S._sample_rng(1_000_000 + 31, i), sides=(160, 320), knobs=k)
    x = proc(s.question, S.render(s.scene))
    f = model.vision(x['images'][None], x['image_masks'][None]).flatten(0, -2)
    # the token that differs most from the image's median token: the object
    dev = (f - f.median(0).values).norm(dim=1)
    X.append(f[dev.argmax()].numpy()); Y.append(cols.index(s.scene.objects[s.target['indices'][0]].colour))
X = np.array(X); Y = np.array(Y); n = len(Y) // 2
Xb = np.c_[X, np.ones(len(X))]
T = np.eye(6)[Y]
mu, sd = Xb[:n].mean(0), Xb[:n].std(0) + 1e-6; mu[-1], sd[-1] = 0, 1
Xb = (Xb - mu) / sd
W = np.linalg.solve(Xb[:n].T @ Xb[:n] + 10 * np.eye(Xb.shape[1]), Xb[:n].T @ T[:n])
acc = (np.argmax(Xb[n:] @ W, 1) == Y[n:]).mean()
print(f'linear colour read-out from the most deviant image token: held-out acc {acc:.2f} ({len(Y)-n} test)')
