"""The pointing page against the REAL server, in headless Chromium: a tiny MolmoE is taught with
`molmoe train` to point at the red circle of the shipped demo image, `molmoe serve`'s app serves
it on loopback, and the page (a user uploading the image, asking, pressing Ask) streams the answer
and draws the point on the circle."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.test_serve_page import DEMO, _skip_reason, run_page
from tests.train_fixtures import tiny_checkpoint

pytest.importorskip("fastapi")
_reason = _skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

QUESTION = "Point to the red circle."
CIRCLE = (120, 180, 60)  # centre x, y and radius of the red circle in demo.png (536 x 354)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("page")
    model = tiny_checkpoint(d / "ckpt", seed=5)
    W, H = Image.open(DEMO).size
    x, y = 100 * (CIRCLE[0] + 0.5) / W, 100 * (CIRCLE[1] + 0.5) / H
    answer = f'<point x="{x:.1f}" y="{y:.1f}" alt="red circle">red circle</point>'
    data = d / "train.jsonl"
    data.write_text(json.dumps({"image": str(DEMO), "messages": [
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]}) + "\n")
    out = d / "out"
    r = subprocess.run([sys.executable, "-m", "molmoe", "train", "--model", str(model), "--data",
                        str(data), "--out", str(out), "--steps", "60", "--batch", "1", "--lr",
                        "3e-3", "--warmup", "5", "--weight-decay", "0", "--workers", "0",
                        "--quiet", "--no-plot", "--no-activation-checkpointing"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "model", answer


def test_page_on_the_real_server_draws_the_point_on_the_circle(trained):
    import torch

    from molmoe.pipeline import load_pipeline
    from molmoe.serve import ServeOptions, create_app
    from molmoe.serve.server import BackgroundServer

    model_dir, answer = trained
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        proc, model, eos = load_pipeline(model_dir, device="cpu")
        app = create_app(proc, model, eos, model_id="tiny-pointer",
                         options=ServeOptions(max_batch=2, max_queue=4, api_key="k"))
        with BackgroundServer(app) as server:
            text, png, checks = run_page(server.url, DEMO, QUESTION, api_key="k")
    finally:
        torch.set_num_threads(threads)
    assert text.strip() == answer
    assert len(checks) == 1 and checks[0]["is_marker"], checks
    cx, cy, r = CIRCLE
    x, y = checks[0]["x"], checks[0]["y"]  # in pixels of the original image
    assert (x - cx) ** 2 + (y - cy) ** 2 < (r / 2) ** 2, (x, y)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
