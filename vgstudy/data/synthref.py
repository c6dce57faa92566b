"""SynthRef: the built-in, procedural referring-expression data set.

Every sample is a pure function of (seed, split, index): a scene of 3-6 coloured shapes on a muted textured background,
and an expression that refers to exactly one of them. Expressions come in four families that mirror what makes REC
hard (attribute, relation, position, comparative); `testA` holds only attribute expressions and `testB` only the other
three, echoing RefCOCO's testA/testB. Each sample also carries the target's mask of visible pixels and the symbolic
scene (for statistics and for captions that pretrain small CLIPs).

How an index becomes a sample:
1. an independent random stream `default_rng(SeedSequence([seed, split_code, index]))`;
2. the family, then scenes drawn from that stream until one admits an unambiguous expression of that family
   (the look-alikes that make a relation or an ordinal necessary are planted on purpose, so few draws are needed);
3. rendering (background texture, object shading) continues the same stream, so `scene()` and `expression()` skip it
   and still agree with `__getitem__`.

Every non-attribute expression has a head noun that fits at least two objects ("the square" when there are several),
so its relation, position or comparison is needed. Geometry words are written only with margins a viewer can see:
the target satisfies the word clearly (e.g. "left of": centres apart by more than half the objects' extents plus 8% of
the image, and mostly sideways), every other candidate clearly fails it (not left at all), and nothing falls in
between. Geometry is judged on the visible pixels (the tight box of what is not occluded), the way a viewer sees it.
"""

from __future__ import annotations

import math
import operator
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vgstudy.data.sample import Sample
from vgstudy.errors import ConfigError, VGStudyError

FAMILIES: tuple[str, ...] = ("attribute", "relation", "position", "comparative")
SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")
# Which families each split draws from: testA is attribute-resolvable, testB needs relations/positions/comparisons.
SPLIT_FAMILIES: dict[str, tuple[str, ...]] = {
    "train": FAMILIES,
    "val": FAMILIES,
    "testA": ("attribute",),
    "testB": ("relation", "position", "comparative"),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES: tuple[str, ...] = ("small", "big")
BACKGROUNDS: tuple[str, ...] = ("noise", "stripes", "gradient")
# Saturated colours far apart in hue: brightness/contrast/saturation jitter keeps them apart (no hue jitter is used).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 190, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
}

# --- Words: canonical first, then synonyms the grammar may use -----------------------------------------------------

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "cobalt"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "white": ("white",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
# (singular, plural) pairs.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus", "pluses")),
    "ring": (("ring", "rings"), ("donut", "donuts"), ("hoop", "hoops")),
}
_RELATION_WORDS = {
    "left": ("left of", "to the left of", "on the left side of"),
    "right": ("right of", "to the right of", "on the right side of"),
    "above": ("above",),
    "below": ("below", "under", "beneath"),
    "near": ("next to", "beside", "near", "close to"),
}
# Position words per (axis, end): the superlative adjectives and the phrases that follow the noun.
_EXTREME_ADJECTIVES = {
    "left": ("leftmost",),
    "right": ("rightmost",),
    "top": ("topmost", "highest"),
    "bottom": ("bottommost", "lowest"),
}
_EXTREME_PHRASES = {
    "left": ("on the far left", "furthest to the left"),
    "right": ("on the far right", "furthest to the right"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}
_ORDINALS = {2: "second", 3: "third"}
_SIZE_COMPARATIVES = {"big": ("bigger", "larger"), "small": ("smaller",)}
_SIZE_SUPERLATIVES = {"big": ("biggest", "largest"), "small": ("smallest",)}
_DISTANCE_COMPARATIVES = {"closer": ("closer to", "nearer to"), "farther": ("farther from", "further from")}
_DISTANCE_SUPERLATIVES = {"closer": ("closest to", "nearest to"), "farther": ("farthest from", "furthest from")}
_BACKGROUND_WORDS = {"noise": "mottled", "stripes": "striped", "gradient": "shaded"}

# --- Geometry constants (fractions of the image size unless said otherwise) ---------------------------------------

_RADIUS_RANGE = {"small": (0.058, 0.07), "big": (0.115, 0.14)}  # big/small radius ratio >= 1.64
_EXTENT = 1.2  # every unit shape fits in a circle of radius 1.2 * radius
_MIN_CENTRE_DISTANCE = 0.7  # x (r_i + r_j): some overlap ("a little occlusion"), never a pile
_MAX_ROTATION_DEG = 20.0
_MIN_VISIBLE = 0.6  # every object keeps its shape readable
_MIN_VISIBLE_REFERRED = 0.8  # the target and the anchor of a relation are clearly visible
_DIRECTION_MARGIN = 0.08  # "left of": centre gap > 0.08 S + half the two extents
_NEAR_GAP, _FAR_GAP = 0.06, 0.22  # "next to": edge gap < 0.06 S for the target, > 0.22 S for the others
_ORDER_MARGIN = 0.05  # ordinals: neighbours apart by > 0.05 S + half the two extents
_DISTANCE_RATIO, _DISTANCE_GAP = 0.6, 0.1  # "closer to": d_target < 0.6 d_other and d_other - d_target > 0.1 S
_MAX_ATTEMPTS = 200
_MAX_OBJECTS = 8  # more do not fit a scene without piling up


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene; pixel coordinates, x to the right, y down.

    center_xy:        centre of the full (unoccluded) shape.
    radius:           the shape's scale in pixels (a circle's radius; other shapes are drawn to a similar area).
    rotation:         degrees, counter-clockwise on screen.
    box_xyxy:         tight box of the object's *visible* pixels, on pixel edges: it covers columns x1 .. x2 - 1.
    visible_fraction: visible pixels / pixels of the full shape.
    """

    shape: str
    color: str
    size: str
    center_xy: tuple[float, float]
    radius: float
    rotation: float
    box_xyxy: tuple[float, float, float, float]
    visible_fraction: float


@dataclass(frozen=True)
class Scene:
    """A symbolic scene: objects back to front (drawing order), the index of the referred one, the background kind."""

    objects: tuple[SceneObject, ...]
    target: int
    background: str
    image_size: int


# --- Phrases and captions -------------------------------------------------------------------------------------------


def object_phrase(obj: SceneObject) -> str:
    """The canonical full description of an object: "the small red circle"."""
    return f"the {obj.size} {obj.color} {obj.shape}"


def scene_caption(scene: Scene, rng_or_seed: np.random.Generator | int) -> str:
    """A caption of the whole scene with synonyms, in a random order: "a big red circle, a tiny blue star and ..."."""
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    phrases = [
        f"a {_pick(rng, SIZE_WORDS[o.size])} {_pick(rng, COLOR_WORDS[o.color])} {_pick(rng, SHAPE_WORDS[o.shape])[0]}"
        for o in (scene.objects[i] for i in rng.permutation(len(scene.objects)))
    ]
    caption = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if rng.random() < 0.5:
        caption += f" on a {_BACKGROUND_WORDS[scene.background]} background"
    return caption


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _noun_phrase(
    obj: SceneObject, attrs: Sequence[str], rng: np.random.Generator, *, plural: bool = False, article: bool = True
) -> str:
    """Words for `attrs` of `obj` (always including its shape): "the small crimson box", "green stars"."""
    words = ["the"] if article else []
    if "size" in attrs:
        words.append(_pick(rng, SIZE_WORDS[obj.size]))
    if "color" in attrs:
        words.append(_pick(rng, COLOR_WORDS[obj.color]))
    words.append(_pick(rng, SHAPE_WORDS[obj.shape])[1 if plural else 0])
    return " ".join(words)


# --- Expressions: one builder per family, each returns None when the scene cannot give a clear one ------------------

# Attribute sets that name an object, smallest first; the shape is always the head noun.
_NAMING_SETS = ((("shape",),), (("color", "shape"), ("size", "shape")), (("size", "color", "shape"),))
_HEAD_SETS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


@dataclass(frozen=True)
class _Placed:
    """What the grammar needs of an object: its attributes and what a viewer sees of it (visible box)."""

    obj: SceneObject
    cx: float
    cy: float
    half: float  # half the larger side of the visible box

    @classmethod
    def of(cls, obj: SceneObject) -> _Placed:
        x1, y1, x2, y2 = obj.box_xyxy
        return cls(obj, (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) / 2)


def _matching(objs: Sequence[_Placed], like: SceneObject, attrs: Sequence[str]) -> list[int]:
    return [i for i, p in enumerate(objs) if all(getattr(p.obj, a) == getattr(like, a) for a in attrs)]


def _naming_attrs(objs: Sequence[_Placed], i: int, rng: np.random.Generator) -> tuple[str, ...] | None:
    """The smallest attribute set (with the shape) that only object i has; a random one among equally small."""
    for group in _NAMING_SETS:
        unique = [attrs for attrs in group if len(_matching(objs, objs[i].obj, attrs)) == 1]
        if unique:
            return _pick(rng, unique)
    return None


def _head_options(objs: Sequence[_Placed], t: int, rng: np.random.Generator, *, with_size: bool = True) -> list:
    """(attrs, candidate indices) for head nouns that fit the target and at least one look-alike, in random order."""
    options = []
    for attrs in _HEAD_SETS:
        if with_size or "size" not in attrs:
            candidates = _matching(objs, objs[t].obj, attrs)
            if len(candidates) >= 2:
                options.append((attrs, candidates))
    return [options[i] for i in rng.permutation(len(options))]


def _anchors(objs: Sequence[_Placed], t: int, rng: np.random.Generator) -> list[tuple[int, tuple[str, ...]]]:
    """Objects that can anchor a relation to the target (another shape, clearly visible, nameable), random order."""
    anchors = []
    for a in rng.permutation(len(objs)):
        a = int(a)
        if objs[a].obj.shape != objs[t].obj.shape and objs[a].obj.visible_fraction >= _MIN_VISIBLE_REFERRED:
            attrs = _naming_attrs(objs, a, rng)
            if attrs is not None:
                anchors.append((a, attrs))
    return anchors


def _attribute_expression(objs, t, rng, size):
    attrs = _naming_attrs(objs, t, rng)
    return None if attrs is None else _noun_phrase(objs[t].obj, attrs, rng)


def _direction_offset(p: _Placed, anchor: _Placed, relation: str) -> tuple[float, float]:
    """(offset along the relation's direction, offset across it): positive along = p lies that way of the anchor."""
    dx, dy = p.cx - anchor.cx, p.cy - anchor.cy
    return {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]


def _edge_gap(p: _Placed, q: _Placed) -> float:
    return math.hypot(p.cx - q.cx, p.cy - q.cy) - p.half - q.half


def _relation_clear(objs, t, candidates, a, relation, size) -> bool:
    """The target clearly stands in `relation` to the anchor and every other candidate clearly does not."""
    target, anchor = objs[t], objs[a]
    others = [objs[c] for c in candidates if c != t]
    if relation == "near":
        return _edge_gap(target, anchor) < _NEAR_GAP * size and all(
            _edge_gap(o, anchor) > _FAR_GAP * size for o in others
        )
    along, across = _direction_offset(target, anchor, relation)
    clear = along > _DIRECTION_MARGIN * size + (target.half + anchor.half) / 2 and along >= abs(across)
    return clear and all(_direction_offset(o, anchor, relation)[0] <= 0 for o in others)


def _relation_expression(objs, t, rng, size):
    relations = [tuple(_RELATION_WORDS)[i] for i in rng.permutation(len(_RELATION_WORDS))]
    heads = _head_options(objs, t, rng)
    for a, anchor_attrs in _anchors(objs, t, rng) if heads else ():
        for head_attrs, candidates in heads:
            for relation in relations:
                if _relation_clear(objs, t, candidates, a, relation, size):
                    that_is = "that is " if rng.random() < 0.25 else ""
                    return (
                        f"{_noun_phrase(objs[t].obj, head_attrs, rng)} {that_is}"
                        f"{_pick(rng, _RELATION_WORDS[relation])} {_noun_phrase(objs[a].obj, anchor_attrs, rng)}"
                    )
    return None


def _rank_from(objs, t, candidates, end, size) -> int | None:
    """The target's 1-based rank counted from `end` ("left", "top", ...) when every neighbour is clearly apart."""
    coordinate = {
        "left": lambda p: p.cx,
        "right": lambda p: -p.cx,
        "top": lambda p: p.cy,
        "bottom": lambda p: -p.cy,
    }[end]
    target, rank = objs[t], 1
    for c in candidates:
        if c == t:
            continue
        gap = coordinate(objs[c]) - coordinate(target)
        margin = _ORDER_MARGIN * size + (objs[c].half + target.half) / 2
        if abs(gap) <= margin:
            return None
        rank += gap < 0
    return rank


def _position_expression(objs, t, rng, size):
    for head_attrs, candidates in _head_options(objs, t, rng):
        options = []
        for end in ("left", "right", "top", "bottom"):
            rank = _rank_from(objs, t, candidates, end, size)
            # Count from the nearer end only ("second from the left" rather than "third from the right").
            if rank is not None and rank <= 3 and rank <= len(candidates) + 1 - rank:
                options.append((end, rank))
        if options:
            end, rank = _pick(rng, options)
            noun = _noun_phrase(objs[t].obj, head_attrs, rng, article=False)
            if rank > 1:
                return f"the {_ORDINALS[rank]} {noun} from the {end}"
            if rng.random() < 0.6:
                return f"the {_pick(rng, _EXTREME_ADJECTIVES[end])} {noun}"
            return f"the {noun} {_pick(rng, _EXTREME_PHRASES[end])}"
    return None


def _size_comparison(objs, t, rng, size):
    for head_attrs, candidates in _head_options(objs, t, rng, with_size=False):
        target_size = objs[t].obj.size
        if all(objs[c].obj.size != target_size for c in candidates if c != t):
            noun = _noun_phrase(objs[t].obj, head_attrs, rng, article=False)
            if len(candidates) > 2:
                return f"the {_pick(rng, _SIZE_SUPERLATIVES[target_size])} {noun}"
            adjective = _pick(rng, _SIZE_COMPARATIVES[target_size])
            if rng.random() < 0.4:
                nouns = _noun_phrase(objs[t].obj, head_attrs, rng, plural=True, article=False)
                return f"the {adjective} of the two {nouns}"
            return f"the {adjective} {noun}"
    return None


def _distance_comparison(objs, t, rng, size):
    heads = _head_options(objs, t, rng)
    for a, anchor_attrs in _anchors(objs, t, rng) if heads else ():
        for head_attrs, candidates in heads:
            d_target = math.hypot(objs[t].cx - objs[a].cx, objs[t].cy - objs[a].cy)
            d_others = [math.hypot(objs[c].cx - objs[a].cx, objs[c].cy - objs[a].cy) for c in candidates if c != t]
            closer = d_target < _DISTANCE_RATIO * min(d_others) and min(d_others) - d_target > _DISTANCE_GAP * size
            farther = _DISTANCE_RATIO * d_target > max(d_others) and d_target - max(d_others) > _DISTANCE_GAP * size
            if closer or farther:
                words = _DISTANCE_SUPERLATIVES if len(candidates) > 2 else _DISTANCE_COMPARATIVES
                return (
                    f"{_noun_phrase(objs[t].obj, head_attrs, rng)} "
                    f"{_pick(rng, words['closer' if closer else 'farther'])} "
                    f"{_noun_phrase(objs[a].obj, anchor_attrs, rng)}"
                )
    return None


def _comparative_expression(objs, t, rng, size):
    builders = (_size_comparison, _distance_comparison)
    first = int(rng.integers(2))
    return builders[first](objs, t, rng, size) or builders[1 - first](objs, t, rng, size)


# Each builder: (objects, target index, rng, image size) -> the expression, or None when the scene has none clear.
_EXPRESSION_BUILDERS: dict[str, Callable] = {
    "attribute": _attribute_expression,
    "relation": _relation_expression,
    "position": _position_expression,
    "comparative": _comparative_expression,
}


# --- Scenes: attributes, layout, rasterisation ----------------------------------------------------------------------


def _draw_attributes(rng: np.random.Generator, n: int, family: str) -> list[tuple[str, str, str]]:
    """(shape, colour, size) per object, the target first, with look-alikes planted so the family is needed."""
    colors = tuple(COLORS)
    target = (_pick(rng, SHAPES), _pick(rng, colors), _pick(rng, SIZES))
    objects = [target]
    if family == "attribute":
        # Some share the target's shape (then colour or size must be named), a few its shape and colour.
        for _ in range(n - 1):
            roll = rng.random()
            if roll < 0.3:
                objects.append((target[0], _pick(rng, colors), _pick(rng, SIZES)))
            elif roll < 0.45:
                objects.append((target[0], target[1], "big" if target[2] == "small" else "small"))
            else:
                objects.append((_pick(rng, SHAPES), _pick(rng, colors), _pick(rng, SIZES)))
        return objects
    # 1-3 look-alikes of the target's shape (colour shared half the time) make the extra clause necessary;
    # the rest are other shapes, so one of them can anchor a relation.
    room = n - 1 if family == "position" else n - 2
    other_shapes = tuple(s for s in SHAPES if s != target[0])
    for _ in range(int(rng.integers(1, min(3, room) + 1))):
        color = target[1] if rng.random() < 0.5 else _pick(rng, colors)
        objects.append((target[0], color, _pick(rng, SIZES)))
    while len(objects) < n:
        objects.append((_pick(rng, other_shapes), _pick(rng, colors), _pick(rng, SIZES)))
    return objects


def _draw_layout(
    rng: np.random.Generator, attributes: list[tuple[str, str, str]], size: int, object_scale: float = 1.0
) -> list[tuple[float, float, float, float]] | None:
    """(cx, cy, radius, rotation_deg) per object, inside the image and not piled up; None when it does not fit."""
    placed: list[tuple[float, float, float, float]] = []
    for shape, _, size_class in attributes:
        low, high = _RADIUS_RANGE[size_class]
        r = float(rng.uniform(low, high)) * size * object_scale
        rotation = 0.0 if shape in ("circle", "ring") else float(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
        pad = _EXTENT * r + 1
        for _ in range(30):
            cx, cy = (float(v) for v in rng.uniform(pad, size - pad, 2))
            if all(math.hypot(cx - x, cy - y) >= _MIN_CENTRE_DISTANCE * (r + q) for x, y, q, _ in placed):
                placed.append((cx, cy, r, rotation))
                break
        else:
            return None
    return placed


# Unit shapes (in units of the radius), sized to similar areas.
_RING_INNER = 0.55
_SQUARE_HALF = 0.82
_TRIANGLE_CIRCUMRADIUS = 1.2
_STAR_OUTER, _STAR_INNER = 1.15, 0.5
_CROSS_HALF_WIDTH, _CROSS_HALF_LENGTH = 0.32, 1.0
_TRIANGLE_NORMALS = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, rotation_deg: float) -> np.ndarray:
    """Which pixels a shape covers: dx (1, w), dy (h, 1) are pixel centres relative to its centre -> (h, w) bool."""
    if shape in ("circle", "ring"):
        rr = dx * dx + dy * dy
        inside = rr <= r * r
        return inside & (rr >= (_RING_INNER * r) ** 2) if shape == "ring" else inside
    # Screen rotation is counter-clockwise with y pointing down; (u, v) are coordinates in the shape's own frame.
    theta = math.radians(rotation_deg)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * dx - s * dy, s * dx + c * dy  # (h, w) each
    if shape == "square":
        half = _SQUARE_HALF * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        w, length = _CROSS_HALF_WIDTH * r, _CROSS_HALF_LENGTH * r
        return ((au <= w) & (av <= length)) | ((au <= length) & (av <= w))
    if shape == "triangle":
        # Equilateral, apex up: inside the three edges, each at the inradius (half the circumradius).
        inradius = _TRIANGLE_CIRCUMRADIUS * r / 2
        inside = np.ones(u.shape, dtype=bool)
        for nx, ny in _TRIANGLE_NORMALS:
            inside &= u * nx + v * ny <= inradius
        return inside
    # Five-pointed star, a point up: fold the angle into one half-spike, then test against the edge outer -> inner.
    sector = 2 * math.pi / 5
    beta = np.abs(np.mod(np.arctan2(v, u) + math.pi / 2 + sector / 2, sector) - sector / 2)
    rho = np.hypot(u, v)
    outer, inner = _STAR_OUTER * r, _STAR_INNER * r
    ex, ey = inner * math.cos(sector / 2) - outer, inner * math.sin(sector / 2)
    return ex * rho * np.sin(beta) - ey * (rho * np.cos(beta) - outer) >= 0


def _rasterise(
    attributes: list[tuple[str, str, str]], layout: list[tuple[float, float, float, float]], size: int
) -> tuple[np.ndarray, list[tuple[tuple[float, float, float, float], float]]]:
    """Draw objects back to front into a label map ((S, S) int8, 0 = background, i + 1 = object i).

    Returns the map and, per object, (tight box of its visible pixels, visible fraction).
    """
    labels = np.zeros((size, size), dtype=np.int8)
    windows, full_areas = [], []
    for i, ((shape, _, _), (cx, cy, r, rotation)) in enumerate(zip(attributes, layout, strict=True)):
        reach = _EXTENT * r + 1
        x0, x1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)))
        y0, y1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)))
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]  # (1, w)
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]  # (h, 1)
        mask = _shape_mask(shape, dx, dy, r, rotation)  # (h, w)
        labels[y0:y1, x0:x1][mask] = i + 1
        windows.append((x0, y0, x1, y1))
        full_areas.append(int(mask.sum()))
    visible_areas = np.bincount(labels.ravel(), minlength=len(attributes) + 1)
    visible = []
    for i, (x0, y0, x1, y1) in enumerate(windows):
        own = labels[y0:y1, x0:x1] == i + 1  # an object's visible pixels lie inside its own window
        rows, cols = np.flatnonzero(own.any(axis=1)), np.flatnonzero(own.any(axis=0))
        if len(rows) == 0:
            visible.append(((0.0, 0.0, 0.0, 0.0), 0.0))
            continue
        box = (float(x0 + cols[0]), float(y0 + rows[0]), float(x0 + cols[-1] + 1), float(y0 + rows[-1] + 1))
        visible.append((box, int(visible_areas[i + 1]) / max(full_areas[i], 1)))
    return labels, visible


@dataclass(frozen=True)
class _Generated:
    scene: Scene
    text: str
    family: str
    labels: np.ndarray  # (S, S) int8 label map, 0 = background, i + 1 = scene.objects[i]
    rng: np.random.Generator  # the sample's stream, positioned where rendering continues


def _draw_sample(
    rng: np.random.Generator,
    family: str,
    size: int,
    min_objects: int,
    max_objects: int,
    source: str,
    object_scale: float = 1.0,
) -> _Generated:
    """Draw scenes from `rng` until one has a clear expression of `family`."""
    for _ in range(_MAX_ATTEMPTS):
        n = int(rng.integers(min_objects, max_objects + 1))
        attributes = _draw_attributes(rng, n, family)
        layout = _draw_layout(rng, attributes, size, object_scale)
        if layout is None:
            continue
        order = [int(i) for i in rng.permutation(n)]  # drawing order, back to front; the target is attributes[0]
        attributes, layout = [attributes[i] for i in order], [layout[i] for i in order]
        target = order.index(0)
        labels, visible = _rasterise(attributes, layout, size)
        fractions = [fraction for _, fraction in visible]
        if min(fractions) < _MIN_VISIBLE or fractions[target] < _MIN_VISIBLE_REFERRED:
            continue
        objects = tuple(
            SceneObject(shape, color, size_class, (cx, cy), r, rotation, box, fraction)
            for (shape, color, size_class), (cx, cy, r, rotation), (box, fraction) in zip(
                attributes, layout, visible, strict=True
            )
        )
        text = _EXPRESSION_BUILDERS[family]([_Placed.of(o) for o in objects], target, rng, size)
        if text is None:
            continue
        scene = Scene(objects, target, _pick(rng, BACKGROUNDS), size)
        return _Generated(scene, text, family, labels, rng)
    raise VGStudyError(
        f"{source}: no scene with a clear {family!r} expression in {_MAX_ATTEMPTS} draws "
        f"(image_size={size}, objects {min_objects}-{max_objects}); use more objects or a larger image"
    )


# --- Rendering ------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _bilinear_weights(size: int, grid: int) -> np.ndarray:
    """(size, grid) weights that interpolate a coarse grid of values to pixel centres."""
    position = (np.arange(size) + 0.5) / size * (grid - 1)
    low = np.minimum(np.floor(position).astype(int), grid - 2)
    frac = position - low
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), low] = 1 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted textured background, (S, S, 3) float32 in about [25, 150]: dim and unsaturated so objects stand out."""
    if kind == "noise":
        grid = int(rng.integers(4, 9))
        w = _bilinear_weights(size, grid)
        texture = w @ rng.uniform(-1, 1, (grid, grid)).astype(np.float32) @ w.T  # (S, S)
    else:
        angle = rng.uniform(0, math.pi)
        coords = np.arange(size, dtype=np.float32) / size - 0.5
        along = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]  # (S, S)
        if kind == "stripes":
            period = rng.uniform(0.08, 0.25)
            texture = np.sin(along * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi))
        else:
            texture = along * 1.4
    base = rng.uniform(55, 115) + rng.uniform(-12, 12, 3)  # (3,) a dim grey with a faint tint
    tint = rng.uniform(0.7, 1.0, 3) * rng.uniform(10, 24)  # (3,) texture amplitude per channel
    return base.astype(np.float32) + texture[..., None] * tint.astype(np.float32)  # (S, S, 3)


def _render(generated: _Generated) -> np.ndarray:
    """The image of a generated scene, (S, S, 3) uint8; continues the sample's random stream."""
    scene, rng = generated.scene, generated.rng
    image = _background(scene.background, scene.image_size, rng)
    # Row 0 is the background; each object's palette colour, slightly shaded.
    shades = rng.uniform(0.88, 1.0, len(scene.objects))
    colors = np.array([[0, 0, 0]] + [COLORS[o.color] for o in scene.objects], dtype=np.float32)
    colors[1:] *= shades[:, None]
    labels = generated.labels
    image = np.where(labels[..., None] > 0, colors[labels], image)
    return np.clip(image, 0, 255).astype(np.uint8)


# --- The data set ---------------------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"SynthRef: {name} must be an integer >= {low}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ConfigError(f"SynthRef: {name} must be >= {low}, got {value}")
    return int(value)


class SynthRef(Dataset):
    """The procedural referring-expression data set; `dataset[i]` is a `Sample`, a pure function of (seed, split, i).

    split:        one of SPLITS ("train", "val", "testA", "testB").
    n:            number of samples.
    seed:         the data set's seed (>= 0); different seeds and splits give independent scenes.
    image_size:   side of the square images in pixels (>= 32).
    min_objects, max_objects: objects per scene (3 <= min <= max <= 8): a relation needs a target, a look-alike and
                  an anchor.
    families:     expression families to draw from, uniformly (default: all the split allows; testA only
                  "attribute", testB the other three); asking for a family the split excludes is an error.
    object_scale: multiplies every object's size (in [0.5, 2]; 1: radii of 6-14 % of the image side, a target of
                  about 4 % of the image, small next to a 16-pixel patch grid; RefCOCO's targets are larger).
                  Scale 1 draws exactly the scenes it always did.
    """

    def __init__(
        self,
        split: str,
        n: int,
        seed: int = 0,
        image_size: int = 128,
        *,
        min_objects: int = 3,
        max_objects: int = 6,
        families: Sequence[str] | None = None,
        object_scale: float = 1.0,
    ):
        if split not in SPLITS:
            raise ConfigError(f"SynthRef: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.split = split
        self.n = _check_int("n", n, 0)
        self.seed = _check_int("seed", seed, 0)
        self.image_size = _check_int("image_size", image_size, 32)
        self.min_objects = _check_int("min_objects", min_objects, 3)
        self.max_objects = _check_int("max_objects", max_objects, 3)
        if self.min_objects > self.max_objects or self.max_objects > _MAX_OBJECTS:
            raise ConfigError(
                f"SynthRef: need min_objects <= max_objects <= {_MAX_OBJECTS}, "
                f"got min_objects={min_objects}, max_objects={max_objects}"
            )
        if isinstance(object_scale, bool) or not isinstance(object_scale, int | float) or not 0.5 <= object_scale <= 2:
            raise ConfigError(f"SynthRef: object_scale must be a number in [0.5, 2], got {object_scale!r}")
        self.object_scale = float(object_scale)
        allowed = SPLIT_FAMILIES[split]
        if families is None:
            self.families = allowed
        else:
            if isinstance(families, str):
                raise ConfigError(f"SynthRef: families must be a list of family names, got the string {families!r}")
            unknown = [f for f in families if f not in FAMILIES]
            if unknown:
                raise ConfigError(f"SynthRef: unknown families {unknown}; expected some of {', '.join(FAMILIES)}")
            excluded = [f for f in families if f not in allowed]
            if excluded:
                raise ConfigError(
                    f"SynthRef: split {split!r} has no {excluded} expressions; it allows {', '.join(allowed)}"
                )
            if not families:
                raise ConfigError(f"SynthRef: families is empty; give some of {', '.join(allowed)} or None")
            self.families = tuple(dict.fromkeys(families))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"SynthRef(split={self.split!r}, n={self.n}, seed={self.seed}, image_size={self.image_size}, "
            f"objects={self.min_objects}-{self.max_objects}, families={list(self.families)}"
            + (f", object_scale={self.object_scale:g})" if self.object_scale != 1 else ")")
        )

    def _source(self, index: int) -> str:
        return f"synthref:{self.split}:{index}"

    def _index(self, index: int) -> int:
        i = operator.index(index)
        if not -self.n <= i < self.n:
            raise IndexError(f"SynthRef({self.split!r}): index {index} out of range for {self.n} samples")
        return i % self.n

    def _generated(self, index: int) -> _Generated:
        # An independent stream per sample: any index is reachable directly, splits and seeds never share scenes.
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS.index(self.split), index]))
        family = _pick(rng, self.families)
        return _draw_sample(
            rng, family, self.image_size, self.min_objects, self.max_objects, self._source(index), self.object_scale
        )

    def expression(self, index: int) -> tuple[str, str, Scene]:
        """(text, family, scene) of sample `index`, without rendering: the same text `__getitem__` gives."""
        generated = self._generated(self._index(index))
        return generated.text, generated.family, generated.scene

    def scene(self, index: int) -> Scene:
        """The symbolic scene of sample `index`, without rendering (for statistics)."""
        return self.expression(index)[2]

    def __getitem__(self, index: int) -> Sample:
        index = self._index(index)
        generated = self._generated(index)
        image = _render(generated)  # (S, S, 3)
        scene = generated.scene
        return Sample(
            image=torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),  # (3, S, S)
            text=generated.text,
            box_xyxy=torch.tensor(scene.objects[scene.target].box_xyxy, dtype=torch.float32),
            mask=torch.from_numpy(generated.labels == scene.target + 1),  # (S, S)
            source=self._source(index),
            family=generated.family,
            scene=scene,
        )

    def export(self, root: str | Path, name: str = "synthref", image_format: str = "png") -> Path:
        """Write the split as images + a split file in the TransVG release's RefCOCO (`unc`) layout; returns `root`.

        Files: `root/images/<name>_<split>_<index:06d>.<image_format>` and `root/<name>/<name>_<split>.pth`, a list
        of `(image_file_name, index, [x, y, w, h] pixels, expression, [family])` of plain Python types, readable with
        `torch.load(..., weights_only=True)`. Every file is written to a temporary name and renamed, so an interrupted
        export never leaves a half-written file. PNG is lossless: the loader gets back identical pixels.
        """
        from PIL import Image

        formats = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
        if image_format not in formats:
            raise ConfigError(
                f"SynthRef.export: image_format must be one of {', '.join(formats)}, got {image_format!r}"
            )
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_+.-]+", name) or name.startswith("."):
            raise ConfigError(f"SynthRef.export: name must be a plain file-name stem like 'synthref', got {name!r}")
        root = Path(root)
        image_dir, split_dir = root / "images", root / name
        image_dir.mkdir(parents=True, exist_ok=True)
        split_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for i in range(len(self)):
            sample = self[i]
            file_name = f"{name}_{self.split}_{i:06d}.{image_format}"
            picture = Image.fromarray(sample.image.permute(1, 2, 0).numpy())
            _write_atomically(image_dir / file_name, lambda f, p=picture: p.save(f, format=formats[image_format]))
            x1, y1, x2, y2 = sample.box_xyxy.tolist()
            entries.append((file_name, i, [x1, y1, x2 - x1, y2 - y1], sample.text, [sample.family]))
        _write_atomically(split_dir / f"{name}_{self.split}.pth", lambda f: torch.save(entries, f))
        return root


def _write_atomically(path: Path, write: Callable) -> None:
    """Call `write(file)` on a temporary file next to `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
