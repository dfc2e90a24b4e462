"""Text-to-image latency and throughput (not a test): `python bench/t2i_latency.py --device cpu|cuda`.

Table 1: IMM pushforward at 1/2/4/8 steps vs the flow baseline's Euler sampler at 50 steps, same model, same
prompts, cached sampler (`nextx.generate.t2i`), with guidance (one batched [cond; uncond] forward per step).
Table 2: cached refinement (prefill once, then only the image's noise split per step) vs full recomputation of the
whole sequence every step at prompts of 16/256/1024 tokens, 8 steps: the reference sampler
(`tests/oracles.t2i_reference`, which also rebuilds the mask and runs the LM head every step) and `full_lean`
(layout and mask built once, no LM head: the cost of recomputation alone).

A randomly initialised NextX (its latent head perturbed so the latents move): the cost of a forward does not depend
on the weights. Every number of a table comes from one run of this script; each cell is the median of --repeats
timed calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from nextx import imm
from nextx.config import ModelConfig
from nextx.masks import dense_mask
from nextx.model import ModelInput, NextX
from nextx.generate import t2i
from nextx.sequence import NOISE, ImageTokens, SpecialIds, apply_null_prompt, collate, layout_document, pack_row

SP = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)


def _oracle_t2i():
    """The full-recomputation reference sampler, which lives with the tests (tests/oracles.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from oracles import t2i_reference

    return t2i_reference


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def build(a) -> NextX:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      time_freq_dim=min(256, a.d_model))
    m = NextX(cfg, vocab_size=a.vocab, latent_dim=a.latent_dim)
    with torch.no_grad():
        m.latent_head.weight.normal_(0, 0.02)
    return m.to(a.device).eval()


@torch.no_grad()
def full_lean(model, prompts, *, grid, latent_dim, steps, cfg_scale, device, generator, sigma_d=0.5, **_):
    """Pushforward by full recomputation with everything but the forward hoisted out of the step loop."""
    N = grid[0] * grid[1]
    blank = ImageTokens(np.zeros((N, latent_dim), np.float32), grid)
    docs = [layout_document([p, blank], SP) for p in prompts]
    L = max(len(d) for d in docs)
    b = collate([pack_row([d], L, SP.pad) for d in docs]).to(device)
    B, rows = len(prompts), (2 if cfg_scale != 1 else 1)
    rep = lambda v: torch.cat([v] * rows)                                                  # noqa: E731
    ids, kind, pos, mask = b.ids, b.kind, b.pos, dense_mask(b.doc, b.kind, b.split)
    if rows == 2:                                                     # [conditional; unconditional (null prompt)]
        u_ids, u_kind, u_doc, u_pos, _ = apply_null_prompt(b.ids, b.kind, b.doc, b.pos, b.doc >= 0, SP)
        ids, kind, pos = torch.cat([ids, u_ids]), torch.cat([kind, u_kind]), torch.cat([pos, u_pos])
        mask = torch.cat([mask, dense_mask(u_doc, u_kind, b.split)])
    pos2d, lat = rep(b.pos2d), rep(b.latents)
    img = torch.cat([b.img, torch.where(b.img >= 0, b.img + B, -1)]) if rows == 2 else b.img
    noise = kind == NOISE
    no_text = torch.zeros_like(noise)
    x = (torch.randn((B, N, latent_dim), generator=generator, dtype=torch.float64) * sigma_d).to(device)
    ts = imm.sampling_times(steps)
    for i in range(steps):
        lat[noise] = rep(x).float().reshape(-1, latent_dim)
        t = torch.full((rows * B,), float(ts[i]), device=device)
        s = torch.full((rows * B,), float(ts[i + 1]), device=device)
        out = model(ModelInput(ids, kind, pos, pos2d, lat, img, t, s, mask), text_mask=no_text).latent_out
        G = out[noise].reshape(rows * B, N, latent_dim).double()
        G = G[B:] + cfg_scale * (G[:B] - G[B:]) if rows == 2 else G
        x = imm.pushforward_step(x, G, float(ts[i]), float(ts[i + 1]), sigma_d)
    return x.float()


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n, length), generator=g).tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--grid", type=int, default=8, help="image of grid x grid latent tokens")
    p.add_argument("--latent-dim", type=int, default=48)
    p.add_argument("--batches", default="1,8", help="prompts per call in table 1 (latency at 1, throughput at 8)")
    p.add_argument("--batch", type=int, default=4, help="prompts per call in table 2")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens for table 1")
    p.add_argument("--lengths", default="16,256,1024", help="prompt lengths for table 2")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build(a)
    grid = (a.grid, a.grid)
    kw = dict(grid=grid, latent_dim=a.latent_dim, cfg_scale=a.cfg_scale, device=a.device)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {a.device} ({where})"
          f", d_model {a.d_model}, layers {a.layers}, heads {a.heads}/{a.kv_heads}, image {a.grid}x{a.grid} tokens "
          f"x {a.latent_dim}, cfg {a.cfg_scale}, {model.num_params() / 1e6:.1f}M params")

    print(f"\nTable 1: text-to-image, {a.prompt_len}-token prompts, cached sampler")
    print(f"{'batch':<7}{'sampler':<22}{'ms / batch':>12}{'images / s':>12}{'latency / flow-50':>19}"
          f"{'speed-up':>10}")
    for B in [int(x) for x in a.batches.split(",")]:
        pr = prompts(B, a.prompt_len, a.vocab)
        rows = []
        for name, steps, sampler in [("IMM 1 step", 1, "pushforward"), ("IMM 2 steps", 2, "pushforward"),
                                     ("IMM 4 steps", 4, "pushforward"), ("IMM 8 steps", 8, "pushforward"),
                                     ("flow Euler 50 steps", 50, "euler")]:
            sec = timed(lambda: t2i(model, pr, SP, steps=steps, sampler=sampler,
                                    generator=torch.Generator().manual_seed(0), **kw), a.device, a.repeats)
            rows.append((name, sec))
        flow = rows[-1][1]
        for name, sec in rows:
            print(f"{B:<7}{name:<22}{sec * 1e3:>12.1f}{B / sec:>12.1f}{sec / flow:>19.3f}{flow / sec:>9.1f}x")

    print(f"\nTable 2: 8-step IMM, batch {a.batch}, cached refinement vs full recomputation every step "
          "(reference; lean)")
    print(f"{'prompt tokens':<15}{'cached ms':>11}{'ref ms':>11}{'lean ms':>11}{'vs ref':>9}{'vs lean':>9}"
          f"{'max |diff|':>12}")
    for L in [int(x) for x in a.lengths.split(",")]:
        pr = prompts(a.batch, L, a.vocab, seed=L)
        res = {}

        def cached():
            res["c"] = t2i(model, pr, SP, steps=8, generator=torch.Generator().manual_seed(0), **kw)

        def full():
            res["f"] = _oracle_t2i()(model, pr, SP, steps=8, generator=torch.Generator().manual_seed(0), **kw)

        def lean():
            res["l"] = full_lean(model, pr, steps=8, generator=torch.Generator().manual_seed(0), **kw)

        c, f, ln = (timed(fn, a.device, a.repeats) for fn in (cached, full, lean))
        diff = max(float((res["c"] - res[k]).abs().max()) for k in ("f", "l"))
        print(f"{L:<15}{c * 1e3:>11.1f}{f * 1e3:>11.1f}{ln * 1e3:>11.1f}{f / c:>8.1f}x{ln / c:>8.1f}x{diff:>12.1e}")
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        raise SystemExit(main())
