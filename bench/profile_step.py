"""Where one training step's time goes (not a test): torch.profiler over mixed steps at a config's dims, CPU.

    python bench/profile_step.py configs/demo.yaml [--steps 20] [--threads 2] [--eager] [--real] [key=value ...]

Synthetic packed rows of the config's row_len and batch_rows (caption+image documents, half caption->image, as
bench/train_throughput.py builds them), or with --real the config's own data (shards, tokenizers, t2i_ratio,
packing); the config's objective, engine and dist.precision (autocast, as the trainer). Prints the median step
time, the share of the IMM target pass (no-grad forward), the generated images a step and per second, and the top
operators by self CPU time. The config's dist.compile is used (compiled blocks: the first steps compile and are not
timed); --eager forces dist.compile=false.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.train_throughput import SP, synthetic_batches
from nextx.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--latent-dim", type=int, default=48)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--eager", action="store_true", help="dist.compile=false whatever the config says")
    p.add_argument("--real", action="store_true", help="batches from the config's train shards and tokenizers "
                   "(its t2i_ratio, max_text_tokens, packing) instead of synthetic rows")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    from nextx import objective
    from nextx.engine import PlainEngine, compile_blocks
    from nextx.model import NextX

    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, ["dist.engine=plain", "dist.zero_stage=0", *a.overrides,
                                 *(["dist.compile=false"] if a.eager else [])])
    torch.manual_seed(0)
    special = SP
    if a.real:
        from nextx.data import build_loader
        from nextx.latents import load_image_tokenizer
        from nextx.sequence import SpecialIds
        from nextx.tokenizer import load_tokenizer

        text_tok = load_tokenizer(cfg.data.text_tokenizer)
        special = SpecialIds.from_tokenizer(text_tok)
        a.vocab, a.latent_dim = text_tok.vocab_size, load_image_tokenizer(cfg.data.image_tokenizer).token_dim
        it = iter(build_loader(cfg.data, num_workers=0))
        batches = [next(it) for _ in range(4)]
    else:
        batches = synthetic_batches("mixed", 4, cfg.data.batch_rows, cfg.data.row_len, a.vocab, a.latent_dim,
                                    (a.grid, a.grid))
    model = NextX(cfg.model, vocab_size=a.vocab, latent_dim=a.latent_dim)
    if cfg.dist.compile:
        compile_blocks(model, torch.device("cpu"))
    eng = PlainEngine(cfg, model)
    gen = torch.Generator()
    target_s: list[float] = []
    orig = objective._target_pass

    def timed_target(*args, **kw):
        t0 = time.perf_counter()
        out = orig(*args, **kw)
        target_s.append(time.perf_counter() - t0)
        return out

    objective._target_pass = timed_target

    def step(i: int) -> float:
        t0 = time.perf_counter()
        gen.manual_seed(i)
        with eng.autocast():  # dist.precision, as the trainer runs it
            loss, _ = objective.compute_loss(model, batches[i % 4], cfg.objective, special,
                                             attention=cfg.model.attention, n_heads=cfg.model.n_heads,
                                             generator=gen, step=i)
        eng.backward(loss)
        eng.step()
        return time.perf_counter() - t0

    for i in range(8 if cfg.dist.compile else 3):  # compiled: both grad modes and every batch shape traced
        step(i)
    target_s.clear()
    gen_images = statistics.mean(int(b.image_generate.sum()) for b in batches)  # as the trainer counts them
    times = [step(i) for i in range(a.steps)]
    med = statistics.median(times)
    lens = sorted({b.ids.shape[1] for b in batches})  # data.trim_pads cuts batches below row_len
    print(f"{a.config}: median step {med * 1e3:.0f} ms over {a.steps} steps ({cfg.data.batch_rows}x"
          f"{'/'.join(map(str, lens))} tokens, {a.threads} threads, "
          f"{'compiled' if cfg.dist.compile else 'eager'} blocks); "
          f"IMM target pass "
          f"{statistics.median(target_s) * 1e3 if target_s else 0:.0f} ms "
          f"({(statistics.median(target_s) if target_s else 0) / med:.0%}); {gen_images:.1f} generated images a step "
          f"-> {gen_images / med:.0f} images/s")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(5):
            step(i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
