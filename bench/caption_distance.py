"""Does a run read its caption by content, or by where the words sit? (diagnostic, not a test)

Every training caption of the demo's data names the object's cell ("a small purple heart in the top left"), so the
colour and shape words always sit a fixed number of positions before the image. A held-out prompt without the cell
("a small purple heart") puts them ~4 positions closer. This draws held-out prompts with the image's 1D RoPE slot
moved GAP positions further from the caption (the drawn image's positions are set in one place,
`nextx.generate.refine`, from the cache's next position; this script wraps it and adds GAP there) and counts, per
prompt kind, what the exact scorer detects: the first object's colour among the detections, exactly one object, none.
If a gap of about the missing words' length brings back the objects of prompts without a cell, and costs the prompts
with one, the model finds the words by their distance (RoPE), not by what they say.

    python bench/caption_distance.py RUN --gaps 0,2,4,6 [--shards HO --split heldout] [--n 1000] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--gaps", default="0,2,4,6", help="comma-separated position gaps between caption and image")
    p.add_argument("--shards", default=None, help="shapes shards whose --split gives the prompts (default: the run's)")
    p.add_argument("--split", default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sampler default)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    gaps = [int(g) for g in a.gaps.split(",")]

    import numpy as np
    import torch

    import nextx.generate as generate
    from data_tools.shapes import parse_caption
    from evals.shapes_eval import held_out_docs
    from evals.shapes_score import detect
    from nextx.checkpoint import load_for_inference
    from nextx.infer import Pipeline, to_pil

    torch.set_num_threads(a.threads)
    model, cfg, text_tok, image_tok, special = load_for_inference(a.run)
    caps = [d.texts[0] for d in held_out_docs(cfg, a.n, a.split, a.shards)]
    nps = [parse_caption(c).nps for c in caps]
    kinds = {"1 object, no cell": [i for i, n in enumerate(nps) if len(n) == 1 and n[0].cell is None],
             "1 object, cell named": [i for i, n in enumerate(nps) if len(n) == 1 and n[0].cell is not None],
             "2 objects": [i for i, n in enumerate(nps) if len(n) == 2]}
    pipe = Pipeline.from_model(model, cfg, text_tok, image_tok, special)
    steps = a.steps or pipe.steps
    refine, gap = generate.refine, [0]

    def moved(model, cache, rows, *args, **kw):
        rows = list(rows)
        cache.pos_next[rows] += gap[0]
        try:
            return refine(model, cache, rows, *args, **kw)
        finally:
            cache.pos_next[rows] -= gap[0]

    generate.refine = moved
    try:
        print(f"{a.run}: {steps} steps, cfg {a.cfg_scale}; per prompt kind: first object's colour detected / exactly "
              f"one object / none / objects per image")
        for g in gaps:
            gap[0] = g
            cells = []
            for name, idx in kinds.items():
                if not idx:
                    continue
                dets = [detect(im) for im in to_pil(pipe.t2i([caps[i] for i in idx], steps=steps,
                                                             cfg_scale=a.cfg_scale, seed=0, batch_size=50))]
                first = np.mean([any(o["colour"] == nps[i][0].colour for o in d) for i, d in zip(idx, dets)])
                cells.append(f"{name} ({len(idx)}): {first:.2f} / {np.mean([len(d) == 1 for d in dets]):.2f} / "
                             f"{np.mean([not d for d in dets]):.2f} / {np.mean([len(d) for d in dets]):.2f}")
            print(f"gap {g:>2}: " + " | ".join(cells), flush=True)
    finally:
        generate.refine = refine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
