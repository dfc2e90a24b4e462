"""Reading pipeline: shard assignment, shuffle, corrupt samples, packed batches from real shards."""

import io
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from nextx import data as data_mod
from nextx.config import load_config
from nextx.data import PackedRows, Reader, build_loader, raw_samples, shard_order, shuffled
from nextx.documents import Document, Image, Text, write_shards
from nextx.sequence import CLEAN, NOISE, PAD, TEXT


@pytest.mark.parametrize("n_shards, world, workers", [(8, 2, 2), (3, 2, 2), (10, 3, 1), (1, 1, 3)])
def test_shard_order_disjoint_and_covering(n_shards, world, workers):
    shards = [f"s{i}" for i in range(n_shards)]
    readers = [Reader(r, world, w, workers) for r in range(world) for w in range(workers)]
    for epoch in range(3):
        seen = Counter()
        for rd in readers:
            mine, stride = shard_order(shards, rd, seed=1, epoch=epoch, shuffle=True, resample=False)
            if stride == 1:
                seen.update(mine)
            else:  # sample-level split: every reader walks all shards and keeps 1 sample in `stride`
                assert stride == world * workers and sorted(mine) == sorted(shards)
        if n_shards >= world * workers:
            assert seen == Counter(shards)  # each shard read by exactly one reader per epoch


def test_shard_order_epochs_differ_and_are_reproducible():
    shards = [f"s{i}" for i in range(20)]
    rd = Reader(0, 1, 0, 1)
    a = [shard_order(shards, rd, seed=0, epoch=e, shuffle=True, resample=False)[0] for e in range(2)]
    b = [shard_order(shards, rd, seed=0, epoch=e, shuffle=True, resample=False)[0] for e in range(2)]
    assert a == b and a[0] != a[1] and sorted(a[0]) == sorted(shards)
    assert shard_order(shards, rd, seed=0, epoch=0, shuffle=False, resample=False)[0] == shards
    r = shard_order(shards, rd, seed=0, epoch=0, shuffle=True, resample=True)[0]
    assert len(r) == 20 and len(set(r)) < 20  # drawn with replacement (20 draws of 20: a repeat is near-certain)


def test_shuffled_is_a_seeded_permutation():
    xs = list(range(100))
    a = list(shuffled(iter(xs), 10, random.Random(0)))
    assert sorted(a) == xs and a != xs and a == list(shuffled(iter(xs), 10, random.Random(0)))
    assert list(shuffled(iter(xs), 0, random.Random(0))) == xs


def _png(color, size=16):
    return PILImage.new("RGB", (size, size), color)


def _docs(n, size=16):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        out.append(Document(f"d{i:04d}", [Text(f"a square number {i}"), Image(_png(c, size))]))
    return out


def test_raw_samples_counts_a_truncated_tar(tmp_path):
    write_shards(_docs(5), tmp_path, progress=False)
    good = tmp_path / "train-000000.tar"
    data = good.read_bytes()
    bad = tmp_path / "cut.tar"
    with tarfile.open(good) as tf:
        last = tf.getmembers()[-1]
    bad.write_bytes(data[: last.offset_data + last.size // 2])  # cut in the middle of the last member
    stats = {}
    got = list(raw_samples(str(bad), stats))
    complete = [g for g in got if "json" in g and "img0.png" in g]
    assert 0 < len(complete) < 5 and stats.get("bad_tar", 0) >= 1  # the cut member is lost, the rest is read


@pytest.fixture(scope="module")
def shard_env(tmp_path_factory):
    """Real shards + a trained text tokenizer + a pixel tokenizer: the pipeline exactly as a user runs it."""
    from nextx.latents import PixelTokenizer
    from nextx.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("data")
    docs = _docs(60)
    write_shards(docs[:30], root / "shards", max_per_shard=10, progress=False)
    # one shard with corrupt samples: bad json, an undecodable png, a missing image member
    with tarfile.open(root / "shards" / "train-000099.tar", "w") as tf:
        def add(name, payload):
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
        add("x1.json", b"{not json")
        add("x2.json", b'{"segments": [{"text": "hi"}, {"image": "img0"}]}')
        add("x2.img0.png", b"\x89PNG broken")
        add("x3.json", b'{"segments": [{"image": "img0"}]}')
    write_shards(docs[30:], root / "shards", split="heldout", progress=False)
    texts = [d.texts[0] for d in docs] + [f"a {c} {s} in the {w}" for c in ("red", "green", "blue", "white")
                                          for s in ("circle", "square", "star") for w in ("top", "left", "middle")]
    train_sentencepiece(texts, root / "text", vocab_size=48)
    from nextx.latents import pil_to_tensor

    PixelTokenizer.from_pixels(pil_to_tensor([d.images[0].pixels for d in docs], 16), 4).save(root / "pixel")
    return root


def _cfg(root, **kw):
    over = [f"data.train_shards={root / 'shards'}", f"data.text_tokenizer={root / 'text'}",
            f"data.image_tokenizer={root / 'pixel'}", "data.row_len=128", "data.max_text_tokens=32", "data.batch_rows=4",
            "data.shuffle_buffer=8", "data.pack_buffer=8", "data.num_workers=0", "data.resample=false"]
    return load_config(None, over + [f"{k}={v}" for k, v in kw.items()]).data


def _rows(cfg, n, **kw):
    ds = PackedRows(cfg, loop=False, **kw)
    return list(ds)[:n] if n else list(ds)


def test_packed_rows_from_real_shards_skip_and_count_corrupt_samples(shard_env):
    cfg = _cfg(shard_env)
    rows = _rows(cfg, 0)
    stats = Counter()
    for r in rows:
        stats.update(r.stats)
        assert len(r.ids) == 128 and r.doc.max() >= 0
    assert stats["docs"] == 30             # every good train document, exactly once (loop=False)
    assert stats["bad_sample"] == 3        # bad json, broken png, missing image member: skipped, counted
    kinds = Counter(int(k) for r in rows for k in r.kind)
    assert kinds[NOISE] > 0 and kinds[CLEAN] > 0 and kinds[TEXT] > 0 and kinds[PAD] < 0.5 * sum(kinds.values())


def test_t2i_ratio_sets_the_direction_of_pairs(shard_env):
    only_t2i = _rows(_cfg(shard_env, **{"data.t2i_ratio": 1.0, "data.drop_trailing_clean": True}), 0)
    assert all(int((r.kind == CLEAN).sum()) == 0 for r in only_t2i)  # caption->image, trailing clean dropped
    only_cap = _rows(_cfg(shard_env, **{"data.t2i_ratio": 0.0}), 0)
    assert all(int((r.kind == NOISE).sum()) == 0 for r in only_cap)  # image->caption: the image is context


def test_loader_batches_and_rank_split(shard_env):
    cfg = _cfg(shard_env)
    batches = list(build_loader(cfg, loop=False, num_workers=0))
    assert batches and all(b.ids.shape == (4, 128) for b in batches)
    b = batches[0]
    assert b.latents.shape == (4, 128, 48) and b.image_grid.shape[1] == 2
    # two ranks read disjoint documents that together cover the split
    keys = []
    for rank in range(2):
        n = sum(r.stats.get("docs", 0) for r in _rows(cfg, 0, rank=rank, world_size=2))
        keys.append(n)
    assert sum(keys) == 30 and all(k > 0 for k in keys)


@pytest.mark.parametrize("multiple", [8, 3])
def test_loader_trim_pads_cuts_every_batch_to_its_longest_row(shard_env, multiple):
    """data.trim_pads: the same batches, cut after the last column any row uses (rounded up to data.trim_multiple)."""
    full = list(build_loader(_cfg(shard_env), loop=False, num_workers=0))
    over = {"data.trim_pads": True} | ({} if multiple == 8 else {"data.trim_multiple": multiple})  # 8: the default
    cut = list(build_loader(_cfg(shard_env, **over), loop=False, num_workers=0))
    assert len(cut) == len(full)
    assert any(c.ids.shape[1] < 128 for c in cut)
    for f, c in zip(full, cut):
        L = c.ids.shape[1]
        used = int((f.kind != PAD).any(0).nonzero().max()) + 1
        assert (L % multiple == 0 or L == 128) and used <= L < used + multiple
        assert torch.equal(c.ids, f.ids[:, :L]) and torch.equal(c.latents, f.latents[:, :L])
        assert bool((f.kind[:, L:] == PAD).all())                            # only pads were cut


@pytest.mark.parametrize("world", [1, 5])  # 5 readers for 4 shards: the sample-level split (stride 5)
def test_cache_docs_gives_the_same_rows_and_reads_each_tar_once(shard_env, monkeypatch, world):
    """data.cache_docs: three epochs give the same rows (ids, kinds, latents, positions) and the same counters (bad
    samples every epoch) as reading the shards each time; with a shard per reader each tar is read once."""
    import nextx.data as data

    reads = Counter()
    orig = data.raw_samples

    def counting(path, stats):
        reads[path] += 1
        yield from orig(path, stats)

    monkeypatch.setattr(data, "raw_samples", counting)

    def three_epochs(cache):
        reads.clear()
        out = []
        for r in PackedRows(_cfg(shard_env, **{"data.cache_docs": cache}), rank=0, world_size=world):
            if r.position[1] == 3:
                return out, dict(reads)
            out.append(r)

    (plain, plain_reads), (cached, cached_reads) = three_epochs(False), three_epochs(True)
    assert len(plain) == len(cached) > 0
    for a, b in zip(plain, cached):
        assert a.position == b.position and a.stats == b.stats
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("ids", "targets", "kind", "doc", "pos"))
        assert [im.generate for im in a.images] == [im.generate for im in b.images]
        assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a.images, b.images))
    if world == 1:
        assert sum(r.stats.get("bad_sample", 0) for r in cached) == 3 * 3                # 3 bad samples, 3 epochs
        assert len(cached_reads) == 4 and set(cached_reads.values()) == {1}              # 4 shards, each once
        assert min(plain_reads.values()) == 3                                             # (and epoch 4 began)
    else:                                       # stride > 1: a shard is skipped once all its samples were met
        assert sum(cached_reads.values()) <= sum(plain_reads.values())


def _image_gaps(rows):
    """The 1D gap before every image's <boi> in rows: pos(<boi>) - pos(token before it) - 1."""
    gaps = []
    for r in rows:
        img = (r.kind == NOISE) | (r.kind == CLEAN)
        for j in np.flatnonzero(img[1:] & ~img[:-1]) + 1:           # first token of each image split
            if not img[j - 1] and j >= 2 and r.doc[j - 2] == r.doc[j] and not img[j - 2]:   # <boi> after a token
                gaps.append(int(r.pos[j - 1] - r.pos[j - 2] - 1))
    return gaps


def test_image_pos_jitter_leaves_gaps_of_0_to_j_before_each_image(shard_env):
    plain = _image_gaps(_rows(_cfg(shard_env), 0))
    jittered = _image_gaps(_rows(_cfg(shard_env, **{"data.image_pos_jitter": 4}), 0))
    assert plain and set(plain) == {0}
    assert len(jittered) == len(plain) and set(jittered) == {0, 1, 2, 3, 4}
    with pytest.raises(Exception, match="image_pos_jitter"):
        _cfg(shard_env, **{"data.image_pos_jitter": -1})


def test_cut_caption_keeps_a_whole_word_prefix_at_its_rate():
    from nextx.sequence import ImageTokens

    im = ImageTokens(np.zeros((4, 3), np.float32), (2, 2), generate=True)
    ids = [5, 6, 7, 8, 9]
    starts = lambda x: [0, 2, 3]                        # noqa: E731  three words: [5 6] [7] [8 9]
    cuts = Counter()
    rng = random.Random(0)
    for _ in range(4000):
        out = data_mod.cut_caption([ids, im], starts, rate=0.25, rng=rng)
        assert out[1] is im
        cuts[tuple(out[0])] += 1
    assert set(cuts) == {(5, 6, 7, 8, 9), (5, 6), (5, 6, 7)}                      # whole words, never all cut
    assert abs(cuts[(5, 6)] / 4000 - 0.125) < 0.02 and abs(cuts[(5, 6, 7)] / 4000 - 0.125) < 0.02
    # left as they are: image->caption, a one-word caption, rate 0 (which draws nothing)
    ctx = ImageTokens(im.tokens, im.grid, generate=False)
    for segs, fn in (([ctx, ids], starts), ([ids, im], lambda x: [0]), ([ids], starts)):
        assert data_mod.cut_caption(segs, fn, rate=1.0, rng=random.Random(0)) == segs
    rng = random.Random(1)
    assert data_mod.cut_caption([ids, im], starts, rate=0.0, rng=rng) == [ids, im]
    assert rng.random() == random.Random(1).random()


def test_caption_cut_trains_on_word_prefixes_of_the_captions(shard_env):
    from nextx.tokenizer import load_tokenizer

    tok = load_tokenizer(shard_env / "text")
    docs = {" ".join(d.texts[0].split()) for d in _docs(60)}

    def captions(rows):
        out = []
        for r in rows:
            for d in np.unique(r.doc[r.doc >= 0]):
                m = (r.doc == d) & (r.kind == TEXT) & (r.ids != tok.bos_id) & (r.ids != tok.boi_id)
                out.append(tok.decode(r.ids[m].tolist()))
        return out

    plain = captions(_rows(_cfg(shard_env, **{"data.t2i_ratio": 1.0}), 0))
    cut = captions(_rows(_cfg(shard_env, **{"data.t2i_ratio": 1.0, "data.caption_cut": 1.0}), 0))
    assert plain and set(plain) <= docs
    assert len(cut) == len(plain) and not set(cut) & docs                          # every caption cut
    assert all(any(d.startswith(c + " ") for d in docs) for c in cut)              # ... to a whole-word prefix
    with pytest.raises(Exception, match="caption_cut"):
        _cfg(shard_env, **{"data.caption_cut": 1.5})


def test_same_seed_same_rows(shard_env):
    cfg = _cfg(shard_env)
    a, b = _rows(cfg, 3), _rows(cfg, 3)
    assert all(np.array_equal(x.ids, y.ids) and np.array_equal(x.kind, y.kind) for x, y in zip(a, b))


def test_rows_job_reports_packing_efficiency(shard_env, capsys):
    from data_tools.rows import main

    over = [f"data.train_shards={shard_env / 'shards'}", f"data.text_tokenizer={shard_env / 'text'}",
            f"data.image_tokenizer={shard_env / 'pixel'}", "data.row_len=128", "data.max_text_tokens=32",
            "data.batch_rows=2", "data.num_workers=0", "data.resample=false"]
    out = shard_env / "rows.json"
    assert main(["configs/tiny.yaml", *over, "--batches", "3", "--json", str(out)]) == 0
    import json

    fig = json.loads(out.read_text())
    counts = fig["tokens_by_kind"]
    assert fig["batches"] == 3 and counts["total"] == 3 * 2 * 128
    assert abs(fig["packing_efficiency"] - (1 - counts["pad"] / counts["total"])) < 1e-12
    assert "packing efficiency" in capsys.readouterr().out


def test_loader_batch_keeps_its_position_when_moved():
    """The trainer reads `position` of the batches it consumed; moving or pinning a batch must not drop it."""
    from nextx.data import LoaderBatch
    from nextx.sequence import ImageTokens, SpecialIds, collate, layout_document, pack_row

    sp = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
    d = layout_document([[5, 6], ImageTokens(np.zeros((4, 3), np.float32), (2, 2))], sp)
    b = LoaderBatch.of(collate([pack_row([d], 16, sp.pad)]), (3, 1, 7))
    moved = b.to("cpu")
    assert isinstance(moved, LoaderBatch) and moved.position == (3, 1, 7)
    assert torch.equal(moved.ids, b.ids) and moved.stats == b.stats
