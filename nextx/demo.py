"""`nextx demo`: the main job end to end on the built-in procedural shapes data, on a CPU, from nothing.

Stages (each skipped when its output already exists, unless --force; outputs under --data, default data/):
  1. shapes shards      nextx data shapes --out data/shapes32 --n 2000 --size 32
  2. text tokenizer     nextx tokenizer text --shards data/shapes32 --out data/tok/text
  3. image tokenizer    nextx tokenizer pixel --shards data/shapes32 --out data/tok/pixel32 (4x4 patches, 8x8 grid)
  4. pipeline check     configs/tiny.yaml's DataLoader: packed batches, packing efficiency, rows/s, bad samples
  5. scorer self-check  ground-truth renders vs shuffled captions, per fact type
  6. training           the tiny model (configs/tiny.yaml) with IMM (k curriculum 0 -> 12) -> runs/demo
  7. evaluation         held-out prompts at 1/2/4/8 IMM steps (exact fact accuracy vs chance), captioning P/R

Every stage prints what it measured; images land in runs/demo/eval_shapes/*.png.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from nextx.cli import _call


def _stage(title: str, out: Path | None, force: bool, argv: list[str], target: str) -> None:
    print(f"\n== {title}", flush=True)
    if out is not None and out.exists() and not force:
        print(f"   {out} exists: reused (--force rebuilds)")
        return
    if out is not None and out.exists():
        shutil.rmtree(out)
    print("   $ nextx " + " ".join(target.split() + argv), flush=True)
    rc = _call(_TARGETS[target], argv, "nextx " + target)
    if rc:
        raise SystemExit(f"demo: stage '{title}' failed with exit code {rc}")


_TARGETS = {
    "data shapes": "data_tools.shapes:main",
    "tokenizer text": "tokenizers/text/train_spm.py",
    "tokenizer pixel": "tokenizers/image/pixel_stats.py",
    "eval shapes-selfcheck": "evals.shapes_score:main",
    "train": "nextx.train:main",
    "eval shapes": "evals.shapes_eval:main",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="where shards and tokenizers go (default: data/)")
    p.add_argument("--n", type=int, default=2000, help="shapes scenes to generate (default 2000)")
    p.add_argument("--force", action="store_true", help="rebuild every stage's output")
    p.add_argument("--steps", type=int, default=600, help="training steps of the tiny IMM model (default 600)")
    p.add_argument("--eval-n", type=int, default=100, help="held-out prompts scored at 1/2/4/8 steps")
    p.add_argument("--run-dir", default="runs", help="where the demo run goes (default: runs/demo)")
    a = p.parse_args(argv)
    d = Path(a.data)
    t0 = time.perf_counter()
    shards, text, pixel = d / "shapes32", d / "tok" / "text", d / "tok" / "pixel32"
    _stage("1. shapes shards (32 px)", shards, a.force,
           ["--out", str(shards), "--n", str(a.n), "--size", "32", "--seed", "0"], "data shapes")
    _stage("2. text tokenizer (SentencePiece BPE)", text, a.force,
           ["--shards", str(shards), "--out", str(text), "--vocab-size", "256"], "tokenizer text")
    _stage("3. image tokenizer (4x4 pixel patches, sigma_d = 0.5)", pixel, a.force,
           ["--shards", str(shards), "--out", str(pixel), "--image-size", "32", "--patch-size", "4"],
           "tokenizer pixel")
    print("\n== 4. reading pipeline (configs/tiny.yaml)", flush=True)
    from data_tools.rows import pipeline_check

    pipeline_check("configs/tiny.yaml", [f"data.train_shards={shards}", f"data.text_tokenizer={text}",
                                         f"data.image_tokenizer={pixel}"], n_batches=20)
    _stage("5. exact scorer self-check", None, True, ["--n", "200"], "eval shapes-selfcheck")
    run = Path(a.run_dir) / "demo"
    ramp = max(1, round(2 * a.steps / 3))  # the k curriculum (README "IMM's induction depth"): 0 -> 12 over 2/3
    _stage(f"6. train the tiny model with IMM ({a.steps} steps, configs/tiny.yaml, k 0 -> 12 over {ramp})",
           run, a.force,
           ["configs/tiny.yaml", "name=demo", f"run_dir={a.run_dir}", f"data.train_shards={shards}",
            f"data.val_shards={shards}", f"data.text_tokenizer={text}", f"data.image_tokenizer={pixel}",
            f"train.steps={a.steps}", "train.log_every=50", f"objective.k_ramp_steps={ramp}"], "train")
    _stage("7. held-out prompts: exact fact accuracy at 1/2/4/8 IMM steps, captions", None, True,
           [str(run), "--n", str(a.eval_n), "--steps", "1,2,4,8"], "eval shapes")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
