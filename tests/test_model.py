"""NextX model: shapes on a packed batch, HF Llama parity, mask/modulation correctness, KV cache, checkpointing,
bf16, 2D positions, a learning step. CPU, tiny dims."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nextx.config import ModelConfig
from nextx.masks import block_mask, dense_mask, xformers_available
from nextx.model import (ModelInput, ModelOutput, NextX, PixelUNet, _modulate, image_splits, noise_runs, sdpa, spread,
                         time_features)
from nextx.positions import rope2d_inv_freq, rope_inv_freq, rope_section
from nextx.pretrained import load_hf_llama
from nextx.sequence import CLEAN, IGNORE, NOISE, PAD, TEXT, ImageTokens, SpecialIds, collate, layout_document, pack_row

SP = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
V, C = 50, 6


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, time_freq_dim=16, ffn_hidden=64)
    return ModelConfig(**{**base, **kw})


def perturb_zero_init(model: NextX, std: float = 0.05, seed: int = 0) -> NextX:
    """Give the zero-initialised parts (modulation, latent head) random values so tests can see them act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ada" in name or "latent_head" in name or ".local." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def image(h, w, generate=True, seed=0):
    return ImageTokens(np.random.default_rng(seed).normal(0, 0.5, (h * w, C)).astype(np.float32), (h, w), generate)


def packed_batch():
    """2 rows: [caption->image (clean kept) + text-only doc], [image->caption + caption->image (clean dropped)]."""
    d1 = layout_document([[5, 6, 7], image(2, 2, seed=1), [8, 9]], SP)
    d2 = layout_document([[10, 11]], SP)
    d3 = layout_document([image(2, 3, generate=False, seed=2), [12, 13, 14]], SP)
    d4 = layout_document([[15], image(2, 2, seed=3)], SP)
    L = 32
    b = collate([pack_row([d1, d2], L, SP.pad), pack_row([d3, d4], L, SP.pad)])
    mask = dense_mask(b.doc, b.kind, b.split)
    return b, mask


def run(model, b, mask, latents=None, t=None, s=None, **kw) -> ModelOutput:
    n = b.n_images
    t = torch.linspace(0.2, 0.9, n, device=b.latents.device) if t is None else t
    s = t * 0.5 if s is None else s
    return model(ModelInput.of(b, b.latents if latents is None else latents, t, s, mask), **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_zero_init(NextX(tiny_cfg(), vocab_size=V, latent_dim=C)).eval()


@torch.no_grad()
def test_shapes_on_a_packed_batch(model):
    b, mask = packed_batch()
    B, L = b.ids.shape
    out = run(model, b, mask)
    assert out.text_logits.shape == (B, L, V) and out.latent_out.shape == (B, L, C) and out.past is None
    tm = b.targets != IGNORE
    sel = run(model, b, mask, text_mask=tm)
    assert sel.text_logits.shape == (int(tm.sum()), V)
    torch.testing.assert_close(sel.text_logits, out.text_logits[tm], rtol=0, atol=1e-6)
    assert torch.isfinite(out.text_logits).all() and torch.isfinite(out.latent_out).all()


def test_zero_init_heads_and_modulation():
    m = NextX(tiny_cfg(), vocab_size=V, latent_dim=C)
    with torch.no_grad():
        assert all(float(p.abs().max()) == 0 for n, p in m.named_parameters() if "ada" in n or "latent_head" in n)
        b, mask = packed_batch()
        assert float(run(m, b, mask).latent_out.abs().max()) == 0.0


# ---- HF Llama parity


def _hf_dir(tmp_path, tie=False, theta=10000.0, rope_scaling=None, vocab=100, bin_format=False):
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=160, vocab_size=vocab, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    rp = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": theta}
    hc = transformers.LlamaConfig(**kw, rope_parameters=rp)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    if bin_format:
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    return hf


@pytest.mark.parametrize("tie,theta,scaling,bin_format", [
    (False, 10000.0, None, False), (True, 10000.0, None, False), (False, 500000.0, None, True),
    (False, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, False)])
def test_hf_llama_parity(tmp_path, tie, theta, scaling, bin_format):
    hf = _hf_dir(tmp_path, tie, theta, scaling, bin_format=bin_format)
    ours = load_hf_llama(tmp_path, latent_dim=C).eval()
    assert ours.cfg.tie_embeddings == tie and ours.cfg.rope_theta == theta
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours.text_logits(ids)
        diff = float((hf(ids).logits - got).abs().max())          # HF's default (sdpa) attention
        hf.set_attn_implementation("eager")
        diff_eager = float((hf(ids).logits - got).abs().max())    # HF's eager softmax(QK^T)V
    print(f"\nHF Llama parity (tie={tie}, rope_theta={theta}, scaling={scaling and scaling['rope_type']}, "
          f"{'bin' if bin_format else 'safetensors'}): max abs logit diff {diff:.2e} (vs HF eager {diff_eager:.2e})")
    assert diff <= 1e-4 and diff_eager <= 1e-4


def test_hf_vocab_override_grows_embedding(tmp_path):
    hf = _hf_dir(tmp_path, tie=False)
    ours = load_hf_llama(tmp_path, latent_dim=C, vocab_size=112, pos2d="sincos").eval()
    assert ours.embed_tokens.weight.shape == (112, 64) and ours.lm_head.weight.shape == (112, 64)
    torch.testing.assert_close(ours.embed_tokens.weight[:100], hf.model.embed_tokens.weight, rtol=0, atol=0)
    assert float(ours.embed_tokens.weight[100:].detach().std()) > 0  # fresh rows, not zeros
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert float((hf(ids).logits - ours.text_logits(ids)[..., :100]).abs().max()) <= 1e-4
    tied = _hf_dir(tmp_path / "tied", tie=True)
    m = load_hf_llama(tmp_path / "tied", vocab_size=120)
    assert m.lm_head.weight is m.embed_tokens.weight and m.embed_tokens.weight.shape[0] == 120
    torch.testing.assert_close(m.embed_tokens.weight[:100], tied.model.embed_tokens.weight, rtol=0, atol=0)


def test_build_model_from_hf_keeps_the_configs_image_path(tmp_path):
    """model.hf_init sets the text path's shape; every other model field (latent_conv, block_conv, pixel_unet, 2D
    positions) is the config's, and a pixel tokenizer's patch reaches the U-Net."""
    from types import SimpleNamespace

    from nextx.config import Config
    from nextx.pretrained import build_model

    _hf_dir(tmp_path)
    cfg = Config()
    cfg.model = ModelConfig(hf_init=str(tmp_path), latent_conv=3, block_conv=3, pixel_unet=4, pos2d="rope+sincos",
                            sincos_scale=1.0)
    m = build_model(cfg, SimpleNamespace(vocab_size=90), SimpleNamespace(type="pixel", patch_size=2, token_dim=12))
    assert (m.cfg.d_model, m.cfg.latent_conv, m.cfg.block_conv, m.cfg.pos2d, m.cfg.sincos_scale) == \
        (64, 3, 3, "rope+sincos", 1.0)
    assert m.latent_patch == 2 and len(m.unet.down) == 1 and m.unet.out.out_channels == 3


def test_hf_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="gpt2"):
        load_hf_llama(tmp_path)
    d = tmp_path / "yarn"
    _hf_dir(d, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="linear"):
        load_hf_llama(d)
    d = tmp_path / "ok"
    _hf_dir(d)
    with pytest.raises(ValueError, match="smaller"):
        load_hf_llama(d, vocab_size=50)


# ---- mask and modulation correctness


@torch.no_grad()
def test_noise_tokens_are_invisible_and_conditioned(model):
    b, mask = packed_batch()
    noise = b.kind == NOISE
    base = run(model, b, mask)
    lat = b.latents.clone()
    lat[noise] = torch.randn_like(lat[noise])
    t = torch.rand(b.n_images)
    moved = run(model, b, mask, latents=lat, t=t, s=t * 0.1)
    keep = ~noise & (b.kind != 0)
    assert float((base.text_logits[keep] - moved.text_logits[keep]).abs().max()) == 0.0
    assert float((base.latent_out[keep] - moved.latent_out[keep]).abs().max()) == 0.0
    # the noise outputs do depend on t alone (latents fixed), and on s alone
    t2 = torch.linspace(0.2, 0.9, b.n_images).flip(0)
    other_t = run(model, b, mask, t=t2, s=torch.linspace(0.2, 0.9, b.n_images) * 0.5)
    assert float((base.latent_out[noise] - other_t.latent_out[noise]).abs().min()) > 0
    other_s = run(model, b, mask, s=torch.zeros(b.n_images))
    assert float((base.latent_out[noise] - other_s.latent_out[noise]).abs().max()) > 1e-4
    # ignored latents (text/pad) cannot leak, even as NaN
    lat = b.latents.clone()
    lat[b.kind == TEXT] = float("nan")
    out = run(model, b, mask, latents=lat)
    assert torch.equal(out.text_logits, base.text_logits) and torch.equal(out.latent_out, base.latent_out)


@torch.no_grad()
def test_modulation_is_per_image(model):
    b, mask = packed_batch()
    noise = b.kind == NOISE
    base = run(model, b, mask)
    t = torch.linspace(0.2, 0.9, b.n_images)
    t[0] = 0.05  # change only image 0's time
    out = run(model, b, mask, t=t, s=torch.linspace(0.2, 0.9, b.n_images) * 0.5)
    img0 = noise & (b.img == 0)
    assert float((out.latent_out[img0] - base.latent_out[img0]).abs().max()) > 1e-4
    assert torch.equal(out.latent_out[noise & ~img0], base.latent_out[noise & ~img0])


def test_noise_runs_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    assert noise_runs(t(0, 0, 2, 2, 5, 5)) == 2
    assert noise_runs(t(3, 3, 3)) == 3
    assert noise_runs(t(2, 2, 0, 0, 2, 2)) == 2    # any order, an image in several blocks: still one image a block
    assert noise_runs(t(0, 2, 0, 2)) == 1          # blocks of one token (the gather itself)
    assert noise_runs(t(0, 0, 2)) is None          # runs of unequal length
    assert noise_runs(t(0, 0, 1, 2)) is None       # the first run's length does not tile the rest
    assert noise_runs(t(0, 0, 0, 1)) is None
    assert noise_runs(t()) is None




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_shift", [True, False])
def test_modulate_own_backward_equals_autograd_of_the_gather(dtype, with_shift):
    """_modulate's hand-written backward (a gather and a plain row copy) gives bitwise the values and gradients of
    autograd through index_select + index_copy; rows outside nz pass through untouched, in value and gradient."""
    torch.manual_seed(0)
    h = torch.randn(3, 7, 5).to(dtype).requires_grad_()
    nz = torch.tensor([19, 2, 3, 11, 0, 20])                                 # distinct flat rows, any order
    scale, shift = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    sh = shift if with_shift else None

    def by_autograd(h):
        flat = h.reshape(-1, 5)
        y = flat.index_select(0, nz).float() * (1 + scale)
        y = y + sh if sh is not None else y
        return flat.index_copy(0, nz, y.to(dtype)).view_as(h)

    w = torch.randn(3, 7, 5).to(dtype)
    outs = [_modulate(h, nz, sh, scale), by_autograd(h)]
    assert torch.equal(outs[0], outs[1])
    wrt = (h, scale) + ((shift,) if with_shift else ())
    g_own, g_ref = (torch.autograd.grad((o.float() * w.float()).sum(), wrt) for o in outs)
    assert all(torch.equal(a, b) for a, b in zip(g_own, g_ref))
    untouched = torch.ones(21, dtype=torch.bool)
    untouched[nz] = False
    assert torch.equal(outs[0].reshape(-1, 5)[untouched], h.detach().reshape(-1, 5)[untouched])
    assert torch.equal(g_own[0].reshape(-1, 5)[untouched], w.reshape(-1, 5)[untouched].to(g_own[0].dtype))

@pytest.mark.parametrize("ni", [[0, 0, 2, 2, 5, 5], [1, 1, 1, 1], [2, 2, 0, 0, 2, 2], [0, 2, 0, 2], [0, 0, 2]])
def test_spread_equals_the_gather_values_and_grads(ni):
    ni = torch.tensor(ni)
    v = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(len(ni), 5)
    (spread(v, ni, noise_runs(ni)) * w).sum().backward()
    g_run = v.grad.clone()
    v.grad = None
    ref = v[ni]
    (ref * w).sum().backward()
    assert torch.equal(spread(v, ni, noise_runs(ni)), ref)
    torch.testing.assert_close(g_run, v.grad)


@pytest.mark.parametrize("grids", [((2, 2), (2, 2)), ((2, 2), (2, 3))])
def test_model_with_runs_equals_the_gather(grids, monkeypatch):
    """The forward and every gradient are the same whether the per-image modulation reaches the noise tokens as
    runs (equal grids: noise_runs gives 4) or by the gather (grids 2x2 and 2x3: None), forced here both ways."""
    import nextx.model as nm

    torch.manual_seed(5)
    m = perturb_zero_init(NextX(tiny_cfg(), vocab_size=V, latent_dim=C)).train()
    d1 = layout_document([[5, 6, 7], image(*grids[0], seed=1), [8, 9]], SP)
    d2 = layout_document([[15], image(*grids[1], seed=3)], SP)
    b = collate([pack_row([d1], 24, SP.pad), pack_row([d2], 24, SP.pad)])
    mask = dense_mask(b.doc, b.kind, b.split)
    found = []
    orig = nm.noise_runs
    monkeypatch.setattr(nm, "noise_runs", lambda ni: found.append(orig(ni)) or found[-1])
    _dummy_loss(run(m, b, mask), b).backward()
    assert found[-1] == (4 if grids[0] == grids[1] else None)
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    monkeypatch.setattr(nm, "noise_runs", lambda ni: None)
    _dummy_loss(run(m, b, mask), b).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


@torch.no_grad()
def test_trimmed_batch_gives_the_same_outputs(model):
    """sequence.trim_pads (data.trim_pads) changes nothing the model computes on the tokens it keeps."""
    from nextx.sequence import trim_pads

    b, mask = packed_batch()
    t = trim_pads(b)
    assert t.ids.shape[1] < b.ids.shape[1]
    full, cut = run(model, b, mask), run(model, t, dense_mask(t.doc, t.kind, t.split))
    L = t.ids.shape[1]
    real = t.kind != PAD
    torch.testing.assert_close(cut.latent_out[real], full.latent_out[:, :L][real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cut.text_logits[real], full.text_logits[:, :L][real], rtol=1e-5, atol=1e-6)


def test_text_cond_pooled_adds_the_mean_caption_embedding():
    """text_cond=pooled: each image's time embedding gains MLP_text(unit-rms mean input embedding of the TEXT tokens
    of its document before it); from doc (training) or an explicit ctx (the sampler) alike; text logits unchanged."""
    torch.manual_seed(0)
    m = perturb_zero_init(NextX(tiny_cfg(text_cond="pooled"), vocab_size=V, latent_dim=C)).eval()
    b, mask = packed_batch()
    n = b.n_images
    t, s = torch.linspace(0.2, 0.9, n), torch.linspace(0.2, 0.9, n) * 0.5
    # by hand: image 0 follows <bos> 5 6 7 <boi>; image 1 (image->caption) <bos> <boi>; image 2 <bos> 15 <boi>
    texts = [[SP.bos, 5, 6, 7, SP.boi], [SP.bos, SP.boi], [SP.bos, 15, SP.boi]]
    with torch.no_grad():
        e = m.time_mlp(time_features(1000 * t.double(), 16)) + m.gap_mlp(time_features(1000 * (t - s).double(), 16))
        pooled = torch.stack([m.embed_tokens(torch.tensor(x)).mean(0) for x in texts])
        pooled = pooled / pooled.pow(2).mean(-1, keepdim=True).sqrt()
        want = F.silu(e + m.text_mlp(pooled))
        ctx = torch.tensor([x + [-1] * (5 - len(x)) for x in texts])
        assert torch.allclose(m._time(t, s, ctx), want, atol=1e-6)
        a = m(ModelInput.of(b, b.latents, t, s, mask))
        c = m(ModelInput(b.ids, b.kind, b.pos, b.pos2d, b.latents, b.img, t, s, mask, ctx=ctx))
    assert torch.allclose(a.latent_out, c.latent_out, atol=1e-6)
    with torch.no_grad():
        other = m(ModelInput(b.ids, b.kind, b.pos, b.pos2d, b.latents, b.img, t, s, mask, ctx=ctx.flip(0)))
    noise = b.kind == NOISE
    assert float((other.latent_out[noise] - a.latent_out[noise]).abs().max()) > 1e-4
    assert torch.allclose(other.text_logits[~noise], a.text_logits[~noise], atol=1e-6)  # only noise is modulated
    with pytest.raises(ValueError, match="text_cond=pooled needs"):
        m(ModelInput(b.ids, b.kind, b.pos, b.pos2d, b.latents, b.img, t, s, mask))
    with pytest.raises(ValueError, match="ctx has 2 rows"):
        m(ModelInput(b.ids, b.kind, b.pos, b.pos2d, b.latents, b.img, t, s, mask, ctx=ctx[:2]))


# ---- KV cache


def _sub(b, idx, t, s, mask) -> ModelInput:
    """The model input of the tokens idx of a one-row batch (for cache tests)."""
    return ModelInput(b.ids[:, idx], b.kind[:, idx], b.pos[:, idx], b.pos2d[:, idx], b.latents[:, idx], b.img[:, idx],
                      t, s, mask)


@pytest.mark.parametrize("pos2d", ["rope", "sincos", "rope+sincos"])
def test_kv_cache_matches_full_forward(pos2d):
    torch.manual_seed(3)
    m = perturb_zero_init(NextX(tiny_cfg(pos2d=pos2d), vocab_size=V, latent_dim=C)).eval()
    d = layout_document([[5, 6, 7], image(2, 2, seed=4), [8, 9, 10]], SP, drop_trailing_clean=False)
    b = collate([pack_row([d], len(d), SP.pad)])
    mask = dense_mask(b.doc, b.kind, b.split)
    t, s = torch.tensor([0.7]), torch.tensor([0.3])
    kind = b.kind[0]
    L = len(d)
    boi = int((kind == NOISE).nonzero()[0]) - 1
    pre = torch.arange(boi + 1)
    noi = (kind == NOISE).nonzero().squeeze(1)
    rest = torch.arange(int(noi[-1]) + 1, L)
    with torch.no_grad():
        full = m(_sub(b, torch.arange(L), t, s, mask))
        p = m(_sub(b, pre, t, s, mask[:, :, pre][:, :, :, pre]), use_cache=True)
        assert len(p.past) == 2 and p.past[0][0].shape == (1, 2, len(pre), 8)
        # refinement: the noise split reads the cache, does not append
        keys = torch.cat([pre, noi])
        z = m(_sub(b, noi, t, s, mask[:, :, noi][:, :, :, keys]), past=p.past)
        assert z.past is None
        # then the clean split and the text after it, appended, in two calls (one block, then token by token)
        cut = int(rest[0]) + 4                                              # after the clean split
        a_idx, keys = rest[rest < cut], torch.cat([pre, rest[rest < cut]])
        a = m(_sub(b, a_idx, t, s, mask[:, :, a_idx][:, :, :, keys]), past=p.past, use_cache=True)
        past, outs = a.past, [a]
        for q in rest[rest >= cut].tolist():
            keys = torch.cat([keys, torch.tensor([q])])
            o = m(_sub(b, torch.tensor([q]), t, s, mask[:, :, [q]][:, :, :, keys]), past=past, use_cache=True)
            past, outs = o.past, outs + [o]
    assert past[0][0].shape[2] == len(pre) + len(rest)
    err = max(float((full.text_logits[:, pre] - p.text_logits).abs().max()),
              float((full.latent_out[:, noi] - z.latent_out).abs().max()),
              float((full.text_logits[:, rest] - torch.cat([o.text_logits for o in outs], 1)).abs().max()),
              float((full.latent_out[:, rest] - torch.cat([o.latent_out for o in outs], 1)).abs().max()))
    assert err < 1e-5, err
    with pytest.raises(ValueError, match="mask must be"):
        m(_sub(b, noi, t, s, mask[:, :, noi][:, :, :, noi]), past=p.past)


# ---- training-time features


def _dummy_loss(out: ModelOutput, b) -> torch.Tensor:
    tm = b.targets != IGNORE
    ce = torch.nn.functional.cross_entropy(out.text_logits[tm].float(), b.targets[tm])
    noise = b.kind == NOISE
    return ce + (out.latent_out[noise].float() - 0.3).pow(2).mean()


def test_activation_checkpointing_same_grads():
    torch.manual_seed(4)
    a = perturb_zero_init(NextX(tiny_cfg(), vocab_size=V, latent_dim=C)).train()
    c = NextX(tiny_cfg(activation_checkpointing=True), vocab_size=V, latent_dim=C).train()
    c.load_state_dict(a.state_dict())
    b, mask = packed_batch()
    for m in (a, c):
        _dummy_loss(run(m, b, mask), b).backward()
    for (n, pa), pc in zip(a.named_parameters(), c.parameters()):
        assert pa.grad is not None, n
        torch.testing.assert_close(pa.grad, pc.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_autocast_forward_and_backward():
    torch.manual_seed(5)
    m = perturb_zero_init(NextX(tiny_cfg(), vocab_size=V, latent_dim=C)).train()
    b, mask = packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(m, b, mask)
        loss = _dummy_loss(out, b)
    assert out.text_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.text_logits.float()).all() and torch.isfinite(out.latent_out.float()).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.layers[0].ada.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_of_bf16_on_cpu_is_the_fp32_attention_rounded(gqa):
    """Under autocast on CPU the attention itself runs in fp32 (speed: its bf16 backward is slow there): values and
    input gradients are fp32 SDPA's of the same bf16 inputs, rounded to bf16 once; outputs keep bf16."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(2, 2 if gqa else 4, 7, 8, generator=g).bfloat16().requires_grad_() for _ in range(2))
    mask = torch.rand(2, 1, 7, 7, generator=g) < 0.7
    mask[..., 0] = True                                                       # every query sees a key
    w = torch.randn(2, 4, 7, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdpa(q, k, v, mask, gqa)
    (y.float() * w).sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    y32 = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, enable_gqa=gqa)
    (y32.bfloat16().float() * w).sum().backward()
    assert y.dtype == torch.bfloat16 and torch.equal(y, y32.bfloat16())
    for a, b in ((q, q32), (k, k32), (v, v32)):
        assert a.grad.dtype == torch.bfloat16 and torch.equal(a.grad, b.grad.bfloat16())


@pytest.mark.parametrize("pos2d", ["rope", "sincos", "rope+sincos", "none"])
def test_pos2d_variants(pos2d):
    torch.manual_seed(6)
    m = perturb_zero_init(NextX(tiny_cfg(pos2d=pos2d), vocab_size=V, latent_dim=C)).eval()
    ref = NextX(tiny_cfg(pos2d="none"), vocab_size=V, latent_dim=C).eval()
    ref.load_state_dict(m.state_dict())
    b, mask = packed_batch()
    with torch.no_grad():
        out = run(m, b, mask)
        assert torch.isfinite(out.latent_out).all()
        ids = torch.randint(0, V, (2, 10))
        # text-only input: every variant is plain 1D RoPE
        torch.testing.assert_close(m.text_logits(ids), ref.text_logits(ids), rtol=0, atol=0)
        # inside an image: swapping two clean tokens' (row, col) changes outputs iff there is a 2D position
        pos2d_t = b.pos2d.clone()
        clean = (b.kind[0] == CLEAN).nonzero().squeeze(1)
        pos2d_t[0, clean[0]], pos2d_t[0, clean[-1]] = b.pos2d[0, clean[-1]], b.pos2d[0, clean[0]]
        t, s = torch.full((b.n_images,), 0.5), torch.full((b.n_images,), 0.2)
        moved = m(ModelInput(b.ids, b.kind, b.pos, pos2d_t, b.latents, b.img, t, s, mask))
        base = m(ModelInput.of(b, b.latents, t, s, mask))
    changed = float((moved.text_logits - base.text_logits).abs().max()) > 1e-6
    assert changed == (pos2d != "none")


def test_image_splits_by_hand():
    # row 0: T [2x2 split] T [1x2 split]; row 1: [1x2 split] T T T T T
    kind = torch.tensor([[TEXT, NOISE, NOISE, NOISE, NOISE, TEXT, CLEAN, CLEAN],
                         [CLEAN, CLEAN, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT]])
    rc = torch.zeros(2, 8, 2, dtype=torch.long)
    rc[0, 1:5] = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    rc[0, 6:8] = torch.tensor([[0, 0], [0, 1]])
    rc[1, 0:2] = torch.tensor([[0, 0], [0, 1]])
    img = (kind == NOISE) | (kind == CLEAN)
    got = image_splits(img, rc)
    assert [(h, w) for _, h, w in got] == [(1, 2), (2, 2)]
    assert got[0][0].tolist() == [[6, 7], [8, 9]] and got[1][0].tolist() == [[1, 2, 3, 4]]
    assert [g[0].tolist() for g in image_splits(kind == NOISE, rc)] == [[[1, 2, 3, 4]]]
    with pytest.raises(ValueError, match="whole splits"):
        image_splits(img[:, :4], rc[:, :4])                                  # a 2x2 split cut after 3 tokens
    assert image_splits(kind == PAD, rc) == []


def test_latent_conv_sees_neighbours_and_only_its_split():
    """latent_conv=3, attention and MLP outputs zeroed: a noise token's output depends on the inputs within 2 cells
    (3x3 conv in, 3x3 conv out) of its own image only."""
    torch.manual_seed(0)
    m = perturb_zero_init(NextX(tiny_cfg(latent_conv=3, pos2d="none"), vocab_size=V, latent_dim=C)).eval()
    d1 = layout_document([[5, 6], image(3, 4, seed=1)], SP)
    d2 = layout_document([[7], image(3, 4, seed=2)], SP)
    b = collate([pack_row([d1, d2], 40, SP.pad)])
    mask = dense_mask(b.doc, b.kind, b.split)
    with torch.no_grad():
        for blk in m.layers:
            blk.self_attn.o_proj.weight.zero_(), blk.mlp.down_proj.weight.zero_()
        base = run(m, b, mask).latent_out[0]
        i = int((b.kind[0] == NOISE).nonzero()[0])                           # first image, cell (0, 0)
        lat = b.latents.clone()
        lat[0, i] += 1.0
        moved = run(m, b, mask, latents=lat).latent_out[0]
    changed = ((moved - base).abs().sum(-1) > 0).nonzero().squeeze(1).tolist()
    cells = [tuple(b.pos2d[0, j].tolist()) for j in changed]
    assert i in changed and all(j - i < 12 for j in changed)                 # its own image only
    assert (0, 2) in cells and (2, 2) in cells and (0, 3) not in cells and (2, 3) not in cells


def test_pixel_unet_shapes_and_zero_start():
    """The U-Net around the tokens: token features on the patch grid (row-major), a skip at each resolution, a
    decoder that starts at zero (the model starts as its plain self at the output)."""
    u = PixelUNet(3, 4, 4, 16)
    tok, skips = u.encode(torch.randn(2, 3, 16, 8))
    assert tok.shape == (2, 8, 16) and [tuple(s.shape[1:]) for s in skips] == [(4, 16, 8), (8, 8, 4), (16, 4, 2)]
    assert torch.equal(u.decode(tok, skips, (4, 2)), torch.zeros(2, 3, 16, 8))
    with pytest.raises(ValueError, match="power-of-two"):
        PixelUNet(3, 4, 3, 16)


def test_pixel_unet_each_noise_split_from_its_own_pixels():
    """pixel_unet on 2x2-pixel tokens of 3 channels (latent_dim 12): a document's noise outputs are the same alone
    in a row or packed after another one (the split bookkeeping); with attention and MLP outputs zeroed, a pixel of
    one image moves the noise outputs of that image only, and a clean split's pixels never reach a noise output."""
    torch.manual_seed(0)

    def img(h, w, seed):
        return ImageTokens(np.random.default_rng(seed).normal(0, 0.5, (h * w, 12)).astype(np.float32), (h, w), True)

    m = perturb_zero_init(NextX(tiny_cfg(pixel_unet=4, pos2d="rope+sincos"), vocab_size=V, latent_dim=12,
                                latent_patch=2)).eval()
    with torch.no_grad():
        nn_init = torch.Generator().manual_seed(1)
        m.unet.out.weight.copy_(torch.randn(m.unet.out.weight.shape, generator=nn_init) * 0.1)
    d1 = layout_document([[5, 6], img(2, 3, 1), [8, 9]], SP)                 # clean copy kept (text after it)
    d2 = layout_document([[7], img(3, 2, 2)], SP)
    alone, packed = collate([pack_row([d2], 40, SP.pad)]), collate([pack_row([d1, d2], 40, SP.pad)])
    with torch.no_grad():
        a = run(m, alone, dense_mask(alone.doc, alone.kind, alone.split), t=torch.tensor([0.7]),
                s=torch.tensor([0.3])).latent_out[0]
        p = run(m, packed, dense_mask(packed.doc, packed.kind, packed.split), t=torch.tensor([0.5, 0.7]),
                s=torch.tensor([0.2, 0.3])).latent_out[0]
        na, np_ = alone.kind[0] == NOISE, packed.kind[0] == NOISE
        two = np_.nonzero().squeeze(1)[6:]                                    # d2's noise tokens in the packed row
        torch.testing.assert_close(p[two], a[na], atol=1e-5, rtol=1e-5)
        assert a[na].abs().min() > 0
        for blk in m.layers:
            blk.self_attn.o_proj.weight.zero_(), blk.mlp.down_proj.weight.zero_()
        mask = dense_mask(packed.doc, packed.kind, packed.split)
        base = run(m, packed, mask).latent_out[0]
        for j, own in ((int(np_.nonzero()[0]), np_.nonzero().squeeze(1)[:6]),
                       (int((packed.kind[0] == CLEAN).nonzero()[0]), None)):
            lat = packed.latents.clone()
            lat[0, j, 5] += 1.0                                               # one pixel of one token
            moved = ((run(m, packed, mask, latents=lat).latent_out[0] - base).abs().sum(-1) > 0) & np_
            assert set(moved.nonzero().squeeze(1).tolist()) == (set(own.tolist()) if own is not None else set())
    with pytest.raises(ValueError, match="whole number"):
        NextX(tiny_cfg(pixel_unet=4), vocab_size=V, latent_dim=C, latent_patch=2)


def test_block_conv_widens_the_neighbourhood_and_starts_as_identity():
    """block_conv=3 in 2 layers, attention/MLP outputs zeroed: the input at (0, 0) reaches 2 + 2 = 4 cells; at
    init the block convolutions are zero, so the model equals one without them."""
    torch.manual_seed(0)
    fresh = NextX(tiny_cfg(latent_conv=3, block_conv=3, pos2d="none"), vocab_size=V, latent_dim=C).eval()
    plain = NextX(tiny_cfg(latent_conv=3, pos2d="none"), vocab_size=V, latent_dim=C).eval()
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if ".local." not in k})
    d1 = layout_document([[5, 6], image(2, 6, seed=1)], SP)
    b = collate([pack_row([d1], 24, SP.pad)])
    mask = dense_mask(b.doc, b.kind, b.split)
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, b, mask).latent_out, run(plain, b, mask).latent_out)
        m = perturb_zero_init(fresh)
        for blk in m.layers:
            blk.self_attn.o_proj.weight.zero_(), blk.mlp.down_proj.weight.zero_()
        base = run(m, b, mask).latent_out[0]
        i = int((b.kind[0] == NOISE).nonzero()[0])
        lat = b.latents.clone()
        lat[0, i] += 1.0
        moved = run(m, b, mask, latents=lat).latent_out[0]
    cols = {int(b.pos2d[0, j, 1]) for j in ((moved - base).abs().sum(-1) > 0).nonzero().squeeze(1).tolist()}
    assert cols == {0, 1, 2, 3, 4}                                            # 1 (in) + 1 + 1 (blocks) + 1 (out)


def test_rope_sections():
    sec = rope_section(16)
    assert (sec == 0).sum() == 8 and (sec == 1).sum() == 4 and (sec == 2).sum() == 4


def test_rope2d_own_frequencies():
    """head_dim 32: pairs 1, 5, 9, 13 (row) and 3, 7, 11, 15 (col) turn at 1, 1/2, 1/4, 1/8; the temporal pairs
    keep 1e4^(-i/16); 'shared' is the 1D ladder itself."""
    sec, inv = rope_section(16), rope_inv_freq(32, 1e4)
    own = rope2d_inv_freq(inv, sec, own=True)
    for axis_pairs in ([1, 5, 9, 13], [3, 7, 11, 15]):
        assert own[axis_pairs].tolist() == [1.0, 0.5, 0.25, 0.125]
    temporal = [0, 2, 4, 6, 8, 10, 12, 14]
    torch.testing.assert_close(own[temporal], torch.tensor([1e4 ** (-i / 16) for i in temporal]), rtol=1e-6, atol=0)
    assert torch.equal(rope2d_inv_freq(inv, sec, own=False), inv)


@pytest.mark.parametrize("freqs", ["own", "shared"])
def test_rope2d_angle_of_one_cell(freqs):
    """An image token at (row 1, col 0), pos 3: row pair 1 turns by 3 w_1 + 1 * f_1 (f_1 = 1 own, w_1 shared)."""
    m = NextX(tiny_cfg(pos2d="rope", rope2d_freqs=freqs), vocab_size=V, latent_dim=C)
    pos, kind = torch.tensor([[3]]), torch.tensor([[CLEAN]], dtype=torch.int8)
    cos, _ = m._rope(pos, torch.tensor([[[1, 0]]]), kind)                # (1, 1, 1, hd)
    w1 = 1e4 ** (-2 / m.cfg.head_dim)                                     # pair 1 of the 1D ladder
    want = 3 * w1 + (1.0 if freqs == "own" else w1)
    assert cos[0, 0, 0, 1].item() == pytest.approx(math.cos(want), abs=1e-6)
    assert cos[0, 0, 0, 3].item() == pytest.approx(math.cos(3 * 1e4 ** (-6 / m.cfg.head_dim)), abs=1e-6)  # col 0


def test_gradient_step_reduces_loss():
    torch.manual_seed(7)
    m = NextX(tiny_cfg(), vocab_size=V, latent_dim=C).train()
    b, mask = packed_batch()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = _dummy_loss(run(m, b, mask), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses


@torch.no_grad()
def test_helpers_and_init():
    cfg = tiny_cfg(ffn_hidden=0, n_layers=3)
    m = NextX(cfg, vocab_size=V, latent_dim=C)
    assert m.layers[0].mlp.gate_proj.out_features == 128       # 8/3 * 32 = 85 -> 128 (multiple of 64)
    n, n_emb = m.num_params(), m.num_params(exclude_embeddings=True)
    assert n - n_emb == V * 32
    assert m.flops_per_token(64) == 6 * n_emb + 12 * 3 * 32 * 64
    o_std = float(torch.cat([blk.self_attn.o_proj.weight.flatten() for blk in m.layers]).std())
    assert abs(o_std - 0.02 / 6 ** 0.5) < 0.002
    tied = NextX(tiny_cfg(tie_embeddings=True), vocab_size=V, latent_dim=C)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.num_params(exclude_embeddings=True) == tied.num_params()
    with pytest.raises(ValueError, match="vocab_size"):
        NextX(tiny_cfg(vocab_size=10), vocab_size=V, latent_dim=C)
    copy.deepcopy(m)  # plain module: deep-copyable (EMA)


def _flex_vs_sdpa(device, **kw):
    torch.manual_seed(8)
    a = perturb_zero_init(NextX(tiny_cfg(**kw), vocab_size=V, latent_dim=C)).to(device)
    f = NextX(tiny_cfg(attention="flex", **kw), vocab_size=V, latent_dim=C).to(device)
    f.load_state_dict(a.state_dict())
    b, mask = packed_batch()
    b = b.to(device)
    outs = [run(a, b, mask.to(device)), run(f, b, block_mask(b.doc, b.kind, b.split))]
    return outs, b, (a, f)


@pytest.mark.slow  # one torch.compile of flex_attention on CPU: ~20 s on 2 cores
def test_flex_backend_matches_sdpa_cpu():
    with torch.no_grad():
        (ref, out), _, _ = _flex_vs_sdpa("cpu")
    assert float((ref.latent_out - out.latent_out).abs().max()) < 1e-5
    assert float((ref.text_logits - out.text_logits).abs().max()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_backend_matches_sdpa_gpu_with_grads():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        outs, b, models = _flex_vs_sdpa("cuda", d_model=64)        # head_dim 16: the least Triton's matmul takes
        for o, m in zip(outs, models):
            _dummy_loss(o, b).backward()
        assert float((outs[0].latent_out - outs[1].latent_out).abs().max()) < 1e-4
        for (n, pa), pf in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(pa.grad, pf.grad, rtol=1e-3, atol=1e-5, msg=n)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def test_flex_head_dim_below_16_on_cuda_is_refused_by_name():
    """Found on the first GPU run: compiled flex with head_dim 8 fails inside inductor on CUDA. It is now one clear
    message before the kernel (the CPU path runs any head_dim)."""
    from nextx.masks import check_flex_head_dim

    with pytest.raises(ValueError, match="needs head_dim >= 16 .* got 8"):
        check_flex_head_dim(8, "cuda")
    check_flex_head_dim(16, "cuda")
    check_flex_head_dim(8, "cpu")


@pytest.mark.skipif(bool(xformers_available()), reason="xformers is available here")
def test_xformers_backend_fails_clearly():
    with pytest.raises(RuntimeError, match="xformers"):
        NextX(tiny_cfg(attention="xformers"), vocab_size=V, latent_dim=C)


@pytest.mark.parametrize("kw", [{}, {"latent_conv": 3, "block_conv": 3}, {"text_cond": "pooled"}, {"pixel_unet": 4}])
def test_uniform_graph_reaches_every_parameter_without_images(kw):
    """With several ranks every module must run on every micro-batch (engine._DSNet): with uniform_graph a text-only
    batch gives every parameter a gradient (zeros for the image path), and the outputs do not change."""
    torch.manual_seed(0)
    m = perturb_zero_init(NextX(tiny_cfg(**kw), vocab_size=V, latent_dim=C))
    b = collate([pack_row([layout_document([[5, 6, 7, 8]], SP)], 12, SP.pad)])
    mask = dense_mask(b.doc, b.kind, b.split)

    def grads(uniform):
        m.uniform_graph = uniform
        m.zero_grad(set_to_none=True)
        out = run(m, b, mask, latents=torch.zeros(*b.ids.shape, C))
        (out.text_logits.sum() + out.latent_out.sum()).backward()
        return out, {n: p.grad for n, p in m.named_parameters()}

    plain, g0 = grads(False)
    uni, g1 = grads(True)
    assert any(g is None for g in g0.values())                                  # the image path is not in the graph
    assert all(g is not None for g in g1.values())                              # ... now it is
    image_only = [n for n, g in g0.items() if g is None]
    assert all(float(g1[n].abs().max()) == 0.0 for n in image_only)             # with zero gradients
    assert torch.equal(plain.text_logits, uni.text_logits) and torch.equal(plain.latent_out, uni.latent_out)
    assert all(blk.uniform for blk in m.layers)
    m.uniform_graph = False


def test_uniform_graph_runs_the_pixel_unet_decoder_without_noise_splits():
    """An image -> caption batch has clean splits only: with uniform_graph the U-Net's decoder still runs (on
    nothing), so every parameter gets a gradient; the outputs do not change."""
    torch.manual_seed(0)
    m = perturb_zero_init(NextX(tiny_cfg(pixel_unet=4), vocab_size=V, latent_dim=C))
    b = collate([pack_row([layout_document([image(2, 2, generate=False), [5, 6, 7]], SP)], 16, SP.pad)])
    assert bool((b.kind == CLEAN).any()) and not bool((b.kind == NOISE).any())
    mask = dense_mask(b.doc, b.kind, b.split)
    outs = []
    for uniform in (False, True):
        m.uniform_graph = uniform
        m.zero_grad(set_to_none=True)
        out = run(m, b, mask)
        (out.text_logits.sum() + out.latent_out.sum()).backward()
        outs.append(out)
        got = {n for n, p in m.named_parameters() if p.grad is not None}
        assert any(n.startswith("unet.dec") for n in got) == uniform
    assert all(p.grad is not None for p in m.parameters())
    assert torch.equal(outs[0].text_logits, outs[1].text_logits)
    m.uniform_graph = False
