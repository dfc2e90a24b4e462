"""Training objectives on a packed Batch: text cross-entropy + IMM (or the flow-matching baseline) -> (loss, parts).

docs/design.md §5 and docs/imm.md §4-5. The objective owns every random draw (times, noise, CFG dropout); the model only
maps a batch to `(text_logits, latent_out)`.

IMM, step by step (legend: B rows, L tokens, C latent channels, N tokens of one image, M particles per group):
  1. CFG dropout: with probability `cfg_drop` a document holding a generated image loses its text condition: its
     text tokens (not the layout specials) leave the sequence (`sequence.apply_null_prompt`; `objective.null_prompt:
     hidden`), and its text targets are ignored. At sampling, the unconditional rows are built by the same function.
  2. Times: generated images (those with a noise split) in batch order form groups of M consecutive images that
     share (s, r, t) (docs/imm.md §4 "(b m)" layout); t, s ~ `imm.sample_t_s`, r = `imm.r_of(s, t)`.
  3. One ε ~ N(0, σ_d²) per noise token; x_t = α_t x + σ_t ε and x_r = α_r x + σ_r ε (same ε, docs/imm.md §1).
  4. Online pass (grad): y = f(x_t, s, t) = x_t − (t − s)·σ_d·G_θ on the noise tokens.
  5. Target pass (no grad, fp32, current weights, only the rows holding noise tokens, same dropped text):
     ŷ = f(x_r, s, r) = x_r − (r − s)·σ_d·G_θ⁻.
  6. Per group: `imm.mmd_loss(y, ŷ, t, s)` (Laplace-kernel V-statistic × w(s, t)); image loss = mean over groups.
Text: CE over text targets, normalised by their count. Loss = λ_text·CE + λ_image·image loss.

Flow baseline (`objective.kind: flow`): per image t ~ U(eps, T), x_t = (1 − t)x + tε, and σ_d·G regresses the
velocity ε − x (so the Euler step x_s = x_t − (t − s)·σ_d·G is the same update the IMM parameterisation uses);
the model sees s = t (t − s = 0) in training and sampling.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from nextx import imm
from nextx.config import ObjectiveConfig
from nextx.masks import block_mask, dense_mask
from nextx.model import ModelInput
from nextx.sequence import IGNORE, NOISE, Batch, SpecialIds, apply_null_prompt


def attention_mask(batch: Batch, backend: str, n_heads: int | None = None):
    """The attention mask of a packed batch for the model's backend: dense (B, 1, L, L) bool, or a BlockMask."""
    if backend == "flex":
        return block_mask(batch.doc, batch.kind, batch.split, n_heads=n_heads, _compile=batch.doc.is_cuda)
    return dense_mask(batch.doc, batch.kind, batch.split)


def cfg_dropout(batch: Batch, p: float, special: SpecialIds, generator: torch.Generator | None,
                mode: str = "hidden") -> tuple[Batch, int]:
    """Drop the text condition of each document that holds a noise split with probability p
    (`sequence.apply_null_prompt` in `mode`).

    Returns the new batch (ids, kind, doc, pos and targets replaced in dropped documents) and the number of dropped
    documents (a 0-d tensor on the batch's device)."""
    if p <= 0:
        return batch, 0
    B = batch.ids.shape[0]
    n_docs = int(batch.doc.max()) + 1 if batch.doc.numel() else 0
    if n_docs == 0:
        return batch, 0
    has_noise = torch.zeros(B, n_docs, dtype=torch.bool, device=batch.ids.device)
    noise = batch.kind == NOISE
    rows, cols = noise.nonzero(as_tuple=True)
    has_noise[rows, batch.doc[rows, cols].long()] = True
    u = torch.rand(B, n_docs, generator=generator, device="cpu").to(batch.ids.device)
    drop_doc = has_noise & (u < p)                                                   # (B, n_docs)
    doc = batch.doc.long().clamp(min=0)
    drop_tok = torch.gather(drop_doc, 1, doc) & (batch.doc >= 0)                     # (B, L)
    ids, kind, doc, pos, _ = apply_null_prompt(batch.ids, batch.kind, batch.doc, batch.pos, drop_tok, special, mode)
    targets = torch.where(drop_tok, torch.full_like(batch.targets, IGNORE), batch.targets)
    return replace(batch, ids=ids, kind=kind, doc=doc, pos=pos, targets=targets), drop_doc.sum()


def _image_times(batch: Batch, cfg: ObjectiveConfig, generator: torch.Generator | None, k: float):
    """Per-image (t, s, r) of shape (n_img,) float64 (0 for context images) and the generated-image groups.

    Returns t, s, r and `groups`: a list of index tensors, each M (or fewer, for the last) generated images."""
    n_img = batch.n_images
    gen = batch.image_generate.nonzero(as_tuple=True)[0].cpu()                        # (n_gen,)
    t = torch.zeros(n_img, dtype=torch.float64)
    s, r = t.clone(), t.clone()
    if cfg.grouping == "copies":  # one group per image: its noise copies are the particles
        groups = list(gen.split(1)) if len(gen) else []
    else:
        groups = list(torch.split(gen, cfg.group_size)) if len(gen) else []
    if not groups:
        return t, s, r, groups
    if cfg.kind == "flow":
        tg, _ = imm.sample_t_s(len(gen), T=cfg.T, eps=cfg.eps, mode=cfg.time_sampling, generator=generator,
                                   shift=cfg.t_shift)
        t[gen] = tg
        s[gen] = tg
        r[gen] = tg
        return t, s, r, groups
    tg, sg = imm.sample_t_s(len(groups), T=cfg.T, eps=cfg.eps, mode=cfg.time_sampling, generator=generator,
                                shift=cfg.t_shift, s_eps_share=cfg.s_eps_share)
    rg = imm.r_of(sg, tg, k=k, min_gap=cfg.min_gap, T=cfg.T, eps=cfg.eps)
    for g, idx in enumerate(groups):
        t[idx], s[idx], r[idx] = tg[g], sg[g], rg[g]
    return t, s, r, groups


def group_mean(per_group: torch.Tensor, sizes: list[int], weighting: str) -> torch.Tensor:
    """(G,) per-group IMM losses -> their mean: "equal" weights every group alike, "size" by its particle count
    (a last group of 1 image counts 1/M of a full one). E.g. losses (1, 1, 4) of sizes (4, 4, 1): equal 2, size
    (4 + 4 + 4) / 9 = 4/3."""
    if weighting == "equal":
        return per_group.mean()
    if weighting != "size":
        raise ValueError(f"unknown partial-group weighting {weighting!r} (expected 'equal' or 'size')")
    w = torch.tensor(sizes, dtype=per_group.dtype, device=per_group.device)
    return (per_group * w).sum() / w.sum()


def _per_token(x_img: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """(n_img,) per-image values -> (B, L) per-token values (0 where img < 0)."""
    if x_img.numel() == 0:
        return torch.zeros(img.shape, dtype=x_img.dtype, device=img.device)
    return torch.where(img >= 0, x_img.to(img.device)[img.long().clamp(min=0)], torch.zeros((), dtype=x_img.dtype,
                                                                                                   device=img.device))


def _noised(x: torch.Tensor, eps: torch.Tensor, t_tok: torch.Tensor, noise_tok: torch.Tensor) -> torch.Tensor:
    """(B, L, C) clean latents and noise, (B, L) per-token times -> `imm.interpolate` on the noise tokens (float32),
    x elsewhere."""
    C = x.shape[-1]
    x_t = imm.interpolate(x.reshape(-1, C), eps.reshape(-1, C), t_tok.reshape(-1)).reshape(x.shape)
    return torch.where(noise_tok.unsqueeze(-1), x_t, x)


def _euler_fm(x_t: torch.Tensor, G: torch.Tensor, s_tok: torch.Tensor, t_tok: torch.Tensor, sigma_d: float):
    """(B, L, C) inputs and model outputs, (B, L) per-token times -> `imm.euler_fm` f(x_t, s, t), float64."""
    C = x_t.shape[-1]
    y = imm.euler_fm(x_t.double().reshape(-1, C), G.double().reshape(-1, C), s_tok.reshape(-1), t_tok.reshape(-1),
                     sigma_d)
    return y.reshape(x_t.shape)


def _forward(model, batch: Batch, latents: torch.Tensor, t: torch.Tensor, s: torch.Tensor, mask, text_mask):
    return model(ModelInput.of(batch, latents, t, s, mask), text_mask=text_mask)


def _gather_images(v: torch.Tensor, noise: torch.Tensor, grids: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    """Noise-token values (B, L, C) -> (n_gen, K*N, C) per generated image, in batch image order (K noise copies).

    Row-major flattening of (B, L) visits images in their batch-global index order, and each image's K noise
    splits list their N tokens in grid order, so a boolean select then a reshape recovers the images."""
    sel = v[noise]                                                                    # (n_gen * N, C)
    hw = grids[gen].prod(dim=1)
    if len(hw) and not bool((hw == hw[0]).all()):
        raise ValueError("IMM groups need images of one size in a batch; got token counts "
                         f"{sorted(set(hw.tolist()))} (use one image tokenizer resolution per run)")
    return sel.reshape(len(gen), -1, sel.shape[-1])


def compute_loss(model, batch: Batch, cfg: ObjectiveConfig, special: SpecialIds, *, attention: str = "sdpa",
                 n_heads: int | None = None, generator: torch.Generator | None = None, step: int | None = None,
                 uniform: bool = False):
    """One training loss on a packed batch. Returns `(loss, parts)`: parts for logging, the losses and the text-target
    count as detached 0-d tensors on the batch's device (read them at log steps only: reading is a host sync), the
    other counts and times as host numbers.

    batch: a Batch on the model's device (latents hold the clean x on CLEAN and NOISE tokens).
    generator: a CPU torch.Generator for all random draws (times, CFG dropout); noise uses it too, on CPU, so a
    run is reproducible across devices.
    step: the optimizer step, for the k curriculum (`imm.k_at`); None (validation) uses the final k.
    uniform: several DeepSpeed ranks: the IMM target pass runs even without a generated image (on one row, its
    result unused), so every rank runs the same forwards (engine._DSNet).
    """
    device = batch.ids.device
    batch, n_dropped = cfg_dropout(batch, cfg.cfg_drop, special, generator, cfg.null_prompt)
    mask = attention_mask(batch, attention, n_heads)
    noise_tok = batch.kind == NOISE                                                   # (B, L)
    gen = batch.image_generate.nonzero(as_tuple=True)[0]
    k_now = imm.k_at(step, cfg.k, cfg.k_start, cfg.k_ramp_steps)
    t, s, r, groups = _image_times(batch, cfg, generator, k_now)

    x = batch.latents                                                                 # (B, L, C)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device) * cfg.sigma_d
    t_tok = _per_token(t, batch.img)                                                  # (B, L) float64
    x_t = _noised(x, eps, t_tok, noise_tok)

    text_mask = batch.targets != IGNORE
    out = _forward(model, batch, x_t, t.float().to(device), s.float().to(device), mask, text_mask)
    n_targets = text_mask.sum()                                                       # 0-d, no host sync
    ce = F.cross_entropy(out.text_logits.float(), batch.targets[text_mask], reduction="sum") / n_targets.clamp(min=1)
    parts = {"ce": ce.detach(), "text_targets": n_targets, "images": len(gen), "cfg_dropped": n_dropped}

    if len(gen) == 0 or cfg.image_weight == 0:
        img_loss = out.latent_out.sum() * 0.0
        parts[cfg.kind] = 0.0
        if uniform and cfg.kind == "imm" and cfg.image_weight:
            _target_pass(model, batch, x, eps, r, s, mask, cfg, rows=torch.zeros(1, dtype=torch.long,
                                                                                 device=device))
    elif cfg.kind == "flow":
        G = out.latent_out.float()
        v_target = imm.flow_target(x, eps) / cfg.sigma_d                              # velocity ε − x in G units
        err = (G - v_target).pow(2).mean(-1)                                          # (B, L)
        per_img = _gather_images(err.unsqueeze(-1), noise_tok, batch.image_grid, gen).mean(dim=(1, 2))
        img_loss = per_img.mean()
        parts["flow"] = img_loss.detach()
    else:
        y = _euler_fm(x_t, out.latent_out, _per_token(s, batch.img), t_tok, cfg.sigma_d)  # f(x_t, s, t), (B, L, C)
        y_target = _target_pass(model, batch, x, eps, r, s, mask, cfg)               # f(x_r, s, r), (B, L, C)
        yi = _gather_images(y, noise_tok, batch.image_grid, gen)                      # (n_gen, N, C)
        yt = _gather_images(y_target, noise_tok, batch.image_grid, gen)
        tg = torch.stack([t[g[0]] for g in groups]).to(device)                        # (G,) float64
        sg = torch.stack([s[g[0]] for g in groups]).to(device)
        kw = dict(sigma_d=cfg.sigma_d, a=cfg.a, b=cfg.b)
        losses = []
        if cfg.grouping == "copies":  # (n_gen, K*N, C) -> (G = n_gen, M = K, N, C): one group per image
            N, C = int(batch.image_grid[gen[0]].prod()), yi.shape[-1]
            losses.append(imm.mmd_loss(yi.reshape(len(gen), -1, N, C), yt.reshape(len(gen), -1, N, C), tg, sg, **kw))
        else:  # consecutive chunks of M generated images; the last one may be smaller
            M, n_full = cfg.group_size, len(gen) // cfg.group_size
            k = n_full * M
            if n_full:
                losses.append(imm.mmd_loss(yi[:k].reshape(n_full, M, *yi.shape[1:]),
                                           yt[:k].reshape(n_full, M, *yt.shape[1:]), tg[:n_full], sg[:n_full], **kw))
            if len(gen) > k:
                losses.append(imm.mmd_loss(yi[None, k:], yt[None, k:], tg[n_full:], sg[n_full:], **kw))
        per_group = torch.cat(losses)                                                 # (G,)
        img_loss = group_mean(per_group, [len(g) for g in groups], cfg.partial_group).float()
        parts["imm"] = img_loss.detach()
        parts["groups"] = len(groups)
        parts["t_mean"] = float(t[gen.cpu()].mean())
        parts["k"] = k_now
    loss = cfg.text_weight * ce + cfg.image_weight * img_loss
    parts["loss"] = loss.detach()
    return loss, parts


@torch.no_grad()
def _target_pass(model, batch: Batch, x, eps, r, s, mask, cfg: ObjectiveConfig,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """ŷ = f_θ⁻(x_r, s, r) on every token (B, L, C), float64; only rows holding noise tokens are run (or the
    given rows).

    θ⁻ is the current weights (no EMA: docs/imm.md §4); fp32 without autocast (docs/imm.md §9: bf16 cannot tell r from t)."""
    noise_tok = batch.kind == NOISE
    if rows is None:
        rows = noise_tok.any(dim=1).nonzero(as_tuple=True)[0]
    r_tok = _per_token(r, batch.img)                                                  # (B, L) float64
    x_r = _noised(x, eps, r_tok, noise_tok)
    sub = _select_rows(batch, rows)
    sub_mask = mask[rows] if isinstance(mask, torch.Tensor) else attention_mask(sub, "flex", None)
    device_type = x.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        was_training = model.training
        out = _forward(model, sub, x_r[rows], r.float().to(x.device), s.float().to(x.device), sub_mask,
                       torch.zeros_like(sub.targets, dtype=torch.bool))
        model.train(was_training)
    G = torch.zeros_like(x, dtype=torch.float64)
    G[rows] = out.latent_out.double()
    return _euler_fm(x_r, G, _per_token(s, batch.img), r_tok, cfg.sigma_d)


def _select_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The sub-batch of the given rows; image indices stay batch-global (t, s, r are indexed by them)."""
    if len(rows) == batch.ids.shape[0]:
        return batch
    return batch.rows(rows)
