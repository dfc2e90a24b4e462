"""How the exact shapes scorer holds up on degraded renders: per-fact accuracy of ground-truth renders scored against
their own captions, clean, blurred (Gaussian, radius 0.5 and 1) and with patch noise (4x4 patches shifted in colour,
the texture of generated images), at 32 px. Also the scorer on junk images (uniform noise): what per-fact numbers
a generator that draws nothing would get.

    python bench/scorer_robustness.py --n 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.shapes import make_documents  # noqa: E402
from evals.shapes_score import FACT_TYPES, score_t2i  # noqa: E402


def patch_noise(im: Image.Image, sigma: float, patch: int, rng: np.random.Generator) -> Image.Image:
    """Every patch x patch block shifted by its own N(0, sigma^2) RGB offset (generated images are built of patches)."""
    x = np.asarray(im, np.float32)
    h, w, _ = x.shape
    off = rng.normal(0, sigma, (h // patch, w // patch, 3)).repeat(patch, 0).repeat(patch, 1)
    return Image.fromarray(np.clip(x + off, 0, 255).round().astype(np.uint8))


def conditions(seed: int):
    rng = np.random.default_rng(seed)
    return {"clean": lambda im: im,
            "blur r=0.5": lambda im: im.filter(ImageFilter.GaussianBlur(0.5)),
            "blur r=1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
            "patch noise 8": lambda im: patch_noise(im, 8, 4, rng),
            "blur 1 + patch noise 8": lambda im: patch_noise(im.filter(ImageFilter.GaussianBlur(1)), 8, 4, rng)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    docs = list(make_documents(a.n, a.seed + 11, a.size, "train"))
    caps = [d.texts[0] for d in docs]
    print(f"{'condition':<24}" + "".join(f"{f:>10}" for f in FACT_TYPES) + f"{'all facts':>11}")
    for name, fn in conditions(a.seed).items():
        r = score_t2i([fn(d.images[0].pixels.convert("RGB")) for d in docs], caps)
        print(f"{name:<24}" + "".join(f"{r['accuracy'].get(f, float('nan')):>10.3f}" for f in FACT_TYPES)
              + f"{r['all_correct']:>11.3f}")
    rng = np.random.default_rng(a.seed)
    junk = [Image.fromarray(rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)) for _ in docs]
    r = score_t2i(junk, caps)
    print(f"{'junk (uniform noise)':<24}" + "".join(f"{r['accuracy'].get(f, float('nan')):>10.3f}" for f in FACT_TYPES)
          + f"{r['all_correct']:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
