"""nextx vs the calibration reference at equal wall time (not a test): one after the other, same shards, same scorer.

    python bench/vs_reference.py --minutes 5                       # flow, caption->image only (the reference's task)
    python bench/vs_reference.py --minutes 5 --shards D --text-tokenizer T --image-tokenizer P   # the demo's data
    python bench/vs_reference.py --minutes 5 --objective imm --steps 4
    python bench/vs_reference.py --minutes 5 --precision bf16 --out runs/vs_reference_bf16   # both in bf16

1. `nextx eval reference` trains the minimal DiT-style flow model (evals/reference.py) for --minutes and scores it
   on the held-out prompts with Euler at --ref-steps.
2. `nextx train configs/demo.yaml` with the same shards and tokenizers, the chosen objective, caption->image
   layouts only (data.t2i_ratio=1.0), batches cut to their longest row rounded up to 2 tokens, not 8
   (data.trim_multiple=2: every row is one ~74-token caption+image, so few shapes to compile; 1.07-1.16x the
   images/s of 8 in two pairs of 1.5-minute runs), for the same wall time; `nextx eval shapes` on the same prompts.
   Scored twice: the prompts as written (what the reference gets), and drawn with nextx's inference procedure, the
   demo's (DRAWING: the model finishes each prompt in up to 8 tokens of its own, written again until the words fit
   the prompt; a prompt of several objects drawn as its noun phrases composed, each guiding the cell it names),
   at the same guidance and steps.
3. Prints images per second of both (the trainer's images_per_s over the run; the reference's count / time) and
   the per-fact accuracy, overall and per number of objects, side by side, and writes vs_reference.json.
--heldout-shards takes the prompts from another shard set's held-out split (e.g. 1000 scenes of another seed:
`nextx data shapes --out HO --n 100 --heldout-n 1000 --seed 1`), for error bars smaller than 29 single-object
prompts give.
Run it on idle cores: the two trainings run one after the other, each in its own process, so they share nothing but
the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FACTS = ("count", "colour", "shape", "size", "position", "relation")
DRAWING = ["--complete", "8", "--tries", "8", "--compose", "--regions"]


def _row(name: str, ips: float, r: dict) -> list[str]:
    rows = [f"{name:<22} {ips:>8.1f}  all      " + " ".join(
        f"{r['accuracy'].get(f, float('nan')):>8.2f}" for f in FACTS) + f" {r['all_correct']:>8.2f}"]
    for n, rn in r.get("by_objects", {}).items():
        rows.append(f"{'':<22} {'':>8}  {n}-obj {rn['n']:>3} " + " ".join(
            f"{rn['accuracy'].get(f, float('nan')):>8.2f}" for f in FACTS) + f" {rn['all_correct']:>8.2f}")
    return rows


def _run(args: list[str], out: str) -> None:
    """`nextx ARGS` in a fresh Python process: each training starts from the same clean state, not from the heap,
    threads and caches the other one left behind."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "nextx.cli", *args])
    if r.returncode:
        raise SystemExit(f"vs_reference: `nextx {' '.join(args[:2])}` failed (exit {r.returncode}); see {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="data/shapes32")
    p.add_argument("--text-tokenizer", default="data/tok/text")
    p.add_argument("--image-tokenizer", default="data/tok/pixel32")
    p.add_argument("--out", default="runs/vs_reference")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--objective", choices=["flow", "imm"], default="flow")
    p.add_argument("--steps", type=int, default=30, help="nextx sampling steps (Euler for flow, pushforward for IMM)")
    p.add_argument("--ref-steps", type=int, default=30, help="the reference's Euler steps")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--heldout-shards", default=None, help="shard set whose held-out split gives the prompts of both "
                   "models (default: those of --shards)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--t-shift", type=float, default=3.0, help="SD3 time shift of both models' training times and "
                   "sampling grids; 3 is the demo recipe's objective.t_shift")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="both models' training precision (bf16: autocast over fp32 weights, attention in fp32 on "
                        "CPU); default: each its own default (the reference fp32, nextx configs/demo.yaml's)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml for the nextx run")
    a = p.parse_args(argv)
    from evals import shapes_eval

    out = Path(a.out)
    ref_dir, run = out / "reference", out / f"nextx_{a.objective}"
    if not (ref_dir / "reference.json").exists():
        _run(["eval", "reference", "--shards", a.shards, "--text-tokenizer", a.text_tokenizer, "--image-tokenizer",
              a.image_tokenizer, "--out", str(ref_dir), "--minutes", str(a.minutes), "--steps", str(a.ref_steps),
              "--n", str(a.n), "--threads", str(a.threads), "--t-shift", str(a.t_shift),
              *(["--heldout-shards", a.heldout_shards] if a.heldout_shards else []),
              *(["--precision", a.precision] if a.precision else [])], a.out)
    ref = json.loads((ref_dir / "reference.json").read_text())
    held = a.heldout_shards or a.shards
    if ref.get("heldout_shards", a.shards) != held:
        raise SystemExit(f"vs_reference: {ref_dir} holds a reference scored on the prompts of "
                         f"{ref.get('heldout_shards', a.shards)}, not of {held}; give another --out")
    obj = ["objective.kind=flow", "objective.image_weight=4"] if a.objective == "flow" else []
    _run(["train", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"), f"name={run.name}",
          f"run_dir={out}", f"data.train_shards={a.shards}", f"data.val_shards={a.shards}",
          f"data.text_tokenizer={a.text_tokenizer}", f"data.image_tokenizer={a.image_tokenizer}",
          "data.t2i_ratio=1.0", "data.trim_multiple=2", f"train.threads={a.threads}", "train.steps=100000",
          "train.save_every=0", f"objective.t_shift={a.t_shift}",
          *obj, *([f"dist.precision={a.precision}"] if a.precision else []), *a.overrides,
          "--max-minutes", str(a.minutes)], a.out)
    prompts = ["--n", str(a.n), "--steps", str(a.steps), "--shards", held, "--split", "heldout", "--no-captions"]
    shapes_eval.main([str(run), *prompts, "--out", str(run / "eval")])
    shapes_eval.main([str(run), *prompts, *DRAWING, "--out", str(run / "eval_drawing")])
    nx = json.loads((run / "eval" / "eval.json").read_text())
    nxd = json.loads((run / "eval_drawing" / "eval.json").read_text())
    if nx["prompts"] != ref.get("prompts", nx["prompts"]):
        raise SystemExit(f"vs_reference: the reference in {ref_dir} was scored on other prompts than nextx's "
                         f"({ref['n']} against {len(nx['prompts'])}); give --n as when it was trained")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "images_per_s" in r]
    nx_ips = sum(r["images"] for r in recs) / sum(r["images"] / r["images_per_s"] for r in recs)
    res = {"minutes": a.minutes, "reference_images_per_s": ref["images_per_s"], "nextx_images_per_s": nx_ips,
           "ratio": nx_ips / ref["images_per_s"], "reference": ref["t2i"][str(a.ref_steps)],
           "nextx": nx["t2i"][str(a.steps)], "nextx_drawing": nxd["t2i"][str(a.steps)], "drawing": DRAWING,
           "heldout_shards": held, "objective": a.objective}
    (out / "vs_reference.json").write_text(json.dumps(res, indent=2))
    print(f"\n{'model':<22} {'images/s':>8}  prompts  " + " ".join(f"{f:>8}" for f in FACTS) + f" {'all':>8}")
    for line in (_row(f"reference ({a.ref_steps} Euler)", ref["images_per_s"], res["reference"])
                 + _row(f"nextx {a.objective} ({a.steps})", nx_ips, res["nextx"])
                 + _row(f"  + nextx's drawing", nx_ips, res["nextx_drawing"])):
        print(line)
    print(f"images/s ratio nextx / reference: {res['ratio']:.2f}  -> {out / 'vs_reference.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
