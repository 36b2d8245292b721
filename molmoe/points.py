"""Pointing and counting answers (spec §6): parse, format, convert to pixels, draw.

Molmo answers "point to ..." and "how many ..." questions in plain text:

    <point x="61.5" y="40.6" alt="dog">dog</point>
    <points x1="10.2" y1="30.0" x2="55.0" y2="31.4" alt="dogs">dogs</points>
    Counting the <points ...>dogs</points> shows a total of 2.
    There are none.

Coordinates are percentages (0-100) of the ORIGINAL image's width and height. The parser reads
model output, which can be malformed or cut off by the token budget: it never raises on any str and
returns whatever it could read. Coordinates are read with the eval code's pattern and points with
a coordinate above 100 are dropped, as the eval code drops them.
"""
from __future__ import annotations

import functools
import io
import os
import re
import secrets
from dataclasses import dataclass

from molmoe.errors import MolmoeError, UsageError

# The eval code's point pattern (TR:olmo/util.py extract_points), numbering optional.
_COORD = re.compile(r'x\d*="\s*([0-9]+(?:\.[0-9]+)?)"\s+y\d*="\s*([0-9]+(?:\.[0-9]+)?)"')
_TAG = re.compile(r"<(points?)\b", re.IGNORECASE)
_CLOSE = re.compile(r"</points?\s*>", re.IGNORECASE)
_ALT = re.compile(r'alt="([^"]*)("?)', re.IGNORECASE)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_TOTAL = re.compile(r"\btotal of\s+([0-9]+|" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_NONE = re.compile(r"\bthere are none\b", re.IGNORECASE)


@dataclass(frozen=True)
class PointGroup:
    """One `<point>`/`<points>` tag (or bare coordinates found outside any tag)."""
    points: tuple[tuple[float, float], ...]  # (x %, y %) in the order written
    alt: str | None = None  # the alt attribute (None when missing or unreadable)
    text: str | None = None  # the text between the tags
    complete: bool = True  # False when the tag was cut off or malformed

    @property
    def label(self) -> str | None:
        return self.alt if self.alt else self.text

    def pixels(self, size: tuple[int, int]) -> list[tuple[float, float]]:
        return to_pixels(self.points, size)


@dataclass(frozen=True)
class PointingAnswer:
    groups: tuple[PointGroup, ...]
    count: int | None  # the stated count ("... a total of N.", "There are none." -> 0)

    @property
    def points(self) -> list[tuple[float, float]]:
        return [p for g in self.groups for p in g.points]


# ----------------------------------------------------------------------------- parsing


def _float(s: str) -> float | None:
    try:
        return float(s)
    except (ValueError, OverflowError):
        return None


def _coords(s: str) -> tuple[tuple[float, float], ...]:
    out = []
    for m in _COORD.finditer(s):
        x, y = _float(m.group(1)), _float(m.group(2))
        # The eval code discards a point with a coordinate beyond 100 (the regex admits no sign).
        if x is not None and y is not None and 0.0 <= x <= 100.0 and 0.0 <= y <= 100.0:
            out.append((x, y))
    return tuple(out)


def _count(text: str) -> int | None:
    totals = _TOTAL.findall(text)
    if totals:
        word = totals[-1].lower()
        if word in _NUMBER_WORDS:
            return _NUMBER_WORDS[word]
        try:
            return int(word)
        except ValueError:  # more digits than Python converts: not a count we can state
            return None
    return 0 if _NONE.search(text) else None


def parse_points(text: str) -> PointingAnswer:
    """Every point group and the stated count in a model answer. Never raises on a str."""
    if not isinstance(text, str):
        raise TypeError(f"parse_points expects a str, got {type(text).__name__}")
    groups: list[PointGroup] = []
    covered: list[tuple[int, int]] = []
    pos = 0
    while (m := _TAG.search(text, pos)) is not None:
        start, head = m.start(), m.end()
        # The attributes run to the tag's '>' (or, when cut off, to the next '<' or the end).
        stop = len(text)
        for ch in "<>":
            i = text.find(ch, head)
            if i != -1:
                stop = min(stop, i)
        attrs = text[head:stop]
        complete = stop < len(text) and text[stop] == ">"
        body, end = None, stop
        if complete:
            close = _CLOSE.search(text, stop + 1)
            nxt = text.find("<", stop + 1)
            if close is not None and (nxt == -1 or close.start() == nxt):
                body, end = text[stop + 1: close.start()], close.end()
            else:  # no closing tag: the text runs to the next tag or the end
                body = text[stop + 1: nxt if nxt != -1 else len(text)]
                end = stop + 1 + len(body)
                complete = False
        alt_m = _ALT.search(attrs)
        alt = alt_m.group(1) if alt_m else None
        if alt_m and not alt_m.group(2):
            complete = False
        points = _coords(attrs)
        if points or alt or body:
            groups.append(PointGroup(points, alt or None, body or None, complete))
        covered.append((start, end))
        pos = max(end, head)
    # Bare coordinates outside any tag still count, as the eval code reads the whole text.
    rest, last = [], 0
    for a, b in covered:
        rest.append(text[last:a])
        last = b
    rest.append(text[last:])
    bare = _coords("\n".join(rest))
    if bare:
        groups.append(PointGroup(bare, None, None, complete=False))
    return PointingAnswer(tuple(groups), _count(text))


# ----------------------------------------------------------------------------- formatting


def _check_label(name: str, s: str) -> None:
    if any(c in s for c in '"<>'):
        raise UsageError(f"{name} {s!r} contains a character the point format cannot hold "
                         f"('\"', '<' or '>')")


def format_points(points, label: str, alt: str | None = None) -> str:
    """Points (x %, y %) as the official data formatter writes them: one decimal, sorted by x
    then y, `<point>` for one point, `<points x1 y1 x2 y2 ...>` for several."""
    alt = label if alt is None else alt
    _check_label("label", label)
    _check_label("alt", alt)
    pts = [(float(f"{x:.1f}"), float(f"{y:.1f}")) for x, y in points]
    if not pts:
        raise UsageError("format_points needs at least one point (zero objects: format_count)")
    bad = [p for p in pts if not (0.0 <= p[0] <= 100.0 and 0.0 <= p[1] <= 100.0)]
    if bad:
        raise UsageError(f"point coordinates must be percentages in [0, 100], got {bad[0]}")
    pts.sort(key=lambda p: p[0] * 10000 + p[1])
    if len(pts) == 1:
        x, y = pts[0]
        return f'<point x="{x:.1f}" y="{y:.1f}" alt="{alt}">{label}</point>'
    coords = " ".join(f'x{k}="{x:.1f}" y{k}="{y:.1f}"' for k, (x, y) in enumerate(pts, 1))
    return f'<points {coords} alt="{alt}">{label}</points>'


def format_count(points, label: str) -> str:
    """A counting answer in the `point_count` style."""
    if len(points) == 0:
        return "There are none."
    return f"Counting the {format_points(points, label)} shows a total of {len(points)}."


# ----------------------------------------------------------------------------- pixels, drawing


def to_pixels(points, size: tuple[int, int]) -> list[tuple[float, float]]:
    """Percentages -> pixel coordinates of the original image of size (W, H)."""
    W, H = size
    return [(x / 100.0 * W, y / 100.0 * H) for x, y in points]


def draw_points(image, groups, *, radius: int | None = None):
    """A copy of `image` (PIL) with every point marked and its group's label written beside it.

    Markers are a filled magenta disc inside a black and a white ring, visible on any background.
    """
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    W, H = out.size
    r = radius or max(4, round(min(W, H) / 60))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for group in groups:
        pix = to_pixels(group.points, (W, H))
        for px, py in pix:
            draw.ellipse([px - r - 2, py - r - 2, px + r + 2, py + r + 2], fill=(255, 255, 255))
            draw.ellipse([px - r - 1, py - r - 1, px + r + 1, py + r + 1], fill=(0, 0, 0))
            draw.ellipse([px - r, py - r, px + r, py + r], fill=(255, 0, 200))
        if group.label and pix:
            px, py = pix[0]
            at = (px + r + 4, py - r - 4)
            box = draw.textbbox(at, group.label, font=font)
            draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(0, 0, 0))
            draw.text(at, group.label, fill=(255, 255, 255), font=font)
    return out


# ----------------------------------------------------------------------------- writing the image


# Icon formats: PIL's writers shrink the picture to an icon size (ICO: at most 256 x 256)
# without a word, so the points would be drawn on something else than the user asked for.
_RESIZING_FORMATS = frozenset({"ICO", "ICNS"})
# The largest side a format can store, where that is below what the pixel limit admits (a
# 100000 x 1000 image passes it): WebP's 14-bit sizes, the 16-bit sizes of JPEG, GIF, PCX and
# TGA. PIL fails on these only when saving, after the whole generation.
_MAX_SIDE = {"WEBP": 16383, "JPEG": 65535, "GIF": 65535, "PCX": 65535, "TGA": 65535}


@functools.lru_cache(maxsize=None)
def _save_formats() -> dict[str, str]:
    """{".jpg": "JPEG", ...}: the extensions whose PIL format really writes an RGB picture.

    PIL registers writers that cannot hold one (BLP, XBM, MSP: other modes only; GRIB, BUFR,
    HDF5, WMF: stubs that need a handler), and those would fail only after generation: each
    format is tried once on a small RGB image, in memory.
    """
    from PIL import Image

    Image.init()  # registers every plugin, not only the few imported on demand
    probe = Image.new("RGB", (16, 16), (200, 30, 30))

    def writes_rgb(fmt: str) -> bool:
        try:
            probe.save(io.BytesIO(), format=fmt)
            return True
        except Exception:  # noqa: BLE001 -- whatever a plugin raises, it cannot write this
            return False

    writable = {fmt: writes_rgb(fmt) and fmt not in _RESIZING_FORMATS for fmt in set(Image.SAVE)}
    return {ext: fmt for ext, fmt in Image.registered_extensions().items()
            if writable.get(fmt, False)}


def _same_file(a: str, b: str) -> bool:
    """True when a and b name one file: the same resolved path (symbolic links followed), or
    the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def check_image_output(path, *, inputs=(), size: tuple[int, int] | None = None,
                       name: str = "output") -> str:
    """Check, before any slow work, that an image can be written to `path` without touching
    `inputs`, and return the PIL format its extension names ("PNG", "JPEG", ...).

    Refused (UsageError naming `name` and the path): an empty path, one of the input files
    (also through a symbolic or hard link), an extension PIL cannot write, a directory or other
    non-regular file at the path, a parent that is missing, not a directory or where no file
    can be created (tried for real, with a temporary file that is removed again), and an image
    `size` (W, H) with a side larger than the format stores.
    """
    path = os.fspath(path)
    if not path:
        raise UsageError(f"{name}: empty path")
    for source in inputs:
        if source is not None and _same_file(path, os.fspath(source)):
            raise UsageError(f"{name} {path} is the input image {source}; refusing to "
                             f"overwrite it (choose another file name)")
    ext = os.path.splitext(path)[1].lower()
    formats = _save_formats()
    if ext not in formats:
        some = ", ".join(e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff")
                         if e in formats)
        raise UsageError(f"{name} {path}: unknown image extension {ext or '(none)'!r}; "
                         f"use one of {some}")
    limit = _MAX_SIDE.get(formats[ext])
    if size is not None and limit is not None and max(size) > limit:
        raise UsageError(f"{name} {path}: {formats[ext]} stores at most {limit} pixels per side, "
                         f"the image is {size[0]}x{size[1]}; use .png")
    real = os.path.realpath(path)  # a symbolic link is kept; the file it names is replaced
    if os.path.isdir(real):
        raise UsageError(f"{name} {path} is a directory")
    if os.path.exists(real) and not os.path.isfile(real):
        raise UsageError(f"{name} {path} exists and is not a regular file")
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise UsageError(f"{name} {path}: the directory {parent} {what}")
    probe = _temp_name(real)  # really create a file: access() says yes to root on /proc too
    try:
        open(probe, "xb").close()
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{name} {path}: cannot write in {parent} ({e.strerror or e})") from None
    return formats[ext]


def _temp_name(real: str) -> str:
    """A fresh hidden name beside `real`, for writing before the atomic rename."""
    return os.path.join(os.path.dirname(real),
                        f".{os.path.basename(real)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def save_image(image, path, fmt: str, *, name: str = "output") -> None:
    """Write `image` (PIL) to `path` in format `fmt`, atomically: the bytes go to a temporary
    file in the same directory that then replaces `path`, so a failed save leaves the old file
    (or none), never half an image. The new file's mode follows the umask, as a plain open()."""
    path = os.fspath(path)
    real = os.path.realpath(path)
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")  # JPEG holds no alpha or palette
    tmp = _temp_name(real)
    try:
        with open(tmp, "xb") as f:
            image.save(f, format=fmt)
        os.replace(tmp, real)
    except (OSError, ValueError) as e:  # PIL's encoders raise both for what they cannot hold
        raise UsageError(f"{name} {path}: cannot write it ({getattr(e, 'strerror', None) or e})"
                         ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- strict checking


class PointsFormatError(MolmoeError):
    """Text whose pointing or counting markup does not follow the grammar of spec §6; the
    message quotes the offending fragment."""


# The grammar of spec §6, read strictly (training data, not model output): NUM has exactly one
# decimal and no leading zero; attributes are separated by single spaces; ALT and TEXT are
# non-empty and hold no '"', '<' or '>'.
_STRICT_NUM = re.compile(r"(?:0|[1-9][0-9]*)\.[0-9]")
_STRICT_TAG = re.compile(r'<(points?)((?: [^\s=<>"]+="[^"<>]*")*)>([^<>]*)</(points?)>')
_STRICT_ATTR = re.compile(r' ([^\s=<>"]+)="([^"<>]*)"')
# What opens the check: any opening or closing tag, in any case ("<Point", "</points").
_ANY_TAG = re.compile(r"</?points?\b", re.IGNORECASE)
_COUNT_START = "Counting the <"
_COUNT_TAIL = re.compile(r" shows a total of ([0-9]+)\.")


def _fragment(text: str, start: int, end: int | None = None, limit: int = 120) -> str:
    """text[start:end] (end: through the next '>'), shortened to `limit` characters, quoted."""
    if end is None:
        close = text.find(">", start)
        end = len(text) if close == -1 else close + 1
    frag = text[start:end]
    return repr(frag if len(frag) <= limit else frag[:limit] + "...")


def _strict_tag(text: str, start: int) -> tuple[re.Match, int]:
    """The `<point>` / `<points>` tag at `start` and its number of points, or PointsFormatError."""
    m = _STRICT_TAG.match(text, start)
    if m is None:
        raise PointsFormatError(f"malformed or unclosed point tag {_fragment(text, start)}")
    name, attrs, body, closing = m.groups()
    where = _fragment(text, start, m.end())
    if closing != name:
        raise PointsFormatError(f"<{name}> closed by </{closing}> in {where}")
    pairs = _STRICT_ATTR.findall(attrs)
    names = [k for k, _ in pairs]
    n = (len(pairs) - 1) // 2
    if name == "point":
        expected = ["x", "y", "alt"]
    else:
        expected = [f"{axis}{k}" for k in range(1, n + 1) for axis in "xy"] + ["alt"]
    if names != expected:
        raise PointsFormatError(f"<{name}> needs the attributes {' '.join(expected)} in this "
                                f"order, got {' '.join(names) or 'none'} in {where}")
    if name == "points" and n < 2:
        raise PointsFormatError(f"<points> needs at least 2 points (one point is written "
                                f"<point x=.. y=..>), got {n} in {where}")
    for key, value in pairs[:-1]:
        if not _STRICT_NUM.fullmatch(value):
            raise PointsFormatError(f'{key}="{value}" is not a percentage with exactly one '
                                    f'decimal (e.g. "5.0", "61.5") in {where}')
        if float(value) > 100.0:
            raise PointsFormatError(f'{key}="{value}" is above 100 (coordinates are percentages '
                                    f"of the image) in {where}")
    if not pairs[-1][1].strip():
        raise PointsFormatError(f"empty alt in {where}")
    if not body.strip():
        raise PointsFormatError(f"empty text between the tags in {where}")
    return m, max(n, 1)


def check_points(text: str) -> None:
    """Raise PointsFormatError unless every point tag in `text` follows spec §6 strictly.

    For training answers (parse_points, for model output, never raises). Checked: each
    `<point ...>` / `<points ...>` / closing tag (in any letter case) is a whole POINT or POINTS
    production: coordinates 0..100 with exactly one decimal, `<points>` numbered x1 y1 x2 y2 ...
    with at least two points, non-empty alt and text, the tag closed by its own name. Tags may
    stand inside prose (PixMo's point explanations). Each "Counting the <" starts a whole COUNT
    production whose stated total equals the tag's number of points. "There are none." and text
    without tags pass.
    """
    counted = {}  # tag start -> number of points
    pos = 0
    for m in _ANY_TAG.finditer(text):
        if m.start() < pos:  # the closing tag of a tag already checked
            continue
        tag, n = _strict_tag(text, m.start())
        counted[m.start()] = (tag.end(), n)
        pos = tag.end()
    start = text.find(_COUNT_START)
    while start != -1:
        tag_at = start + len(_COUNT_START) - 1
        if tag_at not in counted:  # "Counting the <b>...": some other tag
            raise PointsFormatError(f"'Counting the' must be followed by a point tag: "
                                    f"{_fragment(text, start)}")
        end, n = counted[tag_at]
        tail = _COUNT_TAIL.match(text, end)
        if tail is None:
            raise PointsFormatError(f"a count must read 'Counting the <tag> shows a total of N.'"
                                    f": {_fragment(text, start, min(len(text), end + 40))}")
        if int(tail.group(1)) != n:
            raise PointsFormatError(f"the count says {tail.group(1)} but its tag holds {n} "
                                    f"point{'s' if n != 1 else ''}: "
                                    f"{_fragment(text, start, tail.end(), limit=200)}")
        start = text.find(_COUNT_START, tail.end())
