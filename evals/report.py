"""`nextx eval report RUN [--flow FLOW_RUN]`: one command from checkpoints to a full evaluation report.

For the IMM run at 1/2/4/8 sampling steps (and the flow baseline at Euler 8/25/50 when its run is given), on the
same held-out prompts with the same seeds and CFG scale:
  - exact fact accuracy of the generated images (`evals.shapes_score`; shapes shards only) beside chance, overall
    and per number of objects, with all-facts always shown;
  - CLIPScore (prompt, image) and the Frechet distance to the held-out images in a CLIP's image features, with
    their floor and ceiling (`--clip`, an in-domain CLIP from `nextx clip train` or any local open_clip model);
  - generation latency per image at each step count (batch --batch, this machine);
  - captions of the held-out images beside the truth (precision / recall of their facts);
  - held-out text perplexity: of the caption alone (caption -> image layout) and of the caption given its image
    (image -> caption layout), computed by the training objective's own cross-entropy.
It writes into OUT (default RUN/report): report.json, report.md (every table), plots (score vs steps, score vs
latency, FD vs steps) and the labelled sample grids of each model. The trainer's periodic report
(`train.report_every`) calls `evaluate` here on fewer prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

IMM_STEPS = (1, 2, 4, 8)
FLOW_STEPS = (8, 25, 50)
PLOT_FACTS = ("colour", "position", "count", "shape")


@torch.no_grad()
def text_perplexity(model, cfg, text_tok, image_tok, special, docs, *, batch_rows: int = 16) -> dict:
    """Held-out perplexity of the documents' captions under the training objective's own cross-entropy
    (`objective.compute_loss`, no CFG dropout), per layout:
      caption_alone       <bos> caption <boi> [image]: the caption with nothing before it
      caption_given_image <bos> <boi> image <eoi> caption <eos>: the caption of a clean image
    Each doc goes into its own row (no packing neighbours). -> {layout: {perplexity, nll_per_token, tokens}}."""
    from nextx.data import to_segments
    from nextx.model import dense_attention
    from nextx.objective import compute_loss
    from nextx.sequence import collate, layout_document, pack_row

    pairs = [d for d in docs if d.is_pair()]
    if not pairs:
        raise ValueError("text perplexity needs caption+image documents; none among the held-out documents")
    obj = dataclasses.replace(cfg.objective, cfg_drop=0.0)
    device = next(model.parameters()).device
    out = {}
    for name, ratio in (("caption_alone", 1.0), ("caption_given_image", 0.0)):
        lays = []
        for d in pairs:
            segs = to_segments(d, text_tok, image_tok, t2i_ratio=ratio, max_text_tokens=cfg.data.max_text_tokens,
                               use_latents=cfg.data.use_latents, rng=random.Random(0), stats={})
            lays.append(layout_document(segs, special, drop_trailing_clean=cfg.data.drop_trailing_clean,
                                        noise_copies=cfg.data.noise_copies))
        width = max(len(lay) for lay in lays)
        rows = [pack_row([lay], width, special.pad) for lay in lays]
        nll, n = 0.0, 0
        was = model.training
        model.eval()
        with dense_attention(model):
            for i in range(0, len(rows), batch_rows):
                b = collate(rows[i:i + batch_rows]).to(device)
                _, parts = compute_loss(model, b, obj, special, attention="sdpa", n_heads=cfg.model.n_heads,
                                        generator=torch.Generator().manual_seed(i))
                k = int(parts["text_targets"])
                nll += float(parts["ce"]) * k
                n += k
        model.train(was)
        out[name] = {"perplexity": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n}
    return out


def evaluate(model, cfg, text_tok, image_tok, special, docs, steps, *, cfg_scale: float, batch: int, seed: int,
             out: Path | None, clip=None, perplexity: bool = True) -> dict:
    """One model's section of the report: `shapes_eval.run_eval` (generation, exact scores, captions, CLIP) at
    each step count, the latency per image, and the held-out text perplexity."""
    from evals.shapes_eval import run_eval

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    res = run_eval(model, cfg, text_tok, image_tok, special, docs, list(steps), cfg_scale=cfg_scale, batch=batch,
                   seed=seed, out=out, clip=clip)
    for r in res["t2i"].values():
        r["latency_s_per_image"] = r["gen_seconds"] / res["n"]
    if perplexity:
        res["perplexity"] = text_perplexity(model, cfg, text_tok, image_tok, special, docs)
    return res


# --------------------------------------------------------------------------------------------------------
# Tables, plots, markdown


def _fmt(r: dict, fact: str) -> str:
    if fact not in r["accuracy"]:
        return "-"
    return f"{r['accuracy'][fact]:.2f} ({r['chance_accuracy'][fact]:.2f})"


def markdown(report: dict) -> str:
    from evals.shapes_eval import FACTS

    s = report["settings"]
    lines = ["# nextx evaluation report", "",
             f"{s['n']} held-out prompts of `{s['prompts']}`, seed {s['seed']}, CFG scale {s['cfg_scale']}, "
             f"batch {s['batch']}, device {s['device']}; {s['date']}.", "",
             "Exact fact accuracy of the generated images, chance in brackets (the same images scored against "
             "shuffled prompts); latency is generation only, per image.", ""]
    head = "| model | steps | prompts | " + " | ".join(FACTS) + " | all facts | CLIPScore | FD | s / image |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, sec in report["models"].items():
        for k, r in sec["t2i"].items():
            groups = [("all", r)] + [(f"{n}-obj", rn) for n, rn in r.get("by_objects", {}).items()]
            for g, rg in groups:
                main = g == "all"
                clip = f"{r['clipscore']:.1f} ({r['clipscore_shuffled']:.1f})" if main and "clipscore" in r else ""
                fd = f"{r['fd']:.3f}" if main and "fd" in r else ""
                lat = f"{r['latency_s_per_image']:.4f}" if main else ""
                lines.append(f"| {name if main else ''} | {k if main else ''} | {g} {rg['n']} | "
                             + " | ".join(_fmt(rg, f) for f in FACTS)
                             + f" | {rg['all_correct']:.2f} ({rg['chance_all_correct']:.2f}) | {clip} | {fd} | {lat} |")
    lines += ["", "| model | captions: precision (shuffled) | recall (shuffled) | perplexity, caption alone | "
              "perplexity, caption given image |", "|---|---|---|---|---|"]
    for name, sec in report["models"].items():
        c, p = sec["caption"], sec.get("perplexity", {})
        ppl = [f"{p[k]['perplexity']:.3f} ({p[k]['tokens']} tokens)" if k in p else "-"
               for k in ("caption_alone", "caption_given_image")]
        lines.append(f"| {name} | {c['precision']:.3f} ({c['chance_precision']:.3f}) | {c['recall']:.3f} "
                     f"({c['chance_recall']:.3f}) | {ppl[0]} | {ppl[1]} |")
    clip_refs = [(n, sec["clip"]) for n, sec in report["models"].items() if "clip" in sec]
    if clip_refs:
        cl = clip_refs[0][1]
        lines += ["", f"CLIP references: real held-out images CLIPScore {cl['real_images_clipscore']:.1f} (shuffled "
                  f"{cl['real_images_shuffled_clipscore']:.1f}); FD floor (other real scenes) "
                  f"{cl['floor_real_vs_real']:.3f}, ceiling (real vs noise) {cl['ceiling_real_vs_noise']:.3f}.",
                  "", "Agreement of CLIPScore with the exact scorer (Spearman rank correlation over the generated "
                  "images of per-image CLIPScore and share of the prompt's facts right): " + "; ".join(
                      f"{n} {k} step{'s' if int(k) > 1 else ''} {r['clipscore_vs_exact_spearman']:.2f}"
                      for n, sec in report["models"].items() for k, r in sec["t2i"].items()
                      if "clipscore_vs_exact_spearman" in r) + "."]
    for name, sec in report["models"].items():
        lines += ["", f"## {name}: captions of held-out images", "", "| truth | generated |", "|---|---|"]
        lines += [f"| {e['truth']} | {e['generated']} |" for e in sec["caption"]["examples"]]
        if sec.get("grid"):
            lines += ["", f"![{name} samples]({Path(sec['grid']).relative_to(report['out']).as_posix()})"]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in report["plots"].items()]
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> dict:
    """score vs steps, score vs latency, FD vs steps (PNG, matplotlib Agg) -> {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    models = report["models"]

    def series(sec, key):
        ks = list(sec["t2i"])
        return [int(k) for k in ks], [key(sec["t2i"][k]) for k in ks]

    colours = dict(zip(PLOT_FACTS + ("all facts",), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    all_steps = sorted({int(k) for sec in models.values() for k in sec["t2i"]})

    def steps_axis(ax):
        ax.set_xscale("log")
        ax.set_xlim(all_steps[0] / 1.4, all_steps[-1] * 1.4)
        ax.set_xticks(all_steps, [str(k) for k in all_steps])
        ax.minorticks_off()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey, xlabel in ((axes[0], None, "sampling steps"), (axes[1], "latency_s_per_image", "seconds per image")):
        for name, sec in models.items():
            for fact in PLOT_FACTS + ("all facts",):
                get = (lambda r: r["all_correct"]) if fact == "all facts" else (lambda r, f=fact: r["accuracy"].get(f, float("nan")))
                ks, ys = series(sec, get)
                xs = ks if xkey is None else [r[xkey] for r in sec["t2i"].values()]
                ax.plot(xs, ys, marker="o" if name == "imm" else "s", color=colours[fact], label=f"{name}: {fact}",
                        linestyle="-" if name == "imm" else "--")
        if xkey is None:
            steps_axis(ax)
        else:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy on held-out prompts")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("exact fact accuracy on held-out prompts (solid: IMM, dashed: flow)")
    fig.tight_layout()
    fig.savefig(out / "score_vs_steps_and_latency.png", dpi=100)
    plt.close(fig)
    made["score vs steps and latency"] = "score_vs_steps_and_latency.png"
    if any("fd" in r for sec in models.values() for r in sec["t2i"].values()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, sec in models.items():
            ks, fd = series(sec, lambda r: r.get("fd", float("nan")))
            axes[0].plot(ks, fd, marker="o", label=name)
            ks, cs = series(sec, lambda r: r.get("clipscore", float("nan")))
            axes[1].plot(ks, cs, marker="o", label=name)
        cl = next(sec["clip"] for sec in models.values() if "clip" in sec)
        axes[0].axhline(cl["floor_real_vs_real"], color="grey", linestyle=":", label="floor: real vs real")
        axes[1].axhline(cl["real_images_clipscore"], color="grey", linestyle=":", label="real images")
        for ax, lab in ((axes[0], "Frechet distance (CLIP features)"), (axes[1], "CLIPScore")):
            steps_axis(ax)
            ax.set_xlabel("sampling steps")
            ax.set_ylabel(lab)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "fd_and_clipscore_vs_steps.png", dpi=100)
        plt.close(fig)
        made["FD and CLIPScore vs steps"] = "fd_and_clipscore_vs_steps.png"
    return made


def write_report(report: dict, out: Path) -> None:
    report["plots"] = plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))


def _steps(p: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    try:
        steps = [int(x) for x in text.split(",")]
    except ValueError:
        p.error(f"{flag} must be comma-separated integers like 1,2,4,8, got {text!r}")
    if not steps or min(steps) < 1:
        p.error(f"{flag} must be step counts >= 1, got {text!r}")
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx eval report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (or checkpoint/export dir) of the IMM model")
    p.add_argument("--flow", default=None, help="run dir of a flow-objective baseline, evaluated at --flow-steps")
    p.add_argument("--steps", default=",".join(map(str, IMM_STEPS)), help="IMM sampling steps (default 1,2,4,8)")
    p.add_argument("--flow-steps", default=",".join(map(str, FLOW_STEPS)), help="flow Euler steps (default 8,25,50)")
    p.add_argument("--n", type=int, default=200, help="held-out prompts (default 200)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action="store_true", help="the exports' EMA weights")
    p.add_argument("--clip", default=None, help="CLIPScore and FD: an open_clip folder (`nextx clip train`) or an "
                   "architecture name with --clip-pretrained")
    p.add_argument("--clip-pretrained", default=None, help="local open_clip weights for --clip NAME")
    p.add_argument("--out", default=None, help="report dir (default RUN/report)")
    a = p.parse_args(argv)
    if a.n < 1 or a.batch < 1:
        p.error(f"--n and --batch must be >= 1, got {a.n} and {a.batch}")
    if a.cfg_scale < 0:
        p.error(f"--cfg-scale must be >= 0, got {a.cfg_scale}")
    steps, flow_steps = _steps(p, a.steps, "--steps"), _steps(p, a.flow_steps, "--flow-steps")
    from evals.clip_align import Clip
    from evals.shapes_eval import held_out_docs
    from nextx.checkpoint import load_for_inference

    from nextx.checkpoint import load_run_config, resolve
    from nextx.errors import UserError

    for name, run in (("imm", a.run), ("flow", a.flow)):  # checked before any work
        if run is not None and (kind := load_run_config(resolve(run) / "config.yaml").objective.kind) != name:
            raise UserError(f"{run} was trained with objective.kind={kind}; give the IMM run first and the flow run "
                            f"with --flow")
    clip = Clip.load(a.clip, a.clip_pretrained) if a.clip else None
    out = Path(a.out or Path(a.run) / "report")
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"out": str(out), "models": {}, "runs": {"imm": str(Path(a.run).resolve())}}
    docs = None
    for name, run, ks in (("imm", a.run, steps), ("flow", a.flow, flow_steps)):
        if run is None:
            continue
        model, cfg, text_tok, image_tok, special = load_for_inference(run, ema=a.ema)
        if docs is None:
            docs = held_out_docs(cfg, a.n)
            prompts = f"{cfg.data.val_shards or cfg.data.train_shards}:{cfg.data.val_split}"
        print(f"== {name}: {run} at steps {ks}", flush=True)
        t0 = time.perf_counter()
        report["models"][name] = evaluate(model, cfg, text_tok, image_tok, special, docs, ks, cfg_scale=a.cfg_scale,
                                          batch=a.batch, seed=a.seed, out=out / name, clip=clip)
        report["models"][name]["seconds"] = time.perf_counter() - t0
        report["runs"][name] = str(Path(run).resolve())
    report["settings"] = {"n": len(docs), "prompts": prompts, "seed": a.seed, "cfg_scale": a.cfg_scale,
                          "batch": a.batch, "device": "cpu", "threads": torch.get_num_threads(), "ema": a.ema,
                          "clip": a.clip, "date": time.strftime("%Y-%m-%d %H:%M")}
    write_report(report, out)
    print((out / "report.md").read_text())
    print(f"-> {out / 'report.md'}, {out / 'report.json'}, plots and grids in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
