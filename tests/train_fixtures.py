"""Training test fixtures: a tiny MolmoE with a small crop geometry, and pointing data for it."""
from __future__ import annotations

import json
import pathlib
import random

from PIL import Image, ImageDraw

from molmoe.demo import write_tiny_checkpoint

# 112-px crops of 8x8 patches (4x4 pooled tokens), at most 2 crops: a few hundred tokens per
# example, so that a step of 16 examples takes well under a second on 2 CPU cores.
SMALL_VISION = {"image_default_input_size": [112, 112]}
SMALL_PREPROCESSOR = {"base_image_input_size": [112, 112], "image_token_length_h": 4,
                      "image_token_length_w": 4, "max_crops": 2, "overlap_margins": [2, 2]}
PROMPT = "Point to the red circle."


def tiny_checkpoint(directory: pathlib.Path, seed: int = 0, **config) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(directory, seed=seed, config=config, vision=SMALL_VISION,
                          preprocessor=SMALL_PREPROCESSOR)
    return directory


def pointing_set(directory: pathlib.Path, n: int, seed: int = 0, size=(112, 112),
                 name: str = "train.jsonl") -> tuple[pathlib.Path, list[dict]]:
    """`n` images of one red circle on white at a random place, each asked "Point to the red
    circle." and answered in Molmo's grammar. Returns the JSONL path and the examples (image
    path, the circle's centre in percent, the answer)."""
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    W, H = size
    r = max(6, min(W, H) // 8)
    examples = []
    for i in range(n):
        cx, cy = rng.randint(r, W - r - 1), rng.randint(r, H - r - 1)
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 30, 30))
        rel = f"images/{i:03d}.png"
        img.save(directory / rel)
        x, y = round(100 * (cx + 0.5) / W, 1), round(100 * (cy + 0.5) / H, 1)
        answer = f'<point x="{x:.1f}" y="{y:.1f}" alt="red circle">red circle</point>'
        examples.append({"image": rel, "x": x, "y": y, "answer": answer})
    path = directory / name
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"image": e["image"], "messages": [
                {"role": "user", "content": PROMPT},
                {"role": "assistant", "content": e["answer"]}]}) + "\n")
    return path, examples
