"""molmoe.serve.images: image_url -> bytes -> PIL image, with every refusal a status.

No internet: remote fetches go to thread http.servers on 127.0.0.1, reached either through the
test-only `allowed_networks` exemption or refused as loopback; a test `resolver` plays DNS.
"""
from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib

import pytest
from PIL import Image, ImageFile

from molmoe.errors import MolmoeError
from molmoe.serve import images as si
from molmoe.serve.images import ImageInputError, ImagePolicy, open_image, read_image_url


def png_bytes(size=(8, 6), color=(200, 30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def bomb_png(w=60_000, h=60_000) -> bytes:
    """A valid-looking PNG header claiming w x h pixels, with a tiny IDAT: decoding it would
    need gigabytes; the header alone must get it refused."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)   # 8-bit gray
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def status_of(fn, *args) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        fn(*args)
    assert isinstance(info.value, MolmoeError)
    return info.value


# ----------------------------------------------------------------------------- data: URLs


def test_data_url_good_and_opened():
    raw = png_bytes()
    data, desc = read_image_url(data_url(raw), ImagePolicy())
    assert data == raw and "image/png" in desc and str(len(raw)) in desc
    img = open_image(data, ImagePolicy(), desc)
    assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((3, 3)) == (200, 30, 40)


def test_data_url_media_type_case_and_params():
    raw = png_bytes()
    url = "DATA:Image/PNG;name=x.png;BASE64," + base64.b64encode(raw).decode()
    assert read_image_url(url, ImagePolicy())[0] == raw


@pytest.mark.parametrize("url,status,words", [
    ("data:image/png;base64,iVBOR w0K", 400, "invalid base64"),          # a space
    ("data:image/png;base64,iVBO\nRw0K", 400, "invalid base64"),
    ("data:image/png;base64,iVBORw0", 400, "invalid base64"),            # length not x4
    ("data:image/png;base64,iVB*Rw0K", 400, "invalid base64"),
    ("data:image/png;base64,", 400, "no data"),
    ("data:image/png,%89PNG", 400, "not base64"),
    ("data:image/png;base64", 400, "','"),
    ("data:text/html;base64,PGI+aGk8L2I+", 415, "not an image"),
    ("data:;base64,AAAA", 415, "text/plain"),
    ("data:image/;base64,AAAA", 415, "not an image"),
    ("data:application/octet-stream;base64,AAAA", 415, "not an image"),
])
def test_data_url_bad(url, status, words):
    e = status_of(read_image_url, url, ImagePolicy())
    assert e.status == status and words in str(e), str(e)


def test_data_url_too_big_is_refused_before_decoding(monkeypatch):
    policy = ImagePolicy(max_bytes=1000)
    ok = data_url(b"\x00" * 1000)
    assert len(read_image_url(ok, policy)[0]) == 1000
    decoded = []
    monkeypatch.setattr(si.base64, "b64decode", lambda *a, **k: decoded.append(1) or b"")
    e = status_of(read_image_url, data_url(b"\x00" * 1001), policy)
    assert e.status == 413 and "1,001 bytes" in str(e)
    # Not even valid base64: the length alone decides, nothing is decoded.
    e = status_of(read_image_url, "data:image/png;base64," + "!" * 4000, policy)
    assert e.status == 413 and not decoded


def test_decompression_bomb_png_is_413_without_decoding(monkeypatch):
    bomb = bomb_png()
    data, desc = read_image_url(data_url(bomb), ImagePolicy())
    assert len(data) < 2000

    def no_decode(self):
        raise AssertionError("decoded a bomb")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    t0 = time.monotonic()
    e = status_of(open_image, data, ImagePolicy(), desc)
    assert e.status == 413 and "3,600,000,000 pixels" in str(e) and "data: URL" in str(e)
    assert time.monotonic() - t0 < 1
    # The decode-bytes budget is checked the same way, below the pixel limit.
    e = status_of(open_image, bomb_png(20_000, 20_000), ImagePolicy(max_pixels=None), "x")
    assert e.status == 413 and "decode budget" in str(e)
    e = status_of(open_image, bomb_png(100, 100), ImagePolicy(max_pixels=99), "x")
    assert e.status == 413


def test_open_image_refusals():
    e = status_of(open_image, b"GIF89a not really", ImagePolicy(), "a")
    assert e.status in (400, 415)
    e = status_of(open_image, b"hello, I am text", ImagePolicy(), "b")
    assert e.status == 415 and "not an image" in str(e)
    e = status_of(open_image, png_bytes()[:50], ImagePolicy(), "c")   # truncated
    assert e.status == 400 and "c:" in str(e)
    e = status_of(open_image, png_bytes(), ImagePolicy(max_bytes=10), "d")
    assert e.status == 413
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    e = status_of(open_image, eps, ImagePolicy(), "e")
    assert e.status == 415


def test_open_image_applies_exif_and_alpha():
    buf = io.BytesIO()
    im = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90
    im.save(buf, "JPEG", exif=exif.tobytes())
    assert open_image(buf.getvalue(), ImagePolicy(), "j").size == (2, 4)
    buf = io.BytesIO()
    Image.new("RGBA", (3, 3), (0, 0, 0, 0)).save(buf, "PNG")
    assert open_image(buf.getvalue(), ImagePolicy(), "t").getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("url,words", [
    ("", "empty"), ("   ", "empty"), ("ftp://example.com/a.png", "'ftp'"),
    ("javascript:alert(1)", "'javascript'"), ("gopher://x/", "'gopher'"),
    ("http://" + "a" * 9000, "8,192"), ("http://x/\x00", "control"),
])
def test_other_urls_400(url, words):
    e = status_of(read_image_url, url, ImagePolicy(allow_remote=True))
    assert e.status == 400 and words in str(e), str(e)


def test_policy_validation():
    for kw in ({"max_bytes": 0}, {"max_bytes": True}, {"max_pixels": -1},
               {"fetch_timeout_s": 0}, {"fetch_timeout_s": float("nan")},
               {"max_redirects": -1}, {"allowed_networks": ("nonsense",)},
               {"local_dir": "/definitely/not/here"}):
        with pytest.raises(MolmoeError):
            ImagePolicy(**kw)


# ----------------------------------------------------------------------------- local files


@pytest.fixture
def local(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "sub").mkdir()
    (root / "a.png").write_bytes(png_bytes())
    (root / "sub" / "b.png").write_bytes(png_bytes((3, 3)))
    (tmp_path / "secret.png").write_bytes(png_bytes((5, 5)))
    return root


def test_local_files_inside(local):
    policy = ImagePolicy(local_dir=local)
    assert read_image_url(str(local / "a.png"), policy)[0] == png_bytes()
    assert read_image_url("a.png", policy)[0] == png_bytes()          # relative to the dir
    assert read_image_url(f"file://{local}/sub/b.png", policy)[0] == png_bytes((3, 3))
    assert read_image_url(f"file://localhost{local}/a.png", policy)[0] == png_bytes()
    (local / "sp ace.png").write_bytes(b"x")
    assert read_image_url(f"file://{local}/sp%20ace.png", policy)[0] == b"x"
    os.symlink(local / "sub" / "b.png", local / "link.png")          # a link inside: fine
    assert read_image_url("link.png", policy)[0] == png_bytes((3, 3))
    assert read_image_url("sub/../a.png", policy)[0] == png_bytes()


def test_local_files_refused(local, tmp_path):
    e = status_of(read_image_url, str(local / "a.png"), ImagePolicy())
    assert e.status == 403 and "--allow-local-files" in str(e)
    e = status_of(read_image_url, f"file://{local}/a.png", ImagePolicy())
    assert e.status == 403
    policy = ImagePolicy(local_dir=local)
    for outside in (str(tmp_path / "secret.png"), "../secret.png", "sub/../../secret.png",
                    f"file://{tmp_path}/secret.png", "/etc/passwd", f"file://{local}/../x",
                    "/definitely/missing.png"):
        e = status_of(read_image_url, outside, policy)
        assert e.status == 403 and "outside" in str(e), outside
    os.symlink(tmp_path / "secret.png", local / "escape.png")
    e = status_of(read_image_url, "escape.png", policy)
    assert e.status == 403
    os.symlink(tmp_path, local / "up")
    e = status_of(read_image_url, "up/secret.png", policy)
    assert e.status == 403
    e = status_of(read_image_url, "missing.png", policy)
    assert e.status == 400 and "no such file" in str(e)
    os.mkfifo(local / "fifo.png")
    t0 = time.monotonic()
    e = status_of(read_image_url, "fifo.png", policy)
    assert e.status == 400 and "regular file" in str(e) and time.monotonic() - t0 < 1
    e = status_of(read_image_url, "sub", policy)
    assert e.status == 400
    e = status_of(read_image_url, "file://otherhost/a.png", policy)
    assert e.status == 400
    (local / "big.png").write_bytes(b"\x00" * 2000)
    e = status_of(read_image_url, "big.png", ImagePolicy(local_dir=local, max_bytes=1999))
    assert e.status == 413


# ----------------------------------------------------------------------------- remote: servers


class Server:
    """A thread http.server on 127.0.0.1; `routes[path](handler)` answers; hosts seen kept."""

    def __init__(self, routes, tls: ssl.SSLContext | None = None):
        self.routes, self.hosts, self.paths = routes, [], []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.hosts.append(self.headers.get("Host"))
                outer.paths.append(self.path)
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send(body: bytes, kind="image/png", length: int | None = -1, status=200, headers=()):
    def route(h):
        h.send_response(status)
        h.send_header("Content-Type", kind)
        if length is not None:
            h.send_header("Content-Length", str(len(body) if length == -1 else length))
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        h.close_connection = True
    return route


def redirect(location: str, status=302):
    return send(b"", kind="text/plain", status=status, headers=[("Location", location)])


@pytest.fixture
def server():
    servers = []

    def make(routes, tls=None):
        s = Server(routes, tls)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


LOOP = ("127.0.0.0/8",)


def resolver_for(mapping, calls=None):
    def resolve(host, port):
        if calls is not None:
            calls.append(host)
        return list(mapping[host])
    return resolve


def test_remote_off_is_403(server):
    s = server({"/a.png": send(png_bytes())})
    e = status_of(read_image_url, f"http://127.0.0.1:{s.port}/a.png", ImagePolicy())
    assert e.status == 403 and "--allow-remote-images" in str(e) and not s.hosts


def test_loopback_refused(server):
    s = server({"/a.png": send(png_bytes())})
    policy = ImagePolicy(allow_remote=True)
    for url in (f"http://127.0.0.1:{s.port}/a.png", f"http://localhost:{s.port}/a.png",
                f"http://[::1]:{s.port}/a.png", f"http://2130706433:{s.port}/a.png",
                f"http://0.0.0.0:{s.port}/a.png"):
        e = status_of(read_image_url, url, policy)
        assert e.status == 403, url
    assert not s.hosts   # nothing ever connected


def test_name_resolving_to_loopback_refused(server):
    """The check is on the resolved address, not the name."""
    s = server({"/a.png": send(png_bytes())})
    policy = ImagePolicy(allow_remote=True,
                         resolver=resolver_for({"example.test": ["127.0.0.1"]}))
    e = status_of(read_image_url, f"http://example.test:{s.port}/a.png", policy)
    assert e.status == 403 and "example.test resolves to 127.0.0.1" in str(e)
    assert not s.hosts


def test_any_private_address_refuses():
    policy = ImagePolicy(allow_remote=True, resolver=resolver_for(
        {"mixed.test": ["93.184.216.34", "10.0.0.7"]}))
    e = status_of(read_image_url, "http://mixed.test/a.png", policy)
    assert e.status == 403 and "10.0.0.7" in str(e)


@pytest.mark.parametrize("ip", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.2.1",
    "198.18.0.1", "::", "::1", "fe80::1", "fc00::1", "fd12::1", "fec0::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1",
    "2002:a9fe:a9fe::1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",
    "2001:db8::1", "2001::1",
])
def test_refused_addresses(ip):
    assert si._refusal(ipaddress.ip_address(ip)) is not None
    policy = ImagePolicy(allow_remote=True, resolver=resolver_for({"h.test": [ip]}))
    assert status_of(read_image_url, "http://h.test/x.png", policy).status == 403


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111",
                                "2002:5db8:d822::1"])
def test_public_addresses(ip):
    assert si._refusal(ipaddress.ip_address(ip)) is None


def test_success_connects_to_the_checked_ip_with_the_name(server, monkeypatch):
    """One lookup per hop, through the policy's resolver; the socket goes to that checked IP
    (socket.getaddrinfo only ever sees IP literals: no second DNS lookup to rebind); the Host
    header carries the name."""
    s = server({"/a.png": send(png_bytes())})
    calls, looked_up = [], []
    real = socket.getaddrinfo

    def spy(host, *a, **k):
        looked_up.append(host)
        return real(host, *a, **k)
    monkeypatch.setattr(socket, "getaddrinfo", spy)
    policy = ImagePolicy(allow_remote=True, allowed_networks=LOOP,
                         resolver=resolver_for({"images.test": ["127.0.0.1"]}, calls))
    data, desc = read_image_url(f"http://images.test:{s.port}/a.png?v=1", policy)
    assert data == png_bytes() and desc == f"http://images.test:{s.port}/a.png"
    assert calls == ["images.test"]
    assert s.hosts == [f"images.test:{s.port}"] and s.paths == ["/a.png?v=1"]
    for host in looked_up:
        ipaddress.ip_address(host)   # only IP literals reach getaddrinfo
    assert open_image(data, policy, desc).size == (8, 6)


def test_rebinding_resolver_cannot_redirect_the_connection(server):
    """A resolver that answers a safe address first and a forbidden one after: only the first
    answer is used (checked and connected to)."""
    s = server({"/a.png": send(png_bytes())})
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])
    calls = []

    def rebinding(host, port):
        calls.append(host)
        return next(answers)
    policy = ImagePolicy(allow_remote=True, allowed_networks=("127.0.0.1/32",),
                         resolver=rebinding)
    assert read_image_url(f"http://rebind.test:{s.port}/a.png", policy)[0] == png_bytes()
    assert calls == ["rebind.test"]


def test_redirects(server):
    s = server({})
    s.routes.update({
        "/a.png": send(png_bytes()),
        "/r1": redirect("/r2", 301), "/r2": redirect(f"http://img2.test:{s.port}/a.png", 307),
        "/evil": redirect(f"http://meta.test:{s.port}/a.png"),
        "/evil-ip": redirect("http://169.254.169.254/latest/meta-data/"),
        "/file": redirect("file:///etc/passwd"),
        "/loop": redirect("/loop"),
        "/nowhere": send(b"gone", kind="text/plain", status=404),
    })
    mapping = {"img.test": ["127.0.0.1"], "img2.test": ["127.0.0.1"],
               "meta.test": ["127.0.0.1", "169.254.169.254"]}
    calls = []
    policy = ImagePolicy(allow_remote=True, allowed_networks=LOOP,
                         resolver=resolver_for(mapping, calls))
    base = f"http://img.test:{s.port}"
    data, desc = read_image_url(base + "/r1", policy)
    assert data == png_bytes() and "redirected to" in desc and "img2.test" in desc
    assert calls == ["img.test", "img.test", "img2.test"]
    assert s.hosts[-1] == f"img2.test:{s.port}"
    e = status_of(read_image_url, base + "/evil", policy)   # allowed, then forbidden
    assert e.status == 403 and "169.254.169.254" in str(e)
    e = status_of(read_image_url, base + "/evil-ip", policy)
    assert e.status == 403
    e = status_of(read_image_url, base + "/file", policy)
    assert e.status == 403 and "file" in str(e)
    n = len(s.paths)
    e = status_of(read_image_url, base + "/loop", policy)
    assert e.status == 502 and "more than 3 redirects" in str(e)
    assert len(s.paths) - n == 4
    e = status_of(read_image_url, base + "/r1", ImagePolicy(
        allow_remote=True, allowed_networks=LOOP, resolver=resolver_for(mapping),
        max_redirects=1))
    assert e.status == 502
    e = status_of(read_image_url, base + "/nowhere", policy)
    assert e.status == 502 and "404" in str(e)


def test_slow_server_times_out(server):
    def drip(h):   # headers promptly, then a byte every 0.1 s: each read is "fast enough"
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.end_headers()
        for _ in range(100):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.1)

    def stall(h):   # nothing at all
        time.sleep(5)

    def drip_headers(h):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(100):
            h.wfile.write(b"X-A: b\r\n")
            h.wfile.flush()
            time.sleep(0.1)
    s = server({"/drip": drip, "/stall": stall, "/hdr": drip_headers})
    policy = ImagePolicy(allow_remote=True, allowed_networks=LOOP, fetch_timeout_s=0.6)
    for path in ("/drip", "/stall", "/hdr"):
        t0 = time.monotonic()
        e = status_of(read_image_url, f"http://127.0.0.1:{s.port}{path}", policy)
        took = time.monotonic() - t0
        assert e.status == 504 and "timed out" in str(e), (path, str(e))
        assert 0.5 < took < 1.5, (path, took)


def test_slow_dns_times_out(monkeypatch):
    def slow(*a, **k):
        time.sleep(3)
        raise OSError("late")
    monkeypatch.setattr(socket, "getaddrinfo", slow)
    t0 = time.monotonic()
    e = status_of(read_image_url, "http://slow.test/a.png",
                  ImagePolicy(allow_remote=True, fetch_timeout_s=0.3))
    assert e.status == 504 and time.monotonic() - t0 < 1


def test_body_caps(server):
    big = b"\x89PNG" + b"\x00" * 5000

    def no_length(h):   # HTTP/1.0 style: body until close, no Content-Length
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.end_headers()
        for _ in range(1000):
            h.wfile.write(b"\x00" * 1000)
    s = server({
        "/nolen": no_length,
        "/declared": send(big),                          # honest, too big
        "/liar-small": send(big, length=100),            # says 100, sends 5004
        "/liar-big": send(b"\x00" * 10, length=900),     # says 900, sends 10 and closes
        "/bad-length": send(big, length=None, headers=[("Content-Length", "-5")]),
        "/html": send(b"<html>", kind="text/html"),
    })
    policy = ImagePolicy(allow_remote=True, allowed_networks=LOOP, max_bytes=1000)
    base = f"http://127.0.0.1:{s.port}"
    t0 = time.monotonic()
    e = status_of(read_image_url, base + "/nolen", policy)
    assert e.status == 413 and "more than 1,000 bytes" in str(e)
    assert time.monotonic() - t0 < 2
    e = status_of(read_image_url, base + "/declared", policy)
    assert e.status == 413 and "Content-Length" in str(e)
    data, _ = read_image_url(base + "/liar-small", policy)   # never more than it said
    assert len(data) == 100
    e = status_of(read_image_url, base + "/liar-big", policy)
    assert e.status == 502
    e = status_of(read_image_url, base + "/bad-length", policy)
    assert e.status in (413, 502)
    e = status_of(read_image_url, base + "/html", policy)
    assert e.status == 415


def test_connection_refused_is_502():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    e = status_of(read_image_url, f"http://127.0.0.1:{port}/a.png",
                  ImagePolicy(allow_remote=True, allowed_networks=LOOP))
    assert e.status == 502


def test_unresolvable_is_502():
    policy = ImagePolicy(allow_remote=True, resolver=resolver_for({"none.test": []}))
    assert status_of(read_image_url, "http://none.test/a.png", policy).status == 502
    e = status_of(read_image_url, "http://user:pw@h.test/a.png", ImagePolicy(allow_remote=True))
    assert e.status == 400 and "credentials" in str(e)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found (needed to make a test certificate)")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=secure.test", "-addext", "subjectAltName=DNS:secure.test",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_https_sni_and_certificate_use_the_name(server, tls_files, monkeypatch):
    cert, key = tls_files
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    names = []
    tls.sni_callback = lambda sock, name, ctx: names.append(name)
    s = server({"/a.png": send(png_bytes())}, tls=tls)

    def trusting():
        ctx = ssl.create_default_context(cafile=str(cert))
        return ctx
    monkeypatch.setattr(si, "_ssl_context", trusting)
    mapping = {"secure.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    policy = ImagePolicy(allow_remote=True, allowed_networks=LOOP,
                         resolver=resolver_for(mapping))
    data, _ = read_image_url(f"https://secure.test:{s.port}/a.png", policy)
    assert data == png_bytes() and names == ["secure.test"]
    assert s.hosts == [f"secure.test:{s.port}"]
    # The certificate is for secure.test: reaching the same IP as other.test fails the check.
    e = status_of(read_image_url, f"https://other.test:{s.port}/a.png", policy)
    assert e.status == 502 and "certificate" in str(e)
    monkeypatch.setattr(si, "_ssl_context", ssl.create_default_context)   # untrusted CA
    e = status_of(read_image_url, f"https://secure.test:{s.port}/a.png", policy)
    assert e.status == 502


def test_silent_tls_server_times_out():
    """A server that accepts the connection and never answers the TLS handshake."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)          # the kernel completes the TCP handshake; nobody ever reads
    try:
        policy = ImagePolicy(allow_remote=True, allowed_networks=LOOP, fetch_timeout_s=0.5)
        t0 = time.monotonic()
        e = status_of(read_image_url, f"https://127.0.0.1:{listener.getsockname()[1]}/a.png",
                      policy)
        assert e.status == 504 and time.monotonic() - t0 < 1.5
    finally:
        listener.close()
