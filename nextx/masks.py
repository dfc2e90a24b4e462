"""Attention masks from the token layout: one rule (docs/design.md §2), two backends (flex BlockMask, dense SDPA).

Every token is described by `(doc, kind, split)` from `nextx.sequence` (kinds PAD=0, TEXT=1, CLEAN=2, NOISE=3;
`doc` = document index in the row, -1 on pads; `split` = split index in the row, -1 on text and pads). The rule:

  R1. nothing crosses a document boundary;
  R2. a TEXT or CLEAN query sees every earlier-or-equal TEXT/CLEAN key of its document (causal) and all keys of
      its own clean split (bidirectional inside the image); never a NOISE key;
  R3. a NOISE query sees the TEXT/CLEAN keys of its document up to and including its image's `<boi>`, and all
      keys of its own noise split (bidirectional); nothing else sees a NOISE key.
  Pads (our choice): a pad query sees exactly itself and no other query sees a pad. Every softmax row then has
  at least one key (no NaN from SDPA), pads cost one diagonal entry each (cheaper for flex than a causal pad
  block), and their outputs are finite garbage that no loss reads.

Reduction. Layouts (`layout_document`) write every split contiguously, in the order `<boi>` [noise split(s)]
[clean split] `<eoi>`, and split ids are unique within a row. Then, with q, k row indices,

    allowed(q, k) = (q == k)  or  ( doc_q == doc_k >= 0  and  ( (kind_k != NOISE and k <= q)
                                                                or (split_q == split_k >= 0) ) )

Why this equals R1-R3:
  * TEXT/CLEAN query. `kind_k != NOISE and k <= q` is exactly R2's causal part. `split_q == split_k >= 0` is
    empty for a text query (split -1) and is the query's own clean split for a clean query; a clean split holds
    only CLEAN tokens, so no NOISE key is ever reached.  (The diagonal is already allowed by the causal part.)
  * NOISE query q in noise split S, whose image's `<boi>` sits at index b. S starts at b+1, or after other
    noise splits of the same image (M particles: `<boi>` Z_1 .. Z_M C). So every key in (b, q] is NOISE and
    `kind_k != NOISE and k <= q` selects exactly the TEXT/CLEAN keys at k <= b: the prefix through `<boi>`. The
    clean split of the same image lies after every noise split (k > q) and has another split id, so it is
    excluded; other particles' noise splits are NOISE with other ids, so particles never see each other.
    `split_q == split_k` adds S itself (bidirectional).
  * A NOISE key k is reached only through `split_q == split_k`, i.e. only by queries of its own split (R3).
  * Pads have doc -1, so `doc_q == doc_k >= 0` keeps them out of every document; `q == k` is their self-key.
The reduction leans on the layout invariants above; `check_layout` verifies them (tests run it on every
random layout) and `reference_mask` implements R1-R3 literally, with loops, to validate both backends.

Worked example: one row of L = 15, doc 0 = `[t0], image (1x2)` with its clean split kept, doc 1 =
`[t1], image (1x2)` (caption->image, clean split dropped), one pad. Kinds T text, Z noise, C clean, P pad;
'#' = attend, '.' = masked (row = query q, column = key k):

                            k:  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4
     q  tok    kind doc split
     0  <bos>  T     0   -        # . . . . . . . . . . . . . .
     1  t0     T     0   -        # # . . . . . . . . . . . . .
     2  <boi>  T     0   -        # # # . . . . . . . . . . . .
     3  z      Z     0   0        # # # # # . . . . . . . . . .
     4  z      Z     0   0        # # # # # . . . . . . . . . .
     5  c      C     0   1        # # # . . # # . . . . . . . .
     6  c      C     0   1        # # # . . # # . . . . . . . .
     7  <eoi>  T     0   -        # # # . . # # # . . . . . . .
     8  <eos>  T     0   -        # # # . . # # # # . . . . . .
     9  <bos>  T     1   -        . . . . . . . . . # . . . . .
    10  t1     T     1   -        . . . . . . . . . # # . . . .
    11  <boi>  T     1   -        . . . . . . . . . # # # . . .
    12  z      Z     1   2        . . . . . . . . . # # # # # .
    13  z      Z     1   2        . . . . . . . . . # # # # # .
    14  (pad)  P    -1   -        . . . . . . . . . . . . . . #

Columns 3-4 (doc 0's noise split) are seen only by rows 3-4; the clean split (5-6) is bidirectional and is what
`<eoi>`/`<eos>` see of the image; doc 1 never sees doc 0; the pad sees itself.

Backends (docs/design.md §2): `block_mask` builds one FlexAttention BlockMask per packed batch for GPU training;
`dense_mask` gives the (B, 1, L, L) boolean mask for SDPA (CPU training: flex has no backward on CPU, and the
reference backend). `xformers_available` / `require_xformers` gate the optional xformers backend.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from nextx.sequence import NOISE, PAD, TEXT

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BLOCK_SIZE = 128  # flex's default sparse block: (128 queries) x (128 keys) tiles


def _check_shapes(doc: torch.Tensor, kind: torch.Tensor, split: torch.Tensor) -> None:
    if doc.dim() != 2 or doc.shape != kind.shape or doc.shape != split.shape:
        raise ValueError(f"doc, kind, split must all be (B, L); got {tuple(doc.shape)}, {tuple(kind.shape)}, "
                         f"{tuple(split.shape)}")
    if not (doc.device == kind.device == split.device):
        raise ValueError(f"doc, kind, split on different devices: {doc.device}, {kind.device}, {split.device}")


def mask_mod(doc: torch.Tensor, kind: torch.Tensor, split: torch.Tensor) -> MaskMod:
    """(B, L) layout tensors -> FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool` (the reduction above).

    Only tensor indexing and elementwise ops, so it vmaps (create_mask) and compiles into the flex kernel; the
    three tensors are captured as kernel buffers. The result does not depend on `h`.
    """
    _check_shapes(doc, kind, split)

    def mod(b, h, q_idx, kv_idx):
        dq, dk = doc[b, q_idx], doc[b, kv_idx]
        sq, sk = split[b, q_idx], split[b, kv_idx]
        causal = (kind[b, kv_idx] != NOISE) & (kv_idx <= q_idx)
        same_split = (sq == sk) & (sq >= 0)
        return (q_idx == kv_idx) | ((dq == dk) & (dq >= 0) & (causal | same_split))

    return mod


def dense_mask(doc: torch.Tensor, kind: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
    """(B, L) layout tensors -> (B, 1, L, L) bool for SDPA's `attn_mask` (True = attend), vectorised.

    Memory is B*L*L bytes (plus int temporaries of the same shape): 134 MB for B=8, L=4096; build it once per
    batch and share it across layers and heads (the head dim broadcasts).
    """
    _check_shapes(doc, kind, split)
    L = doc.shape[1]
    idx = torch.arange(L, device=doc.device)
    q, k = idx[:, None], idx[None, :]                                   # (L, 1), (1, L)
    dq, dk = doc[:, :, None], doc[:, None, :]                           # (B, L, 1), (B, 1, L)
    sq, sk = split[:, :, None], split[:, None, :]
    causal = (kind != NOISE)[:, None, :] & (k <= q)                     # (B, L, L)
    same_split = (sq == sk) & (sq >= 0)
    allowed = (q == k) | ((dq == dk) & (dq >= 0) & (causal | same_split))
    return allowed[:, None]                                             # (B, 1, L, L)


def reference_mask(doc: torch.Tensor, kind: torch.Tensor, split: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """R1-R3 written literally with Python loops (tests only: O(B*L^2) Python work). -> (B, 1, L, L) bool.

    Independent of the reduction: a noise query's `<boi>` is found from `img` (per-token image index, -1 on
    text/pads, as in `Batch.img`): it is the token just before the image's first token, and must be text.
    """
    _check_shapes(doc, kind, split)
    B, L = doc.shape
    out = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        d, kd, s, im = doc[b].tolist(), kind[b].tolist(), split[b].tolist(), img[b].tolist()
        first: dict[int, int] = {}
        for i, j in enumerate(im):
            if j >= 0 and j not in first:
                first[j] = i
        for q in range(L):
            if kd[q] == PAD:
                out[b, 0, q, q] = True  # a pad sees itself only
                continue
            if kd[q] == NOISE:
                boi = first[im[q]] - 1
                if boi < 0 or kd[boi] != TEXT or d[boi] != d[q]:
                    raise ValueError(f"row {b}: noise token {q} has no <boi> before its image")
            for k in range(L):
                if d[k] != d[q] or kd[k] == PAD:  # R1 (pads belong to no document)
                    continue
                if kd[q] == NOISE:  # R3
                    ok = (kd[k] != NOISE and k <= boi) or s[k] == s[q]
                else:  # R2: causal over text/clean, plus the own clean split
                    ok = (kd[k] != NOISE and k <= q) or (kd[q] != TEXT and s[k] == s[q])
                out[b, 0, q, k] = ok
    return out


def check_layout(doc: torch.Tensor, kind: torch.Tensor, split: torch.Tensor, img: torch.Tensor | None = None) -> None:
    """Raise ValueError unless the layout has the invariants the reduction relies on (see module docstring).

    Pads: doc -1, split -1; text: split -1; image tokens: split >= 0; every split is one contiguous run of one
    kind and one doc, with a unique id; a noise split is preceded by text (its `<boi>`) or by another noise
    split (a particle of the same image). With `img`: a split covers one image, and all noise splits of an image
    come before its clean split. A debugging check (loops over splits), not for the training hot path.
    """
    _check_shapes(doc, kind, split)
    for b in range(doc.shape[0]):
        d, k, s = doc[b], kind[b], split[b]
        pad, text = k == PAD, k == TEXT
        if (d[pad] != -1).any() or (s[pad] != -1).any() or (d[~pad] < 0).any():
            raise ValueError(f"row {b}: pads must have doc -1 and split -1, other tokens doc >= 0")
        if (s[text] != -1).any() or (s[~pad & ~text] < 0).any():
            raise ValueError(f"row {b}: text must have split -1 and image tokens split >= 0")
        for sid in torch.unique(s[s >= 0]).tolist():
            at = torch.nonzero(s == sid).flatten()
            lo, hi = int(at[0]), int(at[-1])
            if hi - lo + 1 != len(at) or len(torch.unique(k[at])) != 1 or len(torch.unique(d[at])) != 1:
                raise ValueError(f"row {b}: split {sid} is not one contiguous run of one kind and one doc")
            if int(k[lo]) == NOISE:
                if lo == 0 or d[lo - 1] != d[lo] or int(k[lo - 1]) not in (TEXT, NOISE):
                    raise ValueError(f"row {b}: noise split {sid} does not follow its <boi> or another noise split")
                if img is not None and int(k[lo - 1]) == NOISE and img[b, lo - 1] != img[b, lo]:
                    raise ValueError(f"row {b}: noise split {sid} follows another image's noise split")
            if img is not None:
                if len(torch.unique(img[b, at])) != 1:
                    raise ValueError(f"row {b}: split {sid} covers several images")
                if int(k[lo]) == NOISE:
                    clean_before = (img[b, :lo] == img[b, lo]) & (k[:lo] != NOISE)
                    if clean_before.any():
                        raise ValueError(f"row {b}: noise split {sid} comes after its image's clean split")


def block_mask(doc: torch.Tensor, kind: torch.Tensor, split: torch.Tensor, *, n_heads: int | None = None,
               block_size: int = BLOCK_SIZE, _compile: bool = False):
    """(B, L) layout tensors -> FlexAttention `BlockMask` of shape (B, H, L, L), on the layout's device.

    B is always the real batch size: with B=None flex builds the mask of row 0 and broadcasts it to every row,
    which is silently wrong for packed rows whose layouts differ (a cause of training loss spikes reported by users of other mixed-modality models).
    H is 1 unless `n_heads` is given: the rule is head-independent, and flex broadcasts a size-1 head dim of an
    explicit BlockMask over all query heads (checked against SDPA in the tests); H=n_heads only multiplies the
    mask build cost by n_heads. We never pass None for either (create_block_mask would silently take 1).

    L need not be a multiple of `block_size`: create_block_mask pads the mask with False to whole tiles, edge
    tiles are "partial" (mask_mod is re-evaluated there) and the kernels bound out-of-range indices.
    `_compile=True` builds the mask with a cached `torch.compile(create_block_mask)`, which avoids materialising
    the B*H*L*L boolean grid (worth it on GPU for long rows; the first call compiles).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    _check_shapes(doc, kind, split)
    B, L = doc.shape
    H = 1 if n_heads is None else int(n_heads)
    build = _compiled_create_block_mask() if _compile else create_block_mask
    return build(mask_mod(doc, kind, split), B=B, H=H, Q_LEN=L, KV_LEN=L, device=doc.device,
                 BLOCK_SIZE=block_size)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


FLEX_MIN_HEAD_DIM = 16   # compiled FlexAttention on CUDA runs Triton's tl.dot, which needs every dim >= 16


def check_flex_head_dim(head_dim: int, device_type: str) -> None:
    """Refuse what compiled FlexAttention cannot run, before inductor fails deep in a kernel: head_dim < 16 on CUDA
    (the CPU path has no such limit)."""
    if device_type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM:
        raise ValueError(f"model.attention=flex on CUDA needs head_dim >= {FLEX_MIN_HEAD_DIM} (Triton's matmul), got "
                         f"{head_dim} (d_model / n_heads): use fewer heads, a wider model, or model.attention=sdpa")


@functools.cache
def flex_attention_compiled(dynamic: bool | None = False):
    """Cached `torch.compile(flex_attention, dynamic=dynamic)` (eager flex is a slow reference implementation).

    Default `dynamic=False`: one compile per (shape, dtype, device); the BlockMask tensors and the captured layout
    tensors are graph inputs, so new layouts of the same shape reuse the kernel. Keep L fixed (row_len) in
    training. On CPU only the forward exists; backward needs CUDA.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


class Availability(NamedTuple):
    """`(ok, reason)`; truthy iff ok, so both `if xformers_available():` and `ok, why = ...` work."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@functools.cache
def xformers_available() -> Availability:
    """Whether the optional xformers backend can run here, and why not. Imports xformers and runs one tiny
    `memory_efficient_attention` on CUDA (an import can succeed while its kernels do not match torch)."""
    try:
        import xformers.ops as xops  # noqa: F401
    except Exception as e:  # ImportError, or a build that fails to load against this torch
        return Availability(False, f"xformers is not importable ({type(e).__name__}: {e}); it is optional and "
                                   f"needs a build matching torch {torch.__version__} (pyproject extra 'xformers')")
    if not torch.cuda.is_available():
        return Availability(False, "xformers is installed but no CUDA device is available (it has no CPU kernels)")
    try:
        q = torch.zeros(1, 8, 1, 16, device="cuda", dtype=torch.float16)  # (B, L, H, D) in xformers' order
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:
        return Availability(False, f"xformers kernels failed to run ({type(e).__name__}: {e})")
    return Availability(True, "ok")


def require_xformers() -> None:
    """Raise a RuntimeError naming the reason when the xformers backend was asked for but cannot run."""
    ok, reason = xformers_available()
    if not ok:
        raise RuntimeError(f"the xformers attention backend was requested but is unavailable: {reason}. "
                           "Use the flex (GPU) or sdpa (CPU/reference) backend instead.")
