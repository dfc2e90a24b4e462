"""Learning proof on CPU: overfit a few fixed shapes images with their captions, then generate them back.

`nextx eval overfit --out runs/overfit` (issue 3 acceptance). Steps:
  1. data: the first --n-images shapes scenes (train split, seed 0, 32 px) as shards; a text tokenizer and a
     pixel tokenizer built from 1000 other scenes (the tokenizers must not be fitted to the 8 images only);
  2. train configs/tiny.yaml on those shards (both directions: caption->image and image->caption);
  3. for each caption, generate its image with 1 and 2 IMM steps (reference sampler, no guidance) and measure
     the per-pixel MSE against the true image, beside two baselines: the decoded initial noise, and the mean
     MSE between the true image and the *other* training images (what a caption-blind model would reach);
  4. caption each training image greedily and count exact matches with its caption.
Writes report.json and a PNG grid (rows: truth, 1 step, 2 steps) into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from nextx.cli import _call
from nextx.infer import grid_image, to_pil


def prepare(out: Path, n_images: int, size: int) -> dict[str, Path]:
    """Shards of the first n training scenes + tokenizers fitted on 1000 other scenes."""
    from data_tools.shapes import make_documents
    from nextx.documents import write_shards

    paths = {"shards": out / "data", "fit": out / "fit", "text": out / "tok_text", "pixel": out / "tok_pixel"}
    if not paths["shards"].exists():
        write_shards(make_documents(n_images, 0, size, "train"), paths["shards"], split="train", progress=False)
    if not paths["fit"].exists():
        write_shards(make_documents(1000, 1, size, "train"), paths["fit"], split="train", progress=False)
    if not paths["text"].exists():
        _call("tokenizers/text/train_spm.py", ["--shards", str(paths["fit"]), "--out", str(paths["text"]),
                                               "--vocab-size", "256"], "nextx tokenizer text")
    if not paths["pixel"].exists():
        _call("tokenizers/image/pixel_stats.py", ["--shards", str(paths["fit"]), "--out", str(paths["pixel"]),
                                                  "--image-size", str(size), "--patch-size", "4"],
              "nextx tokenizer pixel")
    return paths


@torch.no_grad()
def evaluate(model, text_tok, image_tok, special, docs, *, steps=(1, 2), seed: int = 0) -> tuple[dict, list]:
    from nextx.infer import Pipeline
    from nextx.latents import pil_to_tensor

    pipe = Pipeline(model, text_tok, image_tok, special)                        # puts the model in eval mode
    captions = [d.texts[0] for d in docs]
    truth = pil_to_tensor([d.images[0].pixels for d in docs], image_tok.image_size)        # (n, 3, H, W)
    n = len(docs)
    report: dict = {"n_images": n}
    rows = [to_pil(truth)]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, image_tok.grid[0] * image_tok.grid[1], image_tok.token_dim), generator=g) * 0.5
    noise_img = image_tok.decode(noise)
    others = [float(((truth[i] - truth[j]) ** 2).mean()) for i in range(n) for j in range(n) if i != j]
    report["mse_noise_baseline"] = float(((noise_img - truth) ** 2).mean())
    report["mse_other_image_baseline"] = float(np.mean(others))
    for k in steps:
        img = pipe.t2i(captions, steps=k, cfg_scale=1.0, seed=seed, batch_size=n)
        per = ((img - truth) ** 2).mean(dim=(1, 2, 3))
        report[f"mse_{k}_step"] = float(per.mean())
        report[f"mse_{k}_step_max"] = float(per.max())
        rows.append(to_pil(img))
    gen_caps = pipe.caption(truth, max_new_tokens=48, batch_size=n)
    report["caption_exact_match"] = float(np.mean([a == b for a, b in zip(gen_caps, captions)]))
    report["captions"] = [{"truth": a, "generated": b} for a, b in zip(captions, gen_caps)]
    return report, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx eval overfit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/overfit", help="output dir (data, tokenizers, run, report.json, grid)")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    p.add_argument("--n-images", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--objective", default="imm", choices=["imm", "flow"])
    p.add_argument("--image-weight", type=float, default=None,
                   help="lambda_image (default: 200 for imm, 4 for flow; see README 'Loss balance')")
    p.add_argument("--k-ramp", type=float, default=2 / 3,
                   help="imm: k rises from 0 to objective.k over this fraction of the steps (0 = fixed k; README "
                        "\"Learning proofs\": IMM's induction depth)")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    a = p.parse_args(argv)
    if not 0.0 <= a.k_ramp <= 1.0:
        p.error(f"--k-ramp must be a fraction in [0, 1], got {a.k_ramp}")

    from nextx.config import load_config
    from nextx.documents import decode_document, iter_raw_samples, shard_paths
    from nextx.train import train

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = prepare(out, a.n_images, a.size)
    over = [f"data.train_shards={paths['shards']}", f"data.text_tokenizer={paths['text']}",
            f"data.image_tokenizer={paths['pixel']}", f"run_dir={out}", "name=run", f"train.steps={a.steps}",
            f"objective.kind={a.objective}", "objective.cfg_drop=0.0", "data.resample=true",
            "data.shuffle_buffer=16", "data.pack_buffer=8", "train.save_every=0", "train.resume=never",
            "train.if_exists=overwrite", "optim.schedule=cosine",
            "optim.min_lr_ratio=0.05",
            f"objective.image_weight={a.image_weight or (200.0 if a.objective == 'imm' else 4.0)}"]
    if a.objective == "imm" and a.k_ramp > 0:
        over.append(f"objective.k_ramp_steps={max(1, round(a.k_ramp * a.steps))}")
    cfg = load_config(a.config, over + list(a.overrides))
    s = train(cfg)
    docs = [decode_document(x) for x in iter_raw_samples(shard_paths(paths["shards"], "train"))]
    docs.sort(key=lambda d: d.key)
    report, rows = evaluate(s["model"], s["text_tok"], s["image_tok"], s["special"], docs)
    report.update({"objective": a.objective, "k": cfg.objective.k, "k_ramp_steps": cfg.objective.k_ramp_steps,
                   "batch_rows": cfg.data.batch_rows, "train_steps": s["step"], "final_parts": s["parts"],
                   "train_seconds": s["seconds"], "total_seconds": time.perf_counter() - t0})
    (out / "report.json").write_text(json.dumps(report, indent=2))
    grid_image([im for r in rows for im in r], cols=len(rows[0]), scale=3).save(out / "overfit_grid.png")
    print(json.dumps({k: v for k, v in report.items() if k != "captions"}, indent=2))
    for c in report["captions"]:
        print(f"  truth: {c['truth']!r}\n  model: {c['generated']!r}")
    print(f"report: {out / 'report.json'}, grid: {out / 'overfit_grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
