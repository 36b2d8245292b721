"""Does a pointing checkpoint read the picture? For N held-out single questions: the image
features' RMS and spread across positions, and the answer cross-entropy with the right picture
vs with another scene's picture (a model that ignores the image scores both alike).

    python scripts/pointer_probe.py MODEL_DIR [N] [KNOBS]
"""
import sys, pathlib, torch
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
torch.set_grad_enabled(False)
from molmoe import synthetic as S
from molmoe.pipeline import load_pipeline

model_dir = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 48
knobs = S.Knobs.parse(sys.argv[3]) if len(sys.argv) > 3 else S.Knobs.parse("mix=single:1")
proc, model, eos = load_pipeline(model_dir, device="cpu")
samples = [S.make_sample(S._sample_rng(1_000_000 + 7, i), sides=(160, 320), knobs=knobs)
           for i in range(n)]
images = [S.render(s.scene) for s in samples]
tok = proc.tokenizer


def ce(q, a, img):
    x = proc(q, img)
    prompt = x["input_ids"]
    ans = torch.tensor(tok.encode_text(" " + a) + [eos if isinstance(eos, int) else eos[0]])
    ids = torch.cat([prompt, ans])[None]
    inputs = {k: v[None] for k, v in x.items() if k not in ("original_size", "input_ids")}
    out = model(input_ids=ids, **inputs)
    logits = out.logits if hasattr(out, "logits") else out
    lp = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), -1)
    return float(-lp.gather(1, ans[:, None]).mean())


feats = []
right, wrong = [], []
for i, (s, img) in enumerate(zip(samples, images)):
    if i < 8:
        x = proc(s.question, img)
        f = model.vision(x["images"][None], x["image_masks"][None]).reshape(-1, model.vision(
            x["images"][None], x["image_masks"][None]).shape[-1])
        feats.append((float(f.pow(2).mean().sqrt()), float(f.std(0).mean())))
    right.append(ce(s.question, s.answer, img))
    wrong.append(ce(s.question, s.answer, images[(i + 1) % n]))
print(f"features RMS {sum(a for a, _ in feats)/len(feats):.3g}, spread across positions "
      f"{sum(b for _, b in feats)/len(feats):.3g}")
print(f"answer CE/token: right picture {sum(right)/n:.3f}, another scene's picture "
      f"{sum(wrong)/n:.3f} (n={n})")
