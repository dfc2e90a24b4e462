"""Objective: CFG dropout, grouped times, IMM and flow losses against per-image loop references."""

import numpy as np
import pytest
import torch

from nextx import imm
from nextx.config import ModelConfig, ObjectiveConfig
from nextx.masks import dense_mask
from nextx.model import ModelInput, NextX
from nextx.objective import _image_times, cfg_dropout, compute_loss, group_mean
from nextx.sequence import (IGNORE, NOISE, PAD, TEXT, ImageTokens, SpecialIds, apply_null_prompt, collate,
                            layout_document, pack_row)

SP = SpecialIds(pad=0, bos=2, eos=3, boi=4, eoi=5)
C, GRID = 6, (2, 3)


def _batch(seed=0, rows=3, docs_per_row=3, row_len=64):
    """Rows of caption->image (generated) and image->caption (context) documents, with pads."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        docs = []
        for d in range(docs_per_row):
            gen = bool(rng.integers(0, 2)) or d == 0
            im = ImageTokens((rng.normal(size=(6, C)) * 0.5).astype(np.float32), GRID, generate=gen)
            txt = [int(x) for x in rng.integers(6, 40, size=int(rng.integers(2, 6)))]
            docs.append(layout_document([txt, im] if gen else [im, txt], SP))
        out.append(pack_row(docs, row_len, SP.pad))
    return collate(out)


def _model(seed=0):
    torch.manual_seed(seed)
    m = NextX(ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, time_freq_dim=32), vocab_size=40,
              latent_dim=C)
    for n, p in m.named_parameters():  # the latent head and modulation start at 0: give them signal
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return m


def test_null_prompt_worked_example():
    """The docstring's example by hand: <bos> a b c <boi> n n, then a second document <bos> d <boi> n in the row."""
    P = SP.pad
    ids = torch.tensor([[2, 9, 10, 11, 4, P, P, 2, 12, 4, P]])
    kind = torch.tensor([[TEXT] * 5 + [NOISE] * 2 + [TEXT] * 3 + [NOISE]])
    doc = torch.tensor([[0] * 7 + [1] * 4])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 5, 0, 1, 2, 3]])
    every = torch.ones_like(ids, dtype=torch.bool)
    i, k, d, p, h = apply_null_prompt(ids, kind, doc, pos, every, SP)
    assert i.tolist() == [[2, P, P, P, 4, P, P, 2, P, 4, P]]
    assert k.tolist() == [[TEXT, PAD, PAD, PAD, TEXT, NOISE, NOISE, TEXT, PAD, TEXT, NOISE]]
    assert d.tolist() == [[0, -1, -1, -1, 0, 0, 0, 1, -1, 1, 1]]
    vis = d[0] >= 0
    assert p[0][vis].tolist() == [0, 1, 2, 2, 0, 1, 2]          # each document restarts its count
    assert h.sum() == 4
    # only the first document dropped: the second is untouched
    first = doc == 0
    i, k, d, p, _ = apply_null_prompt(ids, kind, doc, pos, first, SP)
    assert torch.equal(i[~first], ids[~first]) and torch.equal(p[~first], pos[~first]) and torch.equal(d[~first], doc[~first])
    # the sampler's offset: two tokens were hidden before this chunk
    _, _, _, p, _ = apply_null_prompt(ids[:, :7], kind[:, :7], doc[:, :7], pos[:, :7] + 4, every[:, :7], SP,
                                      offset=torch.tensor([4]))
    assert p[0][[0, 4, 5, 6]].tolist() == [0, 1, 2, 2]
    # "pad": ids only, the layout and positions kept (the caption's length shows)
    i, k, d, p, _ = apply_null_prompt(ids, kind, doc, pos, every, SP, "pad")
    assert i.tolist() == [[2, P, P, P, 4, P, P, 2, P, 4, P]]
    assert torch.equal(k, kind) and torch.equal(d, doc) and torch.equal(p, pos)
    with pytest.raises(ValueError, match="null prompt"):
        apply_null_prompt(ids, kind, doc, pos, every, SP, "zeros")


@pytest.mark.parametrize("caption", [[9], [9, 10, 11, 12, 13, 14]])
def test_null_prompt_is_the_layout_without_the_caption(caption):
    """Independent reference: a dropped caption->image document's visible tokens are exactly the layout of the same
    document written with no caption at all."""
    img = ImageTokens(np.zeros((4, 3), np.float32), (2, 2))
    with_caption = collate([pack_row([layout_document([caption, img], SP)], 16, SP.pad)])
    bare = layout_document([img], SP)
    b = with_caption
    i, k, d, p, _ = apply_null_prompt(b.ids, b.kind, b.doc, b.pos, b.doc >= 0, SP)
    vis = d[0] >= 0
    assert i[0][vis].tolist() == bare.ids.tolist() and k[0][vis].tolist() == bare.kind.tolist()
    assert p[0][vis].tolist() == bare.pos.tolist()


def test_cfg_dropout_p1_drops_exactly_the_documents_with_noise():
    b = _batch()
    d, n = cfg_dropout(b, 1.0, SP, torch.Generator().manual_seed(0))
    for r in range(b.ids.shape[0]):
        for doc in range(int(b.doc[r].max()) + 1):
            at = b.doc[r] == doc
            has_noise = bool((b.kind[r][at] == NOISE).any())
            if has_noise:
                ref = apply_null_prompt(b.ids[r:r + 1, at], b.kind[r:r + 1, at], b.doc[r:r + 1, at] * 0,
                                        b.pos[r:r + 1, at], torch.ones(1, int(at.sum()), dtype=torch.bool), SP)
                assert torch.equal(d.ids[r][at], ref[0][0]) and torch.equal(d.pos[r][at], ref[3][0])
                assert torch.equal(d.doc[r][at] >= 0, ref[2][0] >= 0)
                assert (d.targets[r][at] == IGNORE).all()
            else:
                for f in ("ids", "targets", "kind", "doc", "pos"):
                    assert torch.equal(getattr(d, f)[r][at], getattr(b, f)[r][at])
    assert n == sum(int(((b.doc[r] == k) & (b.kind[r] == NOISE)).any())
                    for r in range(b.ids.shape[0]) for k in range(int(b.doc[r].max()) + 1))
    same, n0 = cfg_dropout(b, 0.0, SP, None)
    assert same is b and n0 == 0


@pytest.mark.parametrize("kind", ["imm", "flow"])
def test_image_times_groups_share_s_r_t(kind):
    b = _batch(rows=4)
    cfg = ObjectiveConfig(kind=kind, group_size=2)
    t, s, r, groups = _image_times(b, cfg, torch.Generator().manual_seed(1), cfg.k)
    gen = b.image_generate.nonzero(as_tuple=True)[0]
    assert torch.equal(torch.cat(groups), gen) and all(len(g) <= 2 for g in groups)
    assert (t[~b.image_generate] == 0).all()
    for g in groups:
        if kind == "imm":
            assert (t[g] == t[g[0]]).all() and (s[g] == s[g[0]]).all() and (r[g] == r[g[0]]).all()
            assert (s[g] <= r[g]).all() and (r[g] <= t[g]).all() and (s[g] < t[g]).all()
        else:
            assert torch.equal(s[g], t[g])


def test_s_eps_share_one_trains_every_group_at_s_eps_with_r_from_it():
    """objective.s_eps_share 1 (the demo): every group's s is eps, t is what the share-0 draw gives, and r = r_of(eps,
    t) (with k 4, r = eps wherever eta_t < eta_max / 16, i.e. t < 0.912: the data itself is the target)."""
    b = _batch(rows=4)
    base = ObjectiveConfig(group_size=1, k=4, eps=0.0)
    cfg = ObjectiveConfig(group_size=1, k=4, eps=0.0, s_eps_share=1.0)
    t0, _, _, _ = _image_times(b, base, torch.Generator().manual_seed(1), cfg.k)
    t, s, r, groups = _image_times(b, cfg, torch.Generator().manual_seed(1), cfg.k)
    gen = b.image_generate.nonzero(as_tuple=True)[0]
    assert len(gen) >= 2 and torch.equal(t, t0) and (s[gen] == 0).all()
    assert torch.equal(r[gen], imm.r_of(s[gen], t[gen], k=4))
    low = t[gen] < 0.91
    assert low.any() and (r[gen][low] == 0).all()


def _noise_values(v, b, i):
    """(B, L, C) -> (N, C) noise-split values of batch image i."""
    at = (b.img == i) & (b.kind == NOISE)
    return v[at]


@pytest.mark.parametrize("group_size,weighting", [(2, "equal"), (3, "equal"), (3, "size")])
def test_imm_loss_matches_a_per_group_loop_reference(group_size, weighting):
    b = _batch(seed=3, rows=4)
    m = _model()
    cfg = ObjectiveConfig(kind="imm", group_size=group_size, cfg_drop=0.0, text_weight=0.0, image_weight=1.0,
                          partial_group=weighting)
    loss, parts = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(7))

    # reference: same draws in the same order, then every image on its own, loops over groups
    g = torch.Generator().manual_seed(7)
    t, s, r, groups = _image_times(b, cfg, g, cfg.k)
    eps = torch.randn(b.latents.shape, generator=g) * cfg.sigma_d
    x = b.latents
    noise = (b.kind == NOISE).unsqueeze(-1)
    tt, ss, rr = (v.float()[b.img.clamp(min=0)].unsqueeze(-1) for v in (t, s, r))
    x_t = torch.where(noise, (1 - tt) * x + tt * eps, x)
    x_r = torch.where(noise, (1 - rr) * x + rr * eps, x)
    mask = dense_mask(b.doc, b.kind, b.split)
    with torch.no_grad():
        G_t = m(ModelInput.of(b, x_t, t.float(), s.float(), mask)).latent_out
        G_r = m(ModelInput.of(b, x_r, r.float(), s.float(), mask)).latent_out
    per_group = []
    for grp in groups:
        ys = torch.stack([_noise_values(x_t, b, int(i)) - (t[i] - s[i]) * 0.5 * _noise_values(G_t, b, int(i))
                          for i in grp]).double()
        yt = torch.stack([_noise_values(x_r, b, int(i)) - (r[i] - s[i]) * 0.5 * _noise_values(G_r, b, int(i))
                          for i in grp]).double()
        per_group.append(imm.mmd_loss(ys[None], yt[None], t[grp[:1]], s[grp[:1]], sigma_d=0.5))
    sizes = torch.tensor([len(grp) for grp in groups], dtype=torch.float64)
    if group_size == 3:
        assert sizes[-1] < 3                                      # the batch ends with a partial group
    w = sizes if weighting == "size" else torch.ones_like(sizes)
    ref = (torch.cat(per_group) * w).sum() / w.sum()
    assert parts["groups"] == len(groups)
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


def test_group_mean_by_hand():
    losses = torch.tensor([1.0, 1.0, 4.0])
    assert group_mean(losses, [4, 4, 1], "equal").item() == 2.0
    assert group_mean(losses, [4, 4, 1], "size").item() == pytest.approx(12 / 9)
    with pytest.raises(ValueError, match="partial-group"):
        group_mean(losses, [4, 4, 1], "drop")


def test_k_curriculum_sets_the_r_gap_of_the_step():
    # k_start = 0 at step 0: delta = eta_max - eta_min, so r = s for every group (the target is x_s itself);
    # at step >= k_ramp_steps (and for validation, step None) r is the fixed-k r of the paper
    b = _batch(seed=3, rows=4)
    cfg = ObjectiveConfig(kind="imm", group_size=2, k_start=0.0, k_ramp_steps=100)
    g = torch.Generator().manual_seed(2)
    t, s, r, _ = _image_times(b, cfg, g, imm.k_at(0, cfg.k, cfg.k_start, cfg.k_ramp_steps))
    gen = b.image_generate
    assert torch.equal(r[gen], s[gen])
    for step in (100, 5000, None):
        k = imm.k_at(step, cfg.k, cfg.k_start, cfg.k_ramp_steps)
        t2, s2, r2, _ = _image_times(b, cfg, torch.Generator().manual_seed(2), k)
        assert torch.equal(r2[gen], imm.r_of(s2[gen], t2[gen], k=12, min_gap=cfg.min_gap))
    m = _model()
    _, parts = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(0), step=25)
    assert parts["k"] == 3.0


def test_flow_loss_matches_mse_reference():
    b = _batch(seed=4)
    m = _model()
    cfg = ObjectiveConfig(kind="flow", cfg_drop=0.0, text_weight=0.0)
    loss, _ = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t, s, _, _ = _image_times(b, cfg, g, cfg.k)
    eps = torch.randn(b.latents.shape, generator=g) * 0.5
    noise = (b.kind == NOISE).unsqueeze(-1)
    tt = t.float()[b.img.clamp(min=0)].unsqueeze(-1)
    x_t = torch.where(noise, (1 - tt) * b.latents + tt * eps, b.latents)
    with torch.no_grad():
        G = m(ModelInput.of(b, x_t, t.float(), s.float(), dense_mask(b.doc, b.kind, b.split))).latent_out
    per = [((_noise_values(G, b, int(i)) - _noise_values((eps - b.latents) / 0.5, b, int(i))) ** 2).mean()
           for i in b.image_generate.nonzero(as_tuple=True)[0]]
    assert abs(loss.item() - torch.stack(per).mean().item()) < 1e-5


def test_text_ce_is_normalised_by_targets_and_image_weight_zero_leaves_latent_head_without_grad():
    b = _batch(seed=5)
    m = _model()
    cfg = ObjectiveConfig(cfg_drop=0.0, image_weight=0.0)
    loss, parts = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = torch.zeros(b.n_images)
        logits = m(ModelInput.of(b, b.latents, z, z, dense_mask(b.doc, b.kind, b.split))).text_logits
    keep = b.targets != IGNORE
    ref = torch.nn.functional.cross_entropy(logits[keep], b.targets[keep])
    assert abs(loss.item() - ref.item()) < 1e-5 and parts["text_targets"] == int(keep.sum())
    loss.backward()
    head = [p for n, p in m.named_parameters() if "latent_head" in n]
    assert head and all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in head)


def test_loss_is_reproducible_and_trains():
    b = _batch(seed=6)
    m = _model()
    cfg = ObjectiveConfig(group_size=2, image_weight=100.0)
    l1, _ = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(0))
    l2, _ = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(0))
    assert l1.item() == l2.item()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for i in range(30):
        loss, parts = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else parts["ce"]
    assert parts["ce"] < 0.75 * first and np.isfinite(parts["imm"])


def test_imm_copies_grouping_matches_a_per_image_reference():
    """grouping=copies: the M noise splits of one image are one group; compare with a loop over images."""
    rng = np.random.default_rng(8)
    docs = [layout_document([[int(x) for x in rng.integers(6, 40, size=3)],
                             ImageTokens((rng.normal(size=(6, C)) * 0.5).astype(np.float32), GRID)], SP, noise_copies=3)
            for _ in range(4)]
    b = collate([pack_row(docs[:2], 64, SP.pad), pack_row(docs[2:], 64, SP.pad)])
    m = _model(1)
    cfg = ObjectiveConfig(grouping="copies", cfg_drop=0.0, text_weight=0.0)
    loss, parts = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t, s, r, groups = _image_times(b, cfg, g, cfg.k)
    assert parts["groups"] == 4 and [len(x) for x in groups] == [1, 1, 1, 1]
    eps = torch.randn(b.latents.shape, generator=g) * 0.5
    noise = (b.kind == NOISE).unsqueeze(-1)
    tt, ss, rr = (v.float()[b.img.clamp(min=0)].unsqueeze(-1) for v in (t, s, r))
    x_t = torch.where(noise, (1 - tt) * b.latents + tt * eps, b.latents)
    x_r = torch.where(noise, (1 - rr) * b.latents + rr * eps, b.latents)
    mask = dense_mask(b.doc, b.kind, b.split)
    with torch.no_grad():
        G_t = m(ModelInput.of(b, x_t, t.float(), s.float(), mask)).latent_out
        G_r = m(ModelInput.of(b, x_r, r.float(), s.float(), mask)).latent_out
    ref = []
    for i in range(4):
        y = (_noise_values(x_t, b, i) - (t[i] - s[i]) * 0.5 * _noise_values(G_t, b, i)).double().reshape(1, 3, 6, C)
        yt = (_noise_values(x_r, b, i) - (r[i] - s[i]) * 0.5 * _noise_values(G_r, b, i)).double().reshape(1, 3, 6, C)
        ref.append(imm.mmd_loss(y, yt, t[i:i + 1], s[i:i + 1]))
    assert abs(loss.item() - torch.cat(ref).mean().item()) < 1e-5 * max(1.0, abs(torch.cat(ref).mean().item()))


@pytest.mark.slow  # inductor compiles 3 graphs (grad, no-grad target pass, a second shape): ~65 s cold on 2 cores
def test_compiled_blocks_match_eager_on_cpu():
    """dist.compile on CPU (inductor's C++ kernels, what configs/demo.yaml trains with): the same IMM loss and
    gradients as the eager blocks, on two batches of different shapes (the second traces the dynamic sizes)."""
    from nextx.engine import compile_blocks

    cfg = ObjectiveConfig(kind="imm", group_size=2, k=4)
    eager, comp = _model(3), _model(3)
    compile_blocks(comp, torch.device("cpu"))
    for seed, rows in ((0, 3), (1, 2)):
        b = _batch(seed, rows=rows)
        out = []
        for m in (eager, comp):
            m.zero_grad()
            loss, _ = compute_loss(m, b, cfg, SP, generator=torch.Generator().manual_seed(seed))
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        assert torch.allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-6)
        for ge, gc in zip(out[0][1], out[1][1]):
            assert torch.allclose(ge, gc, rtol=1e-3, atol=1e-5)


def test_compile_without_a_cpp_compiler_is_a_config_error(monkeypatch):
    import nextx.engine as engine
    from nextx.config import ConfigError

    m = _model()
    monkeypatch.setattr(engine, "cpu_compiler", lambda: None)
    with pytest.raises(ConfigError, match=r"C\+\+ compiler.*dist.compile=false"):
        engine.compile_blocks(m, torch.device("cpu"))
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in m.layers)  # nothing was compiled
