"""The shapes world's scenes and their words, both ways. Scenes: a few coloured shapes on a plain, noisy, gradient
or striped background, sampled from a `random.Random`, rendered deterministically, varied in one thing for
BISON-style pairs; and their words: captions, counts, noun phrases, NLVR2-style statements.

Pure: PIL and numpy, no files, no torch. Words read back (the exact scorer) are in `scoring.py`; questions,
conversations, datasets on disk and the CLI in `tasks.py`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Saturated colours far apart in RGB, so that no two are confused and none is near the grey backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 35),
    "green": (40, 165, 60), "blue": (40, 95, 225), "purple": (145, 60, 195),
}
SIZES: dict[str, float] = {"big": 0.15, "small": 0.09}  # radius as a fraction of the image side
BACKGROUNDS = ("plain", "noisy", "gradient", "striped")
MAX_OBJECTS = 5  # more would not fit without overlaps at these sizes
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_GREYS = (60, 230)  # backgrounds are greys in this range: never a palette colour, so objects stay visible
_NOISE = 20  # amplitude of the grey noise
_GAP = 0.03  # minimum space between two objects' bounding circles


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str  # "big" or "small"
    x: float  # centre, as a fraction of the image width (0 = left)
    y: float  # centre, as a fraction of the image height (0 = top)

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Background:
    kind: str = "plain"  # one of BACKGROUNDS
    colors: tuple[tuple[int, int, int], ...] = ((200, 200, 200),)  # one grey; two for gradient and striped
    vertical: bool = False  # gradient and stripes run top to bottom instead of left to right
    period: float = 0.125  # stripe period, as a fraction of the side
    seed: int = 0  # of the noise


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[Obj, ...]


@dataclass(frozen=True)
class SceneConfig:
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # add "star", "cross" for a harder world
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = tuple(SIZES)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    min_objects: int = 1
    max_objects: int = 4  # at most MAX_OBJECTS

    def __post_init__(self):
        for name, have, known in (("shapes", self.shapes, SHAPES), ("colors", self.colors, COLORS),
                                  ("sizes", self.sizes, SIZES), ("backgrounds", self.backgrounds, BACKGROUNDS)):
            unknown = [x for x in have if x not in known]
            if unknown or not have:
                raise ConfigError(f"SceneConfig.{name}: expected a non-empty subset of {', '.join(known)}, "
                                  f"got {', '.join(have) or 'nothing'}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ConfigError(f"SceneConfig: expected 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                              f"got {self.min_objects} and {self.max_objects}")


# Sampling


def sample_scene(rng: random.Random, config: SceneConfig = SceneConfig()) -> Scene:
    """A scene with min..max non-overlapping objects (fewer only when no free spot is found)."""
    objects: list[Obj] = []
    for _ in range(rng.randint(config.min_objects, config.max_objects)):
        obj = place(rng, objects, rng.choice(config.shapes), rng.choice(config.colors), rng.choice(config.sizes))
        if obj is None:
            break
        objects.append(obj)
    return Scene(sample_background(rng, config.backgrounds), tuple(objects))


def sample_background(rng: random.Random, kinds: tuple[str, ...] = BACKGROUNDS) -> Background:
    kind = rng.choice(kinds)
    g0 = rng.randint(*_GREYS)
    d = rng.randint(40, 90)  # the two greys of a gradient or stripes differ enough to be seen
    g1 = g0 + d if g0 + d <= _GREYS[1] else g0 - d
    colors = ((g0,) * 3,) if kind in ("plain", "noisy") else ((g0,) * 3, (g1,) * 3)
    return Background(kind, colors, vertical=rng.random() < 0.5, period=rng.choice((0.1, 0.125, 0.1875)),
                      seed=rng.randrange(2**31))


def place(rng: random.Random, objects: list[Obj] | tuple[Obj, ...], shape: str, color: str, size: str,
          tries: int = 60) -> Obj | None:
    """A new object at a random free spot, or None when `tries` random spots all overlap something."""
    lo, hi = SIZES[size] + 0.02, 1 - SIZES[size] - 0.02
    for _ in range(tries):
        obj = Obj(shape, color, size, round(rng.uniform(lo, hi), 3), round(rng.uniform(lo, hi), 3))
        if _fits(obj, objects):
            return obj
    return None


def _fits(obj: Obj, others) -> bool:
    r = obj.radius
    return (all(r + 0.0195 <= v <= 1 - r - 0.0195 for v in (obj.x, obj.y))  # 0.0005 of slack for the rounding
            and all(math.hypot(obj.x - o.x, obj.y - o.y) >= r + o.radius + _GAP for o in others))


def vary(scene: Scene, rng: random.Random, config: SceneConfig = SceneConfig()) -> tuple[Scene, str]:
    """The scene with one thing changed, so that its caption differs: one object's colour, shape or size, one
    object more or fewer, or the background kind. Returns (scene, what changed)."""
    objects = list(scene.objects)
    changes = ["color", "shape", "size", "add", "background"] + (["remove"] if len(objects) > 1 else [])
    rng.shuffle(changes)
    for change in changes:
        i = rng.randrange(len(objects))
        obj, others, new = objects[i], objects[:i] + objects[i + 1:], None
        if change in ("color", "shape"):
            values = [v for v in getattr(config, change + "s") if v != getattr(obj, change)]
            new = objects[:i] + [replace(obj, **{change: rng.choice(values)})] + objects[i + 1:] if values else None
        elif change == "size":
            other = replace(obj, size="small" if obj.size == "big" else "big")
            new = objects[:i] + [other] + objects[i + 1:] if other.size in config.sizes and _fits(other, others) \
                else None
        elif change == "add" and len(objects) < MAX_OBJECTS:
            extra = place(rng, objects, rng.choice(config.shapes), rng.choice(config.colors), rng.choice(config.sizes))
            new = objects + [extra] if extra else None
        elif change == "remove":
            new = others
        elif change == "background" and len(config.backgrounds) > 1:
            kind = rng.choice([k for k in config.backgrounds if k != scene.background.kind])
            return replace(scene, background=sample_background(rng, (kind,))), change
        if new is not None:
            return replace(scene, objects=tuple(new)), change
    raise AssertionError("no change possible: the config allows one shape, colour, size and background only")


# Rendering


# Outlines at radius 1, centred on the origin: each contains its centre, so the centre pixel has the object's colour.
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": tuple((math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)),
    "star": tuple(((1, 0.45)[k % 2] * math.cos(-math.pi / 2 + k * math.pi / 5),
                   (1, 0.45)[k % 2] * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)),
    "cross": ((-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1), (-0.33, 1),
              (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)),
}


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a `size`×`size` RGB image; the same scene and size always give the same pixels."""
    image = _background(scene.background, size)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r, fill = obj.x * size, obj.y * size, obj.radius * size, COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx + dx * r, cy + dy * r) for dx, dy in _OUTLINES[obj.shape]], fill=fill)
    return image


def _background(bg: Background, size: int) -> Image.Image:
    if bg.kind == "plain":
        return Image.new("RGB", (size, size), bg.colors[0])
    c0 = np.asarray(bg.colors[0], np.float32)
    c1 = np.asarray(bg.colors[-1], np.float32)
    ramp = np.arange(size, dtype=np.float32)
    if bg.kind == "noisy":
        # Grey noise (the same offset on all three channels) keeps the background free of colour.
        noise = np.random.default_rng(bg.seed).integers(-_NOISE, _NOISE + 1, (size, size, 1))
        pixels = c0 + noise.astype(np.float32)
    elif bg.kind == "gradient":
        t = ramp / max(size - 1, 1)
        pixels = c0 + t[:, None] * (c1 - c0)  # (size, 3): one colour per row or column
    elif bg.kind == "striped":
        half = max(1, round(bg.period * size / 2))
        pixels = np.where(((ramp // half) % 2 == 0)[:, None], c0, c1)  # (size, 3)
    else:
        raise ConfigError(f"unknown background kind {bg.kind!r}; expected one of {', '.join(BACKGROUNDS)}")
    if pixels.ndim == 2:  # a row profile: spread it down (vertical) or across
        pixels = pixels[:, None, :] if bg.vertical else pixels[None, :, :]
    pixels = np.broadcast_to(pixels, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# Words


def describe(scene: Scene) -> dict[str, Any]:
    """The structured description: plain JSON types, and `scene_from_dict` reads it back."""
    bg = scene.background
    return {"background": {"kind": bg.kind, "colors": [list(c) for c in bg.colors], "vertical": bg.vertical,
                           "period": bg.period, "seed": bg.seed},
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y}
                        for o in scene.objects]}


def scene_from_dict(data: Mapping[str, Any]) -> Scene:
    bg = data["background"] | {"colors": tuple(tuple(c) for c in data["background"]["colors"])}
    return Scene(Background(**bg), tuple(Obj(**o) for o in data["objects"]))


def _order(obj: Obj) -> tuple[int, int, int]:
    return SHAPES.index(obj.shape), list(COLORS).index(obj.color), list(SIZES).index(obj.size)


def object_phrases(scene: Scene) -> list[str]:
    """One phrase per group of identical objects, in canonical order: shape, then colour, then size (big first)."""
    groups = Counter((o.size, o.color, o.shape) for o in sorted(scene.objects, key=_order))
    return [f"{'a' if n == 1 else NUMBERS[n]} {size} {noun(n, color=color, shape=shape)}"
            for (size, color, shape), n in groups.items()]


def caption(scene: Scene) -> str:
    """E.g. "a big red circle and two small blue squares on a striped background"."""
    return f"{join(object_phrases(scene)) or 'nothing'} on a {scene.background.kind} background"


def join(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else "".join(words)


def count(scene: Scene, *, color: str | None = None, shape: str | None = None, size: str | None = None) -> int:
    """How many objects match every attribute given."""
    return sum((color is None or o.color == color) and (shape is None or o.shape == shape)
               and (size is None or o.size == size) for o in scene.objects)


def noun(n: int, *, color: str | None = None, shape: str | None = None, size: str | None = None) -> str:
    """The noun phrase for `n` objects: "red shapes", "circle", "small green triangles"."""
    head = shape or "shape"
    head = head if n == 1 else head + ("es" if head.endswith("s") else "s")  # cross -> crosses
    return " ".join([w for w in (size, color) if w] + [head])


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def number_word(n: int) -> str:
    """0 -> "no", 1..10 as words, larger as digits."""
    return NUMBERS[n] if 0 <= n < len(NUMBERS) else str(n)


def pick_attr(rng: random.Random, scene: Scene) -> dict[str, str]:
    """Something to count, as `count` keywords: a colour, a shape or both (from one of the scene's objects), or {}."""
    o = rng.choice(scene.objects)
    return rng.choice(({"color": o.color}, {"shape": o.shape}, {"color": o.color, "shape": o.shape}, {}))


# Sentences about a pair of scenes (NLVR2-style): each template picks its words so that it says `want`.

STATEMENTS = ("more", "both", "neither", "exactly", "total", "same", "only", "background")


def statement(rng: random.Random, pair: tuple[Scene, Scene], template: str, want: bool,
              config: SceneConfig = SceneConfig()) -> str | None:
    """A sentence from `template` that is `want` about (left, right), or None when this draw is not."""
    said = claim(rng, pair, template, want, config)
    return said and said[0]


def claim(rng: random.Random, pair: tuple[Scene, Scene], template: str, want: bool,
          config: SceneConfig = SceneConfig()) -> tuple[str, dict[str, str] | None] | None:
    """`statement`, with what it counts (`count` keywords), or None for the background template."""
    side = rng.randrange(2)
    s, o = ("left", "right")[side], ("left", "right")[1 - side]
    attr = rng.choice(({"color": rng.choice(config.colors)}, {"shape": rng.choice(config.shapes)},
                       {"color": rng.choice(config.colors), "shape": rng.choice(config.shapes)}))
    cs, co = count(pair[side], **attr), count(pair[1 - side], **attr)
    things, thing = noun(2, **attr), with_article(noun(1, **attr))
    if template in ("exactly", "total"):  # these two choose their number to fit `want`
        real = cs if template == "exactly" else cs + co
        n = real if want else (real + 1 if real == 0 or rng.random() < 0.5 else real - 1)
        if template == "total":
            return f"The two images have {number_word(n)} {noun(n, **attr)} in total.", attr
        return f"The {s} image has {'exactly ' if n else ''}{number_word(n)} {noun(n, **attr)}.", attr
    kind = rng.choice(config.backgrounds)
    sentence, true = {
        "more": (f"The {s} image has more {things} than the {o} image.", cs > co),
        "both": (f"Both images have {thing}.", cs > 0 and co > 0),
        "neither": (f"Neither image has {thing}.", cs == 0 and co == 0),
        "same": (f"The two images have the same number of {things}.", cs == co),
        "only": (f"Only the {s} image has {thing}.", cs > 0 and co == 0),
        "background": (f"Both images have a {kind} background.", all(p.background.kind == kind for p in pair)),
    }[template]
    return (sentence, None if template == "background" else attr) if true == want else None
