"""Train the KL autoencoder image tokenizer on shard images and measure it (docs/design.md §7).

    nextx tokenizer image --shards data/emoji64 --out data/tok/ae32 --image-size 32 --downsample 4 --minutes 4
    python tokenizers/image/train_ae.py --shards data/emoji64 --out data/tok/ae64 --image-size 64 --steps 5000

Steps
1. Load the train images (and the --val-split images) into memory as uint8 at --image-size (pil_to_tensor).
   When the val split is missing or empty, the last max(1, min(500, n/10)) train images become the held-out set
   and are not trained on; report.json says so.
2. Train nextx.autoencoder.KLAutoencoder with AdamW on random batches until --steps or --minutes, whichever comes
   first. The lr warms up linearly, then follows a cosine to lr/10 over progress = max(step/steps,
   elapsed/budget), so a time-bounded run still ends at the low lr (the schedule then depends on machine speed).
3. Measure the per-channel mean/std of the posterior means on the train images and save the tokenizer
   (nextx.latents.AutoencoderTokenizer: config.json type kl_ae, stats.json, model.safetensors).
4. Reload the tokenizer from disk and measure on the held-out images: PSNR (dB, pixels in [0, 1], mean over
   images) of decode(encode(x)), against a baseline that shrinks each image to the latent grid with an
   antialiased bilinear resize and enlarges it back bilinearly. The baseline keeps 3 values per grid cell, the
   AE z_channels. Writes OUT/report.json and OUT/recon.png (rows: originals, AE reconstructions, baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __name__ == "__main__":  # run by path: tokenizers/ is not a package, so make `nextx` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from tqdm import tqdm

from nextx.autoencoder import AEConfig, KLAutoencoder, ae_loss, count_params, psnr
from nextx.data import shard_images
from nextx.documents import shard_paths
from nextx.latents import SIGMA_D, AutoencoderTokenizer, ChannelStats, load_image_tokenizer, pil_to_tensor


def load_images(source: str, split: str, size: int, limit: int | None, stats: dict) -> torch.Tensor:
    """Images of a split -> (N, 3, size, size) uint8 (a quarter of float32's memory). Missing split -> N = 0."""
    try:
        paths = shard_paths(source, split or None)
    except FileNotFoundError:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    out, buf = [], []
    for im in shard_images(paths, stats, limit):
        buf.append(im)
        if len(buf) == 256:
            out.append(pil_to_tensor(buf, size).mul_(255).round_().to(torch.uint8))
            buf = []
    if buf:
        out.append(pil_to_tensor(buf, size).mul_(255).round_().to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def lr_at(progress: float, step: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr/10 as progress goes 0 -> 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def bilinear_baseline(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, H, W) -> the same images squeezed to grid x grid (antialiased bilinear) and enlarged back."""
    small = F.interpolate(x, size=(grid, grid), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255).contiguous(memory_format=torch.channels_last)  # channels_last: ~25% faster on CPU


def train(model: KLAutoencoder, images: torch.Tensor, a) -> dict:
    """The training loop; returns a summary (steps, seconds, images/s, last-100-step averages)."""
    g = torch.Generator().manual_seed(a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    budget = a.minutes * 60 if a.minutes else math.inf
    max_steps = a.steps or math.inf
    model.train()
    t0, step, recent = time.time(), 0, []
    bar = tqdm(total=a.steps, desc="train ae", unit="step")  # total None (time budget only): a counter
    while step < max_steps and time.time() - t0 < budget:
        lr = lr_at(max(step / max_steps, (time.time() - t0) / budget), step, a.lr, a.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x = _float(images[torch.randint(len(images), (a.batch_size,), generator=g)])
        loss, parts = ae_loss(model, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent = (recent + [{k: v.item() for k, v in parts.items()}])[-100:]
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{parts['loss'].item():.4f}", psnr=f"{parts['psnr'].item():.1f}", lr=f"{lr:.1e}")
    bar.close()
    seconds = time.time() - t0
    avg = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]} if recent else {}
    return {"steps": step, "seconds": round(seconds, 1), "images_seen": step * a.batch_size,
            "images_per_s": round(step * a.batch_size / max(seconds, 1e-9), 1),
            "last100": {k: round(v, 5) for k, v in avg.items()}}


@torch.no_grad()
def latent_stats(model: KLAutoencoder, images: torch.Tensor, batch: int = 256) -> dict:
    model.eval()
    acc = ChannelStats()
    for i in range(0, len(images), batch):
        acc.update(model.encode(_float(images[i:i + batch]))[0])
    return {"mean": acc.mean, "std": acc.std, "n_images": len(images)}


@torch.no_grad()
def evaluate(tok, images: torch.Tensor, batch: int = 256) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Held-out PSNR of the tokenizer round trip and of the bilinear baseline; also the first 8 of each."""
    p_ae, p_bl, zs, recs, bases = [], [], [], [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float().div(255)
        z = tok.encode(x)
        rec, base = tok.decode(z), bilinear_baseline(x, tok.grid[0] * tok.latent_patch)
        p_ae.append(psnr(rec, x))
        p_bl.append(psnr(base, x))
        zs.append(z)
        recs.append(rec[:8])
        bases.append(base[:8])
    n = len(images)
    res = {"n_images": n, "psnr_ae_db": round(torch.cat(p_ae).mean().item(), 3),
           "psnr_bilinear_db": round(torch.cat(p_bl).mean().item(), 3),
           "latent_std": round(torch.cat(zs).std().item(), 4)}
    return res, torch.cat(recs)[:8], torch.cat(bases)[:8]


def save_grid(rows: list[torch.Tensor], path: Path, cell: int = 64) -> None:
    """rows of (K, 3, H, W) in [0, 1] -> one PNG, one row each, cells enlarged (nearest) to at least `cell` px."""
    k, s = rows[0].shape[0], rows[0].shape[-1]
    scale = max(1, cell // s)
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*H, K*W)
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    im = PILImage.fromarray(arr)
    im.resize((im.width * scale, im.height * scale), PILImage.NEAREST).save(path)


def heldout_split(train_x: torch.Tensor, val_x: torch.Tensor, val_split: str):
    """(train, held-out, where the held-out images come from): the val split, else the last train images."""
    if len(val_x):
        return train_x, val_x, f"split {val_split!r}"
    if len(train_x) < 2:
        raise ValueError("need at least 2 images when the held-out set comes out of the train split")
    k = max(1, min(500, len(train_x) // 10))
    return train_x[:-k], train_x[-k:], (f"fallback: split {val_split!r} has no images, so the last {k} train "
                                        f"images were held out (not trained on)")


def make_report(a, cfg: AEConfig, tok, summary: dict, res: dict, held: str, n_train: int, stats: dict) -> dict:
    cells = tok.grid[0] * tok.latent_patch
    return {"ae": asdict(cfg), "params": count_params(tok.model), "grid": list(tok.grid), "token_dim": tok.token_dim,
            "compression": round(3 * cfg.image_size ** 2 / (tok.grid[0] * tok.grid[1] * tok.token_dim), 2),
            "train": {**summary, "n_images": n_train, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
                      "threads": torch.get_num_threads(), "skipped_bad_samples": stats.get("bad_sample", 0)},
            "heldout": {"source": held, **res, "baseline": f"bilinear to {cells}x{cells} (antialiased) and back; "
                                                           f"3 values per cell vs the AE's {cfg.z_channels}"},
            "latent_stats": {k: tok.stats[k] for k in ("mean", "std", "sigma_d")}}


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="nextx tokenizer image", description="Train the KL autoencoder image "
                                "tokenizer on shard images; save it with measured latent stats and a report.")
    p.add_argument("--shards", required=True, help="shard dir, .tar file or brace pattern")
    p.add_argument("--split", default="train", help="training split (default: train)")
    p.add_argument("--val-split", default="heldout", help="held-out split for the report (default: heldout)")
    p.add_argument("--out", required=True, help="output tokenizer dir")
    p.add_argument("--force", action="store_true", help="replace what --out already holds")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--downsample", type=int, default=4, help="spatial factor f: 2, 4, 8 or 16 (default 4)")
    p.add_argument("--z-channels", type=int, default=4)
    p.add_argument("--channels", type=int, default=32, help="width of the full-resolution level (default 32)")
    p.add_argument("--n-res", type=int, default=1, help="ResBlocks per level (default 1)")
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--recon-loss", choices=("l1", "l2"), default="l1")
    p.add_argument("--latent-patch", type=int, default=1, help="q: q x q latent patches per token (default 1)")
    p.add_argument("--sigma-d", type=float, default=SIGMA_D, help="latent std to scale to (default 0.5)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: no limit) ...")
    p.add_argument("--minutes", type=float, default=10.0, help="... or this many minutes, whichever first "
                   "(default 10; 0 = no limit)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20, help="linear lr warmup steps (default 20)")
    p.add_argument("--max-images", type=int, default=None, help="train on the first N train images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args(argv)
    from nextx.errors import refuse_existing

    refuse_existing(a.out, a.force, "a tokenizer")
    if not a.steps and not a.minutes:
        p.error("give --steps or --minutes (or both): training needs an end")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    stats: dict = {}
    try:
        cfg = AEConfig(image_size=a.image_size, downsample=a.downsample, z_channels=a.z_channels,
                       channels=a.channels, n_res=a.n_res, kl_weight=a.kl_weight, recon_loss=a.recon_loss)
        train_x = load_images(a.shards, a.split, a.image_size, a.max_images, stats)
        if len(train_x) == 0:
            raise FileNotFoundError(f"no images in {a.shards} for split {a.split!r}")
        val_x = load_images(a.shards, a.val_split, a.image_size, None, {}) if a.val_split else train_x[:0]
        train_x, val_x, held = heldout_split(train_x, val_x, a.val_split)
    except (FileNotFoundError, ValueError) as e:
        print(f"nextx tokenizer image: {e}", file=sys.stderr)
        return 2
    if held.startswith("fallback"):
        print(f"warning: {held}", file=sys.stderr)
    model = KLAutoencoder(cfg).to(memory_format=torch.channels_last)
    print(f"autoencoder: {count_params(model):,} parameters, {len(train_x)} train / {len(val_x)} held-out images, "
          f"{a.image_size} px -> {cfg.latent_size}x{cfg.latent_size}x{cfg.z_channels}")
    summary = train(model, train_x, a)
    lat = {**latent_stats(model, train_x), "sigma_d": a.sigma_d, "source": str(a.shards), "split": a.split}
    AutoencoderTokenizer(model.to(memory_format=torch.contiguous_format), lat, a.latent_patch).save(a.out)
    tok = load_image_tokenizer(a.out)  # measure what was written, not what is in memory
    res, recs, bases = evaluate(tok, val_x)
    out = Path(a.out)
    save_grid([val_x[:8].float() / 255, recs, bases], out / "recon.png")
    report = make_report(a, cfg, tok, summary, res, held, len(train_x), stats)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"saved {out}: {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['images_per_s']:.0f} "
          f"img/s); held-out PSNR {res['psnr_ae_db']:.2f} dB (bilinear baseline {res['psnr_bilinear_db']:.2f} dB) "
          f"on {res['n_images']} images ({held}); held-out latent std {res['latent_std']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
