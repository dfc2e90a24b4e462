"""Your own captioned images -> shards: a folder of images with same-stem .txt captions, or a jsonl of pairs.

    nextx data folder --src stamps/ --out data/stamps64 --size 64 --heldout-frac 0.1
    nextx data folder --src pairs.jsonl --out data/pairs

Sources.
- A folder, searched recursively (sorted, so the output order is fixed): every .png/.jpg/.jpeg/.webp (any case)
  whose caption is the file with the same stem and `.txt` beside it ("tiger.png" + "tiger.txt").
- A .jsonl, one object a line: {"image": path, "caption": text}; a relative path is taken from the jsonl's folder.
Each image becomes one pair document [Text(caption), Image]. Captions are stripped of surrounding whitespace.

Skips. An image without a caption file, an empty caption, an unreadable or undecodable image, a bad jsonl line
(not json, fields missing or not strings) are skipped and counted by kind, and the first few reasons are printed;
nothing stops the run. Exit status 1 when no document was written, 2 when --src does not exist.

Images. Transparent images are composited onto white (PIL's RGB conversion would show the hidden colour under
alpha 0). --size S center-crops to a square and resizes to S x S (LANCZOS); without it the image keeps its size.

Split. --heldout-frac > 0 sends the items whose source path hashes (sha1 of "seed:path") below it to `heldout`;
the rest go to --split (default "train"). The hash uses the path relative to --src, so moving the folder keeps it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image as PILImage

from nextx.documents import Document, Image, Text, write_shards

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp"}
N_REASONS = 5  # skip reasons printed in full


class Skips:
    """Counts skipped items by kind and keeps the first few reasons; what every source tool reports at the end."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.reasons: list[str] = []

    def add(self, kind: str, reason: str) -> None:
        self.counts[kind] += 1
        if len(self.reasons) < N_REASONS:
            self.reasons.append(reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        if not self.counts:
            return "skipped: none"
        lines = ["skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))]
        lines += [f"  {r}" for r in self.reasons]
        if self.total > len(self.reasons):
            lines.append(f"  ... and {self.total - len(self.reasons)} more")
        return "\n".join(lines)


def load_image(path: Path, size: int | None = None) -> PILImage.Image:
    """Image file -> RGB (alpha composited on white), center-cropped and resized to (size, size) when given.

    Raises OSError / ValueError (PIL's many kinds) on unreadable data; callers catch Exception and skip.
    """
    with PILImage.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            img = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
            img = img.convert("RGB")
        else:
            img = im.convert("RGB")
    if size is not None:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), PILImage.LANCZOS)
    return img


def is_heldout(rel: str, frac: float, seed: int) -> bool:
    if frac <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(f"{seed}:{rel}".encode()).digest()[:8], "big")
    return h / 2 ** 64 < frac


def key_prefix(src: Path) -> str:
    """Source name -> a key prefix without '.' or '/' ("my.pairs.jsonl" -> "my_pairs")."""
    stem = src.stem if src.is_file() else src.resolve().name
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "folder"


def folder_items(src: Path, skips: Skips) -> list[tuple[str, Path, str]]:
    """(relative path, image path, caption) for every image in a folder tree that has a non-empty caption."""
    items = []
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        rel = path.relative_to(src).as_posix()
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            skips.add("no caption", f"{rel}: no caption file {txt.name}")
            continue
        try:
            caption = txt.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            skips.add("unreadable caption", f"{rel}: caption {txt.name} unreadable ({e})")
            continue
        if not caption:
            skips.add("empty caption", f"{rel}: caption {txt.name} is empty")
            continue
        items.append((rel, path, caption))
    return items


def jsonl_items(src: Path, skips: Skips) -> list[tuple[str, Path, str]]:
    """(image path as written, resolved path, caption) for every valid line of a jsonl of pairs."""
    items = []
    with open(src, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                skips.add("bad line", f"{src.name}:{lineno}: not json ({e})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(
                    obj.get("caption"), str):
                skips.add("bad line", f"{src.name}:{lineno}: needs string fields 'image' and 'caption'")
                continue
            caption = obj["caption"].strip()
            if not caption:
                skips.add("empty caption", f"{src.name}:{lineno}: empty caption")
                continue
            path = Path(obj["image"])
            items.append((obj["image"], path if path.is_absolute() else src.parent / path, caption))
    return items


def documents(items: list[tuple[str, Path, str]], prefix: str, size: int | None, skips: Skips,
              loaded: Counter) -> Iterator[Document]:
    """Load each item's image lazily (one at a time in memory); unreadable images are skipped and counted."""
    for index, rel, path, caption in items:
        try:
            img = load_image(path, size)
        except FileNotFoundError:
            skips.add("image missing", f"{rel}: image file not found ({path})")
            continue
        except Exception as e:  # PIL raises many types on corrupt data
            skips.add("unreadable image", f"{rel}: image unreadable ({type(e).__name__}: {e})")
            continue
        loaded[f"{img.width}x{img.height}"] += 1
        yield Document(f"{prefix}_{index:07d}", [Text(caption), Image(pixels=img)], {"source": rel})


def add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--force", action="store_true", help="replace what --out already holds")
    p.add_argument("--size", type=int, default=None, help="center-crop to a square and resize to SIZE px")
    p.add_argument("--split", default="train", help="split name of the output (default train)")
    p.add_argument("--heldout-frac", type=float, default=0.0, help="share of items sent to split 'heldout'")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out hash")
    p.add_argument("--max-per-shard", type=int, default=1000)


def check_split_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    from nextx.errors import refuse_existing

    refuse_existing(a.out, a.force, "shards", "*.tar")
    if a.size is not None and a.size < 1:
        p.error("--size must be >= 1")
    if not 0 <= a.heldout_frac <= 1:
        p.error("--heldout-frac must be in [0, 1]")
    if "-" in a.split or "/" in a.split or not a.split:
        p.error(f"--split {a.split!r}: a split name must be non-empty without '-' or '/' (shards are SPLIT-N.tar)")
    if a.heldout_frac > 0 and a.split == "heldout":
        p.error("--split heldout with --heldout-frac > 0 would write both parts to one split")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nextx data folder", description="A folder of images with same-stem .txt "
                                "captions, or a jsonl of {\"image\", \"caption\"} -> WebDataset shards of pairs.")
    p.add_argument("--src", required=True, help="folder (searched recursively) or .jsonl file")
    add_split_args(p)
    a = p.parse_args(argv)
    check_split_args(p, a)
    src = Path(a.src)
    if not src.exists():
        print(f"nextx data folder: --src {src} does not exist", file=sys.stderr)
        return 2
    t0 = time.time()
    skips = Skips()
    items = folder_items(src, skips) if src.is_dir() else jsonl_items(src, skips)
    numbered = [(i, *item) for i, item in enumerate(items)]
    parts = {a.split: [x for x in numbered if not is_heldout(x[1], a.heldout_frac, a.seed)]}
    if a.heldout_frac > 0:
        parts["heldout"] = [x for x in numbered if is_heldout(x[1], a.heldout_frac, a.seed)]
    prefix = key_prefix(src)
    info = {"generator": "data_tools.folder", "source": str(src.resolve()), "image_size": a.size,
            "heldout_frac": a.heldout_frac, "seed": a.seed}
    written, sizes = 0, Counter()
    for split, part in parts.items():
        summary = write_shards(documents(part, prefix, a.size, skips, sizes), a.out, split=split,
                               max_per_shard=a.max_per_shard, total=len(part), info=info)
        written += summary["n_docs"]
        print(f"{split}: {summary['n_docs']} docs in {summary['n_shards']} shard(s)")
    common = ", ".join(f"{k} ({v})" for k, v in sizes.most_common(3))
    print(skips.report())
    print(f"folder: {written} written, {skips.total} skipped; image sizes {common or '-'}"
          f"{' ...' if len(sizes) > 3 else ''}; {time.time() - t0:.1f} s -> {a.out}")
    if written == 0:
        print(f"nextx data folder: nothing written from {src}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
