"""nextx.masks: the docstring's worked example, a property test over random packed layouts (dense == literal
R1-R3 reference, check_layout passes), and FlexAttention == dense SDPA (forward on CPU via torch.compile; forward
and backward on GPU, marked `gpu`).

Figures of the last full run are printed with `pytest -s` (layouts checked, max |flex - dense|).
"""

import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nextx import masks
from nextx.masks import block_mask, check_layout, dense_mask, flex_attention_compiled, mask_mod, reference_mask
from nextx.sequence import CLEAN, NOISE, PAD, TEXT, ImageTokens, Packer, SpecialIds, collate, layout_document, pack_row

SP = SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)
KIND_LETTER = {TEXT: "T", NOISE: "Z", CLEAN: "C", PAD: "P"}


def image(h, w, generate=True, c=2):
    return ImageTokens(np.zeros((h * w, c), np.float32), (h, w), generate)


def layout_tensors(rows):
    """Packed rows -> (doc, kind, split, img) tensors of shape (B, L), through collate (batch-global img ids)."""
    b = collate(rows)
    return b.doc, b.kind, b.split, b.img


def picture(mask2d: torch.Tensor) -> list[str]:
    return [" ".join("#" if v else "." for v in row) for row in mask2d.tolist()]


# ------------------------------------------------------------------------------------------------ worked example


def test_docstring_worked_example():
    doc0 = layout_document([[10], image(1, 2)], SP, drop_trailing_clean=False)   # clean split kept
    doc1 = layout_document([[11], image(1, 2)], SP, drop_trailing_clean=True)    # caption->image, clean dropped
    row = pack_row([doc0, doc1], 15, SP.pad)                                     # 9 + 5 tokens + 1 pad
    doc, kind, split, img = layout_tensors([row])

    # parse the table in the module docstring: q tok kind doc split  # . # ...
    pat = re.compile(r"^\s*(\d+)\s+(\S+)\s+([TZCP])\s+(-?\d+)\s+(-|\d+)\s+([#.](?: [#.])*)\s*$")
    table = [m.groups() for m in map(pat.match, masks.__doc__.splitlines()) if m]
    assert [int(g[0]) for g in table] == list(range(15))
    assert "".join(g[2] for g in table) == "".join(KIND_LETTER[int(k)] for k in kind[0])
    assert [int(g[3]) for g in table] == doc[0].tolist()
    assert [-1 if g[4] == "-" else int(g[4]) for g in table] == split[0].tolist()
    expected = [g[5] for g in table]

    check_layout(doc, kind, split, img)
    assert picture(dense_mask(doc, kind, split)[0, 0]) == expected
    assert picture(reference_mask(doc, kind, split, img)[0, 0]) == expected
    from torch.nn.attention.flex_attention import create_mask
    assert picture(create_mask(mask_mod(doc, kind, split), 1, 1, 15, 15, device="cpu")[0, 0]) == expected


# ------------------------------------------------------------------------------------------------ random layouts


def with_particles(d, n: int):
    """Repeat every noise split of a DocLayout n times (the M-particle layout `<boi>` Z_1 .. Z_n C), with fresh,
    increasing split ids. layout_document makes one particle; the mask reduction also covers several."""
    sel, new_split, nid, i, L = [], [], 0, 0, len(d)
    while i < L:
        if d.split[i] < 0:
            sel.append(i); new_split.append(-1); i += 1
            continue
        j = i
        while j < L and d.split[j] == d.split[i]:
            j += 1
        for _ in range(n if d.kind[i] == NOISE else 1):
            sel.extend(range(i, j)); new_split.extend([nid] * (j - i)); nid += 1
        i = j
    sel = np.asarray(sel)
    return replace(d, ids=d.ids[sel], targets=d.targets[sel], kind=d.kind[sel], img=d.img[sel], pos=d.pos[sel],
                   pos2d=d.pos2d[sel], split=np.asarray(new_split, np.int32))


def random_doc(rng, max_side=3, particles=True):
    segs = []
    for _ in range(int(rng.integers(1, 5))):
        if rng.random() < 0.5:
            segs.append([int(v) for v in rng.integers(10, 100, size=int(rng.integers(1, 5)))])
        else:
            h, w = (int(v) for v in rng.integers(1, max_side + 1, size=2))
            segs.append(image(h, w, generate=bool(rng.random() < 0.7)))
    d = layout_document(segs, SP, drop_trailing_clean=bool(rng.random() < 0.5))
    if particles and rng.random() < 0.25:
        d = with_particles(d, int(rng.integers(2, 4)))
    return d


def random_rows(rng, B: int, L: int, max_side=3):
    """B packed rows of length L: either pack_row over docs drawn until the row is full (pads at the end, possibly
    an all-pad row), or a Packer (best fit) over a stream of docs."""
    if rng.random() < 0.5:
        rows = []
        for _ in range(B):
            docs, n = [], 0
            for _ in range(int(rng.integers(0, 8))):
                d = random_doc(rng, max_side)
                if n + len(d) <= L:
                    docs.append(d); n += len(d)
            rows.append(pack_row(docs, L, SP.pad))
        return rows
    p = Packer(row_len=L, pad_id=SP.pad, buffer=int(rng.integers(1, 8)))
    rows = []
    while len(rows) < B:
        rows.extend(p.add(random_doc(rng, max_side)))
        if rng.random() < 0.1:
            rows.extend(p.flush())
    return rows[:B]


FIGURES: dict = {}


def test_dense_equals_reference_on_random_layouts():
    rng = np.random.default_rng(0)
    n_rows = n_multi_doc = n_particles = n_pad = 0
    t0 = time.perf_counter()
    for _ in range(300):
        B, L = int(rng.integers(1, 4)), int(rng.integers(4, 64))
        doc, kind, split, img = layout_tensors(random_rows(rng, B, L))
        check_layout(doc, kind, split, img)
        dense = dense_mask(doc, kind, split)
        assert dense.shape == (B, 1, L, L) and dense.dtype == torch.bool
        assert torch.equal(dense, reference_mask(doc, kind, split, img))
        # rule-level facts that hold whatever the reference says
        assert dense.any(-1).all()                                          # every softmax row has a key
        noise_k = (kind == NOISE)[:, None, None, :]
        same_split = (split[:, :, None] == split[:, None, :])[:, None] & (split >= 0)[:, None, :, None]
        assert not (dense & noise_k & ~same_split).any()                    # only its own split sees a noise key
        assert not (dense & (doc[:, :, None] != doc[:, None, :])[:, None]).any()   # R1 (pads: doc -1, see self)
        n_rows += B
        n_multi_doc += int(sum(int(doc[b].max()) >= 1 for b in range(B)))
        n_pad += int((kind == PAD).any(1).sum())
        z = kind == NOISE
        n_particles += int(sum(len(torch.unique(split[b][z[b]])) > len(torch.unique(img[b][z[b]])) for b in range(B)))
    FIGURES["reference"] = dict(rows=n_rows, multi_doc=n_multi_doc, with_pads=n_pad, multi_particle=n_particles,
                                seconds=round(time.perf_counter() - t0, 2))
    print(f"\ndense == reference on {FIGURES['reference']}")
    assert n_rows >= 200 and n_multi_doc > 50 and n_pad > 50 and n_particles > 10


def test_check_layout_and_reference_reject_broken_layouts():
    d = layout_document([[10], image(1, 2), [11]], SP)
    doc, kind, split, img = layout_tensors([pack_row([d], 12, SP.pad)])
    check_layout(doc, kind, split, img)
    bad = split.clone(); bad[0, 3] = 1                                      # clean split 1 = {3, 5, 6}: a gap
    with pytest.raises(ValueError):
        check_layout(doc, kind, bad, img)
    bad = doc.clone(); bad[0, -1] = 0                                       # a pad inside a document
    with pytest.raises(ValueError):
        check_layout(bad, kind, split, img)
    bad = kind.clone(); bad[0, 2] = CLEAN                                   # <boi> turned into an image token
    with pytest.raises(ValueError):
        reference_mask(doc, bad, split, img)
    with pytest.raises(ValueError):
        dense_mask(doc[0], kind[0], split[0])                               # (L,) instead of (B, L)


# ------------------------------------------------------------------------------------------------ flex == dense


def flex_vs_dense(doc, kind, split, H, D, gen, n_heads=None, device="cpu", backward=False):
    B, L = doc.shape
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device).requires_grad_(backward) for _ in range(3))
    bm = block_mask(doc.to(device), kind.to(device), split.to(device), n_heads=n_heads,
                    _compile=device != "cpu")
    assert bm.shape == (B, 1 if n_heads is None else n_heads, L, L)
    out = flex_attention_compiled()(q, k, v, block_mask=bm)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc, kind, split).to(device))
    diffs = [(out - ref).abs().max().item()]
    # the mask matters: unmasked attention is far from both (guards against a vacuous comparison)
    assert (F.scaled_dot_product_attention(q, k, v) - ref).abs().max().item() > 1e-2
    if backward:
        g = torch.randn(out.shape, generator=gen).to(device)
        grads = torch.autograd.grad(out, (q, k, v), g)
        grads_ref = torch.autograd.grad(ref, (q, k, v), g)
        diffs += [(a - b).abs().max().item() for a, b in zip(grads, grads_ref)]
    return diffs


def _flex_cpu(L, n_layouts, n_heads, key):
    B, H, D = 2, 2, 16
    rng, gen = np.random.default_rng(1 + L), torch.Generator().manual_seed(L)
    t0 = time.perf_counter()
    worst, n_rows = 0.0, 0
    for _ in range(n_layouts):
        doc, kind, split, img = layout_tensors(random_rows(rng, B, L, max_side=6))
        check_layout(doc, kind, split, img)
        worst = max(worst, *flex_vs_dense(doc, kind, split, H, D, gen, n_heads=H if n_heads else None))
        n_rows += B
    FIGURES[key] = dict(rows=n_rows, max_abs_diff=worst, seconds=round(time.perf_counter() - t0, 2))
    print(f"\nflex == dense ({key}): {FIGURES[key]}")
    assert worst < 1e-5


def test_flex_equals_dense_forward_cpu():
    """CPU flex forward needs torch.compile (C++ codegen through gcc). One compile for the fixed (B, H, L, D) =
    (2, 2, 256, 16) and a BlockMask with H = 1 broadcast over the 2 query heads (the default of `block_mask`);
    new layouts reuse the kernel. About 30 s with a cold inductor cache on 2 shared cores, a few s warm."""
    _flex_cpu(256, 20, n_heads=False, key="cpu_fwd_L256_H1")


def test_flex_equals_dense_partial_tiles_explicit_heads_cpu():
    """L = 200 is not a multiple of the 128 block (partial edge tiles), with an explicit per-head BlockMask
    (`n_heads=H`). A second compiled shape: 6-17 s more with a cold inductor cache (most kernels are shared)."""
    _flex_cpu(200, 5, n_heads=True, key="cpu_fwd_L200_Hexplicit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("L", [384, 300])
def test_flex_equals_dense_forward_backward_gpu(L):
    B, H, D = 2, 4, 32
    rng, gen = np.random.default_rng(7 + L), torch.Generator().manual_seed(L)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 against fp32, not TF32
    try:
        worst_fwd = worst_bwd = 0.0
        for i in range(8):
            doc, kind, split, img = layout_tensors(random_rows(rng, B, L, max_side=6))
            fwd, *bwd = flex_vs_dense(doc, kind, split, H, D, gen, n_heads=H if i == 0 else None, device="cuda",
                                      backward=True)
            worst_fwd, worst_bwd = max(worst_fwd, fwd), max(worst_bwd, *bwd)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    print(f"\nflex == dense (CUDA, L={L}): max |fwd diff| {worst_fwd:.2e}, max |grad diff| {worst_bwd:.2e}")
    assert worst_fwd < 1e-4 and worst_bwd < 1e-3
