"""Synthetic pointing and counting data: coloured shapes on plain, gradient or noisy backgrounds,
asked about in Molmo's phrasing and answered in Molmo's grammar (spec §6). docs/synthetic.md.

    rng = random.Random(0)
    sample = make_sample(rng)               # a planned scene + question + answer + target
    render(sample.scene).save("a.png")
    write_dataset("out", n=1000, seed=0)     # out/train.jsonl (the `molmoe train` format),
                                             # out/scenes.jsonl (geometry), out/images/...

Everything is a pure function of the seed: example i of a dataset comes from its own
`random.Random("molmoe-synth:{seed}:{i}")` (noise from a numpy Generator seeded by it), and the
pixels are computed with integer arithmetic only, so one seed gives the same bytes on any machine
with the same Pillow (PNG/JPEG encoders) — no global RNG, no SIMD-dependent float maths.

Geometry. An object's `size` is the diameter of its circumscribed circle; it lies wholly inside
the image. Pixel (x, y) covers [x, x+1) x [y, y+1). An object's coverage is computed at 4x4
supersampling (16 sub-pixel samples); a pixel belongs to the object's mask when at least half of
its samples fall inside. Objects are drawn back to front in list order; `Scene.labels[y, x]` is
1 + the index of the object visible at that pixel (0: background), so `labels == i + 1` is object
i's VISIBLE mask, after occlusion. Placement keeps every object at least 60% visible and keeps
a disc around its centre (the point we annotate) unoccluded.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from molmoe.errors import UsageError
from molmoe.points import format_count, format_points

SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
BACKGROUNDS = ("plain", "gradient", "noisy")

MIN_OBJECTS, MAX_OBJECTS = 1, 6
SIZE_RANGE = (0.08, 0.30)  # circumscribed diameter, fraction of the shorter side
MIN_VISIBLE = 0.60  # of an object's own mask area, after everything drawn over it
MIN_SIDE = 128  # below it the smallest objects are a few pixels wide
SIDE_RANGE = (160, 1024)  # the range: any side in it, aspect 1:2 .. 2:1
TRAIN_SIDES = (160, 448)  # recommended for training a small-crop model (docs/synthetic.md)
MAX_ASPECT = 2.0
JPEG_QUALITY = (60, 95)  # uniform; 60 is the robustness check's quality
MIN_CONTRAST = 110.0  # Euclidean RGB distance of any background colour to any object colour
NOISE_AMPLITUDE = (6, 16)  # uniform integer noise in [-a, a] per channel (noisy backgrounds)
SUPERSAMPLE = 4
STAR_INNER = 0.5  # inner vertex radius / outer radius (the star's inradius is this x R)

# Question mix (fractions of examples) and the distractors planted in single/absent questions.
QUESTION_MIX = {"single": 0.40, "multi": 0.20, "count": 0.25, "absent": 0.15}
P_SAME_SHAPE = 0.7  # plant 1-2 objects of the target's shape in other colours
P_SAME_COLOUR = 0.7  # plant 1-2 objects of the target's colour in other shapes



@dataclass
class Knobs:
    """Generator settings for one stage of a training curriculum; the defaults are the issue's
    generator (the same scenes, byte for byte, as passing no knobs). `Knobs.parse` reads the
    command-line form, e.g. "objects=1-3,same_shape=1,same_colour=0,distinct_colours=1,
    backgrounds=plain,mix=single:1"."""
    mix: dict | None = None  # question kind -> share (None: QUESTION_MIX)
    objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)  # objects per scene, inclusive
    p_same_shape: float | None = None  # None: P_SAME_SHAPE (single/absent distractors)
    p_same_colour: float | None = None  # None: P_SAME_COLOUR
    distinct_colours: bool = False  # no two objects share a colour: the colour alone names one
    backgrounds: tuple[str, ...] = BACKGROUNDS  # also "white" (plain white), for a first stage
    size: tuple[float, float] = SIZE_RANGE  # object diameter, fraction of the shorter side
    sides: tuple[int, int] | None = None  # image sides (None: the caller's `sides`)
    shapes: tuple[str, ...] = SHAPES  # the shapes and colours drawn from
    colours: tuple[str, ...] = tuple(COLOURS)
    # A training aid (bench/RESULTS.md, Issue 13, session 3): each colour's objects are centred
    # near a fixed spot of the picture (COLOUR_ANCHORS), jittered by up to this fraction of the
    # shorter side, so the colour word alone tells where to point. None: placed anywhere.
    anchor: float | None = None
    # What the anchor is keyed by: "colour" (COLOUR_ANCHORS) or "shape" (SHAPE_ANCHORS; with
    # same-colour distractors the shape word alone tells where to point).
    anchor_by: str = "colour"

    def __post_init__(self):
        lo, hi = self.objects
        if not (MIN_OBJECTS <= lo <= hi <= MAX_OBJECTS):
            raise UsageError(f"objects {self.objects}: expected {MIN_OBJECTS} <= min <= max <= "
                             f"{MAX_OBJECTS}")
        if self.mix is not None:
            bad = [k for k in self.mix if k not in QUESTION_MIX]
            if bad or not self.mix or any(v < 0 for v in self.mix.values()) \
                    or sum(self.mix.values()) <= 0:
                raise UsageError(f"mix {self.mix}: expected shares >= 0 of "
                                 f"{', '.join(QUESTION_MIX)}")
        for name in ("p_same_shape", "p_same_colour"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                raise UsageError(f"{name} must be in [0, 1], got {v!r}")
        if not self.backgrounds or any(b not in BACKGROUNDS + ("white",)
                                       for b in self.backgrounds):
            raise UsageError(f"backgrounds {self.backgrounds}: expected some of "
                             f"{', '.join(BACKGROUNDS)}, white")
        self.backgrounds = tuple(self.backgrounds)
        if not 0.02 <= self.size[0] <= self.size[1] <= 0.5:
            raise UsageError(f"size {self.size}: expected 2% <= min <= max <= 50% of the side")
        self.size = (float(self.size[0]), float(self.size[1]))
        if not self.shapes or any(x not in SHAPES for x in self.shapes):
            raise UsageError(f"shapes {self.shapes}: expected some of {', '.join(SHAPES)}")
        if not self.colours or any(x not in COLOURS for x in self.colours):
            raise UsageError(f"colours {self.colours}: expected some of {', '.join(COLOURS)}")
        self.shapes, self.colours = tuple(self.shapes), tuple(self.colours)
        if self.anchor is not None and not 0 <= self.anchor <= 0.5:
            raise UsageError(f"anchor {self.anchor}: expected a jitter in [0, 0.5] of the side")
        if self.anchor_by not in ("colour", "shape"):
            raise UsageError(f"anchor_by {self.anchor_by!r}: expected colour or shape")
        if self.sides is not None and not MIN_SIDE <= self.sides[0] <= self.sides[1]:
            raise UsageError(f"sides {self.sides}: expected {MIN_SIDE} <= min <= max")
        self.objects = (int(lo), int(hi))

    @property
    def question_mix(self) -> dict:
        return dict(self.mix) if self.mix is not None else dict(QUESTION_MIX)

    @classmethod
    def parse(cls, spec: str) -> "Knobs":
        kw: dict = {}
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                continue
            key, _, value = item.partition("=")
            if key == "objects":
                lo, _, hi = value.partition("-")
                kw["objects"] = (int(lo), int(hi or lo))
            elif key in ("same_shape", "same_colour"):
                kw[f"p_{key}"] = float(value)
            elif key == "distinct_colours":
                kw[key] = value.lower() in ("1", "true", "yes")
            elif key in ("backgrounds", "shapes", "colours"):
                kw[key] = tuple(value.split("+"))
            elif key == "size":  # percent of the shorter side
                lo, _, hi = value.partition("-")
                kw[key] = (float(lo) / 100, float(hi or lo) / 100)
            elif key == "sides":
                lo, _, hi = value.partition("-")
                kw[key] = (int(lo), int(hi or lo))
            elif key == "anchor":
                kw[key] = float(value)
            elif key == "anchor_by":
                kw[key] = value
            elif key == "mix":
                kw[key] = {k: float(v) for k, v in (kv.split(":") for kv in value.split("+"))}
            else:
                raise UsageError(f"unknown generator knob {key!r} in {spec!r}; expected objects, "
                                 "same_shape, same_colour, distinct_colours, backgrounds, size, "
                                 "sides, shapes, colours, anchor, anchor_by, mix")
        return cls(**kw)


DEFAULT_KNOBS = Knobs()
# Knobs.anchor: where each colour's objects sit (fractions of width, height), a 3 x 2 grid.
COLOUR_ANCHORS = {"red": (0.2, 0.28), "green": (0.5, 0.28), "blue": (0.8, 0.28),
                  "yellow": (0.2, 0.72), "purple": (0.5, 0.72), "orange": (0.8, 0.72)}
# Knobs.anchor_by="shape": where each shape's objects sit, a 2 x 2 grid.
SHAPE_ANCHORS = {"circle": (0.27, 0.27), "square": (0.73, 0.27), "triangle": (0.27, 0.73),
                 "star": (0.73, 0.73)}

_POLY_SIDES = 96  # a circle is drawn as a regular 96-gon (max error 0.05% of its radius)
_INRADIUS = {"circle": 1.0, "square": math.sqrt(0.5), "triangle": 0.5, "star": STAR_INNER}
_PLACE_TRIES = 200
_SCENE_TRIES = 50


# ----------------------------------------------------------------------------- data types


@dataclass
class Obj:
    """One drawn object. Geometry in pixels of the scene's image; rotation in degrees."""
    shape: str
    colour: str
    cx: float
    cy: float
    size: float  # diameter of the circumscribed circle
    rotation: float = 0.0
    point: tuple[float, float] = (0.0, 0.0)  # the annotated point (x %, y %), one decimal

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def core_radius(self) -> float:
        """Radius (px) of the disc around the centre that stays visible: the annotated point,
        rounded to 0.1%, is always inside it."""
        return max(2.0, 0.35 * _INRADIUS[self.shape] * self.size / 2)


@dataclass
class Background:
    kind: str  # plain | gradient | noisy
    colours: tuple[tuple[int, int, int], ...]  # one (plain) or two (gradient; noisy: 1 or 2)
    angle: float = 0.0  # gradient direction, degrees
    noise: int = 0  # amplitude of the integer noise (noisy)
    noise_seed: int = 0


@dataclass
class Scene:
    width: int
    height: int
    background: Background
    objects: list[Obj]  # back to front
    labels: np.ndarray = field(repr=False)  # uint8 [H, W]: 0 background, i + 1 object i visible

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def mask(self, index: int) -> np.ndarray:
        """Object `index`'s visible pixels (bool [H, W])."""
        return self.labels == index + 1

    def to_json(self) -> dict:
        return {"width": self.width, "height": self.height,
                "background": asdict(self.background),
                "objects": [asdict(o) for o in self.objects]}


@dataclass
class Sample:
    scene: Scene
    question: str
    answer: str
    target: dict  # kind, label, shape, colour, indices, points, count


# ----------------------------------------------------------------------------- geometry


def _vertices(obj: Obj) -> list[tuple[float, float]]:
    R = obj.size / 2
    if obj.shape == "circle":
        k, radii, start = _POLY_SIDES, (R,), 0.0
    elif obj.shape == "square":
        k, radii, start = 4, (R,), 45.0
    elif obj.shape == "triangle":
        k, radii, start = 3, (R,), -90.0
    elif obj.shape == "star":
        k, radii, start = 10, (R, R * STAR_INNER), -90.0
    else:
        raise UsageError(f"unknown shape {obj.shape!r}; expected one of {', '.join(SHAPES)}")
    out = []
    for j in range(k):
        a = math.radians(start + obj.rotation + 360.0 * j / k)
        r = radii[j % len(radii)]
        out.append((obj.cx + r * math.cos(a), obj.cy + r * math.sin(a)))
    return out


def _bbox(obj: Obj, width: int, height: int) -> tuple[int, int, int, int]:
    R = obj.size / 2
    x0, y0 = max(0, math.floor(obj.cx - R) - 1), max(0, math.floor(obj.cy - R) - 1)
    x1, y1 = min(width, math.ceil(obj.cx + R) + 2), min(height, math.ceil(obj.cy + R) + 2)
    return x0, y0, x1, y1


def _coverage(obj: Obj, width: int, height: int, ss: int) -> tuple[np.ndarray, tuple]:
    """Samples inside the shape per pixel of its bounding box (int32, 0 .. ss*ss) and the box."""
    x0, y0, x1, y1 = box = _bbox(obj, width, height)
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    # PIL fills the samples whose integer coordinate is inside; sample (i, j) of the supersampled
    # canvas sits at ((i + 0.5) / ss, (j + 0.5) / ss) of the image's continuous plane.
    pts = [((x - x0) * ss - 0.5, (y - y0) * ss - 0.5) for x, y in _vertices(obj)]
    # Each inside sample holds ss*ss, so the box mean that reduce() computes (in integers) is
    # exactly the number of inside samples.
    ImageDraw.Draw(canvas).polygon(pts, fill=ss * ss)
    if ss > 1:
        canvas = canvas.reduce(ss)
    return np.asarray(canvas, dtype=np.int32), box


def _mask(obj: Obj, width: int, height: int) -> tuple[np.ndarray, tuple, np.ndarray]:
    """(mask of the pixels at least half inside, bounding box, coverage counts)."""
    cov, box = _coverage(obj, width, height, SUPERSAMPLE)
    return cov * 2 >= SUPERSAMPLE * SUPERSAMPLE, box, cov


def _pct_point(obj: Obj, width: int, height: int) -> tuple[float, float]:
    return (round(100.0 * obj.cx / width, 1), round(100.0 * obj.cy / height, 1))


def _pixel(width: int, height: int, x_pct: float, y_pct: float) -> tuple[int, int]:
    """The pixel (x, y) a point in percent falls on (100% belongs to the last pixel)."""
    return (min(width - 1, int(x_pct / 100.0 * width)),
            min(height - 1, int(y_pct / 100.0 * height)))


def point_in_object(scene: Scene, index: int, x_pct: float, y_pct: float) -> bool:
    """Whether the point (percent of the scene's width and height) falls on object `index`'s
    visible pixels. Points outside the image are not on any object."""
    if not (0.0 <= x_pct <= 100.0 and 0.0 <= y_pct <= 100.0):
        return False
    x, y = _pixel(scene.width, scene.height, x_pct, y_pct)
    return int(scene.labels[y, x]) == index + 1


def object_at(scene: Scene, x_pct: float, y_pct: float) -> int | None:
    """The index of the object visible at the point, or None (background, outside)."""
    if not (0.0 <= x_pct <= 100.0 and 0.0 <= y_pct <= 100.0):
        return None
    x, y = _pixel(scene.width, scene.height, x_pct, y_pct)
    label = int(scene.labels[y, x])
    return label - 1 if label else None


# ----------------------------------------------------------------------------- scenes


def _image_size(rng: random.Random, sides: tuple[int, int]) -> tuple[int, int]:
    lo, hi = sides
    w = rng.randint(lo, hi)
    h = rng.randint(max(lo, math.ceil(w / MAX_ASPECT)), min(hi, math.floor(w * MAX_ASPECT)))
    return (w, h) if rng.random() < 0.5 else (h, w)


def _contrast_ok(c) -> bool:
    return all(math.dist(c, o) >= MIN_CONTRAST for o in COLOURS.values())


def _background_colour(rng: random.Random) -> tuple[int, int, int]:
    """A colour far from every object colour: light or dark, mostly unsaturated."""
    while True:
        base = rng.randint(185, 255) if rng.random() < 0.7 else rng.randint(0, 70)
        c = tuple(min(255, max(0, base + rng.randint(-25, 25))) for _ in range(3))
        if _contrast_ok(c):
            return c


def _make_background(rng: random.Random, kinds: tuple[str, ...] = BACKGROUNDS) -> Background:
    kind = rng.choice(kinds)
    if kind == "white":
        return Background("plain", ((255, 255, 255),))
    c0 = _background_colour(rng)
    gradient = kind == "gradient" or (kind == "noisy" and rng.random() < 0.5)
    if gradient:
        while True:  # every colour along the gradient keeps its contrast
            c1 = _background_colour(rng)
            if all(_contrast_ok([a + (b - a) * t / 8 for a, b in zip(c0, c1)]) for t in range(9)):
                break
        colours = (c0, c1)
    else:
        colours = (c0,)
    noise = rng.randint(*NOISE_AMPLITUDE) if kind == "noisy" else 0
    return Background(kind, colours, angle=rng.uniform(0.0, 360.0), noise=noise,
                      noise_seed=rng.getrandbits(63))


def _render_background(bg: Background, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3], integer arithmetic only (the same bytes on any machine)."""
    if len(bg.colours) == 1:
        out = np.empty((height, width, 3), dtype=np.uint8)
        out[...] = bg.colours[0]
    else:
        # t in 0 .. 256 along the direction; the direction is scaled to integers.
        dx = round(256 * math.cos(math.radians(bg.angle)))
        dy = round(256 * math.sin(math.radians(bg.angle)))
        proj = (np.arange(width, dtype=np.int32)[None, :] * dx
                + np.arange(height, dtype=np.int32)[:, None] * dy)
        lo, hi = int(proj.min()), int(proj.max())
        t = ((proj - lo) * 256 // max(1, hi - lo)).astype(np.int16)
        c0, c1 = bg.colours
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ch in range(3):  # |c1 - c0| * t <= 255 * 256: int16 would overflow, int32 does not
            out[..., ch] = c0[ch] + ((c1[ch] - c0[ch]) * t.astype(np.int32) + 128) // 256
    if bg.noise:
        g = np.random.Generator(np.random.PCG64(bg.noise_seed))
        noise = g.integers(-bg.noise, bg.noise + 1, size=out.shape, dtype=np.int16)
        out = np.clip(out.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return out


def _place(rng: random.Random, specs, width: int, height: int,
           size_range: tuple[float, float] = SIZE_RANGE,
           anchor: float | None = None, anchor_by: str = "colour"
           ) -> tuple[list[Obj], np.ndarray]:
    """Objects for `specs` [(shape, colour), ...] in that drawing order, or ValueError.
    anchor: centres near COLOUR_ANCHORS[colour] (anchor_by "colour") or SHAPE_ANCHORS[shape]
    ("shape"), jittered by up to anchor x the shorter side."""
    short = min(width, height)
    labels = np.zeros((height, width), dtype=np.uint8)
    objs: list[Obj] = []
    area: list[int] = []
    visible: list[int] = []
    for j, (shape, colour) in enumerate(specs):
        for _ in range(_PLACE_TRIES):
            size = rng.uniform(*size_range) * short
            R = size / 2
            if anchor is None:
                cx, cy = rng.uniform(R + 1, width - R - 1), rng.uniform(R + 1, height - R - 1)
            else:
                ax, ay = (SHAPE_ANCHORS[shape] if anchor_by == "shape"
                          else COLOUR_ANCHORS[colour])
                cx = min(max(ax * width + rng.uniform(-anchor, anchor) * short, R + 1),
                         width - R - 1)
                cy = min(max(ay * height + rng.uniform(-anchor, anchor) * short, R + 1),
                         height - R - 1)
            obj = Obj(shape, colour, cx, cy, size,
                      0.0 if shape == "circle" else rng.uniform(0.0, 360.0))
            m, (x0, y0, x1, y1), cov = _mask(obj, width, height)
            obj.point = _pct_point(obj, width, height)
            px, py = _pixel(width, height, *obj.point)
            if cov[py - y0, px - x0] != SUPERSAMPLE * SUPERSAMPLE:  # not wholly inside
                continue
            under = labels[y0:y1, x0:x1][m]
            lost = np.bincount(under, minlength=j + 1)
            if any(visible[i] - lost[i + 1] < MIN_VISIBLE * area[i] for i in range(j)):
                continue
            ys, xs = np.nonzero(m)
            px, py = xs + (x0 + 0.5), ys + (y0 + 0.5)
            if any(lost[i + 1] and np.any((px - o.cx) ** 2 + (py - o.cy) ** 2
                                          <= (o.core_radius + 0.75) ** 2)
                   for i, o in enumerate(objs)):
                continue
            break
        else:
            raise ValueError("no room")
        labels[y0:y1, x0:x1][m] = j + 1
        for i in range(j):
            visible[i] -= int(lost[i + 1])
        objs.append(obj)
        area.append(int(m.sum()))
        visible.append(int(m.sum()))
    return objs, labels


def make_scene(rng: random.Random, specs=None, *, size: tuple[int, int] | None = None,
               sides: tuple[int, int] = SIDE_RANGE, background: Background | None = None,
               backgrounds: tuple[str, ...] = BACKGROUNDS,
               size_range: tuple[float, float] = SIZE_RANGE,
               anchor: float | None = None, anchor_by: str = "colour") -> Scene:
    """A scene of the objects `specs` [(shape, colour), ...] (drawn in that order; default:
    1-6 random ones), on an image of `size` (W, H) or of random sides in `sides`."""
    width, height = size if size is not None else _image_size(rng, sides)
    if not (width >= MIN_SIDE and height >= MIN_SIDE):
        raise UsageError(f"scene size {width}x{height}: sides must be at least {MIN_SIDE} px")
    if specs is None:
        n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        specs = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(n)]
    bg = background if background is not None else _make_background(rng, backgrounds)
    for _ in range(_SCENE_TRIES):
        try:
            objs, labels = _place(rng, specs, width, height, size_range, anchor, anchor_by)
        except ValueError:
            continue
        return Scene(width, height, bg, objs, labels)
    raise UsageError(f"cannot place {len(specs)} objects in {width}x{height}")


def render(scene: Scene, antialias: bool | int = True) -> Image.Image:
    """The scene as an RGB picture. antialias: True (4x4 supersampling, the training data),
    False (hard edges), or a supersampling factor. The masks do not change with it."""
    ss = SUPERSAMPLE if antialias is True else 1 if antialias is False else int(antialias)
    if ss < 1:
        raise UsageError(f"antialias factor must be >= 1, got {antialias!r}")
    img = _render_background(scene.background, scene.width, scene.height)
    n = ss * ss
    for obj in scene.objects:
        cov, (x0, y0, x1, y1) = _coverage(obj, scene.width, scene.height, ss)
        cov = cov[..., None]
        region = img[y0:y1, x0:x1].astype(np.int32)
        rgb = np.array(obj.rgb, dtype=np.int32)
        img[y0:y1, x0:x1] = (region * (n - cov) + rgb * cov + n // 2) // n
    return Image.fromarray(img, "RGB")


rerender = render  # an evaluator's name for drawing a scene again with other anti-aliasing


# ----------------------------------------------------------------------------- questions


def question_text(kind: str, shape: str, colour: str | None = None) -> str:
    if kind == "single" or kind == "absent":
        return f"Point to the {colour} {shape}."
    if kind == "multi":
        return f"Point to all the {PLURALS[shape]}."
    if kind == "count":
        return f"How many {PLURALS[shape]} are there?"
    raise UsageError(f"unknown question kind {kind!r}; expected one of {', '.join(QUESTION_MIX)}")


def make_example(rng: random.Random, scene: Scene, kind: str | None = None,
                 shape: str | None = None, colour: str | None = None
                 ) -> tuple[str, str, dict]:
    """(question, answer, target) about `scene`. Unset kind/shape/colour are drawn: kind by
    QUESTION_MIX among those the scene allows (single needs a unique colour+shape, multi a
    shape present, absent a colour+shape missing)."""
    objs = scene.objects
    present = {(o.colour, o.shape) for o in objs}
    counts: dict[tuple[str, str], int] = {}
    for o in objs:
        counts[(o.colour, o.shape)] = counts.get((o.colour, o.shape), 0) + 1
    if kind is None:
        allowed = {"single": any(v == 1 for v in counts.values()), "multi": bool(objs),
                   "count": True, "absent": len(present) < len(COLOURS) * len(SHAPES)}
        kinds = [k for k in QUESTION_MIX if allowed[k]]
        kind = rng.choices(kinds, weights=[QUESTION_MIX[k] for k in kinds])[0]
    if kind == "single":
        if shape is None or colour is None:
            colour, shape = rng.choice(sorted(k for k, v in counts.items() if v == 1))
        indices = [i for i, o in enumerate(objs) if (o.colour, o.shape) == (colour, shape)]
        if len(indices) != 1:
            raise UsageError(f"single question about the {colour} {shape}: the scene holds "
                             f"{len(indices)}")
        label = f"{colour} {shape}"
    elif kind == "absent":
        if shape is None or colour is None:
            missing = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            colour, shape = rng.choice(missing)
        indices = [i for i, o in enumerate(objs) if (o.colour, o.shape) == (colour, shape)]
        if indices:
            raise UsageError(f"absent question about the {colour} {shape}, which is there")
        label = f"{colour} {shape}"
    elif kind in ("multi", "count"):
        if shape is None:
            shape = rng.choice(sorted({o.shape for o in objs}) if kind == "multi" else SHAPES)
        colour = None
        indices = [i for i, o in enumerate(objs) if o.shape == shape]
        if kind == "multi" and not indices:
            raise UsageError(f"multi question about {PLURALS[shape]}: the scene holds none")
        label = PLURALS[shape]
    else:
        raise UsageError(f"unknown question kind {kind!r}")
    points = [objs[i].point for i in indices]
    if kind == "count":
        answer = format_count(points, label)
    elif points:
        answer = format_points(points, label)
    else:
        answer = "There are none."
    target = {"kind": kind, "label": label, "shape": shape, "colour": colour,
              "indices": indices, "points": [list(p) for p in points], "count": len(indices)}
    return question_text(kind, shape, colour), answer, target


def _plan(rng: random.Random, kind: str, knobs: Knobs = DEFAULT_KNOBS
          ) -> tuple[list, str, str | None]:
    """Objects to draw for a question of `kind`: (specs in drawing order, shape, colour)."""
    colours = list(knobs.colours)
    shapes = knobs.shapes
    lo, hi = knobs.objects
    p_shape = P_SAME_SHAPE if knobs.p_same_shape is None else knobs.p_same_shape
    p_colour = P_SAME_COLOUR if knobs.p_same_colour is None else knobs.p_same_colour
    shape, colour = rng.choice(shapes), rng.choice(colours)
    others_shape = [s for s in shapes if s != shape]
    others_colour = [c for c in colours if c != colour]
    if kind in ("single", "absent"):
        required = [(shape, colour)] if kind == "single" else []
        if rng.random() < p_shape and others_colour:
            required += [(shape, c) for c in rng.sample(others_colour,
                                                         min(len(others_colour), rng.randint(1, 2)))]
        if not knobs.distinct_colours and rng.random() < p_colour and others_shape:
            required += [(s, colour) for s in rng.sample(others_shape,
                                                         min(len(others_shape), rng.randint(1, 2)))]
        required = required[:hi]
        n = rng.randint(max(lo, len(required)), hi)
        if knobs.distinct_colours:
            used = {c for _, c in required}
            specs = list(required)
            for _ in range(n - len(required)):
                s_c = rng.choice([(s, c) for c in colours if c not in used for s in shapes
                                  if (s, c) != (shape, colour)])
                used.add(s_c[1])
                specs.append(s_c)
        else:
            fill = [(s, c) for s in shapes for c in colours if (s, c) != (shape, colour)]
            specs = required + ([rng.choice(fill) for _ in range(n - len(required))]
                                if fill else [])
    else:
        if not others_shape:
            raise UsageError(f"{kind} questions need at least two shapes, got {shapes}")
        k = rng.randint(1 if kind == "multi" else 0, hi)
        n = rng.randint(max(lo, k), hi)
        if knobs.distinct_colours:
            cs = rng.sample(colours, n)
            specs = [(shape, c) for c in cs[:k]]
            specs += [(rng.choice(others_shape), c) for c in cs[k:]]
        else:
            specs = [(shape, rng.choice(colours)) for _ in range(k)]
            specs += [(rng.choice(others_shape), rng.choice(colours)) for _ in range(n - k)]
        colour = None
    rng.shuffle(specs)
    return specs, shape, colour


def make_sample(rng: random.Random, kind: str | None = None, *,
                sides: tuple[int, int] = SIDE_RANGE, knobs: Knobs | None = None) -> Sample:
    """A scene planned for a question (kind drawn by the knobs' mix, default QUESTION_MIX,
    unless given), the question, its answer and its target. `knobs` (a curriculum stage):
    object count range, distractor rates, distinct colours, background kinds."""
    knobs = knobs or DEFAULT_KNOBS
    if kind is None:
        mix = knobs.question_mix
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    specs, shape, colour = _plan(rng, kind, knobs)
    scene = make_scene(rng, specs, sides=knobs.sides or sides, backgrounds=knobs.backgrounds,
                       size_range=knobs.size, anchor=knobs.anchor, anchor_by=knobs.anchor_by)
    q, a, target = make_example(rng, scene, kind, shape, colour)
    return Sample(scene, q, a, target)


# ----------------------------------------------------------------------------- files


def _sample_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"molmoe-synth:{seed}:{index}")


def write_image(image: Image.Image, path, fmt: str, quality: int = 90) -> None:
    fmt = fmt.lower()
    if fmt == "png":
        image.save(path, format="PNG", compress_level=1)
    elif fmt in ("jpeg", "jpg"):
        image.save(path, format="JPEG", quality=quality)
    else:
        raise UsageError(f"unknown image format {fmt!r}; expected png or jpeg")


def write_dataset(out_dir, n: int, seed: int, *, sizes: tuple[int, int] = SIDE_RANGE,
                  formats=("png", "jpeg"), knobs: Knobs | None = None) -> pathlib.Path:
    """Write `n` examples to out_dir: train.jsonl (one question per image, docs/training.md's
    format), scenes.jsonl (line k: example k's scene geometry, question, answer and target) and
    images/NNNNNN.{png,jpg}. Returns the path of train.jsonl.

    out_dir must not exist or be empty. Everything is written into a temporary directory beside
    it and renamed into place at the end, so out_dir either holds a complete dataset or nothing.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UsageError(f"n must be a positive int, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"seed must be an int, got {seed!r}")
    lo, hi = sizes
    if not (MIN_SIDE <= lo <= hi):
        raise UsageError(f"sizes {sizes}: expected {MIN_SIDE} <= min <= max")
    formats = tuple(f.lower().replace("jpg", "jpeg") for f in formats)
    if not formats or any(f not in ("png", "jpeg") for f in formats):
        raise UsageError(f"formats {formats}: expected png and/or jpeg")
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        with open(tmp / "train.jsonl", "w") as train, open(tmp / "scenes.jsonl", "w") as meta:
            for i in range(n):
                rng = _sample_rng(seed, i)
                sample = make_sample(rng, sides=(lo, hi), knobs=knobs)
                fmt = rng.choice(formats)
                quality = rng.randint(*JPEG_QUALITY) if fmt == "jpeg" else None
                rel = f"images/{i:06d}.{'png' if fmt == 'png' else 'jpg'}"
                write_image(render(sample.scene), tmp / rel, fmt, quality or 0)
                train.write(json.dumps({"image": rel, "messages": [
                    {"role": "user", "content": sample.question},
                    {"role": "assistant", "content": sample.answer}]}) + "\n")
                meta.write(json.dumps({"image": rel, "format": fmt, "quality": quality,
                                       "question": sample.question, "answer": sample.answer,
                                       "target": sample.target,
                                       "scene": sample.scene.to_json()}) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "train.jsonl"


def load_scene(record: dict) -> Scene:
    """The Scene of a scenes.jsonl record (its `scene` value, or the record itself), masks
    recomputed from the geometry exactly as they were made."""
    s = record.get("scene", record)
    bg = s["background"]
    bg = Background(bg["kind"], tuple(tuple(c) for c in bg["colours"]), bg["angle"], bg["noise"],
                    bg["noise_seed"])
    W, H = s["width"], s["height"]
    objs = [Obj(o["shape"], o["colour"], o["cx"], o["cy"], o["size"], o["rotation"],
                tuple(o["point"])) for o in s["objects"]]
    labels = np.zeros((H, W), dtype=np.uint8)
    for j, obj in enumerate(objs):
        m, (x0, y0, x1, y1), _ = _mask(obj, W, H)
        labels[y0:y1, x0:x1][m] = j + 1
    return Scene(W, H, bg, objs, labels)


# ----------------------------------------------------------------------------- EXIF copies


def exif_rotated_copy(src, dst, orientation: int, quality: int | None = None) -> tuple[int, int]:
    """Write src's pixels unchanged to dst (JPEG when dst ends in .jpg/.jpeg, at `quality`,
    default 95; else PNG) with EXIF orientation `orientation` (1-8). A viewer, and molmoe's image
    loader, show the picture transformed (6: rotated 90 degrees clockwise, ...); map the scene's
    points with `displayed_point` and answers back with `stored_point`. Returns the displayed
    (W, H)."""
    if orientation not in range(1, 9):
        raise UsageError(f"EXIF orientation must be 1..8, got {orientation!r}")
    img = Image.open(src).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    if str(dst).lower().endswith((".jpg", ".jpeg")):
        img.save(dst, format="JPEG", quality=quality or 95, exif=exif)
    else:
        img.save(dst, format="PNG", exif=exif)
    w, h = img.size
    return (h, w) if orientation >= 5 else (w, h)


def displayed_point(x: float, y: float, orientation: int) -> tuple[float, float]:
    """A point (percent) of the stored picture -> the same point of the picture as EXIF
    `orientation` displays it."""
    return {1: (x, y), 2: (100 - x, y), 3: (100 - x, 100 - y), 4: (x, 100 - y),
            5: (y, x), 6: (100 - y, x), 7: (100 - y, 100 - x), 8: (y, 100 - x)}[orientation]


def stored_point(x: float, y: float, orientation: int) -> tuple[float, float]:
    """The inverse of displayed_point: a point of the displayed picture -> the stored one."""
    inverse = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}
    return displayed_point(x, y, inverse[orientation])
