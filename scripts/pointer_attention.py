"""Does the answer read the colour? On N held-out scenes of a stage where the colour alone names
the target (e.g. two circles on white), ask about object A and about object B of the SAME
picture and compare, teacher-forced up to the first coordinate digit:

  * per layer and head, the attention of the position that predicts the first digit over the
    image tokens: mass on the named object's tokens vs the other object's (a token belongs to
    the object covering most of its cell), and how far the distribution moves between the two
    questions (total variation, 0: identical);
  * its attention to the colour word;
  * the residual stream at that position after each layer: |h_A - h_B| / |h_A|;
  * the answer cross-entropy with the question naming the answer's object vs the other one
    (a model that ignores the colour scores both alike), and the first digit's argmax.

    python scripts/pointer_attention.py MODEL_DIR KNOBS [N]
"""
import math
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1); torch.set_grad_enabled(False)
from molmoe import synthetic as S
from molmoe.pipeline import load_pipeline
from pointer_geometry import placements

model_dir, spec = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
proc, model, eos = load_pipeline(model_dir, device="cpu")
eos = eos if isinstance(eos, int) else eos[0]
tok, st = proc.tokenizer, proc.settings
cfg = model.config.text
knobs = S.Knobs.parse(spec)

captured = []


class Capture:
    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def attention(self, q, k, v, *, causal=True, **kw):
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        S_ = s.shape[-1]
        s = s.masked_fill(torch.ones(S_, S_, dtype=torch.bool).triu(1), float("-inf"))
        captured.append(s.softmax(-1)[0])  # (H, S, S)
        return self._ops.attention(q, k, v, causal=causal, **kw)


for b in model.decoder.blocks:
    b.attn.ops = Capture(b.attn.ops)
hidden = []
hooks = [b.register_forward_hook(lambda m, i, o: hidden.append(o)) for b in model.decoder.blocks]


def token_owner(scene, x):
    """For each pooled image token (in image_input_idx order): (position, object index or -1)."""
    H, W = scene.height, scene.width
    labels = scene.labels
    owners = {}
    cell = 2 * st.image_patch_size
    crop = st.crop_size
    (nh, nw, top, left), lay, (CH, CW), (ch, cw, ctop, cleft) = placements(H, W, st)
    idx = x["image_input_idx"]
    g = crop // cell
    tw = lay.tiling[1]
    step = st.window_size
    for t in range(idx.shape[0]):
        for kk in range(idx.shape[1]):
            pos = int(idx[t, kk])
            if pos < 0:
                continue
            r, c = divmod(kk, g)
            if t == 0:
                y0, x0, sc_h, sc_w, oy, ox = r * cell, c * cell, nh, nw, top, left
            else:
                ti, tj = divmod(t - 1, tw)
                y0, x0 = ti * step + r * cell, tj * step + c * cell
                sc_h, sc_w, oy, ox = ch, cw, ctop, cleft
            ys = np.clip(((np.arange(y0, y0 + cell) - oy + 0.5) / sc_h * H).astype(int), 0, H - 1)
            xs = np.clip(((np.arange(x0, x0 + cell) - ox + 0.5) / sc_w * W).astype(int), 0, W - 1)
            inside_y = (np.arange(y0, y0 + cell) >= oy) & (np.arange(y0, y0 + cell) < oy + sc_h)
            inside_x = (np.arange(x0, x0 + cell) >= ox) & (np.arange(x0, x0 + cell) < ox + sc_w)
            lab = labels[np.ix_(ys[inside_y], xs[inside_x])] if inside_y.any() and inside_x.any() \
                else np.zeros((1, 1), int)
            vals, cnt = np.unique(lab, return_counts=True)
            objs = {int(v) - 1: int(c_) for v, c_ in zip(vals, cnt) if v > 0}
            # the object with most pixels in the cell, if it covers >= 15% of it
            best = max(objs, key=objs.get) if objs else -1
            owners[pos] = best if best >= 0 and objs[best] >= 0.15 * lab.size else -1
    return owners


def run(question, answer, img):
    x = proc(question, img)
    prompt = x["input_ids"]
    ans = torch.tensor(tok.encode_text(" " + answer) + [eos])
    ids = torch.cat([prompt, ans])[None]
    inputs = {k: v[None] for k, v in x.items() if k not in ("original_size", "input_ids")}
    captured.clear(); hidden.clear()
    logits = model(input_ids=ids, **inputs)
    lp = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), -1)
    ce = float(-lp.gather(1, ans[:, None]).mean())
    pieces = [tok.decode([t]) for t in ans.tolist()]
    first_digit = next(i for i, p in enumerate(pieces) if p.strip().isdigit())
    qpos = len(prompt) + first_digit - 1  # the position that predicts the first digit
    return x, ce, qpos, [a[:, qpos].clone() for a in captured], [h[0, qpos].clone() for h in hidden], \
        int(logits[0, qpos].argmax()), ans[first_digit].item(), ids[0], [h[0].clone() for h in hidden]


def main():
    L, Hh = cfg.n_layers, cfg.n_heads
    named = np.zeros((L, Hh)); other = np.zeros((L, Hh)); tv = np.zeros((L, Hh))
    colw = np.zeros((L, Hh)); resid = np.zeros(L); hnorm = np.zeros(L); cres = np.zeros(L); cnorm = np.zeros(L)
    inorm = np.zeros(L)
    ce_right, ce_swap, digit_ok_A, digit_ok_B, diff_digit = [], [], 0, 0, 0
    m = 0
    for i in range(n * 3):
        if m >= n:
            break
        s = S.make_sample(S._sample_rng(1_000_000 + 17, i), sides=(160, 320), knobs=knobs)
        objs = s.scene.objects
        if len(objs) < 2 or objs[0].colour == objs[1].colour:
            continue
        a_i = s.target["indices"][0]
        b_i = next(j for j in range(len(objs)) if j != a_i)
        img = S.render(s.scene)
        A, B = objs[a_i], objs[b_i]
        qa, qb = s.question, s.question.replace(A.colour, B.colour)
        ansA = s.answer
        ansB = ansA.replace(f"{A.point[0]}", "@X@").replace(f"{A.point[1]}", "@Y@")
        ansB = ansB.replace("@X@", f"{B.point[0]}").replace("@Y@", f"{B.point[1]}").replace(A.colour, B.colour)
        xA, ceA, _, attA, hA, argA, goldA, idsA, full_A = run(qa, ansA, img)
        owners = token_owner(s.scene, xA)
        _, _, _, attB, hB, argB, goldB, _, full_B = run(qb, ansB, img)
        # swapped: question names B, answer points at A (and vice versa)
        _, ceAs, *_ = run(qb, ansA.replace(A.colour, B.colour), img)
        ce_right.append(ceA); ce_swap.append(ceAs)
        digit_ok_A += argA == goldA; digit_ok_B += argB == goldB; diff_digit += argA != argB
        posA = [p for p, o in owners.items() if o == a_i]
        posB = [p for p, o in owners.items() if o == b_i]
        img_pos = list(owners)
        cw_pos = next(j for j in range(len(idsA)) if tok.decode([int(idsA[j])]) == A.colour)
        for l in range(L):
            for h in range(Hh):
                a1, a2 = attA[l][h], attB[l][h]
                named[l, h] += float(a1[posA].sum() + a2[posB].sum()) / 2
                other[l, h] += float(a1[posB].sum() + a2[posA].sum()) / 2
                ia, ib = a1[img_pos], a2[img_pos]
                tv[l, h] += 0.5 * float((ia / ia.sum().clamp(min=1e-9) - ib / ib.sum().clamp(min=1e-9)).abs().sum())
                colw[l, h] += float(a1[cw_pos] + a2[cw_pos]) / 2
            resid[l] += float((hA[l] - hB[l]).norm() / hA[l].norm())
            hnorm[l] += float(hA[l].norm())
            ca, cb = full_A[l][cw_pos], full_B[l][cw_pos]
            cres[l] += float((ca - cb).norm() / ca.norm()); cnorm[l] += float(ca.norm())
            inorm[l] += float(full_A[l][img_pos].norm(dim=-1).mean())
        m += 1
    print(f"{m} scenes; answer CE/token: question names the answer's object {np.mean(ce_right):.3f}, "
          f"names the other object {np.mean(ce_swap):.3f}")
    print(f"first digit argmax correct: {digit_ok_A}/{m} (A) {digit_ok_B}/{m} (B); differs between "
          f"the two questions in {diff_digit}/{m}")
    for l in range(L):
        print(f"layer {l}: resid |hA-hB|/|hA| {resid[l]/m:.2e} (|hA| {hnorm[l]/m:.3g}); at the "
              f"colour word {cres[l]/m:.2e} (|h| {cnorm[l]/m:.3g}); image tokens' |h| {inorm[l]/m:.3g}")
        for h in range(Hh):
            print(f"  head {h}: image mass on named {named[l,h]/m:.3f} other {other[l,h]/m:.3f}  "
                  f"TV(A vs B) {tv[l,h]/m:.3f}  on colour word {colw[l,h]/m:.3f}")


if __name__ == "__main__":
    main()
