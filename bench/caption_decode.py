"""Captioning decode speed vs transformers (not a test): `python bench/caption_decode.py --device cpu|cuda`.

Ours: `nextx.generate.caption` on random image latents — prefill `<bos> <boi> [N clean tokens] <eoi>` into the KV
cache, then greedy decoding of exactly --new-tokens tokens (<eos> suppressed so every row runs to the end).
Reference: `transformers.LlamaForCausalLM.generate` with the same dimensions (hidden, layers, heads, kv heads,
SwiGLU width, vocabulary), randomly initialised, greedy, KV cache, a prompt of the same length (N + 3 ids) and
min_new_tokens = max_new_tokens. Both include the prefill. Tokens/s counts generated tokens of all rows. Every
number comes from one run; each cell is the median of --repeats timed calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nextx.config import ModelConfig
from nextx.model import NextX, ffn_width
from nextx.generate import caption
from nextx.sequence import SpecialIds

SP = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)


def timed(fn, device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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
    p.add_argument("--batches", default="1,8", help="batch sizes")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      time_freq_dim=min(256, a.d_model))
    ours = NextX(cfg, vocab_size=a.vocab, latent_dim=a.latent_dim).to(a.device).eval()
    hf_cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=ffn_width(cfg),
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=4096, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).to(a.device).eval()
    N = a.grid * a.grid
    T = a.new_tokens
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {a.device} ({where})"
          f", d_model {a.d_model}, layers {a.layers}, heads {a.heads}/{a.kv_heads}, vocab {a.vocab}; prompt {N + 3} "
          f"tokens (image {a.grid}x{a.grid}), {T} new tokens, greedy; ours {ours.num_params() / 1e6:.2f}M params, "
          f"transformers {sum(x.numel() for x in hf.parameters()) / 1e6:.2f}M")
    print(f"\n{'batch':<7}{'ours tok/s':>12}{'HF tok/s':>12}{'ours / HF':>11}")
    for B in [int(x) for x in a.batches.split(",")]:
        lat = torch.randn(B, N, a.latent_dim, generator=torch.Generator().manual_seed(B)).mul(0.5).to(a.device)
        ids = torch.randint(5, a.vocab, (B, N + 3), generator=torch.Generator().manual_seed(B)).to(a.device)
        out = {}

        def run_ours():
            out["o"] = caption(ours, lat, SP, grid=(a.grid, a.grid), max_new_tokens=T, suppress=(SP.eos,))

        def run_hf():
            out["h"] = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=T,
                                   min_new_tokens=T, do_sample=False, use_cache=True, pad_token_id=0)

        with torch.no_grad():
            o = timed(run_ours, a.device, a.repeats)
            h = timed(run_hf, a.device, a.repeats)
        assert all(len(x) == T for x in out["o"]) and out["h"].shape[1] == N + 3 + T
        print(f"{B:<7}{B * T / o:>12.1f}{B * T / h:>12.1f}{h / o:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
