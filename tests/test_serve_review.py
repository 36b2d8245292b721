"""Review of `molmoe serve`: what a hostile or merely unusual client does to a real server on
loopback (the demo checkpoint, random weights). Each test was written against a problem found
in review (or pins a property the review checked), and fails without its fix."""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from molmoe.demo import demo_checkpoint  # noqa: E402
from molmoe.pipeline import load_pipeline  # noqa: E402
from molmoe.serve import ServeOptions, create_app  # noqa: E402
from molmoe.serve.server import BackgroundServer  # noqa: E402

KEY = "review-key"
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared machine (see test_serve.py)
    proc, model, eos = load_pipeline(demo_checkpoint(tmp_path_factory.mktemp("cache")),
                                     device="cpu")
    app = create_app(proc, model, eos, model_id="m", options=ServeOptions(
        max_batch=4, api_key=KEY, max_tokens_limit=2000, max_body_bytes=1 << 20,
        body_timeout_s=BODY_TIMEOUT_S, shutdown_grace_s=1.0))
    with BackgroundServer(app) as s:
        yield s
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0, timeout=60)


@pytest.fixture
def serve_errors():
    """The records the server logs at ERROR (from its threads) during a test."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.ERROR)
    loggers = [logging.getLogger(n) for n in ("molmoe.serve", "uvicorn.error")]
    for lg in loggers:
        lg.addHandler(handler)
    yield records
    for lg in loggers:
        lg.removeHandler(handler)


def _user(text):
    return [{"role": "user", "content": text}]


def _metrics(server) -> str:
    return urllib.request.urlopen(urllib.request.Request(
        server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})).read().decode()


def _metric(server, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", _metrics(server), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Connection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def _raw(server, body: dict):
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(_head(len(payload)) + payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def _wait(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _still_serves(client):
    r = client.chat.completions.create(model="m", messages=_user("ok?"), max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- the body


def test_disconnect_while_sending_the_body_is_a_cancel_not_an_internal_error(
        server, client, serve_errors):
    """Found: a client that closed its connection halfway through its body made Starlette raise
    ClientDisconnect out of the handler: logged as 'unhandled error' with a traceback (the 500
    path), and the request was missing from molmoe_requests_total."""
    cancelled = _metric(server, 'molmoe_requests_total{status="cancelled"}')
    payload = json.dumps({"messages": _user("hi"), "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(_head(len(payload)) + payload[:10])
        time.sleep(0.2)
    _wait(lambda: _metric(server, 'molmoe_requests_total{status="cancelled"}') == cancelled + 1)
    assert [r.getMessage() for r in serve_errors] == []
    _still_serves(client)


def test_a_body_sent_too_slowly_is_cut_at_the_deadline(server, client):
    """Found: a client could send a body one byte at a time, or stop sending it, and hold the
    request (and its buffer) forever. Now the whole body must arrive within body_timeout_s:
    408 after that."""
    payload = json.dumps({"messages": _user("hi"), "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        t0 = time.monotonic()
        s.sendall(_head(len(payload)))
        s.settimeout(0.2)
        data, sent = b"", 0
        while not data and time.monotonic() - t0 < 20:
            if sent < len(payload) - 1:  # a byte every 0.2 s, never the last one
                s.sendall(payload[sent:sent + 1])
                sent += 1
            try:
                data = s.recv(4096)
            except TimeoutError:
                pass
        elapsed = time.monotonic() - t0
        # The status line can come in one segment and the body in the next: read the whole
        # response (Content-Length bytes after the head, or to the close).
        s.settimeout(5)
        while data:
            head, sep, body = data.partition(b"\r\n\r\n")
            lengths = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")]
            if sep and lengths and len(body) >= lengths[0]:
                break
            try:
                more = s.recv(4096)
            except TimeoutError:
                break
            if not more:
                break
            data += more
    assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 5
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"
    _still_serves(client)


def test_a_body_exactly_at_the_limit_is_read(server, client):
    body = {"messages": _user("hi"), "max_tokens": 2, "user": ""}
    body["user"] = "u" * ((1 << 20) - len(json.dumps(body).encode()))
    assert len(json.dumps(body).encode()) == 1 << 20
    status, _ = _raw(server, body)
    assert status == 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(_head((1 << 20) + 1))  # one byte over: refused from the header alone
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")


# ----------------------------------------------------------------------------- OpenAI fields


def test_null_for_optional_fields_is_the_default(server, client):
    """Found: `"n": null` and `"stream": null` (OpenAI's schema has them nullable; some clients
    send every field) were refused with 400."""
    for extra in ({"n": None}, {"stream": None}, {"stream_options": {"include_usage": None}},
                  {"stop": None, "temperature": None, "top_p": None, "seed": None}):
        status, rest = _raw(server, {"messages": _user("hi"), "max_tokens": 2} | extra)
        assert status == 200, (extra, rest)
        assert json.loads(rest)["object"] == "chat.completion"


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"17": 100}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1}, "presence_penalty"),
])
def test_features_the_server_cannot_honour_are_refused(client, extra, param):
    """Found: logprobs, tools, JSON mode, logit_bias and penalties were silently ignored, so a
    client asking for log-probabilities got `logprobs: null`, one asking for JSON got free text,
    one asking for a tool call got prose. Like n > 1, they are now a 400 naming the field."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=_user("hi"), max_tokens=2,
                                       extra_body=extra)
    assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_parameter"
    assert "not supported" in e.value.body["message"]


def test_the_defaults_of_those_features_are_accepted(client):
    r = client.chat.completions.create(
        model="m", messages=_user("hi"), max_tokens=2, logprobs=False, tools=[],
        tool_choice="none", response_format={"type": "text"}, frequency_penalty=0,
        presence_penalty=0.0, logit_bias={}, extra_body={"top_logprobs": 0})
    assert r.choices[0].logprobs is None


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(client):
    def sample(seed, text="hi"):
        return client.chat.completions.create(model="m", messages=_user(text), max_tokens=12,
                                              temperature=1.0, seed=seed).choices[0].message.content

    alone = {seed: sample(seed) for seed in range(3)}
    assert len(set(alone.values())) > 1  # the seed matters
    together: dict = {}
    threads = [threading.Thread(target=lambda s=s: together.__setitem__(s, sample(s)))
               for s in range(3)]
    threads += [threading.Thread(target=sample, args=(None, "other")) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


# ----------------------------------------------------------------------------- metrics


def test_metrics_parse_strictly_counters_grow_buckets_are_cumulative(server, client):
    parser = pytest.importorskip("prometheus_client.parser")

    def families():
        return {f.name: f for f in parser.text_string_to_metric_families(_metrics(server))}

    before = families()
    _still_serves(client)
    after = families()
    assert {"molmoe_requests", "molmoe_generated_tokens", "molmoe_queue_depth",
            "molmoe_time_to_first_token_seconds"} <= after.keys()
    total = {f: sum(s.value for s in after[f].samples) for f in ("molmoe_requests",
                                                                 "molmoe_generated_tokens")}
    assert total["molmoe_requests"] >= sum(s.value for s in before["molmoe_requests"].samples) + 1
    assert total["molmoe_generated_tokens"] >= \
        before["molmoe_generated_tokens"].samples[0].value + 1
    for name in ("molmoe_time_to_first_token_seconds", "molmoe_request_latency_seconds"):
        buckets = [s for s in after[name].samples if s.name.endswith("_bucket")]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
        count = [s.value for s in after[name].samples if s.name.endswith("_count")]
        assert count == [counts[-1]] and counts[-1] >= 1


# ----------------------------------------------------------------------------- connections


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """A server allowing 3 connections, each 1 s to send a request head, 3 s for a body."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    proc, model, eos = load_pipeline(demo_checkpoint(tmp_path_factory.mktemp("cache")),
                                     device="cpu")
    app = create_app(proc, model, eos, model_id="m", options=ServeOptions(
        max_batch=2, max_connections=3, header_timeout_s=1.0, body_timeout_s=3.0,
        shutdown_grace_s=1.0))
    with BackgroundServer(app) as s:
        yield s
    torch.set_num_threads(threads)


def _closed_after(s: socket.socket, drip: bytes = b"", limit_s: float = 10.0) -> float:
    """Seconds until the server closes `s` (recv returns b""), sending `drip` a byte every
    0.2 s meanwhile; fails if it is still open after `limit_s`."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    sent = 0
    while time.monotonic() - t0 < limit_s:
        if sent < len(drip):
            try:
                s.sendall(drip[sent:sent + 1])
            except OSError:
                return time.monotonic() - t0
            sent += 1
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    raise AssertionError(f"the connection is still open after {limit_s} s")


def test_idle_and_header_dripping_connections_are_closed(tight):
    """Found: a connection that never sends, or drips its headers, stayed open forever (uvicorn
    times out only idle keep-alive connections), each holding one of a bounded number of slots.
    Now a request head must arrive within header_timeout_s."""
    with socket.create_connection(("127.0.0.1", tight.port)) as s:
        assert 0.8 <= _closed_after(s) < 4
    drip = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", tight.port)) as s:
        assert 0.8 <= _closed_after(s, drip) < 4
    # a keep-alive connection gets a new head deadline after each response
    with socket.create_connection(("127.0.0.1", tight.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert _closed_after(s) < 4


def test_a_slow_body_is_timed_by_the_body_deadline_not_the_head_one(tight):
    payload = json.dumps({"messages": _user("hi"), "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", tight.port), timeout=30) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(payload)).encode()
                  + b"\r\n\r\n")
        s.sendall(payload[:5])
        s.settimeout(15)
        data = s.recv(4096)
        elapsed = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408 ") and 3.0 <= elapsed < 8, (data[:60], elapsed)


def test_connections_beyond_the_limit_get_503_until_slots_free(tight):
    idle = [socket.create_connection(("127.0.0.1", tight.port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(tight.url + "/health", timeout=10)
        assert e.value.code == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)
    assert urllib.request.urlopen(tight.url + "/health", timeout=10).status == 200
