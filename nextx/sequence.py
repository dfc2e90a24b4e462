"""Segments -> token layout -> token-budget packed rows -> Batch (docs/design.md §1, §3, §8).

One document becomes one flat token sequence. Every image becomes

    <boi> [noise split: N tokens, x_t, carries the image loss] [clean split: N tokens, x] <eoi>

Worked example: the pair ("a red circle" -> 3 ids t0 t1 t2, one 2x2-token image x) laid out caption->image
and image->caption (N = 4; '.' = pad id; '-' = no text target):

    caption->image    <bos>  t0  t1  t2  <boi>  n n n n                (clean split dropped: nothing follows)
      kind             T     T   T   T    T     Z Z Z Z                 T text, Z noise, C clean
      text target      t0    t1  t2 <boi>  -    - - - -
      pos              0     1   2   3    4     5 5 5 5                 one 1D slot per image
      pos2d (r, c)                               00 01 10 11

    image->caption    <bos> <boi>  c c c c  <eoi>  t0  t1  t2  <eos>    (noise split dropped: pure context)
      kind             T     T     C C C C   T     T   T   T    T
      text target     <boi>  -     - - - -   t0    t1  t2 <eos>  -      (<eoi> is appended, never a target)
      pos              0     1     2 2 2 2   3     4   5   6    7

Text targets live on text and clean positions whose next token in the clean stream (noise splits removed) is
text; `<eoi>` is never a target (the sampler appends it). Noise and clean splits of an image share the 1D
position, so text after an image has the same positions in training and generation (§3).

Packing fills rows of `row_len` with whole documents (best fit within a buffer), documents numbered per row;
pads have kind PAD and doc -1. Row fields are numpy (built in DataLoader workers); `collate` makes a `Batch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

# Token kinds (per-token `kind`). PAD = 0 so a zero-filled array is all padding.
PAD, TEXT, CLEAN, NOISE = 0, 1, 2, 3
IGNORE = -100  # text target of positions without one (torch cross_entropy's ignore_index)


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    boi: int
    eoi: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        return cls(pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id, boi=tok.boi_id, eoi=tok.eoi_id)


@dataclass
class ImageTokens:
    """An image as latent tokens: `tokens` (N, C) row-major over `grid` = (h, w), N = h*w.

    `generate`: the image carries a noise split (loss). False for pure context (an image to caption)."""

    tokens: np.ndarray
    grid: tuple[int, int]
    generate: bool = True

    def __post_init__(self):
        h, w = self.grid
        if self.tokens.ndim != 2 or self.tokens.shape[0] != h * w:
            raise ValueError(f"image tokens of shape {self.tokens.shape} do not match grid {self.grid}")


TokSegment = "list[int] | ImageTokens"


@dataclass
class DocLayout:
    """One document's tokens (all arrays of length T, the document's token count)."""

    ids: np.ndarray       # (T,) int64 token ids; pad id on image tokens
    targets: np.ndarray   # (T,) int64 next text token, IGNORE where none
    kind: np.ndarray      # (T,) int8 PAD/TEXT/CLEAN/NOISE
    split: np.ndarray     # (T,) int32 split index within the document (-1 for text)
    img: np.ndarray       # (T,) int32 image index within the document (-1 for text)
    pos: np.ndarray       # (T,) int32 1D RoPE position
    pos2d: np.ndarray     # (T, 2) int32 (row, col) inside the image, 0 for text
    images: list[ImageTokens]

    def __len__(self) -> int:
        return len(self.ids)


def layout_document(segments: Sequence, special: SpecialIds, *, drop_trailing_clean: bool = True,
                    noise_copies: int = 1, image_gaps: Sequence[int] | None = None) -> DocLayout:
    """Tokenized segments (list[int] for text, ImageTokens for images) -> DocLayout (see module docstring).

    image_gaps (training only, `data.image_pos_jitter`): one int >= 0 per image, a gap of that many 1D positions
    left before its `<boi>` (everything after moves with it), so the distance from the image to the words before it
    varies and only what they say stays fixed. None: consecutive positions, what generation writes.

    noise_copies = M > 1 writes M noise splits per generated image (`<boi>` Z_1 .. Z_M [C]): the M IMM particles
    of one group, each with its own noise, all conditioned on the same prefix and blind to each other (masks.py).

    The document opens with <bos>; it closes with <eos> unless it ends with an image whose clean split is
    dropped (nothing follows it, so neither <eoi> nor <eos> would see a clean image).
    """
    if not segments:
        raise ValueError("a document needs at least one segment")
    if noise_copies < 1:
        raise ValueError(f"noise_copies must be >= 1, got {noise_copies}")
    ids: list[int] = []
    kind: list[int] = []
    split: list[int] = []
    img: list[int] = []
    pos: list[int] = []
    rc: list[tuple[int, int]] = []
    images: list[ImageTokens] = []
    p = 0
    n_split = 0
    n_images = sum(isinstance(seg, ImageTokens) for seg in segments)
    if image_gaps is not None and len(image_gaps) != n_images:
        raise ValueError(f"image_gaps has {len(image_gaps)} entries for {n_images} images")

    def text(tokens: Iterable[int]):
        nonlocal p
        for t in tokens:
            ids.append(int(t)); kind.append(TEXT); split.append(-1); img.append(-1)
            pos.append(p); rc.append((0, 0)); p += 1

    def image_split(im: ImageTokens, k: int, idx: int):
        nonlocal n_split
        h, w = im.grid
        ids.extend([special.pad] * (h * w)); kind.extend([k] * (h * w)); split.extend([n_split] * (h * w))
        img.extend([idx] * (h * w)); pos.extend([p] * (h * w))
        rc.extend((r, c) for r in range(h) for c in range(w))
        n_split += 1

    text([special.bos])
    ended_open = False
    for i, seg in enumerate(segments):
        if isinstance(seg, ImageTokens):
            last = i == len(segments) - 1
            idx = len(images)
            images.append(seg)
            if image_gaps is not None:
                if image_gaps[idx] < 0:
                    raise ValueError(f"image_gaps must be >= 0, got {image_gaps[idx]} for image {idx}")
                p += int(image_gaps[idx])
            text([special.boi])
            if seg.generate:
                for _ in range(noise_copies):
                    image_split(seg, NOISE, idx)
            if not (last and drop_trailing_clean and seg.generate):
                image_split(seg, CLEAN, idx)
            else:
                ended_open = True
                break
            p += 1
            text([special.eoi])
        else:
            if len(seg) == 0:
                raise ValueError(f"segment {i} is an empty text")
            text(seg)
    if not ended_open:
        text([special.eos])

    ids_a = np.asarray(ids, dtype=np.int64)
    kind_a = np.asarray(kind, dtype=np.int8)
    return DocLayout(ids=ids_a, targets=text_targets(ids_a, kind_a, special.eoi), kind=kind_a,
                     split=np.asarray(split, np.int32), img=np.asarray(img, np.int32),
                     pos=np.asarray(pos, np.int32), pos2d=np.asarray(rc, np.int32).reshape(-1, 2), images=images)


def text_targets(ids: np.ndarray, kind: np.ndarray, eoi_id: int) -> np.ndarray:
    """(T,) ids, kinds -> (T,) next-text-token targets along the clean stream (noise removed); IGNORE elsewhere.

    A position predicts the next clean-stream token only when both are non-noise and the next one is text
    other than <eoi>. E.g. kinds T T Z Z C C T with ids a <boi> . . . . <eoi> -> targets <boi> - - - - - -.
    """
    targets = np.full(len(ids), IGNORE, dtype=np.int64)
    stream = np.flatnonzero(kind != NOISE)  # indices of the clean stream, in order
    if len(stream) < 2:
        return targets
    cur, nxt = stream[:-1], stream[1:]
    ok = (kind[nxt] == TEXT) & (ids[nxt] != eoi_id)
    targets[cur[ok]] = ids[nxt[ok]]
    return targets


# --------------------------------------------------------------------------------------------------------
# Packing


@dataclass
class Row:
    """One packed row of length L (numpy). `images` lists the row's images in token order."""

    ids: np.ndarray
    targets: np.ndarray
    kind: np.ndarray
    doc: np.ndarray       # (L,) int32 document index within the row, -1 on pads
    split: np.ndarray     # (L,) int32 split index within the row, -1 on text/pads
    img: np.ndarray       # (L,) int32 image index within the row, -1 on text/pads
    pos: np.ndarray
    pos2d: np.ndarray
    images: list[ImageTokens]
    stats: dict = field(default_factory=dict)  # counters from the pipeline (bad samples, truncations, ...)


def pack_row(docs: list[DocLayout], row_len: int, pad_id: int) -> Row:
    """Concatenate whole documents into one row of exactly `row_len` tokens, renumbering docs/splits/images."""
    total = sum(len(d) for d in docs)
    if total > row_len:
        raise ValueError(f"documents of {total} tokens do not fit a row of {row_len}")
    L = row_len
    r = Row(ids=np.full(L, pad_id, np.int64), targets=np.full(L, IGNORE, np.int64), kind=np.zeros(L, np.int8),
            doc=np.full(L, -1, np.int32), split=np.full(L, -1, np.int32), img=np.full(L, -1, np.int32),
            pos=np.zeros(L, np.int32), pos2d=np.zeros((L, 2), np.int32), images=[])
    o = n_split = 0
    for di, d in enumerate(docs):
        sl = slice(o, o + len(d))
        r.ids[sl], r.targets[sl], r.kind[sl] = d.ids, d.targets, d.kind
        r.doc[sl] = di
        r.split[sl] = np.where(d.split >= 0, d.split + n_split, -1)
        r.img[sl] = np.where(d.img >= 0, d.img + len(r.images), -1)
        r.pos[sl], r.pos2d[sl] = d.pos, d.pos2d
        n_split += int(d.split.max()) + 1 if (d.split >= 0).any() else 0
        r.images.extend(d.images)
        o += len(d)
    return r


class Packer:
    """Token-budget packing of a document stream into fixed-length rows (BAGEL-style, whole documents).

    Holds up to `buffer` documents; each row takes the largest buffered document, then best-fits the rest
    into the remaining space. Documents longer than `row_len` are dropped and counted (`stats["too_long"]`).
    """

    def __init__(self, row_len: int, pad_id: int, buffer: int = 64):
        self.row_len, self.pad_id, self.buffer = row_len, pad_id, buffer
        self.pending: list[DocLayout] = []
        self.stats = {"docs": 0, "too_long": 0}

    def add(self, doc: DocLayout) -> Iterator[Row]:
        if len(doc) > self.row_len:
            self.stats["too_long"] += 1
            return
        self.pending.append(doc)
        if len(self.pending) >= self.buffer:
            yield self._row()

    def flush(self) -> Iterator[Row]:
        while self.pending:
            yield self._row()

    def _row(self) -> Row:
        self.pending.sort(key=len, reverse=True)
        chosen = [self.pending.pop(0)]
        room = self.row_len - len(chosen[0])
        while True:
            fit = [i for i, d in enumerate(self.pending) if len(d) <= room]
            if not fit:
                break
            i = fit[0]  # pending is sorted by length, descending: the first that fits is the best fit
            room -= len(self.pending[i])
            chosen.append(self.pending.pop(i))
        self.stats["docs"] += len(chosen)
        row = pack_row(chosen, self.row_len, self.pad_id)
        row.stats = dict(self.stats)
        self.stats = {k: 0 for k in self.stats}
        return row


# --------------------------------------------------------------------------------------------------------
# Batch


@dataclass
class Batch:
    """B packed rows of length L, as tensors. Legend: B rows, L tokens, C latent channels per token.

    ids, targets (B, L) int64; kind (B, L) int8; doc, split, img, pos (B, L) int32; pos2d (B, L, 2) int32;
    latents (B, L, C) float32: the clean latents x on every CLEAN and NOISE token (the objective noises the
    NOISE ones), 0 elsewhere; img holds batch-global image indices; image_grid (n_img, 2) int32;
    image_generate (n_img,) bool. `stats` sums the pipeline counters of the rows.
    """

    ids: torch.Tensor
    targets: torch.Tensor
    kind: torch.Tensor
    doc: torch.Tensor
    split: torch.Tensor
    img: torch.Tensor
    pos: torch.Tensor
    pos2d: torch.Tensor
    latents: torch.Tensor
    image_grid: torch.Tensor
    image_generate: torch.Tensor
    stats: dict = field(default_factory=dict)

    ROW_FIELDS = ("ids", "targets", "kind", "doc", "split", "img", "pos", "pos2d", "latents")  # (B, L, ...) fields
    IMAGE_FIELDS = ("image_grid", "image_generate")                                        # (n_img, ...) fields

    def rows(self, rows: torch.Tensor) -> "Batch":
        """The sub-batch of the given rows (every per-token field); image fields and indices stay batch-global."""
        return replace(self, **{k: getattr(self, k)[rows] for k in self.ROW_FIELDS})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The same batch (same class, every non-tensor field kept) with its tensors on `device`."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    @property
    def n_images(self) -> int:
        return int(self.image_grid.shape[0])

    def n_tokens(self) -> dict:
        """Token counts by kind (for logging packing efficiency and throughput)."""
        k = self.kind
        return {"text": int((k == TEXT).sum()), "clean": int((k == CLEAN).sum()), "noise": int((k == NOISE).sum()),
                "pad": int((k == PAD).sum()), "total": int(k.numel())}


def image_text_context(kind: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor, img: torch.Tensor,
                       n_img: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which text each image is conditioned on (`model.text_cond: pooled`): the TEXT tokens of its own document that
    come before it (its caption, `<bos>`, `<boi>`; after CFG dropout with the hidden null prompt, only the layout
    specials, since hidden tokens are PAD).

    kind, doc, pos, img (B, L) -> (row (n_img,) int64, sel (n_img, L) bool): image j lies in row `row[j]` and is
    conditioned on the tokens l with sel[j, l]. An image's slot is the smallest position of its tokens; an index
    with no token (not in this batch) gets an empty selection. E.g. one row `<bos> a b <boi> [n n] <eoi> | <bos>
    [n] ...` with docs 0 0 0 0 0 0 0 1 1: image 0 selects <bos> a b <boi>; image 1 (doc 1) selects doc 1's <bos>."""
    B, L = kind.shape
    dev = kind.device
    flat = img.reshape(-1).long()
    at = (flat >= 0).nonzero().squeeze(1)                                            # (n_img_tok,) flat indices
    j = flat[at]
    big = torch.iinfo(torch.int64).max
    slot = torch.full((n_img,), big, dtype=torch.int64, device=dev).scatter_reduce(
        0, j, pos.reshape(-1)[at].long(), "amin")                                   # (n_img,) the image's slot
    row = torch.zeros(n_img, dtype=torch.int64, device=dev).scatter(0, j, at // L)  # (n_img,)
    d = torch.full((n_img,), -2, dtype=torch.int64, device=dev).scatter(0, j, doc.reshape(-1)[at].long())
    sel = ((kind[row] == TEXT) & (doc[row].long() == d[:, None]) & (pos[row].long() < slot[:, None]))
    return row, sel


def gather_context(ids: torch.Tensor, row: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """ids (B, L), row (n,), sel (n, L) bool -> (n, Lc) the selected ids of each in order, -1 after them;
    Lc = the most any selects (at least 1). E.g. ids [[5, 6, 7]], row [0, 0], sel [[1, 0, 1], [0, 0, 0]]
    -> [[5, 7], [-1, -1]]."""
    n, L = sel.shape
    count = sel.sum(1)                                                               # (n,)
    Lc = max(1, int(count.max())) if n else 1
    order = torch.sort(sel.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :Lc]  # selected first
    got = ids[row][torch.arange(n, device=ids.device)[:, None], order]               # (n, Lc)
    keep = torch.arange(Lc, device=ids.device)[None] < count[:, None]
    return torch.where(keep, got.long(), torch.full_like(got.long(), -1))


NULL_PROMPTS = ("hidden", "pad")


def apply_null_prompt(ids: torch.Tensor, kind: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor,
                      drop: torch.Tensor, special: SpecialIds, mode: str = "hidden",
                      offset: torch.Tensor | None = None):
    """The unconditional ("null") prompt of classifier-free guidance, on the tokens where `drop` is True.

    (B, L) ids, kind, doc, pos; drop (B, L) bool, the tokens of the documents that lose their condition; offset
    (B,) int64 or None: hidden tokens already before column 0 of each row (the sampler's cache, one document a row).
    The condition is every TEXT token of a dropped document that is not a layout special (<bos> <eos> <boi> <eoi>).

      hidden  the condition leaves the sequence: its tokens become pads (id <pad>, kind PAD, doc -1: no token sees
              them) and every later token of the document moves back by the number of hidden tokens before it. The
              null prompt of a caption->image document is then `<bos> <boi>` at positions 0, 1 whatever the caption,
              so guidance can act on everything the caption says, its length (which gives away the count) included.
      pad     the condition's ids become <pad> in place; kind, doc and positions are kept, so the null prompt has
              the caption's length (runs saved before `objective.null_prompt` existed were trained this way).

    Worked example (caption a b c, N = 2 noise tokens n; '.' = <pad>):
        ids   <bos> a  b  c  <boi> n  n        hidden:  <bos> .  .  .  <boi> n  n
        doc     0   0  0  0    0   0  0                   0   -1 -1 -1   0   0  0
        pos     0   1  2  3    4   5  5                   0    1  2  3   1   2  2
    Returns (ids, kind, doc, pos, hidden (B, L) bool: the tokens taken out of the sequence, none with "pad")."""
    if mode not in NULL_PROMPTS:
        raise ValueError(f"null prompt must be one of {NULL_PROMPTS}, got {mode!r}")
    specials = torch.tensor([special.bos, special.eos, special.boi, special.eoi], device=ids.device)
    hidden = drop & (kind == TEXT) & ~torch.isin(ids, specials)
    ids = torch.where(hidden, torch.full_like(ids, special.pad), ids)
    if mode == "pad":
        return ids, kind, doc, pos, torch.zeros_like(hidden)
    h = hidden.long()
    d = doc.long().clamp(min=0)
    per_doc = torch.zeros(h.shape[0], int(d.max()) + 1 if d.numel() else 1, dtype=torch.long, device=h.device)
    per_doc.scatter_add_(1, d, h)                                                   # (B, n_docs) hidden per doc
    earlier_docs = per_doc.cumsum(1) - per_doc                                      # hidden in earlier docs
    shift = (h.cumsum(1) - h) - earlier_docs.gather(1, d)                          # hidden earlier in the doc
    if offset is not None:
        shift = shift + offset.to(shift.device)[:, None]
    pos = torch.where(doc >= 0, pos - shift.to(pos.dtype), pos)
    kind = torch.where(hidden, torch.full_like(kind, PAD), kind)
    doc = torch.where(hidden, torch.full_like(doc, -1), doc)
    return ids, kind, doc, pos, hidden


def trim_pads(batch: Batch, multiple: int = 8) -> Batch:
    """The batch cut to its longest row: the pad columns at the end of every row dropped, L rounded up to a multiple of
    `multiple` (fewer shapes for compiled kernels) and at most the original L. Pads attend only to themselves and carry
    no target, so nothing else changes. E.g. rows of 96 holding one document of 70-77 tokens each -> L = 80."""
    L = batch.ids.shape[1]
    used = (batch.kind != PAD).any(dim=0).nonzero()                                  # columns some row uses
    keep = min(L, -(-(int(used.max()) + 1 if len(used) else 1) // multiple) * multiple)
    if keep == L:
        return batch
    return replace(batch, **{k: getattr(batch, k)[:, :keep] for k in batch.ROW_FIELDS})


def collate(rows: list[Row]) -> Batch:
    """Rows -> Batch; image indices become batch-global, latent tokens are scattered to their positions."""
    if not rows:
        raise ValueError("collate needs at least one row")
    dims = {im.tokens.shape[1] for r in rows for im in r.images}
    if len(dims) > 1:
        raise ValueError(f"images with different latent channel counts in one batch: {sorted(dims)}")
    C = dims.pop() if dims else 1
    B, L = len(rows), len(rows[0].ids)
    latents = np.zeros((B, L, C), np.float32)
    img = np.stack([r.img for r in rows]).copy()
    grids, gen = [], []
    for b, r in enumerate(rows):
        base = len(grids)
        for j, im in enumerate(r.images):
            at = np.flatnonzero(r.img == j)
            # each image appears once per split; tokens repeat in row-major order within every split
            n = im.tokens.shape[0]
            latents[b, at] = np.tile(im.tokens.astype(np.float32), (len(at) // n, 1))
            grids.append(im.grid)
            gen.append(im.generate)
        img[b] = np.where(r.img >= 0, r.img + base, -1)
    stats: dict = {}
    for r in rows:
        for k, v in r.stats.items():
            stats[k] = stats.get(k, 0) + v
    t = torch.from_numpy
    return Batch(ids=t(np.stack([r.ids for r in rows])), targets=t(np.stack([r.targets for r in rows])),
                 kind=t(np.stack([r.kind for r in rows])), doc=t(np.stack([r.doc for r in rows])),
                 split=t(np.stack([r.split for r in rows])), img=t(img), pos=t(np.stack([r.pos for r in rows])),
                 pos2d=t(np.stack([r.pos2d for r in rows])), latents=t(latents),
                 image_grid=torch.tensor(grids, dtype=torch.int32).reshape(-1, 2),
                 image_generate=torch.tensor(gen, dtype=torch.bool), stats=stats)
