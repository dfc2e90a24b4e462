"""KV-cached, batched generation (docs/design.md §6): prefill, text decoding, few-step image refinement with
classifier-free guidance, captioning, interleaved text-image documents.

    x = t2i(model, prompts, special, grid=(h, w), latent_dim=C, steps=4, cfg_scale=1.5)   # (B, N, C) latents
    ids = caption(model, latents, special, grid=(h, w))                                    # B lists of text ids
    docs = generate(model, prompts, special, grid=(h, w), force_boi_at=(3,))               # B segment lists
    x, words = t2i_completed(model, prompts, special, grid=(h, w), latent_dim=C, complete=8, steps=4)  # words first
    x = t2i(model, [red_circle, blue_square], special, grid=(h, w), latent_dim=C, steps=4, image_of=[0, 0])  # composed
    x = t2i(model, [red_circle, blue_square], ..., image_of=[0, 0], regions=claims)  # each part guides its (2, N) tokens

`t2i` and `caption` take the arguments of the reference samplers in `tests/oracles.py` (full recomputation at every
step) and return the same numbers (tests/test_generate.py); this module never re-runs a token it has cached.

The cache. `Cache` holds the per-layer (k, v) of every row and the layout of every cached token: (doc, kind,
split) and each row's next 1D position. A forward of new tokens (a "chunk") builds its mask with `cached_mask`:
the one rule of `nextx.masks` (its `mask_mod`) evaluated on the layout of cache + chunk for the chunk's query rows
only. That is exactly the last Lq rows of `dense_mask` of the whole sequence (tested), in O(B Lq Lk), not O(B Lk²).

Rows of different lengths: all rows of the cache have one length, a shorter row holds PAD tokens (doc -1), which
by the mask rule see only themselves and are seen by no token. Positions are per row, not the cache index: every
token gets its training position (docs/design.md §3). Prompts are LEFT-padded at prefill; later chunks of unequal
length (a text token in one row, a committed image in another) are RIGHT-padded, leaving harmless pads mid-row.
The cost is cache slots: the longest prompt, plus N + 1 slots per committed image in the rows that did not draw it.

The loops (docs/design.md §6). Outer: one token per row from the logits of its last real token; randomness from
one CPU torch.Generator (same seed, same output, on any device); `<boi>`, sampled or forced (`force_boi_at`), draws
an image. Inner: x ~ N(0, σ_d² I) (CPU, float64, from the same generator), then only the noise split runs against
the read-only cache, its mask built once per image, updated by `imm.sampler_step`. Guidance: the cache holds 2B rows
[conditional; unconditional]; the unconditional rows get the same chunks through `sequence.apply_null_prompt`, so
the cache keeps their own doc ids and position shift (`Cache.u_doc`, `u_shift`); one batched forward per chunk and
per step. Commit: the clean split and `<eoi>` enter the cache merged into the next text step of the other rows.

Legend: B rows (prompts), L cached tokens, Lq tokens of a chunk, N tokens of an image (h*w), C latent channels,
V vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from nextx import imm
from nextx.masks import mask_mod
from nextx.model import ModelInput, dense_attention
from nextx.sequence import (CLEAN, NOISE, NULL_PROMPTS, PAD, TEXT, ImageTokens, SpecialIds, apply_null_prompt,
                            gather_context, layout_document)
from nextx.text_sampling import add_token, banned, force_sets, sample_tokens

SAMPLERS = imm.SAMPLERS
KV = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Masks and the cache


def cached_mask(doc: torch.Tensor, kind: torch.Tensor, split: torch.Tensor, n_new: int) -> torch.Tensor:
    """(B, L) layout of cache + chunk -> (B, 1, n_new, L) bool: the chunk's queries (the last n_new tokens)
    against every key, by the rule of `nextx.masks.mask_mod`; equals `dense_mask(doc, kind, split)[:, :, -n_new:]`."""
    B, L = doc.shape
    dev = doc.device
    b = torch.arange(B, device=dev)[:, None, None]                    # (B, 1, 1)
    q = torch.arange(L - n_new, L, device=dev)[None, :, None]          # (1, Lq, 1)
    k = torch.arange(L, device=dev)[None, None, :]                     # (1, 1, L)
    return mask_mod(doc, kind, split)(b, 0, q, k)[:, None]             # (B, 1, Lq, L)


@dataclass
class Cache:
    """KV cache of B prompts: `past` per layer (k, v) of shape (B', Hkv, L, hd), B' = 2B with guidance (rows
    [cond; uncond]); the layout of the B conditional rows (the unconditional rows share it): doc (B, L) int32
    (0 real, -1 pad), kind (B, L) int8, split (B, L) int32 (clean splits, ids unique in the cache); pos_next (B,)
    the next 1D position of each row; pad_id the id on pads and image tokens; n_split the next free split id.
    With guidance: null the null-prompt mode (`objective.null_prompt`), u_doc (B, L) the unconditional rows' doc
    ids (-1 on hidden text) and u_shift (B,) how far their positions sit behind the conditional rows'."""

    past: list[KV] | None
    doc: torch.Tensor
    kind: torch.Tensor
    split: torch.Tensor
    pos_next: np.ndarray
    guided: bool
    pad_id: int
    n_split: int = 0
    null: str = "hidden"
    u_doc: torch.Tensor | None = None
    u_shift: np.ndarray | None = None
    ids: torch.Tensor | None = None

    @classmethod
    def empty(cls, B: int, guided: bool, pad_id: int, device, null: str = "hidden") -> "Cache":
        if null not in NULL_PROMPTS:
            raise ValueError(f"null_prompt must be one of {NULL_PROMPTS}, got {null!r}")
        z = torch.zeros(B, 0, dtype=torch.int32, device=device)
        return cls(None, z, z.to(torch.int8), z.clone(), np.zeros(B, np.int64), guided, pad_id, null=null,
                   u_doc=z.clone() if guided else None, u_shift=np.zeros(B, np.int64) if guided else None,
                   ids=torch.zeros(2 * B if guided else B, 0, dtype=torch.int64, device=device))

    def text_context(self, rows: Sequence[int], guided: bool) -> torch.Tensor:
        """The text each new image of `rows` is conditioned on (`model.text_cond: pooled`): every cached TEXT token
        of the row's document -> (R or 2R, Lc) ids, -1 padded (`sequence.gather_context`); with guidance the
        unconditional rows follow, without their hidden tokens."""
        lr = torch.tensor(list(rows), device=self.doc.device)
        text = self.kind[lr] == TEXT
        sel = [text & (self.doc[lr] == 0)]
        at = [lr]
        if guided:
            sel.append(text & (self.u_doc[lr] == 0))
            at.append(lr + self.rows)
        return gather_context(self.ids, torch.cat(at), torch.cat(sel))

    @property
    def rows(self) -> int:
        return self.doc.shape[0]

    @property
    def length(self) -> int:
        return self.doc.shape[1]


# --------------------------------------------------------------------------------------------------------
# Chunks: per-row pieces of new tokens -> padded tensors -> one forward that appends to the cache


@dataclass
class _Piece:
    """New tokens of one row (numpy, length n): ids, kind, split (local id >= 0 on image tokens, -1 on text), pos,
    pos2d (n, 2), lat (n, C) or None when the piece has no image token."""

    ids: np.ndarray
    kind: np.ndarray
    split: np.ndarray
    pos: np.ndarray
    pos2d: np.ndarray
    lat: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _text_piece(tok: int, pos: int) -> _Piece:
    return _Piece(np.array([tok], np.int64), np.array([TEXT], np.int8), np.array([-1], np.int32),
                  np.array([pos], np.int64), np.zeros((1, 2), np.int64))


def _grid_rc(grid: tuple[int, int]) -> np.ndarray:
    h, w = grid
    return np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)  # (N, 2) row-major


def _image_piece(x: np.ndarray, grid: tuple[int, int], pos: int, special: SpecialIds) -> _Piece:
    """A finished image x (N, C) as its clean split at the image slot `pos`, then `<eoi>` at pos + 1."""
    N, C = x.shape
    return _Piece(ids=np.array([special.pad] * N + [special.eoi], np.int64),
                  kind=np.array([CLEAN] * N + [TEXT], np.int8), split=np.array([0] * N + [-1], np.int32),
                  pos=np.array([pos] * N + [pos + 1], np.int64),
                  pos2d=np.concatenate([_grid_rc(grid), np.zeros((1, 2), np.int64)]),
                  lat=np.concatenate([x.astype(np.float32), np.zeros((1, C), np.float32)]))


def prompt_piece(segments: Sequence, special: SpecialIds, *, open_image: bool = False) -> _Piece:
    """A prompt (segments: lists of text ids and ImageTokens) laid out as in training (`layout_document`), without
    the closing `<eos>`; with `open_image`, a `<boi>` is appended (text-to-image). Images in a prompt are context
    (clean split only): `<boi> [clean] <eoi>`. An empty prompt is `<bos>` alone."""
    segs = []
    for seg in segments:
        if isinstance(seg, ImageTokens):
            segs.append(ImageTokens(np.asarray(seg.tokens, np.float32), seg.grid, generate=False))
        elif len(seg):
            segs.append([int(t) for t in seg])
    if segs:
        d = layout_document(segs, special)
        n = len(d) - 1                                                          # drop the closing <eos>
        lat = None
        if d.images:
            lat = np.zeros((n, d.images[0].tokens.shape[1]), np.float32)
            img, rc = d.img[:n], d.pos2d[:n]
            for j, im in enumerate(d.images):
                at = img == j
                lat[at] = im.tokens[rc[at, 0] * im.grid[1] + rc[at, 1]]
        p = _Piece(d.ids[:n], d.kind[:n], d.split[:n], d.pos[:n].astype(np.int64), d.pos2d[:n].astype(np.int64), lat)
        nxt = int(d.pos[n])
    else:
        p, nxt = _text_piece(special.bos, 0), 1
    if open_image:
        boi = _text_piece(special.boi, nxt)
        lat = None if p.lat is None else np.concatenate([p.lat, np.zeros((1, p.lat.shape[1]), np.float32)])
        cat = [np.concatenate([getattr(p, f), getattr(boi, f)]) for f in ("ids", "kind", "split", "pos", "pos2d")]
        p = _Piece(*cat, lat=lat)
    return p


def _stack(pieces: Sequence[_Piece | None], latent_dim: int, pad_id: int, split_base: int, left: bool):
    """Pieces (None = nothing for that row) -> padded (B, Lq) numpy arrays, the index of each row's last real token
    (-1 if none) and the number of split ids used."""
    B = len(pieces)
    n = max((len(p) for p in pieces if p is not None), default=0)
    a = dict(ids=np.full((B, n), pad_id, np.int64), kind=np.full((B, n), PAD, np.int8),
             doc=np.full((B, n), -1, np.int32), split=np.full((B, n), -1, np.int32), pos=np.zeros((B, n), np.int64),
             pos2d=np.zeros((B, n, 2), np.int64), lat=np.zeros((B, n, latent_dim), np.float32))
    last = np.full(B, -1, np.int64)
    used = 0
    for b, p in enumerate(pieces):
        if p is None or len(p) == 0:
            continue
        o = n - len(p) if left else 0
        sl = slice(o, o + len(p))
        a["ids"][b, sl], a["kind"][b, sl], a["pos"][b, sl], a["pos2d"][b, sl] = p.ids, p.kind, p.pos, p.pos2d
        a["doc"][b, sl] = 0
        a["split"][b, sl] = np.where(p.split >= 0, p.split + split_base, -1)
        if p.lat is not None:
            a["lat"][b, sl] = p.lat
        last[b] = o + len(p) - 1
        if (p.split >= 0).any():
            used = max(used, int(p.split.max()) + 1)
    return a, last, used


def _append(model, cache: Cache, pieces: Sequence[_Piece | None], special: SpecialIds, *, left: bool = False,
            want_logits: bool = True, logits_at: np.ndarray | None = None) -> torch.Tensor | None:
    """Run the pieces (one per row) as one chunk, appending them to the cache (use_cache=True).

    Returns the next-token logits (B, V) float32 at each row's last real token (zeros for rows without a piece),
    or None when want_logits is False (the LM head is then skipped); logits_at (B, Lq) bool (no guidance): the
    logits at those tokens of the chunk only, (n_sel, V) in row-major order (the LM head runs on them alone)."""
    dev = cache.doc.device
    if logits_at is not None and cache.guided:
        raise ValueError("logits_at reads the logits of one half: build the cache without guidance")
    a, last, used = _stack(pieces, model.latent_dim, special.pad, cache.n_split, left)
    B, Lq = a["ids"].shape
    if Lq == 0:
        return None
    t = {k: torch.from_numpy(v).to(dev) for k, v in a.items()}
    doc = torch.cat([cache.doc, t["doc"]], 1)                                     # (B, L + Lq)
    kind = torch.cat([cache.kind, t["kind"]], 1)
    split = torch.cat([cache.split, t["split"]], 1)
    mask = cached_mask(doc, kind, split, Lq)                                      # (B, 1, Lq, L + Lq)
    tm = torch.zeros(B, Lq, dtype=torch.bool, device=dev)
    has = torch.from_numpy(last >= 0)
    if logits_at is not None:
        tm = torch.from_numpy(logits_at).to(dev)
    elif want_logits:
        rows = torch.nonzero(has).squeeze(1)
        tm[rows.to(dev), torch.from_numpy(last[has.numpy()]).to(dev)] = True
    ids, kq, pos, pos2d, lat = t["ids"], t["kind"], t["pos"], t["pos2d"], t["lat"]
    if cache.guided:                                                              # rows [cond; uncond]
        every = torch.ones_like(ids, dtype=torch.bool)
        u_ids, u_kind, u_doc, u_pos, hidden = apply_null_prompt(ids, kq, t["doc"], pos, every, special, cache.null,
                                                                torch.from_numpy(cache.u_shift))
        cache.u_doc = torch.cat([cache.u_doc, u_doc], 1)
        cache.u_shift = cache.u_shift + hidden.sum(1).cpu().numpy()
        mask = torch.cat([mask, cached_mask(cache.u_doc, kind, split, Lq)])
        ids, kq, pos = torch.cat([ids, u_ids]), torch.cat([kq, u_kind]), torch.cat([pos, u_pos])
        pos2d, lat = (torch.cat([v, v]) for v in (pos2d, lat))
        tm = torch.cat([tm, torch.zeros_like(tm)])
    cache.ids = torch.cat([cache.ids, ids], 1)                                    # (B', L + Lq)
    img = torch.full(ids.shape, -1, dtype=torch.int32, device=dev)
    none = torch.zeros(0, device=dev)
    out = model(ModelInput(ids, kq, pos, pos2d, lat, img, none, none, mask), past=cache.past, use_cache=True,
                text_mask=tm)
    cache.past, cache.doc, cache.kind, cache.split = out.past, doc, kind, split
    cache.n_split += used
    for b, p in enumerate(pieces):
        if p is not None and len(p):
            cache.pos_next[b] = int(p.pos[-1]) + 1
    if not want_logits:
        return None
    if logits_at is not None:
        return out.text_logits.float()
    logits = torch.zeros(B, model.vocab_size, device=dev)
    logits[has.to(dev)] = out.text_logits.float()
    return logits


# --------------------------------------------------------------------------------------------------------
# The inner loop: refine one image per selected row against the read-only cache


def _check_sampler(sampler: str, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _has_parts(image_of: Sequence[int] | None) -> bool:
    """Whether some image of `image_of` (the image of each row) is drawn from several rows (composed guidance)."""
    return image_of is not None and len(set(image_of)) < len(image_of)


def composed_guidance(g_cond: torch.Tensor, g_uncond: torch.Tensor, image_of: torch.Tensor, n_images: int,
                      cfg_scale: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Guidance over the parts of a prompt (composable diffusion, Liu et al. 2022), one output per image:
    G_i = G_u + w Σ_{p of image i} a_p ⊙ (G_c,p − G_u,p). g_cond, g_uncond: (R, N, ...) per part row; image_of: (R,)
    int64, the image of each row, every image in 0..n_images-1 holding at least one row; the unconditional rows of one
    image see the same hidden prompt, so its first row's G_u stands for all. weights: a_p, (R, N) per part row and
    token (`region_weights`: regional composition); None: 1 everywhere. One part per image without weights is plain
    guidance, G_u + w (G_c − G_u). -> (n_images, N, ...)."""
    R = len(image_of)
    first = torch.full((n_images,), R, dtype=torch.int64, device=image_of.device).scatter_reduce(
        0, image_of, torch.arange(R, device=image_of.device), reduce="amin")                # each image's first row
    if bool((first == R).any()):
        raise ValueError(f"image_of must give every image 0..{n_images - 1} at least one part, got {image_of.tolist()}")
    term = cfg_scale * (g_cond - g_uncond)
    if weights is not None:
        if weights.shape != g_cond.shape[:2]:
            raise ValueError(f"weights must be (rows, tokens) = {tuple(g_cond.shape[:2])}, got {tuple(weights.shape)}")
        term = term * weights.to(term).reshape(*weights.shape, *[1] * (term.dim() - 2))
    delta = torch.zeros((n_images, *g_cond.shape[1:]), dtype=g_cond.dtype, device=g_cond.device)
    return g_uncond[first] + delta.index_add_(0, image_of, term)


def region_weights(claims: torch.Tensor, image_of: torch.Tensor, n_images: int) -> torch.Tensor:
    """Regional composition (the layout decides which part guides where): each token of an image is guided by the
    parts that claim it, shared equally, and a token no part of its image claims by all of its parts, shared equally.
    claims: (R, N) bool, the tokens each part row claims (its region; a row of False claims none); image_of: (R,)
    int64, the image of each row. -> a_p for `composed_guidance`, (R, N) float64: at every token the weights of an
    image's parts sum to 1, so G is a convex combination of the parts' own guided estimates G_u + w (G_c,p − G_u)."""
    if claims.dim() != 2 or claims.shape[0] != len(image_of):
        raise ValueError(f"claims must be (rows, tokens) with one row per entry of image_of ({len(image_of)}), "
                         f"got {tuple(claims.shape)}")
    c = claims.to(torch.float64)
    per_image = torch.zeros((n_images, c.shape[1]), dtype=torch.float64, device=c.device).index_add_(0, image_of, c)
    claimed = per_image[image_of]                                                  # (R, N): claimants of the token
    parts = torch.bincount(image_of, minlength=n_images).to(torch.float64)[image_of][:, None]      # (R, 1)
    return torch.where(claimed > 0, c / claimed.clamp_min(1.0), 1.0 / parts)


def refine(model, cache: Cache, rows: Sequence[int], grid: tuple[int, int], *, steps: int,
           sampler: str = "pushforward", cfg_scale: float = 1.0, sigma_d: float = imm.SIGMA_D, T: float = imm.T_MAX,
           eps: float = 0.0, schedule: str = "uniform", shift: float = 1.0,
           generator: torch.Generator | None = None, image_of: Sequence[int] | None = None,
           regions: torch.Tensor | None = None):
    """Draw one image for each of `rows`, whose cache ends with the image's `<boi>`. -> (x (I, N, C) float32,
    x0 (I, N, C) float64: the initial noise). The cache is read, never written (the caller commits x).
    image_of: the image (0..I-1) each row is a part of (None: one image per row, I = R); an image of several
    parts is drawn with `composed_guidance` at cfg_scale (then the cache needs its unconditional rows even at 1).
    regions: (R, N) bool, the tokens each part claims (regional composition, `region_weights`; needs image_of)."""
    _check_sampler(sampler, steps)
    mapped = image_of is not None
    if regions is not None and (not mapped or tuple(regions.shape) != (len(rows), grid[0] * grid[1])):
        raise ValueError(f"regions must come with image_of and be (rows, tokens) = ({len(rows)}, "
                         f"{grid[0] * grid[1]}), got {tuple(regions.shape)} with image_of={image_of}")
    n_img = len(set(image_of)) if mapped else len(rows)                       # I, the images drawn
    if mapped and len(image_of) != len(rows):
        raise ValueError(f"image_of has {len(image_of)} entries for {len(rows)} rows")
    if mapped and sorted(set(image_of)) != list(range(n_img)):
        raise ValueError(f"image_of must number the images 0..I-1, each with at least one row; got {list(image_of)}")
    guide = cfg_scale != 1.0 or _has_parts(image_of)
    if guide and not cache.guided:
        raise ValueError("guidance (cfg_scale != 1, or an image of several parts) needs a cache built with "
                         "unconditional rows")
    dev = cache.doc.device
    B, R, C = cache.rows, len(rows), model.latent_dim
    N = grid[0] * grid[1]
    sel = list(rows) + ([r + B for r in rows] if guide else [])                  # cache rows of [cond; uncond]
    R2 = len(sel)
    if sel == list(range(cache.past[0][0].shape[0])):
        past = cache.past
    else:
        idx = torch.tensor(sel, device=dev)
        past = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in cache.past]
    lr = torch.tensor(list(rows), device=dev)
    doc = torch.cat([cache.doc[lr], torch.zeros(R, N, dtype=torch.int32, device=dev)], 1)
    kind = torch.cat([cache.kind[lr], torch.full((R, N), NOISE, dtype=torch.int8, device=dev)], 1)
    split = torch.cat([cache.split[lr], torch.full((R, N), cache.n_split, dtype=torch.int32, device=dev)], 1)
    mask = cached_mask(doc, kind, split, N)                                        # (R, 1, N, L + N), once per image
    pos = torch.from_numpy(cache.pos_next[list(rows)]).to(dev)[:, None].expand(R, N)
    if guide:                                                                      # the unconditional rows' layout
        u_doc = torch.cat([cache.u_doc[lr], doc[:, -N:]], 1)
        mask = torch.cat([mask, cached_mask(u_doc, kind, split, N)])
        pos = torch.cat([pos, pos - torch.from_numpy(cache.u_shift[list(rows)]).to(dev)[:, None]])
    pos2d = torch.from_numpy(_grid_rc(grid)).to(dev).expand(R2, N, 2)
    ids = torch.full((R2, N), cache.pad_id, dtype=torch.int64, device=dev)
    kq = torch.full((R2, N), NOISE, dtype=torch.int8, device=dev)
    img = torch.arange(R2, dtype=torch.int32, device=dev)[:, None].expand(R2, N)
    no_text = torch.zeros(R2, N, dtype=torch.bool, device=dev)
    ctx = cache.text_context(rows, guide) if getattr(model, "text_mlp", None) is not None else None

    img_of = torch.tensor(list(image_of), dtype=torch.int64, device=dev) if mapped else None
    weights = None if regions is None else region_weights(regions.to(dev), img_of, n_img)
    x0 = torch.randn((n_img, N, C), generator=generator, dtype=torch.float64) * sigma_d
    x = x0.to(dev)
    ts = imm.sampling_times(steps, T=T, eps=eps, schedule=schedule, shift=shift)  # (steps + 1,) float64
    for i in range(steps):
        t_i, t_next = float(ts[i]), float(ts[i + 1])
        s_model = imm.sampler_s(sampler, t_i, t_next, eps)
        xr = x[img_of] if mapped else x                                           # each part row sees its image
        xx = torch.cat([xr, xr]) if guide else xr
        t = torch.full((R2,), t_i, device=dev)
        s = torch.full((R2,), s_model, device=dev)
        G = model(ModelInput(ids, kq, pos, pos2d, xx.float(), img, t, s, mask, ctx=ctx), past=past,
                  text_mask=no_text).latent_out.double()
        if guide and mapped:
            G = composed_guidance(G[:R], G[R:], img_of, n_img, cfg_scale, weights)
        elif guide:
            G = G[R:] + cfg_scale * (G[:R] - G[R:])                                # G_u + w (G_c - G_u)
        elif mapped:                                                               # one row per image, reordered
            G = torch.empty_like(x).index_copy_(0, img_of, G)
        e = None
        if sampler == "restart" and i + 1 < steps:                                 # re-noise with fresh e'
            e = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(dev) * sigma_d
        x = imm.sampler_step(sampler, x, G, t_i, t_next, eps=eps, sigma_d=sigma_d, noise=e)
    return x.float(), x0


# --------------------------------------------------------------------------------------------------------
# Public samplers


def _device(model, device):
    return torch.device(device) if device is not None else next(model.parameters()).device


def _on_sdpa(fn):
    """Decorator: run a sampler `fn(model, ...)` inside `dense_attention(model)`."""
    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        with dense_attention(model):
            return fn(model, *args, **kwargs)
    return wrapped


@torch.no_grad()
@_on_sdpa
def t2i(model, prompts: Sequence[Sequence[int]], special: SpecialIds, *, grid: tuple[int, int], latent_dim: int,
        steps: int, sampler: str = "pushforward", cfg_scale: float = 1.0, sigma_d: float = imm.SIGMA_D,
        T: float = imm.T_MAX, eps: float = 0.0, schedule: str = "uniform", shift: float = 1.0,
        generator: torch.Generator | None = None, device=None, null_prompt: str = "hidden",
        image_of: Sequence[int] | None = None, regions: torch.Tensor | None = None) -> torch.Tensor:
    """Text-to-image, cached. prompts: B lists of text ids (no <bos>) -> latents (B, N, C) float32.

    Same arguments and numbers as `tests/oracles.t2i_reference`: prefill `<bos> prompt <boi>` for all rows in one
    forward (two halves with guidance), then `steps` forwards of the noise splits only.
    image_of: prompts as parts of I images (the image of each prompt, 0..I-1), drawn with `composed_guidance`:
    -> (I, N, C). regions: (B, N) bool, the tokens each part claims (regional composition, `region_weights`)."""
    _check_sampler(sampler, steps)
    if latent_dim != model.latent_dim:
        raise ValueError(f"latent_dim={latent_dim} but the model has {model.latent_dim}")
    if image_of is not None and len(image_of) != len(prompts):
        raise ValueError(f"image_of has {len(image_of)} entries for {len(prompts)} prompts")
    cache = Cache.empty(len(prompts), cfg_scale != 1.0 or _has_parts(image_of), special.pad, _device(model, device),
                        null_prompt)
    _append(model, cache, [prompt_piece([list(p)], special, open_image=True) for p in prompts], special, left=True,
            want_logits=False)
    x, _ = refine(model, cache, list(range(len(prompts))), grid, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                  sigma_d=sigma_d, T=T, eps=eps, schedule=schedule, shift=shift, generator=generator,
                  image_of=image_of, regions=regions)
    return x


@torch.no_grad()
def t2i_completed(model, prompts: Sequence[Sequence[int]], special: SpecialIds, *, grid: tuple[int, int],
                  latent_dim: int, complete: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, device=None,
                  regions: Callable[[list[list[int]]], torch.Tensor | None] | None = None,
                  accept: Callable[[list[list[int]]], Sequence[bool]] | None = None, tries: int = 1,
                  best_of: int = 1, **image_kw) -> tuple[torch.Tensor, list]:
    """Text-to-image where the model may first finish the prompt: it writes up to `complete` text tokens after it
    (sampled at `temperature`, top_k, top_p; never `<eos>` or a layout token) and stops where it samples `<boi>`;
    then `t2i` draws from prompt + written words, all rows at once. What a prompt leaves open (where, how large) is
    so chosen in words, by the model's own language model, before the image. prompts: B lists of text ids (no
    <bos>); image_kw: `t2i`'s sampler keywords. The words are sampled from `generator` before the images' noise, so
    they do not depend on the sampler. -> (latents (B, N, C) float32, or (I, N, C) with image_kw's `image_of`; B
    lists of the written ids, without `<boi>`). regions: called with the finished prompts (B lists of ids, prompt +
    words) -> `t2i`'s regions ((B, N) bool, or None): where each part goes can be read from the words written.
    accept: called with the finished prompts -> B bools; the words of the rows it rejects are sampled again (from the
    same generator, the accepted rows kept), at most `tries` samples in all, the last kept if none is accepted.
    best_of > 1: every image drawn `best_of` times from the same words (fresh noise from `generator`, the first
    draw the image of best_of=1) and the one the model finds likeliest to be captioned by its finished prompt kept
    (`caption_logprob`; an image of several parts: the sum over its parts)."""
    if complete < 0 or tries < 1 or best_of < 1:
        raise ValueError(f"complete must be >= 0 text tokens, tries and best_of >= 1, got {complete}, {tries}, "
                         f"{best_of}")
    written: list[list[int]] = [[] for _ in prompts]
    todo = list(range(len(prompts))) if complete else []
    for _ in range(tries if complete else 0):
        rows = generate(model, [[list(prompts[j])] for j in todo], special, grid=grid, max_new_tokens=complete,
                        temperature=temperature, top_k=top_k, top_p=top_p, stop=(special.boi,), draw_images=False,
                        suppress=(special.pad, special.bos, special.eoi, special.eos), generator=generator,
                        device=device)
        for j, segs in zip(todo, rows):
            written[j] = [t for seg in segs for t in seg]
        if accept is None:
            break
        ok = list(accept([list(p) + w for p, w in zip(prompts, written)]))
        if len(ok) != len(prompts):
            raise ValueError(f"accept returned {len(ok)} verdicts for {len(prompts)} prompts")
        todo = [j for j, good in enumerate(ok) if not good]
        if not todo:
            break
    finished = [list(p) + w for p, w in zip(prompts, written)]
    claims = None if regions is None else regions(finished)
    x = _best_of(model, lambda: t2i(model, finished, special, grid=grid, latent_dim=latent_dim, generator=generator,
                                    device=device, regions=claims, **image_kw),
                 finished, special, grid, best_of, image_kw.get("image_of"))
    return x, written


@torch.no_grad()
@_on_sdpa
def caption_logprob(model, images: torch.Tensor, texts: Sequence[Sequence[int]], special: SpecialIds, *,
                    grid: tuple[int, int]) -> torch.Tensor:
    """The model as the judge of its own images: log p(text, <eos> | image) under its captioning, the document
    `<bos> <boi> [clean] <eoi> text <eos>` laid out as in training, in one forward. images: latents (B, N, C); texts:
    B lists of ids (no <bos>) -> (B,) float64, the sum over the text's tokens and the closing <eos> of their
    log-probabilities: the negative of the training cross-entropy summed over those targets."""
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts for {len(images)} images")
    arr = images.detach().cpu().float().numpy()
    pieces = [prompt_piece([ImageTokens(arr[i], grid, generate=False), list(t)], special) for i, t in enumerate(texts)]
    at = np.zeros((len(pieces), max(len(p) for p in pieces)), bool)
    for b, (piece, t) in enumerate(zip(pieces, texts)):   # <eoi> at n - k - 1 predicts t[0]; the last token <eos>
        at[b, len(piece) - len(t) - 1:len(piece)] = True
    cache = Cache.empty(len(pieces), False, special.pad, images.device)
    lp = torch.log_softmax(_append(model, cache, pieces, special, logits_at=at).double(), -1).cpu()   # (n_sel, V)
    target = torch.tensor([x for t in texts for x in (*t, special.eos)], dtype=torch.int64)
    row = torch.from_numpy(np.nonzero(at)[0])
    return torch.zeros(len(pieces), dtype=torch.float64).index_add_(0, row, lp.gather(1, target[:, None])[:, 0])


def _best_of(model, draw: Callable[[], torch.Tensor], texts: Sequence[Sequence[int]], special: SpecialIds,
             grid: tuple[int, int], n: int, image_of: Sequence[int] | None) -> torch.Tensor:
    """Draw `n` candidates of every image (`draw()` -> (I, N, C), fresh noise each call) and keep, per image, the one
    whose texts the model finds likeliest as its caption (`caption_logprob`, summed over an image's parts)."""
    best = draw()
    if n == 1:
        return best
    img_of = torch.arange(len(best)) if image_of is None else torch.tensor(list(image_of))

    def score(x):
        lp = caption_logprob(model, x[img_of.to(x.device)], texts, special, grid=grid)
        return torch.zeros(len(x), dtype=torch.float64).index_add_(0, img_of, lp)
    top = score(best)
    for _ in range(n - 1):
        x = draw()
        s = score(x)
        better = s > top
        best[better.to(best.device)], top = x[better.to(x.device)], torch.where(better, s, top)
    return best


@torch.no_grad()
def caption(model, images: torch.Tensor, special: SpecialIds, *, grid: tuple[int, int], max_new_tokens: int = 32,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, suppress: Sequence[int] = (),
            generator: torch.Generator | None = None) -> list[list[int]]:
    """Captioning, cached. images: latents (B, N, C) -> B lists of generated ids (without <eos>).

    Same arguments and numbers as `tests/oracles.caption_reference` (with suppress=(), top_k=0, top_p=1): the prompt
    `<bos> <boi> [clean] <eoi>` is prefilled, then text is decoded until <eos>. A sampled `<boi>` is kept as a text
    id, as the reference does; pass suppress=(boi, ...) to forbid ids."""
    arr = images.detach().cpu().float().numpy()
    prompts = [[ImageTokens(arr[i], grid, generate=False)] for i in range(len(arr))]
    docs = generate(model, prompts, special, grid=grid, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, suppress=suppress, draw_images=False, generator=generator,
                    device=images.device)
    return [[t for seg in d for t in seg] for d in docs]


@torch.no_grad()
@_on_sdpa
def generate(model, prompts: Sequence[Sequence], special: SpecialIds, *, grid: tuple[int, int],
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop: Sequence[int] | None = None, suppress: Sequence[int] = (), force_boi_at: Sequence = (),
             max_images: int | None = None, draw_images: bool = True, steps: int = 4, sampler: str = "pushforward",
             cfg_scale: float = 1.0, sigma_d: float = imm.SIGMA_D, T: float = imm.T_MAX, eps: float = 0.0,
             schedule: str = "uniform", shift: float = 1.0, generator: torch.Generator | None = None, device=None,
             trace: dict | None = None, progress: bool = False, null_prompt: str = "hidden") -> list[list]:
    """Interleaved generation, the outer loop over text tokens and images. prompts: B lists of segments (lists of
    text ids, ImageTokens as context). Returns per row the NEW segments in order: lists of text ids (with the `<boi>`
    that opened each image; stop tokens dropped) and images as (N, C) float32 CPU tensors. A row stops at a stop
    token (default <eos>) or after max_new_tokens sampled tokens (`<boi>` counts, images do not).
    force_boi_at: indices of sampled tokens (0 = the first) replaced by `<boi>`, for every row or one sequence per
    row. max_images: per row, then `<boi>` is suppressed. draw_images=False: `<boi>` is an ordinary token.
    suppress: ids never sampled. trace: a dict filled per row with "logits" ((V,) of every sampled token) and
    "noise" (each image's initial (N, C) float64). null_prompt: the run's `objective.null_prompt`."""
    _check_sampler(sampler, steps)
    dev = _device(model, device)
    B = len(prompts)
    stop_ids = {special.eos} if stop is None else {int(t) for t in stop}
    cache = Cache.empty(B, draw_images and cfg_scale != 1.0, special.pad, dev, null_prompt)
    logits = _append(model, cache, [prompt_piece(p, special) for p in prompts], special, left=True)
    out: list[list] = [[] for _ in range(B)]
    n_tok, n_img = np.zeros(B, np.int64), np.zeros(B, np.int64)
    done = np.zeros(B, bool)
    commit: list[np.ndarray | None] = [None] * B
    force = force_sets(force_boi_at, B)
    for key in ("logits", "noise") if trace is not None else ():
        trace.setdefault(key, [[] for _ in range(B)])
    ban = [int(t) for t in suppress]
    from tqdm import tqdm

    bar = tqdm(total=max_new_tokens, desc="tokens", leave=False, disable=not progress)
    while True:
        full = n_img >= max_images if draw_images and max_images is not None else None
        tok = sample_tokens(banned(logits, ban, full, special.boi), temperature=temperature, top_k=top_k,
                            top_p=top_p, generator=generator)
        pieces: list[_Piece | None] = [None] * B
        drawing = []
        for b in range(B):
            if done[b]:
                continue
            if commit[b] is not None:                                  # the image drawn last step enters the cache
                pieces[b] = _image_piece(commit[b], grid, int(cache.pos_next[b]), special)
                commit[b] = None
                continue
            t = int(tok[b])
            if draw_images and int(n_tok[b]) in force[b] and (max_images is None or n_img[b] < max_images):
                t = special.boi
            if trace is not None:
                trace["logits"][b].append(logits[b].cpu())
            if t in stop_ids:
                done[b] = True
                continue
            add_token(out[b], t)
            n_tok[b] += 1
            if draw_images and t == special.boi:
                drawing.append(b)
            elif n_tok[b] >= max_new_tokens:
                done[b] = True
                continue
            pieces[b] = _text_piece(t, int(cache.pos_next[b]))
        bar.n = int(n_tok.max())
        bar.refresh()
        if all(p is None for p in pieces):
            break
        logits = _append(model, cache, pieces, special)
        if drawing:
            x, x0 = refine(model, cache, drawing, grid, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                           sigma_d=sigma_d, T=T, eps=eps, schedule=schedule, shift=shift, generator=generator)
            for j, b in enumerate(drawing):
                out[b].append(x[j].cpu())
                n_img[b] += 1
                if trace is not None:
                    trace["noise"][b].append(x0[j])
                done[b] = n_tok[b] >= max_new_tokens                   # then nothing follows: no clean split
                commit[b] = None if done[b] else x[j].cpu().numpy()
    bar.close()
    return out
