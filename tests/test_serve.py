"""`molmoe serve` end to end: a real uvicorn server on a free loopback port, the demo checkpoint
(tiny, random weights), the official `openai` client. Answers are compared with the in-process
engine run alone on a separate copy of the model (two engines must not share one model: each
binds its own KV cache to it)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import struct
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from molmoe.demo import demo_checkpoint  # noqa: E402
from molmoe.generation import Engine, GenerationConfig  # noqa: E402
from molmoe.pipeline import load_pipeline  # noqa: E402
from molmoe.points import parse_points  # noqa: E402
from molmoe.serve import ServeOptions, create_app  # noqa: E402
from molmoe.serve.app import answer_points  # noqa: E402
from molmoe.serve.server import BackgroundServer  # noqa: E402

KEY = "test-key"
LONG = 2000  # max_tokens of requests meant to be cut off by a disconnect (random weights: no EOS)
OPTIONS = dict(max_batch=8, max_queue=64, api_key=KEY, max_tokens_limit=LONG,
               max_body_bytes=1 << 20, max_image_pixels=4_000_000, shutdown_grace_s=2.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def one_thread():
    # The demo model's matmuls are far too small to split; spinning OpenMP workers on a shared
    # 2-core machine only slow it down (see molmoe.app._demo). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(checkpoint, one_thread):
    proc, model, eos = load_pipeline(checkpoint, device="cpu")
    app = create_app(proc, model, eos, model_id="molmoe-demo", options=ServeOptions(**OPTIONS))
    with BackgroundServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def reference(checkpoint):
    """prompt text, data: URL or None, max_tokens -> (GenerationResult, prompt tokens), run alone
    on its own model copy: what `molmoe generate` computes (greedy)."""
    proc, model, eos = load_pipeline(checkpoint, device="cpu")
    engine = Engine(model, proc.tokenizer, eos_token_id=eos)

    def run(text, image_png=None, max_tokens=8):
        inputs = proc(text, images=None if image_png is None else Image.open(io.BytesIO(image_png)))
        inputs.pop("original_size", None)
        return (engine.generate(inputs, GenerationConfig(max_new_tokens=max_tokens)),
                int(inputs["input_ids"].shape[0]))

    return run


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0, timeout=120)


def _png(w=130, h=90, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _user(text, png=None):
    if png is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url",
                                          "image_url": {"url": _data_url(png)}}]}]


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(urllib.request.Request(
        server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _raw(server, payload: bytes, *, headers=(), key=KEY, path="/v1/chat/completions"):
    """One HTTP/1.1 request on a raw socket -> (status, headers dict, body)."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: close",
            "Content-Type: application/json", *headers]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    if not any(h.lower().startswith(("transfer-encoding", "content-length")) for h in headers):
        head.append(f"Content-Length: {len(payload)}")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


def _still_serves(client):
    r = client.chat.completions.create(model="m", messages=_user("ok?"), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- answers


def test_openai_client_non_streaming_with_image_equals_generate(client, reference):
    png = _png()
    r = client.chat.completions.create(model="molmoe-demo", messages=_user("Point to the cat.",
                                                                           png), max_tokens=8)
    ref, prompt_tokens = reference("Point to the cat.", png, 8)
    choice = r.choices[0]
    assert choice.message.content == ref.text
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reason]
    assert r.usage.prompt_tokens == prompt_tokens > 300  # the image tokens are counted
    assert r.usage.completion_tokens == ref.timings.new_tokens
    assert r.usage.total_tokens == prompt_tokens + ref.timings.new_tokens
    assert choice.message.model_extra["points"] == []  # random weights: no point in the answer
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_openai_client_streaming_equals_generate(client, reference):
    png = _png(seed=1)
    stream = client.chat.completions.create(
        model="molmoe-demo", messages=_user("What is this?", png), max_tokens=10, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    ref, prompt_tokens = reference("What is this?", png, 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and "points" in final[0].choices[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        ref.timings.new_tokens and chunks[-1].usage.prompt_tokens == prompt_tokens


def test_stop_string_and_models(client, reference, server):
    ref, _ = reference("Say something.", None, 12)
    cut = ref.text[2:4]
    r = client.chat.completions.create(model="m", messages=_user("Say something."),
                                       max_tokens=12, stop=[cut])
    assert r.choices[0].message.content == ref.text[:ref.text.index(cut)]
    assert r.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list().data] == ["molmoe-demo"]


def test_points_are_pixels_of_the_original_image():
    answer = parse_points('<points x1="50" y1="25" x2="10" y2="90" alt="dogs">dogs</points> '
                          'Counting shows a total of 2.')
    assert answer_points(answer, (200, 100)) == [{"x": 100.0, "y": 25.0, "label": "dogs"},
                                                 {"x": 20.0, "y": 90.0, "label": "dogs"}]
    assert answer.count == 2
    assert answer_points(answer, None) == []  # no image: no pixels


def test_32_concurrent_mixed_requests_each_equal_alone(server, reference):
    png = _png(64, 48, seed=3)
    jobs = [(f"Question {i}: " + "why " * (i % 7), png if i % 8 == 5 else None, 3 + (i * 5) % 17,
             i % 3 == 0) for i in range(32)]  # text, image, max_tokens, stream

    async def one(aclient, text, image, max_tokens, stream):
        kw = dict(model="m", messages=_user(text, image), max_tokens=max_tokens)
        if not stream:
            r = await aclient.chat.completions.create(**kw)
            return r.choices[0].message.content, r.usage.completion_tokens
        out, usage = [], None
        async for c in await aclient.chat.completions.create(
                **kw, stream=True, stream_options={"include_usage": True}):
            out += [c.choices[0].delta.content or ""] if c.choices else []
            usage = c.usage or usage
        return "".join(out), usage.completion_tokens

    async def main():
        aclient = openai.AsyncOpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0,
                                     timeout=300)
        try:
            return await asyncio.gather(*(one(aclient, *j) for j in jobs))
        finally:
            await aclient.close()

    answers = asyncio.run(main())
    assert len(answers) == 32
    for (text, image, max_tokens, _), (got, n) in zip(jobs, answers):
        ref, _ = reference(text, image, max_tokens)
        assert (got, n) == (ref.text, ref.timings.new_tokens), text
    assert _metric(server, "molmoe_running_requests") == 0


# ----------------------------------------------------------------------------- faults


def _open_stream(server, body: dict) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    payload = json.dumps(body).encode()
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
               f"\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
               ).encode() + payload)
    return s


def _first_chunk(s: socket.socket) -> None:
    """Read until the first SSE chunk (the response head may come in a packet of its own)."""
    data = b""
    while b"chat.completion.chunk" not in data:
        more = s.recv(4096)
        assert more, data
        data += more


def _wait(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_and_frees_the_row(server, client, stream):
    worker = server.server.config.app.state.worker
    before = worker.cancelled_total
    cancelled = _metric(server, 'molmoe_requests_total{status="cancelled"}')
    s = _open_stream(server, {"messages": _user("Talk for a long time."), "max_tokens": LONG,
                              "stream": stream})
    if stream:
        _first_chunk(s)  # the stream is going
    else:
        _wait(lambda: _metric(server, "molmoe_running_requests") == 1)
    s.close()
    _wait(lambda: worker.cancelled_total == before + 1)
    _wait(lambda: _metric(server, "molmoe_running_requests") == 0)
    _wait(lambda: _metric(server, 'molmoe_requests_total{status="cancelled"}') == cancelled + 1)
    assert worker.engine.running == []
    _still_serves(client)


def test_malformed_json_400(server, client):
    status, _, body = _raw(server, b'{"messages": [')
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = _raw(server, b"\xff\xfe")
    assert status == 400
    _still_serves(client)


def test_huge_body_413_declared_and_chunked(server, client):
    status, _, body = _raw(server, b"x" * 10, headers=["Content-Length: 99999999999"])
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    # Chunked (no length): exactly one byte over, and no final chunk, so the server has read
    # everything sent when it answers (unread bytes would turn its close into a reset).
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  f"{KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"x" * 65536
        for _ in range(OPTIONS["max_body_bytes"] // len(piece)):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        s.sendall(b"1\r\nx\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    _still_serves(client)


def _png_header_only(w: int, h: int) -> bytes:
    """A valid PNG header declaring w x h pixels (1-bit gray) with a few bytes of data: the
    shape of a decompression bomb, without building it."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_image_refused(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="m", messages=_user(
            "What is this?", _png_header_only(30000, 30000)), max_tokens=2)
    assert e.value.status_code in (400, 413)
    _still_serves(client)


def test_bad_requests_400(client):
    cases = [dict(n=2), dict(max_tokens=LONG + 1), dict(max_completion_tokens=LONG + 1),
             dict(temperature=-1), dict(messages=[{"role": "robot", "content": "x"}]),
             dict(messages=[{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "x"}]),
             dict(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
             dict(messages=_user("x" * 5000)),  # longer than the model's 4096 positions
             dict(messages=[{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 2}])]
    for case in cases:
        kw = dict(model="m", messages=_user("hi"), max_tokens=2) | case
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kw)
        assert e.value.body["message"], case
    _still_serves(client)


def test_api_key(server, client):
    for key in (None, "wrong"):
        status, headers, body = _raw(server, json.dumps({"messages": _user("hi")}).encode(),
                                     key=key)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert urllib.request.urlopen(server.url + "/health").status == 200  # no key needed
    page = urllib.request.urlopen(server.url + "/")  # static, holds no data: open too
    assert page.status == 200 and b"<html" in page.read().lower()
    for path in ("/metrics", "/v1/models", "/v1/chat/completions"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + path)
        assert e.value.code == 401, path
    _still_serves(client)


def test_full_queue_429_then_shutdown_503(checkpoint, one_thread):
    """A server admitting one request at a time: the second gets 429 + Retry-After; after a
    shutdown begins, new requests get 503 and the running one is cancelled at the grace."""
    proc, model, eos = load_pipeline(checkpoint, device="cpu")
    app = create_app(proc, model, eos, model_id="m", options=ServeOptions(
        max_batch=1, max_queue=1, shutdown_grace_s=0.5))
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(api_key="none", base_url=srv.url + "/v1", max_retries=0)
        long = _open_stream(srv, {"messages": _user("Go on."), "max_tokens": LONG,
                                  "stream": True})
        _first_chunk(long)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="m", messages=_user("hi"), max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        long.close()
        _wait(lambda: app.state.worker.depth() == (0, 0))
        r = c.chat.completions.create(model="m", messages=_user("hi"), max_tokens=2)
        assert r.choices[0].message.content is not None

        long = _open_stream(srv, {"messages": _user("Go on."), "max_tokens": LONG,
                                  "stream": True})
        _first_chunk(long)
        app.state.worker.drain()
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="m", messages=_user("hi"), max_tokens=2)
        assert e.value.status_code == 503
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url + "/health")
        assert e.value.code == 503
    # stopped: the engine thread joined, the long request cancelled after the grace period
    assert not app.state.worker.alive and app.state.worker.engine.running == []
    long.close()


def test_cli_refuses_bad_arguments_before_loading(checkpoint, capsys):
    from molmoe.cli import main

    for extra in (["--port", "70000"], ["--max-batch", "0"], ["--max-queue", "-1"],
                  ["--allow-local-files", str(checkpoint / "config.json")]):
        assert main(["serve", "--model", str(checkpoint), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("molmoe serve: error:") and err.count("\n") == 1, err


def test_image_urls_the_server_must_not_fetch(checkpoint, one_thread, tmp_path):
    """Through the real server: with remote images on, a URL to this machine (an image really
    served there) is refused 403; with them off any http URL is 403; with local files on, a path
    outside the directory is 403 and one inside works. Each time the next request is served."""
    import http.server
    import threading

    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "ok.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png(seed=1))

    class Handler(http.server.BaseHTTPRequestHandler):
        hits = 0

        def do_GET(self):
            Handler.hits += 1
            body = _png()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{origin.server_address[1]}/cat.png"

    def ask(client, image_url):
        return client.chat.completions.create(model="m", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}])

    try:
        for remote in (True, False):
            proc, model, eos = load_pipeline(checkpoint, device="cpu")
            app = create_app(proc, model, eos, model_id="m", options=ServeOptions(
                **OPTIONS | dict(allow_remote_images=remote,
                                 allow_local_files=str(tmp_path / "pics"))))
            with BackgroundServer(app) as srv:
                c = openai.OpenAI(api_key=KEY, base_url=srv.url + "/v1", max_retries=0)
                for bad in (url, str(tmp_path / "secret.png"),
                            f"file://{tmp_path / 'pics' / '..' / 'secret.png'}"):
                    with pytest.raises(openai.PermissionDeniedError) as e:
                        ask(c, bad)
                    assert e.value.status_code == 403 and e.value.body["message"], bad
                    _still_serves(c)
                assert ask(c, str(tmp_path / "pics" / "ok.png")).choices[0].finish_reason
        assert Handler.hits == 0  # never even connected to
    finally:
        origin.shutdown()
