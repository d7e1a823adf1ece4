"""Synthetic two-object scenes in the style of WhatsUp's Controlled_A / Controlled_B.

They are the training and evaluation data of vislens's model organism (a tiny LLaVA-style
VLM that sees a 48x48 image as a 24x24 grid of 2-pixel patches), so every scene is simple
enough to learn at that resolution and comes with *exact* object boxes.

A scene is a light, plain background with two flat-coloured objects from :data:`OBJECTS`
(each a distinct shape and colour with a one-word name). The question asks where the first
object (subject) is in relation to the second (reference):

* subset ``"a"``: ``left``, ``right`` (side by side), ``on`` (subject resting on top of the
  reference, touching it), ``under`` (directly below it, touching);
* subset ``"b"``: ``left``, ``right``, ``front`` (subject overlaps the reference, is lower in
  the image and larger), ``behind`` (partly occluded by the reference, higher and smaller).

Boxes are tight pixel boxes ``(x0, y0, x1, y1)`` with exclusive ends (pixel columns
``x0 .. x1-1``), of the whole object even where it is occluded.

A :class:`SceneStyle` makes attention work to find the named objects: extra catalogue
objects (distractors, boxes in ``sample.meta["distractors"]``) that may partly occlude a
named object, a textured background and small off-catalogue clutter. The default style is
the plain two-object scene (byte-identical to scenes made before styles existed). Training
data can be skewed towards left/right like LLaVA's (``relation_weights`` of
:func:`generate_scenes`, e.g. ``vislens.organism.RELATION_WEIGHTS``); the balanced groups
(:func:`generate_groups`) are for evaluation. Everything is seeded per scene
from ``(seed, mode, subset, index)``, so the same arguments give identical images, and the
first ``k`` scenes of a run do not depend on how many are generated.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .data.base import Box, Sample
from .errors import VislensError

__all__ = [
    "OBJECTS", "RELATIONS", "OPTIONS", "MIN_SIZE", "PLAIN", "ObjectSpec",
    "Scene", "SceneStyle",
    "object_names", "question_for", "generate_groups", "generate_scenes",
    "write_scenes", "synthesize",
]

MIN_SIZE = 32
"""Smallest image side (pixels) at which objects stay recognisable (about 7-11 px)."""

RELATIONS: dict[str, tuple[str, ...]] = {
    "a": ("left", "right", "on", "under"),
    "b": ("left", "right", "front", "behind"),
}
OPTIONS: dict[str, list[str]] = {s: [r.capitalize() for r in rels] for s, rels in RELATIONS.items()}

_BACKGROUND = (238, 236, 230)
_BG_JITTER = 6
_SUBSET_CODE = {"a": 1, "b": 2}
_MODE_GROUPS, _MODE_IID, _STREAM_PAIRS, _STREAM_RELATIONS = 1, 2, 1, 2


# --------------------------------------------------------------------------- catalogue

@dataclass(frozen=True)
class ObjectSpec:
    """One catalogue object: a single lower-case word, a shape and a flat RGB colour."""

    name: str
    shape: str
    color: tuple[int, int, int]


OBJECTS: tuple[ObjectSpec, ...] = (
    ObjectSpec("ball", "circle", (214, 39, 40)),
    ObjectSpec("box", "square", (31, 90, 220)),
    ObjectSpec("tree", "triangle", (34, 150, 50)),
    ObjectSpec("star", "star", (235, 185, 0)),
    ObjectSpec("ring", "ring", (140, 60, 180)),
    ObjectSpec("cross", "cross", (245, 120, 20)),
    ObjectSpec("diamond", "diamond", (0, 170, 190)),
    ObjectSpec("moon", "crescent", (70, 70, 85)),
    ObjectSpec("house", "pentagon", (140, 85, 40)),
    ObjectSpec("heart", "heart", (235, 90, 170)),
)
_BY_NAME = {o.name: o for o in OBJECTS}


def object_names() -> list[str]:
    """The catalogue's object names, in catalogue order."""
    return [o.name for o in OBJECTS]


def question_for(subj: str, obj: str, subset: str) -> str:
    """The WhatsUp-style question about ``subj`` relative to ``obj`` for ``subset``."""
    rels = RELATIONS[_check_subset(subset)]
    return (f"Where is the {subj} in relation to the {obj}? "
            f"Answer with {', '.join(rels[:-1])} or {rels[-1]}.")


# --------------------------------------------------------------------------- shapes
# Each shape is a predicate on unit coordinates (u, v) in [0, 1]^2 sampled at pixel centres,
# so masks are crisp (no anti-aliasing) and the tight box is exactly the drawn pixels.

def _polygon(vertices: Sequence[tuple[float, float]]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Even-odd point-in-polygon predicate for unit-coordinate vertices."""
    pts = np.asarray(vertices, dtype=np.float64)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.zeros(u.shape, dtype=bool)
        for (x1, y1), (x2, y2) in zip(pts, np.roll(pts, -1, axis=0)):
            if y1 == y2:
                continue
            crosses = (y1 > v) != (y2 > v)
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
            out ^= crosses & (u < x_at)
        return out

    return inside


def _star_vertices(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    """Vertices of a ``points``-pointed star filling the unit square, tip up (fat at low res)."""
    verts = []
    for k in range(2 * points):
        r = 0.56 if k % 2 == 0 else 0.56 * inner
        a = -math.pi / 2 + k * math.pi / points
        verts.append((0.5 + r * math.cos(a), 0.56 + r * math.sin(a)))
    return verts


def _circle(u: np.ndarray, v: np.ndarray, cx: float = 0.5, cy: float = 0.5, r: float = 0.5) -> np.ndarray:
    return (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = (u - 0.5) * 2.5, (0.58 - v) * 2.5
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": lambda u, v: (np.abs(u - 0.5) <= 0.43) & (np.abs(v - 0.5) <= 0.43),
    "triangle": lambda u, v: np.abs(u - 0.5) <= v / 2,
    "star": _polygon(_star_vertices()),
    "ring": lambda u, v: _circle(u, v) & ~_circle(u, v, r=0.27),
    "cross": lambda u, v: ((np.abs(u - 0.5) <= 0.18) | (np.abs(v - 0.5) <= 0.18)),
    "diamond": lambda u, v: np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5,
    "crescent": lambda u, v: _circle(u, v) & ~_circle(u, v, cx=0.8, r=0.42),
    "pentagon": _polygon([(0.5, 0.0), (1.0, 0.45), (1.0, 1.0), (0.0, 1.0), (0.0, 0.45)]),
    "heart": _heart,
}


@lru_cache(maxsize=4096)
def _mask(shape: str, side: int) -> np.ndarray:
    """The shape rasterised in a ``side`` x ``side`` square, cropped to its drawn pixels."""
    c = (np.arange(side, dtype=np.float64) + 0.5) / side
    u, v = np.meshgrid(c, c)
    m = _SHAPES[shape](u, v)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    m = np.ascontiguousarray(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    m.flags.writeable = False
    return m


# --------------------------------------------------------------------------- style

def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SceneStyle:
    """How busy a scene is besides its two named objects (defaults: a plain scene).

    * ``distractors``: ``(lo, hi)``, the number of extra catalogue objects (never the named
      ones) drawn uniformly in ``lo..hi``; placed clear of the named objects' boxes, except:
    * ``occlusion``: probability that the first distractor partly covers one named object
      (10-40% of its box, at least half of its pixels stay visible), drawn over it;
    * ``texture``: amplitude of per-pixel background noise (intensity levels, 0-40);
    * ``clutter``: number of small off-catalogue specks (2-3 px, greys) on the background,
      clear of the named objects' boxes;
    * ``lookalike``: probability that the scene also holds a *look-alike*: an object of the
      colour of one named object (chosen at random) in another catalogue shape, so that
      colour alone does not find the named object (its box is in ``meta["distractors"]``
      with the label ``lookalike:<name>``).

    Distractors, look-alikes and clutter never touch a named object's box unless occluding,
    so the boxes stay exact; without look-alikes each named object is the only one of its
    colour.
    """

    distractors: tuple[int, int] = (0, 0)
    occlusion: float = 0.0
    texture: int = 0
    clutter: int = 0
    lookalike: float = 0.0

    def __post_init__(self) -> None:
        d = self.distractors
        if (not isinstance(d, tuple) or len(d) != 2 or not all(_is_int(x) for x in d)
                or not 0 <= d[0] <= d[1] <= 6):
            raise VislensError(f"style distractors must be (lo, hi) with 0 <= lo <= hi <= 6, got {d!r}")
        if isinstance(self.occlusion, bool) or not isinstance(self.occlusion, (int, float)) \
                or not 0.0 <= self.occlusion <= 1.0:
            raise VislensError(f"style occlusion must be a probability in [0, 1], got {self.occlusion!r}")
        if not _is_int(self.texture) or not 0 <= self.texture <= 40:
            raise VislensError(f"style texture must be an integer in 0..40, got {self.texture!r}")
        if not _is_int(self.clutter) or not 0 <= self.clutter <= 30:
            raise VislensError(f"style clutter must be an integer in 0..30, got {self.clutter!r}")
        if isinstance(self.lookalike, bool) or not isinstance(self.lookalike, (int, float)) \
                or not 0.0 <= self.lookalike <= 1.0:
            raise VislensError(f"style lookalike must be a probability in [0, 1], got {self.lookalike!r}")

    @property
    def plain(self) -> bool:
        return (self.distractors == (0, 0) and self.texture == 0 and self.clutter == 0
                and self.lookalike == 0)

    @classmethod
    def parse(cls, text: str) -> "SceneStyle":
        """``distractors=1-3,occlusion=0.3,texture=12,clutter=8,lookalike=0.5`` (the ``--style`` syntax;
        ``distractors=2`` means exactly 2; ``""`` or ``plain`` is the plain style)."""
        kw: dict = {}
        if text.strip() in ("", "plain"):
            return cls()
        for item in text.split(","):
            key, eq, val = (x.strip() for x in item.partition("="))
            if key in kw:
                raise VislensError(f"style {text!r}: {key} given twice")
            try:
                if not eq or key not in ("distractors", "occlusion", "texture", "clutter",
                                         "lookalike"):
                    raise ValueError
                if key == "distractors":
                    lo, _, hi = val.partition("-")
                    kw[key] = (int(lo), int(hi or lo))
                else:
                    kw[key] = float(val) if key in ("occlusion", "lookalike") else int(val)
            except ValueError:
                raise VislensError(f"style {text!r}: expected distractors=LO-HI, occlusion=P, "
                                   f"texture=N, clutter=N or lookalike=P, got {item.strip()!r}") from None
        return cls(**kw)


PLAIN = SceneStyle()
#: muted off-catalogue colours for clutter specks (far from every catalogue colour)
_CLUTTER = ((150, 150, 150), (180, 172, 160), (125, 132, 140), (200, 192, 175), (165, 160, 175))


# --------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class _Placed:
    """An object mask at integer top-left ``(x, y)``; ``xyxy`` is its exact pixel box."""

    spec: ObjectSpec
    mask: np.ndarray
    x: int
    y: int

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        h, w = self.mask.shape
        return self.x, self.y, self.x + w, self.y + h


def _px(rng: np.random.Generator, lo: float, hi: float, scale: float) -> int:
    """A size in pixels drawn uniformly from ``[lo, hi]`` reference pixels (at 48 px)."""
    return max(3, round(rng.uniform(lo, hi) * scale))


def _jitter(rng: np.random.Generator, amount: int) -> int:
    """A uniform integer offset in ``[-amount, amount]``."""
    return int(rng.integers(-amount, amount + 1))


def _side_by_side(rng, left: np.ndarray, right: np.ndarray, scale: float, room: int):
    """Relative top-lefts of two masks side by side on a common centre line."""
    (hl, wl), (hr, wr) = left.shape, right.shape
    lo, hi = max(1, round(2 * scale)), min(round(12 * scale), room - wl - wr)
    gap = int(rng.integers(lo, max(lo, hi) + 1))
    j = max(1, round(scale))
    return (0, -(hl // 2) + _jitter(rng, j)), (wl + gap, -(hr // 2) + _jitter(rng, j))


def _stacked(rng, top: np.ndarray, bottom: np.ndarray, scale: float):
    """Relative top-lefts of ``top`` resting on ``bottom``: touching, centres aligned."""
    (ht, wt), (_, wb) = top.shape, bottom.shape
    j = max(1, round(scale))
    return (-(wt // 2) + _jitter(rng, j), -ht), (-(wb // 2) + _jitter(rng, j), 0)


def _in_depth(rng, front: np.ndarray, back: np.ndarray):
    """Relative top-lefts of ``front`` (lower, overlapping) and ``back`` (its top half visible)."""
    wf, (hb, wb) = front.shape[1], back.shape
    t = int(rng.integers(math.ceil(0.45 * hb), max(math.ceil(0.45 * hb), int(0.65 * hb)) + 1))
    dx = _jitter(rng, max(1, int(0.35 * wb)))
    return (-(wf // 2) + dx, t), (-(wb // 2), 0)


def _translate(rng: np.random.Generator, rel: list[tuple[int, int]], masks: list[np.ndarray],
               size: int, margin: int) -> list[tuple[int, int]]:
    """Move a relative arrangement to a random spot fully inside the image (with margin)."""
    x0 = min(x for x, _ in rel)
    y0 = min(y for _, y in rel)
    x1 = max(x + m.shape[1] for (x, _), m in zip(rel, masks))
    y1 = max(y + m.shape[0] for (_, y), m in zip(rel, masks))
    if x1 - x0 > size - 2 * margin or y1 - y0 > size - 2 * margin:  # pragma: no cover
        raise AssertionError("synth layout does not fit the image; size/scale constants broken")
    tx = int(rng.integers(margin - x0, size - margin - x1 + 1))
    ty = int(rng.integers(margin - y0, size - margin - y1 + 1))
    return [(x + tx, y + ty) for x, y in rel]


def _depth_sizes(rng, front: ObjectSpec, back: ObjectSpec, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks for a front object and a strictly smaller (in width and height) back object."""
    mf = _mask(front.shape, _px(rng, 13, 16, scale))
    side = max(3, round(mf.shape[0] * rng.uniform(0.62, 0.75)))
    while side > 3 and (_mask(back.shape, side).shape[0] >= mf.shape[0]
                        or _mask(back.shape, side).shape[1] >= mf.shape[1]):
        side -= 1
    return mf, _mask(back.shape, side)


def _layout(rng: np.random.Generator, subj: ObjectSpec, obj: ObjectSpec, relation: str,
            subset: str, size: int) -> list[_Placed]:
    """Place subject and reference for ``relation``; returned in drawing order (back first)."""
    scale = size / 48
    margin = max(1, round(2 * scale))
    if relation in ("left", "right"):
        if subset == "b":  # same depth, same nominal size: size stays a pure depth cue
            s = _px(rng, 11, 15, scale)
            ms, mo = _mask(subj.shape, s), _mask(obj.shape, s)
        else:
            ms, mo = _mask(subj.shape, _px(rng, 10, 16, scale)), _mask(obj.shape, _px(rng, 10, 16, scale))
        pair = (ms, mo) if relation == "left" else (mo, ms)
        rel = list(_side_by_side(rng, *pair, scale, size - 2 * margin))
        if relation == "right":
            rel.reverse()
        order = [(subj, ms), (obj, mo)]
    elif relation in ("on", "under"):
        ms, mo = _mask(subj.shape, _px(rng, 10, 16, scale)), _mask(obj.shape, _px(rng, 10, 16, scale))
        if relation == "on":
            rel = list(_stacked(rng, ms, mo, scale))
        else:
            rel = list(_stacked(rng, mo, ms, scale))[::-1]
        order = [(subj, ms), (obj, mo)]
    else:  # front / behind
        front, back = (subj, obj) if relation == "front" else (obj, subj)
        mf, mb = _depth_sizes(rng, front, back, scale)
        f_xy, b_xy = _in_depth(rng, mf, mb)
        rel, order = [b_xy, f_xy], [(back, mb), (front, mf)]
    xy = _translate(rng, rel, [m for _, m in order], size, margin)
    return [_Placed(spec, m, x, y) for (spec, m), (x, y) in zip(order, xy)]


def _render(placed: Sequence[_Placed], size: int, background: tuple[int, int, int],
            base: np.ndarray | None = None) -> Image.Image:
    """Paint the objects in order (later ones over earlier ones) on a flat background (or on
    ``base``, a prepared ``[size, size, 3]`` background)."""
    if base is None:
        arr = np.empty((size, size, 3), dtype=np.uint8)
        arr[:] = background
    else:
        arr = base.copy()
    for p in placed:
        h, w = p.mask.shape
        arr[p.y:p.y + h, p.x:p.x + w][p.mask] = p.spec.color
    return Image.fromarray(arr, "RGB")


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], pad: int = 0) -> int:
    """Area of the intersection of two xyxy boxes, ``b`` grown by ``pad`` pixels."""
    w = min(a[2], b[2] + pad) - max(a[0], b[0] - pad)
    h = min(a[3], b[3] + pad) - max(a[1], b[1] - pad)
    return max(0, w) * max(0, h)


def _visible_fraction(p: _Placed, over: _Placed) -> float:
    """Share of ``p``'s pixels not covered by ``over`` (drawn after it)."""
    cover = np.zeros((p.mask.shape[0], p.mask.shape[1]), dtype=bool)
    x0, y0 = over.x - p.x, over.y - p.y
    h, w = over.mask.shape
    ys, xs = slice(max(0, y0), max(0, min(cover.shape[0], y0 + h))), \
        slice(max(0, x0), max(0, min(cover.shape[1], x0 + w)))
    cover[ys, xs] = over.mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return float((p.mask & ~cover).sum() / p.mask.sum())


def _place_distractors(rng: np.random.Generator, named: list[_Placed], style: SceneStyle,
                       size: int) -> list[_Placed]:
    """Distractor objects for ``style`` (see :class:`SceneStyle`), in drawing order."""
    scale = size / 48
    margin = max(1, round(2 * scale))
    lo, hi = style.distractors
    want = int(rng.integers(lo, hi + 1))
    occlude = want > 0 and rng.random() < style.occlusion
    names = {p.spec.name for p in named}
    pool = [o for o in OBJECTS if o.name not in names]
    specs = [pool[i] for i in rng.permutation(len(pool))[:want]]
    out: list[_Placed] = []
    for k, spec in enumerate(specs):
        mask = _mask(spec.shape, _px(rng, 9, 13, scale))
        h, w = mask.shape
        target = named[int(rng.integers(len(named)))] if k == 0 and occlude else None
        for _ in range(80):
            x = int(rng.integers(margin, size - margin - w + 1))
            y = int(rng.integers(margin, size - margin - h + 1))
            cand = _Placed(spec, mask, x, y)
            box = cand.xyxy
            if any(_overlap(box, d.xyxy, 1) for d in out):
                continue
            hits = [p for p in named if _overlap(box, p.xyxy, 1)]
            if target is None:
                if hits:
                    continue
            else:
                if hits != [target] or _overlap(box, named[1 - named.index(target)].xyxy, 1):
                    continue
                tb = target.xyxy
                share = _overlap(box, tb) / ((tb[2] - tb[0]) * (tb[3] - tb[1]))
                if not 0.1 <= share <= 0.4 or _visible_fraction(target, cand) < 0.5:
                    continue
            out.append(cand)
            break
    if style.lookalike > 0 and rng.random() < style.lookalike:
        _place_lookalike(rng, named, out, size)
    return out


def _place_lookalike(rng: np.random.Generator, named: list[_Placed], out: list[_Placed],
                     size: int) -> None:
    """Append to ``out`` an object in the colour of a random named object and another
    catalogue shape (not a named object's shape), clear of every box (skipped when no spot
    is free after 80 tries)."""
    scale = size / 48
    margin = max(1, round(2 * scale))
    twin = named[int(rng.integers(len(named)))].spec
    shapes = sorted({o.shape for o in OBJECTS} - {p.spec.shape for p in named})
    spec = ObjectSpec(f"lookalike:{twin.name}", shapes[int(rng.integers(len(shapes)))], twin.color)
    mask = _mask(spec.shape, _px(rng, 9, 13, scale))
    h, w = mask.shape
    for _ in range(80):
        x = int(rng.integers(margin, size - margin - w + 1))
        y = int(rng.integers(margin, size - margin - h + 1))
        cand = _Placed(spec, mask, x, y)
        if any(_overlap(cand.xyxy, p.xyxy, 1) for p in [*named, *out]):
            continue
        out.append(cand)
        return


def _background(rng: np.random.Generator, colour: tuple[int, int, int], named: list[_Placed],
                style: SceneStyle, size: int) -> np.ndarray | None:
    """The textured, cluttered background of ``style`` (``None`` when it is flat)."""
    if style.texture == 0 and style.clutter == 0:
        return None
    arr = np.empty((size, size, 3), dtype=np.int16)
    arr[:] = colour
    if style.texture:
        arr += rng.integers(-style.texture, style.texture + 1, (size, size, 1), dtype=np.int16)
    for _ in range(style.clutter):
        side = int(rng.integers(2, 4))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        if any(_overlap((x, y, x + side, y + side), p.xyxy, 1) for p in named):
            continue
        arr[y:y + side, x:x + side] = _CLUTTER[int(rng.integers(len(_CLUTTER)))]
    return np.clip(arr, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- scenes

@dataclass
class Scene:
    """One rendered scene: the image and its benchmark record.

    ``sample.image_path`` is the path :func:`write_scenes` will write the PNG to, relative to
    the JSONL file (``images/<id>.png``); ``sample.meta["subset"]`` is ``"a"`` or ``"b"``.
    """

    image: Image.Image
    sample: Sample

    def record(self) -> dict:
        """The scene's JSONL object (generic vislens JSONL format); distractor boxes go to
        ``meta.distractors`` (only when there are any)."""
        s = self.sample
        rec = {
            "id": s.id, "image": s.image_path, "question": s.question, "options": list(s.options),
            "answer": s.answer, "relation": s.relation, "group": s.group, "objects": list(s.objects),
            "boxes": [{"label": b.label, "xyxy": [int(v) for v in b.xyxy]} for b in s.boxes],
        }
        if s.meta.get("distractors"):
            rec["meta"] = {"distractors": s.meta["distractors"]}
        return rec


def _scene_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _make_scene(rng: np.random.Generator, scene_id: str, subj: str, obj: str, relation: str,
                subset: str, size: int, group: str = "", style: SceneStyle = PLAIN) -> Scene:
    """Lay out, render and describe one scene."""
    s_spec, o_spec = _BY_NAME[subj], _BY_NAME[obj]
    background = tuple(int(c) for c in np.asarray(_BACKGROUND) + rng.integers(-_BG_JITTER, _BG_JITTER + 1, 3))
    placed = _layout(rng, s_spec, o_spec, relation, subset, size)
    meta = {"subset": subset, "source": "vislens.synth", "size": size}
    if style.plain:
        image = _render(placed, size, background)
    else:  # style randomness is drawn after the layout: plain scenes stay unchanged
        extra = _place_distractors(rng, placed, style, size)
        base = _background(rng, background, placed, style, size)
        image = _render(placed + extra, size, background, base)
        meta["distractors"] = [{"label": p.spec.name, "xyxy": list(p.xyxy)} for p in extra]
    box_of = {p.spec.name: Box(p.spec.name, tuple(float(v) for v in p.xyxy)) for p in placed}
    sample = Sample(
        id=scene_id, image_path=f"images/{scene_id}.png", question=question_for(subj, obj, subset),
        options=list(OPTIONS[subset]), answer=relation.capitalize(), relation=relation, group=group,
        objects=[subj, obj], boxes=[box_of[subj], box_of[obj]], meta=meta,
    )
    return Scene(image, sample)


def generate_groups(n_groups: int, subset: str, seed: int, size: int = 48,
                    objects: Sequence[str] | None = None,
                    style: SceneStyle = PLAIN) -> list[Scene]:
    """Balanced evaluation scenes: ``n_groups`` groups of one ordered pair in every relation.

    Each group holds 4 scenes of the same ``(subject, reference)`` pair, one per relation of
    ``subset`` (the WhatsUp pair/set-accuracy unit). Pairs are taken from a seeded shuffle of
    all ordered pairs of ``objects`` (default: the whole catalogue), reshuffled when used up;
    the group key is ``"subj|obj"``, with ``#2``, ``#3``... appended when a pair repeats.
    ``style`` adds distractors, occlusion, texture and clutter (:class:`SceneStyle`).
    """
    _check_positive("n_groups", n_groups)
    _check_style(style)
    subset, names = _check_subset(subset), _check_objects(objects)
    _check_seed(seed)
    _check_size(size)
    code = _SUBSET_CODE[subset]
    pairs = [(a, b) for a in names for b in names if a != b]
    pair_rng = _scene_rng(seed, _MODE_GROUPS, code, 0, _STREAM_PAIRS)
    order: list[tuple[str, str]] = []
    while len(order) < n_groups:
        order.extend(pairs[i] for i in pair_rng.permutation(len(pairs)))
    seen: dict[str, int] = {}
    scenes = []
    for g, (subj, obj) in enumerate(order[:n_groups]):
        key = f"{subj}|{obj}"
        seen[key] = seen.get(key, 0) + 1
        group = key if seen[key] == 1 else f"{key}#{seen[key]}"
        for r, relation in enumerate(RELATIONS[subset]):
            rng = _scene_rng(seed, _MODE_GROUPS, code, 1, g, r)
            scenes.append(_make_scene(rng, f"{subset}_g{g:05d}_{relation}", subj, obj,
                                      relation, subset, size, group, style))
    return scenes


def generate_scenes(n: int, subset: str, seed: int,
                    relation_weights: Mapping[str, float] | None = None, size: int = 48,
                    objects: Sequence[str] | None = None,
                    style: SceneStyle = PLAIN) -> list[Scene]:
    """I.i.d. scenes whose relation is drawn with ``relation_weights`` (default: uniform).

    Used for training with a familiarity bias, e.g. ``{"left": 4, "right": 4, "on": 1,
    "under": 1}``; relations missing from the mapping get weight 0. The subject/reference
    pair is a uniform ordered pair of distinct ``objects``. ``group`` is empty. ``style`` as
    in :func:`generate_groups`.
    """
    _check_positive("n", n)
    _check_style(style)
    subset, names = _check_subset(subset), _check_objects(objects)
    _check_seed(seed)
    _check_size(size)
    code = _SUBSET_CODE[subset]
    rels = RELATIONS[subset]
    p = _relation_probs(relation_weights, subset)
    drawn = _scene_rng(seed, _MODE_IID, code, 0, _STREAM_RELATIONS).choice(len(rels), size=n, p=p)
    scenes = []
    for i, k in enumerate(drawn):
        rng = _scene_rng(seed, _MODE_IID, code, 1, i)
        a, b = rng.choice(len(names), size=2, replace=False)
        scenes.append(_make_scene(rng, f"{subset}_s{i:06d}", names[a], names[b], rels[k], subset,
                                  size, style=style))
    return scenes


# --------------------------------------------------------------------------- output

def write_scenes(items: Iterable[Scene], out_dir: str | os.PathLike, name: str = "scenes.jsonl") -> Path:
    """Write each scene's PNG under ``out_dir`` and their records to ``out_dir/name``.

    Image paths in the JSONL are relative to it (``images/<id>.png``). Returns the JSONL path.
    The JSONL is written to a temporary file and renamed, so a failure leaves no partial file.
    """
    scenes = list(items)
    if not scenes:
        raise VislensError("write_scenes: items is empty; nothing to write")
    ids = [s.sample.id for s in scenes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise VislensError(f"write_scenes: duplicate scene id {dup!r} in items")
    out = Path(out_dir)
    for s in scenes:
        rel = Path(s.sample.image_path)
        if rel.is_absolute() or ".." in rel.parts:
            raise VislensError(f"write_scenes: image_path {s.sample.image_path!r} of scene "
                               f"{s.sample.id!r} must be relative and inside out_dir")
    jsonl = out / name
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    for s in scenes:
        path = out / s.sample.image_path
        path.parent.mkdir(parents=True, exist_ok=True)
        s.image.save(path, format="PNG")
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for s in scenes:
            f.write(json.dumps(s.record(), ensure_ascii=False) + "\n")
    os.replace(tmp, jsonl)
    return jsonl


def synthesize(out_dir: str | os.PathLike, n: int, seed: int,
               subsets: Sequence[str] = ("a", "b"), size: int = 48,
               style: SceneStyle = PLAIN) -> Path:
    """Write balanced Controlled-style sets: ``out_dir/controlled_{subset}.jsonl`` + images.

    ``n`` is the number of scenes per subset, rounded up to whole groups of 4. Backs
    ``vislens synth --out DIR --n N --seed S``; the same arguments give byte-identical files.
    ``style``: distractors, occlusion, texture, clutter (``--style``). Returns ``out_dir``.
    """
    _check_positive("n", n)
    _check_style(style)
    if isinstance(subsets, str) or not subsets:
        raise VislensError(f"subsets must be a non-empty sequence of 'a'/'b', got {subsets!r}")
    subsets = list(dict.fromkeys(_check_subset(s) for s in subsets))
    _check_seed(seed)
    _check_size(size)
    out = Path(out_dir)
    for subset in subsets:
        scenes = generate_groups(math.ceil(n / 4), subset, seed, size=size, style=style)
        write_scenes(scenes, out, name=f"controlled_{subset}.jsonl")
    return out


# --------------------------------------------------------------------------- validation

def _check_positive(arg: str, value: object) -> None:
    if not _is_int(value) or value <= 0:
        raise VislensError(f"{arg} must be a positive integer, got {value!r}")


def _check_seed(seed: object) -> None:
    if not _is_int(seed) or seed < 0:
        raise VislensError(f"seed must be a non-negative integer, got {seed!r}")


def _check_size(size: object) -> None:
    if not _is_int(size) or size < MIN_SIZE:
        raise VislensError(f"size must be an integer >= {MIN_SIZE} (image side in pixels), got {size!r}")


def _check_style(style: object) -> None:
    if not isinstance(style, SceneStyle):
        raise VislensError(f"style must be a vislens.synth.SceneStyle, got {style!r}")


def _check_subset(subset: object) -> str:
    if subset not in RELATIONS:
        raise VislensError(f"subset must be 'a' or 'b', got {subset!r}")
    return str(subset)


def _check_objects(objects: Sequence[str] | None) -> list[str]:
    if objects is None:
        return object_names()
    names = list(dict.fromkeys(objects)) if not isinstance(objects, str) else [objects]
    unknown = [o for o in names if o not in _BY_NAME]
    if unknown:
        raise VislensError(f"objects: unknown object {unknown[0]!r} (known: {', '.join(object_names())})")
    if len(names) < 2:
        raise VislensError(f"objects must name at least 2 distinct objects, got {list(objects)!r}")
    return names


def _relation_probs(weights: Mapping[str, float] | None, subset: str) -> np.ndarray:
    """Normalised relation probabilities in ``RELATIONS[subset]`` order."""
    rels = RELATIONS[subset]
    if weights is None:
        return np.full(len(rels), 1 / len(rels))
    if not isinstance(weights, Mapping):
        raise VislensError(f"relation_weights must be a dict of relation -> weight, got {weights!r}")
    for rel, w in weights.items():
        if rel not in rels:
            raise VislensError(f"relation_weights: unknown relation {rel!r} for subset {subset!r} "
                               f"(expected {', '.join(rels)})")
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not math.isfinite(w) or w < 0:
            raise VislensError(f"relation_weights: weight of {rel!r} must be a finite number >= 0, got {w!r}")
    p = np.array([float(weights.get(r, 0.0)) for r in rels])
    if p.sum() <= 0:
        raise VislensError(f"relation_weights: weights must not all be zero, got {dict(weights)!r}")
    return p / p.sum()
