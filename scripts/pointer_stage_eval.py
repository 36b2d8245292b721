"""Accuracy of a pointing checkpoint on held-out scenes of one curriculum stage (generator knobs),
scored like bench/eval_pointing.py (single: every point on the named object).

    python scripts/pointer_stage_eval.py MODEL_DIR "objects=2-3,distinct_colours=1,mix=single:1" [N]
"""
import pathlib, sys, tempfile, torch
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
from molmoe import synthetic as S
from bench.eval_pointing import aggregate, run_model, score_answer

model, spec = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 100
knobs = S.Knobs.parse(spec)
samples = [S.make_sample(S._sample_rng(1_000_000 + 13, i), sides=(160, 320), knobs=knobs)
           for i in range(n)]
with tempfile.TemporaryDirectory() as tmp:
    paths = []
    for i, s in enumerate(samples):
        p = f"{tmp}/{i}.png"
        S.write_image(S.render(s.scene), p, "png")
        paths.append(p)
    answers = run_model(model, [(s.question, p) for s, p in zip(samples, paths)],
                        answers_for_length=[s.answer for s in samples])
res = [score_answer(s.scene, s.target, a) for s, a in zip(samples, answers)]
m = aggregate(res)
keys = ("single", "single_mean_error", "single_centre_error", "multi_precision", "multi_recall",
        "count_exact", "distractor_rate", "absent")
print(spec, {k: (round(m[k], 3) if isinstance(m[k], float) else m[k]) for k in keys})
print("e.g.", samples[0].question, "->", answers[0], "| expected", samples[0].answer)
