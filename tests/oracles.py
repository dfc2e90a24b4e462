"""Test oracles: generation by full recomputation, the ground truth of the KV-cached generator (docs/design.md §6).

The reference samplers: every step re-runs the whole sequence (no KV cache). They are the ground truth
`nextx.generate` is tested against (and the recompute baseline of `bench/t2i_latency.py`). Samplers are free functions that take the model; the t-grid
comes from one function, `imm.sampling_times`, and every update from `imm.sampler_step`.

Layouts are the training layouts (`nextx.sequence.layout_document`), so a prompt looks exactly like training:

    text -> image     <bos> caption <boi> [noise split: x_t]            refine x for N steps
    image -> text     <bos> <boi> [clean split: x] <eoi> t1 t2 ...      decode text greedily / by sampling

Samplers (docs/imm.md §6), all on x of shape (B, N, C) with ε ~ N(0, σ_d²):
  pushforward   x ← f(x; s = t_{i+1}, t = t_i) = x − (t_i − t_{i+1})·σ_d·G
  restart       x̂ = f(x; s = ε, t = t_i); x ← α_{t_{i+1}} x̂ + σ_{t_{i+1}} ε'
  euler         the flow baseline: the same update as pushforward, but the model sees s = t (as in training)
Classifier-free guidance: G = G_u + w·(G_c − G_u), the unconditional rows are the conditional ones through
`sequence.apply_null_prompt` (the training-time CFG dropout), and both run in one batched forward per step.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from nextx import imm
from nextx.masks import dense_mask
from nextx.model import ModelInput
from nextx.sequence import (CLEAN, NOISE, TEXT, ImageTokens, SpecialIds, apply_null_prompt, collate, layout_document,
                            pack_row)

SAMPLERS = imm.SAMPLERS


def _rows(layouts, pad_id: int):
    """Right-pad single-document layouts into one Batch (each document alone in its row)."""
    L = max(len(d) for d in layouts)
    return collate([pack_row([d], L, pad_id) for d in layouts])


def _forward(model, b, latents, t, s):
    mask = dense_mask(b.doc, b.kind, b.split)
    return model(ModelInput.of(b, latents, t, s, mask))


@torch.no_grad()
def t2i_reference(model, prompts: Sequence[Sequence[int]], special: SpecialIds, *, grid: tuple[int, int],
                  latent_dim: int, steps: int, sampler: str = "pushforward", cfg_scale: float = 1.0,
                  sigma_d: float = imm.SIGMA_D, T: float = imm.T_MAX, eps: float = 0.0, schedule: str = "uniform",
                  shift: float = 1.0, generator: torch.Generator | None = None, device=None,
                  null_prompt: str = "hidden") -> torch.Tensor:
    """Text-to-image by full recomputation. prompts: B lists of text ids -> latents (B, N, C) float32, N = h*w.

    cfg_scale 1 runs no unconditional rows; the noise is drawn on CPU from `generator` (same seed, same output);
    null_prompt: the unconditional rows' mode (`sequence.apply_null_prompt`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    N = grid[0] * grid[1]
    blank = ImageTokens(np.zeros((N, latent_dim), np.float32), grid, generate=True)
    layouts = [layout_document([list(p), blank] if len(p) else [blank], special) for p in prompts]
    b = _rows(layouts, special.pad).to(device or "cpu")
    B = len(prompts)
    guided = cfg_scale != 1.0
    if guided:
        ids, kind, doc, pos, _ = apply_null_prompt(b.ids, b.kind, b.doc, b.pos, b.doc >= 0, special, null_prompt)
        b = _cat(b, replace(b, ids=ids, kind=kind, doc=doc, pos=pos))  # rows: [conditional; unconditional]
    noise_tok = b.kind == NOISE                                                      # (B', L)
    x = torch.randn((B, N, latent_dim), generator=generator, dtype=torch.float64) * sigma_d
    x = x.to(b.ids.device)
    ts = imm.sampling_times(steps, T=T, eps=eps, schedule=schedule, shift=shift)     # (steps+1,) float64
    for i in range(steps):
        t_i, t_next = float(ts[i]), float(ts[i + 1])
        s_model = imm.sampler_s(sampler, t_i, t_next, eps)
        lat = b.latents.clone()
        xx = torch.cat([x, x]) if guided else x
        lat[noise_tok] = xx.float().reshape(-1, latent_dim)
        n_img = b.n_images
        t = torch.full((n_img,), t_i, device=x.device)
        s = torch.full((n_img,), s_model, device=x.device)
        G = _forward(model, b, lat, t, s).latent_out[noise_tok].reshape(-1, N, latent_dim).double()
        if guided:
            G = G[B:] + cfg_scale * (G[:B] - G[B:])
        e = None
        if sampler == "restart" and i + 1 < steps:
            e = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device) * sigma_d
        x = imm.sampler_step(sampler, x, G, t_i, t_next, eps=eps, sigma_d=sigma_d, noise=e)
    return x.float()


def _cat(a, b):
    """Concatenate two Batches of equal L row-wise (images re-indexed)."""
    b = replace(b, img=torch.where(b.img >= 0, b.img + a.n_images, b.img))
    return replace(a, **{k: torch.cat([getattr(a, k), getattr(b, k)]) for k in a.ROW_FIELDS + a.IMAGE_FIELDS})


@torch.no_grad()
def caption_reference(model, images: torch.Tensor, special: SpecialIds, *, grid: tuple[int, int],
                      max_new_tokens: int = 32, temperature: float = 0.0,
                      generator: torch.Generator | None = None) -> list[list[int]]:
    """Captioning by full recomputation. images: latents (B, N, C) -> B lists of generated ids (without <eos>).

    The image is context (clean split only): `<bos> <boi> [clean] <eoi>`, then text until `<eos>`."""
    B = images.shape[0]
    arr = images.detach().cpu().float().numpy()
    layouts = []
    for i in range(B):
        d = layout_document([ImageTokens(arr[i], grid, generate=False)], special)
        layouts.append(d)
    device = images.device
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        rows = []
        for i, d in enumerate(layouts):
            rows.append(_extend(d, out[i], special))
        b = _rows(rows, special.pad).to(device)
        empty = torch.zeros(b.n_images, device=device)
        logits = _forward(model, b, b.latents, empty, empty).text_logits                # (B, L, V)
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        nxt_logits = logits[torch.arange(B, device=device), last].float()
        if temperature > 0:
            probs = torch.softmax(nxt_logits / temperature, -1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = nxt_logits.argmax(-1).cpu()
        for i in range(B):
            if done[i]:
                continue
            tok = int(nxt[i])
            if tok == special.eos:
                done[i] = True
            else:
                out[i].append(tok)
        if all(done):
            break
    return out


def _extend(d, new_ids: list[int], special: SpecialIds):
    """A captioning layout `<bos> <boi> [clean] <eoi> <eos>` with its `<eos>` replaced by the ids decoded so far."""
    keep = len(d) - 1  # drop the closing <eos>
    n = len(new_ids)
    p0 = int(d.pos[keep - 1]) + 1
    return replace(d, ids=np.concatenate([d.ids[:keep], np.asarray(new_ids, np.int64)]),
                   targets=np.concatenate([d.targets[:keep], np.full(n, -100, np.int64)]),
                   kind=np.concatenate([d.kind[:keep], np.full(n, TEXT, np.int8)]),
                   split=np.concatenate([d.split[:keep], np.full(n, -1, np.int32)]),
                   img=np.concatenate([d.img[:keep], np.full(n, -1, np.int32)]),
                   pos=np.concatenate([d.pos[:keep], np.arange(p0, p0 + n, dtype=np.int32)]),
                   pos2d=np.concatenate([d.pos2d[:keep], np.zeros((n, 2), np.int32)]))


@torch.no_grad()
def caption_logprob_reference(model, images: torch.Tensor, texts: Sequence[Sequence[int]], special: SpecialIds, *,
                              grid: tuple[int, int]) -> torch.Tensor:
    """log p(text, <eos> | image) by full recomputation of the training layout `<bos> <boi> [clean] <eoi> text
    <eos>`: the sum of the log-probabilities of the layout's own text targets (`sequence.text_targets`) after the
    image (the target <boi> of <bos> is the layout's, not the caption's). -> (B,)."""
    arr = images.detach().cpu().float().numpy()
    lays = [layout_document([ImageTokens(arr[i], grid, generate=False), *([list(t)] if len(t) else [])], special)
            for i, t in enumerate(texts)]
    b = _rows(lays, special.pad).to(images.device)
    empty = torch.zeros(b.n_images, device=images.device)
    lp = torch.log_softmax(_forward(model, b, b.latents, empty, empty).text_logits.double(), -1)   # (B, L, V)
    tgt = b.targets
    L = tgt.shape[1]
    after = torch.arange(L, device=tgt.device)[None] > (b.kind == CLEAN).long().cumsum(1).argmax(1, keepdim=True)
    got = lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (got * ((tgt >= 0) & after)).sum(1).cpu()

