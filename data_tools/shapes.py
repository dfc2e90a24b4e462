"""Procedural "shapes" scenes with exact captions (docs/design.md §8): world model, caption grammar, renderer, shard job.

This is the grammar module shared by the generator and the exact scorer (`evals/shapes_score.py`).

World. A scene holds 1-3 objects, each (shape, colour, size, cell), on a grey background.
- Shapes (upright, fit a unit box): circle, square, triangle, star, heart, cross, diamond, ring.
- Colours: 8 named RGB values, each object jittered by up to ±JITTER per channel.
- Sizes: the larger side of the box is 0.20 (small) or 0.30 (large) of the canvas, ±5 %.
  The scorer is not what sets the small size. On clean 32 px renders it names small shapes 99.8 % right at 0.12
  (4 px) and 100 % from 0.16 (5 px), over about 580 small objects each. 0.20 (6.4 px; the ring's hole is 3 px)
  is chosen so a person, or a small model, can still tell the 8 shapes apart at 32 px.
- Positions: a 3x3 grid of cells. Each object's area centroid lies at least CELL_MARGIN inside its own cell, and
  no two objects share a cell. The caption's position fact is the cell that holds the centroid. Training scenes
  may narrow that range (`position_jitter`, 0: the cell's centre): a caption then fixes where the object is, so
  a small model sees each shape at one place per cell rather than smeared over 6 px (docs/drawing.md).
- No overlaps: boxes are kept GAP apart by rejection sampling. Objects of one colour never touch, so connected
  components separate them.
- Background: a neutral grey with grey value in [120, 136] (L* about 54). Half the scenes also get a faint wave
  (±6) and pixel noise (sigma 3). Mid grey is the palette-free colour farthest from both white and black, so white
  and black objects stay as clear as the chromatic ones.
- Rendering: each pixel's coverage is the share of its 4x4 sub-pixel centres inside the shape, and the pixel is
  coverage * colour + (1 - coverage) * background. This is the same as drawing at 4x and box-downsampling. The
  scorer renders its shape templates with the same `coverage` function.

Caption language. It is regular and is exactly the image of `format_caption`:
    S   -> NP | NP and NP | NP, NP and NP | NP REL NP
    NP  -> ART SIZE? COLOR SHAPE (in the POS)?        ART: "an" before a vowel ("an orange star"), else "a"
    REL -> to the left of | to the right of | above | below
    POS -> top left | top middle | top right | middle left | center | middle right | bottom left | ...
Beyond the basic grammar: "NP, NP and NP" names all three objects of a 3-object scene; the article agrees with the
next word. Lower case, no final period. The generator names every object exactly once, size and position each
with p = 0.5, and REL captions carry no positions. So a caption asserts these atomic facts (`caption_facts`):
    ("count", n)        the scene has exactly n objects (the number of NPs)
    ("colour", k, c)    ("shape", k, s)       for every NP, about the object k it refers to
    ("size", k, z)      ("position", k, cell) only when the NP gives them
    ("relation", a, "left_of" | "above", b)   "right of" and "below" are stored as the swapped left_of or above
A relation holds when the centroids differ by more than REL_MARGIN (in canvas units). The generator asserts one
only when the margin is at least REL_MARGIN + REL_SLACK in the rendered scene.

Splits. "train" never shows a HELDOUT_PAIRS colour-shape pair. It never captions a HELDOUT_RELATIONS shape as
the subject of that relation; the same scene can still be captioned the other way round. "heldout" alternates two
kinds. Even indices have at least one object with a held-out pair. Odd indices have a 2-object relation caption
with a held-out subject-relation pair. `meta["heldout"]` records which kind.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image as PILImage

from nextx.documents import Document, Image, Text, write_shards

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 210, 30),
    "purple": (140, 60, 190), "orange": (245, 135, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SIZES: dict[str, float] = {"small": 0.20, "large": 0.30}  # larger box side as a share of the canvas side
SIZE_THRESHOLD = 0.25        # the scorer's small/large boundary, between 0.20*1.05 and 0.30*0.95
CELLS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right")  # row-major: index = 3 * row + column
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELDOUT_PAIRS = (("green", "star"), ("purple", "heart"), ("blue", "triangle"),
                 ("yellow", "ring"), ("orange", "cross"), ("white", "diamond"))
HELDOUT_RELATIONS = (("square", "above"), ("heart", "to the left of"))  # (subject shape, relation)

JITTER = 8                   # max per-channel colour jitter of an object
BG_GREY = (120, 136)         # background grey range
WAVE_AMP, NOISE_SIGMA = 6.0, 3.0  # texture of the textured backgrounds, in grey levels
SUPERSAMPLE = 4              # sub-pixels per pixel side for coverage
CELL_MARGIN = 0.07           # centroid distance from its cell's border, canvas units
EDGE_MARGIN = 0.03           # box distance from the canvas border
GAP = 0.08                   # min gap between two boxes (2.6 px at 32 px), so components never merge
REL_MARGIN = 0.10            # a relation holds when centroids differ by more than this (scorer and facts)
REL_SLACK = 0.04             # extra margin the generator demands, so detection noise cannot flip a relation
P_SIZE, P_POS, P_RELATION = 0.5, 0.5, 0.5
SPLITS = {"train": 0, "heldout": 1}


class ParseError(ValueError):
    """Text outside the caption language; the message says where."""


# ---------------------------------------------------------------------------------------------------------
# Shape geometry: unit box of larger side 1 centred at (0, 0), v pointing down.


def _normalised(pts: np.ndarray) -> np.ndarray:
    """(K, 2) polygon -> the same polygon centred on its box, larger box side 1."""
    lo, hi = pts.min(0), pts.max(0)
    return (pts - (lo + hi) / 2) / (hi - lo).max()


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    ang = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)  # fat points survive 6 px renders
    return _normalised(np.stack([r * np.cos(ang), r * np.sin(ang)], 1))


def _heart(k: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return _normalised(np.stack([x, y], 1))


_A = 0.18  # half-width of the cross's arms
POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[-.5, -.5], [.5, -.5], [.5, .5], [-.5, .5]]),
    "triangle": np.array([[0, -.5], [.5, .5], [-.5, .5]]),
    "diamond": np.array([[0, -.5], [.4, 0], [0, .5], [-.4, 0]]),
    "cross": np.array([[-_A, -.5], [_A, -.5], [_A, -_A], [.5, -_A], [.5, _A], [_A, _A], [_A, .5], [-_A, .5],
                       [-_A, _A], [-.5, _A], [-.5, -_A], [-_A, -_A]]),
    "star": _star(), "heart": _heart(),
}
RING_INNER = 0.5  # inner/outer radius of the ring


def _polygon_area_centroid(p: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = p[:, 0], p[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y  # shoelace terms
    a = cross.sum() / 2
    c = np.array([((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()]) / (6 * a)
    return abs(a), c


def _geometry() -> dict[str, tuple[float, np.ndarray, np.ndarray]]:
    """shape -> (area, centroid offset from the box centre, box (w, h)), all in units of the larger box side."""
    out = {"circle": (np.pi / 4, np.zeros(2), np.ones(2)),
           "ring": (np.pi / 4 * (1 - RING_INNER ** 2), np.zeros(2), np.ones(2))}
    for s, p in POLYGONS.items():
        a, c = _polygon_area_centroid(p)
        out[s] = (a, c, p.max(0) - p.min(0))
    return out


GEOMETRY = _geometry()


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape on a grid: u (1, W) and v (H, 1) unit coordinates -> (H, W) bool."""
    if shape in ("circle", "ring"):
        r2 = u * u + v * v
        return (r2 <= 0.25) & (r2 >= 0.25 * RING_INNER ** 2) if shape == "ring" else r2 <= 0.25
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    p = POLYGONS[shape]
    for (x1, y1), (x2, y2) in zip(p, np.roll(p, -1, 0)):  # crossing number, one row test per edge
        if y1 == y2:
            continue
        spans = (y1 > v) != (y2 > v)                      # (H, 1)
        x_cut = x1 + (v - y1) * (x2 - x1) / (y2 - y1)     # (H, 1)
        inside ^= spans & (u < x_cut)
    return inside


def coverage(shape: str, centre: tuple[float, float], extent: float, window: tuple[int, int, int, int],
             ss: int = SUPERSAMPLE) -> np.ndarray:
    """Share of each pixel covered by a shape. Returns an (y1 - y0, x1 - x0) float array in [0, 1].

    centre: the box centre (x, y) in pixels. extent: the larger box side in pixels. window: (x0, y0, x1, y1)
    in integer pixels. Each pixel is tested at ss x ss sub-pixel centres, so the estimate is unbiased.
    """
    x0, y0, x1, y1 = window
    u = ((x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss) - centre[0]) / extent
    v = ((y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss) - centre[1]) / extent
    hit = _inside(shape, u[None, :], v[:, None]).astype(np.float32)
    return hit.reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3))


# ---------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Obj:
    """One object. Geometry is in canvas units ([0, 1], y down), so one scene renders at any size."""

    shape: str
    colour: str
    size: str
    cell: str
    rgb: tuple[int, int, int]
    extent: float                     # larger box side
    centroid: tuple[float, float]     # area centroid (x, y)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the shape's box."""
        _, off, wh = GEOMETRY[self.shape]
        c = np.asarray(self.centroid) - off * self.extent
        lo, hi = c - wh * self.extent / 2, c + wh * self.extent / 2
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    def as_meta(self) -> dict:
        """JSON form stored in shard meta; the scorer reads truth objects in this form (detections too)."""
        d = asdict(self)
        d["centroid"] = [round(x, 5) for x in self.centroid]
        d["box"] = [round(x, 5) for x in self.box]
        d["extent"], d["rgb"] = round(self.extent, 5), list(self.rgb)
        return d


@dataclass(frozen=True)
class Background:
    grey: int
    textured: bool
    wave: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (fx, fy, phase) of the faint sinusoid
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: Background


def cell_of(x: float, y: float) -> str:
    """The grid cell holding a point (x, y) in canvas units."""
    return CELLS[3 * min(int(y * 3), 2) + min(int(x * 3), 2)]


def cell_tokens(cell: str, grid: tuple[int, int]) -> np.ndarray:
    """The tokens of an (h, w) grid over the canvas whose centres lie in `cell` (one of CELLS) -> (h, w) bool.
    E.g. on the 8x8 grid of 4 px patches at 32 px, "top left" is rows 0-2 and columns 0-2 (centres 2, 6, 10 px <
    10.7 px), "center" rows and columns 3-4."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; cells are {CELLS}")
    r, c = divmod(CELLS.index(cell), 3)
    rows, cols = ((np.floor((np.arange(n) + 0.5) * 3 / n)).astype(int) for n in grid)
    return (rows[:, None] == r) & (cols[None, :] == c)


def _place(rng: np.random.Generator, shape: str, size: str, cell: str,
           jitter: float = 1.0) -> tuple[float, tuple[float, float]] | None:
    """Draw extent and centroid so the centroid sits CELL_MARGIN inside `cell`, the box inside the canvas.

    jitter in [0, 1]: the share of that allowed range the centroid is drawn from, around its middle (1: all of it;
    0: the middle, the cell's centre away from the canvas border). The same random draws either way."""
    extent = SIZES[size] * rng.uniform(0.95, 1.05)
    _, off, wh = GEOMETRY[shape]
    i = CELLS.index(cell)
    xy = []
    for axis, k in ((0, i % 3), (1, i // 3)):
        lo = max(k / 3 + CELL_MARGIN, EDGE_MARGIN + (wh[axis] / 2 + off[axis]) * extent)
        hi = min((k + 1) / 3 - CELL_MARGIN, 1 - EDGE_MARGIN - (wh[axis] / 2 - off[axis]) * extent)
        if lo > hi:
            return None
        v = float(rng.uniform(lo, hi))
        xy.append(v if jitter == 1.0 else (lo + hi) / 2 + jitter * (v - (lo + hi) / 2))
    return extent, (xy[0], xy[1])


def _apart(a: Obj, b: Obj) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    return max(bx0 - ax1, ax0 - bx1) >= GAP or max(by0 - ay1, ay0 - by1) >= GAP


def _attributes(rng: np.random.Generator, n: int, banned: set[tuple[str, str]],
                forced: tuple[str, str] | None, forced_shape: str | None) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs avoiding `banned`; slot 0 gets `forced` or `forced_shape` when given."""
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        pair = (COLOURS[rng.integers(8)], SHAPES[rng.integers(8)])
        if not pairs and forced:
            pair = forced
        elif not pairs and forced_shape:
            pair = (pair[0], forced_shape)
        if pair not in pairs and (pair not in banned or (not pairs and forced)):
            pairs.append(pair)
    return pairs


def sample_scene(rng: np.random.Generator, *, n_objects: int | None = None,
                 banned: Sequence[tuple[str, str]] = (), forced: tuple[str, str] | None = None,
                 forced_shape: str | None = None, position_jitter: float = 1.0) -> Scene:
    """A random scene. The (colour, shape) pairs are distinct, no pair is in `banned`, and object 0 is `forced`.
    position_jitter: the share of each cell's allowed centroid range used (`_place`); below 1, scenes whose
    objects would come closer than GAP are redrawn, so neighbouring large objects grow rarer.

    n_objects: 1-3, uniform when None. Rejection sampling: up to 50 position draws per attribute draw, then new
    attributes (measured: 3-object scenes take about 15 position draws on average).
    """
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    while True:
        pairs = _attributes(rng, n, set(banned), forced, forced_shape)
        sizes = [("small", "large")[rng.integers(2)] for _ in range(n)]
        cells = [CELLS[i] for i in rng.permutation(9)[:n]]
        rgbs = [tuple(min(max(int(c), 0), 255) for c in np.add(PALETTE[col], rng.integers(-JITTER, JITTER + 1, 3)))
                for col, _ in pairs]
        for _ in range(50):
            objs = []
            for (colour, shape), size, cell, rgb in zip(pairs, sizes, cells, rgbs):
                placed = _place(rng, shape, size, cell, position_jitter)
                if placed is None:
                    break
                objs.append(Obj(shape, colour, size, cell, rgb, placed[0], placed[1]))
            if len(objs) == n and all(_apart(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]):
                textured = bool(rng.random() < 0.5)
                wave = (float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2)), float(rng.uniform(0, 2 * np.pi)))
                bg = Background(int(rng.integers(BG_GREY[0], BG_GREY[1] + 1)), textured,
                                wave if textured else (0.0, 0.0, 0.0), int(rng.integers(2 ** 31)))
                return Scene(tuple(objs), bg)


def render(scene: Scene, size: int) -> PILImage.Image:
    """Scene -> (size, size) RGB image; coverage-weighted compositing (= draw at 4x, box-downsample)."""
    bg = scene.background
    img = np.full((size, size, 3), float(bg.grey), np.float32)
    if bg.textured:
        t = (np.arange(size) + 0.5) / size
        fx, fy, ph = bg.wave
        img += (WAVE_AMP * np.sin(2 * np.pi * (fx * t[None, :] + fy * t[:, None]) + ph))[..., None]
        img += np.random.default_rng(bg.noise_seed).normal(0, NOISE_SIGMA, (size, size, 1)).astype(np.float32)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        win = (max(int(x0 * size) - 1, 0), max(int(y0 * size) - 1, 0),
               min(int(np.ceil(x1 * size)) + 1, size), min(int(np.ceil(y1 * size)) + 1, size))
        cx, cy = (x0 + x1) / 2 * size, (y0 + y1) / 2 * size
        a = coverage(o.shape, (cx, cy), o.extent * size, win)[..., None]   # (h, w, 1)
        patch = img[win[1]:win[3], win[0]:win[2]]
        img[win[1]:win[3], win[0]:win[2]] = patch * (1 - a) + a * np.asarray(o.rgb, np.float32)
    return PILImage.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------------
# Captions: grammar, generation, parsing, facts


@dataclass(frozen=True)
class NP:
    colour: str
    shape: str
    size: str | None = None
    cell: str | None = None


@dataclass(frozen=True)
class Caption:
    nps: tuple[NP, ...]
    relation: str | None = None   # one of RELATIONS, between nps[0] (subject) and nps[1]

    def __post_init__(self) -> None:
        if not 1 <= len(self.nps) <= 3 or (self.relation is not None and len(self.nps) != 2):
            raise ValueError(f"a caption has 1-3 noun phrases and a relation only between two: {self}")


def _np_text(np_: NP) -> str:
    words = ([np_.size] if np_.size else []) + [np_.colour, np_.shape]
    art = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([art] + words) + (f" in the {np_.cell}" if np_.cell else "")


def format_caption(c: Caption) -> str:
    """Caption -> text: the generator's only way to write, so the language is exactly its image."""
    t = [_np_text(n) for n in c.nps]
    if c.relation:
        return f"{t[0]} {c.relation} {t[1]}"
    return t[0] if len(t) == 1 else ", ".join(t[:-1]) + " and " + t[-1]


def _alt(words: Sequence[str]) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))  # longest first: "top left" < "top"


_NP_RE = rf"(an?) (?:({_alt(SIZES)}) )?({_alt(COLOURS)}) ({_alt(SHAPES)})(?: in the ({_alt(CELLS)}))?"
_FORMS = [re.compile(p) for p in (
    rf"{_NP_RE}", rf"{_NP_RE} and {_NP_RE}", rf"{_NP_RE}, {_NP_RE} and {_NP_RE}",
    rf"{_NP_RE} ({_alt(RELATIONS)}) {_NP_RE}")]


def parse_caption(text: str) -> Caption:
    """Text -> Caption, the exact inverse of `format_caption`; ParseError on anything outside the language."""
    if not isinstance(text, str):
        raise ParseError(f"caption must be a string, got {type(text).__name__}")
    for form in _FORMS:
        m = form.fullmatch(text)
        if m is None:
            continue
        g = list(m.groups())
        relation = g.pop(5) if len(g) == 11 else None
        nps = tuple(NP(g[i + 2], g[i + 3], g[i + 1], g[i + 4]) for i in range(0, len(g), 5))
        cap = Caption(nps, relation)
        if format_caption(cap) != text:  # only the article can differ here ("a orange")
            raise ParseError(f"wrong article in {text!r}; expected {format_caption(cap)!r}")
        return cap
    raise ParseError(f"not in the caption language: {text!r}")


def noun_phrases(caption: str) -> str | list[str]:
    """A caption of the shapes language -> its noun phrases as captions of their own (size, colour, shape and cell
    kept; a relation dropped), or the caption itself when it names one object. E.g. "a red circle above a blue
    square" -> ["a red circle", "a blue square"]."""
    nps = parse_caption(caption).nps
    return caption if len(nps) == 1 else [format_caption(Caption((n,))) for n in nps]


def part_region(text: str, grid: tuple[int, int]) -> np.ndarray | None:
    """Regional composition on shapes (`Pipeline.t2i(regions=)`): a part's finished text -> the tokens of the cell
    it names (`cell_tokens`), or None when it names none or is not in the caption language (the
    part then guides only where no part claims; `generate.region_weights`)."""
    try:
        nps = parse_caption(text).nps
    except ParseError:
        return None
    return cell_tokens(nps[0].cell, grid) if len(nps) == 1 and nps[0].cell else None


def words_fit(caption: str, texts: list[str]) -> bool:
    """Whether the words the model added to a prompt fit it (`Pipeline.t2i(accept=)`). caption: the prompt; texts:
    its parts' finished texts (one per noun phrase of `noun_phrases`, or the prompt itself). They fit when every part
    names a cell, no two parts the same cell (the shapes world puts one object in a cell), and the prompt's relation,
    if any, holds between its two parts' cells (a column to the left / right, a row above / below); a prompt outside
    the caption language (e.g. parts joined by AND) states no relation."""
    try:
        cells = [parse_caption(t).nps for t in texts]
    except ParseError:
        return False
    if any(len(nps) != 1 or nps[0].cell is None for nps in cells):
        return False
    rc = [divmod(CELLS.index(nps[0].cell), 3) for nps in cells]
    if len(set(rc)) < len(rc):
        return False
    try:
        rel = parse_caption(caption).relation
    except ParseError:                                        # e.g. "A AND B" written by a user: no relation stated
        rel = None
    if rel is None:
        return True
    (ra, ca), (rb, cb) = rc
    return {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def _relations_true(a: Mapping, b: Mapping, margin: float) -> list[str]:
    """Relations (surface form) for which 'a REL b' holds with `margin` between the centroids."""
    (ax, ay), (bx, by) = a["centroid"], b["centroid"]
    return [rel for rel, d in zip(RELATIONS, (bx - ax, ax - bx, by - ay, ay - by)) if d > margin]


def sample_caption(rng: np.random.Generator, scene: Scene, *, banned_relations: Sequence[tuple[str, str]] = (),
                   forced_relation: str | None = None, p_pos: float = P_POS) -> tuple[Caption, tuple[int, ...]]:
    """A caption naming every object of the scene -> (caption, index of the object each NP refers to). Each NP of
    a caption without a relation states its object's cell with probability p_pos.

    2-object scenes get a relation with probability P_RELATION when one holds with REL_MARGIN + REL_SLACK and
    (subject shape, relation) is not banned; `forced_relation` makes object 0 the subject of that relation.
    """
    objs = [o.as_meta() for o in scene.objects]
    order = [int(i) for i in rng.permutation(len(objs))]
    if forced_relation is not None or (len(objs) == 2 and rng.random() < P_RELATION):
        banned = set(banned_relations)
        cands = [(a, rel, 1 - a) for a in (0, 1)
                 for rel in _relations_true(objs[a], objs[1 - a], REL_MARGIN + REL_SLACK)
                 if (objs[a]["shape"], rel) not in banned]
        if forced_relation is not None:
            cands = [c for c in cands if c[:2] == (0, forced_relation)]
            if not cands:
                raise ValueError(f"{forced_relation!r} does not hold from object 0 with margin in {scene}")
        if cands:
            a, rel, b = cands[rng.integers(len(cands))]
            nps = tuple(NP(objs[k]["colour"], objs[k]["shape"], objs[k]["size"] if rng.random() < P_SIZE else None)
                        for k in (a, b))
            return Caption(nps, rel), (a, b)
    nps = tuple(NP(objs[k]["colour"], objs[k]["shape"], objs[k]["size"] if rng.random() < P_SIZE else None,
                   objs[k]["cell"] if rng.random() < p_pos else None) for k in order)
    return Caption(nps), tuple(order)


# surface relation -> (stored relation, whether subject and object swap): "A right of B" is "B left_of A"
_CANONICAL = {"to the left of": ("left_of", False), "to the right of": ("left_of", True),
              "above": ("above", False), "below": ("above", True)}


def caption_facts(caption: Caption, refs: Sequence[int | None]) -> set[tuple]:
    """Atomic facts the caption asserts. NP i refers to object refs[i]; an unmatched NP (None) gets id -(i+1)."""
    ids = [r if r is not None else -(i + 1) for i, r in enumerate(refs)]
    facts: set[tuple] = {("count", len(caption.nps))}
    for k, n in zip(ids, caption.nps):
        facts |= {("colour", k, n.colour), ("shape", k, n.shape)}
        if n.size:
            facts.add(("size", k, n.size))
        if n.cell:
            facts.add(("position", k, n.cell))
    if caption.relation:
        kind, swap = _CANONICAL[caption.relation]
        a, b = (ids[1], ids[0]) if swap else (ids[0], ids[1])
        facts.add(("relation", a, kind, b))
    return facts


def scene_facts(objects: Sequence[Mapping]) -> set[tuple]:
    """Every atomic fact true of a list of objects, given as dicts with colour, shape, size, cell, centroid."""
    facts: set[tuple] = {("count", len(objects))}
    for k, o in enumerate(objects):
        facts |= {("colour", k, o["colour"]), ("shape", k, o["shape"]), ("size", k, o["size"]),
                  ("position", k, o["cell"])}
        for j, p in enumerate(objects):  # j == k gives zero differences, so no fact
            if p["centroid"][0] - o["centroid"][0] > REL_MARGIN:
                facts.add(("relation", k, "left_of", j))
            if p["centroid"][1] - o["centroid"][1] > REL_MARGIN:
                facts.add(("relation", k, "above", j))
    return facts


# ---------------------------------------------------------------------------------------------------------
# Documents and the shard job


def make_document(index: int, seed: int, size: int, split: str = "train",
                  object_weights: Sequence[float] | None = None, position_rate: float | None = None,
                  position_jitter: float = 1.0) -> Document:
    """Scene `index` of (seed, split), drawn from its own generator, so any subset renders the same.

    object_weights: relative weights of 1-, 2- and 3-object scenes in the train split (None: uniform, drawn as
    before). position_rate: the probability that a train caption states an object's cell (None: P_POS).
    position_jitter: the share of its cell's range a train object's centroid is drawn from (1: all; 0: the cell's
    centre, so a caption's words fix the object's place). The held-out split ignores all three, so a model
    trained on any mix is scored on the same prompts."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    kind, forced_rel = None, None
    if split == "heldout" and index % 2 == 0:
        kind = "pair"
        scene = sample_scene(rng, forced=HELDOUT_PAIRS[rng.integers(len(HELDOUT_PAIRS))])
    elif split == "heldout":
        kind = "relation"
        shape, forced_rel = HELDOUT_RELATIONS[rng.integers(len(HELDOUT_RELATIONS))]
        while True:  # object 0 must be the subject of the held-out relation with margin
            scene = sample_scene(rng, n_objects=2, banned=HELDOUT_PAIRS, forced_shape=shape)
            a, b = (o.as_meta() for o in scene.objects)
            if forced_rel in _relations_true(a, b, REL_MARGIN + REL_SLACK):
                break
    else:
        n_obj = None
        if object_weights is not None:
            w = np.asarray(object_weights, dtype=np.float64)
            n_obj = int(rng.choice(3, p=w / w.sum())) + 1
        scene = sample_scene(rng, n_objects=n_obj, banned=HELDOUT_PAIRS, position_jitter=position_jitter)
    p_pos = position_rate if split == "train" and position_rate is not None else P_POS
    caption, refs = sample_caption(rng, scene, banned_relations=HELDOUT_RELATIONS if split == "train" else (),
                                   forced_relation=forced_rel, p_pos=p_pos)
    meta = {"objects": [o.as_meta() for o in scene.objects], "refs": list(refs),
            "background": asdict(scene.background), "split": split, "heldout": kind, "image_size": size}
    return Document(f"shapes{size}_{split}_s{seed}_{index:07d}", [Text(format_caption(caption)),
                                                                   Image(pixels=render(scene, size))], meta)


def make_documents(n: int, seed: int = 0, size: int = 32, split: str = "train",
                   object_weights: Sequence[float] | None = None,
                   position_rate: float | None = None, position_jitter: float = 1.0) -> Iterator[Document]:
    """n documents [Text(caption), Image(pixels)]; meta carries the ground truth (objects, refs, background)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if size < 16:
        raise ValueError(f"canvas size {size} < 16 px; the scorer is checked at 32 and 64 px")
    if object_weights is not None and (len(object_weights) != 3 or min(object_weights) < 0
                                       or sum(object_weights) <= 0):
        raise ValueError(f"object_weights must be 3 non-negative weights (1, 2, 3 objects) with a positive sum, "
                         f"got {list(object_weights)}")
    if position_rate is not None and not 0.0 <= position_rate <= 1.0:
        raise ValueError(f"position_rate must be in [0, 1], got {position_rate}")
    if not 0.0 <= position_jitter <= 1.0:
        raise ValueError(f"position_jitter must be in [0, 1], got {position_jitter}")
    for i in range(n):
        yield make_document(i, seed, size, split, object_weights, position_rate, position_jitter)


def parse_weights(text: str) -> tuple[float, float, float]:
    """'2,1,1' -> (2.0, 1.0, 1.0) for --object-weights; raises ValueError naming the problem."""
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--object-weights must be three numbers like 2,1,1, got {text!r}") from None
    if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"--object-weights must be three non-negative numbers with a positive sum, got {text!r}")
    return w


def generator_info(size: int, seed: int, object_weights: Sequence[float] | None = None,
                   position_rate: float | None = None, position_jitter: float = 1.0) -> dict:
    """Settings stored in info.json beside the shards."""
    return {"generator": "data_tools.shapes", "image_size": size, "seed": seed,
            "object_weights": list(object_weights) if object_weights is not None else None,
            "position_rate": P_POS if position_rate is None else position_rate,
            "position_jitter": position_jitter, "shapes": list(SHAPES),
            "palette": {k: list(v) for k, v in PALETTE.items()}, "sizes": SIZES, "cells": list(CELLS),
            "relations": list(RELATIONS), "heldout_pairs": [list(p) for p in HELDOUT_PAIRS],
            "heldout_relations": [list(p) for p in HELDOUT_RELATIONS], "rel_margin": REL_MARGIN,
            "jitter": JITTER, "background_grey": list(BG_GREY)}


LANGUAGE_FILE = "language.txt"


def language_texts() -> list[str]:
    """Captions, drawn from no scene, that together use every word and every form of the caption language: each
    train colour-shape pair once (sizes and cells cycling, the held-out pairs left out), each relation between
    shapes that may be its subject in training, and the two- and three-object lists. A text tokenizer trained on
    shards whose scenes never use some words (single objects: no "and", "," or "above") reads these beside them
    (`nextx tokenizer text --shards D --text-file D/language.txt`), so no held-out prompt holds <unk>."""
    held = set(HELDOUT_PAIRS)
    pairs = [(c, sh) for c in COLOURS for sh in SHAPES if (c, sh) not in held]
    sizes = [None, *SIZES]
    texts = [format_caption(Caption((NP(c, sh, sizes[i % 3], CELLS[i % len(CELLS)]),)))
             for i, (c, sh) in enumerate(pairs)]
    banned = set(HELDOUT_RELATIONS)
    for i, rel in enumerate(RELATIONS):
        subj = [pr for pr in pairs if (pr[1], rel) not in banned]
        a, b = subj[(7 * i) % len(subj)], pairs[(7 * i + 3) % len(pairs)]
        texts.append(format_caption(Caption((NP(*a), NP(*b, sizes[1 + i % 2])), rel)))
    for i in range(4):
        nps = [NP(*pairs[(5 * i + j) % len(pairs)], sizes[j % 3], CELLS[(i + 4 * j) % len(CELLS)] if j else None)
               for j in range(3)]
        texts += [format_caption(Caption(tuple(nps[:2]))), format_caption(Caption(tuple(nps)))]
    return texts


def _tally(docs: Iterator[Document], counts: Counter) -> Iterator[Document]:
    for d in docs:
        counts[f"{len(d.meta['objects'])} objects"] += 1
        counts["relation captions"] += parse_caption(d.texts[0]).relation is not None
        if d.meta["heldout"]:
            counts[f"heldout kind {d.meta['heldout']}"] += 1
        yield d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx data shapes", description="Procedural shapes scenes with exact "
                                "captions -> WebDataset shards (splits 'train' and 'heldout').")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--force", action="store_true", help="replace what --out already holds")
    p.add_argument("--n", type=int, default=1000, help="train scenes (default 1000)")
    p.add_argument("--size", type=int, default=32, help="canvas side in pixels (default 32; checked at 32, 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-n", type=int, default=None, help="held-out scenes (default n // 10)")
    p.add_argument("--max-per-shard", type=int, default=1000)
    p.add_argument("--object-weights", default=None, metavar="W1,W2,W3",
                   help="relative weights of 1-, 2- and 3-object train scenes (default: uniform); the held-out "
                        "split is the same whatever the weights")
    p.add_argument("--position-rate", type=float, default=None, metavar="P",
                   help=f"probability that a train caption states an object's cell (default {P_POS}); the "
                        "held-out split keeps the default, so its prompts do not change")
    p.add_argument("--position-jitter", type=float, default=1.0, metavar="J",
                   help="share of its cell's allowed range a train object's centroid is drawn from (default 1: "
                        "all of it; 0: the cell's centre); the held-out split keeps 1")
    a = p.parse_args(argv)
    from nextx.errors import refuse_existing

    refuse_existing(a.out, a.force, "shards", "*.tar")
    try:
        weights = parse_weights(a.object_weights) if a.object_weights else None
    except ValueError as e:
        p.error(str(e))
    heldout_n = a.n // 10 if a.heldout_n is None else a.heldout_n
    if a.position_rate is not None and not 0.0 <= a.position_rate <= 1.0:
        p.error(f"--position-rate must be in [0, 1], got {a.position_rate}")
    if not 0.0 <= a.position_jitter <= 1.0:
        p.error(f"--position-jitter must be in [0, 1], got {a.position_jitter}")
    info = generator_info(a.size, a.seed, weights, a.position_rate, a.position_jitter)
    for split, n in (("train", a.n), ("heldout", heldout_n)):
        counts: Counter = Counter()
        docs = make_documents(n, a.seed, a.size, split, weights, a.position_rate, a.position_jitter)
        summary = write_shards(_tally(docs, counts), a.out, split=split,
                               max_per_shard=a.max_per_shard, total=n, info=info)
        print(f"{split}: {summary['n_docs']} docs in {summary['n_shards']} shard(s); "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lang, texts = Path(a.out) / LANGUAGE_FILE, language_texts()
    lang.write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"{lang}: {len(texts)} captions that use every word of the language (for the text tokenizer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
