"""Sanity task for the pointer recipe: one red circle on white (224 px) at a random place
(tests/train_fixtures.pointing_set, 4000 training pictures, 100 held-out ones of another seed),
the molmoe.pointer p14-112 model and init, `molmoe train`, then greedy answers scored by the
distance to the centre and whether the point is inside the circle.

    python scripts/pointer_sanity.py WORK LR FREEZE STEPS     (e.g. /tmp/c1 2e-3 vit 500)
"""
import sys, pathlib, json, shutil, time, torch
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'tests'))
torch.set_num_threads(1)
from train_fixtures import pointing_set
from molmoe.pointer import train_tokenizer_json, tokenizer_texts, write_initial_checkpoint
from molmoe.training.trainer import TrainOptions, train
work = pathlib.Path(sys.argv[1]); lr = float(sys.argv[2]); freeze = tuple(f for f in sys.argv[3].split(',') if f)
steps = int(sys.argv[4])
if not (work / 'data/train.jsonl').exists():
    pointing_set(work / 'data', 4000, seed=0, size=(224, 224))
    pointing_set(work / 'test', 100, seed=99, size=(224, 224))
tok = train_tokenizer_json(tokenizer_texts(work / 'data/train.jsonl'), n_merges=60)
if (work / 'init').exists(): shutil.rmtree(work / 'init')
write_initial_checkpoint(work / 'init', arch='p14-112', tokenizer_json=tok)
t = time.perf_counter()
train(TrainOptions(model=str(work / 'init'), data=str(work / 'data/train.jsonl'), out=str(work / 'run'), steps=steps, batch=32, lr=lr, warmup=30, min_lr_ratio=0.05, workers=0, activation_checkpointing=False, device='cpu', save_every=10000, progress=False, freeze=freeze))
print('train_s', time.perf_counter() - t)
from molmoe.pipeline import load_pipeline
from molmoe.generation.engine import Engine, GenerationConfig
from molmoe.points import parse_points
proc, model, eos = load_pipeline(str(work / 'run/model'), device='cpu')
lines = [json.loads(l) for l in open(work / 'test/train.jsonl')]
inputs = [{k: v for k, v in proc(l['messages'][0]['content'], str(work / 'test' / l['image'])).items() if k != 'original_size'} for l in lines]
res = Engine(model, proc.tokenizer, max_batch=100).generate(inputs, GenerationConfig(max_new_tokens=30))
errs = []
hit = 0
for l, r in zip(lines, res):
    p = parse_points(r.text).points; e = parse_points(l['messages'][1]['content']).points[0]
    if p:
        d = ((p[0][0]-e[0])**2 + (p[0][1]-e[1])**2) ** .5; errs.append(d); hit += d < 12.5  # radius = 1/8 side
print('answered', len(errs), 'mean dist', sum(errs)/max(len(errs),1), 'inside circle', hit, '/100;', res[0].text, '| exp', lines[0]['messages'][1]['content'])
