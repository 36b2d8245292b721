"""The built-in pointing model (issue 13, item 2): its initial checkpoint, its tokenizer, and the
recipe that trains it with `molmoe train` on `molmoe.synthetic` scenes, all from one seed.

    python -m molmoe.pointer --work runs/pointer --seed 0            # data, init, train, eval
    python -m molmoe.pointer --work runs/pointer --seed 0 --steps 50  # a quick look

Pieces (each deterministic from its seed):
  * `train_tokenizer_json(texts)`: a byte-level BPE whose merges are learned on the synthetic
    prompts and answers (HF `tokenizers`), with digits split one per token (coordinates compose
    from 0-9 and "."), the 256 byte tokens at ids 0..255 and MolmoE's special tokens at 256..262
    in `molmoe.demo._SPECIALS`'s order (EOS = BOS first, padding, the five image tokens), exactly
    where the demo tokenizer has them; learned tokens follow from 263. No regex pre-split: merges
    may span spaces and punctuation, so `<point x="` or `" alt="red circle">red circle</point>`
    become one token each, and a 6-point count answer is ~65 tokens instead of ~190 bytes.
  * `write_initial_checkpoint(dir, arch, tokenizer_json, seed)`: random weights in the official
    layout (`molmoe.demo.write_tiny_checkpoint`) with the architecture and crop geometry of
    `ARCHS[arch]`, the trained tokenizer, and vocab_size/embedding_size set to match it.
  * `main`: writes the training data (`molmoe.synthetic.write_dataset`, seed `seed`), the
    tokenizer, the initial checkpoint, runs `molmoe train` (one rank, CPU) and evaluates the
    export with bench/eval_pointing.py's logic on held-out seeds.

Seeds: training data uses synth seed `seed` (scripts use 0..999,999); the evaluator uses seeds
from 1,000,000 up (bench/eval_pointing.py), so no evaluation scene is a training scene.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

from molmoe.demo import _SPECIALS, _bytes_to_unicode, write_tiny_checkpoint

# Architectures / geometries tried (bench/RESULTS.md, "Issue 13: the built-in pointing model").
# `config` and `vision` override molmoe.demo's config.json keys, `preprocessor` its processor
# settings (ImageSettings rules: square crops, an even number of patches per side, token length
# = patches per side / 2, even overlap margins smaller than the side).
ARCHS = {
    # 112-px crops of 7-px patches: 16x16 patches, 8x8 pooled tokens per crop; 1 tile + global.
    "p7-112": {
        "config": {"d_model": 128, "n_layers": 4, "n_heads": 4, "mlp_hidden_size": 256,
                   "moe_num_experts": 8, "moe_top_k": 2, "max_position_embeddings": 1024,
                   "vit_layers": [-1, -3]},
        "vision": {"image_default_input_size": [112, 112], "image_patch_size": 7,
                   "image_emb_dim": 96, "image_num_heads": 4, "image_num_layers": 4,
                   "image_mlp_dim": 192},
        "preprocessor": {"base_image_input_size": [112, 112], "image_patch_size": 7,
                         "image_token_length_h": 8, "image_token_length_w": 8, "max_crops": 1,
                         "overlap_margins": [2, 2]},
    },
    # The test fixtures' geometry (112-px crops of 14-px patches, 4x4 tokens), up to 2 tiles.
    "p14-112": {
        "config": {"d_model": 128, "n_layers": 4, "n_heads": 4, "mlp_hidden_size": 256,
                   "moe_num_experts": 8, "moe_top_k": 2, "max_position_embeddings": 1024,
                   "vit_layers": [-1, -3]},
        "vision": {"image_default_input_size": [112, 112], "image_patch_size": 14,
                   "image_emb_dim": 96, "image_num_heads": 4, "image_num_layers": 4,
                   "image_mlp_dim": 192},
        "preprocessor": {"base_image_input_size": [112, 112], "image_patch_size": 14,
                         "image_token_length_h": 4, "image_token_length_w": 4, "max_crops": 2,
                         "overlap_margins": [2, 2]},
    },
}
# p14-112 without overlap margins and with up to 4 tiles: the tiles see the picture at up to 224
# (2 x 2) or 448 (1 x 4) px, so the smallest objects (8% of the shorter side) are 9-18 px there
# instead of 5-7 px (session 5 in bench/RESULTS.md).
ARCHS["p14-112-t4"] = {**ARCHS["p14-112"], "preprocessor": {
    **ARCHS["p14-112"]["preprocessor"], "max_crops": 4, "overlap_margins": [0, 0]}}
DEFAULT_ARCH = "p14-112"

# Curricula: phases trained one after another, each from the previous phase's export (fresh
# optimizer, its own warm-up and cosine), each on its own data (`molmoe.synthetic.Knobs`, synth
# seed `seed + 100_000 * phase`). A phase: (name, generator knobs, examples, steps).
# bench/RESULTS.md, "Issue 13", has the runs behind them.
_TWO = "objects=2-2,shapes=circle,backgrounds=white,sides=224,distinct_colours=1,mix=single:1"
# the sanity task (one red circle on white), then every colour and shape alone on white: the
# start of every curriculum since session 2
_REDCIRCLE = ("redcircle", "objects=1-1,shapes=circle,colours=red,backgrounds=white,size=22-28,"
              "sides=224,mix=single:1", 4000, 300)
_ONE = ("one", "objects=1-1,backgrounds=white,size=15-30,sides=224,mix=single:1")
# two objects of one colour and different shapes on white 224-px squares (the shape binding)
_SH = "objects=2-2,same_colour=1,same_shape=0,backgrounds=white,sides=224,mix=single:1"
# two anchored objects on white at any size and aspect ratio (the evaluator's three tilings)
_ANCHORED = "objects=2-2,backgrounds=white,mix=single:1,size=15-20,anchor=0.04"
# session 3's colour-anchored mixture: half the pairs at their colours' spots, half anywhere
_MIX50 = f"0.5*{_TWO},size=15-20,anchor=0.04|0.5*{_TWO},size=15-30"
# both anchors (colour, shape) with free pairs and single questions of the domain
_BOTH_ANCHORS = (f"0.15*{_ANCHORED},distinct_colours=1|0.15*{_ANCHORED},same_colour=1,"
                 f"same_shape=0,anchor_by=shape|0.2*objects=2-2,distinct_colours=1,"
                 f"mix=single:1|0.2*objects=2-2,same_colour=1,same_shape=0,mix=single:1"
                 f"|0.3*mix=single:1")
CURRICULA = {
    # session 2 (runs d5, d7): the sanity task itself first (one red circle on white: the only
    # start that left the blind plateau reliably), every colour and shape alone on white, then
    # the domain widened with white scenes replayed (backgrounds, sizes, aspect ratios), then
    # the colour, then the shape among 1-3 / 1-5 objects, then the mix.
    "c5": [
        _REDCIRCLE,
        (*_ONE, 6000, 300),
        ("wide", "objects=1-1,backgrounds=white+white+plain+gradient+noisy,size=12-30,"
                 "mix=single:1", 6000, 300),
        ("colour", "objects=1-3,distinct_colours=1,same_shape=0.7,size=10-30,"
                   "backgrounds=white+plain+gradient+noisy,mix=single:1", 16000, 800),
        ("shape", "objects=1-5,same_shape=0.5,same_colour=0.7,"
                  "mix=single:3+absent:1", 12000, 600),
        ("full", "", 20000, 800),
    ],
    # c5 shortened to fit the session, for a connector kept near its init (--connector-lr 2e-4):
    # after c5's single-object phases at 2e-3 the trained connector had lost the objects' colour
    # (a linear read-out of it from the object's image token fell from 81% at init to 45%).
    "c6": [
        _REDCIRCLE,
        (*_ONE, 6000, 200),
        ("wide", "objects=1-1,backgrounds=white+white+plain+gradient+noisy,size=12-30,"
                 "mix=single:1", 6000, 300),
        ("colour", "objects=1-3,distinct_colours=1,same_shape=0.7,size=10-30,"
                   "backgrounds=white+plain+gradient+noisy,mix=single:1", 16000, 700),
        ("full", "", 15000, 700),
    ],
    # session 3 (runs s3-A, s3-B, s3-D, s3-E in bench/RESULTS.md): the first two c6 phases, then
    # the colour binding on two circles of different colours: first with each colour at a fixed
    # spot (the colour word alone tells where to point: the answer learns to read the word),
    # then mixtures with scenes placed anywhere (the read colour is used to pick the circle).
    # The runs trained the last two phases with --connector-lr 2e-4, the first three without.
    "c7": [
        _REDCIRCLE,
        (*_ONE, 6000, 200),
        ("anchored", _TWO + ",size=15-20,anchor=0.04", 6000, 400),
        ("mix50", f"0.5*{_TWO},size=15-20,anchor=0.04|0.5*{_TWO},size=15-30", 10000, 900),
        ("mix25", f"0.25*{_TWO},size=15-20,anchor=0.04|0.75*{_TWO},size=15-30", 10000, 1200),
    ],
    # session 4 (runs e1, e1b, e1c, e3, e4 in bench/RESULTS.md, each continued from the one
    # before with --freeze vit --connector-lr 2e-4, e1 from c7's export): c7, then the shape
    # binding the same way (two objects of one colour, each shape at its own spot, mixed with
    # free placements), then both words together, then the domain and question mix.
    # As one curriculum it has not been run from seed (its mixtures draw other scenes).
    "c8": [
        ("shape50", f"0.15*{_TWO},size=15-30|0.4*{_SH},size=15-20,anchor=0.04,anchor_by=shape"
                    f"|0.45*{_SH},size=15-30", 10000, 900),
        ("shape25", f"0.15*{_TWO},size=15-30|0.2*{_SH},size=15-20,anchor=0.04,anchor_by=shape"
                    f"|0.65*{_SH},size=15-30", 10000, 1200),
        ("both", f"0.1*{_TWO},size=15-20,anchor=0.04|0.1*{_SH},size=15-20,anchor=0.04,"
                 f"anchor_by=shape|0.25*{_SH},size=15-30|0.2*{_TWO},size=15-30"
                 f"|0.35*objects=2-3,size=15-30,backgrounds=white,sides=224,mix=single:1",
         10000, 1200),
        ("domain", f"0.05*{_TWO},size=15-20,anchor=0.04|0.05*{_SH},size=15-20,anchor=0.04,"
                   f"anchor_by=shape|0.2*objects=2-4,size=12-30,backgrounds=white,sides=224,"
                   f"mix=single:1|0.2*mix=single:1|0.2*mix=multi:1+count:1|0.3*", 16000, 1500),
        ("aspect", f"0.1*{_ANCHORED},distinct_colours=1|0.1*{_ANCHORED},same_colour=1,"
                   f"same_shape=0,anchor_by=shape|0.2*objects=1-1,mix=single:1"
                   f"|0.2*objects=2-4,mix=single:1|0.2*mix=multi:1+count:1|0.2*", 16000, 1500),
    ],
    # the sanity task (one object on plain backgrounds), then the colour alone names the target,
    # then shapes among same-colour distractors, then the full mix.
    "c4": [
        ("one", "objects=1-1,backgrounds=plain,mix=single:1", 6000, 300),
        ("colour", "objects=2-4,distinct_colours=1,same_shape=0.7,mix=single:1", 10000, 500),
        ("shape", "objects=2-5,same_shape=0.5,same_colour=0.9,mix=single:1", 12000, 700),
        ("full", "", 40000, 1500),
    ],
    # session 5 (runs s3, s5, s6 in bench/RESULTS.md, each from the one before), after vision
    # pretraining (--arch p14-112-t4 --vision-steps 2500; --freeze then defaults to
    # vit,connector): one object anywhere in the issue's domain, session 3's colour-anchored
    # mix50, then both anchors with free pairs and the generator's single questions at any
    # aspect. As one curriculum it has not been run from seed, and it has no multi, count or
    # absent phase yet (s6 on the evaluator: single 19%).
    "v1": [
        ("one", "objects=1-1,mix=single:1", 6000, 400),
        ("mix50", _MIX50, 10000, 900),
        ("anchors", _BOTH_ANCHORS, 16000, 1200),
    ],
    # session 8: v1 shortened, then the issue's own question mix (multi, count and absent for
    # the first time) with both anchored pairs replayed; run after the shape phase and the
    # dense targets over the frozen tower (--shape-steps 2000,1000,0,1500 --vision-steps 1000
    # --vision-vit-lr 0; bench/RESULTS.md, session 8: single 25.8%).
    "v2": [
        ("one", "objects=1-1,mix=single:1", 5000, 300),
        ("mix50", _MIX50, 8000, 700),
        ("anchors", _BOTH_ANCHORS, 12000, 1000),
        ("full", f"0.1*{_ANCHORED},distinct_colours=1|0.1*{_ANCHORED},same_colour=1,"
                 f"same_shape=0,anchor_by=shape|0.8*", 20000, 1500),
    ],
}
CURRICULA["c8"] = CURRICULA["c7"] + CURRICULA["c8"]
N_MERGES = 400  # learned tokens beyond the 256 bytes and 7 specials


def content_words() -> tuple[str, ...]:
    """The words a question is about: the generator's colours and shapes."""
    from molmoe import synthetic as S

    return tuple(S.COLOURS) + tuple(S.SHAPES)


def train_tokenizer_json(texts, n_merges: int = N_MERGES,
                         split_words: tuple[str, ...] | None = None) -> str:
    """A byte-level BPE trained on `texts` (see the module docstring); deterministic for the
    same texts. Returns tokenizer.json's text.

    split_words: words that are always their own pieces (merges never span them), so that
    "red" is one token wherever it occurs ("Point to the red circle." and "alt=\"red circle\""
    share it). Without it, merges learned on a few dozen distinct questions swallow each whole
    prompt (" User: Point to the red circle. Assistant:" became ONE token): every colour+shape
    pair is then an unrelated symbol and nothing learnt about "red" carries to another shape."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,
                            trainers)

    alphabet = _bytes_to_unicode()  # byte -> printable char (GPT-2's map)
    steps = [pre_tokenizers.Digits(individual_digits=True)]
    if split_words:
        words = "|".join(sorted(split_words, key=lambda w: (-len(w), w)))
        steps.append(pre_tokenizers.Split(Regex(f"({words})"), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    pre = pre_tokenizers.Sequence(steps)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=2, show_progress=False,
                                  initial_alphabet=[alphabet[b] for b in range(256)],
                                  special_tokens=[])
    learner.train_from_iterator(list(texts), trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    merges = learned["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    vocab = {alphabet[b]: b for b in range(256)}
    for i, s in enumerate(_SPECIALS):
        vocab[s] = 256 + i
    for a, b in merges:  # merged tokens in merge order from id 263
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    assert tok.get_vocab_size() == len(vocab), "special tokens must keep their ids"
    return tok.to_str()


def tokenizer_texts(jsonl: pathlib.Path) -> list[str]:
    """The strings the training data tokenises: each prompt and each answer (with the leading
    space the trainer adds)."""
    from molmoe.processing.processor import prompt_text

    texts = []
    for line in pathlib.Path(jsonl).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        texts.append(prompt_text(msgs[0]["content"]))
        texts.append(" " + msgs[1]["content"])
    return texts


def write_initial_checkpoint(directory, *, arch: str = DEFAULT_ARCH, tokenizer_json: str,
                             seed: int = 0, overrides: dict | None = None,
                             sincos: bool = True, vision_init: bool = True,
                             feature_rms: float = 1.0,
                             embed_rms: float | None = None) -> pathlib.Path:
    """Random-weights checkpoint of `arch` with `tokenizer_json` into `directory` (created).
    sincos: the ViT's positional embedding starts as a 2D sine-cosine table (patch row and
    column), so every patch feature carries its place from step 0.
    vision_init: the ViT and connector matrices start at N(0, 1/fan_in) (biases 0) and the
    projector's output is scaled so that the image features added to the <im_patch> embeddings
    have RMS `feature_rms` on a fixed synthetic picture. With the demo's flat N(0, 0.05) init the
    features are ~0.004 across positions beside 0.05 embeddings: the decoder learns to ignore
    the image (runs 1-4, bench/RESULTS.md).
    embed_rms: rescale the decoder's token embeddings to this RMS (None: the demo's N(0, 0.05),
    20x smaller than the image features; session 3 in bench/RESULTS.md)."""
    spec = ARCHS[arch]
    n_vocab = json.loads(tokenizer_json)
    n_vocab = len(n_vocab["model"]["vocab"])
    config = {**spec["config"], "vocab_size": n_vocab,
              "embedding_size": -(-n_vocab // 64) * 64, **((overrides or {}).get("config", {}))}
    vision = {**spec["vision"], **((overrides or {}).get("vision", {}))}
    pre = {**spec["preprocessor"], **((overrides or {}).get("preprocessor", {}))}
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(directory, seed=seed, config=config, vision=vision, preprocessor=pre)
    if sincos:
        _sincos_positions(directory / "pytorch_model.bin", vision)
    if vision_init:
        _vision_init(directory, seed, feature_rms)
    if embed_rms is not None:
        _scale_embeddings(directory / "pytorch_model.bin", embed_rms)
    (directory / "tokenizer.json").write_text(tokenizer_json)
    (directory / "README.md").write_text(
        f"molmoe pointer initial checkpoint: arch {arch}, seed {seed}, RANDOM weights.\n")
    return directory


def sincos_table(grid: int, dim: int):
    """[grid*grid + 1, dim] 2D sine-cosine positions (row 0, the class token: zeros): half the
    channels encode the patch row, half the column, at geometric frequencies."""
    import torch

    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1)))
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * freqs[None] * (torch.pi / 2)  # [grid, quarter]
    enc = torch.cat([ang.sin(), ang.cos()], dim=1)  # [grid, 2*quarter]
    rows = enc[:, None, :].expand(grid, grid, -1)
    cols = enc[None, :, :].expand(grid, grid, -1)
    table = torch.zeros(grid * grid + 1, dim, dtype=torch.float64)
    table[1:, : 4 * quarter] = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return table.float()


def _vision_init(directory: pathlib.Path, seed: int, feature_rms: float) -> None:
    import random

    import torch

    from molmoe import synthetic as S
    from molmoe.checkpoint.loader import load
    from molmoe.processing.processor import Processor

    path = directory / "pytorch_model.bin"
    state = torch.load(path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(seed + 1)
    skip = ("pad_embed", "class_embedding", "positional_embedding")
    for k in sorted(state):
        if "vision_backbone" not in k or k.endswith(skip) or "norm" in k or "pre_ln" in k:
            continue
        v = state[k]
        if v.dim() == 2:
            state[k] = torch.randn(v.shape, generator=gen) / v.shape[1] ** 0.5
        elif k.endswith(".bias"):
            state[k] = torch.zeros_like(v)
    for k in state:  # layer-norm biases start at 0
        if "vision_backbone" in k and ("norm" in k or "pre_ln" in k) and k.endswith(".bias"):
            state[k] = torch.zeros_like(state[k])
    torch.save(state, path)
    model = load(directory, dtype="float32")
    proc = Processor.from_pretrained(directory)
    sample = S.make_sample(random.Random(f"molmoe-pointer-init:{seed}"), "single",
                           sides=(320, 320))
    x = proc(sample.question, S.render(sample.scene))
    with torch.no_grad():
        feats = model.vision(x["images"][None], x["image_masks"][None])
    rms = float(feats.pow(2).mean().sqrt())
    key = [k for k in state if k.endswith("image_projector.w2.weight")]
    assert len(key) == 1, key
    state[key[0]] = state[key[0]] * (feature_rms / rms)
    torch.save(state, path)


def _scale_embeddings(path: pathlib.Path, rms: float) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = [k for k in state if k.endswith(("wte.embedding", "wte.new_embedding"))]
    assert keys, sorted(state)[:20]
    for k in keys:
        v = state[k]
        state[k] = v * (rms / float(v.pow(2).mean().sqrt()))
    torch.save(state, path)


def parse_overrides(spec: str) -> dict:
    """'d_model=256,n_heads=8' -> {"d_model": 256, "n_heads": 8} (config.json keys; ints or
    floats)."""
    out = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        key, _, value = item.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                raise SystemExit(f"--decoder {spec!r}: {item!r} is not key=number") from None
    return out


def _sincos_positions(path: pathlib.Path, vision: dict) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = [k for k in state if k.endswith("positional_embedding")]
    assert len(keys) == 1, keys
    n, dim = state[keys[0]].shape
    grid = vision["image_default_input_size"][0] // vision["image_patch_size"]
    assert n == grid * grid + 1, (n, grid)
    state[keys[0]] = sincos_table(grid, dim)
    torch.save(state, path)


def mix_parts(spec: str) -> list[tuple[float, str]]:
    """A phase's generator spec: 'KNOBS' or a mixture 'W*KNOBS|W*KNOBS|...' (weights optional,
    default 1) -> [(weight, knobs spec)]. E.g. '0.5*objects=2-2,anchor=0.04|0.5*objects=2-2':
    half the scenes colour-anchored (a training aid), half placed anywhere."""
    parts = []
    for part in spec.split("|"):
        head, star, rest = part.partition("*")
        try:
            weight, knobs = (float(head), rest) if star else (1.0, part)
        except ValueError:
            weight, knobs = 1.0, part
        if weight <= 0:
            raise SystemExit(f"mixture {spec!r}: weights must be positive")
        parts.append((weight, knobs.strip()))
    return parts


def write_phase_data(out: pathlib.Path, spec: str, *, n: int, seed: int,
                     sizes: tuple[int, int]) -> pathlib.Path:
    """`n` examples of a phase into out/train.jsonl (`molmoe.synthetic.write_dataset`). A
    mixture (`mix_parts`) writes each part into out/part-K (synth seed `seed + 10_000 * K`,
    its share of `n`) and lists them all, shuffled by the trainer's sampler, in out/train.jsonl."""
    from molmoe import synthetic as S

    parts = mix_parts(spec)
    if len(parts) == 1:
        return S.write_dataset(out, n=n, seed=seed, sizes=sizes, knobs=S.Knobs.parse(parts[0][1]))
    total = sum(w for w, _ in parts)
    counts = [max(1, round(n * w / total)) for w, _ in parts]
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, ((_, knobs), m) in enumerate(zip(parts, counts)):
        part = S.write_dataset(out / f"part-{k}", n=m, seed=seed + 10_000 * k, sizes=sizes,
                               knobs=S.Knobs.parse(knobs))
        for line in part.read_text().splitlines():
            rec = json.loads(line)
            rec["image"] = f"part-{k}/{rec['image']}"
            lines.append(json.dumps(rec))
    tmp = out / "train.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(out / "train.jsonl")
    return out / "train.jsonl"


def parse_curriculum(spec: str) -> list[tuple[str, str, int, int]]:
    """A CURRICULA name, or 'KNOBS@N@STEPS;...' -> [(name, knobs spec, examples, steps)]."""
    from molmoe import synthetic as S

    if spec in CURRICULA:
        phases = list(CURRICULA[spec])
    else:
        phases = []
        for k, part in enumerate(p for p in spec.split(";") if p.strip()):
            knobs, n, steps = part.rsplit("@", 2)
            phases.append((f"p{k}", knobs.strip(), int(n), int(steps)))
    if not phases:
        raise SystemExit(f"empty curriculum {spec!r}")
    for _, knobs, n, steps in phases:
        for _, part in mix_parts(knobs):
            S.Knobs.parse(part)  # fail before any data is written
        if n < 1 or steps < 1:
            raise SystemExit(f"curriculum {spec!r}: examples and steps must be positive")
    return phases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train the built-in pointing model from a seed")
    ap.add_argument("--work", required=True, type=pathlib.Path, help="work directory (new)")
    ap.add_argument("--seed", type=int, default=0, help="data, init and data-order seed")
    ap.add_argument("--arch", default=DEFAULT_ARCH, choices=sorted(ARCHS))
    ap.add_argument("--data", type=pathlib.Path, default=None,
                    help="an existing dataset directory (default: WORK/data, written if absent)")
    ap.add_argument("--mix", default=None,
                    help="question mix for the training data, e.g. single=1 or "
                         "single=0.6,multi=0.1,count=0.2,absent=0.1 (default: the generator's)")
    ap.add_argument("--n", type=int, default=40000, help="training examples")
    ap.add_argument("--max-side", type=int, default=320, help="largest training image side")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=0,
                    help="DataLoader workers (0: on 2 cores a worker process slows each step ~15x)")
    ap.add_argument("--no-word-split", action="store_true",
                    help="let merges span colour/shape words (runs r1-r9, d1: whole prompts "
                         "became single tokens)")
    ap.add_argument("--no-sincos", action="store_true", help="random ViT positions (run r1)")
    ap.add_argument("--no-vision-init", action="store_true",
                    help="the demo's flat N(0, 0.05) vision init (runs r1-r4)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1: on 2 shared cores 2 threads thrash when other "
                         "jobs load them (0.6 s/step vs 9 s/step measured)")
    ap.add_argument("--freeze", default=None,
                    help="parts kept at their initial weights: vit, connector (comma list; "
                         "default: vit, and the connector too after vision pretraining)")
    ap.add_argument("--curriculum", default=None,
                    help=f"phases trained in turn ({', '.join(CURRICULA)}), or a spec "
                         "'KNOBS@N@STEPS;KNOBS@N@STEPS;...' (molmoe.synthetic.Knobs.parse); "
                         "replaces --mix/--n/--steps")
    ap.add_argument("--init", type=pathlib.Path, default=None,
                    help="start from this checkpoint instead of a new random one (a diagnostic "
                         "continuation; its tokenizer must cover the data)")
    ap.add_argument("--decoder", default="",
                    help="config.json overrides for the decoder, e.g. d_model=256,n_heads=8,"
                         "mlp_hidden_size=512,n_layers=6 (a new init only)")
    ap.add_argument("--embed-rms", type=float, default=None,
                    help="token embeddings' initial RMS (default: the demo's 0.05; the image "
                         "features start at RMS 1)")
    ap.add_argument("--feature-rms", type=float, default=1.0,
                    help="the image features' initial RMS (vision init)")
    ap.add_argument("--weight-decay", type=float, default=None,
                    help="AdamW weight decay (default: the trainer's)")
    ap.add_argument("--vision-lr", type=float, default=None, help="the ViT's peak rate")
    ap.add_argument("--connector-lr", type=float, default=None,
                    help="the connector's peak rate")
    ap.add_argument("--shape-steps", default="0",
                    help="steps of the shape phase's stages before any other pretraining, "
                         "comma list (molmoe.pointer_vision.pretrain_shape: one object on "
                         "white, then 1-4 on white, then the issue's domain on the global "
                         "view, then on the tiles; e.g. 2000,1000,0,1000); a new init only; "
                         "0: none")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="vision pretraining steps before `molmoe train` (molmoe.pointer_vision; "
                         "a new init only; 0: none)")
    ap.add_argument("--vision-batch", type=int, default=16)
    ap.add_argument("--vision-scenes", type=int, default=4000,
                    help="the vision pretraining's scene pool; 0: fresh scenes every step")
    ap.add_argument("--vision-pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--vision-vit-lr", type=float, default=None,
                    help="the ViT's peak rate in the vision pretraining; 0 freezes it and "
                         "trains only the connector (default: --vision-pretrain-lr / 2 after "
                         "the shape phase, with the joint terms that keep its shape; a frozen "
                         "ViT loses the place; --vision-pretrain-lr otherwise)")
    ap.add_argument("--vision-joint", type=float, default=None,
                    help="weight of the dense pretraining's joint terms: the softmax over "
                         "cells, the shape phase's per-object loss (needs a trainable ViT) and "
                         "the point cells' shape (molmoe.pointer_vision.pretrain_vision; "
                         "default: 1 after a shape phase, 0 otherwise; bench/RESULTS.md, "
                         "session 9)")
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args(argv)
    try:
        shape_steps = tuple(int(v) for v in args.shape_steps.split(","))
    except ValueError:
        raise SystemExit(f"--shape-steps {args.shape_steps!r}: a comma list of step counts")
    if len(shape_steps) > 4 or min(shape_steps) < 0:
        raise SystemExit(f"--shape-steps {args.shape_steps!r}: one to four counts >= 0")
    if args.vision_steps < 0 or args.vision_batch < 1 or args.vision_scenes < 0 \
            or (args.vision_vit_lr or 0) < 0 or (args.vision_joint or 0) < 0:
        raise SystemExit("--vision-steps must be >= 0, --vision-batch >= 1, "
                         "--vision-scenes >= 0, --vision-vit-lr >= 0 and --vision-joint >= 0")
    pretraining = [f for f, on in (("--shape-steps", any(shape_steps)),
                                   ("--vision-steps", args.vision_steps)) if on]
    if pretraining and args.init:
        raise SystemExit(f"{' and '.join(pretraining)}: vision pretraining starts from a new "
                         "init; --init continues from a trained checkpoint: give one or the other")
    if args.freeze is None:
        args.freeze = "vit,connector" if args.vision_steps else "vit"

    from molmoe.training.trainer import TrainOptions, train

    work = args.work
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.curriculum:
        phases = parse_curriculum(args.curriculum)
    else:
        mix = ("mix=" + "+".join(kv.replace("=", ":") for kv in args.mix.split(","))
               if args.mix else "")
        phases = [("main", mix, args.n, args.steps)]
    datas = []
    for k, (name, spec, n, _) in enumerate(phases):
        data = (args.data if args.data and len(phases) == 1
                else work / ("data" if len(phases) == 1 else f"data-{k}-{name}"))
        if not (data / "train.jsonl").exists():
            write_phase_data(data, spec, n=n, seed=args.seed + 100_000 * k,
                             sizes=(160, args.max_side))
        datas.append(data)
    t_data = time.perf_counter() - t0
    if args.init:  # go on from a trained checkpoint (its tokenizer and architecture)
        init = args.init
    else:
        init = work / "init"
        if init.exists():
            shutil.rmtree(init)
        texts = [t for d in datas for t in tokenizer_texts(d / "train.jsonl")]
        tok = train_tokenizer_json(texts, split_words=None if args.no_word_split
                                   else content_words())
        write_initial_checkpoint(init, arch=args.arch, tokenizer_json=tok, seed=args.seed,
                                 sincos=not args.no_sincos,
                                 vision_init=not args.no_vision_init,
                                 feature_rms=args.feature_rms, embed_rms=args.embed_rms,
                                 overrides={"config": parse_overrides(args.decoder)})
        if any(shape_steps):
            from molmoe.pointer_vision import pretrain_shape

            report = pretrain_shape(init, steps=shape_steps, seed=args.seed)
            (work / "shape.json").write_text(json.dumps(report, indent=2))
        if args.vision_steps:
            from molmoe.pointer_vision import pretrain_vision

            shaped = any(shape_steps)
            vit_lr = (args.vision_vit_lr if args.vision_vit_lr is not None
                      else args.vision_pretrain_lr / 2 if shaped else args.vision_pretrain_lr)
            joint = args.vision_joint if args.vision_joint is not None else float(shaped)
            report = pretrain_vision(init, steps=args.vision_steps, batch=args.vision_batch,
                                     lr=args.vision_pretrain_lr, seed=args.seed,
                                     n_scenes=args.vision_scenes,
                                     feature_rms=args.feature_rms, vit_lr=vit_lr,
                                     centre_softmax=joint, centre_shape=joint,
                                     object_weight=joint if vit_lr else 0.0)
            (work / "vision.json").write_text(json.dumps(report, indent=2))
    print(f"data {t_data:.0f}s; init {init}", flush=True)
    t1 = time.perf_counter()
    model = init
    phase_s = []
    for k, ((name, _, _, steps), data) in enumerate(zip(phases, datas)):
        out = work / ("run" if len(phases) == 1 else f"run-{k}-{name}")
        opts = TrainOptions(model=str(model), data=str(data / "train.jsonl"), out=str(out),
                            steps=steps, batch=args.batch, lr=args.lr,
                            vision_lr=args.vision_lr, connector_lr=args.connector_lr,
                            warmup=min(args.warmup, steps), min_lr_ratio=args.min_lr_ratio,
                            seed=args.seed, workers=args.workers,
                            save_every=max(steps // 4, 1), activation_checkpointing=False,
                            device="cpu", resume=True,
                            freeze=tuple(f for f in args.freeze.split(",") if f),
                            **({} if args.weight_decay is None
                               else {"weight_decay": args.weight_decay}))
        tp = time.perf_counter()
        train(opts)
        phase_s.append(time.perf_counter() - tp)
        print(f"phase {k} {name}: {steps} steps in {phase_s[-1]:.0f}s", flush=True)
        model = out / "model"
    final = work / "run" / "model"
    if model != final:
        if final.parent.exists():
            shutil.rmtree(final.parent)
        final.parent.mkdir(parents=True)
        shutil.copytree(model, final)
    t_train = time.perf_counter() - t1
    print(f"training wall time {t_train:.0f}s ({t_train / 60:.1f} min)", flush=True)
    (work / "timing.json").write_text(json.dumps(
        {"data_s": t_data, "train_s": t_train, "phase_s": phase_s,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    if not args.no_eval:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
        from bench.eval_pointing import main as eval_main

        eval_main(["--model", str(work / "run" / "model"), "--n", str(args.eval_n),
                   "--out", str(work / "eval.json")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
