"""NextX: one decoder-only transformer for the next text token and the next image (docs/design.md §3-4).

    out = model(ModelInput(ids, kind, pos, pos2d, latents, img, t, s, mask))   # -> ModelOutput(text_logits, latent_out, past)
    out = model(ModelInput.of(batch, latents, t, s, mask))                      # the same from a packed Batch

Legend: B rows, L tokens (Lq this call's queries, Lk keys incl. the cache), D = d_model, H query heads, Hkv key/value
heads, hd = D / H, C latent channels, V vocabulary, n_img images of the batch, P = hd / 2 rotary frequency pairs.

Inputs. TEXT/PAD tokens embed their id (one table); CLEAN and NOISE tokens embed their latent through one linear map
C -> D (x on CLEAN, x_t on NOISE), plus a fixed 2D sin-cos table of (row, col) when `pos2d == "sincos"`. The latents
of other tokens are zeroed first, so whatever the caller leaves there (even NaN) cannot leak into values or grads.

Blocks are Llama blocks (pre-RMSNorm in fp32, GQA attention without biases, rotate-half RoPE, SwiGLU), so a local
Hugging Face Llama checkpoint loads without any permutation (`nextx.pretrained.load_hf_llama`) and text logits match `transformers`.

Time (docs/imm.md §3: the network is conditioned on c_noise(t) = 1000 t and on 1000 (t - s)). Per image, in fp32 with autocast
off: sinusoidal features (time_freq_dim, max period 1e4, computed in fp64) of each, each into its own
Linear-SiLU-Linear MLP, summed -> e (n_img, D). With `text_cond: pooled` a third MLP adds the mean input embedding of
the image's text (`sequence.image_text_context`: the TEXT tokens of its document before it, i.e. its caption and
the layout specials), normalised to unit rms, so the caption reaches every noise token through the modulation from the first step, before
attention has learned to fetch it (DiT's class-label path, with a bag of caption tokens as the label). Every block turns SiLU(e) into (shift, scale, gate) x {attn, mlp}
with one zero-initialised Linear, computed per IMAGE and spread to the NOISE tokens only (`spread`):

    h = norm(x) * (1 + scale) + shift;   x = x + (1 + gate) * attn(h)        (same for the MLP)

Every other token gets no modulation at all (the rows are never touched: `_modulate` index-copies the NOISE rows),
so TEXT/CLEAN tokens run exactly a Llama block, and at init (zero modulation) so do NOISE tokens. A final
(shift, scale) modulation, also zero-initialised, precedes the latent head. Only the NOISE rows are gathered and
multiplied, so the conditioning costs O(n_noise * D) memory per block, not O(B * L * D).

Positions (docs/design.md §3). `pos` is the 1D RoPE position of every token (an image's noise and clean copies
share one slot). `pos2d`:
  * "rope"   multimodal RoPE. The P frequency pairs are split into three sections, interleaved with period 4:
             pair i belongs to row if i % 4 == 1, col if i % 4 == 3, else to the 1D (temporal) section — half/
             quarter/quarter. Interleaving (as in Qwen3-VL's MRoPE, instead of Qwen2-VL's contiguous chunks) gives
             each axis both high and low frequencies, so small in-image offsets still rotate visibly. A text token
             uses `pos` in every section (text-only RoPE IS standard 1D RoPE: HF parity); an image token uses pos
             (temporal), pos + row (row pairs) and pos + col (col pairs). With `rope2d_freqs: own` (default)
             the row and col offsets turn at their own ladder 2^-j (j-th pair of each axis), the same on both
             axes; `shared` turns them at the 1D ladder's frequencies of those pairs (columns ~3x coarser than
             rows, about one useful pair per axis over an 8x8 grid at head_dim 32).
  * "sincos" a fixed 2D sin-cos table of (row, col) (D/2 channels each, MAE/DiT-style), scaled by init_std so it is
             on the scale of the latent and token embeddings at init, added to the latent embedding
             (`sincos_scale` sets another amplitude, e.g. 1.0 as in DiT).
  * "rope+sincos"  both: relative row/col rotations and an absolute (row, col) signal on the latent embedding.
  * "none"   no 2D position.

Latent convolutions (`latent_conv: 3`). The latent embedding and the latent head may be k x k convolutions over each
image split's token grid (`image_splits` finds the splits from pos2d: each starts at (0, 0) and runs row-major),
instead of linear maps per token. Then every image token's input and output see its neighbours from the first step,
before attention has learned any locality (small models on short budgets draw scattered patches otherwise: README).
`block_conv: k` adds, in every block after attention, a zero-initialised depthwise k x k convolution over the same
grids (residual), so locality grows through the depth without waiting for attention. `pixel_unet: W` adds a
pixel-level U-Net (`PixelUNet`) around the tokens: every split's latents unfolded to pixels (`latent_patch` p per
token side), encoded down to the token grid (added to the latent embedding); the noise splits' final states decoded
back up with the encoder's activations as skips (added to the latent head's output). A split is always run whole
(training rows, the sampler's noise and clean chunks), so the result never depends on how a sequence is cut into
calls.

Heads. Final RMSNorm; LM head D -> V (`text_mask` selects the rows: logits (n_sel, V) flattened in row-major
order, matching `targets[text_mask]`); latent head D -> C, zero-initialised, whose output is the raw G of the
Euler-FM parameterisation (the objective forms f = x_t - (t - s) sigma_d G).

KV cache. `past` is a list with one (k, v) per layer, each (B, Hkv, L_past, hd), keys after RoPE. With
`use_cache=True` the output's `past` is past + this call's keys/values (concatenated on the length axis); with
`use_cache=False` it is None and the caller's list is untouched, which is how IMM refinement steps read the
prefix without appending the noise split (then the clean split is run once with use_cache=True). The mask
always covers all keys: (B, 1, Lq, L_past + Lq) for sdpa, a BlockMask of KV_LEN L_past + Lq for flex.

Init. Linear and embedding weights ~ N(0, init_std); the output projections of attention (o_proj) and MLP
(down_proj) ~ N(0, init_std / sqrt(2 n_layers)) (GPT-2: each block adds two residual branches, so the residual
variance stays O(1) in depth); RMSNorm weights 1; the modulation Linears and the latent head zero; biases zero.
The RoPE inverse frequencies are a persistent fp32 buffer (`rope_inv_freq`), so a checkpoint keeps a loaded
Llama-3 frequency scaling even when the model is rebuilt from the plain ModelConfig.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nextx.config import ModelConfig
from nextx.latents import patchify, unpatchify
from nextx.masks import block_mask, check_flex_head_dim, dense_mask, flex_attention_compiled, require_xformers
from nextx.positions import apply_rope, rope2d_inv_freq, rope_cos_sin, rope_inv_freq, rope_section, sincos_2d
from nextx.sequence import CLEAN, NOISE, TEXT, gather_context, image_text_context

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelInput:
    """One forward's inputs. ids, kind, pos, img (B, L) int; pos2d (B, L, 2) int; latents (B, L, C) float (x on CLEAN,
    x_t on NOISE; ignored elsewhere); t, s (n_img,) float, the times of each image (indexed by img); mask
    (B, 1, L, L_past + L) bool for sdpa/xformers, a BlockMask for flex. With `text_cond: pooled` the model
    needs each image's text: ctx (n_img, Lc) int64 token ids, -1 padded (the sampler's, whose text is in the cache),
    or doc (B, L) int, from which it finds the text in this call (`sequence.image_text_context`)."""

    ids: torch.Tensor
    kind: torch.Tensor
    pos: torch.Tensor
    pos2d: torch.Tensor
    latents: torch.Tensor
    img: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    mask: object
    doc: torch.Tensor | None = None
    ctx: torch.Tensor | None = None

    @classmethod
    def of(cls, batch, latents: torch.Tensor, t: torch.Tensor, s: torch.Tensor, mask) -> "ModelInput":
        """From a packed `sequence.Batch` (its layout fields) with the given latents, times and mask."""
        return cls(batch.ids, batch.kind, batch.pos, batch.pos2d, latents, batch.img, t, s, mask, doc=batch.doc)


@dataclass
class ModelOutput:
    """text_logits (B, L, V), or (n_sel, V) when a text_mask was given; latent_out (B, L, C) (raw G, meaningful on
    NOISE tokens); past: the per-layer (k, v) list after this call when use_cache=True, else None."""

    text_logits: torch.Tensor
    latent_out: torch.Tensor
    past: list[KV] | None = None


def ffn_width(cfg: ModelConfig) -> int:
    """SwiGLU hidden width: cfg.ffn_hidden, or the Llama rule 8/3 D rounded up to a multiple of ffn_multiple."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    m = cfg.ffn_multiple
    return m * math.ceil(int(8 * cfg.d_model / 3) / m)


# --------------------------------------------------------------------------------------------------------
# Small pieces


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 and returned in x's dtype (as Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def image_splits(sel: torch.Tensor, pos2d: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
    """Selected image tokens -> whole splits grouped by grid size: [(idx (n, h*w) flat token indices, h, w), ...].

    sel (B, L) bool (e.g. kind == NOISE), pos2d (B, L, 2). Every split lists its tokens contiguously in row-major
    grid order (sequence.py, generate.py), so a split starts at each selected token with (row, col) = (0, 0) and
    its last token is (h - 1, w - 1). E.g. sel = [T, T, T, T, F, T, T] with (r, c) = 00 01 10 11 . 00 01 is two
    splits of grids 2x2 (flat 0-3) and 1x2 (5-6). Raises ValueError for a split that is not whole."""
    B, L = sel.shape
    ii = sel.reshape(-1).nonzero().squeeze(1)                                   # (n_tok,) flat indices
    if ii.numel() == 0:
        return []
    rc = pos2d.reshape(-1, 2)[ii].long()                                        # (n_tok, 2)
    start = (rc == 0).all(-1)
    start[0] = True
    starts = start.nonzero().squeeze(1)                                         # (n_split,) into ii
    ends = torch.cat([starts[1:], starts.new_tensor([len(ii)])]) - 1
    h, w = rc[ends, 0] + 1, rc[ends, 1] + 1
    if not bool(((ends - starts + 1) == h * w).all()) or bool((ii[ends] // L != ii[starts] // L).any()):
        raise ValueError("image tokens must come in whole splits in row-major grid order (a split was cut)")
    out = []
    for hh, ww in sorted(set(zip(h.tolist(), w.tolist()))):
        first = starts[(h == hh) & (w == ww)]                                   # (n,) into ii
        out.append((ii[first[:, None] + torch.arange(hh * ww, device=ii.device)], hh, ww))
    return out


def grid_conv(conv: nn.Conv2d, x: torch.Tensor, splits: list[tuple[torch.Tensor, int, int]],
              n_out: int, uniform: bool = False) -> torch.Tensor:
    """conv over each split's token grid: x (n_all, C_in) flat tokens -> (n_all, C_out), zero off the splits.
    uniform: without any split, still run the conv (on an empty batch), so the module is in the graph."""
    out = x.new_zeros(n_out, conv.out_channels)
    if uniform and not splits:
        y = conv(x[:0].view(0, x.shape[-1], 1, 1))                               # (0, C_out, 1, 1)
        return out + (y.sum() * 0.0).to(out.dtype)
    for idx, h, w in splits:
        g = x[idx].view(len(idx), h, w, -1).permute(0, 3, 1, 2)                # (n, C_in, h, w)
        y = conv(g).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)          # (n h w, C_out)
        out = out.index_copy(0, idx.reshape(-1), y.to(out.dtype))
    return out


class _Res(nn.Module):
    """x + conv(gelu(conv(gelu(x)))), 3x3, channels kept."""

    def __init__(self, ch: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.b(F.gelu(self.a(F.gelu(x))))


class PixelUNet(nn.Module):
    """A pixel-level U-Net encoder/decoder around the transformer (`pixel_unet: W`; Transfusion's U-Net down/up
    blocks, shrunk). Patch p = 2^n: n strided 4x4 convolutions from pixels to the token grid, channels W, 2W, ...,
    W 2^n, a residual 3x3 block at each resolution; the decoder mirrors it with transposed convolutions and adds the
    encoder's activation at each resolution (the skips).

    encode: pixels (n, c, h p, w p) -> token features (n, h w, D) row-major, skips [(n, W 2^i, h p / 2^i, ...)];
    decode: token features (n, h w, D) + the same image's skips -> pixels (n, c, h p, w p). PyTorch's default init;
    the output convolution starts at zero, so the model starts as without it."""

    def __init__(self, c: int, width: int, p: int, d: int):
        super().__init__()
        n = int(round(math.log2(p)))
        if 2 ** n != p:
            raise ValueError(f"pixel_unet needs a power-of-two patch, got {p}")
        ch = [width * 2 ** i for i in range(n + 1)]
        self.inp = nn.Conv2d(c, width, 3, padding=1)
        self.enc = nn.ModuleList(_Res(k) for k in ch)
        self.down = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1) for i in range(n))
        self.to_tok, self.from_tok = nn.Linear(ch[-1], d), nn.Linear(d, ch[-1])
        self.dec = nn.ModuleList(_Res(k) for k in ch)
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 4, stride=2, padding=1) for i in range(n))
        self.out = nn.Conv2d(width, c, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips, h = [], self.inp(img)
        for i, blk in enumerate(self.enc):
            h = blk(h)
            skips.append(h)
            if i < len(self.down):
                h = self.down[i](h)
        return self.to_tok(h.flatten(2).transpose(1, 2)), skips

    def decode(self, tok: torch.Tensor, skips: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        h = self.from_tok(tok).transpose(1, 2).reshape(tok.shape[0], self.from_tok.out_features, *grid)
        for i in reversed(range(len(self.dec))):
            h = self.dec[i](h + skips[i])
            if i:
                h = self.up[i - 1](h)
        return self.out(F.gelu(h))


def time_features(x: torch.Tensor, dim: int, max_period: float = 1e4) -> torch.Tensor:
    """(n,) values (already scaled, e.g. 1000 t) -> (n, dim) fp32 [cos(x w), sin(x w)], w_j = max_period^(-j/(dim/2)),
    computed in fp64 (1000 t reaches ~1e3 rad, where fp32 phases would be off by ~1e-4)."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=x.device) / half)
    a = x.double()[:, None] * w[None]
    return torch.cat([a.cos(), a.sin()], dim=-1).float()


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.SiLU(), nn.Linear(d, d))


def noise_runs(ni: torch.Tensor) -> int | None:
    """(n_noise,) the image of each NOISE token (in token order) -> run: the length of the first run of equal images,
    when every aligned block of `run` tokens belongs to one image (as in every training batch and sampling call of one
    image size: each image's noise split is contiguous), else None. One host sync. E.g. [0 0 2 2 5 5] -> 2;
    [2 2 0 0 2 2] -> 2; [0 2 0 2] -> 1; [0 0 2] -> None; [0 0 0 1] -> None; [] -> None."""
    n = ni.numel()
    if n == 0:
        return None
    change = ni[1:] != ni[:-1]                                             # (n - 1,)
    run = torch.where(change.any(), change.int().argmax() + 1, n)          # first run's length (a 0-d tensor)
    j = torch.arange(n, device=ni.device)
    ok = (n % run == 0) & (ni[j - j % run] == ni).all()                   # every block of `run` is one image
    run, ok = torch.stack([run, ok.long()]).tolist()
    return run if ok else None


def spread(v: torch.Tensor, ni: torch.Tensor, run: int | None) -> torch.Tensor:
    """(n_img, X) per-image rows -> (n_noise, X), row ni[j] for noise token j. With `run` (`noise_runs`) the row of
    each block's image is repeated run times by an expand, whose gradient is a sum over the block; a
    gather's gradient is a scatter-add into n_img rows, which compiled CPU kernels serialise (3 ms a block backward
    at the demo's dims; docs/drawing.md "nextx flow against the reference")."""
    if run is None:
        return v.index_select(0, ni)
    own = ni[::run]                                                       # (n / run,) the image of each block
    return v.index_select(0, own)[:, None].expand(-1, run, -1).reshape(-1, v.shape[-1])


class _ModulateRows(torch.autograd.Function):
    """flat (N, D) with rows nz (distinct) replaced by flat[nz] * (1 + scale) + shift, in fp32. Its own backward:
    autograd's would scatter-add the gradient of the gather into N rows (index_add, which compiled CPU kernels
    serialise); the rows are distinct, so a gather and a plain row copy give the same gradient."""

    @staticmethod
    def forward(ctx, flat, nz, scale, shift):
        sel = flat.index_select(0, nz)                                          # (n, D)
        y = sel.float() * (1 + scale)
        if shift is not None:
            y = y + shift
        ctx.save_for_backward(sel, nz, scale)
        return flat.index_copy(0, nz, y.to(flat.dtype))

    @staticmethod
    def backward(ctx, g):
        sel, nz, scale = ctx.saved_tensors
        need = ctx.needs_input_grad                                             # False for a None shift
        gs = g.index_select(0, nz).float()                                      # (n, D)
        g_flat = g.index_copy(0, nz, (gs * (1 + scale)).to(g.dtype)) if need[0] else None
        return g_flat, None, gs * sel.float() if need[2] else None, gs if need[3] else None


def _modulate(h: torch.Tensor, nz: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """Rows nz of h (B, L, D) (flat token indices of the NOISE tokens, distinct) -> h * (1 + scale) + shift (fp32
    math); every other row is returned untouched. shift, scale: (n_noise, D). Out of place (autograd-safe)."""
    return _ModulateRows.apply(h.reshape(-1, h.shape[-1]), nz, scale, shift).view_as(h)


# --------------------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.backend = cfg.attention
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)

    def forward(self, x, cos, sin, mask, past: KV | None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.hd).transpose(1, 2)   # (B, H, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)      # (B, Hkv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)                    # (B, Hkv, Lk, hd)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        gqa = self.n_heads != self.n_kv
        if self.backend == "flex":
            check_flex_head_dim(self.hd, q.device.type)
            y = flex_attention_compiled()(q, k, v, block_mask=mask, enable_gqa=gqa)
        elif self.backend == "xformers":
            y = _xformers_attention(q, k, v, mask)
        else:
            y = sdpa(q, k, v, mask, gqa)
        y = y.transpose(1, 2).reshape(B, L, self.n_heads * self.hd)           # (B, L, D)
        return self.o_proj(y), (k, v)


def sdpa(q, k, v, mask, gqa: bool) -> torch.Tensor:
    """torch SDPA (B, H, Lq, hd) -> (B, H, Lq, hd). On CPU, bf16 inputs (autocast) run in fp32 and come back in
    bf16: torch's CPU flash-attention backward is ~3x slower in bf16 than in fp32 at the demo's sizes (24 rows of
    74 tokens, head_dim 32: 31 against 10 ms a step, `bench/profile_step.py ... dist.precision=bf16`), while the
    matrix products around it are ~3.4x faster in bf16."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=gqa)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _xformers_attention(q, k, v, mask):
    """xformers memory-efficient attention with the dense bool mask as an additive bias (optional backend;
    untested here: no xformers build matches our torch, DEPS.md)."""
    import xformers.ops as xops

    H, Hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    B, _, Lq, Lk = mask.shape
    pad = -Lk % 8                                                         # xformers wants an 8-aligned bias stride
    bias = torch.zeros(B, H, Lq, Lk + pad, dtype=q.dtype, device=q.device)
    bias[..., :Lk].masked_fill_(~mask, float("-inf"))
    y = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        attn_bias=bias[..., :Lk])
    return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, ffn_width(cfg)
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Llama block + per-image adaLN modulation of the NOISE tokens (identity elsewhere, and at init)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.ada = nn.Linear(cfg.d_model, 6 * cfg.d_model)                      # SiLU(e) -> 6 x (n_img, D)
        k = cfg.block_conv
        self.local = nn.Conv2d(cfg.d_model, cfg.d_model, k, padding=k // 2, groups=cfg.d_model) if k else None

    uniform = False  # set by NextX: run every module whatever the data (see NextX.uniform_graph)

    def _local(self, x, splits):
        """x + depthwise conv over every image split's grid (block_conv; identity when off or without images)."""
        if self.local is None or not (splits or self.uniform):
            return x
        B, L, D = x.shape
        return x + grid_conv(self.local, x.reshape(B * L, D), splits or [], B * L, self.uniform).view(B, L, D)

    def forward(self, x, cos, sin, mask, past: KV | None, cond, splits=None):
        """cond: None (no NOISE token), or (silu_e (n_img, D) fp32, nz (n_noise,) flat token index, ni (n_noise,)
        image index of each NOISE token, run: `noise_runs(ni)`). splits: `image_splits` of the image tokens (for
        block_conv)."""
        h = self.input_layernorm(x)
        if cond is None:
            a, kv = self.self_attn(h, cos, sin, mask, past)
            x = self._local(x + a, splits)
            return x + self.mlp(self.post_attention_layernorm(x)), kv
        silu_e, nz, ni, run = cond
        with torch.autocast(x.device.type, enabled=False):                    # time path in fp32
            mod = spread(self.ada(silu_e.to(self.ada.weight.dtype)).float(), ni, run)  # (n_noise, 6D), per image
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        a, kv = self.self_attn(_modulate(h, nz, sh1, sc1), cos, sin, mask, past)
        x = self._local(x + _modulate(a, nz, None, g1), splits)
        m = self.mlp(_modulate(self.post_attention_layernorm(x), nz, sh2, sc2))
        return x + _modulate(m, nz, None, g2), kv


# --------------------------------------------------------------------------------------------------------
# The model


class NextX(nn.Module):
    """Decoder-only transformer: text tokens and latent image tokens in, text logits and latent G out.

    cfg.vocab_size may be 0 (filled from `vocab_size`) or must equal `vocab_size`. `rope_scaling`: an HF Llama
    rope-scaling dict (None or llama3), normally set only by `pretrained.load_hf_llama`. `latent_patch`: each latent
    token is p x p pixels of latent_dim / p^2 channels (patchify's layout; the pixel tokenizer's patch), used by
    `pixel_unet`."""

    @property
    def uniform_graph(self) -> bool:
        """True: every module runs on every forward whatever the data (the time path, adaLN and the latent
        convolutions on empty selections when a micro-batch holds no image), so ranks of a DeepSpeed job run one
        graph and one sequence of ZeRO-3 gathers. Set by the engine with several ranks; off for inference."""
        return getattr(self, "_uniform", False)

    @uniform_graph.setter
    def uniform_graph(self, on: bool) -> None:
        self._uniform = bool(on)
        for blk in self.layers:
            blk.uniform = bool(on)

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, latent_dim: int, rope_scaling: dict | None = None,
                 latent_patch: int = 1):
        super().__init__()
        cfg.check()
        if cfg.vocab_size not in (0, vocab_size):
            raise ValueError(f"model.vocab_size={cfg.vocab_size} disagrees with vocab_size={vocab_size}")
        if vocab_size <= 0 or latent_dim <= 0:
            raise ValueError(f"vocab_size and latent_dim must be > 0, got {vocab_size}, {latent_dim}")
        if cfg.attention == "xformers":
            require_xformers()
        self.cfg = replace(cfg, vocab_size=vocab_size)
        self.vocab_size, self.latent_dim = vocab_size, latent_dim
        d = cfg.d_model
        self.embed_tokens = nn.Embedding(vocab_size, d)
        k = cfg.latent_conv
        self.latent_in = nn.Linear(latent_dim, d) if k == 1 else nn.Conv2d(latent_dim, d, k, padding=k // 2)
        self.time_mlp = _mlp(cfg.time_freq_dim, d)          # features of c_noise(t) = 1000 t
        self.gap_mlp = _mlp(cfg.time_freq_dim, d)           # features of 1000 (t - s)
        self.text_mlp = _mlp(d, d) if cfg.text_cond == "pooled" else None  # the caption's mean embedding
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.final_ada = nn.Linear(d, 2 * d)                # SiLU(e) -> (shift, scale) before the latent head
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.latent_head = nn.Linear(d, latent_dim) if k == 1 else nn.Conv2d(d, latent_dim, k, padding=k // 2)
        self.latent_patch = latent_patch
        self.unet = None
        if cfg.pixel_unet:
            if latent_patch < 1 or latent_dim % (latent_patch * latent_patch):
                raise ValueError(f"latent_dim={latent_dim} is not a whole number of {latent_patch}x{latent_patch} "
                                 "pixel patches (model.pixel_unet)")
            self.unet = PixelUNet(latent_dim // latent_patch ** 2, cfg.pixel_unet, latent_patch, d)
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, rope_scaling))
        self.register_buffer("rope_section", rope_section(cfg.head_dim // 2), persistent=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        std, n = self.cfg.init_std, self.cfg.n_layers
        unet = set(self.unet.modules()) if self.unet is not None else set()   # keeps PyTorch's conv init
        for m in self.modules():
            if m in unet:
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):  # latent convolutions: the k*k taps together have a linear's variance
                nn.init.normal_(m.weight, 0.0, std / m.kernel_size[0])
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for blk in self.layers:
            nn.init.normal_(blk.self_attn.o_proj.weight, 0.0, std / math.sqrt(2 * n))
            nn.init.normal_(blk.mlp.down_proj.weight, 0.0, std / math.sqrt(2 * n))
            nn.init.zeros_(blk.ada.weight), nn.init.zeros_(blk.ada.bias)
            if blk.local is not None:                      # block convolutions start as the identity
                nn.init.zeros_(blk.local.weight), nn.init.zeros_(blk.local.bias)
        for m in (self.final_ada, self.latent_head):
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)
        if self.unet is not None:
            self.unet.reset_parameters()

    # ---- forward pieces

    def _embed(self, ids, kind, pos2d, latents, splits):
        is_img = ((kind == CLEAN) | (kind == NOISE))[..., None]                       # (B, L, 1)
        if latents.shape[-1] != self.latent_dim:
            raise ValueError(f"latents have {latents.shape[-1]} channels, the model expects {self.latent_dim}")
        lat = torch.where(is_img, latents, torch.zeros((), dtype=latents.dtype, device=latents.device))
        lat = lat.to(self.latent_in.weight.dtype)
        if self.cfg.latent_conv == 1:
            z = self.latent_in(lat)                                                   # (B, L, D)
        else:  # conv over every clean and noise split's grid
            B, L, _ = lat.shape
            z = grid_conv(self.latent_in, lat.reshape(B * L, -1), splits, B * L, self.uniform_graph).view(B, L, -1)
        if self.cfg.pos2d in ("sincos", "rope+sincos"):
            scale = self.cfg.sincos_scale or self.cfg.init_std
            z = z + scale * sincos_2d(pos2d, self.cfg.d_model).to(z.dtype)
        skips = None
        if self.unet is not None:
            z, skips = self._unet_encode(lat, z, splits)
        tok = self.embed_tokens(ids)                                                  # (B, L, D)
        return torch.where(is_img, z.to(tok.dtype), tok), skips  # residual stream in the weights' dtype (fp32)

    def _unet_encode(self, lat, z, splits):
        """z (B, L, D) + the U-Net's token features of every split's pixels; -> (z, [skips of each split group])."""
        B, L, C = lat.shape
        flat, zf, p = lat.reshape(B * L, C), z.reshape(B * L, -1), self.latent_patch
        if self.uniform_graph and not splits:        # in the graph on a rank without images (ZeRO-3 gathers)
            tok, _ = self.unet.encode(flat.new_zeros(0, C // (p * p), p, p))
            return z + tok.sum().to(z.dtype) * 0.0, []
        skips = []
        for idx, h, w in splits:
            tok, sk = self.unet.encode(unpatchify(flat[idx], (h, w), p))            # (n, h w, D), skips
            zf = zf.index_add(0, idx.reshape(-1), tok.reshape(-1, tok.shape[-1]).to(zf.dtype))
            skips.append(sk)
        return zf.view(B, L, -1), skips

    def _unet_decode(self, h, kind, splits, skips, out):
        """out (B, L, C) + the U-Net's pixels, decoded from h (B, L, D) on every NOISE split -> (B, L, C)."""
        B, L, C = out.shape
        hf, of, flat_kind, p = h.reshape(B * L, -1), out.reshape(B * L, C), kind.reshape(-1), self.latent_patch
        decoded = False
        for (idx, hh, ww), sk in zip(splits or [], skips):
            m = flat_kind[idx[:, 0]] == NOISE                                         # (n,) noise splits
            if bool(m.any()):
                px = self.unet.decode(hf[idx[m]], [s[m] for s in sk], (hh, ww))       # (n', c, hh p, ww p)
                of = of.index_add(0, idx[m].reshape(-1), patchify(px, p).reshape(-1, C).to(of.dtype))
                decoded = True
        if self.uniform_graph and not decoded:       # in the graph on a rank without noise splits
            tok, sk = self.unet.encode(hf.new_zeros(0, C // (p * p), p, p))
            of = of + self.unet.decode(tok, sk, (1, 1)).sum().to(of.dtype) * 0.0
        return of.view(B, L, C)

    def _time(self, t, s, ctx=None):
        """t, s (n_img,) -> SiLU(e) (n_img, D) fp32, e = MLP_t(feat(1000 t)) + MLP_gap(feat(1000 (t - s))), plus
        MLP_text(rms-normalised mean embedding of ctx's ids) with `text_cond: pooled` (ctx (n_img, Lc), -1 = none; no id:
        a zero input). The embeddings start at init_std (~0.02): normalised, the caption enters at the scale of the
        time features, not 50x below them."""
        with torch.autocast(t.device.type, enabled=False):
            t64, s64 = t.double(), s.double()
            dt = self.time_mlp[0].weight.dtype
            e = (self.time_mlp(time_features(1000 * t64, self.cfg.time_freq_dim).to(dt))
                 + self.gap_mlp(time_features(1000 * (t64 - s64), self.cfg.time_freq_dim).to(dt)))
            if self.text_mlp is not None:
                real = (ctx >= 0).unsqueeze(-1)                                          # (n_img, Lc, 1)
                emb = self.embed_tokens(ctx.clamp(min=0)) * real                         # (n_img, Lc, D)
                pooled = emb.sum(1) / real.sum(1).clamp(min=1)                           # (n_img, D)
                pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-12)  # unit rms, like
                e = e + self.text_mlp(pooled.to(dt))                                     # the time features
            return F.silu(e.float())

    def _text_context(self, inp: ModelInput) -> torch.Tensor | None:
        """Each image's text ids (n_img, Lc) for `text_cond: pooled` (None when off): inp.ctx, else found in this
        call's tokens from inp.doc."""
        if self.text_mlp is None:
            return None
        if inp.ctx is not None:
            if inp.ctx.shape[0] != inp.t.shape[0]:
                raise ValueError(f"ctx has {inp.ctx.shape[0]} rows, there are {inp.t.shape[0]} images")
            return inp.ctx
        if inp.doc is None:
            raise ValueError("model.text_cond=pooled needs each image's text: pass ModelInput.ctx or ModelInput.doc")
        row, sel = image_text_context(inp.kind, inp.doc, inp.pos, inp.img, inp.t.shape[0])
        return gather_context(inp.ids, row, sel)

    def _rope(self, pos, pos2d, kind):
        offsets = None
        if self.cfg.pos2d in ("rope", "rope+sincos"):
            is_img = ((kind == CLEAN) | (kind == NOISE))[..., None]                   # (B, L, 1)
            sec = self.rope_section                                                    # (P,)
            rc = torch.where(is_img, pos2d.long(), 0)                                  # (B, L, 2)
            offsets = torch.where(sec == 1, rc[..., 0:1], torch.where(sec == 2, rc[..., 1:2], 0))  # (B, L, P)
        of = rope2d_inv_freq(self.rope_inv_freq, self.rope_section, self.cfg.rope2d_freqs == "own")
        return rope_cos_sin(pos, self.rope_inv_freq, offsets, of)

    def forward(self, inp: ModelInput, *, past: list[KV] | None = None, use_cache: bool = False,
                text_mask: torch.Tensor | None = None) -> ModelOutput:
        """inp: the layout, latents, times and mask (`ModelInput`); past: see module docstring; text_mask (B, L)
        bool: compute logits only there -> (n_sel, V)."""
        ids, kind, pos, pos2d, latents, img, t, s, mask = (inp.ids, inp.kind, inp.pos, inp.pos2d, inp.latents,
                                                           inp.img, inp.t, inp.s, inp.mask)
        if past is not None and len(past) != len(self.layers):
            raise ValueError(f"past has {len(past)} layers, the model {len(self.layers)}")
        if isinstance(mask, torch.Tensor):
            lk = ids.shape[1] + (past[0][0].shape[2] if past is not None else 0)
            if mask.dim() != 4 or mask.shape[-2:] != (ids.shape[1], lk):
                raise ValueError(f"mask must be (B, 1, {ids.shape[1]}, {lk}) (queries x cached+new keys), "
                                 f"got {tuple(mask.shape)}")
        splits = None                                                                 # image splits by grid
        if self.cfg.latent_conv > 1 or self.cfg.block_conv or self.unet is not None:
            splits = image_splits((kind == CLEAN) | (kind == NOISE), pos2d)
        x, skips = self._embed(ids, kind, pos2d, latents, splits)                     # (B, L, D)
        cos, sin = self._rope(pos, pos2d, kind)                                       # (B, 1, L, hd) each
        noise = (kind == NOISE).reshape(-1)
        nz = noise.nonzero().squeeze(1)                                               # (n_noise,) flat indices
        cond = None
        if self.uniform_graph or nz.numel():  # (uniform: the time path and adaLN run, on nothing, without noise)
            ni = img.reshape(-1)[nz].long()                                           # (n_noise,) image of each
            cond = (self._time(t, s, self._text_context(inp)), nz, ni, noise_runs(ni))
            for c in cond[:3]:  # images and noise tokens per call vary: compiled blocks trace them symbolic
                torch._dynamo.maybe_mark_dynamic(c, 0)
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        new_past = []
        for i, blk in enumerate(self.layers):
            p = past[i] if past is not None else None
            if ckpt:
                x, kv = checkpoint(blk, x, cos, sin, mask, p, cond, splits, use_reentrant=False)
            else:
                x, kv = blk(x, cos, sin, mask, p, cond, splits)
            if use_cache:
                new_past.append(kv)
        h = self.norm(x)
        if cond is not None:
            with torch.autocast(x.device.type, enabled=False):
                mod = spread(self.final_ada(cond[0].to(self.final_ada.weight.dtype)).float(), cond[2], cond[3])
            shift, scale = mod.chunk(2, dim=-1)
            h = _modulate(h, nz, shift, scale)                                        # NOISE rows only
        logits = self.lm_head(h[text_mask] if text_mask is not None else h)          # (n_sel or B, [L,] V)
        if self.cfg.latent_conv == 1:
            lat_out = self.latent_head(h)                                             # (B, L, C)
        else:  # conv over every noise split's grid; zeros elsewhere
            B, L, _ = h.shape
            flat_kind = kind.reshape(-1)                                              # the noise splits:
            noise_splits = [(idx[flat_kind[idx[:, 0]] == NOISE], hh, ww) for idx, hh, ww in splits]
            lat_out = grid_conv(self.latent_head, h.reshape(B * L, -1),
                                [s for s in noise_splits if len(s[0])], B * L, self.uniform_graph).view(B, L, -1)
        if self.unet is not None:
            lat_out = self._unet_decode(h, kind, splits, skips, lat_out)
        return ModelOutput(text_logits=logits, latent_out=lat_out, past=new_past if use_cache else None)

    # ---- helpers

    def text_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text-only causal forward: input_ids (B, L) at positions 0..L-1 -> logits (B, L, V)."""
        B, L = input_ids.shape
        dev = input_ids.device
        kind = torch.full((B, L), TEXT, dtype=torch.int8, device=dev)
        doc = torch.zeros(B, L, dtype=torch.int32, device=dev)
        split = torch.full((B, L), -1, dtype=torch.int32, device=dev)
        mask = (block_mask(doc, kind, split, n_heads=None) if self.cfg.attention == "flex"
                else dense_mask(doc, kind, split))
        pos = torch.arange(L, device=dev).expand(B, L)
        empty = torch.zeros(0, device=dev)
        lat = torch.zeros(B, L, self.latent_dim, device=dev)
        return self(ModelInput(input_ids, kind, pos, torch.zeros(B, L, 2, dtype=torch.int32, device=dev), lat,
                               torch.full((B, L), -1, device=dev), empty, empty, mask)).text_logits

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters; exclude_embeddings drops the token-embedding table (a lookup) unless it is tied to
        the LM head (then it is a matmul and counts)."""
        n = sum(p.numel() for p in self.parameters())   # parameters() yields a tied weight once
        if exclude_embeddings and not self.cfg.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 n_layers D seq_len, N without
        the embedding lookup. The attention term counts the full L x L score matrix (no causal/mask discount), the
        usual MFU convention."""
        return 6.0 * self.num_params(exclude_embeddings=True) + 12.0 * self.cfg.n_layers * self.cfg.d_model * seq_len


@contextlib.contextmanager
def dense_attention(model):
    """Run every attention layer on SDPA (the samplers: their masks are dense (B, 1, Lq, Lk) booleans, small
    for decoding), and a model trained with the flex backend computes the same function on SDPA."""
    mods = [m for m in model.modules() if getattr(m, "backend", "sdpa") == "flex"]
    for m in mods:
        m.backend = "sdpa"
    try:
        yield
    finally:
        for m in mods:
            m.backend = "flex"
