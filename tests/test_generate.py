"""Cached generation (nextx.generate) against the full-recomputation reference samplers (tests/oracles.py); text
sampling; interleaved documents; the inference API and the t2i / caption / generate commands. CPU, tiny dims."""

import copy
import csv
import json

import numpy as np
import pytest
import torch

from nextx import generate
from nextx.config import ModelConfig
from nextx.masks import check_layout, dense_mask
from nextx.model import ModelInput, NextX
from nextx.sequence import (CLEAN, NOISE, PAD, TEXT, ImageTokens, SpecialIds, apply_null_prompt, collate,
                            layout_document, pack_row)
from nextx.text_sampling import sample_tokens
from oracles import caption_logprob_reference, caption_reference, t2i_reference

SP = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
V, C, GRID = 50, 6, (2, 3)            # a non-square grid catches row/col mix-ups
N = GRID[0] * GRID[1]
TOL = 1e-4
MIXED = [[5], [6, 7, 8, 9, 10, 11, 12], []]  # prompt lengths 1, 7, 0 -> a padded batch
DIFFS: dict = {}                     # max abs diffs measured by the tests (printed by test_report_diffs)


def _note(key, err):
    DIFFS[key] = max(DIFFS.get(key, 0.0), float(err))


def tiny_model(seed=0, **kw) -> NextX:
    torch.manual_seed(seed)
    base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, time_freq_dim=16, ffn_hidden=64)
    cfg = ModelConfig(**{**base, **kw})
    m = NextX(cfg, vocab_size=V, latent_dim=C).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():                       # the modulation and latent head are zero at init: make them act
        for name, p in m.named_parameters():
            if "ada" in name or "latent_head" in name or ".local." in name or "unet.out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- the mask helper


def test_cached_mask_is_the_last_rows_of_dense_mask():
    rng = np.random.default_rng(0)
    for trial in range(20):
        B, L = 3, int(rng.integers(8, 30))
        kind = torch.full((B, L), TEXT, dtype=torch.int8)
        doc = torch.zeros(B, L, dtype=torch.int32)
        split = torch.full((B, L), -1, dtype=torch.int32)
        sid = 0
        for b in range(B):                       # runs of text, pads and clean splits, then a noise split
            i = 0
            while i < L - 4:
                r = rng.integers(0, 3)
                n = int(rng.integers(1, 4))
                if r == 1:
                    kind[b, i:i + n], doc[b, i:i + n] = PAD, -1
                elif r == 2:
                    kind[b, i:i + n], split[b, i:i + n] = CLEAN, sid
                    sid += 1
                i += n
            kind[b, L - 3:], split[b, L - 3:], doc[b, L - 3:] = NOISE, sid, 0
            sid += 1
        for n_new in (1, 3, L):
            ref = dense_mask(doc, kind, split)[:, :, -n_new:]
            assert torch.equal(generate.cached_mask(doc, kind, split, n_new), ref)


# ---- cached == reference


@pytest.mark.parametrize("sampler", generate.SAMPLERS)
@pytest.mark.parametrize("cfg_scale,null", [(1.0, "hidden"), (2.0, "hidden"), (2.0, "pad")])
@pytest.mark.parametrize("prompts", [[[5, 6, 7]], MIXED], ids=["b1", "mixed"])
def test_t2i_cached_equals_reference(model, sampler, cfg_scale, null, prompts):
    kw = dict(grid=GRID, latent_dim=C, steps=3, sampler=sampler, cfg_scale=cfg_scale, null_prompt=null)
    ref = t2i_reference(model, prompts, SP, generator=gen(1), **kw)
    out = generate.t2i(model, prompts, SP, generator=gen(1), **kw)
    assert out.shape == (len(prompts), N, C) and ref.abs().max() > 0.1
    err = (out - ref).abs().max()
    _note(f"t2i latents ({'cfg' if cfg_scale != 1 else 'no cfg'}, {'B=1' if len(prompts) == 1 else 'mixed'})", err)
    assert err < TOL, err


def test_t2i_time_shift_reaches_the_sampler(model):
    """The shifted t-grid (imm.sampling_times(shift=)) runs the same in the cached sampler and the reference, and
    changes the image (it is not dropped on the way)."""
    kw = dict(grid=GRID, latent_dim=C, steps=3, sampler="restart", cfg_scale=2.0)
    ref = t2i_reference(model, MIXED, SP, generator=gen(1), shift=3.0, **kw)
    out = generate.t2i(model, MIXED, SP, generator=gen(1), shift=3.0, **kw)
    plain = generate.t2i(model, MIXED, SP, generator=gen(1), **kw)
    assert (out - ref).abs().max() < TOL
    assert (out - plain).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["pushforward", "euler"])
@pytest.mark.parametrize("pooled", [False, True], ids=["attention", "pooled"])
def test_hidden_null_prompt_is_the_empty_caption(model, sampler, pooled):
    """cfg_scale 0 samples the unconditional rows alone. With the hidden null prompt every caption, whatever its
    length, gives the images of the empty caption `<bos> <boi>` (cached and reference alike); with "pad" the
    caption's length shows through."""
    if pooled:                                  # the caption also reaches every noise token through adaLN
        model = tiny_model(3, text_cond="pooled")
    prompts = [[5], [6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16]]
    kw = dict(grid=GRID, latent_dim=C, steps=2, sampler=sampler)
    empty = generate.t2i(model, [[]] * 3, SP, generator=gen(4), **kw)
    for fn in (generate.t2i, t2i_reference):
        hidden = fn(model, prompts, SP, generator=gen(4), cfg_scale=0.0, **kw)
        assert (hidden - empty).abs().max() < TOL
    pad = generate.t2i(model, prompts, SP, generator=gen(4), cfg_scale=0.0, null_prompt="pad", **kw)
    assert (pad - empty).abs().max() > 100 * TOL
    with pytest.raises(ValueError, match="null_prompt"):
        generate.t2i(model, prompts, SP, cfg_scale=2.0, null_prompt="none", **kw)


@pytest.mark.parametrize("kw", [dict(pos2d="sincos"), dict(pos2d="none"), dict(latent_conv=3),
                                dict(pos2d="rope+sincos", latent_conv=3, sincos_scale=1.0),
                                dict(latent_conv=3, block_conv=3), dict(pixel_unet=4, pos2d="rope+sincos"),
                                dict(text_cond="pooled", pos2d="rope+sincos", latent_conv=3, sincos_scale=1.0)])
def test_t2i_cached_equals_reference_other_2d_positions(kw):
    m = tiny_model(1, **kw)
    kw = dict(grid=GRID, latent_dim=C, steps=2, cfg_scale=1.5)
    err = (generate.t2i(m, MIXED, SP, generator=gen(2), **kw) - t2i_reference(m, MIXED, SP, generator=gen(2), **kw))
    assert err.abs().max() < TOL


def test_flex_model_samples_on_sdpa(model):
    """A model configured for flex attention samples on SDPA (dense masks), with the same numbers."""
    m = tiny_model(attention="flex")
    kw = dict(grid=GRID, latent_dim=C, steps=2, cfg_scale=1.5, generator=None)
    a = generate.t2i(m, MIXED, SP, **{**kw, "generator": gen(0)})
    assert all(blk.self_attn.backend == "flex" for blk in m.layers)          # restored afterwards
    b = generate.t2i(model, MIXED, SP, **{**kw, "generator": gen(0)})
    assert torch.equal(a, b)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("B", [1, 3])
def test_caption_cached_equals_reference(model, temperature, B):
    imgs = torch.randn(B, N, C, generator=gen(B)) * 0.5
    ref = caption_reference(model, imgs, SP, grid=GRID, max_new_tokens=10, temperature=temperature, generator=gen(3))
    out = generate.caption(model, imgs, SP, grid=GRID, max_new_tokens=10, temperature=temperature, generator=gen(3))
    assert out == ref


def _doc_segments(prompt, new):
    """Prompt + generated segments as a layout_document input: images as context, and the generated `<boi>` that
    opened each image removed (the layout writes its own)."""
    segs, new = list(prompt), list(new)
    for i, s in enumerate(new):
        if isinstance(s, torch.Tensor):
            segs.append(ImageTokens(s.numpy(), GRID, generate=False))
        else:
            ids = s[:-1] if i + 1 < len(new) and isinstance(new[i + 1], torch.Tensor) else s
            if ids:
                segs.append(list(ids))
    return segs


@torch.no_grad()
def _full_forward(model, segs):
    d = layout_document(segs, SP)
    b = collate([pack_row([d], len(d), SP.pad)])
    z = torch.zeros(b.n_images)
    lat = b.latents if b.n_images else torch.zeros(*b.ids.shape, C)          # collate gives C = 1 without images
    return model(ModelInput.of(b, lat, z, z, dense_mask(b.doc, b.kind, b.split))), d


@torch.no_grad()
def _ref_image(model, prefix, x0, *, steps, cfg_scale, T=0.994, sigma_d=0.5):
    """Pushforward by full recomputation after an arbitrary prefix (text and context images), from noise x0."""
    d = layout_document(prefix + [ImageTokens(np.zeros((N, C), np.float32), GRID, generate=True)], SP)
    b = collate([pack_row([d], len(d), SP.pad)])
    ids, kind, doc, pos, mask, rows = b.ids, b.kind, b.doc, b.pos, dense_mask(b.doc, b.kind, b.split), 1
    if cfg_scale != 1:
        u_ids, u_kind, u_doc, u_pos, _ = apply_null_prompt(b.ids, b.kind, b.doc, b.pos, b.doc >= 0, SP)
        ids, kind, pos, rows = torch.cat([ids, u_ids]), torch.cat([kind, u_kind]), torch.cat([pos, u_pos]), 2
        doc = torch.cat([doc, u_doc])
        mask = torch.cat([mask, dense_mask(u_doc, u_kind, b.split)])
    rep = lambda v: torch.cat([v] * rows)                                                  # noqa: E731
    noise = (b.kind == NOISE)[0]
    x = x0.clone()
    ts = torch.linspace(T, 0.0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        lat = rep(b.latents).clone()
        lat[:, noise] = x.float()
        t = torch.full((rows * b.n_images,), float(ts[i]))
        s = torch.full((rows * b.n_images,), float(ts[i + 1]))
        img = torch.cat([b.img] + ([torch.where(b.img >= 0, b.img + b.n_images, -1)] if rows == 2 else []))
        G = model(ModelInput(ids, kind, pos, rep(b.pos2d), lat, img, t, s, mask, doc=doc)).latent_out[:, noise]
        G = G.double()
        if rows == 2:
            G = G[1] + cfg_scale * (G[0] - G[1])
        else:
            G = G[0]
        x = x - (float(ts[i]) - float(ts[i + 1])) * sigma_d * G
    return x.float()


@pytest.mark.parametrize("cfg_scale,conv", [(1.0, 1), (1.5, 1), (1.5, 3), (1.5, "block"), (1.5, "pooled")])
def test_interleaved_cached_equals_recomputation(model, cfg_scale, conv):
    """Mixed-length prompts (one holding a context image), rows drawing images at different steps (so a row's <boi>
    is followed by pads while another row commits its image): every text logit and every image equals a full
    recomputation of the final document. conv=3: the latent convolutions see whole splits in every call."""
    if conv == "pooled":                        # the second image is conditioned on all text before it
        model = tiny_model(2, text_cond="pooled")
    elif conv != 1:
        model = tiny_model(2, latent_conv=3, block_conv=3 if conv == "block" else 0)
    ctx = ImageTokens(np.random.default_rng(0).normal(0, .5, (N, C)).astype(np.float32), GRID, generate=False)
    prompts = [[[5, 6]], [[7, 8, 9, 10, 11, 12, 13]], [ctx, [14]]]
    trace: dict = {}
    docs = generate.generate(model, prompts, SP, grid=GRID, max_new_tokens=7, steps=2,
                             force_boi_at=[(1, 4), (0, 2), (3, 5)],
                             cfg_scale=cfg_scale, suppress=(SP.eos, SP.boi, SP.eoi), generator=gen(0), trace=trace)
    for b, (prompt, new) in enumerate(zip(prompts, docs)):
        assert [type(s).__name__ for s in new] == ["list", "Tensor", "list", "Tensor", "list"]
        out, d = _full_forward(model, _doc_segments(prompt, new))
        # every sampled token's logits: position of the token just before it in the final layout
        P = len(layout_document(_doc_segments(prompt, []), SP)) - 1 if prompt else 1
        at, preds = P, []
        for s in new:
            if isinstance(s, torch.Tensor):
                at += N + 1                                                   # clean split + <eoi>
                continue
            for _ in s:
                preds.append(at - 1)
                at += 1
        full = out.text_logits[0, preds]
        cached = torch.stack(trace["logits"][b])
        err = (full - cached).abs().max()
        _note(f"text logits (interleaved, mixed, {'cfg' if cfg_scale != 1 else 'no cfg'})", err)
        assert err < TOL, err
        # every image: pushforward by full recomputation after the same prefix, from the same noise
        for j, (i, s) in enumerate((i, s) for i, s in enumerate(new) if isinstance(s, torch.Tensor)):
            prefix = _doc_segments(prompt, new[:i + 1])[:-1]                 # up to the image (its <boi> dropped)
            ref = _ref_image(model, prefix, trace["noise"][b][j], steps=2, cfg_scale=cfg_scale)
            err = (ref - s).abs().max()
            _note(f"image latents (interleaved, mixed, {'cfg' if cfg_scale != 1 else 'no cfg'})", err)
            assert err < TOL, err


@pytest.mark.parametrize("prompts", [[[[5, 6]]], [[[5]], [[6, 7, 8, 9, 10, 11, 12, 13, 14]], [[15, 16, 17]]]],
                         ids=["b1", "mixed"])
def test_text_only_cached_equals_recomputation(model, prompts):
    trace: dict = {}
    docs = generate.generate(model, prompts, SP, grid=GRID, max_new_tokens=12, draw_images=False, generator=gen(0),
                             trace=trace, temperature=0.0)
    for b, (p, new) in enumerate(zip(prompts, docs)):
        ids = [t for s in new for t in s]
        out, d = _full_forward(model, [p[0] + ids] if ids else p)
        n = len(trace["logits"][b])                                        # includes a final <eos> if sampled
        full = out.text_logits[0, len(p[0]): len(p[0]) + n]
        assert full.argmax(-1).tolist()[: len(ids)] == ids
        err = (full - torch.stack(trace["logits"][b])).abs().max()
        _note(f"text logits (text only, {'B=1' if len(prompts) == 1 else 'mixed'})", err)
        assert err < TOL


# ---- determinism, sampling, documents


def test_same_seed_same_output(model):
    kw = dict(grid=GRID, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, steps=2, sampler="restart",
              cfg_scale=1.5, force_boi_at=(2,), suppress=(SP.eoi,))
    a = generate.generate(model, [[[5, 6]], [[7]]], SP, generator=gen(7), **kw)
    b = generate.generate(model, [[[5, 6]], [[7]]], SP, generator=gen(7), **kw)
    c = generate.generate(model, [[[5, 6]], [[7]]], SP, generator=gen(8), **kw)

    def flat(docs):
        return [[s.tolist() if isinstance(s, torch.Tensor) else s for s in d] for d in docs]

    assert flat(a) == flat(b) and flat(a) != flat(c)
    x1 = generate.t2i(model, MIXED, SP, grid=GRID, latent_dim=C, steps=2, sampler="restart", generator=gen(4))
    x2 = generate.t2i(model, MIXED, SP, grid=GRID, latent_dim=C, steps=2, sampler="restart", generator=gen(4))
    assert torch.equal(x1, x2)


def test_sample_tokens_filters():
    logits = torch.randn(4, V, generator=gen(0))
    greedy = logits.argmax(-1)
    assert torch.equal(sample_tokens(logits), greedy)
    assert torch.equal(sample_tokens(logits, temperature=1.0, top_k=1, generator=gen(1)), greedy)
    assert torch.equal(sample_tokens(logits, temperature=1.0, top_p=1e-6, generator=gen(1)), greedy)
    top3 = logits.topk(3, -1).indices
    g = gen(2)
    for _ in range(20):
        t = sample_tokens(logits, temperature=2.0, top_k=3, generator=g)
        assert all(int(t[i]) in top3[i].tolist() for i in range(4))
    # top_p keeps the smallest prefix (by probability) whose mass reaches p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {int(sample_tokens(probs.log(), temperature=1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert seen == {0, 1}


def test_lm_head_bias_draws_two_images_between_text(model):
    """A model whose LM head prefers <boi> draws images by itself; max_images=2 then forbids a third, and the
    output is a valid interleaved document (text, image, text, image, text)."""
    m = copy.deepcopy(model)
    bias = torch.zeros(V)
    bias[SP.boi] = 100.0
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    docs = generate.generate(m, [[[5, 6]], [[7, 8, 9, 10]]], SP, grid=GRID, max_new_tokens=5, max_images=2, steps=2,
                             cfg_scale=1.5, suppress=(SP.eos, SP.eoi, SP.pad, SP.bos), generator=gen(0))
    for new in docs:
        kinds = [type(s).__name__ for s in new]
        assert kinds == ["list", "Tensor", "list", "Tensor", "list"], kinds
        assert new[0] == [SP.boi] and new[2] == [SP.boi] and SP.boi not in new[4] and len(new[4]) == 3
        assert all(s.shape == (N, C) and torch.isfinite(s).all() for s in new if isinstance(s, torch.Tensor))
        d = layout_document(_doc_segments([[5]], new), SP)
        assert (d.kind == CLEAN).sum() == 2 * N
        check_layout(*(torch.from_numpy(a[None].astype(np.int64)) for a in (np.zeros(len(d)), d.kind, d.split)))


def test_stop_and_max_tokens(model):
    m = copy.deepcopy(model)
    bias = torch.zeros(V)
    bias[SP.eos] = 100.0
    h = m.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    assert generate.generate(m, [[[5]], [[6, 7]]], SP, grid=GRID, max_new_tokens=4) == [[], []]
    h.remove()
    docs = generate.generate(m, [[[5]], [[6, 7]]], SP, grid=GRID, max_new_tokens=4, suppress=(SP.eos, SP.boi))
    assert [sum(len(s) for s in d) for d in docs] == [4, 4]
    # a <boi> as the last allowed token still draws its image (and commits nothing)
    docs = generate.generate(m, [[[5]]], SP, grid=GRID, max_new_tokens=2, force_boi_at=(1,), steps=1,
                             suppress=(SP.eos, SP.boi))
    assert len(docs[0]) == 2 and docs[0][0][-1] == SP.boi and docs[0][1].shape == (N, C)



@pytest.mark.parametrize("boi_bias", [100.0, -100.0, 0.0], ids=["opens-at-once", "forced-open", "free"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_t2i_completed_draws_what_it_wrote(model, boi_bias, temperature):
    """The model first finishes the prompt, then draws: the words are those `generate` writes until <boi> (at most
    `complete`, never <eos> or a layout token), and the image equals `t2i` of prompt + words from the generator's
    state after the words; a model that wants <boi> writes nothing, one that never samples it writes `complete`."""
    m = copy.deepcopy(model)
    bias = torch.zeros(V)
    bias[SP.boi] = boi_bias
    bias[SP.eos] = 50.0                                    # suppressed: a completion never ends the document
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    kw = dict(grid=GRID, latent_dim=C, steps=2, sampler="restart", cfg_scale=2.0)
    g = gen(4)
    lat, written = generate.t2i_completed(m, MIXED, SP, complete=3, temperature=temperature, generator=g, **kw)
    assert lat.shape == (len(MIXED), N, C) and len(written) == len(MIXED)
    assert all(len(w) <= 3 and not set(w) & {SP.pad, SP.bos, SP.eos, SP.boi, SP.eoi} for w in written)
    if boi_bias > 0:
        assert written == [[], [], []]
    elif boi_bias < 0:
        assert [len(w) for w in written] == [3, 3, 3]
    g2 = gen(4)
    words = generate.generate(m, [[p] for p in MIXED], SP, grid=GRID, max_new_tokens=3, temperature=temperature,
                              stop=(SP.boi,), draw_images=False, suppress=(SP.pad, SP.bos, SP.eoi, SP.eos),
                              generator=g2)
    assert written == [[t for seg in d for t in seg] for d in words]
    ref = generate.t2i(m, [p + w for p, w in zip(MIXED, written)], SP, generator=g2, **kw)
    err = (lat - ref).abs().max()
    _note("t2i after the model's own words vs t2i of prompt + words", err)
    assert err < TOL, err
    same, _ = generate.t2i_completed(m, MIXED, SP, complete=0, generator=gen(4), **kw)
    assert torch.equal(same, generate.t2i(m, MIXED, SP, generator=gen(4), **kw))


def test_t2i_completed_refuses_a_negative_budget(model):
    with pytest.raises(ValueError, match="complete must be >= 0"):
        generate.t2i_completed(model, [[5]], SP, grid=GRID, latent_dim=C, complete=-1, steps=1)


def test_composed_guidance_by_hand():
    """G_i = G_u(first part of i) + w sum over i's parts of (G_c - G_u), computed by hand."""
    gc = torch.tensor([[1.0], [3.0], [5.0]])
    gu = torch.tensor([[0.5], [0.5], [1.0]])
    out = generate.composed_guidance(gc, gu, torch.tensor([0, 0, 1]), 2, 2.0)
    assert out.tolist() == [[0.5 + 2 * (0.5 + 2.5)], [1.0 + 2 * 4.0]]
    out = generate.composed_guidance(gc, gu, torch.tensor([1, 0, 1]), 2, 2.0)         # image 1's first row is row 0
    assert out.tolist() == [[0.5 + 2 * 2.5], [0.5 + 2 * (0.5 + 4.0)]]
    with pytest.raises(ValueError, match="at least one part"):
        generate.composed_guidance(gc, gu, torch.tensor([0, 0, 2]), 3, 2.0)


def test_caption_logprob_is_the_training_layouts_likelihood(model):
    """The model's log-likelihood of a caption given an image, cached in one forward, equals the full recomputation
    of the training layout's own text targets; texts of different lengths (one empty: <eos> alone) in one batch."""
    x = torch.randn(3, N, C, generator=gen(1))
    texts = [[5, 6, 7], [], [8, 9, 10, 11, 12, 13]]
    got = generate.caption_logprob(model, x, texts, SP, grid=GRID)
    ref = caption_logprob_reference(model, x, texts, SP, grid=GRID)
    assert got.shape == (3,) and torch.isfinite(got).all() and (got < 0).all()
    assert (got - ref).abs().max() < TOL
    _note("caption log-likelihood vs reference", (got - ref).abs().max())
    alone = generate.caption_logprob(model, x[2:], texts[2:], SP, grid=GRID)
    assert abs(float(alone[0] - got[2])) < TOL                                  # padding in the batch changes nothing
    with pytest.raises(ValueError, match="texts for"):
        generate.caption_logprob(model, x, texts[:2], SP, grid=GRID)


def test_best_of_keeps_the_likeliest_of_the_candidates(model):
    """best_of=n: n draws from one generator, kept per image by the model's caption likelihood of its prompt (the
    sum over an image's parts); best_of=1 is the plain draw."""
    prompts, kw = [[5, 6], [7], [8, 9, 10]], dict(grid=GRID, latent_dim=C, steps=2, cfg_scale=1.5, complete=0)
    for image_of in (None, [0, 0, 1]):
        one, _ = generate.t2i_completed(model, prompts, SP, generator=gen(3), image_of=image_of, **kw)
        g = gen(3)
        cands = [generate.t2i(model, prompts, SP, grid=GRID, latent_dim=C, steps=2, cfg_scale=1.5, generator=g,
                              image_of=image_of) for _ in range(3)]
        assert torch.equal(one, cands[0])
        rows = torch.arange(len(prompts)) if image_of is None else torch.tensor(image_of)
        scores = torch.stack([torch.zeros(len(c), dtype=torch.float64).index_add_(
            0, rows, generate.caption_logprob(model, c[rows], prompts, SP, grid=GRID)) for c in cands])   # (3, I)
        want = torch.stack([cands[int(j)][i] for i, j in enumerate(scores.argmax(0))])
        best, _ = generate.t2i_completed(model, prompts, SP, generator=gen(3), image_of=image_of, best_of=3, **kw)
        assert torch.equal(best, want)
        assert len(set(scores.argmax(0).tolist())) > 1 or image_of is not None    # not always the first draw
    with pytest.raises(ValueError, match="best_of"):
        generate.t2i_completed(model, prompts, SP, best_of=0, **kw)


def test_t2i_completed_writes_rejected_words_again(model):
    """accept: rows it rejects get new words (from the same generator), accepted rows keep theirs; at most `tries`
    samples, the last kept; accepting everything is the same as no accept (same words, same latents)."""
    kw = dict(grid=GRID, latent_dim=C, complete=3, steps=1, sampler="restart")
    x, w = generate.t2i_completed(model, [[5, 6], [7]], SP, generator=gen(2), **kw)
    calls = []

    def yes(rows):
        calls.append([list(r) for r in rows])
        return [True] * len(rows)
    x1, w1 = generate.t2i_completed(model, [[5, 6], [7]], SP, generator=gen(2), accept=yes, tries=4, **kw)
    assert w1 == w and torch.equal(x1, x) and calls == [[[5, 6] + w[0], [7] + w[1]]]
    calls.clear()

    def second_row_once(rows):                                       # rejects row 1 at the first call only
        calls.append([list(r) for r in rows])
        return [True, len(calls) > 1]
    _, w2 = generate.t2i_completed(model, [[5, 6], [7]], SP, generator=gen(2), accept=second_row_once, tries=4, **kw)
    assert len(calls) == 2 and w2[0] == w[0] and calls[0][1] == [7] + w[1] and calls[1][1] == [7] + w2[1]
    calls.clear()

    def never(rows):
        calls.append([list(r) for r in rows])
        return [False] * len(rows)
    _, w3 = generate.t2i_completed(model, [[5, 6], [7]], SP, generator=gen(2), accept=never, tries=3, **kw)
    assert len(calls) == 3 and calls[-1] == [[5, 6] + w3[0], [7] + w3[1]]
    with pytest.raises(ValueError, match="verdicts"):
        generate.t2i_completed(model, [[5, 6], [7]], SP, accept=lambda rows: [True], tries=2, **kw)
    with pytest.raises(ValueError, match="tries and best_of >= 1"):
        generate.t2i_completed(model, [[5]], SP, tries=0, **kw)


def test_region_weights_by_hand():
    """A token claimed by k parts of its image: 1/k for each of them, 0 for the others; a token no part of its image
    claims: 1/(parts of the image) for each; an image of one part: 1 everywhere."""
    claims = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    a = generate.region_weights(claims[:3], torch.tensor([0, 0, 1]), 2)
    assert a.tolist() == [[1.0, 0.5, 0.0, 0.5], [0.0, 0.5, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]]
    a = generate.region_weights(claims, torch.tensor([0, 1, 0, 0]), 2)               # image 0: rows 0, 2, 3
    assert a.tolist() == [[0.5, 1.0, 1 / 3, 1 / 3], [1.0] * 4, [0.0, 0.0, 1 / 3, 1 / 3], [0.5, 0.0, 1 / 3, 1 / 3]]
    with pytest.raises(ValueError, match="one row per entry"):
        generate.region_weights(claims, torch.tensor([0, 0]), 1)


def test_composed_guidance_weights_by_hand():
    """With weights a_p: G_i = G_u + w sum_p a_p (G_c,p - G_u,p), per token."""
    gc = torch.tensor([[[1.0], [2.0]], [[3.0], [5.0]]])                              # (R=2, N=2, C=1)
    gu = torch.tensor([[[0.5], [1.0]], [[0.5], [1.0]]])
    out = generate.composed_guidance(gc, gu, torch.tensor([0, 0]), 1, 2.0, torch.tensor([[1.0, 0.25], [0.0, 0.75]]))
    assert out.tolist() == [[[0.5 + 2 * 0.5], [1.0 + 2 * (0.25 * 1.0 + 0.75 * 4.0)]]]
    with pytest.raises(ValueError, match="weights must be"):
        generate.composed_guidance(gc, gu, torch.tensor([0, 0]), 1, 2.0, torch.ones(2, 3))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_t2i_regions(model, cfg_scale):
    """Regional composition: a part that claims every token and one that claims none draw the first part's image
    alone (plain guidance, the same noise); a prompt given as two parts that claim nothing is plain guidance at the
    scale (not twice it); two disjoint regions differ from the composition without them."""
    kw = dict(grid=GRID, latent_dim=C, steps=2, sampler="restart", cfg_scale=cfg_scale)
    every, none = torch.ones(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)
    alone = generate.t2i(model, [[5, 6], [7, 8, 9]], SP, image_of=[0, 0], regions=torch.stack([every, none]),
                         generator=gen(3), **kw)
    once = generate.t2i(model, [[5, 6]], SP, generator=gen(3), **kw)
    assert alone.shape == (1, N, C) and (alone - once).abs().max() < TOL
    shared = generate.t2i(model, [[5, 6], [5, 6]], SP, image_of=[0, 0], regions=torch.stack([none, none]),
                          generator=gen(3), **kw)
    assert (shared - once).abs().max() < TOL
    half = torch.arange(N) < N // 2
    split = generate.t2i(model, [[5, 6], [7, 8, 9]], SP, image_of=[0, 0], regions=torch.stack([half, ~half]),
                         generator=gen(3), **kw)
    plain = generate.t2i(model, [[5, 6], [7, 8, 9]], SP, image_of=[0, 0], generator=gen(3), **kw)
    assert (split - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="regions must come with image_of"):
        generate.t2i(model, [[5, 6], [7]], SP, regions=torch.stack([half, ~half]), **kw)
    with pytest.raises(ValueError, match="regions must come with image_of"):
        generate.t2i(model, [[5, 6], [7]], SP, image_of=[0, 0], regions=half[None], **kw)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_t2i_composed_prompts(model, cfg_scale):
    """Parts of one image: a prompt given twice as two parts is plain guidance at twice the scale (from the same
    noise); one part per image in another order is the same images as t2i of the reordered prompts."""
    kw = dict(grid=GRID, latent_dim=C, steps=2, sampler="restart")
    twice = generate.t2i(model, [[5, 6], [5, 6]], SP, image_of=[0, 0], cfg_scale=cfg_scale, generator=gen(3), **kw)
    once = generate.t2i(model, [[5, 6]], SP, cfg_scale=2 * cfg_scale, generator=gen(3), **kw)
    assert twice.shape == (1, N, C) and (twice - once).abs().max() < TOL
    swapped = generate.t2i(model, [[5, 6], [7, 8, 9]], SP, image_of=[1, 0], cfg_scale=cfg_scale, generator=gen(3), **kw)
    ref = generate.t2i(model, [[7, 8, 9], [5, 6]], SP, cfg_scale=cfg_scale, generator=gen(3), **kw)
    assert (swapped - ref).abs().max() < TOL
    two = generate.t2i(model, [[5, 6], [7, 8, 9], [10]], SP, image_of=[0, 0, 1], cfg_scale=cfg_scale,
                       generator=gen(3), **kw)
    assert two.shape == (2, N, C) and (two[0] - once[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="number the images"):
        generate.t2i(model, [[5], [6]], SP, image_of=[0, 2], cfg_scale=cfg_scale, **kw)
    with pytest.raises(ValueError, match="entries for"):
        generate.t2i(model, [[5], [6]], SP, image_of=[0], cfg_scale=cfg_scale, **kw)

# ---- API and commands


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained-looking run: SentencePiece + pixel tokenizers, config.yaml and a checkpoint of a random model."""
    from safetensors.torch import save_file

    from nextx.config import load_config, save_config
    from nextx.latents import PixelTokenizer, load_image_tokenizer
    from nextx.pretrained import build_model
    from nextx.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("run")
    texts = [f"a {c} {s} at the {w}" for c in ("red", "green", "blue") for s in ("circle", "square", "star")
             for w in ("top", "left", "middle", "bottom")]
    text_tok = train_sentencepiece(texts, root / "text", vocab_size=40)
    px = torch.rand(8, 3, 8, 8, generator=gen(0))
    PixelTokenizer.from_pixels(px, 2).save(root / "pixel")
    cfg = load_config("configs/tiny.yaml", [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.time_freq_dim=16",
        f"data.text_tokenizer={root / 'text'}", f"data.image_tokenizer={root / 'pixel'}"])
    torch.manual_seed(0)
    model = build_model(cfg, text_tok, load_image_tokenizer(root / "pixel"))

    ex = root / "r" / "exports" / "step_0000001"                       # an export, as training writes it
    ex.mkdir(parents=True)
    save_file(model.state_dict(), str(ex / "model.safetensors"))
    save_config(cfg, ex / "config.yaml")
    from nextx.infer import to_pil

    for i, im in enumerate(to_pil(px[:2])):
        im.save(root / f"in{i}.png")
    return root


TRAINING_MODULES = ("nextx.train", "nextx.objective", "nextx.data", "nextx.engine", "deepspeed", "webdataset")


def test_inference_imports_nothing_from_training(run_dir):
    """Layering: loading a run and drawing / captioning with it, in a fresh interpreter, never imports the trainer,
    the objective, the data pipeline, the engine, deepspeed or webdataset."""
    import subprocess
    import sys

    code = f"""
import sys
from nextx.infer import Pipeline
g = Pipeline.from_run({str(run_dir / "r")!r})
g.t2i(["a red circle"], steps=2, cfg_scale=2.0)
from PIL import Image
g.caption([Image.open({str(run_dir / "in0.png")!r})], max_new_tokens=3)
print(sorted(m for m in sys.modules if m.split(".")[0] in {{"deepspeed", "webdataset"}}
             or m in {TRAINING_MODULES!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_api_t2i_caption_generate(run_dir):
    from nextx.documents import Image, Text
    from nextx.infer import Pipeline

    g = Pipeline.from_run(run_dir / "r")
    assert (g.cfg_scale, g.sampler, g.steps) == (1.5, "pushforward", 4)  # tiny.yaml: IMM with CFG dropout
    ims = g.t2i(["a red circle", "blue", ""], steps=2, seed=0, batch_size=2)
    assert ims.shape == (3, 3, 8, 8) and 0 <= float(ims.min()) and float(ims.max()) <= 1
    assert torch.equal(ims, g.t2i(["a red circle", "blue", ""], steps=2, seed=0, batch_size=2))
    done, written = g.t2i(["a red circle", "blue", ""], steps=2, seed=0, batch_size=2, complete=3,
                          return_written=True)
    assert done.shape == ims.shape and len(written) == 3 and all(isinstance(w, str) for w in written)
    assert g.t2i(["blue"], steps=2, return_written=True)[1] == [""]
    mixed, written = g.t2i([["a red circle", "blue"], "a red circle"], steps=2, seed=0, complete=2,
                           return_written=True)
    assert mixed.shape == (2, 3, 8, 8) and isinstance(written[0], list) and len(written[0]) == 2
    assert isinstance(written[1], str)
    with pytest.raises(ValueError, match="at least one part"):
        g.t2i([[]], steps=1)
    caps = g.caption(ims, max_new_tokens=6)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    doc = g.generate("a red", max_new_tokens=6, force_images=(0, 3))
    assert sum(isinstance(s, Image) for s in doc.segments) == 2
    assert all(s.pixels.size == (8, 8) and s.latents.shape == (16, 12) for s in doc.segments if isinstance(s, Image))
    assert all(isinstance(s, (Text, Image)) for s in doc.segments) and doc.meta["prompt"] == "a red"


def test_pipeline_regions(run_dir):
    """`Pipeline.t2i(regions=)`: called with each part's finished text (prompt + words); a part claiming the whole
    grid beside one claiming nothing draws that part's image alone; a mask of the wrong shape is refused."""
    from nextx.infer import Pipeline

    g = Pipeline.from_run(run_dir / "r")
    h, w = g.image_tok.grid
    seen = []

    def where(text):
        seen.append(text)
        return np.ones((h, w), bool) if text.startswith("a red circle") else None

    alone = g.t2i([["a red circle", "blue"]], steps=2, seed=0, regions=where)
    assert seen == ["a red circle", "blue"]
    assert (alone - g.t2i(["a red circle"], steps=2, seed=0)).abs().max() < 1e-5
    seen.clear()
    _, written = g.t2i([["a red circle", "blue"]], steps=2, seed=0, regions=where, complete=2, return_written=True)
    assert len(seen) == 2 and all(t.startswith(p) and t.endswith(x.strip())
                                  for t, p, x in zip(seen, ["a red circle", "blue"], written[0]))
    with pytest.raises(ValueError, match="token grid"):
        g.t2i([["a red circle", "blue"]], steps=1, regions=lambda text: np.ones((h + 1, w), bool))
    asked = []

    def fits(i, texts):                                    # a prompt's index in the call, its parts' finished texts
        asked.append((i, texts))
        return True
    g.t2i([["a red circle", "blue"], "red"], steps=1, complete=2, accept=fits, tries=3, batch_size=1)
    assert [i for i, _ in asked] == [0, 1] and len(asked[0][1]) == 2 and asked[1][1][0].startswith("red")


def test_pipeline_samples_as_the_run_trained(run_dir):
    """The run's objective.imm_sampler and objective.t_shift are the pipeline's defaults (the t-grid shifted as training
    shifted its times); explicit arguments win; another schedule drops the default shift instead of failing."""
    from dataclasses import replace

    from nextx.checkpoint import load_for_inference
    from nextx.errors import UserError
    from nextx.infer import Pipeline

    model, cfg, text_tok, image_tok, special = load_for_inference(run_dir / "r")
    assert (Pipeline.from_model(model, cfg, text_tok, image_tok, special).shift, cfg.objective.t_shift) == (1.0, 1.0)
    cfg = replace(cfg, objective=replace(cfg.objective, imm_sampler="restart", t_shift=3.0))
    g = Pipeline.from_model(model, cfg, text_tok, image_tok, special)
    assert (g.sampler, g.shift, g.steps) == ("restart", 3.0, 4)
    kw = dict(steps=2, seed=0, batch_size=2)
    default = g.t2i(["a red circle", "blue"], **kw)
    assert torch.equal(default, g.t2i(["a red circle", "blue"], sampler="restart", shift=3.0, **kw))
    assert not torch.equal(default, g.t2i(["a red circle", "blue"], shift=1.0, **kw))
    assert g.t2i(["blue"], schedule="edm", **kw).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="uniform schedule only"):
        g.t2i(["blue"], schedule="edm", shift=3.0, **kw)
    # a run trained at s = eps alone (objective.s_eps_share 1) samples with restart; another sampler is refused
    only = replace(cfg, objective=replace(cfg.objective, s_eps_share=1.0))
    g = Pipeline.from_model(model, only, text_tok, image_tok, special)
    assert torch.equal(default, g.t2i(["a red circle", "blue"], **kw))
    for sampler in ("pushforward", "euler"):
        with pytest.raises(UserError, match=f"sampler '{sampler}': this model was trained at s = eps only"):
            g.t2i(["blue"], sampler=sampler, **kw)
    with pytest.raises(UserError, match="--sampler restart"):
        Pipeline.from_model(model, replace(only, objective=replace(only.objective, imm_sampler="pushforward")),
                            text_tok, image_tok, special)
    flow = replace(only, objective=replace(only.objective, kind="flow"))
    assert Pipeline.from_model(model, flow, text_tok, image_tok, special).sampler == "euler"   # flow: s = t


def test_cli_help():
    from nextx.cli import main

    for cmd in ("t2i", "caption", "generate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_cli_t2i_caption_generate(run_dir, tmp_path, capsys, monkeypatch):
    from data_tools.shapes import cell_tokens
    from nextx.cli import main
    from nextx.infer import Pipeline

    (tmp_path / "prompts.txt").write_text("a red circle\n\nblue star\n")
    assert main(["t2i", str(run_dir / "r"), "--prompts-file", str(tmp_path / "prompts.txt"), "--steps", "2",
                 "--cfg-scale", "1.5", "--out", str(tmp_path / "t2i"), "--device", "cpu"]) == 0
    s = json.loads((tmp_path / "t2i" / "settings.json").read_text())
    assert [x["prompt"] for x in s["images"]] == ["a red circle", "blue star"] and s["steps"] == 2
    assert (tmp_path / "t2i" / "000.png").is_file() and (tmp_path / "t2i" / "grid.png").is_file()
    assert main(["t2i", str(run_dir / "r"), "--prompt", "a red", "--steps", "1", "--complete", "2", "--out",
                 str(tmp_path / "t2c"), "--device", "cpu"]) == 0
    s = json.loads((tmp_path / "t2c" / "settings.json").read_text())
    assert s["complete"] == 2 and isinstance(s["images"][0]["written"], str)
    assert "'a red' + " in capsys.readouterr().out
    assert main(["t2i", str(run_dir / "r"), "--prompt", "a red AND blue", "--prompt", "star", "--steps", "1",
                 "--compose", "--out", str(tmp_path / "t2p"), "--device", "cpu"]) == 0
    s = json.loads((tmp_path / "t2p" / "settings.json").read_text())
    assert s["images"][0]["parts"] == ["a red", "blue"] and "parts" not in s["images"][1]
    # a shapes caption of several objects is drawn as its noun phrases; --regions: each guides the cell it names
    scene = ["--prompt", "a red circle in the top left to the left of a blue square in the center", "--steps", "1",
             "--compose", "--device", "cpu", "--cfg-scale", "2"]
    seen = {}
    real = Pipeline.t2i

    def spy(self, prompts, **kw):
        seen.update(kw)
        return real(self, prompts, **kw)
    monkeypatch.setattr(Pipeline, "t2i", spy)
    assert main(["t2i", str(run_dir / "r"), *scene, "--regions", "--out", str(tmp_path / "t2r")]) == 0
    s = json.loads((tmp_path / "t2r" / "settings.json").read_text())
    assert s["images"][0]["parts"] == ["a red circle in the top left", "a blue square in the center"] and s["regions"]
    grid = (4, 4)                                                       # 8 px images of 2 px patches
    assert (seen["regions"]("a blue square in the center") == cell_tokens("center", grid)).all()
    assert seen["regions"]("a blue square") is None and seen["accept"] is None and seen["tries"] == 1
    assert main(["t2i", str(run_dir / "r"), *scene[:-2], "--complete", "2", "--tries", "3", "--best-of", "2",
                 "--out", str(tmp_path / "t2w")]) == 0
    s = json.loads((tmp_path / "t2w" / "settings.json").read_text())
    assert s["tries"] == 3 and isinstance(s["images"][0]["words_fit"], bool) and seen["regions"] is None
    assert s["best_of"] == 2 and seen["best_of"] == 2
    assert seen["accept"](0, ["a red circle in the top left", "a blue square in the center"])     # left of: fits
    assert not seen["accept"](0, ["a red circle in the center", "a blue square in the top left"])
    for bad in (["--regions"], ["--tries", "2"], ["--complete", "2", "--tries", "0"], ["--best-of", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["t2i", str(run_dir / "r"), "--prompt", "a red", "--out", str(tmp_path / "bad"), *bad])
        assert e.value.code == 2
    imgs = [str(run_dir / "in0.png"), str(tmp_path / "t2i" / "001.png")]
    assert main(["caption", str(run_dir / "r"), *imgs, "--out", str(tmp_path / "c.json"), "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert [r["image"] for r in json.loads((tmp_path / "c.json").read_text())["captions"]] == imgs
    assert main(["caption", str(run_dir / "r"), *imgs, "--out", str(tmp_path / "c.csv"), "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert [r["image"] for r in csv.DictReader((tmp_path / "c.csv").open())] == imgs
    assert main(["generate", str(run_dir / "r"), "--prompt", "a red", "--image", str(run_dir / "in0.png"),
                 "--force-image-at", "0", "2", "--max-new-tokens", "5", "--steps", "1", "--out",
                 str(tmp_path / "g"), "--device", "cpu"]) == 0
    d = json.loads((tmp_path / "g" / "document.json").read_text())
    assert [s["image"] for s in d["segments"] if "image" in s] == ["img0.png", "img1.png"]
    assert (tmp_path / "g" / "img1.png").is_file()


def test_report_diffs():
    """Prints the max abs diffs (cached vs recomputation) measured above (run with -s to see them)."""
    for k, v in sorted(DIFFS.items()):
        print(f"max abs diff  {k:<45} {v:.2e}")
