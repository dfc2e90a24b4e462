"""The inference API and the `nextx t2i | caption | generate` commands: a thin layer over `nextx.generate`.

    g = Pipeline.from_run("runs/tiny", device="cuda")                           # an exported run / checkpoint
    images = g.t2i(["a red circle", "two blue squares"], steps=4, cfg_scale=1.5)  # (B, 3, H, W) in [0, 1]
    captions = g.caption(images)                                                 # list[str]
    doc = g.generate("a red circle", max_new_tokens=32, force_images=(0,))       # Document of Text/Image segments

`Pipeline` turns strings and pixels into ids and latents (the run's text and image tokenizers) and back; the
sampling itself is `generate.t2i / caption / generate`. The defaults come from the run's config: σ_d, T, ε of
the objective; sampler `euler` at 50 steps for a flow-baseline run, `pushforward` at 4 steps for IMM; guidance
1.5 (docs/imm.md §5) when the run was trained with CFG dropout, else 1. Batches run with generator seed
`seed + index of the batch's first item`, so the same seed and batch size give the same output.

Commands (each writes its settings beside its output):
    nextx t2i RUN --prompt "a red circle" --prompt ... | --prompts-file F  --out DIR   PNG per prompt, grid, json
    nextx caption RUN a.png b.png --out captions.json | captions.csv                  one caption per image
    nextx generate RUN --prompt "..." [--image x.png] --out DIR                       interleaved text and images
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

from nextx import generate, imm
from nextx.documents import Document, Image, Text
from nextx.errors import UserError
from nextx.sequence import ImageTokens, SpecialIds


def to_pil(x: torch.Tensor) -> list[PILImage.Image]:
    """(B, 3, H, W) in [0, 1] -> B RGB PIL images."""
    arr = (x.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [PILImage.fromarray(a) for a in arr]


def grid_image(ims: list[PILImage.Image], cols: int = 8, scale: int = 1) -> PILImage.Image:
    """Images of one size -> one grid (row-major, white background), each cell `scale` times larger."""
    w, h = ims[0].size
    cols = min(cols, len(ims))
    rows = (len(ims) + cols - 1) // cols
    g = PILImage.new("RGB", (cols * w * scale, rows * h * scale), "white")
    for i, im in enumerate(ims):
        g.paste(im.resize((w * scale, h * scale), PILImage.NEAREST), ((i % cols) * w * scale, (i // cols) * h * scale))
    return g


class Pipeline:
    """Text-to-image, captioning and interleaved generation with one model (see the module docstring).

    model: a NextX in eval mode; text_tok / image_tok: the run's tokenizers; special: their SpecialIds (from
    text_tok when None); sigma_d, T, eps, null_prompt: the objective's; sampler, steps, cfg_scale: the defaults of
    the image sampler; restart_only: the model was trained at s = eps alone (objective.s_eps_share 1), so a sampler
    that asks for another s (pushforward: s = t_next; euler: s = t) is refused, not run on times it never saw."""

    def __init__(self, model, text_tok, image_tok, special: SpecialIds | None = None, device=None, *,
                 sigma_d: float = imm.SIGMA_D, T: float = imm.T_MAX, eps: float = 0.0, sampler: str = "pushforward",
                 steps: int = 4, cfg_scale: float = 1.0, null_prompt: str = "hidden", shift: float = 1.0,
                 restart_only: bool = False):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.text_tok, self.image_tok = text_tok, image_tok.to(self.device)
        self.special = special or SpecialIds.from_tokenizer(text_tok)
        self.sigma_d, self.T, self.eps = sigma_d, T, eps
        self.sampler, self.steps, self.cfg_scale, self.shift = sampler, steps, cfg_scale, shift
        self.null_prompt, self.restart_only = null_prompt, restart_only
        self._check_trained_for(sampler)

    def _check_trained_for(self, sampler: str) -> None:
        """Refuse a sampler whose s the model never trained on (see `restart_only`); names are checked by
        `generate.refine`."""
        if self.restart_only and sampler != "restart":
            raise UserError(f"sampler {sampler!r}: this model was trained at s = eps only (objective.s_eps_share 1), "
                             "the clean-estimate jump of the restart sampler; another sampler asks it for times it "
                             "never saw. Use the restart sampler (--sampler restart)")

    @classmethod
    def from_run(cls, run, device="cpu", *, ema: bool = False) -> "Pipeline":
        """From a run dir (its latest export), an export or checkpoint step dir (`checkpoint.load_for_inference`);
        ema=True: the export's EMA weights."""
        from nextx.checkpoint import load_for_inference

        model, cfg, text_tok, image_tok, special = load_for_inference(run, device, ema=ema)
        return cls.from_model(model, cfg, text_tok, image_tok, special, device)

    @classmethod
    def from_model(cls, model, cfg, text_tok, image_tok, special: SpecialIds | None = None,
                   device=None) -> "Pipeline":
        """A model in memory with its run config (the trainer's sample grids, the evals): the objective's sigma_d,
        T, eps and null prompt; Euler at 50 steps for a flow run, objective.imm_sampler at 4 for IMM;
        the t-grid shifted as its training times were (objective.t_shift); guidance 1.5 when the run was trained
        with CFG dropout. The model is put in eval mode (a caller that trains restores it)."""
        o = cfg.objective
        flow = o.kind == "flow"
        return cls(model, text_tok, image_tok, special, device, sigma_d=o.sigma_d, T=o.T, eps=o.eps,
                   sampler="euler" if flow else o.imm_sampler, steps=50 if flow else 4,
                   cfg_scale=1.5 if o.cfg_drop > 0 else 1.0, null_prompt=o.null_prompt, shift=o.t_shift,
                   restart_only=not flow and o.s_eps_share == 1.0)

    def grid_shift(self, schedule: str, shift: float | None = None) -> float:
        """The time shift a sampler on `schedule` uses: `shift`, or the pipeline's default for the uniform schedule
        (1 for another schedule; an explicit shift there is refused by `imm.sampling_times`)."""
        if shift is not None:
            return shift
        return self.shift if schedule == "uniform" else 1.0

    def _image_kw(self, steps, cfg_scale, sampler, schedule, shift=None) -> dict:
        """Sampler keywords: each None takes the pipeline's default."""
        self._check_trained_for(sampler or self.sampler)
        return dict(steps=steps or self.steps, sampler=sampler or self.sampler, schedule=schedule,
                    shift=self.grid_shift(schedule, shift),
                    sigma_d=self.sigma_d, T=self.T, eps=self.eps, null_prompt=self.null_prompt,
                    cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale)

    def to_pixels(self, images) -> torch.Tensor:
        """PIL images or a (B, 3, H, W) tensor in [0, 1] -> (B, 3, S, S) on the device, S the tokenizer's size."""
        if isinstance(images, torch.Tensor):
            return images.to(self.device).float()
        from nextx.latents import pil_to_tensor

        return pil_to_tensor(list(images), self.image_tok.image_size).to(self.device)

    @torch.no_grad()
    def t2i(self, prompts: Sequence[str | Sequence[str]], *, steps: int | None = None, cfg_scale: float | None = None,
            sampler: str | None = None, schedule: str = "uniform", shift: float | None = None, seed: int = 0,
            batch_size: int = 16, progress: bool = False, complete: int = 0, temperature: float = 1.0,
            return_written: bool = False, regions: Callable[[str], np.ndarray | None] | None = None,
            accept: Callable[[int, list[str]], bool] | None = None, tries: int = 1, best_of: int = 1):
        """Prompts -> images (B, 3, H, W) float32 in [0, 1] on CPU. A prompt given as a list of strings is drawn
        as one image composed of its parts (`generate.composed_guidance` at the guidance scale: each part, e.g. one
        object, guides the same image). complete > 0: the model first finishes each prompt (each part) in up to
        `complete` text tokens sampled at `temperature`, then draws (`generate.t2i_completed`); return_written=True:
        -> (images, what it wrote: per prompt a string, "" where it opened the image at once, or per part a list).
        regions: regional composition of prompts of several parts: a part's finished text (its words included) -> the
        (h, w) bool mask of the token grid it claims, or None for none (`generate.region_weights`: each part alone
        guides its region, all parts share the rest). accept (with complete > 0): (index of the prompt in
        `prompts`, its parts' finished texts) -> whether the words fit it; the words of a prompt they do not fit are
        written again, all its parts, up to `tries` samples in all (`generate.t2i_completed`). best_of > 1: each
        image drawn best_of times and the one the model itself finds likeliest to be captioned by its prompt kept
        (`generate.caption_logprob`; the first draw is the image of best_of=1)."""
        from tqdm import tqdm

        kw = self._image_kw(steps, cfg_scale, sampler, schedule, shift)
        out, written = [], []
        for i in tqdm(range(0, len(prompts), batch_size), desc="t2i", disable=not progress):
            batch = prompts[i:i + batch_size]
            parts = [[p] if isinstance(p, str) else list(p) for p in batch]
            if any(not q for q in parts):
                raise ValueError("a composed prompt needs at least one part, got an empty list")
            image_of = [j for j, q in enumerate(parts) for _ in q]
            ids = [self.text_tok.encode(x) for q in parts for x in q]
            composed = len(ids) > len(batch)
            lat, w = generate.t2i_completed(self.model, ids, self.special, grid=self.image_tok.grid,
                                            latent_dim=self.image_tok.token_dim, complete=complete,
                                            temperature=temperature, generator=torch.Generator().manual_seed(seed + i),
                                            image_of=image_of if composed else None,
                                            regions=self._claims(regions) if composed and regions else None,
                                            accept=self._verdicts(accept, i, image_of) if accept else None,
                                            tries=tries, best_of=best_of, **kw)
            w = iter(self.text_tok.decode(x) for x in w)
            written += [next(w) if isinstance(p, str) else [next(w) for _ in p] for p in batch]
            out.append(self.image_tok.decode(lat).cpu())
        ims = torch.cat(out) if out else torch.zeros(0, 3, self.image_tok.image_size, self.image_tok.image_size)
        return (ims, written) if return_written else ims

    def _verdicts(self, accept: Callable[[int, list[str]], bool], first: int,
                  image_of: list[int]) -> Callable[[list[list[int]]], list[bool]]:
        """`Pipeline.t2i`'s accept (prompt index, its parts' texts -> bool) as `generate.t2i_completed`'s (the
        batch's finished rows -> one verdict per row, every part of a prompt getting the prompt's)."""
        def verdicts(rows: list[list[int]]) -> list[bool]:
            texts: dict[int, list[str]] = {}
            for j, ids in zip(image_of, rows):
                texts.setdefault(j, []).append(self.text_tok.decode(ids))
            ok = {j: bool(accept(first + j, t)) for j, t in texts.items()}
            return [ok[j] for j in image_of]
        return verdicts

    def _claims(self, regions: Callable[[str], np.ndarray | None]) -> Callable[[list[list[int]]], torch.Tensor]:
        """`Pipeline.t2i`'s regions (text -> (h, w) mask) as `generate.t2i_completed`'s (ids -> (R, N) bool)."""
        h, w = self.image_tok.grid

        def claims(rows: list[list[int]]) -> torch.Tensor:
            out = torch.zeros((len(rows), h * w), dtype=torch.bool)
            for j, ids in enumerate(rows):
                m = regions(self.text_tok.decode(ids))
                if m is not None:
                    if np.shape(m) != (h, w):
                        raise ValueError(f"regions returned a mask of shape {np.shape(m)} for the {h}x{w} token grid")
                    out[j] = torch.from_numpy(np.asarray(m, dtype=bool).reshape(-1))
            return out
        return claims

    @torch.no_grad()
    def caption(self, images, *, max_new_tokens: int = 48, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int = 0, batch_size: int = 16, progress: bool = False) -> list[str]:
        """PIL images or pixels (B, 3, H, W) in [0, 1] -> one caption each. Layout tokens (<pad>, <bos>, <boi>,
        <eoi>) are never sampled."""
        from tqdm import tqdm

        px = self.to_pixels(images)
        sp = self.special
        caps: list[str] = []
        for i in tqdm(range(0, len(px), batch_size), desc="caption", disable=not progress):
            ids = generate.caption(self.model, self.image_tok.encode(px[i:i + batch_size]), sp,
                                   grid=self.image_tok.grid, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, suppress=(sp.pad, sp.bos, sp.boi, sp.eoi),
                                   generator=torch.Generator().manual_seed(seed + i))
            caps += [self.text_tok.decode(x) for x in ids]
        return caps

    def _prompt_segments(self, prompt) -> list:
        """A string, or a list of strings / PIL images / (3, H, W) tensors -> segments of ids and ImageTokens."""
        parts = [prompt] if isinstance(prompt, str) else list(prompt)
        segs: list = []
        for p in parts:
            if isinstance(p, str):
                segs.append(self.text_tok.encode(p))
            else:
                px = self.to_pixels(p[None] if isinstance(p, torch.Tensor) else [p])
                tok = self.image_tok.encode(px)[0].cpu().numpy()
                segs.append(ImageTokens(tok, self.image_tok.grid, generate=False))
        return segs

    @torch.no_grad()
    def generate_many(self, prompts: Sequence, *, max_new_tokens: int = 128, force_images: Sequence[int] = (),
                      max_images: int | None = 4, steps: int | None = None, cfg_scale: float | None = None,
                      sampler: str | None = None, schedule: str = "uniform", shift: float | None = None,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                      progress: bool = False) -> list[Document]:
        """Interleaved generation for a batch of prompts (each a string or a list of strings and images) ->
        one Document per prompt holding the NEW segments (Text, and Image with pixels and latents);
        `meta["prompt"]` keeps the prompt. force_images: indices of sampled tokens replaced by <boi>."""
        sp = self.special
        docs = generate.generate(
            self.model, [self._prompt_segments(p) for p in prompts], sp, grid=self.image_tok.grid,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            suppress=(sp.pad, sp.bos, sp.eoi), force_boi_at=force_images, max_images=max_images,
            generator=torch.Generator().manual_seed(seed), progress=progress,
            **self._image_kw(steps, cfg_scale, sampler, schedule, shift))
        out = []
        for prompt, segs in zip(prompts, docs):
            shown = prompt if isinstance(prompt, str) else [p if isinstance(p, str) else "<image>" for p in prompt]
            doc = Document(key="generated", segments=[], meta={"prompt": shown})
            for seg in segs:
                if isinstance(seg, torch.Tensor):
                    px = self.image_tok.decode(seg[None].to(self.device))
                    doc.segments.append(Image(pixels=to_pil(px)[0], latents=seg.numpy()))
                else:
                    text = self.text_tok.decode(seg)
                    if text:
                        doc.segments.append(Text(text))
            out.append(doc)
        return out

    def generate(self, prompt, **kw) -> Document:
        """One prompt (a string, or a list of strings and images) -> a Document (see `generate_many`)."""
        return self.generate_many([prompt], **kw)[0]


# --------------------------------------------------------------------------------------------------------
# Commands


def _common(p: argparse.ArgumentParser, image: bool) -> None:
    p.add_argument("run", help="run dir (its latest export), or an export / checkpoint step dir")
    p.add_argument("--ema", action="store_true", help="the export's EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    if image:
        p.add_argument("--steps", type=int, default=None,
                       help="refinement steps per image (default: 4 for IMM runs, 50 for flow runs)")
        p.add_argument("--cfg-scale", type=float, default=None,
                       help="guidance scale w (default 1.5 if the run trained with CFG dropout, else 1 = off)")
        p.add_argument("--sampler", default=None, choices=generate.SAMPLERS,
                       help="default: euler for flow runs, the run's objective.imm_sampler for IMM")
        p.add_argument("--schedule", default="uniform", choices=["uniform", "edm"], help="t-grid (docs/imm.md §6)")
        p.add_argument("--shift", type=float, default=None, help="time shift of the uniform t-grid (default: the "
                       "run's objective.t_shift, so it samples where it trained; 1 = plain linspace)")


def _text_opts(p: argparse.ArgumentParser, max_new: int, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse values that would silently do something else (argparse's usage + one line, exit 2)."""
    rules = [("steps", lambda v: v is None or v >= 1, "must be >= 1"),
             ("cfg_scale", lambda v: v is None or v >= 0, "must be >= 0 (0 = unconditional, 1 = no guidance)"),
             ("temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
             ("top_k", lambda v: v >= 0, "must be >= 0 (0 = off)"),
             ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)"),
             ("batch_size", lambda v: v >= 1, "must be >= 1"), ("max_new_tokens", lambda v: v >= 1, "must be >= 1"),
             ("grid_cols", lambda v: v >= 1, "must be >= 1"), ("max_images", lambda v: v >= 0, "must be >= 0"),
             ("shift", lambda v: v is None or v > 0, "must be > 0 (1 = no shift)")]
    for name, ok, msg in rules:
        if hasattr(a, name) and not ok(getattr(a, name)):
            p.error(f"--{name.replace('_', '-')} {msg}, got {getattr(a, name)}")


def read_prompts(path: str) -> list[str]:
    """One prompt per line (blank lines skipped) of a UTF-8 text file; an empty or undecodable file is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts-file {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") \
            from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise UserError(f"--prompts-file {path}: no prompts in it (one per line)")
    return prompts


def warn_unknown(g: Pipeline, prompts: Sequence[str]) -> None:
    """Say which prompts hold text the tokenizer cannot represent (it becomes <unk>, which the model never saw as
    a word), e.g. upper case or words outside a small built-in vocabulary."""
    unk = getattr(g.text_tok, "unk_id", None)
    if unk is None:
        return
    bad = [pr for pr in prompts if unk in g.text_tok.encode(pr)]
    for pr in bad[:5]:
        pieces = [w for w in pr.split() if unk in g.text_tok.encode(w)]
        print(f"warning: prompt {pr!r}: {', '.join(map(repr, pieces)) or 'part of it'} not in the tokenizer's "
              "vocabulary (encoded as <unk>)", file=sys.stderr)
    if len(bad) > 5:
        print(f"warning: {len(bad) - 5} more prompt(s) with unknown text", file=sys.stderr)


def _settings(g: Pipeline, a: argparse.Namespace, image: bool) -> dict:
    s = {"run": str(a.run), "ema": a.ema, "device": str(g.device), "seed": a.seed}
    if image:
        s.update(steps=a.steps or g.steps, cfg_scale=g.cfg_scale if a.cfg_scale is None else a.cfg_scale,
                 sampler=a.sampler or g.sampler, schedule=a.schedule, shift=g.grid_shift(a.schedule, a.shift),
                 sigma_d=g.sigma_d, T=g.T, eps=g.eps)
    return s


def finished_parts(drawn: str | list[str], written: str | list[str]) -> list[str]:
    """A prompt's parts (or the prompt, as one part) with the words the model added to each (`Pipeline.t2i`'s
    written)."""
    parts, words = ([drawn], [written]) if isinstance(drawn, str) else (drawn, written)
    return [f"{p} {x}".strip() for p, x in zip(parts, words)]


def _parts(prompt: str) -> str | list[str]:
    """`nextx t2i --compose`: a prompt's parts, split at ' AND ', or the noun phrases of a shapes caption naming
    several objects (`data_tools.shapes.noun_phrases`), or the prompt itself."""
    if " AND " in prompt:
        return [x.strip() for x in prompt.split(" AND ")]
    from data_tools.shapes import ParseError, noun_phrases

    try:
        return noun_phrases(prompt)
    except ParseError:
        return prompt


def drawing_args(p: argparse.ArgumentParser) -> None:
    """The options of how a prompt is drawn, shared by `nextx t2i` and `nextx eval shapes` (`check_drawing_args`
    refuses their bad combinations)."""
    p.add_argument("--complete", type=int, default=0, help="let the model first finish each prompt in up to N text "
                   "tokens (what the prompt leaves open, e.g. where), then draw (default 0: draw at once)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --complete's words "
                   "(0 = greedy)")
    p.add_argument("--compose", action="store_true", help="a prompt 'A AND B', or a shapes caption of several "
                   "objects (its noun phrases; a relation word is not given to the model), is one image guided by "
                   "each part (composed guidance at the guidance scale)")
    p.add_argument("--regions", action="store_true", help="with --compose: each part guides only the cell its words "
                   "name ('... in the top left'; the shapes caption language), all parts the rest")
    p.add_argument("--tries", type=int, default=1, help="with --complete: write a prompt's words again, up to N "
                   "samples, until they fit it in the shapes caption language (every part names a cell, no two the "
                   "same, the prompt's relation holds; default 1: keep the first words)")
    p.add_argument("--best-of", type=int, default=1, help="draw each image N times and keep the one the model "
                   "itself finds likeliest to be captioned by its prompt (`generate.caption_logprob`; default 1)")


def check_drawing_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """`drawing_args`' values that would silently do something else: argparse's usage + one line, exit 2."""
    if a.complete < 0:
        p.error(f"--complete must be >= 0 text tokens, got {a.complete}")
    if a.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}")
    if a.best_of < 1:
        p.error(f"--best-of must be >= 1, got {a.best_of}")
    if a.regions and not a.compose:
        p.error("--regions places the parts of a composed prompt: add --compose")
    if a.tries < 1 or (a.tries > 1 and not a.complete):
        p.error(f"--tries must be >= 1, and > 1 only with --complete (the words written again); got {a.tries}")


def t2i_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx t2i", description="Text-to-image from a trained run: one PNG per prompt "
                                "(000.png, 001.png, ...), grid.png and settings.json in --out.")
    _common(p, image=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", help="a text file, one prompt per line (blank lines skipped)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grid-cols", type=int, default=8)
    drawing_args(p)
    a = p.parse_args(argv)
    _check(p, a)
    check_drawing_args(p, a)
    prompts = a.prompt or read_prompts(a.prompts_file)
    g = Pipeline.from_run(a.run, a.device, ema=a.ema)
    t0 = time.perf_counter()
    drawn = [_parts(pr) if a.compose else pr for pr in prompts]
    if any(not x for d in drawn if isinstance(d, list) for x in d):
        p.error("--compose: a prompt has an empty part around ' AND '")
    warn_unknown(g, [x for d in drawn for x in ([d] if isinstance(d, str) else d)])     # what the model reads
    from data_tools.shapes import part_region, words_fit

    where = (lambda text: part_region(text, g.image_tok.grid)) if a.regions else None
    fits = (lambda i, texts: words_fit(prompts[i], texts)) if a.tries > 1 else None
    px, written = g.t2i(drawn, steps=a.steps, cfg_scale=a.cfg_scale, sampler=a.sampler, schedule=a.schedule,
                        shift=a.shift, seed=a.seed, batch_size=a.batch_size, progress=True, complete=a.complete,
                        temperature=a.temperature, return_written=True, regions=where, accept=fits, tries=a.tries,
                        best_of=a.best_of)
    secs = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ims = to_pil(px)
    files = []
    for i, im in enumerate(ims):
        files.append(f"{i:03d}.png")
        im.save(out / files[-1])
    grid_image(ims, a.grid_cols, scale=max(1, 128 // ims[0].size[0])).save(out / "grid.png")
    settings = {**_settings(g, a, True), "batch_size": a.batch_size, "best_of": a.best_of, "seconds": round(secs, 3),
                "images_per_second": round(len(ims) / secs, 3),
                "images": [{"prompt": pr, "file": f} for pr, f in zip(prompts, files)]}
    for item, d in zip(settings["images"], drawn):
        if isinstance(d, list):
            item["parts"] = d
    if a.compose:
        settings.update(compose=True, regions=a.regions)
    if a.complete:
        settings.update(complete=a.complete, temperature=a.temperature, tries=a.tries)
        for item, d, w in zip(settings["images"], drawn, written):
            item["written"] = w
            if a.tries > 1:
                item["words_fit"] = words_fit(item["prompt"], finished_parts(d, w))
            unfit = a.tries > 1 and not item["words_fit"]
            print(f"{item['file']}: {item['prompt']!r} + {w!r}"
                  + (f" (no words that fit in {a.tries} samples)" if unfit else ""))
    (out / "settings.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    print(f"{len(ims)} image(s) in {secs:.2f} s -> {out}/ (grid.png, settings.json)")
    return 0


def caption_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx caption", description="Caption images with a trained run; prints "
                                "'image<TAB>caption' lines and writes --out (.json: a list of {image, caption}, "
                                ".csv: columns image,caption) with the settings (JSON only).")
    _common(p, image=False)
    p.add_argument("images", nargs="+", help="image files (any size: centre-cropped and resized)")
    p.add_argument("--out", default=None, help="captions.json or captions.csv")
    p.add_argument("--batch-size", type=int, default=16)
    _text_opts(p, max_new=48, temperature=0.0)
    a = p.parse_args(argv)
    _check(p, a)
    g = Pipeline.from_run(a.run, a.device, ema=a.ema)
    pil, good, errors = [], [], {}
    for f in a.images:  # one unreadable file is reported, the others are still captioned
        try:
            with PILImage.open(f) as im:
                pil.append(im.convert("RGB"))
            good.append(f)
        except (OSError, PILImage.DecompressionBombError) as e:
            errors[f] = f"{type(e).__name__}: {e}"
            print(f"{f}\terror: not a readable image ({e})", file=sys.stderr)
    caps = g.caption(pil, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                     seed=a.seed, batch_size=a.batch_size, progress=True) if pil else []
    by_file = dict(zip(good, caps))
    for f, c in by_file.items():
        print(f"{f}\t{c}")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"image": f, "caption": by_file[f]} if f in by_file else {"image": f, "caption": "", "error": errors[f]}
                for f in a.images]
        if out.suffix.lower() == ".csv":
            with out.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["image", "caption", "error"], restval="")
                w.writeheader()
                w.writerows(rows)
        else:
            settings = {**_settings(g, a, False), "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
                        "top_k": a.top_k, "top_p": a.top_p}
            out.write_text(json.dumps({"settings": settings, "captions": rows}, indent=2, ensure_ascii=False))
        print(f"-> {out}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} of {len(a.images)} file(s) could not be read (listed above)", file=sys.stderr)
        return 1
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx generate", description="Interleaved generation: continue a prompt with "
                                "text and images (the model opens an image with <boi>, or --force-image-at). "
                                "Writes document.json (segments, settings) and img0.png, img1.png, ... in --out.")
    _common(p, image=True)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--image", action="append", default=[], help="context image placed before the prompt text")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--force-image-at", type=int, nargs="*", default=[],
                   help="indices of sampled tokens replaced by <boi> (0 = draw first)")
    p.add_argument("--max-images", type=int, default=4)
    _text_opts(p, max_new=128, temperature=0.0)
    a = p.parse_args(argv)
    _check(p, a)
    g = Pipeline.from_run(a.run, a.device, ema=a.ema)
    warn_unknown(g, [a.prompt])
    prompt: list = []
    for f in a.image:
        with PILImage.open(f) as im:
            prompt.append(im.convert("RGB"))
    prompt.append(a.prompt)
    doc = g.generate(prompt, max_new_tokens=a.max_new_tokens, force_images=a.force_image_at,
                     max_images=a.max_images, steps=a.steps, cfg_scale=a.cfg_scale, sampler=a.sampler,
                     schedule=a.schedule, shift=a.shift, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                     seed=a.seed, progress=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    segs, shown, k = [], [a.prompt], 0
    for s in doc.segments:
        if isinstance(s, Text):
            segs.append({"text": s.text})
            shown.append(s.text)
        else:
            name = f"img{k}.png"
            s.pixels.save(out / name)
            segs.append({"image": name})
            shown.append(f"\n[image: {out / name}]\n")
            k += 1
    settings = {**_settings(g, a, True), "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
                "top_k": a.top_k, "top_p": a.top_p, "force_image_at": a.force_image_at, "max_images": a.max_images}
    (out / "document.json").write_text(json.dumps({"prompt": {"images": a.image, "text": a.prompt},
                                                   "segments": segs, "settings": settings}, indent=2,
                                                  ensure_ascii=False))
    print("".join(shown))
    print(f"-> {out / 'document.json'}", file=sys.stderr)
    return 0
