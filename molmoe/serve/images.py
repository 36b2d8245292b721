"""An OpenAI `image_url` -> encoded bytes -> a PIL image, for `molmoe serve`, refusing what a
public server must not do on a client's behalf. docs/serve-images.md gives the rules.

Three sources, each off unless the operator turns it on (except data: URLs):
  * `data:image/...;base64,...`: size checked from the length of the base64 text before
    decoding; strict base64; the media type must be image/*.
  * `file:` URLs and plain paths: only with `ImagePolicy.local_dir`; the path is resolved
    (symlinks too), must lie inside that directory and be a regular file; the file opened is
    checked to be the file resolved (no swap between the check and the open).
  * `http://` / `https://`: only with `ImagePolicy.allow_remote`. The host is resolved ONCE; every
    address it resolves to must be public (`_refusal`); the connection then goes to one of those
    checked addresses (the Host header, TLS SNI and certificate check use the name), so a second
    DNS answer (DNS rebinding) never reaches a socket. Redirects are followed by hand, each
    target checked the same way. The whole fetch has one deadline, the body one byte cap.

`read_image_url` is blocking: run it in a worker thread. Every refusal is an `ImageInputError`
carrying the HTTP status the server should answer with.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import pathlib
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from molmoe.errors import MolmoeError, UsageError, is_integral
from molmoe.processing import images as _images

# A URL that is not a data: URL and is longer than this is refused unread (no real image address
# is this long; a multi-megabyte "path" would only be logged and parsed for nothing).
MAX_URL_CHARS = 8 << 10
# Status codes followed as redirects (all re-fetched with GET: image fetches have no body).
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# The body is read in pieces of this size, the deadline and the byte cap checked between them.
_CHUNK = 64 << 10
# The NAT64 prefixes (RFC 6052 well-known, RFC 8215 local use): the IPv4 address sits in the
# last 32 bits, and a NAT64 gateway would connect to it.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_DATA_URL = re.compile(r"data:(?P<meta>[^,]*),(?P<data>.*)", re.DOTALL | re.IGNORECASE)
_USER_AGENT = "molmoe-serve (image fetch)"


class ImageInputError(MolmoeError):
    """An image input the server refuses; `status` is the HTTP status to answer with:
    400 bad input, 403 not allowed, 413 too large, 415 not an image, 502 fetch failed,
    504 fetch timed out."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _default_max_pixels() -> int | None:
    return _images.DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ImagePolicy:
    """What `read_image_url` / `open_image` accept. The defaults admit data: URLs only."""
    max_bytes: int = 20 << 20          # encoded image bytes, any source
    max_pixels: int | None = _images.DEFAULT_MAX_PIXELS   # None = no limit (trusted input only)
    local_dir: pathlib.Path | None = None   # --allow-local-files DIR
    allow_remote: bool = False              # --allow-remote-images
    fetch_timeout_s: float = 10.0           # whole fetch: DNS, connect, redirects, body
    max_redirects: int = 3
    # host, port -> IP addresses; None = socket.getaddrinfo. For tests only.
    resolver: Callable[[str, int], list[str]] | None = None
    # CIDRs exempt from the public-address check, e.g. ("127.0.0.0/8",) in tests or an
    # intranet's image store ("10.1.2.0/24"). Everything in them becomes reachable by any client
    # of the server: name the smallest networks that hold the image hosts, never more.
    allowed_networks: tuple[str, ...] = ()

    def __post_init__(self):
        if not is_integral(self.max_bytes) or self.max_bytes <= 0:
            raise UsageError(f"max_bytes must be a positive number of bytes, got "
                             f"{self.max_bytes!r}")
        if self.max_pixels is not None and (not is_integral(self.max_pixels)
                                            or self.max_pixels <= 0):
            raise UsageError(f"max_pixels must be a positive number or None, got "
                             f"{self.max_pixels!r}")
        if self.local_dir is not None:
            d = pathlib.Path(self.local_dir)
            if not d.is_dir():
                raise UsageError(f"local image directory {str(d)!r} is not a directory")
            object.__setattr__(self, "local_dir", d.resolve(strict=True))
        t = self.fetch_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise UsageError(f"fetch_timeout_s must be a positive number of seconds, got {t!r}")
        if not is_integral(self.max_redirects) or self.max_redirects < 0:
            raise UsageError(f"max_redirects must be a whole number >= 0, got "
                             f"{self.max_redirects!r}")
        try:
            nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        except (TypeError, ValueError) as e:
            raise UsageError(f"allowed_networks: {e}") from None
        object.__setattr__(self, "_networks", nets)


# ----------------------------------------------------------------------------- entry points


def read_image_url(url: str, policy: ImagePolicy) -> tuple[bytes, str]:
    """The encoded image bytes an OpenAI `image_url.url` names, and a short description of the
    source for error messages and logs (never the data itself). Blocking."""
    if not isinstance(url, str) or not url.strip():
        raise ImageInputError(400, "image_url: empty URL")
    url = url.strip()
    if url[:5].lower() == "data:":
        return _read_data_url(url, policy)
    if len(url) > MAX_URL_CHARS:
        raise ImageInputError(400, f"image_url: URL of {len(url):,} characters, over the limit "
                                   f"of {MAX_URL_CHARS:,} (send the image as a data: URL)")
    if "\x00" in url or any(ord(c) < 32 for c in url):
        raise ImageInputError(400, "image_url: control characters in the URL")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _read_remote(url, policy)
    if scheme == "file":
        return _read_local(_file_url_path(url), policy)
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return _read_local(url, policy)
    raise ImageInputError(400, f"image_url: unsupported URL scheme {scheme!r}; send a data: URL"
                               " (data:image/png;base64,...)" +
                               (", or http(s):// where the server allows remote images"
                                if policy.allow_remote else ""))


def read_image(data: bytes, policy: ImagePolicy, name: str,
               fast_decode: _images.DecodeTarget | None = None) -> _images.LoadedImage:
    """Encoded bytes -> RGB pixels and the picture's size, through molmoe's image limits (pixels
    and decode bytes checked from the header before decoding, EXIF orientation applied, alpha
    composited); `fast_decode` as in `load_image` (a reduced JPEG decode, opt-in).
    Refusals: 413 too large, 415 not an image (or a format molmoe does not decode), 400 corrupt.
    """
    if len(data) > policy.max_bytes:
        raise ImageInputError(413, f"{name}: {len(data):,} bytes, over the limit of "
                                   f"{policy.max_bytes:,}")
    return _load_bytes(bytes(data), name, policy.max_pixels, fast_decode)


def open_image(data: bytes, policy: ImagePolicy, name: str) -> Image.Image:
    """`read_image` as an RGB PIL image."""
    return Image.fromarray(read_image(data, policy, name).pixels, "RGB")


# ----------------------------------------------------------------------------- decoding


# ImageError.kind -> HTTP status; "corrupt" and "invalid" are the client's 400.
_STATUS = {"too_large": 413, "unsupported": 415}


def _load_bytes(data: bytes, name: str, max_pixels: int | None,
                fast_decode: _images.DecodeTarget | None = None) -> _images.LoadedImage:
    """processing.images' `_from_path` for bytes in memory (load_image takes paths, PIL images
    and arrays only), with each refusal sorted by kind: the limits (checked from the header,
    before any decoding) -> 413; not an image / refused format -> 415; corrupt data -> 400."""
    budget = _images._decode_budget("default")
    f = io.BytesIO(data)

    def check_header(*args) -> None:
        try:
            _images._check_header(*args)
        except _images.ImageError as e:
            raise ImageInputError(413, str(e)) from None

    def before_open(fmt: str) -> None:
        if fmt == "ICO":  # PIL decodes an ICO while opening it: its entry's header first
            size, mode, decoder = _images._ico_frame_header(f)
            check_header(size, mode, decoder, name, max_pixels, budget)

    with _images._pil_warnings_silenced():
        try:
            with _images._pil_errors(name, "cannot open image"):
                img = _images._identify(f, before_open)
        except _images.ImageError as e:
            raise ImageInputError(400, str(e)) from None
        if img is None:
            raise ImageInputError(415, f"{name}: not an image file molmoe can read")
        with img:
            if img.format in _images._EXTERNAL_DECODER_FORMATS | _images._UNSIZED_FORMATS:
                raise ImageInputError(415, f"{name}: {img.format} images are not accepted; "
                                           "send PNG, JPEG, WebP or GIF")
            check_header(img.size, img.mode, _images._decoder_bytes_per_pixel(img), name,
                         max_pixels, budget)
            try:
                # ICNS's embedded header, the decode, the re-check of the size, conversion.
                return _images._from_pil(img, name, max_pixels, budget, "molmoe", fast_decode)
            except _images.ImageError as e:
                raise ImageInputError(_STATUS.get(e.kind, 400), str(e)) from None


# ----------------------------------------------------------------------------- data: URLs


def _read_data_url(url: str, policy: ImagePolicy) -> tuple[bytes, str]:
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise ImageInputError(400, "data: URL without a ',' before the data")
    params = [p.strip() for p in m.group("meta").split(";")]
    media = params[0].lower() or "text/plain"
    if not params[1:] or params[-1].lower() != "base64":
        raise ImageInputError(400, "data: URL is not base64 (expected "
                                   "data:image/png;base64,...)")
    if not media.startswith("image/") or len(media) == len("image/"):
        raise ImageInputError(415, f"data: URL of media type {media!r}, not an image "
                                   "(expected image/png, image/jpeg, ...)")
    text = m.group("data")
    # The size from the length of the text, before decoding anything (4 chars -> 3 bytes).
    pad = len(text) - len(text.rstrip("="))
    size = len(text) // 4 * 3 - min(pad, 2)
    desc = f"data: URL ({media}, {max(size, 0):,} bytes)"
    if size > policy.max_bytes:
        raise ImageInputError(413, f"{desc}: over the limit of {policy.max_bytes:,} bytes")
    if not text:
        raise ImageInputError(400, "data: URL with no data")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(400, f"{desc}: invalid base64 (only A-Z a-z 0-9 + / and '=' "
                                   "padding, length a multiple of 4, no spaces)") from None
    return data, desc


# ----------------------------------------------------------------------------- local files


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageInputError(400, f"file: URL with a host ({parts.netloc!r}); expected "
                                   "file:///path")
    if parts.query or parts.fragment:
        raise ImageInputError(400, "file: URL with a query or fragment")
    path = urllib.parse.unquote(parts.path)
    if "\x00" in path:
        raise ImageInputError(400, "file: URL with a NUL character")
    return path


def _read_local(path_text: str, policy: ImagePolicy) -> tuple[bytes, str]:
    if policy.local_dir is None:
        raise ImageInputError(403, "image_url: local files are not allowed by this server "
                                   "(start it with --allow-local-files DIR); send a data: URL")
    root = policy.local_dir
    path = pathlib.Path(path_text)
    desc = f"local file {path_text[:200]!r}"
    # Relative paths are relative to the directory. realpath resolves every symlink and '..'.
    resolved = pathlib.Path(os.path.realpath(root / path))
    if resolved != root and root not in resolved.parents:
        raise ImageInputError(403, f"{desc}: outside the directory of allowed images")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(resolved, flags)
    except FileNotFoundError:
        raise ImageInputError(400, f"{desc}: no such file") from None
    except OSError as e:
        raise ImageInputError(400, f"{desc}: cannot open ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageInputError(400, f"{desc}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        # The file opened must be the one checked: a path component swapped for a symlink
        # between realpath and open would show here.
        if _opened_path(fd) not in (None, str(resolved)):
            raise ImageInputError(403, f"{desc}: changed while being opened")
        if st.st_size > policy.max_bytes:
            raise ImageInputError(413, f"{desc}: {st.st_size:,} bytes, over the limit of "
                                       f"{policy.max_bytes:,}")
        data = f.read(policy.max_bytes + 1)
    if len(data) > policy.max_bytes:   # it grew since the fstat
        raise ImageInputError(413, f"{desc}: over the limit of {policy.max_bytes:,} bytes")
    return data, desc


def _opened_path(fd: int) -> str | None:
    """The path the kernel gives an open file (Linux /proc), or None where it cannot say."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


# ----------------------------------------------------------------------------- remote images


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a client may not make the server connect to `ip` (None: a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "a scoped (link-local) address"
        embedded = ip.ipv4_mapped or (ip.sixtofour if ip.sixtofour is not None else None)
        if embedded is None and any(ip in n for n in _NAT64):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is not None:
            why = _refusal(embedded)
            if why:
                return f"{why} (as {ip})"
    for attr, why in (("is_unspecified", "an unspecified address"),
                      ("is_loopback", "a loopback address"),
                      ("is_link_local", "a link-local address"),
                      ("is_multicast", "a multicast address"),
                      ("is_reserved", "a reserved address"),
                      ("is_private", "a private address"),
                      ("is_site_local", "a site-local address")):
        if getattr(ip, attr, False):
            return why
    if not ip.is_global:
        return "not a public address"
    return None


def _check_ip(ip_text: str, host: str, policy: ImagePolicy) -> str:
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        raise ImageInputError(502, f"{host}: resolved to {ip_text!r}, not an IP address") from None
    if any(ip.version == n.version and ip in n for n in policy._networks):
        return str(ip)
    why = _refusal(ip)
    if why:
        raise ImageInputError(403, f"{host} resolves to {ip}, {why}: the server does not fetch "
                                   "images from private networks")
    return str(ip)


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.error(what)
        return left

    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def error(self, what: str) -> ImageInputError:
        return ImageInputError(504, f"{what}: timed out (the whole fetch may take "
                                    f"{self.seconds:g} s)")


def _resolve(host: str, port: int, policy: ImagePolicy, deadline: _Deadline) -> list[str]:
    """The host's addresses, within the deadline (getaddrinfo has no timeout of its own: it runs
    in a daemon thread that is abandoned if it overruns)."""
    try:
        return [str(ipaddress.ip_address(host))]   # an address literal: nothing to look up
    except ValueError:
        pass
    if policy.resolver is not None:
        return list(policy.resolver(host, port))
    result: list = []

    def lookup():
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as e:
            result.append(e)

    t = threading.Thread(target=lookup, name="molmoe-image-dns", daemon=True)
    t.start()
    t.join(deadline.left(f"resolving {host}"))
    if not result:
        raise deadline.error(f"resolving {host}")
    if isinstance(result[0], BaseException):
        raise ImageInputError(502, f"cannot resolve {host} ({result[0]})")
    return [info[4][0] for info in result[0]]


def _connect(ip: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to the address literal `ip` (never a name: no DNS lookup here)."""
    ipaddress.ip_address(ip)
    sock = socket.create_connection((ip, port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address `ip`; the Host header names `host` (http.client's)."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.pinned_ip = ip
        self.raw_sock: socket.socket | None = None

    def connect(self):
        self.raw_sock = self.sock = _connect(self.pinned_ip, self.port, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the checked address `ip`, with SNI and certificate check for the name `host`."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=_ssl_context())
        self.pinned_ip = ip
        self.raw_sock: socket.socket | None = None

    def connect(self):
        self.raw_sock = sock = _connect(self.pinned_ip, self.port, self.timeout)
        try:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _ssl_context() -> ssl.SSLContext:
    """The system's trust store, hostname checked (tests replace this to trust a test CA)."""
    return ssl.create_default_context()


def _describe_url(url: str) -> str:
    """scheme://host[:port]/path for messages: no credentials, no query, at most 160 chars."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{p.port}" if p.port else ""
    except ValueError:
        port = ""
    s = f"{p.scheme}://{host}{port}{p.path}"
    return s if len(s) <= 160 else s[:157] + "..."


def _read_remote(url: str, policy: ImagePolicy) -> tuple[bytes, str]:
    if not policy.allow_remote:
        raise ImageInputError(403, "image_url: remote images are not allowed by this server "
                                   "(start it with --allow-remote-images); send a data: URL")
    deadline = _Deadline(float(policy.fetch_timeout_s))
    first = _describe_url(url)
    for hop in range(policy.max_redirects + 1):
        status, location, data = _fetch_once(url, policy, deadline)
        if status == 200:
            desc = first if hop == 0 else f"{first} (redirected to {_describe_url(url)})"
            return data, desc
        if status in _REDIRECTS and location:
            url = urllib.parse.urljoin(url, location)
            if len(url) > MAX_URL_CHARS:
                raise ImageInputError(502, f"{first}: redirected to a URL over "
                                           f"{MAX_URL_CHARS:,} characters")
            if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
                raise ImageInputError(403, f"{first}: redirected to a "
                                           f"{urllib.parse.urlsplit(url).scheme or 'relative'}:"
                                           " URL; only http and https are followed")
            continue
        raise ImageInputError(502, f"{_describe_url(url)}: the image server answered "
                                   f"{status} {data.decode('latin-1')}".rstrip())
    raise ImageInputError(502, f"{first}: more than {policy.max_redirects} redirects")


def _fetch_once(url: str, policy: ImagePolicy, deadline: _Deadline) -> tuple[int, str, bytes]:
    """One GET: (200, "", body) or (redirect status, Location, b"") or (other status, "",
    reason). Raises ImageInputError for refusals, failures and the deadline."""
    desc = _describe_url(url)
    try:
        p = urllib.parse.urlsplit(url)
        port = p.port or (443 if p.scheme.lower() == "https" else 80)
        host = p.hostname
    except ValueError as e:
        raise ImageInputError(400, f"{desc}: bad URL ({e})") from None
    if not host:
        raise ImageInputError(400, f"{desc}: URL without a host")
    if p.username is not None or p.password is not None:
        raise ImageInputError(400, f"{desc}: credentials in image URLs are not sent")
    if "%" in host:
        raise ImageInputError(400, f"{desc}: scoped IPv6 addresses are not fetched")
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise ImageInputError(400, f"{desc}: bad host name") from None
    addresses = _resolve(ascii_host, port, policy, deadline)
    if not addresses:
        raise ImageInputError(502, f"{desc}: {host} has no address")
    checked = [_check_ip(a, host, policy) for a in addresses]   # ALL must pass
    target = p.path or "/"
    if p.query:
        target += "?" + p.query
    cls = _PinnedHTTPS if p.scheme.lower() == "https" else _PinnedHTTP
    last_error: Exception | None = None
    for ip in dict.fromkeys(checked):   # each checked address in order, until one connects
        conn = cls(ascii_host, port, ip, deadline.left(desc))
        # A hard stop at the deadline: per-operation timeouts alone would let a server that
        # drips a byte a second (TLS handshake, headers or body) hold the fetch forever.
        timer = threading.Timer(deadline.left(desc), _abort, (conn,))
        timer.daemon = True
        timer.start()
        try:
            try:
                conn.connect()
            except OSError as e:
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise ImageInputError(502, f"{desc}: TLS certificate refused "
                                               f"({e.verify_message})") from None
                if deadline.passed():
                    raise deadline.error(desc) from None
                last_error = e
                continue
            return _exchange(conn, conn.sock, target, policy, deadline, desc)
        except (OSError, http.client.HTTPException) as e:
            if deadline.passed() or isinstance(e, TimeoutError):
                raise deadline.error(desc) from None
            raise ImageInputError(502, f"{desc}: fetch failed ({type(e).__name__}: "
                                       f"{e})") from None
        finally:
            timer.cancel()
            conn.close()
    if deadline.passed() or isinstance(last_error, TimeoutError):
        raise deadline.error(desc)
    raise ImageInputError(502, f"{desc}: cannot connect to {host} ({last_error})")


def _abort(conn: _PinnedHTTP | _PinnedHTTPS) -> None:
    """Cut the connection's TCP socket (held by the connection from its creation: http.client
    drops conn.sock once a response says the connection closes); blocked reads return."""
    sock = conn.raw_sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _exchange(conn, sock: socket.socket, target: str, policy: ImagePolicy, deadline: _Deadline,
              desc: str) -> tuple[int, str, bytes]:
    sock.settimeout(deadline.left(desc))
    conn.putrequest("GET", target, skip_accept_encoding=True)
    conn.putheader("Accept", "image/*")
    conn.putheader("Accept-Encoding", "identity")
    conn.putheader("User-Agent", _USER_AGENT)
    conn.putheader("Connection", "close")
    conn.endheaders()
    resp = conn.getresponse()
    if resp.status in _REDIRECTS:
        return resp.status, resp.getheader("Location", "") or "", b""
    if resp.status != 200:
        return resp.status, "", (resp.reason or "").encode("latin-1", "replace")[:200]
    kind = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if kind.startswith("text/") or kind in ("application/json", "application/xhtml+xml"):
        raise ImageInputError(415, f"{desc}: the server sent {kind}, not an image")
    length = (resp.getheader("Content-Length") or "").strip()
    declared = int(length) if length.isascii() and length.isdigit() else None
    if declared is not None and declared > policy.max_bytes:
        raise ImageInputError(413, f"{desc}: {declared:,} bytes (Content-Length), over the "
                                   f"limit of {policy.max_bytes:,}")
    # The cap holds whatever Content-Length said: never more than max_bytes + 1 is read.
    body = bytearray()
    while not resp.isclosed():
        sock.settimeout(deadline.left(desc))
        piece = resp.read(min(_CHUNK, policy.max_bytes + 1 - len(body)))
        if not piece:
            break
        body += piece
        if len(body) > policy.max_bytes:
            raise ImageInputError(413, f"{desc}: more than {policy.max_bytes:,} bytes, over "
                                       "the limit")
    if deadline.passed():   # the body may have ended because the deadline cut the connection
        raise deadline.error(desc)
    if declared is not None and len(body) < declared:
        raise ImageInputError(502, f"{desc}: the connection closed after {len(body):,} of the "
                                   f"{declared:,} bytes announced")
    return 200, "", bytes(body)
