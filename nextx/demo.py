"""`nextx demo`: the main job end to end on the built-in procedural shapes data, on a CPU, from nothing.

Stages (outputs under --data, default data/, and --run-dir, default runs/):
  1. shapes shards      nextx data shapes --out data/shapes32 --n 8000 --object-weights 1,0,0 --position-rate 1
                        --position-jitter 0 (single-object training scenes whose captions all say where, each
                        object at its cell's centre; held-out prompts unchanged)
  2. text tokenizer     nextx tokenizer text --shards data/shapes32 --text-file data/shapes32/language.txt
                        --out data/tok/text (language.txt spells every word, so two-object prompts hold no <unk>)
  3. image tokenizer    nextx tokenizer pixel --shards data/shapes32 --out data/tok/pixel32 (4x4 patches, 8x8 grid)
  4. pipeline check     the recipe's DataLoader: packed batches, packing efficiency, rows/s, bad samples
  5. scorer self-check  ground-truth renders vs shuffled captions, per fact type
  6. training           configs/demo.yaml (the tiny model, IMM with the k curriculum) for --minutes -> runs/demo
  7. evaluation         held-out prompts at 1/2/4/8 IMM steps, guidance 2, a prompt of several objects drawn as its
                        noun phrases composed, each finished by the model in up to 8 tokens (written again, up to
                        8 samples, while the words do not fit the prompt), each part guiding the cell it names
                        (exact fact accuracy of the prompt's facts vs chance, overall and per number of objects),
                        each image the best of 4 draws by the model's own caption likelihood of its prompt,
                        the labelled grid, captions beside the truth
  8. the same prompts   at 4 steps as written (no words added, not composed), to show what those change

Re-runs reuse what exists: a data stage whose output directory is there is skipped (it is written under a
`.partial` name and renamed only when complete, so an interrupted stage leaves nothing that looks finished;
shards generated with other settings, e.g. by an older demo, are rebuilt with the tokenizers after them),
and training resumes from the run's last checkpoint (the recipe saves every train.save_every steps; a finished
run returns at once); a run trained with another recipe (an older demo's) is moved aside to runs/demo-N, not
deleted; so is a run trained on shards that were rebuilt. --force rebuilds everything.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from nextx.cli import REPO, _call

_TARGETS = {
    "data shapes": "data_tools.shapes:main",
    "tokenizer text": "tokenizers/text/train_spm.py",
    "tokenizer pixel": "tokenizers/image/pixel_stats.py",
    "eval shapes-selfcheck": "evals.shapes_score:main",
    "train": "nextx.train:main",
    "eval shapes": "evals.shapes_eval:main",
}


def _run(title: str, target: str, argv: list[str]) -> None:
    print(f"\n== {title}\n   $ nextx {target} {' '.join(argv)}", flush=True)
    rc = _call(_TARGETS[target], argv, "nextx " + target)
    if rc:
        raise SystemExit(f"demo: stage '{title}' failed with exit code {rc}")


def _built(title: str, out: Path, force: bool, target: str, argv: list[str]) -> None:
    """Run a stage that writes directory `out` (named by '{out}' in argv) atomically: into out.partial, then
    renamed. Skipped when `out` exists (unless force)."""
    if out.exists() and not force:
        print(f"\n== {title}\n   {out} exists: reused (--force rebuilds)", flush=True)
        return
    tmp = out.with_name(out.name + ".partial")
    for d in (tmp, out):
        if d.exists():
            shutil.rmtree(d)
    _run(title, target, [str(tmp) if x == "{out}" else x for x in argv])
    tmp.rename(out)


POSITION_RATE = 1.0  # every training caption states where its objects are (docs/drawing.md)
POSITION_JITTER = 0.0  # each training object at its cell's centre: the words fix the place, so shape can be learned
CFG_SCALE = 2.0      # guidance of the evaluation: on 1000 held-out prompts of another seed, single-object colour /
                     # position / exactly one .80/.88/.43 at 1, .87/.94/.44 at 2, .89/.97/.39 at 3 (docs/drawing.md)
COMPLETE = 8         # the model first finishes each prompt in up to 8 tokens ("a green star" + "in the top middle"),
                     # then draws: a prompt that leaves the place open gets one chosen in words. With COMPOSE, a
                     # prompt of several objects is drawn as its noun phrases, one image guided by each. On 1000
                     # held-out prompts of another seed, 4 runs: single-object exactly one .84-.89 against .64-.70,
                     # two-object count .40-.47 / position .70-.79 against .22-.33 / .27-.32 from the prompt alone
                     # (docs/drawing.md)
COMPOSE = True
REGIONS = True       # each part of a composed prompt alone guides the cell its words name, all parts the rest
                     # (regional composition); and a prompt's words are written again, up to TRIES samples, while
                     # they do not fit it (a part without a cell, two parts in one cell, cells against the prompt's
                     # relation). The demo run, 1000 held-out prompts of another seed, 4 steps: two-object count .65
                     # against .47, relation .75 (chance .51) against .43, single-object exactly one .79 against
                     # .75 (docs/drawing.md)
TRIES = 8
BEST_OF = 4          # each image drawn 4 times, the one the model itself finds likeliest to be captioned by its
                     # finished prompt kept (`generate.caption_logprob`). The demo run, the same 1000 prompts, 4 steps:
                     # two-object count .77 against .74, relation .86 against .81, three-object count .57 against
                     # .50, single-object exactly one .89 against .87, position .98 against .94; ~2x the
                     # evaluation's time (docs/drawing.md)


def _stale_shards(shards: Path, n: int, weights: str, position_rate: float, position_jitter: float = 1.0) -> str:
    """'' when `shards` is absent or was generated with these settings, else what differs (e.g. an older demo's
    data: the stage is then rebuilt rather than silently reused)."""
    import json

    info = shards / "info.json"
    if not info.exists():
        return ""
    from data_tools.shapes import P_POS, parse_weights

    from data_tools.shapes import LANGUAGE_FILE

    if not (shards / LANGUAGE_FILE).exists():   # before it, the text tokenizer never saw the relation words
        return f"no {LANGUAGE_FILE} (an older generator)"
    got = json.loads(info.read_text())
    want = {"train docs": n, "object_weights": list(parse_weights(weights)), "position_rate": position_rate,
            "position_jitter": position_jitter}
    have = {"train docs": got.get("splits", {}).get("train", {}).get("n_docs"),
            "object_weights": got.get("object_weights"), "position_rate": got.get("position_rate", P_POS),
            "position_jitter": got.get("position_jitter", 1.0)}
    return ", ".join(f"{k} {have[k]} instead of {v}" for k, v in want.items() if have[k] != v)


def _move_other_recipe(run: Path, train_args: list[str], data_changed: str = "") -> Path | None:
    """A run in `run` trained with another recipe (e.g. by an older demo: its model, data, objective, optim, dist
    or seed differ from what stage 6 would train), or on shards the data stages have just rebuilt because they were
    generated with other settings (`data_changed` says which: the paths are the same, the scenes are not), is moved
    aside to the first free runs/demo-N, whole, so stage 6 trains the current recipe on the current data and the
    older run stays readable. Returns where it went (None: nothing moved)."""
    from nextx.config import load_config
    from nextx.rundir import next_free
    from nextx.train import run_conflict

    if data_changed and run.exists():
        why = f"was trained on data generated with other settings ({data_changed})"
    else:
        diff = run_conflict(load_config(train_args[0], train_args[1:]), run)
        if not diff:
            return None
        why = f"was trained with another recipe (it differs in: {', '.join(diff)})"
    to = next_free(run)
    run.rename(to)
    print(f"\n{run} {why}: moved to {to}, nothing deleted; stage 6 trains the current one", flush=True)
    return to


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="where shards and tokenizers go (default: data/)")
    p.add_argument("--n", type=int, default=8000, help="shapes training scenes to generate (default 8000)")
    p.add_argument("--object-weights", default="1,0,0", help="weights of 1/2/3-object training scenes (default "
                   "1,0,0: single-object scenes, which this budget can learn to place; README)")
    p.add_argument("--position-rate", type=float, default=POSITION_RATE, help="probability that a training caption "
                   f"states an object's cell (default {POSITION_RATE}; the held-out prompts keep the language's 0.5)")
    p.add_argument("--position-jitter", type=float, default=POSITION_JITTER, help="share of its cell a training "
                   f"object's centre may move over (default {POSITION_JITTER:g}: at the cell's centre; 1: anywhere in "
                   "the cell, as the held-out scenes)")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="the training recipe")
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help=f"guidance of the evaluation (default "
                   f"{CFG_SCALE:g}: chosen on held-out prompts of another seed, docs/drawing.md)")
    p.add_argument("--complete", type=int, default=COMPLETE, help="text tokens the model may add to each prompt "
                   f"before it draws, in the evaluation (default {COMPLETE}; 0: draw from the prompt alone)")
    p.add_argument("--no-compose", dest="compose", action="store_false", help="evaluate prompts of several "
                   "objects as written, not as their noun phrases composed")
    p.add_argument("--no-regions", dest="regions", action="store_false", help="compose without regions, and keep "
                   "the first words the model writes (no --tries)")
    p.set_defaults(compose=COMPOSE, regions=REGIONS)
    p.add_argument("--best-of", type=int, default=BEST_OF, help="draw each image N times in the evaluation and keep "
                   f"the one the model finds likeliest to be captioned by its prompt (default {BEST_OF}; 1: the first)")
    p.add_argument("--minutes", type=float, default=10.0, help="cap on the training wall time (default 10, so the "
                   "whole demo stays within 15 minutes on a slower 2-core machine); the recipe's train.steps is the "
                   "other bound")
    p.add_argument("--eval-n", type=int, default=200, help="held-out prompts scored at 1/2/4/8 steps")
    p.add_argument("--run-dir", default="runs", help="where the demo run goes (default: runs/demo)")
    p.add_argument("--force", action="store_true", help="rebuild every stage's output and train from scratch")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training recipe")
    a = p.parse_args(argv)
    if not 0.0 <= a.position_jitter <= 1.0:
        p.error(f"--position-jitter must be in [0, 1], got {a.position_jitter}")
    if a.minutes <= 0 or a.n <= 0 or a.eval_n <= 0 or a.cfg_scale < 0 or a.complete < 0 or a.best_of < 1:
        p.error("--minutes, --n, --eval-n and --best-of must be > 0, --cfg-scale >= 0 and --complete >= 0")
    from data_tools.shapes import LANGUAGE_FILE

    d = Path(a.data)
    t0 = time.perf_counter()
    shards, text, pixel = d / "shapes32", d / "tok" / "text", d / "tok" / "pixel32"
    stale = _stale_shards(shards, a.n, a.object_weights, a.position_rate, a.position_jitter)
    if stale and not a.force:
        print(f"\n{shards} was generated with other settings ({stale}): rebuilding the data stages", flush=True)
    rebuild = a.force or bool(stale)
    _built("1. shapes shards (32 px)", shards, rebuild, "data shapes",
           ["--out", "{out}", "--n", str(a.n), "--heldout-n", str(max(a.eval_n, 200)), "--size", "32",
            "--seed", "0", "--object-weights", a.object_weights, "--position-rate", str(a.position_rate),
            "--position-jitter", str(a.position_jitter)])
    _built("2. text tokenizer (SentencePiece BPE)", text, rebuild, "tokenizer text",
           ["--shards", str(shards), "--text-file", str(shards / LANGUAGE_FILE), "--out", "{out}", "--vocab-size",
            "256"])
    _built("3. image tokenizer (4x4 pixel patches, sigma_d = 0.5)", pixel, rebuild, "tokenizer pixel",
           ["--shards", str(shards), "--out", "{out}", "--image-size", "32", "--patch-size", "4"])
    data_over = [f"data.train_shards={shards}", f"data.val_shards={shards}", f"data.text_tokenizer={text}",
                 f"data.image_tokenizer={pixel}"]
    print(f"\n== 4. reading pipeline ({a.config})", flush=True)
    from data_tools.rows import pipeline_check

    pipeline_check(a.config, data_over + a.overrides, n_batches=20)
    _run("5. exact scorer self-check (32 px, the demo's size)", "eval shapes-selfcheck",
         ["--n", "200", "--sizes", "32"])
    run = Path(a.run_dir) / "demo"
    if a.force and run.exists():
        shutil.rmtree(run)
    from nextx.engine import cpu_compiler

    eager = [] if cpu_compiler() else ["dist.compile=false"]
    train_args = [a.config, "name=demo", f"run_dir={a.run_dir}", *data_over, *eager, *a.overrides]
    _move_other_recipe(run, train_args, stale)        # after --force there is no run left to move
    if eager:
        print("\n   no C++ compiler found (g++, or $CXX): compiled blocks (dist.compile) need one, so this run trains "
              "eager blocks, ~1.2x slower a step (fewer steps in --minutes). Install g++ to compile.", flush=True)
    _run(f"6. train ({a.config}, at most {a.minutes:g} min; resumes a run that was interrupted)", "train",
         [*train_args, "--max-minutes", str(a.minutes)])
    out = run / "eval_shapes"
    regions = a.regions and a.compose and a.complete > 0
    words = (", prompts of several objects as their noun phrases composed" if a.compose else "") + (
        f", each prompt first finished by the model (<= {a.complete} tokens)" if a.complete else "") + (
        f", each part guiding the cell it names, words written again (<= {TRIES} samples) until they fit the prompt"
        if regions else "") + (f", the best of {a.best_of} images by the model's own caption likelihood"
                                if a.best_of > 1 else "")
    _run(f"7. held-out prompts: exact fact accuracy at 1/2/4/8 IMM steps (guidance {a.cfg_scale:g}{words}), captions",
         "eval shapes", [str(run), "--n", str(a.eval_n), "--steps", "1,2,4,8", "--cfg-scale", str(a.cfg_scale),
                         "--complete", str(a.complete), *(["--compose"] if a.compose else []),
                         *(["--regions", "--tries", str(TRIES)] if regions else []), "--best-of", str(a.best_of),
                         "--out", str(out)])
    if a.complete or a.compose:
        _run("8. the same prompts at 4 steps drawn from the prompt as written (no words added, not composed)",
             "eval shapes", [str(run), "--n", str(a.eval_n), "--steps", "4", "--cfg-scale", str(a.cfg_scale),
                             "--no-captions", "--out", str(run / "eval_shapes_as_written")])
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s. It wrote:")
    for what, path in (("shards (train + held-out)", shards), ("text tokenizer", text), ("image tokenizer", pixel),
                       ("run: config, metrics.jsonl, checkpoints, exports", run),
                       ("labelled grid: prompts under the columns, one row per step count", out / "t2i_grid.png"),
                       ("scores: eval.json (per fact, per number of objects, chance, captions)", out / "eval.json"),
                       *((("the same prompts as written, 4 steps", run / "eval_shapes_as_written" / "eval.json"),)
                         if a.complete or a.compose else ())):
        print(f"  {what:<70} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
