"""Make a pixel-patch image tokenizer: measure per-channel pixel mean/std on shard images (docs/design.md §7).

    nextx tokenizer pixel --shards data/shapes32 --out data/tok/pixel32 --image-size 32 --patch-size 4
    python tokenizers/image/pixel_stats.py --shards data/shapes32 --out data/tok/pixel32

Reads up to --max-images images of the split (resized as the reader will resize them, nextx.latents.
pil_to_tensor), measures the RGB mean and std, and writes OUT/config.json + OUT/stats.json
(nextx.latents.PixelTokenizer). Then encodes the same images with the saved tokenizer, reloaded from disk, and
prints the latent std it measures, which is sigma_d (0.5) by construction: a check of the whole path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run by path: tokenizers/ is not a package, so make `nextx` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from nextx.data import shard_images
from nextx.documents import shard_paths
from nextx.latents import SIGMA_D, PixelTokenizer, load_image_tokenizer, pil_to_tensor


def _batches(images, size: int, batch: int = 256):
    buf = []
    for im in images:
        buf.append(im)
        if len(buf) == batch:
            yield pil_to_tensor(buf, size)
            buf = []
    if buf:
        yield pil_to_tensor(buf, size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx tokenizer pixel", description="Pixel-patch image tokenizer: measure "
                                "per-channel pixel stats on shard images, write config.json + stats.json.")
    p.add_argument("--shards", required=True, help="shard dir, .tar file or brace pattern")
    p.add_argument("--split", default="train", help="split of a shard dir (default: train; '' = every .tar)")
    p.add_argument("--out", required=True, help="output tokenizer dir")
    p.add_argument("--force", action="store_true", help="replace what --out already holds")
    p.add_argument("--image-size", type=int, default=32, help="side images are resized to (default 32)")
    p.add_argument("--patch-size", type=int, default=4, help="patch side p: tokens of 3*p*p values (default 4)")
    p.add_argument("--max-images", type=int, default=2000, help="measure on the first N images (default 2000)")
    p.add_argument("--sigma-d", type=float, default=SIGMA_D, help="latent std to scale to (default 0.5)")
    a = p.parse_args(argv)
    from nextx.errors import refuse_existing

    refuse_existing(a.out, a.force, "a tokenizer")
    if a.image_size % a.patch_size:
        print(f"nextx tokenizer pixel: --image-size {a.image_size} is not divisible by --patch-size "
              f"{a.patch_size}", file=sys.stderr)
        return 2
    t0 = time.time()
    stats: dict = {}
    try:
        paths = shard_paths(a.shards, a.split or None)
        batches = list(_batches(shard_images(paths, stats, a.max_images), a.image_size))
        if not batches:
            raise ValueError(f"no images in {a.shards} (split {a.split!r})")
        tok = PixelTokenizer.from_pixels(batches, a.patch_size, sigma_d=a.sigma_d, source=str(a.shards),
                                         split=a.split, n_images=sum(len(x) for x in batches))
    except (FileNotFoundError, ValueError) as e:
        print(f"nextx tokenizer pixel: {e}", file=sys.stderr)
        return 2
    tok.save(a.out)
    tok = load_image_tokenizer(a.out)  # check what was written, not what is in memory
    z = torch.cat([tok.encode(x) for x in batches])
    per_ch = z.view(len(z), -1, 3, a.patch_size ** 2).transpose(0, 2).reshape(3, -1)  # (3, values)
    s = tok.stats
    print(f"pixel tokenizer -> {a.out}: {s['n_images']} images at {a.image_size} px "
          f"({stats.get('docs', 0)} docs, skipped {stats.get('bad_sample', 0)} bad samples), "
          f"grid {tok.grid[0]}x{tok.grid[1]}, token_dim {tok.token_dim}, {time.time() - t0:.1f} s")
    print("  pixel mean (rgb) " + " ".join(f"{v:.4f}" for v in s["mean"])
          + "   std " + " ".join(f"{v:.4f}" for v in s["std"]))
    print(f"  latent std after normalisation {z.std().item():.4f} (target sigma_d {a.sigma_d}), mean "
          f"{z.mean().item():+.4f}; per channel std " + " ".join(f"{v:.4f}" for v in per_ch.std(1).tolist()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
