"""A minimal DiT-style text-to-image flow model to calibrate nextx against: `nextx eval reference`.

Not part of the framework: a deliberately small, independent model trained on the SAME shards, image tokens and
text tokenizer as a nextx run, for the same wall time, and scored by the SAME exact scorer on the same held-out
prompts. If it draws objects in place where nextx draws scattered patches, the gap is in nextx, not in the budget.

Model (Peebles & Xie's DiT, shrunk): caption tokens (own embedding + learned 1D positions) and image tokens (linear
patch embedding + a fixed 2D sin-cos table at amplitude 1) in ONE bidirectional sequence; LayerNorm blocks with
adaLN-Zero modulation of every token from the time embedding; zero-initialised output head on the image tokens.
Flow matching with nextx's conventions: x_t = (1 - t) x + t eps, eps ~ N(0, sigma_d^2), the net predicts
G = (eps - x) / sigma_d; Euler sampling from t = 1 to 0. CFG dropout 0.1 (caption -> all pads). AdamW, EMA.

Diagnostics: `--condition attributes` (the scene's true attributes instead of the caption: drawing without reading),
`--pixel-unet W` (a pixel-level U-Net encoder/decoder around the tokens, for pixel tokenizers), `--snapshots 5,10`
(the EMA weights also scored at those training minutes: how a fact's accuracy grows with the budget).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nextx.imm import shift_time
from nextx.latents import patchify, unpatchify
from nextx.model import PixelUNet, sdpa, time_features
from nextx.positions import sincos_2d


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm(d, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.ada = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.ada.weight), nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, keep):
        """x (B, L, d), c (B, d) SiLU'd time embedding, keep (B, 1, 1, L) bool key mask."""
        B, L, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)       # (B, 1, d) each
        h = self.n1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, hd)
        a = sdpa(q, k, v, keep, gqa=False).transpose(1, 2).reshape(B, L, d)
        x = x + g1 * self.proj(a)
        return x + g2 * self.mlp(self.n2(x) * (1 + sc2) + sh2)


class RefDiT(nn.Module):
    """Caption ids (B, Lt) + noised image tokens (B, N, C) + t (B,) -> G (B, N, C)."""

    def __init__(self, vocab: int, max_text: int, token_dim: int, grid: tuple[int, int], width: int = 128,
                 depth: int = 4, heads: int = 4, freq_dim: int = 256, cond: str = "tokens", patch: int = 1,
                 pixel_unet: int = 0):
        super().__init__()
        self.freq_dim, self.cond = freq_dim, cond
        self.grid, self.p = grid, patch
        self.unet = PixelUNet(token_dim // (patch * patch), pixel_unet, patch, width) if pixel_unet else None
        self.tok = nn.Embedding(vocab, width)
        self.tpos = nn.Parameter(torch.randn(max_text, width) * 0.02)
        self.patch = nn.Linear(token_dim, width)
        rc = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"), -1).view(-1, 2)
        self.register_buffer("pos", sincos_2d(rc, width), persistent=False)         # (N, width), amplitude 1
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        if cond != "tokens":                  # the caption's mean token embedding joins the time embedding (adaLN)
            self.c_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(RefBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.final_ada = nn.Linear(width, 2 * width)
        self.head = nn.Linear(width, token_dim)
        for m in (self.final_ada, self.head):
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, ids, text_keep, x, t, pad: int = -1):
        B, Lt = ids.shape
        e = self.tok(ids)                                                                        # (B, Lt, width)
        c = self.t_mlp(time_features(1000 * t, self.freq_dim))                                  # (B, width)
        if self.cond != "tokens":
            real = (ids != pad).float()[..., None]                                              # (B, Lt, 1)
            c = c + self.c_mlp((e * real).sum(1) / real.sum(1).clamp(min=1))
        c = F.silu(c)
        z = self.patch(x) + self.pos                                                             # (B, N, width)
        if self.unet is not None:
            zu, skips = self.unet.encode(unpatchify(x, self.grid, self.p))
            z = z + zu
        if self.cond == "pooled":
            Lt = 0
            h, keep = z, None
        else:
            h = torch.cat([e + self.tpos[:Lt], z], dim=1)                                       # (B, Lt + N, width)
            keep = torch.cat([text_keep, torch.ones(B, x.shape[1], dtype=torch.bool)], 1)[:, None, None]
        for blk in self.blocks:
            h = blk(h, c, keep)
        sh, sc = self.final_ada(c)[:, None].chunk(2, dim=-1)
        h = self.norm(h[:, Lt:]) * (1 + sc) + sh
        if self.unet is not None:
            return self.head(h) + patchify(self.unet.decode(h, skips, self.grid), self.p)
        return self.head(h)


def _attribute_ids(doc) -> list[int]:
    """A shapes document's true scene as ids (diagnostic conditioning): per object, one id each for its colour,
    shape, size and cell, in disjoint ranges of one table (ids above 3, clear of the tokenizer's specials)."""
    from data_tools.shapes import CELLS, COLOURS, SHAPES, SIZES
    out = []
    for o in doc.meta["objects"]:
        base = 4
        for name, values in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("cell", CELLS)):
            out.append(base + list(values).index(o[name]))
            base += len(values)
    return out


def _batch_ids(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    keep = ids != pad
    keep[:, 0] = True                       # a fully dropped caption still has one key (all-pad rows)
    return ids, keep


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad: int, n_tokens: int, token_dim: int, steps: int, sigma_d: float,
           cfg_scale: float, generator: torch.Generator, t_shift: float = 1.0) -> torch.Tensor:
    """Euler from t = 1 to 0 in `steps` uniform steps (moved toward noise by `imm.shift_time`) -> latents (B, N, C)."""
    ids, keep = _batch_ids(prompts, pad)
    B = len(prompts)
    x = torch.randn(B, n_tokens, token_dim, generator=generator) * sigma_d
    ts = shift_time(torch.linspace(1.0, 0.0, steps + 1), t_shift)
    for i in range(steps):
        t = ts[i].expand(B)
        G = model(ids, keep, x, t, pad)
        if cfg_scale != 1.0:
            G = (1 - cfg_scale) * model(torch.full_like(ids, pad), keep, x, t, pad) + cfg_scale * G
        x = x - (ts[i] - ts[i + 1]) * sigma_d * G
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx eval reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shapes shard dir (train + heldout splits)")
    p.add_argument("--text-tokenizer", required=True)
    p.add_argument("--image-tokenizer", required=True)
    p.add_argument("--out", required=True, help="output dir (reference.json, grids)")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall time")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", default="8,30", help="Euler steps at evaluation")
    p.add_argument("--n", type=int, default=200, help="held-out prompts")
    p.add_argument("--heldout-shards", default=None, help="shapes shard dir whose held-out split gives the prompts "
                   "(default: those of --shards; e.g. 1000 held-out scenes of another seed, for smaller error bars)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: torch autocast over fp32 weights in training (nextx's dist.precision; attention in "
                        "fp32 on CPU, as nextx's); sampling is fp32 either way")
    p.add_argument("--cond", choices=["tokens", "pooled", "both"], default="tokens",
                   help="caption tokens in the sequence, the caption's mean token embedding added to the time "
                        "embedding (adaLN on every image token; the sequence is the image alone), or both")
    p.add_argument("--condition", choices=["caption", "attributes"], default="caption",
                   help="what the model is conditioned on: the caption's tokens, or (a diagnostic) the scene's true "
                        "attributes from the shard metadata, one id per colour, shape, size and cell of each object")
    p.add_argument("--snapshots", default="", help="comma-separated training minutes at which the EMA weights are "
                   "also scored (at the last --steps; the training clock stops meanwhile), e.g. 5,10,20")
    p.add_argument("--pixel-unet", type=int, default=0,
                   help="base width of a pixel-level U-Net encoder/decoder around the tokens (pixel tokenizers)")
    p.add_argument("--t-shift", type=float, default=1.0,
                   help="SD3 time shift of the training and sampling times (> 1: toward noise; 1: uniform)")
    a = p.parse_args(argv)
    from evals.shapes_eval import N_GRID_COLS, grid_columns, labelled_grid, score_with_chance, t2i_table
    from nextx.documents import decode_document, iter_raw_samples, shard_paths
    from nextx.latents import load_image_tokenizer, pil_to_tensor
    from nextx.infer import to_pil
    from nextx.tokenizer import load_tokenizer

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text_tok, image_tok = load_tokenizer(a.text_tokenizer), load_image_tokenizer(a.image_tokenizer)
    pad, sigma_d = text_tok.pad_id, 0.5

    def load(split, limit=None, shards=a.shards):
        docs = []
        for raw in iter_raw_samples(shard_paths(shards, split)):
            docs.append(decode_document(raw))
            if limit and len(docs) == limit:
                break
        return docs

    train = load("train")
    encode = (lambda d: text_tok.encode(d.texts[0])) if a.condition == "caption" else _attribute_ids
    caps = [encode(d) for d in train]
    x_all = image_tok.encode(pil_to_tensor([d.images[0].pixels for d in train], image_tok.image_size))  # (n, N, C)
    n_tok, C = x_all.shape[1:]
    held = load("heldout", a.n, a.heldout_shards or a.shards)
    held_ids = [encode(d) for d in held]  # held-out prompts may be longer than every training caption (e.g. two
    #   objects against single-object training scenes): the text position table covers both
    if a.pixel_unet and getattr(image_tok, "type", None) != "pixel":
        raise SystemExit(f"--pixel-unet needs a pixel image tokenizer, {a.image_tokenizer} is {image_tok.type}")
    model = RefDiT(text_tok.vocab_size, max(len(c) for c in caps + held_ids) + 8, C, image_tok.grid, a.width,
                   a.depth, cond=a.cond, patch=getattr(image_tok, "patch_size", 1),
                   pixel_unet=a.pixel_unet)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    print(f"reference: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, {len(train)} train docs, "
          f"batch {a.batch}, {a.minutes} min", flush=True)
    rng = random.Random(a.seed)
    held_prompts = [d.texts[0] for d in held]

    def draw(m, k: int) -> list:
        """The held-out prompts drawn by m in k Euler steps -> PIL images."""
        ims = []
        for i in range(0, len(held), 50):
            lat = sample(m, held_ids[i:i + 50], pad, n_tok, C, k, sigma_d,
                         a.cfg_scale, torch.Generator().manual_seed(a.seed + i), a.t_shift)
            ims += to_pil(image_tok.decode(lat))
        return ims

    try:
        snap_at = sorted(float(m) for m in a.snapshots.split(",")) if a.snapshots else []
    except ValueError:
        raise SystemExit(f"--snapshots must be comma-separated minutes, e.g. 5,10, got {a.snapshots!r}") from None
    if any(m < 0 or m >= a.minutes for m in snap_at):
        raise SystemExit(f"--snapshots {a.snapshots}: every snapshot must lie in [0, --minutes {a.minutes:g}) "
                         "(the end of training is scored anyway)")
    snapshots, k_last = {}, int(a.steps.split(",")[-1])
    t0, step, seen, paused = time.perf_counter(), 0, 0, 0.0
    while time.perf_counter() - t0 - paused < 60 * a.minutes:
        if snap_at and time.perf_counter() - t0 - paused >= 60 * snap_at[0]:
            tp = time.perf_counter()                  # the EMA weights scored now; the training clock stops
            snap = copy.deepcopy(model)
            snap.load_state_dict(ema)
            ims = draw(snap.eval(), k_last)
            snapshots[snap_at.pop(0)] = {"train_steps": step, "n": len(held), "cfg_scale": a.cfg_scale,
                                         "t2i": {k_last: score_with_chance(ims, held_prompts, a.seed)}}
            paused += time.perf_counter() - tp
        idx = [rng.randrange(len(train)) for _ in range(a.batch)]
        batch_caps = [caps[i] if rng.random() >= 0.1 else [] for i in idx]      # CFG dropout 0.1
        ids, keep = _batch_ids(batch_caps, pad)
        x = x_all[idx]
        t = shift_time(torch.rand(a.batch), a.t_shift)
        eps = torch.randn_like(x) * sigma_d
        xt = (1 - t)[:, None, None] * x + t[:, None, None] * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            G = model(ids, keep, xt, t, pad)
        loss = (G.float() - (eps - x) / sigma_d).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].lerp_(v, 1 - a.ema) if v.is_floating_point() else ema[k].copy_(v)
        step, seen = step + 1, seen + a.batch
        if step % 100 == 0:
            rate = seen / (time.perf_counter() - t0 - paused)
            print(f"step {step} loss {loss.item():.4f} images/s {rate:.0f}", flush=True)
    wall = time.perf_counter() - t0 - paused
    model.load_state_dict(ema)
    torch.save({"ema": ema, "args": vars(a), "steps": step}, out / "reference.pt")
    model.eval()
    res = {"params": sum(p.numel() for p in model.parameters()), "steps": step, "images_seen": seen,
           "seconds": wall, "images_per_s": seen / wall, "n": len(held), "cfg_scale": a.cfg_scale,
           "precision": a.precision, "heldout_shards": str(a.heldout_shards or a.shards), "prompts": held_prompts,
           "t2i": {}, "snapshots": snapshots}
    grids: dict[int, list] = {}
    for k in (int(s) for s in a.steps.split(",")):
        ims = draw(model, k)
        res["t2i"][k] = score_with_chance(ims, held_prompts, a.seed)
        grids[k] = ims
    cols = grid_columns(held_prompts, N_GRID_COLS)
    labelled_grid([[grids[k][i] for i in cols] for k in grids], [held_prompts[i] for i in cols],
                  [f"{k} steps" for k in grids]).save(out / "reference_grid.png")
    (out / "reference.json").write_text(json.dumps(res, indent=2))
    print(f"reference: {step} steps, {res['images_per_s']:.0f} images/s")
    for m, snap in snapshots.items():
        print(f"snapshot at {m:g} training minutes ({snap['train_steps']} steps):")
        print(t2i_table(snap, "Euler"))
    print(t2i_table(res, "Euler"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
