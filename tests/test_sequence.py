"""Layout, text targets, positions, packing and collate: the docstring's worked example by hand + properties."""

import numpy as np
import pytest
import torch

from nextx.sequence import (CLEAN, IGNORE, NOISE, PAD, TEXT, ImageTokens, Packer, SpecialIds, apply_null_prompt,
                            collate, gather_context, image_text_context, layout_document, pack_row, text_targets,
                            trim_pads)

SP = SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)
T0, T1, T2 = 10, 11, 12


def img(generate=True, h=2, w=2, c=3, seed=0):
    return ImageTokens(np.random.default_rng(seed).normal(size=(h * w, c)).astype(np.float32), (h, w), generate)


def test_caption_to_image_worked_example():
    d = layout_document([[T0, T1, T2], img()], SP)
    assert d.ids.tolist() == [2, 10, 11, 12, 4, 0, 0, 0, 0]
    assert d.kind.tolist() == [TEXT] * 5 + [NOISE] * 4
    assert d.targets.tolist() == [T0, T1, T2, 4] + [IGNORE] * 5
    assert d.pos.tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5]
    assert d.pos2d[5:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert d.split.tolist() == [-1] * 5 + [0] * 4


def test_image_to_caption_worked_example():
    d = layout_document([img(generate=False), [T0, T1, T2]], SP)
    assert d.ids.tolist() == [2, 4, 0, 0, 0, 0, 5, 10, 11, 12, 3]
    assert d.kind.tolist() == [TEXT, TEXT] + [CLEAN] * 4 + [TEXT] * 5
    assert d.targets.tolist() == [4] + [IGNORE] * 5 + [T0, T1, T2, 3, IGNORE]
    assert d.pos.tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7]


def test_interleaved_noise_and_clean_share_position_and_text_after_matches_generation():
    d = layout_document([[T0], img(), [T1], img(seed=1)], SP, drop_trailing_clean=False)
    # <bos> t0 <boi> Z*4 C*4 <eoi> t1 <boi> Z*4 C*4 <eoi> <eos>
    assert d.kind.tolist() == [TEXT] * 3 + [NOISE] * 4 + [CLEAN] * 4 + [TEXT] * 3 + [NOISE] * 4 + [CLEAN] * 4 + [TEXT] * 2
    assert d.pos.tolist() == [0, 1, 2] + [3] * 8 + [4, 5, 6] + [7] * 8 + [8, 9]
    assert d.split.tolist() == [-1] * 3 + [0] * 4 + [1] * 4 + [-1] * 3 + [2] * 4 + [3] * 4 + [-1] * 2
    # generation sees the same positions: text ids in the clean stream with noise removed are consecutive
    stream = d.kind != NOISE
    p = d.pos[stream]
    assert (np.diff(p)[d.kind[stream][1:] == TEXT] == 1).all()
    # the last clean token predicts nothing (<eoi> is appended by the sampler), <eoi> predicts t1
    eoi_at = np.flatnonzero(d.ids == SP.eoi)
    assert d.targets[eoi_at[0] - 1] == IGNORE and d.targets[eoi_at[0]] == T1
    assert d.targets[eoi_at[1]] == SP.eos


def test_trailing_clean_dropped_only_for_generated_last_image():
    d = layout_document([[T0], img()], SP, drop_trailing_clean=True)
    assert (d.kind == CLEAN).sum() == 0 and d.ids[-1] == SP.pad and SP.eos not in d.ids
    d = layout_document([[T0], img()], SP, drop_trailing_clean=False)
    assert (d.kind == CLEAN).sum() == 4 and d.ids[-2:].tolist() == [SP.eoi, SP.eos]


def test_text_targets_by_hand():
    ids = np.array([7, 4, 0, 0, 0, 0, 5, 8])
    kind = np.array([TEXT, TEXT, NOISE, NOISE, CLEAN, CLEAN, TEXT, TEXT], np.int8)
    assert text_targets(ids, kind, eoi_id=5).tolist() == [4, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 8, IGNORE]


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one segment"):
        layout_document([], SP)
    with pytest.raises(ValueError, match="empty text"):
        layout_document([[]], SP)
    with pytest.raises(ValueError, match="do not match grid"):
        ImageTokens(np.zeros((3, 2)), (2, 2))


def test_pack_row_renumbers_and_pads():
    a = layout_document([[T0, T1], img()], SP)
    b = layout_document([img(generate=False), [T2]], SP)
    r = pack_row([a, b], 32, SP.pad)
    n = len(a) + len(b)
    assert r.doc.tolist() == [0] * len(a) + [1] * len(b) + [-1] * (32 - n)
    assert (r.kind[n:] == PAD).all() and (r.targets[n:] == IGNORE).all()
    assert sorted(set(r.split[r.split >= 0].tolist())) == [0, 1]
    assert sorted(set(r.img[r.img >= 0].tolist())) == [0, 1] and len(r.images) == 2
    with pytest.raises(ValueError, match="do not fit"):
        pack_row([a, b], n - 1, SP.pad)


def test_packer_keeps_whole_documents_and_counts_too_long():
    rng = np.random.default_rng(0)
    docs = [layout_document([list(rng.integers(10, 50, rng.integers(1, 20))), img()], SP) for _ in range(100)]
    docs.append(layout_document([list(range(10, 80)), img()], SP))  # 76 tokens > row_len
    p = Packer(row_len=64, pad_id=SP.pad, buffer=16)
    rows = [r for d in docs for r in p.add(d)] + list(p.flush())
    assert sum(r.stats["too_long"] for r in rows) + p.stats["too_long"] == 1
    assert sum(r.stats["docs"] for r in rows) == 100
    used = sum(int((r.kind != PAD).sum()) for r in rows)
    assert used == sum(len(d) for d in docs[:100])  # nothing cut, nothing duplicated
    assert used / (64 * len(rows)) > 0.85  # best-fit packing is dense on short documents


def test_collate_places_latents_in_both_splits():
    im = img(c=3)
    a = layout_document([[T0], im, [T1]], SP)  # noise + clean
    b = layout_document([img(generate=False, seed=3), [T2]], SP)
    rows = [pack_row([a], 40, SP.pad), pack_row([b], 40, SP.pad)]
    batch = collate(rows)
    assert batch.latents.shape == (2, 40, 3) and batch.n_images == 2
    z = batch.latents[0][batch.kind[0] == NOISE]
    c = batch.latents[0][batch.kind[0] == CLEAN]
    assert torch.equal(z, torch.from_numpy(im.tokens)) and torch.equal(c, z)
    assert batch.img[1][batch.kind[1] == CLEAN].unique().tolist() == [1]  # batch-global index
    assert batch.image_generate.tolist() == [True, False]
    assert batch.latents[batch.kind == TEXT].abs().sum() == 0
    assert batch.n_tokens()["noise"] == 4 and batch.n_tokens()["clean"] == 8


def test_trim_pads_cuts_the_pad_columns_every_row_shares():
    a = layout_document([[T0], img(c=3), [T1]], SP)                          # 2x2 image: noise + clean
    b = layout_document([img(generate=False, seed=3), [T2]], SP)
    batch = collate([pack_row([a], 40, SP.pad), pack_row([b], 40, SP.pad)])
    longest = max(len(a), len(b))
    assert longest == 14
    for multiple, keep in ((8, 16), (1, 14), (64, 40)):                      # rounded up, never past L
        t = trim_pads(batch, multiple)
        assert t.ids.shape == (2, keep) and t.latents.shape == (2, keep, 3) and t.pos2d.shape == (2, keep, 2)
        for k in batch.ROW_FIELDS:
            assert torch.equal(getattr(t, k), getattr(batch, k)[:, :keep]), k
        assert torch.equal(t.image_grid, batch.image_grid)
        assert t.n_tokens()["pad"] == batch.n_tokens()["pad"] - (40 - keep) * 2   # only pads were cut
    full = collate([pack_row([a, a], 28, SP.pad)])
    assert trim_pads(full) is full                                           # nothing to cut: the same batch


def test_image_text_context_by_hand():
    """Each image's text: the TEXT tokens of its own document before it. Row 0 packs an interleaved document (image 0
    after t0, image 1 after t0 <eoi> t1) and an image->caption document (image 2 first: only <bos> <boi>); row 1 a
    caption->image document whose caption is hidden by CFG dropout (only the layout specials remain)."""
    a = layout_document([[T0], img(), [T1], img(seed=1)], SP, drop_trailing_clean=False)
    b = layout_document([img(generate=False, seed=2), [T2]], SP)
    c = layout_document([[T1, T2], img(seed=3)], SP)
    batch = collate([pack_row([a, b], 48, SP.pad), pack_row([c], 48, SP.pad)])
    drop = torch.zeros(batch.ids.shape, dtype=torch.bool)
    drop[1] = True
    ids, kind, doc, pos, _ = apply_null_prompt(batch.ids, batch.kind, batch.doc, batch.pos, drop, SP)
    row, sel = image_text_context(kind, doc, pos, batch.img, batch.n_images)
    assert row.tolist() == [0, 0, 0, 1]
    got = gather_context(ids, row, sel)
    bos, boi, eoi = SP.bos, SP.boi, SP.eoi
    want = [[bos, T0, boi], [bos, T0, boi, eoi, T1, boi], [bos, boi], [bos, boi]]
    assert [[i for i in r if i >= 0] for r in got.tolist()] == want
    assert got.shape == (4, 6) and (got[0, 3:] == -1).all()
    # an image index with no token in the call selects nothing
    row, sel = image_text_context(kind, doc, pos, batch.img, batch.n_images + 1)
    assert not sel[-1].any() and gather_context(ids, row, sel)[-1].tolist() == [-1] * 6
    assert gather_context(ids, row[:0], sel[:0]).shape == (0, 1)


def test_noise_copies_write_m_noise_splits_sharing_positions():
    sp = SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)
    im = ImageTokens(np.arange(8, dtype=np.float32).reshape(4, 2), (2, 2), generate=True)
    d = layout_document([[7, 8], im], sp, noise_copies=3)
    noise = d.kind == NOISE
    assert noise.sum() == 12 and len(set(d.split[noise].tolist())) == 3      # three splits of 4 tokens
    assert set(d.pos[noise].tolist()) == {4}                                 # one 1D slot for every copy
    assert d.pos2d[noise].reshape(3, 4, 2).tolist() == [[[0, 0], [0, 1], [1, 0], [1, 1]]] * 3
    b = collate([pack_row([d], 24, 0)])
    lat = b.latents[0][b.kind[0] == NOISE].reshape(3, 4, 2)
    assert all(torch.equal(lat[k], torch.from_numpy(im.tokens)) for k in range(3))  # same clean x in every copy
    with pytest.raises(ValueError, match="noise_copies"):
        layout_document([[7], im], sp, noise_copies=0)


def test_batch_field_lists_cover_every_field():
    """Batch.ROW_FIELDS / IMAGE_FIELDS are the one list of its tensors (row selection, concatenation): a new field
    must be added there."""
    from dataclasses import fields

    from nextx.sequence import Batch

    names = {f.name for f in fields(Batch)} - {"stats"}
    assert names == set(Batch.ROW_FIELDS) | set(Batch.IMAGE_FIELDS)
    assert not set(Batch.ROW_FIELDS) & set(Batch.IMAGE_FIELDS)


def test_image_gaps_move_the_image_and_what_follows_only():
    plain = layout_document([[T0, T1], img(), [T2]], SP, drop_trailing_clean=False)
    moved = layout_document([[T0, T1], img(), [T2]], SP, drop_trailing_clean=False, image_gaps=[3])
    assert moved.ids.tolist() == plain.ids.tolist() and moved.kind.tolist() == plain.kind.tolist()
    assert moved.targets.tolist() == plain.targets.tolist() and moved.pos2d.tolist() == plain.pos2d.tolist()
    boi = plain.ids.tolist().index(SP.boi)
    assert moved.pos[:boi].tolist() == plain.pos[:boi].tolist() == [0, 1, 2]      # <bos> a b: where they were
    assert (moved.pos[boi:] - plain.pos[boi:]).tolist() == [3] * (len(plain) - boi)   # <boi> .. <eos>: 3 later
    no_gap = layout_document([[T0], img()], SP, image_gaps=[0])
    assert no_gap.pos.tolist() == layout_document([[T0], img()], SP).pos.tolist()
    with pytest.raises(ValueError, match="image_gaps"):
        layout_document([[T0], img()], SP, image_gaps=[-1])
    with pytest.raises(ValueError, match="2 entries for 1 images"):
        layout_document([[T0], img()], SP, image_gaps=[0, 1])
