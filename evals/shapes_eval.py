"""Compositional evaluation of a trained model on held-out shapes prompts: `nextx eval shapes RUN_DIR`.

For each number of sampling steps: generate one image per held-out prompt (IMM pushforward, or Euler for a flow
model), score every fact of the prompt in the image with the exact scorer (`evals.shapes_score`), and score the
same images against *shuffled* prompts — the chance level of this model's images on this prompt set. Then caption
the held-out images and score the captions' facts against the truth (precision/recall), beside shuffled captions.
Prints a table and writes JSON (--out) with an image grid per step count.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from data_tools.shapes import noun_phrases, part_region, words_fit
from nextx.infer import check_drawing_args, drawing_args, finished_parts, grid_image, to_pil

FACTS = ("count", "colour", "shape", "size", "position", "relation")


def held_out_docs(cfg, n: int, split: str | None = None, shards: str | None = None):
    """The first n documents of `split` (default: the run's held-out split, data.val_split) of `shards` (default:
    the run's val shards)."""
    from nextx.documents import decode_document, iter_raw_samples, shard_paths

    src = shards or cfg.data.val_shards or cfg.data.train_shards
    split = split or cfg.data.val_split
    docs = []
    for raw in iter_raw_samples(shard_paths(src, split)):
        docs.append(decode_document(raw))
        if len(docs) == n:
            break
    if not docs:
        from nextx.errors import UserError

        raise UserError(f"no documents in split {split!r} of {src}")
    return docs


def shown_prompt(caption: str, drawn, written) -> str:
    """The grid's label: what the model was given (the caption, or its parts joined by AND), each with the words
    the model added in brackets."""
    if isinstance(drawn, str):
        return caption + (f" + [{written}]" if written else "")
    return " AND ".join(p + (f" + [{x}]" if x else "") for p, x in zip(drawn, written or [""] * len(drawn)))


@torch.no_grad()
def run_eval(model, cfg, text_tok, image_tok, special, docs, steps_list, *, cfg_scale: float, batch: int,
             seed: int, out: Path | None = None, sampler: str | None = None, shift: float | None = None, clip=None,
             layout: bool = False, captions_too: bool = True, complete: int = 0, temperature: float = 1.0,
             compose: bool = False, regions: bool = False, tries: int = 1, best_of: int = 1) -> dict:
    """Generate and score (module docstring). clip: an `evals.clip_align.Clip` to add CLIPScore of (prompt, image)
    per step count beside the real held-out images' and shuffled prompts', and CLIP similarity of (image, generated
    caption) beside (image, true caption). layout: also draw every prompt's image from another noise, and every noise
    under another (shuffled) prompt, and report how much the foregrounds overlap (`shapes_score.layout_overlap`):
    which of the two decides where things go. sampler, shift: the sampler and the time shift of its t-grid (None:
    the run's, `Pipeline.from_model`). captions_too=False: text-to-image only (res["caption"] is None).
    complete > 0: the model first finishes each prompt in up to `complete` text tokens at `temperature`
    (`Pipeline.t2i`); res["written"]: what it wrote per prompt (the same at every step count: the words are sampled
    before the images' noise); the images are scored against the prompt alone. compose: a prompt of several noun
    phrases is drawn as one image composed of them (`noun_phrases`; relation words are not given to the model),
    each phrase completed on its own; res["drawn_as"]: what the model was given per prompt. regions (with compose):
    each part alone guides the tokens of the cell its finished text names (`part_region`), all parts the rest.
    tries > 1 (with complete): a prompt's words are written again, up to `tries` samples, while they do not fit it
    (`words_fit`); res["words_fit"]: the share of prompts whose final words fit. best_of > 1: each image drawn
    best_of times, the one the model finds likeliest to be captioned by its finished prompt kept (`Pipeline.t2i`).
    res["unknown_token_prompts"]: prompts holding <unk> (words the text tokenizer never saw in training)."""
    from evals.shapes_score import layout_overlap, score_captions
    from nextx.infer import Pipeline
    from nextx.latents import pil_to_tensor

    pipe = Pipeline.from_model(model, cfg, text_tok, image_tok, special)
    sampler = sampler or pipe.sampler
    shift = pipe.shift if shift is None else shift
    captions = [d.texts[0] for d in docs]
    if regions and not compose:
        raise ValueError("regions place the parts of a composed prompt: they need compose=True")
    as_drawn = noun_phrases if compose else (lambda c: c)
    where = (lambda text: part_region(text, image_tok.grid)) if regions else None
    fits = (lambda i, texts: words_fit(captions[i], texts)) if tries > 1 else None
    drawn = [as_drawn(c) for c in captions]
    shuffled = captions[:]
    random.Random(seed).shuffle(shuffled)
    res: dict = {"n": len(docs), "sampler": sampler, "shift": shift, "cfg_scale": cfg_scale, "t2i": {},
                 "complete": complete, "temperature": temperature if complete else None, "prompts": captions,
                 "written": None, "compose": compose, "regions": regions, "tries": tries, "best_of": best_of,
                 "drawn_as": drawn if compose else None, "caption": None,
                 "unknown_token_prompts": sum(text_tok.unk_id in text_tok.encode(c) for c in captions)}
    grids: dict[int, list] = {}
    for k in steps_list:
        t0 = time.perf_counter()
        px, written = pipe.t2i(drawn, steps=k, sampler=sampler, shift=shift, cfg_scale=cfg_scale, seed=seed,
                               batch_size=batch, progress=True, complete=complete, temperature=temperature,
                               return_written=True, regions=where, accept=fits, tries=tries, best_of=best_of)
        ims = to_pil(px)
        if complete:
            res["written"] = written
            res["words_fit"] = sum(words_fit(c, finished_parts(d, w)) for c, d, w in zip(captions, drawn, written)) / len(docs)
        t_gen = time.perf_counter() - t0
        res["t2i"][k] = {**score_with_chance(ims, captions, seed), "seconds": time.perf_counter() - t0,
                         "gen_seconds": t_gen}
        if clip is not None:
            from evals.clip_align import frechet_distance, rank_correlation
            from evals.shapes_score import score_image

            per_image = clip.score(ims, captions)
            exact = [sum(r["n_correct"].values()) / max(1, sum(r["n_facts"].values()))
                     for r in (score_image(im, c) for im, c in zip(ims, captions))]
            res["t2i"][k]["clipscore"] = float(per_image.mean())
            res["t2i"][k]["clipscore_vs_exact_spearman"] = rank_correlation(per_image.tolist(), exact)
            res["t2i"][k]["clipscore_shuffled"] = float(clip.score(ims, shuffled).mean())
            res["t2i"][k]["fd"] = frechet_distance(clip, [d.images[0].pixels for d in docs], ims)
        if layout:
            kw = dict(steps=k, sampler=sampler, shift=shift, cfg_scale=cfg_scale, batch_size=batch,
                      complete=complete, temperature=temperature, regions=where)
            other_prompt = to_pil(pipe.t2i([as_drawn(c) for c in shuffled], seed=seed, **kw))  # same noise
            other_noise = to_pil(pipe.t2i(drawn, seed=seed + 1, **kw))                # same prompt, other noise
            res["t2i"][k]["layout"] = {"same_noise_other_prompt": layout_overlap(ims, other_prompt),
                                       "same_prompt_other_noise": layout_overlap(ims, other_noise)}
        grids[k] = ims
        if out is not None:
            grid_image(ims[:32], cols=8, scale=2).save(out / f"t2i_{k}step.png")
    truth = pil_to_tensor([d.images[0].pixels for d in docs], image_tok.image_size)
    if layout:                                   # real scenes: the same prompt's own image vs another scene's
        real = [d.images[0].pixels for d in docs]
        res["layout_real_other_scene"] = layout_overlap(real, real[1:] + real[:1])
    gen_caps = None
    if captions_too:
        gen_caps = pipe.caption(truth, max_new_tokens=cfg.data.max_text_tokens, batch_size=batch, progress=True)
        objs = [d.meta["objects"] for d in docs]
        cap = score_captions(gen_caps, objs, captions)
        sh = gen_caps[:]
        random.Random(seed + 1).shuffle(sh)
        cap_chance = score_captions(sh, objs, captions)
        res["caption"] = {"precision": cap["precision"], "recall": cap["recall"], "f1": cap["f1"],
                          "parsed": cap["parsed"], "chance_precision": cap_chance["precision"],
                          "chance_recall": cap_chance["recall"],
                          "examples": [{"truth": a, "generated": b} for a, b in list(zip(captions, gen_caps))[:8]]}
    if clip is not None:
        real = to_pil(truth)
        from evals.clip_align import fd_floor_ceiling

        ref = [d.images[0].pixels for d in held_out_docs(cfg, len(docs), split=cfg.data.train_split)]  # other scenes
        res["clip"] = {**fd_floor_ceiling(clip, real, ref if len(ref) == len(real) else None, seed),
                       "real_images_clipscore": float(clip.score(real, captions).mean()),
                       "real_images_shuffled_clipscore": float(clip.score(real, shuffled).mean()),
                       "true_caption_similarity": float(clip.score(real, captions).mean())}
        if gen_caps is not None:
            res["clip"]["generated_caption_similarity"] = float(clip.score(real, gen_caps).mean())
    if out is not None and grids:
        cols = grid_columns(captions, N_GRID_COLS)
        shown = [shown_prompt(c, d, w) for c, d, w in zip(captions, drawn, res["written"] or [None] * len(drawn))]
        labelled_grid([[grids[k][i] for i in cols] for k in grids], [shown[i] for i in cols],
                      [f"{k} step{'s' if k > 1 else ''}" for k in grids]).save(out / "t2i_grid.png")
        res["grid"] = str(out / "t2i_grid.png")
    return res


N_GRID_COLS = 8


def grid_columns(captions: list[str], n: int) -> list[int]:
    """Indices of up to n prompts for the labelled grid: single-object prompts first, then two-object ones."""
    from data_tools.shapes import parse_caption

    n_obj = [len(parse_caption(c).nps) for c in captions]
    ones = [i for i in range(len(captions)) if n_obj[i] == 1][: n // 2 + n % 2]
    rest = sorted((i for i in range(len(captions)) if n_obj[i] != 1), key=lambda i: (n_obj[i], i))[: n - len(ones)]
    return ones + rest


def score_with_chance(ims: list, captions: list[str], seed: int) -> dict:
    """Exact scores of generated images against their prompts, and against shuffled prompts (chance), overall and
    per number of objects the prompt names (`by_objects[n]`: chance shuffles among the n-object prompts only, so
    within a group the count fact's chance equals its accuracy: it reads "exactly n objects drawn")."""
    from data_tools.shapes import parse_caption
    from evals.shapes_score import score_t2i

    def one(idx: list[int], salt: int, outcomes: bool = False) -> dict:
        caps = [captions[i] for i in idx]
        sh = caps[:]
        random.Random(seed + salt).shuffle(sh)
        sub = [ims[i] for i in idx]
        real, chance = score_t2i(sub, caps), score_t2i(sub, sh)
        return {"n": len(idx), "accuracy": real["accuracy"], "all_correct": real["all_correct"],
                "chance_accuracy": chance["accuracy"], "chance_all_correct": chance["all_correct"],
                **({"single_outcomes": real["single_outcomes"], "single_one_by_cell": real["single_one_by_cell"]}
                   if outcomes else {})}

    res = one(list(range(len(captions))), 0, outcomes=True)   # what was drawn for the one-object prompts: once
    n_obj = [len(parse_caption(c).nps) for c in captions]
    res["by_objects"] = {n: one([i for i, m in enumerate(n_obj) if m == n], n) for n in sorted(set(n_obj))}
    return res


def labelled_grid(rows: list[list], col_labels: list[str], row_labels: list[str] | None = None, scale: int = 3):
    """Rows of same-size images -> one PNG-ready image: each cell `scale`x larger, the column's prompt written
    (wrapped) under the last row, an optional label left of each row."""
    import textwrap

    from PIL import Image as PILImage, ImageDraw, ImageFont

    w, h = rows[0][0].size
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(8, cw // 6)
    wrapped = [textwrap.wrap(c, chars) for c in col_labels]
    text_h = 12 * max(1, max(len(x) for x in wrapped)) + 6
    left = 60 if row_labels else 0
    g = PILImage.new("RGB", (left + len(col_labels) * (cw + 4), len(rows) * (ch + 4) + text_h), "white")
    d = ImageDraw.Draw(g)
    for r, row in enumerate(rows):
        if row_labels:
            d.text((4, r * (ch + 4) + ch // 2 - 6), row_labels[r], fill="black", font=font)
        for c, im in enumerate(row):
            g.paste(im.resize((cw, ch), PILImage.NEAREST), (left + c * (cw + 4), r * (ch + 4)))
    for c, lines in enumerate(wrapped):
        for j, line in enumerate(lines):
            d.text((left + c * (cw + 4), len(rows) * (ch + 4) + 2 + 12 * j), line, fill="black", font=font)
    return g


def t2i_table(res: dict, sampler: str) -> str:
    """The text-to-image part of a result as text: all prompts, then per number of objects; chance in brackets."""
    grid = f", t-grid shift {res['shift']:g}" if res.get("shift", 1.0) != 1.0 else ""
    done = (", each prompt of several objects drawn as its noun phrases composed (relation words not given)"
            if res.get("compose") else "")
    done += ", each part guiding the cell its words name (regions)" if res.get("regions") else ""
    done += (f", the best of {res['best_of']} images by the model's own caption likelihood of the prompt"
             if res.get("best_of", 1) > 1 else "")
    done += (f", each prompt{' part' if res.get('compose') else ''} first finished by the model in up to "
             f"{res['complete']} tokens at temperature {res['temperature']:g}" if res.get("complete") else "")
    lines = [f"text-to-image on {res['n']} held-out prompts ({sampler}{grid}, cfg {res['cfg_scale']}{done}): fact "
             "accuracy of the prompt's own facts (chance = same images vs shuffled prompts)",
             f"{'steps':>5} {'prompts':>9} " + " ".join(f"{f:>13}" for f in FACTS) + f" {'all facts':>13}"]

    def row(k, label, r):
        cells = [f"{r['accuracy'][f]:.2f} ({r['chance_accuracy'].get(f, float('nan')):.2f})" if f in r["accuracy"]
                 else "-" for f in FACTS]
        return (f"{k:>5} {label:>9} " + " ".join(f"{c:>13}" for c in cells)
                + f" {r['all_correct']:.2f} ({r['chance_all_correct']:.2f})".rjust(14))

    for k, r in res["t2i"].items():
        lines.append(row(k, f"all {r['n']}", r))
        for n, rn in r.get("by_objects", {}).items():
            lines.append(row("", f"{n}-obj {rn['n']}", rn))
    outs = [(k, r["single_outcomes"]) for k, r in res["t2i"].items() if r.get("single_outcomes")]
    if outs:
        lines.append("what was drawn for the one-object prompts (share of images), by steps:")
        for k, o in outs:
            by_cell = res["t2i"][k].get("single_one_by_cell", {})
            lines.append(f"{k:>5}  " + ", ".join(f"{name} {v:.2f}" for name, v in o.items())
                         + "".join(f"; exactly one, {c} ({b['n']}): {b['one']:.2f}" for c, b in by_cell.items()))
    if res.get("written"):
        w = res["written"]
        added = [(c, x) for c, x in zip(res["prompts"], w) if (any(x) if isinstance(x, list) else x)]
        lines.append(f"the model added words to {len(added)} of {len(w)} prompts, e.g. " + "; ".join(
            f"{c!r} + {x!r}" for c, x in added[:3]))
        if "words_fit" in res:
            lines.append(f"the final words fit {res['words_fit']:.2f} of the prompts (every part names a cell, no "
                         f"two the same, the prompt's relation holds; up to {res.get('tries', 1)} samples)")
    return "\n".join(lines)


def format_table(res: dict) -> str:
    lines = [t2i_table(res, res["sampler"])]
    if "layout_real_other_scene" in res:
        lines.append("what decides the layout (foreground IoU): " + ", ".join(
            f"{k} step{'s' if k > 1 else ''}: same noise + other prompt {r['layout']['same_noise_other_prompt']:.2f}"
            f" / same prompt + other noise {r['layout']['same_prompt_other_noise']:.2f}"
            for k, r in res["t2i"].items()) + f"; two real scenes {res['layout_real_other_scene']:.2f}")
    if res.get("unknown_token_prompts"):
        lines.append(f"WARNING: {res['unknown_token_prompts']} of {res['n']} prompts hold <unk>: words the text "
                     "tokenizer never saw. Train it on captions that use every word of the language (e.g. shards "
                     "with multi-object scenes)")
    c = res["caption"]
    if c is not None:
        lines.append(f"captioning: precision {c['precision']:.3f} (shuffled {c['chance_precision']:.3f}), recall "
                     f"{c['recall']:.3f} (shuffled {c['chance_recall']:.3f}), parsed {c['parsed']:.3f}")
    if "clip" in res:
        cl = res["clip"]
        lines.append("CLIPScore (prompt, image), 100 max(cos, 0): " + ", ".join(
            f"{k} step{'s' if k > 1 else ''} {r['clipscore']:.1f} (shuffled {r['clipscore_shuffled']:.1f})"
            for k, r in res["t2i"].items()) + f"; real held-out images {cl['real_images_clipscore']:.1f} "
            f"(shuffled {cl['real_images_shuffled_clipscore']:.1f})")
        lines.append("CLIP similarity (image, caption): " + (f"generated {cl['generated_caption_similarity']:.1f}, "
                     if "generated_caption_similarity" in cl else "") + f"true {cl['true_caption_similarity']:.1f}")
        lines.append("Frechet distance to the held-out images in CLIP features: " + ", ".join(
            f"{k} step{'s' if k > 1 else ''} {r['fd']:.3f}" for k, r in res["t2i"].items())
            + f" (floor, other real scenes {cl['floor_real_vs_real']:.3f}; ceiling, real vs noise "
            f"{cl['ceiling_real_vs_noise']:.3f})")
    for e in (c["examples"] if c else [])[:4]:
        lines.append(f"  truth: {e['truth']!r:60} generated: {e['generated']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx eval shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (or checkpoint dir) of a model trained on shapes shards")
    p.add_argument("--steps", default="1,2,4,8", help="comma-separated sampling step counts")
    p.add_argument("--n", type=int, default=200, help="held-out prompts")
    p.add_argument("--split", default=None, help="shard split to take prompts from (default: the run's held-out "
                   "split; 'train' with --shards of another seed: new scenes of the training distribution)")
    p.add_argument("--shards", default=None, help="shapes shard dir to take prompts from (default: the run's val "
                   "shards)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--sampler", default=None, choices=["pushforward", "restart", "euler"],
                   help="default: euler for flow runs, the run's objective.imm_sampler for IMM")
    p.add_argument("--shift", type=float, default=None, help="time shift of the sampler's t-grid (default: the run's "
                   "objective.t_shift; 1 = plain linspace)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action="store_true", help="the export's EMA weights (runs trained with optim.ema_decay)")
    p.add_argument("--out", default=None, help="dir for eval.json and grids (default: RUN/eval_shapes)")
    p.add_argument("--clip", default=None, help="add CLIPScore: an open_clip folder (`nextx clip train` output) or "
                   "an architecture name with --clip-pretrained")
    p.add_argument("--clip-pretrained", default=None, help="local open_clip weights file for --clip NAME")
    p.add_argument("--no-captions", dest="captions", action="store_false", help="text-to-image only: skip "
                   "captioning the held-out images (faster)")
    drawing_args(p)
    p.add_argument("--layout", action="store_true", help="also measure what decides the layout: foreground overlap "
                   "of images from the same noise under another prompt, and of the same prompt from another noise")
    a = p.parse_args(argv)
    check_drawing_args(p, a)
    if a.n < 1 or a.batch < 1 or a.cfg_scale < 0:
        p.error(f"--n and --batch must be >= 1 and --cfg-scale >= 0, got {a.n}, {a.batch}, {a.cfg_scale}")
    if a.shift is not None and a.shift <= 0:
        p.error(f"--shift must be > 0 (1 = no shift), got {a.shift}")
    try:
        steps = [int(x) for x in a.steps.split(",")]
    except ValueError:
        p.error(f"--steps must be comma-separated integers like 1,2,4,8, got {a.steps!r}")
    if min(steps) < 1:
        p.error(f"--steps must be >= 1, got {a.steps!r}")
    clip = None
    if a.clip:
        from evals.clip_align import Clip

        clip = Clip.load(a.clip, a.clip_pretrained)
    from nextx.checkpoint import load_for_inference

    model, cfg, text_tok, image_tok, special = load_for_inference(a.run, ema=a.ema)
    out = Path(a.out or Path(a.run) / "eval_shapes")
    out.mkdir(parents=True, exist_ok=True)
    docs = held_out_docs(cfg, a.n, a.split, a.shards)
    res = run_eval(model, cfg, text_tok, image_tok, special, docs, steps, cfg_scale=a.cfg_scale, batch=a.batch,
                   seed=a.seed, out=out, sampler=a.sampler, shift=a.shift, clip=clip, layout=a.layout,
                   captions_too=a.captions, complete=a.complete, temperature=a.temperature, compose=a.compose,
                   regions=a.regions, tries=a.tries, best_of=a.best_of)
    (out / "eval.json").write_text(json.dumps(res, indent=2))
    print(format_table(res))
    print(f"-> {out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
