"""Exact, GenEval-style scoring on the procedural shapes world (docs/design.md §8), and the scorer's self-check job.

Detection (`detect`: image -> objects, each with colour, shape, size, cell and centroid):
1. Background = the per-channel median pixel. Objects cover under 30 % of a canvas, so the median is the grey.
2. Un-mixing replaces a "nearest palette colour in Lab" rule. With the background b, every antialiased edge
   pixel is p = alpha * c + (1 - alpha) * b. For each palette colour c, alpha_c is the projection of p - b on
   c - b, and the residual is the distance to that mixing line. The label is the colour with the least residual.
   A pure pixel (alpha = 1) gets the nearest palette colour. An edge pixel keeps its true colour, where nearest
   colour labels an orange-grey edge as red. Distances are in sRGB, where the renderer mixes linearly.
3. Foreground = alpha >= 0.5 with residual <= RESID_MAX; far-off colours are ignored. Then 8-connected components
   per colour. Soft area, alpha-weighted over the component plus a 1 px ring, drops specks < MIN_AREA.
4. Shape: template matching on the soft mask, with no training and no weights. Each of the 8 upright shapes is
   scaled to the observed soft area, placed at the observed centroid and rendered with the generator's own
   `coverage`. The shape with the least L1 distance wins. A small shape at 32 px is 6 px wide, so hand-set
   geometric rules (fill ratio, hull vertices, holes) would work on a few whole pixels. The template fit uses
   every antialiased coverage value instead. The fitted box side gives the size (threshold SIZE_THRESHOLD) and
   the centroid gives the cell.

Matching. Caption NPs are matched to detected objects by the injective assignment that makes the most caption
facts true (`match`). Each NP considers only its MAX_CANDIDATES best objects, so junk images stay cheap.
Unmatched NPs assert facts that are all false. A fact is a tuple (data_tools.shapes.caption_facts): count,
colour, shape, size, position, relation.

Text-to-image (`score_image`, `score_t2i`). Per fact type, a fact is true iff it holds in the detected scene.
Accuracy is micro-averaged over atomic facts; `all_correct` means every fact of the caption holds. The
categories (GenEval-like) each report their share of all-correct images:
- single_object, two_objects, three_objects: by the number of NPs
- colour_attribution: two or more NPs with different colours
- position: some NP names a cell
- relation: the caption has a REL

Captioning (`score_caption`). The generated caption's NPs are matched to the truth objects. Precision = share of
its facts true of the truth scene. Recall = share of the truth caption's facts that it asserts about the same
objects. An unparseable caption scores 0.

Chance. Shuffled captions (a derangement) against ground-truth renders. The expected level is the same
shuffled captions scored against the truth objects (no detector). This is what a generator that ignores the
caption but draws valid scenes would score; best-agreement matching puts it above the naive values. The naive
values for one NP against one object: colour 1/8, shape 1/8, size 1/2, cell 1/9, count 1/3.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
from PIL import Image as PILImage

from data_tools.shapes import (GEOMETRY, PALETTE, SHAPES, SIZE_THRESHOLD, Caption, ParseError, caption_facts, cell_of,
                               coverage, make_documents, parse_caption, scene_facts)

FACT_TYPES = ("count", "colour", "shape", "size", "position", "relation")
CATEGORIES = ("single_object", "two_objects", "three_objects", "colour_attribution", "position", "relation")
RESID_MAX = 60.0          # sRGB distance from every mixing line beyond which a pixel belongs to no colour
MIN_AREA = 0.004          # soft area (share of the canvas) below which a component is noise: 4 px at 32 px
MAX_CANDIDATES = 4        # objects each NP considers when matching
_PAL = np.array(list(PALETTE.values()), np.float32)  # (8, 3)
_COLOURS = list(PALETTE)


def _dilate(m: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of an (H, W) mask."""
    p = np.pad(m, 1)
    h, w = m.shape
    return np.logical_or.reduce([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def _components(fg: np.ndarray, label: np.ndarray) -> np.ndarray:
    """8-connected components of foreground pixels with equal labels -> (H, W) ids, -1 off the foreground.

    Min-id propagation: every pixel takes the least id of its same-label neighbours until nothing changes.
    """
    h, w = fg.shape
    big = h * w
    ids = np.where(fg, np.arange(big).reshape(h, w), big)
    lab = np.where(fg, label, -1)
    pl = np.pad(lab, 1, constant_values=-2)
    shifts = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    same = [fg & (pl[dy:dy + h, dx:dx + w] == lab) for dy, dx in shifts]  # neighbour in my component?
    while True:
        p = np.pad(ids, 1, constant_values=big)
        new = ids.copy()
        for (dy, dx), s in zip(shifts, same):
            new = np.where(s, np.minimum(new, p[dy:dy + h, dx:dx + w]), new)
        if np.array_equal(new, ids):
            return np.where(fg, ids, -1)
        ids = new


BLUR_SIGMAS = (0.0, 0.5, 1.0, 1.5)  # template blurs tried in the shape fit (px): generated images are soft-edged


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) array (zero outside), kernel radius ceil(3 sigma)."""
    if sigma <= 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    win = np.lib.stride_tricks.sliding_window_view
    x = win(np.pad(x, r), 2 * r + 1, axis=0) @ k                              # (H, W + 2r)
    return win(x, 2 * r + 1, axis=1) @ k                                       # (H, W)


def _fit_shape(soft: np.ndarray, area: float, cx: float, cy: float,
               region: np.ndarray | None = None) -> tuple[str, float, float]:
    """Best template for a soft mask (H, W), given its soft area and centroid in pixels -> (shape, side, L1).

    Each template is also tried blurred by BLUR_SIGMAS and cut to `region` (the pixels the soft mask was read
    from), so a blurred object is compared with blurred templates: its soft edges do not turn a star into a circle.
    The window is the object's bounding box with a margin of 3 blur sigmas."""
    h, w = soft.shape
    region = np.ones_like(soft, dtype=bool) if region is None else region
    ys, xs = np.nonzero(soft > 0)
    m = int(np.ceil(3 * max(BLUR_SIGMAS))) + 1
    best = ("", 0.0, np.inf)
    for s in SHAPES:
        a, off, wh = GEOMETRY[s]
        side = float(np.sqrt(area / a))                       # box side giving the observed area
        centre = (cx - off[0] * side, cy - off[1] * side)     # box centre from the centroid
        x0 = max(min(xs.min(), int(centre[0] - wh[0] * side / 2)) - m, 0)
        y0 = max(min(ys.min(), int(centre[1] - wh[1] * side / 2)) - m, 0)
        x1 = min(max(xs.max() + 1, int(np.ceil(centre[0] + wh[0] * side / 2))) + m, w)
        y1 = min(max(ys.max() + 1, int(np.ceil(centre[1] + wh[1] * side / 2))) + m, h)
        tmpl = coverage(s, centre, side, (x0, y0, x1, y1))
        win, reg = soft[y0:y1, x0:x1], region[y0:y1, x0:x1]
        for sigma in BLUR_SIGMAS:
            dist = float(np.abs(win - _blur(tmpl, sigma) * reg).sum() / area)
            if dist < best[2]:
                best = (s, side, dist)
    return best


def _pixels(image: PILImage.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: fg (H, W) bool (on some palette colour's mixing line with the background, at least half way),
    label (H, W) the nearest palette colour, alpha (H, W, 8) the mix along each colour's line."""
    x = np.asarray(image.convert("RGB") if isinstance(image, PILImage.Image) else image, np.float32)
    h, w, _ = x.shape
    if h != w:
        raise ValueError(f"the scorer expects square images, got {w}x{h}")
    bg = np.median(x.reshape(-1, 3), 0)
    d, dirs = x - bg, _PAL - bg                                               # (H, W, 3), (8, 3)
    alpha = np.clip(d @ dirs.T / (dirs * dirs).sum(1), 0, 1)                  # (H, W, 8)
    resid = np.linalg.norm(d[..., None, :] - alpha[..., None] * dirs, axis=-1)  # (H, W, 8)
    label = resid.argmin(-1)
    fg = (np.take_along_axis(alpha, label[..., None], -1)[..., 0] >= 0.5) & (resid.min(-1) <= RESID_MAX)
    return fg, label, alpha


def foreground(image: PILImage.Image | np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels the scorer counts as part of some object (before the components' size filter)."""
    return _pixels(image)[0]


def layout_overlap(a: Sequence, b: Sequence) -> float:
    """Mean IoU of the foregrounds of paired images a[i], b[i] (pairs where both are empty count 1). E.g. the images
    of the same noise under two different prompts: near 1 when the noise, not the prompt, decides the layout."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equal, non-empty image lists, got {len(a)} and {len(b)}")
    out = []
    for x, y in zip(a, b):
        fx, fy = foreground(x), foreground(y)
        union = (fx | fy).sum()
        out.append(1.0 if union == 0 else float((fx & fy).sum() / union))
    return float(np.mean(out))


def detect(image: PILImage.Image | np.ndarray) -> list[dict]:
    """Square RGB image (PIL or (H, W, 3) uint8) -> detected objects in raster order of their first pixel.

    Each object is a dict like the truth objects in shard meta: colour, shape, size, cell, centroid (x, y) and
    box (x0, y0, x1, y1) in canvas units, extent (fitted box side / canvas), area (soft, canvas share), fit (L1).
    """
    fg, label, alpha = _pixels(image)
    h, w = fg.shape
    comp = _components(fg, label)
    objects = []
    grid = np.arange(w) + 0.5
    for cid in np.unique(comp[comp >= 0]):
        mask = comp == cid
        k = int(label.flat[cid])
        region = mask | (_dilate(_dilate(mask)) & ~_dilate(fg & ~mask))  # + a 2 px ring, clear of other objects
        soft = np.where(region, alpha[..., k], 0.0)
        area = float(soft.sum())
        if area < MIN_AREA * h * w:
            continue
        cx, cy = float(soft.sum(0) @ grid / area), float(soft.sum(1) @ grid / area)
        shape, side, fit = _fit_shape(soft, area, cx, cy, region)
        ys, xs = np.nonzero(soft >= 0.5)
        objects.append({
            "colour": _COLOURS[k], "shape": shape, "size": "large" if side / w >= SIZE_THRESHOLD else "small",
            "cell": cell_of(cx / w, cy / h),
            "centroid": [cx / w, cy / h], "box": [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h],
            "extent": side / w, "area": area / (h * w), "fit": fit})
    return objects


# ---------------------------------------------------------------------------------------------------------
# Matching and scoring


def _as_caption(caption: Caption | str) -> Caption:
    return caption if isinstance(caption, Caption) else parse_caption(caption)


def match(caption: Caption, objects: Sequence[Mapping], truth: set[tuple] | None = None,
          prefer: set[tuple] = frozenset()) -> tuple[int | None, ...]:
    """NP -> object index (None: unmatched), maximising (true facts, facts also in `prefer`); first wins ties."""
    truth = scene_facts(objects) if truth is None else truth
    cands = []
    for np_ in caption.nps:
        one = Caption((np_,))
        agree = [len({f for f in caption_facts(one, (k,)) if f[0] != "count"} & truth) for k in range(len(objects))]
        top = sorted(range(len(objects)), key=lambda k: -agree[k])[:MAX_CANDIDATES]
        cands.append(top + [None])
    best, best_key = tuple([None] * len(caption.nps)), (-1, -1)
    for refs in itertools.product(*cands):
        used = [r for r in refs if r is not None]
        if len(set(used)) < len(used):
            continue
        facts = caption_facts(caption, refs)
        key = (len(facts & truth), len(facts & prefer))
        if key > best_key:
            best, best_key = refs, key
    return best


def categories(caption: Caption) -> list[str]:
    """GenEval-like categories of a caption (see the module docstring)."""
    nps = caption.nps
    cats = [("single_object", "two_objects", "three_objects")[len(nps) - 1]]
    if len(nps) > 1 and len({n.colour for n in nps}) > 1:
        cats.append("colour_attribution")
    if any(n.cell for n in nps):
        cats.append("position")
    if caption.relation:
        cats.append("relation")
    return cats


OUTCOMES = ("one, its colour", "one, another colour", "several, its colour among them",
            "several, not its colour", "none")


def single_outcome(caption: Caption | str, objects: Sequence[Mapping]) -> str | None:
    """What was drawn for a one-object prompt, one of OUTCOMES (None for a prompt naming several objects): how
    many objects were detected, and whether the prompt's colour is among them. It tells apart the ways "exactly one
    object" fails: nothing drawn, stray or broken-up blobs, a wrong colour."""
    cap = _as_caption(caption)
    if len(cap.nps) != 1:
        return None
    if not objects:
        return OUTCOMES[4]
    ok = any(o["colour"] == cap.nps[0].colour for o in objects)
    return OUTCOMES[(0 if len(objects) == 1 else 2) + (not ok)]


def score_objects(caption: Caption | str, objects: Sequence[Mapping]) -> dict:
    """Check every fact of a caption against a list of objects (detected, or the truth for chance levels).

    Returns {fact type: bool, or None when the caption asserts none}, all_correct, n_facts and n_correct per
    type, refs (the object each NP was matched to), n_objects and outcome (`single_outcome`).
    """
    cap = _as_caption(caption)
    truth = scene_facts(objects)
    refs = match(cap, objects, truth)
    facts = caption_facts(cap, refs)
    n_facts, n_ok = Counter(f[0] for f in facts), Counter(f[0] for f in facts & truth)
    out: dict = {t: (n_ok[t] == n_facts[t]) if n_facts[t] else None for t in FACT_TYPES}
    out["all_correct"] = all(v for v in out.values() if v is not None)
    out.update(n_facts=dict(n_facts), n_correct=dict(n_ok), refs=list(refs), n_objects=len(objects),
               outcome=single_outcome(cap, objects))
    return out


def score_image(image: PILImage.Image | np.ndarray, caption: Caption | str) -> dict:
    """One generated image against its prompt: `score_objects` on the detected objects."""
    return score_objects(caption, detect(image))


def aggregate_t2i(results: Sequence[dict], captions: Sequence[Caption | str]) -> dict:
    """Per-fact accuracy (micro over atomic facts), share all-correct, all-correct share per category, the
    same per-fact accuracy and all-correct share over the prompts naming n objects (`by_objects[n]`), the share
    of each `single_outcome` over the one-object prompts (`single_outcomes`), and the share of one-object prompts
    drawn as exactly one object, apart for prompts that state the cell and prompts that do not
    (`single_one_by_cell`: {"cell stated" | "no cell": {n, one}}; a model trained only on captions that say where
    may draw several objects when none is said)."""
    n_facts, n_ok, cat_n, cat_ok = Counter(), Counter(), Counter(), Counter()
    outcomes = Counter(r["outcome"] for r in results if r.get("outcome"))   # one-object prompts only
    n_single = sum(outcomes.values())
    one_by_cell: dict[str, list[bool]] = {"cell stated": [], "no cell": []}   # exactly one object drawn, per kind
    by_n: dict[int, tuple[Counter, Counter, list]] = {}    # prompts with n objects: (facts, correct, all-correct)
    for r, c in zip(results, captions, strict=True):
        cap = _as_caption(c)                               # parsed once per prompt
        n_facts.update(r["n_facts"])
        n_ok.update(r["n_correct"])
        nf, no, ac = by_n.setdefault(len(cap.nps), (Counter(), Counter(), []))
        nf.update(r["n_facts"]), no.update(r["n_correct"]), ac.append(r["all_correct"])
        if len(cap.nps) == 1:
            one_by_cell["cell stated" if cap.nps[0].cell else "no cell"].append(r["n_objects"] == 1)
        for cat in categories(cap):
            cat_n[cat] += 1
            cat_ok[cat] += r["all_correct"]
    return {"n": len(results),
            "accuracy": {t: n_ok[t] / n_facts[t] for t in FACT_TYPES if n_facts[t]},
            "n_facts": {t: n_facts[t] for t in FACT_TYPES},
            "all_correct": float(np.mean([r["all_correct"] for r in results])) if results else 0.0,
            "categories": {c: cat_ok[c] / cat_n[c] for c in CATEGORIES if cat_n[c]},
            "by_objects": {n: {"n": len(ac), "accuracy": {t: no[t] / nf[t] for t in FACT_TYPES if nf[t]},
                               "all_correct": float(np.mean(ac))} for n, (nf, no, ac) in sorted(by_n.items())},
            "single_outcomes": {o: outcomes[o] / n_single for o in OUTCOMES} if n_single else {},
            "single_one_by_cell": {k: {"n": len(v), "one": float(np.mean(v))} for k, v in one_by_cell.items() if v}}


def score_t2i(images: Sequence[PILImage.Image | np.ndarray], captions: Sequence[Caption | str]) -> dict:
    """Text-to-image scores of generated images against their prompts (see `aggregate_t2i`)."""
    return aggregate_t2i([score_image(i, c) for i, c in zip(images, captions, strict=True)], captions)


def score_caption(generated: str, truth_objects: Sequence[Mapping], truth_caption: Caption | str) -> dict:
    """Precision, recall and F1 of a generated caption's atomic facts; an unparseable caption scores 0.

    Also returns per-type counts for micro-averaging: gen / gen_true (precision) and truth / recalled (recall).
    """
    truth = scene_facts(truth_objects)
    tc = _as_caption(truth_caption)
    ref = caption_facts(tc, match(tc, truth_objects, truth))
    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "parsed": False, "gen": {}, "gen_true": {},
            "truth": dict(Counter(f[0] for f in ref)), "recalled": {}}
    try:
        gen = parse_caption(generated)
    except ParseError:
        return zero
    facts = caption_facts(gen, match(gen, truth_objects, truth, prefer=ref))
    p, r = len(facts & truth) / len(facts), len(facts & ref) / len(ref)
    return {**zero, "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "parsed": True,
            "gen": dict(Counter(f[0] for f in facts)), "gen_true": dict(Counter(f[0] for f in facts & truth)),
            "recalled": dict(Counter(f[0] for f in facts & ref))}


def score_captions(generated: Sequence[str], truth_objects: Sequence[Sequence[Mapping]],
                   truth_captions: Sequence[Caption | str]) -> dict:
    """Mean P/R/F1 over captions, parse rate, and micro P/R per fact type."""
    rs = [score_caption(g, o, t) for g, o, t in zip(generated, truth_objects, truth_captions, strict=True)]
    tot = {k: sum((Counter(r[k]) for r in rs), Counter()) for k in ("gen", "gen_true", "truth", "recalled")}
    return {"n": len(rs), **{k: float(np.mean([r[k] for r in rs])) for k in ("precision", "recall", "f1", "parsed")},
            "precision_by_type": {t: tot["gen_true"][t] / tot["gen"][t] for t in FACT_TYPES if tot["gen"][t]},
            "recall_by_type": {t: tot["recalled"][t] / tot["truth"][t] for t in FACT_TYPES if tot["truth"][t]}}


# ---------------------------------------------------------------------------------------------------------
# Self-check job


def selfcheck(n: int, size: int, seed: int, heldout_n: int) -> dict:
    """Ground truth vs shuffled vs chance at one canvas size, plus detector and held-out figures."""
    docs = list(make_documents(n, seed, size, "train"))
    caps = [d.texts[0] for d in docs]
    truth = [d.meta["objects"] for d in docs]
    dets = [detect(d.images[0].pixels) for d in docs]
    perm = np.random.default_rng(seed).permutation(n)
    shuf = [""] * n
    for i in range(n):  # a derangement: image perm[i] gets the caption of perm[i+1]
        shuf[perm[i]] = caps[perm[(i + 1) % n]]
    keys = ("colour", "shape", "size", "cell")
    exact = [len(t) == len(dt) and all(any(all(a[k] == b[k] for k in keys) for b in dt) for a in t)
             for t, dt in zip(truth, dets)]
    held = list(make_documents(heldout_n, seed, size, "heldout"))
    return {
        "size": size, "n": n, "detector_exact_scenes": float(np.mean(exact)),
        "t2i_truth": aggregate_t2i([score_objects(c, o) for c, o in zip(caps, dets)], caps),
        "t2i_shuffled": aggregate_t2i([score_objects(c, o) for c, o in zip(shuf, dets)], shuf),
        "t2i_chance": aggregate_t2i([score_objects(c, o) for c, o in zip(shuf, truth)], shuf),
        "t2i_heldout": score_t2i([d.images[0].pixels for d in held], [d.texts[0] for d in held]),
        "caption_truth": score_captions(caps, truth, caps),
        "caption_shuffled": score_captions(shuf, truth, caps)}


def failures(r: dict, tol: float) -> list[str]:
    """What a self-check result violates: truth >= 0.99 per fact, shuffled == chance +- tol, caption P = R = 1."""
    bad = []
    for split in ("t2i_truth", "t2i_heldout"):
        bad += [f"{r['size']}px {split} {t} {a:.3f} < 0.99" for t, a in r[split]["accuracy"].items() if a < 0.99]
    for t, a in r["t2i_shuffled"]["accuracy"].items():
        if abs(a - r["t2i_chance"]["accuracy"][t]) > tol:
            bad.append(f"{r['size']}px shuffled {t} {a:.3f} is not chance {r['t2i_chance']['accuracy'][t]:.3f}")
    if r["caption_truth"]["precision"] < 1 or r["caption_truth"]["recall"] < 1:
        bad.append(f"{r['size']}px truth captions do not score P = R = 1")
    return bad


def format_table(r: dict) -> str:
    """Fact types as rows, the conditions as columns (accuracy; all-correct share for categories)."""
    cols = [("t2i_truth", "GT"), ("t2i_shuffled", "shuffled"), ("t2i_chance", "chance"), ("t2i_heldout", "held-out")]
    lines = [f"== {r['size']} px, {r['n']} scenes; detector finds every object exactly in "
             f"{r['detector_exact_scenes']:.3f} of scenes",
             f"{'text-to-image':<20}" + "".join(f"{c:>10}" for _, c in cols)]
    rows = [(t, "accuracy") for t in FACT_TYPES] + [("all_correct", None)] + [(c, "categories") for c in CATEGORIES]
    for name, group in rows:
        vals = [r[k][group].get(name) if group else r[k][name] for k, _ in cols]
        lines.append(f"{name:<20}" + "".join(f"{'-' if v is None else f'{v:.3f}':>10}" for v in vals))
    lines.append(f"{'captioning':<20}{'GT P':>10}{'GT R':>10}{'shuf P':>10}{'shuf R':>10}")
    ct, cs = r["caption_truth"], r["caption_shuffled"]
    for t in FACT_TYPES:
        vals = [ct["precision_by_type"].get(t), ct["recall_by_type"].get(t),
                cs["precision_by_type"].get(t), cs["recall_by_type"].get(t)]
        lines.append(f"{t:<20}" + "".join(f"{'-' if v is None else f'{v:.3f}':>10}" for v in vals))
    lines.append(f"{'mean P / R / F1':<20}{ct['precision']:>10.3f}{ct['recall']:>10.3f}{cs['precision']:>10.3f}"
                 f"{cs['recall']:>10.3f}   (shuffled F1 {cs['f1']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx eval shapes-selfcheck", description="Score ground-truth shapes renders "
                                "against their own and shuffled captions; exit 1 unless truth >= 0.99 on every "
                                "fact and shuffled captions fall to chance.")
    p.add_argument("--n", type=int, default=500, help="scenes per canvas size (default 500)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-n", type=int, default=None, help="held-out scenes (default n // 5)")
    p.add_argument("--tol", type=float, default=0.03, help="allowed |shuffled - chance| per fact (default 0.03)")
    p.add_argument("--out", default=None, help="write all figures as JSON here")
    a = p.parse_args(argv)
    results = [selfcheck(a.n, s, a.seed, a.n // 5 if a.heldout_n is None else a.heldout_n) for s in a.sizes]
    bad = [b for r in results for b in failures(r, a.tol)]
    for r in results:
        print(format_table(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"seed": a.seed, "results": results, "failures": bad}, f, indent=2)
    print("self-check " + ("PASSED" if not bad else "FAILED:\n  " + "\n  ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
