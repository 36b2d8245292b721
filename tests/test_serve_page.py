"""The pointing page (molmoe/serve/static/index.html) in a real headless Chromium.

A stand-in HTTP server serves the page and answers /v1/chat/completions with a canned SSE stream,
so this tests the page alone. `run_page` drives any server (the real one too): upload an image,
type a question, Ask, wait for the answer, screenshot, and check the marker colour at each point.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium
chromium-driver) and the selenium package; skipped with the reason otherwise.
"""
from __future__ import annotations

import base64
import http.server
import io
import json
import os
import pathlib
import shutil
import threading
import time

import pytest

PAGE = pathlib.Path(__file__).resolve().parents[1] / "molmoe" / "serve" / "static" / "index.html"
DEMO = pathlib.Path(__file__).resolve().parents[1] / "molmoe" / "assets" / "demo.png"
CHROMIUM = os.environ.get("MOLMOE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MOLMOE_CHROMEDRIVER", "/usr/bin/chromedriver")
MARKER = (255, 0, 255)       # the page's marker colour (MARKER in index.html)
MARKER_RADIUS_CSS = 7        # its radius in CSS pixels, inside a 2 px white ring


def _skip_reason() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install chromium chromium-driver)"
    if shutil.which(CHROMEDRIVER) is None:
        return f"{CHROMEDRIVER} not found (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


# ----------------------------------------------------------------------------- the helper


def make_driver(width: int = 1000, height: int = 1000):
    """A headless Chromium under chromedriver, at device pixel ratio 1."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault("SE_AVOID_STATS", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--force-device-scale-factor=1", "--hide-scrollbars", "--no-first-run",
                "--disable-extensions", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))


def drive_page(driver, base_url: str, image_path, question: str, api_key: str | None = None,
               timeout_s: float = 120.0, wait: bool = True) -> dict:
    """Load the page, choose the image, type the question (and key), press Ask; when `wait`,
    wait for the answer to finish (state "done" or "error"). Returns the page's state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(base_url.rstrip("/") + "/")
    driver.execute_script("sessionStorage.clear()")
    if api_key is not None:
        driver.find_element(By.CSS_SELECTOR, "details summary").click()
        key = driver.find_element(By.ID, "api-key")
        key.clear()
        key.send_keys(api_key)
    driver.find_element(By.ID, "image").send_keys(str(pathlib.Path(image_path).resolve()))
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "const i = document.getElementById('preview');"
        "return i.complete && i.naturalWidth > 0 && !document.getElementById('stage').hidden"))
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "ask").click()
    if wait:
        WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
            lambda d: page_state(d)["state"] in ("done", "error"))
    return page_state(driver)


def page_state(driver) -> dict:
    return driver.execute_script("""
        const $ = (id) => document.getElementById(id);
        return {state: window.molmoePage.state, answer: $('answer').textContent,
                error: $('error').textContent, summary: $('points-summary').textContent,
                points: window.molmoePage.points};""")


def point_checks(driver, png: bytes) -> list[dict]:
    """For each point the page drew: where it lies in the screenshot (viewport pixels) and
    whether the pixel there is the marker colour."""
    from PIL import Image
    geo = driver.execute_script("""
        const i = document.getElementById('preview'), r = i.getBoundingClientRect();
        return {left: r.left, top: r.top, width: r.width, height: r.height,
                nw: i.naturalWidth, nh: i.naturalHeight, dpr: window.devicePixelRatio,
                points: window.molmoePage.points};""")
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    checks = []
    for p in geo["points"]:
        sx = (geo["left"] + p["x"] * geo["width"] / geo["nw"]) * geo["dpr"]
        sy = (geo["top"] + p["y"] * geo["height"] / geo["nh"]) * geo["dpr"]
        ix, iy = int(sx), int(sy)
        inside = 0 <= ix < shot.width and 0 <= iy < shot.height
        rgb = shot.getpixel((ix, iy)) if inside else None
        checks.append({"label": p.get("label"), "x": p["x"], "y": p["y"], "screen": (ix, iy),
                       "rgb": rgb, "is_marker": rgb is not None and _near(rgb, MARKER),
                       "scale": geo["dpr"] * geo["width"] / geo["nw"], "dpr": geo["dpr"]})
    return checks


def _near(rgb, target, tol=12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(rgb, target))


def run_page(base_url: str, image_path, question: str, api_key: str | None = None, *,
             driver=None, timeout_s: float = 120.0) -> tuple[str, bytes, list[dict]]:
    """Drive the page at `base_url` like a user: -> (answer text, screenshot PNG of the
    viewport, one check per point: {label, x, y (original image pixels), screen (x, y),
    rgb, is_marker}). Raises AssertionError with the page's message if it shows an error.
    Starts and quits its own headless Chromium unless `driver` is given."""
    own = driver is None
    driver = make_driver() if own else driver
    try:
        state = drive_page(driver, base_url, image_path, question, api_key, timeout_s)
        if state["state"] != "done":
            raise AssertionError(f"the page shows an error: {state['error']!r}")
        driver.execute_script("document.getElementById('stage').scrollIntoView({block: 'start'})")
        png = driver.get_screenshot_as_png()
        return state["answer"], png, point_checks(driver, png)
    finally:
        if own:
            driver.quit()


# ----------------------------------------------------------------------------- stand-in server


class StandIn:
    """Serves index.html and a canned chat completion stream; records each request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.key: str | None = None
        self.gate: threading.Event | None = None   # when set: hold the stream after chunk 1
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, status: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                if outer.key is None or \
                        self.headers.get("Authorization") == f"Bearer {outer.key}":
                    return True
                self._json(401, {"error": {"message": "invalid API key",
                                           "type": "invalid_request_error"}})
                return False

            def do_GET(self):
                if self.path == "/":
                    body = PAGE.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path == "/v1/models":
                    if self._authorized():
                        self._json(200, {"object": "list", "data": [{"id": "test-model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/chat/completions":
                    return self._json(404, {"error": {"message": "not found"}})
                req = json.loads(body)
                outer.requests.append({"body": req,
                                       "authorization": self.headers.get("Authorization")})
                if not self._authorized():
                    return
                question = req["messages"][0]["content"][0]["text"]
                if "[bad]" in question:
                    return self._json(400, {"error": {"message": "image_url: data: URL of "
                                                      "media type 'text/plain', not an image"}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for i, chunk in enumerate(canned_chunks(question)):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    if i == 0 and outer.gate is not None:
                        outer.gate.wait(20)
                    time.sleep(0.02)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


DEMO_SIZE = (536, 354)


def canned_chunks(question: str) -> list[dict]:
    """The answer, in OpenAI chunk format. Default: one point at (25 %, 50 %) in the text and
    the `points` field; "[nofield]": two points in the text only (the page parses them);
    "[fieldonly]": no tag in the text, one point in the field."""
    w, h = DEMO_SIZE
    if "[nofield]" in question:
        pieces = ["The squares are ", ('<points x1="75.0" y1="25.0" x2="12.5" y2="80.0" '
                                       'alt="squares">squares</points>'), "."]
        points = None
    elif "[fieldonly]" in question:
        pieces, points = ["Here it is."], [{"x": 0.6 * w, "y": 0.3 * h, "label": "thing"}]
    else:
        pieces = ["The red square ", "is ", 'here: <point x="25.0" y="50.0" alt="red square">',
                  "red square</point>", "."]
        points = [{"x": 0.25 * w, "y": 0.5 * h, "label": "red square"}]
    chunks = [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
               "model": "test-model",
               "choices": [{"index": 0, "delta": ({"role": "assistant", "content": p} if i == 0
                                                  else {"content": p}),
                            "finish_reason": None}]} for i, p in enumerate(pieces)]
    final = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
             "model": "test-model", "choices": [{"index": 0, "delta": {},
                                                 "finish_reason": "stop"}]}
    if points is not None:  # where molmoe serve puts them: on the final chunk's choice
        final["choices"][0]["points"] = points
    return chunks + [final]


# ----------------------------------------------------------------------------- tests

pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def standin():
    s = StandIn()
    yield s
    s.close()


@pytest.fixture(scope="module")
def driver():
    d = make_driver()
    yield d
    d.quit()


def assert_markers_only_at(png: bytes, checks: list[dict]) -> None:
    """Every marker-coloured pixel of the screenshot lies within a marker's radius of a point,
    and each point's marker is there."""
    import numpy as np
    from PIL import Image
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    magenta = np.all(np.abs(a - np.array(MARKER)) <= 12, axis=-1)
    ys, xs = np.nonzero(magenta)
    assert len(xs) > 0
    near = np.zeros(len(xs), dtype=bool)
    for c in checks:
        assert c["is_marker"], c
        r = (MARKER_RADIUS_CSS + 1) * c["dpr"]
        near |= (xs - c["screen"][0]) ** 2 + (ys - c["screen"][1]) ** 2 <= r * r
        # the marker is a disc: magenta a few pixels from the centre, white ring, then not
        for dx, dy in ((4, 0), (-4, 0), (0, 4), (0, -4)):
            assert magenta[c["screen"][1] + dy, c["screen"][0] + dx]
        assert not magenta[c["screen"][1], c["screen"][0] + int(11 * c["dpr"])]
    assert near.all(), f"{(~near).sum()} marker-coloured pixels away from every point"


def test_page_streams_answer_and_draws_the_point(standin, driver):
    standin.key = "sekret-1"
    t0 = time.monotonic()
    answer, png, checks = run_page(standin.url, DEMO, "Point to the red square.",
                                   api_key="sekret-1", driver=driver)
    took = time.monotonic() - t0
    assert answer == 'The red square is here: <point x="25.0" y="50.0" alt="red square">' \
                     'red square</point>.'
    assert png.startswith(b"\x89PNG")
    assert len(checks) == 1 and checks[0]["label"] == "red square"
    assert (checks[0]["x"], checks[0]["y"]) == (134, 177)
    assert_markers_only_at(png, checks)
    # What the page sent: OpenAI's shape, the file as a data: URL, the key as a Bearer token.
    req = standin.requests[-1]
    assert req["authorization"] == "Bearer sekret-1"
    body = req["body"]
    assert body["stream"] is True and body["model"] == "test-model"
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    text, image = msg["content"]
    assert text == {"type": "text", "text": "Point to the red square."}
    assert image["type"] == "image_url"
    assert image["image_url"]["url"] == \
        "data:image/png;base64," + base64.b64encode(DEMO.read_bytes()).decode()
    assert driver.execute_script("return sessionStorage.getItem('molmoe-api-key')") == "sekret-1"
    summary = page_state(driver)["summary"]
    assert "1 point marked: red square" in summary
    print(f"page round trip {took:.2f} s")


def test_answer_shows_while_streaming(standin, driver):
    """The first piece is on the page before the server sends the rest."""
    from selenium.webdriver.support.ui import WebDriverWait
    standin.key = None
    standin.gate = threading.Event()
    try:
        drive_page(driver, standin.url, DEMO, "Point to the red square.", wait=False)
        WebDriverWait(driver, 10, poll_frequency=0.05).until(
            lambda d: page_state(d)["answer"] == "The red square ")
        state = page_state(driver)
        assert state["state"] == "streaming" and state["points"] == []
        assert not driver.find_element("id", "ask").is_enabled()
    finally:
        standin.gate.set()
        standin.gate = None
    WebDriverWait(driver, 10).until(lambda d: page_state(d)["state"] == "done")
    assert page_state(driver)["answer"].endswith("</point>.")


def test_points_parsed_from_text_at_phone_width(standin, driver):
    standin.key = None
    driver.set_window_size(390, 844)
    try:
        answer, png, checks = run_page(standin.url, DEMO, "Point to the squares [nofield]",
                                       driver=driver)
        width = driver.execute_script("return document.getElementById('preview')"
                                      ".getBoundingClientRect().width")
        overflow = driver.execute_script("return document.documentElement.scrollWidth"
                                         " > window.innerWidth")
    finally:
        driver.set_window_size(1000, 1000)
    assert "<points" in answer
    assert width < 390 and not overflow          # the image shrinks to the phone's width
    assert [(c["x"], c["y"]) for c in checks] == [(402, 88.5), (67, 283.2)]
    assert all(c["label"] == "squares" for c in checks)
    assert_markers_only_at(png, checks)


def test_points_field_wins_over_text(standin, driver):
    standin.key = None
    answer, png, checks = run_page(standin.url, DEMO, "Point [fieldonly]", driver=driver)
    assert answer == "Here it is." and len(checks) == 1 and checks[0]["label"] == "thing"
    assert_markers_only_at(png, checks)


def test_errors_are_shown(standin, driver):
    standin.key = "right"
    state = drive_page(driver, standin.url, DEMO, "Point to it.", api_key="wrong")
    assert state["state"] == "error"
    assert state["error"] == "Error 401 Unauthorized: invalid API key"
    assert state["points"] == [] and state["answer"] == ""
    standin.key = None
    state = drive_page(driver, standin.url, DEMO, "Point to it [bad]")
    assert state["error"].startswith("Error 400 Bad Request: image_url: data: URL of media type")
    with pytest.raises(AssertionError, match="invalid API key"):
        standin.key = "right"
        run_page(standin.url, DEMO, "Point to it.", driver=driver)
    standin.key = None


def test_answer_is_text_not_html(standin, driver):
    """Markup in the answer is shown as text (the point tags are visible, no element made)."""
    run_page(standin.url, DEMO, "Point to the red square.", driver=driver)
    assert driver.execute_script("return document.querySelectorAll('#answer *').length") == 0
    assert driver.execute_script("return document.querySelectorAll('point').length") == 0
