"""Does attention inside an image know where things are? `nextx eval attention RUN [--reference reference.pt]`.

While the model refines an image (one sampling step from pure noise, held-out style prompts), read every layer's
attention of the noise queries over the image's own noise keys and report, averaged over queries, heads and prompts:
  mass      the share of attention that goes to image keys (the rest goes to the caption)
  entropy   of the attention renormalised over image keys (log N for uniform: every key alike)
  distance  the expected Manhattan distance in grid cells from the query to the key it reads (uniform: the mean
            distance over all pairs)
A layer whose entropy and distance are at their uniform values gives every token only the image's mean: each
patch then decides alone (docs/drawing.md). --reference reads a `nextx eval reference` checkpoint instead.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

PROMPTS = ["a red circle in the top left", "a large blue square in the bottom right", "a green star",
           "a small yellow ring in the center", "a white heart to the left of a black cross"]


@contextmanager
def record_attention(n_queries: int, store: list):
    """Patch SDPA so that every call with `n_queries` queries also stores its attention probabilities (B, H, Lq, Lk)
    (GQA keys repeated to the query heads; the boolean mask applied)."""
    orig = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, enable_gqa=False, **kw):
        if q.shape[2] == n_queries:
            kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            s = (q @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if attn_mask is not None:
                s = s.masked_fill(~attn_mask, float("-inf"))
            store.append(s.softmax(-1))
        return orig(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)

    F.scaled_dot_product_attention = spy
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def locality(probs: torch.Tensor, grid: tuple[int, int]) -> dict:
    """probs (B, H, N, Lk) whose LAST N keys are the image's tokens in row-major grid order -> mass, entropy,
    distance (see the module docstring) and their uniform values."""
    h, w = grid
    N = h * w
    rc = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(N, 2).float()
    dist = (rc[:, None] - rc[None]).abs().sum(-1)                                 # (N, N)
    img = probs[..., -N:]
    mass = img.sum(-1)
    p = img / mass.clamp_min(1e-12)[..., None]
    ent = -(p * (p + 1e-12).log()).sum(-1)
    return {"mass": float(mass.mean()), "entropy": float(ent.mean()), "entropy_uniform": math.log(N),
            "distance": float((p * dist).sum(-1).mean()), "distance_uniform": float(dist.mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx eval attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a nextx run dir (or, with --reference, a reference.pt)")
    p.add_argument("--reference", action="store_true", help="RUN is a `nextx eval reference` checkpoint")
    p.add_argument("--text-tokenizer", default="data/tok/text", help="with --reference")
    p.add_argument("--image-tokenizer", default="data/tok/pixel32", help="with --reference")
    p.add_argument("--ema", action="store_true", help="the export's EMA weights")
    a = p.parse_args(argv)
    store: list = []
    with torch.no_grad():
        if a.reference:
            from evals.reference import RefDiT, sample
            from nextx.latents import load_image_tokenizer
            from nextx.tokenizer import load_tokenizer

            ck = torch.load(a.run, weights_only=False)
            text_tok, image_tok = load_tokenizer(a.text_tokenizer), load_image_tokenizer(a.image_tokenizer)
            n_tok = image_tok.grid[0] * image_tok.grid[1]
            args = ck["args"]
            m = RefDiT(text_tok.vocab_size, ck["ema"]["tpos"].shape[0], image_tok.token_dim, image_tok.grid,
                       args["width"], args["depth"], cond=args.get("cond", "tokens"))
            m.load_state_dict(ck["ema"])
            prompts = [text_tok.encode(c) for c in PROMPTS]
            L = n_tok + max(len(x) for x in prompts)
            with record_attention(L, store):
                sample(m.eval(), prompts, text_tok.pad_id, n_tok, image_tok.token_dim, 1, 0.5, 1.0,
                       torch.Generator().manual_seed(0))
            store = [s[:, :, -n_tok:] for s in store]                         # image queries
        else:
            from nextx.infer import Pipeline

            pipe = Pipeline.from_run(a.run, ema=a.ema)
            image_tok = pipe.image_tok
            n_tok = image_tok.grid[0] * image_tok.grid[1]
            with record_attention(n_tok, store):
                # one step from T: restart and pushforward are the same map (s = eps), and restart is the one
                # sampler every IMM run accepts (a run trained at s = eps alone refuses the others)
                pipe.t2i(PROMPTS, steps=1, sampler="restart", cfg_scale=1.0)
    if not store:
        raise SystemExit("no attention call over an image was seen (is the model's attention backend sdpa?)")
    for i, probs in enumerate(store):
        r = locality(probs, image_tok.grid)
        print(f"layer {i}: mass on image keys {r['mass']:.2f}, entropy {r['entropy']:.2f} (uniform "
              f"{r['entropy_uniform']:.2f}), distance {r['distance']:.2f} (uniform {r['distance_uniform']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
