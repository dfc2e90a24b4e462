"""Training throughput (not a test): nextx vs transformers Llama, attention backends, data pipeline vs trainer.

    python bench/train_throughput.py                        # GPU: small + 400m, Llama of the same dims, attention at 4k
    python bench/train_throughput.py --tiny                 # CPU smoke of the same sections at toy sizes
    python bench/train_throughput.py --data configs/tiny.yaml [key=value ...]   # data pipeline vs trainer (CPU)

Sections (one JSON line each, also collected into --json):
  nextx     one training step as the trainer runs it (compute_loss: CE + IMM with its no-grad target pass, backward,
            AdamW step; bf16 autocast over fp32 weights; plain engine, fused AdamW on CUDA) on synthetic packed rows
            of the config's row_len: "mixed" rows (caption+image documents, half laid out caption->image, half
            image->caption, the block mask) and "text" rows (text documents packed, document-causal mask)
  llama     transformers.LlamaForCausalLM with the same d_model / layers / heads / kv heads / SwiGLU width / vocab,
            SDPA causal over whole rows, the same autocast and optimizer, on the same text rows
  attention fwd+bwd of one attention call (B, H, L=4096, hd=64, bf16): FlexAttention with nextx's block mask of a
            packed mixed row, SDPA causal (flash), SDPA with nextx's dense boolean mask; plus the mask build times
  data      (--data) the DataLoader's packed rows/s and documents/s with 0/1/2 workers against the rows/s one
            training step consumes (batches preloaded, so the step is timed without data)

MFU = achieved model FLOP/s / peak (nextx.metrics.PEAK_TFLOPS by GPU name, or --peak-tflops); model FLOPs per token
are 6 N + 12 layers D L (PaLM), N without the embedding lookup and without the per-image time/adaLN parameters
(nextx.metrics.token_flops), plus one extra forward (a third of that) on rows holding a generated image for the IMM
target pass. Llama: the same formula with its N. Timings: median of --steps timed steps after --warmup steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from nextx.config import load_config
from nextx.sequence import NOISE, ImageTokens, Packer, SpecialIds, collate, layout_document

SP = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
ROOT = Path(__file__).resolve().parents[1]

# bench shapes: config file, latent channels and image grid of the synthetic images
SETUPS = {
    "small": ("configs/small.yaml", 8, (8, 8)),
    "400m": ("configs/400m.yaml", 16, (16, 16)),
}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_steps(fn, device, warmup: int, steps: int) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def synthetic_batches(kind: str, n: int, rows: int, row_len: int, vocab: int, latent_dim: int,
                      grid: tuple[int, int], seed: int = 0):
    """n Batches of `rows` packed rows: 'mixed' caption+image documents, or 'text' documents of 64-1024 tokens."""
    rng = np.random.default_rng(seed)
    packer = Packer(row_len, SP.pad, buffer=64)
    out, pending = [], []
    while len(out) < n:
        if kind == "text":
            ids = rng.integers(5, vocab, int(rng.integers(64, min(1024, row_len - 2)))).tolist()
            segs = [ids]
        else:
            cap = rng.integers(5, vocab, int(rng.integers(8, 48))).tolist()
            im = (rng.standard_normal((grid[0] * grid[1], latent_dim)) * 0.5).astype(np.float32)
            segs = ([cap, ImageTokens(im, grid, True)] if rng.random() < 0.5
                    else [ImageTokens(im, grid, False), cap])
        for row in packer.add(layout_document(segs, SP)):
            pending.append(row)
            if len(pending) == rows:
                b = collate(pending)
                if b.latents.shape[-1] != latent_dim:  # text-only rows: no image fixed the channel count
                    b = replace(b, latents=torch.zeros(*b.ids.shape, latent_dim))
                out.append(b)
                pending = []
    return out


def peak(device, override: float) -> float | None:
    if override:
        return override * 1e12
    from nextx.metrics import PEAK_TFLOPS

    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for k, tf in PEAK_TFLOPS.items() if k in name), None)


def bench_nextx(name: str, cfg, latent_dim: int, grid, kind: str, a, device) -> dict:
    from nextx.engine import PlainEngine
    from nextx.model import NextX
    from nextx.objective import compute_loss
    from nextx.metrics import token_flops

    torch.manual_seed(0)
    model = NextX(cfg.model, vocab_size=a.vocab, latent_dim=latent_dim).to(device)
    if a.compile:
        for blk in model.layers:
            blk.compile()
    eng = PlainEngine(cfg, model)
    L, B = cfg.data.row_len, cfg.data.batch_rows
    batches = [b.to(device) for b in synthetic_batches(kind, 4, B, L, a.vocab, latent_dim, grid)]
    gen = torch.Generator()
    state = {"i": 0}

    def step():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        gen.manual_seed(state["i"])
        with eng.autocast():
            loss, _ = compute_loss(model, b, cfg.objective, SP, attention=cfg.model.attention,
                                   n_heads=cfg.model.n_heads, generator=gen)
        eng.backward(loss)
        eng.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = timed_steps(step, device, a.warmup, a.steps)
    ftok = token_flops(model, L)
    target_rows = np.mean([int((b.kind == NOISE).any(1).sum()) for b in batches])
    flops = ftok * B * L + ftok / 3 * target_rows * L
    pk = peak(device, a.peak_tflops)
    return {"section": "nextx", "setup": name, "rows": kind, "params_M": model.num_params() / 1e6,
            "batch": f"{B}x{L}", "attention": cfg.model.attention, "compile": a.compile,
            "step_s": dt, "tokens_per_s": B * L / dt, "mfu": flops / dt / pk if pk else None,
            "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def bench_llama(name: str, cfg, a, device) -> dict | None:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    from nextx.model import ffn_width

    m = cfg.model
    hc = LlamaConfig(hidden_size=m.d_model, intermediate_size=ffn_width(m), num_hidden_layers=m.n_layers,
                     num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, vocab_size=a.vocab,
                     max_position_embeddings=cfg.data.row_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
                     tie_word_embeddings=False)
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(hc).to(device)
    if a.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda" or None)
    L, B = cfg.data.row_len, cfg.data.batch_rows
    ids = [b.ids.to(device) for b in synthetic_batches("text", 4, B, L, a.vocab, 1, (1, 1))]
    state = {"i": 0}

    def step():
        x = ids[state["i"] % len(ids)]
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = timed_steps(step, device, a.warmup, a.steps)
    n = sum(p.numel() for p in model.parameters()) - a.vocab * m.d_model  # without the embedding lookup
    flops = (6.0 * n + 12.0 * m.n_layers * m.d_model * L) * B * L
    pk = peak(device, a.peak_tflops)
    return {"section": "llama", "setup": name, "rows": "text", "params_M": n / 1e6 + a.vocab * m.d_model / 1e6,
            "batch": f"{B}x{L}", "attention": "sdpa causal", "compile": a.compile, "step_s": dt,
            "tokens_per_s": B * L / dt, "mfu": flops / dt / pk if pk else None,
            "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def bench_attention(a, device) -> list[dict]:
    """fwd+bwd of one attention call at L tokens: flex block mask vs SDPA causal vs SDPA dense mask."""
    import torch.nn.functional as F

    from nextx.masks import block_mask, dense_mask, flex_attention_compiled

    B, H, L, hd = (2, 4, 256, 16) if a.tiny else (8, 16, 4096, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b = synthetic_batches("mixed", 1, B, L, a.vocab, 16, (16, 16) if not a.tiny else (4, 4))[0].to(device)
    q, k, v = (torch.randn(B, H, L, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = []

    def run(fn, backward=True):
        def f():
            y = fn()
            if backward:
                y.sum().backward()
        return f

    t_mask = timed_steps(lambda: dense_mask(b.doc, b.kind, b.split), device, 1, a.steps)
    dense = dense_mask(b.doc, b.kind, b.split)
    can_flex_bwd = device.type == "cuda"  # FlexAttention has no CPU backward (DEPS.md)
    t_bm = timed_steps(lambda: block_mask(b.doc, b.kind, b.split, n_heads=None, _compile=device.type == "cuda"),
                       device, 2, a.steps)
    bm = block_mask(b.doc, b.kind, b.split, n_heads=None, _compile=device.type == "cuda")
    flex = flex_attention_compiled()
    qf, kf, vf = (q, k, v) if can_flex_bwd else (q.detach(), k.detach(), v.detach())
    cases = [("flex block mask", run(lambda: flex(qf, kf, vf, block_mask=bm), can_flex_bwd), t_bm),
             ("sdpa causal", run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), 0.0),
             ("sdpa dense mask", run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)), t_mask)]
    for name, fn, t_build in cases:
        dt = timed_steps(fn, device, a.warmup, a.steps)
        out.append({"section": "attention", "backend": name, "shape": f"B{B} H{H} L{L} hd{hd} {dtype}",
                    "fwd_bwd_ms": dt * 1e3 if (name != "flex block mask" or can_flex_bwd) else None,
                    "fwd_ms": None if (name != "flex block mask" or can_flex_bwd) else dt * 1e3,
                    "mask_build_ms": t_build * 1e3, "mask_sparsity": float(bm.sparsity()) if "flex" in name else None})
    return out


def bench_data(config: str, overrides: list[str], a) -> list[dict]:
    """DataLoader rows/s with 0/1/2 workers vs the rows/s one training step consumes (CPU, the trainer's step)."""
    from nextx.data import build_loader
    from nextx.engine import build_engine
    from nextx.latents import load_image_tokenizer
    from nextx.objective import compute_loss
    from nextx.tokenizer import load_tokenizer
    from nextx.pretrained import build_model

    cfg = load_config(config, overrides + ["dist.engine=plain", "dist.zero_stage=0"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = []
    for nw in (0, 1, 2):
        loader = build_loader(cfg.data, num_workers=nw)
        it = iter(loader)
        for _ in range(2):  # worker start-up and tokenizer loading are not throughput
            next(it)
        t0, rows, docs, toks = time.perf_counter(), 0, 0, 0
        for _ in range(a.data_batches):
            b = next(it)
            rows += b.ids.shape[0]
            docs += b.stats.get("docs", 0)
            toks += int((b.kind != 0).sum())
        dt = time.perf_counter() - t0
        out.append({"section": "data", "workers": nw, "rows_per_s": rows / dt, "docs_per_s": docs / dt,
                    "tokens_per_s": toks / dt, "batches": a.data_batches})
        del it, loader
    text_tok, image_tok = load_tokenizer(cfg.data.text_tokenizer), load_image_tokenizer(cfg.data.image_tokenizer)
    special = SpecialIds.from_tokenizer(text_tok)
    torch.manual_seed(0)
    model = build_model(cfg, text_tok, image_tok)
    eng = build_engine(cfg, model)
    it = iter(build_loader(cfg.data, num_workers=0))
    batches = [next(it) for _ in range(4)]
    gen = torch.Generator()
    state = {"i": 0}

    def step():
        b = batches[state["i"] % 4]
        state["i"] += 1
        gen.manual_seed(state["i"])
        with eng.autocast():
            loss, _ = compute_loss(model, b, cfg.objective, special, attention=cfg.model.attention,
                                   n_heads=cfg.model.n_heads, generator=gen)
        eng.backward(loss)
        eng.step()

    dt = timed_steps(step, "cpu", 2, a.steps)
    out.append({"section": "trainer", "rows_per_s": cfg.data.batch_rows / dt, "step_s": dt,
                "threads": torch.get_num_threads(), "batch": f"{cfg.data.batch_rows}x{cfg.data.row_len}"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU: a smoke test of every section")
    p.add_argument("--setups", default="small,400m", help="comma list of " + ", ".join(SETUPS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--compile", action="store_true", help="torch.compile each nextx block / the whole Llama")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (0: by GPU name)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: nextx,llama,attention")
    p.add_argument("--data", default="", help="config for the data pipeline vs trainer section (CPU)")
    p.add_argument("--data-batches", type=int, default=30)
    p.add_argument("--json", default="", help="also write all records to this JSON file")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for every config")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    records: list[dict] = []

    def emit(r):
        if r is not None:
            records.append(r)
            print(json.dumps(r), flush=True)

    if a.data:
        for r in bench_data(a.data, a.overrides, a):
            emit(r)
    else:
        skip = set(a.skip.split(",")) - {""}
        if a.tiny:
            a.steps, a.warmup, a.vocab = min(a.steps, 3), 1, 256
        for name in a.setups.split(","):
            path, latent_dim, grid = SETUPS[name]
            over = ["dist.engine=plain", "dist.zero_stage=0", "dist.precision=bf16", *a.overrides]
            if a.tiny:
                over += ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                         "model.time_freq_dim=32", "model.attention=sdpa", "data.row_len=256", "data.batch_rows=2",
                         "data.max_text_tokens=64", "dist.precision=fp32"]
                grid = (4, 4)
            elif device.type != "cuda":
                over += ["model.attention=sdpa"]
            cfg = load_config(ROOT / path, over)
            if "nextx" not in skip:
                for kind in ("mixed", "text"):
                    emit(bench_nextx(name, cfg, latent_dim, grid, kind, a, device))
            if "llama" not in skip:
                emit(bench_llama(name, cfg, a, device))
        if "attention" not in skip:
            for r in bench_attention(a, device):
                emit(r)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda"
                                            else "cpu", "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
